//! Placement: where each tenant lives, and the pool of each place.
//!
//! A tenant lives in one database on one server: `[server]` (named `default`) unless its
//! `server` key names a `[servers.NAME]`, and that server's `database` unless its
//! `database` key names another. Each such (server, database) pair is a *place* with a
//! [`Pool`] of its own: its own `max_connections` (the server's), scheduler, per-tenant caps
//! and fairness, exactly as with one server. Places are numbered ([`PlaceId`]) in the order
//! they first appear and keep their number (and pool) for the life of the process, so the
//! hot path finds a tenant's pool with two plain loads ([`Pools::of`]).
//!
//! A reload or the directory may move a tenant: its place changes at once, so its next
//! transaction checks out from the new pool; transactions (and, in session mode, sessions)
//! running on the old place's connections finish there and count against its caps there
//! until they end. A place no tenant uses any more keeps its pool, with `min_idle` 0, so its
//! connections close as they go idle past `idle_timeout`.
//!
//! Server logins ([`LoginId`]) are numbered once for all places: login 0 is each server's
//! own `user`, the others are tenants' `server_user` roles, the same role with the same id
//! on every server.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::config::{Config, DEFAULT_SERVER};
use crate::pool::{Pool, PoolSettings, PoolSnapshot};
use crate::server::{LoginId, ServerLogin, ServerTarget};
use crate::tenant::{Tenant, TenantDef, TenantId, Tenants};

/// A place's number: its index in [`Pools`].
pub type PlaceId = u32;

/// `[server]` with its own `database`: place 0, made at start.
pub const DEFAULT_PLACE: PlaceId = 0;

/// How many distinct (server, database) pairs one process serves.
pub const MAX_PLACES: usize = 256;

/// A server by name and a database on it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Place {
    pub server: String,
    pub database: String,
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.server, self.database)
    }
}

/// A place and its pool, set once.
type Slot = OnceLock<(Place, Arc<Pool>)>;

/// The pool of every place, by [`PlaceId`]. Append-only: a slot, once set, never changes.
pub struct Pools {
    slots: Box<[Slot]>,
    len: AtomicUsize,
    /// Serializes adding places.
    adding: Mutex<()>,
    /// Set by [`Pools::start_upkeep`]: places made from then on start their upkeep at once.
    upkeep: std::sync::atomic::AtomicBool,
}

impl Pools {
    /// The pools, with the default place's.
    pub fn new(default: Place, pool: Arc<Pool>) -> Pools {
        let slots: Box<[Slot]> = (0..MAX_PLACES).map(|_| OnceLock::new()).collect();
        let _ = slots[0].set((default, pool));
        Pools {
            slots,
            len: AtomicUsize::new(1),
            adding: Mutex::new(()),
            upkeep: Default::default(),
        }
    }

    /// Starts every pool's upkeep ([`Pool::run_maintenance`]), and that of places made
    /// later. Must run inside the tokio runtime.
    pub fn start_upkeep(&self) {
        let _adding = self.adding.lock().unwrap_or_else(|e| e.into_inner());
        self.upkeep.store(true, Ordering::Release);
        for (_, _, pool) in self.iter() {
            tokio::spawn(pool.clone().run_maintenance());
        }
    }

    /// The pool of a place (the default one for an id never given out).
    #[inline]
    pub fn get(&self, id: PlaceId) -> &Arc<Pool> {
        match self.slots.get(id as usize).and_then(|s| s.get()) {
            Some((_, p)) => p,
            None => self.default(),
        }
    }

    /// The pool a tenant's next transaction checks out from.
    #[inline]
    pub fn of(&self, tenant: &Tenant) -> &Arc<Pool> {
        self.get(tenant.place())
    }

    /// `[server]`'s pool (its own database): the directory and LISTEN connections go there.
    pub fn default(&self) -> &Arc<Pool> {
        &self.slots[0]
            .get()
            .expect("the default place is set at start")
            .1
    }

