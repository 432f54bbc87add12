//! Live configuration: reloads (SIGHUP, the console's RELOAD) and the tenant directory put
//! a new set of tenants, users, caps and limits in force without dropping a client.
//!
//! The config in force and the users are published whole (arc-swap): the hot path reads
//! them without a lock. Tenants keep their ids ([`crate::tenant::Tenants::apply`]); what a
//! live tenant may change (caps, login) is read from atomics at each checkout, its
//! search_path and settings from its spec, which a server connection compares by
//! generation. A removed tenant refuses new logins (3D000) and its clients get FATAL 57P01
//! at their next transaction boundary, as after the console's KILL.
//!
//! One apply runs at a time; it is made from the TOML config in force and the directory's
//! last good result, so a reload keeps the directory's tenants and a directory refresh
//! keeps the TOML's.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::Shared;
use crate::client::auth::UserDb;
use crate::config::{ADMIN_DATABASES, Config, settings_problems};
use crate::tenant::{Applied, Source, TenantDef, TenantId, Tenants};

/// One row of the directory's query, as text (`None` for NULL or a missing column).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirRow {
    pub tenant: Option<String>,
    pub schema: Option<String>,
    pub plan: Option<String>,
    pub domain: Option<String>,
    pub settings: Option<String>,
    /// The server and database it lives in (`server`, `database` columns; optional).
    pub server: Option<String>,
    pub database: Option<String>,
}

/// The live part of the shared state.
pub struct Live {
    /// The config in force (keys that need a restart keep their start-up values).
    config: ArcSwap<Config>,
    /// The file a reload reads.
    path: Mutex<Option<PathBuf>>,
    /// The directory's last good result (`None` before the first).
    directory: Mutex<Option<Arc<Vec<DirRow>>>>,
    /// Held while a change is applied: one at a time.
    applying: Mutex<()>,
    /// Problems with directory rows last logged, so that a refresh logs only new ones.
    logged: Mutex<BTreeSet<String>>,
    /// Bumped when a reload put a new config in force (the directory task follows it).
    pub version: tokio::sync::watch::Sender<u64>,
}

impl Live {
    pub fn new(config: Config) -> Live {
        Live {
            config: ArcSwap::from_pointee(config),
            path: Mutex::new(None),
            directory: Mutex::new(None),
            applying: Mutex::new(()),
            logged: Mutex::new(BTreeSet::new()),
            version: tokio::sync::watch::Sender::new(0),
        }
    }

    /// The config in force, to read a value from (a guard: not to be held across an
    /// await or for long).
    #[inline]
    pub fn config(&self) -> arc_swap::Guard<Arc<Config>> {
        self.config.load()
    }

    /// Sets the file a reload reads (the one the proxy was started with).
    pub fn set_path(&self, path: impl Into<PathBuf>) {
        *self.path.lock().unwrap_or_else(|e| e.into_inner()) = Some(path.into());
    }

