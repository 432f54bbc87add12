//! The pool and its scheduler: one shared set of server connections for all tenants.
//!
//! A transaction that needs a server connection calls [`Pool::checkout`]. It gets an idle
//! connection at once (preferring one already on its tenant's search_path), opens a new one
//! while the pool is below `server.max_connections`, or becomes a [`Waiter`] in its tenant's
//! FIFO queue. A connection given back ([`PooledConn`]'s drop) goes straight to the next
//! waiter: tenants with waiters take turns (round robin), and a tenant at its
//! `max_server_connections` is skipped. A waiter that outlives `query_wait_timeout` leaves
//! its queue and gets an error.
//!
//! Every connection is logged in as one server login ([`LoginId`]): the shared
//! `[server] user`, or a tenant's own `server_user`. A tenant only ever gets a connection of
//! its login. Capacity moves between logins by closing an idle connection of one login and
//! opening one of another in its slot: at checkout when the pool is full and only other
//! logins' connections are idle, and when a connection given back would go to a waiter of
//! another login (that waiter gets a connect grant in the connection's slot instead).
//!
//! Counting: `open` (all connections, open, being opened or being closed) and each tenant's
//! `in_use` are taken under the lock and owned from then on by exactly one [`Slot`] (inside a
//! [`PooledConn`] once a connection exists), by the idle list, or by a grant on its way to a
//! waiter. A slot dropped without having become a connection gives its counts back (and lets
//! a waiter use them); a connection that is closed keeps its slot until PostgreSQL has closed
//! its end of the socket (the backend is gone), in a small task of its own, so PostgreSQL
//! never sees more than `max_connections` backends of the pool, not even for a moment.
//!
//! When connecting fails, the pool is "down": new transactions queue instead of connecting,
//! and one probe at a time tries again on a backoff schedule (100 ms doubling to 500 ms). The
//! first connection that succeeds, the probe's or anyone's, re-opens the pool at once: every
//! waiter is handed a connection or a slot to connect in.
//!
//! All of this state sits behind one mutex held only for a few instructions; nothing in it
//! awaits. Connecting and closing happen outside the lock, against a reserved slot.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::oneshot;

use crate::placement::PlaceId;
use crate::server::{self, LoginId, SHARED_LOGIN, ServerConn, ServerTarget};
use crate::tenant::{TenantId, Tenants};

/// The server's ParameterStatus values, name and value.
pub type ServerParams = Arc<[(String, String)]>;

/// Pool sizing and connection lifecycle settings.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub max_connections: u32,
    pub min_idle: u32,
    pub idle_timeout: Duration,
    pub lifetime: Duration,
}

/// Why a checkout failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckoutError {
    /// Waited `query_wait_timeout` without getting a connection.
    Timeout,
    /// The server cannot be reached; the text says why.
    Unavailable(String),
}

/// Counters the pool keeps for metrics and the admin console.
#[derive(Debug, Default)]
pub struct PoolStats {
    pub search_path_switches: AtomicU64,
    pub connects_ok: AtomicU64,
    pub connects_failed: AtomicU64,
}

/// What a waiter is handed, under the lock. Its counts (the tenant's `in_use`, and `open`
/// for a connect) are taken before it is sent; the waiter turns it into a [`Slot`] or a
/// [`PooledConn`] as soon as it receives it (or, gone, its [`Queued`] does).
enum Grant {
    /// An idle connection, already counted against the waiter's tenant.
    Conn(ServerConn),
    /// A reserved slot: the waiter opens the connection itself, with its tenant's login,
    /// after closing the given idle connection of another login that held the slot.
    Connect(Option<ServerConn>),
    /// The pool is shutting down; give up.
    Fail(String),
}

/// A grant, received: owned by guards that give its counts back if dropped.
enum Granted {
    Conn(PooledConn),
    Connect(Slot, Option<ServerConn>),
    Fail(String),
}

/// What a checkout does next.
enum Take {
    Conn(ServerConn),
    /// Connect into a reserved slot, after closing the idle connection of another login
    /// that held the slot, if any.
    Connect(Option<ServerConn>),
    Wait,
}

struct Waiter {
    id: u64,
    since: Instant,
    tx: oneshot::Sender<Grant>,
}

/// A run of failed connects: the server's (`State::down`), or one login's refused with
/// 53300 (`State::full`). Only a probe connects meanwhile, not before `retry_at`.
struct Down {
    retry_at: Instant,
    delay: Duration,
    /// The latest failure.
    error: String,
    /// The first failure in a row, how many there have been, the last one logged as a
    /// warning.
    since: Instant,
    failures: u32,
    warned_at: Option<Instant>,
}

struct State {
    idle: Vec<ServerConn>,
    /// Connections open, being opened or being closed; never above `max_connections`.
    open: u32,
    /// Connections checked out (or being opened or closed for the tenant) per tenant.
    in_use: Vec<u32>,
    /// Waiters per tenant, FIFO.
    queues: Vec<VecDeque<Waiter>>,
    /// Tenants with waiters, in the order they get the next connection.
    ring: VecDeque<TenantId>,
    /// The scheduling round, and the round in which each tenant was last served.
    round: u64,
    served: Vec<u64>,
    waiting: u32,
    /// Connections being opened now.
    connecting: u32,
    /// Connections being closed now (still counted in `open`).
    closing: u32,
    /// Connections taken out under the lock to be closed; [`Locked`] starts their closing
    /// once the lock is released. Counted in `open` until closed.
    retiring: Vec<ServerConn>,
    /// A probe task is scheduled or connecting (see [`Pool::probe`]).
    probing: bool,
    /// PAUSE: everything, or per tenant. Paused tenants' transactions wait.
    paused_all: bool,
    paused: Vec<bool>,
    /// RECONNECT: connections with an id below this (all, or those a tenant gives back)
    /// are closed instead of going back to the pool.
    reconnect_all: u64,
    reconnect: Vec<u64>,
    next_waiter: u64,
    down: Option<Down>,
    /// Per login: PostgreSQL refuses it more connections (53300 at login: the role's
    /// `CONNECTION LIMIT`, which holds across every instance, or another limit of the
    /// server). Its tenants' transactions wait for one of its connections to come back, or
    /// for its probe (see [`Pool::probe_login`]); other logins go on.
    full: Vec<Option<Down>>,
    /// Per login: its probe task is scheduled or connecting.
    full_probing: Vec<bool>,
    closed: bool,
}

/// The shared pool.
pub struct Pool {
    /// The place (server and database) it serves ([`crate::placement`]).
    pub place: PlaceId,
    /// The pool itself, for the tasks it starts (closing, probing).
    me: Weak<Pool>,
    state: Mutex<State>,
    /// Swapped whole by a reload (new logins, passwords); connects read it.
    target: ArcSwap<ServerTarget>,
    /// Swapped whole by a reload; read under the lock or per connection.
    settings: ArcSwap<PoolSettings>,
    tenants: Arc<Tenants>,
    /// The server's ParameterStatus values from the latest login.
    params: Mutex<Option<ServerParams>>,
    /// Woken when `params` is first set.
    params_known: tokio::sync::Notify,
    pub stats: PoolStats,
}

/// A point-in-time view of the pool, for the admin console and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSnapshot {
    /// Connections open, being opened or being closed.
    pub open: u32,
    pub idle: u32,
    pub connecting: u32,
    /// Connections being closed (PostgreSQL has not closed its end yet).
    pub closing: u32,
    pub waiting: u32,
    pub in_use: Vec<u32>,
    /// Idle connections per tenant whose search_path they carry.
    pub idle_by_tenant: Vec<u32>,
    /// How long the oldest waiter of each tenant has waited.
    pub max_wait: Vec<Duration>,
    pub paused: Vec<bool>,
    /// Idle server connections.
    pub idle_servers: Vec<IdleServer>,
}

/// An idle server connection, as the admin console lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdleServer {
    pub backend_pid: i32,
    /// The tenant whose search_path it carries.
    pub tenant: Option<TenantId>,
    pub login: LoginId,
    pub age: Duration,
    /// Named statements prepared on it.
    pub prepared: usize,
}

/// The first pause after a failed connect; it doubles with each failure in a row.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest pause between two attempts while the server is failing: a server that comes
/// back is found within about this long.
const BACKOFF_MAX: Duration = Duration::from_millis(500);

