//! Packaging: the Kubernetes manifests (deploy/kubernetes/) load as Kubernetes objects that
//! fit together and fit the config and the image; the Dockerfile refers to files that exist,
//! ships the container config with what its `docker run` line sets, and checks health; the
//! entrypoint reads secrets from files; the systemd unit has what docs/deploy.md says.
//!
//! Where the tools are installed, the schema checks run too: `kubernetes-validate --strict`
//! (scripts/test.sh installs it; required when CI is set), `hadolint` and
//! `systemd-analyze verify`. Docker itself is not on this machine: the image is not built
//! here, the release build with the Dockerfile's profile is (see docs/deploy.md).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_yaml::Value;
use tenantpool::config::Config;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// `v.a.b.c`, or `Value::Null`.
fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    static NULL: Value = Value::Null;
    path.split('.').fold(v, |v, k| match k.parse::<usize>() {
        Ok(i) if v.is_sequence() => v.get(i).unwrap_or(&NULL),
        _ => v.get(k).unwrap_or(&NULL),
    })
}

fn s<'a>(v: &'a Value, path: &str) -> &'a str {
    at(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path}: not a string in {v:?}"))
}

fn seq<'a>(v: &'a Value, path: &str) -> &'a [Value] {
    at(v, path)
        .as_sequence()
        .map(|s| s.as_slice())
        .unwrap_or_else(|| panic!("{path}: not a list"))
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.as_str().unwrap().to_string(),
                        v.as_str().unwrap().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `selector` picks pods labelled `pod` (every selector label is on the pod).
fn selects(selector: &Value, pod: &Value) -> bool {
    let (sel, pod) = (labels(selector), labels(pod));
    !sel.is_empty() && sel.iter().all(|(k, v)| pod.get(k) == Some(v))
}

/// The names of the environment variables a config text takes secrets from (`*_env`).
fn env_names(toml_text: &str) -> BTreeSet<String> {
    toml_text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.split_once('=')?;
            k.trim().ends_with("_env").then(|| {
                v.split('#')
                    .next()
                    .unwrap()
                    .trim()
                    .trim_matches('"')
                    .to_string()
            })
        })
        .collect()
}

/// Parses a config text as tenantpool does, with every `*_env` secret given inline (so the
/// test needs no environment).
fn parse_config(text: &str) -> Config {
    let inline: String = text
        .lines()
        .map(|l| match l.split_once("_env = ") {
            Some((k, _)) if !l.trim_start().starts_with('#') => format!("{k} = \"secret\"\n"),
            _ => format!("{l}\n"),
        })
        .collect();
    Config::parse(&inline).unwrap_or_else(|e| panic!("config has problems: {:?}\n{text}", e.0))
}

fn duration_secs(d: &str) -> u64 {
    let n: u64 = d
        .trim_end_matches(|c: char| c.is_alphabetic())
        .parse()
        .unwrap();
    match d.trim_start_matches(|c: char| c.is_ascii_digit()) {
        "s" => n,
        "m" => n * 60,
        "ms" => 0,
        u => panic!("unit {u}"),
    }
}

/// Every document of every YAML file in deploy/kubernetes/, by file.
fn manifests() -> Vec<(String, Value)> {
    let dir = root().join("deploy/kubernetes");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc).unwrap_or_else(|e| panic!("{name}: {e}"));
            if !v.is_null() {
                out.push((name.clone(), v));
            }
        }
    }
    out
}

fn one<'a>(all: &'a [(String, Value)], kind: &str) -> &'a Value {
    let found: Vec<_> = all
        .iter()
        .filter(|(_, v)| at(v, "kind").as_str() == Some(kind))
        .collect();
    assert_eq!(found.len(), 1, "one {kind} expected");
    &found[0].1
}

