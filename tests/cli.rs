//! The command line: `tenantpool check` on the shipped example and on broken files.

use std::process::Command;

fn check(path: &std::path::Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tenantpool"))
        .args(["check", "--config"])
        .arg(path)
        .env("APP_PASSWORD", "x")
        .env("TENANTPOOL_SERVER_PASSWORD", "y")
        .env("TENANTPOOL_ADMIN_PASSWORD", "z")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn shipped_example_config_is_valid() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tenantpool.toml");
    let (ok, text) = check(&path);
    assert!(ok, "{text}");
    assert!(text.contains("2 tenants"), "{text}");
}

#[test]
fn check_names_every_problem_and_exits_1() {
    let dir = std::env::temp_dir().join(format!("tenantpool-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        r#"
[server]
database = "app"
user = "tp"
max_connections = 4
[tenants.acme]
schema = "tenant_acme"
max_server_connections = 9
[users.app]
password = "x"
tenants = ["initech"]
"#,
    )
    .unwrap();
    let (ok, text) = check(&path);
    assert!(!ok);
    assert!(
        text.contains("tenants.acme.max_server_connections"),
        "{text}"
    );
    assert!(text.contains("users.app.tenants"), "{text}");
    std::fs::write(
        &path,
        "[server]\ndatabase = \"a\"\nuser = \"b\"\nport = \"x\"\nbogus = 1\n",
    )
    .unwrap();
    let (ok, text) = check(&path);
    assert!(!ok);
    assert!(text.contains("port") || text.contains("bogus"), "{text}");
}

fn tenantpool(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tenantpool"));
    cmd.args(args).env_remove("TENANTPOOL_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn write(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tenantpool-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const GOOD: &str = r#"[proxy]
listen = "127.0.0.1:0"
admin_users = ["admin"]
[server]
database = "app"
user = "tp"
password = "p"
[tenants.acme]
schema = "tenant_acme"
[users.app]
password = "x"
[users.admin]
password = "y"
tenants = []
"#;

/// Every problem at once, each with line, column, section and key (docs/operations.md
/// quotes these messages).
#[test]
fn check_names_line_column_section_and_key_of_every_problem() {
    let path = write(
        "types.toml",
        r#"[proxy]
listen = "127.0.0.1:6432"
bogus_key = 1

[server]
database = "app"
user = "tp"
port = "5432"

[tenants.acme]
schema = "tenant_acme"
max_server_connections = "5"

[users.app]
password = "x"
"#,
    );
    let (code, text) = tenantpool(&["check", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{text}");
    for needle in [
        "line 3, column 1: [proxy] bogus_key: unknown key `bogus_key`, expected one of `listen`",
        "line 8, column 8: [server] port: expected a whole number, found the string \"5432\": write port = 5432 without quotes",
        "line 12, column 26: [tenants.acme] max_server_connections: expected a whole number, found the string \"5\": write max_server_connections = 5 without quotes",
    ] {
        assert!(text.contains(needle), "{needle}\n{text}");
    }
    // A syntax error: its position (nothing after it can be trusted).
    let path = write("syntax.toml", "[server]\ndatabase = \"app\nuser = \"tp\"\n");
    let (code, text) = tenantpool(&["check", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert!(text.contains("line 2, column"), "{text}");
}

/// PgBouncer-style integer durations are seconds; a unitless string gets a hint.
#[test]
fn integer_durations_are_seconds() {
    let path = write(
        "durations.toml",
        &GOOD.replace(
            "password = \"p\"",
            "password = \"p\"\nidle_timeout = 600\n[limits]\nquery_wait_timeout = 30",
        ),
    );
    let (code, text) = tenantpool(&["check", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{text}");
    let path = write(
        "durations2.toml",
        &format!("{GOOD}[limits]\nquery_wait_timeout = \"30\"\n"),
    );
    let (code, text) = tenantpool(&["check", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert!(
        text.contains("line 16, column 22: [limits] query_wait_timeout: duration \"30\" needs a unit (ms, s, m, h): write \"30s\", or 30 without quotes for seconds"),
        "{text}"
    );
}

#[test]
fn check_warns_and_counts_in_good_grammar() {
    let path = write("one.toml", GOOD);
    let (code, text) = tenantpool(&["check", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains(": ok (1 tenant, 2 users)"), "{text}");
    assert!(!text.contains("warning: proxy"), "{text}");

    let risky = GOOD
        .replace("127.0.0.1:0", "0.0.0.0:6432")
        .replace(
            "admin_users = [\"admin\"]",
            "admin_users = [\"admin\", \"ops\"]",
        )
        .replace("password = \"p\"", "password_env = \"TP_CLI_EMPTY\"");
    let path = write("risky.toml", &risky);
    let (code, text) = tenantpool(
        &["check", "--config", path.to_str().unwrap()],
        &[("TP_CLI_EMPTY", "")],
    );
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("warning: proxy.admin_users: \"ops\" has no [users.ops] entry, so it cannot log in: the admin console is unreachable for it"),
        "{text}"
    );
    assert!(
        text.contains(
            "warning: server.password_env: environment variable TP_CLI_EMPTY is set but empty"
        ),
        "{text}"
    );
    let trust = risky.replace("[proxy]", "[proxy]\nauth_method = \"trust\"");
    let path = write("trust.toml", &trust);
    let (_, text) = tenantpool(
        &["check", "--config", path.to_str().unwrap()],
        &[("TP_CLI_EMPTY", "x")],
    );
    assert!(
        text.contains("warning: proxy.auth_method = \"trust\" on 0.0.0.0:6432, which is not a loopback address"),
        "{text}"
    );
}

#[test]
fn bind_errors_name_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let path = write(
        "taken.toml",
        &GOOD.replace("127.0.0.1:0", &addr.to_string()),
    );
    let (code, text) = tenantpool(&["--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains(&format!(
            "tenantpool: cannot start: cannot listen on {addr} (proxy.listen): Address already in use"
        )),
        "{text}"
    );
    let path = write(
        "taken_metrics.toml",
        &format!("{GOOD}[metrics]\nlisten = \"{addr}\"\n"),
    );
    let (code, text) = tenantpool(&["--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains(&format!("cannot listen on {addr} (metrics.listen)")),
        "{text}"
    );
}

#[test]
fn a_bare_file_name_gets_a_hint() {
    let (code, text) = tenantpool(&["tenantpool.toml"], &[]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("tenantpool: unexpected argument 'tenantpool.toml'"),
        "{text}"
    );
    assert!(
        text.contains("to run the proxy with this config: tenantpool --config tenantpool.toml"),
        "{text}"
    );
    assert!(
        text.contains(
            "to check it:                       tenantpool check --config tenantpool.toml"
        ),
        "{text}"
    );
}

/// Runs the proxy for `secs` seconds and returns what it logged on stderr.
fn run_for(config: &str, secs: u64) -> String {
    use std::io::Read;
    let path = write(&format!("run-{}.toml", config.len()), config);
    let mut child = Command::new(env!("CARGO_BIN_EXE_tenantpool"))
        .args(["--config", path.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(secs));
    child.kill().unwrap();
    child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    err
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn logs_plain_or_json_with_one_start_line_and_stats_lines() {
    let metrics = free_port();
    let base = GOOD.replace("127.0.0.1:0", &format!("127.0.0.1:{}", free_port()))
        + &format!("[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n");
    // Text: no colour codes when stderr is not a terminal; the start line names both
    // listeners and the file.
    let text = run_for(
        &base.replace(
            "[proxy]",
            "[proxy]\nlog_stats = true\nstats_period = \"1s\"",
        ),
        3,
    );
    assert!(!text.contains('\x1b'), "ANSI codes in a pipe: {text:?}");
    let start: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("listening on"))
        .collect();
    assert_eq!(start.len(), 1, "{text}");
    assert!(
        start[0].contains(&format!("metrics http://127.0.0.1:{metrics}/metrics"))
            && start[0].contains("(proxy)")
            && start[0].contains("config /"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("stats: 0 xacts/s") && l.contains("tenant=\"*\"")),
        "log_stats: {text}"
    );
    // JSON: one object a line.
    let json = run_for(
        &base.replace("[proxy]", "[proxy]\nlog_format = \"json\""),
        2,
    );
    let lines: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let start = lines
        .iter()
        .find(|v| v["fields"]["metrics"].is_string())
        .unwrap_or_else(|| panic!("{json}"));
    assert_eq!(start["level"], "INFO");
    assert_eq!(
        start["fields"]["metrics"],
        format!("http://127.0.0.1:{metrics}/metrics")
    );
    assert!(
        start["fields"]["config"]
            .as_str()
            .unwrap()
            .ends_with(".toml")
    );
}
