//! One transaction of a client: get a server connection, put it right for the client
//! (the reset [`SessionState::begin`] decides, then the client's settings), relay the
//! bytes, and give the verdict on the connection when the relay ends.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::{Buf, BytesMut};
use tokio::io::AsyncReadExt;

use crate::Shared;
use crate::config::{PoolMode, ResetPathAndRole};
use crate::error::PgError;
use crate::pool::{CheckoutError, PooledConn};
use crate::registry::{STATE_ACTIVE, STATE_IDLE, STATE_WAITING};
use crate::server::{Backend, ConnWork};
use crate::session_state::{Policy, Reset};
use crate::sniff::{COMMITS, NAMED_PARSE, STATEMENTS};

use super::Session;
use super::relay::{self, Relay, RelayEnd, ServerScan};
use crate::prepared::Tracker;

/// How the proxy is configured to reset connections.
pub(super) fn policy(shared: &Shared) -> Policy {
    let proxy = &shared.config.proxy;
    let session_mode = proxy.pool_mode == PoolMode::Session;
    Policy {
        session_mode,
        always: proxy.reset_path_and_role == ResetPathAndRole::Always,
        // Session mode: the client owns the connection and its statement names pass
        // through untouched; the proxy tracks none.
        tracking: proxy.max_prepared_statements > 0 && !session_mode,
    }
}

/// Decides what `conn` needs before a transaction of `client` of `tenant` and queues it
/// (the reset, then the client's settings where the connection's differ) ahead of the
/// client's bytes. Returns how many ReadyForQuery replies the queued messages bring.
pub(super) fn prepare(
    shared: &Shared,
    conn: &mut PooledConn,
    t: &crate::tenant::Tenant,
    client: u64,
    settings: &Arc<crate::settings::Settings>,
) -> u8 {
    let tenant = t.id;
    let (pool, conn) = conn.with_pool();
    let Backend {
        state,
        work,
        backend_pid,
        ..
    } = &mut **conn;
    let ConnWork {
        stmts,
        to_server: cout,
        to_client: sout,
    } = &mut **work;
    let reset = state.begin(
        tenant,
        t.generation(),
        client,
        policy(shared),
        !stmts.is_empty(),
    );
    // LISTEN/NOTIFY is served on the default place only (see `answer_listen`); a backend
    // of another server, whose pid may equal one of the default's, never fences there.
    let fence = if pool.place == crate::placement::DEFAULT_PLACE {
        shared.notify.fence(*backend_pid, tenant)
    } else {
        None
    };
    if reset == Reset::Switch {
        pool.stats
            .search_path_switches
            .fetch_add(1, Ordering::Relaxed);
    }
    if reset.drops_statements() {
        stmts.clear();
    }
    if reset.clears_settings() {
        state.settings = Some(shared.no_settings.clone());
    }
    let (prelude, mut replies) = t.prelude(reset);
    cout.clear();
    sout.clear();
    cout.own(&prelude);
    // The common case (same client settings as last time) is a pointer comparison.
    let same = state
        .settings
        .as_ref()
        .is_some_and(|s| Arc::ptr_eq(s, settings));
    if !same {
        let mut added = false;
        let from = state.settings.take();
        cout.own_with(|b| added = settings.put_transition(from.as_deref(), b));
        replies += u8::from(added);
        state.settings = Some(settings.clone());
    }
    if let Some(payload) = fence {
        // LISTEN/NOTIFY: the connection announces its tenant in the notification queue
        // before its first transaction for it (see crate::listen).
        cout.own_with(|b| {
            crate::protocol::put_statement(
                b,
                "SELECT pg_catalog.pg_notify($1, $2)",
                &[Some(crate::listen::FENCE_CHANNEL), Some(&payload)],
            )
        });
        replies += 1;
    }
    replies
}

/// Rolls back an idle-in-transaction server connection; true when it is idle again.
async fn rollback(conn: &mut PooledConn) -> bool {
    let mut out = BytesMut::with_capacity(16);
    crate::protocol::put_query(&mut out, "ROLLBACK");
    conn.run_queries(&out, 1).await.is_ok() && conn.buf.is_empty()
}