    pub fn path(&self) -> Option<PathBuf> {
        self.path.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Tenants the directory brings now (the last good result).
    pub fn directory_rows(&self) -> Option<Arc<Vec<DirRow>>> {
        self.directory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// What a good reload did, for the log and the console.
#[derive(Debug, Clone, Default)]
pub struct Reloaded {
    pub applied: Applied,
    /// Keys changed in the file that need a restart (their running values stay).
    pub restart_needed: Vec<&'static str>,
}

impl std::fmt::Display for Reloaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let a = &self.applied;
        write!(
            f,
            "{} tenants added, {} removed, {} changed",
            a.added.len(),
            a.removed.len(),
            a.changed.len()
        )?;
        if !self.restart_needed.is_empty() {
            write!(
                f,
                "; not applied, need a restart: {}",
                self.restart_needed.join(", ")
            )?;
        }
        Ok(())
    }
}

/// Reloads the config file the proxy was started with (SIGHUP, RELOAD). A file that does
/// not parse or validate is refused, with one log line naming every problem, and nothing
/// changes. Returns once the new config is in force.
pub fn reload(shared: &Shared) -> Result<Reloaded, String> {
    let Some(path) = shared.live.path() else {
        let e = "no config file to reload (the proxy was not started from one)".to_string();
        shared.metrics.live.reloads_error.increment(1);
        tracing::error!("config reload refused: {e}");
        return Err(e);
    };
    match Config::load(&path) {
        Ok(config) => Ok(reload_with(shared, config)),
        Err(e) => {
            shared.metrics.live.reloads_error.increment(1);
            let problems = e.0.join("; ");
            tracing::error!(
                file = %path.display(),
                "config reload refused, the running config stays: {problems}"
            );
            Err(problems)
        }
    }
}

/// Puts a parsed and validated config in force (what [`reload`] does after reading the
/// file): users, tenants, caps, limits; keys that need a restart keep their start-up
/// values and are logged.
pub fn reload_with(shared: &Shared, mut config: Config) -> Reloaded {
    let restart_needed = config.keep_restart_only(&shared.config);
    if !restart_needed.is_empty() {
        tracing::warn!(
            keys = %restart_needed.join(", "),
            "config reload: these keys changed in the file but need a restart; their running values stay"
        );
    }
    // SCRAM keys are derived and the TLS files read again here, before anything changes
    // (the files were checked when the config was validated; one that changed since keeps
    // the running TLS setup). The servers' TLS files are read by `placement::apply`.
    let users = UserDb::from_config(&config);
    let client_tls = crate::tls::Listener::from_config(&config);
    let guard = shared
        .live
        .applying
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let config = Arc::new(config);
    shared.users.store(Arc::new(users));
    shared.live.config.store(config.clone());
    let rows = shared.live.directory_rows();
    let applied = apply(shared, &config, rows.as_deref().map(|r| r.as_slice()));
    match client_tls {
        Ok(tls) => shared.tls.store(tls.map(Arc::new)),
        Err(e) => tracing::error!("config reload: client TLS kept as it was: {e}"),
    }
    drop(guard);
    shared.live.version.send_modify(|v| *v += 1);
    shared.metrics.live.reloads_ok.increment(1);
    shared
        .metrics
        .live
        .last_reload
        .set(crate::metrics::unix_now());
    let r = Reloaded {
        applied,
        restart_needed,
    };
    tracing::info!("config reloaded: {r}");
    r
}

/// Puts a new directory result in force (with the TOML tenants in force).
pub fn apply_directory(shared: &Shared, rows: Vec<DirRow>) -> Applied {
    let guard = shared
        .live
        .applying
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let rows = Arc::new(rows);
    *shared
        .live
        .directory
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Some(rows.clone());
    let config = shared.live.config();
    let applied = apply(shared, &config, Some(&rows));
    drop(guard);
    if !applied.is_empty() {
        let name = |id: &TenantId| shared.tenants.get(*id).name.clone();
        tracing::info!(
            added = ?applied.added.iter().map(name).collect::<Vec<_>>(),
            removed = ?applied.removed.iter().map(name).collect::<Vec<_>>(),
            changed = applied.changed.len(),
            "directory applied"
        );
    }
    applied
}

/// The tenants the directory's rows define, beside the TOML ones; every row that cannot be
/// used is skipped, with a problem naming it.
pub fn directory_defs(config: &Config, rows: &[DirRow]) -> (Vec<TenantDef>, Vec<String>) {
    let Some(dir) = &config.directory else {
        return (Vec::new(), Vec::new());
    };
    let mut defs: Vec<TenantDef> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut problems = Vec::new();
    let max = dir.max_tenants as usize;
    for (i, row) in rows.iter().enumerate() {
        let Some(name) = row.tenant.as_deref().filter(|n| !n.is_empty()) else {
            problems.push(format!("directory: row {} has no tenant; skipped", i + 1));
            continue;
        };
        let skip = |why: String| format!("directory: tenant \"{name}\" {why}; skipped");
        if config.tenants.contains_key(name) {
            problems.push(format!(
                "directory: tenant \"{name}\" is also in [tenants.{name}]; the TOML one stays"
            ));
            continue;
        }
        if ADMIN_DATABASES.contains(&name) || name.contains('\0') {
            problems.push(skip("is a reserved name".into()));
            continue;
        }
        if !seen.insert(name.to_string()) {
            problems.push(skip("appears in more than one row".into()));
            continue;
        }
        let Some(schema) = row.schema.as_deref().filter(|s| !s.is_empty()) else {
            problems.push(skip("has no schema".into()));
            continue;
        };
        if let Some(plan) = &row.plan
            && !config.plans.contains_key(plan)
        {
            problems.push(skip(format!(
                "names plan \"{plan}\", which is not configured"
            )));
            continue;
        }
        if let Some(server) = &row.server
            && config.server_named(server).is_none()
        {
            problems.push(skip(format!(
                "names server \"{server}\", which is not configured"
            )));
            continue;
        }
        if row
            .database
            .as_deref()
            .is_some_and(|d| d.is_empty() || d.contains('\0'))
        {
            problems.push(skip("has an empty database".into()));
            continue;
        }
        let own: BTreeMap<String, String> = match row.settings.as_deref() {
            None => BTreeMap::new(),
            Some(text) => match parse_settings(text) {
                Ok(s) => s,
                Err(e) => {
                    problems.push(skip(format!("has bad settings ({e})")));
                    continue;
                }
            },
        };
        let bad = settings_problems("settings", &own);
        if !bad.is_empty() {
            problems.push(skip(format!("has bad settings ({})", bad.join("; "))));
            continue;
        }
        if defs.len() >= max {
            problems.push(format!(
                "directory: more than directory.max_tenants ({max}) tenants; rows from tenant \"{name}\" on are ignored"
            ));
            break;
        }
        let (max_server, max_clients) = config.caps(row.plan.as_deref(), None, None);
        let mut settings = config.tenant_defaults.settings.clone();
        settings.extend(own);
        defs.push(TenantDef {
            name: name.to_string(),
            schema: schema.to_string(),
            max_server,
            max_clients,
            login: crate::server::SHARED_LOGIN,
            server: row.server.clone(),
            database: row.database.clone(),
            place: crate::placement::DEFAULT_PLACE,
            settings,
            plan: row.plan.clone(),
            domain: row.domain.clone(),
            source: Source::Directory,
        });
    }
    (defs, problems)
}

/// The directory's `settings` column: a flat JSON object of string values.
fn parse_settings(text: &str) -> Result<BTreeMap<String, String>, String> {
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(text).map_err(|e| format!("not a JSON object: {e}"))?;
    map.into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => Ok((k, s)),
            other => Err(format!("\"{k}\" is {other}, not a string")),
        })
        .collect()
}

