//! Several tenantpool instances behind one address (a load balancer, a Kubernetes Service,
//! `so_reuseport`): a client's CancelRequest opens a new connection, which may land on
//! another instance than the one running its query. As PgBouncer's `[peers]`, each instance
//! has a `peer_id` that is part of the cancel keys it hands out; an instance that gets a
//! key it does not know sends the request on to the instance the key names.
//!
//! The key's process id (31 bits, positive) is `peer_id` (14 bits) then 17 random bits;
//! the secret stays 32 random bits. A forwarded request carries the key with its top bit
//! set (a negative process id, which no client is ever given): the receiving instance
//! looks it up locally and never forwards it again, so a cancel cannot loop between
//! instances, however the peer lists are written.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Shared;
use crate::config::Config;

/// The largest `peer_id` (14 bits, as in PgBouncer).
pub const MAX_PEER_ID: u16 = 16383;

/// Random bits below the peer id in a process id.
const RANDOM_BITS: u32 = 17;

/// The top bit of a forwarded request's process id.
const FORWARDED: u32 = 0x8000_0000;

/// How long a forward may take to connect and be read by the peer.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// `[peers.N]`: another instance, `N` being its `peer_id`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// `host:port` of its client listener, or the path of its Unix socket
    /// (`/run/tenantpool/.s.PGSQL.6432`).
    pub address: String,
}

/// A fresh process id for a client's cancel key: with `peer_id` in its upper bits when
/// peers are configured, else 31 random bits. Never 0, never negative.
pub fn new_pid(peer_id: u16) -> i32 {
    loop {
        let pid = if peer_id == 0 {
            rand::random::<u32>() >> 1
        } else {
            (u32::from(peer_id) << RANDOM_BITS) | (rand::random::<u32>() >> (32 - RANDOM_BITS))
        };
        if pid != 0 {
            return pid as i32;
        }
    }
}

/// The instance that handed out a process id (0 when it has none).
pub fn owner(pid: i32) -> u16 {
    ((pid as u32 & !FORWARDED) >> RANDOM_BITS) as u16
}

/// What to do with a CancelRequest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Look the key up here (and do nothing if it is unknown).
    Local { pid: i32 },
    /// Send it on, marked as forwarded, to this peer.
    Forward { peer: u16, pid: i32 },
}

/// Where a CancelRequest for `pid` goes, from an instance with `own` id that knows the
/// peers `known` and whether the key is one of its own clients'.
pub fn route(pid: i32, own: u16, is_local: bool, known: impl Fn(u16) -> bool) -> Route {
    let raw = pid as u32;
    if raw & FORWARDED != 0 {
        return Route::Local {
            pid: (raw & !FORWARDED) as i32,
        };
    }
    let peer = owner(pid);
    if is_local || own == 0 || peer == own || !known(peer) {
        return Route::Local { pid };
    }
    Route::Forward {
        peer,
        pid: (raw | FORWARDED) as i32,
    }
}

/// Handles a client's (or a peer's) CancelRequest: cancels the query of the client that
/// owns the key here, or forwards the request to the peer whose id the key carries.
/// Unknown keys and keys of idle clients are dropped silently, as PostgreSQL does.
pub async fn cancel(shared: &Shared, pid: i32, secret: i32, from: SocketAddr) {
    let own = shared.config.proxy.peer_id;
    // [peers] as the config in force names them (a reload may add or move one).
    let config = std::sync::Arc::clone(&shared.live.config());
    let peers = &config.peers;
    let local = shared.registry.lookup(pid, secret);
    let known = |id: u16| peers.contains_key(&id.to_string());
    match route(pid, own, local.is_some(), known) {
        Route::Local { pid } => {
            let target = if local.is_some() {
                local
            } else {
                shared.registry.lookup(pid, secret)
            };
            if let Some((spid, ssecret, place)) = target {
                tracing::debug!(client = %from, "forwarding cancel request to the server");
                // The server of the connection running the query.
                let server = shared.pools.get(place).target();
                let _ = crate::server::send_cancel(&server, spid, ssecret).await;
            }
        }
        Route::Forward { peer, pid } => {
            let Some(p) = peers.get(&peer.to_string()) else {
                return;
            };
            tracing::debug!(client = %from, peer, address = %p.address, "forwarding cancel request to a peer");
            if let Err(e) = forward(&p.address, pid, secret).await {
                tracing::warn!(peer, address = %p.address, error = %e, "cancel request not forwarded");
            }
        }
    }
}

