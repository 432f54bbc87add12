//! The client side: one task per client connection, from startup to goodbye.
//!
//! After [`startup`] admits a client, its [`Session`] waits, holding no read buffer, until
//! the client sends something. Then it takes a server connection from the pool for the
//! transaction (transaction mode) or keeps it between transactions (session mode), and the [`relay`] moves the
//! bytes until the transaction ends. Failures that leave the client usable (no server
//! connection in time, a server connection lost) are answered here the way PostgreSQL
//! would answer them: an ErrorResponse, then ReadyForQuery for each batch the client sent.

pub mod auth;
pub mod params;
pub mod relay;
pub mod startup;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Instant;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::Shared;
use crate::config::PoolMode;
use crate::error::PgError;
use crate::pool::{CheckoutError, PooledConn};
use crate::protocol::{header, put_ready_for_query};
use crate::registry::{ClientSlot, STATE_ACTIVE, STATE_IDLE, STATE_WAITING};
use crate::tenant::{PRELUDE_FRESH_QUERIES, PRELUDE_KEEP_QUERIES, PRELUDE_RESET_QUERIES, TenantId};

use crate::prepared::{ClientStatements, Tracker};
use relay::{CLIENT_BUF, ClientScan, Relay, RelayEnd, ServerScan};
use startup::FirstPacket;

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Serves one client connection to its end; `alive` is dropped when it ends.
///
/// Written as a plain function returning a future so that the task's state is just the
/// (boxed) login and then the session: an idle client's task stays a few hundred bytes.
pub fn serve<T: Send + 'static>(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    alive: T,
) -> impl Future<Output = ()> + Send {
    let admit = Box::pin(admit_client(stream, peer, shared));
    async move {
        let _alive = alive;
        let Some(mut session) = admit.await else {
            return;
        };
        session.run().await;
    }
}

/// Rolls back an idle-in-transaction server connection; true when it is idle again.
async fn rollback(conn: &mut crate::pool::PooledConn) -> bool {
    let mut out = BytesMut::with_capacity(16);
    crate::protocol::put_query(&mut out, "ROLLBACK");
    conn.run_queries(&out, 1).await.is_ok() && conn.buf.is_empty()
}

/// The queries that wipe a used connection's session state for `tenant`: DISCARD ALL, or,
/// when the connection holds statements the proxy tracks, all of it but those statements
/// (unless an SQL PREPARE left statements on it that the proxy does not know). DISCARD ALL
/// costs PostgreSQL less, so a connection without statements gets it. Returns the Query
/// messages and how many there are.
fn reset_prelude<'t>(
    shared: &Shared,
    tenant: &'t crate::tenant::Tenant,
    conn: &mut crate::server::ServerConn,
) -> (&'t [u8], u8) {
    if shared.config.proxy.max_prepared_statements > 0
        && !conn.sql_prepared
        && !conn.work.stmts.is_empty()
    {
        (&tenant.prelude_keep, PRELUDE_KEEP_QUERIES)
    } else {
        conn.work.stmts.clear();
        conn.sql_prepared = false;
        (&tenant.prelude_reset, PRELUDE_RESET_QUERIES)
    }
}

