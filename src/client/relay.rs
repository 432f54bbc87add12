//! The hot path: forwarding one transaction between a
//! client socket and a server connection.
//!
//! Bytes move from one socket's read buffer straight to the other socket, never copied or
//! decoded. Two small scanners walk the message headers as they pass: the client side
//! counts the ReadyForQuery messages the client is owed (one per Query, Sync and
//! FunctionCall), the server side counts the ones that arrive and reads their transaction
//! status. When nothing is owed, no extended-protocol batch is open and the server is idle
//! outside a transaction, the connection goes back to the pool.

use std::future::Future;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use tokio::io::AsyncReadExt;

use crate::error::PgError;
use crate::prepared::Tracker;
use crate::protocol::{HEADER_LEN, MAX_CLIENT_MESSAGE_LEN, header, is_frontend_tag};
use crate::sniff::{NAMED_PARSE, PATH, STATE, STATEMENTS, Sniffer, Touched};
use crate::splice::Out;
use crate::tls::Stream;

/// Read buffer size of a client with data in flight.
pub const CLIENT_BUF: usize = 8 * 1024;
/// Replies the statement tracker may expect at once (a few bytes each); a client that
/// pipelines more is not read until the server has answered some.
const MAX_EXPECTED: usize = 4096;
/// Server messages the proxy inspects whole (ReadyForQuery, CommandComplete) are small;
/// a longer one of those types is passed through without being inspected.
const MAX_INSPECTED: usize = 1024;
/// ErrorResponses up to this size are read whole to spot FATAL ones.
const MAX_INSPECTED_ERROR: usize = 16 * 1024;

/// Walks the client's messages: counts what the server will answer, spots Terminate, and
/// sniffs the SQL text of Query and Parse messages for commands that change session state
/// (see [`crate::sniff`]).
#[derive(Debug, Default)]
pub struct ClientScan {
    /// Body bytes of the current message not yet seen.
    pub body_left: usize,
    /// ReadyForQuery messages the client is still owed.
    pub pending: u32,
    /// An extended-protocol batch is open (messages since the last Sync).
    pub unsynced: bool,
    /// The client sent Terminate; nothing after it is read.
    pub terminated: bool,
    /// What the messages scanned so far may change on the server connection.
    pub touched: Touched,
    /// Which text the current message's body is, if it is sniffed.
    sniff: SniffText,
    sniffer: Sniffer,
}

/// The kind of text whose body is passing.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum SniffText {
    #[default]
    None,
    Query,
    /// A Parse whose first body byte (empty name or not) has not been seen.
    Parse,
    NamedParse,
    UnnamedParse,
}

impl ClientScan {
    /// Scans `buf` from `from`, returning how far the bytes may be forwarded: up to the end
    /// of the last whole header seen (bodies may be partial), stopping before Terminate.
    /// A bad tag or length is a protocol violation.
    #[inline]
    pub fn scan(&mut self, buf: &[u8], from: usize) -> Result<usize, PgError> {
        let mut pos = from;
        while pos < buf.len() && !self.terminated {
            if self.body_left > 0 {
                let take = self.body_left.min(buf.len() - pos);
                if self.sniff != SniffText::None {
                    self.sniff_body(&buf[pos..pos + take], take == self.body_left);
                }
                pos += take;
                self.body_left -= take;
                continue;
            }
            let Some((tag, len)) = header(&buf[pos..]) else {
                break;
            };
            let len = match len {
                Ok(l) if l - 1 <= MAX_CLIENT_MESSAGE_LEN => l,
                _ => return Err(PgError::protocol_violation("invalid message length")),
            };
            if !is_frontend_tag(tag) {
                return Err(PgError::protocol_violation(format!(
                    "invalid frontend message type {tag}"
                )));
            }
            match tag {
                b'Q' => {
                    self.pending += 1;
                    self.sniff = SniffText::Query;
                }
                b'F' => {
                    // A function called by its oid (set_config's, say): text unseen.
                    self.pending += 1;
                    self.touched |= PATH | STATE;
                }
                b'S' => {
                    self.pending += 1;
                    self.unsynced = false;
                }
                b'P' => {
                    self.unsynced = true;
                    self.sniff = SniffText::Parse;
                }
                b'B' | b'E' | b'D' | b'C' | b'H' => self.unsynced = true,
                b'X' => {
                    self.terminated = true;
                    break;
                }
                _ => {}
            }
            pos += HEADER_LEN;
            self.body_left = len - HEADER_LEN;
            if self.body_left == 0 {
                self.sniff = SniffText::None;
            } else if self.sniff != SniffText::None {
                self.sniffer = Sniffer::default();
            }
        }
        Ok(pos)
    }

