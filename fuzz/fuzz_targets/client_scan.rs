//! `ClientScan::scan` over arbitrary bytes read in arbitrary pieces (and a buffer that the
//! relay empties from the front as it forwards): never a position before `from` or past the
//! input, and the same result however the bytes were split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tenantpool::client::relay::ClientScan;
use tenantpool_fuzz::{Input, Rng, client_stream, split};

/// Scans `data` in the pieces `rng` chooses; returns the bytes passed in all, or None on a
/// protocol violation.
fn scan_split(data: &[u8], rng: &mut Rng, s: &mut ClientScan) -> Option<usize> {
    let mut buf: Vec<u8> = Vec::new();
    let (mut fwd, mut passed) = (0usize, 0usize);
    for piece in split(data, rng) {
        buf.extend_from_slice(piece);
        let end = s.scan(&buf, fwd).ok()?;
        assert!(end >= fwd, "went back");
        assert!(end <= buf.len(), "past the input");
        fwd = end;
        // The relay forwards some of what passed: it leaves the buffer's front.
        let gone = (rng.next_u64() as usize) % (fwd + 1);
        buf.drain(..gone);
        fwd -= gone;
        passed += gone;
    }
    Some(passed + fwd)
}

fuzz_target!(|data: &[u8]| {
    let mut i = Input::new(data);
    let mut rng = Rng::from_bytes(i.bytes(8));
    let structured = i.byte() & 1 == 0;
    let stream = if structured {
        client_stream(&mut i)
    } else {
        i.rest().to_vec()
    };
    let mut whole = ClientScan::default();
    let want = whole.scan(&stream, 0).ok();
    if let Some(end) = want {
        assert!(end <= stream.len());
    }
    let mut parts = ClientScan::default();
    let got = scan_split(&stream, &mut rng, &mut parts);
    assert_eq!(
        got.is_some(),
        want.is_some(),
        "a violation depends on the split"
    );
    if got.is_some() {
        assert_eq!(got, want);
        assert_eq!(parts.pending, whole.pending);
        assert_eq!(parts.unsynced, whole.unsynced);
        assert_eq!(parts.terminated, whole.terminated);
        assert_eq!(parts.body_left, whole.body_left);
        assert_eq!(
            parts.touched, whole.touched,
            "sniffed bits depend on the split"
        );
    }
});
