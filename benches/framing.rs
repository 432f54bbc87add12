//! Criterion benches of the hot-path framing: scanning client and server message headers,
//! and the sniffer that reads every query's text for session-state words.
//!
//! `cargo bench --bench framing`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tenantpool::client::relay::{ClientScan, ServerScan};
use tenantpool::sniff::sniff;

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// What a client sends for one `pgbench -S -M extended` transaction.
fn extended_batch() -> Vec<u8> {
    let mut b = msg(
        b'P',
        b"\0SELECT abalance FROM pgbench_accounts WHERE aid = $1;\0\0\0",
    );
    b.extend(msg(b'B', b"\0\0\0\0\0\x01\0\0\0\x0512345\0\0"));
    b.extend(msg(b'D', b"P\0"));
    b.extend(msg(b'E', b"\0\0\0\0\0"));
    b.extend(msg(b'S', b""));
    b
}

/// What the server answers: ParseComplete, BindComplete, RowDescription, DataRow,
/// CommandComplete, ReadyForQuery.
fn server_reply(rows: usize) -> Vec<u8> {
    let mut b = msg(b'1', b"");
    b.extend(msg(b'2', b""));
    b.extend(msg(
        b'T',
        b"\0\x01abalance\0\0\0\0\0\0\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0",
    ));
    for _ in 0..rows {
        b.extend(msg(b'D', b"\0\x01\0\0\0\x041234"));
    }
    b.extend(msg(b'C', b"SELECT 1\0"));
    b.extend(msg(b'Z', b"I"));
    b
}

fn bench(c: &mut Criterion) {
    let batch = extended_batch();
    let mut g = c.benchmark_group("client_scan");
    g.throughput(Throughput::Bytes(batch.len() as u64));
    g.bench_function("extended_transaction", |b| {
        b.iter(|| {
            let mut s = ClientScan::default();
            black_box(s.scan(black_box(&batch), 0).unwrap());
            black_box(s.pending)
        })
    });
    g.finish();

    // pgbench -S's query, and an ORM-sized one (about 2 kB of quoted identifiers).
    let orm = {
        let cols: Vec<String> = (0..60)
            .map(|i| format!("\"leads\".\"column_number_{i}\" AS \"leads_column_number_{i}\""))
            .collect();
        format!(
            "SELECT {} FROM \"tenant_acme\".\"leads\" WHERE \"leads\".\"owner_id\" = $1 \
             AND \"leads\".\"deleted_at\" IS NULL ORDER BY \"leads\".\"created_at\" DESC LIMIT 50",
            cols.join(", ")
        )
    };
    let queries: [(&str, &[u8]); 2] = [
        (
            "pgbench",
            b"SELECT abalance FROM pgbench_accounts WHERE aid = 12345;",
        ),
        ("orm", orm.as_bytes()),
    ];
    let mut g = c.benchmark_group("sniff");
    for (name, text) in queries {
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_function(name, |b| b.iter(|| black_box(sniff(black_box(text)))));
    }
    g.finish();

    for rows in [1usize, 100] {
        let reply = server_reply(rows);
        let mut g = c.benchmark_group("server_scan");
        g.throughput(Throughput::Bytes(reply.len() as u64));
        g.bench_function(format!("reply_{rows}_rows"), |b| {
            let mut out = tenantpool::splice::Out::default();
            b.iter(|| {
                let mut s = ServerScan::new(0);
                let c = s.scan(black_box(&reply), &mut out, None).unwrap();
                black_box(out.clear());
                black_box(c)
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
