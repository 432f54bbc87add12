//! A client's startup: SSL/GSS negotiation, cancel requests, the StartupMessage and
//! protocol version, authentication, and the checks that admit a client to its tenant.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use pgwire::messages::Message;
use pgwire::messages::startup::{
    Authentication, BackendKeyData, NegotiateProtocolVersion, SecretKey, Startup,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::Shared;
use crate::config::{ADMIN_DATABASES, TenantFrom};
use crate::error::PgError;
use crate::protocol::{
    CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, MAX_STARTUP_LEN, SSL_REQUEST_CODE,
    put_parameter_status, put_ready_for_query,
};
use crate::tenant::TenantId;

use super::{auth, params};

/// What a successful startup yields: who the client is and where it goes.
pub struct Admitted {
    pub user: Arc<str>,
    pub target: Target,
    pub settings: Vec<(String, String)>,
}

/// Where an admitted client goes.
pub enum Target {
    Tenant(TenantId),
    /// The admin console (`dbname=tenantpool` or `pgbouncer`).
    Admin,
}

/// The first packet of a connection.
pub enum FirstPacket {
    Startup(Box<Startup>),
    Cancel { pid: i32, secret: i32 },
}

/// Reads packets until a StartupMessage or CancelRequest, answering SSLRequest and
/// GSSENCRequest with 'N' (no encryption offered).
pub async fn read_first_packet(stream: &mut TcpStream) -> Result<FirstPacket, PgError> {
    loop {
        let mut len_bytes = [0u8; 4];
        stream
            .read_exact(&mut len_bytes)
            .await
            .map_err(|_| PgError::protocol_violation("incomplete startup packet"))?;
        let len = i32::from_be_bytes(len_bytes);
        if len < 8 || len as usize > MAX_STARTUP_LEN {
            return Err(PgError::protocol_violation(
                "invalid length of startup packet",
            ));
        }
        let mut packet = BytesMut::with_capacity(len as usize);
        packet.put_slice(&len_bytes);
        packet.resize(len as usize, 0);
        stream
            .read_exact(&mut packet[4..])
            .await
            .map_err(|_| PgError::protocol_violation("incomplete startup packet"))?;
        let code = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
        match code {
            SSL_REQUEST_CODE | GSSENC_REQUEST_CODE => {
                if len != 8 {
                    return Err(PgError::protocol_violation(
                        "invalid length of startup packet",
                    ));
                }
                stream.write_all(b"N").await.map_err(PgError::client_io)?;
            }
            CANCEL_REQUEST_CODE => {
                if len != 16 {
                    return Err(PgError::protocol_violation(
                        "invalid length of cancel request",
                    ));
                }
                let pid = i32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]);
                let secret = i32::from_be_bytes([packet[12], packet[13], packet[14], packet[15]]);
                return Ok(FirstPacket::Cancel { pid, secret });
            }
            _ => {
                let major = code >> 16;
                let minor = code & 0xffff;
                if major != 3 {
                    return Err(PgError::unsupported(format!(
                        "unsupported frontend protocol {major}.{minor}: tenantpool supports 3.0"
                    )));
                }
                if len as usize <= 8 {
                    return Err(PgError::protocol_violation(
                        "invalid length of startup packet",
                    ));
                }
                // The frame is exact and bounded, as pgwire's decoder requires.
                let startup = Startup::decode(&mut packet, &Default::default())
                    .map_err(|e| {
                        PgError::protocol_violation(format!("invalid startup packet: {e}"))
                    })?
                    .ok_or_else(|| PgError::protocol_violation("incomplete startup packet"))?;
                return Ok(FirstPacket::Startup(Box::new(startup)));
            }
        }
    }
}

