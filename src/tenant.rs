//! Tenants: who they are, what schema they live in, their caps, and the SQL that puts a
//! server connection on their `search_path` and their settings.
//!
//! A tenant is addressed by a dense id, so the pool and the metrics can keep per-tenant
//! state in plain vectors. Ids are stable for a tenant's life and never reused: a reload or
//! the directory adds tenants with new ids, and a removed tenant is marked gone (a tenant
//! that comes back under the same name gets its id back). The set of tenants in force is
//! published whole ([`arc_swap`]), so lookups on the hot path take no lock; what may change
//! for a live tenant is read from atomics (caps, login) or from its [`Spec`], also swapped
//! whole.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};

use crate::config::Config;
use crate::placement::PlaceId;
use crate::protocol::{escape_literal, put_query};
use crate::server::LoginId;
use crate::session_state::{RESET_SEARCH_PATH, Reset};

pub type TenantId = u32;

/// Where a tenant is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Toml,
    Directory,
}

/// A tenant as the config or the directory defines it, resolved (caps from its own keys,
/// its plan or the defaults; settings merged over `tenant_defaults.settings`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantDef {
    pub name: String,
    pub schema: String,
    pub max_server: u32,
    pub max_clients: u32,
    pub login: LoginId,
    /// Its `server` and `database` keys (or directory columns), as given.
    pub server: Option<String>,
    pub database: Option<String>,
    /// Where that is ([`crate::placement::apply`] sets it).
    pub place: PlaceId,
    /// Setting name -> value, `{tenant}` and `{schema}` not yet replaced.
    pub settings: BTreeMap<String, String>,
    pub plan: Option<String>,
    pub domain: Option<String>,
    pub source: Source,
}

/// What a live tenant is now, beyond its caps: replaced whole when it changes.
#[derive(Debug)]
pub struct Spec {
    pub schema: String,
    /// The `search_path` value, e.g. `tenant_acme, public` (a schema name that needs it is
    /// double-quoted).
    pub search_path: String,
    /// The tenant's settings (name, value), sorted, placeholders replaced.
    pub settings: Vec<(String, String)>,
    pub plan: Option<String>,
    pub domain: Option<String>,
    pub source: Source,
    /// Changes whenever the search_path or settings do: a server connection that carries
    /// an older generation of its tenant is reset as for a tenant switch.
    pub generation: u64,
    /// What a checkout sends for each kind of [`Reset`].
    preludes: Preludes,
}

/// One tenant.
#[derive(Debug)]
pub struct Tenant {
    pub id: TenantId,
    pub name: String,
    /// Server connections this tenant may use at once (read at every checkout).
    max_server: AtomicU32,
    /// Client connections this tenant may hold.
    max_clients: AtomicU32,
    /// The server login its transactions run as ([`crate::server::SHARED_LOGIN`] unless it
    /// has a `server_user`).
    login: AtomicU32,
    /// The place (server and database) its next transaction goes to.
    place: AtomicU32,
    /// Removed by a reload or the directory: no new logins; its clients leave at their
    /// next transaction boundary.
    gone: AtomicBool,
    spec: ArcSwap<Spec>,
    /// `spec`'s generation, readable without loading the spec (stored after it).
    generation: AtomicU64,
    /// Client connections open now.
    pub clients: AtomicU32,
    /// DISABLE: new logins are refused until ENABLE.
    pub disabled: AtomicBool,
    /// Running totals and current counts, for metrics and the admin console.
    pub stats: TenantStats,
}

/// Per-tenant counters, bumped once per transaction (never per message).
#[derive(Debug, Default)]
pub struct TenantStats {
    /// Clients inside a transaction now (holding a server connection).
    pub active: AtomicU32,
    /// Clients queued for a server connection now.
    pub waiting: AtomicU32,
    pub transactions: AtomicU64,
    pub queries: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub transaction_us: AtomicU64,
    pub query_us: AtomicU64,
    pub wait_us: AtomicU64,
    pub wait_timeouts: AtomicU64,
}

/// DISCARD ALL without its DEALLOCATE ALL and DISCARD PLANS (PostgreSQL documents DISCARD ALL
/// as this sequence).
const RESET_KEEPING_STATEMENTS: &str = "CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; \
     UNLISTEN *; SELECT pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES";

