//! Fairness probe: a noisy tenant with many clients looping short sleeps, and a quiet tenant
//! with one client issuing `SELECT 1` every 100 ms. Prints the quiet client's latency
//! percentiles and the noisy tenant's throughput.
//!
//! `cargo run --release --example fairness -- "<noisy conn>" "<quiet conn>" [seconds] [noisy clients]`

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

async fn connect(s: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(s, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    c
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let noisy = args.next().expect("noisy connection string");
    let quiet = args.next().expect("quiet connection string");
    let secs: u64 = args.next().map(|s| s.parse().unwrap()).unwrap_or(10);
    let n: usize = args.next().map(|s| s.parse().unwrap()).unwrap_or(32);

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let c = connect(&noisy).await;
        let (stop, done) = (stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if c.simple_query("SELECT pg_sleep(0.05)").await.is_ok() {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let q = connect(&quiet).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start_done = done.load(Ordering::Relaxed);
    let started = Instant::now();
    let mut waits = Vec::new();
    let mut errors = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        let t = Instant::now();
        if q.simple_query("SELECT 1").await.is_err() {
            errors += 1;
        }
        waits.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let noisy_tps =
        (done.load(Ordering::Relaxed) - start_done) as f64 / started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    waits.sort();
    let pct = |p: f64| {
        let i = ((waits.len() as f64 - 1.0) * p).round() as usize;
        waits[i].as_secs_f64() * 1000.0
    };
    println!(
        "quiet wait ms: p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}  ({} samples, {} errors) | noisy tx/s {:.0}",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        waits.last().unwrap().as_secs_f64() * 1000.0,
        waits.len(),
        errors,
        noisy_tps
    );
}
