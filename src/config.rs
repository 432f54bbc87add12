//! The TOML configuration: typed structs, defaults, and validation.
//!
//! Every key of the contract's configuration lives here, with its default. Loading a file
//! parses it (unknown keys are an error naming the key), resolves `*_env` secrets, and checks
//! the whole config; all problems are reported together, each naming its key.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub proxy: ProxyConfig,
    /// `None` turns the Prometheus exporter off.
    pub metrics: Option<MetricsConfig>,
    /// The default server (named `default`): tenants without a `server` key live there.
    pub server: ServerConfig,
    /// `[servers.NAME]`: more PostgreSQL servers, for tenants whose `server` names them.
    #[serde(default)]
    pub servers: BTreeMap<String, ServerConfig>,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub tenant_defaults: TenantDefaults,
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantConfig>,
    #[serde(default)]
    pub users: BTreeMap<String, UserConfig>,
    /// `[plans.NAME]`: named sets of per-tenant caps.
    #[serde(default)]
    pub plans: BTreeMap<String, PlanConfig>,
    /// `[directory]`: tenants read from the database, merged with `[tenants.*]`.
    pub directory: Option<DirectoryConfig>,
    /// `[peers.N]`: the other instances behind the same address, by `peer_id` (cancel
    /// requests are forwarded to the instance that owns the key: see [`crate::peers`]).
    #[serde(default)]
    pub peers: BTreeMap<String, crate::peers::PeerConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    Transaction,
    Session,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum AuthMethod {
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    #[serde(rename = "md5")]
    Md5,
    #[serde(rename = "trust")]
    Trust,
    /// A TLS client certificate signed by `tls_client_ca_file` whose common name is the
    /// user name (PgBouncer's `auth_type = cert`).
    #[serde(rename = "cert")]
    Cert,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TenantFrom {
    Database,
    User,
    /// The TLS server name: `acme.<sni_domain>` is tenant `acme`.
    Sni,
    /// The TLS server name is a tenant's `domain` (the directory's `domain` column), e.g.
    /// `db.acme.com` for tenant `acme`.
    Domain,
}

/// When a server connection gets its tenant's search_path and the server role set again
/// (`[proxy] reset_path_and_role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResetPathAndRole {
    /// After a transaction in which a client was seen changing them (or may have: see
    /// docs/security.md).
    WhenChanged,
    /// Before every transaction: sound even against functions that change them unseen.
    Always,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientTls {
    Disable,
    Allow,
    Prefer,
    Require,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerTls {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// The names the config file uses for enum values (`SHOW CONFIG`, messages).
macro_rules! names {
    ($ty:ty { $($v:ident => $n:literal),* $(,)? }) => {
        impl $ty {
            pub fn as_str(&self) -> &'static str {
                match self { $(<$ty>::$v => $n),* }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
names!(PoolMode { Transaction => "transaction", Session => "session" });
names!(AuthMethod { ScramSha256 => "scram-sha-256", Md5 => "md5", Trust => "trust", Cert => "cert" });
names!(TenantFrom { Database => "database", User => "user", Sni => "sni", Domain => "domain" });
names!(ResetPathAndRole { WhenChanged => "when_changed", Always => "always" });
names!(ClientTls { Disable => "disable", Allow => "allow", Prefer => "prefer", Require => "require" });
names!(ServerTls { Disable => "disable", Prefer => "prefer", Require => "require", VerifyCa => "verify-ca", VerifyFull => "verify-full" });
names!(LogFormat { Text => "text", Json => "json" });

/// `[proxy]`: the listening side.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    pub listen: String,
    pub pool_mode: PoolMode,
    pub max_client_conn: u32,
    pub auth_method: AuthMethod,
    pub admin_users: Vec<String>,
    pub shutdown_timeout: Dur,
    pub tenant_from: TenantFrom,
    pub max_prepared_statements: u32,
    /// Not in the original contract (see docs/security.md).
    pub reset_path_and_role: ResetPathAndRole,
    pub client_tls: ClientTls,
    pub tls_cert_file: Option<String>,
    pub tls_key_file: Option<String>,
    pub tls_client_ca_file: Option<String>,
    pub sni_domain: Option<String>,
    /// Not in the original contract (docs/deploy.md): several instances on one port.
    pub so_reuseport: bool,
    /// What a graceful shutdown waits for (docs/deploy.md).
    pub shutdown_mode: ShutdownMode,
    /// Also listen on `<dir>/.s.PGSQL.<port>`.
    pub unix_socket_dir: Option<String>,
    /// Permissions of the Unix socket, octal as in PgBouncer ("0777").
    pub unix_socket_mode: String,
    /// This instance's id in cancel keys, 1..=16383 (0: no peers).
    pub peer_id: u16,
    /// Read-only console users: SHOW commands only (PgBouncer's `stats_users`).
    pub stats_users: Vec<String>,
    /// "text" (no colour unless stderr is a terminal) or "json" (one object a line).
    pub log_format: LogFormat,
    /// A log line of per-tenant rates every `stats_period` (PgBouncer's `log_stats`).
    pub log_stats: bool,
    /// The window SHOW STATS' averages (and `log_stats`) cover (PgBouncer's `stats_period`).
    pub stats_period: Dur,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// What a graceful shutdown (SIGTERM, SIGINT, SHUTDOWN) waits for, as PgBouncer's
/// `SHUTDOWN WAIT_FOR_SERVERS` / `WAIT_FOR_CLIENTS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShutdownMode {
    /// Running transactions finish; idle clients get FATAL 57P01 (they reconnect,
    /// to another instance).
    WaitForServers,
    /// Clients are left alone until they disconnect (or `shutdown_timeout`).
    WaitForClients,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: "0.0.0.0:6432".into(),
            pool_mode: PoolMode::Transaction,
            max_client_conn: 10_000,
            auth_method: AuthMethod::ScramSha256,
            admin_users: vec!["admin".into()],
            shutdown_timeout: Dur::secs(30),
            tenant_from: TenantFrom::Database,
            max_prepared_statements: 200,
            reset_path_and_role: ResetPathAndRole::WhenChanged,
            client_tls: ClientTls::Disable,
            tls_cert_file: None,
            tls_key_file: None,
            tls_client_ca_file: None,
            sni_domain: None,
            so_reuseport: false,
            shutdown_mode: ShutdownMode::WaitForServers,
            unix_socket_dir: None,
            unix_socket_mode: "0777".into(),
            peer_id: 0,
            stats_users: Vec::new(),
            log_format: LogFormat::Text,
            log_stats: false,
            stats_period: Dur::secs(60),
        }
    }
}

/// `[metrics]`: the Prometheus exporter.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    #[serde(default = "default_metrics_listen")]
    pub listen: String,
}

pub fn default_metrics_listen() -> String {
    "127.0.0.1:9930".into()
}

/// `[server]` (the server named `default`) and each `[servers.NAME]`: a PostgreSQL
/// tenantpool logs in to. Each database tenants use on it gets a pool of its own of up to
/// `max_connections` connections (see [`crate::placement`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    pub database: String,
    pub user: String,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    #[serde(default = "default_min_idle")]
    pub min_idle: u32,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Dur,
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: Dur,
    #[serde(default = "default_lifetime")]
    pub lifetime: Dur,
    #[serde(default = "default_server_tls")]
    pub tls: ServerTls,
    #[serde(default)]
    pub tls_ca_file: Option<String>,
    /// A client certificate tenantpool presents to the server.
    #[serde(default)]
    pub tls_cert_file: Option<String>,
    #[serde(default)]
    pub tls_key_file: Option<String>,
}

pub fn default_host() -> String {
    "127.0.0.1".into()
}
pub fn default_port() -> u16 {
    5432
}
pub fn default_max_connections() -> u32 {
    50
}
pub fn default_min_idle() -> u32 {
    5
}
pub fn default_connect_timeout() -> Dur {
    Dur::secs(5)
}
pub fn default_idle_timeout() -> Dur {
    Dur::secs(600)
}
pub fn default_lifetime() -> Dur {
    Dur::secs(3600)
}
fn default_server_tls() -> ServerTls {
    ServerTls::Disable
}

/// `[limits]`: timeouts applied to clients and queued transactions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub query_wait_timeout: Dur,
    pub idle_transaction_timeout: Dur,
    pub client_idle_timeout: Dur,
    /// Not in the original contract: PgBouncer's `client_login_timeout`. A client must finish
    /// its startup and authentication within this time.
    pub client_login_timeout: Dur,
    /// Not in the original contract: how long a client may stop in the middle of a message
    /// (or of the data of a COPY) before it is cut off.
    pub message_timeout: Dur,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            query_wait_timeout: Dur::secs(120),
            idle_transaction_timeout: Dur::ZERO,
            client_idle_timeout: Dur::ZERO,
            client_login_timeout: Dur::secs(60),
            message_timeout: Dur::secs(30),
        }
    }
}