impl Pool {
    pub fn new(
        place: PlaceId,
        target: ServerTarget,
        settings: PoolSettings,
        tenants: Arc<Tenants>,
    ) -> Arc<Pool> {
        let n = tenants.ids();
        assert!(
            tenants
                .iter()
                .all(|t| (t.login() as usize) < target.logins.len()),
            "every tenant's login is one of the target's"
        );
        Arc::new_cyclic(|me| Pool {
            place,
            me: me.clone(),
            state: Mutex::new(State {
                idle: Vec::with_capacity(settings.max_connections as usize),
                open: 0,
                in_use: vec![0; n],
                queues: (0..n).map(|_| VecDeque::new()).collect(),
                ring: VecDeque::new(),
                round: 1,
                served: vec![0; n],
                waiting: 0,
                connecting: 0,
                closing: 0,
                retiring: Vec::new(),
                probing: false,
                paused_all: false,
                paused: vec![false; n],
                reconnect_all: 0,
                reconnect: vec![0; n],
                next_waiter: 0,
                down: None,
                full: (0..target.logins.len()).map(|_| None).collect(),
                full_probing: vec![false; target.logins.len()],
                closed: false,
            }),
            target: ArcSwap::from_pointee(target),
            settings: ArcSwap::from_pointee(settings),
            tenants,
            params: Mutex::new(None),
            params_known: tokio::sync::Notify::new(),
            stats: PoolStats::default(),
        })
    }

    /// The server and its logins in force.
    pub fn target(&self) -> Arc<ServerTarget> {
        self.target.load_full()
    }

    /// The sizing in force.
    pub fn settings(&self) -> Arc<PoolSettings> {
        self.settings.load_full()
    }

    /// Makes room for tenants with ids up to `ids` (new tenants of a reload or the
    /// directory), under the lock, before they can check out.
    pub fn grow(&self, ids: usize) {
        let mut st = self.lock();
        if st.in_use.len() < ids {
            st.in_use.resize(ids, 0);
            st.queues.resize_with(ids, VecDeque::new);
            st.served.resize(ids, 0);
            st.paused.resize(ids, false);
            st.reconnect.resize(ids, 0);
        }
    }

    /// A reload: new logins and passwords for connections opened from now on (the open
    /// ones stay), new sizing, and caps that may have changed (read at each checkout):
    /// waiters that a raised cap or pool lets through are served at once; idle
    /// connections above a lowered `max_connections` are closed (the rest as they come
    /// back).
    pub fn reconfigure(&self, target: Option<ServerTarget>, settings: Option<PoolSettings>) {
        let mut st = self.lock();
        if let Some(t) = target {
            // A new login gets its own "refused" state before any tenant can use it.
            if st.full.len() < t.logins.len() {
                st.full.resize_with(t.logins.len(), || None);
            }
            if st.full_probing.len() < t.logins.len() {
                st.full_probing.resize(t.logins.len(), false);
            }
            self.target.store(Arc::new(t));
        }
        if let Some(s) = settings {
            self.settings.store(Arc::new(s));
        }
        if st.closed {
            return;
        }
        self.trim(&mut st);
        self.dispatch(&mut st);
    }

    /// Closes idle connections while more are open than `max_connections` allows.
    fn trim(&self, st: &mut State) {
        let max = self.settings.load().max_connections;
        while st
            .open
            .saturating_sub(st.retiring.len() as u32 + st.closing)
            > max
        {
            let Some(c) = st.idle.pop() else { break };
            st.retiring.push(c);
        }
    }