/// Puts `config` (and the directory's `rows`) in force. The caller holds `applying`.
fn apply(shared: &Shared, config: &Config, rows: Option<&[DirRow]>) -> Applied {
    let (logins, of_tenant) =
        crate::placement::merge_logins(&shared.pools.default().target().logins, config);
    let mut defs = Tenants::defs_from_config(config);
    for (d, login) in defs.iter_mut().zip(of_tenant) {
        d.login = login;
    }
    let mut problems = Vec::new();
    if let Some(rows) = rows {
        let (dir, p) = directory_defs(config, rows);
        problems = p;
        shared.metrics.live.directory_tenants.set(dir.len() as f64);
        defs.extend(dir);
    }
    // New logins and places first: a new or moved tenant may use them as soon as it can
    // be found there.
    problems.extend(crate::placement::apply(
        &shared.pools,
        &shared.tenants,
        config,
        &logins,
        &mut defs,
    ));
    log_new_problems(shared, problems);
    let applied = shared
        .tenants
        .apply(defs, &config.tenant_defaults.search_path, |new| {
            for (_, _, pool) in shared.pools.iter() {
                pool.grow(shared.tenants.ids());
            }
            shared.metrics.add_tenants(new);
        });
    for &id in &applied.removed {
        let t = shared.tenants.get(id);
        tracing::info!(tenant = %t.name, "tenant removed: new logins are refused, its clients end at their next transaction boundary");
        end_clients(shared, id);
    }
    // Raised caps: waiters go on at once.
    for (_, _, pool) in shared.pools.iter() {
        pool.reconfigure(None, None);
    }
    applied
}

