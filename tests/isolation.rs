//! Isolation: each transaction runs on its own tenant's search_path, as the server role,
//! and nothing one client sends — resets, `set_config`, `SET ROLE`, settings with quotes
//! and backslashes, lone or out-of-place protocol messages, SQL that rewrites prepared
//! statements — reaches another client (docs/security.md).

mod common;

use common::*;
use tokio_postgres::SimpleQueryMessage;

/// The first row of a simple query, every column as text.
fn row(msgs: &[SimpleQueryMessage]) -> Vec<String> {
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("").to_string())
                    .collect(),
            ),
            _ => None,
        })
        .expect("a row")
}

/// What a transaction runs as: search_path, current user, and the names in `leads`.
const PROBE: &str = "SELECT current_setting('search_path'), current_user::text, \
     (SELECT string_agg(name, ',' ORDER BY id) FROM leads)";

/// What a client of `tenant` must see in every transaction.
fn expected(db: &TestDb, tenant: &str) -> Vec<String> {
    vec![
        format!("tenant_{tenant}, public"),
        db.role.clone(),
        format!("{tenant}-1,{tenant}-2"),
    ]
}

async fn probe(c: &tokio_postgres::Client) -> Vec<String> {
    row(&c.simple_query(PROBE).await.unwrap())
}

/// A raw client's probe: exactly RowDescription, one DataRow, CommandComplete and
/// ReadyForQuery, nothing left over from anyone else.
async fn raw_probe(r: &mut Raw) -> Vec<String> {
    r.send(&query(PROBE)).await;
    let msgs = r.until_ready().await;
    assert_eq!(tags(&msgs), "TDCZ", "{msgs:?}");
    data_row(&msgs[1].body)
}

/// A role the pool role may become (`SET ROLE`; it does not inherit its rights), and a table
/// only that role may read.
async fn other_role(db: &TestDb) -> String {
    let other = format!("{}_other", db.name);
    let su = pg().superuser(&db.name).await;
    su.batch_execute(&format!(
        "CREATE ROLE {other} NOLOGIN;
         ALTER ROLE {role} NOINHERIT;
         GRANT {other} TO {role};
         CREATE SCHEMA private;
         CREATE TABLE private.secret (x text);
         INSERT INTO private.secret VALUES ('only {other} may read this');
         GRANT USAGE ON SCHEMA private TO {other}, {role};
         GRANT SELECT ON private.secret TO {other};",
        role = db.role
    ))
    .await
    .unwrap();
    other
}

/// A client whose first message after login is a lone CopyData, CopyDone or CopyFail,
/// and which then leaves, gets a server connection with the proxy's reset in flight: the
/// connection must not go back to the pool before the reset's replies are read, or the next
/// client (another tenant) reads them as its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_copy_messages_leave_no_replies_for_the_next_client() {
    let db = TestDb::create("iso_lone", &["acme", "globex", "initech"]).await;
    let proxy = Proxy::start(db.config(1, TRUST));
    let mut acme = Raw::login(proxy.addr, "acme").await;
    let mut initech = Raw::login(proxy.addr, "initech").await;
    let lone = [
        msg(b'd', b"stray row\n"),
        msg(b'c', &[]),
        msg(b'f', b"stray failure\0"),
    ];
    for (i, m) in lone.iter().enumerate() {
        for terminate in [false, true] {
            assert_eq!(raw_probe(&mut acme).await, expected(&db, "acme"));
            // globex's client gets the connection acme left: a tenant switch, whose
            // DISCARD ALL and SET replies are owed to the proxy.
            let mut globex = Raw::login(proxy.addr, "globex").await;
            let mut bytes = m.clone();
            if terminate {
                bytes.extend(msg(b'X', &[]));
            }
            globex.send(&bytes).await;
            drop(globex);
            for _ in 0..3 {
                assert_eq!(
                    raw_probe(&mut initech).await,
                    expected(&db, "initech"),
                    "after lone message {i} (terminate: {terminate})"
                );
                assert_eq!(raw_probe(&mut acme).await, expected(&db, "acme"));
            }
        }
    }
    proxy.stop();
}

