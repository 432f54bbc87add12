//! Faults, against a real PostgreSQL: checkouts cancelled at random points, clients killed
//! mid-transaction, PostgreSQL restarted and stopped under load, a server that never
//! answers, shutdown with an admin session open.
//!
//! A test binary of its own: its tests stop and start the harness's cluster, so they take
//! turns ([`turn`]) and never disturb other test files. Assertions are on counts and
//! outcomes; the few on time have bounds several times what they measure.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::*;
use tenantpool::pool::{CheckoutError, Pool, PoolSettings, PoolSnapshot};
use tenantpool::server::ServerTarget;
use tenantpool::tenant::Tenants;
use tokio_postgres::SimpleQueryMessage;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Takes this binary's turn and makes sure PostgreSQL is up (a failed test may have left it
/// stopped). `None` when the server is not this process's to stop and start
/// (`TENANTPOOL_TEST_PG`): the test is skipped.
async fn turn() -> Option<tokio::sync::MutexGuard<'static, ()>> {
    let turn = SERIAL.lock().await;
    if !pg().controllable() {
        eprintln!("skipped: TENANTPOOL_TEST_PG names a server this test cannot restart");
        return None;
    }
    if !pg().accepts().await {
        pg_start().await;
    }
    Some(turn)
}

async fn pg_stop() {
    tokio::task::spawn_blocking(|| pg().stop()).await.unwrap();
}

async fn pg_start() {
    tokio::task::spawn_blocking(|| {
        pg().start();
        pg().wait_ready();
    })
    .await
    .unwrap();
}

fn first(msgs: &[SimpleQueryMessage]) -> String {
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("").to_string()),
            _ => None,
        })
        .unwrap_or_default()
}

/// Backends PostgreSQL has of any of `roles` (the pool's; the tests' own direct
/// connections are left out).
async fn backends_of(su: &tokio_postgres::Client, roles: &[&str]) -> i64 {
    let roles: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
    su.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = ANY($1) AND application_name <> 'test_owner'",
        &[&roles],
    )
    .await
    .unwrap()
    .get(0)
}

