//! Per-tenant server logins (`[tenants.NAME] server_user`), against a real PostgreSQL: the
//! database itself confines a tenant with its own login, and the pool's caps hold for all
//! logins together while capacity moves between them.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use tokio_postgres::SimpleQueryMessage;

const ADMIN_PASSWORD: &str = "admin-secret";
fn first(msgs: &[SimpleQueryMessage]) -> String {
    rows(msgs)
        .first()
        .and_then(|r| r.first().cloned())
        .unwrap_or_default()
}

/// The role a tenant logs in as in this test's database.
fn role_of(db: &TestDb, tenant: &str) -> String {
    format!("{}_{tenant}", db.name)
}

/// Creates a login role for each of `tenants` that may connect to the test database and
/// use only its own schema (USAGE) and table (SELECT, INSERT): the schemas and tables
/// belong to the test's owner role, and PUBLIC's CONNECT on the database is revoked so
/// that only the roles granted it get in. Returns the config lines naming the logins.
async fn tenant_roles(db: &TestDb, tenants: &[&str]) -> String {
    let su = pg().superuser(&db.name).await;
    let mut sql = format!(
        "REVOKE CONNECT, TEMPORARY ON DATABASE {} FROM PUBLIC;",
        db.name
    );
    let mut config = String::new();
    for t in tenants {
        let role = role_of(db, t);
        sql.push_str(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD '{t}-secret';
             GRANT CONNECT ON DATABASE {db} TO {role};
             GRANT USAGE ON SCHEMA tenant_{t} TO {role};
             GRANT SELECT, INSERT ON tenant_{t}.leads TO {role};
             GRANT USAGE ON SEQUENCE tenant_{t}.leads_id_seq TO {role};",
            db = db.name
        ));
        config.push_str(&format!(
            "[tenants.{t}]\nserver_user = \"{role}\"\nserver_password = \"{t}-secret\"\n"
        ));
    }
    su.batch_execute(&sql).await.unwrap();
    config
}

fn sqlstate_of(r: Result<Vec<SimpleQueryMessage>, tokio_postgres::Error>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => sqlstate(&e).unwrap_or_else(|| format!("no SQLSTATE: {e}")),
    }
}

