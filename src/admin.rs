//! The admin console: `dbname=tenantpool` (or `pgbouncer`) for `admin_users` (everything)
//! and `stats_users` (SHOW only), answering rows the way PgBouncer 1.2x does: the same
//! columns, numbers as `int8` (a numeric type, not text), one row per tenant where
//! PgBouncer has one per database.
//!
//! The simple query protocol, as PgBouncer; and, beyond PgBouncer, the extended protocol
//! for one command per statement without parameters, so that drivers (tokio-postgres,
//! psycopg, JDBC) get numbers in binary as their own types.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::tls::Stream;
use bytes::{Buf, BufMut, BytesMut};
use pgwire::messages::Message;
use pgwire::messages::startup::{Authentication, BackendKeyData, SecretKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Shared;
use crate::config::{Config, Dur};
use crate::error::PgError;
use crate::placement::PlaceId;
use crate::protocol::{
    HEADER_LEN, header, put_command_complete, put_cstr, put_parameter_status, put_ready_for_query,
};
use crate::registry::{STATE_ACTIVE, STATE_WAITING};
use crate::server::LoginId;
use crate::tenant::{Tenant, TenantId};

/// Largest command accepted on the console.
const MAX_COMMAND: usize = 64 * 1024;

/// How often PAUSE and WAIT_CLOSE look whether they are done.
const POLL: Duration = Duration::from_millis(20);

/// Sends AuthenticationOk, a few ParameterStatus values, a key and ReadyForQuery.
pub fn welcome(out: &mut BytesMut, key: (i32, i32)) {
    let _ = Authentication::Ok.encode(out);
    for (k, v) in [
        ("server_version", env!("CARGO_PKG_VERSION")),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", "tenantpool"),
    ] {
        put_parameter_status(out, k, v);
    }
    let _ = BackendKeyData::new(key.0, SecretKey::I32(key.1)).encode(out);
    put_ready_for_query(out, b'I');
}

// ---------------------------------------------------------------------------------------
// Answers: typed tables.

/// A column type: text, or a number (`int8`, OID 20).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    Text,
    Int,
}

impl Ty {
    fn oid(self) -> i32 {
        match self {
            Ty::Text => 25,
            Ty::Int => 20,
        }
    }
    fn size(self) -> i16 {
        match self {
            Ty::Text => -1,
            Ty::Int => 8,
        }
    }
}

/// A value; `Null` is SQL NULL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum V {
    T(String),
    I(i64),
    Null,
}

impl From<&str> for V {
    fn from(s: &str) -> V {
        V::T(s.to_string())
    }
}
impl From<String> for V {
    fn from(s: String) -> V {
        V::T(s)
    }
}
macro_rules! int_value {
    ($($t:ty),*) => {$(
        impl From<$t> for V {
            fn from(n: $t) -> V {
                V::I(i64::try_from(n).unwrap_or(i64::MAX))
            }
        }
    )*};
}
int_value!(i32, i64, u16, u32, u64, usize);
impl From<bool> for V {
    fn from(b: bool) -> V {
        V::I(b as i64)
    }
}

