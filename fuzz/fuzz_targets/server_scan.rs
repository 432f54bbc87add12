//! `ServerScan::scan` over arbitrary server bytes read in arbitrary pieces, without and with
//! a statement `Tracker` (whose expected replies come from a client stream rewritten first):
//! it never covers more than it was given, leaves at most one message unscanned, and what
//! the client gets (forwarded bytes, dropped replies, the proxy's own answers, in order) and
//! what it counts is the same however the bytes were split.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use tenantpool::client::relay::{ClientScan, ServerScan};
use tenantpool::prepared::{ClientStatements, ServerStatements, StatementCache, Tracker};
use tenantpool::splice::Out;
use tenantpool_fuzz::{Input, Rng, client_stream, put_msg, split};

#[derive(Debug, PartialEq, Eq)]
struct Seen {
    error: bool,
    to_client: Vec<u8>,
    unscanned: usize,
    ready: u32,
    idle: u32,
    status: u8,
    touched: u8,
    fatal: Option<(String, String)>,
    reported: Vec<(String, String)>,
    reset_seen: bool,
    swallow: u8,
    swallow_error: bool,
    desync: bool,
    expecting: usize,
}

/// Server bytes from fuzzer choices: mostly well-framed replies of every backend type.
fn server_stream(i: &mut Input<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    while !i.is_empty() {
        let op = i.byte();
        let tags = b"123tnTDCIsZESNAVGHdc";
        let tag = tags[op as usize % tags.len()];
        let body: Vec<u8> = match tag {
            b'Z' => vec![b"ITE"[i.byte() as usize % 3]],
            b'C' => {
                let t: &[&[u8]] = &[
                    b"SELECT 1\0",
                    b"SET\0",
                    b"RESET\0",
                    b"DISCARD ALL\0",
                    b"DEALLOCATE\0",
                    b"DEALLOCATE ALL\0",
                    b"PREPARE\0",
                    b"LISTEN\0",
                    b"DECLARE CURSOR\0",
                ];
                t[i.byte() as usize % t.len()].to_vec()
            }
            b'E' | b'N' => {
                let sevs: [&[u8]; 4] = [b"ERROR", b"FATAL", b"NOTICE", b"PANIC"];
                let sev = sevs[i.byte() as usize % 4];
                let codes: [&[u8]; 4] = [b"26000", b"42P05", b"08P01", b"42601"];
                let code = codes[i.byte() as usize % 4];
                [b"S", sev, b"\0V", sev, b"\0C", code, b"\0Mm\0\0"].concat()
            }
            b'S' => {
                let names: [&[u8]; 3] = [b"TimeZone", b"application_name", b"x"];
                let name = names[i.byte() as usize % 3];
                [name, b"\0", i.bytes(3), b"\0"].concat()
            }
            _ => {
                let n = i.byte() as usize;
                i.bytes(n).to_vec()
            }
        };
        if op >= 0xf8 {
            // A long message of the type (past what the scanner reads whole).
            let mut b = body;
            b.resize(1100 + 16 * 1024 * usize::from(op == 0xff), b'x');
            put_msg(&mut out, tag, &b);
        } else {
            put_msg(&mut out, tag, &body);
        }
    }
    out
}

fn run(
    stream: &[u8],
    pieces: Option<&mut Rng>,
    swallow: u8,
    client: Option<(&[u8], usize)>,
) -> Seen {
    let cache = Arc::new(StatementCache::default());
    let (mut cst, mut sst) = (ClientStatements::default(), ServerStatements::default());
    let mut tracker = client.map(|(input, max)| {
        let mut t = Tracker::new(&mut cst, &mut sst, &cache, 0, max);
        let mut scan = ClientScan::default();
        let end = scan.scan(input, 0).unwrap_or(0);
        let (mut pos, mut out) = (0, Out::default());
        let _ = t.rewrite(input, &mut pos, end, &mut out);
        t
    });
    let mut s = ServerScan::new(swallow);
    let mut seen = Seen {
        error: false,
        to_client: Vec::new(),
        unscanned: 0,
        ready: 0,
        idle: 0,
        status: 0,
        touched: 0,
        fatal: None,
        reported: Vec::new(),
        reset_seen: false,
        swallow: 0,
        swallow_error: false,
        desync: false,
        expecting: 0,
    };
    let whole = [stream];
    let parts = match pieces {
        Some(rng) => split(stream, rng),
        None => whole.to_vec(),
    };
    let mut buf: Vec<u8> = Vec::new();
    let mut covered_all = 0;
    for piece in parts {
        if s.fatal.is_some() {
            break;
        }
        buf.extend_from_slice(piece);
        let mut out = Out::default();
        match s.scan(&buf, &mut out, tracker.as_mut()) {
            Ok(c) => {
                seen.ready += c.ready;
                seen.idle += c.idle;
            }
            Err(_) => {
                seen.error = true;
                break;
            }
        }
        let covered = out.buf_len();
        assert!(covered <= buf.len(), "covers bytes it was not given");
        seen.to_client.extend(out.flatten(&buf));
        buf.drain(..covered);
        covered_all += covered;
        if s.fatal.is_none() && buf.len() >= 5 {
            // Left: a message read whole (at most an ErrorResponse's 16 kB) not all there.
            let len = u32::from_be_bytes(buf[1..5].try_into().unwrap()) as usize;
            assert!(
                len < 16 * 1024 && buf.len() <= len,
                "left more than one message"
            );
        }
    }
    if seen.error {
        // What went before the error differs (it was sent in pieces or not at all).
        seen.to_client.clear();
        seen.ready = 0;
        seen.idle = 0;
    }
    // Not passed on: the rest of the stream (after a FATAL nothing more is read).
    seen.unscanned = stream.len() - covered_all;
    seen.status = s.status;
    seen.touched = s.touched;
    seen.fatal = s.fatal.take();
    seen.reported = std::mem::take(&mut s.reported);
    seen.reset_seen = s.reset_seen;
    seen.swallow = s.swallow;
    seen.swallow_error = s.swallow_error;
    if let Some(t) = tracker {
        seen.desync = t.desync;
        seen.expecting = t.expecting();
    }
    seen
}

fuzz_target!(|data: &[u8]| {
    let mut i = Input::new(data);
    let mut rng = Rng::from_bytes(i.bytes(8));
    let mode = i.byte();
    let swallow = i.byte() % 3;
    let client = if mode & 2 != 0 {
        let n = i.byte() as usize;
        Some((
            client_stream(&mut Input::new(i.bytes(n))),
            1 + i.byte() as usize % 4,
        ))
    } else {
        None
    };
    let stream = if mode & 1 == 0 {
        server_stream(&mut i)
    } else {
        i.rest().to_vec()
    };
    let client = client.as_ref().map(|(c, m)| (&c[..], *m));
    let whole = run(&stream, None, swallow, client);
    let pieces = run(&stream, Some(&mut rng), swallow, client);
    if whole.error || pieces.error {
        assert_eq!(whole.error, pieces.error, "an error depends on the split");
        return;
    }
    assert_eq!(whole, pieces, "the split changed what the scanner did");
});
