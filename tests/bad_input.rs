//! Bad input never crashes the proxy, never grows its memory without bound, and never
//! disturbs other clients. The proxy runs as its own process here so its memory can be read.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct ProxyProcess {
    child: Child,
    addr: std::net::SocketAddr,
}

impl ProxyProcess {
    fn start(db: &TestDb, max_connections: u32) -> ProxyProcess {
        ProxyProcess::start_with(db, max_connections, "")
    }

    /// `extra` goes into `[limits]`.
    fn start_with(db: &TestDb, max_connections: u32, extra: &str) -> ProxyProcess {
        let port = free_port();
        let text = db.config_text(
            max_connections,
            &format!(
                "[proxy]\nlisten = \"127.0.0.1:{port}\"\nauth_method = \"trust\"\n[limits]\nclient_login_timeout = \"1s\"\n{extra}"
            ),
        );
        let dir = tempdir("tenantpool-bad-input");
        let path = dir.join("tenantpool.toml");
        std::fs::write(&path, text).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tenantpool"))
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "proxy did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        ProxyProcess { child, addr }
    }

    fn rss_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn assert_fatal_08p01(msgs: &[Msg]) {
    let e = msgs
        .iter()
        .find(|m| m.tag == b'E')
        .unwrap_or_else(|| panic!("no error: {msgs:?}"));
    assert_eq!(e.field(b'V').as_deref(), Some("FATAL"), "{msgs:?}");
    assert_eq!(e.field(b'C').as_deref(), Some("08P01"), "{msgs:?}");
}

async fn still_serves(addr: std::net::SocketAddr) {
    let mut r = Raw::login(addr, "acme").await;
    r.send(&query("SELECT name FROM leads ORDER BY id")).await;
    assert_eq!(first_column(&r.until_ready().await), ["acme-1", "acme-2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_08p01_and_harms_nobody() {
    let db = TestDb::create("bad_input", &["acme"]).await;
    let mut proxy = ProxyProcess::start(&db, 1);
    still_serves(proxy.addr).await;
    let rss_before = proxy.rss_kb();

    // Garbage first bytes.
    let mut r = Raw::connect(proxy.addr).await;
    r.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_fatal_08p01(&r.until_eof().await);

    // A startup length of 2^31-1.
    let mut r = Raw::connect(proxy.addr).await;
    r.send(&[0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0]).await;
    assert_fatal_08p01(&r.until_eof().await);

    // A message length of 2^31-1 after login.
    let mut r = Raw::login(proxy.addr, "acme").await;
    r.send(&[b'Q', 0x7f, 0xff, 0xff, 0xff, b'S', b'E']).await;
    assert_fatal_08p01(&r.until_eof().await);

    // A length below 4 and an unknown message type after login.
    let mut r = Raw::login(proxy.addr, "acme").await;
    r.send(&[b'Q', 0, 0, 0, 2]).await;
    assert_fatal_08p01(&r.until_eof().await);
    let mut r = Raw::login(proxy.addr, "acme").await;
    r.send(&msg(b'G', b"xx")).await;
    assert_fatal_08p01(&r.until_eof().await);

    // Half a message after login, then silence: it holds no server connection, so with a
    // pool of one the other clients go on.
    let mut stalled = Raw::login(proxy.addr, "acme").await;
    stalled.send(&query("SELECT 'never finished'")[..9]).await;
    for _ in 0..3 {
        still_serves(proxy.addr).await;
    }

    // Half a startup packet, then silence: client_login_timeout (1s) ends it.
    let mut r = Raw::connect(proxy.addr).await;
    r.send(&[0, 0, 0, 40, 0, 3]).await;
    let started = Instant::now();
    still_serves(proxy.addr).await;
    assert_fatal_08p01(&r.until_eof().await);
    assert!(started.elapsed() < Duration::from_secs(10));

    // Many clients at once claiming huge messages: memory stays bounded.
    let mut tasks = Vec::new();
    for i in 0..200 {
        let addr = proxy.addr;
        tasks.push(tokio::spawn(async move {
            let mut r = Raw::login(addr, "acme").await;
            let tag = if i % 2 == 0 { b'Q' } else { b'd' };
            let mut bytes = vec![tag, 0x7f, 0xff, 0xff, 0xf0];
            bytes.extend_from_slice(&[b'x'; 4096]);
            r.send(&bytes).await;
            r.until_eof().await
        }));
    }
    for t in tasks {
        assert_fatal_08p01(&t.await.unwrap());
    }
    drop(stalled);

    still_serves(proxy.addr).await;
    assert!(proxy.alive(), "the proxy died");
    let rss_after = proxy.rss_kb();
    assert!(
        rss_after < rss_before + 32 * 1024,
        "memory grew from {rss_before} kB to {rss_after} kB"
    );
}

/// The first error a client got, with its severity.
fn first_error(msgs: &[Msg]) -> (String, String) {
    let e = msgs
        .iter()
        .find(|m| m.tag == b'E')
        .unwrap_or_else(|| panic!("no error: {msgs:?}"));
    (
        e.field(b'V').unwrap_or_default(),
        e.field(b'C').unwrap_or_default(),
    )
}

/// Malformed bodies are answered at once, with 08P01 (the proxy's FATAL, or PostgreSQL's
/// own ERROR when the proxy does not read that part), never waited on: with a pool of one,
/// the next client is served at once. The empty Parse with 20 MB pipelined behind it used
/// to pin the server connection and grow the proxy by everything it read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_answered_at_once() {
    let db = TestDb::create("malformed", &["acme"]).await;
    let mut proxy = ProxyProcess::start(&db, 1);
    still_serves(proxy.addr).await;
    let rss_before = proxy.rss_kb();
    let sync = msg(b'S', &[]);
    let cases: Vec<Vec<u8>> = vec![
        msg(b'P', &[]),
        msg(b'P', b"name"),
        msg(b'P', b"\0"),
        msg(b'B', &[]),
        msg(b'B', b"portal"),
        msg(b'B', b"\0stmt"),
        msg(b'D', &[]),
        msg(b'D', b"X"),
        msg(b'D', b"Sname"),
        msg(b'C', &[]),
        msg(b'C', b"Q\0"),
        msg(b'E', &[]),
        msg(b'F', &[]),
        msg(b'Q', &[]),
    ];
    for (i, m) in cases.iter().enumerate() {
        let mut r = Raw::login(proxy.addr, "acme").await;
        let mut bytes = m.clone();
        bytes.extend(&sync);
        if i == 0 {
            // 20 MB pipelined behind it (sent by a task: the proxy stops reading).
            let (mut rd, mut wr) = r.stream.into_split();
            let writer = tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let _ = wr.write_all(&bytes).await;
                let chunk = query("SELECT 1").repeat(1 << 16);
                for _ in 0..20 {
                    if wr.write_all(&chunk).await.is_err() {
                        break;
                    }
                }
            });
            let mut got = Vec::new();
            use tokio::io::AsyncReadExt;
            let _ = tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut got)).await;
            assert!(got.starts_with(b"E"), "{got:?}");
            let _ = writer.await;
            still_serves(proxy.addr).await;
            continue;
        }
        r.send(&bytes).await;
        let msgs = tokio::time::timeout(Duration::from_secs(5), async {
            let mut msgs = Vec::new();
            while let Some(m) = r.recv().await {
                let end = m.tag == b'Z';
                msgs.push(m);
                if end {
                    break;
                }
            }
            msgs
        })
        .await
        .unwrap_or_else(|_| panic!("case {i}: no answer"));
        let (_, code) = first_error(&msgs);
        assert_eq!(code, "08P01", "case {i}: {msgs:?}");
        // A pool of one: the next client is served now.
        still_serves(proxy.addr).await;
    }
    assert!(proxy.alive());
    let rss_after = proxy.rss_kb();
    assert!(
        rss_after < rss_before + 8 * 1024,
        "memory grew from {rss_before} kB to {rss_after} kB"
    );
}

