//! The server side: one connection from tenantpool to the shared PostgreSQL.
//!
//! [`connect`] opens a connection and logs in as one of the target's logins (`[server] user`
//! or a tenant's own `server_user`), answering whatever PostgreSQL asks for (SCRAM-SHA-256,
//! md5 or cleartext), and collects its ParameterStatus values and BackendKeyData. A
//! [`ServerConn`] remembers its login, which tenant's `search_path` it carries and whether a
//! client may have left session state on it, so the pool can decide who may use it and what
//! a checkout must reset.

use std::future::Future;
use std::io;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{
    ChannelBinding, SCRAM_SHA_256, SCRAM_SHA_256_PLUS, ScramSha256,
};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::Config;
use crate::session_state::{RESET_SEARCH_PATH, SessionState};
use crate::tls::Stream;

/// A server login, by its index in [`ServerTarget::logins`]: [`SHARED_LOGIN`] is
/// `[server] user`, the others are tenants' own `server_user`s.
pub type LoginId = u32;

/// The login of `[server] user`, which tenants without a `server_user` share.
pub const SHARED_LOGIN: LoginId = 0;

/// Where tenantpool logs in to PostgreSQL, and as whom.
#[derive(Debug, Clone)]
pub struct ServerTarget {
    pub host: String,
    pub port: u16,
    pub database: String,
    /// Every login server connections use, by [`LoginId`]; never empty.
    pub logins: Vec<ServerLogin>,
    pub connect_timeout: Duration,
    /// TLS towards the server, unless `server.tls = "disable"`.
    pub tls: Option<std::sync::Arc<crate::tls::Connector>>,
}

/// A role tenantpool logs in as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLogin {
    pub user: String,
    pub password: Option<String>,
}

impl ServerTarget {
    /// The server and its logins as the config names them (see [`Config::server_logins`]).
    pub fn from_config(config: &Config) -> Result<ServerTarget, String> {
        Ok(ServerTarget {
            host: config.server.host.clone(),
            port: config.server.port,
            database: config.server.database.clone(),
            logins: config
                .server_logins()
                .logins
                .into_iter()
                .map(|(user, password)| ServerLogin { user, password })
                .collect(),
            connect_timeout: config.server.connect_timeout.0,
            tls: crate::tls::Connector::from_config(config)?.map(std::sync::Arc::new),
        })
    }

    /// A connection to the server: over its Unix socket `<host>/.s.PGSQL.<port>` when
    /// `host` is a directory (as libpq reads it; never TLS there, as in libpq), else TCP
    /// with TLS negotiated when configured.
    pub async fn open(&self) -> Result<Stream, String> {
        if self.host.starts_with('/') {
            let path = crate::listener::socket_path(&self.host, self.port);
            let unix = tokio::net::UnixStream::connect(&path)
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?;
            return Ok(Stream::Unix(unix));
        }
        let addr = format!("{}:{}", self.host, self.port);
        let tcp = TcpStream::connect(&addr)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let _ = socket2::SockRef::from(&tcp).set_keepalive(true);
        match &self.tls {
            None => Ok(Stream::Plain(tcp)),
            Some(tls) => tls.negotiate(tcp, &self.host).await,
        }
    }

    pub fn login(&self, id: LoginId) -> &ServerLogin {
        &self.logins[id as usize]
    }
}

/// An open, logged-in server connection: a pointer to its [`Backend`], so that handing it
/// between the pool's lists, checkouts and relays (several moves a transaction) copies 8
/// bytes instead of the whole state.
#[derive(Debug)]
pub struct ServerConn(Box<Backend>);

impl ServerConn {
    pub fn new(backend: Backend) -> ServerConn {
        ServerConn(Box::new(backend))
    }
}

impl std::ops::Deref for ServerConn {
    type Target = Backend;
    fn deref(&self) -> &Backend {
        &self.0
    }
}

impl std::ops::DerefMut for ServerConn {
    fn deref_mut(&mut self) -> &mut Backend {
        &mut self.0
    }
}

