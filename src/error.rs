//! Every error a client can get from tenantpool itself, with the contract's SQLSTATE.
//!
//! The contract's table "What a client sees" maps one to one onto the constructors below;
//! nothing else in the proxy makes up an SQLSTATE.

use std::borrow::Cow;

use bytes::BytesMut;
use pgwire::messages::Message;
use pgwire::messages::response::ErrorResponse;

/// The message of every [`PgError::client_io`].
const CLIENT_IO: &str = "client connection failed: ";

/// An error tenantpool sends to a client (an ErrorResponse).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    /// `FATAL` closes the client connection after sending; `ERROR` keeps it.
    pub fatal: bool,
    pub code: Cow<'static, str>,
    pub message: String,
}

impl PgError {
    pub fn fatal(code: &'static str, message: impl Into<String>) -> PgError {
        PgError {
            fatal: true,
            code: Cow::Borrowed(code),
            message: message.into(),
        }
    }

    pub fn error(code: &'static str, message: impl Into<String>) -> PgError {
        PgError {
            fatal: false,
            code: Cow::Borrowed(code),
            message: message.into(),
        }
    }

    /// Appends the ErrorResponse message.
    pub fn encode(&self, buf: &mut BytesMut) {
        let severity = if self.fatal { "FATAL" } else { "ERROR" };
        let msg = ErrorResponse::new(vec![
            (b'S', severity.to_string()),
            (b'V', severity.to_string()),
            (b'C', self.code.replace('\0', "")),
            (b'M', self.message.replace('\0', "")),
        ]);
        // Encoding into a BytesMut cannot fail for an ErrorResponse (no length cap applies
        // below i32::MAX, and our messages are short).
        let _ = msg.encode(buf);
    }

    pub fn to_bytes(&self) -> BytesMut {
        let mut b = BytesMut::with_capacity(64 + self.message.len());
        self.encode(&mut b);
        b
    }

    // ---- the contract's table ----

    /// dbname names no tenant: FATAL 3D000.
    pub fn unknown_tenant(name: &str) -> PgError {
        PgError::fatal("3D000", format!("tenant \"{name}\" does not exist"))
    }

    /// Wrong password (or unknown user): FATAL 28P01.
    pub fn password_failed(user: &str) -> PgError {
        PgError::fatal(
            "28P01",
            format!("password authentication failed for user \"{user}\""),
        )
    }

    /// The user may not open that tenant (or the admin console): FATAL 28000.
    pub fn not_allowed(user: &str, what: &str) -> PgError {
        PgError::fatal("28000", format!("user \"{user}\" may not open {what}"))
    }

    /// `client_tls = "require"` and the client did not ask for TLS: FATAL 28000.
    pub fn tls_required() -> PgError {
        PgError::fatal(
            "28000",
            "TLS is required: connect with sslmode=require (or stronger)",
        )
    }

    /// `auth_method = "cert"` and no verified client certificate names the user: FATAL
    /// 28000, as PostgreSQL's cert authentication.
    pub fn certificate_failed(user: &str) -> PgError {
        PgError::fatal(
            "28000",
            format!("certificate authentication failed for user \"{user}\""),
        )
    }

    /// The tenant named by the TLS server name and the one named by dbname differ: FATAL
    /// 28000.
    pub fn tenant_mismatch(by_name: &str, by_db: &str) -> PgError {
        PgError::fatal(
            "28000",
            format!(
                "the TLS server name names tenant \"{by_name}\" but dbname names tenant \"{by_db}\""
            ),
        )
    }

    /// `tenant_from = "domain"`: no tenant has the TLS server name as its domain.
    pub fn no_domain_tenant(host: &str) -> PgError {
        PgError::fatal(
            "3D000",
            if host.is_empty() {
                "no TLS server name: connect with TLS to your tenant's domain".to_string()
            } else {
                format!("no tenant has the domain \"{host}\"")
            },
        )
    }

    /// No user in the startup packet: FATAL 28000, as PostgreSQL says it.
    pub fn no_user() -> PgError {
        PgError::fatal(
            "28000",
            "no PostgreSQL user name specified in startup packet",
        )
    }

    /// `max_client_conn` or a tenant's `max_client_connections` reached: FATAL 53300.
    pub fn too_many_clients(limit: &str) -> PgError {
        PgError::fatal(
            "53300",
            format!("too many client connections: {limit} reached"),
        )
    }

    /// A transaction queued longer than `query_wait_timeout`: ERROR 53300, connection stays.
    /// `why` says what kept connections away besides the caps (the server cannot be
    /// reached, or refuses the tenant's login more connections), when something did.
    pub fn query_wait_timeout(tenant: &str, why: Option<&str>) -> PgError {
        let why = match why {
            Some(w) => format!(" ({w})"),
            None => String::new(),
        };
        PgError::error(
            "53300",
            format!(
                "query_wait_timeout: no server connection for tenant \"{tenant}\" became free in time{why}"
            ),
        )
    }

    /// The server connection died mid-transaction: ERROR 08006, connection stays.
    pub fn server_lost(detail: &str) -> PgError {
        PgError::error(
            "08006",
            format!("server connection lost during the transaction: {detail}"),
        )
    }

