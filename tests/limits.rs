//! Per-tenant caps, fair queueing, and the pool's and clients' timeouts, against a real
//! PostgreSQL. No assertion depends on how fast the machine is.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use tokio_postgres::SimpleQueryMessage;
use tokio_postgres::types::Type;

fn first(msgs: &[SimpleQueryMessage]) -> String {
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("").to_string()),
            _ => None,
        })
        .unwrap_or_default()
}

/// Active backends running a query that carries `marker`.
async fn active_with(su: &tokio_postgres::Client, role: &str, marker: &str) -> i64 {
    su.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND state = 'active' AND query LIKE '%' || $2 || '%'",
        &[&role, &marker],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_and_global_server_caps_hold() {
    let db = Arc::new(TestDb::create("caps", &["acme", "globex"]).await);
    // acme may use 2 of the 3 connections; globex 3.
    let proxy = Proxy::start(db.config(3, "[tenants.acme]\nmax_server_connections = 2"));
    let stop = Arc::new(AtomicBool::new(false));
    let (max_acme, max_all) = (Arc::new(AtomicI64::new(0)), Arc::new(AtomicI64::new(0)));
    let sampler = {
        let (db, stop, ma, mall) = (db.clone(), stop.clone(), max_acme.clone(), max_all.clone());
        tokio::spawn(async move {
            let su = pg().superuser("postgres").await;
            while !stop.load(Ordering::Relaxed) {
                ma.fetch_max(
                    active_with(&su, &db.role, "/* acme */").await,
                    Ordering::Relaxed,
                );
                mall.fetch_max(
                    active_with(&su, &db.role, "pg_sleep").await,
                    Ordering::Relaxed,
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let mut tasks = Vec::new();
    for i in 0..18 {
        let tenant = if i < 12 { "acme" } else { "globex" };
        let c = proxy.connect(tenant).await;
        tasks.push(tokio::spawn(async move {
            for _ in 0..3 {
                c.simple_query(&format!("SELECT pg_sleep(0.1) /* {tenant} */"))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    let (a, all) = (
        max_acme.load(Ordering::Relaxed),
        max_all.load(Ordering::Relaxed),
    );
    assert!(a <= 2, "acme had {a} active backends");
    assert!(a >= 1);
    assert!(all <= 3, "{all} active backends in all");
    proxy.stop();
}

/// A quiet tenant's transaction does not queue behind a noisy tenant's backlog: while it
/// waits, only about one round of the noisy tenant's in-flight transactions completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_tenant_does_not_queue_behind_noisy_one() {
    let db = TestDb::create("fair", &["noisy", "quiet"]).await;
    let proxy = Proxy::start(db.config(4, ""));
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut noisy = Vec::new();
    for _ in 0..32 {
        let c = proxy.connect("noisy").await;
        let (done, stop) = (done.clone(), stop.clone());
        noisy.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                c.simple_query("SELECT pg_sleep(0.05)").await.unwrap();
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let quiet = proxy.connect("quiet").await;
    // Let the noisy backlog build up.
    while proxy.shared.pools.default().snapshot().waiting < 20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut worst = 0;
    for _ in 0..10 {
        let before = done.load(Ordering::Relaxed);
        quiet.simple_query("SELECT 1").await.unwrap();
        let passed = done.load(Ordering::Relaxed) - before;
        worst = worst.max(passed);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in noisy {
        t.await.unwrap();
    }
    // FIFO would let the ~28 queued noisy transactions go first; round robin lets at most
    // the 4 running ones finish (one of which hands its connection to the quiet tenant).
    assert!(
        worst <= 8,
        "{worst} noisy transactions completed while the quiet one waited"
    );
    proxy.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_wait_timeout_errors_and_the_client_goes_on() {
    let db = TestDb::create("wait_timeout", &["acme"]).await;
    let proxy = Proxy::start(db.config(1, "[limits]\nquery_wait_timeout = \"300ms\""));
    let holder = proxy.connect("acme").await;
    holder.simple_query("BEGIN").await.unwrap();
    let waiter = proxy.connect("acme").await;

    let e = waiter.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("53300"), "{e}");
    assert!(e.as_db_error().unwrap().message().contains("acme"), "{e}");
    // Extended protocol too: the error, then ReadyForQuery at the Sync.
    let e = waiter
        .query_typed("SELECT $1::int", &[(&1i32, Type::INT4)])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("53300"), "{e}");

    holder.simple_query("COMMIT").await.unwrap();
    assert_eq!(
        first(&waiter.simple_query("SELECT 42").await.unwrap()),
        "42"
    );
    let rows = waiter
        .query_typed("SELECT $1::int + 1", &[(&1i32, Type::INT4)])
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, i32>(0), 2);
    let timeouts = proxy.shared.pools.default().snapshot().waiting;
    assert_eq!(timeouts, 0, "no waiter is left behind");
    proxy.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_while_queued_leaves_the_queue_and_runs_nothing() {
    // Found with benches/netfuzz.sh: clients that sent a batch and closed while queued
    // stayed queued until query_wait_timeout, and each then took a server connection only
    // to find nobody there (closing it when the batch was left open): a backlog that made
    // ordinary clients time out (53300).
    let db = TestDb::create("queue_leaver", &["acme"]).await;
    let proxy = Proxy::start(db.config(1, "[proxy]\nauth_method = \"trust\""));
    let holder = proxy.connect("acme").await;
    holder.simple_query("BEGIN").await.unwrap();
    let mut raw = Raw::login(proxy.addr, "acme").await;
    raw.send(&query("INSERT INTO leads (name) VALUES ('gone')"))
        .await;
    let waiting = |n: u32| {
        let shared = proxy.shared.clone();
        async move {
            for _ in 0..500 {
                if shared.pools.default().snapshot().waiting == n {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            false
        }
    };
    assert!(waiting(1).await, "the raw client queues");
    // More bytes while queued (read, so that the end of the stream is seen behind them).
    raw.send(b"Q\0\0").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(raw);
    assert!(waiting(0).await, "it leaves the queue when it closes");
    holder.simple_query("COMMIT").await.unwrap();
    let rows = holder
        .simple_query("SELECT count(*) FROM leads WHERE name = 'gone'")
        .await
        .unwrap();
    assert_eq!(first(&rows), "0", "its INSERT never ran");
    proxy.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_caps_reject_and_recover() {
    let db = TestDb::create("client_caps", &["acme", "globex"]).await;
    let proxy = Proxy::start(db.config(
        2,
        "[proxy]\nmax_client_conn = 3\n[tenants.acme]\nmax_client_connections = 2",
    ));
    let code = |tenant: &'static str| {
        let s = proxy.conn_str(tenant);
        async move {
            match tokio_postgres::connect(&s, tokio_postgres::NoTls).await {
                Ok((c, conn)) => {
                    tokio::spawn(conn);
                    Ok(c)
                }
                Err(e) => Err((
                    sqlstate(&e),
                    e.as_db_error()
                        .map(|d| d.message().to_string())
                        .unwrap_or_default(),
                )),
            }
        }
    };
    let a1 = code("acme").await.unwrap();
    let a2 = code("acme").await.unwrap();
    let (state, msg) = code("acme").await.err().unwrap();
    assert_eq!(state.as_deref(), Some("53300"));
    assert!(msg.contains("max_client_connections"), "{msg}");
    let g1 = code("globex").await.unwrap();
    let (state, msg) = code("globex").await.err().unwrap();
    assert_eq!(state.as_deref(), Some("53300"));
    assert!(msg.contains("max_client_conn"), "{msg}");

    drop(a1);
    // The slot comes back once the proxy sees the disconnect.
    let mut again = None;
    for _ in 0..100 {
        if let Ok(c) = code("acme").await {
            again = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again = again.expect("a freed slot is reused");
    assert_eq!(first(&again.simple_query("SELECT 1").await.unwrap()), "1");
    drop((a2, g1, again));
    proxy.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_transaction_timeout_closes_client_and_frees_server() {
    let db = TestDb::create("idle_txn", &["acme"]).await;
    let proxy = Proxy::start(db.config(1, "[limits]\nidle_transaction_timeout = \"300ms\""));
    let (idler, conn) = tokio_postgres::connect(&proxy.conn_str("acme"), tokio_postgres::NoTls)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    idler
        .batch_execute("BEGIN; INSERT INTO leads (name) VALUES ('abandoned')")
        .await
        .unwrap();
    // The proxy ends the client; its connection task sees the FATAL and finishes.
    let res = tokio::time::timeout(Duration::from_secs(20), conn)
        .await
        .unwrap()
        .unwrap();
    let e = res.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("25P03"), "{e}");
    // The one server connection was rolled back and serves the next client.
    let other = proxy.connect("acme").await;
    assert_eq!(
        first(
            &other
                .simple_query("SELECT count(*) FROM leads WHERE name = 'abandoned'")
                .await
                .unwrap()
        ),
        "0"
    );
    assert_eq!(
        proxy
            .shared
            .pools
            .default()
            .stats
            .connects_ok
            .load(Ordering::Relaxed),
        1
    );
    proxy.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_idle_timeout_closes_idle_clients() {
    let db = TestDb::create("client_idle", &["acme"]).await;
    let proxy = Proxy::start(db.config(1, "[limits]\nclient_idle_timeout = \"300ms\""));
    let (c, conn) = tokio_postgres::connect(&proxy.conn_str("acme"), tokio_postgres::NoTls)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    c.simple_query("SELECT 1").await.unwrap();
    let res = tokio::time::timeout(Duration::from_secs(20), conn)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sqlstate(&res.unwrap_err()).as_deref(), Some("57P05"));
    proxy.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifetime_and_idle_timeout_recycle_server_connections() {
    let db = TestDb::create("lifecycle", &["acme"]).await;
    // lifetime: a connection older than 1s is closed when it comes back.
    let proxy = Proxy::start(db.config(2, "[server]\nlifetime = \"1s\""));
    let c = proxy.connect("acme").await;
    let pid1 = first(&c.simple_query("SELECT pg_backend_pid()").await.unwrap());
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let _ = c.simple_query("SELECT 1").await.unwrap();
    let pid2 = first(&c.simple_query("SELECT pg_backend_pid()").await.unwrap());
    assert_ne!(pid1, pid2, "the old connection was recycled");
    proxy.stop();

    // idle_timeout: idle connections above min_idle are closed; min_idle stay warm.
    let proxy = Proxy::start(db.config(4, "[server]\nidle_timeout = \"1s\"\nmin_idle = 1"));
    let su = pg().superuser("postgres").await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(proxy.connect("acme").await);
    }
    let mut tasks = Vec::new();
    for c in clients {
        tasks.push(tokio::spawn(async move {
            c.simple_query("SELECT pg_sleep(0.3)").await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(db.backends(&su).await >= 3);
    let mut n = 0;
    for _ in 0..100 {
        n = db.backends(&su).await;
        if n == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(n, 1, "idle connections above min_idle were closed");
    proxy.stop();
}

/// A server connection that dies while idle in the pool is noticed and replaced before a
/// client gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_idle_connection_is_replaced_unseen() {
    let db = TestDb::create("broken_idle", &["acme"]).await;
    let proxy = Proxy::start(db.config(1, ""));
    let c = proxy.connect("acme").await;
    let pid = first(&c.simple_query("SELECT pg_backend_pid()").await.unwrap());
    let su = pg().superuser("postgres").await;
    terminate_backend(&su, &pid).await;
    // Give the FATAL a moment to land in the idle socket.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let new_pid = first(&c.simple_query("SELECT pg_backend_pid()").await.unwrap());
    assert_ne!(pid, new_pid);
    proxy.stop();
}

/// 1,000 tenants and 2,000 clients spread over them on a pool of 20.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_tenants_two_thousand_clients() {
    let db = TestDb::create("scale", &[]).await;
    let owner = db.owner().await;
    let mut extra = String::from("[proxy]\nauth_method = \"trust\"\n");
    let mut ddl = String::new();
    for i in 0..1000 {
        ddl.push_str(&format!("CREATE SCHEMA tenant_s{i}; CREATE TABLE tenant_s{i}.t (v int); INSERT INTO tenant_s{i}.t VALUES ({i});"));
        extra.push_str(&format!("[tenants.s{i}]\nschema = \"tenant_s{i}\"\n"));
    }
    owner.batch_execute(&ddl).await.unwrap();
    let proxy = Proxy::start(db.config(20, &extra));
    let mut tasks = Vec::new();
    let sem = Arc::new(tokio::sync::Semaphore::new(200));
    for i in 0..2000 {
        let s = format!(
            "host=127.0.0.1 port={} user={APP_USER} dbname=s{}",
            proxy.addr.port(),
            i % 1000
        );
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let permit = sem.acquire_owned().await.unwrap();
            let c = connect_str(&s).await;
            drop(permit);
            let v = first(&c.simple_query("SELECT v FROM t").await.unwrap());
            assert_eq!(v, (i % 1000).to_string());
            c
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.unwrap());
    }
    assert_eq!(proxy.shared.clients.load(Ordering::Relaxed), 2000);
    let snap = proxy.shared.pools.default().snapshot();
    assert!(snap.open <= 20);
    // A second round on the same connections.
    for (i, c) in clients.iter().enumerate().step_by(7) {
        assert_eq!(
            first(&c.simple_query("SELECT v FROM t").await.unwrap()),
            (i % 1000).to_string()
        );
    }
    drop(clients);
    proxy.stop();
}

/// Connections still logging in count against max_client_conn (as in PgBouncer), so a
/// flood of half-open connections cannot grow past the cap; a refused client is told so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_logging_in_count_against_max_client_conn() {
    let db = TestDb::create("login_count", &["acme"]).await;
    let proxy = Proxy::start(db.config(1, "[proxy]\nmax_client_conn = 1"));
    // Connected, nothing sent yet.
    let half_open = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let e = tokio_postgres::connect(&proxy.conn_str("acme"), tokio_postgres::NoTls)
        .await
        .err()
        .expect("over max_client_conn");
    assert_eq!(sqlstate(&e).as_deref(), Some("53300"));
    drop(half_open);
    let mut ok = false;
    for _ in 0..100 {
        if let Ok((c, conn)) =
            tokio_postgres::connect(&proxy.conn_str("acme"), tokio_postgres::NoTls).await
        {
            tokio::spawn(conn);
            assert_eq!(first(&c.simple_query("SELECT 1").await.unwrap()), "1");
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        ok,
        "the slot came back when the half-open connection closed"
    );
    proxy.stop();
}