/// Logs problems with directory rows (and tenants' places) that were not logged at the
/// last refresh or reload.
fn log_new_problems(shared: &Shared, problems: Vec<String>) {
    let mut logged = shared.live.logged.lock().unwrap_or_else(|e| e.into_inner());
    let now: BTreeSet<String> = problems.into_iter().collect();
    let new: Vec<&String> = now.difference(&logged).collect();
    if !new.is_empty() {
        tracing::error!(
            "not put in force: {}",
            new.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    *logged = now;
}

/// Ends a tenant's clients at their next transaction boundary (at once when idle) with
/// FATAL 57P01, and closes its idle server connections: the admin console's KILL, and what
/// a removed tenant's clients get.
pub fn end_clients(shared: &Shared, tenant: TenantId) {
    for c in shared.registry.all() {
        if c.tenant == tenant {
            c.killed.store(true, Ordering::Release);
            c.wake();
        }
    }
    shared.stop.notify_waiters();
    shared.pools.close_idle_of(tenant);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        Config::parse(&format!(
            "[server]\ndatabase = \"d\"\nuser = \"u\"\n\
             [tenant_defaults]\nmax_server_connections = 3\nsettings = {{ \"app.tenant\" = \"{{tenant}}\" }}\n\
             [plans.pro]\nmax_server_connections = 7\n\
             [tenants.acme]\nschema = \"tenant_acme\"\n\
             [users.x]\npassword = \"p\"\n{extra}"
        ))
        .unwrap()
    }

    fn row(name: &str, plan: Option<&str>, settings: Option<&str>) -> DirRow {
        DirRow {
            tenant: Some(name.into()),
            schema: Some(format!("tenant_{name}")),
            plan: plan.map(Into::into),
            domain: None,
            settings: settings.map(Into::into),
            server: None,
            database: None,
        }
    }

    #[test]
    fn directory_rows_become_tenants_or_named_problems() {
        let c = config("[directory]\nquery = \"SELECT 1\"\nmax_tenants = 3\n");
        let rows = vec![
            row("a", Some("pro"), Some(r#"{"app.tenant_id": "7c9e"}"#)),
            row("acme", None, None),
            row("b", Some("gold"), None),
            row("c", None, Some(r#"{"app.x": 1}"#)),
            row("d", None, Some(r#"{"search_path": "x"}"#)),
            row("a", None, None),
            DirRow::default(),
            row("e", None, None),
            row("f", None, None),
            row("g", None, None),
        ];
        let (defs, problems) = directory_defs(&c, &rows);
        let names: Vec<_> = defs.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["a", "e", "f"]);
        assert_eq!((defs[0].max_server, defs[1].max_server), (7, 3));
        assert_eq!(defs[0].settings["app.tenant_id"], "7c9e");
        assert_eq!(defs[0].settings["app.tenant"], "{tenant}");
        let all = problems.join("\n");
        for needle in [
            "\"acme\" is also in [tenants.acme]",
            "\"b\" names plan \"gold\"",
            "\"c\" has bad settings",
            "\"d\" has bad settings",
            "\"a\" appears in more than one row",
            "row 7 has no tenant",
            "max_tenants (3)",
        ] {
            assert!(all.contains(needle), "{needle}: {all}");
        }
    }

    #[test]
    fn directory_rows_name_their_server_and_database() {
        let c = config(
            "[directory]\nquery = \"SELECT 1\"\n\
             [servers.eu2]\ndatabase = \"e\"\nuser = \"u2\"\n",
        );
        let placed = |server: Option<&str>, database: Option<&str>| DirRow {
            server: server.map(Into::into),
            database: database.map(Into::into),
            ..row("x", None, None)
        };
        let rows = vec![
            DirRow {
                tenant: Some("a".into()),
                ..placed(Some("eu2"), Some("big"))
            },
            DirRow {
                tenant: Some("b".into()),
                ..placed(Some("nowhere"), None)
            },
            DirRow {
                tenant: Some("c".into()),
                ..placed(None, Some(""))
            },
        ];
        let (defs, problems) = directory_defs(&c, &rows);
        assert_eq!(defs.len(), 1);
        assert_eq!(
            (defs[0].server.as_deref(), defs[0].database.as_deref()),
            (Some("eu2"), Some("big"))
        );
        assert_eq!(
            c.place_of(defs[0].server.as_deref(), defs[0].database.as_deref()),
            ("eu2".to_string(), "big".to_string())
        );
        let all = problems.join("\n");
        assert!(all.contains("\"b\" names server \"nowhere\""), "{all}");
        assert!(all.contains("\"c\" has an empty database"), "{all}");
    }
}