    /// The server connection died while COMMIT, or a statement outside a transaction
    /// block, was in flight: FATAL 08007 (transaction_resolution_unknown), and the client
    /// is closed. The statement may or may not have committed, and nobody can tell the
    /// client which; a connection kept open would hide that.
    pub fn transaction_resolution_unknown(detail: &str) -> PgError {
        PgError::fatal(
            "08007",
            format!(
                "server connection lost while a statement that may commit was running; whether it committed is unknown: {detail}"
            ),
        )
    }

    /// No server connection could be made: ERROR 08006 (FATAL during login).
    pub fn server_unavailable(detail: &str, fatal: bool) -> PgError {
        PgError {
            fatal,
            code: Cow::Borrowed("08006"),
            message: format!("could not connect to the PostgreSQL server: {detail}"),
        }
    }

    /// The server ended the connection with its own error (an admin's termination, a
    /// crash): passed on as an ERROR with the server's SQLSTATE, the connection stays.
    pub fn server_ended(code: &str, message: &str) -> PgError {
        PgError {
            fatal: false,
            code: Cow::Owned(code.to_string()),
            message: format!("server connection lost: {message}"),
        }
    }

    /// Reading from or writing to the client failed (it went away, a reset): FATAL 08006,
    /// connection_failure, as PostgreSQL logs it. Never sent (the socket is gone); logged
    /// as what it is, not as a protocol violation.
    pub fn client_io(detail: impl std::fmt::Display) -> PgError {
        PgError::fatal("08006", format!("{CLIENT_IO}{detail}"))
    }

    /// Is this a failed read or write on the client's socket ([`PgError::client_io`])?
    pub fn is_client_io(&self) -> bool {
        self.fatal && self.code == "08006" && self.message.starts_with(CLIENT_IO)
    }

    /// Malformed or oversized protocol message: FATAL 08P01.
    pub fn protocol_violation(detail: impl Into<String>) -> PgError {
        PgError::fatal("08P01", detail)
    }

    /// A startup parameter the tenant decides (`search_path`, `role`, ...): FATAL 42501.
    pub fn forbidden_parameter(name: &str) -> PgError {
        PgError::fatal(
            "42501",
            format!(
                "parameter \"{name}\" cannot be set in the startup packet: tenantpool sets it for the tenant"
            ),
        )
    }

    /// An unsupported protocol version or feature in the startup packet: FATAL 0A000.
    pub fn unsupported(detail: impl Into<String>) -> PgError {
        PgError::fatal("0A000", detail)
    }

    /// The proxy is shutting down: FATAL 57P01, as PostgreSQL's own shutdown says.
    pub fn shutting_down() -> PgError {
        PgError::fatal(
            "57P01",
            "terminating connection because tenantpool is shutting down",
        )
    }

    /// Still running a transaction when `shutdown_timeout` ran out: the client is dropped
    /// with this reason.
    pub fn shutdown_timeout() -> PgError {
        PgError::fatal(
            "57P01",
            "terminating connection: shutdown timeout reached (tenantpool is shutting down)",
        )
    }

    /// Idle inside a transaction longer than `idle_transaction_timeout`: FATAL 25P03, as
    /// PostgreSQL's own idle_in_transaction_session_timeout.
    pub fn idle_in_transaction_timeout() -> PgError {
        PgError::fatal(
            "25P03",
            "terminating connection due to idle_transaction_timeout",
        )
    }

    /// Stopped in the middle of a message (or of COPY data) longer than
    /// `message_timeout`: FATAL 08P01.
    pub fn message_timeout() -> PgError {
        PgError::fatal(
            "08P01",
            "terminating connection: the client stopped in the middle of a message longer than message_timeout",
        )
    }

    /// Idle longer than `client_idle_timeout`: FATAL 57P05, as PostgreSQL's
    /// idle_session_timeout.
    pub fn client_idle_timeout() -> PgError {
        PgError::fatal("57P05", "terminating connection due to client_idle_timeout")
    }

    // ---- named prepared statements (the proxy keeps them, so it answers as PostgreSQL) ----

    /// Parse of a name the client already has: ERROR 42P05, as PostgreSQL.
    pub fn duplicate_statement(name: &str) -> PgError {
        PgError::error(
            "42P05",
            format!("prepared statement \"{name}\" already exists"),
        )
    }

    /// Use of a name the client has not prepared: ERROR 26000, as PostgreSQL.
    pub fn unknown_statement(name: &str) -> PgError {
        PgError::error(
            "26000",
            format!("prepared statement \"{name}\" does not exist"),
        )
    }

    /// A client went over its share of prepared statements: ERROR 53400.
    pub fn too_many_statements(detail: &str) -> PgError {
        PgError::error(
            "53400",
            format!("too many prepared statements for this client connection: {detail}"),
        )
    }

    /// A command the proxy answers itself, sent inside a failed transaction: ERROR 25P02.
    pub fn in_failed_transaction() -> PgError {
        PgError::error(
            "25P02",
            "current transaction is aborted, commands ignored until end of transaction block",
        )
    }

    /// Login took longer than `client_login_timeout`: FATAL 08P01.
    pub fn login_timeout() -> PgError {
        PgError::fatal("08P01", "client_login_timeout: login took too long")
    }
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}