    fn lock(&self) -> Locked<'_> {
        // A panic while holding this lock would be a bug in a few lines of bookkeeping;
        // keep serving rather than poisoning every client.
        Locked {
            pool: self,
            st: Some(self.state.lock().unwrap_or_else(|e| e.into_inner())),
        }
    }

    /// Gets a server connection for one transaction (or session) of `tenant`, waiting up
    /// to `wait_timeout` (`query_wait_timeout`) for one.
    ///
    /// When its own connect fails, the checkout waits on in the queue like any other: the
    /// server is failing, so the probe reconnects (see the module docs) and the transaction
    /// runs as soon as the server is back, or gets [`CheckoutError::Timeout`].
    ///
    /// Cancel-safe: dropped at any await (its client left, a login timeout), it gives back
    /// every count it took, through the guard that holds it at that point ([`Queued`],
    /// [`Slot`], [`PooledConn`]).
    pub async fn checkout(
        self: &Arc<Self>,
        tenant: TenantId,
        wait_timeout: Duration,
    ) -> Result<PooledConn, CheckoutError> {
        let deadline = Instant::now() + wait_timeout;
        loop {
            match self.checkout_once(tenant, deadline).await {
                Err(CheckoutError::Unavailable(e))
                    if !self.lock().closed && Instant::now() < deadline =>
                {
                    tracing::debug!(error = %e, "connect failed; waiting for the server");
                }
                done => return done,
            }
        }
    }

    /// One try of [`Pool::checkout`]: a connection, a connect of its own (which may fail),
    /// or a wait in the queue until `deadline`.
    async fn checkout_once(
        self: &Arc<Self>,
        tenant: TenantId,
        deadline: Instant,
    ) -> Result<PooledConn, CheckoutError> {
        let waiting = {
            let mut st = self.lock();
            if st.closed {
                return Err(CheckoutError::Unavailable(
                    "tenantpool is shutting down".into(),
                ));
            }
            match self.try_take(&mut st, tenant) {
                Take::Conn(conn) => {
                    return Ok(PooledConn::new(Slot::counted(self, Some(tenant)), conn));
                }
                Take::Connect(retire) => Err(retire),
                Take::Wait => {
                    let (tx, rx) = oneshot::channel();
                    let id = st.next_waiter;
                    st.next_waiter += 1;
                    let t = tenant as usize;
                    if st.queues[t].is_empty() {
                        st.ring.push_back(tenant);
                    }
                    st.queues[t].push_back(Waiter {
                        id,
                        since: Instant::now(),
                        tx,
                    });
                    st.waiting += 1;
                    if st.down.is_some() {
                        self.ensure_probe(&mut st);
                    }
                    self.ensure_login_probe(&mut st, self.tenants.get(tenant).login());
                    Ok((id, rx))
                }
            }
        };
        let (id, rx) = match waiting {
            Ok(w) => w,
            Err(retire) => return self.open(Slot::counted(self, Some(tenant)), retire).await,
        };
        let mut queued = Queued {
            pool: self,
            tenant,
            id,
            rx: Some(rx),
        };
        let rx = queued.rx.as_mut().expect("queued with a receiver");
        let grant = match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(Ok(g)) => Some(g),
            Ok(Err(_)) => None,
            Err(_) => match queued.leave() {
                // The grant raced with the timeout: use it.
                Some(g) => Some(g),
                None => {
                    queued.rx = None;
                    return Err(CheckoutError::Timeout);
                }
            },
        };
        queued.rx = None;
        match grant.map(|g| self.accept(g, tenant)) {
            Some(Granted::Conn(conn)) => Ok(conn),
            Some(Granted::Connect(slot, retire)) => self.open(slot, retire).await,
            Some(Granted::Fail(e)) => Err(CheckoutError::Unavailable(e)),
            None => Err(CheckoutError::Unavailable("pool closed".into())),
        }
    }

    /// Puts a received grant, counted against `tenant`, into the guards that own its counts.
    fn accept(self: &Arc<Self>, grant: Grant, tenant: TenantId) -> Granted {
        match grant {
            Grant::Conn(conn) => {
                Granted::Conn(PooledConn::new(Slot::counted(self, Some(tenant)), conn))
            }
            Grant::Connect(retire) => Granted::Connect(Slot::counted(self, Some(tenant)), retire),
            Grant::Fail(e) => Granted::Fail(e),
        }
    }

    /// The checkout decision, made under the lock.
    fn try_take(&self, st: &mut State, tenant: TenantId) -> Take {
        let tn = self.tenants.get(tenant);
        let t = tenant as usize;
        if !st.queues[t].is_empty()
            || st.in_use[t] >= tn.max_server()
            || st.paused_all
            || st.paused[t]
        {
            return Take::Wait;
        }
        if let Some(conn) = take_idle(st, tenant, tn.login()) {
            st.in_use[t] += 1;
            return Take::Conn(conn);
        }
        if st.down.is_some() || st.full[tn.login() as usize].is_some() {
            // Only the probe connects while the server is failing (or refuses this login
            // more connections); it re-opens the pool.
            return Take::Wait;
        }
        if st.open < self.settings.load().max_connections {
            st.open += 1;
            st.in_use[t] += 1;
            return Take::Connect(None);
        }
        // The pool is full and every idle connection is of another login: the least
        // recently used one gives its slot to this login.
        if let Some(pos) = (0..st.idle.len()).min_by_key(|&i| st.idle[i].idle_since) {
            let old = st.idle.swap_remove(pos);
            st.in_use[t] += 1;
            return Take::Connect(Some(old));
        }
        Take::Wait
    }

    /// Opens a connection with the slot's tenant's login into `slot`, first closing
    /// `retire`, the idle connection of another login that held the slot.
    ///
    /// The work runs in a task of its own that owns the slot, so a checkout dropped
    /// meanwhile cancels nothing half-way: a connection that comes of it goes to the pool
    /// (to the next waiter, or idle), a failure gives the slot back, and a half-open socket
    /// is never left to a backend PostgreSQL still counts.
    async fn open(
        self: &Arc<Self>,
        slot: Slot,
        retire: Option<ServerConn>,
    ) -> Result<PooledConn, CheckoutError> {
        let (tx, rx) = oneshot::channel();
        let pool = self.clone();
        tokio::spawn(async move {
            let slot = match retire {
                // PostgreSQL ends the old backend before the new one starts: together they
                // never outnumber max_connections, not even for a moment.
                Some(old) => Pool::close_in(old, slot).await,
                None => slot,
            };
            let tenant = slot.tenant.expect("a checkout's slot is a tenant's");
            let opened = match pool.connect(pool.tenants.get(tenant).login()).await {
                Ok(conn) => Ok(PooledConn::new(slot, conn)),
                // The slot is given back here.
                Err(e) => Err(CheckoutError::Unavailable(e)),
            };
            if let Err(Ok(mut conn)) = tx.send(opened) {
                // Its checkout is gone: a fresh connection serves the next one.
                conn.set_clean(true);
            }
        });
        rx.await
            .unwrap_or_else(|_| Err(CheckoutError::Unavailable("connecting failed".into())))
    }

    /// Connects and logs in as `login`, updating the failure backoff either way. A success
    /// after failures re-opens the pool: the waiters get connections or slots at once.
    async fn connect(&self, login: LoginId) -> Result<ServerConn, String> {
        let result = {
            self.lock().connecting += 1;
            let _connecting = Connecting(self);
            server::connect(&self.target.load_full(), login).await
        };
        match result {
            Ok(login) => {
                self.stats.connects_ok.fetch_add(1, Ordering::Relaxed);
                self.remember_params(login.conn.login, login.params);
                let mut st = self.lock();
                let was_down = st.down.take();
                let was_full = st.full[login.conn.login as usize].take();
                if let Some(d) = &was_down {
                    tracing::info!(
                        down_for = ?d.since.elapsed(),
                        failed_connects = d.failures,
                        "server reachable again"
                    );
                }
                if let Some(f) = &was_full {
                    tracing::info!(
                        user = %self.target.load().login(login.conn.login).user,
                        full_for = ?f.since.elapsed(),
                        refused_connects = f.failures,
                        "server accepts connections of this login again"
                    );
                }
                if was_down.is_some() || was_full.is_some() {
                    self.dispatch(&mut st);
                }
                Ok(login.conn)
            }
            Err(e) => {
                self.stats.connects_failed.fetch_add(1, Ordering::Relaxed);
                let mut st = self.lock();
                if e.is_full() {
                    // The server works but refuses this login another connection (53300):
                    // only this login's tenants wait, and its own probe tries again.
                    let user = self.target.load().login(login).user.clone();
                    let (warn, delay) = failed(&mut st.full[login as usize], &e.message);
                    if warn {
                        tracing::warn!(
                            error = %e,
                            %user,
                            retry_in = ?delay,
                            "server refuses more connections of this login; its tenants' transactions wait"
                        );
                    } else {
                        tracing::debug!(error = %e, %user, retry_in = ?delay, "server connection refused (53300)");
                    }
                    self.ensure_login_probe(&mut st, login);
                } else {
                    let (warn, delay) = failed(&mut st.down, &e.message);
                    if warn {
                        let failures = st.down.as_ref().map_or(0, |d| d.failures);
                        tracing::warn!(
                            error = %e,
                            retry_in = ?delay,
                            failed_connects = failures,
                            "server connection failed"
                        );
                    } else {
                        tracing::debug!(error = %e, retry_in = ?delay, "server connection failed");
                    }
                    self.ensure_probe(&mut st);
                }
                Err(e.message)
            }
        }
    }

    /// Starts `login`'s probe if PostgreSQL refuses it connections, its tenants wait, and
    /// none runs.
    fn ensure_login_probe(&self, st: &mut State, login: LoginId) {
        let l = login as usize;
        if st.full_probing[l] || st.closed || st.full[l].is_none() || !self.login_waits(st, login) {
            return;
        }
        let (Some(pool), Ok(rt)) = (self.me.upgrade(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        st.full_probing[l] = true;
        rt.spawn(pool.probe_login(login));
    }

    /// [`Pool::ensure_login_probe`] for every login PostgreSQL refuses connections.
    fn ensure_login_probes(&self, st: &mut State) {
        for login in 0..st.full.len() {
            if st.full[login].is_some() {
                self.ensure_login_probe(st, login as LoginId);
            }
        }
    }

    /// Does a tenant of `login` wait that could be served but for the login's refusal?
    fn login_waits(&self, st: &State, login: LoginId) -> bool {
        st.ring
            .iter()
            .any(|&t| self.tenants.get(t).login() == login && self.eligible(st, t))
    }

    /// While PostgreSQL refuses `login` connections (53300) and its tenants wait: one
    /// connect at a time as `login`, each when the backoff allows, in a free slot (or the
    /// slot of the least recently used idle connection, closed first, when the pool is
    /// full). The first success goes to one of its waiters and [`Pool::connect`] lets the
    /// others connect. Meanwhile a connection of the login that comes back from a
    /// transaction goes straight to the next of them. Ends when the login is accepted
    /// again, none of its tenants waits, or no slot can be had (a slot given back starts it
    /// again).
    async fn probe_login(self: Arc<Self>, login: LoginId) {
        let l = login as usize;
        loop {
            // While the server is failing too, its backoff holds this probe back as well (a
            // failure other than 53300 does not push the login's own backoff).
            let retry_at = |st: &State| {
                let f = st.full[l].as_ref()?;
                let at = match &st.down {
                    Some(d) => f.retry_at.max(d.retry_at),
                    None => f.retry_at,
                };
                (!st.closed && self.login_waits(st, login)).then_some(at)
            };
            let next = {
                let mut st = self.lock();
                match retry_at(&st) {
                    Some(at) => at,
                    None => {
                        st.full_probing[l] = false;
                        return;
                    }
                }
            };
            tokio::time::sleep_until(next.into()).await;
            let (slot, retire) = {
                let mut st = self.lock();
                let due = match retry_at(&st) {
                    Some(at) => at <= Instant::now(),
                    None => {
                        st.full_probing[l] = false;
                        return;
                    }
                };
                if !due {
                    continue;
                }
                if st.open < self.settings.load().max_connections {
                    st.open += 1;
                    (Slot::counted(&self, None), None)
                } else if let Some(pos) = (0..st.idle.len()).min_by_key(|&i| st.idle[i].idle_since)
                {
                    // Idle connections are all of other logins (one of this login would
                    // have gone to its waiters): the least recently used gives its slot.
                    let old = st.idle.swap_remove(pos);
                    (Slot::counted(&self, None), Some(old))
                } else {
                    st.full_probing[l] = false;
                    return;
                }
            };
            let slot = match retire {
                Some(old) => Pool::close_in(old, slot).await,
                None => slot,
            };
            match self.connect(login).await {
                Ok(conn) => {
                    let mut st = self.lock();
                    st.full_probing[l] = false;
                    self.add_new(&mut st, slot, conn);
                    return;
                }
                // The backoff has grown; try again when it allows.
                Err(_) => drop(slot),
            }
        }
    }

    /// Starts the probe if the server is failing, clients wait, and none runs.
    fn ensure_probe(&self, st: &mut State) {
        if st.probing || st.closed || st.down.is_none() || st.waiting == 0 {
            return;
        }
        let (Some(pool), Ok(rt)) = (self.me.upgrade(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        st.probing = true;
        rt.spawn(pool.probe());
    }

    /// While the server is failing and clients wait: one connect at a time, each when the
    /// backoff allows, with the login of the tenant whose turn is next. The first success
    /// goes to a waiter, and [`Pool::connect`] hands the rest of the pool to the others.
    /// Ends when the pool is up again, nobody waits, or no slot is free (a slot given back
    /// starts it again).
    async fn probe(self: Arc<Self>) {
        loop {
            let retry_at = {
                let mut st = self.lock();
                match &st.down {
                    Some(d) if !st.closed && st.waiting > 0 => d.retry_at,
                    _ => {
                        st.probing = false;
                        return;
                    }
                }
            };
            tokio::time::sleep_until(retry_at.into()).await;
            let (slot, login) = {
                let mut st = self.lock();
                let due = match &st.down {
                    Some(d) if !st.closed && st.waiting > 0 => d.retry_at <= Instant::now(),
                    _ => {
                        st.probing = false;
                        return;
                    }
                };
                if !due {
                    // Another failure pushed the next attempt back.
                    continue;
                }
                let next = st
                    .ring
                    .iter()
                    .copied()
                    .find(|&t| self.can_take(&st, t, None));
                let Some(t) = next.filter(|_| st.open < self.settings.load().max_connections)
                else {
                    st.probing = false;
                    return;
                };
                st.open += 1;
                (Slot::counted(&self, None), self.tenants.get(t).login())
            };
            match self.connect(login).await {
                Ok(conn) => {
                    let mut st = self.lock();
                    st.probing = false;
                    self.add_new(&mut st, slot, conn);
                    return;
                }
                // The backoff has grown; try again when it allows.
                Err(_) => drop(slot),
            }
        }
    }

    /// Keeps the ParameterStatus values clients are greeted with: those of the shared
    /// login. Until one is known, another login's stand in, without its role name (which
    /// would tell one tenant another's login).
    fn remember_params(&self, login: LoginId, mut params: Vec<(String, String)>) {
        let mut known = self.params.lock().unwrap_or_else(|e| e.into_inner());
        if login != SHARED_LOGIN {
            if known.is_some() {
                return;
            }
            let target = self.target.load();
            let shared_user = &target.login(SHARED_LOGIN).user;
            for (name, value) in &mut params {
                if name.eq_ignore_ascii_case("session_authorization") {
                    value.clone_from(shared_user);
                }
            }
        }
        let first = known.is_none();
        *known = Some(params.into());
        if first {
            self.params_known.notify_waiters();
        }
    }

    /// After a slot was freed without a connection to hand on: let a waiter open one (or,
    /// while the server is failing, let the probe try).
    fn after_close(&self, st: &mut State) {
        if st.waiting == 0 || st.closed {
            return;
        }
        if st.down.is_some() {
            self.ensure_probe(st);
            return;
        }
        if st.open < self.settings.load().max_connections {
            st.open += 1;
            if !self.hand_out(st, Grant::Connect(None)) {
                st.open -= 1;
            }
        }
        self.ensure_login_probes(st);
    }

    /// Gives `grant` to the next waiter whose tenant is below its cap, tenants taking turns
    /// (see [`Pool::next_tenant`]). Returns false (and drops a `Connect` grant) when no
    /// waiter can take it; a connection grant that nobody takes is put back into `idle`.
    /// A connection goes only to a waiter of its login: when the turn is another login's,
    /// that waiter gets the connection's slot as a `Connect` grant, and closes the
    /// connection before opening its own.
    fn hand_out(&self, st: &mut State, mut grant: Grant) -> bool {
        let (preferred, login) = match &grant {
            Grant::Conn(c) => (c.state.tenant(), Some(c.login)),
            _ => (None, None),
        };
        while let Some(t) = self.next_tenant(st, preferred, login) {
            let ti = t as usize;
            st.ring.retain(|&x| x != t);
            st.served[ti] = st.round;
            let swap = login.is_some_and(|l| l != self.tenants.get(t).login());
            while let Some(w) = st.queues[ti].pop_front() {
                st.waiting -= 1;
                st.in_use[ti] += 1;
                let offer = match grant {
                    Grant::Conn(conn) if swap => Grant::Connect(Some(conn)),
                    g => g,
                };
                match w.tx.send(offer) {
                    Ok(()) => {
                        if !st.queues[ti].is_empty() {
                            st.ring.push_back(t);
                        }
                        return true;
                    }
                    Err(back) => {
                        // The waiter is gone (its task ended); try the next one.
                        st.in_use[ti] -= 1;
                        grant = match back {
                            Grant::Connect(Some(conn)) if swap => Grant::Conn(conn),
                            g => g,
                        };
                    }
                }
            }
        }
        if let Grant::Conn(conn) = grant {
            st.idle.push(conn);
        }
        false
    }

    /// May `t`'s next waiter be served now?
    fn eligible(&self, st: &State, t: TenantId) -> bool {
        !st.queues[t as usize].is_empty()
            && st.in_use[t as usize] < self.tenants.get(t).max_server()
            && !st.paused_all
            && !st.paused[t as usize]
    }

    /// May `t`'s next waiter take a grant: a connection of `login`, or (`None`) a slot to
    /// connect in? Not a slot while PostgreSQL refuses its login connections.
    fn can_take(&self, st: &State, t: TenantId, login: Option<LoginId>) -> bool {
        let own = self.tenants.get(t).login();
        self.eligible(st, t) && (st.full[own as usize].is_none() || login == Some(own))
    }

    /// The tenant whose waiter gets the next connection. Tenants with waiters take turns
    /// in rounds: in each round every tenant below its cap is served once, in ring order
    /// (FIFO within a tenant). Within a round the order is free, so a connection goes back
    /// to the tenant whose search_path it carries when that tenant's turn in this round is
    /// still to come, else to the first tenant of its `login` whose turn is still to come:
    /// fewer tenant switches and fewer connections closed for another login, same fairness.
    fn next_tenant(
        &self,
        st: &mut State,
        preferred: Option<TenantId>,
        login: Option<LoginId>,
    ) -> Option<TenantId> {
        for _ in 0..2 {
            if let Some(p) = preferred
                && self.can_take(st, p, login)
                && st.served[p as usize] < st.round
            {
                return Some(p);
            }
            if let Some(l) = login
                && let Some(&t) = st.ring.iter().find(|&&t| {
                    self.tenants.get(t).login() == l
                        && self.can_take(st, t, login)
                        && st.served[t as usize] < st.round
                })
            {
                return Some(t);
            }
            if let Some(&t) = st
                .ring
                .iter()
                .find(|&&t| self.can_take(st, t, login) && st.served[t as usize] < st.round)
            {
                return Some(t);
            }
            // Everyone eligible has had a turn in this round: start the next one.
            if !st.ring.iter().any(|&t| self.can_take(st, t, login)) {
                return None;
            }
            st.round += 1;
        }
        None
    }

    /// Takes a connection back from a transaction or session, with the slot that counts it.
    /// A clean connection goes to the next waiter or the idle list (the slot's counts go
    /// with it); any other is closed in its slot.
    fn checkin(slot: &mut Slot, mut conn: ServerConn, clean: bool) {
        let pool = &*slot.pool;
        let tenant = slot
            .tenant
            .expect("a checked-out connection's slot is a tenant's");
        let now = Instant::now();
        let expired = now.duration_since(conn.created) >= pool.settings.load().lifetime;
        if clean && !expired {
            let mut st = pool.lock();
            let doomed = conn.id < st.reconnect_all
                || st
                    .reconnect
                    .get(tenant as usize)
                    .is_some_and(|&m| conn.id < m);
            if !st.closed && !doomed {
                st.in_use[tenant as usize] -= 1;
                slot.held = false;
                conn.idle_since = now;
                pool.hand_out(&mut st, Grant::Conn(conn));
                return;
            }
        }
        Pool::close_then(conn, slot.take(), drop);
    }

    /// Closes `conn` in a task of its own (see [`Pool::close_in`]), then hands its slot to
    /// `then` (which drops it to give it back). Never blocks the caller and never holds the
    /// lock across the wait.
    fn close_then(mut conn: ServerConn, slot: Slot, then: impl FnOnce(Slot) + Send + 'static) {
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move { then(Pool::close_in(conn, slot).await) });
            }
            Err(_) => {
                // No runtime (unit tests): end it at once.
                conn.terminate();
                drop(conn);
                then(slot);
            }
        }
    }

    /// Closes `conn`, waiting until PostgreSQL has closed its end of the socket (see
    /// [`ServerConn::close`]), while `slot` keeps counting it (as `closing` too); returns
    /// the slot. Dropped meanwhile, the slot gives its counts back.
    async fn close_in(conn: ServerConn, mut slot: Slot) -> Slot {
        let pool = slot.pool.clone();
        pool.lock().closing += 1;
        slot.closing = true;
        let target = pool.target.load_full();
        let limit = target.connect_timeout;
        let pid = conn.backend_pid;
        if !conn.close(&target, limit).await {
            tracing::warn!(
                backend_pid = pid,
                ?limit,
                "server connection not closed by PostgreSQL in time; its slot is given back anyway"
            );
        }
        slot.closed();
        slot
    }

    /// The latest ParameterStatus values of the server, connecting once if none is known.
    /// Logins that arrive together before any is known do not each need a connection: the
    /// first connection's values answer them all.
    pub async fn server_params(self: &Arc<Self>) -> Result<ServerParams, String> {
        let known = || {
            self.params
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        };
        let mut first_known = std::pin::pin!(self.params_known.notified());
        first_known.as_mut().enable();
        if let Some(p) = known() {
            return Ok(p);
        }
        // The server has never been reached and is failing now: say so at once.
        if let Some(d) = &self.lock().down {
            return Err(d.error.clone());
        }
        // Any tenant will do (one of the shared login if there is one): the connection goes
        // straight back.
        let tenant = self
            .tenants
            .iter()
            .find(|t| t.login() == SHARED_LOGIN)
            .map_or(0, |t| t.id);
        // One try: a login gets its answer within connect_timeout.
        let deadline = Instant::now() + self.target.load().connect_timeout;
        let checkout = tokio::select! {
            c = self.checkout_once(tenant, deadline) => c,
            // Another connection brought them (a queued checkout dropped here leaves its
            // queue).
            () = first_known => return known().ok_or_else(|| "server sent no parameters".into()),
        };
        let conn = match checkout {
            Ok(c) => c,
            Err(CheckoutError::Timeout) => return Err("timed out waiting for the pool".into()),
            Err(CheckoutError::Unavailable(e)) => return Err(e),
        };
        let mut conn = conn;
        conn.set_clean(true);
        drop(conn);
        known().ok_or_else(|| "server sent no parameters".into())
    }

    pub fn snapshot(&self) -> PoolSnapshot {
        let st = self.lock();
        let now = Instant::now();
        let mut idle_by_tenant = vec![0; st.in_use.len()];
        for c in &st.idle {
            if let Some(t) = c.state.tenant() {
                idle_by_tenant[t as usize] += 1;
            }
        }
        PoolSnapshot {
            open: st.open,
            idle: st.idle.len() as u32,
            connecting: st.connecting,
            closing: st.closing,
            waiting: st.waiting,
            in_use: st.in_use.clone(),
            idle_by_tenant,
            max_wait: st
                .queues
                .iter()
                .map(|q| q.front().map(|w| now - w.since).unwrap_or_default())
                .collect(),
            paused: st.paused.iter().map(|&p| p || st.paused_all).collect(),
            idle_servers: st
                .idle
                .iter()
                .map(|c| IdleServer {
                    backend_pid: c.backend_pid,
                    tenant: c.state.tenant(),
                    login: c.login,
                    age: now - c.created,
                    prepared: c.work.stmts.len(),
                })
                .collect(),
        }
    }

    /// One round of upkeep: closes idle connections past `idle_timeout` (above `min_idle`)
    /// or past `lifetime`, or found broken, hands idle connections and free slots to
    /// waiters that could take them (after a failure backoff, a waiter may queue while
    /// another login's connection sits idle), and opens connections of the shared login up
    /// to `min_idle`.
    pub async fn maintain(self: &Arc<Self>) {
        let now = Instant::now();
        let want_new = {
            let mut st = self.lock();
            if st.closed {
                return;
            }
            let min_idle = self.settings.load().min_idle as usize;
            let mut i = 0;
            while i < st.idle.len() {
                let idle_count = st.idle.len();
                let c = &mut st.idle[i];
                let too_old = now.duration_since(c.created) >= self.settings.load().lifetime;
                let idle_long = idle_count > min_idle
                    && now.duration_since(c.idle_since) >= self.settings.load().idle_timeout;
                if too_old || idle_long || c.is_broken_idle() {
                    let c = st.idle.swap_remove(i);
                    st.retiring.push(c);
                } else {
                    i += 1;
                }
            }
            self.trim(&mut st);
            if st.waiting > 0 {
                self.dispatch(&mut st);
            }
            // A PAUSE of everything keeps none open (see `close_idle`).
            let want = st.down.is_none()
                && !st.paused_all
                && (st.idle.len() as u32) < self.settings.load().min_idle
                && st.open < self.settings.load().max_connections;
            if want {
                st.open += 1;
                Some(Slot::counted(self, None))
            } else {
                None
            }
        };
        if let Some(slot) = want_new
            && let Ok(conn) = self.connect(SHARED_LOGIN).await
        {
            let mut st = self.lock();
            self.add_new(&mut st, slot, conn);
        }
    }

    /// Puts a new connection opened in `slot` (of no tenant) into the pool: to a waiter, or
    /// idle; closed if the pool was closed meanwhile.
    fn add_new(&self, st: &mut State, slot: Slot, conn: ServerConn) {
        slot.hand_over();
        if st.closed {
            st.retiring.push(conn);
        } else {
            self.hand_out(st, Grant::Conn(conn));
        }
    }

    /// Runs [`Pool::maintain`] until the pool is closed.
    pub async fn run_maintenance(self: Arc<Self>) {
        loop {
            self.maintain().await;
            let (closed, short) = {
                let st = self.lock();
                let short = (st.idle.len() as u32) < self.settings.load().min_idle
                    && st.open < self.settings.load().max_connections
                    && st.down.is_none();
                (st.closed, short)
            };
            if closed {
                return;
            }
            // Fill min_idle quickly, then check about once a second.
            let pause = if short {
                Duration::from_millis(20)
            } else {
                Duration::from_secs(1)
            };
            tokio::time::sleep(pause).await;
        }
    }

    /// PAUSE: new transactions of `tenant` (or of all tenants) wait; running ones finish.
    pub fn pause(&self, tenant: Option<TenantId>) {
        let mut st = self.lock();
        match tenant {
            Some(t) => st.paused[t as usize] = true,
            None => st.paused_all = true,
        }
    }

    /// What PAUSE holds now: everything, and each tenant.
    pub fn pause_state(&self) -> (bool, Vec<bool>) {
        let st = self.lock();
        (st.paused_all, st.paused.clone())
    }

    /// Takes over another pool's PAUSE state (a new place while tenants are paused).
    pub fn set_pause_state(&self, all: bool, tenants: &[bool]) {
        let mut st = self.lock();
        st.paused_all = all;
        for (p, &q) in st.paused.iter_mut().zip(tenants) {
            *p = q;
        }
    }

    /// RESUME: lifts a PAUSE and hands idle connections and free slots to the waiters.
    pub fn resume(&self, tenant: Option<TenantId>) {
        let mut st = self.lock();
        match tenant {
            Some(t) => st.paused[t as usize] = false,
            None => {
                st.paused_all = false;
                st.paused.iter_mut().for_each(|p| *p = false);
            }
        }
        self.dispatch(&mut st);
    }

    /// Hands idle connections, then free slots, to waiters while some can take them (while
    /// the server is failing, the probe takes the free slots).
    fn dispatch(&self, st: &mut State) {
        while let Some(conn) = st.idle.pop() {
            if !self.hand_out(st, Grant::Conn(conn)) {
                break;
            }
        }
        self.ensure_login_probes(st);
        if st.down.is_some() {
            self.ensure_probe(st);
            return;
        }
        while st.waiting > 0 && st.open < self.settings.load().max_connections {
            st.open += 1;
            if !self.hand_out(st, Grant::Connect(None)) {
                st.open -= 1;
                break;
            }
        }
    }

    /// Whether PAUSE (of `tenant`, or of everything) is in force: the flag that RESUME of
    /// the same argument lifts.
    pub fn is_paused(&self, tenant: Option<TenantId>) -> bool {
        let st = self.lock();
        match tenant {
            Some(t) => st.paused.get(t as usize).copied().unwrap_or(false),
            None => st.paused_all || st.paused.iter().any(|&p| p),
        }
    }

    /// RECONNECT: every server connection open now (or those `tenant` uses) is closed
    /// when it is next given back, and idle ones at once. Returns the mark to give
    /// [`Pool::old_idle`] (connection ids below it are the old ones).
    pub fn reconnect(&self, tenant: Option<TenantId>) -> u64 {
        let mark = crate::server::next_server_id();
        let mut st = self.lock();
        match tenant {
            Some(t) => {
                if let Some(m) = st.reconnect.get_mut(t as usize) {
                    *m = mark;
                }
            }
            None => st.reconnect_all = mark,
        }
        let (keep, close): (Vec<_>, Vec<_>) = std::mem::take(&mut st.idle)
            .into_iter()
            .partition(|c| c.id >= mark || tenant.is_some_and(|t| c.state.tenant() != Some(t)));
        st.idle = keep;
        st.retiring.extend(close);
        mark
    }

    /// Is an idle connection (of `tenant`, or any) older than `mark` still in the pool?
    pub fn old_idle(&self, tenant: Option<TenantId>, mark: u64) -> bool {
        let st = self.lock();
        st.idle
            .iter()
            .any(|c| c.id < mark && tenant.is_none_or(|t| c.state.tenant() == Some(t)))
            || st.closing > 0
    }

    /// Closes every idle connection (a PAUSE of everything, as PgBouncer's: PostgreSQL can
    /// then be restarted with no connection of the pool open).
    pub fn close_idle(&self) {
        let mut st = self.lock();
        let idle = std::mem::take(&mut st.idle);
        st.retiring.extend(idle);
    }

    /// Closes the idle connections carrying `tenant`'s search_path (KILL).
    pub fn close_idle_of(&self, tenant: TenantId) {
        let mut st = self.lock();
        let (keep, close): (Vec<_>, Vec<_>) = std::mem::take(&mut st.idle)
            .into_iter()
            .partition(|c| c.state.tenant() != Some(tenant));
        st.idle = keep;
        st.retiring.extend(close);
    }

    /// Why connecting to the server fails now, when it does.
    pub fn down_reason(&self) -> Option<String> {
        self.lock().down.as_ref().map(|d| d.error.clone())
    }

    /// Why `tenant` cannot have a new server connection now, when something other than
    /// the pool's caps stands in the way: the server cannot be reached, or it refuses the
    /// tenant's login more connections (53300).
    pub fn wait_reason(&self, tenant: TenantId) -> Option<String> {
        let st = self.lock();
        self.wait_reason_locked(&st, tenant)
    }

    fn wait_reason_locked(&self, st: &State, tenant: TenantId) -> Option<String> {
        if let Some(d) = &st.down {
            return Some(format!("the server cannot be reached: {}", d.error));
        }
        let login = self.tenants.get(tenant).login();
        st.full[login as usize].as_ref().map(|f| {
            format!(
                "the server refuses more connections as {}: {}",
                self.target.load().login(login).user,
                f.error
            )
        })
    }

    /// Closes idle connections and refuses new checkouts (shutdown).
    pub fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        for q in st.queues.iter_mut() {
            for w in q.drain(..) {
                let _ = w.tx.send(Grant::Fail("tenantpool is shutting down".into()));
            }
        }
        st.ring.clear();
        st.waiting = 0;
        let idle = std::mem::take(&mut st.idle);
        st.retiring.extend(idle);
    }
}