/// What a server connection is and carries.
#[derive(Debug)]
pub struct Backend {
    pub stream: Stream,
    /// Bytes read from the server and not yet forwarded. Kept for the connection's life:
    /// there are few server connections, and this avoids an allocation per transaction.
    pub buf: BytesMut,
    pub id: u64,
    pub backend_pid: i32,
    pub backend_secret: i32,
    /// The login it was opened with: it only ever serves tenants of that login.
    pub login: LoginId,
    pub created: Instant,
    /// When the connection last went back to the pool.
    pub idle_since: Instant,
    /// The session state it carries: tenant, client settings, what clients may have
    /// changed.
    pub state: SessionState,
    /// Statements and relay queues, boxed: a connection is moved a few times per checkout.
    pub work: Box<ConnWork>,
    /// The server has part of a client message (the client left or stalled in the middle
    /// of one): a Terminate would be read as more of it (and could even complete it), so
    /// the connection is ended by the end of the stream alone.
    pub mid_message: bool,
}

/// What a server connection keeps for the relays that use it.
#[derive(Debug, Default)]
pub struct ConnWork {
    /// Named statements prepared on it under the proxy's names.
    pub stmts: crate::prepared::ServerStatements,
    /// What a relay sends to this connection and to the client it serves: empty between
    /// transactions, kept so their memory is reused rather than allocated per transaction.
    pub to_server: crate::splice::Out,
    pub to_client: crate::splice::Out,
}

/// Size of the read buffer of a server connection.
pub const SERVER_BUF: usize = 16 * 1024;

static NEXT_SERVER_ID: AtomicU64 = AtomicU64::new(1);

/// What a successful login reports.
pub struct Login {
    pub conn: ServerConn,
    pub params: Vec<(String, String)>,
}

/// Why opening a server connection failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectError {
    pub message: String,
    /// The SQLSTATE of the server's ErrorResponse, when it refused the login.
    pub code: Option<String>,
}

impl ConnectError {
    /// PostgreSQL refused the login with 53300 (too_many_connections): the role's
    /// `CONNECTION LIMIT`, the database's, or the server's `max_connections` (less its
    /// reserved slots) is reached. The server works; the login has to wait for a place.
    /// (Told apart by the code alone: the message text depends on `lc_messages`.)
    pub fn is_full(&self) -> bool {
        self.code.as_deref() == Some("53300")
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<String> for ConnectError {
    fn from(message: String) -> ConnectError {
        ConnectError {
            message,
            code: None,
        }
    }
}

impl From<&str> for ConnectError {
    fn from(message: &str) -> ConnectError {
        message.to_string().into()
    }
}

impl From<ConnectError> for String {
    fn from(e: ConnectError) -> String {
        e.message
    }
}

/// Opens a server connection and logs in as `login`, within `connect_timeout`.
pub async fn connect(target: &ServerTarget, login: LoginId) -> Result<Login, ConnectError> {
    connect_with(target, login, true).await
}

/// Opens a server connection that starts with the role's own defaults, as any other
/// client's would (for [`crate::audit`]); never for the pool.
pub async fn connect_plain(target: &ServerTarget, login: LoginId) -> Result<Login, ConnectError> {
    connect_with(target, login, false).await
}

async fn connect_with(
    target: &ServerTarget,
    login: LoginId,
    pooled: bool,
) -> Result<Login, ConnectError> {
    match tokio::time::timeout(target.connect_timeout, connect_inner(target, login, pooled)).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "connecting to {}:{} timed out after {:?}",
            target.host, target.port, target.connect_timeout
        )
        .into()),
    }
}