/// The messages of each reset for one tenant, made once, with the number of
/// ReadyForQuery replies each brings (the server scanner swallows them).
#[derive(Debug)]
struct Preludes {
    fresh: Bytes,
    discard: Bytes,
    keep: Bytes,
    reassert: Bytes,
    restore: Bytes,
}

impl Preludes {
    /// The preludes of a tenant whose search_path value is `search_path` and whose
    /// settings are `settings`.
    ///
    /// The search_path is set with `set_config`, so that PostgreSQL shows it exactly as
    /// given (`SET` would print it in its own quoting), whichever reset set it. Values come
    /// from the config or the directory, never from a client, and travel as `E''`
    /// literals, which read the same whatever standard_conforming_strings a client left on
    /// the connection. The settings go in the same statement as the search_path: they cost
    /// no statement, and no round trip, of their own.
    fn new(search_path: &str, settings: &[(String, String)]) -> Preludes {
        let path = format!(
            "pg_catalog.set_config('search_path', {}, false)",
            escape_literal(search_path)
        );
        let context: String = settings
            .iter()
            .map(|(name, value)| {
                format!(
                    ", pg_catalog.set_config({}, {}, false)",
                    escape_literal(name),
                    escape_literal(value)
                )
            })
            .collect();
        let set = format!("SELECT {path}{context}");
        let query = |sql: &str| {
            let mut b = BytesMut::new();
            put_query(&mut b, sql);
            b
        };
        let fresh = query(&set);
        // DISCARD ALL may not run inside a multi-statement query string (an implicit
        // transaction block), hence two Query messages.
        let mut discard = query("DISCARD ALL");
        discard.extend_from_slice(&fresh);
        // Without DISCARD ALL, the reset and the search_path fit in one Query message.
        let keep = query(&format!("{RESET_KEEPING_STATEMENTS}; {set}"));
        // One statement: three statements in a Query cost PostgreSQL about twice as much
        // as one. A NULL value resets the session authorization, as SET SESSION
        // AUTHORIZATION DEFAULT does.
        let reassert = query(&format!(
            "SELECT pg_catalog.set_config('session_authorization', NULL, false), \
             pg_catalog.set_config('role', 'none', false), {path}{context}"
        ));
        // Session mode: the client's own search_path stays unless a reset sent it away;
        // the tenant's settings are the tenant's, in session mode too.
        let restore_path = format!(
            "SELECT {path} WHERE pg_catalog.current_setting('search_path') = '{RESET_SEARCH_PATH}'"
        );
        let restore = match context.strip_prefix(", ") {
            Some(c) => query(&format!("SELECT {c}; {restore_path}")),
            None => query(&restore_path),
        };
        Preludes {
            fresh: fresh.freeze(),
            discard: discard.freeze(),
            keep: keep.freeze(),
            reassert: reassert.freeze(),
            restore: restore.freeze(),
        }
    }
}

/// A schema name as an element of a search_path value: as it is when PostgreSQL would
/// read it back unchanged (lowercase letters, digits, `_`), else double-quoted.
fn path_element(schema: &str) -> String {
    let plain = schema
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if plain {
        schema.to_string()
    } else {
        crate::protocol::quote_ident(schema)
    }
}

/// The tenants in force.
#[derive(Debug, Default)]
struct TenantSet {
    by_name: HashMap<String, &'static Tenant>,
    /// By `domain` (lower case), for `tenant_from = "domain"`: the first tenant that
    /// claims a domain keeps it.
    by_domain: HashMap<String, &'static Tenant>,
    /// Sorted by name.
    sorted: Vec<&'static Tenant>,
    /// The setting names of every tenant: clients may not set them.
    context_names: Vec<String>,
}

/// What [`Tenants::apply`] changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    pub added: Vec<TenantId>,
    pub removed: Vec<TenantId>,
    /// Tenants whose caps, login, schema, settings or plan changed.
    pub changed: Vec<TenantId>,
}

impl Applied {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// All tenants: every tenant since start by id, and the set in force by name.
///
/// Tenants are never freed (`Box::leak`): ids are never reused, so a tenant costs its
/// struct (a few hundred bytes, its preludes dropped when it is removed) for the life of
/// the process, and every reader can hold a plain `&'static Tenant` without a lock or a
/// reference count. A removed tenant that comes back under its name gets its id, counters
/// and metrics series back.
#[derive(Debug)]
pub struct Tenants {
    /// By id.
    all: ArcSwap<Vec<&'static Tenant>>,
    live: ArcSwap<TenantSet>,
    /// Every name ever seen, by id; held while a change is applied.
    names: Mutex<HashMap<String, TenantId>>,
}

static GENERATION: AtomicU64 = AtomicU64::new(1);

/// `{tenant}` and `{schema}` replaced in the values of a tenant's settings.
fn substitute(
    settings: &BTreeMap<String, String>,
    tenant: &str,
    schema: &str,
) -> Vec<(String, String)> {
    settings
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.replace("{tenant}", tenant).replace("{schema}", schema),
            )
        })
        .collect()
}