/// The pool's lock. Connections put into `retiring` under it start closing (each in its
/// slot, in a task of its own) once it is released.
struct Locked<'a> {
    pool: &'a Pool,
    /// `None` only while dropping.
    st: Option<MutexGuard<'a, State>>,
}

impl std::ops::Deref for Locked<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        self.st.as_ref().expect("locked")
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut State {
        self.st.as_mut().expect("locked")
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let retiring = match self.st.as_mut() {
            Some(st) if !st.retiring.is_empty() => std::mem::take(&mut st.retiring),
            _ => return,
        };
        self.st = None;
        // Without the pool (it is being dropped) there is nothing left to count.
        if let Some(pool) = self.pool.me.upgrade() {
            for conn in retiring {
                Pool::close_then(conn, Slot::counted(&pool, None), drop);
            }
        }
    }
}

/// Records a failed connect in `run` (the server's or a login's): the next attempt waits
/// twice as long as the previous one, from [`BACKOFF_MIN`] up to [`BACKOFF_MAX`]. Returns
/// whether to log it as a warning (when the run starts, when the error changes and every
/// 30 s; the attempts in between, up to two a second, are debug lines) and the delay.
fn failed(run: &mut Option<Down>, error: &str) -> (bool, Duration) {
    let now = Instant::now();
    let d = run.get_or_insert_with(|| Down {
        retry_at: now,
        delay: BACKOFF_MIN / 2,
        error: String::new(),
        since: now,
        failures: 0,
        warned_at: None,
    });
    d.delay = (d.delay * 2).min(BACKOFF_MAX);
    d.retry_at = now + d.delay;
    d.failures += 1;
    let warn = d.error != error
        || d.warned_at
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(30));
    if warn {
        d.warned_at = Some(now);
    }
    if d.error != error {
        d.error = error.to_string();
    }
    (warn, d.delay)
}

