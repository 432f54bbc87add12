//! Named prepared statements in transaction mode: they follow the client from one server
//! connection to the next, are prepared once per connection for all clients of a tenant,
//! never shared between tenants, and stay within their bounds.

mod common;

use common::*;
use std::collections::HashSet;

/// The statement names the (only) server connection holds, asked through the proxy.
async fn server_statements(r: &mut Raw) -> Vec<String> {
    r.send(&query(
        "SELECT name FROM pg_prepared_statements ORDER BY name",
    ))
    .await;
    let msgs = r.until_ready().await;
    assert_eq!(error_code(&msgs), None, "{msgs:?}");
    first_column(&msgs)
}

/// tokio-postgres always prepares named statements. 12 clients over 3 tenants on 2 server
/// connections, each with statements prepared once and reused over many transactions
/// (some pipelined), plus one-off statements it closes: every row is the client's
/// tenant's, nothing fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_statements_follow_clients_across_tenants() {
    let tenants = ["acme", "globex", "initech"];
    let db = TestDb::create("prep_tokio", &tenants).await;
    let proxy = Proxy::start(db.config(2, ""));
    let mut tasks = Vec::new();
    for i in 0..12 {
        let tenant = tenants[i % tenants.len()];
        let client = proxy.connect(tenant).await;
        tasks.push(tokio::spawn(async move {
            let by_id = client
                .prepare("SELECT name FROM leads WHERE id = $1")
                .await
                .unwrap();
            let count = client.prepare("SELECT count(*) FROM leads").await.unwrap();
            for round in 0..100 {
                let id = 1 + (round % 2);
                // Two statements in flight at once: one pipelined batch.
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
                let (a, b) = tokio::join!(
                    client.query_one(&by_id, &params),
                    client.query_one(&count, &[])
                );
                let name: String = a.unwrap().get(0);
                assert_eq!(name, format!("{tenant}-{id}"));
                assert_eq!(b.unwrap().get::<_, i64>(0), 2);
                if round % 10 == 0 {
                    // A one-off statement (prepared, used, closed by the driver).
                    let row = client
                        .query_one(
                            &format!("SELECT {round}::int + id FROM leads WHERE id = 1"),
                            &[],
                        )
                        .await
                        .unwrap();
                    assert_eq!(row.get::<_, i32>(0), round + 1);
                }
                if round % 25 == 0 {
                    // An explicit transaction using the statements.
                    client.batch_execute("BEGIN").await.unwrap();
                    let r = client.query_one(&by_id, &[&1]).await.unwrap();
                    assert_eq!(r.get::<_, String>(0), format!("{tenant}-1"));
                    client.batch_execute("COMMIT").await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let su = pg().superuser("postgres").await;
    assert!(db.backends(&su).await <= 2);
    proxy.stop();
}

/// psycopg 3 with prepare_threshold=0 prepares every statement under its own names
/// (`_pg3_N`). Clients of two tenants take turns on one server connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_prepare_threshold_zero() {
    let python = python_with("psycopg")
        .expect("psycopg 3 is needed (apt-get install python3-psycopg; scripts/test.sh does)");
    let db = TestDb::create("prep_psycopg", &["acme", "globex"]).await;
    let proxy = Proxy::start(db.config(1, ""));
    let base = format!(
        "host=127.0.0.1 port={} user={APP_USER} password={APP_PASSWORD}",
        proxy.addr.port()
    );
    let script = format!(
        r#"
import psycopg
conns = {{}}
for t in ["acme", "globex"]:
    conns[t] = psycopg.connect("{base} dbname=" + t, autocommit=True, prepare_threshold=0)
for i in range(200):
    for t, c in conns.items():
        id = 1 + i % 2
        name = c.execute("SELECT name FROM leads WHERE id = %s", (id,)).fetchone()[0]
        assert name == f"{{t}}-{{id}}", (t, name)
        n = c.execute("SELECT count(*) FROM leads WHERE name LIKE %s", (t + "%",)).fetchone()[0]
        assert n == 2, (t, n)
        if i % 50 == 0:
            with c.transaction():
                assert c.execute("SELECT name FROM leads WHERE id = %s", (1,)).fetchone()[0] == t + "-1"
names = conns["acme"].execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0]
print("ok", names)
"#
    );
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .args(["-c", &script])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The connection holds acme's statements only (the switch from globex dropped the
    // rest): the count query's, perhaps the two of the loop.
    let n: usize = stdout.trim().strip_prefix("ok ").unwrap().parse().unwrap();
    assert!((1..=3).contains(&n), "{stdout}");
    proxy.stop();
}

/// The same SQL text in two tenants whose `leads.name` columns have different types, taking
/// turns on one server connection: each gets its own rows with its own types, never
/// "cached plan must not change result type".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_sql_different_types_per_tenant_on_one_connection() {
    let db = TestDb::create("prep_types", &["acme", "globex"]).await;
    db.owner()
        .await
        .batch_execute(
            "ALTER TABLE tenant_globex.leads ALTER COLUMN name TYPE integer USING id * 10",
        )
        .await
        .unwrap();
    let proxy = Proxy::start(db.config(1, ""));
    let acme = proxy.connect("acme").await;
    let globex = proxy.connect("globex").await;
    let sql = "SELECT name FROM leads ORDER BY id";
    let a = acme.prepare(sql).await.unwrap();
    let g = globex.prepare(sql).await.unwrap();
    for _ in 0..50 {
        let rows = acme.query(&a, &[]).await.unwrap();
        let names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        assert_eq!(names, ["acme-1", "acme-2"]);
        let rows = globex.query(&g, &[]).await.unwrap();
        let names: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
        assert_eq!(names, [10, 20]);
    }
    // The one server connection holds the statement of the tenant it serves now: a switch
    // drops the other tenant's.
    acme.batch_execute("BEGIN").await.unwrap();
    acme.query(&a, &[]).await.unwrap();
    let n: i64 = acme
        .query_one(
            "SELECT count(*) FROM pg_prepared_statements WHERE statement = $1",
            &[&sql],
        )
        .await
        .unwrap()
        .get(0);
    acme.batch_execute("COMMIT").await.unwrap();
    assert_eq!(n, 1);
    proxy.stop();
}

/// Statements are shared: many clients of one tenant preparing the same text cost one
/// statement on the server connection; another tenant's identical text is another.
/// The server sees proxy names, never the clients'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_statement_per_connection_for_all_clients_of_a_tenant() {
    let db = TestDb::create("prep_shared", &["acme", "globex"]).await;
    let proxy = Proxy::start(db.config(1, &format!("{TRUST}admin_users = [\"{APP_USER}\"]\n")));
    let mut clients = Vec::new();
    for (i, t) in ["acme", "acme", "acme", "globex"].iter().enumerate() {
        let mut r = Raw::login(proxy.addr, t).await;
        let mut m = parse(&format!("mine{i}"), "SELECT 42");
        m.extend(run(&format!("mine{i}")));
        r.send(&m).await;
        let msgs = r.until_ready().await;
        assert_eq!(tags(&msgs), "12DCZ", "{msgs:?}");
        assert_eq!(first_column(&msgs), ["42"]);
        clients.push(r);
        if i == 2 {
            // Three acme clients, one statement on the (only) connection.
            let names = server_statements(&mut clients[0]).await;
            assert_eq!(names.len(), 1, "{names:?}");
            assert!(names.iter().all(|n| n.starts_with("_tp")), "{names:?}");
        }
    }
    // globex's is another statement; the switch to globex dropped acme's from the
    // connection (the clients still have theirs).
    let names = server_statements(&mut clients[3]).await;
    assert_eq!(names.len(), 1, "{names:?}");
    assert_eq!(proxy.shared.statements.len(), 2);

    // The admin console shows them, as PgBouncer's prepared_statements columns (the 19th,
    // after PgBouncer's 1.18 columns).
    let mut console = Raw::login(proxy.addr, "tenantpool").await;
    for (cmd, want) in [
        ("SHOW CLIENTS", vec!["1", "1", "1", "1"]),
        ("SHOW SERVERS", vec!["1"]),
    ] {
        console.send(&query(cmd)).await;
        let msgs = console.until_ready().await;
        let last: Vec<String> = msgs
            .iter()
            .filter(|m| m.tag == b'D')
            .map(|m| data_row(&m.body)[18].clone())
            .collect();
        assert_eq!(last, want, "{cmd}");
    }
    proxy.stop();
}

/// `max_prepared_statements = 0` turns tracking off: names go to the server as the client
/// gave them (as without a pooler).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_turns_tracking_off() {
    let db = TestDb::create("prep_off", &["acme"]).await;
    let proxy = Proxy::start(db.config(1, &format!("{TRUST}max_prepared_statements = 0\n")));
    let mut r = Raw::login(proxy.addr, "acme").await;
    let mut m = parse("mine", "SELECT 1");
    m.extend(sync());
    r.send(&m).await;
    assert_eq!(tags(&r.until_ready().await), "1Z");
    assert_eq!(server_statements(&mut r).await, ["mine"]);
    assert_eq!(proxy.shared.statements.len(), 0);
    proxy.stop();
}

