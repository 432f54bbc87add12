//! Each client's own session parameters hold on every server connection it gets.

mod common;

use std::time::Duration;

use common::*;
use tokio_postgres::SimpleQueryMessage;

fn one(msgs: &[SimpleQueryMessage]) -> String {
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("").to_string()),
            _ => None,
        })
        .unwrap_or_default()
}

async fn connect_with(proxy: &Proxy, tenant: &str, extra: &str) -> tokio_postgres::Client {
    connect_str(&format!("{} {extra}", proxy.conn_str(tenant))).await
}

/// Two clients with different TimeZone, DateStyle and statement_timeout share one server
/// connection in transaction mode; each always sees its own values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_keep_their_own_settings_on_a_shared_connection() {
    let db = TestDb::create("own_settings", &["acme"]).await;
    let proxy = Proxy::start(db.config(1, ""));
    let tokyo = connect_with(
        &proxy,
        "acme",
        "options='-c timezone=Asia/Tokyo -c datestyle=SQL,DMY -c statement_timeout=150ms'",
    )
    .await;
    let utc = connect_with(
        &proxy,
        "acme",
        "options='-c timezone=UTC -c datestyle=ISO,MDY'",
    )
    .await;
    let ts = "SELECT '2024-03-01 12:00:00+00'::timestamptz::text";
    for _ in 0..5 {
        assert_eq!(
            one(&tokyo.simple_query("SHOW timezone").await.unwrap()),
            "Asia/Tokyo"
        );
        assert_eq!(
            one(&utc.simple_query("SHOW timezone").await.unwrap()),
            "UTC"
        );
        assert_eq!(
            one(&tokyo.simple_query("SHOW datestyle").await.unwrap()),
            "SQL, DMY"
        );
        assert_eq!(
            one(&utc.simple_query("SHOW datestyle").await.unwrap()),
            "ISO, MDY"
        );
        assert_eq!(
            one(&tokyo.simple_query(ts).await.unwrap()),
            "01/03/2024 21:00:00 JST"
        );
        assert_eq!(
            one(&utc.simple_query(ts).await.unwrap()),
            "2024-03-01 12:00:00+00"
        );
        assert_eq!(
            one(&tokyo.simple_query("SHOW statement_timeout").await.unwrap()),
            "150ms"
        );
        assert_eq!(
            one(&utc.simple_query("SHOW statement_timeout").await.unwrap()),
            "0"
        );
    }
    // tokyo's statement_timeout cancels its own slow query, never utc's.
    let e = tokyo
        .simple_query("SELECT pg_sleep(0.4)")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"));
    utc.simple_query("SELECT pg_sleep(0.4)").await.unwrap();
    // A SET by a client follows it (reported by the server), and stays its own.
    tokyo
        .simple_query("SET timezone = 'Europe/Paris'")
        .await
        .unwrap();
    assert_eq!(
        one(&utc.simple_query("SHOW timezone").await.unwrap()),
        "UTC"
    );
    assert_eq!(
        one(&tokyo.simple_query("SHOW timezone").await.unwrap()),
        "Europe/Paris"
    );
    // RESET goes back to the client's startup value, not the server's default.
    tokyo.simple_query("RESET timezone").await.unwrap();
    assert_eq!(
        one(&utc.simple_query("SHOW timezone").await.unwrap()),
        "UTC"
    );
    assert_eq!(
        one(&tokyo.simple_query("SHOW timezone").await.unwrap()),
        "Asia/Tokyo"
    );
    proxy.stop();
}