/// Admits a client: negotiates the protocol version, authenticates, finds the tenant and
/// takes client slots. On success the client has been sent AuthenticationOk.
pub async fn admit(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    startup: Startup,
    shared: &Shared,
    over_client_limit: bool,
) -> Result<Admitted, PgError> {
    let params: BTreeMap<String, String> = startup.parameters;

    // A 3.x client newer than 3.0, or one asking for protocol extensions, is told what we
    // speak and carries on with 3.0.
    let unsupported: Vec<String> = params
        .keys()
        .filter(|k| k.starts_with("_pq_."))
        .cloned()
        .collect();
    if startup.protocol_number_minor > 0 || !unsupported.is_empty() {
        let mut out = BytesMut::new();
        NegotiateProtocolVersion::new(196_608, unsupported)
            .encode(&mut out)
            .map_err(|e| PgError::protocol_violation(e.to_string()))?;
        stream.write_all(&out).await.map_err(PgError::client_io)?;
    }
    if params.contains_key("replication") {
        return Err(PgError::unsupported(
            "replication connections are not supported",
        ));
    }

    let raw_user = params
        .get("user")
        .filter(|u| !u.is_empty())
        .ok_or_else(PgError::no_user)?
        .clone();
    let (user_name, tenant_name) = match shared.config.proxy.tenant_from {
        TenantFrom::Database => {
            let db = params
                .get("database")
                .filter(|d| !d.is_empty())
                .unwrap_or(&raw_user)
                .clone();
            (raw_user.clone(), db)
        }
        TenantFrom::User => match raw_user.split_once('.') {
            Some((u, t)) => (u.to_string(), t.to_string()),
            None => {
                let db = params.get("database").cloned().unwrap_or_default();
                (raw_user.clone(), db)
            }
        },
    };
    let settings = params::session_settings(&params)?;

    let user = shared.users.get(&user_name);
    // Rejections are counted for configured tenants only (the label is never client input).
    let reject = |reason: usize| {
        if let Some(t) = shared.tenants.lookup(&tenant_name) {
            shared.metrics.tenants[t.id as usize].rejected[reason].increment(1);
        }
    };
    if over_client_limit {
        reject(0);
        return Err(PgError::too_many_clients(&format!(
            "max_client_conn ({})",
            shared.config.proxy.max_client_conn
        )));
    }
    // md5 hashes with the name the client sent (`app.acme` when the tenant is in it).
    if let Err(e) = auth::authenticate(
        stream,
        buf,
        shared.config.proxy.auth_method,
        &raw_user,
        user,
    )
    .await
    {
        reject(3);
        return Err(e);
    }
    let user_arc: Arc<str> = match user {
        Some(u) => u.name.clone(),
        None => Arc::from(user_name.as_str()),
    };

    if ADMIN_DATABASES.contains(&tenant_name.as_str()) {
        if !shared.config.proxy.admin_users.contains(&user_name) {
            return Err(PgError::not_allowed(&user_name, "the admin console"));
        }
        return Ok(Admitted {
            user: user_arc,
            target: Target::Admin,
            settings,
        });
    }
    let tenant = shared
        .tenants
        .lookup(&tenant_name)
        .ok_or_else(|| PgError::unknown_tenant(&tenant_name))?;
    if let Some(u) = user
        && !u.may_open(&tenant.name)
    {
        reject(2);
        return Err(PgError::not_allowed(
            &user_name,
            &format!("tenant \"{}\"", tenant.name),
        ));
    }
    Ok(Admitted {
        user: user_arc,
        target: Target::Tenant(tenant.id),
        settings,
    })
}

/// Sends AuthenticationOk, the ParameterStatus values, the proxy-made BackendKeyData and
/// the first ReadyForQuery.
/// The values are the server's, as the client's own settings change them: what PostgreSQL
/// reported when the settings were applied, else the values as the client gave them.
pub async fn welcome(
    stream: &mut TcpStream,
    server_params: &[(String, String)],
    settings: &params::Settings,
    key: (i32, i32),
) -> Result<(), PgError> {
    let mut out = BytesMut::with_capacity(512);
    let _ = Authentication::Ok.encode(&mut out);
    let reported = settings.reported.get();
    for (name, value) in server_params {
        let lower = name.to_ascii_lowercase();
        let own = reported
            .and_then(|r| r.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)))
            .map(|(_, v)| v.as_str())
            .or_else(|| settings.get(&lower));
        let value = match own {
            Some(v) => v,
            // The pool's own application_name is not the client's.
            None if lower == "application_name" => "",
            None => value,
        };
        put_parameter_status(&mut out, name, value);
    }
    let _ = BackendKeyData::new(key.0, SecretKey::I32(key.1)).encode(&mut out);
    put_ready_for_query(&mut out, b'I');
    stream.write_all(&out).await.map_err(PgError::client_io)
}