/// A client that holds a server connection and stops in the middle of a message (the first
/// 9 kB of a 1 MB query, streamed), or sends Terminate in the middle of a COPY or of an
/// extended batch, does not keep it: the pool of one serves another client again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_and_departed_clients_release_the_server_connection() {
    let db = TestDb::create("stalled", &["acme"]).await;
    let mut proxy = ProxyProcess::start_with(&db, 1, "message_timeout = \"1s\"");
    still_serves(proxy.addr).await;

    // 9 kB of a 1 MB query, then silence: cut after message_timeout.
    let mut r = Raw::login(proxy.addr, "acme").await;
    let mut big = query(&format!("SELECT '{}'", "x".repeat(1 << 20)));
    big.truncate(9 * 1024);
    r.send(&big).await;
    let started = Instant::now();
    let msgs = r.until_eof().await;
    assert_eq!(first_error(&msgs), ("FATAL".into(), "08P01".into()));
    assert!(started.elapsed() < Duration::from_secs(20));
    still_serves(proxy.addr).await;

    // COPY FROM STDIN started, some data, then silence: the same.
    let mut r = Raw::login(proxy.addr, "acme").await;
    r.send(&query("COPY leads (name) FROM STDIN")).await;
    assert_eq!(r.recv().await.unwrap().tag, b'G');
    r.send(&msg(b'd', b"copied\n")).await;
    let msgs = r.until_eof().await;
    assert_eq!(first_error(&msgs), ("FATAL".into(), "08P01".into()));
    still_serves(proxy.addr).await;

    // Terminate in the middle of a COPY (as psycopg's finish() can): released at once.
    let mut r = Raw::login(proxy.addr, "acme").await;
    r.send(&query("COPY leads (name) FROM STDIN")).await;
    assert_eq!(r.recv().await.unwrap().tag, b'G');
    let mut bytes = msg(b'd', b"never committed\n");
    bytes.extend(msg(b'X', &[]));
    r.send(&bytes).await;
    still_serves(proxy.addr).await;
    drop(r);

    // Terminate in the middle of an extended batch (no Sync).
    let mut r = Raw::login(proxy.addr, "acme").await;
    let mut bytes = extended("SELECT pg_sleep(0.2)");
    bytes.truncate(bytes.len() - 5);
    bytes.extend(msg(b'X', &[]));
    r.send(&bytes).await;
    still_serves(proxy.addr).await;
    drop(r);

    // Nothing of it was committed.
    let owner = db.owner().await;
    let n: i64 = owner
        .query_one("SELECT count(*) FROM tenant_acme.leads", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    assert!(proxy.alive());
}

