//! Shared pieces of the fuzz targets: a small PRNG for splitting input into reads, a
//! generator of well-framed client message streams from compact fuzzer input, and a model
//! PostgreSQL server (`FakePg`) that answers the extended and simple protocol the way
//! PostgreSQL frames its answers (named statements, transaction blocks, errors that skip to
//! Sync), used as the oracle of the prepared-statement tracker.

use std::collections::HashSet;

use tenantpool::prepared::{
    MAX_CLIENT_STATEMENT_BYTES, MAX_INSPECTED_QUERY, SqlCommand, sql_command,
};

/// splitmix64: enough to turn a few fuzzer bytes into split points.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn from_bytes(b: &[u8]) -> Rng {
        let mut s = [0u8; 8];
        let n = b.len().min(8);
        s[..n].copy_from_slice(&b[..n]);
        Rng(u64::from_le_bytes(s))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// The size of the next read: mostly a few bytes (cutting headers and names), sometimes
    /// a lot, sometimes nothing.
    pub fn chunk(&mut self) -> usize {
        let r = self.next_u64();
        match r % 8 {
            0 => 0,
            1..=4 => 1 + (r >> 8) as usize % 7,
            5 | 6 => 1 + (r >> 8) as usize % 64,
            _ => 1 + (r >> 8) as usize % 4096,
        }
    }
}

/// Splits `data` into pieces with `rng` (empty pieces included).
pub fn split<'a>(data: &'a [u8], rng: &mut Rng) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let n = rng.chunk().min(rest.len());
        let (a, b) = rest.split_at(n);
        out.push(a);
        rest = b;
    }
    out
}

/// Appends a message: tag, length, body.
pub fn put_msg(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
}

/// Reads fuzzer bytes as a sequence of choices.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (a, b) = self.data.split_at(n);
        self.data = b;
        a
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}

/// Statement and portal names the generator uses: a few that collide, the proxy's own
/// prefix, upper case (DEALLOCATE folds it), the empty (unnamed) one.
pub const NAMES: [&[u8]; 8] = [b"", b"a", b"b", b"s1", b"_tp0", b"_tp1", b"A", b"\"x"];

/// Query texts: plain, failing (`!`), transaction control, the statement commands the proxy
/// answers or waits on, and words that make the model server send notices or settings.
pub const QUERIES: [&[u8]; 20] = [
    b"SELECT 1",
    b"SELECT 2",
    b"!syntax error",
    b"BEGIN",
    b"COMMIT",
    b"ROLLBACK",
    b"DEALLOCATE a",
    b"deallocate prepare b",
    b"DEALLOCATE s1;",
    b"DEALLOCATE ALL",
    b"DISCARD ALL",
    b"DEALLOCATE \"A\"",
    b"DEALLOCATE _tp0",
    b"DEALLOCATE _tp1",
    b"SELECT notice",
    b"SET application_name = 'x'",
    b"",
    b"SELECT set_config('role', 'x', false)",
    b"DEALLOCATE A",
    b"DEALLOCATE \"x",
];

fn name(i: &mut Input<'_>) -> Vec<u8> {
    let b = i.byte();
    if b == 0xff {
        // A long name (past what the proxy reads as a name).
        return vec![b'n'; 1000 + i.byte() as usize];
    }
    NAMES[b as usize % NAMES.len()].to_vec()
}

fn query(i: &mut Input<'_>) -> Vec<u8> {
    let b = i.byte();
    if b >= 0xf0 {
        // Raw text from the input (long ones pass the proxy uninspected).
        let n = i.byte() as usize * if b == 0xff { 8 } else { 1 };
        return i
            .bytes(n)
            .iter()
            .map(|&c| if c == 0 { b' ' } else { c })
            .collect();
    }
    QUERIES[b as usize % QUERIES.len()].to_vec()
}