/// `[tenant_defaults]`: what a tenant gets unless it says otherwise.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantDefaults {
    pub max_server_connections: u32,
    pub max_client_connections: u32,
    pub search_path: String,
    /// Settings every tenant's transactions run with (`{tenant}` and `{schema}` in values
    /// are replaced): the tenant context for row-level security. Clients may not set them.
    pub settings: BTreeMap<String, String>,
}

impl Default for TenantDefaults {
    fn default() -> Self {
        TenantDefaults {
            max_server_connections: 10,
            max_client_connections: 1000,
            search_path: "{schema}, public".into(),
            settings: BTreeMap::new(),
        }
    }
}

/// `[plans.NAME]`: caps a tenant gets from its plan unless it sets its own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    pub max_server_connections: Option<u32>,
    pub max_client_connections: Option<u32>,
}

/// `[directory]`: a query the proxy runs on a connection of its own that returns one row
/// per tenant (`tenant`, `schema`, and optionally `plan`, `domain`, `settings`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectoryConfig {
    pub query: String,
    /// Run the query again this often (and at once on a NOTIFY on `listen_channel`).
    #[serde(default = "default_directory_refresh")]
    pub refresh: Dur,
    pub listen_channel: Option<String>,
    /// The most tenants the directory may bring; rows beyond are ignored (logged). Keeps
    /// the metrics' `tenant` label bounded.
    #[serde(default = "default_directory_max_tenants")]
    pub max_tenants: u32,
}

pub fn default_directory_refresh() -> Dur {
    Dur::secs(30)
}
pub fn default_directory_max_tenants() -> u32 {
    10_000
}

/// Setting names the proxy itself decides: a tenant's `settings` may not name them.
const PROXY_SETTINGS: [&str; 3] = ["search_path", "role", "session_authorization"];

/// A setting name as PostgreSQL writes it (lowercase letters, digits, `_`, and `.` for
/// custom classes such as `app.tenant_id`).
pub fn valid_setting_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.')
}

/// Problems with a set of tenant settings (`key` names where they come from).
pub fn settings_problems<'a>(
    key: &str,
    settings: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Vec<String> {
    let mut p = Vec::new();
    for (name, value) in settings {
        if !valid_setting_name(name) {
            p.push(format!(
                "{key}: \"{name}\" is not a setting name (lowercase letters, digits, _ and ., e.g. \"app.tenant_id\")"
            ));
        } else if PROXY_SETTINGS.contains(&name.as_str()) {
            p.push(format!(
                "{key}: \"{name}\" is set by tenantpool itself and cannot be a tenant setting"
            ));
        }
        if value.contains('\0') {
            p.push(format!("{key}.{name}: must not contain NUL"));
        }
    }
    p
}

/// `[tenants.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    #[serde(default)]
    pub schema: String,
    pub max_server_connections: Option<u32>,
    pub max_client_connections: Option<u32>,
    /// An own server login: the tenant's transactions run only on connections logged in
    /// as this role. Tenants naming the same role share its connections.
    pub server_user: Option<String>,
    pub server_password: Option<String>,
    pub server_password_env: Option<String>,
    /// Caps from `[plans.NAME]` unless set here.
    pub plan: Option<String>,
    /// Settings of its own, over `tenant_defaults.settings`.
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
    /// The server it lives on: `default` (`[server]`) unless it names a `[servers.NAME]`.
    pub server: Option<String>,
    /// The database it lives in on that server, if not the server's `database`.
    pub database: Option<String>,
}

impl TenantConfig {
    /// The password of the tenant's own server login, if any.
    pub fn resolved_server_password(&self) -> Option<String> {
        resolve_secret(&self.server_password, &self.server_password_env)
    }
}

/// The server logins of a config, numbered: index 0 is `[server] user`, then each distinct
/// `server_user` of a tenant (other than `[server] user`), in tenant order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLogins {
    /// User and password of each login.
    pub logins: Vec<(String, Option<String>)>,
    /// The login of each tenant, in `tenants` order.
    pub of_tenant: Vec<u32>,
}

