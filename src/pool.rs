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
//! All of this state sits behind one mutex held only for a few instructions; nothing in it
//! awaits. Connecting happens outside the lock, against a reserved slot.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::server::{self, ServerConn, ServerTarget};
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

/// What a waiter is handed.
enum Grant {
    /// An idle connection, already counted against the waiter's tenant.
    Conn(ServerConn),
    /// A reserved slot: the waiter opens the connection itself.
    Connect,
    /// The server is down; give up.
    Fail(String),
}

/// What a checkout does next.
enum Take {
    Conn(ServerConn),
    Connect,
    Fail(String),
    Wait,
}

struct Waiter {
    id: u64,
    since: Instant,
    tx: oneshot::Sender<Grant>,
}

/// The server has been failing: new connections are not tried again before `retry_at`.
struct Down {
    retry_at: Instant,
    delay: Duration,
    error: String,
}

struct State {
    idle: Vec<ServerConn>,
    /// Connections open or being opened; never above `max_connections`.
    open: u32,
    /// Connections checked out (or being opened) per tenant.
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
    /// PAUSE: everything, or per tenant. Paused tenants' transactions wait.
    paused_all: bool,
    paused: Vec<bool>,
    next_waiter: u64,
    down: Option<Down>,
    closed: bool,
}

/// The shared pool.
pub struct Pool {
    state: Mutex<State>,
    target: ServerTarget,
    settings: PoolSettings,
    tenants: Arc<Tenants>,
    /// The server's ParameterStatus values from the latest login.
    params: Mutex<Option<ServerParams>>,
    pub stats: PoolStats,
}

/// A point-in-time view of the pool, for the admin console and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSnapshot {
    pub open: u32,
    pub idle: u32,
    pub connecting: u32,
    pub waiting: u32,
    pub in_use: Vec<u32>,
    /// Idle connections per tenant whose search_path they carry.
    pub idle_by_tenant: Vec<u32>,
    /// How long the oldest waiter of each tenant has waited.
    pub max_wait: Vec<Duration>,
    pub paused: Vec<bool>,
    /// Idle connections: (server pid, tenant, age).
    /// Idle server connections: backend pid, tenant, age, named statements prepared.
    pub idle_servers: Vec<(i32, Option<TenantId>, Duration, usize)>,
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

