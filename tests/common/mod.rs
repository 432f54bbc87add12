//! Test harness: one throwaway PostgreSQL cluster per test binary (SCRAM auth, free port),
//! a database and server role per test, and an in-process tenantpool in front of it.
//!
//! Set `TENANTPOOL_TEST_PG="host=H port=P user=U password=W"` (a superuser) to use an
//! existing server instead of starting one.

#![allow(dead_code)]

/// The proxy runs in-process here: with the allocator the `tenantpool` binary installs.
#[global_allocator]
static ALLOC: tenantpool::slab::SlabAlloc = tenantpool::slab::SlabAlloc::new();

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tenantpool::config::Config;

/// Where the test PostgreSQL listens, and its superuser.
pub struct Pg {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    /// The CA that signed the server's TLS certificate (which names `localhost` only);
    /// `ca=PATH` in `TENANTPOOL_TEST_PG` for an existing server.
    pub ca_file: Option<PathBuf>,
    /// The cluster this test process started (none with `TENANTPOOL_TEST_PG`).
    cluster: Option<Cluster>,
    _child: Option<Mutex<Child>>,
}

/// What it takes to stop and start the harness's own cluster again.
struct Cluster {
    bin: PathBuf,
    data: PathBuf,
    dir: PathBuf,
    /// The postgres options it runs with (port, socket directory, settings).
    options: String,
    root: bool,
}

static PG: OnceLock<Pg> = OnceLock::new();
static SECOND_PG: OnceLock<Pg> = OnceLock::new();

pub fn pg() -> &'static Pg {
    PG.get_or_init(start_pg)
}

/// A second PostgreSQL cluster of this test process's own (always a local throwaway one,
/// even with `TENANTPOOL_TEST_PG`), for tenants on another server.
pub fn second_pg() -> &'static Pg {
    SECOND_PG.get_or_init(start_cluster)
}

pub fn pg_bin() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed (/usr/lib/postgresql); run .ci/run or apt-get install postgresql")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("postgres").exists())
        .collect();
    dirs.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop().expect("no PostgreSQL server binaries found")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn start_pg() -> Pg {
    if let Ok(spec) = std::env::var("TENANTPOOL_TEST_PG") {
        let mut pg = Pg {
            host: "127.0.0.1".into(),
            port: 5432,
            user: "postgres".into(),
            password: String::new(),
            ca_file: None,
            cluster: None,
            _child: None,
        };
        for kv in spec.split_whitespace() {
            if let Some((k, v)) = kv.split_once('=') {
                match k {
                    "host" => pg.host = v.into(),
                    "port" => pg.port = v.parse().expect("port"),
                    "user" => pg.user = v.into(),
                    "password" => pg.password = v.into(),
                    "ca" => pg.ca_file = Some(v.into()),
                    _ => {}
                }
            }
        }
        return pg;
    }
    start_cluster()
}