/// A client that leaves in the middle of a message it was streaming to PostgreSQL (the
/// first 9 kB of a 1 MB query) leaves the backend waiting for the rest, where a Terminate
/// would only be read as more of the message (or complete it): the proxy ends the stream
/// without one, so that the backend goes at once, not after `connect_timeout` (60 s
/// here), the pool of one serves the next client, and nothing half-sent runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_in_the_middle_of_a_streamed_message_frees_its_backend() {
    let db = TestDb::create("gone_mid_message", &["acme"]).await;
    let proxy = ProxyProcess::start_with(&db, 1, "[server]\nconnect_timeout = \"60s\"");
    still_serves(proxy.addr).await;
    // Sends `bytes` (part of a message), lets them reach PostgreSQL, leaves; the pool of
    // one then serves the next client.
    let leave_after = |bytes: Vec<u8>| async move {
        let mut r = Raw::login(proxy.addr, "acme").await;
        r.send(&bytes).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(r);
        tokio::time::timeout(Duration::from_secs(20), still_serves(proxy.addr))
            .await
            .expect("the departed client's server connection still held after 20 s");
    };
    for _ in 0..2 {
        let mut big = query(&format!("SELECT '{}'", "x".repeat(1 << 20)));
        big.truncate(9 * 1024);
        leave_after(big).await;
    }
    // Two bytes short: the first two bytes of a Terminate ('X', 0) would complete the
    // query, and PostgreSQL would run it (`... AS aX`). The backend gets the end of the
    // stream instead, and runs nothing.
    let mut q = query(&format!(
        "/*{}*/ CREATE TABLE two_short AS SELECT 1 AS aa",
        " ".repeat(20_000)
    ));
    q.truncate(q.len() - 2);
    leave_after(q).await;
    let made: Option<String> = db
        .owner()
        .await
        .query_one("SELECT to_regclass('tenant_acme.two_short')::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(made, None, "the half-sent query ran");
}

/// A client pipelining far ahead of a slow query, and one that does not read a huge
/// result, leave the bytes in the socket buffers and PostgreSQL waiting: the proxy grows
/// by less than a megabyte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_both_ways() {
    use tokio::io::AsyncWriteExt;
    let db = TestDb::create("bounded", &["acme"]).await;
    let mut proxy = ProxyProcess::start(&db, 2);
    still_serves(proxy.addr).await;
    let rss_before = proxy.rss_kb();

    // 200 MB of queries behind a 3 s sleep.
    let r = Raw::login(proxy.addr, "acme").await;
    let (_rd, mut wr) = r.stream.into_split();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&query("SELECT pg_sleep(3)")).await;
        let chunk = query("SELECT 1").repeat(1 << 16);
        let mut sent = 0;
        while sent < 200 << 20 {
            if wr.write_all(&chunk).await.is_err() {
                break;
            }
            sent += chunk.len();
        }
        wr
    });
    // A 1 GB result nobody reads.
    let mut reader = Raw::login(proxy.addr, "acme").await;
    reader
        .send(&query(
            "SELECT repeat('x', 1000000) FROM generate_series(1, 1000)",
        ))
        .await;
    let mut peak = 0;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(proxy.rss_kb());
    }
    assert!(
        peak < rss_before + 1024,
        "memory grew from {rss_before} kB to {peak} kB"
    );
    writer.abort();
    drop(reader);
    assert!(proxy.alive());
}
