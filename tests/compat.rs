//! Behaving like PostgreSQL to every driver (issue 17): session mode is PostgreSQL (names
//! untouched, the server heard while the client is idle, PostgreSQL's own FATAL), shared
//! statements follow the schema, errors inside pipelines, `RESET x`, ParameterStatus at
//! login, and LISTEN/NOTIFY in transaction mode.

mod common;

use common::*;
use std::time::Duration;

const SESSION: &str = "[proxy]\npool_mode = \"session\"\nauth_method = \"trust\"\n";

/// The value of a ParameterStatus among `msgs`.
fn status(msgs: &[Msg], name: &str) -> Option<String> {
    msgs.iter().filter(|m| m.tag == b'S').find_map(|m| {
        let mut parts = m.body.split(|&b| b == 0);
        let n = String::from_utf8_lossy(parts.next()?).into_owned();
        let v = String::from_utf8_lossy(parts.next()?).into_owned();
        (n == name).then_some(v)
    })
}

/// Reads one message within `limit`; `None` when nothing came.
async fn recv_within(r: &mut Raw, limit: Duration) -> Option<Msg> {
    tokio::time::timeout(limit, r.recv()).await.ok().flatten()
}

/// Session mode: statement names reach the server as the client gave them, so SQL
/// `EXECUTE` of a protocol-prepared name works, `pg_prepared_statements` shows the client's
/// own names only, and `DEALLOCATE ALL` reaches the server (SQL-level statements go too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_statement_names_pass_through() {
    let db = TestDb::create("compat_sess_names", &["acme"]).await;
    let proxy = Proxy::start(db.config(2, SESSION));
    // Another client's statements are on another backend: never seen.
    let mut other = Raw::login(proxy.addr, "acme").await;
    let mut m = parse("theirs", "SELECT 2");
    m.extend(sync());
    other.send(&m).await;
    assert_eq!(tags(&other.until_ready().await), "1Z");

    let mut r = Raw::login(proxy.addr, "acme").await;
    let mut m = parse("mine", "SELECT 41 + 1");
    m.extend(sync());
    r.send(&m).await;
    assert_eq!(tags(&r.until_ready().await), "1Z");
    r.send(&query("EXECUTE mine")).await;
    let msgs = r.until_ready().await;
    assert_eq!(error_code(&msgs), None, "{msgs:?}");
    assert_eq!(first_column(&msgs), ["42"]);
    r.send(&query("PREPARE sqlside AS SELECT 7")).await;
    assert_eq!(error_code(&r.until_ready().await), None);
    r.send(&query(
        "SELECT string_agg(name, ',' ORDER BY name) FROM pg_prepared_statements",
    ))
    .await;
    assert_eq!(first_column(&r.until_ready().await), ["mine,sqlside"]);
    r.send(&query("DEALLOCATE ALL")).await;
    assert_eq!(error_code(&r.until_ready().await), None);
    r.send(&query("SELECT count(*) FROM pg_prepared_statements"))
        .await;
    assert_eq!(first_column(&r.until_ready().await), ["0"]);
    r.send(&query("EXECUTE sqlside")).await;
    assert_eq!(error_code(&r.until_ready().await).as_deref(), Some("26000"));
    proxy.stop();
}

/// Session mode: a notification (and a notice) reaches an idle client as it arrives, as on
/// PostgreSQL, not at its next query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_notifications_reach_an_idle_client() {
    let db = TestDb::create("compat_sess_notify", &["acme"]).await;
    let proxy = Proxy::start(db.config(3, SESSION));
    let mut listener = Raw::login(proxy.addr, "acme").await;
    listener.send(&query("LISTEN jobs")).await;
    assert_eq!(tags(&listener.until_ready().await), "CZ");
    let mut sender = Raw::login(proxy.addr, "acme").await;
    sender.send(&query("NOTIFY jobs, 'payload-1'")).await;
    assert_eq!(tags(&sender.until_ready().await), "CZ");
    let m = recv_within(&mut listener, Duration::from_secs(5))
        .await
        .expect("the notification while idle");
    assert_eq!(m.tag, b'A', "{m:?}");
    assert!(String::from_utf8_lossy(&m.body).contains("payload-1"));
    // The session goes on as usual.
    listener.send(&query("SELECT 1")).await;
    assert_eq!(first_column(&listener.until_ready().await), ["1"]);
    proxy.stop();
}

