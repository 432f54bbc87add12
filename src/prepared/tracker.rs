//! The rewriter: renames statements in the client's messages, injects the Parse a server
//! connection lacks, answers what the server need not see, and on the way back drops the
//! replies to injected messages and puts its own answers in their place.

use super::*;

/// How the server's answer to one message ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
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
    pub(super) fn ends_with(self, tag: u8) -> bool {
        match self {
            Kind::One(t) => tag == t,
            Kind::Describe => matches!(tag, b'T' | b'n'),
            Kind::Execute => matches!(tag, b'C' | b'I' | b's'),
            Kind::Sync | Kind::Query => tag == b'Z',
        }
    }

    pub(super) fn ready(self) -> bool {
        matches!(self, Kind::Sync | Kind::Query)
    }
}

/// What the proxy does when a reply comes (or is skipped).
#[derive(Debug)]
pub(super) enum Act {
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
    /// The Parse of a client's `DEALLOCATE name` rewritten to the server name: if it fails
    /// (an aborted transaction) or is skipped, the client keeps its statement, as on
    /// PostgreSQL.
    Deallocated { name: Box<[u8]>, stmt: Arc<Stmt> },
    /// A DISCARD ALL: nothing else is rewritten until it is answered.
    Barrier,
    /// Answered by the proxy in its turn; never sent to the server.
    Answer(Answer),
}

#[derive(Debug)]
pub(super) enum Answer {
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
    pub(super) kind: Kind,
    pub(super) act: Act,
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
    pub(super) stream_left: usize,
    /// Body bytes of a message being dropped that are still to come.
    pub(super) drop_left: usize,
    /// The proxy answered an extended-protocol message with an error: drop messages up to
    /// the next Sync, as the server would.
    pub(super) skip_to_sync: bool,
    /// A DISCARD ALL is on its way: wait for it before rewriting more.
    pub(super) barrier: bool,
    /// Replies and the queue disagreed: the connection's statement set is not trusted.
    pub desync: bool,
    /// What the statements bound in this transaction may have changed.
    pub touched: Touched,
    /// The server connection may hold SQL-level prepared statements (a client's
    /// `PREPARE`): a client's `DEALLOCATE ALL` must reach the server.
    pub sql_statements: bool,
}

/// A C string at the front of `b`: (bytes before the NUL, length with the NUL).
pub(super) fn cstr(b: &[u8]) -> Option<(&[u8], usize)> {
    let end = b.iter().position(|&c| c == 0)?;
    Some((&b[..end], end + 1))
}

