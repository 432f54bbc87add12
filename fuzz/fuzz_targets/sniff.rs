//! `Sniffer::feed` over any split gives the bits of `sniff` on the whole text, and both
//! agree with a plain reference: every whole word, compared case-insensitively.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tenantpool::sniff::{COMMITS, PATH, STATE, STATEMENTS, Sniffer, Touched, sniff};
use tenantpool_fuzz::{Input, Rng, split};

fn reference(text: &[u8]) -> Touched {
    let ident = |c: &u8| c.is_ascii_alphanumeric() || *c == b'_' || *c >= 0x80;
    let mut bits = 0;
    for word in text.split(|c| !ident(c)) {
        let w = word.to_ascii_lowercase();
        bits |= match &w[..] {
            b"role" | b"schema" | b"search_path" | b"authorization" => PATH,
            b"reset" | b"discard" | b"set_config" => PATH | STATE,
            b"temp" | b"temporary" | b"hold" | b"listen" => STATE,
            b"prepare" => STATE | STATEMENTS | COMMITS,
            b"commit" | b"end" => COMMITS,
            w if w.len() > 12 && w.starts_with(b"pg_advisory_") => STATE,
            _ => 0,
        };
    }
    bits
}

fuzz_target!(|data: &[u8]| {
    let mut i = Input::new(data);
    let mut rng = Rng::from_bytes(i.bytes(8));
    let text = i.rest();
    let whole = sniff(text);
    assert_eq!(whole, reference(text), "sniff disagrees with the reference");
    let mut s = Sniffer::default();
    let mut bits = 0;
    for piece in split(text, &mut rng) {
        bits |= s.feed(piece, false);
        if rng.next_u64().is_multiple_of(4) {
            bits |= s.feed(&[], false);
        }
    }
    bits |= s.feed(&[], true);
    assert_eq!(bits, whole, "pieces give other bits than the whole");
});