/// A small deterministic generator (xorshift), so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One fuzzing client: garbage before login, or lone and out-of-place messages after it,
/// then gone (at once, or after reading a little).
async fn fuzz_client(addr: std::net::SocketAddr, seed: u64) {
    use tokio::io::AsyncReadExt;
    let mut rng = Rng(seed);
    let tenant = ["acme", "globex", "initech"][rng.below(3) as usize];
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut bytes = Vec::new();
    if rng.below(4) == 0 {
        // Before login: random bytes, or a startup packet cut short.
        let n = 1 + rng.below(64) as usize;
        bytes.extend((0..n).map(|_| rng.next() as u8));
        if rng.below(2) == 0 {
            let p = startup_packet(&[("user", APP_USER), ("database", tenant)]);
            bytes = p[..rng.below(p.len() as u64) as usize].to_vec();
        }
    } else {
        bytes.extend(startup_packet(&[("user", APP_USER), ("database", tenant)]));
        let menu: Vec<Vec<u8>> = vec![
            msg(b'd', b"x"),
            msg(b'c', &[]),
            msg(b'f', b"no\0"),
            msg(b'H', &[]),
            sync(),
            execute(),
            bind(""),
            msg(b'C', b"P\0"),
            msg(b'D', b"P\0"),
            query("SELECT 1"),
            query("SELEC broken"),
            query(""),
            parse("", "SELECT name FROM tenant_globex.leads"),
            extended("SELECT name FROM leads"),
            query("BEGIN"),
            query("COPY leads FROM STDIN"),
            query("COPY leads TO STDOUT"),
            // A message cut short: the header promises more than is sent.
            vec![b'Q', 0, 0, 0, 100, b'S', b'E'],
        ];
        for _ in 0..1 + rng.below(4) {
            bytes.extend(&menu[rng.below(menu.len() as u64) as usize]);
        }
        if rng.below(3) == 0 {
            bytes.extend(msg(b'X', &[]));
        }
    }
    use tokio::io::AsyncWriteExt;
    let _ = stream.write_all(&bytes).await;
    if rng.below(2) == 0 {
        let mut sink = [0u8; 4096];
        let _ = tokio::time::timeout(
            std::time::Duration::from_millis(rng.below(30)),
            stream.read(&mut sink),
        )
        .await;
    }
}

/// Fuzzed lone and out-of-place messages, before and after login, from clients of every
/// tenant that then leave, while ordinary clients of every tenant keep checking that each of
/// their answers is exactly their own (their search_path, the server role, their rows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzzed_messages_never_reach_other_clients() {
    let tenants = ["acme", "globex", "initech"];
    let db = TestDb::create("iso_fuzz", &tenants).await;
    let proxy =
        Proxy::start(db.config(2, &format!("{TRUST}[limits]\nquery_wait_timeout = \"20s\"")));
    let addr = proxy.addr;
    let mut checkers = Vec::new();
    for t in tenants {
        let want = expected(&db, t);
        checkers.push(tokio::spawn(async move {
            let mut r = Raw::login(addr, t).await;
            for _ in 0..60 {
                assert_eq!(raw_probe(&mut r).await, want);
            }
        }));
    }
    let mut fuzzers = Vec::new();
    for w in 0..4u64 {
        fuzzers.push(tokio::spawn(async move {
            for i in 0..60u64 {
                fuzz_client(addr, 0x9e37_79b9_7f4a_7c15 ^ (w << 32 | i) | 1).await;
            }
        }));
    }
    for f in fuzzers {
        f.await.unwrap();
    }
    for c in checkers {
        c.await.unwrap();
    }
    // And after the storm, every tenant still gets exactly its own.
    for t in tenants {
        let mut r = Raw::login(addr, t).await;
        assert_eq!(raw_probe(&mut r).await, expected(&db, t));
    }
    proxy.stop();
}

