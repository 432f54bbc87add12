//! The client side: one task per client connection, from startup to goodbye.
//!
//! After [`startup`] admits a client, its [`Session`] waits, holding no read buffer, until
//! the client sends something. Then it takes a server connection from the pool for the
//! transaction (transaction mode) or keeps it between transactions (session mode), and the [`relay`] moves the
//! bytes until the transaction ends. Failures that leave the client usable (no server
//! connection in time, a server connection lost) are answered here the way PostgreSQL
//! would answer them: an ErrorResponse, then ReadyForQuery for each batch the client sent.

pub mod auth;
mod login;
pub mod params;
pub mod relay;
pub mod startup;
mod transaction;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Shared;
use crate::error::PgError;
use crate::prepared::ClientStatements;
use crate::protocol::{header, put_ready_for_query};
use crate::tls::Stream;

use login::Registration;
use relay::{CLIENT_BUF, ClientScan};

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Held by each client's task: shutdown waits until every one is dropped.
pub type Alive = tokio::sync::mpsc::Sender<()>;

/// Serves one client connection to its end; `alive` is dropped when it ends.
///
/// Written as a plain function returning a future so that the task's state is just the
/// (boxed) login and then the session: an idle client's task stays a few hundred bytes
/// (small enough for tokio's 384-byte task cell; see docs/performance.md).
pub fn serve(
    stream: Stream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    alive: Alive,
) -> impl Future<Output = ()> + Send {
    let admit = Box::pin(login::admit_client(stream, peer, shared, alive));
    async move {
        let Some(mut session) = admit.await else {
            return;
        };
        let reason = session.serve_transactions().await;
        session.end(reason);
    }
}

/// Read buffers kept per thread between one client's transaction and the next client's:
/// idle clients hold no buffer, and a transaction does not pay an 8 kB malloc and free.
/// A few only (SPARE_BUFS per worker thread): the memory stays bounded.
const SPARE_BUFS: usize = 8;

thread_local! {
    static SPARE: std::cell::RefCell<Vec<BytesMut>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A read buffer: a spare one, else a new one.
fn take_buf() -> BytesMut {
    SPARE
        .with(|s| s.borrow_mut().pop())
        .unwrap_or_else(|| BytesMut::with_capacity(CLIENT_BUF))
}

/// Keeps an empty buffer of the usual size as a spare (others are freed).
fn spare_buf(buf: BytesMut) {
    let cap = buf.capacity();
    if (CLIENT_BUF / 2..=2 * CLIENT_BUF).contains(&cap) {
        SPARE.with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < SPARE_BUFS {
                s.push(buf);
            }
        });
    }
}

/// A logged-in client.
struct Session {
    stream: Stream,
    /// Read buffer; empty and unallocated while the client is idle.
    buf: BytesMut,
    /// Bytes at the front of `buf` scanned and ready for the server.
    cfwd: usize,
    cscan: ClientScan,
    /// A batch failed without reaching a server: drop messages until Sync, then answer it.
    skip_until_sync: bool,
    /// Body bytes of a message to drop as they arrive (a message is under 1 GB: u32 keeps
    /// the session, and every idle client's task, 8 bytes smaller).
    discard_left: u32,
    /// The client's settings now: its startup settings plus what it SET since (followed
    /// through ParameterStatus).
    settings: Arc<crate::settings::Settings>,
    /// The client's named prepared statements (when tracking is on).
    statements: ClientStatements,
    /// What few sessions use, made at first use.
    rare: Option<Box<Rare>>,
    /// Client slots, cancel key, tenant, the shared state, and the handle shutdown waits
    /// for. Last: fields drop in order, so a session-mode connection (in `rare`) is back in
    /// the pool before shutdown may go on.
    reg: Registration,
}

/// The parts of a session that few clients use, boxed so that every idle client's task
/// stays small (see [`serve`]).
#[derive(Default)]
struct Rare {
    /// The server connection died while the client was inside a transaction; the next
    /// batch is answered with this error.
    lost: Option<PgError>,
    /// Session mode: the server connection kept between transactions.
    held: Option<crate::pool::PooledConn>,
    /// Transaction mode: the notifications of the channels it LISTENs on.
    inbox: Option<Arc<crate::listen::Inbox>>,
}