    /// Every place and its pool, by id.
    pub fn iter(&self) -> impl Iterator<Item = (PlaceId, &Place, &Arc<Pool>)> {
        let n = self.len.load(Ordering::Acquire);
        self.slots[..n]
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.get().map(|(place, pool)| (i as PlaceId, place, pool)))
    }

    /// A place by id.
    pub fn place(&self, id: PlaceId) -> Option<&Place> {
        self.slots.get(id as usize)?.get().map(|(p, _)| p)
    }

    fn find(&self, place: &Place) -> Option<PlaceId> {
        self.iter()
            .find(|(_, p, _)| *p == place)
            .map(|(id, _, _)| id)
    }

    /// Adds a place (its pool made with the next id); `None` when all [`MAX_PLACES`]
    /// are taken. The caller holds `adding`.
    fn push(&self, place: Place, pool: Arc<Pool>) -> Option<PlaceId> {
        let n = self.len.load(Ordering::Acquire);
        debug_assert_eq!(pool.place as usize, n);
        let slot = self.slots.get(n)?;
        let _ = slot.set((place, pool));
        self.len.store(n + 1, Ordering::Release);
        Some(n as PlaceId)
    }

    // Things done to every pool (the admin console, shutdown).

    /// PAUSE (of a tenant, or of everything) in every pool, so a tenant moved meanwhile is
    /// paused where it goes too.
    pub fn pause(&self, tenant: Option<TenantId>) {
        let _adding = self.adding.lock().unwrap_or_else(|e| e.into_inner());
        self.iter().for_each(|(_, _, p)| p.pause(tenant));
    }

    pub fn resume(&self, tenant: Option<TenantId>) {
        let _adding = self.adding.lock().unwrap_or_else(|e| e.into_inner());
        self.iter().for_each(|(_, _, p)| p.resume(tenant));
    }

    pub fn is_paused(&self, tenant: Option<TenantId>) -> bool {
        self.default().is_paused(tenant)
    }

    /// RECONNECT in every pool; the mark is the same for all.
    pub fn reconnect(&self, tenant: Option<TenantId>) -> u64 {
        let mut mark = 0;
        for (_, _, p) in self.iter() {
            mark = mark.max(p.reconnect(tenant));
        }
        mark
    }

    pub fn old_idle(&self, tenant: Option<TenantId>, mark: u64) -> bool {
        self.iter().any(|(_, _, p)| p.old_idle(tenant, mark))
    }

    pub fn close_idle(&self) {
        self.iter().for_each(|(_, _, p)| p.close_idle());
    }

    pub fn close_idle_of(&self, tenant: TenantId) {
        self.iter().for_each(|(_, _, p)| p.close_idle_of(tenant));
    }

    pub fn close(&self) {
        self.iter().for_each(|(_, _, p)| p.close());
    }

    /// Why `tenant` cannot have a new connection now (see [`Pool::wait_reason`]), in the
    /// place it lives now.
    pub fn wait_reason(&self, tenants: &Tenants, tenant: TenantId) -> Option<String> {
        let t = tenants.get(tenant);
        let reason = self.of(t).wait_reason(tenant)?;
        Some(match self.place(t.place()) {
            Some(p) if self.len.load(Ordering::Acquire) > 1 => format!("{reason} (server {p})"),
            _ => reason,
        })
    }

    /// The places whose server cannot be reached now, with why.
    pub fn down(&self) -> Vec<(Place, String)> {
        self.iter()
            .filter_map(|(_, place, p)| p.down_reason().map(|r| (place.clone(), r)))
            .collect()
    }

    /// All pools' snapshots as one: counts added, per-tenant counts added over places (a
    /// tenant being moved has connections in two), idle servers listed with their place.
    pub fn snapshot(&self) -> (PoolSnapshot, Vec<PlaceId>) {
        Pools::merge(self.iter().map(|(id, _, p)| (id, p.snapshot())))
    }

    /// [`Pools::snapshot`] of snapshots taken already (the default place's first).
    pub fn merge(
        snaps: impl IntoIterator<Item = (PlaceId, PoolSnapshot)>,
    ) -> (PoolSnapshot, Vec<PlaceId>) {
        let mut all: Option<PoolSnapshot> = None;
        let mut places = Vec::new();
        for (id, s) in snaps {
            places.extend(std::iter::repeat_n(id, s.idle_servers.len()));
            let Some(a) = all.as_mut() else {
                all = Some(s);
                continue;
            };
            a.open += s.open;
            a.idle += s.idle;
            a.connecting += s.connecting;
            a.closing += s.closing;
            a.waiting += s.waiting;
            let add = |a: &mut Vec<u32>, b: &[u32]| {
                if a.len() < b.len() {
                    a.resize(b.len(), 0);
                }
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
            };
            add(&mut a.in_use, &s.in_use);
            add(&mut a.idle_by_tenant, &s.idle_by_tenant);
            if a.max_wait.len() < s.max_wait.len() {
                a.max_wait.resize(s.max_wait.len(), Default::default());
            }
            a.max_wait
                .iter_mut()
                .zip(&s.max_wait)
                .for_each(|(x, y)| *x = (*x).max(*y));
            a.idle_servers.extend(s.idle_servers);
        }
        (all.expect("the default place exists"), places)
    }
}

