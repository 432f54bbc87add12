//! Opens N client connections and keeps them idle, for measuring a pooler's memory per idle
//! client: `cargo run --release --example idle_clients -- "host=... dbname=t1" 2000 30`.
//! Prints "ready N" once all are connected and logged in (one query each), then holds them.

use std::time::Duration;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let conn = args.next().expect("connection string");
    let n: usize = args.next().map(|s| s.parse().unwrap()).unwrap_or(1000);
    let hold: u64 = args.next().map(|s| s.parse().unwrap()).unwrap_or(30);
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(connection);
        client.simple_query("SELECT 1").await.expect("query");
        clients.push(client);
    }
    println!("ready {n}");
    tokio::time::sleep(Duration::from_secs(hold)).await;
}