/// Removes an idle connection of `login`, preferring the most recently used one already on
/// `tenant`'s search_path; broken ones found on the way are closed.
fn take_idle(st: &mut State, tenant: TenantId, login: LoginId) -> Option<ServerConn> {
    loop {
        let pos = st
            .idle
            .iter()
            .rposition(|c| c.state.tenant() == Some(tenant) && c.login == login)
            .or_else(|| st.idle.iter().rposition(|c| c.login == login))?;
        let mut conn = st.idle.swap_remove(pos);
        if conn.is_broken_idle() {
            st.retiring.push(conn);
            continue;
        }
        return Some(conn);
    }
}

/// One counted place in the pool: one of `open`, and one of `tenant`'s `in_use` when it
/// has a tenant. Every count the pool hands out is owned by one of these from the moment
/// its holder has it (a checkout, a probe, a connection being closed) until it is handed on
/// (to the idle list or another waiter) or dropped. Dropped while still counted, it gives
/// the counts back and lets a waiter connect in the freed slot.
struct Slot {
    pool: Arc<Pool>,
    tenant: Option<TenantId>,
    /// Still counted by this slot.
    held: bool,
    /// Counted in `closing` too: its connection is being closed.
    closing: bool,
}

impl Slot {
    /// Takes over counts just taken under the lock.
    fn counted(pool: &Arc<Pool>, tenant: Option<TenantId>) -> Slot {
        Slot {
            pool: pool.clone(),
            tenant,
            held: true,
            closing: false,
        }
    }