/// A client message stream from fuzzer choices: valid frames of every frontend type with
/// names and texts from small vocabularies, plus raw frames and, rarely, broken ones.
pub fn client_stream(i: &mut Input<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    while !i.is_empty() {
        let op = i.byte();
        let mut body = Vec::new();
        let tag = match op % 16 {
            0 | 1 => {
                body.extend(name(i));
                body.push(0);
                body.extend(query(i));
                body.push(0);
                let n = i.byte() % 3;
                body.extend_from_slice(&(n as u16).to_be_bytes());
                for _ in 0..n {
                    body.extend_from_slice(&25u32.to_be_bytes());
                }
                b'P'
            }
            2 | 3 => {
                body.extend(name(i)); // portal
                body.push(0);
                body.extend(name(i));
                body.push(0);
                // Parameters: formats, values, result formats (a value "!!" makes the model
                // server fail the Bind).
                body.extend_from_slice(&[0, 0]);
                let n = i.byte() % 3;
                body.extend_from_slice(&(n as u16).to_be_bytes());
                for _ in 0..n {
                    let v = i.bytes(i.data.first().map_or(0, |&b| b as usize % 5));
                    body.extend_from_slice(&(v.len() as u32).to_be_bytes());
                    body.extend_from_slice(v);
                }
                body.extend_from_slice(&[0, 0]);
                b'B'
            }
            4 | 5 => {
                body.extend(name(i));
                body.push(0);
                body.extend_from_slice(&u32::from(i.byte() % 16).to_be_bytes());
                b'E'
            }
            6 => {
                body.push(if i.byte().is_multiple_of(3) {
                    b'P'
                } else {
                    b'S'
                });
                body.extend(name(i));
                body.push(0);
                b'D'
            }
            7 => {
                body.push(if i.byte().is_multiple_of(3) {
                    b'P'
                } else {
                    b'S'
                });
                body.extend(name(i));
                body.push(0);
                b'C'
            }
            8 | 9 => b'S',
            10 => {
                body.extend(query(i));
                body.push(0);
                b'Q'
            }
            11 => b'H',
            12 => {
                body.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
                b'F'
            }
            13 => {
                // A raw frame of a frontend type.
                let tag = b"QPBEDCHSFdcfX"[i.byte() as usize % 13];
                let n = i.byte() as usize;
                body.extend_from_slice(i.bytes(n));
                tag
            }
            14 => {
                let b = i.byte();
                if b < 8 {
                    // Rarely: a bad header (the client is then gone).
                    out.push(b'?');
                    out.extend_from_slice(&[0, 0, 0, 4]);
                    continue;
                }
                if b < 16 { b'X' } else { b'd' }
            }
            _ => {
                // A message cut short: only the start of its body arrives.
                let mut whole = Vec::new();
                put_msg(&mut whole, b'Q', b"SELECT 1\0");
                let n = i.byte() as usize % whole.len();
                out.extend_from_slice(&whole[..n]);
                continue;
            }
        };
        put_msg(&mut out, tag, &body);
    }
    out
}

