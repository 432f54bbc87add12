//! Named prepared statements in transaction mode, safe across tenants.
//!
//! A client's named statements live on whichever server connection it used when it
//! prepared them; its next transaction may land elsewhere. So the proxy keeps them:
//!
//! - A [`StatementCache`] interns every statement by (tenant, query text, parameter types)
//!   and gives it a proxy-owned server name `_tp<id>`. Clients of one tenant sending the
//!   same statement share it; two tenants never do (their `search_path` differs, and a
//!   shared plan would be re-analysed on every switch or fail when their tables differ).
//! - [`ClientStatements`] maps a client's own names to interned statements (bounded).
//! - [`ServerStatements`] is what one server connection has prepared: at most
//!   `max_prepared_statements`, least recently used evicted with a Close.
//! - A [`Tracker`] runs inside the relay. On the way to the server it renames statements
//!   in Parse, Bind, Describe and Close by splicing frames (header and name are rewritten,
//!   the rest is forwarded from the client's buffer), prepares a statement the server
//!   connection lacks by injecting a Parse, and answers what the server need not see (a
//!   Parse of a statement the connection has, a Close, DEALLOCATE) itself. It queues one
//!   [`Expect`] per message the server will answer, so that on the way back it can drop
//!   replies to injected messages and put its own answers in their place in the stream.
//!   An error skips the rest of the batch, exactly as the server does, and undoes what
//!   the skipped messages would have done.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use bytes::{BufMut, Bytes, BytesMut};
use dashmap::DashMap;

use crate::error::PgError;
use crate::protocol::{HEADER_LEN, header, put_command_complete, put_ready_for_query};
use crate::sniff::Touched;
use crate::splice::Out;
use crate::tenant::TenantId;

/// Server-side names are this prefix and a number.
pub const PREFIX: &[u8] = b"_tp";
/// Statements one client may hold at once.
pub const MAX_CLIENT_STATEMENTS: usize = 10_000;
/// Bytes of statement text (and names) one client may hold at once.
pub const MAX_CLIENT_STATEMENT_BYTES: usize = 16 << 20;
/// Longest statement or portal name the proxy reads.
const MAX_NAME: usize = 1024;
/// Query messages up to this size are read whole to spot DEALLOCATE and DISCARD ALL.
pub const MAX_INSPECTED_QUERY: usize = 512;

/// A fast, non-cryptographic hasher for the maps the relay looks up on every Bind (statement
/// ids the proxy makes; a client's own statement names, which can only slow that client's
/// own map).
#[derive(Default, Clone, Copy)]
pub struct FastHasher(u64);

impl FastHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl std::hash::Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut last = [0u8; 8];
            last[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(last));
        }
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<FastHasher>>;

/// One interned statement: a query text with parameter types, for one tenant.
pub struct Stmt {
    pub id: u64,
    /// The Parse message under the server-side name.
    parse: Bytes,
    /// End of the name (with its NUL) in `parse`.
    name_end: usize,
    /// The cache key: tenant id then the Parse body after the name.
    key: Bytes,
    cache: Arc<StatementCache>,
    /// What running it may change on the server connection (its text sniffed once).
    pub touches: Touched,
    /// The cache's schema epoch when it was interned: a statement older than the current
    /// epoch may have a stale plan on the connections that prepared it, so a client's new
    /// Parse of its text gets a new statement (prepared afresh) instead.
    epoch: u64,
}

impl Stmt {
    /// The server-side name with its terminating NUL.
    pub fn name(&self) -> &[u8] {
        &self.parse[HEADER_LEN..self.name_end]
    }

    /// The whole Parse message under the server-side name.
    pub fn parse_message(&self) -> &[u8] {
        &self.parse
    }

    /// Bytes this statement accounts for.
    fn cost(&self) -> usize {
        self.parse.len() + 64
    }
}

impl std::fmt::Debug for Stmt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Stmt({})", self.id)
    }
}

impl Drop for Stmt {
    fn drop(&mut self) {
        // Nothing holds the statement any more: forget it (unless it was interned again
        // meanwhile, which left a live entry under the key).
        self.cache
            .map
            .remove_if(&self.key, |_, w| w.strong_count() == 0);
    }
}

/// Every statement some client or server connection holds, interned.
#[derive(Default)]
pub struct StatementCache {
    map: DashMap<Bytes, Weak<Stmt>>,
    next_id: AtomicU64,
    /// Bumped when the schema may have changed (DDL went through, or PostgreSQL said a
    /// statement's plan or types went stale).
    epoch: AtomicU64,
}

impl StatementCache {
    /// The statement for `tail` (a Parse body after the name) in `tenant`'s namespace.
    pub fn intern(self: &Arc<Self>, tenant: TenantId, tail: &[u8]) -> Arc<Stmt> {
        let mut key = BytesMut::with_capacity(4 + tail.len());
        key.put_u32(tenant);
        key.extend_from_slice(tail);
        let key = key.freeze();
        let epoch = self.epoch.load(Ordering::Relaxed);
        if let Some(s) = self.map.get(&key).and_then(|w| w.upgrade())
            && s.epoch >= epoch
        {
            return s;
        }
        let entry = self.map.entry(key.clone());
        match entry {
            dashmap::Entry::Occupied(mut o) => {
                if let Some(s) = o.get().upgrade()
                    && s.epoch >= epoch
                {
                    return s;
                }
                let s = self.make(key, tail);
                o.insert(Arc::downgrade(&s));
                s
            }
            dashmap::Entry::Vacant(v) => {
                let s = self.make(key, tail);
                v.insert(Arc::downgrade(&s));
                s
            }
        }
    }

    fn make(self: &Arc<Self>, key: Bytes, tail: &[u8]) -> Arc<Stmt> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let epoch = self.epoch.load(Ordering::Relaxed);
        let mut name = PREFIX.to_vec();
        name.extend_from_slice(id.to_string().as_bytes());
        name.push(0);
        let len = 4 + name.len() + tail.len();
        let mut parse = BytesMut::with_capacity(1 + len);
        parse.put_u8(b'P');
        parse.put_u32(len as u32);
        parse.extend_from_slice(&name);
        parse.extend_from_slice(tail);
        Arc::new(Stmt {
            id,
            parse: parse.freeze(),
            name_end: HEADER_LEN + name.len(),
            touches: crate::sniff::sniff(tail),
            epoch,
            key,
            cache: self.clone(),
        })
    }

    /// The statement for `tail` in `tenant`'s namespace, if some client or server
    /// connection holds it now.
    fn get(&self, tenant: TenantId, tail: &[u8]) -> Option<Arc<Stmt>> {
        let mut key = BytesMut::with_capacity(4 + tail.len());
        key.put_u32(tenant);
        key.extend_from_slice(tail);
        let epoch = self.epoch.load(Ordering::Relaxed);
        self.map
            .get(&key[..])
            .and_then(|w| w.upgrade())
            .filter(|s| s.epoch >= epoch)
    }

    /// The schema may have changed: statements interned so far are not handed to new
    /// Parses any more (each text is prepared afresh once, then shared again). Those that
    /// clients hold stay theirs, as on PostgreSQL, where a statement prepared before a
    /// schema change stays that statement.
    pub fn schema_changed(&self) {
        self.epoch.fetch_add(1, Ordering::Relaxed);
    }

    /// Statements alive now.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// A client's statements, by the names it gave them.