#[test]
fn kubernetes_manifests_are_objects_that_fit_together() {
    let all = manifests();
    // Every object names its API, kind and name; every workload object carries the app label.
    for (file, v) in &all {
        let kind = s(v, "kind");
        assert!(!s(v, "apiVersion").is_empty(), "{file}");
        if kind == "Kustomization" {
            continue;
        }
        assert!(!s(v, "metadata.name").is_empty(), "{file}: metadata.name");
        assert_eq!(
            at(v, "metadata.labels")
                .get("app.kubernetes.io/name")
                .and_then(Value::as_str),
            Some("tenantpool"),
            "{file}: label app.kubernetes.io/name"
        );
    }
    let kinds: BTreeSet<_> = all.iter().map(|(_, v)| s(v, "kind")).collect();
    for k in [
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "Kustomization",
    ] {
        assert!(kinds.contains(k), "no {k} in deploy/kubernetes/");
    }

    // The ConfigMap holds a config tenantpool accepts, reachable from outside the pod.
    let cm = one(&all, "ConfigMap");
    let cm_name = s(cm, "metadata.name");
    let (conf_file, conf_text) = at(cm, "data")
        .as_mapping()
        .unwrap()
        .iter()
        .next()
        .map(|(k, v)| (k.as_str().unwrap(), v.as_str().unwrap()))
        .unwrap();
    let config = parse_config(conf_text);
    let metrics = config
        .metrics
        .as_ref()
        .expect("[metrics] on: probes need it");
    assert!(
        metrics.listen.starts_with("0.0.0.0:"),
        "metrics must listen on 0.0.0.0"
    );
    let metrics_port: u16 = metrics.listen.rsplit(':').next().unwrap().parse().unwrap();
    assert!(config.proxy.listen.starts_with("0.0.0.0:"));
    let pg_port: u16 = config
        .proxy
        .listen
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        !config.server.host.starts_with("127.") && config.server.host != "localhost",
        "server.host is the pod itself"
    );

    // The Secret has every key the Deployment reads.
    let secret = one(&all, "Secret");
    let secret_name = s(secret, "metadata.name");
    let secret_keys: BTreeSet<_> = at(secret, "stringData")
        .as_mapping()
        .or_else(|| at(secret, "data").as_mapping())
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();

    // The Deployment: probes, drain, secrets, config, security.
    let d = one(&all, "Deployment");
    let pod = at(d, "spec.template");
    let pod_labels = at(pod, "metadata.labels");
    assert!(selects(at(d, "spec.selector.matchLabels"), pod_labels));
    assert_eq!(
        at(d, "spec.strategy.rollingUpdate.maxUnavailable").as_i64(),
        Some(0),
        "a rolling update must not stop an old pod before a new one is ready"
    );
    let containers = seq(pod, "spec.containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert!(!s(c, "image").is_empty());
    let ports: BTreeMap<&str, i64> = seq(c, "ports")
        .iter()
        .map(|p| (s(p, "name"), at(p, "containerPort").as_i64().unwrap()))
        .collect();
    assert_eq!(ports.get("postgres"), Some(&i64::from(pg_port)));
    assert_eq!(ports.get("metrics"), Some(&i64::from(metrics_port)));
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(s(c, &format!("{probe}.httpGet.path")), path, "{probe}");
        let port = at(c, &format!("{probe}.httpGet.port"));
        let port = port
            .as_str()
            .map(|n| *ports.get(n).expect("probe port names a container port"))
            .or_else(|| port.as_i64())
            .unwrap();
        assert_eq!(port, i64::from(metrics_port), "{probe} port");
    }
    // preStop pauses, then SIGTERM drains within shutdown_timeout: the grace period covers
    // both.
    let pre_stop = seq(c, "lifecycle.preStop.exec.command");
    assert_eq!(pre_stop[0].as_str(), Some("sleep"));
    let pause: u64 = pre_stop[1].as_str().unwrap().parse().unwrap();
    let grace = at(pod, "spec.terminationGracePeriodSeconds")
        .as_u64()
        .unwrap();
    let drain = config.proxy.shutdown_timeout.0.as_secs();
    assert!(
        grace > pause + drain,
        "terminationGracePeriodSeconds {grace} <= preStop {pause} + shutdown_timeout {drain}"
    );
    // Every *_env of the config is set, from the Secret.
    let env: BTreeMap<&str, &Value> = seq(c, "env").iter().map(|e| (s(e, "name"), e)).collect();
    for name in env_names(conf_text) {
        let e = env.get(name.as_str()).unwrap_or_else(|| {
            panic!("{name} (the config's *_env) is not in the Deployment's env")
        });
        assert_eq!(s(e, "valueFrom.secretKeyRef.name"), secret_name, "{name}");
        let key = s(e, "valueFrom.secretKeyRef.key");
        assert!(
            secret_keys.contains(key),
            "{name}: no key {key} in the Secret"
        );
    }
    // The config file is where the args say, from the ConfigMap.
    let args: Vec<&str> = seq(c, "args").iter().map(|a| a.as_str().unwrap()).collect();
    let config_path = args[args.iter().position(|&a| a == "--config").unwrap() + 1];
    let volumes: BTreeMap<&str, &Value> = seq(pod, "spec.volumes")
        .iter()
        .map(|v| (s(v, "name"), v))
        .collect();
    let mounted = seq(c, "volumeMounts").iter().any(|m| {
        let v = volumes[s(m, "name")];
        at(v, "configMap.name").as_str() == Some(cm_name)
            && at(m, "subPath").is_null()
            && Path::new(s(m, "mountPath")).join(conf_file) == Path::new(config_path)
    });
    assert!(
        mounted,
        "--config {config_path} is not the ConfigMap's {conf_file} (mounted as a directory, so that edits reach the pod)"
    );
    // Non-root, as the image's USER.
    let uid = at(pod, "spec.securityContext.runAsUser").as_i64().unwrap();
    assert_eq!(
        at(pod, "spec.securityContext.runAsNonRoot").as_bool(),
        Some(true)
    );
    assert_eq!(uid.to_string(), dockerfile_uid());
    assert_eq!(
        at(c, "securityContext.allowPrivilegeEscalation").as_bool(),
        Some(false)
    );
    // Prometheus scrape annotations point at the metrics port.
    let annotations = at(pod, "metadata.annotations");
    let annotation = |k: &str| annotations.get(k).and_then(Value::as_str);
    assert_eq!(annotation("prometheus.io/scrape"), Some("true"));
    assert_eq!(
        annotation("prometheus.io/port"),
        Some(metrics_port.to_string().as_str())
    );
    assert_eq!(annotation("prometheus.io/path"), Some("/metrics"));

    // The Service selects the pods and targets their named ports.
    let svc = one(&all, "Service");
    assert!(selects(at(svc, "spec.selector"), pod_labels));
    let svc_ports: BTreeSet<&str> = seq(svc, "spec.ports")
        .iter()
        .map(|p| {
            let target = s(p, "targetPort");
            assert!(ports.contains_key(target), "targetPort {target}");
            s(p, "name")
        })
        .collect();
    // The PodDisruptionBudget covers the pods and leaves one up.
    let pdb = one(&all, "PodDisruptionBudget");
    assert!(selects(at(pdb, "spec.selector.matchLabels"), pod_labels));
    assert!(at(pdb, "spec.minAvailable").as_i64().unwrap() >= 1);
    // The ServiceMonitor scrapes the Service's metrics port.
    let sm = one(&all, "ServiceMonitor");
    assert!(selects(
        at(sm, "spec.selector.matchLabels"),
        at(svc, "metadata.labels")
    ));
    for ep in seq(sm, "spec.endpoints") {
        assert!(svc_ports.contains(s(ep, "port")));
        assert_eq!(s(ep, "path"), "/metrics");
    }
    // kustomization.yaml lists every other file.
    let k = one(&all, "Kustomization");
    let listed: BTreeSet<&str> = seq(k, "resources")
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    let files: BTreeSet<&str> = all
        .iter()
        .map(|(f, _)| f.as_str())
        .filter(|f| *f != "kustomization.yaml")
        .collect();
    assert_eq!(listed, files);
}

