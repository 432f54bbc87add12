//! The core: tenants on one shared pool, each seeing only its own schema, with the whole
//! protocol passing through, against a real PostgreSQL.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use tokio_postgres::SimpleQueryMessage;
use tokio_postgres::types::Type;

fn names(msgs: &[SimpleQueryMessage]) -> Vec<String> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("").to_string()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tenant_sees_its_own_rows_in_both_pool_modes() {
    for mode in ["transaction", "session"] {
        let db = TestDb::create("own_rows", &["acme", "globex"]).await;
        let proxy = Proxy::start(db.config(2, &format!("[proxy]\npool_mode = \"{mode}\"")));
        {
            let acme = proxy.connect("acme").await;
            let globex = proxy.connect("globex").await;
            for _ in 0..10 {
                let a = names(
                    &acme
                        .simple_query("SELECT name FROM leads ORDER BY id")
                        .await
                        .unwrap(),
                );
                assert_eq!(a, ["acme-1", "acme-2"], "{mode}");
                let g = globex
                    .query_typed(
                        "SELECT name FROM leads WHERE id = $1",
                        &[(&2i32, Type::INT4)],
                    )
                    .await
                    .unwrap();
                assert_eq!(g.len(), 1);
                assert_eq!(g[0].get::<_, String>(0), "globex-2", "{mode}");
            }
        }
        // psql, after the tokio-postgres clients are gone (session mode holds connections).
        tokio::time::sleep(Duration::from_millis(100)).await;
        let p = proxy.addr.port();
        let out = tokio::task::spawn_blocking(move || {
            (
                psql(p, "acme", "SELECT name FROM leads ORDER BY id;"),
                psql(p, "globex", "SELECT name FROM leads ORDER BY id;"),
            )
        })
        .await
        .unwrap();
        assert_eq!(out.0, "acme-1\nacme-2\n", "{mode}");
        assert_eq!(out.1, "globex-1\nglobex-2\n", "{mode}");
        proxy.stop();
    }
}