/// Close, DEALLOCATE, DEALLOCATE ALL and DISCARD ALL do what they do on PostgreSQL, and the
/// proxy's own answers (ParseComplete, CloseComplete, 42P05, 25P02) keep their place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_deallocate_and_discard_behave_as_on_postgres() {
    let db = TestDb::create("prep_close", &["acme"]).await;
    let proxy = Proxy::start(db.config(1, TRUST));
    let mut r = Raw::login(proxy.addr, "acme").await;
    // Another client has the statement on the connection already: this Parse is
    // answered by the proxy, in its place among the server's replies.
    let mut other = Raw::login(proxy.addr, "acme").await;
    let mut m = parse("x", "SELECT 1");
    m.extend(sync());
    other.send(&m).await;
    assert_eq!(tags(&other.until_ready().await), "1Z");

    let mut m = bind("nope");
    m.extend(execute());
    m.extend(parse("s1", "SELECT 1"));
    m.extend(sync());
    r.send(&m).await;
    let msgs = r.until_ready().await;
    assert_eq!(tags(&msgs), "EZ", "{msgs:?}");
    assert_eq!(error_code(&msgs).as_deref(), Some("26000"));
    // The skipped Parse did not register s1.
    r.send(&run("s1")).await;
    assert_eq!(error_code(&r.until_ready().await).as_deref(), Some("26000"));

    let mut m = parse("s1", "SELECT 1");
    m.extend(describe("s1"));
    m.extend(run("s1"));
    r.send(&m).await;
    let msgs = r.until_ready().await;
    assert_eq!(tags(&msgs), "1tT2DCZ", "{msgs:?}");

    // Parse of a name the client has: 42P05, the rest of the batch skipped.
    let mut m = parse("s1", "SELECT 2");
    m.extend(bind("s1"));
    m.extend(execute());
    m.extend(sync());
    r.send(&m).await;
    let msgs = r.until_ready().await;
    assert_eq!(tags(&msgs), "EZ", "{msgs:?}");
    assert_eq!(error_code(&msgs).as_deref(), Some("42P05"));
    r.send(&run("s1")).await;
    assert_eq!(first_column(&r.until_ready().await), ["1"]);

    // Close: CloseComplete in its place, then the name is gone.
    let mut m = close("s1");
    m.extend(parse("s2", "SELECT 2"));
    m.extend(close("never-had-it"));
    m.extend(sync());
    r.send(&m).await;
    assert_eq!(tags(&r.until_ready().await), "313Z");
    r.send(&run("s1")).await;
    assert_eq!(error_code(&r.until_ready().await).as_deref(), Some("26000"));

    // SQL DEALLOCATE of a protocol statement.
    r.send(&query("DEALLOCATE s2")).await;
    let msgs = r.until_ready().await;
    assert_eq!(tags(&msgs), "CZ", "{msgs:?}");
    r.send(&run("s2")).await;
    assert_eq!(error_code(&r.until_ready().await).as_deref(), Some("26000"));

    // DEALLOCATE ALL.
    let mut m = parse("a", "SELECT 'a'");
    m.extend(parse("b", "SELECT 'b'"));
    m.extend(sync());
    r.send(&m).await;
    assert_eq!(tags(&r.until_ready().await), "11Z");
    r.send(&query("DEALLOCATE ALL")).await;
    assert_eq!(tags(&r.until_ready().await), "CZ");
    r.send(&run("b")).await;
    assert_eq!(error_code(&r.until_ready().await).as_deref(), Some("26000"));

    // Inside a failed transaction DEALLOCATE fails as on PostgreSQL and changes nothing.
    let mut m = parse("c", "SELECT 'c'");
    m.extend(sync());
    r.send(&m).await;
    r.until_ready().await;
    for (sql, code) in [
        ("BEGIN", None),
        ("SELECT 1/0", Some("22012")),
        ("DEALLOCATE c", Some("25P02")),
    ] {
        r.send(&query(sql)).await;
        assert_eq!(error_code(&r.until_ready().await).as_deref(), code, "{sql}");
    }
    r.send(&query("ROLLBACK")).await;
    r.until_ready().await;
    r.send(&run("c")).await;
    assert_eq!(first_column(&r.until_ready().await), ["c"]);

    // A Close skipped after an error (as PostgreSQL skips to Sync) did not happen.
    let mut m = bind("nope");
    m.extend(close("c"));
    m.extend(sync());
    r.send(&m).await;
    assert_eq!(tags(&r.until_ready().await), "EZ");
    r.send(&run("c")).await;
    assert_eq!(first_column(&r.until_ready().await), ["c"]);

    // A DISCARD ALL that fails (inside a transaction block) drops nothing.
    for (sql, code) in [
        ("BEGIN", None),
        ("DISCARD ALL", Some("25001")),
        ("ROLLBACK", None),
    ] {
        r.send(&query(sql)).await;
        assert_eq!(error_code(&r.until_ready().await).as_deref(), code, "{sql}");
    }
    r.send(&run("c")).await;
    assert_eq!(first_column(&r.until_ready().await), ["c"]);

    // DISCARD ALL: the client's statements are gone, and so are the server's (the proxy
    // prepares again what it needs).
    r.send(&query("DISCARD ALL")).await;
    assert_eq!(tags(&r.until_ready().await), "CZ");
    r.send(&run("c")).await;
    assert_eq!(error_code(&r.until_ready().await).as_deref(), Some("26000"));
    let mut m = parse("x", "SELECT 1");
    m.extend(run("x"));
    other.send(&run("x")).await;
    assert_eq!(first_column(&other.until_ready().await), ["1"]);
    r.send(&m).await;
    assert_eq!(first_column(&r.until_ready().await), ["1"]);
    proxy.stop();
}