    /// Forgets all but a Terminate seen: what was scanned was dropped, never sent.
    pub fn forget(&mut self) {
        *self = ClientScan {
            terminated: self.terminated,
            ..Default::default()
        };
    }

    /// Sniffs a piece of a Query or Parse body; `last` when it ends the message.
    fn sniff_body(&mut self, piece: &[u8], last: bool) {
        if self.sniff == SniffText::Parse {
            // Decided by the body's first byte only (the scanner never passes an empty piece).
            self.sniff = match piece.first() {
                Some(&b) if b != 0 => SniffText::NamedParse,
                _ => SniffText::UnnamedParse,
            };
        }
        let bits = self.sniffer.feed(piece, last);
        if bits != 0 {
            self.touched |= bits;
            if self.sniff == SniffText::NamedParse {
                self.touched |= NAMED_PARSE;
            }
        }
        if last {
            self.sniff = SniffText::None;
        }
    }
}

/// Walks the server's messages: swallows the replies to injected queries, counts
/// ReadyForQuery and notes commands that change session state. What it passes on (and
/// what the statement [`Tracker`] adds) goes into an [`Out`] for the client.
#[derive(Debug)]
pub struct ServerScan {
    body_left: usize,
    /// The current partial message is being dropped.
    dropping: bool,
    /// The tag of the current partial message, when the tracker must hear of its end.
    streamed: Option<u8>,
    /// ReadyForQuery messages of injected queries still to swallow.
    pub swallow: u8,
    /// An injected query failed.
    pub swallow_error: bool,
    /// Transaction status from the last ReadyForQuery.
    pub status: u8,
    /// The server sent CopyInResponse and waits for the client's COPY data.
    pub copy_in: bool,
    /// What the commands that went through (seen by their CommandComplete tags) may have
    /// changed on the connection.
    pub touched: Touched,
    /// Tracked parameters the server reported changed (a client's SET), lowercase names.
    pub reported: Vec<(String, String)>,
    /// A RESET went through: the client's settings go back to its startup values.
    pub reset_seen: bool,
    /// An UNLISTEN (or DISCARD ALL) the proxy did not answer went through.
    pub unlisten_seen: bool,
    /// Tracked parameters a RESET sent back to their defaults (lowercase names): the
    /// client's go back to its startup values for these only.
    pub reset_names: Vec<String>,
    /// The client's startup settings, when it has any: a parameter a RESET reports is
    /// reported to the client with its startup value, as PostgreSQL reports it.
    pub startup: Option<std::sync::Arc<crate::settings::Settings>>,
    /// A RESET ran in the current query: its ParameterStatus reports are ignored.
    reset_in_cycle: bool,
    /// The server sent a FATAL error (SQLSTATE, message) and is about to close; it is
    /// held back, not forwarded, so the client can be told in a way that keeps it usable.
    pub fatal: Option<(String, String)>,
    /// That FATAL ErrorResponse as PostgreSQL sent it (session mode passes it on as it is).
    pub fatal_bytes: Option<Vec<u8>>,
}

impl Default for ServerScan {
    fn default() -> ServerScan {
        ServerScan::new(0)
    }
}

impl ServerScan {
    /// A scanner that first swallows the replies of `swallow` injected queries.
    pub fn new(swallow: u8) -> ServerScan {
        ServerScan {
            body_left: 0,
            dropping: false,
            streamed: None,
            swallow,
            swallow_error: false,
            status: b'I',
            copy_in: false,
            touched: 0,
            reported: Vec::new(),
            reset_seen: false,
            unlisten_seen: false,
            reset_names: Vec::new(),
            startup: None,
            reset_in_cycle: false,
            fatal: None,
            fatal_bytes: None,
        }
    }

    /// Follows a ParameterStatus the client's own commands caused.
    fn note_parameter(&mut self, body: &[u8]) {
        let mut parts = body.split(|&b| b == 0);
        let (Some(name), Some(value)) = (parts.next(), parts.next()) else {
            return;
        };
        let name = String::from_utf8_lossy(name).to_ascii_lowercase();
        if !crate::client::params::TRACKED_REPORTS.contains(&name.as_str()) {
            return;
        }
        if self.reset_in_cycle {
            // A RESET sent it back to the server's default: the client's goes back to its
            // startup value (see `startup_value`).
            self.reported.retain(|(n, _)| *n != name);
            if !self.reset_names.contains(&name) {
                self.reset_names.push(name);
            }
            return;
        }
        self.reset_names.retain(|n| *n != name);
        let value = String::from_utf8_lossy(value).into_owned();
        match self.reported.iter_mut().find(|(n, _)| *n == name) {
            Some(e) => e.1 = value,
            None => self.reported.push((name, value)),
        }
    }