/// Session mode: a backend that ends (terminated while the client is idle, or while its
/// query runs) gives the client PostgreSQL's own FATAL, word for word, and closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_backend_end_is_postgres_fatal() {
    let db = TestDb::create("compat_sess_fatal", &["acme"]).await;
    let proxy = Proxy::start(db.config(3, SESSION));
    let su = pg().superuser("postgres").await;
    for busy in [false, true] {
        let mut r = Raw::login(proxy.addr, "acme").await;
        r.send(&query("SELECT pg_backend_pid()")).await;
        let pid = first_column(&r.until_ready().await).remove(0);
        if busy {
            r.send(&query("SELECT pg_sleep(30)")).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        su.simple_query(&format!("SELECT pg_terminate_backend({pid})"))
            .await
            .unwrap();
        // Idle: it arrives without the client sending anything.
        let msgs = r.until_eof().await;
        let e = msgs
            .iter()
            .find(|m| m.tag == b'E')
            .unwrap_or_else(|| panic!("no error: {msgs:?}"));
        assert_eq!(e.field(b'S').as_deref(), Some("FATAL"), "{msgs:?}");
        assert_eq!(e.field(b'C').as_deref(), Some("57P01"));
        assert_eq!(
            e.field(b'M').as_deref(),
            Some("terminating connection due to administrator command"),
            "busy: {busy}"
        );
    }
    proxy.stop();
}

/// Runs a Python script with `dsn` as its argument; returns its stdout (panics on failure).
fn python(module: &str, script: &str, dsn: &str) -> String {
    let py = python_with(module)
        .unwrap_or_else(|| panic!("python3-{module} is needed (scripts/test.sh installs it)"));
    let out = std::process::Command::new(py)
        .args(["-c", script, dsn])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A DSN for Python drivers: through the proxy, or straight to PostgreSQL as the pool role.
fn dsn_proxy(proxy: &Proxy, tenant: &str) -> String {
    format!(
        "postgresql://{APP_USER}:{APP_PASSWORD}@127.0.0.1:{}/{tenant}",
        proxy.addr.port()
    )
}

fn dsn_direct(db: &TestDb) -> String {
    let pg = pg();
    format!(
        "postgresql://{}:{SERVER_PASSWORD}@{}:{}/{}",
        db.role, pg.host, pg.port, db.name
    )
}

const LOGIN_STATUS: &str = r#"
import asyncio, asyncpg, sys
async def main(dsn):
    for st in [{'client_encoding': "'utf-8'"}, {'client_encoding': 'utf8', 'timezone': 'utc'},
               {'client_encoding': 'euc-jp', 'TimeZone': 'europe/paris'}, {'DateStyle': 'german'},
               {'IntervalStyle': 'SQL_STANDARD', 'application_name': 'x y'}]:
        c = await asyncpg.connect(dsn, server_settings=st)
        s = c.get_settings()
        shown = await c.fetchval("SELECT current_setting('client_encoding') || '/' || current_setting('TimeZone')")
        print(st, s.client_encoding, s.TimeZone, s.DateStyle, s.IntervalStyle, s.application_name, shown)
        await c.close()
asyncio.run(main(sys.argv[1]))
"#;

/// ParameterStatus at login carries PostgreSQL's own normalized values for the client's
/// settings (`'utf-8'` and `utf8` are `UTF8`, `euc-jp` is `EUC_JP`, `utc` is `UTC`), the
/// same as a direct connection, in both pool modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_parameter_status_is_postgres_own() {
    let db = TestDb::create("compat_login_ps", &["acme"]).await;
    let direct = python("asyncpg", LOGIN_STATUS, &dsn_direct(&db));
    // The pool role's own default TimeZone is the cluster's: so is a direct login's.
    for mode in ["transaction", "session"] {
        let proxy = Proxy::start(db.config(2, &format!("[proxy]\npool_mode = \"{mode}\"\n")));
        let got = python("asyncpg", LOGIN_STATUS, &dsn_proxy(&proxy, "acme"));
        assert_eq!(got, direct, "{mode} mode");
        proxy.stop();
    }
}

