//! Prometheus metrics: every series of the contract, registered at start-up for every
//! configured tenant, with handles cached so that recording is an atomic add.
//!
//! Counters are copied from the tenants' and pool's own atomic totals by an upkeep task
//! (every 500 ms), and so are the gauges; the hot path only bumps those atomics once per
//! transaction. Histograms are recorded directly, once per transaction, query or checkout.
//! With no `[metrics]` section every handle is a no-op.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use arc_swap::ArcSwap;
use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::placement::{PlaceId, Pools};
use crate::tenant::{Tenant, TenantId, Tenants};

/// Histogram buckets, in seconds: from 100 us to a minute.
pub const BUCKETS: [f64; 18] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// Reasons a client connection is refused, the `reason` label.
pub const REJECT_REASONS: [&str; 4] = [
    "max_client_conn",
    "max_client_connections",
    "not_allowed",
    "auth_failed",
];

/// Name, kind (counter, gauge, histogram) and help text of every series.
const HELP: [(&str, char, &str); 29] = [
    (
        "tenantpool_build_info",
        'g',
        "Always 1; the labels say which tenantpool runs (version, pool_mode).",
    ),
    (
        "tenantpool_server_max_connections",
        'g',
        "max_connections in force of each server and database (place): server connections for all its tenants together.",
    ),
    (
        "tenantpool_tenant_placement",
        'g',
        "1 for the server and database a tenant lives in now, 0 for places it lived in before.",
    ),
    (
        "tenantpool_paused_tenants",
        'g',
        "Tenants paused now (PAUSE, KILL; all of them after PAUSE without a tenant).",
    ),
    (
        "tenantpool_tenant_paused",
        'g',
        "1 while the tenant is paused (PAUSE, KILL), else 0.",
    ),
    (
        "process_cpu_seconds_total",
        'c',
        "User and system CPU time of the process, in whole seconds.",
    ),
    (
        "process_resident_memory_bytes",
        'g',
        "Resident memory of the process.",
    ),
    ("process_open_fds", 'g', "Open file descriptors."),
    (
        "process_max_fds",
        'g',
        "The limit on open file descriptors.",
    ),
    (
        "process_start_time_seconds",
        'g',
        "Unix time the process started.",
    ),
    (
        "tenantpool_config_reloads_total",
        'c',
        "Config reloads (SIGHUP, RELOAD), by result (ok, error).",
    ),
    (
        "tenantpool_config_last_reload_timestamp_seconds",
        'g',
        "Unix time the config in force was loaded (start-up or the last good reload).",
    ),
    (
        "tenantpool_directory_refreshes_total",
        'c',
        "Runs of the [directory] query, by result (ok, error).",
    ),
    (
        "tenantpool_directory_tenants",
        'g',
        "Tenants the [directory] brings now (the last good result).",
    ),
    (
        "tenantpool_directory_last_refresh_timestamp_seconds",
        'g',
        "Unix time of the last good run of the [directory] query.",
    ),
    (
        "tenantpool_client_connections",
        'g',
        "Client connections by tenant and state (active, waiting, idle).",
    ),
    (
        "tenantpool_server_connections",
        'g',
        "Server connections by server, database and state (active, idle, connecting).",
    ),
    (
        "tenantpool_tenant_server_connections",
        'g',
        "Server connections a tenant uses now.",
    ),
    (
        "tenantpool_tenant_max_server_connections",
        'g',
        "A tenant's max_server_connections cap.",
    ),
    (
        "tenantpool_transactions_total",
        'c',
        "Transactions completed.",
    ),
    (
        "tenantpool_queries_total",
        'c',
        "Queries completed (one per Query or Sync answered).",
    ),
    (
        "tenantpool_transaction_duration_seconds",
        'h',
        "Transaction duration, first byte to the ReadyForQuery that ends it.",
    ),
    (
        "tenantpool_query_duration_seconds",
        'h',
        "Query duration, sent to ReadyForQuery.",
    ),
    (
        "tenantpool_wait_duration_seconds",
        'h',
        "Time a transaction queued for a server connection.",
    ),
    (
        "tenantpool_wait_timeouts_total",
        'c',
        "Transactions that hit query_wait_timeout.",
    ),
    (
        "tenantpool_rejected_connections_total",
        'c',
        "Client connections refused, by reason.",
    ),
    (
        "tenantpool_server_connects_total",
        'c',
        "Server connection attempts, by server, database and result.",
    ),
    (
        "tenantpool_search_path_switches_total",
        'c',
        "Server connections moved from one tenant to another.",
    ),
    (
        "tenantpool_bytes_total",
        'c',
        "Bytes from clients (in) and to clients (out).",
    ),
];