/// Applies a client's settings on a server connection at login, so that bad names or values
/// are refused there as PostgreSQL would refuse them, and learns how PostgreSQL reports them
/// (for the client's ParameterStatus). Done once per distinct set of settings.
async fn validate_settings(
    shared: &Arc<Shared>,
    tenant: TenantId,
    settings: &Arc<params::Settings>,
) -> Result<(), PgError> {
    if settings.list.is_empty() || settings.reported.get().is_some() {
        return Ok(());
    }
    let wait = shared.config.limits.query_wait_timeout.0;
    let mut conn = shared
        .pool
        .checkout(tenant, wait)
        .await
        .map_err(|e| match e {
            CheckoutError::Timeout => PgError::query_wait_timeout(&shared.tenants.get(tenant).name),
            CheckoutError::Unavailable(m) => PgError::server_unavailable(&m, true),
        })?;
    let t = shared.tenants.get(tenant);
    let (reset, queries) = reset_prelude(shared, t, &mut conn);
    let mut out = BytesMut::from(reset);
    crate::protocol::put_query(&mut out, &settings.transition_sql(None));
    let result = conn.run_queries(&out, u32::from(queries) + 1).await;
    conn.tenant = Some(tenant);
    conn.dirty = false;
    match result {
        Ok(reported) => {
            conn.settings = Some(settings.clone());
            conn.set_clean(conn.buf.is_empty());
            let _ = settings.reported.set(reported);
            Ok(())
        }
        Err(Some((code, message))) => {
            // The failed multi-statement query rolled back every SET: server defaults.
            conn.settings = Some(shared.no_settings.clone());
            conn.set_clean(conn.buf.is_empty());
            Err(PgError {
                fatal: true,
                code: code.into(),
                message,
            })
        }
        Err(None) => Err(PgError::server_unavailable("connection lost", true)),
    }
}

/// Logs a client in within `client_login_timeout`; `None` when it was refused (it has been
/// told why) or it was a cancel request.
async fn admit_client(
    mut stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
) -> Option<Session> {
    let _ = stream.set_nodelay(true);
    let login_timeout = shared.config.limits.client_login_timeout.0;
    // Over max_client_conn the startup packet is still read, to name the tenant in the
    // refusal's metric, but nothing else is done.
    let conn_count = ConnCount::try_take(&shared);
    let reg =
        match tokio::time::timeout(login_timeout, login(&mut stream, peer, &shared, conn_count))
            .await
        {
            Ok(Ok(Some(reg))) => reg,
            Ok(Ok(None)) => return None,
            Ok(Err(e)) => {
                tracing::info!(client = %peer, error = %e, "login refused");
                let _ = stream.write_all(&e.to_bytes()).await;
                return None;
            }
            Err(_) => {
                tracing::info!(client = %peer, "login timed out");
                let _ = stream.write_all(&PgError::login_timeout().to_bytes()).await;
                return None;
            }
        };
    let reg = match reg {
        Login::Client(reg) => reg,
        Login::Admin(user, _conn_count) => {
            crate::admin::serve(stream, peer, user, shared).await;
            return None;
        }
    };
    Some(Session {
        stream,
        buf: BytesMut::new(),
        cfwd: 0,
        cscan: ClientScan::default(),
        skip_until_sync: false,
        discard_left: 0,
        lost: None,
        settings: reg.settings.clone(),
        held: None,
        statements: ClientStatements::default(),
        reg,
    })
}

/// Who logged in.
enum Login {
    Client(Registration),
    /// An admin user opened the admin console.
    Admin(Arc<str>, ConnCount),
}

async fn login(
    stream: &mut TcpStream,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    conn_count: Option<ConnCount>,
) -> Result<Option<Login>, PgError> {
    let startup = match startup::read_first_packet(stream).await? {
        FirstPacket::Cancel { pid, secret } => {
            if let Some((spid, ssecret)) = shared.registry.lookup(pid, secret) {
                tracing::debug!(client = %peer, "forwarding cancel request");
                let _ = crate::server::send_cancel(shared.pool.target(), spid, ssecret).await;
            }
            return Ok(None);
        }
        FirstPacket::Startup(s) => s,
    };
    let mut buf = BytesMut::new();
    let admitted = startup::admit(stream, &mut buf, *startup, shared, conn_count.is_none()).await?;
    // admit refused every client over the limit.
    let conn_count = conn_count.ok_or_else(|| PgError::too_many_clients("max_client_conn"))?;
    if !buf.is_empty() {
        return Err(PgError::protocol_violation(
            "unexpected data after authentication",
        ));
    }
    let tenant = match admitted.target {
        startup::Target::Tenant(t) => t,
        startup::Target::Admin => {
            let mut out = BytesMut::new();
            crate::admin::welcome(&mut out, (0, 0));
            stream
                .write_all(&out)
                .await
                .map_err(|e| PgError::protocol_violation(e.to_string()))?;
            tracing::info!(client = %peer, user = %admitted.user, "admin console opened");
            return Ok(Some(Login::Admin(admitted.user, conn_count)));
        }
    };
    let settings = shared.settings.intern(admitted.settings);
    let mut reg = Registration::take(shared, tenant, admitted.user.clone(), peer, conn_count)?;
    let server_params = shared
        .pool
        .server_params()
        .await
        .map_err(|e| PgError::server_unavailable(&e, true))?;
    validate_settings(shared, tenant, &settings).await?;
    startup::welcome(
        stream,
        &server_params,
        &settings,
        (reg.client.pid, reg.client.secret),
    )
    .await?;
    reg.settings = settings;
    tracing::info!(
        client = %peer,
        user = %admitted.user,
        tenant = %shared.tenants.get(tenant).name,
        "client connected"
    );
    Ok(Some(Login::Client(reg)))
}