/// Startup settings are applied with `set_config($1, $2, false)`: their values never
/// become SQL text, whatever quotes, backslashes or dollar signs they hold, with
/// standard_conforming_strings on or off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_settings_never_become_sql() {
    let db = TestDb::create("iso_inject", &["acme"]).await;
    let other = other_role(&db).await;
    let proxy = Proxy::start(db.config(1, TRUST));
    let evil = [
        format!("x\\'; SET ROLE {other}; --"),
        format!("'; SET ROLE {other}; --"),
        format!("\\'; SET ROLE {other}; --"),
        format!("$$; SET ROLE {other}; $$"),
        format!("\"; SET ROLE {other}; --"),
        "x\\".to_string(),
        "\\".to_string(),
        "/* '".to_string(),
        "E'\\x27'".to_string(),
        "it's \"quoted\" \\\\ $1 $tag$ ;".to_string(),
    ];
    let check = |scs: &'static str, app: String| {
        let (addr, role) = (proxy.addr, db.role.clone());
        async move {
            let params = [
                ("application_name", app.as_str()),
                ("standard_conforming_strings", scs),
            ];
            let mut r = Raw::login_with(addr, "acme", &params).await;
            r.send(&query(
                "SELECT current_setting('application_name'), current_user::text, \
                 current_setting('standard_conforming_strings')",
            ))
            .await;
            let msgs = r.until_ready().await;
            assert_eq!(tags(&msgs), "TDCZ", "{msgs:?}");
            assert_eq!(
                data_row(&msgs[1].body),
                [app.as_str(), role.as_str(), scs],
                "standard_conforming_strings={scs}"
            );
        }
    };
    for scs in ["on", "off"] {
        for value in &evil {
            // The first client with these settings has them checked at login on a freshly
            // reset connection; the third finds the connection with another client's
            // application_name and the same standard_conforming_strings, so only its
            // application_name is applied, on a connection where backslashes may escape.
            check(scs, value.clone()).await;
            check(scs, "plain".into()).await;
            check(scs, value.clone()).await;
            // The next plain client runs as the pool role too.
            let mut plain = Raw::login(proxy.addr, "acme").await;
            assert_eq!(raw_probe(&mut plain).await, expected(&db, "acme"));
        }
    }
    proxy.stop();
}

/// A client of one tenant cannot replace or drop another tenant's prepared statements, even
/// with SQL the proxy does not see (PREPARE inside a DO block): statements are not kept
/// across a tenant switch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenant_cannot_replace_a_tenants_statements() {
    let db = TestDb::create("iso_stmts", &["acme", "globex"]).await;
    let proxy = Proxy::start(db.config(1, ""));
    let acme = proxy.connect("acme").await;
    let globex = proxy.connect("globex").await;
    let stmt = acme
        .prepare("SELECT name FROM leads WHERE id = 1")
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(
            acme.query_one(&stmt, &[])
                .await
                .unwrap()
                .get::<_, String>(0),
            "acme-1"
        );
        // globex replaces every statement name the proxy may have used.
        globex
            .batch_execute(
                "DO $$ BEGIN FOR i IN 0..50 LOOP
                   BEGIN EXECUTE format('DEALLOCATE _tp%s', i);
                   EXCEPTION WHEN OTHERS THEN NULL; END;
                   EXECUTE format('PREPARE _tp%s AS SELECT name FROM tenant_globex.leads WHERE id = 1', i);
                 END LOOP; END $$",
            )
            .await
            .unwrap();
        for _ in 0..3 {
            assert_eq!(
                acme.query_one(&stmt, &[])
                    .await
                    .unwrap()
                    .get::<_, String>(0),
                "acme-1"
            );
        }
    }
    proxy.stop();
}

/// The resets that clients, frameworks and pools run (asyncpg's Pool runs its reset query
/// at every release) bring back the tenant's search_path, for the client and for everyone
/// after it; within the query string that reset it, unqualified names fail instead of
/// landing in `public`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_bring_back_the_tenants_search_path() {
    let db = TestDb::create("iso_reset", &["acme", "globex"]).await;
    // A `public.leads` with rows nobody should ever read through the proxy.
    db.owner()
        .await
        .batch_execute(
            "CREATE TABLE public.leads (id int, name text);
             INSERT INTO public.leads VALUES (1, 'public-1');",
        )
        .await
        .unwrap();
    let proxy = Proxy::start(db.config(1, ""));
    let c1 = proxy.connect("acme").await;
    let c2 = proxy.connect("acme").await;
    let g = proxy.connect("globex").await;
    let resets = [
        "RESET ALL",
        "DISCARD ALL",
        "RESET search_path",
        "SET search_path TO DEFAULT",
        "SET SESSION search_path = DEFAULT",
        "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;",
        "SELECT set_config('search_path', NULL, false)",
    ];
    for reset in resets {
        c1.batch_execute(reset).await.unwrap();
        assert_eq!(probe(&c1).await, expected(&db, "acme"), "{reset}");
        assert_eq!(probe(&c2).await, expected(&db, "acme"), "{reset}");
        assert_eq!(probe(&g).await, expected(&db, "globex"), "{reset}");
        assert_eq!(probe(&c1).await, expected(&db, "acme"), "{reset}");
        // In the same query string, after the reset: an error, never public's rows.
        let err = c1
            .simple_query(&format!("{reset}; SELECT name FROM leads"))
            .await;
        if reset != "DISCARD ALL" {
            let e = err.expect_err(reset);
            assert_eq!(sqlstate(&e).as_deref(), Some("42P01"), "{reset}: {e}");
        }
        assert_eq!(probe(&c1).await, expected(&db, "acme"), "{reset}");
    }
    proxy.stop();
}