/// When the statement a client uses must be prepared again on another server connection
/// and that fails (its table was dropped), the client gets the error as the error of its
/// own Bind, and the connection stays in step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_parse_error_reaches_the_client_as_its_own() {
    let db = TestDb::create("prep_inject_err", &["acme"]).await;
    let owner = db.owner().await;
    owner
        .batch_execute(
            "CREATE TABLE tenant_acme.doomed (x int); INSERT INTO tenant_acme.doomed VALUES (7)",
        )
        .await
        .unwrap();
    let proxy = Proxy::start(db.config(1, ""));
    let client = proxy.connect("acme").await;
    let doomed = client.prepare("SELECT x FROM doomed").await.unwrap();
    let leads = client
        .prepare("SELECT name FROM leads WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(
        client
            .query_one(&doomed, &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        7
    );
    // The next transaction gets a new server connection, where both must be prepared again.
    owner
        .batch_execute("DROP TABLE tenant_acme.doomed")
        .await
        .unwrap();
    let su = pg().superuser("postgres").await;
    let pid: i32 = su
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE usename = $1 AND application_name <> 'test_owner'",
            &[&db.role],
        )
        .await
        .unwrap()
        .get(0);
    terminate_backend(&su, &pid.to_string()).await;
    let err = client.query_one(&doomed, &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42P01"), "{err:?}");
    let row = client.query_one(&leads, &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "acme-1");
    proxy.stop();
}

