//! A client's startup: SSL/GSS negotiation, cancel requests, the StartupMessage and
//! protocol version, authentication, and the checks that admit a client to its tenant.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::tls::Stream;
use bytes::BytesMut;
use pgwire::messages::Message;
use pgwire::messages::startup::{
    Authentication, BackendKeyData, NegotiateProtocolVersion, SecretKey, Startup,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// What one startup-phase packet asks for.
pub enum Packet {
    /// SSLRequest (`ssl`) or GSSENCRequest: another packet follows, over TLS when an
    /// SSLRequest was answered 'S'.
    EncryptionRequest {
        ssl: bool,
    },
    Cancel {
        pid: i32,
        secret: i32,
    },
    Startup(Box<Startup>),
}

/// The total length of a startup-phase packet from its 4-byte length prefix (which counts
/// itself), if it is one PostgreSQL would read.
pub fn packet_len(len_bytes: [u8; 4]) -> Result<usize, PgError> {
    let len = i32::from_be_bytes(len_bytes);
    if len < 8 || len as usize > MAX_STARTUP_LEN {
        return Err(PgError::protocol_violation(
            "invalid length of startup packet",
        ));
    }
    Ok(len as usize)
}

/// Decides what one whole startup-phase packet is: `packet` is exactly the packet, its
/// length prefix included (as [`packet_len`] accepted it).
pub fn decode_packet(packet: &[u8]) -> Result<Packet, PgError> {
    let Some(prefix) = packet.first_chunk::<4>() else {
        return Err(PgError::protocol_violation("incomplete startup packet"));
    };
    let len = packet_len(*prefix)?;
    if packet.len() != len {
        return Err(PgError::protocol_violation("incomplete startup packet"));
    }
    let code = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
    match code {
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE => {
            if len != 8 {
                return Err(PgError::protocol_violation(
                    "invalid length of startup packet",
                ));
            }
            Ok(Packet::EncryptionRequest {
                ssl: code == SSL_REQUEST_CODE,
            })
        }
        CANCEL_REQUEST_CODE => {
            if len != 16 {
                return Err(PgError::protocol_violation(
                    "invalid length of cancel request",
                ));
            }
            let pid = i32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]);
            let secret = i32::from_be_bytes([packet[12], packet[13], packet[14], packet[15]]);
            Ok(Packet::Cancel { pid, secret })
        }
        _ => {
            let major = code >> 16;
            let minor = code & 0xffff;
            if major != 3 {
                return Err(PgError::unsupported(format!(
                    "unsupported frontend protocol {major}.{minor}: tenantpool supports 3.0"
                )));
            }
            if len <= 8 {
                return Err(PgError::protocol_violation(
                    "invalid length of startup packet",
                ));
            }
            // The frame is exact and bounded, as pgwire's decoder requires.
            let mut frame = BytesMut::from(packet);
            let startup = Startup::decode(&mut frame, &Default::default())
                .map_err(|e| PgError::protocol_violation(format!("invalid startup packet: {e}")))?
                .ok_or_else(|| PgError::protocol_violation("incomplete startup packet"))?;
            Ok(Packet::Startup(Box::new(startup)))
        }
    }
}

/// The first byte of a TLS handshake record: a client that starts with it speaks TLS at
/// once ("direct" TLS, PostgreSQL 17's `sslnegotiation=direct`).
const TLS_HANDSHAKE: u8 = 0x16;

/// How much a read of the startup phase asks for: a whole usual packet in one read.
const STARTUP_READ: usize = 1024;

