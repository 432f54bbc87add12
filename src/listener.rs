//! Where clients connect: the TCP listener of `proxy.listen` (with `SO_REUSEPORT`, so a new
//! instance can start on the port of one that is draining) and, with
//! `proxy.unix_socket_dir`, a Unix socket `.s.PGSQL.<port>` there, as PostgreSQL and
//! PgBouncer name it.
//!
//! The Unix socket is bound under a temporary name and renamed over the final one, so a
//! new instance takes the path over from a running one without a moment in which it is
//! missing; the old instance keeps serving the clients it has and, on exit, removes the
//! path only if it is still its own socket.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::task::{Context, Poll};

use tokio::io::Interest;
use tokio::net::{TcpListener, TcpSocket, UnixListener};

use crate::config::Config;
use crate::tls::Stream;

/// The path of the Unix socket of `port` in `dir`, as libpq and PostgreSQL name it.
pub fn socket_path(dir: &str, port: u16) -> PathBuf {
    Path::new(dir).join(format!(".s.PGSQL.{port}"))
}

/// The peer address a Unix-socket client is listed and logged with (it has none).
pub const UNIX_PEER: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// The client listeners of one instance.
pub struct Listeners {
    tcp: TcpListener,
    unix: Option<UnixSocket>,
}

struct UnixSocket {
    listener: UnixListener,
    path: PathBuf,
    /// The socket file's device and inode: what the path names while it is ours.
    id: (u64, u64),
}

/// Binds a TCP listener on `addr`, with `SO_REUSEPORT` when asked.
pub fn tcp_listener(addr: SocketAddr, reuseport: bool, backlog: u32) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if reuseport {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(backlog)
}

impl Listeners {
    /// Binds `proxy.listen` and, when configured, the Unix socket (named after the port
    /// actually bound).
    pub fn bind(config: &Config) -> io::Result<Listeners> {
        let proxy = &config.proxy;
        let addr: SocketAddr = proxy
            .listen
            .parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "bad proxy.listen"))?;
        let tcp = tcp_listener(addr, proxy.so_reuseport, 4096).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on {addr} (proxy.listen): {e}"),
            )
        })?;
        let unix = match &proxy.unix_socket_dir {
            Some(dir) => {
                let mode = parse_mode(&proxy.unix_socket_mode).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("proxy.unix_socket_mode: {e}"),
                    )
                })?;
                let port = tcp.local_addr()?.port();
                Some(bind_unix(
                    &socket_path(dir, port),
                    mode,
                    proxy.so_reuseport,
                )?)
            }
            None => None,
        };
        Ok(Listeners { tcp, unix })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// The Unix socket's path, when there is one.
    pub fn unix_path(&self) -> Option<&Path> {
        self.unix.as_ref().map(|u| u.path.as_path())
    }

    /// The next client, from either listener.
    pub async fn accept(&self) -> io::Result<(Stream, SocketAddr)> {
        std::future::poll_fn(|cx| self.poll_accept(cx)).await
    }

    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(Stream, SocketAddr)>> {
        if let Poll::Ready(r) = self.tcp.poll_accept(cx) {
            return Poll::Ready(r.map(|(tcp, peer)| {
                let _ = tcp.set_nodelay(true);
                (Stream::Plain(tcp), peer)
            }));
        }
        if let Some(u) = &self.unix
            && let Poll::Ready(r) = u.listener.poll_accept(cx)
        {
            return Poll::Ready(r.map(|(s, _)| (Stream::Unix(s), UNIX_PEER)));
        }
        Poll::Pending
    }

    /// The connections the kernel has already completed and queued: closing a listener
    /// would reset them, so they are taken (and told the proxy is shutting down, or
    /// served, as the shutdown mode says) before it is closed.
    pub fn drain(&self) -> Vec<(Stream, SocketAddr)> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut out = Vec::new();
        while let Poll::Ready(Ok(c)) = self.poll_accept(&mut cx) {
            out.push(c);
        }
        out
    }

    /// Stops listening. The Unix socket's path is removed only while it is still this
    /// instance's socket (a newer instance may have taken it over).
    pub fn close(self) {
        if let Some(u) = self.unix {
            let ours = std::fs::symlink_metadata(&u.path)
                .map(|m| (m.dev(), m.ino()) == u.id)
                .unwrap_or(false);
            drop(u.listener);
            if ours {
                let _ = std::fs::remove_file(&u.path);
            }
        }
    }
}

/// Binds a Unix socket at `path` with permissions `mode`: under a temporary name, then
/// renamed over `path`. A socket already at `path` that accepts connections is another
/// instance's: taken over with `so_reuseport` (a rolling restart), an error without.
fn bind_unix(path: &Path, mode: u32, take_over: bool) -> io::Result<UnixSocket> {
    if !take_over && std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{}: another process listens there", path.display()),
        ));
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", tmp.display())))?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display())));
    }
    let m = std::fs::symlink_metadata(path)?;
    Ok(UnixSocket {
        listener,
        path: path.to_path_buf(),
        id: (m.dev(), m.ino()),
    })
}

/// An octal mode such as "0777" or "0660".
pub fn parse_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s.trim_start_matches("0o"), 8) {
        Ok(m) if m <= 0o777 && !s.is_empty() => Ok(m),
        _ => Err(format!("\"{s}\" is not an octal mode such as \"0777\"")),
    }
}

/// Is a Unix-socket stream still open (see [`Stream::closed`])? Readiness says whether the
/// peer has closed its end, with no bytes read.
pub async fn unix_open(stream: &Stream) -> bool {
    let Stream::Unix(s) = stream else {
        return true;
    };
    match s.ready(Interest::READABLE).await {
        Ok(r) => !r.is_read_closed(),
        Err(_) => false,
    }
}

/// Problems with `[proxy]`'s listening keys.
pub fn validate(config: &Config, p: &mut Vec<String>) {
    let proxy = &config.proxy;
    if let Err(e) = parse_mode(&proxy.unix_socket_mode) {
        p.push(format!("proxy.unix_socket_mode: {e}"));
    }
    if let Some(dir) = &proxy.unix_socket_dir
        && !dir.starts_with('/')
    {
        p.push(format!(
            "proxy.unix_socket_dir: \"{dir}\" is not an absolute directory path"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        assert_eq!(parse_mode("0777"), Ok(0o777));
        assert_eq!(parse_mode("660"), Ok(0o660));
        assert!(parse_mode("0999").is_err());
        assert!(parse_mode("").is_err());
        assert!(parse_mode("01777").is_err());
    }

    #[tokio::test]
    async fn a_new_instance_takes_the_unix_socket_over_and_the_old_one_leaves_it() {
        let dir = std::env::temp_dir().join(format!("tenantpool-listen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = socket_path(dir.to_str().unwrap(), 5999);
        let old = bind_unix(&path, 0o700, true).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert!(bind_unix(&path, 0o700, false).is_err(), "in use");
        let new = bind_unix(&path, 0o777, true).unwrap();
        // New connections reach the new socket.
        let _c = tokio::net::UnixStream::connect(&path).await.unwrap();
        assert!(new.listener.accept().await.is_ok());
        // The old one, closing, leaves the path to the new one.
        Listeners {
            tcp: tcp_listener("127.0.0.1:0".parse().unwrap(), false, 8).unwrap(),
            unix: Some(old),
        }
        .close();
        assert!(path.exists());
        Listeners {
            tcp: tcp_listener("127.0.0.1:0".parse().unwrap(), false, 8).unwrap(),
            unix: Some(new),
        }
        .close();
        assert!(!path.exists());
    }
}