#[derive(Debug, Default)]
pub struct ClientStatements {
    map: FastMap<Box<[u8]>, Arc<Stmt>>,
    bytes: usize,
}

impl ClientStatements {
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn get(&self, name: &[u8]) -> Option<&Arc<Stmt>> {
        self.map.get(name)
    }

    /// Would one more statement of `cost` bytes stay within the client's bounds?
    fn check(&self, cost: usize) -> Result<(), PgError> {
        if self.map.len() >= MAX_CLIENT_STATEMENTS {
            return Err(PgError::too_many_statements(&format!(
                "at most {MAX_CLIENT_STATEMENTS} (close some)"
            )));
        }
        if self.bytes + cost > MAX_CLIENT_STATEMENT_BYTES {
            return Err(PgError::too_many_statements(&format!(
                "at most {} MiB of statement text (close some)",
                MAX_CLIENT_STATEMENT_BYTES >> 20
            )));
        }
        Ok(())
    }

    fn insert(&mut self, name: Box<[u8]>, stmt: Arc<Stmt>) {
        self.bytes += name.len() + stmt.cost();
        if let Some(old) = self.map.insert(name, stmt) {
            self.bytes -= old.cost();
        }
    }

    fn remove(&mut self, name: &[u8]) -> Option<Arc<Stmt>> {
        let (k, s) = self.map.remove_entry(name)?;
        self.bytes -= k.len() + s.cost();
        Some(s)
    }
}

/// What one server connection has prepared under proxy names, with use ticks for LRU.
#[derive(Debug, Default)]
pub struct ServerStatements {
    map: FastMap<u64, (Arc<Stmt>, u64)>,
    tick: u64,
    /// The replies the connection owes, in order (empty between transactions; kept here so
    /// its memory is reused rather than allocated per transaction).
    expect: Replies,
}

/// The replies owed, in order: a byte-sized entry per message, and the actions of the few
/// that have one in a queue of their own (most messages are passed through as they are).
#[derive(Debug, Default)]
struct Replies {
    kinds: VecDeque<(Kind, bool)>,
    acts: VecDeque<Act>,
}

impl Replies {
    fn push(&mut self, e: Expect) {
        let has_act = !matches!(e.act, Act::Forward);
        self.kinds.push_back((e.kind, has_act));
        if has_act {
            self.acts.push_back(e.act);
        }
    }

    #[inline]
    fn front_kind(&self) -> Option<Kind> {
        self.kinds.front().map(|&(k, _)| k)
    }

    /// The front entry's action (`None` for a plain pass-through, or when empty).
    #[inline]
    fn front_act(&self) -> Option<&Act> {
        match self.kinds.front() {
            Some((_, true)) => self.acts.front(),
            _ => None,
        }
    }

    fn pop_front(&mut self) -> Option<Expect> {
        let (kind, has_act) = self.kinds.pop_front()?;
        let act = if has_act {
            self.acts.pop_front().unwrap_or(Act::Forward)
        } else {
            Act::Forward
        };
        Some(Expect { kind, act })
    }

    /// Drops the front entry (its reply came and it has nothing to do).
    #[inline]
    fn discard_front(&mut self) {
        if let Some((_, true)) = self.kinds.pop_front() {
            self.acts.pop_front();
        }
    }

    fn len(&self) -> usize {
        self.kinds.len()
    }
}

impl ServerStatements {
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Is the statement there? Marks it used.
    fn touch(&mut self, id: u64) -> bool {
        self.tick += 1;
        match self.map.get_mut(&id) {
            Some(e) => {
                e.1 = self.tick;
                true
            }
            None => false,
        }
    }

    /// Adds a statement; returns the one evicted to stay within `max`.
    fn insert(&mut self, stmt: Arc<Stmt>, max: usize) -> Option<Arc<Stmt>> {
        let evicted = if self.map.len() >= max {
            let oldest = self
                .map
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(id, _)| *id);
            oldest.and_then(|id| self.map.remove(&id)).map(|(s, _)| s)
        } else {
            None
        };
        self.tick += 1;
        self.map.insert(stmt.id, (stmt, self.tick));
        evicted
    }

    /// Puts back a statement whose Close did not happen.
    fn restore(&mut self, stmt: Arc<Stmt>) {
        self.map.entry(stmt.id).or_insert((stmt, 0));
    }

    fn remove(&mut self, id: u64) {
        self.map.remove(&id);
    }

    /// The server dropped everything (DISCARD ALL, DEALLOCATE ALL).
    pub fn clear(&mut self) {
        self.map.clear();
    }
}

/// How the server's answer to one message ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A single message with this tag (ParseComplete, BindComplete, CloseComplete).
    One(u8),
    /// ParameterDescription, then RowDescription or NoData.
    Describe,
    /// Rows, then CommandComplete, EmptyQueryResponse or PortalSuspended.
    Execute,
    /// Sync: ReadyForQuery.
    Sync,
    /// Query or FunctionCall: anything, then ReadyForQuery (an error does not skip).
    Query,
}

impl Kind {
    fn ends_with(self, tag: u8) -> bool {
        match self {
            Kind::One(t) => tag == t,
            Kind::Describe => matches!(tag, b'T' | b'n'),
            Kind::Execute => matches!(tag, b'C' | b'I' | b's'),
            Kind::Sync | Kind::Query => tag == b'Z',
        }
    }

    fn ready(self) -> bool {
        matches!(self, Kind::Sync | Kind::Query)
    }
}

/// What the proxy does when a reply comes (or is skipped).
#[derive(Debug)]
enum Act {
    /// Passed on as it is.
    Forward,
    /// A message that uses the proxy's statement `id`: "does not exist" means the server
    /// lost it behind the proxy's back.
    Uses(u64),
    /// A Parse of statement `id` (the client's own, renamed, or injected, whose
    /// ParseComplete is dropped). If it fails the server does not have it, nor the client
    /// the name it gave.
    Parse {
        id: u64,
        injected: bool,
        client_name: Option<Box<[u8]>>,
    },
    /// An injected Close (its CloseComplete dropped); if it does not happen the server
    /// keeps the evicted statement.
    Close { evicted: Option<Arc<Stmt>> },
    /// A DISCARD ALL: nothing else is rewritten until it is answered.
    Barrier,
    /// Answered by the proxy in its turn; never sent to the server.
    Answer(Answer),
}

#[derive(Debug)]
enum Answer {
    /// ParseComplete for a statement the server connection already had.
    Parsed { name: Box<[u8]> },
    /// CloseComplete for a client's Close of one of its statements.
    Closed {
        name: Box<[u8]>,
        stmt: Option<Arc<Stmt>>,
    },
    /// An error for an extended-protocol message; the batch was skipped to Sync.
    Error(PgError),
    /// A DEALLOCATE query; undone if the transaction had failed.
    Deallocate {
        tag: &'static str,
        undo: Vec<(Box<[u8]>, Arc<Stmt>)>,
    },
    /// An error for a query, then ReadyForQuery.
    QueryError(PgError),
}

/// One message the server will answer (or the proxy will), in stream order.
#[derive(Debug)]
pub struct Expect {
    kind: Kind,
    act: Act,
}

/// ReadyForQuery messages the proxy sent itself: (count, how many said idle).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Answered {
    pub ready: u32,
    pub idle: u32,
}