/// Opens a client's connection: reads packets until a StartupMessage or CancelRequest.
/// An SSLRequest is answered 'S' and the TLS handshake done when `tls` is set ('N'
/// otherwise); a TLS handshake as the very first bytes is direct TLS, which must name
/// ALPN `postgresql`; a GSSENCRequest gets 'N'. `slot` holds the stream from the start
/// (so errors can be sent on it), upgraded in place to TLS. What each packet is, is
/// decided by [`decode_packet`].
///
/// Packets are read into `buf` a read at a time, not a length and then a body: one
/// system call for a packet instead of two or three. What the client sent past its
/// StartupMessage is left in `buf`. Bytes past an SSLRequest that is answered 'S' are
/// refused, as PostgreSQL refuses them: they were sent in the clear before the handshake,
/// so they would be taken for part of it (or, once encrypted, for the client's).
pub async fn open(
    slot: &mut Option<Stream>,
    conn: Stream,
    tls: Option<&crate::tls::Listener>,
    peer: std::net::SocketAddr,
    buf: &mut BytesMut,
) -> Result<FirstPacket, PgError> {
    let mut first = [0u8; 1];
    // No TLS on a Unix socket, as in PostgreSQL.
    let tls = tls.filter(|_| conn.tcp().is_some());
    *slot = Some(match (tls, conn) {
        (Some(listener), Stream::Plain(tcp))
            if tcp.peek(&mut first).await.map_err(PgError::client_io)? == 1
                && first[0] == TLS_HANDSHAKE =>
        {
            accept(tcp, listener, true, peer).await?
        }
        (_, conn) => conn,
    });
    let incomplete = || PgError::protocol_violation("incomplete startup packet");
    loop {
        let stream = slot.as_mut().expect("set above");
        let len = loop {
            match buf.first_chunk::<4>() {
                Some(prefix) => {
                    let len = packet_len(*prefix)?;
                    if buf.len() >= len {
                        break len;
                    }
                    buf.reserve(len - buf.len());
                }
                None => buf.reserve(STARTUP_READ),
            }
            match stream.read_buf(buf).await {
                Ok(0) | Err(_) => return Err(incomplete()),
                Ok(_) => {}
            }
        };
        let packet = buf.split_to(len);
        match decode_packet(&packet)? {
            Packet::EncryptionRequest { ssl: true } if tls.is_some() && !stream.is_tls() => {
                if !buf.is_empty() {
                    return Err(PgError::protocol_violation(
                        "received unencrypted data after SSL request",
                    ));
                }
                stream.write_all(b"S").await.map_err(PgError::client_io)?;
                let Some(Stream::Plain(tcp)) = slot.take() else {
                    unreachable!("checked: not TLS")
                };
                let listener = tls.expect("checked");
                *slot = Some(accept(tcp, listener, false, peer).await?);
            }
            Packet::EncryptionRequest { .. } => {
                stream.write_all(b"N").await.map_err(PgError::client_io)?
            }
            Packet::Cancel { pid, secret } => return Ok(FirstPacket::Cancel { pid, secret }),
            Packet::Startup(s) => return Ok(FirstPacket::Startup(s)),
        }
    }
}

/// The TLS handshake with a client. A failure cannot be told to the client in the protocol
/// (rustls has sent it an alert): it is logged with its cause.
async fn accept(
    tcp: tokio::net::TcpStream,
    listener: &crate::tls::Listener,
    direct: bool,
    peer: std::net::SocketAddr,
) -> Result<Stream, PgError> {
    let tls = match listener.acceptor.accept(tcp).await {
        Ok(t) => t,
        Err(e) => {
            tracing::info!(client = %peer, error = %crate::tls::describe(&e), "TLS handshake failed");
            return Err(PgError::client_io(e));
        }
    };
    if direct && tls.get_ref().1.alpn_protocol() != Some(crate::tls::ALPN) {
        tracing::info!(client = %peer, "direct TLS without ALPN \"postgresql\" refused");
        return Err(PgError::client_io("direct TLS without ALPN postgresql"));
    }
    Ok(Stream::Tls(Box::new(tokio_rustls::TlsStream::Server(tls))))
}