/// What woke an idle session.
enum Wake {
    Data,
    Closed,
    Shutdown,
    IdleTimeout,
    /// Part of a message was read, then nothing for `message_timeout`.
    MidMessage,
    /// The admin console's KILL.
    Killed,
    /// Session mode: the server sent something while the client was idle.
    Server,
    /// Notifications for the client arrived.
    Notified,
}

impl Session {
    /// The session ended, for `reason`.
    fn end(&mut self, reason: &str) {
        if self.inbox().is_some() {
            self.reg.shared.notify.forget(self.reg.id);
        }
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
        // What the client sent with its login is scanned as if just read. (The error is
        // boxed before any await: no error value is held across one in this future.)
        if let Some(fut) = self.absorb_pipelined() {
            let _ = fut.await;
            return "protocol violation";
        }
        loop {
            if !self.first_message_ready() {
                if self.cscan.terminated && self.cfwd == 0 {
                    return "terminated";
                }
                // Between transactions: the notifications of its channels.
                if self.inbox().is_some_and(|i| i.has_pending())
                    && !self.boxed_deliver_notifications().await
                {
                    return "notification backlog";
                }
                match self.wait_for_data().await {
                    Wake::Data => {}
                    Wake::Closed => return "closed",
                    Wake::Shutdown => {
                        let _ = self.boxed_send_error(PgError::shutting_down()).await;
                        return "shutdown";
                    }
                    Wake::Killed => {
                        let _ = self.boxed_send_error(self.killed_error()).await;
                        return "killed";
                    }
                    Wake::IdleTimeout => {
                        let _ = self.boxed_send_error(PgError::client_idle_timeout()).await;
                        return "client_idle_timeout";
                    }
                    Wake::MidMessage => {
                        tracing::warn!(client = %self.reg.client.addr, "client stopped in the middle of a message; disconnected");
                        let _ = self.boxed_send_error(PgError::message_timeout()).await;
                        return "message_timeout";
                    }
                    Wake::Notified => continue,
                    Wake::Server => {
                        if self.boxed_relay_idle_server().await {
                            continue;
                        }
                        return "server closed the connection";
                    }
                }
                // Results are turned into boxed futures before any await, so that no error
                // value is held across an await in this (long-lived) future.
                let (pending, why) = match self.absorb_input() {
                    Ok(0) => continue,
                    Ok(n) => (self.boxed_send_ready(n), "closed"),
                    Err(e) => (self.boxed_send_error(e), "protocol violation"),
                };
                if pending.await.is_err() {
                    return why;
                }
                continue;
            }
            // KILL, or the tenant was removed: the client ends at this transaction
            // boundary, even with its next transaction already sent.
            if self.reg.client.killed.load(Ordering::Acquire) {
                let _ = self.boxed_send_error(self.killed_error()).await;
                return "killed";
            }
            // Boxed: the transaction's state (checkout, relay) is large and only lives
            // while a transaction runs.
            let error = match self.boxed_transaction().await {
                Ok(true) => None,
                Ok(false) => return "closed",
                // The socket failed: nothing can be sent on it.
                Err(e) if e.is_client_io() => {
                    tracing::debug!(client = %self.reg.client.addr, error = %e, "client I/O failed");
                    return "client I/O error";
                }
                Err(e) => Some(self.boxed_send_error(e)),
            };
            if let Some(fut) = error {
                let _ = fut.await;
                return "error";
            }
            drop(error);
            if self.buf.is_empty() {
                // Idle clients hold no buffer: it goes to the thread's spares.
                spare_buf(std::mem::take(&mut self.buf));
            }
        }
    }

