//! Tenants in several places (servers and databases), against real PostgreSQL: two tenants
//! in two databases on one server and a third on a second cluster, under load, each place's
//! cap sampled from its own `pg_stat_activity`; a tenant moved, and a new place added, by a
//! reload.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;

const ADMIN: &str = "[users.admin]\npassword = \"admin-secret\"\ntenants = []\n";

/// A database `db` owned by `role` on `pg` (see [`tenant_database`]) whose leads are named
/// `<t>-<tag>-1` and `<t>-<tag>-2`.
async fn database(pg: &Pg, db: &str, role: &str, tenants: &[&str], tag: &str) {
    tenant_database(pg, db, role, tenants, |t| format!("{t}-{tag}")).await;
}

/// `[servers.second]`: database `db` on the second cluster, as `role`.
fn second_server(db: &str, role: &str, max_connections: u32) -> String {
    format!(
        "[servers.second]\nhost = \"127.0.0.1\"\nport = {port}\ndatabase = \"{db}\"\n\
         user = \"{role}\"\npassword = \"{SERVER_PASSWORD}\"\nmax_connections = {max_connections}\n\
         min_idle = 0\n",
        port = second_pg().port,
    )
}

/// A proxy started from `text`, which is written to the file a RELOAD reads; and that file.
fn start_from_file(text: &str) -> (Proxy, std::path::PathBuf) {
    let path = tempdir("tenantpool-placement").join("tenantpool.toml");
    std::fs::write(&path, text).unwrap();
    let proxy = Proxy::start(tenantpool::config::Config::parse(text).unwrap());
    proxy.shared.live.set_path(&path);
    (proxy, path)
}

async fn console(port: u16) -> tokio_postgres::Client {
    connect_str(&format!(
        "host=127.0.0.1 port={port} user=admin password=admin-secret dbname=tenantpool"
    ))
    .await
}

/// Backends of `role` per database on a cluster, the harness's own connections left out.
async fn backends(su: &tokio_postgres::Client, role: &str) -> BTreeMap<String, i64> {
    let rows = su
        .query(
            "SELECT datname, count(*) FROM pg_stat_activity \
             WHERE usename = $1 AND application_name <> $2 GROUP BY datname",
            &[&role, &OWNER_APP],
        )
        .await
        .unwrap();
    rows.iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
        .collect()
}