/// A client that prepares 100,000 distinct statements (closing each) and one that never
/// closes: the server connection never holds more than `max_prepared_statements`, the
/// proxy's memory for statements stays bounded, and a client over its own bound gets
/// 53400 and stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_stay_bounded() {
    let db = TestDb::create("prep_bounded", &["acme"]).await;
    let max = 20;
    let proxy = Proxy::start(db.config(1, &format!("{TRUST}max_prepared_statements = {max}\n")));
    let mut r = Raw::login(proxy.addr, "acme").await;
    const BATCH: usize = 1000;
    let mut peak_cache = 0;
    for batch in 0..100 {
        let mut m = Vec::new();
        for i in 0..BATCH {
            let n = batch * BATCH + i;
            m.extend(parse("s", &format!("SELECT {n}")));
            m.extend(bind("s"));
            m.extend(execute());
            m.extend(close("s"));
        }
        m.extend(sync());
        r.send(&m).await;
        let msgs = r.until_ready().await;
        assert_eq!(error_code(&msgs), None);
        let rows = first_column(&msgs);
        assert_eq!(rows.len(), BATCH);
        assert_eq!(rows[BATCH - 1], (batch * BATCH + BATCH - 1).to_string());
        peak_cache = peak_cache.max(proxy.shared.statements.len());
        if batch % 25 == 0 {
            assert!(server_statements(&mut r).await.len() <= max);
        }
    }
    assert!(server_statements(&mut r).await.len() <= max);
    // Alive: what the server connection holds, and the client's current one.
    assert!(peak_cache <= max + 1, "{peak_cache}");

    // Never closing: the client's bound (10,000) holds.
    let limit = tenantpool::prepared::MAX_CLIENT_STATEMENTS;
    let mut registered = 0;
    let mut refused = None;
    'outer: for batch in 0.. {
        let mut m = Vec::new();
        for i in 0..BATCH {
            let n = batch * BATCH + i;
            m.extend(parse(&format!("keep{n}"), &format!("SELECT {n}")));
        }
        m.extend(sync());
        r.send(&m).await;
        let msgs = r.until_ready().await;
        registered += msgs.iter().filter(|m| m.tag == b'1').count();
        if let Some(code) = error_code(&msgs) {
            refused = Some(code);
            break 'outer;
        }
        assert!(batch < 20, "no bound");
    }
    assert_eq!(refused.as_deref(), Some("53400"));
    assert_eq!(registered, limit);
    assert!(proxy.shared.statements.len() <= limit + max + 1);
    assert!(server_statements(&mut r).await.len() <= max);
    // Still usable, and DEALLOCATE ALL frees it.
    r.send(&run("keep0")).await;
    assert_eq!(first_column(&r.until_ready().await), ["0"]);
    r.send(&query("DEALLOCATE ALL")).await;
    assert_eq!(tags(&r.until_ready().await), "CZ");
    assert!(proxy.shared.statements.len() <= max + 1);
    let mut m = parse("again", "SELECT 'again'");
    m.extend(run("again"));
    r.send(&m).await;
    assert_eq!(first_column(&r.until_ready().await), ["again"]);
    let seen: HashSet<String> = server_statements(&mut r).await.into_iter().collect();
    assert!(seen.len() <= max);
    proxy.stop();
}

