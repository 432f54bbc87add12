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
        let port = free_port();
        let text = db.config_text(
            max_connections,
            &format!(
                "[proxy]\nlisten = \"127.0.0.1:{port}\"\nauth_method = \"trust\"\n[limits]\nclient_login_timeout = \"1s\""
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