/// Samples the backends of `roles` every few milliseconds until stopped; returns the peak.
fn sample_peak(roles: Vec<String>) -> (Arc<AtomicBool>, tokio::task::JoinHandle<i64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let done = stop.clone();
    let task = tokio::spawn(async move {
        let su = pg().superuser("postgres").await;
        let roles: Vec<&str> = roles.iter().map(|s| s.as_str()).collect();
        let mut peak = 0;
        while !done.load(Ordering::Relaxed) {
            peak = peak.max(backends_of(&su, &roles).await);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        peak
    });
    (stop, task)
}

/// Waits until the pool has settled (nothing connecting, closing, waiting or checked out)
/// and its open connections are exactly the backends PostgreSQL lists for `roles`.
async fn settled(snapshot: impl Fn() -> PoolSnapshot, roles: &[&str]) -> PoolSnapshot {
    let su = pg().superuser("postgres").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let snap = snapshot();
        let backends = backends_of(&su, roles).await;
        let quiet = snap.connecting == 0
            && snap.closing == 0
            && snap.waiting == 0
            && snap.in_use.iter().all(|&n| n == 0)
            && snap.open == snap.idle;
        let counts = |s: &PoolSnapshot| (s.open, s.idle, s.in_use.clone());
        if quiet && backends == i64::from(snap.open) && counts(&snapshot()) == counts(&snap) {
            return snap;
        }
        assert!(
            Instant::now() < deadline,
            "the pool did not settle: {snap:?} with {backends} backends"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checkouts cancelled at random points (while queued, while connecting, while closing
/// another login's connection, with the connection in hand mid-query) give back every
/// count they took: once all is quiet, the pool's counts are PostgreSQL's backends, and
/// PostgreSQL never saw more backends than `max_connections` meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_checkouts_give_back_every_count() {
    let Some(_turn) = turn().await else { return };
    let db = TestDb::create("cancel", &["a", "b", "c", "d"]).await;
    // b and d log in as a role of their own, so checkouts also close the other login's
    // idle connections and connect in their slots.
    let own = format!("{}_own", db.name);
    pg().superuser("postgres")
        .await
        .batch_execute(&format!("CREATE ROLE {own} LOGIN PASSWORD 'own-secret'"))
        .await
        .unwrap();
    let max = 6;
    let config = db.config(
        max,
        &format!(
            "[tenant_defaults]\nmax_server_connections = 3\n\
             [tenants.b]\nserver_user = \"{own}\"\nserver_password = \"own-secret\"\n\
             [tenants.d]\nserver_user = \"{own}\"\nserver_password = \"own-secret\"\n"
        ),
    );
    let pool = Pool::new(
        0,
        ServerTarget::from_config(&config).unwrap(),
        PoolSettings {
            max_connections: max,
            min_idle: 0,
            idle_timeout: Duration::from_secs(600),
            lifetime: Duration::from_secs(600),
        },
        Arc::new(Tenants::from_config(&config)),
    );
    let roles = vec![db.role.clone(), own.clone()];
    let (stop, sampler) = sample_peak(roles.clone());
    let cancelled = Arc::new(AtomicU32::new(0));
    let served = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (pool, cancelled, served) = (pool.clone(), cancelled.clone(), served.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..40 {
                let tenant = rand::random_range(0..4u32);
                let wait = Duration::from_millis(rand::random_range(1..80));
                let cut = Duration::from_millis(rand::random_range(0..40));
                match tokio::time::timeout(cut, pool.checkout(tenant, wait)).await {
                    Err(_) => {
                        cancelled.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(e)) => assert_eq!(e, CheckoutError::Timeout),
                    Ok(Ok(mut conn)) => {
                        served.fetch_add(1, Ordering::Relaxed);
                        // A query, itself cut short at random: the connection is then
                        // closed while PostgreSQL still runs it.
                        let cut = Duration::from_millis(rand::random_range(0..60));
                        let q = tokio::time::timeout(cut, conn.query_rows("SELECT pg_sleep(0.05)"))
                            .await;
                        conn.set_clean(matches!(q, Ok(Ok(_))) && rand::random::<bool>());
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let snap = settled(|| pool.snapshot(), &[&db.role, &own]).await;
    stop.store(true, Ordering::Relaxed);
    let peak = sampler.await.unwrap();
    let (cancelled, served) = (
        cancelled.load(Ordering::Relaxed),
        served.load(Ordering::Relaxed),
    );
    eprintln!("{cancelled} checkouts cancelled, {served} served, peak {peak} backends, {snap:?}");
    assert!(
        cancelled > 50 && served > 50,
        "{cancelled} cancelled, {served} served"
    );
    assert!(
        peak <= i64::from(max),
        "PostgreSQL saw {peak} backends of the pool, over max_connections = {max}"
    );
    // Nothing leaked: every slot can be taken at once (3 tenants of one login, 3 of the
    // other, each tenant at its cap).
    let mut held = Vec::new();
    for t in [0, 0, 0, 1, 1, 1] {
        held.push(
            pool.checkout(t, Duration::from_secs(10))
                .await
                .expect("a slot was lost"),
        );
    }
    drop(held);
    pool.close();
}

/// 200 clients over 20 tenants come and go, each running a transaction; a quarter are
/// killed while PostgreSQL runs their query. A killed client's connection keeps its slot
/// until its backend is gone, so PostgreSQL never lists more backends of the pool than
/// `server.max_connections`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_never_exceed_max_connections_under_churn() {
    let Some(_turn) = turn().await else { return };
    let names: Vec<String> = (0..20).map(|i| format!("t{i}")).collect();
    let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
    let db = TestDb::create("churn", &refs).await;
    let max = 10;
    let proxy = Proxy::start(db.config(
        max,
        &format!(
            "{TRUST}[tenant_defaults]\nmax_server_connections = 3\n\
             [limits]\nquery_wait_timeout = \"120s\""
        ),
    ));
    let (stop, sampler) = sample_peak(vec![db.role.clone()]);
    let killed = Arc::new(AtomicU32::new(0));
    let committed = Arc::new(AtomicU32::new(0));
    let addr = proxy.addr;
    let mut tasks = Vec::new();
    for c in 0..200usize {
        let tenant = names[c % names.len()].clone();
        let (killed, committed) = (killed.clone(), committed.clone());
        tasks.push(tokio::spawn(async move {
            for round in 0..3 {
                let mut r = Raw::login(addr, &tenant).await;
                r.send(&query("BEGIN")).await;
                r.until_ready().await;
                if (c + round) % 4 == 0 {
                    // Killed while its query runs: the socket just closes.
                    r.send(&query("SELECT pg_sleep(0.3)")).await;
                    let ms = rand::random_range(5..60);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    drop(r);
                    killed.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                r.send(&query("INSERT INTO leads (name) VALUES ('churn')"))
                    .await;
                let msgs = r.until_ready().await;
                assert_eq!(error_code(&msgs), None, "{msgs:?}");
                r.send(&query("COMMIT")).await;
                let msgs = r.until_ready().await;
                assert_eq!(error_code(&msgs), None, "{msgs:?}");
                committed.fetch_add(1, Ordering::Relaxed);
                r.send(&msg(b'X', &[])).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let shared = proxy.shared.clone();
    settled(|| shared.pools.default().snapshot(), &[&db.role]).await;
    stop.store(true, Ordering::Relaxed);
    let peak = sampler.await.unwrap();
    let (killed, committed) = (
        killed.load(Ordering::Relaxed),
        committed.load(Ordering::Relaxed),
    );
    eprintln!("{committed} committed, {killed} killed, peak {peak} backends");
    assert_eq!((killed, committed), (150, 450));
    assert!(
        peak <= i64::from(max),
        "PostgreSQL saw {peak} backends of the pool, over max_connections = {max}"
    );
    proxy.stop();
}

/// While PostgreSQL is down, transactions wait and one probe at a time retries on a backoff
/// that stays short (not one connect per client, not every 5 s): once PostgreSQL accepts
/// connections again, the waiting clients get through within about a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_clients_get_through_soon_after_the_server_is_back() {
    let Some(_turn) = turn().await else { return };
    let db = TestDb::create("comeback", &["acme"]).await;
    let proxy = Proxy::start(db.config(4, "[limits]\nquery_wait_timeout = \"60s\""));
    let mut clients = Vec::new();
    for _ in 0..5 {
        let c = proxy.connect("acme").await;
        assert_eq!(first(&c.simple_query("SELECT 1").await.unwrap()), "1");
        clients.push(c);
    }
    pg_stop().await;
    let mut waiting = Vec::new();
    for c in clients {
        waiting.push(tokio::spawn(async move {
            let r = c.simple_query("SELECT 2").await;
            (r.map(|m| first(&m)), Instant::now(), c)
        }));
    }
    // The slots freed by the dead connections are tried at once; from then on the pool
    // knows the server is down.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = &proxy.shared.pools.default().stats;
    let failed_before = stats.connects_failed.load(Ordering::Relaxed);
    assert!(failed_before >= 1);
    // Down for a while: the backoff reaches its cap. Connect attempts never overlap.
    let outage = Duration::from_secs(6);
    let until = Instant::now() + outage;
    let mut most_connecting = 0;
    while Instant::now() < until {
        most_connecting = most_connecting.max(proxy.shared.pools.default().snapshot().connecting);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let failed = stats.connects_failed.load(Ordering::Relaxed) - failed_before;
    tokio::task::spawn_blocking(|| pg().start()).await.unwrap();
    let ready_at = loop {
        if pg().accepts().await {
            break Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let mut late = Duration::ZERO;
    for w in waiting {
        let (r, at, c) = w.await.unwrap();
        assert_eq!(r.expect("a waiting client failed"), "2");
        late = late.max(at.saturating_duration_since(ready_at));
        // Same connection, and it goes on.
        assert_eq!(first(&c.simple_query("SELECT 3").await.unwrap()), "3");
    }
    eprintln!(
        "{failed} failed connects in {outage:?} (at most {most_connecting} at once); \
         the last waiting client got through {late:?} after PostgreSQL accepted connections"
    );
    assert!(most_connecting <= 1, "{most_connecting} connects at once");
    // 100 ms doubling to 500 ms over 6 s: about a dozen attempts; one per client per
    // 100 ms would be hundreds.
    assert!((4..=25).contains(&failed), "{failed} failed connects");
    // The backoff cap is 500 ms (plus a login); the old cap of 5 s could make clients wait
    // up to 5 s.
    assert!(late < Duration::from_secs(3), "waited {late:?}");
    proxy.stop();
}

/// What one looping client saw.
#[derive(Debug, Default)]
struct Outcomes {
    committed: Vec<i32>,
    /// Failed without doubt: none of its rows may be there.
    failed: Vec<i32>,
    /// FATAL 08007: committed or not, but never half.
    in_doubt: Vec<i32>,
    reconnects: u32,
    codes: HashMap<String, u32>,
    /// Errors after which the connection was gone although they were not 08007.
    closed_without_08007: Vec<String>,
    /// Transactions committed after the server came back for good.
    committed_at_end: u32,
}

/// Loops `BEGIN; INSERT; INSERT; COMMIT` (one statement per round trip) as client `c`,
/// until `stop`; a transaction's two rows are `(c, seq, 1)` and `(c, seq, 2)`.
async fn pair_loop(conn: String, c: i32, stop: Arc<AtomicBool>, end: Arc<AtomicBool>) -> Outcomes {
    let mut out = Outcomes::default();
    let mut client = connect_str(&conn).await;
    let mut seq = 0;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let steps = [
            "BEGIN".to_string(),
            format!("INSERT INTO pairs VALUES ({c}, {seq}, 1)"),
            format!("INSERT INTO pairs VALUES ({c}, {seq}, 2)"),
            "COMMIT".to_string(),
        ];
        let mut failure = None;
        for sql in &steps {
            if let Err(e) = client.simple_query(sql).await {
                failure = Some(e);
                break;
            }
        }
        let Some(e) = failure else {
            out.committed.push(seq);
            if end.load(Ordering::Relaxed) {
                out.committed_at_end += 1;
            }
            continue;
        };
        let code = sqlstate(&e).unwrap_or_else(|| format!("none: {e}"));
        *out.codes.entry(code.clone()).or_default() += 1;
        if code == "08007" {
            out.in_doubt.push(seq);
        } else {
            out.failed.push(seq);
        }
        // The proxy closes right after a FATAL: give the connection task a moment.
        for _ in 0..50 {
            if client.is_closed() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if client.is_closed() {
            if code != "08007" {
                out.closed_without_08007.push(format!("{code}: {e}"));
            }
            // Log in again (the proxy answers logins while the server is down).
            client = loop {
                match tokio_postgres::connect(&conn, tokio_postgres::NoTls).await {
                    Ok((client, connection)) => {
                        tokio::spawn(async move {
                            let _ = connection.await;
                        });
                        break client;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            };
            out.reconnects += 1;
        } else if code == "08007" {
            out.closed_without_08007
                .push(format!("08007 left the client open: {e}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    out
}

/// PostgreSQL restarted (`-m fast`), then stopped for 10 s, while 20 clients loop
/// two-insert transactions: no transaction is half-committed, a transaction reported
/// failed left nothing and one reported committed is there, clients whose outcome was not
/// in doubt keep their connections (errors only: 57P01 from the server, 53300 after
/// `query_wait_timeout` while the server is down), in-doubt ones got 08007 and log in
/// again, and everyone commits again once the server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_and_outage_under_load() {
    let Some(_turn) = turn().await else { return };
    let db = TestDb::create("outage", &["acme"]).await;
    db.owner()
        .await
        .batch_execute(
            "CREATE TABLE tenant_acme.pairs (client int, seq int, part int, \
             PRIMARY KEY (client, seq, part))",
        )
        .await
        .unwrap();
    let proxy = Proxy::start(db.config(8, "[limits]\nquery_wait_timeout = \"2s\""));
    let stop = Arc::new(AtomicBool::new(false));
    let end = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..20 {
        tasks.push(tokio::spawn(pair_loop(
            proxy.conn_str("acme"),
            c,
            stop.clone(),
            end.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::task::spawn_blocking(|| pg().restart())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg_stop().await;
    // Longer than query_wait_timeout: queued transactions time out.
    tokio::time::sleep(Duration::from_secs(10)).await;
    pg_start().await;
    // Every client's queued wait has ended (2 s) and it runs again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    end.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.push(t.await.unwrap());
    }

    let owner = db.owner().await;
    let mut rows: HashMap<(i32, i32), i64> = HashMap::new();
    for r in owner
        .query(
            "SELECT client, seq, count(*) FROM tenant_acme.pairs GROUP BY client, seq",
            &[],
        )
        .await
        .unwrap()
    {
        rows.insert((r.get(0), r.get(1)), r.get(2));
    }
    let mut codes: HashMap<String, u32> = HashMap::new();
    let (mut committed, mut in_doubt, mut failed) = (0, 0, 0);
    for (c, o) in all.iter().enumerate() {
        let c = c as i32;
        for (k, n) in &o.codes {
            *codes.entry(k.clone()).or_default() += n;
        }
        assert!(
            o.closed_without_08007.is_empty(),
            "client {c}: {:?}",
            o.closed_without_08007
        );
        assert_eq!(o.reconnects as usize, o.in_doubt.len(), "client {c}: {o:?}");
        for s in &o.committed {
            assert_eq!(rows.get(&(c, *s)), Some(&2), "client {c} seq {s} committed");
        }
        for s in &o.failed {
            assert_eq!(
                rows.get(&(c, *s)),
                None,
                "client {c} seq {s} failed yet left rows"
            );
        }
        assert!(o.committed_at_end > 0, "client {c} did not recover: {o:?}");
        committed += o.committed.len();
        in_doubt += o.in_doubt.len();
        failed += o.failed.len();
    }
    // Nothing half-committed, whatever the outcome was.
    let half: Vec<_> = rows.iter().filter(|&(_, &n)| n != 2).collect();
    assert!(half.is_empty(), "half-committed transactions: {half:?}");
    eprintln!("{committed} committed, {failed} failed, {in_doubt} in doubt; codes {codes:?}");
    assert!(codes.get("53300").copied().unwrap_or(0) > 0, "{codes:?}");
    for code in codes.keys() {
        assert!(
            ["53300", "57P01", "08006", "08007"].contains(&code.as_str()),
            "unexpected error {code}: {codes:?}"
        );
    }
    let shared = proxy.shared.clone();
    settled(|| shared.pools.default().snapshot(), &[&db.role]).await;
    proxy.stop();
}

/// A COMMIT, or an autocommit statement, in flight while PostgreSQL restarts may or may
/// not have committed: FATAL 08007 and the client is closed, never a plain ERROR. A
/// statement inside a transaction block is a plain error, and the client goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_or_autocommit_in_flight_during_a_restart_is_in_doubt() {
    let Some(_turn) = turn().await else { return };
    let db = TestDb::create("doubt", &["acme"]).await;
    // Commits of this table take 5 s (a deferred trigger), so they are in flight for sure.
    db.owner()
        .await
        .batch_execute(
            "CREATE TABLE tenant_acme.slow (id int);
             CREATE FUNCTION tenant_acme.slow_commit() RETURNS trigger LANGUAGE plpgsql
               AS $$ BEGIN PERFORM pg_sleep(5); RETURN NULL; END $$;
             CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON tenant_acme.slow
               DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION tenant_acme.slow_commit();",
        )
        .await
        .unwrap();
    let proxy = Proxy::start(db.config(4, "[limits]\nquery_wait_timeout = \"30s\""));
    let committer = proxy.connect("acme").await;
    committer
        .simple_query("BEGIN; INSERT INTO slow VALUES (1)")
        .await
        .unwrap();
    let autocommit = proxy.connect("acme").await;
    let in_block = proxy.connect("acme").await;
    in_block.simple_query("BEGIN").await.unwrap();

    let commit = tokio::spawn(async move { (committer.simple_query("COMMIT").await, committer) });
    let insert = tokio::spawn(async move {
        (
            autocommit.simple_query("INSERT INTO slow VALUES (2)").await,
            autocommit,
        )
    });
    let sleep =
        tokio::spawn(async move { (in_block.simple_query("SELECT pg_sleep(5)").await, in_block) });
    // All three running on the server.
    let su = pg().superuser("postgres").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while backends_of_active(&su, &db.role).await < 3 {
        assert!(Instant::now() < deadline, "the statements did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(su);
    tokio::task::spawn_blocking(|| pg().restart())
        .await
        .unwrap();

    for (what, task) in [("COMMIT", commit), ("autocommit INSERT", insert)] {
        let (r, client) = task.await.unwrap();
        let e = r.expect_err(what);
        assert_eq!(sqlstate(&e).as_deref(), Some("08007"), "{what}: {e}");
        assert_eq!(e.as_db_error().unwrap().severity(), "FATAL", "{what}: {e}");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !client.is_closed() {
            assert!(
                Instant::now() < deadline,
                "{what}: the client was not closed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let (r, client) = sleep.await.unwrap();
    let e = r.expect_err("pg_sleep inside a transaction block");
    let code = sqlstate(&e);
    assert!(
        matches!(code.as_deref(), Some("57P01") | Some("08006")),
        "inside a block: {e}"
    );
    assert_eq!(e.as_db_error().unwrap().severity(), "ERROR", "{e}");
    assert_eq!(first(&client.simple_query("SELECT 4").await.unwrap()), "4");
    proxy.stop();
}

/// Backends of `role` running a statement.
async fn backends_of_active(su: &tokio_postgres::Client, role: &str) -> i64 {
    su.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND state = 'active' \
         AND application_name <> 'test_owner'",
        &[&role],
    )
    .await
    .unwrap()
    .get(0)
}

/// Transactions queued while PostgreSQL is down longer than `query_wait_timeout` get
/// ERROR 53300, not a hang and not a closed connection; the same connections go on once
/// PostgreSQL is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_transactions_time_out_cleanly_while_the_server_is_down() {
    let Some(_turn) = turn().await else { return };
    let db = TestDb::create("queued", &["acme", "globex"]).await;
    let proxy = Proxy::start(db.config(2, "[limits]\nquery_wait_timeout = \"1s\""));
    let mut clients = Vec::new();
    for i in 0..6 {
        let c = proxy
            .connect(if i % 2 == 0 { "acme" } else { "globex" })
            .await;
        assert_eq!(first(&c.simple_query("SELECT 1").await.unwrap()), "1");
        clients.push(c);
    }
    pg_stop().await;
    let mut tasks = Vec::new();
    for c in clients {
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let r = c.simple_query("SELECT 2").await;
            (r, started.elapsed(), c)
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        let (r, took, c) = t.await.unwrap();
        let e = r.expect_err("the server is down");
        assert_eq!(sqlstate(&e).as_deref(), Some("53300"), "{e}");
        // It says why: the server cannot be reached, and what connecting said.
        let msg = e
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_default();
        assert!(msg.contains("the server cannot be reached"), "{msg}");
        assert!(took >= Duration::from_millis(900), "gave up after {took:?}");
        assert!(took < Duration::from_secs(10), "took {took:?}");
        assert!(!c.is_closed());
        clients.push(c);
    }
    pg_start().await;
    for c in &clients {
        assert_eq!(first(&c.simple_query("SELECT 3").await.unwrap()), "3");
    }
    let shared = proxy.shared.clone();
    settled(|| shared.pools.default().snapshot(), &[&db.role]).await;
    proxy.stop();
}

/// A server that accepts TCP connections and never answers the startup: logins get a
/// clean FATAL 08006 within connect_timeout (and a bit), and no slot stays taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_gives_clean_errors_and_keeps_no_slots() {
    let Some(_turn) = turn().await else { return };
    let db = TestDb::create("mute", &["acme"]).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicU32::new(0));
    let counted = accepted.clone();
    let mute = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::Relaxed);
            held.push(s);
        }
    });
    // The start-up audit queues for a connection too: it gives up after query_wait_timeout.
    let mut config = db.config(
        3,
        "[server]\nconnect_timeout = \"1s\"\n[limits]\nquery_wait_timeout = \"2s\"",
    );
    config.server.port = port;
    let proxy = Proxy::start(config);
    let mut logins = Vec::new();
    for _ in 0..6 {
        let conn = proxy.conn_str("acme");
        logins.push(tokio::spawn(async move {
            let started = Instant::now();
            let r = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await;
            (r.err().map(|e| sqlstate(&e)), started.elapsed())
        }));
    }
    for l in logins {
        let (code, took) = l.await.unwrap();
        assert_eq!(code, Some(Some("08006".to_string())));
        assert!(took < Duration::from_secs(3), "took {took:?}");
    }
    assert!(accepted.load(Ordering::Relaxed) >= 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = proxy.shared.pools.default().snapshot();
        if (s.open, s.connecting, s.closing, s.waiting) == (0, 0, 0, 0)
            && s.in_use.iter().all(|&n| n == 0)
        {
            break;
        }
        assert!(Instant::now() < deadline, "slots left taken: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.stop();
    mute.abort();
}

const ADMIN: &str = "[users.admin]\npassword = \"admin-secret\"\ntenants = []\n\
                     [proxy]\nshutdown_timeout = \"30s\"";

async fn admin_console(proxy: &Proxy) -> tokio_postgres::Client {
    connect_str(&format!(
        "host=127.0.0.1 port={} user=admin password=admin-secret dbname=tenantpool",
        proxy.addr.port()
    ))
    .await
}

/// An admin console session left open does not keep the proxy from exiting: on shutdown
/// it ends, and run() returns once the last client transaction is done (not after
/// shutdown_timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_admin_session_does_not_hold_up_shutdown() {
    let Some(_turn) = turn().await else { return };
    let db = TestDb::create("admin_down", &["acme"]).await;
    let proxy = Proxy::start(db.config(2, ADMIN));
    let admin = admin_console(&proxy).await;
    admin.simple_query("SHOW VERSION").await.unwrap();
    let client = proxy.connect("acme").await;
    client.simple_query("BEGIN").await.unwrap();
    proxy.shutdown();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The running transaction finishes.
    assert_eq!(first(&client.simple_query("SELECT 5").await.unwrap()), "5");
    client.simple_query("COMMIT").await.unwrap();
    assert!(
        proxy.stopped_within(Duration::from_secs(5)).await,
        "run() did not return within 5 s of the last transaction (shutdown_timeout is 30 s)"
    );
    assert!(admin.is_closed() || admin.simple_query("SHOW VERSION").await.is_err());
    proxy.stop();
}

/// The console's SHUTDOWN: answered, that session ends, and the proxy exits promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_shutdown_exits_promptly() {
    let Some(_turn) = turn().await else { return };
    let db = TestDb::create("admin_stop", &["acme"]).await;
    let proxy = Proxy::start(db.config(2, ADMIN));
    let client = proxy.connect("acme").await;
    client.simple_query("SELECT 1").await.unwrap();
    let admin = admin_console(&proxy).await;
    admin.simple_query("SHUTDOWN").await.unwrap();
    assert!(
        proxy.stopped_within(Duration::from_secs(5)).await,
        "run() did not return within 5 s of SHUTDOWN (shutdown_timeout is 30 s)"
    );
    proxy.stop();
}

/// When shutdown_timeout runs out, every client still in a transaction, or queued for a
/// server connection, gets FATAL 57P01 "shutdown timeout reached" before it is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_dropped_at_shutdown_timeout_get_a_fatal() {
    let db = TestDb::create("shutdown_timeout", &["acme"]).await;
    let proxy = Proxy::start(db.config(1, "[proxy]\nshutdown_timeout = \"1s\""));
    let busy = proxy.connect("acme").await;
    let queued = proxy.connect("acme").await;
    let running = tokio::spawn(async move { busy.simple_query("SELECT pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let waiting = tokio::spawn(async move { queued.simple_query("SELECT 1").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    proxy.shutdown();
    for (what, task) in [("running", running), ("queued", waiting)] {
        let e = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap_or_else(|_| panic!("{what}: no answer"))
            .unwrap()
            .expect_err(what);
        let db = e
            .as_db_error()
            .unwrap_or_else(|| panic!("{what}: no error message: {e}"));
        assert_eq!(db.code().code(), "57P01", "{what}: {db:?}");
        assert_eq!(db.severity(), "FATAL", "{what}");
        assert!(
            db.message().contains("shutdown timeout reached"),
            "{what}: {}",
            db.message()
        );
    }
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "not before shutdown_timeout"
    );
    assert!(proxy.stopped_within(Duration::from_secs(5)).await);
}
