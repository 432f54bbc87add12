//! The admin console: `dbname=tenantpool` (or `pgbouncer`) for `admin_users`, over the
//! simple query protocol, answering rows the way PgBouncer does.
//!
//! SHOW HELP | VERSION | CONFIG | TENANTS | POOLS | CLIENTS | SERVERS | STATS,
//! PAUSE [tenant], RESUME [tenant], KILL tenant, RELOAD, SHUTDOWN.

use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use crate::tls::Stream;
use bytes::BytesMut;
use pgwire::messages::Message;
use pgwire::messages::startup::{Authentication, BackendKeyData, SecretKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Shared;
use crate::config::PoolMode;
use crate::error::PgError;
use crate::protocol::{
    HEADER_LEN, header, put_command_complete, put_data_row, put_parameter_status,
    put_ready_for_query, put_row_description,
};
use crate::registry::{STATE_ACTIVE, STATE_WAITING};
use crate::server::LoginId;
use crate::tenant::TenantId;

/// Largest command accepted on the console.
const MAX_COMMAND: usize = 64 * 1024;

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

/// Serves an admin session until the client leaves.
pub async fn serve(mut stream: Stream, peer: SocketAddr, user: Arc<str>, shared: Arc<Shared>) {
    let mut buf = BytesMut::with_capacity(1024);
    let mut skipping = false;
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
        let mut out = BytesMut::new();
        match tag {
            b'X' => return,
            b'Q' => {
                // The body is the query text and its NUL (an empty body is an empty query).
                let text = frame
                    .get(HEADER_LEN..len.saturating_sub(1))
                    .unwrap_or_default();
                let sql = String::from_utf8_lossy(text).into_owned();
                tracing::info!(client = %peer, user = %user, command = %sql.trim(), "admin command");
                let stop = if is_reload(&sql) {
                    // Reading the file and deriving SCRAM keys is blocking work: off the
                    // workers that serve clients. Answered once the config is in force.
                    let s = shared.clone();
                    match tokio::task::spawn_blocking(move || crate::live::reload(&s)).await {
                        Ok(Ok(_)) => put_command_complete(&mut out, "RELOAD"),
                        Ok(Err(e)) => reload_refused(&e).encode(&mut out),
                        Err(e) => reload_refused(&e.to_string()).encode(&mut out),
                    }
                    false
                } else {
                    run(&sql, &shared, &mut out)
                };
                put_ready_for_query(&mut out, b'I');
                if stream.write_all(&out).await.is_err() || stop {
                    return;
                }
            }
            b'S' => {
                skipping = false;
                put_ready_for_query(&mut out, b'I');
                if stream.write_all(&out).await.is_err() {
                    return;
                }
            }
            b'P' | b'B' | b'D' | b'E' | b'C' | b'H' => {
                if !skipping {
                    skipping = true;
                    PgError::error(
                        "0A000",
                        "the admin console speaks the simple query protocol only",
                    )
                    .encode(&mut out);
                    if stream.write_all(&out).await.is_err() {
                        return;
                    }
                }
            }
            _ => {
                let e = PgError::protocol_violation(format!("invalid frontend message type {tag}"));
                let _ = stream.write_all(&e.to_bytes()).await;
                return;
            }
        }
    }
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

fn is_reload(sql: &str) -> bool {
    sql.trim()
        .trim_end_matches(';')
        .trim()
        .eq_ignore_ascii_case("RELOAD")
}

fn reload_refused(problems: &str) -> PgError {
    PgError::error("F0000", format!("config reload refused: {problems}"))
}

/// Runs one command, appending its answer. Returns true when the session should end.
fn run(sql: &str, shared: &Shared, out: &mut BytesMut) -> bool {
    let cmd = sql.trim().trim_end_matches(';').trim();
    let words: Vec<&str> = cmd.split_whitespace().collect();
    let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
    let kw: Vec<&str> = upper.iter().map(|s| s.as_str()).collect();
    let tenant_arg = |i: usize| -> Result<Option<TenantId>, PgError> {
        match words.get(i) {
            None => Ok(None),
            Some(name) => shared
                .tenants
                .lookup(name.trim_matches('"'))
                .map(|t| Some(t.id))
                .ok_or_else(|| {
                    PgError::error("3D000", format!("tenant \"{name}\" does not exist"))
                }),
        }
    };
    let result: Result<(), PgError> = match kw.as_slice() {
        [] => {
            out.extend_from_slice(b"I\0\0\0\x04");
            Ok(())
        }
        ["SHOW", what] => show(what, shared, out),
        ["PAUSE", ..] | ["RESUME", ..] if words.len() <= 2 => tenant_arg(1).map(|t| {
            if kw[0] == "PAUSE" {
                shared.pool.pause(t);
                put_command_complete(out, "PAUSE");
            } else {
                shared.pool.resume(t);
                put_command_complete(out, "RESUME");
            }
        }),
        ["KILL", _] => tenant_arg(1).map(|t| {
            let t = t.expect("one argument");
            kill(shared, t);
            put_command_complete(out, "KILL");
        }),
        // Answers once the new config is in force (`serve` runs it off the workers).
        ["RELOAD"] => crate::live::reload(shared)
            .map(|_| put_command_complete(out, "RELOAD"))
            .map_err(|e| reload_refused(&e)),
        ["SHUTDOWN"] => {
            // The same graceful shutdown as SIGTERM; this session ends after the answer.
            let _ = shared.shutdown_tx.send(true);
            put_command_complete(out, "SHUTDOWN");
            return true;
        }
        _ => Err(PgError::error(
            "42601",
            format!("unknown admin command: {cmd} (try SHOW HELP)"),
        )),
    };
    if let Err(e) = result {
        e.encode(out);
    }
    false
}

/// Ends every client of a tenant at its next idle moment and closes the tenant's idle
/// server connections.
fn kill(shared: &Shared, tenant: TenantId) {
    crate::live::end_clients(shared, tenant);
}

fn table<S: AsRef<str>>(out: &mut BytesMut, columns: &[&str], rows: &[Vec<S>]) {
    put_row_description(out, columns);
    for r in rows {
        put_data_row(out, r);
    }
    put_command_complete(out, "SHOW");
}

fn secs(d: Duration) -> String {
    d.as_secs().to_string()
}

fn unix(t: SystemTime) -> String {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs().to_string())
        .unwrap_or_default()
}