/// The relay's statement tracking for one transaction: borrows the client's and the server
/// connection's statements.
pub struct Tracker<'a> {
    pub client: &'a mut ClientStatements,
    pub server: &'a mut ServerStatements,
    pub cache: &'a Arc<StatementCache>,
    pub tenant: TenantId,
    /// `max_prepared_statements`.
    pub max: usize,
    /// Body bytes of a message being passed through that are still to come.
    stream_left: usize,
    /// Body bytes of a message being dropped that are still to come.
    drop_left: usize,
    /// The proxy answered an extended-protocol message with an error: drop messages up to
    /// the next Sync, as the server would.
    skip_to_sync: bool,
    /// A DISCARD ALL is on its way: wait for it before rewriting more.
    barrier: bool,
    /// Replies and the queue disagreed: the connection's statement set is not trusted.
    pub desync: bool,
    /// What the statements bound in this transaction may have changed.
    pub touched: Touched,
    /// The server connection may hold SQL-level prepared statements (a client's
    /// `PREPARE`): a client's `DEALLOCATE ALL` must reach the server.
    pub sql_statements: bool,
}

/// A C string at the front of `b`: (bytes before the NUL, length with the NUL).
fn cstr(b: &[u8]) -> Option<(&[u8], usize)> {
    let end = b.iter().position(|&c| c == 0)?;
    Some((&b[..end], end + 1))
}

