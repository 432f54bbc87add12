//! Network fuzz bench: many short connections send random and mutated frames to a running
//! tenantpool while a few ordinary clients (tokio-postgres) of several tenants keep running
//! simple transactions and check that every answer is their own tenant's.
//!
//! `cargo run --release --example netfuzz -- ADDR TENANTS [FUZZ_CONNS] [CLIENTS] [CONCURRENCY] [SEED]`
//!
//! * `ADDR`: the proxy, `127.0.0.1:6432`, with `auth_method = "trust"`;
//! * `TENANTS`: comma-separated tenant names; each tenant's schema has a table
//!   `who(tenant text)` holding one row, its own name, and a table `scratch(t text)`; the
//!   ordinary clients use them all, the fuzz connections these and `fz` (a tenant nobody
//!   checks) as well;
//! * fuzz connections (default 50,000, `CONCURRENCY` at once, default 32) do one of: random
//!   bytes, mutated startup packets, SSLRequest/GSSENCRequest/CancelRequest mutations before
//!   login; after a good login: garbage, truncated and oversized frames, lone messages of
//!   every frontend type, valid messages (statements, COPY, transaction control, session
//!   changes) in odd orders, some mutated. Each reads what comes back for a short while (or
//!   not at all) and goes away.
//!
//! Prints one summary; the line `ORDINARY_ERRORS=n` is what the bench script checks.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, Semaphore};

/// splitmix64.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn cstr(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(s);
    out.push(0);
}

fn startup_packet(params: &[(&str, &str)], version: u32) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    for (k, v) in params {
        cstr(&mut body, k.as_bytes());
        cstr(&mut body, v.as_bytes());
    }
    body.push(0);
    let mut p = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    p.extend_from_slice(&body);
    p
}

fn short_packet(code: u32, extra: &[u8]) -> Vec<u8> {
    let mut p = ((8 + extra.len()) as u32).to_be_bytes().to_vec();
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(extra);
    p
}

const SSL: u32 = 80_877_103;
const GSS: u32 = 80_877_104;
const CANCEL: u32 = 80_877_102;

/// Mutates `b` in place: a few byte flips, insertions, deletions, interesting 32-bit
/// values written over a length or code, truncation or duplication.
fn mutate(rng: &mut Rng, b: &mut Vec<u8>) {
    const INTERESTING: [u32; 10] = [
        0,
        1,
        4,
        5,
        8,
        10_000,
        10_001,
        0x3fff_ffff,
        0x7fff_ffff,
        0xffff_ffff,
    ];
    for _ in 0..1 + rng.below(4) {
        if b.is_empty() {
            b.push(rng.next() as u8);
            continue;
        }
        let at = rng.below(b.len());
        match rng.below(7) {
            0 => b[at] ^= 1 << rng.below(8),
            1 => b[at] = rng.next() as u8,
            2 => b.insert(at, rng.next() as u8),
            3 => {
                b.remove(at);
            }
            4 => {
                let v = rng.pick(&INTERESTING).to_be_bytes();
                for (i, x) in v.iter().enumerate() {
                    if at + i < b.len() {
                        b[at + i] = *x;
                    }
                }
            }
            5 => b.truncate(at),
            _ => {
                let end = (at + 1 + rng.below(16)).min(b.len());
                let piece = b[at..end].to_vec();
                b.splice(at..at, piece);
            }
        }
    }
}