/// `RESET x` resets x only, to the client's startup value, and says so in its
/// ParameterStatus; what the client SET for other parameters stays (both modes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_one_parameter_keeps_the_others() {
    let db = TestDb::create("compat_reset_one", &["acme"]).await;
    for mode in ["transaction", "session"] {
        let proxy = Proxy::start(db.config(
            1,
            &format!("[proxy]\npool_mode = \"{mode}\"\nauth_method = \"trust\"\n"),
        ));
        let mut r = Raw::login_with(proxy.addr, "acme", &[("TimeZone", "america/new_york")]).await;
        r.send(&query(
            "SET DateStyle = 'SQL, DMY'; SET IntervalStyle = 'iso_8601'; SET TimeZone = 'Asia/Tokyo'",
        ))
        .await;
        let msgs = r.until_ready().await;
        assert_eq!(status(&msgs, "TimeZone").as_deref(), Some("Asia/Tokyo"));
        r.send(&query("RESET TimeZone")).await;
        let msgs = r.until_ready().await;
        assert_eq!(
            status(&msgs, "TimeZone").as_deref(),
            Some("America/New_York"),
            "{mode}: {msgs:?}"
        );
        assert_eq!(status(&msgs, "DateStyle"), None, "{mode}: {msgs:?}");
        if mode == "transaction" {
            // Another client takes the only server connection in between.
            let mut other = Raw::login(proxy.addr, "acme").await;
            other.send(&query("SHOW DateStyle")).await;
            assert_eq!(first_column(&other.until_ready().await), ["ISO, MDY"]);
        }
        for (sql, want) in [
            ("SHOW DateStyle", "SQL, DMY"),
            ("SHOW IntervalStyle", "iso_8601"),
            ("SHOW TimeZone", "America/New_York"),
        ] {
            r.send(&query(sql)).await;
            assert_eq!(
                first_column(&r.until_ready().await),
                [want],
                "{mode}: {sql}"
            );
        }
        r.send(&query("RESET ALL")).await;
        let msgs = r.until_ready().await;
        assert_eq!(status(&msgs, "DateStyle").as_deref(), Some("ISO, MDY"));
        for (sql, want) in [
            ("SHOW DateStyle", "ISO, MDY"),
            ("SHOW TimeZone", "America/New_York"),
        ] {
            r.send(&query(sql)).await;
            assert_eq!(
                first_column(&r.until_ready().await),
                [want],
                "{mode}: {sql}"
            );
        }
        proxy.stop();
    }
}

const STALE: &str = r#"
import asyncio, asyncpg, psycopg, sys
dsn, ddl_dsn = sys.argv[1], sys.argv[2]
async def main():
    ddl = await asyncpg.connect(ddl_dsn)
    a = await asyncpg.connect(dsn)
    await a.execute("CREATE TABLE s1(id int, v text); INSERT INTO s1 VALUES (1, 'x')")
    print('a', await a.fetch("SELECT * FROM s1"))
    await ddl.execute("ALTER TABLE s1 ADD COLUMN w int")
    for who, c in [('a', a), ('b', await asyncpg.connect(dsn))]:
        try:
            print(who, await c.fetch("SELECT * FROM s1"))
        except Exception as e:
            print(who, 'error', type(e).__name__)
    await a.execute("CREATE TYPE mood AS ENUM ('x', 'y')")
    print('a', await a.fetch("SELECT $1::mood AS m", 'x'))
    await ddl.execute("DROP TYPE mood; CREATE TYPE mood AS ENUM ('x', 'y', 'z')")
    for who, c in [('a', a), ('c', await asyncpg.connect(dsn))]:
        try:
            print(who, await c.fetch("SELECT $1::mood AS m", 'z'))
        except Exception as e:
            print(who, 'error', type(e).__name__)
    await ddl.execute("DROP TABLE s1; DROP TYPE mood")
