//! The admin console against PgBouncer's: every SHOW command run against tenantpool and a
//! real PgBouncer (/usr/sbin/pgbouncer) in the same run, and the semantics of PAUSE, KILL,
//! RESUME, DISABLE/ENABLE, RECONNECT, WAIT_CLOSE, SET and stats_users, through psql and
//! through tokio-postgres (numbers arrive as numbers).

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use tokio_postgres::types::Type;

const ADMIN_PASSWORD: &str = "admin-secret";
const MONITOR_PASSWORD: &str = "monitor-secret";

fn console_extra(extra: &str) -> String {
    format!(
        "[proxy]\nadmin_users = [\"admin\"]\nstats_users = [\"monitor\"]\nstats_period = \"1s\"\n\
         [users.admin]\npassword = \"{ADMIN_PASSWORD}\"\ntenants = []\n\
         [users.monitor]\npassword = \"{MONITOR_PASSWORD}\"\ntenants = []\n{extra}"
    )
}

async fn console(proxy: &Proxy, user: &str) -> tokio_postgres::Client {
    let pw = if user == "admin" {
        ADMIN_PASSWORD
    } else {
        MONITOR_PASSWORD
    };
    connect_str(&format!(
        "host=127.0.0.1 port={} user={user} password={pw} dbname=pgbouncer",
        proxy.addr.port()
    ))
    .await
}

/// A PgBouncer in front of the test database (trust auth towards clients), stopped on drop.
struct PgBouncer {
    child: Child,
    port: u16,
    _dir: std::path::PathBuf,
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        stop_pgbouncer(&mut self.child, &self._dir);
    }
}