/// A tool, if installed: `None` when it is not.
fn tool(name: &str, args: &[&str]) -> Option<std::process::Output> {
    match Command::new(name).args(args).current_dir(root()).output() {
        Ok(o) => Some(o),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("{name}: {e}"),
    }
}

#[test]
fn kubernetes_manifests_pass_the_schema_check() {
    let files: Vec<String> = manifests()
        .iter()
        .map(|(f, _)| format!("deploy/kubernetes/{f}"))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut args = vec!["--strict"];
    args.extend(files.iter().map(String::as_str));
    match tool("kubernetes-validate", &args) {
        Some(o) => {
            let out = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(o.status.success(), "{out}");
            // The built-in kinds were checked against a schema (the CRD-based ones cannot be).
            for kind in [
                "configmap",
                "secret",
                "deployment",
                "service",
                "poddisruptionbudget",
            ] {
                assert!(
                    out.contains(&format!("passed for resource {kind}/")),
                    "{out}"
                );
            }
        }
        None if std::env::var_os("CI").is_some() => {
            panic!("kubernetes-validate is not installed (scripts/test.sh installs it)")
        }
        None => eprintln!(
            "kubernetes-validate not installed: schema check skipped (pip install kubernetes-validate)"
        ),
    }
}

/// The Dockerfile's instructions, continuation lines joined (comments kept apart).
fn dockerfile() -> (Vec<(String, String)>, String) {
    let text = read("Dockerfile");
    let comments: String = text
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| format!("{}\n", l.trim_start_matches('#')))
        .collect();
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let l = line.trim();
        if l.starts_with('#') || l.is_empty() {
            continue;
        }
        cur.push_str(l.trim_end_matches('\\'));
        cur.push(' ');
        if !l.ends_with('\\') {
            let (op, rest) = cur.trim().split_once(' ').unwrap();
            out.push((op.to_uppercase(), rest.trim().to_string()));
            cur.clear();
        }
    }
    (out, comments)
}