/// The process's own numbers, from /proc/self (Linux; elsewhere they stay 0).
struct ProcessMetrics {
    cpu: Counter,
    rss: Gauge,
    fds: Gauge,
    max_fds: Gauge,
}

impl ProcessMetrics {
    fn new(r: Option<&PrometheusRecorder>) -> ProcessMetrics {
        let gauge = |name| match r {
            Some(r) => r.register_gauge(&key(name, &[]), &META),
            None => Gauge::noop(),
        };
        let p = ProcessMetrics {
            cpu: match r {
                Some(r) => r.register_counter(&key("process_cpu_seconds_total", &[]), &META),
                None => Counter::noop(),
            },
            rss: gauge("process_resident_memory_bytes"),
            fds: gauge("process_open_fds"),
            max_fds: gauge("process_max_fds"),
        };
        gauge("process_start_time_seconds").set(start_time().unwrap_or(0.0));
        p
    }

    fn refresh(&self) {
        let (rss, fds) = crate::admin::process_usage();
        self.rss.set(rss as f64);
        self.fds.set(fds as f64);
        if let Some(ticks) = stat_fields()
            .and_then(|f| Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?))
        {
            self.cpu.absolute(ticks / CLOCK_TICKS);
        }
        if let Some(n) = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|l| {
                l.lines()
                    .find(|l| l.starts_with("Max open files"))?
                    .split_whitespace()
                    .nth(3)?
                    .parse::<f64>()
                    .ok()
            })
        {
            self.max_fds.set(n);
        }
    }
}

/// USER_HZ: the unit of /proc times (100 on Linux's common configurations).
const CLOCK_TICKS: u64 = 100;

/// The fields of /proc/self/stat after the command name (field 3 on).
fn stat_fields() -> Option<Vec<String>> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// When the process started, Unix seconds: boot time plus its start in ticks.
fn start_time() -> Option<f64> {
    let ticks: f64 = stat_fields()?.get(19)?.parse().ok()?;
    let btime: f64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(btime + ticks / CLOCK_TICKS as f64)
}

/// One place's (server and database) handles.
struct PlaceMetrics {
    active: Gauge,
    idle: Gauge,
    connecting: Gauge,
    connects_ok: Counter,
    connects_error: Counter,
    max_connections: Gauge,
}