/// `[users.NAME]`: a login clients may use.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub password: Option<String>,
    pub password_env: Option<String>,
    pub scram: Option<String>,
    #[serde(default = "default_user_tenants")]
    pub tenants: Vec<String>,
}

fn default_user_tenants() -> Vec<String> {
    vec!["*".into()]
}

/// Problems with a secret given inline (`field`) or by environment variable (`field_env`)
/// in section `section`: both given, or the variable not set.
fn secret_problems(
    section: &str,
    field: &str,
    inline: &Option<String>,
    env: &Option<String>,
    p: &mut Vec<String>,
) {
    if inline.is_some() && env.is_some() {
        p.push(format!(
            "{section}: give either {field} or {field}_env, not both"
        ));
    }
    env_problem(&format!("{section}.{field}_env"), env, p);
}

/// The environment variable a `*_env` key (`key`) names is not set.
fn env_problem(key: &str, env: &Option<String>, p: &mut Vec<String>) {
    if let Some(v) = env
        && std::env::var(v).is_err()
    {
        p.push(format!("{key}: environment variable {v} is not set"));
    }
}

/// A secret given inline or as the name of an environment variable (`*_env`).
fn resolve_secret(inline: &Option<String>, env: &Option<String>) -> Option<String> {
    inline
        .clone()
        .or_else(|| env.as_ref().and_then(|v| std::env::var(v).ok()))
}

impl UserConfig {
    /// The user's cleartext password, from `password` or the `password_env` variable.
    pub fn cleartext_password(&self) -> Option<String> {
        resolve_secret(&self.password, &self.password_env)
    }
}

impl ServerConfig {
    /// The password tenantpool logs in to PostgreSQL with, if any.
    pub fn resolved_password(&self) -> Option<String> {
        resolve_secret(&self.password, &self.password_env)
    }
}

/// A duration written as "250ms", "30s", "10m", "1h" (or "0").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Dur(pub Duration);