asyncio.run(main())
# psycopg: prepared from the first execution; its recovery (DEALLOCATE ALL, prepare again)
with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as p, \
     psycopg.connect(ddl_dsn, autocommit=True) as d:
    p.execute("CREATE TABLE s2(id int)")
    p.execute("INSERT INTO s2 VALUES (1)")
    print('p', p.execute("SELECT * FROM s2").fetchall())
    d.execute("ALTER TABLE s2 ADD COLUMN w text DEFAULT 'w'")
    for i in range(2):
        try:
            print('p', p.execute("SELECT * FROM s2").fetchall())
        except Exception as e:
            print('p error', type(e).__name__)
    d.execute("DROP TABLE s2")
"#;

/// Shared statements follow the schema (transaction mode): after `ALTER TABLE` or
/// `DROP TYPE` (through the proxy or not), the drivers' own recovery works as it does
/// against PostgreSQL (asyncpg prepares again; psycopg deallocates and prepares again), and
/// a new client's fresh prepare gets a fresh statement. Compared line by line with the same
/// script run straight against PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_follow_schema_changes() {
    let db = TestDb::create("compat_stale", &["acme"]).await;
    let direct = format!("{}?options=-csearch_path%3Dtenant_acme", dsn_direct(&db));
    proxy_stale(&db, &direct).await;
}

async fn proxy_stale(db: &TestDb, direct: &str) {
    let run = |dsn: &str, ddl: &str| {
        let py = python_with("psycopg").expect("python3-psycopg");
        let _ = python_with("asyncpg").expect("python3-asyncpg");
        let out = std::process::Command::new(py)
            .args(["-c", STALE, dsn, ddl])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let want = run(direct, direct);
    assert!(want.contains("b [<Record id=1 v='x' w=None>]"), "{want}");
    // One difference: PostgreSQL fails psycopg's stale statement until psycopg prepares it
    // again; the proxy dropped the stale copy at the first error and prepares it afresh.
    let want = want.replacen(
        "p error FeatureNotSupported\np error FeatureNotSupported",
        "p error FeatureNotSupported\np [(1, 'w')]",
        1,
    );
    let proxy = Proxy::start(db.config(2, ""));
    let via = dsn_proxy(&proxy, "acme");
    assert_eq!(run(&via, &via), want, "DDL through the proxy");
    assert_eq!(run(&via, direct), want, "DDL straight to PostgreSQL");
    proxy.stop();
}

/// A client's `DEALLOCATE ALL` reaches the server when the connection holds SQL-level
/// statements, so those go as on PostgreSQL (transaction mode); the protocol-level ones of
/// the client go too, and the proxy prepares again what others need.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_all_drops_sql_level_statements() {
    let db = TestDb::create("compat_dealloc", &["acme"]).await;
    let proxy = Proxy::start(db.config(1, TRUST));
    let mut other = Raw::login(proxy.addr, "acme").await;
    let mut m = parse("shared", "SELECT 'shared'");
    m.extend(run("shared"));
    other.send(&m).await;
    assert_eq!(first_column(&other.until_ready().await), ["shared"]);
    let mut r = Raw::login(proxy.addr, "acme").await;
    let mut m = parse("mine", "SELECT 'mine'");
    m.extend(sync());
    r.send(&m).await;
    assert_eq!(tags(&r.until_ready().await), "1Z");
    for (sql, code) in [
        ("BEGIN", None),
        ("PREPARE sqlside AS SELECT 1", None),
        ("DEALLOCATE ALL", None),
        ("EXECUTE sqlside", Some("26000")),
        ("ROLLBACK", None),
    ] {
        r.send(&query(sql)).await;
        let msgs = r.until_ready().await;
        assert_eq!(error_code(&msgs).as_deref(), code, "{sql}: {msgs:?}");
    }
    r.send(&run("mine")).await;
    assert_eq!(error_code(&r.until_ready().await).as_deref(), Some("26000"));
    other.send(&run("shared")).await;
    assert_eq!(first_column(&other.until_ready().await), ["shared"]);
    proxy.stop();
}