/// The end of the first batch in `batch` (whole messages): just past its first Sync, Query
/// or FunctionCall, the messages that each bring a ReadyForQuery.
fn first_batch_end(batch: &[u8]) -> Option<usize> {
    let mut pos = 0;
    while pos < batch.len() {
        let (tag, Ok(len)) = crate::protocol::header(&batch[pos..])? else {
            return None;
        };
        pos += len;
        if pos > batch.len() {
            return None;
        }
        if matches!(tag, b'S' | b'Q' | b'F') {
            return Some(pos);
        }
    }
    None
}

impl Session {
    /// Runs one transaction (session mode: on the connection kept from the last one).
    /// Returns whether the client is still there.
    pub(super) async fn transaction(&mut self) -> Result<bool, PgError> {
        if let Some(err) = self.rare.as_mut().and_then(|r| r.lost.take()) {
            self.fail_batch(&err).await?;
            return Ok(true);
        }
        let shared = self.reg.shared.clone();
        if self.answer_without_server(&shared).await? || self.answer_listen(&shared).await? {
            return Ok(true);
        }
        // The tenant, its metrics and the limits in force, each loaded once (a load costs
        // more than the reads).
        let tenant = shared.tenants.get(self.reg.tenant);
        let tmetrics = &shared.metrics.tenants[self.reg.tenant as usize];
        let (query_wait, idle_in_transaction, message_timeout) = {
            let config = shared.live.config();
            (
                config.limits.query_wait_timeout.0,
                config.limits.idle_transaction_timeout.nonzero(),
                config.limits.message_timeout.nonzero(),
            )
        };
        let stats = &tenant.stats;
        let session_mode = shared.config.proxy.pool_mode == PoolMode::Session;
        let mut conn = match self.take_held()? {
            Some(conn) => conn,
            // Checkouts are cancel-safe: one still queued when shutdown_timeout runs out
            // gives its place back.
            // The checkout first: one that gets a connection at once never registers with
            // the shutdown notification (a lock per transaction).
            None => match tokio::select! {
                biased;
                r = self.checkout(&shared, tenant, tmetrics, query_wait) => r?,
                () = shared.shutdown_timed_out() => return Err(PgError::shutdown_timeout()),
            } {
                Ok(Some(c)) => c,
                // The client went away while queued: nothing of its batch ran.
                Ok(None) => return Ok(false),
                // The pool closed at the end of shutdown_timeout failed it.
                Err(_) if shared.aborting.load(Ordering::Acquire) => {
                    return Err(PgError::shutdown_timeout());
                }
                Err(e) => {
                    let err = match e {
                        CheckoutError::Timeout => {
                            stats.wait_timeouts.fetch_add(1, Ordering::Relaxed);
                            PgError::query_wait_timeout(
                                &tenant.name,
                                shared
                                    .pools
                                    .wait_reason(&shared.tenants, self.reg.tenant)
                                    .as_deref(),
                            )
                        }
                        CheckoutError::Unavailable(msg) => PgError::server_unavailable(&msg, false),
                    };
                    tracing::warn!(client = %self.reg.client.addr, error = %err, "transaction not started");
                    self.fail_batch(&err).await?;
                    return Ok(true);
                }
            },
        };
        let swallow = prepare(&shared, &mut conn, tenant, self.reg.id, &self.settings);
        self.reg
            .client
            .attach(conn.backend_pid, conn.backend_secret);
        self.reg
            .client
            .server_conn
            .store(conn.id, Ordering::Relaxed);
        self.reg
            .client
            .server_place
            .store(conn.pool().place, Ordering::Relaxed);
        self.reg
            .client
            .server_prepared
            .store(conn.work.stmts.len() as u32, Ordering::Relaxed);

        let sql_statements = conn.state.untracked();
        let server: &mut Backend = &mut conn;
        let Backend {
            stream: sstream,
            buf: sbuf,
            work,
            ..
        } = server;
        let ConnWork {
            stmts,
            to_server: cout,
            to_client: sout,
        } = &mut **work;
        let max_statements = if session_mode {
            0
        } else {
            shared.config.proxy.max_prepared_statements as usize
        };
        let track = (max_statements > 0).then(|| {
            Tracker::new(
                &mut self.statements,
                stmts,
                &shared.statements,
                self.reg.tenant,
                max_statements,
            )
            .with_sql_statements(sql_statements)
        });
        let mut relay = Relay {
            client: &mut self.stream,
            cbuf: &mut self.buf,
            cfwd: &mut self.cfwd,
            cscan: &mut self.cscan,
            server: sstream,
            sbuf,
            sscan: ServerScan::new(swallow).with_startup(
                (!self.reg.settings.list.is_empty()).then(|| self.reg.settings.clone()),
            ),
            cout,
            cpos: 0,
            sout,
            track,
            idle_in_transaction,
            message_timeout,
            timer: None,
            counts: relay::Counts::new(tmetrics),
        };
        stats.active.fetch_add(1, Ordering::Relaxed);
        self.reg.client.state.store(STATE_ACTIVE, Ordering::Relaxed);
        let end = tokio::select! {
            biased;
            end = relay.run() => end,
            () = self.reg.client.until(&shared.aborting) => RelayEnd::ShutdownTimeout,
        };
        stats.active.fetch_sub(1, Ordering::Relaxed);
        self.reg.client.state.store(STATE_IDLE, Ordering::Relaxed);
        relay.counts.flush(stats);
        let server_fatal = relay.sscan.fatal.take();
        let server_fatal_bytes = relay.sscan.fatal_bytes.take();
        let reported = std::mem::take(&mut relay.sscan.reported);
        let reset_seen = relay.sscan.reset_seen;
        let unlisten_seen = relay.sscan.unlisten_seen;
        let reset_names = std::mem::take(&mut relay.sscan.reset_names);
        let mid_message = relay.sscan.mid_message() || !relay.sout.is_empty();
        let owes_nothing = relay.owes_nothing();
        let status = relay.sscan.status;
        let sent = relay.counts.bytes_in > 0;
        let mut touched = relay.sscan.touched;
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
        touched |= relay.track.as_ref().map_or(0, |t| t.touched);
        drop(relay);
        touched |= std::mem::take(&mut self.cscan.touched);
        if max_statements == 0 && !session_mode && touched & NAMED_PARSE != 0 {
            // An untracked named statement whose text may change state can run again later.
            touched |= STATEMENTS;
        }
        self.reg
            .client
            .prepared
            .store(self.statements.len() as u32, Ordering::Relaxed);
        self.reg.client.detach();
        if unlisten_seen && self.inbox().is_some() && !session_mode {
            // An UNLISTEN in a longer query string (a pool's reset), or DISCARD ALL: the
            // client listens on nothing any more.
            shared.notify.forget(self.reg.id);
        }
        if reset_seen || !reported.is_empty() {
            self.follow_settings(reset_names, reported);
            // After a RESET the connection no longer has the client's startup values.
            conn.state.settings = (!reset_seen).then(|| self.settings.clone());
        }

        if self.cscan.body_left > 0 {
            // The server has part of a message: the connection is not reused, and its
            // close must not send a Terminate (see Backend::mid_message).
            conn.mid_message = true;
        }
        if !statements_known && end == RelayEnd::Released {
            tracing::warn!(client = %self.reg.client.addr, "prepared statement replies out of step; server connection closed");
        }
        match end {
            RelayEnd::Released => {
                conn.state.end(touched, session_mode);
                conn.set_clean(statements_known);
                if session_mode && statements_known {
                    // The connection stays with the client; transactions are still
                    // delimited so that settings can be put right between them.
                    self.rare().held = Some(conn);
                }
                Ok(true)
            }
            RelayEnd::ClientGone => {
                let idle = status == b'I'
                    && self.cscan.pending == 0
                    && !self.cscan.unsynced
                    && self.cscan.body_left == 0
                    && self.cfwd == 0
                    && owes_nothing
                    && !mid_message;
                conn.state.end(touched, session_mode);
                conn.set_clean(idle && statements_known);
                Ok(false)
            }
            RelayEnd::ServerLost(why) => {
                drop(conn);
                if session_mode && let Some(bytes) = server_fatal_bytes {
                    // The client's own backend ended: it gets PostgreSQL's own FATAL, as
                    // PostgreSQL sent it, and its session ends with it.
                    tracing::info!(client = %self.reg.client.addr, "session mode: the server backend ended");
                    let _ = self.write_client(&bytes).await;
                    return Ok(false);
                }
                let err = match server_fatal {
                    Some((code, msg)) if code.len() == 5 => PgError::server_ended(&code, &msg),
                    _ => PgError::server_lost(&why),
                };
                // A request of the client reached the server and is unanswered. Run outside
                // a transaction block (the last ReadyForQuery said idle), or a COMMIT, it
                // may have committed: the client cannot be told either way, so it is closed.
                let in_flight = sent && (self.cscan.pending > 0 || self.cscan.unsynced);
                let may_commit = status == b'I' || (status == b'T' && touched & COMMITS != 0);
                if in_flight && may_commit {
                    let err = PgError::transaction_resolution_unknown(&err.message);
                    tracing::warn!(client = %self.reg.client.addr, error = %err, "server connection lost");
                    return Err(err);
                }
                tracing::warn!(client = %self.reg.client.addr, error = %err, "server connection lost");
                if session_mode {
                    // The client's session is gone with its backend: it is told so (with
                    // PostgreSQL's own error when there is one) and closed.
                    return Err(PgError { fatal: true, ..err });
                }
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
                    self.rare().lost = Some(err);
                }
                Ok(true)
            }
            RelayEnd::Violation(e) => Err(e),
            RelayEnd::Stalled => {
                tracing::warn!(client = %self.reg.client.addr, "client stalled in the middle of a message; disconnected");
                Err(PgError::message_timeout())
            }
            RelayEnd::ShutdownTimeout => {
                // The server connection is closed (its transaction rolls back with it).
                drop(conn);
                Err(PgError::shutdown_timeout())
            }
            RelayEnd::IdleInTransaction => {
                // Roll the server connection back so it can serve others, then end the client.
                if owes_nothing && rollback(&mut conn).await {
                    conn.state.end(touched, session_mode);
                    conn.set_clean(true);
                }
                drop(conn);
                Err(PgError::idle_in_transaction_timeout())
            }
        }
    }

    /// A batch of only named Parses of statements the tenant already has, Closes and a
    /// Sync (libpq's `PQprepare`) is answered without a server connection. Returns whether
    /// it was.
    async fn answer_without_server(&mut self, shared: &Arc<Shared>) -> Result<bool, PgError> {
        if self.has_held()
            || shared.config.proxy.pool_mode == PoolMode::Session
            // Only a named Parse or a Close can start a batch answered without a server.
            || !match self.buf.first() {
                Some(b'P') => self.buf.get(5).is_some_and(|&b| b != 0),
                Some(b'C') => true,
                _ => false,
            }
            || shared.config.proxy.max_prepared_statements == 0
            || self.cscan.pending == 0
            || self.cscan.unsynced
            || self.cscan.body_left != 0
        {
            return Ok(false);
        }
        // Several batches at once (a driver's Close of a statement it dropped, sent ahead of
        // its next query): the first one alone may be answerable; the rest is then the next
        // transaction's (a LISTEN there is answered too).
        let whole = self.cscan.pending == 1;
        let end = if whole {
            self.cfwd
        } else {
            match first_batch_end(&self.buf[..self.cfwd]) {
                Some(end) => end,
                None => return Ok(false),
            }
        };
        let Some(reply) = crate::prepared::answer_alone(
            &mut self.statements,
            &shared.statements,
            self.reg.tenant,
            &self.buf[..end],
        ) else {
            return Ok(false);
        };
        self.buf.advance(end);
        self.cfwd -= end;
        self.cscan.pending -= 1;
        if whole {
            // Nothing ran: what the texts may touch is on their statements.
            self.cscan.touched = 0;
        }
        // Else what the rest may touch is kept, with what this batch's added (more than it
        // needs, never less).
        self.reg
            .client
            .prepared
            .store(self.statements.len() as u32, Ordering::Relaxed);
        self.write_client(&reply).await?;
        Ok(true)
    }

    /// Transaction mode: a LISTEN, UNLISTEN or `UNLISTEN *` sent alone is the proxy's (see
    /// crate::listen): answered without a server connection. Returns whether it was.
    async fn answer_listen(&mut self, shared: &Arc<Shared>) -> Result<bool, PgError> {
        if self.has_held()
            || shared.config.proxy.pool_mode == PoolMode::Session
            // A query text starting with L or U (LISTEN, UNLISTEN): one look at a byte.
            || !match self.buf.first() {
                Some(b'Q') => self.buf.get(5),
                Some(b'P') if self.buf.get(5) == Some(&0) => self.buf.get(6),
                _ => None,
            }
            .is_some_and(|&b| matches!(b | 0x20, b'l' | b'u'))
            || self.cscan.pending != 1
            || self.cscan.unsynced
            || self.cscan.body_left != 0
        {
            return Ok(false);
        }
        let Some((cmd, reply)) = crate::listen::answer(&self.buf[..self.cfwd]) else {
            return Ok(false);
        };
        self.buf.advance(self.cfwd);
        self.cfwd = 0;
        self.cscan.pending = 0;
        self.cscan.touched = 0;
        // One listener connection, to [server]'s database: a tenant living elsewhere would
        // never hear its notifications there. (UNLISTEN is served: a tenant moved away
        // drops what it listened on before.)
        if matches!(cmd, crate::listen::Command::Listen(_))
            && shared.tenants.get(self.reg.tenant).place() != crate::placement::DEFAULT_PLACE
        {
            let mut out = PgError::error(
                "0A000",
                "LISTEN in transaction mode is served only for tenants in [server]'s own database (this tenant lives on another server or database)",
            )
            .to_bytes();
            out.extend_from_slice(b"Z\0\0\0\x05I");
            self.write_client(&out).await?;
            return Ok(true);
        }
        let client = self.reg.client.clone();
        let inbox = self
            .rare()
            .inbox
            .get_or_insert_with(|| Arc::new(crate::listen::Inbox::new(client)))
            .clone();
        shared
            .notify
            .run(
                shared.pools.default(),
                shared.shutdown_tx.subscribe(),
                self.reg.tenant,
                self.reg.id,
                &inbox,
                &cmd,
            )
            .await;
        self.write_client(&reply).await?;
        Ok(true)
    }

    /// Session mode: the connection kept from the last transaction, if it is still alive.
    /// The client's session ends with it if it died while the client was idle: FATAL,
    /// with PostgreSQL's own error when it sent one (the contract's session-mode row).
    fn take_held(&mut self) -> Result<Option<PooledConn>, PgError> {
        let Some(mut conn) = self.rare.as_mut().and_then(|r| r.held.take()) else {
            return Ok(None);
        };
        if !conn.is_broken_idle() {
            return Ok(Some(conn));
        }
        conn.set_clean(false);
        let why = crate::protocol::first_error(&conn.buf);
        Err(match why {
            Some((code, message)) if code.len() == 5 => PgError {
                fatal: true,
                code: code.into(),
                message,
            },
            _ => PgError::fatal("08006", "server closed the connection unexpectedly"),
        })
    }

    /// Takes a server connection from the pool, counting the wait. `None` when the client
    /// closed its socket meanwhile: it leaves the queue (as in PgBouncer) instead of taking a
    /// connection only to find nobody there (which closes the connection when the client left
    /// a batch open, so every such client also cost a new server login).
    /// A protocol violation in what it sent meanwhile is the outer error.
    async fn checkout(
        &mut self,
        shared: &Arc<Shared>,
        tenant: &crate::tenant::Tenant,
        tmetrics: &crate::metrics::TenantMetrics,
        wait: std::time::Duration,
    ) -> Result<Result<Option<PooledConn>, CheckoutError>, PgError> {
        let stats = &tenant.stats;
        stats.waiting.fetch_add(1, Ordering::Relaxed);
        self.reg
            .client
            .state
            .store(STATE_WAITING, Ordering::Relaxed);
        let mut left = wait;
        // Read only when a checkout has to wait: most find a connection at once, and those
        // read no clock (their wait is 0).
        let mut wait_start: Option<Instant> = None;
        let checkout = loop {
            // The place the tenant lives in now: a reload may move it while it waits.
            let pool = shared.pools.of(tenant);
            let mut checkout = std::pin::pin!(pool.checkout(self.reg.tenant, left));
            let first =
                std::future::poll_fn(|cx| std::task::Poll::Ready(checkout.as_mut().poll(cx))).await;
            let got = match first {
                std::task::Poll::Ready(c) => Ok(c.map(Some)),
                std::task::Poll::Pending => {
                    wait_start.get_or_insert_with(Instant::now);
                    loop {
                        // Meanwhile the client's further bytes are read (and scanned) as the
                        // relay would, up to a bound, so that its closing is seen behind them.
                        let room = self.buf.len() < QUEUED_READ_MAX && !self.cscan.terminated;
                        if room && self.buf.capacity() - self.buf.len() < 1024 {
                            self.buf.reserve(relay::CLIENT_BUF);
                        }
                        if !room {
                            tokio::select! {
                                biased;
                                c = &mut checkout => break Ok(c.map(Some)),
                                () = closed(&self.stream) => break Ok(Ok(None)),
                            }
                        }
                        // The checkout first: then the client's socket is not touched.
                        tokio::select! {
                            biased;
                            c = &mut checkout => break Ok(c.map(Some)),
                            r = self.stream.read_buf(&mut self.buf) => match r {
                                Ok(0) | Err(_) => break Ok(Ok(None)),
                                Ok(_) => match self.cscan.scan(&self.buf, self.cfwd) {
                                    Ok(end) => self.cfwd = end,
                                    Err(e) => break Err(e),
                                },
                            },
                        }
                    }
                }
            };
            match got {
                // Moved while it waited: the old place's connection goes back unused (it
                // never saw this client) and the wait goes on in the new place.
                Ok(Ok(Some(mut conn))) if conn.pool().place != tenant.place() => {
                    conn.set_clean(true);
                    drop(conn);
                    let start = *wait_start.get_or_insert_with(Instant::now);
                    left = wait.saturating_sub(start.elapsed());
                }
                got => break got,
            }
        };
        let waited = wait_start.map(|s| s.elapsed()).unwrap_or_default();
        stats.waiting.fetch_sub(1, Ordering::Relaxed);
        if !waited.is_zero() {
            stats
                .wait_us
                .fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
        }
        tmetrics.wait_duration.record(waited.as_secs_f64());
        self.reg.client.state.store(STATE_IDLE, Ordering::Relaxed);
        checkout
    }

    /// Follows the client's own SET (reported by the server) and RESET: a parameter a RESET
    /// sent back to its default goes back to the client's startup value (or is dropped when
    /// it had none), as PostgreSQL's RESET does; the others keep what the client SET.
    fn follow_settings(&mut self, reset: Vec<String>, reported: Vec<(String, String)>) {
        if reset.is_empty() && reported.is_empty() {
            return;
        }
        let startup = &self.reg.settings;
        let mut list = self.settings.list.clone();
        for name in reset {
            match startup.get(&name) {
                Some(v) => match list.iter_mut().find(|(n, _)| *n == name) {
                    Some(e) => e.1 = v.to_string(),
                    None => list.push((name, v.to_string())),
                },
                None => list.retain(|(n, _)| *n != name),
            }
        }
        for (name, value) in reported {
            match list.iter_mut().find(|(n, _)| *n == name) {
                Some(e) => e.1 = value,
                None => list.push((name, value)),
            }
        }
        list.sort();
        self.settings = if list == startup.list {
            startup.clone()
        } else {
            Arc::new(crate::settings::Settings::new(list))
        };
    }
}

/// Bytes a queued client's buffer may hold before the proxy stops reading it (and then
/// notices its closing only if nothing more is waiting in the socket).
const QUEUED_READ_MAX: usize = 4 * relay::CLIENT_BUF;

/// Resolves once the client has closed its socket (end of stream or an error); never while
/// it is open, whether or not it sent more (that waits in the socket for the relay).
async fn closed(stream: &crate::tls::Stream) {
    stream.closed().await
}