/// The target of a place: its server's address, TLS and own user, the database, and every
/// login (`logins[0]` replaced by the server's user).
pub fn target_of(
    config: &Config,
    place: &Place,
    logins: &[ServerLogin],
) -> Result<ServerTarget, String> {
    let s = config
        .server_named(&place.server)
        .ok_or_else(|| format!("server \"{}\" is not configured", place.server))?;
    let tls = crate::tls::Connector::from_server(s)?.map(Arc::new);
    let mut logins = logins.to_vec();
    logins[0] = ServerLogin {
        user: s.user.clone(),
        password: s.resolved_password(),
    };
    Ok(ServerTarget {
        host: s.host.clone(),
        port: s.port,
        database: place.database.clone(),
        logins,
        connect_timeout: s.connect_timeout.0,
        tls,
    })
}

/// The pool sizing of a place on `server`; `min_idle` 0 for a place no tenant uses.
fn settings_of(config: &Config, server: &str, used: bool) -> PoolSettings {
    let s = config.server_named(server).unwrap_or(&config.server);
    PoolSettings {
        max_connections: s.max_connections,
        min_idle: if used { s.min_idle } else { 0 },
        idle_timeout: s.idle_timeout.0,
        lifetime: s.lifetime.0,
    }
}

/// The logins of `config`, merged into the `running` ones: a role keeps its id
/// (connections carry it), a new role gets the next one, passwords are the config's.
/// Returns the logins and the login of each tenant of `config.tenants`, in order.
pub fn merge_logins(running: &[ServerLogin], config: &Config) -> (Vec<ServerLogin>, Vec<LoginId>) {
    let mut logins = running.to_vec();
    if logins.is_empty() {
        logins.push(ServerLogin {
            user: String::new(),
            password: None,
        });
    }
    let wanted = config.server_logins();
    let mut ids = Vec::with_capacity(wanted.logins.len());
    for (i, (user, password)) in wanted.logins.into_iter().enumerate() {
        let id = if i == 0 {
            // Each place's own server user: `target_of` puts it in.
            logins[0] = ServerLogin { user, password };
            0
        } else {
            match logins.iter().skip(1).position(|l| l.user == user) {
                Some(j) => {
                    logins[j + 1].password = password;
                    j + 1
                }
                None => {
                    logins.push(ServerLogin { user, password });
                    logins.len() - 1
                }
            }
        };
        ids.push(id as LoginId);
    }
    let mut of_tenant: Vec<LoginId> = wanted.of_tenant.iter().map(|&i| ids[i as usize]).collect();
    // A tenant whose `server_user` is `[server] user` shares login 0 on `[server]`; on
    // another server login 0 is that server's user, so it gets an id of its own there.
    for ((_, t), id) in config.tenants.iter().zip(of_tenant.iter_mut()) {
        let (Some(user), Some(server)) = (&t.server_user, &t.server) else {
            continue;
        };
        if *id != 0 || server == DEFAULT_SERVER {
            continue;
        }
        let password = t.resolved_server_password();
        *id = match logins.iter().skip(1).position(|l| l.user == *user) {
            Some(j) => {
                logins[j + 1].password = password;
                (j + 1) as LoginId
            }
            None => {
                logins.push(ServerLogin {
                    user: user.clone(),
                    password,
                });
                (logins.len() - 1) as LoginId
            }
        };
    }
    (logins, of_tenant)
}

