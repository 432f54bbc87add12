//! Running several instances: health endpoints, a rolling restart of two real binaries on
//! one port, shutdown modes, cancel requests across instances, Unix sockets on both sides,
//! and a server role's CONNECTION LIMIT as the global cap.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GET `path` on the metrics listener: status and body (and the whole response).
async fn http_get(port: u16, path: &str) -> (u16, String, String) {
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return (0, "connection refused".into(), String::new());
    };
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(15), s.read_to_string(&mut out))
        .await
        .expect("no HTTP answer in 15 s")
        .unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body, out)
}

/// Polls `/readyz` until it answers `want` (within `limit`); returns the last body.
async fn wait_ready(port: u16, want: u16, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let (status, body, _) = http_get(port, "/readyz").await;
        if status == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz still answers {status} ({body}), not {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A TCP forwarder in front of the test PostgreSQL that the test can take down (its
/// listener closed, its connections cut) and bring back on the same port.
struct Forwarder {
    port: u16,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Forwarder {
    async fn start(port: u16) -> Forwarder {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let pg_port = pg().port;
        let conns = Arc::new(std::sync::Mutex::new(Vec::<tokio::task::AbortHandle>::new()));
        let tracked = conns.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let t = tokio::spawn(async move {
                    if let Ok(mut server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", pg_port)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                tracked.lock().unwrap().push(t.abort_handle());
            }
        });
        // Aborting the accept task drops the listener; the guard task cuts the connections.
        let cutter = tokio::spawn(async move {
            struct Cut(Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>);
            impl Drop for Cut {
                fn drop(&mut self) {
                    for h in self.0.lock().unwrap().drain(..) {
                        h.abort();
                    }
                }
            }
            let _cut = Cut(conns);
            std::future::pending::<()>().await;
        });
        Forwarder {
            port,
            tasks: vec![accept, cutter],
        }
    }

    async fn stop(self) -> u16 {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
        self.port
    }
}

const ADMIN: &str = "[proxy]\nadmin_users = [\"admin\"]\n[users.admin]\npassword = \"admin-secret\"\ntenants = []\n";

async fn admin(proxy: &Proxy) -> tokio_postgres::Client {
    connect_str(&format!(
        "host=127.0.0.1 port={} user=admin password=admin-secret dbname=tenantpool",
        proxy.addr.port()
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness_follow_the_server_pause_and_shutdown() {
    let db = TestDb::create("health", &["a", "b"]).await;
    let fwd = Forwarder::start(free_port()).await;
    let metrics = free_port();
    let mut config = db.config(
        4,
        &format!("[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n{ADMIN}"),
    );
    config.server.port = fwd.port;
    let proxy = Proxy::start(config);

    assert_eq!(http_get(metrics, "/healthz").await.0, 200);
    wait_ready(metrics, 200, Duration::from_secs(10)).await;
    let c = proxy.connect("a").await;
    c.simple_query("SELECT 1").await.unwrap();
    // /metrics is still the exporter's text.
    let (status, body, raw) = http_get(metrics, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        raw.to_ascii_lowercase()
            .contains("content-type: text/plain"),
        "{raw}"
    );
    for m in CONTRACT_METRICS {
        assert!(body.contains(m), "{m} missing from /metrics");
    }

    // PAUSE of one tenant leaves the instance ready; PAUSE of everything does not.
    let console = admin(&proxy).await;
    console.simple_query("PAUSE a").await.unwrap();
    wait_ready(metrics, 200, Duration::from_secs(5)).await;
    console.simple_query("PAUSE").await.unwrap();
    let why = wait_ready(metrics, 503, Duration::from_secs(5)).await;
    assert!(why.contains("paused"), "{why}");
    console.simple_query("RESUME").await.unwrap();
    wait_ready(metrics, 200, Duration::from_secs(5)).await;

    // The server goes away: not ready (and alive); back: ready again.
    let port = fwd.stop().await;
    let why = wait_ready(metrics, 503, Duration::from_secs(10)).await;
    assert!(why.contains("server unreachable"), "{why}");
    assert_eq!(http_get(metrics, "/healthz").await.0, 200);
    let fwd = Forwarder::start(port).await;
    wait_ready(metrics, 200, Duration::from_secs(10)).await;
    let c2 = proxy.connect("b").await;
    c2.simple_query("SELECT 1").await.unwrap();

    // Shutting down: not ready while a transaction finishes, alive until the end.
    c2.batch_execute("BEGIN; SELECT 1").await.unwrap();
    proxy.shutdown();
    let why = wait_ready(metrics, 503, Duration::from_secs(5)).await;
    assert!(why.contains("shutting down"), "{why}");
    assert_eq!(http_get(metrics, "/healthz").await.0, 200);
    c2.batch_execute("COMMIT").await.unwrap();
    assert!(proxy.stopped_within(Duration::from_secs(10)).await);
    drop(fwd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_clients_shutdown_serves_connected_clients_until_they_leave() {
    let db = TestDb::create("waitclients", &["a"]).await;
    let proxy = Proxy::start(db.config(
        2,
        "[proxy]\nshutdown_mode = \"wait_for_clients\"\nshutdown_timeout = \"30s\"\n",
    ));
    let c = proxy.connect("a").await;
    c.simple_query("SELECT 1").await.unwrap();
    proxy.shutdown();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Idle clients are left alone and go on with their transactions; new ones are not let in.
    for _ in 0..3 {
        let rows = c
            .query_one("SELECT name FROM leads WHERE id = 1", &[])
            .await
            .unwrap();
        assert_eq!(rows.get::<_, String>(0), "a-1");
    }
    assert!(
        tokio_postgres::connect(&proxy.conn_str("a"), tokio_postgres::NoTls)
            .await
            .is_err()
    );
    assert!(!proxy.stopped_within(Duration::from_millis(300)).await);
    drop(c);
    assert!(proxy.stopped_within(Duration::from_secs(10)).await);

    // After shutdown_timeout, clients still there are told (57P01) and the proxy exits.
    let proxy = Proxy::start(db.config(
        2,
        "[proxy]\nshutdown_mode = \"wait_for_clients\"\nshutdown_timeout = \"1s\"\n",
    ));
    let c = proxy.connect("a").await;
    proxy.shutdown();
    assert!(proxy.stopped_within(Duration::from_secs(10)).await);
    let e = c.simple_query("SELECT 1").await.unwrap_err();
    assert!(
        e.is_closed() || sqlstate(&e).as_deref() == Some("57P01"),
        "{e}"
    );
}

/// A tenantpool binary with its own config file.
struct Instance {
    child: Child,
    log: std::path::PathBuf,
}

impl Instance {
    fn spawn(dir: &Path, name: &str, config: &str) -> Instance {
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, config).unwrap();
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_tenantpool"))
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Instance { child, log }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    /// Waits for the process to exit; its status.
    async fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "instance still running; log: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolling_restart_of_two_binaries_on_one_port_loses_and_doubles_nothing() {
    const CLIENTS: i32 = 8;
    const TXNS: i32 = 250;
    let db = TestDb::create("rolling", &["a"]).await;
    db.owner()
        .await
        .batch_execute(
            "CREATE TABLE tenant_a.ledger (client int, seq int, PRIMARY KEY (client, seq))",
        )
        .await
        .unwrap();
    let port = free_port();
    let (ma, mb) = (free_port(), free_port());
    let dir = tempdir("tenantpool-rolling");
    let config = |metrics: u16| {
        db.config_text(
            6,
            &format!(
                "[proxy]\nlisten = \"127.0.0.1:{port}\"\nshutdown_timeout = \"30s\"\nso_reuseport = true\n\
                 [metrics]\nlisten = \"127.0.0.1:{metrics}\"\n"
            ),
        )
    };
    let mut old = Instance::spawn(&dir, "old", &config(ma));
    wait_ready(ma, 200, Duration::from_secs(20)).await;

    let done = Arc::new(AtomicU64::new(0));
    let conn_str = format!(
        "host=127.0.0.1 port={port} user={APP_USER} password={APP_PASSWORD} dbname=a connect_timeout=5"
    );
    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        let done = done.clone();
        let conn_str = conn_str.clone();
        clients.push(tokio::spawn(async move {
            let mut reconnects = 0u32;
            let mut conn: Option<tokio_postgres::Client> = None;
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut seq = 0;
            while seq < TXNS {
                if Instant::now() > deadline {
                    return Err(format!("client {client}: out of time at {seq}"));
                }
                let c = match &conn {
                    Some(c) => c,
                    None => match tokio_postgres::connect(&conn_str, tokio_postgres::NoTls).await {
                        Ok((c, task)) => {
                            tokio::spawn(task);
                            conn.insert(c)
                        }
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    },
                };
                let sql = format!(
                    "BEGIN; INSERT INTO ledger VALUES ({client}, {seq}); \
                     SELECT pg_sleep(0.002); COMMIT"
                );
                match c.batch_execute(&sql).await {
                    Ok(()) => {
                        seq += 1;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    // Told to go (57P01) or the connection closed before the batch was
                    // taken: nothing of it ran; reconnect (to whichever instance listens)
                    // and run it again.
                    Err(e)
                        if e.as_db_error().is_none()
                            || sqlstate(&e).as_deref() == Some("57P01") =>
                    {
                        conn = None;
                        reconnects += 1;
                    }
                    Err(e) => {
                        return Err(format!(
                            "client {client} at {seq}: {e} ({:?})",
                            sqlstate(&e)
                        ));
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(reconnects)
        }));
    }
    // A third of the way: the new instance starts on the same port, then the old one is
    // told to stop (SIGTERM) and exits once its clients' transactions are done.
    let total = (CLIENTS * TXNS) as u64;
    while done.load(Ordering::Relaxed) < total / 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut new = Instance::spawn(&dir, "new", &config(mb));
    wait_ready(mb, 200, Duration::from_secs(20)).await;
    let before = done.load(Ordering::Relaxed);
    old.signal("-TERM");
    let status = old.wait(Duration::from_secs(40)).await;
    assert!(status.success(), "old instance: {status}");
    assert!(before < total, "the load ended before the restart");

    let mut reconnects = Vec::new();
    for c in clients {
        match c.await.unwrap() {
            Ok(n) => reconnects.push(n),
            Err(e) => panic!("{e}"),
        }
    }
    // Every client was on the old instance and moved over.
    assert!(reconnects.iter().all(|&n| n >= 1), "{reconnects:?}");
    let owner = db.owner().await;
    let (rows, distinct): (i64, i64) = {
        let r = owner
            .query_one(
                "SELECT count(*), count(DISTINCT (client, seq)) FROM tenant_a.ledger",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((rows, distinct), (total as i64, total as i64));
    new.signal("-TERM");
    assert!(new.wait(Duration::from_secs(40)).await.success());
}

/// Logs in with a bare client (trust) and returns it with its cancel key.
async fn login_with_key(addr: std::net::SocketAddr, tenant: &str) -> (Raw, i32, i32) {
    let mut r = Raw::connect(addr).await;
    r.send(&startup_packet(&[("user", APP_USER), ("database", tenant)]))
        .await;
    let msgs = r.until_ready().await;
    let k = msgs.iter().find(|m| m.tag == b'K').expect("BackendKeyData");
    let pid = i32::from_be_bytes(k.body[0..4].try_into().unwrap());
    let secret = i32::from_be_bytes(k.body[4..8].try_into().unwrap());
    (r, pid, secret)
}

async fn send_cancel(port: u16, pid: i32, secret: i32) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut p = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
    p.extend_from_slice(&pid.to_be_bytes());
    p.extend_from_slice(&secret.to_be_bytes());
    s.write_all(&p).await.unwrap();
    let mut b = [0u8; 1];
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await;
}

/// Waits until a `pg_sleep(60)` runs in database `db` (a cancel sent before the query
/// reached the server would find nothing to cancel).
async fn wait_sleeping(su: &tokio_postgres::Client, db: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n: i64 = su
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 \
                 AND state = 'active' AND query = 'SELECT pg_sleep(60)'",
                &[&db],
            )
            .await
            .unwrap()
            .get(0);
        if n > 0 {
            return;
        }
        assert!(Instant::now() < deadline, "the query never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_reaching_another_instance_is_forwarded_to_the_owner() {
    let db = TestDb::create("peers", &["a"]).await;
    let (pa, pb) = (free_port(), free_port());
    let instance = |own: u16, port: u16, other: u16, other_port: u16| {
        db.config(
            2,
            &format!(
                "{TRUST}listen = \"127.0.0.1:{port}\"\npeer_id = {own}\n\
                 [peers.{other}]\naddress = \"127.0.0.1:{other_port}\"\n"
            ),
        )
    };
    let a = Proxy::start(instance(1, pa, 2, pb));
    let b = Proxy::start(instance(2, pb, 1, pa));
    let (mut client, pid, secret) = login_with_key(a.addr, "a").await;
    assert_eq!(tenantpool::peers::owner(pid), 1);
    let su = pg().superuser(&db.name).await;

    // Sent to B, for a query running through A: cancelled.
    for port in [pb, pa] {
        client.send(&query("SELECT pg_sleep(60)")).await;
        wait_sleeping(&su, &db.name).await;
        let start = Instant::now();
        send_cancel(port, pid, secret).await;
        let msgs = tokio::time::timeout(Duration::from_secs(20), client.until_ready())
            .await
            .expect("query not cancelled");
        assert_eq!(error_code(&msgs).as_deref(), Some("57014"), "{msgs:?}");
        assert!(start.elapsed() < Duration::from_secs(15));
    }

    // A request already forwarded (top bit set) is never forwarded again: B, which does
    // not own the key, drops it, and the query runs on until A cancels it.
    client.send(&query("SELECT pg_sleep(60)")).await;
    wait_sleeping(&su, &db.name).await;
    send_cancel(pb, (pid as u32 | 0x8000_0000) as i32, secret).await;
    // A wrong secret through B does nothing either.
    send_cancel(pb, pid, secret.wrapping_add(1)).await;
    assert!(
        tokio::time::timeout(Duration::from_secs(1), client.recv())
            .await
            .is_err(),
        "the query ended"
    );
    send_cancel(pa, pid, secret).await;
    let msgs = client.until_ready().await;
    assert_eq!(error_code(&msgs).as_deref(), Some("57014"));
    let msgs = {
        client.send(&query("SELECT 1")).await;
        client.until_ready().await
    };
    assert_eq!(first_column(&msgs), ["1"]);
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_sockets_for_clients_and_towards_the_server() {
    let db = TestDb::create("unix", &["a"]).await;
    let dir = tempdir("tenantpool-unix");
    let pg_dir = pg().socket_dir().expect("the server's socket directory");
    let mut config = db.config(
        2,
        &format!(
            "[proxy]\nunix_socket_dir = \"{}\"\nunix_socket_mode = \"0700\"\n",
            dir.display()
        ),
    );
    config.server.host = pg_dir.display().to_string();
    let proxy = Proxy::start(config);
    let port = proxy.addr.port();
    let path = dir.join(format!(".s.PGSQL.{port}"));
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }
    let unix = connect_str(&format!(
        "host={} port={port} user={APP_USER} password={APP_PASSWORD} dbname=a",
        dir.display()
    ))
    .await;
    // The client came over the Unix socket, and so did the server connection: PostgreSQL
    // sees no client address.
    let row = unix
        .query_one(
            "SELECT name, inet_client_addr() IS NULL FROM leads WHERE id = 2",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "a-2");
    assert!(
        row.get::<_, bool>(1),
        "the server connection is not a Unix socket"
    );
    // TCP clients share the same pool.
    let tcp = proxy.connect("a").await;
    tcp.simple_query("SELECT 1").await.unwrap();
    // A cancel over the Unix socket works too.
    let c = unix.cancel_token();
    let running = tokio::spawn(async move { unix.simple_query("SELECT pg_sleep(60)").await });
    wait_sleeping(&pg().superuser(&db.name).await, &db.name).await;
    c.cancel_query_raw(
        tokio::net::UnixStream::connect(&path).await.unwrap(),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .expect("not cancelled")
        .unwrap()
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"));
    proxy.stop();
    assert!(!path.exists(), "the socket file is left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_roles_connection_limit_makes_transactions_wait_not_fail() {
    let db = TestDb::create("rolelimit", &["a", "b"]).await;
    let role = format!("{}_lim", db.role);
    let su = pg().superuser(&db.name).await;
    su.batch_execute(&format!(
        "CREATE ROLE {role} LOGIN PASSWORD 'lim-secret' CONNECTION LIMIT 1;
         GRANT CONNECT ON DATABASE {db} TO {role};
         GRANT USAGE ON SCHEMA tenant_a TO {role};
         GRANT SELECT ON ALL TABLES IN SCHEMA tenant_a TO {role};",
        db = db.name
    ))
    .await
    .unwrap();
    let metrics = free_port();
    let proxy = Proxy::start(db.config(
        6,
        &format!(
            "[tenants.a]\nserver_user = \"{role}\"\nserver_password = \"lim-secret\"\n\
             [limits]\nquery_wait_timeout = \"30s\"\n[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n"
        ),
    ));
    let c1 = proxy.connect("a").await;
    let c2 = proxy.connect("a").await;
    // c1 holds the role's only connection.
    c1.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let waiting = tokio::spawn(async move {
        let r = c2
            .query_one("SELECT name FROM leads WHERE id = 1", &[])
            .await;
        (c2, r.map(|row| row.get::<_, String>(0)))
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "the second transaction did not wait"
    );
    // PostgreSQL is up: another tenant (another login) is served meanwhile, also on new
    // server connections (the one idle connection is taken by the first), and the instance
    // stays ready.
    let other = proxy.connect("b").await;
    let other2 = proxy.connect("b").await;
    other.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let row = tokio::time::timeout(
        Duration::from_secs(5),
        other2.query_one("SELECT name FROM leads WHERE id = 1", &[]),
    )
    .await
    .expect("another login's tenant is blocked by a full role")
    .unwrap();
    assert_eq!(row.get::<_, String>(0), "b-1");
    other.batch_execute("COMMIT").await.unwrap();
    assert_eq!(http_get(metrics, "/readyz").await.0, 200);
    assert!(!waiting.is_finished(), "the waiting transaction ended");
    // The role's connection comes back: the waiting transaction runs on it.
    c1.batch_execute("COMMIT").await.unwrap();
    let (c2, r) = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("still waiting")
        .unwrap();
    assert_eq!(r.unwrap(), "a-1");
    drop((c1, c2, other, other2));
    proxy.stop();

    // Held past query_wait_timeout: ERROR 53300, and the client goes on.
    let proxy = Proxy::start(db.config(
        6,
        &format!(
            "[tenants.a]\nserver_user = \"{role}\"\nserver_password = \"lim-secret\"\n\
             [limits]\nquery_wait_timeout = \"1s\"\n"
        ),
    ));
    let c1 = proxy.connect("a").await;
    let c2 = proxy.connect("a").await;
    c1.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let e = c2.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("53300"), "{e}");
    // The message says what kept the connection away: the role's limit.
    let msg = e.as_db_error().unwrap().message().to_string();
    assert!(
        msg.contains("query_wait_timeout")
            && msg.contains("refuses more connections")
            && msg.contains(&role),
        "{msg}"
    );
    c1.batch_execute("COMMIT").await.unwrap();
    c2.simple_query("SELECT 1").await.unwrap();
}