    /// The client's startup settings (see `startup`).
    pub fn with_startup(
        mut self,
        startup: Option<std::sync::Arc<crate::settings::Settings>>,
    ) -> ServerScan {
        self.startup = startup;
        self
    }

    /// In a RESET's cycle: the client's startup value of the reported parameter `body`
    /// names, as PostgreSQL reported it at login, if the client had one (PostgreSQL's RESET
    /// goes back to the session's startup value; the proxy's server connection goes back
    /// to the server's default, and the client's value is set again before its next
    /// message).
    fn startup_value<'s>(&'s self, body: &'s [u8]) -> Option<(&'s str, &'s str)> {
        let startup = self.startup.as_deref()?;
        let name = std::str::from_utf8(body.split(|&b| b == 0).next()?).ok()?;
        let lower = name.to_ascii_lowercase();
        startup.get(&lower)?;
        let value = startup
            .reported
            .get()
            .and_then(|r| r.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)))
            .map(|(_, v)| v.as_str())
            .or_else(|| startup.get(&lower))?;
        Some((name, value))
    }

    /// Is a message partly passed on?
    pub fn mid_message(&self) -> bool {
        self.body_left > 0
    }

    /// Notes a command tag.
    fn command(&mut self, tag: &[u8], track: Option<&mut Tracker<'_>>) {
        self.touched |= match tag {
            b"SET" | b"RESET" => PATH | STATE,
            t if t.starts_with(b"DISCARD") => PATH | STATE,
            b"PREPARE" => STATE | STATEMENTS,
            b"LISTEN" | b"DECLARE CURSOR" => STATE,
            _ => 0,
        };
        if matches!(tag, b"UNLISTEN" | b"DISCARD ALL") {
            self.unlisten_seen = true;
        }
        if matches!(tag, b"RESET" | b"DISCARD ALL") {
            // PostgreSQL reports the reset values just before ReadyForQuery:
            // those are not the client's.
            self.reset_seen = true;
            self.reset_in_cycle = true;
        }
        if let Some(t) = track {
            match tag {
                b"DISCARD ALL" | b"DEALLOCATE ALL" => t.all_gone(),
                b"DEALLOCATE" => t.some_gone(),
                // DDL: plans of statements prepared before it may be stale.
                t2 if t2.starts_with(b"ALTER ")
                    || t2.starts_with(b"DROP ")
                    || t2.starts_with(b"CREATE ") =>
                {
                    t.cache.schema_changed()
                }
                _ => {}
            }
        }
    }

    /// Tells the tracker a message ended; when that makes answers of the proxy due, they
    /// go out after the forwarded bytes so far, and their ReadyForQuery messages count.
    #[inline]
    fn ended(
        &self,
        track: Option<&mut Tracker<'_>>,
        tag: u8,
        code: Option<&str>,
        out: &mut Out,
        fwd: &mut usize,
        c: &mut ServerChunk,
    ) {
        if let Some(t) = track
            && t.reply(tag, code)
        {
            flush(out, fwd);
            let a = t.answer(self.status, out);
            c.ready += a.ready;
            c.idle += a.idle;
        }
    }

    /// Scans `buf` (bytes not yet scanned; a partial header stays for the next read),
    /// queueing what the client gets into `out`.
    #[inline]
    pub fn scan(
        &mut self,
        buf: &[u8],
        out: &mut Out,
        mut track: Option<&mut Tracker<'_>>,
    ) -> Result<ServerChunk, String> {
        let mut c = ServerChunk::default();
        let mut pos = 0;
        // Forwarded bytes not yet queued: one queue entry per run, not per message.
        let mut fwd = 0;
        while pos < buf.len() {
            if self.body_left > 0 {
                let take = self.body_left.min(buf.len() - pos);
                if self.dropping {
                    flush(out, &mut fwd);
                    out.skip(take);
                } else {
                    fwd += take;
                }
                pos += take;
                self.body_left -= take;
                if self.body_left == 0
                    && let Some(tag) = self.streamed.take()
                {
                    self.ended(track.as_deref_mut(), tag, None, out, &mut fwd, &mut c);
                }
                continue;
            }
            let Some((tag, len)) = header(&buf[pos..]) else {
                break;
            };
            let len = len.map_err(|l| format!("server sent a message with length {l}"))?;
            let avail = buf.len() - pos;
            let whole = avail >= len;
            if tag == b'Z' && len != 6 {
                return Err("server sent a malformed ReadyForQuery".into());
            }
            if self.swallow > 0 {
                // Replies to the injected queries: dropped, an error noted.
                if tag == b'Z' {
                    if !whole {
                        break;
                    }
                    self.swallow -= 1;
                    self.reset_in_cycle = false;
                    flush(out, &mut fwd);
                    out.skip(len);
                    pos += len;
                    continue;
                }
                if tag == b'E' {
                    self.swallow_error = true;
                }
                self.dropping = true;
                self.streamed = None;
                let n = len.min(avail);
                flush(out, &mut fwd);
                out.skip(n);
                pos += n;
                self.body_left = len - n;
                continue;
            }
            let small = len <= MAX_INSPECTED;
            match tag {
                b'Z' => {
                    if !whole {
                        break;
                    }
                    let status = buf[pos + HEADER_LEN];
                    fwd += len;
                    pos += len;
                    self.reset_in_cycle = false;
                    self.copy_in = false;
                    self.status = status;
                    c.ready += 1;
                    c.idle += u32::from(status == b'I');
                    self.ended(track.as_deref_mut(), tag, None, out, &mut fwd, &mut c);
                    continue;
                }
                b'C' if small && len > HEADER_LEN => {
                    if !whole {
                        break;
                    }
                    self.copy_in = false;
                    self.command(&buf[pos + HEADER_LEN..pos + len - 1], track.as_deref_mut());
                    fwd += len;
                    pos += len;
                    self.ended(track.as_deref_mut(), tag, None, out, &mut fwd, &mut c);
                    continue;
                }
                b'S' if small => {
                    if !whole {
                        break;
                    }
                    let body = &buf[pos + HEADER_LEN..pos + len];
                    self.note_parameter(body);
                    match self
                        .reset_in_cycle
                        .then(|| self.startup_value(body))
                        .flatten()
                    {
                        Some((name, value)) => {
                            flush(out, &mut fwd);
                            out.skip(len);
                            out.own_with(|b| crate::protocol::put_parameter_status(b, name, value));
                        }
                        None => fwd += len,
                    }
                    pos += len;
                    continue;
                }
                b'E' if len <= MAX_INSPECTED_ERROR => {
                    if !whole {
                        break;
                    }
                    let body = &buf[pos + HEADER_LEN..pos + len];
                    let severity = crate::protocol::error_field(body, b'V')
                        .or_else(|| crate::protocol::error_field(body, b'S'));
                    if matches!(severity, Some("FATAL") | Some("PANIC")) {
                        let field = |c| {
                            crate::protocol::error_field(body, c)
                                .unwrap_or("")
                                .to_string()
                        };
                        self.fatal = Some((field(b'C'), field(b'M')));
                        self.fatal_bytes = Some(buf[pos..pos + len].to_vec());
                        // Nothing after a FATAL matters: stop before it.
                        break;
                    }
                    let code = crate::protocol::error_field(body, b'C');
                    self.copy_in = false;
                    fwd += len;
                    pos += len;
                    self.ended(track.as_deref_mut(), tag, code, out, &mut fwd, &mut c);
                    continue;
                }
                _ => {}
            }
            // Streamed through (or dropped: a reply to a message the proxy injected).
            self.copy_in |= tag == b'G';
            self.dropping = track.as_deref().is_some_and(|t| t.drops(tag));
            let n = len.min(avail);
            if self.dropping {
                flush(out, &mut fwd);
                out.skip(n);
            } else {
                fwd += n;
            }
            pos += n;
            self.body_left = len - n;
            if self.body_left == 0 {
                self.ended(track.as_deref_mut(), tag, None, out, &mut fwd, &mut c);
            } else if track.is_some() {
                self.streamed = Some(tag);
            }
        }
        flush(out, &mut fwd);
        Ok(c)
    }
}