async fn connect_inner(
    target: &ServerTarget,
    login: LoginId,
    pooled: bool,
) -> Result<Login, ConnectError> {
    let ServerLogin { user, password } = target.login(login);
    let mut stream = target.open().await?;
    let mut out = BytesMut::with_capacity(256);
    // The search_path and role the connection starts with are also what RESET, DISCARD
    // ALL and `SET ... TO DEFAULT` go back to, whatever ALTER ROLE or ALTER DATABASE say:
    // a search_path that resolves to no schema (see session_state) and no SET ROLE.
    let mut params = vec![
        ("user", user.as_str()),
        ("database", target.database.as_str()),
    ];
    if pooled {
        params.extend([("search_path", RESET_SEARCH_PATH), ("role", "none")]);
    }
    frontend::startup_message(params, &mut out).map_err(|e| e.to_string())?;
    stream.write_all(&out).await.map_err(|e| e.to_string())?;

    let mut buf = BytesMut::with_capacity(SERVER_BUF);
    let mut params = Vec::new();
    let mut key = (0, 0);
    let mut scram: Option<ScramSha256> = None;
    let password = || {
        password.as_deref().ok_or_else(|| {
            let keys = if login == SHARED_LOGIN {
                "server.password or server.password_env"
            } else {
                "tenants.NAME.server_password or server_password_env"
            };
            format!("the server asks a password of {user} and none is configured ({keys})")
        })
    };
    loop {
        let msg = loop {
            match Message::parse(&mut buf).map_err(|e| format!("bad message from server: {e}"))? {
                Some(m) => break m,
                None => {
                    if buf.len() > 1 << 20 {
                        return Err("server sent an oversized message during login".into());
                    }
                    buf.reserve(4096);
                    let n = stream.read_buf(&mut buf).await.map_err(|e| e.to_string())?;
                    if n == 0 {
                        return Err("server closed the connection during login".into());
                    }
                }
            }
        };
        out.clear();
        match msg {
            Message::AuthenticationOk => {}
            Message::AuthenticationCleartextPassword => {
                frontend::password_message(password()?.as_bytes(), &mut out)
                    .map_err(|e| e.to_string())?;
            }
            Message::AuthenticationMd5Password(body) => {
                let hash = md5_hash(user.as_bytes(), password()?.as_bytes(), body.salt());
                frontend::password_message(hash.as_bytes(), &mut out).map_err(|e| e.to_string())?;
            }
            Message::AuthenticationSasl(body) => {
                let mut mechs = body.mechanisms();
                let (mut has_scram, mut has_plus) = (false, false);
                while let Some(m) = fallible_iterator::FallibleIterator::next(&mut mechs)
                    .map_err(|e| e.to_string())?
                {
                    has_scram |= m == SCRAM_SHA_256;
                    has_plus |= m == SCRAM_SHA_256_PLUS;
                }
                // Over TLS, bound to the server's certificate when the server offers it
                // (a man in the middle cannot relay the exchange); else say that this
                // client could bind, so that a server stripped of -PLUS is noticed.
                let end_point = stream
                    .peer_certificate()
                    .and_then(crate::tls::end_point_hash);
                let (mechanism, binding) = match end_point {
                    Some(hash) if has_plus => (
                        SCRAM_SHA_256_PLUS,
                        ChannelBinding::tls_server_end_point(hash),
                    ),
                    _ if !has_scram => {
                        return Err("server offers no SASL mechanism tenantpool supports".into());
                    }
                    _ if stream.is_tls() => (SCRAM_SHA_256, ChannelBinding::unrequested()),
                    _ => (SCRAM_SHA_256, ChannelBinding::unsupported()),
                };
                let s = ScramSha256::new(password()?.as_bytes(), binding);
                frontend::sasl_initial_response(mechanism, s.message(), &mut out)
                    .map_err(|e| e.to_string())?;
                scram = Some(s);
            }
            Message::AuthenticationSaslContinue(body) => {
                let s = scram.as_mut().ok_or("unexpected SASL continue")?;
                s.update(body.data()).map_err(|e| e.to_string())?;
                frontend::sasl_response(s.message(), &mut out).map_err(|e| e.to_string())?;
            }
            Message::AuthenticationSaslFinal(body) => {
                let s = scram.as_mut().ok_or("unexpected SASL final")?;
                s.finish(body.data())
                    .map_err(|e| format!("server SCRAM signature is wrong: {e}"))?;
            }
            Message::ParameterStatus(body) => {
                let name = body.name().map_err(|e| e.to_string())?;
                let value = body.value().map_err(|e| e.to_string())?;
                params.push((name.to_string(), value.to_string()));
            }
            Message::BackendKeyData(body) => {
                key = (body.process_id(), body.secret_key());
            }
            Message::NoticeResponse(_) => {}
            Message::ErrorResponse(body) => {
                let mut fields = body.fields();
                let mut text = String::new();
                let mut code = String::new();
                while let Ok(Some(f)) = fallible_iterator::FallibleIterator::next(&mut fields) {
                    match f.type_() {
                        b'M' => text = String::from_utf8_lossy(f.value_bytes()).into_owned(),
                        b'C' => code = String::from_utf8_lossy(f.value_bytes()).into_owned(),
                        _ => {}
                    }
                }
                return Err(ConnectError {
                    message: format!("server refused the login: {text} ({code})"),
                    code: Some(code),
                });
            }
            Message::ReadyForQuery(_) => {
                buf.clear();
                let now = Instant::now();
                return Ok(Login {
                    conn: ServerConn::new(Backend {
                        stream,
                        buf,
                        id: NEXT_SERVER_ID.fetch_add(1, Ordering::Relaxed),
                        backend_pid: key.0,
                        backend_secret: key.1,
                        login,
                        created: now,
                        idle_since: now,
                        state: SessionState::default(),
                        work: Default::default(),
                        mid_message: false,
                    }),
                    params,
                });
            }
            _ => return Err("server sent an unexpected message during login".into()),
        }
        if !out.is_empty() {
            stream.write_all(&out).await.map_err(|e| e.to_string())?;
        }
    }
}