    /// The rarely used parts, made if need be.
    fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Default::default)
    }

    fn inbox(&self) -> Option<&Arc<crate::listen::Inbox>> {
        self.rare.as_ref()?.inbox.as_ref()
    }

    /// Session mode: whether a server connection is kept.
    fn has_held(&self) -> bool {
        self.rare.as_ref().is_some_and(|r| r.held.is_some())
    }

    /// Scans what the client sent with its login; a protocol error comes back as the boxed
    /// future that reports it.
    fn absorb_pipelined(&mut self) -> Option<BoxFuture<'_, Result<(), PgError>>> {
        if self.buf.is_empty() {
            return None;
        }
        match self.absorb_input() {
            Ok(_) => None,
            Err(e) => Some(self.boxed_send_error(e)),
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

    /// Why a killed client ends: the console's KILL, or its tenant was removed.
    fn killed_error(&self) -> PgError {
        let t = self.reg.shared.tenants.get(self.reg.tenant);
        if t.is_gone() {
            PgError::fatal(
                "57P01",
                format!("terminating connection: tenant \"{}\" was removed", t.name),
            )
        } else {
            PgError::fatal("57P01", "terminating connection: tenant killed by an admin")
        }
    }

    fn boxed_deliver_notifications(&mut self) -> BoxFuture<'_, bool> {
        Box::pin(self.deliver_notifications())
    }

    /// Sends the client the notifications waiting for it; false (after a FATAL) when its
    /// backlog passed the bound, or when the socket failed.
    async fn deliver_notifications(&mut self) -> bool {
        let Some(inbox) = self.inbox() else {
            return true;
        };
        match inbox.take() {
            Some(bytes) => bytes.is_empty() || self.write_client(&bytes).await.is_ok(),
            None => {
                tracing::warn!(client = %self.reg.client.addr, "notification backlog over its bound; client disconnected");
                let e = PgError::fatal(
                    "53200",
                    format!(
                        "too many notifications waiting for this client (more than {} or {} bytes); it does not read them",
                        crate::listen::MAX_BACKLOG_MESSAGES,
                        crate::listen::MAX_BACKLOG_BYTES
                    ),
                );
                let _ = self.write_client(&e.to_bytes()).await;
                false
            }
        }
    }

    fn boxed_relay_idle_server(&mut self) -> BoxFuture<'_, bool> {
        Box::pin(self.relay_idle_server())
    }

    /// Session mode: relays what the server sent while the client was idle (notifications,
    /// notices, parameter changes) as it arrives, as PostgreSQL would. When the backend
    /// ends (its FATAL, or the socket closing) the client gets PostgreSQL's own FATAL, as it
    /// came, and the session ends. Returns whether it goes on.
    async fn relay_idle_server(&mut self) -> bool {
        let Some(held) = self.rare.as_deref_mut().and_then(|r| r.held.as_mut()) else {
            return true;
        };
        let conn: &mut crate::server::Backend = held;
        let mut gone = false;
        loop {
            conn.buf.reserve(4096);
            match conn.stream.try_read_buf(&mut conn.buf) {
                Ok(0) => {
                    gone = true;
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    gone = true;
                    break;
                }
            }
        }
        // Whole messages go to the client; a FATAL ends the session after it.
        let mut end = 0;
        let mut fatal = false;
        while let Some((tag, Ok(len))) = header(&conn.buf[end..]) {
            if conn.buf.len() - end < len {
                break;
            }
            let body = &conn.buf[end + crate::protocol::HEADER_LEN..end + len];
            end += len;
            if tag == b'E' {
                let severity = crate::protocol::error_field(body, b'V')
                    .or_else(|| crate::protocol::error_field(body, b'S'));
                if matches!(severity, Some("FATAL") | Some("PANIC")) {
                    fatal = true;
                    break;
                }
            }
        }
        if matches!(header(&conn.buf[end..]), Some((_, Err(_)))) {
            gone = true;
        }
        let out = conn.buf.split_to(end);
        if fatal || gone {
            held.set_clean(false);
        }
        let mut wrote = self.stream.write_all(&out).await.is_ok();
        if gone && !fatal && wrote {
            let e = PgError::fatal(
                "08006",
                "server closed the connection unexpectedly\n\tThis probably means the server terminated abnormally\n\tbefore or while processing the request.",
            );
            wrote = self.stream.write_all(&e.to_bytes()).await.is_ok();
        }
        if fatal || gone {
            tracing::info!(client = %self.reg.client.addr, "session mode: the server backend ended while the client was idle");
            self.rare().held = None;
            return false;
        }
        wrote
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

    /// Part of a message read (or the rest of a refused one still to be discarded).
    fn mid_message(&self) -> bool {
        !self.buf.is_empty() || self.discard_left > 0
    }

    /// How long wait_for_data waits: client_idle_timeout between messages, message_timeout
    /// in the middle of one.
    fn wait_limit(&self) -> Option<std::time::Duration> {
        let limits = &self.reg.shared.live.config().limits;
        if !self.mid_message() {
            limits.client_idle_timeout.nonzero()
        } else {
            limits.message_timeout.nonzero()
        }
    }

    /// Waits until the client has sent bytes (allocating the read buffer only then). An
    /// idle client's wait holds no buffer and little state: a readiness registration on
    /// its socket and its waker in its registry slot (for shutdown and KILL).
    async fn wait_for_data(&mut self) -> Wake {
        // Between messages the timer is client_idle_timeout; in the middle of one (part of
        // a message read, no server connection yet) it is message_timeout. Either, when
        // on, costs a timer allocation per wait. Shutdown and KILL are heard either way: a
        // client that stops in the middle of a message must not hold them up.
        let mut timer = self.wait_limit().map(|d| Box::pin(tokio::time::sleep(d)));
        // The closure holds the session and the timer only: every idle client's task
        // holds this state.
        let this = &mut *self;
        let wake = std::future::poll_fn(move |cx| {
            let client = &*this.reg.client;
            // The waker first, then the flags (see ClientSlot::set_waker); new
            // notifications wake it there too.
            client.set_waker(cx.waker());
            if this.reg.shared.stopping.load(Ordering::Acquire) {
                return Poll::Ready(Wake::Shutdown);
            }
            if client.killed.load(Ordering::Acquire) {
                return Poll::Ready(Wake::Killed);
            }
            if let Some(t) = timer.as_mut()
                && t.as_mut().poll(cx).is_ready()
            {
                return Poll::Ready(Wake::IdleTimeout);
            }
            // Notifications of the channels it listens on (transaction mode).
            if this.inbox().is_some_and(|i| i.has_pending()) {
                return Poll::Ready(Wake::Notified);
            }
            // Session mode: the server is heard while the client is idle.
            if let Some(conn) = this.rare.as_deref_mut().and_then(|r| r.held.as_mut())
                && conn.stream.poll_read_ready(cx).is_ready()
            {
                return Poll::Ready(Wake::Server);
            }
            match this.stream.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => return Poll::Ready(Wake::Closed),
                Poll::Ready(Ok(())) => {}
            }
            // The read is tried here, inside the checked wait: a readable socket may still
            // give nothing (part of a TLS record, or readiness that was stale), and the
            // wait for the rest must hear KILL, shutdown and the timer too.
            if this.buf.capacity() == 0 {
                this.buf = take_buf();
            }
            this.buf.reserve(CLIENT_BUF);
            // Unlike try_read, read_buf notes a short read as "drained", saving a wasted
            // read syscall later.
            let read = std::pin::pin!(this.stream.read_buf(&mut this.buf)).poll(cx);
            match read {
                Poll::Ready(Ok(0) | Err(_)) => Poll::Ready(Wake::Closed),
                Poll::Ready(Ok(_)) => Poll::Ready(Wake::Data),
                Poll::Pending => {
                    if this.buf.is_empty() {
                        // An idle client holds no buffer.
                        spare_buf(std::mem::take(&mut this.buf));
                    }
                    Poll::Pending
                }
            }
        })
        .await;
        match wake {
            // The wait reads only when it returns Data: bytes in the buffer otherwise are
            // a message's first part.
            Wake::IdleTimeout if self.mid_message() => Wake::MidMessage,
            wake => wake,
        }
    }

    /// Scans newly read bytes, first dropping what belongs to failed batches. Returns how
    /// many ReadyForQuery messages the client is owed for failed batches that ended.
    fn absorb_input(&mut self) -> Result<u32, PgError> {
        let mut ready = 0;
        if self.discard_left > 0 {
            let n = (self.discard_left as usize).min(self.buf.len() - self.cfwd);
            // Discarded bytes are always at the front: nothing is scanned while discarding.
            self.buf.advance(n);
            self.discard_left -= n as u32;
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
            // len is at most MAX_CLIENT_MESSAGE_LEN + 1 (checked above).
            self.discard_left = (len - n) as u32;
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
            .map_err(PgError::client_io)
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
        // What is left of a message the scanner accepted: under MAX_CLIENT_MESSAGE_LEN.
        self.discard_left = u32::try_from(self.cscan.body_left).unwrap_or(u32::MAX);
        self.cscan.forget();
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