/// Queues a run of forwarded bytes.
#[inline]
fn flush(out: &mut Out, fwd: &mut usize) {
    out.buf(std::mem::take(fwd));
}

/// What one scan found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ServerChunk {
    /// ReadyForQuery messages the client gets (the server's and the proxy's).
    pub ready: u32,
    /// How many of those said "idle": transactions that ended.
    pub idle: u32,
}

/// How a relay ended.
#[derive(Debug, PartialEq, Eq)]
pub enum RelayEnd {
    /// Transaction done; the server connection is clean and may go back to the pool.
    Released,
    /// The client closed its socket (or sent Terminate and nothing is owed).
    ClientGone,
    /// The server connection failed; the text says how.
    ServerLost(String),
    /// The client broke the protocol.
    Violation(PgError),
    /// The client stayed idle inside a transaction longer than `idle_transaction_timeout`.
    IdleInTransaction,
    /// The client stopped in the middle of a message (or of the data of a COPY) for longer
    /// than `message_timeout`, holding the server connection.
    Stalled,
    /// `shutdown_timeout` ran out while the transaction (or session) was still running.
    ShutdownTimeout,
}

/// What the relay waits for the client to do, when it is the client's turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientWait {
    /// Start a message, inside a transaction.
    IdleInTransaction,
    /// Finish a message, or send the data of a COPY the server waits for.
    MidMessage,
}

