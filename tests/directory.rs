//! The tenant directory against a real PostgreSQL: a `core.tenants` table with a NOTIFY
//! trigger; tenants inserted log in, deactivated ones are refused, a plan change changes
//! caps; with the database stopped the last good set stays, and comes back refreshed.
//!
//! A test binary of its own: one test stops and starts the harness's cluster, so the tests
//! here take turns.

mod common;

use std::time::{Duration, Instant};

use common::*;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const ADMIN: &str = "[users.admin]\npassword = \"admin-secret\"\ntenants = []\n";

/// The directory table, its NOTIFY trigger, and schemas for `tenants`.
async fn directory_db(test: &str, schemas: &[&str]) -> TestDb {
    let db = TestDb::create(test, &["toml"]).await;
    let owner = db.owner().await;
    for t in schemas {
        owner
            .batch_execute(&format!(
                "CREATE SCHEMA tenant_{t};
                 CREATE TABLE tenant_{t}.leads (id serial PRIMARY KEY, name text NOT NULL);
                 INSERT INTO tenant_{t}.leads (name) VALUES ('{t}-1');"
            ))
            .await
            .unwrap();
    }
    owner
        .batch_execute(
            "CREATE SCHEMA core;
             CREATE TABLE core.tenants (slug text PRIMARY KEY, domain text, plan_type text,
                 settings jsonb, active boolean NOT NULL DEFAULT true);
             CREATE FUNCTION core.tenants_changed() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN PERFORM pg_notify('tenantpool_tenants', ''); RETURN NULL; END $$;
             CREATE TRIGGER tenants_changed AFTER INSERT OR UPDATE OR DELETE ON core.tenants
               FOR EACH STATEMENT EXECUTE FUNCTION core.tenants_changed();",
        )
        .await
        .unwrap();
    db
}

fn directory_toml(refresh: &str) -> String {
    format!(
        "[directory]\n\
         query = \"SELECT slug AS tenant, 'tenant_' || slug AS schema, plan_type AS plan, domain, settings FROM core.tenants WHERE active ORDER BY slug\"\n\
         refresh = \"{refresh}\"\n\
         listen_channel = \"tenantpool_tenants\"\n\
         [plans.free]\nmax_server_connections = 1\n\
         [plans.pro]\nmax_server_connections = 3\n{ADMIN}"
    )
}

async fn try_connect(port: u16, tenant: &str) -> Result<tokio_postgres::Client, String> {
    let s = format!(
        "host=127.0.0.1 port={port} user={APP_USER} password={APP_PASSWORD} dbname={tenant}"
    );
    match tokio_postgres::connect(&s, tokio_postgres::NoTls).await {
        Ok((client, conn)) => {
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(client)
        }
        Err(e) => Err(sqlstate(&e).unwrap_or_else(|| e.to_string())),
    }
}