/// Waits for a NotificationResponse; returns its payload (`None` if none came in `limit`).
async fn notification(r: &mut Raw, limit: Duration) -> Option<String> {
    let m = recv_within(r, limit).await?;
    assert_eq!(m.tag, b'A', "{m:?}");
    let mut parts = m.body[4..].split(|&b| b == 0);
    let _channel = parts.next();
    Some(String::from_utf8_lossy(parts.next().unwrap()).into_owned())
}

/// LISTEN/NOTIFY in transaction mode: a client's LISTEN is the proxy's, notifications fan
/// out to the idle clients of the sender's tenant listening on the channel (NOTIFY inside a
/// transaction at its commit, `pg_notify` too), never to another tenant's, even though the
/// two tenants' clients share two server connections that keep changing tenant; UNLISTEN
/// and leaving stop them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_in_transaction_mode_stays_within_the_tenant() {
    let db = TestDb::create("compat_listen", &["acme", "globex"]).await;
    let proxy = Proxy::start(db.config(2, TRUST));
    let short = Duration::from_millis(300);
    let mut a1 = Raw::login(proxy.addr, "acme").await;
    let mut a2 = Raw::login(proxy.addr, "acme").await;
    let mut g1 = Raw::login(proxy.addr, "globex").await;
    for r in [&mut a1, &mut a2, &mut g1] {
        r.send(&query("LISTEN jobs")).await;
        assert_eq!(tags(&r.until_ready().await), "CZ");
    }
    // Extended protocol (psycopg sends it so) is answered too.
    let mut a3 = Raw::login(proxy.addr, "acme").await;
    let mut g2 = Raw::login(proxy.addr, "globex").await;
    a3.send(&extended("LISTEN other")).await;
    assert_eq!(tags(&a3.until_ready().await), "12CZ");

    for round in 0..5 {
        // Both tenants send on the same channel name, over connections that switch tenant.
        a3.send(&query(&format!("NOTIFY jobs, 'acme-{round}'")))
            .await;
        assert_eq!(tags(&a3.until_ready().await), "CZ");
        g2.send(&query(&format!(
            "SELECT pg_notify('jobs', 'globex-{round}')"
        )))
        .await;
        assert_eq!(error_code(&g2.until_ready().await), None);
        for r in [&mut a1, &mut a2] {
            assert_eq!(
                notification(r, Duration::from_secs(5)).await.as_deref(),
                Some(format!("acme-{round}").as_str())
            );
        }
        assert_eq!(
            notification(&mut g1, Duration::from_secs(5))
                .await
                .as_deref(),
            Some(format!("globex-{round}").as_str())
        );
        assert_eq!(notification(&mut a1, short).await, None);
        assert_eq!(notification(&mut g1, short).await, None);
    }
    // Inside a transaction: at its commit, as PostgreSQL delivers it.
    a3.send(&query("BEGIN; NOTIFY jobs, 'in-tx'")).await;
    a3.until_ready().await;
    assert_eq!(notification(&mut a1, short).await, None);
    a3.send(&query("COMMIT")).await;
    a3.until_ready().await;
    assert_eq!(
        notification(&mut a1, Duration::from_secs(5))
            .await
            .as_deref(),
        Some("in-tx")
    );
    assert_eq!(
        notification(&mut a2, Duration::from_secs(5))
            .await
            .as_deref(),
        Some("in-tx")
    );
    // UNLISTEN: a2 hears no more; a1 still does, and its queries go on as usual.
    a2.send(&query("UNLISTEN jobs")).await;
    assert_eq!(tags(&a2.until_ready().await), "CZ");
    a3.send(&query("NOTIFY jobs, 'after'")).await;
    a3.until_ready().await;
    assert_eq!(
        notification(&mut a1, Duration::from_secs(5))
            .await
            .as_deref(),
        Some("after")
    );
    assert_eq!(notification(&mut a2, short).await, None);
    assert_eq!(notification(&mut g1, short).await, None);
    a1.send(&query("SELECT 1")).await;
    assert_eq!(first_column(&a1.until_ready().await), ["1"]);
    // A client that leaves listens no more; the server connections were never LISTENed on.
    drop(a1);
    a3.send(&query("SELECT count(*) FROM pg_listening_channels()"))
        .await;
    assert_eq!(first_column(&a3.until_ready().await), ["0"]);
    proxy.stop();
}

