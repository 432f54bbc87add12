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
use std::io::IoSlice;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;

use crate::error::PgError;
use crate::protocol::{HEADER_LEN, MAX_CLIENT_MESSAGE_LEN, header, is_frontend_tag};

/// Read buffer size of a client with data in flight.
pub const CLIENT_BUF: usize = 8 * 1024;
/// Server messages the proxy inspects whole (ReadyForQuery, CommandComplete) are small;
/// a longer one of those types is passed through without being inspected.
const MAX_INSPECTED: usize = 1024;
/// ErrorResponses up to this size are read whole to spot FATAL ones.
const MAX_INSPECTED_ERROR: usize = 16 * 1024;

/// Walks the client's messages: counts what the server will answer and spots Terminate.
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
                b'Q' | b'F' => self.pending += 1,
                b'S' => {
                    self.pending += 1;
                    self.unsynced = false;
                }
                b'P' | b'B' | b'E' | b'D' | b'C' | b'H' => self.unsynced = true,
                b'X' => {
                    self.terminated = true;
                    break;
                }
                _ => {}
            }
            pos += HEADER_LEN;
            self.body_left = len - HEADER_LEN;
        }
        Ok(pos)
    }
}

/// Walks the server's messages: swallows the replies to injected queries, counts
/// ReadyForQuery and notes commands that change session state.
#[derive(Debug, Default)]
pub struct ServerScan {
    body_left: usize,
    /// The current partial message is being swallowed.
    dropping: bool,
    /// ReadyForQuery messages of injected queries still to swallow.
    pub swallow: u8,
    /// An injected query failed.
    pub swallow_error: bool,
    /// A SET/RESET/DISCARD went through: session state may differ from the clean state.
    pub session_changed: bool,
    /// Tracked parameters the server reported changed (a client's SET), lowercase names.
    pub reported: Vec<(String, String)>,
    /// A RESET went through: the client's settings go back to its startup values.
    pub reset_seen: bool,
    /// A RESET ran in the current query: its ParameterStatus reports are ignored.
    reset_in_cycle: bool,
    /// The server sent a FATAL error (SQLSTATE, message) and is about to close; it is
    /// held back, not forwarded, so the client can be told in a way that keeps it usable.
    pub fatal: Option<(String, String)>,
}

impl ServerScan {
    /// A scanner that first swallows the replies of `swallow` injected queries.
    pub fn new(swallow: u8) -> ServerScan {
        ServerScan {
            swallow,
            ..Default::default()
        }
    }

    /// Follows a ParameterStatus the client's own commands caused.
    fn note_parameter(&mut self, body: &[u8]) {
        if self.reset_in_cycle {
            return;
        }
        let mut parts = body.split(|&b| b == 0);
        let (Some(name), Some(value)) = (parts.next(), parts.next()) else {
            return;
        };
        let name = String::from_utf8_lossy(name).to_ascii_lowercase();
        if crate::client::params::TRACKED_REPORTS.contains(&name.as_str()) {
            let value = String::from_utf8_lossy(value).into_owned();
            match self.reported.iter_mut().find(|(n, _)| *n == name) {
                Some(e) => e.1 = value,
                None => self.reported.push((name, value)),
            }
        }
    }

    /// Is a message partly passed on?
    pub fn mid_message(&self) -> bool {
        self.body_left > 0
    }
}

/// What one scan found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ServerChunk {
    /// Bytes at the front to drop (replies to injected queries).
    pub drop: usize,
    /// End of the bytes to forward (from `drop`).
    pub end: usize,
    /// ReadyForQuery messages forwarded, and the last one's status.
    pub ready: u32,
    pub status: Option<u8>,
    /// How many of those said "idle": transactions that ended.
    pub idle: u32,
}