/// Polls `f` until it is true, up to `limit`; returns how long it took.
async fn within<F, Fut>(limit: Duration, what: &str, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    loop {
        if f().await {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
/// SHOW TENANTS's max_server_connections of `tenant`, if listed.
async fn cap_of(console: &tokio_postgres::Client, tenant: &str) -> Option<String> {
    rows(&console.simple_query("SHOW TENANTS").await.unwrap())
        .into_iter()
        .find(|r| r[0] == tenant)
        .map(|r| r[2].clone())
}
/// INSERT + NOTIFY: the tenant logs in; UPDATE active = false: refused, and its connected
/// client ends; UPDATE plan_type: caps change; settings from the column; a name in both
/// the TOML and the table stays the TOML's. The refresh interval is long, so NOTIFY is
/// what brings each change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_follows_the_table() {
    let _turn = SERIAL.lock().await;
    let db = directory_db("dir_notify", &["acme", "globex"]).await;
    let owner = db.owner().await;
    owner
        .batch_execute(
            "INSERT INTO core.tenants (slug, plan_type, settings) VALUES
               ('acme', 'free', '{\"app.tenant_id\": \"it''s acme\"}'),
               ('toml', NULL, NULL)",
        )
        .await
        .unwrap();
    let proxy = Proxy::start(db.config(4, &directory_toml("1h")));
    let port = proxy.addr.port();
    let console = connect_str(&format!(
        "host=127.0.0.1 port={port} user=admin password=admin-secret dbname=tenantpool"
    ))
    .await;
    // Loaded before the proxy accepted anyone.
    let acme = try_connect(port, "acme").await.unwrap();
    let r = rows(
        &acme
            .simple_query("SELECT name, current_setting('app.tenant_id') FROM leads")
            .await
            .unwrap(),
    );
    assert_eq!(r[0], ["acme-1", "it's acme"]);
    assert_eq!(cap_of(&console, "acme").await.as_deref(), Some("1"));
    // The TOML one stays the TOML's.
    let tenants = rows(&console.simple_query("SHOW TENANTS").await.unwrap());
    let toml = tenants.iter().find(|r| r[0] == "toml").unwrap();
    assert_eq!(
        // The `source` column (then `server` and `database`).
        toml.get(15).map(String::as_str),
        Some("config"),
        "{tenants:?}"
    );

    // INSERT: globex logs in within a second (asserted within 5 s).
    assert_eq!(
        try_connect(port, "globex").await.err().as_deref(),
        Some("3D000")
    );
    owner
        .batch_execute("INSERT INTO core.tenants (slug, plan_type) VALUES ('globex', 'pro')")
        .await
        .unwrap();
    let took = within(Duration::from_secs(5), "globex appears", || async {
        try_connect(port, "globex").await.is_ok()
    })
    .await;
    eprintln!("INSERT -> login: {took:?}");
    assert_eq!(cap_of(&console, "globex").await.as_deref(), Some("3"));

    // UPDATE plan_type: acme's cap follows.
    owner
        .batch_execute("UPDATE core.tenants SET plan_type = 'pro' WHERE slug = 'acme'")
        .await
        .unwrap();
    let took = within(Duration::from_secs(5), "acme's cap", || async {
        cap_of(&console, "acme").await.as_deref() == Some("3")
    })
    .await;
    eprintln!("UPDATE plan_type -> cap: {took:?}");

    // UPDATE active = false: refused, and the connected client ends with 57P01.
    let (g, g_conn) = tokio_postgres::connect(&proxy.conn_str("globex"), tokio_postgres::NoTls)
        .await
        .unwrap();
    let g_ended = tokio::spawn(async move { g_conn.await.err().and_then(|e| sqlstate(&e)) });
    g.simple_query("SELECT 1").await.unwrap();
    owner
        .batch_execute("UPDATE core.tenants SET active = false WHERE slug = 'globex'")
        .await
        .unwrap();
    let took = within(Duration::from_secs(5), "globex refused", || async {
        try_connect(port, "globex").await.err().as_deref() == Some("3D000")
    })
    .await;
    eprintln!("UPDATE active = false -> refused: {took:?}");
    let ended = tokio::time::timeout(Duration::from_secs(5), g_ended).await;
    assert_eq!(ended.unwrap().unwrap().as_deref(), Some("57P01"));
    // acme never noticed.
    acme.simple_query("SELECT 1").await.unwrap();
    proxy.stop();
}

/// The directory's database stopped: the last good set stays (its tenants keep logging in
/// once it is back, before any refresh); a proxy started while it is down serves its TOML
/// tenants and picks the directory up when the database comes; failures are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_survives_the_database_going_away() {
    let _turn = SERIAL.lock().await;
    if !pg().controllable() {
        eprintln!("skipped: TENANTPOOL_TEST_PG names a server this test cannot restart");
        return;
    }
    let db = directory_db("dir_down", &["acme", "globex"]).await;
    let owner = db.owner().await;
    owner
        .batch_execute("INSERT INTO core.tenants (slug) VALUES ('acme')")
        .await
        .unwrap();
    drop(owner);
    let metrics_port = free_port();
    let extra = format!(
        "{}[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n",
        directory_toml("200ms")
    );
    let first = Proxy::start(db.config(4, &extra));
    try_connect(first.addr.port(), "acme").await.unwrap();

    tokio::task::spawn_blocking(|| pg().stop()).await.unwrap();
    // Refreshes fail; acme stays.
    let m_port = metrics_port;
    within(
        Duration::from_secs(10),
        "failed refreshes counted",
        || async move {
            value(
                &scrape(m_port).await,
                "tenantpool_directory_refreshes_total{result=\"error\"}",
            )
            .unwrap_or(0.0)
                >= 2.0
        },
    )
    .await;
    assert!(first.shared.tenants.lookup("acme").is_some());
    let m = scrape(metrics_port).await;
    assert_eq!(value(&m, "tenantpool_directory_tenants"), Some(1.0), "{m}");
    // A proxy started now: TOML tenants only (it starts, within connect_timeout).
    let second = Proxy::start(db.config(4, &directory_toml("200ms")));
    assert!(second.shared.tenants.lookup("toml").is_some());
    assert!(second.shared.tenants.lookup("acme").is_none());

    tokio::task::spawn_blocking(|| {
        pg().start();
        pg().wait_ready();
    })
    .await
    .unwrap();
    let owner = db.owner().await;
    owner
        .batch_execute("INSERT INTO core.tenants (slug) VALUES ('globex')")
        .await
        .unwrap();
    for (name, proxy) in [("first", &first), ("second", &second)] {
        let port = proxy.addr.port();
        let took = within(
            Duration::from_secs(20),
            "globex after the restart",
            || async move { try_connect(port, "globex").await.is_ok() },
        )
        .await;
        eprintln!("{name} proxy: globex {took:?} after the insert");
        try_connect(port, "acme").await.unwrap();
    }
    second.stop();
    first.stop();
}
