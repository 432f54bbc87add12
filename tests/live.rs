//! Live config, against a real PostgreSQL: reloads under load (tenants added and removed,
//! a cap lowered, a password changed, a broken file), SIGHUP to the real binary, and the
//! tenant settings as a row-level security context.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use tokio_postgres::SimpleQueryMessage;

const ADMIN: &str = "[users.admin]\npassword = \"admin-secret\"\ntenants = []\n";

async fn console(port: u16) -> tokio_postgres::Client {
    connect_str(&format!(
        "host=127.0.0.1 port={port} user=admin password=admin-secret dbname=tenantpool"
    ))
    .await
}
/// SHOW CONFIG (key, value, default, changeable) as key -> (value, changeable).
async fn show_config(console: &tokio_postgres::Client) -> HashMap<String, (String, String)> {
    rows(&console.simple_query("SHOW CONFIG").await.unwrap())
        .into_iter()
        .map(|r| (r[0].clone(), (r[1].clone(), r[3].clone())))
        .collect()
}
/// Removes `[tenants.NAME]` and its keys from config text.
fn without_tenant(text: &str, name: &str) -> String {
    let header = format!("[tenants.{name}]");
    let mut out = String::new();
    let mut skipping = false;
    for line in text.lines() {
        if line.trim().starts_with('[') {
            skipping = line.trim() == header;
        }
        if !skipping {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// A client of `tenant` looping short transactions until `stop`; returns how many ran and
/// the first error's SQLSTATE (it stops there). Every answer must be its own tenant's.
fn loader(
    port: u16,
    tenant: &'static str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u64, Option<String>)> {
    tokio::spawn(async move {
        let c = connect_str(&format!(
            "host=127.0.0.1 port={port} user={APP_USER} password={APP_PASSWORD} dbname={tenant}"
        ))
        .await;
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            let r = c
                .simple_query(&format!(
                    "SELECT name, pg_sleep(0.01), 'load-{tenant}' FROM leads ORDER BY id LIMIT 1"
                ))
                .await;
            match r {
                Ok(msgs) => {
                    let got = rows(&msgs);
                    assert_eq!(got[0][0], format!("{tenant}-1"), "another tenant's rows");
                    n += 1;
                }
                Err(e) => {
                    return (n, Some(sqlstate(&e).unwrap_or_else(|| e.to_string())));
                }
            }
        }
        (n, None)
    })
}

/// How many backends run a statement of `tenant`'s loaders now.
async fn active_of(su: &tokio_postgres::Client, tenant: &str) -> i64 {
    su.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE $1 AND query NOT LIKE '%pg_stat_activity%'",
        &[&format!("%'load-{tenant}'%")],
    )
    .await
    .unwrap()
    .get(0)
}

/// The most backends `tenant`'s loaders use at once over `window`.
async fn peak_of(su: &tokio_postgres::Client, tenant: &str, window: Duration) -> i64 {
    let end = Instant::now() + window;
    let mut peak = 0;
    while Instant::now() < end {
        peak = peak.max(active_of(su, tenant).await);
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    peak
}

async fn try_connect(
    port: u16,
    tenant: &str,
    password: &str,
) -> Result<tokio_postgres::Client, String> {
    let s =
        format!("host=127.0.0.1 port={port} user={APP_USER} password={password} dbname={tenant}");
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

/// Under load in every tenant, RELOAD adds a tenant, lowers a cap (PostgreSQL sees it
/// hold), changes a password and a limit, removes a tenant, and refuses a broken file:
/// no client of the remaining tenants sees an error; the removed tenant's clients get
/// 57P01 and its new logins 3D000; SHOW CONFIG and the metrics follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load() {
    let db = TestDb::create("reload", &["a", "b", "c", "d"]).await;
    let metrics_port = free_port();
    let extra = format!(
        "[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n[tenant_defaults]\nmax_server_connections = 3\n{ADMIN}"
    );
    let base = db.config_text(8, &extra);
    let first = without_tenant(&base, "d");
    let dir = tempdir("tenantpool-reload");
    let path = dir.join("tenantpool.toml");
    std::fs::write(&path, &first).unwrap();
    let proxy = Proxy::start(tenantpool::config::Config::parse(&first).unwrap());
    proxy.shared.live.set_path(&path);
    let port = proxy.addr.port();
    let admin = console(port).await;
    let su = pg().superuser(&db.name).await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut loaders: Vec<(&'static str, _)> = Vec::new();
    for t in ["a", "b", "c"] {
        for _ in 0..4 {
            loaders.push((t, loader(port, t, stop.clone())));
        }
    }
    // Before: a uses up to its cap of 3.
    // (SCRAM logins take a while in a debug build.)
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for (t, l) in &loaders {
        assert!(!l.is_finished(), "{t}'s loader ended early");
    }
    let mut before = 0;
    for _ in 0..5 {
        before = before.max(peak_of(&su, "a", Duration::from_millis(1000)).await);
        if before >= 2 {
            break;
        }
    }
    if before < 2 {
        let all = su
            .simple_query("SELECT state, query FROM pg_stat_activity")
            .await
            .unwrap();
        panic!(
            "a's loaders should use more than one backend: {before}; {:?}",
            rows(&all)
        );
    }
    assert_eq!(
        try_connect(port, "d", APP_PASSWORD).await.err().as_deref(),
        Some("3D000")
    );

    // 1. Add d, lower a's cap to 1, change the user's password and a limit.
    let second =
        base.replace(
            &format!("password = \"{APP_PASSWORD}\""),
            "password = \"new-secret\"",
        )
        .replace(
            "[tenants.a]\nschema = \"tenant_a\"\n",
            "[tenants.a]\nschema = \"tenant_a\"\nmax_server_connections = 1\n",
        ) + "\n[limits]\nquery_wait_timeout = \"77s\"\n";
    std::fs::write(&path, &second).unwrap();
    let t0 = Instant::now();
    admin.simple_query("RELOAD").await.unwrap();
    eprintln!("RELOAD answered in {:?}", t0.elapsed());
    // In force once answered: d logs in, the new password works, the old one not.
    let d = try_connect(port, "d", "new-secret").await.unwrap();
    assert_eq!(
        rows(
            &d.simple_query("SELECT name FROM leads ORDER BY id")
                .await
                .unwrap()
        )[0][0],
        "d-1"
    );
    assert_eq!(
        try_connect(port, "b", APP_PASSWORD).await.err().as_deref(),
        Some("28P01")
    );
    let cfg = show_config(&admin).await;
    assert_eq!(
        cfg["limits.query_wait_timeout"],
        ("77s".to_string(), "yes".to_string())
    );
    assert_eq!(cfg["listen"].1, "no");
    let tenants = rows(&admin.simple_query("SHOW TENANTS").await.unwrap());
    let a_row = tenants.iter().find(|r| r[0] == "a").unwrap();
    assert_eq!(a_row[2], "1", "a's cap in SHOW TENANTS: {tenants:?}");
    // Running transactions finish; from then on a never has more than 1.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = peak_of(&su, "a", Duration::from_millis(1500)).await;
    assert_eq!(after, 1, "a's lowered cap as PostgreSQL sees it");
    // An idle client of c, whose connection reports how it ended.
    let (c_client, c_conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user={APP_USER} password=new-secret dbname=c"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    let c_ended = tokio::spawn(async move { c_conn.await.err().and_then(|e| sqlstate(&e)) });
    c_client.simple_query("SELECT 1").await.unwrap();

    // 2. Remove c.
    std::fs::write(&path, without_tenant(&second, "c")).unwrap();
    admin.simple_query("RELOAD").await.unwrap();
    assert_eq!(
        try_connect(port, "c", "new-secret").await.err().as_deref(),
        Some("3D000")
    );
    let ended = tokio::time::timeout(Duration::from_secs(5), c_ended).await;
    assert_eq!(ended.unwrap().unwrap().as_deref(), Some("57P01"));
    assert!(c_client.simple_query("SELECT 1").await.is_err());

    // 3. A broken file changes nothing, and says every problem.
    std::fs::write(
        &path,
        format!(
            "{second}\n[tenants.e]\nschema = \"\"\n[tenants.f]\nschema = \"f\"\nplan = \"nope\"\n"
        ),
    )
    .unwrap();
    let e = admin.simple_query("RELOAD").await.unwrap_err();
    let msg = e.as_db_error().unwrap().message().to_string();
    assert!(
        msg.contains("tenants.e.schema") && msg.contains("tenants.f.plan"),
        "{msg}"
    );
    std::fs::write(&path, "[proxy]\nlisten = ").unwrap();
    assert!(admin.simple_query("RELOAD").await.is_err());
    assert_eq!(
        try_connect(port, "c", "new-secret").await.err().as_deref(),
        Some("3D000")
    );
    assert_eq!(
        show_config(&admin).await["limits.query_wait_timeout"].0,
        "77s"
    );
    d.simple_query("SELECT 1").await.unwrap();

    stop.store(true, Ordering::Relaxed);
    for (t, l) in loaders {
        let (n, err) = l.await.unwrap();
        if t == "c" {
            assert!(err.is_some(), "c's loader went on after c was removed");
        } else {
            assert_eq!(
                err, None,
                "{t}'s loader saw an error after {n} transactions"
            );
            assert!(n > 0);
        }
    }
    let m = scrape(metrics_port).await;
    assert_eq!(
        value(&m, "tenantpool_config_reloads_total{result=\"ok\"}"),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        value(&m, "tenantpool_config_reloads_total{result=\"error\"}"),
        Some(2.0)
    );
    assert!(value(&m, "tenantpool_config_last_reload_timestamp_seconds").unwrap() > 1.7e9);
    // The new tenant's series exist (counters at 0 at first).
    assert!(
        m.contains("tenantpool_transactions_total{tenant=\"d\"}"),
        "{m}"
    );
    proxy.stop();
}

/// The real binary reloads on SIGHUP: a tenant added to the file logs in, a broken file is
/// refused and the running config stays, and an open client goes on throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_real_binary() {
    let db = TestDb::create("sighup", &["a", "b"]).await;
    let port = free_port();
    let full = db.config_text(4, &format!("[proxy]\nlisten = \"127.0.0.1:{port}\"\n"));
    let dir = tempdir("tenantpool-sighup");
    let path = dir.join("tenantpool.toml");
    std::fs::write(&path, without_tenant(&full, "b")).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tenantpool"))
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "proxy did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let a = try_connect(port, "a", APP_PASSWORD).await.unwrap();
    assert_eq!(
        try_connect(port, "b", APP_PASSWORD).await.err().as_deref(),
        Some("3D000")
    );
    let hup = |pid: u32| {
        let st = std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    };
    std::fs::write(&path, &full).unwrap();
    hup(child.id());
    let t0 = Instant::now();
    loop {
        match try_connect(port, "b", APP_PASSWORD).await {
            Ok(b) => {
                b.simple_query("SELECT 1").await.unwrap();
                break;
            }
            Err(e) => {
                assert_eq!(e, "3D000");
                assert!(
                    t0.elapsed() < Duration::from_secs(5),
                    "SIGHUP did not add b"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    // A broken file: refused, b stays.
    std::fs::write(
        &path,
        format!("{full}\n[limits]\nquery_wait_timeout = \"soon\"\n"),
    )
    .unwrap();
    hup(child.id());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(child.try_wait().unwrap().is_none(), "the proxy exited");
    try_connect(port, "b", APP_PASSWORD).await.unwrap();
    a.simple_query("SELECT 1").await.unwrap();
    let _ = child.kill();
    let _ = child.wait();
}

const ACME_ID: &str = "11111111-1111-1111-1111-111111111111";
const GLOBEX_ID: &str = "22222222-2222-2222-2222-222222222222";

/// A shared table with a row-level security policy on `app.tenant_id`: clients of two
/// tenants interleaved on one server connection see only their own rows, also right after
/// one of them SETs `app.tenant_id` to the other's, uses `set_config`, or runs `RESET
/// ALL`; clients cannot name the settings at startup; values with quotes arrive as they
/// are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_settings_confine_row_level_security() {
    let db = TestDb::create("rls", &["acme", "globex"]).await;
    let owner = db.owner().await;
    owner
        .batch_execute(&format!(
            "CREATE TABLE public.shared_leads (tenant_id uuid NOT NULL, name text NOT NULL);
             INSERT INTO public.shared_leads VALUES
               ('{ACME_ID}', 'acme-lead'), ('{GLOBEX_ID}', 'globex-lead');
             CREATE POLICY by_tenant ON public.shared_leads
               USING (tenant_id = current_setting('app.tenant_id')::uuid);
             ALTER TABLE public.shared_leads ENABLE ROW LEVEL SECURITY;
             ALTER TABLE public.shared_leads FORCE ROW LEVEL SECURITY;"
        ))
        .await
        .unwrap();
    let extra = format!(
        "[tenant_defaults]\nsettings = {{ \"app.tenant\" = \"{{tenant}}\", \"app.note\" = \"o'brien \\\\ {{schema}}\" }}\n\
         [tenants.acme]\nsettings = {{ \"app.tenant_id\" = \"{ACME_ID}\" }}\n\
         [tenants.globex]\nsettings = {{ \"app.tenant_id\" = \"{GLOBEX_ID}\" }}\n"
    );
    // One server connection for both tenants: every turn is a switch or a reassertion.
    let proxy = Proxy::start(db.config(1, &extra));
    let acme = proxy.connect("acme").await;
    let acme2 = proxy.connect("acme").await;
    let globex = proxy.connect("globex").await;
    let names = |msgs: Vec<SimpleQueryMessage>| -> Vec<String> {
        rows(&msgs).into_iter().map(|r| r[0].clone()).collect()
    };
    let sel = "SELECT name FROM shared_leads ORDER BY name";
    for round in 0..3 {
        assert_eq!(
            names(acme.simple_query(sel).await.unwrap()),
            ["acme-lead"],
            "round {round}"
        );
        assert_eq!(
            names(globex.simple_query(sel).await.unwrap()),
            ["globex-lead"]
        );
        // The client sets another tenant's id: it holds within that transaction only.
        let hijack = format!("SET app.tenant_id = '{GLOBEX_ID}'; {sel}");
        assert_eq!(
            names(acme.simple_query(&hijack).await.unwrap()),
            ["globex-lead"]
        );
        // The same client next (a reassertion, no switch), then another acme client.
        assert_eq!(names(acme.simple_query(sel).await.unwrap()), ["acme-lead"]);
        acme.simple_query(&format!(
            "SELECT set_config('app.tenant_id', '{GLOBEX_ID}', false)"
        ))
        .await
        .unwrap();
        assert_eq!(names(acme2.simple_query(sel).await.unwrap()), ["acme-lead"]);
        acme.simple_query("RESET ALL").await.unwrap();
        assert_eq!(names(acme.simple_query(sel).await.unwrap()), ["acme-lead"]);
        acme.simple_query(&format!("SET app.tenant_id = '{GLOBEX_ID}'"))
            .await
            .unwrap();
        assert_eq!(
            names(globex.simple_query(sel).await.unwrap()),
            ["globex-lead"]
        );
        assert_eq!(names(acme.simple_query(sel).await.unwrap()), ["acme-lead"]);
    }
    let shown = rows(
        &acme
            .simple_query("SELECT current_setting('app.tenant'), current_setting('app.note')")
            .await
            .unwrap(),
    );
    assert_eq!(shown[0], ["acme", r"o'brien \ tenant_acme"]);
    // A client may not bring them: startup parameter or options.
    for extra in [
        format!("options='-c app.tenant_id={GLOBEX_ID}'"),
        "options='-c app.tenant=globex'".to_string(),
    ] {
        let s = format!("{} {extra}", proxy.conn_str("acme"));
        let e = tokio_postgres::connect(&s, tokio_postgres::NoTls)
            .await
            .err()
            .unwrap();
        assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{extra}: {e}");
    }
    proxy.stop();
}