/// An ErrorResponse with `severity` and SQLSTATE `code`.
pub fn put_error(out: &mut Vec<u8>, severity: &str, code: &str) {
    let mut body = Vec::new();
    for (f, v) in [
        (b'S', severity),
        (b'V', severity),
        (b'C', code),
        (b'M', "model error"),
    ] {
        body.push(f);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    put_msg(out, b'E', &body);
}

fn cstr(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = b.iter().position(|&c| c == 0)?;
    Some((&b[..end], &b[end + 1..]))
}

/// A model PostgreSQL backend: answers whole messages as PostgreSQL frames its answers.
///
/// * named statements by name (42P05 on a duplicate Parse, 26000 on an unknown Bind or
///   Describe, Close of an unknown one is fine), the unnamed one too;
/// * `BEGIN`/`COMMIT`/`ROLLBACK` blocks: an error inside one fails it (25P02 for what
///   follows, except Parse and Close, until COMMIT/ROLLBACK);
/// * an error in an extended-protocol message skips to Sync;
/// * statement text starting with `!` fails (42601) at Parse or Query; a Bind parameter
///   `!!` fails (22P02); Execute with max_rows 13 fails (22012), 1 ends with PortalSuspended,
///   2 sends a DataRow first;
/// * DEALLOCATE / DEALLOCATE ALL / DISCARD ALL (as the proxy recognises them, for texts it
///   reads: longer ones are plain queries here too);
/// * a malformed message is FATAL 08P01 and the backend is gone.
#[derive(Default)]
pub struct FakePg {
    stmts: HashSet<Vec<u8>>,
    in_block: bool,
    failed: bool,
    skipping: bool,
    buf: Vec<u8>,
    /// Bytes of a message being dropped as they come.
    drop_left: usize,
    /// The backend sent FATAL (or got Terminate) and reads nothing more.
    pub gone: bool,
}

impl FakePg {
    /// Forgets what one client left (its unnamed statement), as between two clients of a
    /// pooler that keeps named statements. Only between transactions.
    pub fn next_client(&mut self) {
        self.stmts.remove(&b""[..]);
    }

    /// Idle, outside a transaction, no batch open.
    pub fn idle(&self) -> bool {
        !self.in_block && !self.skipping && !self.gone && self.buf.is_empty()
    }

    fn status(&self) -> u8 {
        match (self.in_block, self.failed) {
            (false, _) => b'I',
            (true, false) => b'T',
            (true, true) => b'E',
        }
    }

    fn error(&mut self, out: &mut Vec<u8>, code: &str, extended: bool) {
        put_error(out, "ERROR", code);
        if self.in_block {
            self.failed = true;
        }
        if extended {
            self.skipping = true;
        }
    }

    /// An error the proxy answers itself, without the server: it does not fail the
    /// transaction block (a known difference from PostgreSQL, see the fuzz notes in
    /// docs/fuzzing.md), so the model does not either.
    fn proxy_error(&mut self, out: &mut Vec<u8>, code: &str, extended: bool) {
        put_error(out, "ERROR", code);
        if extended {
            self.skipping = true;
        }
    }

    fn fatal(&mut self, out: &mut Vec<u8>) {
        put_error(out, "FATAL", "08P01");
        self.gone = true;
    }

    /// Takes the bytes the backend receives; appends its answers to the whole messages.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        if self.gone {
            return;
        }
        self.buf.extend_from_slice(bytes);
        let mut pos = 0;
        loop {
            if self.drop_left > 0 {
                let n = self.drop_left.min(self.buf.len() - pos);
                pos += n;
                self.drop_left -= n;
                if self.drop_left > 0 {
                    break;
                }
            }
            if self.gone || self.buf.len() - pos < 5 {
                break;
            }
            let b = &self.buf[pos..];
            let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
            if len < 4 {
                self.fatal(out);
                break;
            }
            if b[0] == b'P'
                && len - 4 > MAX_CLIENT_STATEMENT_BYTES
                && b.len() > 5
                && b[5] != 0
                && !self.skipping
            {
                // A named statement over the proxy's bound: it answers at once (before the
                // message is all there) and drops the rest.
                self.proxy_error(out, "53400", true);
                self.drop_left = len + 1;
                continue;
            }
            if b.len() < len + 1 {
                break;
            }
            let tag = b[0];
            let body = b[5..len + 1].to_vec();
            pos += len + 1;
            self.message(tag, &body, out);
        }
        self.buf.drain(..pos);
    }

    fn message(&mut self, tag: u8, body: &[u8], out: &mut Vec<u8>) {
        if tag == b'X' {
            self.gone = true;
            return;
        }
        if self.skipping && tag != b'S' {
            return;
        }
        let failed = self.failed;
        match tag {
            b'P' => {
                let Some((name, rest)) = cstr(body) else {
                    return self.fatal(out);
                };
                let Some((text, _)) = cstr(rest) else {
                    return self.fatal(out);
                };
                // PostgreSQL reports a bad text before a duplicate name; the proxy, which
                // answers a duplicate itself without the server, the other way round (either
                // error is an error: the model follows the proxy).
                if !name.is_empty() && self.stmts.contains(name) {
                    self.proxy_error(out, "42P05", true);
                } else if text.first() == Some(&b'!') {
                    self.error(out, "42601", true);
                } else {
                    self.stmts.insert(name.to_vec());
                    put_msg(out, b'1', b"");
                }
            }
            b'B' => {
                let Some((_portal, rest)) = cstr(body) else {
                    return self.fatal(out);
                };
                let Some((name, params)) = cstr(rest) else {
                    return self.fatal(out);
                };
                if !self.stmts.contains(name) && name.starts_with(b"_tp") {
                    self.proxy_error(out, "26000", true);
                } else if failed {
                    self.error(out, "25P02", true);
                } else if !self.stmts.contains(name) {
                    self.error(out, "26000", true);
                } else if params.windows(2).any(|w| w == b"!!") {
                    self.error(out, "22P02", true);
                } else {
                    put_msg(out, b'2', b"");
                }
            }
            b'E' => {
                let Some((_portal, rest)) = cstr(body) else {
                    return self.fatal(out);
                };
                let Some(max) = rest.first_chunk::<4>().map(|m| u32::from_be_bytes(*m)) else {
                    return self.fatal(out);
                };
                if failed {
                    self.error(out, "25P02", true);
                } else if max == 13 {
                    self.error(out, "22012", true);
                } else if max == 1 {
                    put_msg(out, b'D', b"\0\x01\0\0\0\x011");
                    put_msg(out, b's', b"");
                } else {
                    if max == 2 {
                        put_msg(out, b'D', b"\0\x01\0\0\0\x012");
                    }
                    put_msg(out, b'C', b"SELECT 1\0");
                }
            }
            b'D' => {
                let Some((&what, rest)) = body.split_first() else {
                    return self.fatal(out);
                };
                let Some((name, _)) = cstr(rest) else {
                    return self.fatal(out);
                };
                match what {
                    b'S' if !self.stmts.contains(name) && name.starts_with(b"_tp") => {
                        self.proxy_error(out, "26000", true)
                    }
                    _ if failed => self.error(out, "25P02", true),
                    b'S' if !self.stmts.contains(name) => self.error(out, "26000", true),
                    b'S' => {
                        put_msg(out, b't', b"\0\0");
                        put_msg(out, b'n', b"");
                    }
                    b'P' => put_msg(out, b'n', b""),
                    _ => self.fatal(out),
                }
            }
            b'C' => {
                let Some((&what, rest)) = body.split_first() else {
                    return self.fatal(out);
                };
                let Some((name, _)) = cstr(rest) else {
                    return self.fatal(out);
                };
                match what {
                    b'S' => {
                        self.stmts.remove(name);
                        put_msg(out, b'3', b"");
                    }
                    b'P' => put_msg(out, b'3', b""),
                    _ => self.fatal(out),
                }
            }
            b'S' => {
                self.skipping = false;
                put_msg(out, b'Z', &[self.status()]);
            }
            b'Q' => {
                let text = body.strip_suffix(&[0]).unwrap_or(body);
                self.query(text, body.len(), out);
                put_msg(out, b'Z', &[self.status()]);
            }
            b'F' => {
                if failed {
                    self.error(out, "25P02", false);
                } else {
                    put_msg(out, b'V', &[0xff, 0xff, 0xff, 0xff]);
                }
                put_msg(out, b'Z', &[self.status()]);
            }
            // Flush; COPY messages outside COPY are ignored.
            b'H' | b'd' | b'c' | b'f' => {}
            _ => self.fatal(out),
        }
    }

    fn query(&mut self, text: &[u8], body_len: usize, out: &mut Vec<u8>) {
        let word = |w: &[u8]| text.eq_ignore_ascii_case(w);
        let cmd = if body_len <= MAX_INSPECTED_QUERY {
            sql_command(text)
        } else {
            SqlCommand::Other
        };
        if let SqlCommand::Deallocate(name) = &cmd
            && name.starts_with(b"_tp")
            && !self.stmts.contains(name)
        {
            return self.proxy_error(out, "26000", false);
        }
        if self.failed {
            if word(b"COMMIT") || word(b"ROLLBACK") {
                self.in_block = false;
                self.failed = false;
                put_msg(out, b'C', b"ROLLBACK\0");
            } else {
                self.error(out, "25P02", false);
            }
            return;
        }
        match cmd {
            SqlCommand::DeallocateAll => {
                self.stmts.retain(|n| n.is_empty());
                put_msg(out, b'C', b"DEALLOCATE ALL\0");
            }
            SqlCommand::Deallocate(name) => {
                if self.stmts.remove(&name) {
                    put_msg(out, b'C', b"DEALLOCATE\0");
                } else {
                    self.error(out, "26000", false);
                }
            }
            SqlCommand::DiscardAll if self.in_block => self.error(out, "25001", false),
            SqlCommand::DiscardAll => {
                self.stmts.clear();
                put_msg(out, b'C', b"DISCARD ALL\0");
            }
            SqlCommand::Other => {
                if text.first() == Some(&b'!') {
                    self.error(out, "42601", false);
                } else if text.trim_ascii().is_empty() {
                    put_msg(out, b'I', b"");
                } else if word(b"BEGIN") {
                    self.in_block = true;
                    put_msg(out, b'C', b"BEGIN\0");
                } else if word(b"COMMIT") || word(b"ROLLBACK") {
                    self.in_block = false;
                    put_msg(out, b'C', b"COMMIT\0");
                } else if text.starts_with(b"SET ") {
                    put_msg(out, b'S', b"application_name\0x\0");
                    put_msg(out, b'C', b"SET\0");
                } else {
                    if text.ends_with(b"notice") {
                        put_msg(out, b'N', b"SNOTICE\0C00000\0Mnote\0\0");
                    }
                    put_msg(out, b'C', b"SELECT 1\0");
                }
            }
        }
    }
}