/// Sends a CancelRequest to a peer and waits (briefly) for it to close the connection,
/// which it does once it has handled the request.
async fn forward(address: &str, pid: i32, secret: i32) -> std::io::Result<()> {
    let mut out = BytesMut::with_capacity(16);
    postgres_protocol::message::frontend::cancel_request(pid, secret, &mut out);
    let work = async {
        let mut stream = connect(address).await?;
        stream.write_all(&out).await?;
        let mut scratch = [0u8; 1];
        let _ = stream.read(&mut scratch).await;
        Ok(())
    };
    tokio::time::timeout(FORWARD_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// A plain connection to a peer's address: a Unix socket path or `host:port`.
async fn connect(address: &str) -> std::io::Result<crate::tls::Stream> {
    if address.starts_with('/') {
        Ok(crate::tls::Stream::Unix(
            tokio::net::UnixStream::connect(address).await?,
        ))
    } else {
        Ok(crate::tls::Stream::Plain(
            tokio::net::TcpStream::connect(address).await?,
        ))
    }
}

/// Problems with `peer_id` and `[peers.N]`.
pub fn validate(config: &Config, p: &mut Vec<String>) {
    let own = config.proxy.peer_id;
    if own > MAX_PEER_ID {
        p.push(format!(
            "proxy.peer_id: {own} is above {MAX_PEER_ID} (it must fit in the cancel key)"
        ));
    }
    if own != 0 && config.proxy.max_client_conn > 65536 {
        p.push(format!(
            "proxy.max_client_conn: {} is above 65536, too many for the cancel keys of an instance with a peer_id",
            config.proxy.max_client_conn
        ));
    }
    if !config.peers.is_empty() && own == 0 {
        p.push("peers: give this instance a proxy.peer_id (1..16383) too".into());
    }
    for (name, peer) in &config.peers {
        match name.parse::<u16>() {
            Ok(id) if (1..=MAX_PEER_ID).contains(&id) && id.to_string() == *name => {}
            _ => p.push(format!(
                "peers.{name}: the section name is the peer's peer_id, a number from 1 to {MAX_PEER_ID}"
            )),
        }
        let a = &peer.address;
        let ok = if a.starts_with('/') {
            true
        } else {
            a.rsplit_once(':')
                .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok())
        };
        if !ok {
            p.push(format!(
                "peers.{name}.address: \"{a}\" is not \"host:port\" or the path of a Unix socket"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_carry_the_peer_id() {
        for id in [1, 2, 77, MAX_PEER_ID] {
            for _ in 0..1000 {
                let pid = new_pid(id);
                assert!(pid > 0);
                assert_eq!(owner(pid), id);
            }
        }
        assert!((0..1000).all(|_| new_pid(0) > 0));
    }

    #[test]
    fn a_cancel_is_forwarded_once_and_never_again() {
        let all = |_| true;
        let pid = new_pid(2);
        // Instance 1 does not know the key; it names peer 2: forwarded, marked.
        let Route::Forward { peer, pid: marked } = route(pid, 1, false, all) else {
            panic!("not forwarded");
        };
        assert_eq!(peer, 2);
        assert!(marked < 0);
        // A marked request is looked up locally wherever it lands, even on an instance
        // whose peer list points elsewhere: no loop.
        assert_eq!(route(marked, 2, false, all), Route::Local { pid });
        assert_eq!(route(marked, 3, false, all), Route::Local { pid });
        // Own keys, keys of unknown peers, and instances without a peer_id stay local.
        assert_eq!(route(pid, 2, false, all), Route::Local { pid });
        assert_eq!(route(pid, 1, true, all), Route::Local { pid });
        assert_eq!(route(pid, 1, false, |_| false), Route::Local { pid });
        assert_eq!(route(pid, 0, false, all), Route::Local { pid });
    }
}
