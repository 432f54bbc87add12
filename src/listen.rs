//! LISTEN/NOTIFY in transaction mode.
//!
//! A client's `LISTEN` never reaches the pool's connections (which serve other clients
//! after it): the proxy answers it and registers the client for (its tenant, the channel).
//! One listener connection of the proxy's own (outside `server.max_connections`) `LISTEN`s
//! on every channel some client of some tenant listens on, and fans each notification out to
//! the clients of the sender's tenant that listen on its channel; they get it while idle or
//! between transactions, as from PostgreSQL.
//!
//! The sender's tenant: a NotificationResponse names the server backend that sent it. Which
//! tenant a pool connection serves changes over time, and the notification reaches the
//! listener later than the sender's own ReadyForQuery, so a lookup of "the tenant this
//! backend serves now" could name the next tenant. Instead every pool connection announces
//! its tenant in the notification queue itself: before its first transaction for a tenant it
//! runs `pg_notify(fence channel, token:tenant)` (a *fence*). PostgreSQL's queue is in commit
//! order, so every notification the listener reads from a backend belongs to the tenant of
//! that backend's last fence before it. Notifications from backends with no fence (since the
//! listener connected) are dropped: tenants never hear each other. The token, random per
//! proxy run, keeps a client from announcing a tenant by a `pg_notify` of its own.
//!
//! Memory: a client's backlog is bounded ([`MAX_BACKLOG_BYTES`], [`MAX_BACKLOG_MESSAGES`]);
//! a client that does not read its notifications past that is disconnected (FATAL 53200).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::AsyncWriteExt;

use crate::protocol::{HEADER_LEN, header};
use crate::server::SHARED_LOGIN;
use crate::tenant::TenantId;

/// The channel fences go on (a client's `LISTEN` of it is answered but hears nothing).
pub const FENCE_CHANNEL: &str = "tenantpool_fence";
/// Notification bytes one client may have waiting.
pub const MAX_BACKLOG_BYTES: usize = 1 << 20;
/// Notifications one client may have waiting.
pub const MAX_BACKLOG_MESSAGES: usize = 10_000;

/// A listening client's notifications waiting to be sent.
pub struct Inbox {
    q: Mutex<Backlog>,
    /// The client's slot: its session is woken through it when something arrives (an idle
    /// session looks at [`Inbox::has_pending`] after registering its waker there).
    client: Arc<crate::registry::ClientSlot>,
}

#[derive(Default)]
struct Backlog {
    bytes: BytesMut,
    count: usize,
    overflow: bool,
}

impl Inbox {
    pub fn new(client: Arc<crate::registry::ClientSlot>) -> Inbox {
        Inbox {
            q: Mutex::default(),
            client,
        }
    }

    fn push(&self, msg: &[u8]) {
        let mut q = self.q.lock().unwrap_or_else(|e| e.into_inner());
        if q.overflow {
            return;
        }
        if q.bytes.len() + msg.len() > MAX_BACKLOG_BYTES || q.count >= MAX_BACKLOG_MESSAGES {
            q.overflow = true;
            q.bytes = BytesMut::new();
        } else {
            q.bytes.extend_from_slice(msg);
            q.count += 1;
        }
        drop(q);
        self.client.wake();
    }

    /// What is waiting; `None` when the backlog passed its bound.
    pub fn take(&self) -> Option<BytesMut> {
        let mut q = self.q.lock().unwrap_or_else(|e| e.into_inner());
        if q.overflow {
            return None;
        }
        q.count = 0;
        Some(q.bytes.split())
    }

    pub fn has_pending(&self) -> bool {
        let q = self.q.lock().unwrap_or_else(|e| e.into_inner());
        q.overflow || !q.bytes.is_empty()
    }
}

/// The proxy's listener and who listens on what.
#[derive(Default)]
pub struct Hub {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// The listener is connected and listening on the fence channel: checkouts fence.
    active: AtomicBool,
    state: Mutex<State>,
    /// Channels changed: the listener LISTENs/UNLISTENs.
    changed: tokio::sync::Notify,
    /// The listener caught up with the channels (after a change).
    synced: tokio::sync::Notify,
}

