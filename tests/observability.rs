//! Metrics at GET /metrics and the admin console, against a real PostgreSQL.

mod common;

use std::time::Duration;

use common::*;
use tokio_postgres::SimpleQueryMessage;

const ADMIN_PASSWORD: &str = "admin-secret";
/// The value of one series (`name{labels}` exactly as rendered), if present./// Scrapes until `series` has `want`, for up to 10 s (the exporter refreshes every 500 ms).
async fn wait_for(port: u16, series: &str, want: f64) -> String {
    let mut text = String::new();
    for _ in 0..100 {
        text = scrape(port).await;
        if value(&text, series) == Some(want) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{series} never became {want}; last scrape:\n{text}");
}
fn columns(msgs: &[SimpleQueryMessage]) -> Vec<String> {
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::RowDescription(d) => {
                Some(d.iter().map(|c| c.name().to_string()).collect())
            }
            _ => None,
        })
        .unwrap_or_default()
}

fn admin_extra(metrics_port: u16) -> String {
    format!(
        "[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n[users.admin]\npassword = \"{ADMIN_PASSWORD}\"\ntenants = []"
    )
}

async fn admin(proxy: &Proxy, db: &str) -> tokio_postgres::Client {
    connect_str(&format!(
        "host=127.0.0.1 port={} user=admin password={ADMIN_PASSWORD} dbname={db}",
        proxy.addr.port()
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_the_traffic() {
    let db = TestDb::create("metrics", &["acme", "globex"]).await;
    let mport = free_port();
    let proxy = Proxy::start(db.config(
        2,
        &format!(
            "{}\n[tenants.acme]\nmax_server_connections = 1",
            admin_extra(mport)
        ),
    ));

    // Every series exists from start-up, for every tenant.
    let text = wait_for(
        mport,
        "tenantpool_transactions_total{tenant=\"globex\"}",
        0.0,
    )
    .await;
    for name in CONTRACT_METRICS {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    for t in ["acme", "globex"] {
        for state in ["active", "waiting", "idle"] {
            let s = format!("tenantpool_client_connections{{tenant=\"{t}\",state=\"{state}\"}}");
            assert_eq!(value(&text, &s), Some(0.0), "{s}");
        }
        let s = format!("tenantpool_tenant_max_server_connections{{tenant=\"{t}\"}}");
        assert_eq!(value(&text, &s), Some(if t == "acme" { 1.0 } else { 2.0 }));
        let s = format!("tenantpool_wait_duration_seconds_bucket{{tenant=\"{t}\",le=\"0.0001\"}}");
        assert_eq!(value(&text, &s), Some(0.0), "{s}");
    }
    assert!(text.contains("# TYPE tenantpool_query_duration_seconds histogram"));

    // 7 transactions for acme (one of them two statements in an explicit transaction),
    // 3 for globex.
    let acme = proxy.connect("acme").await;
    for _ in 0..6 {
        acme.simple_query("SELECT 1").await.unwrap();
    }
    acme.simple_query("BEGIN").await.unwrap();
    acme.simple_query("SELECT 2").await.unwrap();
    acme.simple_query("COMMIT").await.unwrap();
    let globex = proxy.connect("globex").await;
    for _ in 0..3 {
        globex.simple_query("SELECT 1").await.unwrap();
    }
    let text = wait_for(mport, "tenantpool_transactions_total{tenant=\"acme\"}", 7.0).await;
    let text = if value(&text, "tenantpool_transactions_total{tenant=\"globex\"}") == Some(3.0) {
        text
    } else {
        wait_for(
            mport,
            "tenantpool_transactions_total{tenant=\"globex\"}",
            3.0,
        )
        .await
    };
    assert_eq!(
        value(&text, "tenantpool_queries_total{tenant=\"acme\"}"),
        Some(9.0)
    );
    assert_eq!(
        value(
            &text,
            "tenantpool_transaction_duration_seconds_count{tenant=\"acme\"}"
        ),
        Some(7.0)
    );
    assert_eq!(
        value(
            &text,
            "tenantpool_transaction_duration_seconds_bucket{tenant=\"acme\",le=\"+Inf\"}"
        ),
        Some(7.0)
    );
    assert_eq!(
        value(
            &text,
            "tenantpool_query_duration_seconds_count{tenant=\"acme\"}"
        ),
        Some(9.0)
    );
    // One checkout per transaction.
    assert_eq!(
        value(
            &text,
            "tenantpool_wait_duration_seconds_count{tenant=\"acme\"}"
        ),
        Some(7.0)
    );
    // Bytes are copied from the tenant's totals every 500 ms (transactions and queries are
    // counted with their histograms, at once).
    let mut text = text;
    for _ in 0..50 {
        if value(
            &text,
            "tenantpool_bytes_total{tenant=\"acme\",direction=\"in\"}",
        )
        .unwrap()
            > 0.0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        text = scrape(mport).await;
    }
    assert!(
        value(
            &text,
            "tenantpool_bytes_total{tenant=\"acme\",direction=\"in\"}"
        )
        .unwrap()
            > 0.0
    );
    assert!(
        value(
            &text,
            "tenantpool_bytes_total{tenant=\"acme\",direction=\"out\"}"
        )
        .unwrap()
            > 0.0
    );
    let ok = format!(
        "tenantpool_server_connects_total{{server=\"default\",database=\"{}\",result=\"ok\"}}",
        db.name
    );
    assert!(value(&text, &ok).unwrap() >= 1.0, "{text}");
    assert_eq!(
        value(
            &text,
            "tenantpool_client_connections{tenant=\"acme\",state=\"idle\"}"
        ),
        Some(1.0)
    );

    // Waiting clients show while acme's cap (1) is full.
    acme.simple_query("BEGIN").await.unwrap();
    wait_for(
        mport,
        "tenantpool_client_connections{tenant=\"acme\",state=\"active\"}",
        1.0,
    )
    .await;
    let acme2 = proxy.connect("acme").await;
    let blocked = tokio::spawn(async move { acme2.simple_query("SELECT 3").await.map(|_| ()) });
    let text = wait_for(
        mport,
        "tenantpool_client_connections{tenant=\"acme\",state=\"waiting\"}",
        1.0,
    )
    .await;
    assert_eq!(
        value(
            &text,
            "tenantpool_tenant_server_connections{tenant=\"acme\"}"
        ),
        Some(1.0)
    );
    acme.simple_query("COMMIT").await.unwrap();
    blocked.await.unwrap().unwrap();

    // A rejected login is counted with its reason.
    let bad = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user=app password=wrong dbname=globex",
            proxy.addr.port()
        ),
        tokio_postgres::NoTls,
    )
    .await;
    assert!(bad.is_err());
    wait_for(
        mport,
        "tenantpool_rejected_connections_total{tenant=\"globex\",reason=\"auth_failed\"}",
        1.0,
    )
    .await;
    proxy.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_console_shows_and_pauses() {
    let db = TestDb::create("admin", &["acme", "globex"]).await;
    let proxy = Proxy::start(db.config(2, &admin_extra(free_port())));
    let console = admin(&proxy, "tenantpool").await;

    let pools = console.simple_query("SHOW POOLS").await.unwrap();
    let cols = columns(&pools);
    for c in [
        "database",
        "user",
        "cl_active",
        "cl_waiting",
        "sv_active",
        "sv_idle",
        "maxwait",
        "pool_mode",
    ] {
        assert!(
            cols.iter().any(|x| x == c),
            "SHOW POOLS lacks {c}: {cols:?}"
        );
    }
    // Fresh server connections no tenant has used yet are the "*" row.
    let names: Vec<String> = rows(&pools)
        .into_iter()
        .map(|r| r[0].clone())
        .filter(|n| n != "*")
        .collect();
    assert_eq!(names, ["acme", "globex"]);

    let acme = proxy.connect("acme").await;
    let globex = proxy.connect("globex").await;
    acme.simple_query("SELECT 1").await.unwrap();
    let tenants = console.simple_query("SHOW TENANTS").await.unwrap();
    let r = rows(&tenants);
    assert_eq!(r.len(), 2);
    assert_eq!(r[0][0], "acme");
    assert_eq!(r[0][4], "1", "cl_total of acme: {r:?}");
    let clients = rows(&console.simple_query("show clients;").await.unwrap());
    assert_eq!(clients.len(), 2);
    let stats = rows(&console.simple_query("SHOW STATS").await.unwrap());
    assert_eq!(stats[0][0], "acme");
    assert_eq!(stats[0][1], "1", "acme total_xact_count: {stats:?}");
    let servers = rows(&console.simple_query("SHOW SERVERS").await.unwrap());
    assert!(!servers.is_empty());
    for cmd in ["SHOW HELP", "SHOW VERSION", "SHOW CONFIG"] {
        assert!(
            !rows(&console.simple_query(cmd).await.unwrap()).is_empty(),
            "{cmd}"
        );
    }

    // PAUSE acme: its new transactions wait while globex runs; RESUME releases them.
    console.simple_query("PAUSE acme").await.unwrap();
    let held = tokio::spawn(async move {
        acme.simple_query("SELECT 'resumed'").await.unwrap();
        acme
    });
    for _ in 0..5 {
        globex.simple_query("SELECT 1").await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "a paused tenant's transaction ran");
    let paused = rows(&console.simple_query("SHOW TENANTS").await.unwrap());
    assert_eq!(paused[0][12], "yes");
    assert_eq!(paused[0][6], "1", "cl_waiting: {paused:?}");
    console.simple_query("RESUME acme").await.unwrap();
    let acme = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("RESUME released the transaction")
        .unwrap();

    // Errors: unknown command, unknown tenant.
    let e = console.simple_query("SHOW NONSENSE").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42601"));
    let e = console.simple_query("PAUSE nope").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("3D000"));
    let e = console.simple_query("FROB").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42601"));

    // KILL acme ends its clients.
    console.simple_query("KILL acme").await.unwrap();
    let mut gone = false;
    for _ in 0..50 {
        if acme.simple_query("SELECT 1").await.is_err() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "KILL did not end the acme client");
    assert_eq!(
        rows(&globex.simple_query("SELECT 5").await.unwrap())[0][0],
        "5"
    );

    // The pgbouncer alias, and psql.
    let alias = admin(&proxy, "pgbouncer").await;
    assert_eq!(
        rows(&alias.simple_query("SHOW POOLS").await.unwrap()).len(),
        2
    );
    let port = proxy.addr.port();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("psql")
            .arg(format!(
                "host=127.0.0.1 port={port} user=admin password={ADMIN_PASSWORD} dbname=pgbouncer"
            ))
            .args(["-X", "-A", "-t", "-c", "SHOW POOLS"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("globex|"));

    // A non-admin user is refused.
    let e = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={port} user={APP_USER} password={APP_PASSWORD} dbname=tenantpool"
        ),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .unwrap();
    assert_eq!(sqlstate(&e).as_deref(), Some("28000"));
    proxy.stop();
}

/// Build, process and pool-sizing series exist, and a counter and its histogram's _count
/// agree at every scrape (no scrape shows transactions_total behind the histogram).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_consistent_and_describe_the_process() {
    let db = TestDb::create("metrics_ops", &["acme", "globex"]).await;
    let mport = free_port();
    let proxy = Proxy::start(db.config(3, &admin_extra(mport)));
    let series = format!(
        "tenantpool_server_max_connections{{server=\"default\",database=\"{}\"}}",
        db.name
    );
    let text = wait_for(mport, &series, 3.0).await;
    for name in OPS_METRICS {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    assert!(
        text.contains(&format!(
            "tenantpool_build_info{{version=\"{}\",pool_mode=\"transaction\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );
    assert!(value(&text, "process_resident_memory_bytes").unwrap() > 1e6);
    assert!(value(&text, "process_open_fds").unwrap() > 3.0);
    assert!(value(&text, "process_start_time_seconds").unwrap() > 1.6e9);

    // Under steady traffic every scrape shows the counter and the histogram together: they
    // may differ only by the transactions that completed while the scrape was rendered
    // (a few ms), never by the half-second copy lag there was.
    let app = proxy.connect("acme").await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let load = tokio::spawn(async move {
        while !s.load(std::sync::atomic::Ordering::Relaxed) {
            app.simple_query("SELECT 1").await.unwrap();
        }
        app
    });
    let mut seen = 0.0;
    for _ in 0..20 {
        let text = scrape(mport).await;
        let c = value(&text, "tenantpool_transactions_total{tenant=\"acme\"}").unwrap();
        let h = value(
            &text,
            "tenantpool_transaction_duration_seconds_count{tenant=\"acme\"}",
        )
        .unwrap();
        assert!((c - h).abs() <= 20.0, "transactions_total {c}, _count {h}");
        seen = c;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen > 0.0);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _app = load.await.unwrap();
    let text = scrape(mport).await;
    assert_eq!(
        value(&text, "tenantpool_transactions_total{tenant=\"acme\"}"),
        value(
            &text,
            "tenantpool_transaction_duration_seconds_count{tenant=\"acme\"}"
        )
    );
    assert_eq!(
        value(&text, "tenantpool_queries_total{tenant=\"acme\"}"),
        value(
            &text,
            "tenantpool_query_duration_seconds_count{tenant=\"acme\"}"
        )
    );

    // The paused-tenants gauges follow PAUSE and RESUME (within the 500 ms refresh).
    let console = admin(&proxy, "tenantpool").await;
    console.simple_query("PAUSE globex").await.unwrap();
    let text = wait_for(mport, "tenantpool_paused_tenants", 1.0).await;
    assert_eq!(
        value(&text, "tenantpool_tenant_paused{tenant=\"globex\"}"),
        Some(1.0)
    );
    console.simple_query("RESUME globex").await.unwrap();
    wait_for(mport, "tenantpool_paused_tenants", 0.0).await;
}

/// Malformed input on the admin console ends that session only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_console_survives_bad_input() {
    let db = TestDb::create("admin_bad", &["acme"]).await;
    let proxy = Proxy::start(db.config(
        1,
        &format!(
            "[proxy]\nauth_method = \"trust\"\n{}",
            admin_extra(free_port())
        ),
    ));
    let mut r = Raw::connect(proxy.addr).await;
    r.send(&startup_packet(&[
        ("user", "admin"),
        ("database", "tenantpool"),
    ]))
    .await;
    r.until_ready().await;
    // A Query message without a body, then an empty query.
    r.send(&[b'Q', 0, 0, 0, 4]).await;
    r.until_ready().await;
    r.send(&query("")).await;
    r.until_ready().await;
    r.send(&query("SHOW VERSION")).await;
    assert!(first_column(&r.until_ready().await)[0].starts_with("tenantpool"));
    r.send(&[b'Q', 0x7f, 0xff, 0xff, 0xff]).await;
    let msgs = r.until_eof().await;
    assert_eq!(msgs[0].field(b'C').as_deref(), Some("08P01"));
    let console = admin(&proxy, "tenantpool").await;
    // acme's row (a row "*" for idle connections no tenant has used yet comes and goes
    // with the pool's upkeep).
    let pools = rows(&console.simple_query("SHOW POOLS").await.unwrap());
    let tenants: Vec<&str> = pools
        .iter()
        .map(|r| r[0].as_str())
        .filter(|d| *d != "*")
        .collect();
    assert_eq!(tenants, ["acme"]);
    proxy.stop();
}