impl Spec {
    fn new(def: &TenantDef, search_path_template: &str, generation: Option<u64>) -> Spec {
        let search_path = search_path_template.replace("{schema}", &path_element(&def.schema));
        let settings = substitute(&def.settings, &def.name, &def.schema);
        Spec {
            preludes: Preludes::new(&search_path, &settings),
            schema: def.schema.clone(),
            search_path,
            settings,
            plan: def.plan.clone(),
            domain: def.domain.clone(),
            source: def.source,
            generation: generation.unwrap_or_else(|| GENERATION.fetch_add(1, Ordering::Relaxed)),
        }
    }
}

impl Tenants {
    /// The `[tenants.*]` of a config (login ids as [`Config::server_logins`] numbers them).
    pub fn defs_from_config(config: &Config) -> Vec<TenantDef> {
        let logins = config.server_logins().of_tenant;
        config
            .tenants
            .iter()
            .zip(logins)
            .map(|((name, t), login)| {
                let (max_server, max_clients) = config.caps(
                    t.plan.as_deref(),
                    t.max_server_connections,
                    t.max_client_connections,
                );
                let mut settings = config.tenant_defaults.settings.clone();
                settings.extend(t.settings.iter().map(|(k, v)| (k.clone(), v.clone())));
                TenantDef {
                    name: name.clone(),
                    schema: t.schema.clone(),
                    max_server,
                    max_clients,
                    login,
                    server: t.server.clone(),
                    database: t.database.clone(),
                    place: crate::placement::DEFAULT_PLACE,
                    settings,
                    plan: t.plan.clone(),
                    domain: None,
                    source: Source::Toml,
                }
            })
            .collect()
    }

    pub fn from_config(config: &Config) -> Tenants {
        let tenants = Tenants {
            all: ArcSwap::from_pointee(Vec::new()),
            live: ArcSwap::from_pointee(TenantSet::default()),
            names: Mutex::new(HashMap::new()),
        };
        tenants.apply(
            Tenants::defs_from_config(config),
            &config.tenant_defaults.search_path,
            |_| {},
        );
        tenants
    }