/// The first lead's name, as tenant `tenant` sees it through the proxy.
async fn first_lead(c: &tokio_postgres::Client) -> String {
    c.query_one("SELECT name FROM leads ORDER BY id LIMIT 1", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_in_two_databases_and_on_a_second_server() {
    // Place default/db1: acme. Place default/db2: initech, and later umbrella. Place
    // second/db3: umbrella, until the reload moves it. Place second/db4: hooli, added by
    // the reload.
    let db = TestDb::create("placement", &["acme"]).await;
    let second = second_pg();
    let db2 = format!("{}_b", db.name);
    let db3 = format!("{}_c", db.name);
    let db4 = format!("{}_d", db.name);
    let role2 = format!("{}_second", db.role);
    database(pg(), &db2, &db.role, &["initech", "umbrella"], "main").await;
    database(second, &db3, &role2, &["umbrella"], "second").await;
    database(second, &db4, &role2, &["hooli"], "second").await;

    let metrics_port = free_port();
    let servers = format!(
        "[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\
         [tenant_defaults]\nmax_server_connections = 2\n{}\
         [tenants.initech]\nschema = \"tenant_initech\"\ndatabase = \"{db2}\"\n{ADMIN}",
        second_server(&db3, &role2, 1),
    );
    let before =
        format!("{servers}[tenants.umbrella]\nschema = \"tenant_umbrella\"\nserver = \"second\"\n");
    // [server] allows 2 connections per database: db1 and db2 get up to 2 each.
    let (proxy, path) = start_from_file(&db.config_text(2, &before));
    let port = proxy.addr.port();

    // Under load: 4 clients per tenant, each transaction checking it sees its own rows.
    let stop = Arc::new(AtomicBool::new(false));
    let mut loaders = Vec::new();
    for (tenant, want) in [
        ("acme", "acme-1"),
        ("initech", "initech-main-1"),
        ("umbrella", "umbrella-second-1"),
    ] {
        for _ in 0..4 {
            let c = proxy.connect(tenant).await;
            let stop = stop.clone();
            loaders.push(tokio::spawn(async move {
                let mut n = 0u32;
                while !stop.load(Ordering::Relaxed) || n < 20 {
                    let row = c
                        .query_one(
                            "SELECT name, pg_sleep(0.002)::text FROM leads ORDER BY id LIMIT 1",
                            &[],
                        )
                        .await
                        .unwrap();
                    assert_eq!(row.get::<_, String>(0), want, "{tenant}");
                    n += 1;
                }
                n
            }));
        }
    }
    let main_su = pg().superuser("postgres").await;
    let second_su = second.superuser("postgres").await;
    let mut peak: BTreeMap<String, i64> = BTreeMap::new();
    for _ in 0..150 {
        for (su, role) in [(&main_su, &db.role), (&second_su, &role2)] {
            for (d, n) in backends(su, role).await {
                let p = peak.entry(d).or_default();
                *p = (*p).max(n);
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for l in loaders {
        assert!(l.await.unwrap() >= 20);
    }
    let at = |d: &str| peak.get(d).copied().unwrap_or(0);
    assert!(
        (1..=2).contains(&at(&db.name)) && (1..=2).contains(&at(&db2)) && at(&db3) == 1,
        "each place within its own max_connections (2, 2, 1): {peak:?}"
    );
    assert_eq!(at(&db4), 0, "{peak:?}");

    // Metrics and the console name each place.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let m = scrape(metrics_port).await;
    let line = |name: &str, labels: &[(&str, &str)]| {
        m.lines()
            .find(|l| {
                l.starts_with(name)
                    && labels
                        .iter()
                        .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    assert_eq!(
        line(
            "tenantpool_server_max_connections",
            &[("server", "second"), ("database", &db3)]
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        line(
            "tenantpool_server_max_connections",
            &[("server", "default"), ("database", &db2)]
        ),
        Some(2.0)
    );
    assert_eq!(
        line(
            "tenantpool_tenant_placement",
            &[
                ("tenant", "umbrella"),
                ("server", "second"),
                ("database", &db3)
            ]
        ),
        Some(1.0)
    );
    assert!(
        line(
            "tenantpool_server_connects_total",
            &[("server", "second"), ("database", &db3), ("result", "ok")]
        )
        .unwrap()
            >= 1.0
    );
    let console = console(port).await;
    let tenants = rows(&console.simple_query("SHOW TENANTS").await.unwrap());
    let place = |t: &str| {
        let r = tenants.iter().find(|r| r[0] == t).unwrap();
        (r[r.len() - 2].clone(), r[r.len() - 1].clone())
    };
    assert_eq!(place("acme"), ("default".into(), db.name.clone()));
    assert_eq!(place("initech"), ("default".into(), db2.clone()));
    assert_eq!(place("umbrella"), ("second".into(), db3.clone()));
    let databases = rows(&console.simple_query("SHOW DATABASES").await.unwrap());
    let umbrella = databases.iter().find(|r| r[0] == "umbrella").unwrap();
    assert_eq!(
        (umbrella[2].as_str(), umbrella[3].as_str()),
        (second.port.to_string().as_str(), db3.as_str())
    );

    // A reload moves umbrella to default/db2 and adds hooli on a new place, second/db4.
    // A transaction open across it finishes where it started; the next one runs in the new
    // place.
    let open = proxy.connect("umbrella").await;
    open.batch_execute("BEGIN").await.unwrap();
    assert_eq!(first_lead(&open).await, "umbrella-second-1");
    let after = format!(
        "{servers}[tenants.umbrella]\nschema = \"tenant_umbrella\"\ndatabase = \"{db2}\"\n\
         [tenants.hooli]\nschema = \"tenant_hooli\"\nserver = \"second\"\ndatabase = \"{db4}\"\n"
    );
    std::fs::write(&path, db.config_text(2, &after)).unwrap();
    console.batch_execute("RELOAD").await.unwrap();
    let idle = proxy.connect("umbrella").await;
    assert_eq!(first_lead(&idle).await, "umbrella-main-1");
    assert_eq!(
        first_lead(&open).await,
        "umbrella-second-1",
        "a running transaction stays where it started"
    );
    open.batch_execute("COMMIT").await.unwrap();
    assert_eq!(first_lead(&open).await, "umbrella-main-1");
    let hooli = proxy.connect("hooli").await;
    assert_eq!(first_lead(&hooli).await, "hooli-second-1");
    let seen = backends(&second_su, &role2).await;
    assert!(
        seen.get(&db4).copied().unwrap_or(0) >= 1,
        "hooli's place connects to db4: {seen:?}"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    let m = scrape(metrics_port).await;
    let placed = |server: &str, database: &str| {
        m.lines()
            .find(|l| {
                l.starts_with("tenantpool_tenant_placement{")
                    && l.contains("tenant=\"umbrella\"")
                    && l.contains(&format!("server=\"{server}\""))
                    && l.contains(&format!("database=\"{database}\""))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    assert_eq!(placed("default", &db2), Some(1.0), "{m}");
    assert_eq!(placed("second", &db3), Some(0.0));
    proxy.stop();
}

/// A tenant naming a server that is not configured is refused at load time, with the key
/// named; a LISTEN of a tenant on another server is refused (0A000) rather than never
/// hearing anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_server_and_listen_elsewhere() {
    let db = TestDb::create("placement_bad", &["acme"]).await;
    let text = db.config_text(2, "[tenants.acme]\nserver = \"nowhere\"\n");
    let err = tenantpool::config::Config::parse(&text)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tenants.acme.server: \"nowhere\" is not a configured server"),
        "{err}"
    );
    let db2 = format!("{}_b", db.name);
    database(pg(), &db2, &db.role, &["initech"], "main").await;
    let proxy = Proxy::start(db.config(
        2,
        &format!("[tenants.initech]\nschema = \"tenant_initech\"\ndatabase = \"{db2}\"\n"),
    ));
    let c = proxy.connect("initech").await;
    assert_eq!(first_lead(&c).await, "initech-main-1");
    // (tokio-postgres sends the Close of the statement it prepared with the LISTEN.)
    let e = c.batch_execute("LISTEN jobs").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("0A000"), "{e}");
    // The session goes on.
    assert_eq!(first_lead(&c).await, "initech-main-1");
    let a = proxy.connect("acme").await;
    a.batch_execute("LISTEN jobs").await.unwrap();
    proxy.stop();
    // `tenantpool check` logs in to every server as its own user.
    let checked = |password: &str| {
        db.config(
            2,
            &format!(
                "[servers.other]\nhost = \"{}\"\nport = {}\ndatabase = \"{db2}\"\n\
                 user = \"{}\"\npassword = \"{password}\"\n",
                pg().host,
                pg().port,
                db.role
            ),
        )
    };
    let good = tenantpool::audit::server_roles(&checked(SERVER_PASSWORD)).await;
    assert!(
        !good.iter().any(|w| w.contains("could not check")),
        "{good:?}"
    );
    let bad = tenantpool::audit::server_roles(&checked("wrong")).await;
    assert!(
        bad.iter()
            .any(|w| w.contains("could not check server role") && w.contains("on servers.other")),
        "{bad:?}"
    );
}

/// A transaction queued when its tenant moves runs in the new place, and a PAUSE holds in a
/// place made by the reload that moves the tenant there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_transactions_follow_a_move_and_pause_holds_there() {
    let db = TestDb::create("placement_move", &["acme"]).await;
    let second = second_pg();
    let db2 = format!("{}_b", db.name);
    let db3 = format!("{}_c", db.name);
    let role2 = format!("{}_second", db.role);
    database(pg(), &db2, &db.role, &["umbrella"], "main").await;
    database(second, &db3, &role2, &["umbrella"], "second").await;
    let servers = format!("{}{ADMIN}", second_server(&db3, &role2, 2));
    let on_second =
        format!("{servers}[tenants.umbrella]\nschema = \"tenant_umbrella\"\nserver = \"second\"\n");
    let (proxy, path) = start_from_file(&db.config_text(2, &on_second));
    let console = console(proxy.addr.port()).await;
    let a = proxy.connect("umbrella").await;
    let b = proxy.connect("umbrella").await;
    assert_eq!(first_lead(&a).await, "umbrella-second-1");

    console.batch_execute("PAUSE umbrella").await.unwrap();
    // One simple query: one transaction, queued in the old place.
    let queued = tokio::spawn(async move {
        rows(
            &a.simple_query("SELECT name FROM leads ORDER BY id LIMIT 1")
                .await
                .unwrap(),
        )[0][0]
            .clone()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!queued.is_finished(), "paused");
    // The move makes a new place (default/db2): the PAUSE holds there too.
    let on_main = format!(
        "{servers}[tenants.umbrella]\nschema = \"tenant_umbrella\"\ndatabase = \"{db2}\"\n"
    );
    std::fs::write(&path, db.config_text(2, &on_main)).unwrap();
    console.batch_execute("RELOAD").await.unwrap();
    let fresh = tokio::spawn(async move { first_lead(&b).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!fresh.is_finished(), "still paused in the new place");
    assert!(!queued.is_finished());
    console.batch_execute("RESUME umbrella").await.unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), fresh)
            .await
            .unwrap()
            .unwrap(),
        "umbrella-main-1"
    );
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), queued)
            .await
            .unwrap()
            .unwrap(),
        "umbrella-main-1",
        "the transaction queued before the move runs in the new place"
    );
    proxy.stop();
}
