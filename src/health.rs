//! The metrics listener (`[metrics] listen`): Prometheus text at `GET /metrics`, and the
//! probes a load balancer or Kubernetes asks:
//!
//! * `GET /healthz`: 200 while the process serves requests (liveness).
//! * `GET /readyz`: 200 when new clients should be sent here, else 503 with the reason:
//!   the listener is open and not shutting down, not everything is PAUSEd,
//!   `max_client_conn` is not reached, and the server was reachable lately: transactions
//!   completed since the previous probe (with no failed connect since), or else a fresh
//!   check (at most one a second) connects to it: a TCP or Unix-socket connect, or, while
//!   the pool's connects fail, a login as `[server] user`. With several servers
//!   (`[servers.NAME]`) this is about `[server]` only: another server that is down makes
//!   its tenants wait or fail on every instance alike, so taking instances out of the load
//!   balancer would not help them and would hurt everyone else.
//!
//! Every other path answers the metrics, as the exporter's own listener did.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;

use crate::Shared;

/// How long a server check answers later probes.
const CHECK_FRESH: Duration = Duration::from_secs(1);

/// What readiness depends on beyond the pool and the clients.
#[derive(Debug, Default)]
pub struct State {
    /// The accept loop runs.
    accepting: AtomicBool,
    /// A graceful shutdown has started.
    draining: AtomicBool,
    last: Mutex<Check>,
}

#[derive(Debug)]
struct Check {
    at: Option<Instant>,
    result: Result<(), String>,
    /// Transactions and server connects completed, as of the last probe.
    progress: u64,
}

impl Default for Check {
    fn default() -> Check {
        Check {
            at: None,
            result: Ok(()),
            progress: 0,
        }
    }
}

impl State {
    pub fn set_accepting(&self, on: bool) {
        self.accepting.store(on, Ordering::Release);
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }
}

/// Binds the metrics listener (with `SO_REUSEPORT` when the client listener has it, so a
/// new instance on the same host can start beside a draining one).
pub fn bind(listen: &str, reuseport: bool) -> std::io::Result<TcpListener> {
    let addr: SocketAddr = listen
        .parse()
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "bad metrics.listen"))?;
    crate::listener::tcp_listener(addr, reuseport, 128).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {addr} (metrics.listen): {e}"),
        )
    })
}

/// Serves the listener until the runtime ends.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| respond(shared.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .append(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

async fn respond(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match readiness(&shared).await {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        // As metrics-exporter-prometheus's own listener answered.
        "/health" => text(StatusCode::OK, "OK"),
        _ => match shared.metrics.handle() {
            Some(handle) => {
                let body = tokio::task::spawn_blocking(move || handle.render())
                    .await
                    .unwrap_or_default();
                text(StatusCode::OK, body)
            }
            None => text(StatusCode::NOT_FOUND, "metrics are off\n"),
        },
    })
}

/// Should new clients come here? `Err` says why not.
pub async fn readiness(shared: &Shared) -> Result<(), String> {
    let h = &shared.health;
    if h.draining.load(Ordering::Acquire) {
        return Err("shutting down".into());
    }
    if !h.accepting.load(Ordering::Acquire) {
        return Err("not accepting clients yet".into());
    }
    let snap = shared.pools.default().snapshot();
    if !snap.paused.is_empty() && snap.paused.iter().all(|&p| p) {
        return Err("paused (PAUSE)".into());
    }
    let max = shared.config.proxy.max_client_conn;
    if shared.clients.load(Ordering::Relaxed) >= max {
        return Err(format!("max_client_conn ({max}) reached"));
    }
    server_reachable(shared).await
}

/// Was the server reachable lately? See the module docs.
async fn server_reachable(shared: &Shared) -> Result<(), String> {
    let pool = shared.pools.default();
    let down = pool.down_reason();
    let progress = shared
        .tenants
        .iter()
        .map(|t| t.stats.transactions.load(Ordering::Relaxed))
        .sum::<u64>()
        + pool.stats.connects_ok.load(Ordering::Relaxed);
    {
        let mut last = shared.health.last.lock().unwrap_or_else(|e| e.into_inner());
        let moved = progress != last.progress;
        last.progress = progress;
        if moved && down.is_none() {
            last.at = Some(Instant::now());
            last.result = Ok(());
            return Ok(());
        }
        if let Some(at) = last.at
            && at.elapsed() < CHECK_FRESH
        {
            return last.result.clone();
        }
    }
    let target = pool.target();
    let result = tokio::time::timeout(target.connect_timeout, async {
        if down.is_some() {
            // Connects have been failing: only a login tells that they would work now.
            let mut login = crate::server::connect(&target, crate::server::SHARED_LOGIN).await?;
            login.conn.terminate();
        } else {
            target.open().await?;
        }
        Ok::<(), String>(())
    })
    .await
    .unwrap_or_else(|_| Err("the server did not answer in time".into()))
    .map_err(|e| format!("server unreachable: {e}"));
    let mut last = shared.health.last.lock().unwrap_or_else(|e| e.into_inner());
    last.at = Some(Instant::now());
    last.result = result.clone();
    result
}