    /// Puts `defs` in force: tenants not yet known get new ids, known ones (live or gone)
    /// are updated in place, live ones not in `defs` are marked gone. `before_publish` runs
    /// with the tenants that got new ids after they can be found by id and before they can
    /// be found by name: the pool and the metrics make room for them there.
    pub fn apply(
        &self,
        defs: Vec<TenantDef>,
        search_path_template: &str,
        before_publish: impl FnOnce(&[&'static Tenant]),
    ) -> Applied {
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        let mut applied = Applied::default();
        let mut all: Vec<&'static Tenant> = self.all.load().as_ref().clone();
        let mut new: Vec<&'static Tenant> = Vec::new();
        let mut set = TenantSet::default();
        for def in defs {
            if set.by_name.contains_key(&def.name) {
                continue;
            }
            let tenant = match names.get(&def.name) {
                Some(&id) => {
                    let t = all[id as usize];
                    if t.update(&def, search_path_template) {
                        applied.changed.push(id);
                    }
                    if t.gone.swap(false, Ordering::AcqRel) {
                        applied.added.push(id);
                    }
                    t
                }
                None => {
                    let id = all.len() as TenantId;
                    let spec = Spec::new(&def, search_path_template, None);
                    let t: &'static Tenant = Box::leak(Box::new(Tenant {
                        id,
                        name: def.name.clone(),
                        max_server: AtomicU32::new(def.max_server),
                        max_clients: AtomicU32::new(def.max_clients),
                        login: AtomicU32::new(def.login),
                        place: AtomicU32::new(def.place),
                        gone: AtomicBool::new(false),
                        generation: AtomicU64::new(spec.generation),
                        spec: ArcSwap::from_pointee(spec),
                        clients: AtomicU32::new(0),
                        disabled: AtomicBool::new(false),
                        stats: TenantStats::default(),
                    }));
                    names.insert(def.name.clone(), id);
                    all.push(t);
                    new.push(t);
                    applied.added.push(id);
                    t
                }
            };
            for (k, _) in &tenant.spec().settings {
                if !set.context_names.contains(k) {
                    set.context_names.push(k.clone());
                }
            }
            if let Some(d) = &def.domain {
                set.by_domain
                    .entry(d.to_ascii_lowercase())
                    .or_insert(tenant);
            }
            set.by_name.insert(def.name, tenant);
        }
        for t in self.live.load().sorted.iter() {
            if !set.by_name.contains_key(&t.name) {
                t.gone.store(true, Ordering::Release);
                applied.removed.push(t.id);
            }
        }
        set.sorted = set.by_name.values().copied().collect();
        set.sorted.sort_by(|a, b| a.name.cmp(&b.name));
        self.all.store(Arc::new(all));
        before_publish(&new);
        self.live.store(Arc::new(set));
        applied
    }

    /// Any tenant since start, by id (a removed one too).
    #[inline]
    pub fn get(&self, id: TenantId) -> &'static Tenant {
        self.all.load()[id as usize]
    }

    /// A tenant in force, by name.
    pub fn lookup(&self, name: &str) -> Option<&'static Tenant> {
        self.live.load().by_name.get(name).copied()
    }

    /// The tenant in force whose `domain` is this host name (any case).
    pub fn lookup_domain(&self, host: &str) -> Option<&'static Tenant> {
        self.live
            .load()
            .by_domain
            .get(&host.to_ascii_lowercase())
            .copied()
    }

    /// Tenants in force.
    pub fn len(&self) -> usize {
        self.live.load().sorted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many ids have been given out (tenants in force and removed ones).
    pub fn ids(&self) -> usize {
        self.all.load().len()
    }

    /// The tenants in force, by name.
    pub fn iter(&self) -> impl Iterator<Item = &'static Tenant> + use<> {
        let set = self.live.load_full();
        (0..set.sorted.len()).map(move |i| set.sorted[i])
    }

    /// Every tenant since start, by id, removed ones included.
    pub fn iter_all(&self) -> impl Iterator<Item = &'static Tenant> + use<> {
        let all = self.all.load_full();
        (0..all.len()).map(move |i| all[i])
    }

    /// Is `name` (lowercase) a setting some tenant's transactions run with? Clients may not
    /// set those at startup.
    pub fn is_context_setting(&self, name: &str) -> bool {
        self.live.load().context_names.iter().any(|n| n == name)
    }
}

impl Tenant {
    /// Applies a changed definition; true when anything changed.
    fn update(&self, def: &TenantDef, search_path_template: &str) -> bool {
        let mut changed = self.max_server.swap(def.max_server, Ordering::AcqRel) != def.max_server;
        changed |= self.max_clients.swap(def.max_clients, Ordering::AcqRel) != def.max_clients;
        changed |= self.login.swap(def.login, Ordering::AcqRel) != def.login;
        changed |= self.place.swap(def.place, Ordering::AcqRel) != def.place;
        let old = self.spec.load();
        let fresh = Spec::new(def, search_path_template, Some(old.generation));
        let same_context = fresh.search_path == old.search_path && fresh.settings == old.settings;
        let same_rest = fresh.schema == old.schema
            && fresh.plan == old.plan
            && fresh.domain == old.domain
            && fresh.source == old.source;
        if same_context && same_rest {
            return changed;
        }
        let generation = if same_context {
            old.generation
        } else {
            GENERATION.fetch_add(1, Ordering::Relaxed)
        };
        self.spec.store(Arc::new(Spec {
            generation,
            ..fresh
        }));
        self.generation.store(generation, Ordering::Release);
        true
    }

    /// The caps and context now.
    #[inline]
    pub fn max_server(&self) -> u32 {
        self.max_server.load(Ordering::Acquire)
    }

    #[inline]
    pub fn max_clients(&self) -> u32 {
        self.max_clients.load(Ordering::Acquire)
    }

    #[inline]
    pub fn login(&self) -> LoginId {
        self.login.load(Ordering::Acquire)
    }

    /// Where its next transaction goes ([`crate::placement`]).
    #[inline]
    pub fn place(&self) -> PlaceId {
        self.place.load(Ordering::Acquire)
    }