/// node-postgres sends `statement_timeout`, asyncpg its `server_settings`, as plain startup
/// parameters; the client's ParameterStatus values at startup are its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_apply_and_are_reported() {
    let db = TestDb::create("startup_params", &["acme"]).await;
    let proxy = Proxy::start(db.config(1, "[proxy]\nauth_method = \"trust\""));
    let mut r = Raw::connect(proxy.addr).await;
    r.send(&startup_packet(&[
        ("user", APP_USER),
        ("database", "acme"),
        ("statement_timeout", "250ms"),
        ("TimeZone", "America/New_York"),
        ("application_name", "billing-worker"),
        ("DateStyle", "German"),
    ]))
    .await;
    let login = r.until_ready().await;
    let status = |name: &str| {
        login.iter().filter(|m| m.tag == b'S').find_map(|m| {
            let mut parts = m.body.split(|&b| b == 0);
            let n = String::from_utf8_lossy(parts.next()?).into_owned();
            let v = String::from_utf8_lossy(parts.next()?).into_owned();
            (n == name).then_some(v)
        })
    };
    assert_eq!(status("TimeZone").as_deref(), Some("America/New_York"));
    assert_eq!(
        status("application_name").as_deref(),
        Some("billing-worker")
    );
    assert_eq!(status("DateStyle").as_deref(), Some("German, DMY"));

    r.send(&query("SHOW statement_timeout")).await;
    assert_eq!(first_column(&r.until_ready().await), ["250ms"]);
    // pg_stat_activity shows the client's application_name while its transaction runs.
    r.send(&query(
        "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()",
    ))
    .await;
    assert_eq!(first_column(&r.until_ready().await), ["billing-worker"]);

    // Another client without settings on the same (only) server connection sees defaults.
    let mut plain = Raw::login(proxy.addr, "acme").await;
    plain.send(&query("SHOW statement_timeout")).await;
    assert_eq!(first_column(&plain.until_ready().await), ["0"]);
    plain.send(&query("SHOW application_name")).await;
    assert_eq!(first_column(&plain.until_ready().await), [""]);
    r.send(&query("SHOW TimeZone")).await;
    assert_eq!(first_column(&r.until_ready().await), ["America/New_York"]);

    // A value PostgreSQL refuses is refused at login, as PostgreSQL would.
    let mut bad = Raw::connect(proxy.addr).await;
    bad.send(&startup_packet(&[
        ("user", APP_USER),
        ("database", "acme"),
        ("statement_timeout", "soon"),
    ]))
    .await;
    let msgs = bad.until_eof().await;
    let e = msgs.iter().find(|m| m.tag == b'E').expect("refused");
    assert_eq!(e.field(b'C').as_deref(), Some("22023"), "{msgs:?}");
    // An unknown parameter likewise.
    let mut bad = Raw::connect(proxy.addr).await;
    bad.send(&startup_packet(&[
        ("user", APP_USER),
        ("database", "acme"),
        ("no_such_guc", "1"),
    ]))
    .await;
    let msgs = bad.until_eof().await;
    assert_eq!(
        msgs.iter()
            .find(|m| m.tag == b'E')
            .and_then(|m| m.field(b'C'))
            .as_deref(),
        Some("42704")
    );
    proxy.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_reset_returns_to_the_startup_value() {
    let db = TestDb::create("session_reset", &["acme"]).await;
    let proxy = Proxy::start(db.config(2, "[proxy]\npool_mode = \"session\""));
    let c = connect_with(&proxy, "acme", "options='-c datestyle=SQL,DMY'").await;
    assert_eq!(
        one(&c.simple_query("SHOW datestyle").await.unwrap()),
        "SQL, DMY"
    );
    c.simple_query("SET datestyle = 'Postgres, MDY'")
        .await
        .unwrap();
    assert_eq!(
        one(&c.simple_query("SHOW datestyle").await.unwrap()),
        "Postgres, MDY"
    );
    c.simple_query("RESET datestyle").await.unwrap();
    assert_eq!(
        one(&c.simple_query("SHOW datestyle").await.unwrap()),
        "SQL, DMY"
    );
    c.simple_query("SET datestyle = 'Postgres, MDY'")
        .await
        .unwrap();
    c.simple_query("RESET ALL").await.unwrap();
    assert_eq!(
        one(&c.simple_query("SHOW datestyle").await.unwrap()),
        "SQL, DMY"
    );
    // The connection the client leaves is reset before another client gets it.
    drop(c);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let other = proxy.connect("acme").await;
    assert_eq!(
        one(&other.simple_query("SHOW datestyle").await.unwrap()),
        "ISO, MDY"
    );
    proxy.stop();
}

/// A login needs no server connection for settings that were seen before, even after every
/// client that had them has left: with the pool's only connection held by an open
/// transaction and `query_wait_timeout` short, a client with those settings still logs in
/// (the check at login would have had to wait for that connection and failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seen_settings_log_in_while_the_pool_is_busy() {
    let db = TestDb::create("seen_settings", &["acme"]).await;
    let proxy = Proxy::start(db.config(1, "[limits]\nquery_wait_timeout = \"1s\""));
    let extra = "options='-c timezone=Asia/Tokyo -c datestyle=SQL,DMY' application_name=seen";
    // The first client with these settings: they are checked on the server. It leaves.
    let first = connect_with(&proxy, "acme", extra).await;
    assert_eq!(
        one(&first.simple_query("SHOW timezone").await.unwrap()),
        "Asia/Tokyo"
    );
    drop(first);
    // The pool's only connection is held by an open transaction.
    let busy = connect_with(&proxy, "acme", "").await;
    busy.simple_query("BEGIN").await.unwrap();
    busy.simple_query("SELECT 1").await.unwrap();
    let mut clients = Vec::new();
    for _ in 0..2 {
        let (client, conn) = tokio_postgres::connect(
            &format!("{} {extra}", proxy.conn_str("acme")),
            tokio_postgres::NoTls,
        )
        .await
        .expect("a login with settings seen before needs no server connection");
        tokio::spawn(conn);
        clients.push(client);
    }
    // Settings never seen still wait for (and here, do not get) a connection.
    let e = tokio_postgres::connect(
        &format!("{} options='-c timezone=UTC'", proxy.conn_str("acme")),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .expect("new settings are checked on a server connection");
    assert_eq!(sqlstate(&e).as_deref(), Some("53300"), "{e}");
    busy.simple_query("COMMIT").await.unwrap();
    for c in &clients {
        assert_eq!(
            one(&c.simple_query("SHOW datestyle").await.unwrap()),
            "SQL, DMY"
        );
    }
}