fn dockerfile_uid() -> String {
    let (ins, _) = dockerfile();
    let user = ins.iter().rev().find(|(op, _)| op == "USER").unwrap();
    user.1.split(':').next().unwrap().to_string()
}

#[test]
fn the_dockerfile_builds_from_files_that_exist_and_runs_as_documented() {
    let (ins, comments) = dockerfile();
    let ignored: Vec<String> = read(".dockerignore")
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    // Every COPY from the build context exists and is not excluded by .dockerignore;
    // remember where each file lands in the image.
    let mut image_files: BTreeMap<String, String> = BTreeMap::new();
    for (op, rest) in &ins {
        if op != "COPY" || rest.starts_with("--from") {
            continue;
        }
        let parts: Vec<&str> = rest.split_whitespace().collect();
        let (dest, srcs) = parts.split_last().unwrap();
        for src in srcs {
            assert!(root().join(src).exists(), "COPY {src}: no such file");
            assert!(
                !ignored
                    .iter()
                    .any(|i| *src == i || src.starts_with(&format!("{i}/"))),
                "COPY {src} is excluded by .dockerignore"
            );
            image_files.insert(dest.to_string(), src.to_string());
        }
    }
    // The binary comes from the profile the build stage builds, which strips it.
    let build = ins
        .iter()
        .find(|(op, r)| op == "RUN" && r.contains("cargo build"))
        .unwrap();
    let profile = build
        .1
        .split_whitespace()
        .skip_while(|w| *w != "--profile")
        .nth(1)
        .expect("cargo build --profile NAME");
    let copy_bin = ins
        .iter()
        .find(|(op, r)| op == "COPY" && r.starts_with("--from=build"))
        .unwrap();
    assert!(
        copy_bin
            .1
            .contains(&format!("/target/{profile}/tenantpool ")),
        "{copy_bin:?}"
    );
    let cargo: toml::Table = read("Cargo.toml").parse().unwrap();
    let prof = &cargo["profile"][profile];
    assert_eq!(prof["strip"].as_str(), Some("symbols"));
    assert_eq!(prof["debug"].as_integer(), Some(0));
    // The entrypoint is a file of the repo, executable, and execs the binary.
    let entry = ins.iter().find(|(op, _)| op == "ENTRYPOINT").unwrap();
    let entry_path = entry.1.trim_matches(|c| c == '[' || c == ']' || c == '"');
    let entry_src = &image_files[entry_path];
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(root().join(entry_src))
            .unwrap()
            .permissions()
            .mode();
        assert!(mode & 0o111 != 0, "{entry_src} is not executable");
    }
    assert!(read(entry_src).contains("/usr/local/bin/tenantpool"));
    assert!(
        image_files.contains_key("/usr/local/bin/tenantpool")
            || copy_bin.1.ends_with("/usr/local/bin/tenantpool")
    );
    // TENANTPOOL_CONFIG is the config the image ships.
    let env_line = ins
        .iter()
        .find(|(op, r)| op == "ENV" && r.contains("TENANTPOOL_CONFIG="))
        .unwrap();
    let config_path = env_line
        .1
        .split_whitespace()
        .find_map(|w| w.strip_prefix("TENANTPOOL_CONFIG="))
        .unwrap();
    let config_src = &image_files[config_path];
    let config_text = read(config_src);
    let config = parse_config(&config_text);
    // The documented `docker run` sets every secret the config needs, and publishes the
    // ports the config listens on, which the image exposes.
    let run_line: String = comments
        .split("Run:")
        .nth(1)
        .expect("a documented docker run line")
        .split("  Your own")
        .next()
        .unwrap()
        .to_string();
    for name in env_names(&config_text) {
        assert!(
            run_line.contains(&format!("-e {name}=")),
            "the documented docker run does not set {name}"
        );
    }
    let metrics = config.metrics.as_ref().expect("[metrics] on in the image");
    assert!(metrics.listen.starts_with("0.0.0.0:"));
    assert!(config.proxy.listen.starts_with("0.0.0.0:"));
    assert!(!config.server.host.starts_with("127.") && config.server.host != "localhost");
    let expose = ins.iter().find(|(op, _)| op == "EXPOSE").unwrap();
    for listen in [&config.proxy.listen, &metrics.listen] {
        let port = listen.rsplit(':').next().unwrap();
        assert!(
            expose.1.split_whitespace().any(|p| p == port),
            "EXPOSE {port}"
        );
        assert!(
            run_line.contains(&format!("-p {port}:{port}")),
            "docker run publishes {port}"
        );
    }
    // The healthcheck asks the metrics listener's /healthz.
    let hc = ins.iter().find(|(op, _)| op == "HEALTHCHECK").unwrap();
    let metrics_port = metrics.listen.rsplit(':').next().unwrap();
    assert!(hc.1.contains(&format!("/dev/tcp/127.0.0.1/{metrics_port}")));
    assert!(hc.1.contains("GET /healthz"));
    // Not root.
    let uid = dockerfile_uid();
    assert!(
        uid.parse::<u32>().is_ok_and(|u| u > 0),
        "USER {uid}: numeric and not root"
    );

    if let Some(o) = tool("hadolint", &["Dockerfile"]) {
        assert!(
            o.status.success(),
            "hadolint: {}",
            String::from_utf8_lossy(&o.stdout)
        );
    }
}