/// `set_config`, `SET ROLE`, `SET SESSION ROLE` and the same inside DO blocks or over the
/// extended protocol change the session for the transaction that runs them; the next
/// transaction of the same client, of another client of the tenant and of another tenant
/// runs as the pool role on its own search_path, and cannot read what only that role may.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_role_and_search_path_do_not_reach_the_next_transaction() {
    let db = TestDb::create("iso_role", &["acme", "globex"]).await;
    let other = other_role(&db).await;
    let proxy = Proxy::start(db.config(1, ""));
    let a1 = proxy.connect("acme").await;
    let a2 = proxy.connect("acme").await;
    let g = proxy.connect("globex").await;
    let changes = [
        "SELECT set_config('search_path', 'tenant_globex', false)".to_string(),
        format!("SELECT set_config('role', '{other}', false)"),
        format!("SELECT pg_catalog.SET_CONFIG('role', '{other}', false)"),
        format!("SET ROLE {other}"),
        format!("SET SESSION ROLE {other}"),
        format!("DO $$ BEGIN PERFORM set_config('role', '{other}', false); END $$"),
        "DO $$ BEGIN SET search_path = tenant_globex; END $$".to_string(),
        format!("DO $$ BEGIN EXECUTE 'SET ROLE {other}'; END $$"),
    ];
    let secret = "SELECT count(*) FROM private.secret";
    for change in &changes {
        // The change holds inside the transaction that made it...
        let msgs = a1
            .simple_query(&format!(
                "{change}; SELECT current_user::text, current_setting('search_path')"
            ))
            .await
            .unwrap();
        let last = msgs
            .iter()
            .rposition(|m| matches!(m, SimpleQueryMessage::Row(_)))
            .unwrap();
        let inside = row(&msgs[last..]);
        assert!(
            inside[0] == other || inside[1] == "tenant_globex",
            "{change}: {inside:?}"
        );
        // ...and nowhere after it.
        for (c, t) in [(&a1, "acme"), (&a2, "acme"), (&g, "globex"), (&a1, "acme")] {
            assert_eq!(probe(c).await, expected(&db, t), "{change}");
            let e = c.simple_query(secret).await.expect_err(change);
            assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{change}: {e}");
        }
    }
    // Over the extended protocol, as a named statement run again later.
    let set = a1
        .prepare("SELECT set_config($1, $2, false)")
        .await
        .unwrap();
    for (name, value) in [("role", other.as_str()), ("search_path", "tenant_globex")] {
        a1.query(&set, &[&name, &value]).await.unwrap();
        for (c, t) in [(&a2, "acme"), (&g, "globex"), (&a1, "acme")] {
            assert_eq!(probe(c).await, expected(&db, t), "{name}");
        }
    }
    proxy.stop();
}

/// A function that changes the search_path and role when called is invisible in the SQL
/// that calls it: `reset_path_and_role = "always"` sets them again before every transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_resets_what_a_function_changed_unseen() {
    let db = TestDb::create("iso_always", &["acme"]).await;
    let other = other_role(&db).await;
    db.owner()
        .await
        .batch_execute(&format!(
            "CREATE FUNCTION tenant_acme.sneaky() RETURNS int LANGUAGE plpgsql AS $f$
             BEGIN
               PERFORM pg_catalog.set_config('search_path', 'private', false);
               PERFORM pg_catalog.set_config('ro' || 'le', '{other}', false);
               RETURN 1;
             END $f$"
        ))
        .await
        .unwrap();
    let proxy = Proxy::start(db.config(1, "[proxy]\nreset_path_and_role = \"always\""));
    let a1 = proxy.connect("acme").await;
    let a2 = proxy.connect("acme").await;
    for _ in 0..3 {
        a1.simple_query("SELECT sneaky()").await.unwrap();
        assert_eq!(probe(&a2).await, expected(&db, "acme"));
        a1.simple_query("SELECT sneaky()").await.unwrap();
        assert_eq!(probe(&a1).await, expected(&db, "acme"));
    }
    proxy.stop();
}