/// SIGTERM to PgBouncer itself (by its pidfile: under runuser the child is runuser), then
/// the child.
fn stop_pgbouncer(child: &mut Child, dir: &std::path::Path) {
    if let Ok(pid) = std::fs::read_to_string(dir.join("pgbouncer.pid")) {
        let _ = Command::new("kill").args(["-TERM", pid.trim()]).status();
        for _ in 0..100 {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn pgbouncer_bin() -> Option<&'static str> {
    let p = "/usr/sbin/pgbouncer";
    std::path::Path::new(p).exists().then_some(p)
}

fn start_pgbouncer(db: &TestDb) -> PgBouncer {
    let bin = pgbouncer_bin().expect("pgbouncer is installed (scripts/test.sh installs it)");
    let pg = pg();
    let dir = tempdir("tenantpool-pgbouncer");
    let port = free_port();
    let mut ini = String::from("[databases]\n");
    for t in &db.tenants {
        ini.push_str(&format!(
            "{t} = host={} port={} dbname={} user={} password={SERVER_PASSWORD}\n",
            pg.host, pg.port, db.name, db.role
        ));
    }
    ini.push_str(&format!(
        "[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
         auth_type = trust\nauth_file = {d}/users.txt\nadmin_users = admin\nstats_users = monitor\n\
         pool_mode = transaction\nstats_period = 1\nlogfile = {d}/pgbouncer.log\npidfile = {d}/pgbouncer.pid\n",
        d = dir.display()
    ));
    std::fs::write(dir.join("pgbouncer.ini"), ini).unwrap();
    std::fs::write(
        dir.join("users.txt"),
        format!("\"admin\" \"\"\n\"monitor\" \"\"\n\"{APP_USER}\" \"\"\n"),
    )
    .unwrap();
    // PgBouncer refuses to run as root: as postgres then (the harness's server user).
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let mut cmd = if root {
        Command::new("chmod")
            .args(["-R", "a+rwX"])
            .arg(&dir)
            .status()
            .unwrap();
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", bin]);
        c
    } else {
        Command::new(bin)
    };
    let mut child = cmd
        .arg(dir.join("pgbouncer.ini"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pgbouncer");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return PgBouncer {
                child,
                port,
                _dir: dir,
            };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stop_pgbouncer(&mut child, &dir);
    panic!(
        "pgbouncer did not start: {}",
        std::fs::read_to_string(dir.join("pgbouncer.log")).unwrap_or_default()
    );
}

/// A simple-protocol answer: columns (name, type OID) and rows as text, or the error.
struct Answer {
    cols: Vec<(String, u32)>,
    rows: Vec<Vec<Option<String>>>,
    error: Option<String>,
}

impl Answer {
    fn col(&self, name: &str) -> usize {
        self.cols
            .iter()
            .position(|c| c.0 == name)
            .unwrap_or_else(|| panic!("no column {name}: {:?}", self.cols))
    }
    fn value(&self, key_col: &str, key: &str, col: &str) -> String {
        let (k, c) = (self.col(key_col), self.col(col));
        let r = self
            .rows
            .iter()
            .find(|r| r[k].as_deref() == Some(key))
            .unwrap_or_else(|| panic!("no row {key}"));
        r[c].clone().unwrap_or_default()
    }
}

async fn raw_console(addr: SocketAddr) -> Raw {
    let mut r = Raw::connect(addr).await;
    r.send(&startup_packet(&[
        ("user", "admin"),
        ("database", "pgbouncer"),
    ]))
    .await;
    let msgs = r.until_ready().await;
    assert!(msgs.iter().any(|m| m.tag == b'R'), "{msgs:?}");
    r
}

async fn simple(r: &mut Raw, sql: &str) -> Answer {
    r.send(&query(sql)).await;
    let mut a = Answer {
        cols: Vec::new(),
        rows: Vec::new(),
        error: None,
    };
    for m in r.until_ready().await {
        match m.tag {
            b'T' => {
                let b = &m.body;
                let n = u16::from_be_bytes([b[0], b[1]]) as usize;
                let mut i = 2;
                for _ in 0..n {
                    let end = i + b[i..].iter().position(|&c| c == 0).unwrap();
                    let name = String::from_utf8_lossy(&b[i..end]).into_owned();
                    i = end + 1;
                    let oid = u32::from_be_bytes([b[i + 6], b[i + 7], b[i + 8], b[i + 9]]);
                    i += 18;
                    a.cols.push((name, oid));
                }
            }
            b'D' => {
                let b = &m.body;
                let n = u16::from_be_bytes([b[0], b[1]]) as usize;
                let mut i = 2;
                let mut row = Vec::new();
                for _ in 0..n {
                    let len = i32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
                    i += 4;
                    if len < 0 {
                        row.push(None);
                    } else {
                        let len = len as usize;
                        row.push(Some(String::from_utf8_lossy(&b[i..i + len]).into_owned()));
                        i += len;
                    }
                }
                a.rows.push(row);
            }
            b'E' => a.error = m.field(b'M'),
            _ => {}
        }
    }
    a
}

const NUMERIC_OIDS: [u32; 7] = [20, 21, 23, 26, 700, 701, 1700];

const SHOW: [&str; 14] = [
    "STATS",
    "POOLS",
    "DATABASES",
    "LISTS",
    "CONFIG",
    "VERSION",
    "USERS",
    "MEM",
    "TOTALS",
    "STATS_TOTALS",
    "STATS_AVERAGES",
    "STATE",
    "SERVERS",
    "CLIENTS",
];

/// Commands whose rows are per database in PgBouncer (the column naming it).
fn per_database(cmd: &str) -> Option<&'static str> {
    match cmd {
        "STATS" | "POOLS" | "STATS_TOTALS" | "STATS_AVERAGES" => Some("database"),
        "DATABASES" => Some("name"),
        _ => None,
    }
}

/// Runs `SELECT 1` `n` times through `conn`.
async fn traffic(conn: &tokio_postgres::Client, n: usize) {
    for _ in 0..n {
        conn.simple_query("SELECT 1").await.unwrap();
    }
}

/// A console client may send its first query in the same write as its StartupMessage
/// (trust): the proxy reads what is there at login and the console session gets the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_query_pipelined_with_the_login_is_answered() {
    let db = TestDb::create("console_pipelined", &["acme"]).await;
    let proxy = Proxy::start(db.config(
        1,
        "[proxy]\nauth_method = \"trust\"\nadmin_users = [\"admin\"]\n\
         [users.admin]\npassword = \"x\"\ntenants = []\n",
    ));
    let mut r = Raw::connect(proxy.addr).await;
    let mut bytes = startup_packet(&[("user", "admin"), ("database", "pgbouncer")]);
    bytes.extend_from_slice(&query("SHOW VERSION"));
    r.send(&bytes).await;
    let login = r.until_ready().await;
    assert!(login.iter().all(|m| m.tag != b'E'), "login failed");
    let answer = r.until_ready().await;
    assert!(
        answer.iter().any(|m| m.tag == b'D'),
        "no row for SHOW VERSION"
    );
    proxy.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_commands_match_pgbouncer() {
    let db = TestDb::create("console_parity", &["acme", "globex"]).await;
    let proxy = Proxy::start(db.config(4, &console_extra("")));
    let bouncer = start_pgbouncer(&db);
    let bouncer_addr: SocketAddr = format!("127.0.0.1:{}", bouncer.port).parse().unwrap();
    let mut theirs = raw_console(bouncer_addr).await;
    let ours = console(&proxy, "admin").await;
    let mut ours_raw_text = Vec::new();

    // Some traffic on both, so that pools, servers and clients exist.
    let app = proxy.connect("acme").await;
    traffic(&app, 3).await;
    let via_bouncer = connect_str(&format!(
        "host=127.0.0.1 port={} user={APP_USER} dbname=acme",
        bouncer.port
    ))
    .await;
    traffic(&via_bouncer, 3).await;

    for cmd in SHOW {
        let sql = format!("SHOW {cmd}");
        let pgb = simple(&mut theirs, &sql).await;
        // Ours through the extended protocol: the types tokio-postgres sees.
        let stmt = ours
            .prepare(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let our_cols: Vec<(String, Type)> = stmt
            .columns()
            .iter()
            .map(|c| (c.name().to_string(), c.type_().clone()))
            .collect();
        let rows = ours.query(&stmt, &[]).await.unwrap();
        ours_raw_text.push((cmd, rows.len()));
        if let Some(e) = &pgb.error {
            // SHOW STATE came with PgBouncer 1.21; the installed one may be older.
            assert_eq!(cmd, "STATE", "PgBouncer refused {sql}: {e}");
            assert!(our_cols.iter().any(|c| c.0 == "key"));
            continue;
        }
        for (name, oid) in &pgb.cols {
            let ours = our_cols
                .iter()
                .find(|c| &c.0 == name)
                .unwrap_or_else(|| panic!("{sql}: tenantpool lacks PgBouncer's column {name}"));
            if NUMERIC_OIDS.contains(oid) {
                assert!(
                    [Type::INT2, Type::INT4, Type::INT8, Type::NUMERIC].contains(&ours.1),
                    "{sql}: {name} is numeric ({oid}) in PgBouncer, {} in tenantpool",
                    ours.1
                );
            }
        }
        if let Some(key) = per_database(cmd) {
            let i = pgb.col(key);
            let theirs_dbs: Vec<_> = pgb.rows.iter().filter_map(|r| r[i].clone()).collect();
            let ours_dbs: Vec<String> = rows.iter().map(|r| r.get::<_, String>(key)).collect();
            assert!(
                theirs_dbs.iter().any(|d| d == "acme"),
                "{sql}: {theirs_dbs:?}"
            );
            for d in theirs_dbs.iter().filter(|d| *d != "pgbouncer") {
                assert!(
                    ours_dbs.contains(d),
                    "{sql}: PgBouncer's {d} row: {ours_dbs:?}"
                );
            }
            for t in ["acme", "globex"] {
                assert!(
                    ours_dbs.iter().any(|d| d == t),
                    "{sql}: a row per tenant: {ours_dbs:?}"
                );
            }
        }
    }

    // Numbers move with traffic, on both, and arrive as numbers.
    let our_xacts = |rows: &[tokio_postgres::Row]| -> i64 {
        rows.iter()
            .find(|r| r.get::<_, String>("database") == "acme")
            .unwrap()
            .get::<_, i64>("total_xact_count")
    };
    let before = our_xacts(&ours.query("SHOW STATS", &[]).await.unwrap());
    let theirs_before: i64 = simple(&mut theirs, "SHOW STATS")
        .await
        .value("database", "acme", "total_xact_count")
        .parse()
        .unwrap();
    traffic(&app, 5).await;
    traffic(&via_bouncer, 5).await;
    let after = our_xacts(&ours.query("SHOW STATS", &[]).await.unwrap());
    assert!(after >= before + 5, "{before} -> {after}");
    // PgBouncer counts at its stats_period; wait for it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let theirs_after: i64 = simple(&mut theirs, "SHOW STATS")
        .await
        .value("database", "acme", "total_xact_count")
        .parse()
        .unwrap();
    assert!(theirs_after >= theirs_before + 5);

    // Averages over the last stats_period (1s here) follow steady traffic.
    let busy = proxy.connect("acme").await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let load = tokio::spawn(async move {
        while !s.load(std::sync::atomic::Ordering::Relaxed) {
            busy.simple_query("SELECT 1").await.unwrap();
        }
    });
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let avg = ours.query("SHOW STATS_AVERAGES", &[]).await.unwrap();
    let acme = avg
        .iter()
        .find(|r| r.get::<_, String>("database") == "acme")
        .unwrap();
    assert!(acme.get::<_, i64>("xact_count") > 0, "{acme:?}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.await.unwrap();

    let pools = ours.query("SHOW POOLS", &[]).await.unwrap();
    let cl_active: i64 = pools
        .iter()
        .find(|r| r.get::<_, String>("database") == "acme")
        .unwrap()
        .get("cl_active");
    assert!(cl_active >= 1, "cl_active counts acme's logged-in clients");
    let totals = ours.query("SHOW TOTALS", &[]).await.unwrap();
    assert!(
        totals
            .iter()
            .any(|r| r.get::<_, String>("name") == "total_xact_count"
                && r.get::<_, i64>("value") >= 8)
    );
    let config = ours.query("SHOW CONFIG", &[]).await.unwrap();
    let auth = config
        .iter()
        .find(|r| r.get::<_, String>("key") == "auth_method")
        .unwrap();
    assert_eq!(auth.get::<_, String>("value"), "scram-sha-256");
    assert_eq!(auth.get::<_, String>("default"), "scram-sha-256");
    for key in [
        "server.max_connections",
        "limits.query_wait_timeout",
        "tenant_defaults.search_path",
        "stats_users",
    ] {
        assert!(
            config.iter().any(|r| r.get::<_, String>("key") == key),
            "SHOW CONFIG lacks {key}"
        );
    }

    // psql, simple protocol: the same answers.
    let out = psql_console(proxy.addr.port(), "admin", ADMIN_PASSWORD, "SHOW STATS;");
    assert!(out.lines().any(|l| l.starts_with("acme|")), "{out}");
    let out = psql_console(proxy.addr.port(), "admin", ADMIN_PASSWORD, "SHOW LISTS;");
    assert!(out.contains("databases|2"), "{out}");
}

/// psql on the console: unaligned, tuples only.
fn psql_console(port: u16, user: &str, password: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={port} user={user} password={password} dbname=pgbouncer"
        ))
        .args(["-X", "-q", "-A", "-t", "-c", sql])
        .output()
        .expect("run psql");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn err_code(c: &tokio_postgres::Client, sql: &str) -> String {
    let e = c
        .simple_query(sql)
        .await
        .expect_err(&format!("{sql} should fail"));
    sqlstate(&e).unwrap_or_else(|| panic!("{sql}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_waits_for_servers_and_resume_errors() {
    let db = TestDb::create("console_pause", &["acme", "globex"]).await;
    // min_idle 1: the pool keeps a connection open, except under a PAUSE of everything.
    let proxy = Proxy::start(db.config(2, &console_extra("[server]\nmin_idle = 1\n")));
    let admin = std::sync::Arc::new(console(&proxy, "admin").await);
    let acme = proxy.connect("acme").await;

    acme.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let a = admin.clone();
    let pause = tokio::spawn(async move { a.simple_query("PAUSE acme").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !pause.is_finished(),
        "PAUSE answers only once acme's server connection is back"
    );
    acme.batch_execute("COMMIT").await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), pause)
        .await
        .expect("PAUSE answered after COMMIT")
        .unwrap()
        .unwrap();
    let state = admin.query("SHOW DATABASES", &[]).await.unwrap();
    let row = state
        .iter()
        .find(|r| r.get::<_, String>("name") == "acme")
        .unwrap();
    assert_eq!(row.get::<_, i64>("paused"), 1);
    // A transaction now waits until RESUME.
    let held = tokio::spawn(async move {
        acme.simple_query("SELECT 1").await.unwrap();
        acme
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!held.is_finished());
    admin.simple_query("RESUME acme").await.unwrap();
    let acme = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .unwrap()
        .unwrap();

    // RESUME of what is not paused: an error, as PgBouncer.
    assert_eq!(err_code(&admin, "RESUME acme").await, "55000");
    assert_eq!(err_code(&admin, "RESUME").await, "55000");
    assert_eq!(err_code(&admin, "PAUSE nope").await, "3D000");
    let out = psql_console(proxy.addr.port(), "admin", ADMIN_PASSWORD, "RESUME globex;");
    assert!(out.contains("tenant globex is not paused"), "{out}");

    // PAUSE of everything: answered once no server connection is open (PgBouncer's PAUSE,
    // for a PostgreSQL restart), and none is opened for min_idle meanwhile; then RESUME.
    let su = pg().superuser("postgres").await;
    assert!(db.backends(&su).await > 0);
    admin.simple_query("PAUSE").await.unwrap();
    assert_eq!(db.backends(&su).await, 0);
    let state = admin.query("SHOW STATE", &[]).await.unwrap();
    assert!(
        state
            .iter()
            .any(|r| r.get::<_, String>("key") == "paused" && r.get::<_, String>("value") == "yes")
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(db.backends(&su).await, 0, "min_idle waits for RESUME");
    admin.simple_query("RESUME").await.unwrap();
    acme.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_blocks_until_resume_and_disable_refuses_logins() {
    let db = TestDb::create("console_kill", &["acme", "globex"]).await;
    let proxy = Proxy::start(db.config(2, &console_extra("")));
    let admin = console(&proxy, "admin").await;
    let old = proxy.connect("acme").await;
    old.simple_query("SELECT 1").await.unwrap();

    admin.simple_query("KILL acme").await.unwrap();
    let e = old.simple_query("SELECT 1").await.expect_err("killed");
    assert!(
        sqlstate(&e).as_deref() == Some("57P01") || e.is_closed(),
        "{e}"
    );
    // A new client logs in, but its transactions wait until RESUME.
    let new = proxy.connect("acme").await;
    let held = tokio::spawn(async move { new.simple_query("SELECT 1").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !held.is_finished(),
        "KILL holds new connections until RESUME"
    );
    // Other tenants go on.
    proxy
        .connect("globex")
        .await
        .simple_query("SELECT 1")
        .await
        .unwrap();
    admin.simple_query("RESUME acme").await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    // DISABLE: new logins refused (55000) until ENABLE; ENABLE twice is an error.
    admin.simple_query("DISABLE acme").await.unwrap();
    let e = tokio_postgres::connect(&proxy.conn_str("acme"), tokio_postgres::NoTls)
        .await
        .err()
        .expect("disabled");
    assert_eq!(sqlstate(&e).as_deref(), Some("55000"), "{e}");
    let dbs = admin.query("SHOW DATABASES", &[]).await.unwrap();
    assert!(
        dbs.iter()
            .any(|r| r.get::<_, String>("name") == "acme" && r.get::<_, i64>("disabled") == 1)
    );
    admin.simple_query("ENABLE acme").await.unwrap();
    proxy
        .connect("acme")
        .await
        .simple_query("SELECT 1")
        .await
        .unwrap();
    assert_eq!(err_code(&admin, "ENABLE acme").await, "55000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_wait_close_set_and_stats_users() {
    let db = TestDb::create("console_reconnect", &["acme"]).await;
    let proxy = Proxy::start(db.config(1, &console_extra("")));
    let admin = console(&proxy, "admin").await;
    let acme = proxy.connect("acme").await;
    let pid = |rows: Vec<tokio_postgres::SimpleQueryMessage>| -> String {
        rows.into_iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap().to_string()),
                _ => None,
            })
            .unwrap()
    };
    let first = pid(acme.simple_query("SELECT pg_backend_pid()").await.unwrap());
    assert_eq!(
        first,
        pid(acme.simple_query("SELECT pg_backend_pid()").await.unwrap())
    );
    // RECONNECT while a transaction holds the connection: it is closed when given back.
    acme.batch_execute("BEGIN").await.unwrap();
    acme.simple_query("SELECT 1").await.unwrap();
    admin.simple_query("RECONNECT acme").await.unwrap();
    let wait = tokio::spawn(async move {
        let admin = admin;
        admin.simple_query("WAIT_CLOSE acme").await.unwrap();
        admin
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !wait.is_finished(),
        "WAIT_CLOSE waits for the old connection"
    );
    acme.batch_execute("COMMIT").await.unwrap();
    let admin = tokio::time::timeout(Duration::from_secs(5), wait)
        .await
        .unwrap()
        .unwrap();
    let second = pid(acme.simple_query("SELECT pg_backend_pid()").await.unwrap());
    assert_ne!(first, second, "a new server connection after RECONNECT");

    // SET: reloadable keys, PgBouncer's names too; others refused.
    admin
        .simple_query("SET query_wait_timeout = 7")
        .await
        .unwrap();
    admin
        .simple_query("SET tenant_defaults.max_client_connections = '300'")
        .await
        .unwrap();
    let config = admin.query("SHOW CONFIG", &[]).await.unwrap();
    let value = |k: &str| {
        config
            .iter()
            .find(|r| r.get::<_, String>("key") == k)
            .unwrap()
            .get::<_, String>("value")
    };
    assert_eq!(value("limits.query_wait_timeout"), "7s");
    assert_eq!(value("tenant_defaults.max_client_connections"), "300");
    assert_eq!(err_code(&admin, "SET listen = '0.0.0.0:1'").await, "22023");
    assert_eq!(err_code(&admin, "SET bogus = 1").await, "22023");
    assert_eq!(
        err_code(&admin, "SET max_client_conn = lots").await,
        "22023"
    );

    // stats_users: SHOW only.
    let monitor = console(&proxy, "monitor").await;
    let stats = monitor.query("SHOW STATS", &[]).await.unwrap();
    assert!(stats[0].get::<_, i64>("total_xact_count") >= 3);
    assert_eq!(err_code(&monitor, "PAUSE").await, "42501");
    assert_eq!(err_code(&monitor, "SET max_client_conn = 5").await, "42501");
    let out = psql_console(
        proxy.addr.port(),
        "monitor",
        MONITOR_PASSWORD,
        "SHOW POOLS;",
    );
    assert!(out.lines().any(|l| l.starts_with("acme|")), "{out}");
    // An app user may not open the console at all.
    let e = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user={APP_USER} password={APP_PASSWORD} dbname=pgbouncer",
            proxy.addr.port()
        ),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(sqlstate(&e).as_deref(), Some("28000"));
}

/// A client that stops in the middle of its first message holds no server connection, but
/// it is not out of reach: KILL and shutdown end it as they end an idle client, and
/// `message_timeout` cuts it off. (Each wait below would otherwise last until the client
/// sends more: `recv` gives up after 30 s and the test fails.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stopped_in_the_middle_of_a_message_is_still_reached() {
    let db = TestDb::create("console_mid_message", &["acme"]).await;
    let fatal = |msgs: &[Msg]| {
        let e = msgs
            .iter()
            .find(|m| m.tag == b'E')
            .unwrap_or_else(|| panic!("no error: {msgs:?}"));
        assert_eq!(e.field(b'V').as_deref(), Some("FATAL"), "{msgs:?}");
        e.field(b'C').unwrap()
    };
    let mut half = query("SELECT 1");
    half.truncate(7);

    // message_timeout off: only KILL and shutdown can end it.
    let extra = console_extra("").replacen(
        "[proxy]\n",
        "[proxy]\nauth_method = \"trust\"\nshutdown_timeout = \"60s\"\n",
        1,
    ) + "[limits]\nmessage_timeout = \"0\"\n";
    let proxy = Proxy::start(db.config(1, &extra));
    let admin = console(&proxy, "admin").await;
    let mut r = Raw::login(proxy.addr, "acme").await;
    r.send(&half).await;
    // Let the proxy read the half message before KILL.
    tokio::time::sleep(Duration::from_millis(200)).await;
    admin.simple_query("KILL acme").await.unwrap();
    assert_eq!(fatal(&r.until_eof().await), "57P01");
    admin.simple_query("RESUME acme").await.unwrap();

    let mut r = Raw::login(proxy.addr, "acme").await;
    r.send(&half).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.shutdown();
    assert_eq!(fatal(&r.until_eof().await), "57P01");
    assert!(proxy.stopped_within(Duration::from_secs(20)).await);
    drop(admin);
    proxy.stop();

    // message_timeout on: the half message is given up on.
    let extra = console_extra("").replacen("[proxy]\n", "[proxy]\nauth_method = \"trust\"\n", 1)
        + "[limits]\nmessage_timeout = \"500ms\"\n";
    let proxy = Proxy::start(db.config(1, &extra));
    let mut r = Raw::login(proxy.addr, "acme").await;
    r.send(&half).await;
    assert_eq!(fatal(&r.until_eof().await), "08P01");
    // And a whole message after a pause shorter than the limit is served.
    let mut r = Raw::login(proxy.addr, "acme").await;
    let whole = query("SELECT 1");
    r.send(&whole[..7]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    r.send(&whole[7..]).await;
    assert_eq!(first_column(&r.until_ready().await), vec!["1"]);
    proxy.stop();
}
