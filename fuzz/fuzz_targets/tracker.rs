//! The prepared-statement rewriter and reply tracking, end to end: a client byte stream goes
//! through the client scanner and `Tracker::rewrite` to a model PostgreSQL (`FakePg`), whose
//! replies come back through `ServerScan` with the tracker (`Tracker::reply`/`answer`), reads
//! split at random both ways. A first client warms the server connection (its statements,
//! LRU evictions with a small `max`); the second client's replies must be what the model
//! server answers to its stream sent directly, and the tracker never loses step.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use tenantpool::prepared::{ClientStatements, ServerStatements, StatementCache, Tracker};
use tenantpool_fuzz::{End, FakePg, Input, Rng, client_stream, messages, relay};

/// The client stream up to what the client scanner lets through: before a Terminate.
fn accepted(stream: &[u8]) -> &[u8] {
    let mut pos = 0;
    while stream.len() - pos >= 5 {
        let len = u32::from_be_bytes(stream[pos + 1..pos + 5].try_into().unwrap()) as usize;
        if stream[pos] == b'X' {
            return &stream[..pos];
        }
        pos += len + 1;
        if pos > stream.len() {
            break;
        }
    }
    stream
}

fuzz_target!(|data: &[u8]| {
    let mut i = Input::new(data);
    let mut rng = Rng::from_bytes(i.bytes(8));
    let max = 1 + i.byte() as usize % 4;
    let warm = i.byte() as usize;
    let flags = i.byte();
    let raw = flags == 0xff;
    // Pipelined (every batch sent at once, replies read as they come) or one batch at a
    // time. Only the latter is compared with the model: pipelined, the proxy decides on a
    // statement name before it knows whether an earlier batch failed (see
    // docs/fuzzing.md, "Known differences").
    let one_batch = flags & 1 == 0;
    let first = client_stream(&mut Input::new(i.bytes(warm)));
    let second = if raw {
        i.rest().to_vec()
    } else {
        client_stream(&mut i)
    };

    let cache = Arc::new(StatementCache::default());
    let mut server = ServerStatements::default();
    let mut pg = FakePg::default();
    {
        let mut c1 = ClientStatements::default();
        let mut t = Tracker::new(&mut c1, &mut server, &cache, 0, max);
        let mut sink = Vec::new();
        let mut fed = 0;
        let end = relay(
            &first, &mut rng, &mut t, &mut pg, &mut sink, one_batch, &mut fed,
        );
        if end != End::Quiet || !pg.idle() {
            return;
        }
        assert!(!t.desync, "the tracker lost step with the first client");
        assert_eq!(t.expecting(), 0, "replies expected from an idle server");
    }
    pg.next_client();

    let mut c2 = ClientStatements::default();
    let mut t = Tracker::new(&mut c2, &mut server, &cache, 0, max);
    let mut got = Vec::new();
    let mut fed = 0;
    let end = relay(
        &second, &mut rng, &mut t, &mut pg, &mut got, one_batch, &mut fed,
    );
    if end == End::Violation {
        return;
    }
    assert!(!t.desync, "the tracker lost step");
    if pg.idle() {
        assert_eq!(t.expecting(), 0, "replies expected from an idle server");
    }
    if !one_batch {
        return;
    }

    let mut direct = FakePg::default();
    let mut want = Vec::new();
    direct.feed(accepted(&second[..fed]), &mut want);
    let mut want = messages(&want);
    if std::env::var_os("FUZZ_DEBUG").is_some() {
        eprintln!("first: {:?}", String::from_utf8_lossy(&first));
        eprintln!("second: {:?}", String::from_utf8_lossy(&second));
        eprintln!("end: {end:?}\nwant: {want:?}\ngot: {:?}", messages(&got));
    }
    if let Some(f) = want
        .iter()
        .position(|(tag, code)| *tag == b'E' && code == b"08P01")
    {
        // A FATAL: the proxy holds it back and ends the client's transaction.
        want.truncate(f);
        assert_eq!(end, End::Fatal);
    }
    let got = messages(&got);
    assert_eq!(got, want, "the client's replies differ from PostgreSQL's");
});
