//! tenantpool: a PostgreSQL wire-protocol proxy that pools transactions and knows tenants.
//!
//! Data flows one way: a client socket is served by a [`client`] session, which takes a
//! connection from the shared [`pool`] for each transaction, forwards the transaction to
//! that [`server`] connection with the [`tenant`]'s search_path, and gives it back.
//! [`config`] holds every operator-facing key, [`error`] every client-facing error,
//! [`protocol`] the message framing.

pub mod admin;
pub mod audit;
pub mod client;
pub mod config;
pub mod directory;
pub mod error;
pub mod health;
pub mod listen;
pub mod listener;
pub mod live;
pub mod metrics;
pub mod peers;
pub mod placement;
pub mod pool;
pub mod prepared;
pub mod protocol;
pub mod registry;
pub mod server;
pub mod session_state;
pub mod settings;
pub mod slab;
pub mod sniff;
pub mod splice;
pub mod tenant;
pub mod tls;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use arc_swap::ArcSwap;
use tokio::sync::{Notify, mpsc, watch};

use crate::client::auth::UserDb;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::registry::ClientRegistry;
use crate::tenant::Tenants;

/// State every client task shares.
pub struct Shared {
    /// The config the proxy started with: keys that need a restart are read here. What is
    /// in force now (limits, caps, users, tenants) is [`Shared::live`]'s.
    pub config: Config,
    /// TLS towards clients, when `client_tls` is not `disable`; a reload reads the
    /// certificate files again.
    pub tls: arc_swap::ArcSwapOption<tls::Listener>,
    /// The config in force, reloads and the directory's last result.
    pub live: live::Live,
    pub tenants: Arc<Tenants>,
    /// The logins in force, swapped whole by a reload.
    pub users: ArcSwap<UserDb>,
    /// One pool per place (server and database) tenants live in.
    pub pools: placement::Pools,
    /// Live clients: cancel keys, and what the admin console lists.
    pub registry: ClientRegistry,
    pub metrics: Arc<Metrics>,
    /// Client session settings, shared by the clients that have the same ones.
    pub settings: settings::SettingsCache,
    /// No settings: what a fresh or reset server connection has.
    pub no_settings: Arc<settings::Settings>,
    /// Named prepared statements of all clients, interned per tenant.
    pub statements: Arc<prepared::StatementCache>,
    /// LISTEN/NOTIFY in transaction mode: the listener and who listens on what.
    pub notify: listen::Hub,
    /// Starts a graceful shutdown (signals, the admin console's SHUTDOWN).
    pub shutdown_tx: watch::Sender<bool>,
    /// Client connections admitted now (for `max_client_conn`).
    pub clients: AtomicU32,
    pub next_client_id: AtomicU64,
    /// Set when the proxy starts shutting down; `stop` then wakes every idle client.
    pub stopping: AtomicBool,
    pub stop: Notify,
    /// What `/readyz` reports beyond the pool (see [`health`]).
    pub health: health::State,
    /// Set when `shutdown_timeout` ran out; `abort` then wakes waiting checkouts and the
    /// registry (`wake_all`) every running transaction, whose client gets FATAL 57P01
    /// "shutdown timeout reached".
    pub aborting: AtomicBool,
    pub abort: Notify,
    /// SHOW STATS' averages over the last `stats_period`.
    pub stats_window: admin::StatsWindow,
    /// Server connection ids below this were open at the last RECONNECT (WAIT_CLOSE).
    pub reconnect_mark: AtomicU64,
}

impl Shared {
    /// Completes once `shutdown_timeout` has run out (never before shutdown).
    pub async fn shutdown_timed_out(&self) {
        loop {
            let mut n = std::pin::pin!(self.abort.notified());
            n.as_mut().enable();
            if self.aborting.load(Ordering::Acquire) {
                return;
            }
            n.await;
        }
    }
}

/// A bound, not yet running proxy.
pub struct Proxy {
    listener: listener::Listeners,
    shared: Arc<Shared>,
    shutdown_tx: watch::Sender<bool>,
    shutdown_rx: watch::Receiver<bool>,
}