fn show(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

impl<'a> Tracker<'a> {
    pub fn new(
        client: &'a mut ClientStatements,
        server: &'a mut ServerStatements,
        cache: &'a Arc<StatementCache>,
        tenant: TenantId,
        max: usize,
    ) -> Tracker<'a> {
        Tracker {
            client,
            server,
            cache,
            tenant,
            max,
            stream_left: 0,
            drop_left: 0,
            skip_to_sync: false,
            barrier: false,
            desync: false,
            touched: 0,
            sql_statements: false,
        }
    }

    /// The server connection may hold SQL-level prepared statements.
    pub fn with_sql_statements(mut self, yes: bool) -> Self {
        self.sql_statements = yes;
        self
    }

    /// Waiting on a DISCARD ALL (more client bytes would not be rewritten yet).
    pub fn blocked(&self) -> bool {
        self.barrier
    }

    /// Replies still expected.
    pub fn expecting(&self) -> usize {
        self.server.expect.len()
    }

    #[inline]
    fn expect(&mut self, kind: Kind, act: Act) {
        self.server.expect.push(Expect { kind, act });
    }

    // ---- client -> server ----

    /// Turns the client's bytes `buf[*pos..scanned]` (headers already checked by the
    /// client scanner) into segments for the server, as far as whole names allow.
    pub fn rewrite(
        &mut self,
        buf: &[u8],
        pos: &mut usize,
        scanned: usize,
        out: &mut Out,
    ) -> Result<(), PgError> {
        loop {
            let avail = scanned - *pos;
            if self.stream_left > 0 || self.drop_left > 0 {
                // The rest of a message being passed through (or dropped).
                let dropping = self.drop_left > 0;
                let left = if dropping {
                    &mut self.drop_left
                } else {
                    &mut self.stream_left
                };
                let n = (*left).min(avail);
                *left -= n;
                *pos += n;
                if dropping {
                    out.skip(n);
                } else {
                    out.buf(n);
                }
                if self.stream_left > 0 || self.drop_left > 0 {
                    return Ok(());
                }
                continue;
            }
            if avail == 0 || self.barrier {
                return Ok(());
            }
            let Some((tag, Ok(len))) = header(&buf[*pos..scanned]) else {
                return Ok(());
            };
            let have = avail.min(len);
            let msg = &buf[*pos..*pos + have];
            let body = &msg[HEADER_LEN..];
            let whole = have == len;
            if self.skip_to_sync && tag != b'S' {
                self.drop_message(out, pos, len, have);
                continue;
            }
            match tag {
                b'P' => {
                    if body.first() == Some(&0) {
                        self.pass(out, pos, len, have, Some(Kind::One(b'1')));
                    } else if len == HEADER_LEN {
                        return Err(PgError::protocol_violation("malformed Parse message"));
                    } else if body.is_empty() {
                        if whole {
                            // No name at all: waiting would hold the connection (and buffer
                            // what the client sends next) forever.
                            return Err(PgError::protocol_violation("malformed Parse message"));
                        }
                        return Ok(());
                    } else if len - HEADER_LEN > MAX_CLIENT_STATEMENT_BYTES {
                        let e = PgError::too_many_statements("the statement is too long");
                        self.fail(e, out, pos, len, have);
                    } else if !whole {
                        if cstr(body).is_none() && body.len() > MAX_NAME {
                            return Err(PgError::protocol_violation("statement name too long"));
                        }
                        return Ok(());
                    } else {
                        self.parse(msg, out, pos)?;
                    }
                }
                b'B' => {
                    let names = cstr(body).and_then(|(portal, p)| {
                        cstr(&body[p..]).map(|(stmt, s)| (portal.len(), stmt, p + s))
                    });
                    let Some((portal_len, stmt, names_len)) = names else {
                        if whole || body.len() > 2 * MAX_NAME {
                            return Err(PgError::protocol_violation("malformed Bind message"));
                        }
                        return Ok(());
                    };
                    if stmt.is_empty() {
                        self.pass(out, pos, len, have, Some(Kind::One(b'2')));
                    } else {
                        self.bind(msg, stmt, portal_len, names_len, out, pos, len, have);
                    }
                }
                b'D' | b'C' => {
                    if !whole {
                        if len > HEADER_LEN + 2 + MAX_NAME {
                            return Err(PgError::protocol_violation("name too long"));
                        }
                        return Ok(());
                    }
                    let Some((&what, rest)) = body.split_first() else {
                        return Err(PgError::protocol_violation("malformed message"));
                    };
                    let Some((name, _)) = cstr(rest) else {
                        // No NUL: PostgreSQL ends the connection (08P01), so does the proxy
                        // (it answered a Close like that itself).
                        return Err(PgError::protocol_violation("malformed message"));
                    };
                    match (tag, what) {
                        (b'D', b'S') if !name.is_empty() => {
                            self.describe(name, out, pos, len);
                        }
                        (b'D', b'S') => self.pass(out, pos, len, have, Some(Kind::Describe)),
                        (b'D', _) => self.pass(
                            out,
                            pos,
                            len,
                            have,
                            // A portal: RowDescription or NoData.
                            Some(Kind::Describe),
                        ),
                        (b'C', b'S') if !name.is_empty() => {
                            let name: Box<[u8]> = name.into();
                            let stmt = self.client.remove(&name);
                            out.skip(len);
                            *pos += len;
                            self.expect(
                                Kind::One(b'3'),
                                Act::Answer(Answer::Closed { name, stmt }),
                            );
                        }
                        _ => self.pass(out, pos, len, have, Some(Kind::One(b'3'))),
                    }
                }
                b'Q' => {
                    if len > HEADER_LEN + MAX_INSPECTED_QUERY {
                        self.pass(out, pos, len, have, Some(Kind::Query));
                    } else if !whole {
                        return Ok(());
                    } else {
                        let text = body.strip_suffix(&[0]).unwrap_or(body);
                        self.query(text, out, pos, len);
                    }
                }
                b'S' => {
                    self.skip_to_sync = false;
                    self.pass(out, pos, len, have, Some(Kind::Sync));
                }
                b'E' => self.pass(out, pos, len, have, Some(Kind::Execute)),
                b'F' => self.pass(out, pos, len, have, Some(Kind::Query)),
                _ => self.pass(out, pos, len, have, None),
            }
        }
    }

    /// Passes a message through unchanged (streaming its body).
    fn pass(
        &mut self,
        out: &mut Out,
        pos: &mut usize,
        len: usize,
        have: usize,
        kind: Option<Kind>,
    ) {
        if let Some(kind) = kind {
            self.server.expect.kinds.push_back((kind, false));
        }
        out.buf(have);
        *pos += have;
        self.stream_left = len - have;
    }

    fn drop_message(&mut self, out: &mut Out, pos: &mut usize, len: usize, have: usize) {
        out.skip(have);
        *pos += have;
        self.drop_left = len - have;
    }

    /// Answers the current extended-protocol message with an error and skips to Sync.
    fn fail(&mut self, e: PgError, out: &mut Out, pos: &mut usize, len: usize, have: usize) {
        self.expect(Kind::One(0), Act::Answer(Answer::Error(e)));
        self.skip_to_sync = true;
        self.drop_message(out, pos, len, have);
    }

    /// Queues what makes the server connection have `stmt`: a Close of any stale copy
    /// (and of the statement evicted to make room), then the Parse.
    fn prepare_on_server(
        &mut self,
        stmt: &Arc<Stmt>,
        out: &mut Out,
        injected: bool,
        client_name: Option<Box<[u8]>>,
    ) {
        if let Some(old) = self.server.insert(stmt.clone(), self.max) {
            put_close(out, old.name());
            self.expect(Kind::One(b'3'), Act::Close { evicted: Some(old) });
        }
        // The connection should not have it; if some DEALLOCATE the proxy did not see
        // left it half-known, this makes the Parse safe anyway.
        put_close(out, stmt.name());
        self.expect(Kind::One(b'3'), Act::Close { evicted: None });
        out.own(stmt.parse_message());
        self.expect(
            Kind::One(b'1'),
            Act::Parse {
                id: stmt.id,
                injected,
                client_name,
            },
        );
    }

    /// A named Parse, whole in `msg`.
    fn parse(&mut self, msg: &[u8], out: &mut Out, pos: &mut usize) -> Result<(), PgError> {
        let len = msg.len();
        let body = &msg[HEADER_LEN..];
        let Some((name, n)) = cstr(body) else {
            return Err(PgError::protocol_violation("malformed Parse message"));
        };
        if name.len() > MAX_NAME {
            return Err(PgError::protocol_violation("statement name too long"));
        }
        if self.client.get(name).is_some() {
            let e = PgError::duplicate_statement(&show(name));
            self.fail(e, out, pos, len, len);
            return Ok(());
        }
        let tail = &body[n..];
        if let Err(e) = self.client.check(len + name.len() + 64) {
            self.fail(e, out, pos, len, len);
            return Ok(());
        }
        let stmt = self.cache.intern(self.tenant, tail);
        let name: Box<[u8]> = name.into();
        self.client.insert(name.clone(), stmt.clone());
        out.skip(len);
        *pos += len;
        if self.server.touch(stmt.id) {
            self.expect(Kind::One(b'1'), Act::Answer(Answer::Parsed { name }));
        } else {
            self.prepare_on_server(&stmt, out, false, Some(name));
        }
        Ok(())
    }

    /// The statement a Bind or Describe names, made ready on the server; `None` when the
    /// client has no such statement.
    fn resolve(&mut self, name: &[u8], out: &mut Out) -> Option<Arc<Stmt>> {
        let stmt = self.client.get(name)?.clone();
        if !self.server.touch(stmt.id) {
            self.prepare_on_server(&stmt, out, true, None);
        }
        Some(stmt)
    }

    #[allow(clippy::too_many_arguments)]
    fn bind(
        &mut self,
        msg_prefix: &[u8],
        name: &[u8],
        portal_len: usize,
        names_len: usize,
        out: &mut Out,
        pos: &mut usize,
        len: usize,
        have: usize,
    ) {
        let Some(stmt) = self.resolve(name, out) else {
            return self.unknown(name, Kind::One(b'2'), out, pos, len, have);
        };
        self.touched |= stmt.touches;
        // Header, portal name and statement name are written anew (a few bytes); the
        // parameters that follow are forwarded from the client's buffer.
        let new_name = stmt.name();
        let new_len = len - (name.len() + 1) + new_name.len();
        let portal = &msg_prefix[HEADER_LEN..HEADER_LEN + portal_len + 1];
        out.own_with(|b| {
            b.put_u8(b'B');
            b.put_u32((new_len - 1) as u32);
            b.extend_from_slice(portal);
            b.extend_from_slice(new_name);
        });
        out.skip(HEADER_LEN + names_len);
        let done = HEADER_LEN + names_len;
        *pos += done;
        self.expect(Kind::One(b'2'), Act::Uses(stmt.id));
        self.stream_left = len - done;
        let n = self.stream_left.min(have - done);
        out.buf(n);
        *pos += n;
        self.stream_left -= n;
    }

    fn describe(&mut self, name: &[u8], out: &mut Out, pos: &mut usize, len: usize) {
        let Some(stmt) = self.resolve(name, out) else {
            return self.unknown(name, Kind::Describe, out, pos, len, len);
        };
        out.skip(len);
        *pos += len;
        let new_name = stmt.name();
        out.own_with(|b| {
            b.put_u8(b'D');
            b.put_u32((4 + 1 + new_name.len()) as u32);
            b.put_u8(b'S');
            b.extend_from_slice(new_name);
        });
        self.expect(Kind::Describe, Act::Uses(stmt.id));
    }

    /// A name the client never prepared: the server gives its own error, unless the name
    /// looks like one of the proxy's (the proxy answers; the server must not run it).
    fn unknown(
        &mut self,
        name: &[u8],
        kind: Kind,
        out: &mut Out,
        pos: &mut usize,
        len: usize,
        have: usize,
    ) {
        if name.starts_with(PREFIX) {
            self.fail(PgError::unknown_statement(&show(name)), out, pos, len, have);
        } else {
            self.pass(out, pos, len, have, Some(kind));
        }
    }

    /// A small Query: DEALLOCATE of the client's statements is answered here, DISCARD ALL
    /// is a barrier; the rest passes.
    fn query(&mut self, text: &[u8], out: &mut Out, pos: &mut usize, len: usize) {
        let answer = match sql_command(text) {
            // The server has SQL-level statements (of this client, or left for it): it runs the
            // DEALLOCATE ALL, and its CommandComplete clears the client's and the
            // connection's sets (`all_gone`).
            SqlCommand::DeallocateAll if self.sql_statements => None,
            SqlCommand::DeallocateAll => {
                let undo: Vec<_> = std::mem::take(&mut self.client.map).into_iter().collect();
                self.client.bytes = 0;
                Some(Answer::Deallocate {
                    tag: "DEALLOCATE ALL",
                    undo,
                })
            }
            SqlCommand::Deallocate(name) => match self.client.remove(&name) {
                Some(stmt) => Some(Answer::Deallocate {
                    tag: "DEALLOCATE",
                    undo: vec![(name.into(), stmt)],
                }),
                None if name.starts_with(PREFIX) => {
                    Some(Answer::QueryError(PgError::unknown_statement(&show(&name))))
                }
                None => None,
            },
            SqlCommand::DiscardAll => {
                self.barrier = true;
                self.expect(Kind::Query, Act::Barrier);
                self.pass(out, pos, len, len, None);
                return;
            }
            SqlCommand::Other => None,
        };
        match answer {
            Some(a) => {
                out.skip(len);
                *pos += len;
                self.expect(Kind::Query, Act::Answer(a));
            }
            None => self.pass(out, pos, len, len, Some(Kind::Query)),
        }
    }

    // ---- server -> client ----

    /// Is the server message starting now with `tag` a reply the client must not see?
    #[inline]
    pub fn drops(&self, tag: u8) -> bool {
        match self.server.expect.front_act() {
            Some(Act::Parse { injected: true, .. } | Act::Close { .. }) => self
                .server
                .expect
                .front_kind()
                .is_some_and(|k| k.ends_with(tag)),
            _ => false,
        }
    }

    /// A server message ended. `code` is an ErrorResponse's SQLSTATE. Returns whether
    /// answers of the proxy are now due (then [`Tracker::answer`] sends them): their turn
    /// came, or it came while this message was passing (the answers wait for its end).
    pub fn reply(&mut self, tag: u8, code: Option<&str>) -> bool {
        match tag {
            // Asynchronous: NoticeResponse, NotificationResponse, ParameterStatus.
            b'N' | b'A' | b'S' => {}
            b'E' => self.server_error(code),
            b'Z' if matches!(self.server.expect.kinds.front(), Some((k, false)) if k.ready()) => {
                self.server.expect.discard_front();
            }
            b'Z' => {
                // Pops through the Sync/Query this answers; anything before it did not get
                // its reply (should not happen): treated as skipped.
                let mut undo = Vec::new();
                loop {
                    let Some(e) = self.server.expect.pop_front() else {
                        self.desync = true;
                        break;
                    };
                    if e.kind.ready() {
                        if matches!(e.act, Act::Barrier) {
                            self.barrier = false;
                        }
                        break;
                    }
                    self.desync = true;
                    undo.push(e);
                }
                self.undo(undo);
            }
            _ => {
                if self
                    .server
                    .expect
                    .front_kind()
                    .is_some_and(|k| k.ends_with(tag))
                {
                    self.server.expect.discard_front();
                }
            }
        }
        matches!(self.server.expect.front_act(), Some(Act::Answer(_)))
    }

    /// The server answered the front message with an error: it skips to Sync.
    fn server_error(&mut self, code: Option<&str>) {
        let Some(front) = self.server.expect.front_kind() else {
            return;
        };
        if front.ready() {
            // A query's error, or one at Sync: ReadyForQuery follows.
            return;
        }
        let mut undo = Vec::new();
        if let Some(e) = self.server.expect.pop_front() {
            if let Act::Uses(id) = e.act {
                match code {
                    // Lost behind the proxy's back.
                    Some("26000") => self.server.remove(id),
                    // The server's copy went stale: "cached plan must not change result
                    // type" (0A000), "cache lookup failed for type" (XX000) after a type
                    // was dropped. This connection prepares it afresh at its next use, and
                    // new Parses of any text get fresh statements: the schema changed.
                    Some("0A000" | "XX000") => {
                        self.server.remove(id);
                        self.cache.schema_changed();
                    }
                    _ => {}
                }
            }
            undo.push(e);
        }
        while self
            .server
            .expect
            .front_kind()
            .is_some_and(|k| k != Kind::Sync)
        {
            undo.push(self.server.expect.pop_front().expect("front exists"));
        }
        self.undo(undo);
        if self.server.expect.front_kind().is_none() {
            // The client's Sync has not come yet: the server ignores everything until it,
            // so what the client sends until then is skipped here too (PostgreSQL flushes
            // an error at once: a client may well send more after it came back).
            self.skip_to_sync = true;
        }
    }

    /// Undoes what messages that failed or never ran (in stream order) would have done:
    /// last first, so that a Parse then a Close of one name leaves it as it was before both.
    fn undo(&mut self, skipped: Vec<Expect>) {
        for e in skipped.into_iter().rev() {
            self.skipped(e);
        }
    }

    /// Undoes what a message that failed or never ran would have done.
    fn skipped(&mut self, e: Expect) {
        match e.act {
            Act::Parse {
                id, client_name, ..
            } => {
                self.server.remove(id);
                if let Some(n) = client_name {
                    self.client.remove(&n);
                }
            }
            Act::Close { evicted: Some(s) } => self.server.restore(s),
            Act::Barrier => self.barrier = false,
            Act::Answer(Answer::Parsed { name }) => {
                self.client.remove(&name);
            }
            Act::Answer(Answer::Closed {
                name,
                stmt: Some(s),
            }) => self.client.insert(name, s),
            Act::Answer(Answer::Deallocate { undo, .. }) => {
                for (n, s) in undo {
                    self.client.insert(n, s);
                }
            }
            _ => {}
        }
    }

    /// Sends the answers at the front of the queue (their turn has come).
    pub fn answer(&mut self, status: u8, out: &mut Out) -> Answered {
        let mut a = Answered::default();
        while matches!(self.server.expect.front_act(), Some(Act::Answer(_))) {
            let Some(Expect {
                act: Act::Answer(answer),
                ..
            }) = self.server.expect.pop_front()
            else {
                unreachable!()
            };
            match answer {
                Answer::Parsed { .. } => out.own(b"1\0\0\0\x04"),
                Answer::Closed { .. } => out.own(b"3\0\0\0\x04"),
                Answer::Error(e) => out.own_with(|b| e.encode(b)),
                Answer::Deallocate { tag, undo } => {
                    if status == b'E' {
                        for (n, s) in undo {
                            self.client.insert(n, s);
                        }
                        out.own_with(|b| PgError::in_failed_transaction().encode(b));
                    } else {
                        out.own_with(|b| put_command_complete(b, tag));
                    }
                    out.own_with(|b| put_ready_for_query(b, status));
                    a.ready += 1;
                    a.idle += u32::from(status == b'I');
                }
                Answer::QueryError(e) => {
                    out.own_with(|b| {
                        e.encode(b);
                        put_ready_for_query(b, status);
                    });
                    a.ready += 1;
                    a.idle += u32::from(status == b'I');
                }
            }
        }
        a
    }

    /// The server ran a DEALLOCATE the proxy did not answer (inside a multi-statement
    /// query string, so the name is unknown): which statements the connection has is not
    /// known any more. Forgetting them all is safe: a statement is prepared again with a
    /// Close ahead of its Parse.
    pub fn some_gone(&mut self) {
        self.server.clear();
    }

    /// The server dropped all its prepared statements (a client's DISCARD ALL or
    /// DEALLOCATE ALL it ran): so did the client.
    pub fn all_gone(&mut self) {
        self.server.clear();
        self.client.map.clear();
        self.client.bytes = 0;
    }

    /// The relay ends without the replies (server lost): undo what they would have undone.
    pub fn abandon(&mut self) {
        let mut undo = Vec::new();
        while let Some(e) = self.server.expect.pop_front() {
            undo.push(e);
        }
        self.undo(undo);
    }
}