impl PlaceMetrics {
    fn new(r: &PrometheusRecorder, server: &str, database: &str) -> PlaceMetrics {
        let l =
            |k: &'static str, v: &'static str| [("server", server), ("database", database), (k, v)];
        let gauge = |labels: &[(&'static str, &str)]| {
            r.register_gauge(&key("tenantpool_server_connections", labels), &META)
        };
        let counter = |labels: &[(&'static str, &str)]| {
            r.register_counter(&key("tenantpool_server_connects_total", labels), &META)
        };
        PlaceMetrics {
            active: gauge(&l("state", "active")),
            idle: gauge(&l("state", "idle")),
            connecting: gauge(&l("state", "connecting")),
            connects_ok: counter(&l("result", "ok")),
            connects_error: counter(&l("result", "error")),
            max_connections: r.register_gauge(
                &key(
                    "tenantpool_server_max_connections",
                    &[("server", server), ("database", database)],
                ),
                &META,
            ),
        }
    }
}

/// One tenant's handles.
pub struct TenantMetrics {
    pub clients_active: Gauge,
    pub clients_waiting: Gauge,
    pub clients_idle: Gauge,
    pub server_in_use: Gauge,
    pub max_server: Gauge,
    pub transactions: Counter,
    pub queries: Counter,
    pub transaction_duration: Histogram,
    pub query_duration: Histogram,
    pub wait_duration: Histogram,
    pub wait_timeouts: Counter,
    pub rejected: [Counter; 4],
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub paused: Gauge,
}

/// The handles of every tenant since start, by tenant id (`metrics.tenants[id]`). Grows when
/// tenants appear; a tenant's handles are never freed (ids are never reused).
pub struct TenantMetricsList(ArcSwap<Vec<&'static TenantMetrics>>);

impl std::ops::Index<usize> for TenantMetricsList {
    type Output = TenantMetrics;
    #[inline]
    fn index(&self, id: usize) -> &TenantMetrics {
        self.0.load()[id]
    }
}

impl TenantMetricsList {
    pub fn len(&self) -> usize {
        self.0.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Counters and gauges of reloads and the directory, recorded where they happen.
pub struct LiveMetrics {
    pub reloads_ok: Counter,
    pub reloads_error: Counter,
    pub last_reload: Gauge,
    pub directory_ok: Counter,
    pub directory_error: Counter,
    pub directory_tenants: Gauge,
    pub directory_last: Gauge,
}

/// All handles.
pub struct Metrics {
    pub tenants: TenantMetricsList,
    pub live: LiveMetrics,
    /// Serializes growing `tenants`.
    grow: std::sync::Mutex<()>,
    /// Each place's series, by place id, registered when the upkeep first sees the place.
    places: std::sync::Mutex<Vec<PlaceMetrics>>,
    /// Each tenant's `tenantpool_tenant_placement` series, by (tenant, place).
    placement: std::sync::Mutex<std::collections::HashMap<(TenantId, PlaceId), Gauge>>,
    switches: Counter,
    paused_tenants: Gauge,
    process: ProcessMetrics,
    /// Keeps the recorder (and so the series) alive.
    recorder: Option<Arc<PrometheusRecorder>>,
}

const META: Metadata<'static> = Metadata::new("tenantpool", Level::INFO, None);

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    let labels: Vec<Label> = labels
        .iter()
        .map(|(k, v)| Label::new(*k, v.to_string()))
        .collect();
    Key::from_parts(name, labels)
}

/// One tenant's handles, registered with `r` (no-ops without a recorder).
fn tenant_metrics(r: Option<&PrometheusRecorder>, t: &Tenant) -> TenantMetrics {
    let n = t.name.as_str();
    let counter = |name, labels: &[(&'static str, &str)]| match r {
        Some(r) => r.register_counter(&key(name, labels), &META),
        None => Counter::noop(),
    };
    let gauge = |name, labels: &[(&'static str, &str)]| match r {
        Some(r) => r.register_gauge(&key(name, labels), &META),
        None => Gauge::noop(),
    };
    let histogram = |name, labels: &[(&'static str, &str)]| match r {
        Some(r) => r.register_histogram(&key(name, labels), &META),
        None => Histogram::noop(),
    };
    let clients = |state| {
        gauge(
            "tenantpool_client_connections",
            &[("tenant", n), ("state", state)],
        )
    };
    let m = TenantMetrics {
        clients_active: clients("active"),
        clients_waiting: clients("waiting"),
        clients_idle: clients("idle"),
        server_in_use: gauge("tenantpool_tenant_server_connections", &[("tenant", n)]),
        max_server: gauge("tenantpool_tenant_max_server_connections", &[("tenant", n)]),
        transactions: counter("tenantpool_transactions_total", &[("tenant", n)]),
        queries: counter("tenantpool_queries_total", &[("tenant", n)]),
        transaction_duration: histogram(
            "tenantpool_transaction_duration_seconds",
            &[("tenant", n)],
        ),
        query_duration: histogram("tenantpool_query_duration_seconds", &[("tenant", n)]),
        wait_duration: histogram("tenantpool_wait_duration_seconds", &[("tenant", n)]),
        wait_timeouts: counter("tenantpool_wait_timeouts_total", &[("tenant", n)]),
        rejected: REJECT_REASONS.map(|reason| {
            counter(
                "tenantpool_rejected_connections_total",
                &[("tenant", n), ("reason", reason)],
            )
        }),
        bytes_in: counter(
            "tenantpool_bytes_total",
            &[("tenant", n), ("direction", "in")],
        ),
        bytes_out: counter(
            "tenantpool_bytes_total",
            &[("tenant", n), ("direction", "out")],
        ),
        paused: gauge("tenantpool_tenant_paused", &[("tenant", n)]),
    };
    m.max_server.set(t.max_server() as f64);
    m
}

fn live_metrics(r: Option<&PrometheusRecorder>) -> LiveMetrics {
    let counter = |name, labels: &[(&'static str, &str)]| match r {
        Some(r) => r.register_counter(&key(name, labels), &META),
        None => Counter::noop(),
    };
    let gauge = |name| match r {
        Some(r) => r.register_gauge(&key(name, &[]), &META),
        None => Gauge::noop(),
    };
    LiveMetrics {
        reloads_ok: counter("tenantpool_config_reloads_total", &[("result", "ok")]),
        reloads_error: counter("tenantpool_config_reloads_total", &[("result", "error")]),
        last_reload: gauge("tenantpool_config_last_reload_timestamp_seconds"),
        directory_ok: counter("tenantpool_directory_refreshes_total", &[("result", "ok")]),
        directory_error: counter(
            "tenantpool_directory_refreshes_total",
            &[("result", "error")],
        ),
        directory_tenants: gauge("tenantpool_directory_tenants"),
        directory_last: gauge("tenantpool_directory_last_refresh_timestamp_seconds"),
    }
}

/// Now, as Unix seconds.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Metrics {
    /// No exporter: every handle does nothing.
    pub fn disabled(tenants: &Tenants) -> Metrics {
        let list = tenants
            .iter_all()
            .map(|t| &*Box::leak(Box::new(tenant_metrics(None, t))))
            .collect();
        Metrics {
            tenants: TenantMetricsList(ArcSwap::from_pointee(list)),
            live: live_metrics(None),
            grow: Default::default(),
            places: Default::default(),
            placement: Default::default(),
            switches: Counter::noop(),
            paused_tenants: Gauge::noop(),
            process: ProcessMetrics::new(None),
            recorder: None,
        }
    }

    /// Builds the recorder (rendered by [`crate::health`]'s HTTP server at GET /metrics)
    /// and registers every series. Must run inside the tokio runtime.
    pub fn start(tenants: &Tenants, pool_mode: &str) -> Result<Metrics, String> {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&BUCKETS)
            .map_err(|e| e.to_string())?
            .build_recorder();
        // What the exporter's own listener did: drain histogram samples every 5 s.
        let upkeep = recorder.handle();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                upkeep.run_upkeep();
            }
        });
        let r = &recorder;
        for (name, kind, help) in HELP {
            let name = metrics::KeyName::from_const_str(name);
            let help = metrics::SharedString::const_str(help);
            match kind {
                'c' => r.describe_counter(name, None, help),
                'g' => r.describe_gauge(name, None, help),
                _ => r.describe_histogram(name, Some(metrics::Unit::Seconds), help),
            }
        }
        let counter =
            |name, labels: &[(&'static str, &str)]| r.register_counter(&key(name, labels), &META);
        let gauge =
            |name, labels: &[(&'static str, &str)]| r.register_gauge(&key(name, labels), &META);
        let per_tenant = tenants
            .iter_all()
            .map(|t| &*Box::leak(Box::new(tenant_metrics(Some(r), t))))
            .collect();
        let metrics = Metrics {
            tenants: TenantMetricsList(ArcSwap::from_pointee(per_tenant)),
            live: live_metrics(Some(r)),
            grow: Default::default(),
            places: Default::default(),
            placement: Default::default(),
            switches: counter("tenantpool_search_path_switches_total", &[]),
            paused_tenants: gauge("tenantpool_paused_tenants", &[]),
            process: ProcessMetrics::new(Some(r)),
            recorder: None,
        };
        gauge(
            "tenantpool_build_info",
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("pool_mode", pool_mode),
            ],
        )
        .set(1.0);
        Ok(Metrics {
            recorder: Some(Arc::new(recorder)),
            ..metrics
        })
    }

    /// Registers the series of tenants that just got their ids (in id order), so that
    /// they exist, counters at 0, from the moment the tenant does.
    pub fn add_tenants(&self, new: &[&'static Tenant]) {
        if new.is_empty() {
            return;
        }
        let _grow = self.grow.lock().unwrap_or_else(|e| e.into_inner());
        let mut list = self.tenants.0.load().as_ref().clone();
        for t in new {
            debug_assert_eq!(t.id as usize, list.len(), "tenants are added in id order");
            list.push(Box::leak(Box::new(tenant_metrics(
                self.recorder.as_deref(),
                t,
            ))));
        }
        self.tenants.0.store(Arc::new(list));
    }

    pub fn enabled(&self) -> bool {
        self.recorder.is_some()
    }

    /// Renders the Prometheus text (None with metrics off).
    pub fn handle(&self) -> Option<PrometheusHandle> {
        self.recorder.as_ref().map(|r| r.handle())
    }

    /// Copies the atomic totals and current counts into the series.
    pub fn refresh(&self, tenants: &Tenants, pools: &Pools) {
        let Some(r) = self.recorder.as_deref() else {
            return;
        };
        // Each pool's snapshot once: its place's series, then all of them merged.
        let snaps: Vec<_> = pools.iter().map(|(id, _, p)| (id, p.snapshot())).collect();
        self.process.refresh();
        let mut places = self.places.lock().unwrap_or_else(|e| e.into_inner());
        let mut switches = 0;
        for ((id, place, pool), (_, snap)) in pools.iter().zip(&snaps) {
            if places.len() <= id as usize {
                places.push(PlaceMetrics::new(r, &place.server, &place.database));
            }
            let m = &places[id as usize];
            m.max_connections
                .set(pool.settings().max_connections as f64);
            m.idle.set(snap.idle as f64);
            m.connecting.set(snap.connecting as f64);
            m.active
                .set(snap.open.saturating_sub(snap.idle + snap.connecting) as f64);
            let st = &pool.stats;
            m.connects_ok
                .absolute(st.connects_ok.load(Ordering::Relaxed));
            m.connects_error
                .absolute(st.connects_failed.load(Ordering::Relaxed));
            switches += st.search_path_switches.load(Ordering::Relaxed);
        }
        drop(places);
        self.switches.absolute(switches);
        let (snap, _) = Pools::merge(snaps);
        let paused = &snap.paused;
        self.paused_tenants.set(
            tenants
                .iter()
                .filter(|t| paused.get(t.id as usize).copied().unwrap_or(false))
                .count() as f64,
        );
        let mut placement = self.placement.lock().unwrap_or_else(|e| e.into_inner());
        for t in tenants.iter_all() {
            if t.id as usize >= self.tenants.len() {
                break;
            }
            let m = &self.tenants[t.id as usize];
            // A removed tenant's series stay (its counters as they were); its cap reads 0.
            m.max_server.set(if t.is_gone() {
                0.0
            } else {
                t.max_server() as f64
            });
            let now = t.place();
            if !placement.contains_key(&(t.id, now))
                && let Some(place) = pools.place(now)
            {
                let g = r.register_gauge(
                    &key(
                        "tenantpool_tenant_placement",
                        &[
                            ("tenant", &t.name),
                            ("server", &place.server),
                            ("database", &place.database),
                        ],
                    ),
                    &META,
                );
                placement.insert((t.id, now), g);
            }
            let s = &t.stats;
            let active = s.active.load(Ordering::Relaxed);
            let waiting = s.waiting.load(Ordering::Relaxed);
            let clients = t.clients.load(Ordering::Relaxed);
            m.clients_active.set(active as f64);
            m.clients_waiting.set(waiting as f64);
            m.clients_idle
                .set(clients.saturating_sub(active + waiting) as f64);
            m.server_in_use
                .set(snap.in_use.get(t.id as usize).copied().unwrap_or(0) as f64);
            m.paused
                .set(if paused.get(t.id as usize).copied().unwrap_or(false) {
                    1.0
                } else {
                    0.0
                });
            m.wait_timeouts
                .absolute(s.wait_timeouts.load(Ordering::Relaxed));
            m.bytes_in.absolute(s.bytes_in.load(Ordering::Relaxed));
            m.bytes_out.absolute(s.bytes_out.load(Ordering::Relaxed));
        }
        for (&(tenant, place), g) in placement.iter() {
            let t = tenants.get(tenant);
            g.set(if place == t.place() && !t.is_gone() {
                1.0
            } else {
                0.0
            });
        }
    }

    /// Refreshes the series every 500 ms.
    pub async fn run_refresh(self: Arc<Self>, shared: std::sync::Weak<crate::Shared>) {
        if !self.enabled() {
            return;
        }
        loop {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            self.refresh(&shared.tenants, &shared.pools);
            drop(shared);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}
