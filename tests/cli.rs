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