/// The role PostgreSQL lists for a backend.
async fn usename(su: &tokio_postgres::Client, pid: &str) -> String {
    su.query_one(
        "SELECT usename::text FROM pg_stat_activity WHERE pid = $1::text::int",
        &[&pid],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_with_its_own_login_is_confined_by_postgresql() {
    let db = TestDb::create("login_iso", &["acme", "globex", "initech"]).await;
    let logins = tenant_roles(&db, &["acme", "globex"]).await;
    let (r_acme, r_globex) = (role_of(&db, "acme"), role_of(&db, "globex"));
    // Two server connections for three tenants of three logins: connections change login.
    let proxy = Proxy::start(db.config(
        2,
        &format!("{logins}[users.admin]\npassword = \"{ADMIN_PASSWORD}\"\ntenants = []\n"),
    ));
    let su = pg().superuser("postgres").await;

    let acme = proxy.connect("acme").await;
    assert_eq!(
        rows(
            &acme
                .simple_query("SELECT name FROM leads ORDER BY id")
                .await
                .unwrap()
        ),
        [["acme-1"], ["acme-2"]]
    );
    assert_eq!(
        rows(
            &acme
                .simple_query("SELECT session_user, current_user")
                .await
                .unwrap()
        ),
        [[r_acme.as_str(), r_acme.as_str()]]
    );
    acme.simple_query("INSERT INTO leads (name) VALUES ('acme-3')")
        .await
        .unwrap();
    let other = "SELECT * FROM tenant_globex.leads";
    assert_eq!(sqlstate_of(acme.simple_query(other).await), "42501");
    // The shared login's tenant is out of reach too.
    assert_eq!(
        sqlstate_of(
            acme.simple_query("SELECT * FROM tenant_initech.leads")
                .await
        ),
        "42501"
    );
    // No role to fall back to, and none to become.
    acme.simple_query("RESET ROLE").await.unwrap();
    assert_eq!(sqlstate_of(acme.simple_query(other).await), "42501");
    let set_role = format!("SET ROLE {r_globex}");
    assert_eq!(sqlstate_of(acme.simple_query(&set_role).await), "42501");
    assert_eq!(sqlstate_of(acme.simple_query(other).await), "42501");
    let set_owner = format!("SET ROLE {}", db.role);
    assert_eq!(sqlstate_of(acme.simple_query(&set_owner).await), "42501");
    assert_eq!(
        sqlstate_of(
            acme.simple_query(&format!(
                "BEGIN; RESET ROLE; SET SESSION AUTHORIZATION DEFAULT; {other}"
            ))
            .await
        ),
        "42501"
    );
    acme.simple_query("ROLLBACK").await.unwrap();
    assert_eq!(
        sqlstate_of(
            acme.simple_query(&format!("SET SESSION AUTHORIZATION {r_globex}"))
                .await
        ),
        "42501"
    );
    assert_eq!(sqlstate_of(acme.simple_query(other).await), "42501");

    // globex, with its own login, is confined the same way the other direction.
    let globex = proxy.connect("globex").await;
    assert_eq!(
        first(
            &globex
                .simple_query("SELECT min(name) FROM leads")
                .await
                .unwrap()
        ),
        "globex-1"
    );
    assert_eq!(
        sqlstate_of(globex.simple_query("SELECT * FROM tenant_acme.leads").await),
        "42501"
    );

    // A tenant without server_user in the same config keeps the shared login.
    let initech = proxy.connect("initech").await;
    assert_eq!(
        rows(
            &initech
                .simple_query("SELECT name FROM leads ORDER BY id")
                .await
                .unwrap()
        ),
        [["initech-1"], ["initech-2"]]
    );
    assert_eq!(
        first(&initech.simple_query("SELECT session_user").await.unwrap()),
        db.role
    );

    // Round after round on two connections, each tenant always runs as its own login.
    for _ in 0..5 {
        for (client, role) in [(&acme, &r_acme), (&globex, &r_globex), (&initech, &db.role)] {
            assert_eq!(
                &first(&client.simple_query("SELECT session_user").await.unwrap()),
                role
            );
        }
    }

    // PostgreSQL lists the backends under the login of the tenant using them, and the
    // admin console names that login in SHOW SERVERS and SHOW POOLS.
    acme.simple_query("BEGIN").await.unwrap();
    let acme_pid = first(&acme.simple_query("SELECT pg_backend_pid()").await.unwrap());
    initech.simple_query("BEGIN").await.unwrap();
    let initech_pid = first(
        &initech
            .simple_query("SELECT pg_backend_pid()")
            .await
            .unwrap(),
    );
    assert_eq!(usename(&su, &acme_pid).await, r_acme);
    assert_eq!(usename(&su, &initech_pid).await, db.role);
    let console = connect_str(&format!(
        "host=127.0.0.1 port={} user=admin password={ADMIN_PASSWORD} dbname=tenantpool",
        proxy.addr.port()
    ))
    .await;
    let servers = rows(&console.simple_query("SHOW SERVERS").await.unwrap());
    // PgBouncer's columns: type, user, database, ..., remote_pid (the 16th), ...
    let server = |pid: &str| {
        servers
            .iter()
            .find(|r| r[15] == pid)
            .unwrap_or_else(|| panic!("no server {pid} in {servers:?}"))
            .clone()
    };
    assert_eq!(server(&acme_pid)[1..3], [r_acme.clone(), "acme".into()]);
    assert_eq!(
        server(&initech_pid)[1..3],
        [db.role.clone(), "initech".into()]
    );
    let pools = rows(&console.simple_query("SHOW POOLS").await.unwrap());
    let pool_user = |t: &str| pools.iter().find(|r| r[0] == t).unwrap()[1].clone();
    assert_eq!(pool_user("acme"), r_acme);
    assert_eq!(pool_user("globex"), r_globex);
    assert_eq!(pool_user("initech"), db.role);
    acme.simple_query("COMMIT").await.unwrap();
    initech.simple_query("COMMIT").await.unwrap();

    // Never more than the pool's two connections, whatever their logins.
    let open: i64 = su
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = ANY($1) AND application_name <> $2",
            &[&vec![r_acme.clone(), r_globex.clone(), db.role.clone()], &OWNER_APP],
        )
        .await
        .unwrap()
        .get(0);
    assert!(open <= 2, "{open} server connections");
    assert!(proxy.shared.pools.default().snapshot().open <= 2);
    proxy.stop();
}

/// Three tenants with logins of their own and one on the shared login, two connections
/// each at most, four for all: under load PostgreSQL never sees more than a tenant's cap
/// of any login, nor more than four in all, and every transaction succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn caps_hold_across_logins_under_load() {
    let tenants = ["alpha", "beta", "gamma", "delta"];
    let db = Arc::new(TestDb::create("login_load", &tenants).await);
    let logins = tenant_roles(&db, &tenants[..3]).await;
    let mut roles: Vec<String> = tenants[..3].iter().map(|t| role_of(&db, t)).collect();
    roles.push(db.role.clone());
    let proxy = Proxy::start(db.config(
        4,
        &format!("[tenant_defaults]\nmax_server_connections = 2\n{logins}"),
    ));

    let stop = Arc::new(AtomicBool::new(false));
    // The most backends seen at once per role, and for all of them ("(all)").
    let sampler = {
        let (stop, roles) = (stop.clone(), roles.clone());
        tokio::spawn(async move {
            let su = pg().superuser("postgres").await;
            let mut peaks: HashMap<String, i64> = HashMap::new();
            let mut samples = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let counts = su
                    .query(
                        "SELECT usename::text, count(*) FROM pg_stat_activity \
                         WHERE usename = ANY($1) AND application_name <> $2 GROUP BY usename",
                        &[&roles, &OWNER_APP],
                    )
                    .await
                    .unwrap();
                let mut total = 0;
                for row in counts {
                    let n: i64 = row.get(1);
                    total += n;
                    let peak = peaks.entry(row.get(0)).or_default();
                    *peak = (*peak).max(n);
                }
                let peak = peaks.entry("(all)".into()).or_default();
                *peak = (*peak).max(total);
                samples += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (peaks, samples)
        })
    };

    let done: Arc<Vec<AtomicU64>> = Arc::new(tenants.iter().map(|_| AtomicU64::new(0)).collect());
    // Every client runs at least two transactions, then goes on for a few seconds.
    let until = Instant::now() + Duration::from_secs(3);
    let mut clients = Vec::new();
    for i in 0..40 {
        let ti = i % tenants.len();
        let (tenant, conn_str, done) = (tenants[ti], proxy.conn_str(tenants[ti]), done.clone());
        clients.push(tokio::spawn(async move {
            let c = connect_str(&conn_str).await;
            let mut n = 0u32;
            while n < 2 || Instant::now() < until {
                let sql = match n % 3 {
                    0 => "SELECT min(name) FROM leads",
                    1 => "SELECT min(name) FROM leads, pg_sleep(0.01)",
                    _ => "BEGIN; INSERT INTO leads (name) VALUES ('x'); SELECT min(name) FROM leads; COMMIT",
                };
                let got = c
                    .simple_query(sql)
                    .await
                    .unwrap_or_else(|e| panic!("{tenant}: {sql}: {e}"));
                assert_eq!(first(&got), format!("{tenant}-1"));
                done[ti].fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let (peaks, samples) = sampler.await.unwrap();
    assert!(samples > 50, "sampler too slow: {samples} samples");
    for role in &roles {
        let peak = peaks.get(role).copied().unwrap_or(0);
        assert!(
            (1..=2).contains(&peak),
            "{role}: {peak} backends at once ({peaks:?})"
        );
    }
    assert!(peaks["(all)"] <= 4, "{peaks:?}");
    for (t, n) in tenants.iter().zip(done.iter()) {
        assert!(
            n.load(Ordering::Relaxed) >= 20,
            "{t} made little progress: {done:?}"
        );
    }
    // Capacity moved between logins: connections were closed and opened for others.
    let connects = proxy
        .shared
        .pools
        .default()
        .stats
        .connects_ok
        .load(Ordering::Relaxed);
    assert!(
        connects > 4,
        "only {connects} server connections were opened"
    );
    let snap = proxy.shared.pools.default().snapshot();
    assert!(
        snap.open <= 4 && snap.in_use.iter().all(|&n| n == 0),
        "{snap:?}"
    );
    proxy.stop();
}