/// A driver that closes a statement it dropped in the same write as its next query
/// (tokio-postgres does: Close + Sync, then the query): a LISTEN sent so is still the
/// proxy's, and the server connections never LISTEN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listen_behind_a_statement_close_is_the_proxys() {
    let db = TestDb::create("compat_listen_close", &["acme"]).await;
    let proxy = Proxy::start(db.config(1, TRUST));
    let mut a = Raw::login(proxy.addr, "acme").await;
    let mut batch = parse("s0", "SELECT 1");
    batch.extend(sync());
    a.send(&batch).await;
    assert_eq!(tags(&a.until_ready().await), "1Z");
    let mut batch = close("s0");
    batch.extend(sync());
    batch.extend(query("LISTEN jobs"));
    a.send(&batch).await;
    assert_eq!(tags(&a.until_ready().await), "3Z");
    assert_eq!(tags(&a.until_ready().await), "CZ");
    let mut b = Raw::login(proxy.addr, "acme").await;
    b.send(&query("NOTIFY jobs, 'hello'")).await;
    assert_eq!(tags(&b.until_ready().await), "CZ");
    assert_eq!(
        notification(&mut a, Duration::from_secs(5))
            .await
            .as_deref(),
        Some("hello")
    );
    // The pool's one connection listens on nothing.
    b.send(&query("SELECT count(*) FROM pg_listening_channels()"))
        .await;
    assert_eq!(first_column(&b.until_ready().await), ["0"]);
    // The statement is closed for the client, as PostgreSQL would have it.
    a.send(&[bind("s0"), execute(), sync()].concat()).await;
    assert_eq!(error_code(&a.until_ready().await).as_deref(), Some("26000"));
    proxy.stop();
}

/// A listening client that does not read: its backlog is bounded, and past it the client
/// is disconnected with FATAL 53200; others go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_listener_is_bounded() {
    let db = TestDb::create("compat_listen_slow", &["acme"]).await;
    let proxy = Proxy::start(db.config(2, TRUST));
    let mut slow = Raw::login(proxy.addr, "acme").await;
    slow.send(&query("LISTEN flood")).await;
    slow.until_ready().await;
    let mut sender = Raw::login(proxy.addr, "acme").await;
    let payload = "x".repeat(7000);
    // 35 MB: more than the socket buffers and the backlog bound together.
    for i in 0..100 {
        let mut sql = String::new();
        // Distinct payloads: PostgreSQL folds identical ones within a transaction.
        for j in 0..50 {
            sql.push_str(&format!("SELECT pg_notify('flood', '{i}-{j}-{payload}');"));
        }
        sender.send(&query(&sql)).await;
        assert_eq!(error_code(&sender.until_ready().await), None);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let msgs = slow.until_eof().await;
    let last = msgs.last().expect("messages");
    assert_eq!(last.tag, b'E', "{:?}", &last.tag);
    assert_eq!(last.field(b'C').as_deref(), Some("53200"));
    assert!(msgs.len() < 4000, "{}", msgs.len());
    sender.send(&query("SELECT 1")).await;
    assert_eq!(first_column(&sender.until_ready().await), ["1"]);
    proxy.stop();
}

