//! The startup-phase packet decision (`startup::packet_len`/`decode_packet`, as
//! `read_first_packet` runs them over a stream of packets), then the session settings of a
//! decoded StartupMessage (`params::session_settings`, `parse_options`). A structured mode
//! builds a valid packet from fuzzer parameters and checks it decodes to them.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use tenantpool::client::params::{FORBIDDEN, parse_options, session_settings, split_options};
use tenantpool::client::startup::{Packet, decode_packet, packet_len};
use tenantpool::protocol::MAX_STARTUP_LEN;
use tenantpool_fuzz::Input;

fn settings(params: &BTreeMap<String, String>) {
    if let Ok(list) = session_settings(params) {
        for w in list.windows(2) {
            assert!(w[0].0 < w[1].0, "settings sorted and unique");
        }
        for (name, _) in &list {
            assert!(!FORBIDDEN.contains(&name.as_str()));
            assert!(!name.is_empty() && !name.bytes().any(|b| b.is_ascii_uppercase()));
        }
    }
    for v in params.values() {
        let _ = split_options(v);
        if let Ok(opts) = parse_options(v) {
            for (name, _) in opts {
                assert!(!name.contains('-'));
            }
        }
    }
}

/// What `read_first_packet` does over a byte stream: packets until a startup or cancel.
fn stream(mut data: &[u8]) {
    loop {
        let Some(prefix) = data.first_chunk::<4>() else {
            return;
        };
        let Ok(len) = packet_len(*prefix) else {
            return;
        };
        assert!((8..=MAX_STARTUP_LEN).contains(&len));
        if data.len() < len {
            return;
        }
        match decode_packet(&data[..len]) {
            Ok(Packet::EncryptionRequest { .. }) => {
                assert_eq!(len, 8);
                data = &data[len..];
            }
            Ok(Packet::Cancel { .. }) => {
                assert_eq!(len, 16);
                return;
            }
            Ok(Packet::Startup(s)) => {
                assert_eq!(s.protocol_number_major, 3);
                settings(&s.parameters);
                return;
            }
            Err(_) => return,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let _ = decode_packet(rest);
        stream(rest);
        return;
    }
    // Structured: parameters from the input, NUL-free, in a valid 3.x packet.
    let mut i = Input::new(rest);
    let minor = i.byte();
    let mut pairs = Vec::new();
    let mut body = Vec::new();
    body.extend_from_slice(&[0, 3, 0, minor]);
    while !i.is_empty() {
        let k = i.byte() as usize % 12;
        let v = i.byte() as usize % 40;
        let key: Vec<u8> = i.bytes(k).iter().map(|&c| c.max(1)).collect();
        let value: Vec<u8> = i.bytes(v).iter().map(|&c| c.max(1)).collect();
        if key.is_empty() {
            continue;
        }
        body.extend_from_slice(&key);
        body.push(0);
        body.extend_from_slice(&value);
        body.push(0);
        pairs.push((key, value));
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    let decoded = decode_packet(&packet);
    if packet.len() > MAX_STARTUP_LEN {
        assert!(decoded.is_err());
        return;
    }
    if pairs.is_empty() {
        return;
    }
    let Ok(Packet::Startup(s)) = decoded else {
        panic!("a valid startup packet was refused");
    };
    assert_eq!(s.protocol_number_minor, u16::from(minor));
    let want: BTreeMap<String, String> = pairs
        .into_iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(&k).into_owned(),
                String::from_utf8_lossy(&v).into_owned(),
            )
        })
        .collect();
    assert_eq!(s.parameters, want);
    settings(&s.parameters);
});