/// Session state one client leaves is wiped before another client uses the connection: a
/// client of the same tenant keeps the tenant's tracked statements (its own), a client of
/// another tenant gets none of them (a client could have replaced them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_wipe_session_state_and_keep_statements_only_within_the_tenant() {
    let db = TestDb::create("prep_state", &["acme", "globex"]).await;
    let proxy = Proxy::start(db.config(1, ""));
    let acme = proxy.connect("acme").await;
    let stmt = acme
        .prepare("SELECT name FROM leads WHERE id = 1")
        .await
        .unwrap();
    let leave_state = "SET statement_timeout = '123s';
         CREATE TEMP TABLE leak_probe (x int);
         SELECT pg_advisory_lock(4242);
         LISTEN leak_channel;
         BEGIN; DECLARE leak_cursor CURSOR WITH HOLD FOR SELECT 1; COMMIT;
         SET search_path = tenant_globex;";
    acme.batch_execute(leave_state).await.unwrap();

    let first = |rows: Vec<tokio_postgres::SimpleQueryMessage>| {
        rows.iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .unwrap()
    };
    let wiped = [
        ("SHOW statement_timeout", "0"),
        (
            "SELECT count(*) FROM pg_class WHERE relname = 'leak_probe'",
            "0",
        ),
        (
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'",
            "0",
        ),
        ("SELECT count(*) FROM pg_listening_channels()", "0"),
        ("SELECT count(*) FROM pg_cursors", "0"),
    ];
    let tp = "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE '\\_tp%'";
    // Another client of acme: state wiped, acme's statement kept.
    let acme2 = proxy.connect("acme").await;
    for (sql, want) in wiped
        .iter()
        .copied()
        .chain([("SHOW search_path", "tenant_acme, public"), (tp, "1")])
    {
        assert_eq!(first(acme2.simple_query(sql).await.unwrap()), want, "{sql}");
    }
    acme.batch_execute(leave_state).await.unwrap();
    // A client of globex: state and acme's statements gone.
    let globex = proxy.connect("globex").await;
    for (sql, want) in wiped
        .iter()
        .copied()
        .chain([("SHOW search_path", "tenant_globex, public"), (tp, "0")])
    {
        assert_eq!(
            first(globex.simple_query(sql).await.unwrap()),
            want,
            "{sql}"
        );
    }
    // And serves acme again, on acme's search_path.
    let row = acme.query_one(&stmt, &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "acme-1");
    proxy.stop();
}