/// Everything the relay moves and tracks; borrowed from the session and the server conn.
pub struct Relay<'a> {
    pub client: &'a mut Stream,
    pub cbuf: &'a mut BytesMut,
    /// Bytes at the front of `cbuf` the client scanner has checked.
    pub cfwd: &'a mut usize,
    pub cscan: &'a mut ClientScan,
    pub server: &'a mut Stream,
    pub sbuf: &'a mut BytesMut,
    pub sscan: ServerScan,
    /// What goes to the server: injected queries first, then the client's bytes.
    pub cout: &'a mut Out,
    /// Bytes at the front of `cbuf` that `cout` covers (at most `cfwd`).
    pub cpos: usize,
    /// What goes to the client.
    pub sout: &'a mut Out,
    /// Named prepared statements, when `max_prepared_statements` is on.
    pub track: Option<Tracker<'a>>,
    /// `idle_transaction_timeout`, if on.
    pub idle_in_transaction: Option<std::time::Duration>,
    /// `message_timeout`, if on.
    pub message_timeout: Option<std::time::Duration>,
    /// Runs while it is the client's turn and it sends nothing.
    pub timer: Option<(ClientWait, Pin<Box<tokio::time::Sleep>>)>,
    /// Bytes, queries and transactions seen, with their durations.
    pub counts: Counts<'a>,
}

/// What a relay counts for metrics: a few adds per read, durations per query and per
/// transaction. Flushed into the tenant's totals once, when the relay ends.
pub struct Counts<'a> {
    metrics: &'a crate::metrics::TenantMetrics,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub queries: u64,
    pub transactions: u64,
    query_us: u64,
    transaction_us: u64,
    query_start: Option<std::time::Instant>,
    transaction_start: Option<std::time::Instant>,
}

impl<'a> Counts<'a> {
    pub fn new(metrics: &'a crate::metrics::TenantMetrics) -> Counts<'a> {
        Counts {
            metrics,
            bytes_in: 0,
            bytes_out: 0,
            queries: 0,
            transactions: 0,
            query_us: 0,
            transaction_us: 0,
            query_start: None,
            transaction_start: None,
        }
    }

    /// Client bytes went to the server: a query (and maybe a transaction) is under way.
    #[inline]
    fn sent(&mut self, n: usize) {
        self.bytes_in += n as u64;
        if self.query_start.is_none() {
            let now = std::time::Instant::now();
            self.query_start = Some(now);
            self.transaction_start.get_or_insert(now);
        }
    }

    /// ReadyForQuery messages arrived: `ready` queries ended, `idle` of them transactions.
    fn finished(&mut self, ready: u32, idle: u32, more_pending: bool) {
        let now = std::time::Instant::now();
        if let Some(start) = self.query_start {
            let d = now.saturating_duration_since(start);
            self.query_us += d.as_micros() as u64 * u64::from(ready);
            self.metrics
                .query_duration
                .record_many(d.as_secs_f64(), ready as usize);
            // Counted with the observations, so that the counter and the histogram's
            // _count agree at every scrape.
            self.metrics.queries.increment(u64::from(ready));
        }
        self.queries += u64::from(ready);
        if idle > 0 {
            if let Some(start) = self.transaction_start {
                let d = now.saturating_duration_since(start);
                self.transaction_us += d.as_micros() as u64 * u64::from(idle);
                self.metrics
                    .transaction_duration
                    .record_many(d.as_secs_f64(), idle as usize);
                self.metrics.transactions.increment(u64::from(idle));
            }
            self.transactions += u64::from(idle);
            self.transaction_start = more_pending.then_some(now);
        }
        self.query_start = more_pending.then_some(now);
    }

    /// Adds the counts to the tenant's totals.
    pub fn flush(&self, stats: &crate::tenant::TenantStats) {
        use std::sync::atomic::Ordering::Relaxed;
        stats.bytes_in.fetch_add(self.bytes_in, Relaxed);
        stats.bytes_out.fetch_add(self.bytes_out, Relaxed);
        stats.queries.fetch_add(self.queries, Relaxed);
        stats.transactions.fetch_add(self.transactions, Relaxed);
        stats.query_us.fetch_add(self.query_us, Relaxed);
        stats.transaction_us.fetch_add(self.transaction_us, Relaxed);
    }
}

impl Relay<'_> {
    /// Moves bytes both ways until the transaction (or session) ends.
    pub async fn run(&mut self) -> RelayEnd {
        std::future::poll_fn(|cx| self.poll(cx)).await
    }

