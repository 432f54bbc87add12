//! The Grafana dashboard in config/ is valid JSON and every PromQL expression in it names
//! only metrics that tenantpool exports (Docker does not run here, so this is the check).

mod common;

use common::{CONTRACT_METRICS, LIVE_METRICS, OPS_METRICS};

fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                if k == "expr" {
                    out.push(v.as_str().expect("expr is a string").to_string());
                } else {
                    exprs(v, out);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// Identifiers that look like tenantpool (or process) metric names.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(i) = [rest.find("tenantpool_"), rest.find("process_")]
        .into_iter()
        .flatten()
        .min()
    {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn dashboard_queries_name_exported_metrics() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/grafana/tenantpool-dashboard.json"
    );
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("valid JSON");
    let mut all = Vec::new();
    exprs(&dash["panels"], &mut all);
    assert!(all.len() >= 12, "{} expressions", all.len());
    let mut used = std::collections::BTreeSet::new();
    for e in &all {
        let names = metric_names(e);
        assert!(
            !names.is_empty() || e.starts_with("vector("),
            "expression names no tenantpool metric: {e}"
        );
        for n in names {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .filter(|b| b.ends_with("_seconds"))
                .unwrap_or(&n)
                .to_string();
            assert!(
                CONTRACT_METRICS.contains(&base.as_str())
                    || LIVE_METRICS.contains(&base.as_str())
                    || OPS_METRICS.contains(&base.as_str()),
                "unknown metric {n} in {e}"
            );
            if n.ends_with("_bucket") {
                assert!(
                    e.contains("histogram_quantile"),
                    "bucket outside histogram_quantile: {e}"
                );
            }
            used.insert(base);
        }
    }
    // The dashboard shows what ops watch: caps, waits, latencies, rates, states, errors.
    for m in [
        "tenantpool_tenant_server_connections",
        "tenantpool_tenant_max_server_connections",
        "tenantpool_client_connections",
        "tenantpool_wait_duration_seconds",
        "tenantpool_transaction_duration_seconds",
        "tenantpool_query_duration_seconds",
        "tenantpool_transactions_total",
        "tenantpool_server_connections",
        "tenantpool_wait_timeouts_total",
        "tenantpool_rejected_connections_total",
    ] {
        assert!(used.contains(m), "the dashboard does not show {m}");
    }
    // Several proxies are told apart: an instance variable that every query honours, and
    // max_connections read from each proxy rather than a dashboard constant.
    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(vars.contains(&"instance"), "{vars:?}");
    assert!(!vars.contains(&"max_connections"), "{vars:?}");
    for e in &all {
        assert!(
            e.contains("instance=~\"$instance\""),
            "not scoped to $instance: {e}"
        );
        assert!(!e.contains("vector("), "a constant in {e}");
    }
    assert!(used.contains("tenantpool_server_max_connections"));
    // The per-tenant row: top-N by wait time and by transactions.
    assert!(
        all.iter()
            .any(|e| e.starts_with("topk(") && e.contains("tenantpool_wait_duration_seconds"))
    );
    assert!(
        all.iter()
            .any(|e| e.starts_with("topk(") && e.contains("tenantpool_transactions_total"))
    );
    // Provisioning points at the file the compose file mounts.
    let compose = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/docker-compose.monitoring.yml"
    ))
    .unwrap();
    assert!(compose.contains("grafana/tenantpool-dashboard.json"));
    assert!(compose.contains("prometheus.yml"));
}
