//! `prepared::answer_alone` (a Parse/Close/Sync batch answered without a server): when it
//! answers, the answer is byte for byte what the model PostgreSQL answers to the same batch
//! given the client's statements, and the client's statements are the model's after it.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use tenantpool::prepared::{ClientStatements, StatementCache, answer_alone};
use tenantpool_fuzz::{FakePg, Input, QUERIES, client_stream, put_msg};

fuzz_target!(|data: &[u8]| {
    let mut i = Input::new(data);
    let cache = Arc::new(StatementCache::default());
    // Statements the tenant (another client, a server connection) holds.
    let held: Vec<_> = QUERIES
        .iter()
        // Statements held are ones that parsed (a "!" text fails in the model server).
        .filter(|q| q.first() != Some(&b'!'))
        .take(usize::from(i.byte() % 8))
        .map(|q| {
            let tail = [q, &b"\0\0\0"[..]].concat();
            cache.intern(i.byte() as u32 % 2, &tail)
        })
        .collect();
    let mut client = ClientStatements::default();
    let mut pg = FakePg::default();
    while !i.is_empty() {
        let n = i.byte() as usize;
        let mut batch = client_stream(&mut Input::new(i.bytes(n)));
        if !i.byte().is_multiple_of(4) {
            put_msg(&mut batch, b'S', b"");
        }
        let Some(reply) = answer_alone(&mut client, &cache, 0, &batch) else {
            continue;
        };
        let mut want = Vec::new();
        pg.feed(&batch, &mut want);
        assert_eq!(&reply[..], &want[..], "answered unlike PostgreSQL");
        assert!(pg.idle());
    }
    drop(held);
});