impl ServerScan {
    #[inline]
    pub fn scan(&mut self, buf: &[u8]) -> Result<ServerChunk, String> {
        let mut c = ServerChunk::default();
        let mut pos = 0;
        while pos < buf.len() {
            if self.body_left > 0 {
                let take = self.body_left.min(buf.len() - pos);
                pos += take;
                self.body_left -= take;
                if self.dropping {
                    c.drop = pos;
                }
                continue;
            }
            let Some((tag, len)) = header(&buf[pos..]) else {
                break;
            };
            let len = len.map_err(|l| format!("server sent a message with length {l}"))?;
            let whole = buf.len() - pos >= len;
            let small = len <= MAX_INSPECTED;
            match tag {
                b'Z' => {
                    if len != 6 {
                        return Err("server sent a malformed ReadyForQuery".into());
                    }
                    if !whole {
                        break;
                    }
                    let status = buf[pos + HEADER_LEN];
                    pos += len;
                    self.reset_in_cycle = false;
                    if self.swallow > 0 {
                        self.swallow -= 1;
                        c.drop = pos;
                    } else {
                        c.ready += 1;
                        c.status = Some(status);
                        c.idle += u32::from(status == b'I');
                    }
                    continue;
                }
                b'C' if small && len > HEADER_LEN && self.swallow == 0 => {
                    if !whole {
                        break;
                    }
                    let tag_text = &buf[pos + HEADER_LEN..pos + len - 1];
                    if matches!(tag_text, b"SET" | b"RESET" | b"DISCARD ALL" | b"DISCARD") {
                        self.session_changed = true;
                    }
                    if matches!(tag_text, b"RESET" | b"DISCARD ALL") {
                        // PostgreSQL reports the reset values just before ReadyForQuery:
                        // those are not the client's.
                        self.reset_seen = true;
                        self.reset_in_cycle = true;
                        self.reported.clear();
                    }
                    pos += len;
                    continue;
                }
                b'E' if self.swallow > 0 => self.swallow_error = true,
                b'S' if small && self.swallow == 0 => {
                    if !whole {
                        break;
                    }
                    self.note_parameter(&buf[pos + HEADER_LEN..pos + len]);
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
                        // Nothing after a FATAL matters: stop before it.
                        break;
                    }
                    pos += len;
                    continue;
                }
                _ => {}
            }
            self.dropping = self.swallow > 0;
            pos += HEADER_LEN;
            self.body_left = len - HEADER_LEN;
            if self.dropping {
                c.drop = pos;
            }
        }
        c.end = pos;
        Ok(c)
    }
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
}

/// Everything the relay moves and tracks; borrowed from the session and the server conn.
pub struct Relay<'a> {
    pub client: &'a mut TcpStream,
    pub cbuf: &'a mut BytesMut,
    /// Bytes at the front of `cbuf` already scanned and ready to go to the server.
    pub cfwd: &'a mut usize,
    pub cscan: &'a mut ClientScan,
    pub server: &'a mut TcpStream,
    pub sbuf: &'a mut BytesMut,
    pub sscan: ServerScan,
    /// Injected messages still to write before the client's bytes.
    pub prelude: &'a [u8],
    /// Bytes at the front of `sbuf` ready to go to the client.
    pub sfwd: usize,
    /// Transaction status from the last ReadyForQuery.
    pub status: u8,
    /// `idle_transaction_timeout`, if on.
    pub idle_in_transaction: Option<std::time::Duration>,
    /// Runs while the client sits idle inside a transaction.
    pub idle_timer: Option<Pin<Box<tokio::time::Sleep>>>,
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
        }
        self.queries += u64::from(ready);
        if idle > 0 {
            if let Some(start) = self.transaction_start {
                let d = now.saturating_duration_since(start);
                self.transaction_us += d.as_micros() as u64 * u64::from(idle);
                self.metrics
                    .transaction_duration
                    .record_many(d.as_secs_f64(), idle as usize);
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
            && self.status == b'I'
            && *self.cfwd == 0
            && self.prelude.is_empty()
            && self.sfwd == 0
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<RelayEnd> {
        loop {
            let mut progress = false;

            // Server -> client.
            if self.sfwd > 0 {
                match Pin::new(&mut *self.client).poll_write(cx, &self.sbuf[..self.sfwd]) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        return Poll::Ready(RelayEnd::ClientGone);
                    }
                    Poll::Ready(Ok(n)) => {
                        self.sbuf.advance(n);
                        self.sfwd -= n;
                        self.counts.bytes_out += n as u64;
                        progress = true;
                    }
                    Poll::Pending => {}
                }
            }

            // Client -> server, injected messages first, in one write.
            if !self.prelude.is_empty() || *self.cfwd > 0 {
                let bufs = [
                    IoSlice::new(self.prelude),
                    IoSlice::new(&self.cbuf[..*self.cfwd]),
                ];
                match Pin::new(&mut *self.server).poll_write_vectored(cx, &bufs) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(RelayEnd::ServerLost(
                            "server closed the connection".into(),
                        ));
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(RelayEnd::ServerLost(e.to_string())),
                    Poll::Ready(Ok(mut n)) => {
                        let p = n.min(self.prelude.len());
                        self.prelude = &self.prelude[p..];
                        n -= p;
                        self.cbuf.advance(n);
                        *self.cfwd -= n;
                        if n > 0 {
                            self.counts.sent(n);
                        }
                        progress = true;
                    }
                    Poll::Pending => {}
                }
            }

            if self.sfwd == 0 && self.sscan.fatal.is_some() {
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
            if self.cscan.terminated
                && self.cscan.pending == 0
                && *self.cfwd == 0
                && self.sfwd == 0
                && self.prelude.is_empty()
            {
                return Poll::Ready(RelayEnd::ClientGone);
            }

            // Read from the server once everything it sent before has gone out.
            if self.sfwd == 0 && self.sscan.fatal.is_none() {
                match poll_read_some(self.server, self.sbuf, cx) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(RelayEnd::ServerLost(
                            "server closed the connection".into(),
                        ));
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(RelayEnd::ServerLost(e.to_string())),
                    Poll::Ready(Ok(_)) => {
                        match self.sscan.scan(self.sbuf) {
                            Ok(chunk) => {
                                self.sbuf.advance(chunk.drop);
                                self.sfwd = chunk.end - chunk.drop;
                                if chunk.ready > 0 {
                                    self.cscan.pending =
                                        self.cscan.pending.saturating_sub(chunk.ready);
                                    self.counts.finished(
                                        chunk.ready,
                                        chunk.idle,
                                        self.cscan.pending > 0,
                                    );
                                }
                                if let Some(s) = chunk.status {
                                    self.status = s;
                                }
                            }
                            Err(e) => return Poll::Ready(RelayEnd::ServerLost(e)),
                        }
                        progress = true;
                    }
                    Poll::Pending => {}
                }
            }

            // Read from the client once its earlier bytes have gone to the server.
            if *self.cfwd == 0 && self.prelude.is_empty() && !self.cscan.terminated {
                match poll_read_some(self.client, self.cbuf, cx) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        return Poll::Ready(RelayEnd::ClientGone);
                    }
                    Poll::Ready(Ok(_)) => {
                        match self.cscan.scan(self.cbuf, 0) {
                            Ok(end) => *self.cfwd = end,
                            Err(e) => return Poll::Ready(RelayEnd::Violation(e)),
                        }
                        progress = true;
                    }
                    Poll::Pending => {}
                }
            }

            if !progress {
                if let Some(limit) = self.idle_in_transaction {
                    // Idle inside a transaction: the server waits on the client.
                    let idle = self.status != b'I'
                        && self.cscan.pending == 0
                        && self.cscan.body_left == 0
                        && *self.cfwd == 0
                        && self.sfwd == 0;
                    if idle {
                        let timer = self
                            .idle_timer
                            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                        if timer.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(RelayEnd::IdleInTransaction);
                        }
                    } else {
                        self.idle_timer = None;
                    }
                }
                return Poll::Pending;
            }
        }
    }
}