/// A throwaway cluster: initdb, SCRAM, TLS, on a free port; removed when the process ends.
fn start_cluster() -> Pg {
    let bin = pg_bin();
    let dir = tempdir("tenantpool-test-pg");
    let root = is_root();
    let password = "test-superuser-secret";
    let pwfile = dir.join("pw");
    std::fs::write(&pwfile, password).unwrap();
    let data = dir.join("data");
    // TLS: a certificate for localhost signed by the tests' CA; the key readable by the
    // server only (PostgreSQL insists).
    let (server_crt, server_key) =
        test_ca().issue(&dir, "server", "localhost", &["DNS:localhost"], false);
    chmod(&server_key, 0o600);
    if root {
        chmod(&dir, 0o755);
        chmod(&pwfile, 0o644);
        let st = Command::new("chown")
            .args(["-R", "postgres"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(st.success());
    }
    let as_user = |cmd: &str| -> Command {
        if root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", cmd]);
            c
        } else {
            Command::new(cmd)
        }
    };
    let out = as_user(bin.join("initdb").to_str().unwrap())
        .arg("-D")
        .arg(&data)
        .args(["-U", "postgres", "-A", "scram-sha-256", "--no-sync"])
        .arg(format!("--pwfile={}", pwfile.display()))
        .output()
        .expect("initdb");
    assert!(
        out.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = free_port();
    let options = format!(
        "-p {port} -k '{dir}' -c listen_addresses=127.0.0.1 -c max_connections=300 \
         -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
         -c ssl=on -c ssl_cert_file='{crt}' -c ssl_key_file='{key}'",
        dir = dir.display(),
        crt = server_crt.display(),
        key = server_key.display(),
    );
    // The server runs under a shell that stops it and removes the cluster when this test
    // process exits (its stdin, our pipe, then reaches EOF). It stops whatever postmaster
    // runs on the data directory then: a test may have restarted it (`Pg::start`).
    let script = format!(
        "'{postgres}' -D '{data}' {options} > '{dir}/postgres.log' 2>&1 & pid=$!; \
         read _unused; '{pg_ctl}' -D '{data}' -m fast -w stop > /dev/null 2>&1; wait $pid; \
         rm -rf '{dir}'",
        postgres = bin.join("postgres").display(),
        pg_ctl = bin.join("pg_ctl").display(),
        data = data.display(),
        dir = dir.display(),
    );
    let child = as_user("sh")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start postgres");
    let pg = Pg {
        host: "127.0.0.1".into(),
        port,
        user: "postgres".into(),
        password: password.into(),
        ca_file: Some(test_ca().crt.clone()),
        cluster: Some(Cluster {
            bin: bin.clone(),
            data,
            dir: dir.clone(),
            options,
            root,
        }),
        _child: Some(Mutex::new(child)),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ok = Command::new(bin.join("pg_isready"))
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "PostgreSQL did not start; see {}/postgres.log",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    pg
}

/// A certificate authority for the tests, made with the openssl command.
pub struct TestCa {
    pub crt: PathBuf,
    key: PathBuf,
}

static CA: OnceLock<TestCa> = OnceLock::new();

/// The tests' CA (one per test process).
pub fn test_ca() -> &'static TestCa {
    CA.get_or_init(|| TestCa::new(&tempdir("tenantpool-test-ca"), "tenantpool test CA"))
}

/// Runs a shell command in `dir`, panicking with its output when it fails.
fn sh(dir: &std::path::Path, cmd: &str) {
    let out = Command::new("sh")
        .args(["-c", cmd])
        .current_dir(dir)
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestCa {
    /// A new CA in `dir` (another one than [`test_ca`] when a test needs a stranger).
    pub fn new(dir: &std::path::Path, name: &str) -> TestCa {
        sh(
            dir,
            &format!(
                "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
                 -subj '/CN={name}' -days 3650 -keyout ca.key -out ca.crt \
                 -addext basicConstraints=critical,CA:TRUE \
                 -addext keyUsage=critical,keyCertSign,cRLSign"
            ),
        );
        TestCa {
            crt: dir.join("ca.crt"),
            key: dir.join("ca.key"),
        }
    }

    /// A certificate and key in `dir`, files `<file>.crt`/`<file>.key`, with common name
    /// `cn` and subject alternative names `sans` (`DNS:x`, `IP:y`), for a server or (with
    /// `client`) a client.
    pub fn issue(
        &self,
        dir: &std::path::Path,
        file: &str,
        cn: &str,
        sans: &[&str],
        client: bool,
    ) -> (PathBuf, PathBuf) {
        let usage = if client { "clientAuth" } else { "serverAuth" };
        let san = if sans.is_empty() {
            String::new()
        } else {
            format!("subjectAltName={}\n", sans.join(","))
        };
        std::fs::write(
            dir.join(format!("{file}.ext")),
            format!("[v3]\nbasicConstraints=CA:FALSE\nextendedKeyUsage={usage}\n{san}"),
        )
        .unwrap();
        sh(
            dir,
            &format!(
                "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
                 -subj '/CN={cn}' -keyout {file}.key -out {file}.csr && \
                 openssl x509 -req -in {file}.csr -CA '{ca}' -CAkey '{cakey}' -set_serial {serial} \
                 -days 365 -extfile {file}.ext -extensions v3 -out {file}.crt",
                ca = self.crt.display(),
                cakey = self.key.display(),
                // Unique without a serial file that tests issuing at once would share.
                serial = rand::random::<u32>(),
            ),
        );
        (
            dir.join(format!("{file}.crt")),
            dir.join(format!("{file}.key")),
        )
    }
}

fn chmod(p: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

pub fn tempdir(prefix: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&p).unwrap();
    p
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Pg {
    pub fn conn_str(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "host={} port={} user={user} password={password} dbname={db}",
            self.host, self.port
        )
    }

    /// The directory of the server's Unix socket (`socket=DIR` in `TENANTPOOL_TEST_PG` for
    /// an existing server).
    pub fn socket_dir(&self) -> Option<PathBuf> {
        match &self.cluster {
            Some(c) => Some(c.dir.clone()),
            None => std::env::var("TENANTPOOL_TEST_PG").ok().and_then(|spec| {
                spec.split_whitespace()
                    .find_map(|kv| kv.strip_prefix("socket=").map(PathBuf::from))
            }),
        }
    }

    /// Can this test process stop and start the server (it started it itself)?
    pub fn controllable(&self) -> bool {
        self.cluster.is_some()
    }

    /// Runs pg_ctl on the harness's cluster (as the postgres user when root).
    fn pg_ctl(&self, args: &[&str]) {
        let c = self
            .cluster
            .as_ref()
            .expect("the cluster was not started by this test process");
        let pg_ctl = c.bin.join("pg_ctl");
        let mut cmd = if c.root {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(&pg_ctl);
            cmd
        } else {
            Command::new(&pg_ctl)
        };
        let out = cmd
            .arg("-D")
            .arg(&c.data)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run pg_ctl");
        assert!(
            out.status.success(),
            "pg_ctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the server (`-m fast`: sessions are terminated) and waits until it is gone.
    pub fn stop(&self) {
        self.pg_ctl(&["-m", "fast", "-w", "stop"]);
    }

    /// Starts the stopped server again with the same options, without waiting for it to
    /// accept connections (see [`Pg::wait_ready`]).
    pub fn start(&self) {
        let c = self.cluster.as_ref().expect("own cluster");
        let log = c.dir.join("postgres.log");
        self.pg_ctl(&["-W", "-l", log.to_str().unwrap(), "-o", &c.options, "start"]);
    }

    /// Stops and starts the server (`-m fast`), waiting until it accepts connections.
    pub fn restart(&self) {
        self.stop();
        self.start();
        self.wait_ready();
    }

    /// Does the server accept a login now?
    pub async fn accepts(&self) -> bool {
        let s = self.conn_str(&self.user, &self.password, "postgres");
        match tokio_postgres::connect(&s, tokio_postgres::NoTls).await {
            Ok((client, conn)) => {
                drop(client);
                let _ = conn.await;
                true
            }
            Err(_) => false,
        }
    }

    /// Waits (up to a minute) until the server accepts connections.
    pub fn wait_ready(&self) {
        let bin = &self.cluster.as_ref().expect("own cluster").bin;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !Command::new(bin.join("pg_isready"))
            .args(["-h", &self.host, "-p", &self.port.to_string(), "-q"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
        {
            assert!(Instant::now() < deadline, "PostgreSQL did not come back");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A direct (not proxied) connection as the superuser.
    pub async fn superuser(&self, db: &str) -> tokio_postgres::Client {
        connect_str(&self.conn_str(&self.user, &self.password, db)).await
    }
}

pub async fn connect_str(s: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(s, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {s}: {e:?}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// application_name of the tests' direct connections, which backend counts leave out.
pub const OWNER_APP: &str = "test_owner";
pub const SERVER_PASSWORD: &str = "server-secret";
pub const APP_USER: &str = "app";
pub const APP_PASSWORD: &str = "app-secret";

/// A database of its own for one test, owned by a server role of its own, with one schema
/// `tenant_<name>` per tenant holding a `leads(id, name)` table whose rows name the tenant.
pub struct TestDb {
    pub name: String,
    /// The role tenantpool logs in as (only this test's proxy uses it).
    pub role: String,
    pub tenants: Vec<String>,
}

static DB_SEQ: AtomicU32 = AtomicU32::new(0);

/// A database `db` owned by `role` (made with password [`SERVER_PASSWORD`] unless it exists)
/// on `pg`, with one schema `tenant_<t>` per tenant holding a `leads(id, name)` table whose
/// rows are named `<prefix(t)>-1` and `<prefix(t)>-2`.
pub async fn tenant_database(
    pg: &Pg,
    db: &str,
    role: &str,
    tenants: &[&str],
    prefix: impl Fn(&str) -> String,
) {
    let su = pg.superuser("postgres").await;
    su.batch_execute(&format!(
        "DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN \
         CREATE ROLE {role} LOGIN PASSWORD '{SERVER_PASSWORD}'; END IF; END$$"
    ))
    .await
    .unwrap();
    // Not in the same string: CREATE DATABASE cannot run in a transaction block.
    su.batch_execute(&format!("CREATE DATABASE {db} OWNER {role}"))
        .await
        .unwrap();
    let owner = connect_str(&format!(
        "{} application_name={OWNER_APP}",
        pg.conn_str(role, SERVER_PASSWORD, db)
    ))
    .await;
    for t in tenants {
        let p = prefix(t);
        owner
            .batch_execute(&format!(
                "CREATE SCHEMA tenant_{t};
                 CREATE TABLE tenant_{t}.leads (id serial PRIMARY KEY, name text NOT NULL);
                 INSERT INTO tenant_{t}.leads (name) VALUES ('{p}-1'), ('{p}-2');"
            ))
            .await
            .unwrap();
    }
}

impl TestDb {
    pub async fn create(test: &str, tenants: &[&str]) -> TestDb {
        let pg = pg();
        let n = DB_SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("t_{test}_{n}_{}", std::process::id());
        let role = format!("r_{test}_{n}_{}", std::process::id());
        tenant_database(pg, &name, &role, tenants, |t| t.to_string()).await;
        TestDb {
            name,
            role,
            tenants: tenants.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// A direct connection as the owner role (bypassing the proxy).
    pub async fn owner(&self) -> tokio_postgres::Client {
        let s = pg().conn_str(&self.role, SERVER_PASSWORD, &self.name);
        connect_str(&format!("{s} application_name={OWNER_APP}")).await
    }

    /// A config for a proxy in front of this database; `extra` is merged in as TOML.
    pub fn config(&self, max_connections: u32, extra: &str) -> Config {
        let text = self.config_text(max_connections, extra);
        Config::parse(&text).unwrap_or_else(|e| panic!("test config: {e}\n{text}"))
    }

    /// The TOML text of [`TestDb::config`].
    pub fn config_text(&self, max_connections: u32, extra: &str) -> String {
        let pg = pg();
        let mut text = format!(
            r#"
[proxy]
listen = "127.0.0.1:0"
shutdown_timeout = "5s"

[server]
host = "{host}"
port = {port}
database = "{db}"
user = "{role}"
password = "{SERVER_PASSWORD}"
max_connections = {max_connections}
min_idle = 0

[tenant_defaults]
max_server_connections = {max_connections}

[users.{APP_USER}]
password = "{APP_PASSWORD}"
"#,
            host = pg.host,
            port = pg.port,
            db = self.name,
            role = self.role,
        );
        for t in &self.tenants {
            text.push_str(&format!("\n[tenants.{t}]\nschema = \"tenant_{t}\"\n"));
        }
        merge_toml(&text, extra)
    }

    /// How many server backends this test's role has open.
    pub async fn backends(&self, su: &tokio_postgres::Client) -> i64 {
        su.query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND application_name <> 'test_owner'",
            &[&self.role],
        )
        .await
        .unwrap()
        .get(0)
    }
}

/// Appends TOML snippets; keys of a `[section]` in `extra` that already exists are
/// inserted into that section.
fn merge_toml(base: &str, extra: &str) -> String {
    let mut out = base.to_string();
    let mut current: Option<String> = None;
    let mut pending: Vec<(Option<String>, String)> = Vec::new();
    for line in extra.lines() {
        let l = line.trim();
        if l.starts_with('[') {
            current = Some(l.to_string());
            continue;
        }
        if l.is_empty() {
            continue;
        }
        pending.push((current.clone(), line.to_string()));
    }
    for (section, line) in pending {
        match section {
            Some(sec) if out.contains(&sec) => {
                let key = line.split('=').next().unwrap().trim().to_string();
                // Replace an existing key in that section, or insert after the header.
                let start = out.find(&sec).unwrap() + sec.len();
                let end = out[start..]
                    .find("\n[")
                    .map(|i| start + i)
                    .unwrap_or(out.len());
                let body = &out[start..end];
                let new_body = if let Some(pos) = body
                    .lines()
                    .position(|bl| bl.split('=').next().map(|k| k.trim()) == Some(key.as_str()))
                {
                    body.lines()
                        .enumerate()
                        .map(|(i, bl)| {
                            if i == pos {
                                line.clone()
                            } else {
                                bl.to_string()
                            }
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                } else {
                    format!("\n{line}{body}")
                };
                out.replace_range(start..end, &new_body);
            }
            Some(sec) => {
                out.push_str(&format!("\n{sec}\n{line}\n"));
            }
            None => {
                out.push_str(&format!("\n{line}\n"));
            }
        }
    }
    out
}

/// A tenantpool running in-process on a runtime of its own.
pub struct Proxy {
    pub addr: SocketAddr,
    pub shared: std::sync::Arc<tenantpool::Shared>,
    handle: tenantpool::ShutdownHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    pub fn start(config: Config) -> Proxy {
        if std::env::var("TEST_LOG").is_ok() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
                .try_init();
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let proxy = tenantpool::Proxy::bind(config).await.unwrap();
                tx.send((
                    proxy.local_addr().unwrap(),
                    proxy.shared(),
                    proxy.shutdown_handle(),
                ))
                .unwrap();
                proxy.run().await;
            });
        });
        let (addr, shared, handle) = rx.recv().unwrap();
        Proxy {
            addr,
            shared,
            handle,
            thread: Some(thread),
        }
    }

    pub fn conn_str(&self, tenant: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={APP_USER} password={APP_PASSWORD} dbname={tenant}",
            self.addr.port()
        )
    }

    pub async fn connect(&self, tenant: &str) -> tokio_postgres::Client {
        connect_str(&self.conn_str(tenant)).await
    }

    /// Starts a graceful shutdown (as SIGTERM does) without waiting for it.
    pub fn shutdown(&self) {
        self.handle.shutdown();
    }

    /// Has the proxy's `run()` returned (its thread ended) within `limit`?
    pub async fn stopped_within(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the proxy and waits for it.
    pub fn stop(mut self) {
        self.handle.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.handle.shutdown();
    }
}

/// Runs psql against the proxy; returns stdout, panics with stderr on failure.
pub fn psql(port: u16, tenant: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={port} user={APP_USER} password={APP_PASSWORD} dbname={tenant}"
        ))
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(sql.as_bytes())?;
            c.wait_with_output()
        })
        .expect("run psql");
    assert!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The SQLSTATE of a tokio-postgres error, if the server (or proxy) sent one.
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.as_db_error().map(|d| d.code().code().to_string())
}

/// A bare protocol client for tests that need exact bytes on the wire (trust auth only).
pub struct Raw {
    pub stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

/// One backend message: tag and body.
#[derive(Debug, Clone)]
pub struct Msg {
    pub tag: u8,
    pub body: Vec<u8>,
}

impl Msg {
    /// A field of an ErrorResponse/NoticeResponse.
    pub fn field(&self, code: u8) -> Option<String> {
        tenantpool::protocol::error_field(&self.body, code).map(|s| s.to_string())
    }
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        Raw {
            stream: tokio::net::TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    /// Connects and logs in (the proxy must use `auth_method = "trust"`).
    pub async fn login(addr: SocketAddr, tenant: &str) -> Raw {
        Raw::login_with(addr, tenant, &[]).await
    }

    /// Logs in with more startup parameters (`auth_method = "trust"`).
    pub async fn login_with(addr: SocketAddr, tenant: &str, params: &[(&str, &str)]) -> Raw {
        let mut r = Raw::connect(addr).await;
        let mut all = vec![("user", APP_USER), ("database", tenant)];
        all.extend_from_slice(params);
        r.send(&startup_packet(&all)).await;
        let msgs = r.until_ready().await;
        assert!(
            msgs.iter().any(|m| m.tag == b'R'),
            "no AuthenticationOk: {msgs:?}"
        );
        r
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads one message; `None` at EOF.
    pub async fn recv(&mut self) -> Option<Msg> {
        use tokio::io::AsyncReadExt;
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if self.buf.len() > len {
                    let body = self.buf[5..len + 1].to_vec();
                    let tag = self.buf[0];
                    self.buf.drain(..len + 1);
                    return Some(Msg { tag, body });
                }
            }
            let mut chunk = [0u8; 8192];
            let n = tokio::time::timeout(Duration::from_secs(30), self.stream.read(&mut chunk))
                .await
                .expect("no reply within 30s")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads messages up to and including ReadyForQuery.
    pub async fn until_ready(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        loop {
            let m = self
                .recv()
                .await
                .expect("connection closed before ReadyForQuery");
            let done = m.tag == b'Z';
            out.push(m);
            if done {
                return out;
            }
        }
    }

    /// Reads until EOF.
    pub async fn until_eof(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        while let Some(m) = self.recv().await {
            out.push(m);
        }
        out
    }
}

pub fn startup_packet(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&196608u32.to_be_bytes());
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

/// Frames a frontend message.
pub fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

pub fn query(sql: &str) -> Vec<u8> {
    let mut b = sql.as_bytes().to_vec();
    b.push(0);
    msg(b'Q', &b)
}

/// Parse (unnamed) + Bind + Execute + Sync for a parameterless statement.
pub fn extended(sql: &str) -> Vec<u8> {
    let mut parse = vec![0u8];
    parse.extend_from_slice(sql.as_bytes());
    parse.extend_from_slice(&[0, 0, 0]);
    let mut out = msg(b'P', &parse);
    out.extend(msg(b'B', &[0, 0, 0, 0, 0, 0, 0, 0]));
    out.extend(msg(b'E', &[0, 0, 0, 0, 0]));
    out.extend(msg(b'S', &[]));
    out
}

/// The text of the first column of every DataRow.
pub fn first_column(msgs: &[Msg]) -> Vec<String> {
    msgs.iter()
        .filter(|m| m.tag == b'D')
        .map(|m| {
            let len = i32::from_be_bytes([m.body[2], m.body[3], m.body[4], m.body[5]]);
            String::from_utf8_lossy(&m.body[6..6 + len as usize]).into_owned()
        })
        .collect()
}

/// Frontend messages of the extended protocol.
pub fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut b = name.as_bytes().to_vec();
    b.push(0);
    b.extend_from_slice(sql.as_bytes());
    b.extend_from_slice(&[0, 0, 0]);
    msg(b'P', &b)
}

pub fn bind(stmt: &str) -> Vec<u8> {
    let mut b = vec![0];
    b.extend_from_slice(stmt.as_bytes());
    b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0]);
    msg(b'B', &b)
}

pub fn execute() -> Vec<u8> {
    msg(b'E', &[0, 0, 0, 0, 0])
}

pub fn close(stmt: &str) -> Vec<u8> {
    let mut b = vec![b'S'];
    b.extend_from_slice(stmt.as_bytes());
    b.push(0);
    msg(b'C', &b)
}

pub fn describe(stmt: &str) -> Vec<u8> {
    let mut b = vec![b'S'];
    b.extend_from_slice(stmt.as_bytes());
    b.push(0);
    msg(b'D', &b)
}

pub fn sync() -> Vec<u8> {
    msg(b'S', &[])
}

/// Bind + Execute + Sync of a parameterless statement.
pub fn run(stmt: &str) -> Vec<u8> {
    let mut m = bind(stmt);
    m.extend(execute());
    m.extend(sync());
    m
}

/// The fields of a DataRow, as text.
pub fn data_row(body: &[u8]) -> Vec<String> {
    let n = u16::from_be_bytes([body[0], body[1]]) as usize;
    let mut at = 2;
    let mut fields = Vec::with_capacity(n);
    for _ in 0..n {
        let len = i32::from_be_bytes(body[at..at + 4].try_into().unwrap());
        at += 4;
        if len < 0 {
            fields.push(String::new());
        } else {
            fields.push(String::from_utf8_lossy(&body[at..at + len as usize]).into_owned());
            at += len as usize;
        }
    }
    fields
}

pub fn tags(msgs: &[Msg]) -> String {
    msgs.iter().map(|m| m.tag as char).collect()
}

pub fn error_code(msgs: &[Msg]) -> Option<String> {
    msgs.iter()
        .find(|m| m.tag == b'E')
        .and_then(|m| m.field(b'C'))
}

pub const TRUST: &str = "[proxy]\nauth_method = \"trust\"\n";

/// A Python interpreter that can import `module`, if any.
pub fn python_with(module: &str) -> Option<&'static str> {
    ["/usr/bin/python3", "python3"].into_iter().find(|p| {
        Command::new(p)
            .args(["-c", &format!("import {module}")])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Terminates a server backend and waits until PostgreSQL no longer lists it.
pub async fn terminate_backend(su: &tokio_postgres::Client, pid: &str) {
    su.simple_query(&format!("SELECT pg_terminate_backend({pid})"))
        .await
        .unwrap();
    for _ in 0..200 {
        let rows = su
            .query_one(
                &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"),
                &[],
            )
            .await
            .unwrap();
        if rows.get::<_, i64>(0) == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("backend {pid} did not end");
}

/// Every metric name of the contract.
pub const CONTRACT_METRICS: [&str; 14] = [
    "tenantpool_client_connections",
    "tenantpool_server_connections",
    "tenantpool_tenant_server_connections",
    "tenantpool_tenant_max_server_connections",
    "tenantpool_transactions_total",
    "tenantpool_queries_total",
    "tenantpool_transaction_duration_seconds",
    "tenantpool_query_duration_seconds",
    "tenantpool_wait_duration_seconds",
    "tenantpool_wait_timeouts_total",
    "tenantpool_rejected_connections_total",
    "tenantpool_server_connects_total",
    "tenantpool_search_path_switches_total",
    "tenantpool_bytes_total",
];

/// Metrics beyond the contract's: reloads and the tenant directory.
pub const LIVE_METRICS: [&str; 5] = [
    "tenantpool_config_reloads_total",
    "tenantpool_config_last_reload_timestamp_seconds",
    "tenantpool_directory_refreshes_total",
    "tenantpool_directory_tenants",
    "tenantpool_directory_last_refresh_timestamp_seconds",
];

/// Metrics for operations beyond the contract: build, process, pool sizing, pauses.
pub const OPS_METRICS: [&str; 9] = [
    "tenantpool_build_info",
    "tenantpool_server_max_connections",
    "tenantpool_paused_tenants",
    "tenantpool_tenant_paused",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
];

/// The rows of a simple query's answer, as text (NULL as "").
pub fn rows(msgs: &[tokio_postgres::SimpleQueryMessage]) -> Vec<Vec<String>> {
    msgs.iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("").to_string())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// GET /metrics from a metrics listener on 127.0.0.1: the whole HTTP answer.
pub async fn scrape(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// The value of one series (`name{labels}` exactly as rendered), if present.
pub fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