/// One of `max_client_conn`, taken when the connection is accepted (so clients still
/// logging in count too, as in PgBouncer) and given back when it closes.
struct ConnCount(Arc<Shared>);

impl ConnCount {
    fn try_take(shared: &Arc<Shared>) -> Option<ConnCount> {
        let max = shared.config.proxy.max_client_conn;
        shared
            .clients
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnCount(shared.clone()))
    }
}

impl Drop for ConnCount {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A client's place in the proxy: its client-cap slots and its registry entry (cancel key,
/// what the admin console shows). Dropping it gives them back, however the session ends.
struct Registration {
    shared: Arc<Shared>,
    _conn_count: ConnCount,
    tenant: TenantId,
    client: Arc<ClientSlot>,
    id: u64,
    /// The client's startup settings (RESET goes back to these).
    settings: Arc<params::Settings>,
}

impl Registration {
    fn take(
        shared: &Arc<Shared>,
        tenant: TenantId,
        user: Arc<str>,
        addr: SocketAddr,
        conn_count: ConnCount,
    ) -> Result<Registration, PgError> {
        let rejected = &shared.metrics.tenants[tenant as usize].rejected;
        let t = shared.tenants.get(tenant);
        if !t.try_add_client() {
            rejected[1].increment(1);
            return Err(PgError::too_many_clients(&format!(
                "max_client_connections of tenant \"{}\" ({})",
                t.name, t.max_clients
            )));
        }
        Ok(Registration {
            shared: shared.clone(),
            _conn_count: conn_count,
            tenant,
            client: shared.registry.register(tenant, user, addr),
            settings: shared.no_settings.clone(),
            id: shared.next_client_id.fetch_add(1, Ordering::Relaxed),
        })
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.registry.unregister(self.client.pid);
        self.shared.tenants.get(self.tenant).remove_client();
    }
}

/// A logged-in client.
struct Session {
    stream: TcpStream,
    /// Read buffer; empty and unallocated while the client is idle.
    buf: BytesMut,
    /// Bytes at the front of `buf` scanned and ready for the server.
    cfwd: usize,
    cscan: ClientScan,
    /// A batch failed without reaching a server: drop messages until Sync, then answer it.
    skip_until_sync: bool,
    /// Body bytes of a message to drop as they arrive.
    discard_left: usize,
    /// The server connection died while the client was inside a transaction; the next
    /// batch is answered with this error.
    lost: Option<Box<PgError>>,
    /// Client slots, cancel key, tenant and the shared state.
    reg: Registration,
    /// The client's settings now: its startup settings plus what it SET since (followed
    /// through ParameterStatus).
    settings: Arc<params::Settings>,
    /// Session mode: the server connection kept between transactions.
    held: Option<Box<crate::pool::PooledConn>>,
    /// The client's named prepared statements (when tracking is on).
    statements: ClientStatements,
}

/// What woke an idle session.
enum Wake {
    Data,
    Closed,
    Shutdown,
    IdleTimeout,
    /// The admin console's KILL.
    Killed,
}

impl Session {
    async fn run(&mut self) {
        let reason = self.serve_transactions().await;
        tracing::info!(
            client = %self.reg.client.addr,
            tenant = %self.reg.shared.tenants.get(self.reg.tenant).name,
            reason,
            "client disconnected"
        );
    }