/// Puts `config`'s servers in force for `defs` (the tenants about to be put in force):
/// gives each def its place, making the pools of new places (their upkeep started), and
/// gives every pool its target (new logins and passwords, TLS) and sizing. When a def's
/// place cannot be made (all places taken, a TLS setup that fails), a tenant served now
/// stays where it is and a new one is dropped, with a problem naming it: it must never run
/// in another tenant's database. (At start every problem stops the proxy.)
///
/// A place's address (host, port, user, connect timeout) stays as it was when the place
/// was made: changing it needs a restart (or a new server name), as for `[server]`.
pub fn apply(
    pools: &Pools,
    tenants: &Arc<Tenants>,
    config: &Config,
    logins: &[ServerLogin],
    defs: &mut Vec<TenantDef>,
) -> Vec<String> {
    let _adding = pools.adding.lock().unwrap_or_else(|e| e.into_inner());
    let mut problems = Vec::new();
    let mut used = vec![false; MAX_PLACES];
    used[DEFAULT_PLACE as usize] = true;
    defs.retain_mut(|d| {
        let (server, database) = config.place_of(d.server.as_deref(), d.database.as_deref());
        let place = Place { server, database };
        let id = match pools.find(&place) {
            Some(id) => id,
            None => {
                let made = target_of(config, &place, logins).and_then(|target| {
                    let pool = Pool::new(
                        pools.len.load(Ordering::Acquire) as PlaceId,
                        target,
                        settings_of(config, &place.server, true),
                        tenants.clone(),
                    );
                    pools
                        .push(place.clone(), pool.clone())
                        .map(|id| (id, pool))
                        .ok_or_else(|| format!("more than {MAX_PLACES} server/database places"))
                });
                match made {
                    Ok((id, pool)) => {
                        // PAUSE and KILL hold in every place, this one too.
                        let (all, paused) = pools.default().pause_state();
                        pool.set_pause_state(all, &paused);
                        if pools.upkeep.load(Ordering::Acquire) {
                            tokio::spawn(pool.run_maintenance());
                        }
                        tracing::info!(place = %place, "new server place");
                        id
                    }
                    Err(e) => {
                        // A tenant served now stays where it is; a new one is not served.
                        let now = tenants.lookup(&d.name).map(|t| t.place());
                        problems.push(format!(
                            "tenant \"{}\" on {place}: {e}; {}",
                            d.name,
                            if now.is_some() {
                                "the tenant stays where it is"
                            } else {
                                "the tenant is not served"
                            }
                        ));
                        let Some(now) = now else {
                            return false;
                        };
                        used[now as usize] = true;
                        d.place = now;
                        return true;
                    }
                }
            }
        };
        used[id as usize] = true;
        d.place = id;
        true
    });
    for (id, place, pool) in pools.iter() {
        let running = pool.target();
        // The running target with the logins in force (ids index them), its own login
        // (user and password) and everything else as it was.
        let with_logins = || {
            let mut t = (*running).clone();
            let own = t.logins[0].clone();
            t.logins = logins.to_vec();
            t.logins[0] = own;
            t
        };
        if config.server_named(&place.server).is_none() {
            // A server no longer configured: its tenants moved (validation says every
            // tenant's server is configured); idle connections go, waiters still there
            // are served as before.
            pool.reconfigure(
                Some(with_logins()),
                Some(PoolSettings {
                    min_idle: 0,
                    ..(*pool.settings()).clone()
                }),
            );
            continue;
        }
        let mut target = match target_of(config, place, logins) {
            Ok(t) => t,
            Err(e) => {
                // The files were read when the config was validated; one that changed
                // since keeps the running TLS setup (new logins are still put in).
                problems.push(format!(
                    "server {place}: {e}; its TLS setup stays as it was"
                ));
                let mut t = (*running).clone();
                let own = t.logins[0].clone();
                t.logins = logins.to_vec();
                t.logins[0] = own;
                t
            }
        };
        if (&running.host, running.port, &running.logins[0].user)
            != (&target.host, target.port, &target.logins[0].user)
            || running.connect_timeout != target.connect_timeout
        {
            problems.push(format!(
                "{}: host, port, user and connect_timeout of a server in use need a restart; their running values stay",
                if place.server == DEFAULT_SERVER {
                    "server".to_string()
                } else {
                    format!("servers.{}", place.server)
                }
            ));
            target.host = running.host.clone();
            target.port = running.port;
            target.logins[0] = running.logins[0].clone();
            target.connect_timeout = running.connect_timeout;
        }
        pool.reconfigure(
            Some(target),
            Some(settings_of(config, &place.server, used[id as usize])),
        );
    }
    problems.sort();
    problems.dedup();
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        Config::parse(&format!(
            "[server]\ndatabase = \"d\"\nuser = \"u\"\n\
             [servers.b]\nport = 5433\ndatabase = \"bd\"\nuser = \"ub\"\nmax_connections = 7\n\
             [tenants.acme]\nschema = \"tenant_acme\"\n\
             [users.x]\npassword = \"p\"\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn logins_keep_their_ids_and_login_zero_is_each_servers_user() {
        let running = vec![
            ServerLogin {
                user: "u".into(),
                password: None,
            },
            ServerLogin {
                user: "rb".into(),
                password: None,
            },
        ];
        let c = config(
            "[tenants.a]\nschema = \"a\"\nserver_user = \"ra\"\nserver_password = \"pa\"\n\
             [tenants.b]\nschema = \"b\"\nserver_user = \"rb\"\nserver_password = \"new\"\n",
        );
        let (logins, of_tenant) = merge_logins(&running, &c);
        let users: Vec<_> = logins.iter().map(|l| l.user.as_str()).collect();
        assert_eq!(users, ["u", "rb", "ra"]);
        assert_eq!(logins[1].password.as_deref(), Some("new"));
        // Tenants a, acme, b.
        assert_eq!(of_tenant, [2, 0, 1]);
        let t = target_of(
            &c,
            &Place {
                server: "b".into(),
                database: "other".into(),
            },
            &logins,
        )
        .unwrap();
        assert_eq!((t.port, t.database.as_str()), (5433, "other"));
        let users: Vec<_> = t.logins.iter().map(|l| l.user.as_str()).collect();
        assert_eq!(users, ["ub", "rb", "ra"]);
    }

    #[test]
    fn a_server_user_that_is_the_default_users_gets_its_own_login_elsewhere() {
        let c = config(
            "[tenants.d]\nschema = \"d\"\nserver_user = \"u\"\n\
             [tenants.e]\nschema = \"e\"\nserver = \"b\"\nserver_user = \"u\"\n",
        );
        let (logins, of_tenant) = merge_logins(&[], &c);
        // Tenants acme, d, e: d shares [server]'s login 0; on b, login 0 is "ub".
        assert_eq!(of_tenant[..2], [0, 0]);
        assert_ne!(of_tenant[2], 0);
        assert_eq!(logins[of_tenant[2] as usize].user, "u");
        let (again, ids) = merge_logins(&logins, &c);
        assert_eq!((again.len(), ids), (logins.len(), of_tenant));
    }

    #[test]
    fn tenants_get_their_places_and_places_keep_their_ids() {
        let c = config(
            "[tenants.b1]\nschema = \"b1\"\nserver = \"b\"\n\
             [tenants.b2]\nschema = \"b2\"\nserver = \"b\"\ndatabase = \"bd\"\n\
             [tenants.d2]\nschema = \"d2\"\ndatabase = \"d2\"\n",
        );
        let tenants = Arc::new(Tenants::from_config(&c));
        let (logins, _) = merge_logins(
            &[ServerLogin {
                user: "u".into(),
                password: None,
            }],
            &c,
        );
        let default = Place {
            server: DEFAULT_SERVER.into(),
            database: "d".into(),
        };
        let pool = Pool::new(
            DEFAULT_PLACE,
            target_of(&c, &default, &logins).unwrap(),
            settings_of(&c, DEFAULT_SERVER, true),
            tenants.clone(),
        );
        let pools = Pools::new(default, pool);
        let mut defs = Tenants::defs_from_config(&c);
        assert!(apply(&pools, &tenants, &c, &logins, &mut defs).is_empty());
        let placed: Vec<_> = defs
            .iter()
            .map(|d| (d.name.as_str(), pools.place(d.place).unwrap().to_string()))
            .collect();
        assert_eq!(
            placed,
            [
                ("acme", "default/d".to_string()),
                ("b1", "b/bd".to_string()),
                ("b2", "b/bd".to_string()),
                ("d2", "default/d2".to_string()),
            ]
        );
        assert_eq!(pools.get(1).settings().max_connections, 7);
        // Moving b1 to the default server keeps every place's id; b/bd stays, now unused.
        let c2 = config(
            "[tenants.b1]\nschema = \"b1\"\n\
             [tenants.b2]\nschema = \"b2\"\nserver = \"b\"\n\
             [tenants.d2]\nschema = \"d2\"\ndatabase = \"d2\"\n",
        );
        let mut defs = Tenants::defs_from_config(&c2);
        assert!(apply(&pools, &tenants, &c2, &logins, &mut defs).is_empty());
        let ids: Vec<_> = defs.iter().map(|d| d.place).collect();
        assert_eq!(ids, [0, 0, 1, 2]);
    }
}