/// Messages of a stream, for comparison: (tag, body), an ErrorResponse reduced to its
/// SQLSTATE (the proxy's own errors word their messages differently).
pub fn messages(stream: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while stream.len() - pos >= 5 {
        let b = &stream[pos..];
        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        assert!(
            len >= 4 && b.len() > len,
            "framing of {:?}",
            &b[..b.len().min(32)]
        );
        let body = &b[5..len + 1];
        let body = if b[0] == b'E' {
            let code = tenantpool::protocol::error_field(body, b'C').unwrap_or("");
            code.as_bytes().to_vec()
        } else {
            body.to_vec()
        };
        out.push((b[0], body));
        pos += len + 1;
    }
    assert_eq!(pos, stream.len(), "a partial message");
    out
}

use tenantpool::client::relay::{ClientScan, ServerScan};
use tenantpool::prepared::Tracker;
use tenantpool::splice::Out;

/// How a simulated relay ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// Nothing more to read or write.
    Quiet,
    /// The client broke the protocol (the proxy closes it).
    Violation,
    /// The server sent FATAL (held back from the client).
    Fatal,
}

/// Runs one client's byte stream through the proxy's client scanner, statement rewriter,
/// a [`FakePg`], the server scanner and the tracker's answers, in the order the relay does
/// (`Relay::poll`), with reads of random sizes each way. Appends what the client receives
/// to `to_client`. Checks the invariants that hold whatever the input.
///
/// With `one_batch`, the client sends its next batch (after a Sync, Query or FunctionCall)
/// only once everything it is owed came back; `fed` says how far it got.
pub fn relay(
    input: &[u8],
    rng: &mut Rng,
    t: &mut Tracker<'_>,
    pg: &mut FakePg,
    to_client: &mut Vec<u8>,
    one_batch: bool,
    fed_out: &mut usize,
) -> End {
    let ends = batch_ends(input);
    let mut cscan = ClientScan::default();
    let mut sscan = ServerScan::default();
    let (mut cbuf, mut cfwd, mut cpos) = (Vec::new(), 0usize, 0usize);
    let mut sbuf: Vec<u8> = Vec::new();
    let mut on_server_socket: Vec<u8> = Vec::new();
    let (mut cout, mut sout) = (Out::default(), Out::default());
    let mut fed = 0;
    let mut owed: u64 = 0;
    loop {
        let mut progress = false;
        // Server -> client.
        if !sout.is_empty() {
            if debug() {
                eprintln!("to client: {:?}", show(&sout.flatten(&sbuf)));
            }
            to_client.extend(sout.flatten(&sbuf));
            let n = sout.clear();
            assert!(n <= sbuf.len());
            sbuf.drain(..n);
            progress = true;
        }
        // Client -> server: rewrite what the client scanner passed.
        if cpos != cfwd {
            if t.rewrite(&cbuf, &mut cpos, cfwd, &mut cout).is_err() {
                t.abandon();
                return End::Violation;
            }
            assert!(cpos <= cfwd, "rewrite went past the scanned bytes");
            if !sscan.mid_message() {
                let a = t.answer(sscan.status, &mut sout);
                owed = owed.saturating_sub(u64::from(a.ready));
            }
        }
        if !cout.is_empty() {
            let bytes = cout.flatten(&cbuf);
            let n = cout.clear();
            assert_eq!(n, cpos, "the queue covers exactly the rewritten bytes");
            cbuf.drain(..n);
            cfwd -= n;
            cpos = 0;
            if debug() {
                eprintln!("to server: {:?}", show(&bytes));
            }
            pg.feed(&bytes, &mut on_server_socket);
            progress = true;
        }
        if sout.is_empty() && sscan.fatal.is_some() {
            t.abandon();
            return End::Fatal;
        }
        // Server reads, once what it sent before has gone out.
        if sout.is_empty() && !on_server_socket.is_empty() {
            let n = rng.chunk().max(1).min(on_server_socket.len());
            sbuf.extend(on_server_socket.drain(..n));
            if debug() {
                eprintln!("server read: {:?}", show(&sbuf));
            }
            let c = sscan
                .scan(&sbuf, &mut sout, Some(t))
                .expect("the model server is well-formed");
            assert!(sout.buf_len() <= sbuf.len());
            owed = owed.saturating_sub(u64::from(c.ready));
            progress = true;
        }
        // Client reads, once its bytes went out and no DISCARD ALL is awaited.
        let limit = if one_batch {
            match ends.iter().find(|&&e| e >= fed) {
                Some(&e) if e == fed && owed > 0 => fed,
                Some(&e) if e == fed => ends
                    .iter()
                    .find(|&&e| e > fed)
                    .copied()
                    .unwrap_or(input.len()),
                Some(&e) => e,
                None => input.len(),
            }
        } else {
            input.len()
        };
        if cout.is_empty() && !cscan.terminated && !t.blocked() && fed < limit {
            let n = rng.chunk().max(1).min(limit - fed);
            cbuf.extend_from_slice(&input[fed..fed + n]);
            if debug() {
                eprintln!("client read: {:?}", show(&input[fed..fed + n]));
            }
            fed += n;
            *fed_out = fed;
            let before = cscan.pending;
            match cscan.scan(&cbuf, cfwd) {
                Ok(end) => {
                    assert!(end >= cfwd && end <= cbuf.len());
                    cfwd = end;
                }
                Err(_) => {
                    t.abandon();
                    return End::Violation;
                }
            }
            owed += u64::from(cscan.pending - before);
            progress = true;
        }
        if !progress {
            let _ = owed;
            return End::Quiet;
        }
    }
}

fn debug() -> bool {
    std::env::var_os("FUZZ_DEBUG").is_some()
}

fn show(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    if s.len() > 300 {
        format!("{}...({} bytes)", &s[..s.floor_char_boundary(300)], b.len())
    } else {
        s.into_owned()
    }
}

/// Where each batch of a client stream ends: after each Sync, Query and FunctionCall.
fn batch_ends(input: &[u8]) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut pos = 0;
    while input.len() - pos >= 5 {
        let len = u32::from_be_bytes([
            input[pos + 1],
            input[pos + 2],
            input[pos + 3],
            input[pos + 4],
        ]) as usize;
        let Some(end) = (pos + 1)
            .checked_add(len)
            .filter(|&e| e <= input.len() && len >= 4)
        else {
            break;
        };
        if matches!(input[pos], b'S' | b'Q' | b'F') {
            ends.push(end);
        }
        pos = end;
    }
    ends
}