    /// Its counts now belong to something else (a connection in `idle`, another waiter's
    /// grant). May be called under the lock.
    fn hand_over(mut self) {
        self.held = false;
    }

    /// Moves the counts out into a new slot, leaving this one empty.
    fn take(&mut self) -> Slot {
        let s = Slot {
            pool: self.pool.clone(),
            tenant: self.tenant,
            held: self.held,
            closing: self.closing,
        };
        self.held = false;
        self.closing = false;
        s
    }

    /// The connection it held is closed; the slot is counted on as a plain one.
    fn closed(&mut self) {
        if self.closing {
            self.pool.lock().closing -= 1;
            self.closing = false;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.held && !self.closing {
            return;
        }
        let mut st = self.pool.lock();
        if self.closing {
            st.closing -= 1;
        }
        if self.held {
            st.open -= 1;
            if let Some(t) = self.tenant {
                st.in_use[t as usize] -= 1;
            }
            self.pool.after_close(&mut st);
        }
    }
}

/// A checkout queued as a waiter. Dropped before its grant was taken (its checkout was
/// dropped, e.g. by a login timeout), it leaves its queue, and a grant already sent to it
/// goes back to the pool through the guards that own it: no count is lost.
struct Queued<'a> {
    pool: &'a Arc<Pool>,
    tenant: TenantId,
    id: u64,
    /// `None` once the grant was taken (or there is none).
    rx: Option<oneshot::Receiver<Grant>>,
}