/// pgbench, initialised through the proxy into one tenant's schema, runs its TPC-B-like
/// transactions with 50 clients on 5 server connections: simple and extended protocol, and
/// named prepared statements (`-M prepared`, which in transaction mode needs the proxy to
/// carry each client's statements to whatever connection it gets; its threads also prepare
/// synchronously while their other clients hold connections, which works because a Parse of
/// a statement the tenant already has needs no connection).
/// An idle client's whole state is its task: tokio's task cell holds the session's future
/// plus 104 bytes, rounded up to 128. At most 280 bytes (release build) keeps the cell at
/// 384 bytes instead of 512 (docs/performance.md, idle memory); unoptimised test builds
/// lay it out a little larger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_clients_task_fits_tokios_384_byte_cell() {
    let db = TestDb::create("task_size", &["acme"]).await;
    let proxy = Proxy::start(db.config(1, ""));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (tcp, peer) = listener.accept().await.unwrap();
    let (alive, _rx) = tokio::sync::mpsc::channel(1);
    let task = tenantpool::client::serve(
        tenantpool::tls::Stream::Plain(tcp),
        peer,
        proxy.shared.clone(),
        alive,
    );
    let size = std::mem::size_of_val(&task);
    let bound = if cfg!(debug_assertions) { 320 } else { 280 };
    assert!(size <= bound, "client task {size} bytes, more than {bound}");
    drop(task);
    proxy.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_through_the_proxy_on_a_small_pool() {
    let db = TestDb::create("pgbench", &["acme"]).await;
    let proxy = Proxy::start(db.config(5, ""));
    let conn = proxy.conn_str("acme");
    let c2 = conn.clone();
    let init = tokio::task::spawn_blocking(move || {
        std::process::Command::new("pgbench")
            .args(["-i", "-s", "1", "-q"])
            .arg(&c2)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        init.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    // The tables went into the tenant's schema.
    let owner = db.owner().await;
    let n: i64 = owner
        .query_one("SELECT count(*) FROM tenant_acme.pgbench_accounts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 100_000);
    for mode in ["simple", "extended", "prepared"] {
        let c = conn.clone();
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("pgbench")
                .args(["-c", "50", "-j", "2", "-t", "40", "-M", mode, "-n"])
                .arg(&c)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "pgbench -M {mode}: {stdout}\n{stderr}"
        );
        assert!(
            stdout.contains("number of transactions actually processed: 2000/2000"),
            "pgbench -M {mode}: {stdout}"
        );
        assert!(
            stdout.contains("number of failed transactions: 0"),
            "pgbench -M {mode}: {stdout}"
        );
    }
    let su = pg().superuser("postgres").await;
    assert!(db.backends(&su).await <= 5);
    proxy.stop();
}

/// 20 clients over 4 tenants on 2 server connections, a random mix of simple, extended
/// and explicit multi-statement transactions: every row comes from the client's tenant,
/// and PostgreSQL never sees more than 2 backends for the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_tenant_ever_sees_another_tenants_rows() {
    let tenants = ["acme", "globex", "initech", "umbrella"];
    let db = Arc::new(TestDb::create("isolation", &tenants).await);
    let proxy = Proxy::start(db.config(2, ""));

    let stop = Arc::new(AtomicBool::new(false));
    let max_seen = Arc::new(AtomicI64::new(0));
    let sampler = {
        let (db, stop, max_seen) = (db.clone(), stop.clone(), max_seen.clone());
        tokio::spawn(async move {
            let su = pg().superuser("postgres").await;
            while !stop.load(Ordering::Relaxed) {
                let n = db.backends(&su).await;
                max_seen.fetch_max(n, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..20 {
        let tenant = tenants[i % 4];
        let client = proxy.connect(tenant).await;
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let prefix = format!("{tenant}-");
            let mut seed = i as u64 * 7919 + 1;
            for _ in 0..500 {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                match (seed >> 33) % 3 {
                    0 => {
                        let rows = client
                            .simple_query(
                                "SELECT name FROM leads; SELECT current_setting('search_path')",
                            )
                            .await
                            .unwrap();
                        let n = names(&rows);
                        assert_eq!(n.len(), 3);
                        assert!(
                            n[..2].iter().all(|x| x.starts_with(&prefix)),
                            "{tenant} saw {n:?}"
                        );
                        assert!(
                            n[2].contains(&format!("tenant_{tenant}")),
                            "{tenant} path {n:?}"
                        );
                    }
                    1 => {
                        let rows = client
                            .query_typed(
                                "SELECT name FROM leads WHERE id >= $1",
                                &[(&1i32, Type::INT4)],
                            )
                            .await
                            .unwrap();
                        assert_eq!(rows.len(), 2);
                        for r in rows {
                            let n: String = r.get(0);
                            assert!(n.starts_with(&prefix), "{tenant} saw {n}");
                        }
                    }
                    _ => {
                        client.simple_query("BEGIN").await.unwrap();
                        let rows = client
                            .query_typed("SELECT name FROM leads", &[])
                            .await
                            .unwrap();
                        for r in &rows {
                            let n: String = r.get(0);
                            assert!(n.starts_with(&prefix), "{tenant} saw {n}");
                        }
                        let again =
                            names(&client.simple_query("SELECT name FROM leads").await.unwrap());
                        assert!(again.iter().all(|x| x.starts_with(&prefix)));
                        client.simple_query("COMMIT").await.unwrap();
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    assert_eq!(done.load(Ordering::Relaxed), 10_000);
    let seen = max_seen.load(Ordering::Relaxed);
    assert!(seen <= 2, "pg_stat_activity showed {seen} backends");
    assert!(seen >= 1);
    let switches = proxy
        .shared
        .pools
        .default()
        .stats
        .search_path_switches
        .load(Ordering::Relaxed);
    assert!(
        switches > 0,
        "tenants shared connections, so there were switches"
    );
    proxy.stop();
}

/// Session state left by one tenant never reaches another tenant's transaction, nor (for
/// the search_path) another client of the same tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_does_not_cross_tenants() {
    let db = TestDb::create("state", &["acme", "globex"]).await;
    let proxy = Proxy::start(db.config(1, ""));
    let acme = proxy.connect("acme").await;
    acme.batch_execute(
        "SET statement_timeout = '123s';
         CREATE TEMP TABLE leak_probe (x int);
         PREPARE leak_stmt AS SELECT 1;
         SELECT pg_advisory_lock(4242);",
    )
    .await
    .unwrap();
    // Within its transaction, acme reads globex's schema on purpose...
    let seen = names(
        &acme
            .simple_query("SET search_path = tenant_globex; SELECT name FROM leads")
            .await
            .unwrap(),
    );
    assert_eq!(seen, ["globex-1", "globex-2"]);
    // ...and its next transaction is on acme's search_path again (transaction mode).
    let seen = names(&acme.simple_query("SELECT name FROM leads").await.unwrap());
    assert_eq!(seen, ["acme-1", "acme-2"]);

    let globex = proxy.connect("globex").await;
    let check = |sql: &'static str| {
        let c = &globex;
        async move { names(&c.simple_query(sql).await.unwrap()).remove(0) }
    };
    assert_eq!(check("SHOW statement_timeout").await, "0");
    assert_eq!(
        check("SELECT count(*) FROM pg_class WHERE relname = 'leak_probe'").await,
        "0"
    );
    assert_eq!(
        check("SELECT count(*) FROM pg_prepared_statements").await,
        "0"
    );
    assert_eq!(
        check("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").await,
        "0"
    );
    assert_eq!(check("SHOW search_path").await, "tenant_globex, public");

    // Another acme client gets acme's search_path back, not what the first one set.
    let acme2 = proxy.connect("acme").await;
    let seen = names(&acme2.simple_query("SELECT name FROM leads").await.unwrap());
    assert_eq!(seen, ["acme-1", "acme-2"]);
    proxy.stop();
}

/// A client that disappears inside a transaction leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_client_leaves_no_open_transaction() {
    let db = TestDb::create("killed", &["acme"]).await;
    let proxy = Proxy::start(db.config(1, ""));
    let (client, conn) = tokio_postgres::connect(&proxy.conn_str("acme"), tokio_postgres::NoTls)
        .await
        .unwrap();
    let conn_task = tokio::spawn(conn);
    client
        .batch_execute("BEGIN; INSERT INTO leads (name) VALUES ('ghost');")
        .await
        .unwrap();
    conn_task.abort();
    let _ = conn_task.await;
    drop(client);

    let owner = db.owner().await;
    let su = pg().superuser("postgres").await;
    let mut open = 1;
    for _ in 0..100 {
        open = su
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND state LIKE 'idle in transaction%'",
                &[&db.role],
            )
            .await
            .unwrap()
            .get::<_, i64>(0);
        if open == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(open, 0, "a transaction stayed open");
    let ghosts: i64 = owner
        .query_one(
            "SELECT count(*) FROM tenant_acme.leads WHERE name = 'ghost'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ghosts, 0);
    // The pool of one still serves.
    let c = proxy.connect("acme").await;
    assert_eq!(
        names(&c.simple_query("SELECT count(*) FROM leads").await.unwrap()),
        ["2"]
    );
    proxy.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_through_psql() {
    let db = TestDb::create("copy", &["acme"]).await;
    let proxy = Proxy::start(db.config(1, ""));
    let p = proxy.addr.port();
    let out = tokio::task::spawn_blocking(move || {
        psql(
            p,
            "acme",
            "COPY leads (name) FROM STDIN;\ncopied-1\ncopied-2\n\\.\nCOPY (SELECT name FROM leads WHERE name LIKE 'copied%' ORDER BY 1) TO STDOUT;\n",
        )
    })
    .await
    .unwrap();
    assert_eq!(out, "copied-1\ncopied-2\n");
    proxy.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_fail_and_pipeline_errors_keep_the_protocol_in_step() {
    let db = TestDb::create("pipeline", &["acme"]).await;
    let proxy = Proxy::start(db.config(1, "[proxy]\nauth_method = \"trust\""));
    let mut r = Raw::login(proxy.addr, "acme").await;

    // COPY FROM STDIN, some data, then CopyFail.
    r.send(&query("COPY leads (name) FROM STDIN")).await;
    let m = r.recv().await.unwrap();
    assert_eq!(m.tag, b'G');
    let mut out = msg(b'd', b"never-1\n");
    out.extend(msg(b'f', b"client gave up\0"));
    r.send(&out).await;
    let msgs = r.until_ready().await;
    let err = msgs.iter().find(|m| m.tag == b'E').expect("CopyFail error");
    assert_eq!(err.field(b'C').as_deref(), Some("57014"));

    // Three pipelined extended batches, the middle one failing.
    let mut out = extended("SELECT 'one'");
    out.extend(extended("SELECT 1/0"));
    out.extend(extended("SELECT 'three'"));
    r.send(&out).await;
    let first = r.until_ready().await;
    assert_eq!(first_column(&first), ["one"]);
    let second = r.until_ready().await;
    let e = second
        .iter()
        .find(|m| m.tag == b'E')
        .expect("division error");
    assert_eq!(e.field(b'C').as_deref(), Some("22012"));
    let third = r.until_ready().await;
    assert_eq!(first_column(&third), ["three"]);

    // Empty query, and a portal with a row limit.
    r.send(&query("")).await;
    let msgs = r.until_ready().await;
    assert_eq!(msgs[0].tag, b'I');
    let mut parse = vec![0u8];
    parse.extend_from_slice(b"SELECT generate_series(1, 5)\0\0\0");
    let mut out = msg(b'P', &parse);
    out.extend(msg(b'B', &[0, 0, 0, 0, 0, 0, 0, 0]));
    out.extend(msg(b'E', &[0, 0, 0, 0, 2]));
    out.extend(msg(b'E', &[0, 0, 0, 0, 2]));
    out.extend(msg(b'S', &[]));
    r.send(&out).await;
    let msgs = r.until_ready().await;
    assert_eq!(first_column(&msgs), ["1", "2", "3", "4"]);
    assert_eq!(msgs.iter().filter(|m| m.tag == b's').count(), 2);

    // Notices and notifications pass through.
    r.send(&query(
        "LISTEN ch; NOTIFY ch, 'hello'; DO $$BEGIN RAISE NOTICE 'psst'; END$$",
    ))
    .await;
    let msgs = r.until_ready().await;
    assert!(msgs.iter().any(|m| m.tag == b'A'), "{msgs:?}");
    assert!(msgs.iter().any(|m| m.tag == b'N'), "{msgs:?}");
    proxy.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_running_query() {
    let db = TestDb::create("cancel", &["acme"]).await;
    let proxy = Proxy::start(db.config(2, ""));
    let client = proxy.connect("acme").await;
    let token = client.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    });
    let err = client
        .simple_query("SELECT pg_sleep(30)")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err}");
    canceller.await.unwrap();
    // The client goes on.
    assert_eq!(
        names(&client.simple_query("SELECT 7").await.unwrap()),
        ["7"]
    );

    // A made-up key is dropped without effect.
    let mut r = Raw::connect(proxy.addr).await;
    let mut cancel = 16u32.to_be_bytes().to_vec();
    cancel.extend_from_slice(&80877102u32.to_be_bytes());
    cancel.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 2]);
    r.send(&cancel).await;
    assert!(r.until_eof().await.is_empty());
    proxy.stop();
}

/// The server connection dies mid-transaction: the client gets an error and keeps going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_connection_lost_mid_transaction() {
    let db = TestDb::create("lost", &["acme"]).await;
    let proxy = Proxy::start(db.config(1, ""));
    let client = proxy.connect("acme").await;
    client.simple_query("BEGIN").await.unwrap();
    let pid = names(
        &client
            .simple_query("SELECT pg_backend_pid()")
            .await
            .unwrap(),
    )
    .remove(0);
    let su = pg().superuser("postgres").await;
    terminate_backend(&su, &pid).await;
    let err = client.simple_query("SELECT 1").await.unwrap_err();
    let code = sqlstate(&err);
    assert!(
        matches!(code.as_deref(), Some("08006") | Some("57P01")),
        "{err}"
    );
    // The pool replaces the connection; the client goes on.
    assert_eq!(
        names(&client.simple_query("SELECT 2").await.unwrap()),
        ["2"]
    );
    proxy.stop();
}

/// Session mode: the client's backend killed while the client is idle ends the client's
/// session with PostgreSQL's own FATAL, instead of a silent new backend without its temp
/// tables and settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_backend_killed_while_idle_closes_the_client() {
    let db = TestDb::create("session_lost", &["acme"]).await;
    let proxy = Proxy::start(db.config(2, "[proxy]\npool_mode = \"session\""));
    let client = proxy.connect("acme").await;
    client
        .batch_execute("CREATE TEMP TABLE mine (x int)")
        .await
        .unwrap();
    let pid = names(
        &client
            .simple_query("SELECT pg_backend_pid()")
            .await
            .unwrap(),
    )
    .remove(0);
    let su = pg().superuser("postgres").await;
    terminate_backend(&su, &pid).await;
    // PostgreSQL's FATAL reaches the client as it arrives (tokio-postgres then reports the
    // connection closed, as it does against PostgreSQL itself), or at its next message.
    let err = client.simple_query("SELECT * FROM mine").await.unwrap_err();
    assert!(
        sqlstate(&err).as_deref() == Some("57P01") || err.is_closed(),
        "{err}"
    );
    assert!(client.is_closed() || client.simple_query("SELECT 1").await.is_err());
    proxy.stop();
}

/// The server is down: clients get a clear error at once instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_down_gives_a_clear_error() {
    let db = TestDb::create("down", &["acme"]).await;
    let mut config = db.config(2, "");
    config.server.port = free_port();
    let proxy = Proxy::start(config);
    let started = std::time::Instant::now();
    let err = tokio_postgres::connect(&proxy.conn_str("acme"), tokio_postgres::NoTls)
        .await
        .err()
        .expect("login must fail");
    assert_eq!(sqlstate(&err).as_deref(), Some("08006"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    proxy.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_errors_follow_the_contract() {
    let db = TestDb::create("login", &["acme", "globex"]).await;
    let proxy = Proxy::start(db.config(
        2,
        "[users.limited]\npassword = \"pw\"\ntenants = [\"globex\"]",
    ));
    let port = proxy.addr.port();
    let try_login = |user: &str, pw: &str, db: &str, extra: &str| {
        format!("host=127.0.0.1 port={port} user={user} password={pw} dbname={db} {extra}")
    };
    let code = |s: String| async move {
        match tokio_postgres::connect(&s, tokio_postgres::NoTls).await {
            Ok(_) => None,
            Err(e) => sqlstate(&e),
        }
    };
    assert_eq!(
        code(try_login(APP_USER, APP_PASSWORD, "nope", ""))
            .await
            .as_deref(),
        Some("3D000")
    );
    assert_eq!(
        code(try_login(APP_USER, "wrong", "acme", ""))
            .await
            .as_deref(),
        Some("28P01")
    );
    assert_eq!(
        code(try_login("nobody", "x", "acme", "")).await.as_deref(),
        Some("28P01")
    );
    assert_eq!(
        code(try_login("limited", "pw", "acme", ""))
            .await
            .as_deref(),
        Some("28000")
    );
    assert_eq!(code(try_login("limited", "pw", "globex", "")).await, None);
    let e = tokio_postgres::connect(
        &try_login(
            APP_USER,
            APP_PASSWORD,
            "acme",
            "options='-c search_path=tenant_globex'",
        ),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .unwrap();
    let msg = e.as_db_error().unwrap().message().to_string();
    assert!(msg.contains("search_path"), "{msg}");
    proxy.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_from_user_name_and_md5_auth() {
    let db = TestDb::create("from_user", &["acme", "globex"]).await;
    let proxy =
        Proxy::start(db.config(2, "[proxy]\ntenant_from = \"user\"\nauth_method = \"md5\""));
    let s = format!(
        "host=127.0.0.1 port={} user={APP_USER}.globex password={APP_PASSWORD} dbname=whatever",
        proxy.addr.port()
    );
    let c = connect_str(&s).await;
    assert_eq!(
        names(
            &c.simple_query("SELECT name FROM leads ORDER BY id")
                .await
                .unwrap()
        ),
        ["globex-1", "globex-2"]
    );
    proxy.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_3_2_client_is_negotiated_down() {
    let db = TestDb::create("proto", &["acme"]).await;
    let proxy = Proxy::start(db.config(1, "[proxy]\nauth_method = \"trust\""));
    let mut r = Raw::connect(proxy.addr).await;
    let mut p = startup_packet(&[("user", APP_USER), ("database", "acme"), ("_pq_.x", "1")]);
    p[4..8].copy_from_slice(&196610u32.to_be_bytes());
    r.send(&p).await;
    let msgs = r.until_ready().await;
    assert_eq!(msgs[0].tag, b'v');
    r.send(&query("SELECT 'ok'")).await;
    assert_eq!(first_column(&r.until_ready().await), ["ok"]);

    // Protocol 2 is refused clearly.
    let mut r = Raw::connect(proxy.addr).await;
    let mut p = startup_packet(&[("user", APP_USER)]);
    p[4..8].copy_from_slice(&131072u32.to_be_bytes());
    r.send(&p).await;
    let msgs = r.until_eof().await;
    assert_eq!(msgs[0].field(b'C').as_deref(), Some("0A000"));

    // SSLRequest is answered 'N', then the startup goes on in the clear.
    let mut r = Raw::connect(proxy.addr).await;
    let mut ssl = 8u32.to_be_bytes().to_vec();
    ssl.extend_from_slice(&80877103u32.to_be_bytes());
    r.send(&ssl).await;
    let mut one = [0u8; 1];
    use tokio::io::AsyncReadExt;
    r.stream.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"N");
    r.send(&startup_packet(&[("user", APP_USER), ("database", "acme")]))
        .await;
    r.until_ready().await;

    // Without TLS the SSLRequest, the startup and a first query may come in one write
    // (the startup phase reads what is there, not a packet at a time): 'N', the login,
    // then the query's answer.
    let mut r = Raw::connect(proxy.addr).await;
    let mut bytes = ssl.clone();
    bytes.extend_from_slice(&startup_packet(&[("user", APP_USER), ("database", "acme")]));
    bytes.extend_from_slice(&query("SELECT 'pipelined'"));
    r.send(&bytes).await;
    r.stream.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"N");
    r.until_ready().await;
    assert_eq!(first_column(&r.until_ready().await), ["pipelined"]);
    proxy.stop();
}