const PIPELINE_ERRORS: &str = r#"
import asyncio, asyncpg, psycopg, sys
dsn = sys.argv[1]
async def main():
    a = await asyncpg.connect(dsn)
    await a.execute("CREATE TABLE pk(id int primary key)")
    for first in [0, 3000]:
        rows = [(i,) for i in range(first)] + [(None,)] + [(i,) for i in range(first, first + 30000)]
        try:
            await a.executemany("INSERT INTO pk VALUES ($1)", rows)
        except Exception as e:
            print('executemany', type(e).__name__)
    try:
        async with a.transaction():
            async for r in a.cursor("SELECT 1/(g - 500) FROM generate_series(1, 1000) g", prefetch=50):
                pass
    except Exception as e:
        print('cursor', type(e).__name__)
    print(await a.fetchval("SELECT count(*) FROM pk"))
    await a.execute("DROP TABLE pk")
asyncio.run(main())
for threshold in [None, 0]:
    with psycopg.connect(dsn, prepare_threshold=threshold) as c:
        for i in range(3):
            try:
                with c.cursor("named") as cur:
                    cur.itersize = 3
                    cur.execute("SELECT 10 / (g - 6) FROM generate_series(1, 10) g")
                    print([r for r in cur])
            except Exception as e:
                print('cursor', type(e).__name__)
            c.rollback()
            with c.cursor("n2", withhold=True) as cur:
                cur.execute("SELECT g FROM generate_series(1, 5) g")
                c.commit()
                print(cur.fetchall())
        try:
            with c.pipeline():
                for i in range(2000):
                    c.execute("SELECT 1 / (%s - 1500)", (i,))
        except Exception as e:
            print('pipeline', type(e).__name__)
        c.rollback()
        print(c.execute("SELECT 'after'").fetchone())
"#;

/// Errors while the client is still sending a pipeline (asyncpg's executemany, psycopg's
/// server-side cursors and pipeline mode): handled as PostgreSQL handles them (skipped to
/// Sync), the same answers as straight to PostgreSQL, the server connection kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_inside_pipelines_are_postgres_own() {
    let db = TestDb::create("compat_pipeline", &["acme"]).await;
    let direct = format!("{}?options=-csearch_path%3Dtenant_acme", dsn_direct(&db));
    let want = python("psycopg", PIPELINE_ERRORS, &direct);
    assert!(want.contains("executemany NotNullViolationError"), "{want}");
    let proxy = Proxy::start(db.config(1, ""));
    assert_eq!(
        python("psycopg", PIPELINE_ERRORS, &dsn_proxy(&proxy, "acme")),
        want
    );
    // Replies never went out of step: the one server connection was kept throughout.
    assert_eq!(
        proxy
            .shared
            .pools
            .default()
            .stats
            .connects_ok
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    proxy.stop();
}

const PSYCOPG_EVICTS: &str = r#"
import psycopg, sys
with psycopg.connect(sys.argv[1], prepare_threshold=0, autocommit=True) as c:
    c.prepared_max = 2
    for round in range(2):
        for i in range(5):
            # Each new text beyond 2 makes psycopg DEALLOCATE its oldest (extended protocol).
            c.execute("SELECT %s::int + " + str(i) + " FROM leads LIMIT 1", (round,))
    print("ok", c.execute("SELECT count(*) FROM leads").fetchone()[0])
"#;

/// psycopg evicts prepared statements from its cache with `DEALLOCATE name` sent over the
/// extended protocol (found by running psycopg's own suite through the proxy): the name is
/// the client's, so the proxy rewrites it to the statement's server name, as it does for a
/// simple-query DEALLOCATE; PostgreSQL answers 26000 otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_cache_eviction_deallocates_through_the_extended_protocol() {
    let db = TestDb::create("compat_evict", &["acme"]).await;
    let proxy = Proxy::start(db.config(1, ""));
    let out = python("psycopg", PSYCOPG_EVICTS, &dsn_proxy(&proxy, "acme"));
    assert_eq!(out.trim(), "ok 2");
    proxy.stop();
}