impl Queued<'_> {
    /// Leaves the queue. Returns the grant sent before it left, if any: grants are sent
    /// under the lock, so a waiter no longer queued has its grant in the channel.
    fn leave(&mut self) -> Option<Grant> {
        let mut st = self.pool.lock();
        let t = self.tenant as usize;
        if let Some(pos) = st.queues[t].iter().position(|w| w.id == self.id) {
            st.queues[t].remove(pos);
            if st.queues[t].is_empty() {
                st.ring.retain(|&x| x != self.tenant);
            }
            st.waiting -= 1;
            return None;
        }
        drop(st);
        self.rx.as_mut()?.try_recv().ok()
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if self.rx.is_none() {
            return;
        }
        match self.leave().map(|g| self.pool.accept(g, self.tenant)) {
            // Untouched idle connections go back as they are (the waiter's turn is over).
            Some(Granted::Conn(mut conn)) => conn.set_clean(true),
            Some(Granted::Connect(slot, Some(old))) => {
                let mut conn = PooledConn::new(slot, old);
                conn.set_clean(true);
            }
            // Dropped: the slot is given back.
            Some(Granted::Connect(slot, None)) => drop(slot),
            Some(Granted::Fail(_)) | None => {}
        }
    }
}

/// Counts a connection attempt in progress, until it ends (or is dropped).
struct Connecting<'a>(&'a Pool);

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        self.0.lock().connecting -= 1;
    }
}

/// A checked-out server connection, in the slot that counts it. Dropping it gives the
/// connection back to the pool if the holder marked it clean (idle, outside any
/// transaction, nothing outstanding); otherwise the connection is closed, so a
/// half-finished transaction never reaches another client, and its slot is given back once
/// PostgreSQL has closed its end.
pub struct PooledConn {
    slot: Slot,
    conn: Option<ServerConn>,
    clean: bool,
}

impl PooledConn {
    fn new(slot: Slot, conn: ServerConn) -> PooledConn {
        PooledConn {
            slot,
            conn: Some(conn),
            clean: false,
        }
    }

    /// Marks whether the connection may be reused as it is.
    pub fn set_clean(&mut self, clean: bool) {
        self.clean = clean;
    }

    /// The pool it came from.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.slot.pool
    }

    /// The pool it came from and the connection, borrowed together.
    pub fn with_pool(&mut self) -> (&Pool, &mut ServerConn) {
        (
            &self.slot.pool,
            self.conn.as_mut().expect("connection present until drop"),
        )
    }
}

impl std::ops::Deref for PooledConn {
    type Target = ServerConn;
    fn deref(&self) -> &ServerConn {
        self.conn.as_ref().expect("connection present until drop")
    }
}

impl std::ops::DerefMut for PooledConn {
    fn deref_mut(&mut self) -> &mut ServerConn {
        self.conn.as_mut().expect("connection present until drop")
    }
}

impl Drop for PooledConn {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            Pool::checkin(&mut self.slot, conn, self.clean);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn pool(caps: &str) -> Arc<Pool> {
        let config = Config::parse(&format!(
            "[server]\nport = 1\ndatabase = \"d\"\nuser = \"u\"\nmax_connections = 4\nmin_idle = 0\n\
             [tenant_defaults]\nmax_server_connections = 2\n\
             [tenants.a]\nschema = \"a\"\n[tenants.b]\nschema = \"b\"\n{caps}\n\
             [users.x]\npassword = \"p\"\n"
        ))
        .unwrap();
        let target = ServerTarget::from_config(&config).unwrap();
        let settings = PoolSettings {
            max_connections: 4,
            min_idle: 0,
            idle_timeout: Duration::from_secs(60),
            lifetime: Duration::from_secs(60),
        };
        Pool::new(0, target, settings, Arc::new(Tenants::from_config(&config)))
    }

    fn wait(st: &mut State, t: TenantId) -> oneshot::Receiver<Grant> {
        let (tx, rx) = oneshot::channel();
        if st.queues[t as usize].is_empty() {
            st.ring.push_back(t);
        }
        st.queues[t as usize].push_back(Waiter {
            id: 0,
            since: Instant::now(),
            tx,
        });
        st.waiting += 1;
        rx
    }

    #[test]
    fn tenants_take_turns_and_a_connection_prefers_its_own_tenant_within_a_round() {
        let pool = pool("");
        let mut st = pool.lock();
        let mut rx: Vec<_> = (0..3).map(|_| wait(&mut st, 1)).collect();
        rx.push(wait(&mut st, 0));
        // Ring order is b, a. A connection carrying a's search_path goes to a: a's turn in
        // this round is still to come.
        assert_eq!(
            pool.next_tenant(&mut st, Some(0), Some(SHARED_LOGIN)),
            Some(0)
        );
        st.served[0] = st.round;
        // a has had its turn in this round: the next connection, even a's, goes to b.
        assert_eq!(
            pool.next_tenant(&mut st, Some(0), Some(SHARED_LOGIN)),
            Some(1)
        );
        st.served[1] = st.round;
        // Both served: a new round starts, in ring order.
        assert_eq!(pool.next_tenant(&mut st, None, None), Some(1));
    }

    #[test]
    fn a_tenant_at_its_cap_is_skipped() {
        let pool = pool("");
        let mut st = pool.lock();
        let _a = wait(&mut st, 0);
        let _b = wait(&mut st, 1);
        st.in_use[0] = pool.tenants.get(0).max_server();
        assert_eq!(
            pool.next_tenant(&mut st, Some(0), Some(SHARED_LOGIN)),
            Some(1)
        );
        st.in_use[1] = pool.tenants.get(1).max_server();
        assert_eq!(pool.next_tenant(&mut st, None, None), None);
    }

    /// An idle server connection of `login` carrying `tenant`'s search_path, over a local
    /// socket pair (the peer must stay open, or the connection reads as broken).
    async fn conn(login: LoginId, tenant: TenantId) -> (ServerConn, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let peer = listener.accept().unwrap().0;
        stream.set_nonblocking(true).unwrap();
        let now = Instant::now();
        let mut conn = ServerConn::new(crate::server::Backend {
            stream: crate::tls::Stream::Plain(tokio::net::TcpStream::from_std(stream).unwrap()),
            buf: Default::default(),
            id: 0,
            backend_pid: 0,
            backend_secret: 0,
            login,
            created: now,
            idle_since: now,
            state: Default::default(),
            work: Default::default(),
            mid_message: false,
        });
        let policy = crate::session_state::Policy {
            session_mode: false,
            always: false,
            tracking: true,
        };
        conn.state.begin(tenant, 0, 1, policy, false);
        (conn, peer)
    }

    #[test]
    fn a_login_added_by_reload_has_its_refused_state() {
        let pool = pool("");
        assert_eq!(pool.lock().full.len(), 1);
        let mut target = (*pool.target()).clone();
        target.logins.push(crate::server::ServerLogin {
            user: "new".into(),
            password: None,
        });
        pool.reconfigure(Some(target), None);
        // Indexed by a new tenant's login at its first checkout (and its first wait).
        assert_eq!(pool.lock().full.len(), 2);
        assert!(pool.lock().full[1].is_none());
        assert_eq!(pool.lock().full_probing, [false, false]);
    }

    #[test]
    fn tenants_get_the_logins_the_config_names() {
        // a and c share the [server] user; b and d share a role of their own.
        let pool = pool(
            "server_user = \"ub\"\nserver_password = \"pb\"\n\
             [tenants.c]\nschema = \"c\"\n\
             [tenants.d]\nschema = \"d\"\nserver_user = \"ub\"\nserver_password = \"pb\"\n",
        );
        let logins: Vec<_> = pool.tenants.iter().map(|t| t.login()).collect();
        assert_eq!(logins, [SHARED_LOGIN, 1, SHARED_LOGIN, 1]);
        assert_eq!(pool.target().login(SHARED_LOGIN).user, "u");
        assert_eq!(pool.target().login(1).user, "ub");
        assert_eq!(pool.target().login(1).password.as_deref(), Some("pb"));
    }