/// The clients listening on one (tenant, channel): (client id, inbox).
type Listeners = Vec<(u64, Arc<Inbox>)>;

#[derive(Default)]
struct State {
    started: bool,
    /// Bumped each time the listener (re)connects: fences sent before may not have been heard.
    generation: u64,
    token: String,
    /// Clients by (tenant, channel): (client id, inbox).
    subs: HashMap<(TenantId, String), Listeners>,
    /// What the listener connection listens on now.
    listening: HashSet<String>,
    /// Server backend pid -> the tenant of its last fence heard (queue order).
    pids: HashMap<i32, TenantId>,
    /// Fences sent: pid -> (tenant, generation).
    fenced: HashMap<i32, (TenantId, u64)>,
}

impl State {
    fn wanted(&self) -> HashSet<String> {
        self.subs.keys().map(|(_, c)| c.clone()).collect()
    }
}

/// A client's LISTEN-family command.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Listen(String),
    Unlisten(String),
    UnlistenAll,
}

impl Command {
    pub fn tag(&self) -> &'static str {
        match self {
            Command::Listen(_) => "LISTEN",
            _ => "UNLISTEN",
        }
    }
}

/// Recognises `LISTEN ch`, `UNLISTEN ch` and `UNLISTEN *` as a whole query string (one
/// statement, an optional `;`, no comments); channel names folded as PostgreSQL folds them.
pub fn command(text: &[u8]) -> Option<Command> {
    let text = std::str::from_utf8(text).ok()?.trim();
    let text = text.strip_suffix(';').unwrap_or(text).trim_end();
    let (word, rest) = text.split_at(text.find(|c: char| c.is_ascii_whitespace())?);
    let rest = rest.trim_start();
    let listen = word.eq_ignore_ascii_case("listen");
    if !listen && !word.eq_ignore_ascii_case("unlisten") {
        return None;
    }
    if !listen && rest == "*" {
        return Some(Command::UnlistenAll);
    }
    let name = identifier(rest)?;
    Some(if listen {
        Command::Listen(name)
    } else {
        Command::Unlisten(name)
    })
}

/// One SQL identifier, the whole of `s`: quoted (`""` for a quote) or plain (lower-cased).
fn identifier(s: &str) -> Option<String> {
    if let Some(q) = s.strip_prefix('"') {
        let inner = q.strip_suffix('"')?;
        let mut out = String::new();
        let mut chars = inner.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '"' && chars.next() != Some('"') {
                return None;
            }
            out.push(c);
        }
        return (!out.is_empty()).then_some(out);
    }
    let ok = !s.is_empty()
        && !s.starts_with(|c: char| c.is_ascii_digit() || c == '$')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$' || !c.is_ascii());
    ok.then(|| s.to_ascii_lowercase())
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl Hub {
    /// Runs a client's command. LISTEN returns once the listener listens on the channel (or
    /// after a few seconds when the server cannot be reached: it listens once it can).
    pub async fn run(
        &self,
        pool: &Arc<crate::pool::Pool>,
        stop: tokio::sync::watch::Receiver<bool>,
        tenant: TenantId,
        client: u64,
        inbox: &Arc<Inbox>,
        cmd: &Command,
    ) {
        let channel = {
            let mut st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
            match cmd {
                Command::Listen(ch) => {
                    let subs = st.subs.entry((tenant, ch.clone())).or_default();
                    if !subs.iter().any(|(id, _)| *id == client) {
                        subs.push((client, inbox.clone()));
                    }
                    if !st.started {
                        st.started = true;
                        st.token = format!("{:032x}", rand::random::<u128>());
                        tokio::spawn(listener(self.inner.clone(), pool.clone(), stop));
                    }
                    (!st.listening.contains(ch)).then(|| ch.clone())
                }
                Command::Unlisten(ch) => {
                    remove(&mut st, tenant, ch, client);
                    None
                }
                Command::UnlistenAll => {
                    let keys: Vec<_> = st.subs.keys().cloned().collect();
                    for (t, ch) in keys {
                        remove(&mut st, t, &ch, client);
                    }
                    None
                }
            }
        };
        self.inner.changed.notify_one();
        if let Some(ch) = channel {
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    let synced = self.inner.synced.notified();
                    if self.listening(&ch) {
                        return;
                    }
                    synced.await;
                }
            })
            .await;
        }
    }

    fn listening(&self, ch: &str) -> bool {
        let st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        st.listening.contains(ch) && self.inner.active.load(Ordering::Acquire)
    }

    /// A client ends: it listens on nothing any more.
    pub fn forget(&self, client: u64) {
        let mut st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        let keys: Vec<_> = st.subs.keys().cloned().collect();
        for (t, ch) in keys {
            remove(&mut st, t, &ch, client);
        }
        drop(st);
        self.inner.changed.notify_one();
    }

    /// The fence a checkout sends ahead of the client's bytes, when the listener runs and
    /// backend `pid` has not announced `tenant` to it: the payload for
    /// `pg_notify(FENCE_CHANNEL, payload)`.
    #[inline]
    pub fn fence(&self, pid: i32, tenant: TenantId) -> Option<String> {
        if !self.inner.active.load(Ordering::Acquire) {
            return None;
        }
        let mut st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = (tenant, st.generation);
        if st.fenced.get(&pid) == Some(&now) {
            return None;
        }
        st.fenced.insert(pid, now);
        Some(format!("{}:{tenant}", st.token))
    }
}