/// Reads what is available into `buf` (growing it to at least `CLIENT_BUF` free bytes).
fn poll_read_some(
    stream: &mut TcpStream,
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
    fn server_scan_swallows_injected_replies() {
        let mut s = ServerScan {
            swallow: 2,
            ..Default::default()
        };
        let mut b = Vec::new();
        b.extend_from_slice(b"C\0\0\0\x10DISCARD ALL\0");
        b.extend_from_slice(b"Z\0\0\0\x05I");
        b.extend_from_slice(b"C\0\0\0\x08SET\0");
        b.extend_from_slice(b"Z\0\0\0\x05I");
        let injected = b.len();
        b.extend_from_slice(b"D\0\0\0\x06\0\0");
        b.extend_from_slice(b"Z\0\0\0\x05T");
        let c = s.scan(&b).unwrap();
        assert_eq!(c.drop, injected);
        assert_eq!(c.end, b.len());
        assert_eq!(c.ready, 1);
        assert_eq!(c.status, Some(b'T'));
        assert!(!s.swallow_error);
        assert!(!s.session_changed);
    }

    #[test]
    fn server_scan_waits_for_whole_ready_for_query_and_notes_set() {
        let mut s = ServerScan::default();
        let mut b = Vec::new();
        b.extend_from_slice(b"C\0\0\0\x08SET\0");
        b.extend_from_slice(b"Z\0\0\0\x05");
        let c = s.scan(&b).unwrap();
        assert_eq!(c.end, 9);
        assert_eq!(c.ready, 0);
        assert!(s.session_changed);
    }

    #[test]
    fn server_scan_passes_long_rows_in_pieces() {
        let mut s = ServerScan::default();
        let mut b = vec![b'D', 0, 0, 0x10, 0x04];
        b.extend_from_slice(&[7u8; 100]);
        let c = s.scan(&b).unwrap();
        assert_eq!(c.end, b.len());
        let rest = vec![7u8; 0x1000 - 100];
        let c = s.scan(&rest).unwrap();
        assert_eq!(c.end, rest.len());
        let c = s.scan(b"Z\0\0\0\x05I").unwrap();
        assert_eq!(c.ready, 1);
    }
}