fn show(what: &str, shared: &Shared, out: &mut BytesMut) -> Result<(), PgError> {
    let snap = shared.pool.snapshot();
    // The role a server connection of a login is logged in as.
    let target = shared.pool.target();
    let login_user = |login: LoginId| target.login(login).user.as_str();
    let mode = match shared.config.proxy.pool_mode {
        PoolMode::Transaction => "transaction",
        PoolMode::Session => "session",
    };
    match what {
        "HELP" => {
            let rows: Vec<Vec<&str>> = [
                "SHOW HELP|VERSION|CONFIG|TENANTS|POOLS|CLIENTS|SERVERS|STATS",
                "PAUSE [tenant]",
                "RESUME [tenant]",
                "KILL tenant",
                "RELOAD",
                "SHUTDOWN",
            ]
            .iter()
            .map(|c| vec![*c])
            .collect();
            table(out, &["command"], &rows);
        }
        "VERSION" => table(
            out,
            &["version"],
            &[vec![format!("tenantpool {}", env!("CARGO_PKG_VERSION"))]],
        ),
        "CONFIG" => {
            // What is in force: keys that need a restart keep their start-up values.
            let c = shared.live.config();
            let d = &c.directory;
            let rows: Vec<Vec<String>> = [
                ("listen", c.proxy.listen.clone(), false),
                ("pool_mode", mode.to_string(), false),
                ("max_client_conn", c.proxy.max_client_conn.to_string(), true),
                ("auth_method", format!("{:?}", c.proxy.auth_method), false),
                ("admin_users", c.proxy.admin_users.join(","), true),
                ("tenant_from", format!("{:?}", c.proxy.tenant_from), false),
                (
                    "shutdown_timeout",
                    c.proxy.shutdown_timeout.to_string(),
                    true,
                ),
                (
                    "max_prepared_statements",
                    c.proxy.max_prepared_statements.to_string(),
                    false,
                ),
                ("server_host", c.server.host.clone(), false),
                ("server_port", c.server.port.to_string(), false),
                ("server_database", c.server.database.clone(), false),
                ("server_user", c.server.user.clone(), false),
                (
                    "max_connections",
                    c.server.max_connections.to_string(),
                    true,
                ),
                ("min_idle", c.server.min_idle.to_string(), true),
                (
                    "connect_timeout",
                    c.server.connect_timeout.to_string(),
                    false,
                ),
                ("idle_timeout", c.server.idle_timeout.to_string(), true),
                ("lifetime", c.server.lifetime.to_string(), true),
                (
                    "query_wait_timeout",
                    c.limits.query_wait_timeout.to_string(),
                    true,
                ),
                (
                    "idle_transaction_timeout",
                    c.limits.idle_transaction_timeout.to_string(),
                    true,
                ),
                (
                    "client_idle_timeout",
                    c.limits.client_idle_timeout.to_string(),
                    true,
                ),
                (
                    "client_login_timeout",
                    c.limits.client_login_timeout.to_string(),
                    true,
                ),
                (
                    "message_timeout",
                    c.limits.message_timeout.to_string(),
                    true,
                ),
                (
                    "default_max_server_connections",
                    c.tenant_defaults.max_server_connections.to_string(),
                    true,
                ),
                (
                    "default_max_client_connections",
                    c.tenant_defaults.max_client_connections.to_string(),
                    true,
                ),
                ("search_path", c.tenant_defaults.search_path.clone(), true),
                (
                    "tenant_settings",
                    c.tenant_defaults
                        .settings
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(","),
                    true,
                ),
                (
                    "plans",
                    c.plans.keys().cloned().collect::<Vec<_>>().join(","),
                    true,
                ),
                (
                    "directory_query",
                    d.as_ref().map(|d| d.query.clone()).unwrap_or_default(),
                    true,
                ),
                (
                    "directory_refresh",
                    d.as_ref()
                        .map(|d| d.refresh.to_string())
                        .unwrap_or_default(),
                    true,
                ),
                (
                    "directory_listen_channel",
                    d.as_ref()
                        .and_then(|d| d.listen_channel.clone())
                        .unwrap_or_default(),
                    true,
                ),
                (
                    "directory_max_tenants",
                    d.as_ref()
                        .map(|d| d.max_tenants.to_string())
                        .unwrap_or_default(),
                    true,
                ),
                ("users", c.users.len().to_string(), true),
                ("tenants", shared.tenants.len().to_string(), true),
            ]
            .into_iter()
            .map(|(k, v, live)| {
                vec![
                    k.to_string(),
                    v,
                    if live { "yes" } else { "no" }.to_string(),
                ]
            })
            .collect();
            table(out, &["key", "value", "changeable"], &rows);
        }
        "TENANTS" => {
            let rows: Vec<Vec<String>> = shared
                .tenants
                .iter()
                .map(|t| {
                    let i = t.id as usize;
                    let s = &t.stats;
                    let xacts = s.transactions.load(Ordering::Relaxed).max(1);
                    let spec = t.spec();
                    vec![
                        t.name.clone(),
                        spec.schema.clone(),
                        t.max_server().to_string(),
                        t.max_clients().to_string(),
                        t.clients.load(Ordering::Relaxed).to_string(),
                        s.active.load(Ordering::Relaxed).to_string(),
                        s.waiting.load(Ordering::Relaxed).to_string(),
                        snap.in_use[i].to_string(),
                        snap.idle_by_tenant[i].to_string(),
                        secs(snap.max_wait[i]),
                        (s.wait_us.load(Ordering::Relaxed) / xacts).to_string(),
                        s.wait_timeouts.load(Ordering::Relaxed).to_string(),
                        if snap.paused[i] { "yes" } else { "no" }.to_string(),
                        spec.plan.clone().unwrap_or_default(),
                        match spec.source {
                            crate::tenant::Source::Toml => "config",
                            crate::tenant::Source::Directory => "directory",
                        }
                        .to_string(),
                    ]
                })
                .collect();
            table(
                out,
                &[
                    "tenant",
                    "schema",
                    "max_server_connections",
                    "max_client_connections",
                    "cl_total",
                    "cl_active",
                    "cl_waiting",
                    "sv_in_use",
                    "sv_idle",
                    "maxwait",
                    "avg_wait_us",
                    "wait_timeouts",
                    "paused",
                    "plan",
                    "source",
                ],
                &rows,
            );
        }
        "POOLS" => {
            let rows: Vec<Vec<String>> = shared
                .tenants
                .iter()
                .map(|t| {
                    let i = t.id as usize;
                    let s = &t.stats;
                    let w = snap.max_wait[i];
                    vec![
                        t.name.clone(),
                        login_user(t.login()).to_string(),
                        s.active.load(Ordering::Relaxed).to_string(),
                        s.waiting.load(Ordering::Relaxed).to_string(),
                        "0".into(),
                        "0".into(),
                        snap.in_use[i].to_string(),
                        "0".into(),
                        "0".into(),
                        snap.idle_by_tenant[i].to_string(),
                        "0".into(),
                        "0".into(),
                        "0".into(),
                        w.as_secs().to_string(),
                        w.subsec_micros().to_string(),
                        mode.to_string(),
                    ]
                })
                .collect();
            table(
                out,
                &[
                    "database",
                    "user",
                    "cl_active",
                    "cl_waiting",
                    "cl_active_cancel_req",
                    "cl_waiting_cancel_req",
                    "sv_active",
                    "sv_active_cancel",
                    "sv_being_canceled",
                    "sv_idle",
                    "sv_used",
                    "sv_tested",
                    "sv_login",
                    "maxwait",
                    "maxwait_us",
                    "pool_mode",
                ],
                &rows,
            );
        }
        "CLIENTS" => {
            let rows: Vec<Vec<String>> = shared
                .registry
                .all()
                .iter()
                .map(|c| {
                    let state = match c.state.load(Ordering::Relaxed) {
                        STATE_ACTIVE => "active",
                        STATE_WAITING => "waiting",
                        _ => "idle",
                    };
                    vec![
                        "C".to_string(),
                        c.user.to_string(),
                        shared.tenants.get(c.tenant).name.clone(),
                        state.to_string(),
                        c.addr.ip().to_string(),
                        c.addr.port().to_string(),
                        unix(c.connected_at),
                        c.server()
                            .map(|(pid, _)| pid.to_string())
                            .unwrap_or_default(),
                        c.pid.to_string(),
                        c.prepared.load(Ordering::Relaxed).to_string(),
                    ]
                })
                .collect();
            table(
                out,
                &[
                    "type",
                    "user",
                    "database",
                    "state",
                    "addr",
                    "port",
                    "connect_time",
                    "remote_pid",
                    "cancel_pid",
                    "prepared_statements",
                ],
                &rows,
            );
        }
        "SERVERS" => {
            let host = &shared.config.server.host;
            let port = shared.config.server.port.to_string();
            let row = |login: LoginId,
                       tenant: Option<TenantId>,
                       state: &str,
                       pid: i32,
                       age: String,
                       prepared: usize| {
                vec![
                    "S".into(),
                    login_user(login).to_string(),
                    tenant
                        .map(|t| shared.tenants.get(t).name.clone())
                        .unwrap_or_default(),
                    state.to_string(),
                    host.clone(),
                    port.clone(),
                    pid.to_string(),
                    age,
                    prepared.to_string(),
                ]
            };
            let mut rows: Vec<Vec<String>> = Vec::new();
            for c in shared.registry.all() {
                if let Some((pid, _)) = c.server() {
                    let prepared = c.server_prepared.load(Ordering::Relaxed) as usize;
                    let login = shared.tenants.get(c.tenant).login();
                    rows.push(row(
                        login,
                        Some(c.tenant),
                        "active",
                        pid,
                        String::new(),
                        prepared,
                    ));
                }
            }
            for c in &snap.idle_servers {
                rows.push(row(
                    c.login,
                    c.tenant,
                    "idle",
                    c.backend_pid,
                    secs(c.age),
                    c.prepared,
                ));
            }
            table(
                out,
                &[
                    "type",
                    "user",
                    "database",
                    "state",
                    "addr",
                    "port",
                    "remote_pid",
                    "age",
                    "prepared_statements",
                ],
                &rows,
            );
        }
        "STATS" => {
            let rows: Vec<Vec<String>> = shared
                .tenants
                .iter()
                .map(|t| {
                    let s = &t.stats;
                    let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
                    let (x, q) = (l(&s.transactions), l(&s.queries));
                    vec![
                        t.name.clone(),
                        x.to_string(),
                        q.to_string(),
                        l(&s.bytes_in).to_string(),
                        l(&s.bytes_out).to_string(),
                        l(&s.transaction_us).to_string(),
                        l(&s.query_us).to_string(),
                        l(&s.wait_us).to_string(),
                        (l(&s.transaction_us) / x.max(1)).to_string(),
                        (l(&s.query_us) / q.max(1)).to_string(),
                        (l(&s.wait_us) / x.max(1)).to_string(),
                    ]
                })
                .collect();
            table(
                out,
                &[
                    "database",
                    "total_xact_count",
                    "total_query_count",
                    "total_received",
                    "total_sent",
                    "total_xact_time",
                    "total_query_time",
                    "total_wait_time",
                    "avg_xact_time",
                    "avg_query_time",
                    "avg_wait_time",
                ],
                &rows,
            );
        }
        other => {
            return Err(PgError::error(
                "42601",
                format!("unknown SHOW item: {other} (try SHOW HELP)"),
            ));
        }
    }
    Ok(())
}