/// Rows with named, typed columns.
#[derive(Debug, Clone, Default)]
pub struct Table {
    pub cols: Vec<(&'static str, Ty)>,
    pub rows: Vec<Vec<V>>,
}

impl Table {
    fn new(cols: &[(&'static str, Ty)]) -> Table {
        Table {
            cols: cols.to_vec(),
            rows: Vec::new(),
        }
    }
    fn row(&mut self, r: Vec<V>) {
        debug_assert_eq!(r.len(), self.cols.len(), "{:?}", self.cols);
        self.rows.push(r);
    }
}

/// What a command answers.
#[derive(Debug)]
pub enum Answer {
    Rows(Table),
    /// CommandComplete with this tag.
    Done(String),
    Empty,
    Err(PgError),
}

impl From<PgError> for Answer {
    fn from(e: PgError) -> Answer {
        Answer::Err(e)
    }
}

/// `formats`: per column, 0 text or 1 binary (empty: all text).
fn put_row_description(out: &mut BytesMut, t: &Table, formats: &[i16]) {
    let start = out.len();
    out.put_u8(b'T');
    out.put_i32(0);
    out.put_i16(t.cols.len() as i16);
    for (i, (name, ty)) in t.cols.iter().enumerate() {
        put_cstr(out, name);
        out.put_i32(0);
        out.put_i16(0);
        out.put_i32(ty.oid());
        out.put_i16(ty.size());
        out.put_i32(-1);
        out.put_i16(format_of(formats, i));
    }
    patch_len(out, start);
}

fn format_of(formats: &[i16], i: usize) -> i16 {
    match formats {
        [] => 0,
        [f] => *f,
        fs => fs.get(i).copied().unwrap_or(0),
    }
}

fn put_rows(out: &mut BytesMut, t: &Table, formats: &[i16]) {
    for r in &t.rows {
        let start = out.len();
        out.put_u8(b'D');
        out.put_i32(0);
        out.put_i16(r.len() as i16);
        for (i, v) in r.iter().enumerate() {
            let binary = format_of(formats, i) == 1;
            match v {
                V::Null => out.put_i32(-1),
                V::T(s) => {
                    out.put_i32(s.len() as i32);
                    out.put_slice(s.as_bytes());
                }
                V::I(n) if binary => {
                    out.put_i32(8);
                    out.put_i64(*n);
                }
                V::I(n) => {
                    let s = n.to_string();
                    out.put_i32(s.len() as i32);
                    out.put_slice(s.as_bytes());
                }
            }
        }
        patch_len(out, start);
    }
}

fn patch_len(buf: &mut BytesMut, start: usize) {
    let len = (buf.len() - start - 1) as i32;
    buf[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
}

/// The whole answer of a simple Query (or of an Execute, with its formats).
fn put_answer(out: &mut BytesMut, a: &Answer, formats: &[i16], describe: bool) {
    match a {
        Answer::Rows(t) => {
            if describe {
                put_row_description(out, t, formats);
            }
            put_rows(out, t, formats);
            put_command_complete(out, "SHOW");
        }
        Answer::Done(tag) => put_command_complete(out, tag),
        Answer::Empty => out.extend_from_slice(b"I\0\0\0\x04"),
        Answer::Err(e) => e.encode(out),
    }
}

// ---------------------------------------------------------------------------------------
// The session.

/// A statement or portal of the extended protocol: the command text, the result formats
/// (portals) and the answer when a Describe already ran it.
#[derive(Default)]
struct Portal {
    sql: String,
    formats: Vec<i16>,
    answer: Option<Answer>,
}

/// Serves an admin session until the client leaves.
/// Serves an admin console session; `buf` holds what the client sent with its login.
pub async fn serve(
    mut stream: Stream,
    mut buf: BytesMut,
    peer: SocketAddr,
    user: Arc<str>,
    shared: Arc<Shared>,
) {
    buf.reserve(1024);
    // Extended protocol: after an error, messages are skipped until Sync.
    let mut skipping = false;
    let mut statements: HashMap<String, String> = HashMap::new();
    let mut portals: HashMap<String, Portal> = HashMap::new();
    loop {
        let (tag, len) = loop {
            if let Some((tag, len)) = header(&buf) {
                match len {
                    Ok(l) if l <= MAX_COMMAND => {
                        if buf.len() >= l {
                            break (tag, l);
                        }
                    }
                    _ => {
                        let e = PgError::protocol_violation("invalid message length");
                        let _ = stream.write_all(&e.to_bytes()).await;
                        return;
                    }
                }
            }
            match read_or_stop(&mut stream, &mut buf, &shared).await {
                Some(true) => {}
                Some(false) => return,
                None => {
                    // Shutdown: console sessions end, so they never hold the proxy up.
                    let _ = stream.write_all(&PgError::shutting_down().to_bytes()).await;
                    return;
                }
            }
        };
        let frame = buf.split_to(len);
        let mut body = &frame[HEADER_LEN..];
        let mut out = BytesMut::new();
        let mut stop = false;
        match tag {
            b'X' => return,
            b'Q' => {
                let sql = String::from_utf8_lossy(cstr(&mut body).unwrap_or_default()).into_owned();
                let (answer, end) = run(&sql, &shared, &user, peer).await;
                put_answer(&mut out, &answer, &[], true);
                put_ready_for_query(&mut out, b'I');
                stop = end;
            }
            b'S' => {
                skipping = false;
                portals.remove("");
                put_ready_for_query(&mut out, b'I');
            }
            b'H' => {}
            b'P' | b'B' | b'D' | b'E' | b'C' if skipping => {}
            b'P' | b'B' | b'D' | b'E' | b'C' => {
                let r = extended(
                    tag,
                    &mut body,
                    &mut statements,
                    &mut portals,
                    &shared,
                    &user,
                    peer,
                    &mut out,
                )
                .await;
                match r {
                    Ok(end) => stop = end,
                    Err(e) => {
                        skipping = true;
                        e.encode(&mut out);
                    }
                }
            }
            _ => {
                let e = PgError::protocol_violation(format!("invalid frontend message type {tag}"));
                let _ = stream.write_all(&e.to_bytes()).await;
                return;
            }
        }
        if (!out.is_empty() && stream.write_all(&out).await.is_err()) || stop {
            return;
        }
    }
}

/// A NUL-terminated string from the front of `b`.
fn cstr<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
    let i = b.iter().position(|&c| c == 0)?;
    let s = &b[..i];
    *b = &b[i + 1..];
    Some(s)
}

fn i16s(b: &mut &[u8]) -> Option<Vec<i16>> {
    if b.len() < 2 {
        return None;
    }
    let n = b.get_i16().max(0) as usize;
    if b.len() < n * 2 {
        return None;
    }
    Some((0..n).map(|_| b.get_i16()).collect())
}

fn is_show(sql: &str) -> bool {
    sql.split_whitespace()
        .next()
        .is_some_and(|w| w.eq_ignore_ascii_case("SHOW"))
}

/// One message of the extended protocol (Parse, Bind, Describe, Execute, Close).
/// Returns true when the session should end (SHUTDOWN).
#[allow(clippy::too_many_arguments)]
async fn extended(
    tag: u8,
    body: &mut &[u8],
    statements: &mut HashMap<String, String>,
    portals: &mut HashMap<String, Portal>,
    shared: &Arc<Shared>,
    user: &str,
    peer: SocketAddr,
    out: &mut BytesMut,
) -> Result<bool, PgError> {
    let bad = || PgError::protocol_violation("malformed message on the admin console");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    match tag {
        b'P' => {
            let name = text(cstr(body).ok_or_else(bad)?);
            let sql = text(cstr(body).ok_or_else(bad)?);
            statements.insert(name, sql);
            out.put_slice(b"1\0\0\0\x04");
        }
        b'B' => {
            let portal = text(cstr(body).ok_or_else(bad)?);
            let stmt = text(cstr(body).ok_or_else(bad)?);
            let _param_formats = i16s(body).ok_or_else(bad)?;
            if body.len() < 2 {
                return Err(bad());
            }
            let params = body.get_i16();
            if params != 0 {
                return Err(PgError::error(
                    "08P01",
                    "admin console commands take no parameters",
                ));
            }
            let formats = i16s(body).ok_or_else(bad)?;
            let sql = statements.get(&stmt).cloned().ok_or_else(|| {
                PgError::error(
                    "26000",
                    format!("prepared statement \"{stmt}\" does not exist"),
                )
            })?;
            portals.insert(
                portal,
                Portal {
                    sql,
                    formats,
                    answer: None,
                },
            );
            out.put_slice(b"2\0\0\0\x04");
        }
        b'D' => {
            if body.is_empty() {
                return Err(bad());
            }
            let kind = body.get_u8();
            let name = text(cstr(body).ok_or_else(bad)?);
            if kind == b'S' {
                let sql = statements.get(&name).ok_or_else(|| {
                    PgError::error(
                        "26000",
                        format!("prepared statement \"{name}\" does not exist"),
                    )
                })?;
                out.put_slice(b"t\0\0\0\x06\0\0");
                // The columns of a SHOW are known by running it (it changes nothing).
                match is_show(sql) {
                    true => match run(sql, shared, user, peer).await.0 {
                        Answer::Rows(t) => put_row_description(out, &t, &[]),
                        Answer::Err(e) => return Err(e),
                        _ => out.put_slice(b"n\0\0\0\x04"),
                    },
                    false => out.put_slice(b"n\0\0\0\x04"),
                }
            } else {
                let p = portals.get_mut(&name).ok_or_else(|| {
                    PgError::error("34000", format!("portal \"{name}\" does not exist"))
                })?;
                if is_show(&p.sql) {
                    let a = run(&p.sql, shared, user, peer).await.0;
                    match &a {
                        Answer::Rows(t) => put_row_description(out, t, &p.formats),
                        Answer::Err(e) => return Err(e.clone()),
                        _ => out.put_slice(b"n\0\0\0\x04"),
                    }
                    p.answer = Some(a);
                } else {
                    out.put_slice(b"n\0\0\0\x04");
                }
            }
        }
        b'E' => {
            let name = text(cstr(body).ok_or_else(bad)?);
            let p = portals.get_mut(&name).ok_or_else(|| {
                PgError::error("34000", format!("portal \"{name}\" does not exist"))
            })?;
            let (answer, end) = match p.answer.take() {
                Some(a) => (a, false),
                None => run(&p.sql.clone(), shared, user, peer).await,
            };
            if let Answer::Err(e) = answer {
                return Err(e);
            }
            put_answer(out, &answer, &p.formats, false);
            return Ok(end);
        }
        b'C' => {
            if body.is_empty() {
                return Err(bad());
            }
            let kind = body.get_u8();
            let name = text(cstr(body).ok_or_else(bad)?);
            if kind == b'S' {
                statements.remove(&name);
            } else {
                portals.remove(&name);
            }
            out.put_slice(b"3\0\0\0\x04");
        }
        _ => return Err(bad()),
    }
    Ok(false)
}

/// Reads what the client sends: `Some(true)` when bytes came, `Some(false)` when it left,
/// `None` when the proxy is shutting down.
async fn read_or_stop(stream: &mut Stream, buf: &mut BytesMut, shared: &Shared) -> Option<bool> {
    loop {
        let mut stop = pin!(shared.stop.notified());
        stop.as_mut().enable();
        if shared.stopping.load(Ordering::Acquire) {
            return None;
        }
        tokio::select! {
            r = stream.read_buf(buf) => return Some(matches!(r, Ok(n) if n > 0)),
            // Shutdown, or a KILL (which does not concern the console): look again.
            () = &mut stop => {}
        }
    }
}

fn reload_refused(problems: &str) -> PgError {
    PgError::error("F0000", format!("config reload refused: {problems}"))
}

// ---------------------------------------------------------------------------------------
// Commands.

const HELP: [&str; 13] = [
    "SHOW HELP|VERSION|CONFIG|TENANTS|POOLS|DATABASES|USERS|CLIENTS|SERVERS|LISTS|MEM|STATE",
    "SHOW STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS",
    "SET key = value",
    "RELOAD",
    "PAUSE [tenant]",
    "RESUME [tenant]",
    "DISABLE tenant",
    "ENABLE tenant",
    "RECONNECT [tenant]",
    "KILL [tenant]",
    "WAIT_CLOSE [tenant]",
    "SHUTDOWN",
    "(stats_users: SHOW only)",
];

fn unknown_tenant(name: &str) -> PgError {
    PgError::error("3D000", format!("tenant \"{name}\" does not exist"))
}

fn not_in_state(msg: String) -> PgError {
    PgError::error("55000", msg)
}

/// Runs one command. Returns the answer and whether the session should end (SHUTDOWN).
pub async fn run(sql: &str, shared: &Arc<Shared>, user: &str, peer: SocketAddr) -> (Answer, bool) {
    let cmd = sql.trim().trim_end_matches(';').trim();
    if cmd.is_empty() {
        return (Answer::Empty, false);
    }
    let words: Vec<&str> = cmd.split_whitespace().collect();
    let verb = words[0].to_ascii_uppercase();
    if verb != "SHOW" {
        tracing::info!(client = %peer, user = %user, command = %cmd, "admin command");
        if !shared
            .live
            .config()
            .proxy
            .admin_users
            .iter()
            .any(|u| u == user)
        {
            return (
                PgError::error(
                    "42501",
                    format!("admin access needed: {user} is a stats_users user (SHOW only)"),
                )
                .into(),
                false,
            );
        }
    }
    let tenant = |i: usize| -> Result<Option<&'static Tenant>, PgError> {
        match words.get(i) {
            None => Ok(None),
            Some(name) => {
                let name = name.trim_matches('"');
                shared
                    .tenants
                    .lookup(name)
                    .map(Some)
                    .ok_or_else(|| unknown_tenant(name))
            }
        }
    };
    let id = |t: Option<&Tenant>| t.map(|t| t.id);
    let answer: Result<Answer, PgError> = async {
        Ok(match (verb.as_str(), words.len()) {
            ("SHOW", 2) => Answer::Rows(show(&words[1].to_ascii_uppercase(), shared)?),
            ("SET", _) => set(cmd[3..].trim(), shared)?,
            ("RELOAD", 1) => {
                // Reading the file and deriving SCRAM keys is blocking work: off the
                // workers that serve clients. Answered once the config is in force.
                let s = shared.clone();
                match tokio::task::spawn_blocking(move || crate::live::reload(&s)).await {
                    Ok(Ok(_)) => Answer::Done("RELOAD".into()),
                    Ok(Err(e)) => return Err(reload_refused(&e)),
                    Err(e) => return Err(reload_refused(&e.to_string())),
                }
            }
            ("PAUSE", 1 | 2) => {
                let t = tenant(1)?;
                shared.pools.pause(id(t));
                // As PgBouncer: answered once the tenant's (or every) server connection
                // is back in the pool.
                wait_until(shared, || {
                    let (snap, _) = shared.pools.snapshot();
                    match t {
                        Some(t) => snap.in_use.get(t.id as usize).is_none_or(|&n| n == 0),
                        None => snap.in_use.iter().all(|&n| n == 0),
                    }
                })
                .await;
                if t.is_none() {
                    // Everything paused: as PgBouncer, no server connection stays open (so
                    // PostgreSQL can restart); answered once PostgreSQL has closed them.
                    // One tenant's PAUSE closes none: connections are shared.
                    shared.pools.close_idle();
                    wait_until(shared, || shared.pools.snapshot().0.open == 0).await;
                }
                Answer::Done("PAUSE".into())
            }
            ("RESUME", 1 | 2) => {
                let t = tenant(1)?;
                if !shared.pools.is_paused(id(t)) {
                    return Err(not_in_state(match t {
                        Some(t) => format!("tenant {} is not paused", t.name),
                        None => "pooler is not paused".into(),
                    }));
                }
                shared.pools.resume(id(t));
                Answer::Done("RESUME".into())
            }
            ("KILL", 1 | 2) => {
                // As PgBouncer: the clients go, and new ones wait (paused) until RESUME.
                let t = tenant(1)?;
                shared.pools.pause(id(t));
                match t {
                    Some(t) => crate::live::end_clients(shared, t.id),
                    None => {
                        for t in shared.tenants.iter() {
                            crate::live::end_clients(shared, t.id);
                        }
                    }
                }
                Answer::Done("KILL".into())
            }
            ("DISABLE", 2) => {
                let t = tenant(1)?.expect("one argument");
                t.disabled.store(true, Ordering::Release);
                Answer::Done("DISABLE".into())
            }
            ("ENABLE", 2) => {
                let t = tenant(1)?.expect("one argument");
                if !t.disabled.swap(false, Ordering::AcqRel) {
                    return Err(not_in_state(format!("tenant {} is not disabled", t.name)));
                }
                Answer::Done("ENABLE".into())
            }
            ("RECONNECT", 1 | 2) => {
                let t = tenant(1)?;
                let mark = shared.pools.reconnect(id(t));
                shared.reconnect_mark.store(mark, Ordering::Release);
                Answer::Done("RECONNECT".into())
            }
            ("WAIT_CLOSE", 1 | 2) => {
                let t = tenant(1)?;
                let mark = shared.reconnect_mark.load(Ordering::Acquire);
                wait_until(shared, || !old_connections(shared, id(t), mark)).await;
                Answer::Done("WAIT_CLOSE".into())
            }
            ("SHUTDOWN", 1) => {
                // The same graceful shutdown as SIGTERM; this session ends after the answer.
                let _ = shared.shutdown_tx.send(true);
                Answer::Done("SHUTDOWN".into())
            }
            _ => {
                return Err(PgError::error(
                    "42601",
                    format!("unknown admin command: {cmd} (try SHOW HELP)"),
                ));
            }
        })
    }
    .await;
    let stop = matches!(&answer, Ok(Answer::Done(t)) if t == "SHUTDOWN");
    (answer.unwrap_or_else(Answer::Err), stop)
}

/// Waits until `done` (looking every 20 ms), or until the proxy shuts down.
async fn wait_until(shared: &Shared, mut done: impl FnMut() -> bool) {
    while !done() && !shared.stopping.load(Ordering::Acquire) {
        tokio::time::sleep(POLL).await;
    }
}

/// Is a server connection opened before the last RECONNECT still idle in the pool or
/// serving a client (of `tenant`, or any)?
fn old_connections(shared: &Shared, tenant: Option<TenantId>, mark: u64) -> bool {
    shared.pools.old_idle(tenant, mark)
        || shared.registry.all().iter().any(|c| {
            tenant.is_none_or(|t| c.tenant == t)
                && c.server().is_some()
                && c.server_conn.load(Ordering::Relaxed) < mark
        })
}

// ---------------------------------------------------------------------------------------
// SET key = value.

/// `SET key = value` (or `TO`): a reloadable key, in force at once (as a reload that
/// changes only it; the next RELOAD reads the file again).
fn set(rest: &str, shared: &Shared) -> Result<Answer, PgError> {
    let (key, value) = rest
        .split_once('=')
        .or_else(|| {
            let i = rest.to_ascii_uppercase().find(" TO ")?;
            Some((&rest[..i], &rest[i + 4..]))
        })
        .ok_or_else(|| PgError::error("42601", "syntax: SET key = value"))?;
    let key = key.trim();
    let value = value.trim().trim_matches(|c| c == '\'' || c == '"');
    let mut config = (**shared.live.config()).clone();
    let name = set_key(&mut config, key, value).map_err(|e| PgError::error("22023", e))?;
    config
        .validate()
        .map_err(|e| PgError::error("22023", format!("SET {name} refused: {}", e.0.join("; "))))?;
    crate::live::reload_with(shared, config);
    Ok(Answer::Done("SET".into()))
}

/// Keys SET may change: the name in SHOW CONFIG, PgBouncer's name for it when it has one.
const SETTABLE: [(&str, &str); 19] = [
    ("max_client_conn", "max_client_conn"),
    ("admin_users", "admin_users"),
    ("stats_users", "stats_users"),
    ("shutdown_timeout", "shutdown_timeout"),
    ("log_stats", "log_stats"),
    ("stats_period", "stats_period"),
    ("server.max_connections", "max_db_connections"),
    ("server.min_idle", "min_pool_size"),
    ("server.idle_timeout", "server_idle_timeout"),
    ("server.lifetime", "server_lifetime"),
    ("limits.query_wait_timeout", "query_wait_timeout"),
    (
        "limits.idle_transaction_timeout",
        "idle_transaction_timeout",
    ),
    ("limits.client_idle_timeout", "client_idle_timeout"),
    ("limits.client_login_timeout", "client_login_timeout"),
    ("limits.message_timeout", "message_timeout"),
    (
        "tenant_defaults.max_server_connections",
        "default_pool_size",
    ),
    (
        "tenant_defaults.max_client_connections",
        "max_client_connections",
    ),
    ("tenant_defaults.search_path", "search_path"),
    ("directory.refresh", "directory_refresh"),
];

/// Sets `key` in `c`; returns its SHOW CONFIG name.
fn set_key(c: &mut Config, key: &str, value: &str) -> Result<&'static str, String> {
    let k = key.to_ascii_lowercase();
    let k = k.strip_prefix("proxy.").unwrap_or(&k);
    let name = SETTABLE
        .iter()
        .find(|(n, alias)| *n == k || *alias == k)
        .map(|(n, _)| *n)
        .ok_or_else(|| {
            if config_rows(c).iter().any(|r| r.0 == k) {
                format!("{key} cannot be changed while running (a restart does)")
            } else {
                format!("unknown config key: {key} (see SHOW CONFIG)")
            }
        })?;
    let num = || -> Result<u32, String> {
        value
            .parse()
            .map_err(|_| format!("{name}: \"{value}\" is not a whole number"))
    };
    let dur = || -> Result<Dur, String> {
        match value.parse::<u64>() {
            Ok(n) => Ok(Dur::secs(n)),
            Err(_) => value.parse::<Dur>().map_err(|e| format!("{name}: {e}")),
        }
    };
    let list = || -> Vec<String> {
        value
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    };
    match name {
        "max_client_conn" => c.proxy.max_client_conn = num()?,
        "admin_users" => c.proxy.admin_users = list(),
        "stats_users" => c.proxy.stats_users = list(),
        "shutdown_timeout" => c.proxy.shutdown_timeout = dur()?,
        "log_stats" => {
            c.proxy.log_stats = match value.to_ascii_lowercase().as_str() {
                "1" | "on" | "true" | "yes" => true,
                "0" | "off" | "false" | "no" => false,
                _ => return Err(format!("log_stats: \"{value}\" is not on or off")),
            }
        }
        "stats_period" => c.proxy.stats_period = dur()?,
        "server.max_connections" => c.server.max_connections = num()?,
        "server.min_idle" => c.server.min_idle = num()?,
        "server.idle_timeout" => c.server.idle_timeout = dur()?,
        "server.lifetime" => c.server.lifetime = dur()?,
        "limits.query_wait_timeout" => c.limits.query_wait_timeout = dur()?,
        "limits.idle_transaction_timeout" => c.limits.idle_transaction_timeout = dur()?,
        "limits.client_idle_timeout" => c.limits.client_idle_timeout = dur()?,
        "limits.client_login_timeout" => c.limits.client_login_timeout = dur()?,
        "limits.message_timeout" => c.limits.message_timeout = dur()?,
        "tenant_defaults.max_server_connections" => {
            c.tenant_defaults.max_server_connections = num()?
        }
        "tenant_defaults.max_client_connections" => {
            c.tenant_defaults.max_client_connections = num()?
        }
        "tenant_defaults.search_path" => c.tenant_defaults.search_path = value.to_string(),
        "directory.refresh" => match &mut c.directory {
            Some(d) => d.refresh = dur()?,
            None => return Err("directory.refresh: there is no [directory]".into()),
        },
        _ => unreachable!("every settable key is handled"),
    }
    Ok(name)
}

// ---------------------------------------------------------------------------------------
// SHOW.

/// key, value, default, changeable (by RELOAD or SET): every key of the file, as the
/// file names it (`[proxy]` keys bare, as PgBouncer's; the others `section.key`).
fn config_rows(c: &Config) -> Vec<(String, String, String, bool)> {
    use crate::config as d;
    let p = &c.proxy;
    let dp = d::ProxyConfig::default();
    let l = &c.limits;
    let dl = d::LimitsConfig::default();
    let td = &c.tenant_defaults;
    let dtd = d::TenantDefaults::default();
    let s = &c.server;
    let opt = |o: &Option<String>| o.clone().unwrap_or_default();
    let join = |v: &[String]| v.join(",");
    let keys = |m: &std::collections::BTreeMap<String, String>| {
        m.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let dir = c.directory.as_ref();
    let mut rows: Vec<(&str, String, String, bool)> = vec![
        ("listen", p.listen.clone(), dp.listen.clone(), false),
        (
            "pool_mode",
            p.pool_mode.to_string(),
            dp.pool_mode.to_string(),
            false,
        ),
        (
            "max_client_conn",
            p.max_client_conn.to_string(),
            dp.max_client_conn.to_string(),
            true,
        ),
        (
            "auth_method",
            p.auth_method.to_string(),
            dp.auth_method.to_string(),
            false,
        ),
        (
            "admin_users",
            join(&p.admin_users),
            join(&dp.admin_users),
            true,
        ),
        ("stats_users", join(&p.stats_users), String::new(), true),
        (
            "shutdown_timeout",
            p.shutdown_timeout.to_string(),
            dp.shutdown_timeout.to_string(),
            true,
        ),
        (
            "tenant_from",
            p.tenant_from.to_string(),
            dp.tenant_from.to_string(),
            false,
        ),
        (
            "max_prepared_statements",
            p.max_prepared_statements.to_string(),
            dp.max_prepared_statements.to_string(),
            false,
        ),
        (
            "reset_path_and_role",
            p.reset_path_and_role.to_string(),
            dp.reset_path_and_role.to_string(),
            false,
        ),
        (
            "client_tls",
            p.client_tls.to_string(),
            dp.client_tls.to_string(),
            false,
        ),
        ("tls_cert_file", opt(&p.tls_cert_file), String::new(), true),
        ("tls_key_file", opt(&p.tls_key_file), String::new(), true),
        (
            "tls_client_ca_file",
            opt(&p.tls_client_ca_file),
            String::new(),
            true,
        ),
        ("sni_domain", opt(&p.sni_domain), String::new(), false),
        (
            "so_reuseport",
            (p.so_reuseport as u8).to_string(),
            (dp.so_reuseport as u8).to_string(),
            false,
        ),
        (
            "shutdown_mode",
            match p.shutdown_mode {
                crate::config::ShutdownMode::WaitForServers => "wait_for_servers",
                crate::config::ShutdownMode::WaitForClients => "wait_for_clients",
            }
            .into(),
            "wait_for_servers".into(),
            true,
        ),
        (
            "unix_socket_dir",
            opt(&p.unix_socket_dir),
            String::new(),
            false,
        ),
        (
            "unix_socket_mode",
            p.unix_socket_mode.clone(),
            dp.unix_socket_mode.clone(),
            false,
        ),
        ("peer_id", p.peer_id.to_string(), "0".into(), false),
        (
            "log_format",
            p.log_format.to_string(),
            dp.log_format.to_string(),
            false,
        ),
        (
            "log_stats",
            (p.log_stats as u8).to_string(),
            "0".into(),
            true,
        ),
        (
            "stats_period",
            p.stats_period.to_string(),
            dp.stats_period.to_string(),
            true,
        ),
        (
            "metrics.listen",
            c.metrics
                .as_ref()
                .map(|m| m.listen.clone())
                .unwrap_or_default(),
            String::new(),
            false,
        ),
        ("server.host", s.host.clone(), d::default_host(), false),
        (
            "server.port",
            s.port.to_string(),
            d::default_port().to_string(),
            false,
        ),
        ("server.database", s.database.clone(), String::new(), false),
        ("server.user", s.user.clone(), String::new(), false),
        (
            "server.password_env",
            opt(&s.password_env),
            String::new(),
            true,
        ),
        (
            "server.max_connections",
            s.max_connections.to_string(),
            d::default_max_connections().to_string(),
            true,
        ),
        (
            "server.min_idle",
            s.min_idle.to_string(),
            d::default_min_idle().to_string(),
            true,
        ),
        (
            "server.connect_timeout",
            s.connect_timeout.to_string(),
            d::default_connect_timeout().to_string(),
            false,
        ),
        (
            "server.idle_timeout",
            s.idle_timeout.to_string(),
            d::default_idle_timeout().to_string(),
            true,
        ),
        (
            "server.lifetime",
            s.lifetime.to_string(),
            d::default_lifetime().to_string(),
            true,
        ),
        ("server.tls", s.tls.to_string(), "disable".into(), false),
        (
            "server.tls_ca_file",
            opt(&s.tls_ca_file),
            String::new(),
            true,
        ),
        (
            "server.tls_cert_file",
            opt(&s.tls_cert_file),
            String::new(),
            true,
        ),
        (
            "server.tls_key_file",
            opt(&s.tls_key_file),
            String::new(),
            true,
        ),
        (
            "limits.query_wait_timeout",
            l.query_wait_timeout.to_string(),
            dl.query_wait_timeout.to_string(),
            true,
        ),
        (
            "limits.idle_transaction_timeout",
            l.idle_transaction_timeout.to_string(),
            dl.idle_transaction_timeout.to_string(),
            true,
        ),
        (
            "limits.client_idle_timeout",
            l.client_idle_timeout.to_string(),
            dl.client_idle_timeout.to_string(),
            true,
        ),
        (
            "limits.client_login_timeout",
            l.client_login_timeout.to_string(),
            dl.client_login_timeout.to_string(),
            true,
        ),
        (
            "limits.message_timeout",
            l.message_timeout.to_string(),
            dl.message_timeout.to_string(),
            true,
        ),
        (
            "tenant_defaults.max_server_connections",
            td.max_server_connections.to_string(),
            dtd.max_server_connections.to_string(),
            true,
        ),
        (
            "tenant_defaults.max_client_connections",
            td.max_client_connections.to_string(),
            dtd.max_client_connections.to_string(),
            true,
        ),
        (
            "tenant_defaults.search_path",
            td.search_path.clone(),
            dtd.search_path.clone(),
            true,
        ),
        (
            "tenant_defaults.settings",
            keys(&td.settings),
            String::new(),
            true,
        ),
        (
            "plans",
            c.plans.keys().cloned().collect::<Vec<_>>().join(","),
            String::new(),
            true,
        ),
        (
            "directory.query",
            dir.map(|d| d.query.clone()).unwrap_or_default(),
            String::new(),
            true,
        ),
        (
            "directory.refresh",
            dir.map(|d| d.refresh.to_string()).unwrap_or_default(),
            d::default_directory_refresh().to_string(),
            true,
        ),
        (
            "directory.listen_channel",
            dir.and_then(|d| d.listen_channel.clone())
                .unwrap_or_default(),
            String::new(),
            true,
        ),
        (
            "directory.max_tenants",
            dir.map(|d| d.max_tenants.to_string()).unwrap_or_default(),
            d::default_directory_max_tenants().to_string(),
            true,
        ),
        (
            "users",
            c.users.keys().cloned().collect::<Vec<_>>().join(","),
            String::new(),
            true,
        ),
        (
            "tenants",
            c.tenants.keys().cloned().collect::<Vec<_>>().join(","),
            String::new(),
            true,
        ),
    ];
    rows.drain(..)
        .map(|(k, v, d, ch)| (k.to_string(), v, d, ch))
        .collect()
}

/// PgBouncer's time format (`2024-05-01 10:00:00 UTC`).
fn timestamp(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + (month <= 2) as i64;
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Running totals of one tenant (PgBouncer's stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub xact: u64,
    pub query: u64,
    pub recv: u64,
    pub sent: u64,
    pub xact_us: u64,
    pub query_us: u64,
    pub wait_us: u64,
}

impl Totals {
    pub fn of(t: &Tenant) -> Totals {
        let s = &t.stats;
        let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        Totals {
            xact: l(&s.transactions),
            query: l(&s.queries),
            recv: l(&s.bytes_in),
            sent: l(&s.bytes_out),
            xact_us: l(&s.transaction_us),
            query_us: l(&s.query_us),
            wait_us: l(&s.wait_us),
        }
    }

    fn add(&mut self, o: &Totals) {
        self.xact += o.xact;
        self.query += o.query;
        self.recv += o.recv;
        self.sent += o.sent;
        self.xact_us += o.xact_us;
        self.query_us += o.query_us;
        self.wait_us += o.wait_us;
    }

    /// PgBouncer's averages over a period from `prev` to `self`: counts and bytes per
    /// second, times in µs per transaction or query.
    fn average(&self, prev: &Totals, secs: f64) -> Totals {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        let (x, q) = (d(self.xact, prev.xact), d(self.query, prev.query));
        let rate = |n: u64| (n as f64 / secs.max(0.001)).round() as u64;
        Totals {
            xact: rate(x),
            query: rate(q),
            recv: rate(d(self.recv, prev.recv)),
            sent: rate(d(self.sent, prev.sent)),
            xact_us: d(self.xact_us, prev.xact_us).checked_div(x).unwrap_or(0),
            query_us: d(self.query_us, prev.query_us).checked_div(q).unwrap_or(0),
            wait_us: d(self.wait_us, prev.wait_us).checked_div(x).unwrap_or(0),
        }
    }

    fn values(&self) -> [u64; 7] {
        [
            self.xact,
            self.query,
            self.recv,
            self.sent,
            self.xact_us,
            self.query_us,
            self.wait_us,
        ]
    }
}

/// The last complete `stats_period`: per tenant id, the totals at its end and the
/// averages over it.
#[derive(Debug, Default)]
pub struct StatsWindow(Mutex<(Vec<Totals>, Vec<Totals>)>);

impl StatsWindow {
    pub fn averages(&self, id: TenantId) -> Totals {
        let w = self.0.lock().unwrap_or_else(|e| e.into_inner());
        w.1.get(id as usize).copied().unwrap_or_default()
    }
}

/// Every `stats_period`: the averages SHOW STATS answers, and with `log_stats` one line
/// per tenant that had traffic (and one for all), as PgBouncer's stats lines.
pub async fn run_stats(shared: Arc<Shared>) {
    let mut last = Instant::now();
    loop {
        let period = shared.live.config().proxy.stats_period.0;
        tokio::time::sleep(period).await;
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
        let secs = last.elapsed().as_secs_f64();
        last = Instant::now();
        let log = shared.live.config().proxy.log_stats;
        let mut all_now = Totals::default();
        let mut all_prev = Totals::default();
        let mut w = shared
            .stats_window
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let n = shared.tenants.ids();
        w.0.resize(n, Totals::default());
        w.1.resize(n, Totals::default());
        for t in shared.tenants.iter_all() {
            let i = t.id as usize;
            if i >= n {
                continue;
            }
            let now = Totals::of(t);
            let avg = now.average(&w.0[i], secs);
            all_now.add(&now);
            all_prev.add(&w.0[i]);
            if log && now != w.0[i] {
                log_line(Some(&t.name), &avg);
            }
            w.0[i] = now;
            w.1[i] = avg;
        }
        drop(w);
        if log {
            log_line(None, &all_now.average(&all_prev, secs));
        }
    }
}

fn log_line(tenant: Option<&str>, a: &Totals) {
    tracing::info!(
        tenant = tenant.unwrap_or("*"),
        xacts_per_s = a.xact,
        queries_per_s = a.query,
        in_bytes_per_s = a.recv,
        out_bytes_per_s = a.sent,
        xact_us = a.xact_us,
        query_us = a.query_us,
        wait_us = a.wait_us,
        "stats: {} xacts/s, {} queries/s, in {} B/s, out {} B/s, xact {} us, query {} us, wait {} us",
        a.xact,
        a.query,
        a.recv,
        a.sent,
        a.xact_us,
        a.query_us,
        a.wait_us
    );
}

/// Resident memory and open file descriptors of this process, from /proc/self.
pub fn process_usage() -> (u64, u64) {
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * 4096)
        .unwrap_or(0);
    let fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    (rss, fds)
}

const STATS_COLS: [&str; 7] = [
    "xact_count",
    "query_count",
    "bytes_received",
    "bytes_sent",
    "xact_time",
    "query_time",
    "wait_time",
];

fn show(what: &str, shared: &Shared) -> Result<Table, PgError> {
    use Ty::{Int, Text};
    let (snap, idle_places) = shared.pools.snapshot();
    // Login 0 is each server's own user: names are read from the place's target.
    let login_user =
        |place: PlaceId, login: LoginId| shared.pools.get(place).target().login(login).user.clone();
    let user_of = |tn: &crate::tenant::Tenant| login_user(tn.place(), tn.login());
    let place_of = |tn: &crate::tenant::Tenant| {
        let target = shared.pools.of(tn).target();
        (target.host.clone(), target.port, target.database.clone())
    };
    let config = shared.live.config();
    let mode = config.proxy.pool_mode.as_str();
    let server_name = |tn: &crate::tenant::Tenant| {
        shared
            .pools
            .place(tn.place())
            .map(|p| p.server.clone())
            .unwrap_or_default()
    };
    let listen: Option<SocketAddr> = shared.config.proxy.listen.parse().ok();
    let clients = shared.registry.all();
    let at = |v: &[u32], i: usize| v.get(i).copied().unwrap_or(0);
    let mut t;
    match what {
        "HELP" => {
            t = Table::new(&[("command", Text)]);
            for c in HELP {
                t.row(vec![c.into()]);
            }
        }
        "VERSION" => {
            t = Table::new(&[("version", Text)]);
            t.row(vec![
                format!("tenantpool {}", env!("CARGO_PKG_VERSION")).into(),
            ]);
        }
        "CONFIG" => {
            t = Table::new(&[
                ("key", Text),
                ("value", Text),
                ("default", Text),
                ("changeable", Text),
            ]);
            for (k, v, d, ch) in config_rows(&config) {
                t.row(vec![
                    k.into(),
                    v.into(),
                    d.into(),
                    if ch { "yes" } else { "no" }.into(),
                ]);
            }
        }
        "STATE" => {
            let paused = shared.pools.is_paused(None);
            t = Table::new(&[("key", Text), ("value", Text)]);
            let yes = |b: bool| V::from(if b { "yes" } else { "no" });
            t.row(vec!["active".into(), yes(!paused)]);
            t.row(vec!["paused".into(), yes(paused)]);
            t.row(vec!["suspended".into(), yes(false)]);
            t.row(vec![
                "shutting_down".into(),
                yes(shared.stopping.load(Ordering::Acquire)),
            ]);
        }
        "TENANTS" => {
            t = Table::new(&[
                ("tenant", Text),
                ("schema", Text),
                ("max_server_connections", Int),
                ("max_client_connections", Int),
                ("cl_total", Int),
                ("cl_active", Int),
                ("cl_waiting", Int),
                ("sv_in_use", Int),
                ("sv_idle", Int),
                ("maxwait", Int),
                ("avg_wait_us", Int),
                ("wait_timeouts", Int),
                ("paused", Text),
                ("disabled", Text),
                ("plan", Text),
                ("source", Text),
                ("server", Text),
                ("database", Text),
            ]);
            for tn in shared.tenants.iter() {
                let i = tn.id as usize;
                let s = &tn.stats;
                let xacts = s.transactions.load(Ordering::Relaxed).max(1);
                let spec = tn.spec();
                let yes = |b: bool| V::from(if b { "yes" } else { "no" });
                t.row(vec![
                    tn.name.clone().into(),
                    spec.schema.clone().into(),
                    tn.max_server().into(),
                    tn.max_clients().into(),
                    tn.clients.load(Ordering::Relaxed).into(),
                    s.active.load(Ordering::Relaxed).into(),
                    s.waiting.load(Ordering::Relaxed).into(),
                    at(&snap.in_use, i).into(),
                    at(&snap.idle_by_tenant, i).into(),
                    snap.max_wait
                        .get(i)
                        .map(|w| w.as_secs())
                        .unwrap_or(0)
                        .into(),
                    (s.wait_us.load(Ordering::Relaxed) / xacts).into(),
                    s.wait_timeouts.load(Ordering::Relaxed).into(),
                    yes(snap.paused.get(i).copied().unwrap_or(false)),
                    yes(tn.disabled.load(Ordering::Relaxed)),
                    spec.plan.clone().unwrap_or_default().into(),
                    match spec.source {
                        crate::tenant::Source::Toml => "config",
                        crate::tenant::Source::Directory => "directory",
                    }
                    .into(),
                    server_name(tn).into(),
                    place_of(tn).2.into(),
                ]);
            }
        }
        "POOLS" => {
            t = Table::new(&[
                ("database", Text),
                ("user", Text),
                ("cl_active", Int),
                ("cl_waiting", Int),
                ("cl_active_cancel_req", Int),
                ("cl_waiting_cancel_req", Int),
                ("sv_active", Int),
                ("sv_active_cancel", Int),
                ("sv_being_canceled", Int),
                ("sv_idle", Int),
                ("sv_used", Int),
                ("sv_tested", Int),
                ("sv_login", Int),
                ("maxwait", Int),
                ("maxwait_us", Int),
                ("pool_mode", Text),
                ("cl_in_transaction", Int),
            ]);
            for tn in shared.tenants.iter() {
                let i = tn.id as usize;
                let s = &tn.stats;
                let w = snap.max_wait.get(i).copied().unwrap_or_default();
                let waiting = s.waiting.load(Ordering::Relaxed);
                // PgBouncer's cl_active: logged in and not waiting for a server.
                let active = tn.clients.load(Ordering::Relaxed).saturating_sub(waiting);
                t.row(vec![
                    tn.name.clone().into(),
                    user_of(tn).into(),
                    active.into(),
                    waiting.into(),
                    0u32.into(),
                    0u32.into(),
                    at(&snap.in_use, i).into(),
                    0u32.into(),
                    0u32.into(),
                    at(&snap.idle_by_tenant, i).into(),
                    0u32.into(),
                    0u32.into(),
                    0u32.into(),
                    w.as_secs().into(),
                    w.subsec_micros().into(),
                    mode.into(),
                    s.active.load(Ordering::Relaxed).into(),
                ]);
            }
            // Idle server connections no tenant has used yet: database "*", per login (and
            // server).
            let mut fresh: std::collections::BTreeMap<(PlaceId, LoginId), u32> = Default::default();
            for (c, &place) in snap.idle_servers.iter().zip(&idle_places) {
                if c.tenant.is_none() {
                    *fresh.entry((place, c.login)).or_default() += 1;
                }
            }
            for ((place, login), n) in fresh {
                let mut r: Vec<V> = vec!["*".into(), login_user(place, login).into()];
                r.extend((0..7).map(|_| V::I(0)));
                r.push(n.into());
                r.extend((0..5).map(|_| V::I(0)));
                r.push(mode.into());
                r.push(V::I(0));
                t.row(r);
            }
        }
        "DATABASES" => {
            t = Table::new(&[
                ("name", Text),
                ("host", Text),
                ("port", Int),
                ("database", Text),
                ("force_user", Text),
                ("pool_size", Int),
                ("min_pool_size", Int),
                ("reserve_pool", Int),
                ("server_lifetime", Int),
                ("pool_mode", Text),
                ("max_connections", Int),
                ("current_connections", Int),
                ("max_client_connections", Int),
                ("current_client_connections", Int),
                ("paused", Int),
                ("disabled", Int),
                ("schema", Text),
                ("server", Text),
            ]);
            for tn in shared.tenants.iter() {
                let i = tn.id as usize;
                let (host, port, database) = place_of(tn);
                t.row(vec![
                    tn.name.clone().into(),
                    host.into(),
                    port.into(),
                    database.into(),
                    user_of(tn).into(),
                    tn.max_server().into(),
                    0u32.into(),
                    0u32.into(),
                    config.server.lifetime.0.as_secs().into(),
                    mode.into(),
                    tn.max_server().into(),
                    (at(&snap.in_use, i) + at(&snap.idle_by_tenant, i)).into(),
                    tn.max_clients().into(),
                    tn.clients.load(Ordering::Relaxed).into(),
                    snap.paused.get(i).copied().unwrap_or(false).into(),
                    tn.disabled.load(Ordering::Relaxed).into(),
                    tn.spec().schema.clone().into(),
                    server_name(tn).into(),
                ]);
            }
        }
        "USERS" => {
            t = Table::new(&[
                ("name", Text),
                ("pool_size", Int),
                ("reserve_pool_size", Int),
                ("pool_mode", Text),
                ("max_user_connections", Int),
                ("current_connections", Int),
                ("max_user_client_connections", Int),
                ("current_client_connections", Int),
                ("tenants", Text),
            ]);
            for (name, u) in &config.users {
                let mine = clients.iter().filter(|c| &*c.user == name.as_str());
                let (n, servers) = mine.fold((0u32, 0u32), |(n, s), c| {
                    (n + 1, s + c.server().is_some() as u32)
                });
                t.row(vec![
                    name.clone().into(),
                    0u32.into(),
                    0u32.into(),
                    mode.into(),
                    0u32.into(),
                    servers.into(),
                    0u32.into(),
                    n.into(),
                    u.tenants.join(",").into(),
                ]);
            }
        }
        "LISTS" => {
            t = Table::new(&[("list", Text), ("items", Int)]);
            let used = shared.clients.load(Ordering::Relaxed);
            let active = clients.len() as u32;
            for (k, v) in [
                ("databases", shared.tenants.len() as u32),
                ("users", config.users.len() as u32),
                ("pools", shared.tenants.len() as u32),
                ("free_clients", 0),
                ("used_clients", used),
                ("login_clients", used.saturating_sub(active)),
                ("free_servers", 0),
                ("used_servers", snap.open),
                ("dns_names", 0),
                ("dns_zones", 0),
                ("dns_queries", 0),
                ("dns_pending", 0),
                (
                    "paused_tenants",
                    snap.paused.iter().filter(|&&p| p).count() as u32,
                ),
            ] {
                t.row(vec![k.into(), v.into()]);
            }
        }
        "MEM" => {
            t = Table::new(&[
                ("name", Text),
                ("size", Int),
                ("used", Int),
                ("free", Int),
                ("memtotal", Int),
            ]);
            let (rss, _) = process_usage();
            let mut row = |name: &str, size: usize, used: usize| {
                t.row(vec![
                    name.into(),
                    size.into(),
                    used.into(),
                    0u32.into(),
                    (size * used).into(),
                ]);
            };
            row(
                "client_cache",
                std::mem::size_of::<crate::registry::ClientSlot>(),
                clients.len(),
            );
            row(
                "server_cache",
                std::mem::size_of::<crate::server::Backend>(),
                snap.open as usize,
            );
            row(
                "tenant_cache",
                std::mem::size_of::<Tenant>(),
                shared.tenants.ids(),
            );
            row("process_rss", 1, rss as usize);
        }
        "STATS" | "STATS_TOTALS" | "STATS_AVERAGES" | "TOTALS" => {
            let mut all = Totals::default();
            let mut all_avg = Totals::default();
            let per: Vec<(&Tenant, Totals, Totals)> = shared
                .tenants
                .iter()
                .map(|tn| {
                    let (now, avg) = (Totals::of(tn), shared.stats_window.averages(tn.id));
                    all.add(&now);
                    all_avg.add(&avg);
                    (tn, now, avg)
                })
                .collect();
            match what {
                "STATS" => {
                    let mut cols = vec![("database", Text)];
                    cols.extend([
                        ("total_xact_count", Int),
                        ("total_query_count", Int),
                        ("total_received", Int),
                        ("total_sent", Int),
                        ("total_xact_time", Int),
                        ("total_query_time", Int),
                        ("total_wait_time", Int),
                        ("avg_xact_count", Int),
                        ("avg_query_count", Int),
                        ("avg_recv", Int),
                        ("avg_sent", Int),
                        ("avg_xact_time", Int),
                        ("avg_query_time", Int),
                        ("avg_wait_time", Int),
                    ]);
                    t = Table::new(&cols);
                    for (tn, now, avg) in per {
                        let mut r: Vec<V> = vec![tn.name.clone().into()];
                        r.extend(now.values().map(V::from));
                        r.extend(avg.values().map(V::from));
                        t.row(r);
                    }
                }
                "STATS_TOTALS" | "STATS_AVERAGES" => {
                    let mut cols = vec![("database", Text)];
                    cols.extend(STATS_COLS.iter().map(|c| (*c, Int)));
                    t = Table::new(&cols);
                    for (tn, now, avg) in per {
                        let mut r: Vec<V> = vec![tn.name.clone().into()];
                        let v = if what == "STATS_TOTALS" { now } else { avg };
                        r.extend(v.values().map(V::from));
                        t.row(r);
                    }
                }
                _ => {
                    t = Table::new(&[("name", Text), ("value", Int)]);
                    let n = [
                        "xact_count",
                        "query_count",
                        "client_bytes",
                        "server_bytes",
                        "xact_time",
                        "query_time",
                        "wait_time",
                    ];
                    for (k, v) in n.iter().zip(all.values()) {
                        t.row(vec![format!("total_{k}").into(), v.into()]);
                    }
                    for (k, v) in n.iter().zip(all_avg.values()) {
                        t.row(vec![format!("avg_{k}").into(), v.into()]);
                    }
                }
            }
        }
        "CLIENTS" => {
            t = Table::new(&SOCKET_COLS);
            for c in &clients {
                let state = match c.state.load(Ordering::Relaxed) {
                    STATE_ACTIVE => "active",
                    STATE_WAITING => "waiting",
                    _ => "idle",
                };
                let server = c.server();
                let time: V = timestamp(c.connected_at).into();
                t.row(vec![
                    "C".into(),
                    c.user.to_string().into(),
                    shared.tenants.get(c.tenant).name.clone().into(),
                    state.into(),
                    c.addr.ip().to_string().into(),
                    c.addr.port().into(),
                    listen
                        .map(|a| a.ip().to_string())
                        .unwrap_or_default()
                        .into(),
                    listen.map(|a| a.port()).unwrap_or(0).into(),
                    time.clone(),
                    time,
                    0u32.into(),
                    0u32.into(),
                    c.killed.load(Ordering::Relaxed).into(),
                    format!("{:x}", c.pid).into(),
                    server
                        .map(|_| format!("{:x}", c.server_conn.load(Ordering::Relaxed)))
                        .unwrap_or_default()
                        .into(),
                    server.map(|(pid, _)| pid).unwrap_or(0).into(),
                    "".into(),
                    "".into(),
                    c.prepared.load(Ordering::Relaxed).into(),
                    V::Null,
                    c.pid.into(),
                ]);
            }
        }
        "SERVERS" => {
            t = Table::new(&SOCKET_COLS);
            let now = SystemTime::now();
            for c in &clients {
                if let Some((pid, _)) = c.server() {
                    let tn = shared.tenants.get(c.tenant);
                    // The place of the connection (the tenant may have moved since).
                    let target = shared
                        .pools
                        .get(c.server_place.load(Ordering::Relaxed))
                        .target();
                    let (host, port) = (target.host.clone(), target.port);
                    t.row(vec![
                        "S".into(),
                        user_of(tn).into(),
                        tn.name.clone().into(),
                        "active".into(),
                        host.into(),
                        port.into(),
                        "".into(),
                        0u32.into(),
                        V::Null,
                        V::Null,
                        0u32.into(),
                        0u32.into(),
                        0u32.into(),
                        format!("{:x}", c.server_conn.load(Ordering::Relaxed)).into(),
                        format!("{:x}", c.pid).into(),
                        pid.into(),
                        "".into(),
                        "".into(),
                        c.server_prepared.load(Ordering::Relaxed).into(),
                        V::Null,
                        c.server_conn.load(Ordering::Relaxed).into(),
                    ]);
                }
            }
            for (c, &place) in snap.idle_servers.iter().zip(&idle_places) {
                let tenant = c.tenant.map(|t| shared.tenants.get(t).name.clone());
                let target = shared.pools.get(place).target();
                t.row(vec![
                    "S".into(),
                    login_user(place, c.login).into(),
                    tenant.unwrap_or_default().into(),
                    "idle".into(),
                    target.host.clone().into(),
                    target.port.into(),
                    "".into(),
                    0u32.into(),
                    timestamp(now - c.age).into(),
                    V::Null,
                    0u32.into(),
                    0u32.into(),
                    0u32.into(),
                    "".into(),
                    "".into(),
                    c.backend_pid.into(),
                    "".into(),
                    "".into(),
                    c.prepared.into(),
                    c.age.as_secs().into(),
                    V::Null,
                ]);
            }
        }
        other => {
            return Err(PgError::error(
                "42601",
                format!("unknown SHOW item: {other} (try SHOW HELP)"),
            ));
        }
    }
    Ok(t)
}

/// SHOW CLIENTS and SHOW SERVERS: PgBouncer's columns, then `prepared_statements`,
/// `age` (s, idle servers) and `id` (clients: the cancel pid; servers: the connection).
const SOCKET_COLS: [(&str, Ty); 21] = [
    ("type", Ty::Text),
    ("user", Ty::Text),
    ("database", Ty::Text),
    ("state", Ty::Text),
    ("addr", Ty::Text),
    ("port", Ty::Int),
    ("local_addr", Ty::Text),
    ("local_port", Ty::Int),
    ("connect_time", Ty::Text),
    ("request_time", Ty::Text),
    ("wait", Ty::Int),
    ("wait_us", Ty::Int),
    ("close_needed", Ty::Int),
    ("ptr", Ty::Text),
    ("link", Ty::Text),
    ("remote_pid", Ty::Int),
    ("tls", Ty::Text),
    ("application_name", Ty::Text),
    ("prepared_statements", Ty::Int),
    ("age", Ty::Int),
    ("id", Ty::Int),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::parse(
            "[server]\ndatabase = \"d\"\nuser = \"u\"\n[tenants.acme]\nschema = \"a\"\n\
             [users.x]\npassword = \"p\"\n",
        )
        .unwrap()
    }

    #[test]
    fn timestamps_as_pgbouncer_writes_them() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_709_251_199);
        assert_eq!(timestamp(t), "2024-02-29 23:59:59 UTC");
        assert_eq!(timestamp(SystemTime::UNIX_EPOCH), "1970-01-01 00:00:00 UTC");
    }

    #[test]
    fn averages_are_rates_and_times_per_transaction() {
        let prev = Totals {
            xact: 10,
            query: 20,
            recv: 1000,
            sent: 2000,
            xact_us: 100,
            query_us: 100,
            wait_us: 0,
        };
        let now = Totals {
            xact: 30,
            query: 60,
            recv: 3000,
            sent: 6000,
            xact_us: 2100,
            query_us: 2100,
            wait_us: 400,
        };
        let a = now.average(&prev, 2.0);
        assert_eq!(
            a.values(),
            [10, 20, 1000, 2000, 100, 50, 20],
            "per second; µs per transaction / query"
        );
        assert_eq!(now.average(&now, 2.0), Totals::default());
    }

    #[test]
    fn set_takes_file_and_pgbouncer_names() {
        let mut c = config();
        assert_eq!(
            set_key(&mut c, "default_pool_size", "7"),
            Ok("tenant_defaults.max_server_connections")
        );
        assert_eq!(c.tenant_defaults.max_server_connections, 7);
        set_key(&mut c, "limits.query_wait_timeout", "90").unwrap();
        assert_eq!(c.limits.query_wait_timeout, Dur::secs(90));
        set_key(&mut c, "server_idle_timeout", "5m").unwrap();
        assert_eq!(c.server.idle_timeout, Dur::secs(300));
        set_key(&mut c, "proxy.stats_users", "a, b").unwrap();
        assert_eq!(c.proxy.stats_users, ["a", "b"]);
        let e = set_key(&mut c, "listen", "0.0.0.0:1").unwrap_err();
        assert!(e.contains("restart"), "{e}");
        let e = set_key(&mut c, "nope", "1").unwrap_err();
        assert!(e.contains("unknown config key"), "{e}");
        assert!(set_key(&mut c, "max_client_conn", "x").is_err());
    }

    #[test]
    fn config_rows_use_file_names_and_values() {
        let rows = config_rows(&config());
        let get = |k: &str| rows.iter().find(|r| r.0 == k).unwrap().clone();
        assert_eq!(get("auth_method").1, "scram-sha-256");
        assert_eq!(get("pool_mode").2, "transaction");
        assert_eq!(get("server.max_connections").2, "50");
        assert!(!get("listen").3, "listen needs a restart");
        assert!(get("limits.query_wait_timeout").3);
        assert!(rows.iter().all(|r| !r.1.contains("ScramSha")));
    }
}