    fn done(&self) -> bool {
        self.cscan.pending == 0
            && !self.cscan.unsynced
            && self.cscan.body_left == 0
            && self.sscan.status == b'I'
            && !self.sscan.mid_message()
            && *self.cfwd == 0
            && self.owes_nothing()
    }

    /// Has every byte gone out, and has the server answered everything the proxy itself
    /// sent (the reset and settings before the client's bytes)? Only then may the
    /// connection serve anyone else: an unread reply would reach the next client.
    pub fn owes_nothing(&self) -> bool {
        self.cout.is_empty() && self.sout.is_empty() && self.sscan.swallow == 0
    }

    /// Counts ReadyForQuery messages on their way to the client.
    fn answered(&mut self, ready: u32, idle: u32) {
        if ready > 0 {
            self.cscan.pending = self.cscan.pending.saturating_sub(ready);
            self.counts.finished(ready, idle, self.cscan.pending > 0);
        }
    }

    /// Queues the client's checked bytes for the server: as they are, or with statement
    /// names rewritten.
    fn queue_client_bytes(&mut self) -> Result<(), PgError> {
        if self.cpos == *self.cfwd {
            return Ok(());
        }
        match &mut self.track {
            None => {
                self.cout.buf(*self.cfwd - self.cpos);
                self.cpos = *self.cfwd;
            }
            Some(t) => {
                t.sql_statements |= self.cscan.touched & STATEMENTS != 0;
                t.rewrite(self.cbuf, &mut self.cpos, *self.cfwd, self.cout)?;
                if !self.sscan.mid_message() {
                    let a = t.answer(self.sscan.status, self.sout);
                    self.answered(a.ready, a.idle);
                }
            }
        }
        Ok(())
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<RelayEnd> {
        loop {
            let mut progress = false;

            // Server -> client.
            if !self.sout.is_empty() {
                match self.sout.poll_write(self.client, self.sbuf, cx) {
                    Poll::Ready(Err(_)) => return Poll::Ready(RelayEnd::ClientGone),
                    Poll::Ready(Ok((_, n))) => {
                        self.counts.bytes_out += n as u64;
                        progress = true;
                    }
                    Poll::Pending => {}
                }
            }

            // Client -> server, injected messages first, in one write.
            if let Err(e) = self.queue_client_bytes() {
                return Poll::Ready(RelayEnd::Violation(e));
            }
            if !self.cout.is_empty() {
                match self.cout.poll_write(self.server, self.cbuf, cx) {
                    Poll::Ready(Err(e)) if e.kind() == std::io::ErrorKind::WriteZero => {
                        return Poll::Ready(RelayEnd::ServerLost(
                            "server closed the connection".into(),
                        ));
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(RelayEnd::ServerLost(e.to_string())),
                    Poll::Ready(Ok((n, _))) => {
                        *self.cfwd -= n;
                        self.cpos -= n;
                        if n > 0 {
                            self.counts.sent(n);
                        }
                        progress = true;
                    }
                    Poll::Pending => {}
                }
            }

            if self.sout.is_empty() && self.sscan.fatal.is_some() {
                return Poll::Ready(RelayEnd::ServerLost(
                    "the server ended the connection".into(),
                ));
            }
            if self.sscan.swallow == 0 && self.sscan.swallow_error {
                return Poll::Ready(RelayEnd::ServerLost(
                    "setting the tenant's search_path failed".into(),
                ));
            }

            if self.done() {
                return Poll::Ready(RelayEnd::Released);
            }
            if self.cscan.terminated && *self.cfwd == 0 {
                // The client is gone. With nothing of its own outstanding, the connection
                // may go back once the proxy's own replies are read. With a request still
                // running, or the server waiting for the rest of a batch or a COPY, nobody
                // would ever read the answer: end now (the connection is closed).
                let outstanding =
                    self.cscan.pending > 0 || self.cscan.unsynced || self.cscan.body_left > 0;
                if outstanding || self.owes_nothing() {
                    return Poll::Ready(RelayEnd::ClientGone);
                }
            }

            // Read from the server once everything it sent before has gone out.
            if self.sout.is_empty() && self.sscan.fatal.is_none() {
                match poll_read_some(self.server, self.sbuf, cx) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(RelayEnd::ServerLost(
                            "server closed the connection".into(),
                        ));
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(RelayEnd::ServerLost(e.to_string())),
                    Poll::Ready(Ok(_)) => {
                        match self.sscan.scan(self.sbuf, self.sout, self.track.as_mut()) {
                            Ok(chunk) => self.answered(chunk.ready, chunk.idle),
                            Err(e) => return Poll::Ready(RelayEnd::ServerLost(e)),
                        }
                        progress = true;
                    }
                    Poll::Pending => {}
                }
            }

            // Read from the client once its earlier bytes have gone to the server (and the
            // statement tracker is not waiting on a DISCARD ALL, nor holding more replies
            // to expect than its bound: a client pipelining far ahead waits in its socket).
            if self.cout.is_empty()
                && !self.cscan.terminated
                && !self
                    .track
                    .as_ref()
                    .is_some_and(|t| t.blocked() || t.expecting() > MAX_EXPECTED)
            {
                match poll_read_some(self.client, self.cbuf, cx) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        return Poll::Ready(RelayEnd::ClientGone);
                    }
                    Poll::Ready(Ok(_)) => {
                        match self.cscan.scan(self.cbuf, *self.cfwd) {
                            Ok(end) => *self.cfwd = end,
                            Err(e) => return Poll::Ready(RelayEnd::Violation(e)),
                        }
                        self.timer = None;
                        progress = true;
                    }
                    Poll::Pending => {}
                }
            }

            if !progress {
                // A client that does not do its part holds the server connection: bounded.
                match self.waiting_on_client() {
                    None => self.timer = None,
                    Some((why, limit)) => {
                        if self.timer.as_ref().map(|t| t.0) != Some(why) {
                            self.timer = Some((why, Box::pin(tokio::time::sleep(limit))));
                        }
                        if let Some((_, t)) = self.timer.as_mut()
                            && t.as_mut().poll(cx).is_ready()
                        {
                            return Poll::Ready(match why {
                                ClientWait::IdleInTransaction => RelayEnd::IdleInTransaction,
                                ClientWait::MidMessage => RelayEnd::Stalled,
                            });
                        }
                    }
                }
                return Poll::Pending;
            }
        }
    }

    /// Is it the client's turn (everything written both ways), and for what, with the
    /// limit that applies? The server waits on the client when the client is in the middle
    /// of a message (or the server waits for COPY data), or when the client is idle inside
    /// a transaction.
    fn waiting_on_client(&self) -> Option<(ClientWait, std::time::Duration)> {
        if !self.cout.is_empty() || !self.sout.is_empty() {
            return None;
        }
        // With `cout` written, bytes still in the buffer are the start of a message.
        if self.cscan.body_left > 0 || !self.cbuf.is_empty() || self.sscan.copy_in {
            return self.message_timeout.map(|l| (ClientWait::MidMessage, l));
        }
        let idle = self.sscan.status != b'I' && self.cscan.pending == 0;
        if idle {
            return self
                .idle_in_transaction
                .map(|l| (ClientWait::IdleInTransaction, l));
        }
        None
    }
}