pub(super) fn show(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

/// A Parse after its name: the query, NUL, a parameter count and that many type OIDs, and
/// nothing more.
pub(super) fn parse_tail_ok(tail: &[u8]) -> bool {
    let Some((_, q)) = cstr(tail) else {
        return false;
    };
    let rest = &tail[q..];
    rest.len() >= 2 && rest.len() == 2 + 4 * u16::from_be_bytes([rest[0], rest[1]]) as usize
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
    pub(super) fn expect(&mut self, kind: Kind, act: Act) {
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
                        if !(whole
                            && len <= HEADER_LEN + MAX_INSPECTED_QUERY
                            && self.unnamed_deallocate(msg, out, pos))
                        {
                            self.pass(out, pos, len, have, Some(Kind::One(b'1')));
                        }
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
    pub(super) fn pass(
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

    pub(super) fn drop_message(&mut self, out: &mut Out, pos: &mut usize, len: usize, have: usize) {
        out.skip(have);
        *pos += have;
        self.drop_left = len - have;
    }

    /// Answers the current extended-protocol message with an error and skips to Sync.
    pub(super) fn fail(
        &mut self,
        e: PgError,
        out: &mut Out,
        pos: &mut usize,
        len: usize,
        have: usize,
    ) {
        self.expect(Kind::One(0), Act::Answer(Answer::Error(e)));
        self.skip_to_sync = true;
        self.drop_message(out, pos, len, have);
    }

    /// Queues what makes the server connection have `stmt`: a Close of any stale copy
    /// (and of the statement evicted to make room), then the Parse.
    pub(super) fn prepare_on_server(
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
    pub(super) fn parse(
        &mut self,
        msg: &[u8],
        out: &mut Out,
        pos: &mut usize,
    ) -> Result<(), PgError> {
        let len = msg.len();
        let body = &msg[HEADER_LEN..];
        let Some((name, n)) = cstr(body) else {
            return Err(PgError::protocol_violation("malformed Parse message"));
        };
        if name.len() > MAX_NAME {
            return Err(PgError::protocol_violation("statement name too long"));
        }
        // PostgreSQL reads the whole message before it looks at the name: a malformed one
        // ends the connection even when the name is taken.
        if !parse_tail_ok(&body[n..]) {
            return Err(PgError::protocol_violation("invalid message format"));
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

    /// An unnamed Parse of `DEALLOCATE name` for one of the client's statements (psycopg
    /// evicts its statements so, over the extended protocol): the text is rewritten to the
    /// statement's server name (prepared first if the connection lacks it, so that the
    /// server's DEALLOCATE succeeds as it would on PostgreSQL), and the statement leaves
    /// the client's set. Returns false when the Parse is to pass unchanged.
    pub(super) fn unnamed_deallocate(
        &mut self,
        msg: &[u8],
        out: &mut Out,
        pos: &mut usize,
    ) -> bool {
        let body = &msg[HEADER_LEN + 1..];
        // Every unnamed Parse passes here: its first letter first, before any scan to NUL.
        if !matches!(body.trim_ascii_start().first(), Some(b'd' | b'D')) {
            return false;
        }
        let Some((text, n)) = cstr(body) else {
            return false;
        };
        if !parse_tail_ok(body) {
            return false;
        }
        let SqlCommand::Deallocate(name) = sql_command(text) else {
            return false;
        };
        let Some(stmt) = self.resolve(&name, out) else {
            return false;
        };
        self.client.remove(&name);
        let server_name = stmt.name();
        let mut m = BytesMut::with_capacity(msg.len() + server_name.len() + 16);
        m.put_u8(b'P');
        m.put_u32(0);
        m.put_u8(0);
        m.extend_from_slice(b"DEALLOCATE ");
        m.extend_from_slice(server_name);
        m.extend_from_slice(&body[n..]);
        let l = (m.len() - 1) as u32;
        m[1..5].copy_from_slice(&l.to_be_bytes());
        out.skip(msg.len());
        out.own(&m);
        *pos += msg.len();
        // The server's CommandComplete DEALLOCATE makes the connection's set unknown
        // (`some_gone`); until then the statement counts as gone from it.
        self.server.remove(stmt.id);
        self.expect(
            Kind::One(b'1'),
            Act::Deallocated {
                name: name.into(),
                stmt,
            },
        );
        true
    }

    /// The statement a Bind or Describe names, made ready on the server; `None` when the
    /// client has no such statement.
    pub(super) fn resolve(&mut self, name: &[u8], out: &mut Out) -> Option<Arc<Stmt>> {
        let stmt = self.client.get(name)?.clone();
        if !self.server.touch(stmt.id) {
            self.prepare_on_server(&stmt, out, true, None);
        }
        Some(stmt)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn bind(
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

    pub(super) fn describe(&mut self, name: &[u8], out: &mut Out, pos: &mut usize, len: usize) {
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
    pub(super) fn unknown(
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
    pub(super) fn query(&mut self, text: &[u8], out: &mut Out, pos: &mut usize, len: usize) {
        let answer = match sql_command(text) {
            // The server has SQL-level statements (of this client, or left for it): it runs the
            // DEALLOCATE ALL, and its CommandComplete clears the client's and the
            // connection's sets (`all_gone`).
            SqlCommand::DeallocateAll if self.sql_statements => None,
            SqlCommand::DeallocateAll => {
                let undo = self.client.take_all();
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
    pub(super) fn server_error(&mut self, code: Option<&str>) {
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
    pub(super) fn undo(&mut self, skipped: Vec<Expect>) {
        for e in skipped.into_iter().rev() {
            self.skipped(e);
        }
    }

    /// Undoes what a message that failed or never ran would have done.
    pub(super) fn skipped(&mut self, e: Expect) {
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
            Act::Deallocated { name, stmt } => self.client.insert(name, stmt),
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
        self.client.take_all();
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