impl Backend {
    /// Reads what the server sent into `buf`.
    pub async fn read_more(&mut self) -> io::Result<usize> {
        self.stream.read_buf(&mut self.buf).await
    }

    /// Checks, without blocking or a syscall in the common case, whether an idle connection
    /// was closed by the server (or got an error such as an admin's termination). Unsolicited
    /// harmless messages (notices, notifications, parameter changes) are kept in `buf`.
    pub fn is_broken_idle(&mut self) -> bool {
        loop {
            self.buf.reserve(1024);
            match self.stream.try_read_buf(&mut self.buf) {
                Ok(0) => return true,
                Ok(_) => {
                    if crate::protocol::first_error(&self.buf).is_some() {
                        return true;
                    }
                    if self.buf.len() > SERVER_BUF * 4 {
                        return true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(_) => return true,
            }
        }
    }

    /// Runs queries the proxy itself sends (`queries` holds `ready` Query messages) and
    /// reads their answers up to the last ReadyForQuery, within 5 s. Returns the
    /// ParameterStatus values reported on the way, or the first error's SQLSTATE and
    /// message (`Err(None)` when the connection failed). Not for the hot path: it decodes.
    pub async fn run_queries(
        &mut self,
        queries: &[u8],
        ready: u32,
    ) -> Result<Vec<(String, String)>, Option<(String, String)>> {
        let work = async {
            self.stream.write_all(queries).await.map_err(|_| None)?;
            let mut params = Vec::new();
            let mut error = None;
            let mut left = ready;
            while left > 0 {
                let msg = match Message::parse(&mut self.buf).map_err(|_| None)? {
                    Some(m) => m,
                    None => {
                        self.buf.reserve(4096);
                        if self
                            .stream
                            .read_buf(&mut self.buf)
                            .await
                            .map_err(|_| None)?
                            == 0
                        {
                            return Err(None);
                        }
                        continue;
                    }
                };
                match msg {
                    Message::ReadyForQuery(_) => left -= 1,
                    Message::ParameterStatus(b) => {
                        if let (Ok(n), Ok(v)) = (b.name(), b.value()) {
                            params.push((n.to_string(), v.to_string()));
                        }
                    }
                    Message::ErrorResponse(b) if error.is_none() => {
                        let (mut code, mut text) = (String::new(), String::new());
                        let mut fields = b.fields();
                        while let Ok(Some(f)) =
                            fallible_iterator::FallibleIterator::next(&mut fields)
                        {
                            match f.type_() {
                                b'C' => code = String::from_utf8_lossy(f.value_bytes()).into(),
                                b'M' => text = String::from_utf8_lossy(f.value_bytes()).into(),
                                _ => {}
                            }
                        }
                        error = Some((code, text));
                    }
                    _ => {}
                }
            }
            match error {
                Some(e) => Err(Some(e)),
                None => Ok(params),
            }
        };
        tokio::time::timeout(Duration::from_secs(5), work)
            .await
            .unwrap_or(Err(None))
    }

    /// Runs one query the proxy itself sends and returns its rows, every column as text
    /// (`None` for NULL), within 5 s. Not for the hot path: it decodes.
    pub async fn query_rows(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, String> {
        let mut out = BytesMut::new();
        crate::protocol::put_query(&mut out, sql);
        let work = async {
            self.stream
                .write_all(&out)
                .await
                .map_err(|e| e.to_string())?;
            let mut rows = Vec::new();
            let mut error = None;
            loop {
                let msg = match Message::parse(&mut self.buf).map_err(|e| e.to_string())? {
                    Some(m) => m,
                    None => {
                        self.buf.reserve(4096);
                        if self
                            .stream
                            .read_buf(&mut self.buf)
                            .await
                            .map_err(|e| e.to_string())?
                            == 0
                        {
                            return Err("server closed the connection".to_string());
                        }
                        continue;
                    }
                };
                match msg {
                    Message::DataRow(body) => {
                        let buf = body.buffer();
                        let mut ranges = body.ranges();
                        let mut row = Vec::new();
                        while let Some(r) = fallible_iterator::FallibleIterator::next(&mut ranges)
                            .map_err(|e| e.to_string())?
                        {
                            row.push(r.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()));
                        }
                        rows.push(row);
                    }
                    Message::ErrorResponse(body) if error.is_none() => {
                        let mut fields = body.fields();
                        let mut text = String::new();
                        while let Ok(Some(f)) =
                            fallible_iterator::FallibleIterator::next(&mut fields)
                        {
                            if f.type_() == b'M' {
                                text = String::from_utf8_lossy(f.value_bytes()).into_owned();
                            }
                        }
                        error = Some(text);
                    }
                    Message::ReadyForQuery(_) => {
                        return match error {
                            Some(e) => Err(e),
                            None => Ok(rows),
                        };
                    }
                    _ => {}
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), work)
            .await
            .unwrap_or_else(|_| Err("no answer within 5 s".into()))
    }

    /// Sends a Terminate so PostgreSQL ends the backend cleanly (not in the middle of a
    /// message: see `mid_message`); best effort, never blocks.
    pub fn terminate(&mut self) {
        if !self.mid_message {
            self.stream.try_write(TERMINATE);
        }
    }
}

impl ServerConn {
    /// Ends the connection: sends a Terminate and waits (up to `limit`) until PostgreSQL
    /// closes its end of the socket, which it does only once the backend has exited and
    /// left its connection slot (PostgreSQL keeps the socket open until then for such a
    /// "synchronous close"). A backend that has not gone after a short grace is busy (a
    /// query its client left running, which it would finish before reading the Terminate):
    /// it is sent a cancel request. After the Terminate the proxy ends its side of the
    /// stream; a backend in the middle of a message (`mid_message`) gets the end of the
    /// stream only, and ends at once. Returns whether PostgreSQL closed the socket in time.
    pub async fn close(self, target: &ServerTarget, limit: Duration) -> bool {
        let mut backend = self.0;
        let (pid, secret) = (backend.backend_pid, backend.backend_secret);
        let mid_message = backend.mid_message;
        let (mut rd, mut wr) = tokio::io::split(&mut backend.stream);
        let mut ended = pin!(async move {
            // Written while the answers to whatever is running are read and dropped, so a
            // full socket buffer cannot hold the Terminate back; then the end of the
            // stream (as libpq does). A backend in the middle of a message its client left
            // unfinished gets the end of the stream alone: it would read a Terminate as
            // more of the message (two bytes short, its first two bytes complete a Query,
            // which would run), while the end of the stream ends it at once.
            let terminate = async {
                if mid_message || wr.write_all(TERMINATE).await.is_ok() {
                    let _ = wr.shutdown().await;
                }
                std::future::pending::<()>().await
            };
            let drained = async {
                let mut scratch = [0u8; 1024];
                while let Ok(n) = rd.read(&mut scratch).await {
                    if n == 0 {
                        break;
                    }
                }
            };
            tokio::select! {
                () = terminate => {}
                () = drained => {}
            }
        });
        let deadline = tokio::time::Instant::now() + limit;
        if tokio::time::timeout(CLOSE_GRACE.min(limit), &mut ended)
            .await
            .is_ok()
        {
            return true;
        }
        let mut cancel = pin!(send_cancel(target, pid, secret));
        let mut cancel_done = false;
        let waited = std::future::poll_fn(|cx| {
            if !cancel_done && cancel.as_mut().poll(cx).is_ready() {
                cancel_done = true;
            }
            ended.as_mut().poll(cx)
        });
        tokio::time::timeout_at(deadline, waited).await.is_ok()
    }
}

/// A Terminate message.
const TERMINATE: &[u8] = b"X\0\0\0\x04";

/// How long a backend asked to end may take before it is taken for busy and cancelled.
const CLOSE_GRACE: Duration = Duration::from_millis(100);

/// Sends a CancelRequest for a server backend over a short new connection.
/// The id the next server connection gets: connections opened before now have lower ones.
pub fn next_server_id() -> u64 {
    NEXT_SERVER_ID.load(Ordering::Relaxed)
}

pub async fn send_cancel(target: &ServerTarget, pid: i32, secret: i32) -> io::Result<()> {
    // Over TLS too when the server is reached that way (it may refuse plain TCP).
    let mut stream = tokio::time::timeout(target.connect_timeout, target.open())
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
        .map_err(io::Error::other)?;
    let mut out = BytesMut::with_capacity(16);
    frontend::cancel_request(pid, secret, &mut out);
    stream.write_all(&out).await?;
    // PostgreSQL closes the connection when done; wait briefly so the request is read.
    let mut scratch = [0u8; 1];
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut scratch)).await;
    Ok(())
}