impl Dur {
    pub const ZERO: Dur = Dur(Duration::ZERO);
    pub const fn secs(s: u64) -> Dur {
        Dur(Duration::from_secs(s))
    }
    pub fn is_zero(&self) -> bool {
        self.0.is_zero()
    }
    /// `None` for zero ("off").
    pub fn nonzero(&self) -> Option<Duration> {
        (!self.0.is_zero()).then_some(self.0)
    }
}

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s == "0" {
            return Ok(Dur::ZERO);
        }
        let split = s
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(|| {
                format!(
                    "duration \"{s}\" needs a unit (ms, s, m, h): write \"{s}s\", or {s} without quotes for seconds"
                )
            })?;
        let (num, unit) = s.split_at(split);
        let n: f64 = num.parse().map_err(|_| {
            format!("\"{s}\" is not a duration such as \"250ms\", \"30s\", \"10m\"")
        })?;
        let secs = match unit.trim() {
            "us" => n / 1_000_000.0,
            "ms" => n / 1000.0,
            "s" => n,
            "m" | "min" => n * 60.0,
            "h" => n * 3600.0,
            "d" => n * 86400.0,
            other => return Err(format!("unknown duration unit \"{other}\" in \"{s}\"")),
        };
        if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
            return Err(format!("duration \"{s}\" is out of range"));
        }
        Ok(Dur(Duration::from_secs_f64(secs)))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a duration such as \"250ms\", \"30s\", \"10m\" (a bare number is seconds)",
                )
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Dur, E> {
                s.parse().map_err(E::custom)
            }
            // A bare number is seconds, as PgBouncer reads its timeouts.
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Dur, E> {
                u64::try_from(n)
                    .ok()
                    .filter(|&n| n <= 1_000_000_000)
                    .map(Dur::secs)
                    .ok_or_else(|| E::custom(format!("duration {n} is out of range")))
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Dur, E> {
                self.visit_i64(i64::try_from(n).unwrap_or(i64::MAX))
            }
            fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<Dur, E> {
                if n.is_finite() && (0.0..=1e9).contains(&n) {
                    Ok(Dur(Duration::from_secs_f64(n)))
                } else {
                    Err(E::custom(format!("duration {n} is out of range")))
                }
            }
        }
        d.deserialize_any(V)
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms % 1000 == 0 {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

/// Why a config could not be used: every problem found, one per line.
#[derive(Debug)]
pub struct ConfigError(pub Vec<String>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Database names that open the admin console instead of a tenant.
/// The name of `[server]` (a tenant's `server` key, metrics, the console).
pub const DEFAULT_SERVER: &str = "default";

pub const ADMIN_DATABASES: [&str; 2] = ["tenantpool", "pgbouncer"];

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(vec![format!("cannot read {}: {e}", path.display())]))?;
        Config::parse(&text)
    }

    /// Parses and validates config text.
    ///
    /// Every problem is reported, each with its line, column, section and key: a syntax
    /// error alone (nothing after it can be trusted), else each key that does not fit (the
    /// file is read again without it until the rest fits), else what validation finds.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        if let Err(e) = text.parse::<toml::Table>() {
            return Err(ConfigError(vec![describe_toml_error(&e, text)]));
        }
        let mut work: Vec<String> = text.lines().map(str::to_string).collect();
        let mut problems = Vec::new();
        let mut dropped: Vec<String> = Vec::new();
        for _ in 0..100 {
            let current = work.join("\n");
            match toml::from_str::<Config>(&current) {
                Ok(config) if problems.is_empty() => {
                    config.validate()?;
                    return Ok(config);
                }
                Ok(_) => break,
                Err(e) => {
                    // A key left out because it did not fit is then missing: said already.
                    if let Some(k) = missing_field(e.message())
                        && dropped.iter().any(|d| d == k)
                    {
                        break;
                    }
                    problems.push(describe_toml_error(&e, &current));
                    let Some(line) = e.span().map(|s| line_col(&current, s.start).0) else {
                        break;
                    };
                    let l = &mut work[line - 1];
                    if !l.contains('=') || l.trim_start().starts_with('[') {
                        break;
                    }
                    dropped.push(l.split('=').next().unwrap_or("").trim().to_string());
                    l.clear();
                }
            }
        }
        Err(ConfigError(problems))
    }

    /// What `check` and the start-up log warn about: a config that works, but probably
    /// not as meant.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if self.proxy.auth_method != AuthMethod::Trust {
            for (key, list) in [
                ("admin_users", &self.proxy.admin_users),
                ("stats_users", &self.proxy.stats_users),
            ] {
                for u in list.iter().filter(|u| !self.users.contains_key(*u)) {
                    w.push(format!(
                        "proxy.{key}: \"{u}\" has no [users.{u}] entry, so it cannot log in: the admin console is unreachable for it"
                    ));
                }
            }
        }
        if self.proxy.auth_method == AuthMethod::Trust
            && let Ok(addr) = self.proxy.listen.parse::<std::net::SocketAddr>()
            && !addr.ip().is_loopback()
        {
            w.push(format!(
                "proxy.auth_method = \"trust\" on {}, which is not a loopback address: anyone who reaches it logs in as any user, the admin console included",
                self.proxy.listen
            ));
        }
        let mut env = |key: String, var: &Option<String>| {
            if let Some(v) = var
                && std::env::var(v).is_ok_and(|x| x.is_empty())
            {
                w.push(format!("{key}: environment variable {v} is set but empty"));
            }
        };
        env("server.password_env".into(), &self.server.password_env);
        for (n, s) in &self.servers {
            env(format!("servers.{n}.password_env"), &s.password_env);
        }
        for (n, u) in &self.users {
            env(format!("users.{n}.password_env"), &u.password_env);
        }
        for (n, t) in &self.tenants {
            env(
                format!("tenants.{n}.server_password_env"),
                &t.server_password_env,
            );
        }
        w
    }

    /// The effective server-connection cap of a tenant: its own, else its plan's, else
    /// `tenant_defaults`.
    pub fn tenant_max_server(&self, t: &TenantConfig) -> u32 {
        self.caps(t.plan.as_deref(), t.max_server_connections, None)
            .0
    }

    /// The effective client-connection cap of a tenant.
    pub fn tenant_max_clients(&self, t: &TenantConfig) -> u32 {
        self.caps(t.plan.as_deref(), None, t.max_client_connections)
            .1
    }

    /// (max_server_connections, max_client_connections) of a tenant with `plan` and caps
    /// of its own: each its own, else the plan's, else `tenant_defaults`. An unknown plan
    /// counts as none (validation reports it).
    pub fn caps(
        &self,
        plan: Option<&str>,
        server: Option<u32>,
        clients: Option<u32>,
    ) -> (u32, u32) {
        let plan = plan.and_then(|p| self.plans.get(p));
        let d = &self.tenant_defaults;
        (
            server
                .or_else(|| plan.and_then(|p| p.max_server_connections))
                .unwrap_or(d.max_server_connections),
            clients
                .or_else(|| plan.and_then(|p| p.max_client_connections))
                .unwrap_or(d.max_client_connections),
        )
    }

    /// The logins server connections use, and which one each tenant uses. A tenant's
    /// password is that of the first tenant naming its `server_user` (validation makes sure
    /// they agree).
    pub fn server_logins(&self) -> ServerLogins {
        let mut logins = vec![(self.server.user.clone(), self.server.resolved_password())];
        let mut index: std::collections::HashMap<&str, u32> =
            std::collections::HashMap::from([(self.server.user.as_str(), 0)]);
        let of_tenant = self
            .tenants
            .values()
            .map(|t| match &t.server_user {
                None => 0,
                Some(user) => *index.entry(user.as_str()).or_insert_with(|| {
                    logins.push((user.clone(), t.resolved_server_password()));
                    (logins.len() - 1) as u32
                }),
            })
            .collect();
        ServerLogins { logins, of_tenant }
    }

    /// `[server]` by the name `default`, else `[servers.NAME]`.
    pub fn server_named(&self, name: &str) -> Option<&ServerConfig> {
        if name == DEFAULT_SERVER {
            Some(&self.server)
        } else {
            self.servers.get(name)
        }
    }

    /// Every server by name, `default` first.
    pub fn all_servers(&self) -> impl Iterator<Item = (&str, &ServerConfig)> {
        std::iter::once((DEFAULT_SERVER, &self.server))
            .chain(self.servers.iter().map(|(n, s)| (n.as_str(), s)))
    }

    /// Where a tenant with these `server` and `database` keys lives: (server name,
    /// database). An unknown server is the default one (validation reports it).
    pub fn place_of(&self, server: Option<&str>, database: Option<&str>) -> (String, String) {
        let name = server
            .filter(|s| self.server_named(s).is_some())
            .unwrap_or(DEFAULT_SERVER);
        let s = self.server_named(name).unwrap_or(&self.server);
        (
            name.to_string(),
            database.unwrap_or(&s.database).to_string(),
        )
    }

    /// Problems with one server's keys (`key` is `server` or `servers.NAME`).
    fn validate_server(key: &str, s: &ServerConfig, p: &mut Vec<String>) {
        if s.max_connections == 0 {
            p.push(format!("{key}.max_connections: must be at least 1"));
        }
        if s.min_idle > s.max_connections {
            p.push(format!(
                "{key}.min_idle: {} is above {key}.max_connections ({})",
                s.min_idle, s.max_connections
            ));
        }
        if s.connect_timeout.is_zero() {
            p.push(format!("{key}.connect_timeout: must be above 0"));
        }
        if s.database.is_empty() || s.database.contains('\0') {
            p.push(format!("{key}.database: must not be empty or contain NUL"));
        }
        if s.user.is_empty() || s.user.contains('\0') {
            p.push(format!("{key}.user: must not be empty or contain NUL"));
        }
        secret_problems(key, "password", &s.password, &s.password_env, p);
    }

    /// The `max_connections` of the server a tenant with this `server` key lives on, and
    /// the key that sets it.
    fn server_cap(&self, server: Option<&str>) -> (u32, String) {
        match server.and_then(|n| self.servers.get(n).map(|s| (n, s))) {
            Some((n, s)) if n != DEFAULT_SERVER => {
                (s.max_connections, format!("servers.{n}.max_connections"))
            }
            _ => (self.server.max_connections, "server.max_connections".into()),
        }
    }

    /// Problems with tenants' own server logins.
    fn validate_server_logins(&self, p: &mut Vec<String>) {
        // The first tenant naming each role, to compare passwords with.
        let mut first: BTreeMap<&str, (&str, Option<String>)> = BTreeMap::new();
        for (name, t) in &self.tenants {
            secret_problems(
                &format!("tenants.{name}"),
                "server_password",
                &t.server_password,
                &t.server_password_env,
                p,
            );
            let Some(user) = &t.server_user else {
                let key = if t.server_password.is_some() {
                    Some("server_password")
                } else {
                    t.server_password_env
                        .as_ref()
                        .map(|_| "server_password_env")
                };
                if let Some(key) = key {
                    p.push(format!(
                        "tenants.{name}.{key}: a password without server_user (give server_user too)"
                    ));
                }
                continue;
            };
            if user.is_empty() || user.contains('\0') {
                p.push(format!(
                    "tenants.{name}.server_user: must not be empty or contain NUL"
                ));
                continue;
            }
            let password = t.resolved_server_password();
            if *user == self.server.user {
                if password != self.server.resolved_password() {
                    p.push(format!(
                        "tenants.{name}.server_password: server_user \"{user}\" is server.user, and its password differs from server.password"
                    ));
                }
                continue;
            }
            match first.get(user.as_str()) {
                None => {
                    first.insert(user, (name, password));
                }
                Some((other, theirs)) if *theirs != password => p.push(format!(
                    "tenants.{name}.server_password: tenant {other} logs in as server_user \"{user}\" too, with another password (tenants sharing a server_user must give the same password)"
                )),
                Some(_) => {}
            }
        }
    }

    /// The TLS keys, and the files they name (readable, a key that is the certificate's,
    /// a certificate within its validity period).
    fn validate_tls(&self, p: &mut Vec<String>) {
        let proxy = &self.proxy;
        let tls_on = proxy.client_tls != ClientTls::Disable;
        match (&proxy.tls_cert_file, &proxy.tls_key_file) {
            (Some(c), Some(k)) => {
                for problem in crate::tls::check_identity(c, k) {
                    p.push(format!("proxy.tls_cert_file/tls_key_file: {problem}"));
                }
            }
            (None, None) if !tls_on => {}
            _ => p.push(format!(
                "proxy.tls_cert_file and proxy.tls_key_file: both are needed{}",
                if tls_on {
                    " (client_tls is not \"disable\")"
                } else {
                    ""
                }
            )),
        }
        if let Some(ca) = &proxy.tls_client_ca_file {
            if let Err(e) = crate::tls::load_roots(ca) {
                p.push(format!("proxy.tls_client_ca_file: {e}"));
            }
            if !tls_on {
                p.push("proxy.tls_client_ca_file: client_tls is \"disable\"".into());
            }
        }
        if proxy.auth_method == AuthMethod::Cert
            && (proxy.client_tls != ClientTls::Require || proxy.tls_client_ca_file.is_none())
        {
            p.push(
                "proxy.auth_method = \"cert\": needs client_tls = \"require\" and tls_client_ca_file"
                    .into(),
            );
        }
        match (&proxy.tenant_from, &proxy.sni_domain) {
            (TenantFrom::Sni, None) => {
                p.push("proxy.tenant_from = \"sni\": needs proxy.sni_domain".into())
            }
            (TenantFrom::Sni, Some(_)) if !tls_on => p.push(
                "proxy.tenant_from = \"sni\": needs client_tls other than \"disable\"".into(),
            ),
            (_, Some(d)) if d.is_empty() || d.starts_with('.') => p.push(format!(
                "proxy.sni_domain: \"{d}\" is not a domain such as \"db.example.com\""
            )),
            _ => {}
        }
        for (name, server) in self.all_servers() {
            let key = if name == DEFAULT_SERVER {
                "server".to_string()
            } else {
                format!("servers.{name}")
            };
            match (&server.tls_cert_file, &server.tls_key_file) {
                (Some(c), Some(k)) => {
                    for problem in crate::tls::check_identity(c, k) {
                        p.push(format!("{key}.tls_cert_file/tls_key_file: {problem}"));
                    }
                }
                (None, None) => {}
                _ => p.push(format!(
                    "{key}.tls_cert_file and {key}.tls_key_file: both or neither"
                )),
            }
            if let Some(ca) = &server.tls_ca_file
                && let Err(e) = crate::tls::load_roots(ca)
            {
                p.push(format!("{key}.tls_ca_file: {e}"));
            }
            if matches!(server.tls, ServerTls::VerifyCa | ServerTls::VerifyFull)
                && server.tls_ca_file.is_none()
                && let Err(e) = crate::tls::system_roots()
            {
                p.push(format!("{key}.tls: {e}"));
            }
        }
    }

    /// Checks everything that parsing alone does not; reports all problems at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Vec::new();
        if self.proxy.stats_period.0 < Duration::from_secs(1) {
            p.push("proxy.stats_period: must be at least 1s".into());
        }
        if self.proxy.listen.parse::<std::net::SocketAddr>().is_err() {
            p.push(format!(
                "proxy.listen: \"{}\" is not an address such as \"0.0.0.0:6432\"",
                self.proxy.listen
            ));
        }
        if let Some(m) = &self.metrics
            && m.listen.parse::<std::net::SocketAddr>().is_err()
        {
            p.push(format!(
                "metrics.listen: \"{}\" is not an address such as \"127.0.0.1:9930\"",
                m.listen
            ));
        }
        if self.proxy.max_client_conn == 0 {
            p.push("proxy.max_client_conn: must be at least 1".into());
        }
        self.validate_tls(&mut p);
        crate::peers::validate(self, &mut p);
        crate::listener::validate(self, &mut p);
        Config::validate_server("server", &self.server, &mut p);
        for (name, s) in &self.servers {
            if name == DEFAULT_SERVER {
                p.push(format!(
                    "servers.{name}: \"{DEFAULT_SERVER}\" is the name of [server]; give this server another name"
                ));
            }
            if name.is_empty() || name.contains('\0') {
                p.push("servers: a server name must not be empty or contain NUL".into());
                continue;
            }
            Config::validate_server(&format!("servers.{name}"), s, &mut p);
        }
        if self.limits.query_wait_timeout.is_zero() {
            p.push("limits.query_wait_timeout: must be above 0".into());
        }
        if self.limits.client_login_timeout.is_zero() {
            p.push("limits.client_login_timeout: must be above 0".into());
        }
        let d = &self.tenant_defaults;
        if d.max_server_connections == 0 {
            p.push("tenant_defaults.max_server_connections: must be at least 1".into());
        }
        if d.max_client_connections == 0 {
            p.push("tenant_defaults.max_client_connections: must be at least 1".into());
        }
        if d.max_server_connections > self.server.max_connections {
            p.push(format!(
                "tenant_defaults.max_server_connections: {} is above server.max_connections ({})",
                d.max_server_connections, self.server.max_connections
            ));
        }
        if !d.search_path.contains("{schema}") {
            p.push("tenant_defaults.search_path: must contain {schema}".into());
        }
        // It becomes part of `SET search_path TO ...`: schema names and quoted identifiers
        // only, nothing that could end the statement or open a string.
        if let Some(c) = d
            .search_path
            .chars()
            .find(|c| !(c.is_alphanumeric() || " ,_\"${}".contains(*c)))
        {
            p.push(format!(
                "tenant_defaults.search_path: {c:?} is not allowed (schema names, double-quoted identifiers, commas and spaces only)"
            ));
        }
        if self.proxy.tenant_from == TenantFrom::Domain {
            if self.proxy.client_tls == ClientTls::Disable {
                p.push(
                    "proxy.tenant_from = \"domain\": needs client_tls other than \"disable\" (the TLS server name is the domain)"
                        .into(),
                );
            }
            if self.directory.is_none() {
                p.push(
                    "proxy.tenant_from = \"domain\": needs a [directory] whose query returns a domain column"
                        .into(),
                );
            }
        }
        p.extend(settings_problems("tenant_defaults.settings", &d.settings));
        for (name, plan) in &self.plans {
            for (key, v) in [
                ("max_server_connections", plan.max_server_connections),
                ("max_client_connections", plan.max_client_connections),
            ] {
                if v == Some(0) {
                    p.push(format!("plans.{name}.{key}: must be at least 1"));
                }
            }
            if let Some(n) = plan.max_server_connections
                && n > self.server.max_connections
            {
                p.push(format!(
                    "plans.{name}.max_server_connections: {n} is above server.max_connections ({})",
                    self.server.max_connections
                ));
            }
        }
        if let Some(dir) = &self.directory {
            if dir.query.trim().is_empty() {
                p.push("directory.query: must not be empty".into());
            }
            if dir.query.contains('\0') {
                p.push("directory.query: must not contain NUL".into());
            }
            if dir.refresh.is_zero() {
                p.push("directory.refresh: must be above 0".into());
            }
            if dir.max_tenants == 0 {
                p.push("directory.max_tenants: must be at least 1".into());
            }
            if let Some(c) = &dir.listen_channel
                && (c.is_empty() || c.contains('\0'))
            {
                p.push("directory.listen_channel: must not be empty or contain NUL".into());
            }
        }
        if self.tenants.is_empty() && self.directory.is_none() {
            p.push(
                "tenants: no tenant is configured ([tenants.NAME] with a schema, or a [directory])"
                    .into(),
            );
        }
        for (name, t) in &self.tenants {
            if name.is_empty() || name.contains('\0') {
                p.push("tenants: a tenant name must not be empty".into());
            }
            if ADMIN_DATABASES.contains(&name.as_str()) {
                p.push(format!(
                    "tenants.{name}: the name is reserved for the admin console"
                ));
            }
            if t.schema.is_empty() {
                p.push(format!(
                    "tenants.{name}.schema: every tenant needs a schema"
                ));
            }
            if t.schema.contains('\0') {
                p.push(format!("tenants.{name}.schema: must not contain NUL"));
            }
            if t.max_server_connections == Some(0) {
                p.push(format!(
                    "tenants.{name}.max_server_connections: must be at least 1"
                ));
            }
            if t.max_client_connections == Some(0) {
                p.push(format!(
                    "tenants.{name}.max_client_connections: must be at least 1"
                ));
            }
            let (cap, cap_key) = self.server_cap(t.server.as_deref());
            if let Some(n) = t.max_server_connections
                && n > cap
            {
                p.push(format!(
                    "tenants.{name}.max_server_connections: {n} is above {cap_key} ({cap})"
                ));
            }
            if let Some(server) = &t.server
                && self.server_named(server).is_none()
            {
                p.push(format!(
                    "tenants.{name}.server: \"{server}\" is not a configured server ([servers.{server}], or \"{DEFAULT_SERVER}\" for [server])"
                ));
            }
            if let Some(db) = &t.database
                && (db.is_empty() || db.contains('\0'))
            {
                p.push(format!(
                    "tenants.{name}.database: must not be empty or contain NUL"
                ));
            }
            if let Some(plan) = &t.plan
                && !self.plans.contains_key(plan)
            {
                p.push(format!(
                    "tenants.{name}.plan: \"{plan}\" is not a configured plan ([plans.{plan}])"
                ));
            }
            p.extend(settings_problems(
                &format!("tenants.{name}.settings"),
                &t.settings,
            ));
        }
        self.validate_server_logins(&mut p);
        if self.users.is_empty() && self.proxy.auth_method != AuthMethod::Trust {
            p.push("users: no user is configured ([users.NAME] with a password)".into());
        }
        for (name, u) in &self.users {
            let given = [
                u.password.is_some(),
                u.password_env.is_some(),
                u.scram.is_some(),
            ]
            .iter()
            .filter(|b| **b)
            .count();
            if given > 1 {
                p.push(format!(
                    "users.{name}: give one of password, password_env or scram"
                ));
            }
            if given == 0 && !matches!(self.proxy.auth_method, AuthMethod::Trust | AuthMethod::Cert)
            {
                p.push(format!(
                    "users.{name}: needs password, password_env or scram (auth_method is not trust or cert)"
                ));
            }
            env_problem(
                &format!("users.{name}.password_env"),
                &u.password_env,
                &mut p,
            );
            if let Some(s) = &u.scram {
                if let Err(e) = crate::client::auth::parse_scram_verifier(s) {
                    p.push(format!("users.{name}.scram: {e}"));
                }
                if self.proxy.auth_method == AuthMethod::Md5 {
                    p.push(format!(
                        "users.{name}.scram: a SCRAM verifier cannot check md5 logins (auth_method = \"md5\"); give a password"
                    ));
                }
            }
            if self.proxy.tenant_from == TenantFrom::User && name.contains('.') {
                p.push(format!(
                    "users.{name}: with tenant_from = \"user\" a user name may not contain '.'"
                ));
            }
            for t in &u.tenants {
                // Directory tenants are only known at run time.
                if t != "*" && !self.tenants.contains_key(t) && self.directory.is_none() {
                    p.push(format!(
                        "users.{name}.tenants: \"{t}\" is not a configured tenant"
                    ));
                }
            }
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(p))
        }
    }
}