/// Admits a client: negotiates the protocol version, authenticates, finds the tenant and
/// takes client slots. On success the client has been sent AuthenticationOk.
pub async fn admit(
    stream: &mut Stream,
    buf: &mut BytesMut,
    out: &mut BytesMut,
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
        let mut npv = BytesMut::new();
        NegotiateProtocolVersion::new(196_608, unsupported)
            .encode(&mut npv)
            .map_err(|e| PgError::protocol_violation(e.to_string()))?;
        stream.write_all(&npv).await.map_err(PgError::client_io)?;
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
        TenantFrom::Sni => {
            let domain = shared
                .config
                .proxy
                .sni_domain
                .as_deref()
                .unwrap_or_default();
            let tenant = sni_tenant(stream.sni(), domain)?;
            tenant_from_name(shared, &params, &raw_user, tenant)?
        }
        TenantFrom::Domain => {
            let host = stream.sni().unwrap_or_default();
            let tenant = shared
                .tenants
                .lookup_domain(host)
                .ok_or_else(|| PgError::no_domain_tenant(host))?;
            tenant_from_name(shared, &params, &raw_user, tenant.name.clone())?
        }
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

    let users = shared.users.load_full();
    let user = users.get(&user_name);
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
            shared.live.config().proxy.max_client_conn
        )));
    }
    // md5 hashes with the name the client sent (`app.acme` when the tenant is in it).
    let tls = shared.tls.load_full();
    if let Err(e) = auth::authenticate(
        stream,
        buf,
        out,
        shared.config.proxy.auth_method,
        tls.as_deref(),
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
        let c = shared.live.config();
        if !c.proxy.admin_users.contains(&user_name) && !c.proxy.stats_users.contains(&user_name) {
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
    if tenant.disabled.load(std::sync::atomic::Ordering::Acquire) {
        return Err(PgError::fatal(
            "55000",
            format!(
                "tenant \"{}\" is not currently accepting connections (DISABLE on the admin console)",
                tenant.name
            ),
        ));
    }
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

/// The tenant a TLS server name names: `acme.db.example.com` with `sni_domain =
/// "db.example.com"` is `acme` (one label, case-insensitive).
fn sni_tenant(sni: Option<&str>, domain: &str) -> Result<String, PgError> {
    let name = sni.unwrap_or_default().to_ascii_lowercase();
    let domain = domain.to_ascii_lowercase();
    name.strip_suffix(&domain)
        .and_then(|t| t.strip_suffix('.'))
        .filter(|t| !t.is_empty() && !t.contains('.'))
        .map(str::to_string)
        .ok_or_else(|| {
            PgError::fatal(
                "3D000",
                format!(
                    "no tenant in the TLS server name \"{name}\": connect to <tenant>.{domain}"
                ),
            )
        })
}

/// (user, tenant) when the TLS server name named the tenant: a dbname that is itself
/// another tenant's name is a contradiction; any other dbname (the database's own name,
/// say) is not about tenants, and the admin console's names stay the console's.
fn tenant_from_name(
    shared: &Shared,
    params: &BTreeMap<String, String>,
    raw_user: &str,
    tenant: String,
) -> Result<(String, String), PgError> {
    if let Some(db) = params.get("database")
        && db != &tenant
        && !ADMIN_DATABASES.contains(&db.as_str())
        && shared.tenants.lookup(db).is_some()
    {
        return Err(PgError::tenant_mismatch(&tenant, db));
    }
    let admin = params
        .get("database")
        .filter(|d| ADMIN_DATABASES.contains(&d.as_str()));
    Ok((raw_user.to_string(), admin.cloned().unwrap_or(tenant)))
}

/// Sends AuthenticationOk, the ParameterStatus values, the proxy-made BackendKeyData and
/// the first ReadyForQuery, after what `out` holds already (SCRAM's final message), in one
/// write.
/// The values are the server's, as the client's own settings change them: what PostgreSQL
/// reported when the settings were applied, else the values as the client gave them.
pub async fn welcome(
    stream: &mut Stream,
    out: &mut BytesMut,
    server_params: &crate::pool::ServerParams,
    settings: &crate::settings::Settings,
    key: (i32, i32),
) -> Result<(), PgError> {
    out.reserve(1024);
    let _ = Authentication::Ok.encode(out);
    // The same for every client with these settings: made once (when what they depend on
    // is final) and copied.
    match settings.welcome.get() {
        Some((params, bytes)) if Arc::ptr_eq(params, server_params) => out.extend_from_slice(bytes),
        _ => {
            let start = out.len();
            put_parameter_statuses(out, server_params, settings);
            if settings.list.is_empty() || settings.reported.get().is_some() {
                let bytes = bytes::Bytes::copy_from_slice(&out[start..]);
                let _ = settings.welcome.set((server_params.clone(), bytes));
            }
        }
    }
    let _ = BackendKeyData::new(key.0, SecretKey::I32(key.1)).encode(out);
    put_ready_for_query(out, b'I');
    stream.write_all(out).await.map_err(PgError::client_io)
}

/// The ParameterStatus messages of a login: the server's values, as the client's settings
/// change them (what PostgreSQL reported when they were applied, else the values as given).
fn put_parameter_statuses(
    out: &mut BytesMut,
    server_params: &[(String, String)],
    settings: &crate::settings::Settings,
) {
    let reported = settings.reported.get();
    for (name, value) in server_params {
        let own = reported
            .and_then(|r| r.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)))
            .or_else(|| {
                settings
                    .list
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(name))
            })
            .map(|(_, v)| v.as_str());
        let value = match own {
            Some(v) => v,
            // The pool's own application_name is not the client's.
            None if name.eq_ignore_ascii_case("application_name") => "",
            None => value,
        };
        put_parameter_status(out, name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: u32, body: &[u8]) -> Vec<u8> {
        let mut p = ((8 + body.len()) as u32).to_be_bytes().to_vec();
        p.extend_from_slice(&code.to_be_bytes());
        p.extend_from_slice(body);
        p
    }

    #[test]
    fn decodes_each_kind_of_first_packet() {
        assert!(matches!(
            decode_packet(&packet(SSL_REQUEST_CODE, b"")),
            Ok(Packet::EncryptionRequest { ssl: true })
        ));
        assert!(matches!(
            decode_packet(&packet(GSSENC_REQUEST_CODE, b"")),
            Ok(Packet::EncryptionRequest { ssl: false })
        ));
        assert!(matches!(
            decode_packet(&packet(CANCEL_REQUEST_CODE, b"\0\0\0\x07\xff\xff\xff\xfe")),
            Ok(Packet::Cancel { pid: 7, secret: -2 })
        ));
        let Ok(Packet::Startup(s)) = decode_packet(&packet(0x0003_0000, b"user\0app\0\0")) else {
            panic!("startup packet");
        };
        assert_eq!(s.parameters.get("user").map(String::as_str), Some("app"));
    }

    #[test]
    fn refuses_bad_first_packets() {
        let code = |p: &[u8]| decode_packet(p).err().map(|e| e.code.to_string());
        // Lengths: short, over the limit, not the frame's.
        assert_eq!(code(&[0, 0, 0, 7, 0, 0, 0]).as_deref(), Some("08P01"));
        assert_eq!(code(&[0, 0, 0x27, 0x11]).as_deref(), Some("08P01"));
        let mut p = packet(0x0003_0000, b"user\0app\0\0");
        p.push(0);
        assert_eq!(code(&p).as_deref(), Some("08P01"));
        assert_eq!(code(&p[..3]).as_deref(), Some("08P01"));
        // Requests with a body they must not have.
        assert_eq!(
            code(&packet(SSL_REQUEST_CODE, b"x")).as_deref(),
            Some("08P01")
        );
        assert_eq!(
            code(&packet(CANCEL_REQUEST_CODE, b"1234")).as_deref(),
            Some("08P01")
        );
        // Protocol 2.0, and a 3.0 packet with no parameters at all.
        assert_eq!(
            code(&packet(0x0002_0000, b"user\0a\0\0")).as_deref(),
            Some("0A000")
        );
        assert_eq!(code(&packet(0x0003_0000, b"")).as_deref(), Some("08P01"));
    }
}