fn remove(st: &mut State, tenant: TenantId, ch: &str, client: u64) {
    let key = (tenant, ch.to_string());
    if let Some(v) = st.subs.get_mut(&key) {
        v.retain(|(id, _)| *id != client);
        if v.is_empty() {
            st.subs.remove(&key);
        }
    }
}

/// The listener connection: connects (again, with a backoff, whenever it is lost), listens
/// on the fence channel and on every channel some client listens on, and hands out what it
/// hears.
async fn listener(
    inner: Arc<Inner>,
    // The server as the config in force names it, read at every connect (a reload may
    // change the password or TLS files).
    pool: Arc<crate::pool::Pool>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if *stop.borrow() {
            return;
        }
        let conn = match crate::server::connect(&pool.target(), SHARED_LOGIN).await {
            Ok(login) => login.conn,
            Err(e) => {
                tracing::warn!(error = %e, "LISTEN/NOTIFY listener cannot connect");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        let why = listen_on(&inner, conn, &mut stop).await;
        inner.active.store(false, Ordering::Release);
        {
            let mut st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
            st.listening.clear();
        }
        match why {
            None => return,
            Some(e) => tracing::warn!(error = %e, "LISTEN/NOTIFY listener connection lost"),
        }
    }
}

/// Serves one listener connection; `None` when the proxy stops.
async fn listen_on(
    inner: &Arc<Inner>,
    mut conn: crate::server::ServerConn,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Option<String> {
    let mut first = true;
    // Queries sent whose ReadyForQuery has not come, and the channels they make current.
    let mut in_flight: Vec<HashSet<String>> = Vec::new();
    loop {
        // Catch up with the channels clients want.
        let (wanted, listening) = {
            let st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
            (st.wanted(), st.listening.clone())
        };
        let target = in_flight.last().unwrap_or(&listening);
        if first || *target != wanted {
            let mut sql = String::new();
            if first {
                sql.push_str(&format!("LISTEN {FENCE_CHANNEL};"));
            }
            for ch in wanted.difference(target) {
                sql.push_str(&format!("LISTEN {};", quote(ch)));
            }
            for ch in target.difference(&wanted) {
                sql.push_str(&format!("UNLISTEN {};", quote(ch)));
            }
            let mut out = BytesMut::new();
            crate::protocol::put_query(&mut out, &sql);
            if let Err(e) = conn.stream.write_all(&out).await {
                return Some(e.to_string());
            }
            in_flight.push(wanted);
            first = false;
        }
        tokio::select! {
            r = conn.read_more() => match r {
                Ok(0) => return Some("server closed the connection".into()),
                Err(e) => return Some(e.to_string()),
                Ok(_) => {
                    if let Err(e) = heard(inner, &mut conn.buf, &mut in_flight) {
                        return Some(e);
                    }
                }
            },
            () = inner.changed.notified() => {}
            _ = stop.changed() => {
                conn.terminate();
                return None;
            }
        }
        if conn.buf.capacity() - conn.buf.len() < 1024 {
            conn.buf.reserve(8192);
        }
    }
}

/// Handles whole messages the listener connection sent.
fn heard(
    inner: &Arc<Inner>,
    buf: &mut BytesMut,
    in_flight: &mut Vec<HashSet<String>>,
) -> Result<(), String> {
    let mut pos = 0;
    while let Some((tag, len)) = header(&buf[pos..]) {
        let len = len.map_err(|l| format!("bad message length {l}"))?;
        if buf.len() - pos < len {
            break;
        }
        let body = &buf[pos + HEADER_LEN..pos + len];
        match tag {
            b'A' => notification(inner, &buf[pos..pos + len], body),
            b'Z' if !in_flight.is_empty() => {
                let now = in_flight.remove(0);
                let mut st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
                st.listening = now;
                if !inner.active.load(Ordering::Acquire) {
                    // Listening on the fence channel now: fences sent from here on are
                    // heard; earlier announcements are not known.
                    st.generation += 1;
                    st.pids.clear();
                    st.fenced.clear();
                    inner.active.store(true, Ordering::Release);
                }
                drop(st);
                inner.synced.notify_waiters();
            }
            b'E' => {
                let severity = crate::protocol::error_field(body, b'V')
                    .or_else(|| crate::protocol::error_field(body, b'S'));
                let msg = crate::protocol::error_field(body, b'M')
                    .unwrap_or("")
                    .to_string();
                if matches!(severity, Some("FATAL") | Some("PANIC")) {
                    return Err(msg);
                }
                tracing::warn!(error = %msg, "LISTEN/NOTIFY listener");
            }
            _ => {}
        }
        pos += len;
    }
    let _ = buf.split_to(pos);
    Ok(())
}

/// A NotificationResponse (`msg` whole, `body` after the header): a fence, or a notification
/// for the clients of the sender's tenant listening on its channel.
fn notification(inner: &Arc<Inner>, msg: &[u8], body: &[u8]) {
    if body.len() < 4 {
        return;
    }
    let pid = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    let mut parts = body[4..].split(|&b| b == 0);
    let (Some(channel), Some(payload)) = (parts.next(), parts.next()) else {
        return;
    };
    let Ok(channel) = std::str::from_utf8(channel) else {
        return;
    };
    let mut st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
    if channel == FENCE_CHANNEL {
        let payload = String::from_utf8_lossy(payload);
        if let Some((token, tenant)) = payload.split_once(':')
            && token == st.token
            && let Ok(tenant) = tenant.parse::<TenantId>()
        {
            st.pids.insert(pid, tenant);
        }
        return;
    }
    // Unknown senders (no fence heard since the listener connected, or not the proxy's
    // connections) are dropped: a tenant hears only its own tenant's notifications.
    let Some(&tenant) = st.pids.get(&pid) else {
        return;
    };
    if let Some(subs) = st.subs.get(&(tenant, channel.to_string())) {
        for (_, inbox) in subs {
            inbox.push(msg);
        }
    }
}

/// The replies to a client's LISTEN-family command sent alone: as a simple Query, or as an
/// unnamed Parse, Bind, optional Describe of the portal, Execute and Sync without parameters.
/// `None` when `batch` is anything else.
pub fn answer(batch: &[u8]) -> Option<(Command, BytesMut)> {
    let mut msgs = Vec::new();
    let mut pos = 0;
    while pos < batch.len() {
        let (tag, Ok(len)) = header(&batch[pos..])? else {
            return None;
        };
        if pos + len > batch.len() {
            return None;
        }
        msgs.push((tag, &batch[pos + HEADER_LEN..pos + len]));
        pos += len;
    }
    let mut out = BytesMut::with_capacity(64);
    let text = match msgs.as_slice() {
        [(b'Q', body)] => body.strip_suffix(&[0])?,
        [(b'P', p), (b'B', b), rest @ .., (b'E', e), (b'S', _)] => {
            // Unnamed statement, no parameter types; unnamed portal and statement, no
            // parameters; the unnamed portal described and run.
            let text = p.strip_prefix(&[0])?.strip_suffix(&[0, 0, 0])?;
            if b.len() < 8 || b[..2] != [0, 0] || b[2..4] != [0, 0] || b[4..6] != [0, 0] {
                return None;
            }
            if e.first() != Some(&0) {
                return None;
            }
            out.extend_from_slice(b"1\0\0\0\x042\0\0\0\x04");
            match rest {
                [] => {}
                [(b'D', d)] if *d == b"P\0" => out.extend_from_slice(b"n\0\0\0\x04"),
                _ => return None,
            }
            text
        }
        _ => return None,
    };
    if text.contains(&0) {
        return None;
    }
    let cmd = command(text)?;
    crate::protocol::put_command_complete(&mut out, cmd.tag());
    crate::protocol::put_ready_for_query(&mut out, b'I');
    Some((cmd, out))
}

/// Encodes a NotificationResponse (tests).
#[doc(hidden)]
pub fn put_notification(out: &mut BytesMut, pid: i32, channel: &str, payload: &str) {
    out.put_u8(b'A');
    out.put_u32((4 + 4 + channel.len() + 1 + payload.len() + 1) as u32);
    out.put_i32(pid);
    out.extend_from_slice(channel.as_bytes());
    out.put_u8(0);
    out.extend_from_slice(payload.as_bytes());
    out.put_u8(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands() {
        assert_eq!(command(b"LISTEN Foo"), Some(Command::Listen("foo".into())));
        assert_eq!(
            command(b" listen \"My \"\"Ch\"\"\" ; "),
            Some(Command::Listen("My \"Ch\"".into()))
        );
        assert_eq!(command(b"UNLISTEN *"), Some(Command::UnlistenAll));
        assert_eq!(command(b"unlisten x;"), Some(Command::Unlisten("x".into())));
        assert_eq!(command(b"LISTEN a; SELECT 1"), None);
        assert_eq!(command(b"LISTEN"), None);
        assert_eq!(command(b"NOTIFY x"), None);
    }

    #[test]
    fn answers_simple_and_extended() {
        let (cmd, out) = answer(b"Q\0\0\0\x10LISTEN jobs\0").unwrap();
        assert_eq!(cmd, Command::Listen("jobs".into()));
        assert_eq!(&out[..], b"C\0\0\0\x0bLISTEN\0Z\0\0\0\x05I");
        let mut b = Vec::new();
        b.extend_from_slice(b"P\0\0\0\x12\0UNLISTEN *\0\0\0");
        b.extend_from_slice(b"B\0\0\0\x0c\0\0\0\0\0\0\0\0");
        b.extend_from_slice(b"D\0\0\0\x06P\0");
        b.extend_from_slice(b"E\0\0\0\x09\0\0\0\0\0");
        b.extend_from_slice(b"S\0\0\0\x04");
        let (cmd, out) = answer(&b).unwrap();
        assert_eq!(cmd, Command::UnlistenAll);
        assert!(out.starts_with(b"1\0\0\0\x042\0\0\0\x04n\0\0\0\x04C"));
        assert!(answer(b"Q\0\0\0\x0dSELECT 1;\0").is_none());
    }

    #[test]
    fn backlog_is_bounded() {
        let reg = crate::registry::ClientRegistry::with_peer_id(0);
        let inbox = Inbox::new(reg.register(0, "u".into(), "127.0.0.1:1".parse().unwrap()));
        let mut m = BytesMut::new();
        put_notification(&mut m, 1, "c", &"x".repeat(1000));
        for _ in 0..2000 {
            inbox.push(&m);
        }
        assert!(inbox.take().is_none());
    }
}