/// Session mode: the client owns its session, so its own `SET search_path` holds from one
/// transaction to the next; a reset brings back the tenant's (not `public`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_keeps_own_search_path_until_a_reset() {
    let db = TestDb::create("iso_session", &["acme", "globex"]).await;
    let proxy = Proxy::start(db.config(2, "[proxy]\npool_mode = \"session\""));
    let c = proxy.connect("acme").await;
    c.batch_execute("SET search_path TO tenant_globex")
        .await
        .unwrap();
    let mut want = expected(&db, "globex");
    want[0] = "tenant_globex".into();
    assert_eq!(probe(&c).await, want);
    for reset in [
        "RESET ALL",
        "RESET search_path",
        "SET search_path TO DEFAULT",
    ] {
        c.batch_execute("SET search_path TO tenant_globex")
            .await
            .unwrap();
        let e = c
            .simple_query(&format!("{reset}; SELECT name FROM leads"))
            .await
            .expect_err(reset);
        assert_eq!(sqlstate(&e).as_deref(), Some("42P01"), "{reset}");
        // That query string failed as a whole, its reset too (as on PostgreSQL).
        assert_eq!(probe(&c).await, want, "{reset}");
        c.batch_execute(reset).await.unwrap();
        assert_eq!(probe(&c).await, expected(&db, "acme"), "{reset}");
    }
    c.batch_execute("DISCARD ALL").await.unwrap();
    assert_eq!(probe(&c).await, expected(&db, "acme"));
    proxy.stop();
}

/// asyncpg's own Pool (one connection, three acquires): it runs `RESET ALL` (in its reset
/// query) at every release; every acquire must still see the tenant's search_path and rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_pool_keeps_the_tenants_search_path() {
    let python = python_with("asyncpg")
        .expect("asyncpg is needed (apt-get install python3-asyncpg; scripts/test.sh does)");
    let db = TestDb::create("iso_asyncpg", &["acme"]).await;
    let proxy = Proxy::start(db.config(1, ""));
    let script = format!(
        r#"
import asyncio, asyncpg
async def main():
    pool = await asyncpg.create_pool(host="127.0.0.1", port={port}, user="{APP_USER}",
        password="{APP_PASSWORD}", database="acme", min_size=1, max_size=1)
    for i in range(3):
        async with pool.acquire() as con:
            path = await con.fetchval("SELECT current_setting('search_path')")
            names = [r[0] for r in await con.fetch("SELECT name FROM leads ORDER BY id")]
            assert path == "tenant_acme, public", (i, path)
            assert names == ["acme-1", "acme-2"], (i, names)
            await con.execute("SET search_path TO public")
    await pool.close()
    print("ok")
asyncio.run(main())
"#,
        port = proxy.addr.port()
    );
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .args(["-c", &script])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    proxy.stop();
}

/// `tenantpool check` connects to the server and warns about a pool role that weakens
/// isolation: a superuser, roles it may become, shared tables the tenant search_path
/// falls back to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_warns_about_risky_server_roles() {
    let run_check = |db: &TestDb| {
        let dir = tempdir("tenantpool-check");
        let path = dir.join("tenantpool.toml");
        std::fs::write(&path, db.config_text(2, "")).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tenantpool"))
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let db = TestDb::create("iso_check", &["acme"]).await;
    let clean = run_check(&db);
    // The test config keeps the default admin_users without a [users.admin]: check says
    // so (a config warning, not a server role one).
    assert!(
        !clean
            .lines()
            .any(|l| l.contains("warning") && !l.contains("proxy.admin_users")),
        "{clean}"
    );
    let other = other_role(&db).await;
    pg().superuser(&db.name)
        .await
        .batch_execute("CREATE TABLE public.shared_stuff (x int)")
        .await
        .unwrap();
    let text = run_check(&db);
    assert!(text.contains(&format!("may SET ROLE to {other}")), "{text}");
    assert!(
        text.contains("falls back to schema public, which holds 1 tables"),
        "{text}"
    );
    assert!(
        text.contains("default search_path resolves to public"),
        "{text}"
    );
    let su = pg().superuser("postgres").await;
    su.batch_execute(&format!("ALTER ROLE {} SUPERUSER", db.role))
        .await
        .unwrap();
    let text = run_check(&db);
    assert!(text.contains("is a superuser"), "{text}");
    su.batch_execute(&format!("ALTER ROLE {} NOSUPERUSER", db.role))
        .await
        .unwrap();
}