#[test]
fn the_entrypoint_takes_secrets_from_files() {
    let dir = std::env::temp_dir().join(format!("tenantpool-entrypoint-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("app_password");
    std::fs::write(&secret, "s3cret with spaces\n").unwrap();
    let entry = root().join("deploy/docker/entrypoint.sh");
    let run = |envs: &[(&str, &str)], bin: &str, args: &[&str]| {
        let mut c = Command::new("sh");
        c.arg(&entry)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/bin:/bin");
        c.env("TENANTPOOL_BIN", bin);
        for (k, v) in envs {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    // VAR_FILE becomes VAR (without the trailing newline); VAR_FILE itself is gone.
    let o = run(
        &[("APP_PASSWORD_FILE", secret.to_str().unwrap())],
        "env",
        &[],
    );
    assert!(o.status.success());
    let env = String::from_utf8_lossy(&o.stdout);
    assert!(
        env.lines().any(|l| l == "APP_PASSWORD=s3cret with spaces"),
        "{env}"
    );
    assert!(!env.contains("APP_PASSWORD_FILE"), "{env}");
    // Both ways, or an unreadable file: refused.
    let o = run(
        &[
            ("APP_PASSWORD_FILE", secret.to_str().unwrap()),
            ("APP_PASSWORD", "x"),
        ],
        "env",
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
    let o = run(&[("APP_PASSWORD_FILE", "/nonexistent/secret")], "env", &[]);
    assert_eq!(o.status.code(), Some(2));
    // The real binary with the image's config and secrets from files: `check` passes.
    let bin = env!("CARGO_BIN_EXE_tenantpool");
    let mut envs = Vec::new();
    let files: Vec<(String, String)> = env_names(&read("deploy/docker/tenantpool.toml"))
        .into_iter()
        .map(|name| {
            let f = dir.join(&name);
            std::fs::write(&f, format!("{name}-value\n")).unwrap();
            (format!("{name}_FILE"), f.to_string_lossy().into_owned())
        })
        .collect();
    for (k, v) in &files {
        envs.push((k.as_str(), v.as_str()));
    }
    let config = root().join("deploy/docker/tenantpool.toml");
    let config = config.to_str().unwrap();
    envs.push(("TENANTPOOL_CONFIG", config));
    let o = run(&envs, bin, &["check"]);
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // Without them it fails, naming the variables.
    let o = run(&[("TENANTPOOL_CONFIG", config)], bin, &["check"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("APP_PASSWORD is not set"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_systemd_unit_reloads_drains_and_raises_the_file_limit() {
    let unit = read("deploy/systemd/tenantpool.service");
    let keys: BTreeMap<&str, Vec<&str>> = unit
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('='))
        .fold(BTreeMap::new(), |mut m, l| {
            let (k, v) = l.split_once('=').unwrap();
            m.entry(k.trim()).or_default().push(v.trim());
            m
        });
    let one = |k: &str| keys.get(k).map(|v| v[v.len() - 1]).unwrap_or_default();
    assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(one("KillSignal"), "SIGTERM");
    assert!(one("LimitNOFILE").parse::<u64>().unwrap() >= 65536);
    assert!(one("ExecStart").starts_with("/usr/local/bin/tenantpool "));
    assert!(one("ExecStart").contains("--config"));
    assert_eq!(one("RuntimeDirectory"), "tenantpool");
    assert!(unit.contains("unix_socket_dir = \"/run/tenantpool\""));
    // TimeoutStopSec covers the default shutdown_timeout (30 s).
    let stop = duration_secs(&format!("{}s", one("TimeoutStopSec")));
    assert!(stop > 30, "TimeoutStopSec {stop}");
    assert!(one("User") != "root" && !one("User").is_empty());

    // systemd's own check, with the binary where this build has it.
    let dir = std::env::temp_dir().join(format!("tenantpool-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tenantpool.service");
    std::fs::write(
        &path,
        unit.replace(
            "/usr/local/bin/tenantpool",
            env!("CARGO_BIN_EXE_tenantpool"),
        ),
    )
    .unwrap();
    if let Some(o) = tool("systemd-analyze", &["verify", path.to_str().unwrap()]) {
        let out = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        // Only lines about this unit count (the host's own units may have problems).
        let ours: Vec<&str> = out
            .lines()
            .filter(|l| l.contains("tenantpool.service"))
            .collect();
        assert!(ours.is_empty() && o.status.success(), "{out}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
