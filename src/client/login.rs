//! A client's login: the startup packet and authentication (`startup`, `auth`), the client
//! caps and registry entry it takes ([`Registration`]), and the check of its session
//! settings on a server connection, so that bad values are refused at login.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use crate::Shared;
use crate::client::Alive;
use crate::error::PgError;
use crate::pool::CheckoutError;
use crate::prepared::ClientStatements;
use crate::registry::ClientSlot;
use crate::tenant::TenantId;
use crate::tls::Stream;

use super::relay::ClientScan;
use super::startup::{self, FirstPacket};
use super::{Session, params};

/// Applies a client's settings on a server connection at login, so that bad names or values
/// are refused there as PostgreSQL would refuse them, and learns how PostgreSQL reports them
/// (for the client's ParameterStatus). Done once per distinct set of settings.
async fn validate_settings(
    shared: &Arc<Shared>,
    tenant: TenantId,
    client: u64,
    settings: &Arc<crate::settings::Settings>,
) -> Result<(), PgError> {
    if settings.list.is_empty() || settings.reported.get().is_some() {
        return Ok(());
    }
    let wait = shared.live.config().limits.query_wait_timeout.0;
    let mut conn = shared
        .pools
        .of(shared.tenants.get(tenant))
        .checkout(tenant, wait)
        .await
        .map_err(|e| match e {
            CheckoutError::Timeout => PgError::query_wait_timeout(
                &shared.tenants.get(tenant).name,
                shared.pools.wait_reason(&shared.tenants, tenant).as_deref(),
            ),
            CheckoutError::Unavailable(m) => PgError::server_unavailable(&m, true),
        })?;
    let t = shared.tenants.get(tenant);
    let replies = super::transaction::prepare(shared, &mut conn, t, client, settings);
    let mut out = BytesMut::new();
    conn.work.to_server.take_own(&mut out);
    let result = conn.run_queries(&out, u32::from(replies)).await;
    match result {
        Ok(mut reported) => {
            let mut read_back = true;
            // PostgreSQL reports a parameter only when its value changed, so a value equal to
            // the connection's (`utf8` on a UTF8 connection) would be missing, and the client
            // would be told its own spelling. The values PostgreSQL reports are read back.
            let names: Vec<&str> = settings
                .list
                .iter()
                .map(|(n, _)| n.as_str())
                .filter(|n| params::REPORTED.contains(n))
                .collect();
            if !names.is_empty() {
                let sql = format!(
                    "SELECT {}",
                    names
                        .iter()
                        .map(|n| format!("pg_catalog.current_setting('{n}')"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                match conn.query_rows(&sql).await {
                    Ok(rows) if rows.len() == 1 => {
                        for (name, value) in names.iter().zip(&rows[0]) {
                            reported.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
                            reported.push((name.to_string(), value.clone().unwrap_or_default()));
                        }
                    }
                    _ => read_back = false,
                }
            }
            conn.set_clean(read_back && conn.buf.is_empty());
            let _ = settings.reported.set(reported);
            Ok(())
        }
        Err(Some((code, message))) => {
            // What the connection has now is not worth working out: it is closed.
            Err(PgError {
                fatal: true,
                code: code.into(),
                message,
            })
        }
        Err(None) => Err(PgError::server_unavailable("connection lost", true)),
    }
}

/// Logs a client in within `client_login_timeout`; `None` when it was refused (it has been
/// told why) or it was a cancel request.
pub(super) async fn admit_client(
    stream: Stream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    alive: Alive,
) -> Option<Session> {
    let login_timeout = shared.live.config().limits.client_login_timeout.0;
    // Over max_client_conn the startup packet is still read, to name the tenant in the
    // refusal's metric, but nothing else is done.
    let conn_count = ConnCount::try_take(&shared);
    // The client's stream as soon as there is one (plain, or TLS once negotiated), so
    // that a refusal can be sent on it.
    let mut slot = None;
    let result = tokio::time::timeout(
        login_timeout,
        // A clone: this one is held until the refusal, if any, has been written.
        login(stream, &mut slot, peer, &shared, conn_count, alive.clone()),
    )
    .await;
    let mut stream = slot?;
    let reg = match result {
        Ok(Ok(Some(reg))) => reg,
        Ok(Ok(None)) => return None,
        Ok(Err(e)) if e.is_client_io() => {
            tracing::info!(client = %peer, error = %e, "client connection lost during login");
            return None;
        }
        Ok(Err(e)) => {
            tracing::info!(client = %peer, error = %e, "login refused");
            let _ = stream.write_all(&e.to_bytes()).await;
            return None;
        }
        Err(_) => {
            tracing::info!(client = %peer, "login timed out");
            let _ = stream.write_all(&PgError::login_timeout().to_bytes()).await;
            return None;
        }
    };
    let (reg, buf) = match reg {
        Login::Client(reg, buf) => (reg, buf),
        Login::Admin(user, buf, _conn_count, _alive) => {
            crate::admin::serve(stream, buf, peer, user, shared).await;
            return None;
        }
    };
    Some(Session {
        stream,
        // Idle clients hold no buffer.
        buf: if buf.is_empty() { BytesMut::new() } else { buf },
        cfwd: 0,
        cscan: ClientScan::default(),
        skip_until_sync: false,
        discard_left: 0,
        settings: reg.settings.clone(),
        statements: ClientStatements::default(),
        rare: None,
        reg,
    })
}

/// Who logged in.
enum Login {
    /// A client, with what it sent past its login.
    Client(Registration, BytesMut),
    /// An admin user opened the admin console.
    Admin(Arc<str>, BytesMut, ConnCount, Alive),
}

async fn login(
    tcp: Stream,
    slot: &mut Option<Stream>,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    conn_count: Option<ConnCount>,
    alive: Alive,
) -> Result<Option<Login>, PgError> {
    // The read buffer of the login; what the client sent past it goes on to the session.
    let mut buf = BytesMut::new();
    let first = startup::open(slot, tcp, shared.tls.load_full().as_deref(), peer, &mut buf).await?;
    let stream = slot.as_mut().expect("open set it");
    let startup = match first {
        FirstPacket::Cancel { pid, secret } => {
            crate::peers::cancel(shared, pid, secret, peer).await;
            return Ok(None);
        }
        FirstPacket::Startup(s) => s,
    };
    if shared.config.proxy.client_tls == crate::config::ClientTls::Require && !stream.is_tls() {
        return Err(PgError::tls_required());
    }
    // What goes to the client in the write of AuthenticationOk.
    let mut out = BytesMut::new();
    let admitted = startup::admit(
        stream,
        &mut buf,
        &mut out,
        *startup,
        shared,
        conn_count.is_none(),
    )
    .await?;
    // admit refused every client over the limit.
    let conn_count = conn_count.ok_or_else(|| PgError::too_many_clients("max_client_conn"))?;
    let tenant = match admitted.target {
        startup::Target::Tenant(t) => t,
        startup::Target::Admin => {
            crate::admin::welcome(&mut out, (0, 0));
            stream.write_all(&out).await.map_err(PgError::client_io)?;
            tracing::info!(client = %peer, user = %admitted.user, "admin console opened");
            return Ok(Some(Login::Admin(admitted.user, buf, conn_count, alive)));
        }
    };
    // The tenant's settings are the tenant context (row-level security): like the
    // search_path, a client may not name them at startup.
    if let Some((name, _)) = admitted
        .settings
        .iter()
        .find(|(k, _)| shared.tenants.is_context_setting(k))
    {
        return Err(PgError::forbidden_parameter(name));
    }
    let settings = shared.settings.intern(admitted.settings);
    let mut reg = Registration::take(
        shared,
        tenant,
        admitted.user.clone(),
        peer,
        conn_count,
        alive,
    )?;
    // Removed by a reload or the directory while this client logged in.
    if shared.tenants.get(tenant).is_gone() {
        return Err(PgError::unknown_tenant(&shared.tenants.get(tenant).name));
    }
    let server_params = shared
        .pools
        .of(shared.tenants.get(tenant))
        .server_params()
        .await
        .map_err(|e| PgError::server_unavailable(&e, true))?;
    validate_settings(shared, tenant, reg.id, &settings).await?;
    startup::welcome(
        stream,
        &mut out,
        &server_params,
        &settings,
        (reg.client.pid, reg.client.secret),
    )
    .await?;
    reg.settings = settings;
    tracing::info!(
        client = %peer,
        user = %admitted.user,
        tenant = %shared.tenants.get(tenant).name,
        "client connected"
    );
    // Sent before AuthenticationOk (a driver pipelining its first query): the session's.
    Ok(Some(Login::Client(reg, buf)))
}

/// One of `max_client_conn`, taken when the connection is accepted (so clients still
/// logging in count too, as in PgBouncer) and given back when it closes.
struct ConnCount(Arc<Shared>);

impl ConnCount {
    fn try_take(shared: &Arc<Shared>) -> Option<ConnCount> {
        let max = shared.live.config().proxy.max_client_conn;
        shared
            .clients
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnCount(shared.clone()))
    }
}

impl Drop for ConnCount {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A client's place in the proxy: its client-cap slots and its registry entry (cancel key,
/// what the admin console shows). Dropping it gives them back, however the session ends.
pub(super) struct Registration {
    pub(super) shared: Arc<Shared>,
    /// Held while the client's task runs (shutdown waits for every one); the client's
    /// place in `max_client_conn` (its `ConnCount`) is given back on drop too.
    _alive: Alive,
    pub(super) tenant: TenantId,
    pub(super) client: Arc<ClientSlot>,
    pub(super) id: u64,
    /// The client's startup settings (RESET goes back to these).
    pub(super) settings: Arc<crate::settings::Settings>,
}

impl Registration {
    fn take(
        shared: &Arc<Shared>,
        tenant: TenantId,
        user: Arc<str>,
        addr: SocketAddr,
        conn_count: ConnCount,
        alive: Alive,
    ) -> Result<Registration, PgError> {
        let rejected = &shared.metrics.tenants[tenant as usize].rejected;
        let t = shared.tenants.get(tenant);
        if !t.try_add_client() {
            rejected[1].increment(1);
            return Err(PgError::too_many_clients(&format!(
                "max_client_connections of tenant \"{}\" ({})",
                t.name,
                t.max_clients()
            )));
        }
        // Given back by the Registration's drop (one field fewer in every idle client).
        std::mem::forget(conn_count);
        Ok(Registration {
            shared: shared.clone(),
            _alive: alive,
            tenant,
            client: shared.registry.register(tenant, user, addr),
            settings: shared.no_settings.clone(),
            id: shared.next_client_id.fetch_add(1, Ordering::Relaxed),
        })
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.clients.fetch_sub(1, Ordering::AcqRel);
        self.shared.registry.unregister(self.client.pid);
        self.shared.tenants.get(self.tenant).remove_client();
    }
}