/// SQL the fuzz connections send: plain, failing, transaction control, session state the
/// proxy must undo, statements, COPY both ways (into `scratch`, never `who`), sleeps.
const SQL: [&str; 30] = [
    "SELECT 1",
    "SELECT tenant FROM who",
    "SELECT * FROM tenant_t2.who",
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "SELECT nope FROM nowhere",
    "SET search_path TO tenant_t2, public",
    "SELECT set_config('search_path', 'tenant_t3', false)",
    "SET application_name = 'fuzz'",
    "SET statement_timeout = '1ms'",
    "RESET ALL",
    "DISCARD ALL",
    "DEALLOCATE ALL",
    "DEALLOCATE a",
    "PREPARE p AS SELECT 1",
    "EXECUTE p",
    "LISTEN ch",
    "NOTIFY ch",
    "SELECT pg_try_advisory_lock(1)",
    "CREATE TEMP TABLE tt (a int)",
    "COPY scratch FROM STDIN",
    "COPY (SELECT 1) TO STDOUT",
    "SELECT pg_sleep(0.02)",
    "BEGIN; SELECT 1; COMMIT",
    "SET ROLE NONE",
    "SET SESSION AUTHORIZATION DEFAULT",
    "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
    "SELECT 1; SELECT 2",
    "",
];

const NAMES: [&str; 6] = ["", "a", "b", "_tp1", "s0", "A"];

/// One valid frontend message of a random type.
fn valid_message(rng: &mut Rng) -> Vec<u8> {
    let mut body = Vec::new();
    let tag = match rng.below(14) {
        0 | 1 => {
            cstr(&mut body, rng.pick(&SQL).as_bytes());
            b'Q'
        }
        2 | 3 => {
            cstr(&mut body, rng.pick(&NAMES).as_bytes());
            cstr(&mut body, rng.pick(&SQL).as_bytes());
            body.extend_from_slice(&[0, 0]);
            b'P'
        }
        4 | 5 => {
            cstr(&mut body, rng.pick(&NAMES).as_bytes());
            cstr(&mut body, rng.pick(&NAMES).as_bytes());
            body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
            b'B'
        }
        6 => {
            cstr(&mut body, rng.pick(&NAMES).as_bytes());
            body.extend_from_slice(&(rng.below(3) as u32).to_be_bytes());
            b'E'
        }
        7 => {
            body.push(*rng.pick(b"SP"));
            cstr(&mut body, rng.pick(&NAMES).as_bytes());
            b'D'
        }
        8 => {
            body.push(*rng.pick(b"SP"));
            cstr(&mut body, rng.pick(&NAMES).as_bytes());
            b'C'
        }
        9 | 10 => b'S',
        11 => b'H',
        12 => {
            // FunctionCall: random() (oid 1598), no arguments.
            body.extend_from_slice(&1598u32.to_be_bytes());
            body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
            b'F'
        }
        _ => {
            let t = *rng.pick(b"dcf");
            if t == b'd' {
                body.extend_from_slice(b"x\n");
            } else if t == b'f' {
                cstr(&mut body, b"fuzz");
            }
            t
        }
    };
    msg(tag, &body)
}

/// What the fuzz connections saw, for the summary.
#[derive(Default)]
struct Seen {
    kinds: BTreeMap<&'static str, u64>,
    /// SQLSTATEs of the ErrorResponses fuzz connections got.
    codes: BTreeMap<String, u64>,
    /// Logins with a valid startup packet that did not finish.
    failed_logins: u64,
}

