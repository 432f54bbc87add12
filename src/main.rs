//! The `tenantpool` command: run the proxy, or check a config file.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tenantpool::Proxy;
use tenantpool::config::Config;

/// tokio's 128-byte-aligned objects (a task and a socket's readiness state per client) come
/// from slabs: see `tenantpool::slab`.
#[global_allocator]
static ALLOC: tenantpool::slab::SlabAlloc = tenantpool::slab::SlabAlloc::new();

#[derive(Parser)]
#[command(
    name = "tenantpool",
    version,
    about = "A tenant-aware PostgreSQL transaction pooler"
)]
struct Cli {
    /// The TOML config file.
    #[arg(long, env = "TENANTPOOL_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Worker threads (default: one per four CPUs; 1 runs everything on one thread).
    #[arg(long)]
    workers: Option<usize>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config file: print its problems, exit 0 when there are none.
    Check,
}

/// "1 tenant", "2 tenants".
fn count(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// Parses the command line; a bare file name (`tenantpool file.toml`) gets a hint.
fn parse_cli() -> Cli {
    match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::InvalidSubcommand | ErrorKind::UnknownArgument
            ) && let Some(arg) = std::env::args()
                .skip(1)
                .find(|a| !a.starts_with('-') && a != "check")
            {
                eprintln!(
                    "tenantpool: unexpected argument '{arg}'\n  \
                     to run the proxy with this config: tenantpool --config {arg}\n  \
                     to check it:                       tenantpool check --config {arg}"
                );
                std::process::exit(2);
            }
            e.exit()
        }
    }
}

fn main() -> ExitCode {
    let cli = parse_cli();
    let Some(path) = cli.config else {
        eprintln!("tenantpool: no config file: give --config FILE or set TENANTPOOL_CONFIG");
        return ExitCode::from(2);
    };
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: config has problems:", path.display());
            for p in &e.0 {
                eprintln!("  - {p}");
            }
            return ExitCode::from(1);
        }
    };
    if let Some(Command::Check) = cli.command {
        println!(
            "{}: ok ({}, {})",
            path.display(),
            count(config.tenants.len(), "tenant"),
            count(config.users.len(), "user")
        );
        for w in config.warnings() {
            println!("warning: {w}");
        }
        // The server roles, as far as the server can be reached: warnings, not problems.
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            for w in rt.block_on(tenantpool::audit::server_roles(&config)) {
                println!("warning: {w}");
            }
        }
        return ExitCode::SUCCESS;
    }

    init_logging(config.proxy.log_format);
    for w in config.warnings() {
        tracing::warn!("{w}");
    }

    let workers = cli.workers.unwrap_or_else(default_workers).max(1);
    // One worker runs everything on one thread, as PgBouncer does: no cross-thread wakeups.
    let mut rt = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    rt.enable_all();
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tenantpool: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(async move {
        let proxy = match Proxy::bind(config).await {
            Ok(p) => p,
            Err(e) => {
                eprintln!("tenantpool: cannot start: {e}");
                return ExitCode::from(1);
            }
        };
        proxy.set_config_path(&path);
        let handle = proxy.shutdown_handle();
        let shared = proxy.shared();
        tokio::spawn(async move {
            wait_for_stop_signal(shared).await;
            tracing::info!("stop signal received");
            handle.shutdown();
        });
        proxy.run().await;
        ExitCode::SUCCESS
    })
}

/// Logs on stderr: plain text (colours only when stderr is a terminal), or one JSON
/// object a line. `RUST_LOG` sets the filter (default `info`).
fn init_logging(format: tenantpool::config::LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        tenantpool::config::LogFormat::Json => builder
            .json()
            .with_current_span(false)
            .with_span_list(false)
            .init(),
        tenantpool::config::LogFormat::Text => {
            builder.with_ansi(std::io::stderr().is_terminal()).init()
        }
    }
}

/// One worker thread per four CPUs: on small hosts the proxy shares the CPUs with
/// PostgreSQL and its clients, and a single thread spends the least CPU per transaction.
fn default_workers() -> usize {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    cpus.div_ceil(4)
}

/// SIGTERM or SIGINT; SIGHUP reloads the config file (a bad one is refused and logged,
/// and the running config stays).
async fn wait_for_stop_signal(shared: std::sync::Arc<tenantpool::Shared>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the config");
                // Blocking work (the file, SCRAM keys): off the workers. The result is
                // logged by reload itself.
                let s = shared.clone();
                let _ = tokio::task::spawn_blocking(move || tenantpool::live::reload(&s)).await;
            }
        }
    }
}