impl Config {
    /// Keys that only a restart changes: those that differ between `self` (the file just
    /// read) and `running` are named, and set back to the running values, so that what
    /// is kept is what is in force.
    pub fn keep_restart_only(&mut self, running: &Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        macro_rules! keep {
            ($($name:literal => $($field:ident).+;)*) => {$(
                if self.$($field).+ != running.$($field).+ {
                    changed.push($name);
                    self.$($field).+ = running.$($field).+.clone();
                }
            )*};
        }
        keep! {
            "proxy.listen" => proxy.listen;
            "proxy.pool_mode" => proxy.pool_mode;
            "proxy.auth_method" => proxy.auth_method;
            "proxy.tenant_from" => proxy.tenant_from;
            "proxy.max_prepared_statements" => proxy.max_prepared_statements;
            "proxy.reset_path_and_role" => proxy.reset_path_and_role;
            "proxy.client_tls" => proxy.client_tls;
            "proxy.sni_domain" => proxy.sni_domain;
            "proxy.so_reuseport" => proxy.so_reuseport;
            "proxy.unix_socket_dir" => proxy.unix_socket_dir;
            "proxy.unix_socket_mode" => proxy.unix_socket_mode;
            "proxy.peer_id" => proxy.peer_id;
            "proxy.log_format" => proxy.log_format;
            "server.host" => server.host;
            "server.port" => server.port;
            "server.database" => server.database;
            "server.user" => server.user;
            "server.connect_timeout" => server.connect_timeout;
            "server.tls" => server.tls;
        }
        let listen = |c: &Config| c.metrics.as_ref().map(|m| m.listen.clone());
        if listen(self) != listen(running) {
            changed.push("metrics");
            self.metrics = running.metrics.clone();
        }
        changed
    }
}