    #[tokio::test]
    async fn a_returned_connection_goes_only_to_a_waiter_of_its_login() {
        // a: the shared login; b and c: their own role, shared.
        let pool =
            pool("server_user = \"ub\"\n[tenants.c]\nschema = \"c\"\nserver_user = \"ub\"\n");
        let (a, b, c): (TenantId, TenantId, TenantId) = (0, 1, 2);
        let (conn_a, _pa) = conn(SHARED_LOGIN, a).await;
        let (conn_b, _pb) = conn(1, b).await;
        let (conn_b2, _pb2) = conn(1, b).await;
        let mut st = pool.lock();
        st.open = 4;
        // Only b (another login) waits: b gets the connection's slot to connect with its
        // own login, and closes the connection first.
        let mut rx_b = wait(&mut st, b);
        assert!(pool.hand_out(&mut st, Grant::Conn(conn_a)));
        assert!(matches!(
            rx_b.try_recv(),
            Ok(Grant::Connect(Some(ref old))) if old.login == SHARED_LOGIN
        ));
        assert_eq!((st.open, st.in_use[b as usize], st.waiting), (4, 1, 0));
        assert!(st.idle.is_empty());

        // Ring order a, c. A connection of b and c's login goes to c, whose turn in this
        // round is still to come, not to a, which is first in the ring.
        st.round += 1;
        let mut rx_a = wait(&mut st, a);
        let mut rx_c = wait(&mut st, c);
        assert!(pool.hand_out(&mut st, Grant::Conn(conn_b)));
        assert!(matches!(rx_c.try_recv(), Ok(Grant::Conn(ref g)) if g.login == 1));
        // c has had its turn in this round: the next connection of that login is a's turn,
        // so a gets its slot (to close it and connect with the shared login).
        let mut rx_c2 = wait(&mut st, c);
        assert!(pool.hand_out(&mut st, Grant::Conn(conn_b2)));
        assert!(matches!(
            rx_a.try_recv(),
            Ok(Grant::Connect(Some(ref old))) if old.login == 1
        ));
        assert!(rx_c2.try_recv().is_err());
        assert_eq!(
            (
                st.open,
                st.in_use[a as usize],
                st.in_use[c as usize],
                st.waiting
            ),
            (4, 1, 1, 1)
        );
    }

    #[tokio::test]
    async fn a_login_the_server_refuses_gets_its_own_connections_but_no_slots() {
        // b has its own role, which PostgreSQL refuses more connections (53300).
        let pool = pool("server_user = \"ub\"\n");
        let (conn_b, _pb) = conn(1, 1).await;
        let (conn_b2, _pb2) = conn(1, 1).await;
        let mut st = pool.lock();
        st.open = 2;
        let _ = failed(&mut st.full[1], "too many connections for role");
        let mut rx_b = wait(&mut st, 1);
        // A free slot is not handed to b (it would only be refused again)...
        st.open = 1;
        assert!(!pool.hand_out(&mut st, Grant::Connect(None)));
        assert!(rx_b.try_recv().is_err());
        // ... nor does a new checkout of b connect: it waits.
        st.queues[1].clear();
        st.ring.clear();
        st.waiting = 0;
        assert!(matches!(pool.try_take(&mut st, 1), Take::Wait));
        // A connection of b's role that comes back goes to b's waiter.
        let mut rx_b = wait(&mut st, 1);
        assert!(pool.hand_out(&mut st, Grant::Conn(conn_b)));
        assert!(matches!(rx_b.try_recv(), Ok(Grant::Conn(ref c)) if c.login == 1));
        // a, of the shared login, still gets slots; b's next connection back goes to b.
        let mut rx_a = wait(&mut st, 0);
        assert!(pool.hand_out(&mut st, Grant::Connect(None)));
        assert!(matches!(rx_a.try_recv(), Ok(Grant::Connect(None))));
        let mut rx_b = wait(&mut st, 1);
        assert!(pool.hand_out(&mut st, Grant::Conn(conn_b2)));
        assert!(matches!(rx_b.try_recv(), Ok(Grant::Conn(ref c)) if c.login == 1));
        assert_eq!(
            pool.wait_reason_locked(&st, 1).as_deref(),
            Some("the server refuses more connections as ub: too many connections for role")
        );
        assert_eq!(pool.wait_reason_locked(&st, 0), None);
    }

    #[tokio::test]
    async fn a_refused_logins_probe_backs_off_while_the_server_is_down() {
        // b's role was refused (53300); then the server goes away (port 1: refused at
        // once). b's probe must not spin: it waits for the server's backoff too.
        let pool = pool("server_user = \"ub\"\n");
        let _ = failed(&mut pool.lock().full[1], "too many connections for role");
        assert_eq!(
            pool.checkout(1, Duration::from_millis(1000)).await.err(),
            Some(CheckoutError::Timeout)
        );
        let attempts = pool.stats.connects_failed.load(Ordering::Relaxed);
        assert!(
            (1..=8).contains(&attempts),
            "{attempts} connects in one second"
        );
    }

    #[tokio::test]
    async fn a_gone_waiter_of_another_login_leaves_the_connection_to_the_next() {
        let pool = pool("server_user = \"ub\"\n");
        let (conn_a, _pa) = conn(SHARED_LOGIN, 0).await;
        let mut st = pool.lock();
        st.open = 1;
        drop(wait(&mut st, 1));
        // b's only waiter is gone: the connection is kept, idle, and nothing is counted.
        assert!(!pool.hand_out(&mut st, Grant::Conn(conn_a)));
        assert_eq!(
            (st.open, st.idle.len(), st.in_use[1], st.waiting),
            (1, 1, 0, 0)
        );
    }

    #[tokio::test]
    async fn a_dropped_checkout_gives_its_grant_back() {
        let pool = pool("server_user = \"ub\"\n");
        pool.lock().open = 4;
        for login in [1, SHARED_LOGIN] {
            // b waits in a full pool; a connection is handed to it (its own login's, or
            // another's slot), and the checkout is dropped before it takes it.
            let mut checkout = Box::pin(pool.checkout(1, Duration::from_secs(60)));
            let polled = tokio::time::timeout(Duration::from_millis(20), &mut checkout).await;
            assert!(polled.is_err());
            let (c, _peer) = conn(login, 0).await;
            {
                let mut st = pool.lock();
                assert_eq!(st.waiting, 1);
                assert!(pool.hand_out(&mut st, Grant::Conn(c)));
                assert_eq!(st.in_use[1], 1);
            }
            drop(checkout);
            let mut st = pool.lock();
            assert_eq!((st.open, st.in_use[1], st.waiting), (4, 0, 0));
            assert_eq!(st.idle.pop().map(|c| c.login), Some(login));
        }
        // A connect that fails gives its slot back; the checkout waits on for the server
        // (the probe tries meanwhile) and times out.
        pool.lock().open = 0;
        assert_eq!(
            pool.checkout(1, Duration::from_millis(300)).await.err(),
            Some(CheckoutError::Timeout)
        );
        assert!(pool.stats.connects_failed.load(Ordering::Relaxed) >= 2);
        // Once the probe has seen nobody waits, nothing is counted.
        for _ in 0..100 {
            let st = pool.lock();
            if (st.open, st.in_use[1], st.connecting, st.waiting, st.probing) == (0, 0, 0, 0, false)
            {
                return;
            }
            drop(st);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("counts left behind");
    }

    #[tokio::test]
    async fn checkout_in_a_full_pool_takes_the_slot_of_another_logins_idle_connection() {
        let pool = pool("server_user = \"ub\"\n");
        let (conn_a, _pa) = conn(SHARED_LOGIN, 0).await;
        let (conn_b, _pb) = conn(1, 1).await;
        let mut st = pool.lock();
        st.open = 4;
        st.idle.push(conn_b);
        st.idle.push(conn_a);
        // b takes its own login's connection (even though a's is the most recent).
        assert!(matches!(pool.try_take(&mut st, 1), Take::Conn(c) if c.login == 1));
        // Another b transaction: only a's connection is idle and the pool is full. It is
        // closed and its slot opens one for b.
        match pool.try_take(&mut st, 1) {
            Take::Connect(Some(old)) => assert_eq!(old.login, SHARED_LOGIN),
            _ => panic!("expected a connect in the idle connection's slot"),
        }
        assert_eq!((st.open, st.in_use[1], st.idle.len()), (4, 2, 0));
        // b is at its cap now: the next one waits.
        assert!(matches!(pool.try_take(&mut st, 1), Take::Wait));
    }
}