impl Pool {
    pub fn new(target: ServerTarget, settings: PoolSettings, tenants: Arc<Tenants>) -> Arc<Pool> {
        let n = tenants.len();
        Arc::new(Pool {
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
                paused_all: false,
                paused: vec![false; n],
                next_waiter: 0,
                down: None,
                closed: false,
            }),
            target,
            settings,
            tenants,
            params: Mutex::new(None),
            stats: PoolStats::default(),
        })
    }

    pub fn target(&self) -> &ServerTarget {
        &self.target
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock would be a bug in a few lines of bookkeeping;
        // keep serving rather than poisoning every client.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gets a server connection for one transaction (or session) of `tenant`.
    pub async fn checkout(
        self: &Arc<Self>,
        tenant: TenantId,
        wait_timeout: Duration,
    ) -> Result<PooledConn, CheckoutError> {
        let (id, rx) = {
            let mut st = self.lock();
            if st.closed {
                return Err(CheckoutError::Unavailable(
                    "tenantpool is shutting down".into(),
                ));
            }
            match self.try_take(&mut st, tenant) {
                Take::Conn(conn) => return Ok(self.guard(conn, tenant)),
                Take::Fail(e) => return Err(CheckoutError::Unavailable(e)),
                Take::Connect => None,
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
                    Some((id, rx))
                }
            }
        }
        .map_or((u64::MAX, None), |(id, rx)| (id, Some(rx)));
        let Some(mut rx) = rx else {
            return self.open_for(tenant).await;
        };
        let grant = match tokio::time::timeout(wait_timeout, &mut rx).await {
            Ok(Ok(g)) => g,
            Ok(Err(_)) => return Err(CheckoutError::Unavailable("pool closed".into())),
            Err(_) => {
                let mut st = self.lock();
                let q = &mut st.queues[tenant as usize];
                if let Some(pos) = q.iter().position(|w| w.id == id) {
                    q.remove(pos);
                    if q.is_empty() {
                        st.ring.retain(|&x| x != tenant);
                    }
                    st.waiting -= 1;
                    return Err(CheckoutError::Timeout);
                }
                drop(st);
                // Not in the queue: a grant was sent under the lock just before we took it.
                match rx.try_recv() {
                    Ok(g) => g,
                    Err(_) => return Err(CheckoutError::Timeout),
                }
            }
        };
        match grant {
            Grant::Conn(conn) => Ok(self.guard(conn, tenant)),
            Grant::Connect => self.open_for(tenant).await,
            Grant::Fail(e) => Err(CheckoutError::Unavailable(e)),
        }
    }

    /// The checkout decision, made under the lock.
    fn try_take(&self, st: &mut State, tenant: TenantId) -> Take {
        let cap = self.tenants.get(tenant).max_server;
        let t = tenant as usize;
        if !st.queues[t].is_empty() || st.in_use[t] >= cap || st.paused_all || st.paused[t] {
            return Take::Wait;
        }
        if let Some(conn) = take_idle(st, tenant) {
            st.in_use[t] += 1;
            return Take::Conn(conn);
        }
        let in_backoff = st
            .down
            .as_ref()
            .is_some_and(|d| Instant::now() < d.retry_at);
        if st.open < self.settings.max_connections && !in_backoff {
            st.open += 1;
            st.in_use[t] += 1;
            return Take::Connect;
        }
        if in_backoff && st.open == 0 {
            let e = st
                .down
                .as_ref()
                .map(|d| d.error.clone())
                .unwrap_or_default();
            return Take::Fail(e);
        }
        Take::Wait
    }

    fn guard(self: &Arc<Self>, conn: ServerConn, tenant: TenantId) -> PooledConn {
        PooledConn {
            pool: self.clone(),
            conn: Some(conn),
            tenant,
            clean: false,
        }
    }

    /// Opens a connection into a slot already reserved for `tenant`.
    async fn open_for(self: &Arc<Self>, tenant: TenantId) -> Result<PooledConn, CheckoutError> {
        match self.connect().await {
            Ok(conn) => Ok(self.guard(conn, tenant)),
            Err(e) => {
                let mut st = self.lock();
                st.open -= 1;
                st.in_use[tenant as usize] -= 1;
                self.after_close(&mut st);
                Err(CheckoutError::Unavailable(e))
            }
        }
    }

    /// Connects and logs in, updating the failure backoff either way.
    async fn connect(&self) -> Result<ServerConn, String> {
        self.lock().connecting += 1;
        let result = server::connect(&self.target).await;
        self.lock().connecting -= 1;
        match result {
            Ok(login) => {
                self.stats.connects_ok.fetch_add(1, Ordering::Relaxed);
                *self.params.lock().unwrap_or_else(|e| e.into_inner()) = Some(login.params.into());
                let mut st = self.lock();
                if st.down.take().is_some() {
                    tracing::info!("server reachable again");
                }
                Ok(login.conn)
            }
            Err(e) => {
                self.stats.connects_failed.fetch_add(1, Ordering::Relaxed);
                let mut st = self.lock();
                let delay = st
                    .down
                    .as_ref()
                    .map(|d| (d.delay * 2).min(BACKOFF_MAX))
                    .unwrap_or(BACKOFF_MIN);
                tracing::warn!(error = %e, retry_in = ?delay, "server connection failed");
                st.down = Some(Down {
                    retry_at: Instant::now() + delay,
                    delay,
                    error: e.clone(),
                });
                Err(e)
            }
        }
    }

    /// After a slot was freed without a connection to hand on: let a waiter open one, or,
    /// when the server is down and nothing is open, fail every waiter instead of letting
    /// them hang until their timeout.
    fn after_close(&self, st: &mut State) {
        if st.waiting == 0 || st.closed {
            return;
        }
        let now = Instant::now();
        if let Some(d) = &st.down
            && now < d.retry_at
        {
            if st.open == 0 {
                let err = d.error.clone();
                for q in st.queues.iter_mut() {
                    for w in q.drain(..) {
                        let _ = w.tx.send(Grant::Fail(err.clone()));
                    }
                }
                st.ring.clear();
                st.waiting = 0;
            }
            return;
        }
        if st.open < self.settings.max_connections {
            st.open += 1;
            if !self.hand_out(st, Grant::Connect) {
                st.open -= 1;
            }
        }
    }

    /// Gives `grant` to the next waiter whose tenant is below its cap, tenants taking turns
    /// (see [`Pool::next_tenant`]). Returns false (and drops a `Connect` grant) when no
    /// waiter can take it; a connection grant that nobody takes is put back into `idle`.
    fn hand_out(&self, st: &mut State, mut grant: Grant) -> bool {
        let preferred = match &grant {
            Grant::Conn(c) => c.state.tenant(),
            _ => None,
        };
        while let Some(t) = self.next_tenant(st, preferred) {
            let ti = t as usize;
            st.ring.retain(|&x| x != t);
            st.served[ti] = st.round;
            while let Some(w) = st.queues[ti].pop_front() {
                st.waiting -= 1;
                st.in_use[ti] += 1;
                match w.tx.send(grant) {
                    Ok(()) => {
                        if !st.queues[ti].is_empty() {
                            st.ring.push_back(t);
                        }
                        return true;
                    }
                    Err(back) => {
                        // The waiter is gone (its task ended); try the next one.
                        st.in_use[ti] -= 1;
                        grant = back;
                    }
                }
            }
        }
        if let Grant::Conn(conn) = grant {
            st.idle.push(conn);
        }
        false
    }

    /// The tenant whose waiter gets the next connection. Tenants with waiters take turns
    /// in rounds: in each round every tenant below its cap is served once, in ring order
    /// (FIFO within a tenant). Within a round the order is free, so a connection goes back
    /// to the tenant whose search_path it carries when that tenant's turn in this round is
    /// still to come: fewer tenant switches, same fairness.
    fn next_tenant(&self, st: &mut State, preferred: Option<TenantId>) -> Option<TenantId> {
        let eligible = |st: &State, t: TenantId| {
            !st.queues[t as usize].is_empty()
                && st.in_use[t as usize] < self.tenants.get(t).max_server
                && !st.paused_all
                && !st.paused[t as usize]
        };
        for _ in 0..2 {
            if let Some(p) = preferred
                && eligible(st, p)
                && st.served[p as usize] < st.round
            {
                return Some(p);
            }
            if let Some(&t) = st
                .ring
                .iter()
                .find(|&&t| eligible(st, t) && st.served[t as usize] < st.round)
            {
                return Some(t);
            }
            // Everyone eligible has had a turn in this round: start the next one.
            if !st.ring.iter().any(|&t| eligible(st, t)) {
                return None;
            }
            st.round += 1;
        }
        None
    }

    /// Takes a connection back from a transaction or session.
    fn checkin(&self, mut conn: ServerConn, tenant: TenantId, clean: bool) {
        let mut st = self.lock();
        st.in_use[tenant as usize] -= 1;
        let now = Instant::now();
        let expired = now.duration_since(conn.created) >= self.settings.lifetime;
        if !clean || expired || st.closed {
            st.open -= 1;
            drop(st);
            conn.terminate();
            drop(conn);
            let mut st = self.lock();
            self.after_close(&mut st);
            return;
        }
        conn.idle_since = now;
        self.hand_out(&mut st, Grant::Conn(conn));
    }

    /// The latest ParameterStatus values of the server, connecting once if none is known.
    pub async fn server_params(self: &Arc<Self>) -> Result<ServerParams, String> {
        if let Some(p) = self
            .params
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Ok(p);
        }
        // Any tenant will do: the connection goes straight back.
        let conn = match self.checkout(0, self.target.connect_timeout).await {
            Ok(c) => c,
            Err(CheckoutError::Timeout) => return Err("timed out waiting for the pool".into()),
            Err(CheckoutError::Unavailable(e)) => return Err(e),
        };
        let mut conn = conn;
        conn.set_clean(true);
        drop(conn);
        self.params
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| "server sent no parameters".into())
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
                .map(|c| {
                    (
                        c.backend_pid,
                        c.state.tenant(),
                        now - c.created,
                        c.work.stmts.len(),
                    )
                })
                .collect(),
        }
    }

    /// One round of upkeep: closes idle connections past `idle_timeout` (above `min_idle`)
    /// or past `lifetime`, or found broken, and opens connections up to `min_idle`.
    pub async fn maintain(self: &Arc<Self>) {
        let now = Instant::now();
        let mut to_close = Vec::new();
        let want_new = {
            let mut st = self.lock();
            if st.closed {
                return;
            }
            let min_idle = self.settings.min_idle as usize;
            let mut i = 0;
            while i < st.idle.len() {
                let idle_count = st.idle.len();
                let c = &mut st.idle[i];
                let too_old = now.duration_since(c.created) >= self.settings.lifetime;
                let idle_long = idle_count > min_idle
                    && now.duration_since(c.idle_since) >= self.settings.idle_timeout;
                if too_old || idle_long || c.is_broken_idle() {
                    to_close.push(st.idle.swap_remove(i));
                    st.open -= 1;
                } else {
                    i += 1;
                }
            }
            let in_backoff = st.down.as_ref().is_some_and(|d| now < d.retry_at);
            let want = !in_backoff
                && (st.idle.len() as u32) < self.settings.min_idle
                && st.open < self.settings.max_connections;
            if want {
                st.open += 1;
            }
            want
        };
        for c in to_close {
            c.terminate();
        }
        if want_new {
            match self.connect().await {
                Ok(conn) => {
                    let mut st = self.lock();
                    self.hand_out(&mut st, Grant::Conn(conn));
                }
                Err(_) => {
                    let mut st = self.lock();
                    st.open -= 1;
                    self.after_close(&mut st);
                }
            }
        }
    }

    /// Runs [`Pool::maintain`] until the pool is closed.
    pub async fn run_maintenance(self: Arc<Self>) {
        loop {
            self.maintain().await;
            let (closed, short) = {
                let st = self.lock();
                let short = (st.idle.len() as u32) < self.settings.min_idle
                    && st.open < self.settings.max_connections;
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
        while let Some(conn) = st.idle.pop() {
            if !self.hand_out(&mut st, Grant::Conn(conn)) {
                break;
            }
        }
        while st.waiting > 0 && st.open < self.settings.max_connections {
            st.open += 1;
            if !self.hand_out(&mut st, Grant::Connect) {
                st.open -= 1;
                break;
            }
        }
    }

    /// Closes the idle connections carrying `tenant`'s search_path (KILL).
    pub fn close_idle_of(&self, tenant: TenantId) {
        let closed: Vec<ServerConn> = {
            let mut st = self.lock();
            let (keep, close): (Vec<_>, Vec<_>) = std::mem::take(&mut st.idle)
                .into_iter()
                .partition(|c| c.state.tenant() != Some(tenant));
            st.idle = keep;
            st.open -= close.len() as u32;
            close
        };
        for c in closed {
            c.terminate();
        }
    }

    /// Closes idle connections and refuses new checkouts (shutdown).
    pub fn close(&self) {
        let idle = {
            let mut st = self.lock();
            st.closed = true;
            let n = st.idle.len() as u32;
            st.open -= n;
            for q in st.queues.iter_mut() {
                for w in q.drain(..) {
                    let _ = w.tx.send(Grant::Fail("tenantpool is shutting down".into()));
                }
            }
            st.ring.clear();
            st.waiting = 0;
            std::mem::take(&mut st.idle)
        };
        for c in idle {
            c.terminate();
        }
    }
}

/// Removes an idle connection, preferring the most recently used one already on `tenant`'s
/// search_path; broken ones found on the way are closed.
fn take_idle(st: &mut State, tenant: TenantId) -> Option<ServerConn> {
    loop {
        let pos = st
            .idle
            .iter()
            .rposition(|c| c.state.tenant() == Some(tenant))
            .or_else(|| st.idle.len().checked_sub(1))?;
        let mut conn = st.idle.swap_remove(pos);
        if conn.is_broken_idle() {
            st.open -= 1;
            continue;
        }
        return Some(conn);
    }
}

/// A checked-out server connection. Dropping it gives the connection back to the pool if
/// the holder marked it clean (idle, outside any transaction, nothing outstanding);
/// otherwise the connection is closed, so a half-finished transaction never reaches
/// another client.
pub struct PooledConn {
    pool: Arc<Pool>,
    conn: Option<ServerConn>,
    tenant: TenantId,
    clean: bool,
}

impl PooledConn {
    /// Marks whether the connection may be reused as it is.
    pub fn set_clean(&mut self, clean: bool) {
        self.clean = clean;
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
            self.pool.checkin(conn, self.tenant, self.clean);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn pool(caps: &str) -> Arc<Pool> {
        let config = Config::parse(&format!(
            "[server]\ndatabase = \"d\"\nuser = \"u\"\nmax_connections = 4\nmin_idle = 0\n\
             [tenant_defaults]\nmax_server_connections = 2\n\
             [tenants.a]\nschema = \"a\"\n[tenants.b]\nschema = \"b\"\n{caps}\n\
             [users.x]\npassword = \"p\"\n"
        ))
        .unwrap();
        let target = ServerTarget {
            host: "127.0.0.1".into(),
            port: 1,
            database: "d".into(),
            user: "u".into(),
            password: None,
            connect_timeout: Duration::from_secs(1),
        };
        let settings = PoolSettings {
            max_connections: 4,
            min_idle: 0,
            idle_timeout: Duration::from_secs(60),
            lifetime: Duration::from_secs(60),
        };
        Pool::new(target, settings, Arc::new(Tenants::from_config(&config)))
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
        assert_eq!(pool.next_tenant(&mut st, Some(0)), Some(0));
        st.served[0] = st.round;
        // a has had its turn in this round: the next connection, even a's, goes to b.
        assert_eq!(pool.next_tenant(&mut st, Some(0)), Some(1));
        st.served[1] = st.round;
        // Both served: a new round starts, in ring order.
        assert_eq!(pool.next_tenant(&mut st, None), Some(1));
    }

    #[test]
    fn a_tenant_at_its_cap_is_skipped() {
        let pool = pool("");
        let mut st = pool.lock();
        let _a = wait(&mut st, 0);
        let _b = wait(&mut st, 1);
        st.in_use[0] = pool.tenants.get(0).max_server;
        assert_eq!(pool.next_tenant(&mut st, Some(0)), Some(1));
        st.in_use[1] = pool.tenants.get(1).max_server;
        assert_eq!(pool.next_tenant(&mut st, None), None);
    }
}