    async fn serve_transactions(&mut self) -> &'static str {
        // Paths that write errors or owed ReadyForQuery messages are rare and boxed, so
        // that their state does not enlarge every idle client's future.
        loop {
            if !self.first_message_ready() {
                if self.cscan.terminated && self.cfwd == 0 {
                    return "terminated";
                }
                match self.wait_for_data().await {
                    Wake::Data => {}
                    Wake::Closed => return "closed",
                    Wake::Shutdown => {
                        let _ = self.boxed_send_error(PgError::shutting_down()).await;
                        return "shutdown";
                    }
                    Wake::Killed => {
                        let e = PgError::fatal(
                            "57P01",
                            "terminating connection: tenant killed by an admin",
                        );
                        let _ = self.boxed_send_error(e).await;
                        return "killed";
                    }
                    Wake::IdleTimeout => {
                        let _ = self.boxed_send_error(PgError::client_idle_timeout()).await;
                        return "client_idle_timeout";
                    }
                }
                // Results are turned into boxed futures before any await, so that no error
                // value is held across an await in this (long-lived) future.
                let pending = match self.absorb_input() {
                    Ok(0) => None,
                    Ok(n) => Some((self.boxed_send_ready(n), "closed")),
                    Err(e) => Some((self.boxed_send_error(e), "protocol violation")),
                };
                if let Some((fut, why)) = pending
                    && fut.await.is_err()
                {
                    return why;
                }
                continue;
            }
            // Boxed: the transaction's state (checkout, relay) is large and only lives
            // while a transaction runs.
            let error = match self.boxed_transaction().await {
                Ok(true) => None,
                Ok(false) => return "closed",
                Err(e) => Some(self.boxed_send_error(e)),
            };
            if let Some(fut) = error {
                let _ = fut.await;
                return "error";
            }
            drop(error);
            if self.buf.is_empty() {
                // Idle clients hold no buffer.
                self.buf = BytesMut::new();
            }
        }
    }