/// 1-based line and column of byte `at` in `text`.
fn line_col(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// `missing field `x`` -> `x`.
fn missing_field(msg: &str) -> Option<&str> {
    msg.strip_prefix("missing field `")?.split('`').next()
}

/// Turns a toml/serde error into one line: line, column, section and key, and what to do.
fn describe_toml_error(e: &toml::de::Error, text: &str) -> String {
    let msg = e
        .message()
        .trim()
        .replace('\n', " ")
        .replace("unknown field", "unknown key");
    let Some(span) = e.span() else {
        return msg;
    };
    let (line, col) = line_col(text, span.start);
    let lines: Vec<&str> = text.lines().collect();
    let section = lines[..line.min(lines.len())].iter().rev().find_map(|l| {
        let l = l.trim();
        l.starts_with('[')
            .then(|| l.trim_matches(|c| c == '[' || c == ']').trim().to_string())
    });
    let this = lines.get(line - 1).copied().unwrap_or("");
    let key = this
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"').to_string())
        .filter(|_| !this.trim_start().starts_with('['));
    let place = match (&section, &key) {
        (Some(s), Some(k)) => format!(" [{s}] {k}:"),
        (Some(s), None) => format!(" [{s}]:"),
        (None, Some(k)) => format!(" {k}:"),
        (None, None) => String::new(),
    };
    let hint = if let Some(rest) = msg.strip_prefix("invalid type: string ")
        && (msg.contains("expected u") || msg.contains("expected i"))
    {
        let value = rest.split(", expected").next().unwrap_or(rest);
        let k = key.as_deref().unwrap_or("key");
        format!(
            "expected a whole number, found the string {value}: write {k} = {} without quotes",
            value.trim_matches('"')
        )
    } else if let Some(k) = missing_field(&msg) {
        format!("missing key `{k}` (it has no default)")
    } else {
        msg
    };
    format!("line {line}, column {col}:{place} {hint}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
[server]
database = "app"
user = "tenantpool"
password = "x"
[tenants.acme]
schema = "tenant_acme"
[users.app]
password = "secret"
"#;

    #[test]
    fn minimal_config_gets_contract_defaults() {
        let c = Config::parse(MIN).unwrap();
        assert_eq!(c.proxy.listen, "0.0.0.0:6432");
        assert_eq!(c.proxy.pool_mode, PoolMode::Transaction);
        assert_eq!(c.server.max_connections, 50);
        assert_eq!(c.limits.query_wait_timeout, Dur::secs(120));
        assert_eq!(c.tenant_defaults.search_path, "{schema}, public");
        assert_eq!(c.users["app"].tenants, vec!["*".to_string()]);
    }

    #[test]
    fn durations() {
        assert_eq!(
            "250ms".parse::<Dur>().unwrap().0,
            Duration::from_millis(250)
        );
        assert_eq!("10m".parse::<Dur>().unwrap().0, Duration::from_secs(600));
        assert_eq!("0s".parse::<Dur>().unwrap(), Dur::ZERO);
        assert!("10".parse::<Dur>().is_err());
        assert!("10 parsecs".parse::<Dur>().is_err());
    }

    fn problems(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn unknown_key_is_named() {
        let e = problems(&format!("{MIN}\n[limits]\nquery_wait_timout = \"1s\"\n"));
        assert!(e.contains("query_wait_timout"), "{e}");
    }

    #[test]
    fn bad_duration_is_named() {
        let e = problems(&format!("{MIN}\n[limits]\nquery_wait_timeout = \"soon\"\n"));
        assert!(e.contains("soon"), "{e}");
    }

    #[test]
    fn tenant_problems_are_named() {
        let text = MIN.replace(
            "[tenants.acme]\nschema = \"tenant_acme\"",
            "[tenants.acme]\nschema = \"\"\nmax_server_connections = 0\n[tenants.big]\nschema = \"b\"\nmax_server_connections = 500",
        );
        let e = problems(&text);
        assert!(e.contains("tenants.acme.schema"), "{e}");
        assert!(e.contains("tenants.acme.max_server_connections"), "{e}");
        assert!(
            e.contains("tenants.big.max_server_connections: 500 is above"),
            "{e}"
        );
    }

    #[test]
    fn server_problems_are_named() {
        let text = format!(
            "{MIN}[servers.default]\ndatabase = \"d\"\nuser = \"u\"\n\
             [servers.eu2]\ndatabase = \"\"\nuser = \"u\"\nmax_connections = 4\nmin_idle = 5\n\
             [tenants.a]\nschema = \"a\"\nserver = \"eu2\"\nmax_server_connections = 6\n\
             [tenants.b]\nschema = \"b\"\nserver = \"nowhere\"\n\
             [tenants.c]\nschema = \"c\"\ndatabase = \"\"\n"
        );
        let e = problems(&text);
        for needle in [
            "servers.default: \"default\" is the name of [server]",
            "servers.eu2.database: must not be empty",
            "servers.eu2.min_idle: 5 is above servers.eu2.max_connections (4)",
            "tenants.a.max_server_connections: 6 is above servers.eu2.max_connections (4)",
            "tenants.b.server: \"nowhere\" is not a configured server",
            "tenants.c.database: must not be empty",
        ] {
            assert!(e.contains(needle), "{needle}: {e}");
        }
        let ok = Config::parse(&format!(
            "{MIN}[servers.eu2]\ndatabase = \"e\"\nuser = \"u\"\n\
             [tenants.a]\nschema = \"a\"\nserver = \"eu2\"\n"
        ))
        .unwrap();
        assert_eq!(
            ok.place_of(Some("eu2"), None),
            ("eu2".to_string(), "e".to_string())
        );
        assert_eq!(
            ok.place_of(None, Some("x")),
            ("default".to_string(), "x".to_string())
        );
    }

    #[test]
    fn user_naming_unknown_tenant() {
        let text = MIN.replace(
            "password = \"secret\"",
            "password = \"s\"\ntenants = [\"nope\"]",
        );
        let e = problems(&text);
        assert!(e.contains("users.app.tenants: \"nope\""), "{e}");
    }

    #[test]
    fn tenant_server_logins() {
        let text = MIN.replace(
            "[tenants.acme]\nschema = \"tenant_acme\"",
            "[tenants.acme]\nschema = \"tenant_acme\"\nserver_user = \"acme_role\"\n\
             [tenants.globex]\nschema = \"g\"\nserver_user = \"shared_role\"\nserver_password = \"s\"\n\
             [tenants.initech]\nschema = \"i\"\n\
             [tenants.umbrella]\nschema = \"u\"\nserver_user = \"shared_role\"\nserver_password = \"s\"",
        );
        // A server_user without a password is allowed (the server may trust it).
        let c = Config::parse(&text).unwrap();
        let l = c.server_logins();
        assert_eq!(
            l.logins,
            [
                ("tenantpool".to_string(), Some("x".to_string())),
                ("acme_role".to_string(), None),
                ("shared_role".to_string(), Some("s".to_string())),
            ]
        );
        assert_eq!(l.of_tenant, [1, 2, 0, 2]);
    }

    #[test]
    fn tenant_server_login_problems_are_named() {
        let text = MIN.replace(
            "[tenants.acme]\nschema = \"tenant_acme\"",
            "[tenants.acme]\nschema = \"tenant_acme\"\nserver_user = \"r\"\n\
             server_password = \"a\"\nserver_password_env = \"TENANTPOOL_TEST_UNSET_VAR\"\n\
             [tenants.b]\nschema = \"b\"\nserver_user = \"q\"\nserver_password = \"one\"\n\
             [tenants.c]\nschema = \"c\"\nserver_user = \"q\"\nserver_password = \"two\"\n\
             [tenants.d]\nschema = \"d\"\nserver_password = \"p\"\n\
             [tenants.e]\nschema = \"e\"\nserver_user = \"tenantpool\"\nserver_password = \"not-x\"\n\
             [tenants.f]\nschema = \"f\"\nserver_user = \"\"",
        );
        let e = problems(&text);
        assert!(
            e.contains("tenants.acme: give either server_password or server_password_env"),
            "{e}"
        );
        assert!(
            e.contains(
                "tenants.acme.server_password_env: environment variable TENANTPOOL_TEST_UNSET_VAR is not set"
            ),
            "{e}"
        );
        assert!(
            e.contains("tenants.c.server_password: tenant b logs in as server_user \"q\" too"),
            "{e}"
        );
        assert!(!e.contains("tenants.b.server_password"), "{e}");
        assert!(
            e.contains("tenants.d.server_password: a password without server_user"),
            "{e}"
        );
        assert!(e.contains("tenants.e.server_password"), "{e}");
        assert!(e.contains("tenants.f.server_user"), "{e}");
    }

    #[test]
    fn plans_settings_directory_and_domain() {
        let text = MIN.replace(
            "[tenants.acme]\nschema = \"tenant_acme\"",
            "[tenants.acme]\nschema = \"tenant_acme\"\nplan = \"pro\"\n\
             [tenants.own]\nschema = \"o\"\nplan = \"pro\"\nmax_server_connections = 2\n\
             [plans.pro]\nmax_server_connections = 7\n\
             [tenant_defaults]\nsettings = { \"app.tenant\" = \"{tenant}\" }",
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.tenant_max_server(&c.tenants["acme"]), 7);
        assert_eq!(c.tenant_max_server(&c.tenants["own"]), 2);
        assert_eq!(c.tenant_max_clients(&c.tenants["own"]), 1000);
        let bad = text
            .replace("plan = \"pro\"\nmax_server", "plan = \"gold\"\nmax_server")
            .replace(
                "\"app.tenant\" = ",
                "\"search_path\" = \"x\", \"App Tenant\" = ",
            )
            + "[proxy]\ntenant_from = \"domain\"\n[directory]\nquery = \"\"\nrefresh = \"0s\"\n";
        let e = problems(&bad);
        for needle in [
            "tenants.own.plan: \"gold\" is not a configured plan",
            "tenant_defaults.settings: \"search_path\" is set by tenantpool",
            "tenant_defaults.settings: \"App Tenant\" is not a setting name",
            "proxy.tenant_from = \"domain\": needs client_tls other than \"disable\"",
            "directory.query: must not be empty",
            "directory.refresh: must be above 0",
        ] {
            assert!(e.contains(needle), "{needle}: {e}");
        }
        // A directory may be the only source of tenants; users may name its tenants.
        let dir_only = MIN.replace("[tenants.acme]\nschema = \"tenant_acme\"", "")
            + "[directory]\nquery = \"SELECT 1\"\n";
        let dir_only = dir_only.replace(
            "password = \"secret\"",
            "password = \"s\"\ntenants = [\"later\"]",
        );
        let c = Config::parse(&dir_only).unwrap();
        let d = c.directory.unwrap();
        assert_eq!((d.refresh, d.max_tenants), (Dur::secs(30), 10_000));
    }

    #[test]
    fn keys_that_need_a_restart_keep_their_running_values() {
        let running = Config::parse(MIN).unwrap();
        let mut new = Config::parse(&MIN.replace(
            "[server]\n",
            "[proxy]\nlisten = \"127.0.0.1:7000\"\nmax_client_conn = 5\n[server]\nport = 6000\n",
        ))
        .unwrap();
        assert_eq!(
            new.keep_restart_only(&running),
            ["proxy.listen", "server.port"]
        );
        assert_eq!(
            (new.proxy.listen.as_str(), new.server.port),
            ("0.0.0.0:6432", 5432)
        );
        assert_eq!(new.proxy.max_client_conn, 5, "live keys stay as read");
    }
}