/// Reads what is available into `buf` (growing it to at least `CLIENT_BUF` free bytes).
fn poll_read_some(
    stream: &mut Stream,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<usize>> {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(CLIENT_BUF);
    }
    let fut = pin!(stream.read_buf(buf));
    let n = ready!(fut.poll(cx))?;
    Poll::Ready(Ok(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_scan_counts_what_is_owed() {
        let mut s = ClientScan::default();
        let mut b = Vec::new();
        b.extend_from_slice(b"Q\0\0\0\x0eSELECT 1;\0");
        b.extend_from_slice(b"P\0\0\0\x08\0\0\0\0");
        let end = s.scan(&b, 0).unwrap();
        assert_eq!(end, b.len());
        assert_eq!(s.pending, 1);
        assert!(s.unsynced);
        b.extend_from_slice(b"S\0\0\0\x04");
        let end = s.scan(&b, end).unwrap();
        assert_eq!(end, b.len());
        assert_eq!(s.pending, 2);
        assert!(!s.unsynced);
    }

    #[test]
    fn client_scan_streams_partial_bodies_and_stops_at_terminate() {
        let mut s = ClientScan::default();
        let b = b"Q\0\0\0\x0eSELE";
        assert_eq!(s.scan(b, 0).unwrap(), b.len());
        assert_eq!(s.body_left, 6);
        let b2 = b"CT 1;\0X\0\0\0\x04";
        assert_eq!(s.scan(b2, 0).unwrap(), 6);
        assert!(s.terminated);
    }

    #[test]
    fn client_scan_rejects_bad_input() {
        let mut s = ClientScan::default();
        assert_eq!(s.scan(b"Q\x7f\xff\xff\xff", 0).unwrap_err().code, "08P01");
        let mut s = ClientScan::default();
        assert_eq!(s.scan(b"Q\0\0\0\x02", 0).unwrap_err().code, "08P01");
        let mut s = ClientScan::default();
        assert_eq!(s.scan(b"GET / HTTP/1.1", 0).unwrap_err().code, "08P01");
        let mut s = ClientScan::default();
        assert_eq!(s.scan(b"Q\0\0", 0).unwrap(), 0);
    }

    #[test]
    fn client_scan_tells_a_named_parse_by_its_first_byte_only() {
        // Found by the client_scan fuzz target: an unnamed Parse read in two pieces, the
        // second not starting with NUL, was taken for a named one.
        let b = b"P\0\0\0\x13\0DISCARD ALL\0\0\0";
        for cut in 0..=b.len() {
            let mut s = ClientScan::default();
            let end = s.scan(&b[..cut], 0).unwrap();
            s.scan(b, end).unwrap();
            assert_eq!(s.touched, PATH | STATE, "cut at {cut}");
        }
        let mut s = ClientScan::default();
        s.scan(b"P\0\0\0\x14x\0DISCARD ALL\0\0\0", 0).unwrap();
        assert_eq!(s.touched, PATH | STATE | NAMED_PARSE);
    }

    #[test]
    fn server_scan_swallows_injected_replies() {
        let mut s = ServerScan::new(2);
        let mut b = Vec::new();
        b.extend_from_slice(b"C\0\0\0\x10DISCARD ALL\0");
        b.extend_from_slice(b"Z\0\0\0\x05I");
        b.extend_from_slice(b"C\0\0\0\x08SET\0");
        b.extend_from_slice(b"Z\0\0\0\x05I");
        let injected = b.len();
        b.extend_from_slice(b"D\0\0\0\x06\0\0");
        b.extend_from_slice(b"Z\0\0\0\x05T");
        let mut out = Out::default();
        let c = s.scan(&b, &mut out, None).unwrap();
        assert_eq!(out.flatten(&b), &b[injected..]);
        assert_eq!(out.buf_len(), b.len());
        assert_eq!(c.ready, 1);
        assert_eq!(s.status, b'T');
        assert!(!s.swallow_error);
        assert_eq!(s.touched, 0);
    }

    #[test]
    fn server_scan_waits_for_whole_ready_for_query_and_notes_set() {
        let mut s = ServerScan::default();
        let mut b = Vec::new();
        b.extend_from_slice(b"C\0\0\0\x08SET\0");
        b.extend_from_slice(b"Z\0\0\0\x05");
        let mut out = Out::default();
        let c = s.scan(&b, &mut out, None).unwrap();
        assert_eq!(out.buf_len(), 9);
        assert_eq!(c.ready, 0);
        assert_eq!(s.touched, PATH | STATE);
    }

    #[test]
    fn server_scan_passes_long_rows_in_pieces() {
        let mut s = ServerScan::default();
        let mut b = vec![b'D', 0, 0, 0x10, 0x04];
        b.extend_from_slice(&[7u8; 100]);
        let mut out = Out::default();
        s.scan(&b, &mut out, None).unwrap();
        assert_eq!(out.buf_len(), b.len());
        let rest = vec![7u8; 0x1000 - 100];
        let mut out = Out::default();
        s.scan(&rest, &mut out, None).unwrap();
        assert_eq!(out.buf_len(), rest.len());
        let c = s.scan(b"Z\0\0\0\x05I", &mut out, None).unwrap();
        assert_eq!(c.ready, 1);
    }
}