/// Answers, without a server connection, a batch that needs none: Parses of statements
/// the tenant already has and Closes, then Sync (what libpq's `PQprepare` sends). The
/// client is between transactions, so it gets ReadyForQuery "idle". Returns `None` when
/// the batch needs a server (anything else, or anything unusual).
///
/// Beyond saving a round trip, this keeps a client that prepares synchronously while the
/// pool is busy (pgbench -M prepared, one thread for many clients) from waiting on a
/// connection held by a client that waits on it.
pub fn answer_alone(
    client: &mut ClientStatements,
    cache: &StatementCache,
    tenant: TenantId,
    batch: &[u8],
) -> Option<BytesMut> {
    enum Step<'b> {
        Parse(&'b [u8], Arc<Stmt>),
        Close(&'b [u8]),
    }
    let mut steps = Vec::new();
    let mut pos = 0;
    let mut synced = false;
    while pos < batch.len() {
        let (tag, Ok(len)) = header(&batch[pos..])? else {
            return None;
        };
        if synced || pos + len > batch.len() {
            return None;
        }
        let body = &batch[pos + HEADER_LEN..pos + len];
        let name_used = |steps: &[Step<'_>], name: &[u8]| {
            steps.iter().any(|s| match s {
                Step::Parse(n, _) | Step::Close(n) => *n == name,
            })
        };
        match tag {
            b'P' => {
                let (name, n) = cstr(body)?;
                if name.is_empty()
                    || name.len() > MAX_NAME
                    || client.get(name).is_some()
                    || name_used(&steps, name)
                {
                    return None;
                }
                let stmt = cache.get(tenant, &body[n..])?;
                steps.push(Step::Parse(name, stmt));
            }
            b'C' if body.first() == Some(&b'S') => {
                let (name, _) = cstr(&body[1..])?;
                if name.is_empty() || name_used(&steps, name) {
                    return None;
                }
                steps.push(Step::Close(name));
            }
            b'S' => synced = true,
            _ => return None,
        }
        pos += len;
    }
    if !synced {
        return None;
    }
    let mut cost = 0;
    for s in &steps {
        if let Step::Parse(name, stmt) = s {
            cost += name.len() + stmt.cost();
        }
    }
    if client.map.len() + steps.len() > MAX_CLIENT_STATEMENTS
        || client.bytes + cost > MAX_CLIENT_STATEMENT_BYTES
    {
        return None;
    }
    let mut out = BytesMut::with_capacity(5 * steps.len() + 6);
    for s in steps {
        match s {
            Step::Parse(name, stmt) => {
                client.insert(name.into(), stmt);
                out.extend_from_slice(b"1\0\0\0\x04");
            }
            Step::Close(name) => {
                client.remove(name);
                out.extend_from_slice(b"3\0\0\0\x04");
            }
        }
    }
    put_ready_for_query(&mut out, b'I');
    Some(out)
}

/// Appends a Close of the statement `name` (with its NUL).
fn put_close(out: &mut Out, name: &[u8]) {
    out.own_with(|b| {
        b.put_u8(b'C');
        b.put_u32((4 + 1 + name.len()) as u32);
        b.put_u8(b'S');
        b.extend_from_slice(name);
    });
}

/// The few SQL commands about prepared statements the proxy must see.
#[doc(hidden)]
#[derive(Debug, PartialEq, Eq)]
pub enum SqlCommand {
    DeallocateAll,
    Deallocate(Vec<u8>),
    DiscardAll,
    Other,
}

/// Recognises `DEALLOCATE [PREPARE] name|ALL` and `DISCARD ALL` as a whole query string
/// (one statement, an optional `;`, no comments). Public for the fuzz targets' model server.
#[doc(hidden)]
pub fn sql_command(text: &[u8]) -> SqlCommand {
    // Most queries: not a D word.
    if !matches!(text.trim_ascii_start().first(), Some(b'd' | b'D')) {
        return SqlCommand::Other;
    }
    let mut words = SqlWords { s: text };
    let Some(first) = words.next() else {
        return SqlCommand::Other;
    };
    let cmd = if first.eq_ignore_ascii_case(b"discard") {
        match words.next() {
            Some(w) if w.eq_ignore_ascii_case(b"all") => SqlCommand::DiscardAll,
            _ => return SqlCommand::Other,
        }
    } else if first.eq_ignore_ascii_case(b"deallocate") {
        let mut w = words.next();
        if w.as_deref()
            .is_some_and(|w| w.eq_ignore_ascii_case(b"prepare"))
        {
            w = words.next();
        }
        match w {
            Some(w) if w.eq_ignore_ascii_case(b"all") => SqlCommand::DeallocateAll,
            Some(name) => SqlCommand::Deallocate(name),
            None => return SqlCommand::Other,
        }
    } else {
        return SqlCommand::Other;
    };
    match words.next() {
        None => cmd,
        Some(_) => SqlCommand::Other,
    }
}

/// Words of a simple SQL command: identifiers (unquoted ones lower-cased, as PostgreSQL
/// folds them), quoted identifiers, and a trailing `;`. Anything else ends the command
/// as "not recognised" (an empty word).
struct SqlWords<'a> {
    s: &'a [u8],
}