/// Tells a running proxy to shut down gracefully.
#[derive(Clone)]
pub struct ShutdownHandle(watch::Sender<bool>);

impl ShutdownHandle {
    pub fn shutdown(&self) {
        let _ = self.0.send(true);
    }
}

impl Proxy {
    /// Builds the shared state and binds the listening sockets.
    pub async fn bind(config: Config) -> io::Result<Proxy> {
        let listener = listener::Listeners::bind(&config)?;

        let tenants = Arc::new(Tenants::from_config(&config));
        let invalid = |e: String| io::Error::new(io::ErrorKind::InvalidInput, e);
        let (logins, of_tenant) = placement::merge_logins(&[], &config);
        let default = placement::Place {
            server: config::DEFAULT_SERVER.into(),
            database: config.server.database.clone(),
        };
        let target = placement::target_of(&config, &default, &logins).map_err(invalid)?;
        let tls = tls::Listener::from_config(&config)
            .map_err(invalid)?
            .map(Arc::new);
        let s = &config.server;
        let settings = pool::PoolSettings {
            max_connections: s.max_connections,
            min_idle: s.min_idle,
            idle_timeout: s.idle_timeout.0,
            lifetime: s.lifetime.0,
        };
        let pools = placement::Pools::new(
            default,
            Pool::new(placement::DEFAULT_PLACE, target, settings, tenants.clone()),
        );
        // Every tenant in its place (the pools of the other places made here).
        let mut defs = Tenants::defs_from_config(&config);
        for (d, login) in defs.iter_mut().zip(of_tenant) {
            d.login = login;
        }
        let problems = placement::apply(&pools, &tenants, &config, &logins, &mut defs);
        if !problems.is_empty() {
            return Err(invalid(problems.join("; ")));
        }
        tenants.apply(defs, &config.tenant_defaults.search_path, |_| {});
        for (_, _, p) in pools.iter() {
            p.grow(tenants.ids());
        }
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let users = UserDb::from_config(&config);
        let (metrics, http) = match &config.metrics {
            Some(m) => (
                Metrics::start(&tenants, config.proxy.pool_mode.as_str())
                    .map_err(io::Error::other)?,
                Some(health::bind(&m.listen, config.proxy.so_reuseport)?),
            ),
            None => (Metrics::disabled(&tenants), None),
        };
        let metrics = Arc::new(metrics);
        // Every place's server series exist from start-up too (the upkeep registers those of
        // places a reload adds).
        metrics.refresh(&tenants, &pools);
        let settings = settings::SettingsCache::default();
        metrics.live.last_reload.set(metrics::unix_now());
        let peer_id = config.proxy.peer_id;
        let shared = Arc::new(Shared {
            live: live::Live::new(config.clone()),
            config,
            tls: arc_swap::ArcSwapOption::new(tls),
            tenants,
            users: ArcSwap::from_pointee(users),
            pools,
            registry: ClientRegistry::with_peer_id(peer_id),
            no_settings: settings.intern(Vec::new()),
            statements: Default::default(),
            notify: Default::default(),
            settings,
            metrics,
            shutdown_tx: shutdown_tx.clone(),
            clients: AtomicU32::new(0),
            next_client_id: AtomicU64::new(1),
            stopping: AtomicBool::new(false),
            stop: Notify::new(),
            health: Default::default(),
            stats_window: Default::default(),
            aborting: AtomicBool::new(false),
            abort: Notify::new(),
            reconnect_mark: AtomicU64::new(0),
        });
        if let Some(http) = http {
            tokio::spawn(health::serve(http, shared.clone()));
        }
        Ok(Proxy {
            listener,
            shared,
            shutdown_tx,
            shutdown_rx,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// The file a reload (SIGHUP, RELOAD) reads.
    pub fn set_config_path(&self, path: impl Into<std::path::PathBuf>) {
        self.shared.live.set_path(path);
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shutdown_tx.clone())
    }

    /// Accepts clients until shutdown, then lets running transactions finish (up to
    /// `shutdown_timeout`) and closes the pool.
    pub async fn run(self) {
        let Proxy {
            listener,
            shared,
            shutdown_tx,
            shutdown_rx: mut shutdown,
        } = self;
        shared.pools.start_upkeep();
        let audited = shared.clone();
        tokio::spawn(async move {
            for w in audit::pool_roles(&audited).await {
                tracing::warn!("{w}");
            }
        });
        tokio::spawn(admin::run_stats(shared.clone()));
        tokio::spawn(shared.metrics.clone().run_refresh(Arc::downgrade(&shared)));
        // The directory's tenants, if any: the first attempt may take up to connect_timeout
        // (a server that is down is the TOML tenants only, and the directory later).
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(directory::run(shared.clone(), first_tx));
        let _ = tokio::time::timeout(
            shared.config.server.connect_timeout.0 + std::time::Duration::from_secs(1),
            first_rx,
        )
        .await;
        // Every client task holds a clone; when all are gone, `recv` yields None.
        let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
        {
            // One line naming every listener and the file, for whoever reads the log.
            let listen = listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            let metrics = shared
                .config
                .metrics
                .as_ref()
                .map(|m| format!("http://{}/metrics", m.listen))
                .unwrap_or_else(|| "off".into());
            let file = shared
                .live
                .path()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "(none)".into());
            let unix = listener
                .unix_path()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "off".into());
            tracing::info!(
                listen = %listen,
                unix_socket = %unix,
                metrics = %metrics,
                config = %file,
                tenants = shared.tenants.len(),
                pool_mode = %shared.config.proxy.pool_mode,
                version = env!("CARGO_PKG_VERSION"),
                "tenantpool {} listening on {listen} (proxy), unix socket {unix}, metrics {metrics}; config {file}",
                env!("CARGO_PKG_VERSION")
            );
        }
        shared.health.set_accepting(true);
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((stream, peer)) => {
                        let fut = client::serve(stream, peer, shared.clone(), alive_tx.clone());
                        tracing::trace!(bytes = std::mem::size_of_val(&fut), "client task size");
                        tokio::spawn(fut);
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::error!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
                _ = shutdown.changed() => break,
            }
        }
        shared.health.set_draining();
        // Connections already queued by the kernel would be reset when the listener closes.
        for (stream, peer) in listener.drain() {
            tokio::spawn(client::serve(
                stream,
                peer,
                shared.clone(),
                alive_tx.clone(),
            ));
        }
        listener.close();
        shared.health.set_accepting(false);
        let timeout = shared.live.config().proxy.shutdown_timeout.0;
        let mode = shared.live.config().proxy.shutdown_mode;
        let tell_idle_clients = || {
            shared.stopping.store(true, Ordering::Release);
            shared.stop.notify_waiters();
            shared.registry.wake_all();
        };
        match mode {
            config::ShutdownMode::WaitForServers => {
                tracing::info!("shutting down: waiting for running transactions");
                tell_idle_clients();
            }
            config::ShutdownMode::WaitForClients => {
                tracing::info!("shutting down: waiting for clients to disconnect");
            }
        }
        drop(alive_tx);
        if tokio::time::timeout(timeout, alive_rx.recv())
            .await
            .is_err()
        {
            tracing::warn!(
                clients = shared.registry.all().len(),
                "shutdown_timeout reached with clients still running: they get FATAL 57P01 and are dropped"
            );
            // Running transactions end with FATAL 57P01 "shutdown timeout reached"; queued
            // ones get their error from the closed pool. A moment for those messages to go
            // out, then the process ends regardless.
            if mode == config::ShutdownMode::WaitForClients {
                // Idle clients are told (57P01) rather than cut off.
                tell_idle_clients();
            }
            shared.aborting.store(true, Ordering::Release);
            shared.abort.notify_waiters();
            shared.registry.wake_all();
            shared.pools.close();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), alive_rx.recv()).await;
        }
        shared.pools.close();
        drop(shutdown_tx);
        tracing::info!("tenantpool stopped");
    }
}