/// Reads what comes back until EOF, `quiet` without data, or `cap` in all; returns it.
async fn drain(s: &mut TcpStream, quiet: Duration, cap: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let end = Instant::now() + cap;
    let mut buf = [0u8; 8192];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match tokio::time::timeout(quiet.min(left), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
    got
}

/// SQLSTATEs of ErrorResponses in a backend stream (as far as it parses).
fn error_codes(stream: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut pos = 0;
    while stream.len() >= pos + 5 {
        let len = u32::from_be_bytes(stream[pos + 1..pos + 5].try_into().unwrap()) as usize;
        if len < 4 || stream.len() < pos + 1 + len {
            break;
        }
        if stream[pos] == b'E' {
            let body = &stream[pos + 5..pos + 1 + len];
            let mut f = body;
            while let Some((&c, rest)) = f.split_first() {
                let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
                if c == b'C' {
                    out.push(String::from_utf8_lossy(&rest[..end]).into_owned());
                }
                f = rest.get(end + 1..).unwrap_or(&[]);
                if c == 0 {
                    break;
                }
            }
        }
        pos += 1 + len;
    }
    out
}

/// Logs in with a valid startup packet; true once ReadyForQuery came.
async fn login(s: &mut TcpStream, tenant: &str) -> bool {
    let p = startup_packet(&[("user", "fuzz"), ("database", tenant)], 0x0003_0000);
    if s.write_all(&p).await.is_err() {
        return false;
    }
    let mut got = Vec::new();
    let end = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 4096];
    loop {
        // Done at a ReadyForQuery (the last message of the welcome).
        let mut pos = 0;
        while got.len() >= pos + 5 {
            let len = u32::from_be_bytes(got[pos + 1..pos + 5].try_into().unwrap()) as usize;
            if got.len() < pos + 1 + len {
                break;
            }
            match got[pos] {
                b'Z' => return true,
                b'E' => return false,
                _ => {}
            }
            pos += 1 + len;
        }
        let left = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => return false,
        }
    }
}

/// One fuzz connection.
async fn fuzz_one(addr: &str, tenants: &[String], rng: &mut Rng, seen: &Mutex<Seen>) {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        seen.lock()
            .await
            .kinds
            .entry("connect failed")
            .and_modify(|n| *n += 1)
            .or_insert(1);
        return;
    };
    let _ = s.set_nodelay(true);
    let mut tenant_list: Vec<&str> = tenants.iter().map(|t| t.as_str()).collect();
    tenant_list.push("fz");
    let tenant = *rng.pick(&tenant_list);
    let kind: &'static str;
    let mut payload = Vec::new();
    let before_login = rng.chance(3);
    if before_login {
        match rng.below(6) {
            0 => {
                kind = "pre: random bytes";
                let n = rng.below(300);
                payload = rng.bytes(n);
            }
            1 | 2 => {
                kind = "pre: mutated startup";
                payload = startup_packet(
                    &[
                        ("user", "fuzz"),
                        ("database", tenant),
                        ("application_name", "x"),
                    ],
                    0x0003_0000,
                );
                mutate(rng, &mut payload);
            }
            3 => {
                kind = "pre: ssl/gss then mutated startup";
                for _ in 0..1 + rng.below(3) {
                    payload.extend(short_packet(*rng.pick(&[SSL, GSS]), &[]));
                }
                let mut p = startup_packet(&[("user", "fuzz"), ("database", tenant)], 0x0003_0000);
                if rng.chance(2) {
                    mutate(rng, &mut p);
                }
                payload.extend(p);
            }
            4 => {
                kind = "pre: mutated ssl/gss/cancel";
                let code = *rng.pick(&[SSL, GSS, CANCEL]);
                let extra = if code == CANCEL {
                    rng.bytes(8)
                } else {
                    Vec::new()
                };
                payload = short_packet(code, &extra);
                mutate(rng, &mut payload);
            }
            _ => {
                kind = "pre: options and parameters";
                let opts = [
                    "-c search_path=tenant_t2",
                    "-c role=postgres",
                    "--application_name=x",
                    "-c",
                    "-cstatement_timeout=5 -c work_mem=64kB",
                    "\\",
                    "-c x",
                    "-c lock_timeout=1s\\ x",
                ];
                let extra = ["_pq_.x", "replication", "TimeZone", "user", "DateStyle"];
                let o = *rng.pick(&opts);
                let e = *rng.pick(&extra);
                payload = startup_packet(
                    &[
                        ("user", "fuzz"),
                        ("database", tenant),
                        ("options", o),
                        (e, "1"),
                    ],
                    0x0003_0000 + rng.below(3) as u32,
                );
            }
        }
        let _ = s.write_all(&payload).await;
        if rng.chance(2) {
            drain(
                &mut s,
                Duration::from_millis(20),
                Duration::from_millis(300),
            )
            .await;
        }
    } else {
        if !login(&mut s, tenant).await {
            let mut g = seen.lock().await;
            g.failed_logins += 1;
            return;
        }
        match rng.below(7) {
            0 => {
                kind = "post: garbage";
                let n = rng.below(200);
                payload = rng.bytes(n);
            }
            1 => {
                kind = "post: truncated frame";
                let mut m = Vec::new();
                for _ in 0..1 + rng.below(3) {
                    m.extend(valid_message(rng));
                }
                let cut = rng.below(m.len());
                m.truncate(cut);
                payload = m;
            }
            2 => {
                kind = "post: oversized frame";
                let tag = *rng.pick(b"QPBEDCHSFdcfX");
                let len: u32 =
                    *rng.pick(&[0x3fff_fffe, 0x3fff_ffff, 0x4000_0000, 0x7fff_ffff, 1 << 20]);
                payload.push(tag);
                payload.extend_from_slice(&len.to_be_bytes());
                let n = rng.below(4096);
                payload.extend(rng.bytes(n));
            }
            3 => {
                kind = "post: lone message";
                payload = valid_message(rng);
            }
            4 | 5 => {
                kind = "post: valid messages, odd order";
                for _ in 0..1 + rng.below(12) {
                    payload.extend(valid_message(rng));
                }
            }
            _ => {
                kind = "post: mutated messages";
                for _ in 0..1 + rng.below(8) {
                    payload.extend(valid_message(rng));
                }
                mutate(rng, &mut payload);
            }
        }
        // Sometimes in pieces, sometimes ending with Terminate or a half-close.
        if rng.chance(3) && payload.len() > 1 {
            let cut = 1 + rng.below(payload.len() - 1);
            let _ = s.write_all(&payload[..cut]).await;
            tokio::time::sleep(Duration::from_millis(rng.below(5) as u64)).await;
            let _ = s.write_all(&payload[cut..]).await;
        } else {
            let _ = s.write_all(&payload).await;
        }
        match rng.below(6) {
            0 => {
                let _ = s.write_all(&msg(b'X', b"")).await;
            }
            1 => {
                let _ = s.shutdown().await;
            }
            _ => {}
        }
        if !rng.chance(4) {
            let got = drain(
                &mut s,
                Duration::from_millis(30),
                Duration::from_millis(400),
            )
            .await;
            let codes = error_codes(&got);
            let mut g = seen.lock().await;
            for c in codes {
                *g.codes.entry(c).or_insert(0) += 1;
            }
        }
    }
    *seen.lock().await.kinds.entry(kind).or_insert(0) += 1;
}