impl Iterator for SqlWords<'_> {
    type Item = Vec<u8>;

    fn next(&mut self) -> Option<Vec<u8>> {
        let s = self.s.trim_ascii_start();
        let s = match s.strip_prefix(b";") {
            Some(rest) if rest.trim_ascii().is_empty() => &[][..],
            _ => s,
        };
        if s.is_empty() {
            self.s = s;
            return None;
        }
        if s[0] == b'"' {
            let mut word = Vec::new();
            let mut i = 1;
            while i < s.len() {
                if s[i] == b'"' {
                    if s.get(i + 1) == Some(&b'"') {
                        word.push(b'"');
                        i += 2;
                        continue;
                    }
                    self.s = &s[i + 1..];
                    return Some(word);
                }
                word.push(s[i]);
                i += 1;
            }
            self.s = &[];
            return Some(Vec::new());
        }
        let end = s
            .iter()
            .position(|&c| !(c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80))
            .unwrap_or(s.len());
        if end == 0 {
            // Not a word: the command is something else.
            self.s = &[];
            return Some(Vec::new());
        }
        self.s = &s[end..];
        Some(s[..end].to_ascii_lowercase())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_statement_commands() {
        assert_eq!(sql_command(b"DEALLOCATE ALL"), SqlCommand::DeallocateAll);
        assert_eq!(
            sql_command(b"  deallocate prepare ALL ; "),
            SqlCommand::DeallocateAll
        );
        assert_eq!(
            sql_command(b"DEALLOCATE Foo"),
            SqlCommand::Deallocate(b"foo".to_vec())
        );
        assert_eq!(
            sql_command(b"DEALLOCATE \"Foo\"\"x\";"),
            SqlCommand::Deallocate(b"Foo\"x".to_vec())
        );
        assert_eq!(sql_command(b"discard all"), SqlCommand::DiscardAll);
        assert_eq!(sql_command(b"DISCARD TEMP"), SqlCommand::Other);
        assert_eq!(sql_command(b"DEALLOCATE a; SELECT 1"), SqlCommand::Other);
        assert_eq!(sql_command(b"/* x */ DEALLOCATE a"), SqlCommand::Other);
        assert_eq!(sql_command(b"SELECT 1"), SqlCommand::Other);
        assert_eq!(sql_command(b""), SqlCommand::Other);
    }

    #[test]
    fn cache_interns_per_tenant_and_forgets_unused() {
        let cache = Arc::new(StatementCache::default());
        let a = cache.intern(1, b"SELECT 1\0\0\0");
        let b = cache.intern(1, b"SELECT 1\0\0\0");
        let c = cache.intern(2, b"SELECT 1\0\0\0");
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, c.id);
        assert_eq!(cache.len(), 2);
        assert!(a.name().starts_with(PREFIX) && a.name().ends_with(&[0]));
        assert_eq!(&a.parse_message()[a.name_end..], b"SELECT 1\0\0\0");
        drop((a, b));
        assert_eq!(cache.len(), 1);
        drop(c);
        assert!(cache.is_empty());
    }

    #[test]
    fn server_statements_evict_least_recently_used() {
        let cache = Arc::new(StatementCache::default());
        let s: Vec<_> = (0..3)
            .map(|i| cache.intern(1, format!("SELECT {i}\0\0\0").as_bytes()))
            .collect();
        let mut set = ServerStatements::default();
        assert!(set.insert(s[0].clone(), 2).is_none());
        assert!(set.insert(s[1].clone(), 2).is_none());
        assert!(set.touch(s[0].id));
        let evicted = set.insert(s[2].clone(), 2).unwrap();
        assert_eq!(evicted.id, s[1].id);
        assert_eq!(set.len(), 2);
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    /// Runs the rewriter over `input`, returning what the server would get.
    fn rewrite_all(t: &mut Tracker<'_>, input: &[u8]) -> Vec<u8> {
        let mut out = Out::default();
        let mut pos = 0;
        t.rewrite(input, &mut pos, input.len(), &mut out).unwrap();
        assert_eq!(pos, input.len());
        out.flatten(input)
    }

    /// Every whole message, however malformed its body, is either refused (08P01) or
    /// handed on (sent, dropped or answered): never waited on, which would pin the
    /// server connection while the relay reads the client's bytes without end.
    #[test]
    fn malformed_whole_messages_are_never_waited_on() {
        let bodies: [&[u8]; 9] = [
            b"",
            b"\0",
            b"x",
            b"S",
            b"P",
            b"Sname",
            b"name",
            b"\0\0",
            b"name\0\xff\xff",
        ];
        for tag in [
            b'P', b'B', b'D', b'C', b'Q', b'E', b'H', b'F', b'd', b'c', b'f',
        ] {
            for body in bodies {
                let cache = Arc::new(StatementCache::default());
                let mut client = ClientStatements::default();
                let mut server = ServerStatements::default();
                let mut t = Tracker::new(&mut client, &mut server, &cache, 0, 10);
                let mut input = msg(tag, body);
                input.extend(msg(b'S', b""));
                let mut out = Out::default();
                let mut pos = 0;
                if t.rewrite(&input, &mut pos, input.len(), &mut out).is_ok() {
                    assert_eq!(
                        pos,
                        input.len(),
                        "{} {:?} waited on",
                        tag as char,
                        String::from_utf8_lossy(body)
                    );
                }
            }
        }
    }

    #[test]
    fn renames_and_prepares_once_per_connection() {
        let cache = Arc::new(StatementCache::default());
        let mut client = ClientStatements::default();
        let mut server = ServerStatements::default();
        let mut t = Tracker::new(&mut client, &mut server, &cache, 0, 10);
        let mut input = msg(b'P', b"s1\0SELECT $1\0\0\0");
        input.extend(msg(b'B', b"\0s1\0\0\0\0\x01\0\0\0\x011\0\0"));
        input.extend(msg(b'S', b""));
        let sent = rewrite_all(&mut t, &input);
        let parse = cache.intern(0, b"SELECT $1\0\0\0");
        let name = parse.name().to_vec();
        let mut want = Vec::new();
        let mut close = vec![b'S'];
        close.extend(&name);
        want.extend(msg(b'C', &close));
        want.extend(parse.parse_message());
        let mut bind = vec![0];
        bind.extend(&name);
        bind.extend(b"\0\0\0\x01\0\0\0\x011\0\0");
        want.extend(msg(b'B', &bind));
        want.extend(msg(b'S', b""));
        assert_eq!(sent, want);
        // Replies: the Close's CloseComplete is dropped, the rest passes.
        assert!(t.drops(b'3'));
        assert!(!t.reply(b'3', None));
        assert!(!t.drops(b'1'));
        t.reply(b'1', None);
        t.reply(b'2', None);
        t.reply(b'Z', None);
        assert_eq!(t.expecting(), 0);
        assert!(!t.desync);

        // Same name again: 42P05 from the proxy, the batch skipped to Sync.
        let mut input = msg(b'P', b"s1\0SELECT $1\0\0\0");
        input.extend(msg(b'E', b"\0\0\0\0\0"));
        input.extend(msg(b'S', b""));
        let sent = rewrite_all(&mut t, &input);
        assert_eq!(sent, msg(b'S', b""));
        let mut back = Out::default();
        t.answer(b'I', &mut back);
        let answered = back.flatten(&[]);
        assert_eq!(answered[0], b'E');
        assert!(String::from_utf8_lossy(&answered).contains("42P05"));
        t.reply(b'Z', None);
        assert_eq!(t.expecting(), 0);

        // Another client of the tenant: its Parse is answered by the proxy.
        let mut other = ClientStatements::default();
        let mut t = Tracker::new(&mut other, &mut server, &cache, 0, 10);
        let mut input = msg(b'P', b"x\0SELECT $1\0\0\0");
        input.extend(msg(b'S', b""));
        let sent = rewrite_all(&mut t, &input);
        assert_eq!(sent, msg(b'S', b""));
        let mut back = Out::default();
        t.answer(b'I', &mut back);
        assert_eq!(back.flatten(&[]), b"1\0\0\0\x04");
    }

    #[test]
    fn known_statements_are_prepared_without_a_server() {
        let cache = Arc::new(StatementCache::default());
        let held = cache.intern(3, b"SELECT 1\0\0\0");
        let mut client = ClientStatements::default();
        let mut batch = msg(b'P', b"a\0SELECT 1\0\0\0");
        batch.extend(msg(b'C', b"Sold\0"));
        batch.extend(msg(b'S', b""));
        let reply = answer_alone(&mut client, &cache, 3, &batch).unwrap();
        assert_eq!(&reply[..], b"1\0\0\0\x043\0\0\0\x04Z\0\0\0\x05I");
        assert_eq!(client.get(b"a").unwrap().id, held.id);
        // Unknown text, another tenant, a duplicate name, no Sync: the server is needed.
        for (tenant, batch) in [
            (
                3,
                [msg(b'P', b"b\0SELECT 2\0\0\0"), msg(b'S', b"")].concat(),
            ),
            (
                4,
                [msg(b'P', b"b\0SELECT 1\0\0\0"), msg(b'S', b"")].concat(),
            ),
            (
                3,
                [msg(b'P', b"a\0SELECT 1\0\0\0"), msg(b'S', b"")].concat(),
            ),
            (3, msg(b'P', b"b\0SELECT 1\0\0\0")),
        ] {
            assert!(answer_alone(&mut client, &cache, tenant, &batch).is_none());
        }
        assert_eq!(client.len(), 1);
    }

    #[test]
    fn an_answer_deferred_by_a_passing_notice_goes_out_at_its_end() {
        let cache = Arc::new(StatementCache::default());
        let mut client = ClientStatements::default();
        let mut server = ServerStatements::default();
        let stmt = cache.intern(0, b"SELECT 1\0\0\0");
        server.insert(stmt.clone(), 10);
        let mut t = Tracker::new(&mut client, &mut server, &cache, 0, 10);
        // The Parse is answered by the proxy; suppose a NoticeResponse was passing then.
        let mut input = msg(b'P', b"a\0SELECT 1\0\0\0");
        input.extend(msg(b'S', b""));
        assert_eq!(rewrite_all(&mut t, &input), msg(b'S', b""));
        // The notice ends: the ParseComplete is due, before the Sync's ReadyForQuery.
        assert!(t.reply(b'N', None));
        let mut back = Out::default();
        t.answer(b'I', &mut back);
        assert_eq!(back.flatten(&[]), b"1\0\0\0\x04");
        assert!(!t.reply(b'Z', None));
        assert_eq!(t.expecting(), 0);
        assert!(!t.desync);
    }

    #[test]
    fn failed_injected_parse_undoes_and_skips() {
        let cache = Arc::new(StatementCache::default());
        let mut client = ClientStatements::default();
        let mut server = ServerStatements::default();
        let stmt = cache.intern(0, b"SELECT nope\0\0\0");
        client.insert((*b"s").into(), stmt.clone());
        let mut t = Tracker::new(&mut client, &mut server, &cache, 0, 10);
        let mut input = msg(b'B', b"\0s\0\0\0\0\0\0\0");
        input.extend(msg(b'E', b"\0\0\0\0\0"));
        input.extend(msg(b'S', b""));
        rewrite_all(&mut t, &input);
        assert_eq!(t.expecting(), 5); // Close, Parse, Bind, Execute, Sync
        t.reply(b'3', None);
        assert!(!t.drops(b'E'));
        t.reply(b'E', Some("42P01"));
        assert_eq!(t.expecting(), 1);
        t.reply(b'Z', None);
        assert_eq!(t.expecting(), 0);
        assert!(!t.server.touch(stmt.id));
        assert!(t.client.get(b"s").is_some());
    }

    #[test]
    fn a_parse_without_a_body_is_a_violation_not_a_wait() {
        // Found by the tracker fuzz target: `P` with length 4 was waited on for ever.
        let cache = Arc::new(StatementCache::default());
        let mut client = ClientStatements::default();
        let mut server = ServerStatements::default();
        let mut t = Tracker::new(&mut client, &mut server, &cache, 0, 10);
        let mut input = msg(b'P', b"");
        input.extend(msg(b'S', b""));
        let (mut pos, mut out) = (0, Out::default());
        let e = t
            .rewrite(&input, &mut pos, input.len(), &mut out)
            .unwrap_err();
        assert_eq!(e.code, "08P01");
        // A Parse whose body has not come yet: wait for it.
        let input = msg(b'P', b"a\0SELECT 1\0\0\0");
        let (mut pos, mut out) = (0, Out::default());
        t.rewrite(&input, &mut pos, 5, &mut out).unwrap();
        assert_eq!(pos, 0);
    }

    #[test]
    fn describe_or_close_without_a_nul_is_a_violation() {
        // Found by the tracker fuzz target: the proxy answered CloseComplete to a Close whose
        // name had no terminator, where PostgreSQL ends the connection.
        let cache = Arc::new(StatementCache::default());
        let mut client = ClientStatements::default();
        let mut server = ServerStatements::default();
        let mut t = Tracker::new(&mut client, &mut server, &cache, 0, 10);
        for m in [msg(b'C', b"Sname"), msg(b'D', b"Sname"), msg(b'C', b"P")] {
            let (mut pos, mut out) = (0, Out::default());
            let e = t.rewrite(&m, &mut pos, m.len(), &mut out).unwrap_err();
            assert_eq!(e.code, "08P01");
        }
    }

    #[test]
    fn messages_after_an_error_already_answered_are_skipped_as_the_server_skips_them() {
        // PostgreSQL flushes an ErrorResponse at once and then ignores everything up to the
        // next Sync. Messages the client sends after the error came back must be skipped
        // by the proxy too: not answered by it, not expected from the server.
        let cache = Arc::new(StatementCache::default());
        let mut client = ClientStatements::default();
        let mut server = ServerStatements::default();
        server.insert(cache.intern(0, b"SELECT 1\0\0\0"), 10);
        let mut t = Tracker::new(&mut client, &mut server, &cache, 0, 10);
        rewrite_all(&mut t, &msg(b'P', b"a\0SELECT bad\0\0\0"));
        assert!(!t.reply(b'3', None));
        assert!(!t.reply(b'E', Some("42601")));
        assert_eq!(t.expecting(), 0);
        // Then: a Parse the proxy would answer itself, one it would send, and Sync.
        let mut input = msg(b'P', b"c\0SELECT 1\0\0\0");
        input.extend(msg(b'P', b"b\0SELECT 2\0\0\0"));
        input.extend(msg(b'S', b""));
        assert_eq!(rewrite_all(&mut t, &input), msg(b'S', b""));
        let mut back = Out::default();
        assert_eq!(t.answer(b'I', &mut back), Answered::default());
        assert!(back.is_empty(), "no ParseComplete after the error");
        assert!(!t.reply(b'Z', None));
        assert!(!t.desync);
        assert_eq!(t.expecting(), 0);
        assert!(t.client.is_empty());
    }

    #[test]
    fn skipped_messages_are_undone_last_first() {
        // Found by the tracker fuzz target: Parse "x" then Close "x" in a batch that an
        // earlier error skipped left "x" with the client (the Close's undo came last).
        let cache = Arc::new(StatementCache::default());
        let mut client = ClientStatements::default();
        let mut server = ServerStatements::default();
        let mut t = Tracker::new(&mut client, &mut server, &cache, 0, 10);
        let mut input = msg(b'D', b"Snope\0");
        input.extend(msg(b'P', b"x\0SELECT 1\0\0\0"));
        input.extend(msg(b'C', b"Sx\0"));
        input.extend(msg(b'S', b""));
        rewrite_all(&mut t, &input);
        assert!(t.client.is_empty());
        assert!(!t.reply(b'E', Some("26000")));
        assert!(t.client.is_empty(), "neither the Parse nor the Close ran");
        assert!(!t.reply(b'Z', None));
        assert_eq!(t.expecting(), 0);
        assert!(!t.desync);
        // A DEALLOCATE then a Parse of the same name, skipped: the old statement is back.
        let old = cache.intern(0, b"SELECT 2\0\0\0");
        t.client.insert((*b"y").into(), old.clone());
        let mut input = msg(b'D', b"Snope\0");
        input.extend(msg(b'C', b"Sy\0"));
        input.extend(msg(b'P', b"y\0SELECT 3\0\0\0"));
        input.extend(msg(b'S', b""));
        rewrite_all(&mut t, &input);
        assert!(!t.reply(b'E', Some("26000")));
        assert_eq!(t.client.get(b"y").map(|s| s.id), Some(old.id));
    }

    #[test]
    fn deallocate_is_answered_and_undone_in_failed_transaction() {
        let cache = Arc::new(StatementCache::default());
        let mut client = ClientStatements::default();
        let mut server = ServerStatements::default();
        client.insert((*b"s").into(), cache.intern(0, b"SELECT 1\0\0\0"));
        let mut t = Tracker::new(&mut client, &mut server, &cache, 0, 10);
        let q = msg(b'Q', b"DEALLOCATE s\0");
        assert!(rewrite_all(&mut t, &q).is_empty());
        assert!(t.client.is_empty());
        let mut back = Out::default();
        let a = t.answer(b'E', &mut back);
        assert_eq!(a, Answered { ready: 1, idle: 0 });
        assert!(String::from_utf8_lossy(&back.flatten(&[])).contains("25P02"));
        assert_eq!(t.client.len(), 1);
    }
}