    // Boxing happens in these plain functions: written inline in the async fn, the unboxed
    // future would still get a slot in the caller's state.
    fn boxed_transaction(&mut self) -> BoxFuture<'_, Result<bool, PgError>> {
        Box::pin(self.transaction())
    }

    fn boxed_send_error(&mut self, e: PgError) -> BoxFuture<'_, Result<(), PgError>> {
        Box::pin(async move {
            self.send_error(e).await;
            Err(PgError::protocol_violation("closing"))
        })
    }

    fn boxed_send_ready(&mut self, n: u32) -> BoxFuture<'_, Result<(), PgError>> {
        Box::pin(self.send_ready(n))
    }

    /// Sends an error, best effort (the connection is about to close).
    async fn send_error(&mut self, e: PgError) {
        let _ = self.stream.write_all(&e.to_bytes()).await;
    }

    /// Is there a message to start a transaction with? The whole first message must be
    /// there unless it is a large one to stream, so that a client stalling mid-message
    /// does not hold a server connection.
    fn first_message_ready(&self) -> bool {
        if self.cfwd == 0 {
            return false;
        }
        match header(&self.buf) {
            Some((_, Ok(len))) => len > CLIENT_BUF || self.buf.len() >= len,
            _ => false,
        }
    }

    /// Waits until the client has sent bytes (allocating the read buffer only then). An
    /// idle client's wait holds no buffer and little state: a readiness registration on
    /// its socket and one on the proxy's stop signal.
    async fn wait_for_data(&mut self) -> Wake {
        while self.buf.is_empty() {
            let shared = &*self.reg.shared;
            let stream = &self.stream;
            let mut stop = pin!(shared.stop.notified());
            stop.as_mut().enable();
            if shared.stopping.load(Ordering::Acquire) {
                return Wake::Shutdown;
            }
            if self.reg.client.killed.load(Ordering::Acquire) {
                return Wake::Killed;
            }
            // client_idle_timeout, when on, costs a timer allocation per idle period.
            let mut idle_timer = shared
                .config
                .limits
                .client_idle_timeout
                .nonzero()
                .map(|d| Box::pin(tokio::time::sleep(d)));
            let wake = std::future::poll_fn(|cx| {
                if stop.as_mut().poll(cx).is_ready() {
                    // Shutdown or KILL; the flags above say which (or neither: wait again).
                    return Poll::Ready(None);
                }
                if let Some(t) = idle_timer.as_mut()
                    && t.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(Some(Wake::IdleTimeout));
                }
                stream.poll_read_ready(cx).map(|r| {
                    Some(match r {
                        Ok(()) => Wake::Data,
                        Err(_) => Wake::Closed,
                    })
                })
            })
            .await;
            match wake {
                None => continue,
                Some(Wake::Data) => break,
                Some(other) => return other,
            }
        }
        self.buf.reserve(CLIENT_BUF);
        // When the socket is readable this completes at once; unlike try_read it also
        // notes a short read as "drained", saving a wasted read syscall later.
        match self.stream.read_buf(&mut self.buf).await {
            Ok(0) | Err(_) => Wake::Closed,
            Ok(_) => Wake::Data,
        }
    }

    /// Scans newly read bytes, first dropping what belongs to failed batches. Returns how
    /// many ReadyForQuery messages the client is owed for failed batches that ended.
    fn absorb_input(&mut self) -> Result<u32, PgError> {
        let mut ready = 0;
        if self.discard_left > 0 {
            let n = self.discard_left.min(self.buf.len() - self.cfwd);
            // Discarded bytes are always at the front: nothing is scanned while discarding.
            self.buf.advance(n);
            self.discard_left -= n;
        }
        while self.skip_until_sync && self.discard_left == 0 {
            let Some((tag, len)) = header(&self.buf) else {
                break;
            };
            let len = match len {
                Ok(l) if l - 1 <= crate::protocol::MAX_CLIENT_MESSAGE_LEN => l,
                _ => return Err(PgError::protocol_violation("invalid message length")),
            };
            let n = len.min(self.buf.len());
            self.buf.advance(n);
            self.discard_left = len - n;
            if tag == b'S' {
                self.skip_until_sync = false;
                ready += 1;
            } else if tag == b'X' {
                self.cscan.terminated = true;
                self.skip_until_sync = false;
            }
        }
        if self.discard_left > 0 || self.skip_until_sync || self.cscan.terminated {
            return Ok(ready);
        }
        self.cfwd = self.cscan.scan(&self.buf, self.cfwd)?;
        Ok(ready)
    }

    /// Sends `n` ReadyForQuery (idle) messages.
    async fn send_ready(&mut self, n: u32) -> Result<(), PgError> {
        let mut out = BytesMut::with_capacity(6 * n as usize);
        for _ in 0..n {
            put_ready_for_query(&mut out, b'I');
        }
        self.write_client(&out).await
    }

    async fn write_client(&mut self, bytes: &[u8]) -> Result<(), PgError> {
        self.stream
            .write_all(bytes)
            .await
            .map_err(|e| PgError::protocol_violation(e.to_string()))
    }

    /// Runs one transaction (session mode: on the connection kept from the last one). Returns whether the
    /// client is still there.
    async fn transaction(&mut self) -> Result<bool, PgError> {
        if let Some(err) = self.lost.take() {
            self.fail_batch(&err).await?;
            return Ok(true);
        }
        let shared = self.reg.shared.clone();
        if self.held.is_none()
            // Only a named Parse or a Close can start a batch answered without a server.
            && match self.buf.first() {
                Some(b'P') => self.buf.get(5).is_some_and(|&b| b != 0),
                Some(b'C') => true,
                _ => false,
            }
            && shared.config.proxy.max_prepared_statements > 0
            && self.cscan.pending == 1
            && !self.cscan.unsynced
            && self.cscan.body_left == 0
            && let Some(reply) = crate::prepared::answer_alone(
                &mut self.statements,
                &shared.statements,
                self.reg.tenant,
                &self.buf[..self.cfwd],
            )
        {
            // Prepared statements the tenant already has: no server connection needed.
            self.buf.advance(self.cfwd);
            self.cfwd = 0;
            self.cscan.pending = 0;
            self.reg
                .client
                .prepared
                .store(self.statements.len() as u32, Ordering::Relaxed);
            self.write_client(&reply).await?;
            return Ok(true);
        }
        let tenant = shared.tenants.get(self.reg.tenant);
        let tmetrics = &shared.metrics.tenants[self.reg.tenant as usize];
        let stats = &tenant.stats;
        let session_mode = shared.config.proxy.pool_mode == PoolMode::Session;
        let mut conn = match self.take_held() {
            Some(conn) => conn,
            None => match self.checkout(&shared).await {
                Ok(c) => c,
                Err(e) => {
                    let err = match e {
                        CheckoutError::Timeout => {
                            stats.wait_timeouts.fetch_add(1, Ordering::Relaxed);
                            PgError::query_wait_timeout(&tenant.name)
                        }
                        CheckoutError::Unavailable(msg) => PgError::server_unavailable(&msg, false),
                    };
                    tracing::warn!(client = %self.reg.client.addr, error = %err, "transaction not started");
                    self.fail_batch(&err).await?;
                    return Ok(true);
                }
            },
        };
        let client_id = self.reg.id;
        // What the connection needs before the client's bytes: its tenant's search_path
        // (with a full reset when it served another tenant, or another client left session
        // state), then the client's own settings where they differ from the connection's.
        let reset = match conn.tenant {
            None => Some((&tenant.prelude_fresh[..], PRELUDE_FRESH_QUERIES)),
            Some(t) if t != self.reg.tenant => {
                shared
                    .pool
                    .stats
                    .search_path_switches
                    .fetch_add(1, Ordering::Relaxed);
                Some(reset_prelude(&shared, tenant, &mut conn))
            }
            Some(_) if conn.dirty && conn.last_client != client_id => {
                Some(reset_prelude(&shared, tenant, &mut conn))
            }
            Some(_) => None,
        };
        let (tenant_prelude, mut swallow) = reset.unwrap_or((&[][..], 0));
        if reset.is_some() {
            // Fresh or reset: the server's defaults, no client settings.
            conn.tenant = Some(self.reg.tenant);
            conn.dirty = false;
            conn.settings = Some(shared.no_settings.clone());
        }
        // The common case (same client settings as last time) is a pointer comparison.
        let mut combined = BytesMut::new();
        let mut prelude = tenant_prelude;
        let same = conn
            .settings
            .as_ref()
            .is_some_and(|b| Arc::ptr_eq(b, &self.settings));
        if !same {
            let sql = self.settings.transition_sql(conn.settings.as_deref());
            if !sql.is_empty() {
                combined.extend_from_slice(tenant_prelude);
                crate::protocol::put_query(&mut combined, &sql);
                swallow += 1;
                prelude = &combined[..];
            }
            conn.settings = Some(self.settings.clone());
        }
        conn.last_client = client_id;
        self.reg
            .client
            .attach(conn.backend_pid, conn.backend_secret);
        self.reg
            .client
            .server_prepared
            .store(conn.work.stmts.len() as u32, Ordering::Relaxed);

        let server: &mut crate::server::ServerConn = &mut conn;
        let crate::server::ServerConn {
            stream: sstream,
            buf: sbuf,
            work,
            ..
        } = server;
        let crate::server::ConnWork {
            stmts,
            to_server: cout,
            to_client: sout,
        } = &mut **work;
        cout.clear();
        sout.clear();
        cout.own(prelude);
        drop(combined);
        let max_statements = shared.config.proxy.max_prepared_statements as usize;
        let track = (max_statements > 0).then(|| {
            Tracker::new(
                &mut self.statements,
                stmts,
                &shared.statements,
                self.reg.tenant,
                max_statements,
            )
        });
        let mut relay = Relay {
            client: &mut self.stream,
            cbuf: &mut self.buf,
            cfwd: &mut self.cfwd,
            cscan: &mut self.cscan,
            server: sstream,
            sbuf,
            sscan: ServerScan::new(swallow),
            cout,
            cpos: 0,
            sout,
            track,
            idle_in_transaction: shared.config.limits.idle_transaction_timeout.nonzero(),
            idle_timer: None,
            counts: relay::Counts::new(tmetrics),
        };
        stats.active.fetch_add(1, Ordering::Relaxed);
        self.reg.client.state.store(STATE_ACTIVE, Ordering::Relaxed);
        let end = relay.run().await;
        stats.active.fetch_sub(1, Ordering::Relaxed);
        self.reg.client.state.store(STATE_IDLE, Ordering::Relaxed);
        relay.counts.flush(stats);
        let session_changed = relay.sscan.session_changed;
        let server_fatal = relay.sscan.fatal.take();
        let reported = std::mem::take(&mut relay.sscan.reported);
        let reset_seen = relay.sscan.reset_seen;
        let sql_prepared = relay.sscan.sql_prepared;
        let mid_message = relay.sscan.mid_message() || !relay.sout.is_empty();
        let unsent = !relay.cout.is_empty();
        let status = relay.sscan.status;
        // The statement tracker must have heard every reply; if not (the server went away,
        // or replies and requests disagreed), undo what the missing replies would have
        // undone and stop trusting the connection's statement set.
        let statements_known = match relay.track.as_mut() {
            Some(t) if t.expecting() > 0 || t.desync => {
                t.abandon();
                false
            }
            _ => true,
        };
        drop(relay);
        conn.sql_prepared |= sql_prepared;
        self.reg
            .client
            .prepared
            .store(self.statements.len() as u32, Ordering::Relaxed);
        self.reg.client.detach();
        if reset_seen || !reported.is_empty() {
            self.follow_settings(reset_seen, reported);
            // After a RESET the connection no longer has the client's startup values.
            conn.settings = (!reset_seen).then(|| self.settings.clone());
        }

        if !statements_known && end == RelayEnd::Released {
            tracing::warn!(client = %self.reg.client.addr, "prepared statement replies out of step; server connection closed");
        }
        match end {
            RelayEnd::Released => {
                conn.dirty |= session_changed || session_mode;
                conn.set_clean(statements_known);
                if session_mode && statements_known {
                    // The connection stays with the client; transactions are still
                    // delimited so that settings can be put right between them.
                    self.held = Some(Box::new(conn));
                }
                Ok(true)
            }
            RelayEnd::ClientGone => {
                let idle = status == b'I'
                    && self.cscan.pending == 0
                    && !self.cscan.unsynced
                    && self.cscan.body_left == 0
                    && self.cfwd == 0
                    && !unsent
                    && !mid_message;
                conn.dirty |= session_changed || session_mode;
                conn.set_clean(idle && statements_known);
                Ok(false)
            }
            RelayEnd::ServerLost(why) => {
                drop(conn);
                let err = match server_fatal {
                    Some((code, msg)) if code.len() == 5 => PgError::server_ended(&code, &msg),
                    _ => PgError::server_lost(&why),
                };
                tracing::warn!(client = %self.reg.client.addr, error = %err, "server connection lost");
                if mid_message {
                    // Part of a message already reached the client: the stream cannot be
                    // repaired, so the client connection ends.
                    return Err(PgError::fatal("08006", err.message));
                }
                if self.cscan.pending > 0 || self.cscan.unsynced {
                    self.fail_batch(&err).await?;
                } else if status != b'I' {
                    // The client believes it is inside a transaction that is gone: its
                    // next batch gets the error.
                    self.lost = Some(Box::new(err));
                }
                Ok(true)
            }
            RelayEnd::Violation(e) => Err(e),
            RelayEnd::IdleInTransaction => {
                // Roll the server connection back so it can serve others, then end the client.
                if rollback(&mut conn).await {
                    conn.dirty |= session_changed || session_mode;
                    conn.set_clean(true);
                }
                drop(conn);
                Err(PgError::idle_in_transaction_timeout())
            }
        }
    }

    /// Session mode: the connection kept from the last transaction, if it is still alive.
    fn take_held(&mut self) -> Option<PooledConn> {
        let mut conn = *self.held.take()?;
        if conn.is_broken_idle() {
            conn.set_clean(false);
            return None;
        }
        Some(conn)
    }

    /// Takes a server connection from the pool, counting the wait.
    async fn checkout(&mut self, shared: &Arc<Shared>) -> Result<PooledConn, CheckoutError> {
        let tenant = shared.tenants.get(self.reg.tenant);
        let stats = &tenant.stats;
        stats.waiting.fetch_add(1, Ordering::Relaxed);
        self.reg
            .client
            .state
            .store(STATE_WAITING, Ordering::Relaxed);
        let wait_start = Instant::now();
        let wait = shared.config.limits.query_wait_timeout.0;
        let checkout = shared.pool.checkout(self.reg.tenant, wait).await;
        let waited = wait_start.elapsed();
        stats.waiting.fetch_sub(1, Ordering::Relaxed);
        stats
            .wait_us
            .fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
        shared.metrics.tenants[self.reg.tenant as usize]
            .wait_duration
            .record(waited.as_secs_f64());
        self.reg.client.state.store(STATE_IDLE, Ordering::Relaxed);
        checkout
    }

    /// Follows the client's own SET (reported by the server) and RESET: after a RESET the
    /// client is back to its startup settings, then what it SET since applies on top.
    fn follow_settings(&mut self, reset: bool, reported: Vec<(String, String)>) {
        let base = if reset {
            self.reg.settings.clone()
        } else {
            self.settings.clone()
        };
        self.settings = if reported.is_empty() {
            base
        } else {
            let mut list = base.list.clone();
            for (name, value) in reported {
                match list.iter_mut().find(|(n, _)| *n == name) {
                    Some(e) => e.1 = value,
                    None => list.push((name, value)),
                }
            }
            list.sort();
            Arc::new(params::Settings::new(list))
        };
    }

    /// Answers every batch the client has sent (and that will not reach a server) with
    /// `err` then ReadyForQuery, as PostgreSQL answers a failed batch; an open
    /// extended-protocol batch gets the error now and its ReadyForQuery at its Sync.
    async fn fail_batch(&mut self, err: &PgError) -> Result<(), PgError> {
        let mut out = BytesMut::with_capacity(256);
        for _ in 0..self.cscan.pending {
            err.encode(&mut out);
            put_ready_for_query(&mut out, b'I');
        }
        if self.cscan.unsynced {
            err.encode(&mut out);
            self.skip_until_sync = true;
        }
        // Drop what was scanned; the rest of a partial message is dropped as it arrives.
        self.buf.advance(self.cfwd);
        self.cfwd = 0;
        self.discard_left = self.cscan.body_left;
        let terminated = self.cscan.terminated;
        self.cscan = ClientScan {
            terminated,
            ..Default::default()
        };
        if !out.is_empty() {
            self.write_client(&out).await?;
        }
        if self.skip_until_sync {
            // Messages already in the buffer may complete the batch.
            let n = self.absorb_input()?;
            if n > 0 {
                self.send_ready(n).await?;
            }
        }
        Ok(())
    }
}