/// An ordinary client: transactions until `stop`, each answer checked against its tenant.
async fn ordinary(
    addr: String,
    tenant: String,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
) {
    let (host, port) = addr.rsplit_once(':').expect("ADDR is host:port");
    let conn = format!("host={host} port={port} user=app dbname={tenant} connect_timeout=10");
    let (client, connection) = match tokio_postgres::connect(&conn, tokio_postgres::NoTls).await {
        Ok(c) => c,
        Err(e) => {
            errors.lock().await.push(format!("{tenant}: connect: {e}"));
            return;
        }
    };
    tokio::spawn(connection);
    let mut i: i32 = 0;
    while !stop.load(Ordering::Relaxed) {
        i = i.wrapping_add(1);
        let r: Result<(), String> = async {
            match i % 3 {
                0 => {
                    let rows = client
                        .simple_query("SELECT tenant FROM who")
                        .await
                        .map_err(|e| e.to_string())?;
                    let got: Vec<String> = rows
                        .iter()
                        .filter_map(|m| match m {
                            tokio_postgres::SimpleQueryMessage::Row(r) => {
                                r.get(0).map(str::to_string)
                            }
                            _ => None,
                        })
                        .collect();
                    if got != [tenant.clone()] {
                        return Err(format!("simple query saw {got:?}"));
                    }
                }
                1 => {
                    let rows = client
                        .query("SELECT tenant, $1::int4 FROM who", &[&i])
                        .await
                        .map_err(|e| e.to_string())?;
                    if rows.len() != 1
                        || rows[0].get::<_, String>(0) != tenant
                        || rows[0].get::<_, i32>(1) != i
                    {
                        return Err(format!("extended query saw {} rows", rows.len()));
                    }
                }
                _ => {
                    client
                        .batch_execute("BEGIN")
                        .await
                        .map_err(|e| e.to_string())?;
                    let row = client
                        .query_one(
                            "SELECT tenant, current_setting('search_path') FROM who",
                            &[],
                        )
                        .await
                        .map_err(|e| e.to_string())?;
                    client
                        .batch_execute("COMMIT")
                        .await
                        .map_err(|e| e.to_string())?;
                    let t: String = row.get(0);
                    if t != tenant {
                        return Err(format!("transaction saw tenant {t}"));
                    }
                }
            }
            Ok(())
        }
        .await;
        match r {
            Ok(()) => {
                done.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                errors.lock().await.push(format!("{tenant}: {e}"));
                if client.is_closed() {
                    return;
                }
            }
        }
    }
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().expect("ADDR");
    let tenants: Vec<String> = args
        .next()
        .expect("TENANTS")
        .split(',')
        .map(str::to_string)
        .collect();
    let n: u64 = args.next().map(|s| s.parse().unwrap()).unwrap_or(50_000);
    let clients: usize = args.next().map(|s| s.parse().unwrap()).unwrap_or(8);
    let concurrency: usize = args.next().map(|s| s.parse().unwrap()).unwrap_or(32);
    let seed: u64 = args.next().map(|s| s.parse().unwrap()).unwrap_or(1);

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let mut ordinary_tasks = Vec::new();
    for c in 0..clients {
        ordinary_tasks.push(tokio::spawn(ordinary(
            addr.clone(),
            tenants[c % tenants.len()].clone(),
            stop.clone(),
            done.clone(),
            errors.clone(),
        )));
    }

    let started = Instant::now();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let sem = Arc::new(Semaphore::new(concurrency));
    let tenants = Arc::new(tenants);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await.expect("semaphore");
        let (addr, tenants, seen) = (addr.clone(), tenants.clone(), seen.clone());
        let mut rng = Rng(seed.wrapping_mul(0x1000_0000_0001).wrapping_add(i));
        tasks.spawn(async move {
            fuzz_one(&addr, &tenants, &mut rng, &seen).await;
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
        if i > 0 && i % 10_000 == 0 {
            eprintln!(
                "{i} fuzz connections, {:.0} s, {} ordinary transactions",
                started.elapsed().as_secs_f64(),
                done.load(Ordering::Relaxed)
            );
        }
    }
    while tasks.join_next().await.is_some() {}
    let fuzz_secs = started.elapsed().as_secs_f64();
    // The ordinary clients go on a little after the last fuzz connection.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for t in ordinary_tasks {
        let _ = t.await;
    }

    let seen = seen.lock().await;
    println!("fuzz connections: {n} in {fuzz_secs:.1} s ({concurrency} at once, seed {seed})");
    for (k, v) in &seen.kinds {
        println!("  {k}: {v}");
    }
    println!("  valid logins that failed: {}", seen.failed_logins);
    let codes: Vec<String> = seen
        .codes
        .iter()
        .map(|(c, n)| format!("{c} x{n}"))
        .collect();
    println!("  error codes fuzz connections got: {}", codes.join(", "));
    let errors = errors.lock().await;
    println!(
        "ordinary clients: {clients}, {} transactions checked, {} errors",
        done.load(Ordering::Relaxed),
        errors.len()
    );
    for e in errors.iter().take(10) {
        println!("  {e}");
    }
    println!("ORDINARY_ERRORS={}", errors.len());
}