    /// Removed by a reload or the directory.
    #[inline]
    pub fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }

    pub fn spec(&self) -> arc_swap::Guard<Arc<Spec>> {
        self.spec.load()
    }

    /// The generation of its search_path and settings (see [`Spec::generation`]).
    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The messages a reset sends for this tenant and how many ReadyForQuery replies they
    /// bring.
    pub fn prelude(&self, reset: Reset) -> (Bytes, u8) {
        if reset == Reset::None {
            return (Bytes::new(), 0);
        }
        let spec = self.spec.load();
        let p = &spec.preludes;
        match reset {
            Reset::None => (Bytes::new(), 0),
            Reset::Fresh => (p.fresh.clone(), 1),
            Reset::Switch | Reset::Discard => (p.discard.clone(), 2),
            Reset::Keep => (p.keep.clone(), 1),
            Reset::Reassert => (p.reassert.clone(), 1),
            Reset::RestoreIfReset => (p.restore.clone(), 1),
        }
    }

    /// Takes a client slot under this tenant's `max_client_connections`, or `None` when full.
    pub fn try_add_client(&self) -> bool {
        let max = self.max_clients();
        self.clients
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    pub fn remove_client(&self) {
        self.clients.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_path_values_and_literals() {
        assert_eq!(path_element("tenant_acme"), "tenant_acme");
        assert_eq!(path_element("Tenant Acme"), "\"Tenant Acme\"");
        assert_eq!(path_element("a\"b"), "\"a\"\"b\"");
        assert_eq!(path_element("1st"), "\"1st\"");
    }

    fn def(name: &str, settings: &[(&str, &str)]) -> TenantDef {
        TenantDef {
            name: name.into(),
            schema: format!("tenant_{name}"),
            max_server: 2,
            max_clients: 10,
            login: 0,
            server: None,
            database: None,
            place: 0,
            settings: settings
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            plan: None,
            domain: None,
            source: Source::Toml,
        }
    }

    fn text(b: &Bytes) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    #[test]
    fn settings_go_in_every_prelude_as_escaped_literals() {
        let t = Tenants {
            all: ArcSwap::from_pointee(Vec::new()),
            live: ArcSwap::from_pointee(TenantSet::default()),
            names: Mutex::new(HashMap::new()),
        };
        t.apply(
            vec![def(
                "o'brien",
                &[("app.tenant", "{tenant}"), ("app.s", r"{schema}\x")],
            )],
            "{schema}, public",
            |_| {},
        );
        let tenant = t.lookup("o'brien").unwrap();
        for reset in [
            Reset::Fresh,
            Reset::Switch,
            Reset::Keep,
            Reset::Reassert,
            Reset::RestoreIfReset,
        ] {
            let sql = text(&tenant.prelude(reset).0);
            assert!(
                sql.contains("pg_catalog.set_config(E'app.tenant', E'o''brien', false)"),
                "{reset:?}: {sql}"
            );
            assert!(sql.contains(r"E'tenant_o''brien\\x'"), "{reset:?}: {sql}");
        }
        assert!(t.is_context_setting("app.tenant"));
        assert!(!t.is_context_setting("app.other"));
    }

    #[test]
    fn ids_are_stable_and_removed_tenants_come_back_with_theirs() {
        let t = Tenants {
            all: ArcSwap::from_pointee(Vec::new()),
            live: ArcSwap::from_pointee(TenantSet::default()),
            names: Mutex::new(HashMap::new()),
        };
        let a = t.apply(vec![def("a", &[]), def("b", &[])], "{schema}", |_| {});
        assert_eq!(a.added, [0, 1]);
        let gen_b = t.get(1).generation();
        let mut b2 = def("b", &[("app.t", "x")]);
        b2.max_server = 5;
        let a = t.apply(vec![def("c", &[]), b2], "{schema}", |new| {
            assert_eq!(new.len(), 1);
            assert_eq!(new[0].name, "c");
        });
        assert_eq!((a.added, a.removed, a.changed), (vec![2], vec![0], vec![1]));
        assert!(t.get(0).is_gone() && t.lookup("a").is_none());
        assert_eq!(t.lookup("b").unwrap().max_server(), 5);
        assert_ne!(
            t.get(1).generation(),
            gen_b,
            "settings changed: a new generation"
        );
        let a = t.apply(vec![def("a", &[])], "{schema}", |new| {
            assert!(new.is_empty())
        });
        assert_eq!(a.added, [0]);
        assert!(!t.get(0).is_gone());
        assert_eq!((t.len(), t.ids()), (1, 3));
    }
}
