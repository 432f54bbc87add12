//! TLS on both sides: clients that ask for it (or must), direct TLS, SCRAM with channel
//! binding, client certificates, the tenant from the server name; tenantpool's own
//! connections to a PostgreSQL that requires or verifies TLS, and what an operator is told
//! when that fails. The harness's PostgreSQL runs with TLS (a certificate for `localhost`
//! signed by the tests' CA).

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Runs psql with a connection string; its output, or its error text.
fn psql_with(conn: &str, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .arg(conn)
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("psql");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A certificate for the proxy (localhost, 127.0.0.1 and `*.db.example.com`) and the TOML
/// that turns client TLS on with it.
fn proxy_tls(dir: &Path, mode: &str) -> String {
    let (crt, key) = test_ca().issue(
        dir,
        "proxy",
        "localhost",
        &["DNS:localhost", "IP:127.0.0.1", "DNS:*.db.example.com"],
        false,
    );
    format!(
        "[proxy]\nclient_tls = \"{mode}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
        crt.display(),
        key.display()
    )
}

fn conn(proxy: &Proxy, host: &str, tenant: &str, extra: &str) -> String {
    format!(
        "host={host} port={} user={APP_USER} password={APP_PASSWORD} dbname={tenant} {extra}",
        proxy.addr.port()
    )
}

/// client_tls = "require": TLS clients are served (verifying the proxy's certificate,
/// binding SCRAM to it), a plaintext one is refused with FATAL 28000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_must_use_tls_and_may_bind_the_channel() {
    let db = TestDb::create("tls_require", &["acme"]).await;
    let dir = tempdir("tenantpool-tls-require");
    let proxy = Proxy::start(db.config(2, &proxy_tls(&dir, "require")));
    let ca = test_ca().crt.display().to_string();
    let rows = "SELECT string_agg(name, ',' ORDER BY id) FROM leads";
    let check = |host: &str, extra: &str| psql_with(&conn(&proxy, host, "acme", extra), rows);
    assert_eq!(
        check("127.0.0.1", "sslmode=require").unwrap(),
        "acme-1,acme-2"
    );
    assert_eq!(
        check(
            "localhost",
            &format!("sslmode=verify-full sslrootcert={ca}")
        )
        .unwrap(),
        "acme-1,acme-2"
    );
    // SCRAM-SHA-256-PLUS: the exchange is bound to the proxy's certificate.
    assert_eq!(
        check("127.0.0.1", "sslmode=require channel_binding=require").unwrap(),
        "acme-1,acme-2"
    );
    let plain = check("127.0.0.1", "sslmode=disable").unwrap_err();
    assert!(plain.contains("TLS is required"), "{plain}");
    // The session really is encrypted.
    let ssl = psql_with(
        &conn(&proxy, "127.0.0.1", "acme", "sslmode=require"),
        "\\conninfo",
    )
    .unwrap();
    assert!(ssl.contains("SSL connection"), "{ssl}");
    proxy.stop();
}

/// client_tls = "prefer": both kinds of clients, in one proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_serves_plain_and_tls_clients() {
    let db = TestDb::create("tls_prefer", &["acme"]).await;
    let dir = tempdir("tenantpool-tls-prefer");
    let proxy = Proxy::start(db.config(2, &proxy_tls(&dir, "prefer")));
    for mode in ["disable", "require"] {
        let got = psql_with(
            &conn(&proxy, "127.0.0.1", "acme", &format!("sslmode={mode}")),
            "SELECT count(*) FROM leads",
        );
        assert_eq!(got.unwrap(), "2", "sslmode={mode}");
    }
    proxy.stop();
}

/// A raw TLS client: the handshake on a fresh socket (direct TLS) or after an SSLRequest,
/// with the given server name and ALPN.
async fn tls_client(
    addr: std::net::SocketAddr,
    server_name: &str,
    alpn: Option<&[u8]>,
    direct: bool,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::pem::PemObject::pem_file_iter(&test_ca().crt).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    if let Some(a) = alpn {
        config.alpn_protocols = vec![a.to_vec()];
    }
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    if !direct {
        tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await?;
        let mut s = [0u8; 1];
        tcp.read_exact(&mut s).await?;
        assert_eq!(s[0], b'S');
    }
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

/// Logs in over `stream` (trust) and runs a query; the messages up to ReadyForQuery, or
/// the first error's SQLSTATE.
async fn run_over<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    params: &[(&str, &str)],
    sql: &str,
) -> Result<Vec<String>, String> {
    send_after_login(stream, params, &query(sql)).await
}

/// Logs in over `stream` (trust) and sends `after`; the rows up to the ReadyForQuery after
/// the login's, or the first error's SQLSTATE ("closed" if the connection ends first).
async fn send_after_login<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    params: &[(&str, &str)],
    after: &[u8],
) -> Result<Vec<String>, String> {
    let mut bytes = startup_packet(params);
    bytes.extend_from_slice(after);
    stream.write_all(&bytes).await.map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut rows = Vec::new();
    let mut readies = 0;
    loop {
        while buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize + 1;
            if buf.len() < len {
                break;
            }
            let m = Msg {
                tag: buf[0],
                body: buf[5..len].to_vec(),
            };
            buf.drain(..len);
            match m.tag {
                b'E' => return Err(m.field(b'C').unwrap_or_default()),
                b'D' => rows.push(data_row(&m.body).join(",")),
                b'Z' => {
                    readies += 1;
                    if readies == 2 {
                        return Ok(rows);
                    }
                }
                _ => {}
            }
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("an answer")
            .unwrap_or(0);
        if n == 0 {
            return Err("closed".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Direct TLS (PostgreSQL 17's `sslnegotiation=direct`): the handshake as the first bytes,
/// ALPN `postgresql` required; the SSLRequest way works beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_with_alpn() {
    let db = TestDb::create("tls_direct", &["acme"]).await;
    let dir = tempdir("tenantpool-tls-direct");
    let proxy = Proxy::start(db.config(
        2,
        &format!("{}auth_method = \"trust\"\n", proxy_tls(&dir, "require")),
    ));
    let params = [("user", APP_USER), ("database", "acme")];
    let sql = "SELECT name FROM leads ORDER BY id";
    let mut s = tls_client(proxy.addr, "localhost", Some(b"postgresql"), true)
        .await
        .unwrap();
    assert_eq!(
        run_over(&mut s, &params, sql).await.unwrap(),
        ["acme-1", "acme-2"]
    );
    let mut s = tls_client(proxy.addr, "localhost", None, false)
        .await
        .unwrap();
    assert_eq!(
        run_over(&mut s, &params, sql).await.unwrap(),
        ["acme-1", "acme-2"]
    );
    // Direct TLS without ALPN is refused (as PostgreSQL 17 does).
    let refused = match tls_client(proxy.addr, "localhost", None, true).await {
        Err(_) => true,
        Ok(mut s) => run_over(&mut s, &params, sql).await.is_err(),
    };
    assert!(refused);

    // Bytes sent in the clear behind an SSLRequest, before its answer, are refused as
    // PostgreSQL refuses them (they would be taken for the handshake, CVE-2021-23214).
    let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut bytes = vec![0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    bytes.extend_from_slice(&startup_packet(&params));
    tcp.write_all(&bytes).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tcp.read_to_end(&mut got),
    )
    .await
    .expect("the proxy closes the connection");
    assert_eq!(got.first(), Some(&b'E'), "{got:?}");
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("08P01"), "{text}");
    assert!(
        text.contains("unencrypted data after SSL request"),
        "{text}"
    );
    proxy.stop();
}

/// tenant_from = "sni": `acme.db.example.com` is tenant acme (a wildcard certificate serves
/// every tenant); a dbname naming another tenant is refused; a name outside the domain is
/// no tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_server_name_names_the_tenant() {
    let db = TestDb::create("tls_sni", &["acme", "globex"]).await;
    let dir = tempdir("tenantpool-tls-sni");
    let proxy = Proxy::start(db.config(
        2,
        &format!(
            "{}auth_method = \"trust\"\ntenant_from = \"sni\"\nsni_domain = \"db.example.com\"\n",
            proxy_tls(&dir, "require")
        ),
    ));
    let sql = "SELECT name FROM leads ORDER BY id";
    for (sni, db_name, want) in [
        ("acme.db.example.com", "app", Ok(vec!["acme-1", "acme-2"])),
        (
            "GLOBEX.db.example.com",
            "globex",
            Ok(vec!["globex-1", "globex-2"]),
        ),
        ("acme.db.example.com", "globex", Err("28000")),
        ("nobody.db.example.com", "app", Err("3D000")),
        ("localhost", "acme", Err("3D000")),
    ] {
        let mut s = tls_client(proxy.addr, sni, Some(b"postgresql"), true)
            .await
            .unwrap();
        let got = run_over(&mut s, &[("user", APP_USER), ("database", db_name)], sql).await;
        let want = want
            .map(|v| v.into_iter().map(String::from).collect::<Vec<_>>())
            .map_err(String::from);
        assert_eq!(got, want, "{sni} {db_name}");
    }
    proxy.stop();
}

/// tenant_from = "domain": the TLS server name is a tenant's `domain` in the directory
/// (any case); a name no tenant has, or none, is no tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_server_name_is_a_tenants_domain() {
    let db = TestDb::create("tls_domain", &["toml"]).await;
    let owner = db.owner().await;
    owner
        .batch_execute(
            "CREATE SCHEMA tenant_acme; CREATE SCHEMA tenant_globex;
             CREATE TABLE tenant_acme.leads (id int, name text);
             CREATE TABLE tenant_globex.leads (id int, name text);
             INSERT INTO tenant_acme.leads VALUES (1, 'acme-1');
             INSERT INTO tenant_globex.leads VALUES (1, 'globex-1');
             CREATE SCHEMA core;
             CREATE TABLE core.tenants (slug text, domain text);
             INSERT INTO core.tenants VALUES ('acme', 'db.acme.test'), ('globex', 'pg.globex.test');
             GRANT USAGE ON SCHEMA core, tenant_acme, tenant_globex TO PUBLIC;
             GRANT SELECT ON ALL TABLES IN SCHEMA core, tenant_acme, tenant_globex TO PUBLIC;",
        )
        .await
        .unwrap();
    let dir = tempdir("tenantpool-tls-domain");
    let (crt, key) = test_ca().issue(
        &dir,
        "proxy",
        "localhost",
        &[
            "DNS:localhost",
            "DNS:db.acme.test",
            "DNS:pg.globex.test",
            "DNS:other.test",
        ],
        false,
    );
    let proxy = Proxy::start(db.config(
        2,
        &format!(
            "[proxy]\nclient_tls = \"require\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n\
             auth_method = \"trust\"\ntenant_from = \"domain\"\n\
             [directory]\nquery = \"SELECT slug AS tenant, 'tenant_' || slug AS schema, domain FROM core.tenants\"\n",
            crt.display(),
            key.display()
        ),
    ));
    let sql = "SELECT name FROM leads ORDER BY id";
    for (sni, db_name, want) in [
        ("db.acme.test", "app", Ok(vec!["acme-1"])),
        ("PG.Globex.test", "anything", Ok(vec!["globex-1"])),
        ("db.acme.test", "globex", Err("28000")),
        ("other.test", "acme", Err("3D000")),
        ("localhost", "acme", Err("3D000")),
    ] {
        let want = want
            .map(|v| v.into_iter().map(String::from).collect::<Vec<_>>())
            .map_err(String::from);
        // The directory is read at start; give it a moment.
        let mut got = Err(String::new());
        for _ in 0..50 {
            let mut s = tls_client(proxy.addr, sni, Some(b"postgresql"), true)
                .await
                .unwrap();
            got = run_over(&mut s, &[("user", APP_USER), ("database", db_name)], sql).await;
            if got == want {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert_eq!(got, want, "{sni} {db_name}");
    }
    proxy.stop();
}

/// A reload reads the certificate files again: a renewed certificate is served to new
/// clients without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_serves_a_renewed_certificate() {
    let db = TestDb::create("tls_reload", &["acme"]).await;
    let dir = tempdir("tenantpool-tls-reload");
    let (crt, key) = test_ca().issue(&dir, "old", "old-proxy", &["DNS:localhost"], false);
    let text = db.config_text(
        2,
        &format!(
            "[proxy]\nclient_tls = \"require\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\nauth_method = \"trust\"\n",
            crt.display(),
            key.display()
        ),
    );
    let path = dir.join("tenantpool.toml");
    std::fs::write(&path, &text).unwrap();
    let proxy = Proxy::start(tenantpool::config::Config::parse(&text).unwrap());
    proxy.shared.live.set_path(&path);
    let subject = |s: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>| {
        let der = s.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        String::from_utf8_lossy(&der).into_owned()
    };
    let sql = "SELECT name FROM leads ORDER BY id";
    let params = [("user", APP_USER), ("database", "acme")];
    let mut before = tls_client(proxy.addr, "localhost", None, false)
        .await
        .unwrap();
    assert!(subject(&before).contains("old-proxy"));
    assert_eq!(run_over(&mut before, &params, sql).await.unwrap().len(), 2);

    // The files are replaced in place, as certbot or cert-manager do.
    let (new_crt, new_key) = test_ca().issue(&dir, "new", "new-proxy", &["DNS:localhost"], false);
    std::fs::copy(&new_crt, &crt).unwrap();
    std::fs::copy(&new_key, &key).unwrap();
    let mut after = tls_client(proxy.addr, "localhost", None, false)
        .await
        .unwrap();
    assert!(subject(&after).contains("old-proxy"), "no reload yet");
    drop(after);
    tenantpool::live::reload(&proxy.shared).unwrap();
    after = tls_client(proxy.addr, "localhost", None, false)
        .await
        .unwrap();
    assert!(subject(&after).contains("new-proxy"));
    assert_eq!(run_over(&mut after, &params, sql).await.unwrap().len(), 2);
    proxy.stop();
}

/// auth_method = "cert": a client certificate signed by tls_client_ca_file whose common
/// name is the user logs in; another name, or none, does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_authenticate() {
    let db = TestDb::create("tls_cert", &["acme"]).await;
    let dir = tempdir("tenantpool-tls-cert");
    let (app_crt, app_key) = test_ca().issue(&dir, "app-client", APP_USER, &[], true);
    let (other_crt, other_key) = test_ca().issue(&dir, "other-client", "mallory", &[], true);
    // libpq refuses a key file others may read.
    for k in [&app_key, &other_key] {
        Command::new("chmod").arg("600").arg(k).status().unwrap();
    }
    let proxy = Proxy::start(db.config(
        2,
        &format!(
            "{}auth_method = \"cert\"\ntls_client_ca_file = \"{}\"\n",
            proxy_tls(&dir, "require"),
            test_ca().crt.display()
        ),
    ));
    let with = |crt: &Path, key: &Path| {
        psql_with(
            &format!(
                "host=127.0.0.1 port={} user={APP_USER} dbname=acme sslmode=require sslcert={} sslkey={}",
                proxy.addr.port(),
                crt.display(),
                key.display()
            ),
            "SELECT count(*) FROM leads",
        )
    };
    assert_eq!(with(&app_crt, &app_key).unwrap(), "2");
    let e = with(&other_crt, &other_key).unwrap_err();
    assert!(e.contains("certificate authentication failed"), "{e}");
    let none = psql_with(
        &format!(
            "host=127.0.0.1 port={} user={APP_USER} dbname=acme sslmode=require",
            proxy.addr.port()
        ),
        "SELECT 1",
    );
    assert!(none.is_err());
    proxy.stop();
}

/// `[server] tls`: require encrypts every server connection; verify-full checks the CA and
/// the host name, verify-ca only the CA; a failure reaches the client as a clear 08006
/// naming the cause. Over TLS tenantpool's own SCRAM login to PostgreSQL is bound to the
/// server's certificate (PostgreSQL offers SCRAM-SHA-256-PLUS there): a wrong hash would
/// fail every login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenantpool_speaks_tls_to_postgresql() {
    let db = TestDb::create("tls_server", &["acme"]).await;
    let ca = pg().ca_file.clone().expect("the test server has TLS");
    let stranger_dir = tempdir("tenantpool-tls-stranger");
    let stranger = TestCa::new(&stranger_dir, "a stranger CA");
    let su = pg().superuser("postgres").await;
    let cases = [
        ("require", "127.0.0.1", None, None),
        ("verify-full", "localhost", Some(&ca), None),
        ("verify-ca", "127.0.0.1", Some(&ca), None),
        ("verify-full", "127.0.0.1", Some(&ca), Some("name mismatch")),
        (
            "verify-full",
            "localhost",
            Some(&stranger.crt),
            Some("unknown CA"),
        ),
    ];
    for (mode, host, ca_file, failure) in cases {
        let mut extra = format!("[server]\ntls = \"{mode}\"\nhost = \"{host}\"\n");
        if let Some(f) = ca_file {
            extra.push_str(&format!("tls_ca_file = \"{}\"\n", f.display()));
        }
        let proxy = Proxy::start(db.config(2, &extra));
        let got = psql_with(
            &conn(&proxy, "127.0.0.1", "acme", "sslmode=disable"),
            "SELECT count(*) FROM leads",
        );
        match failure {
            None => {
                assert_eq!(got.as_deref(), Ok("2"), "{mode} {host}");
                let encrypted: i64 = su
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
                         WHERE a.usename = $1 AND s.ssl AND a.application_name <> $2",
                        &[&db.role, &OWNER_APP],
                    )
                    .await
                    .unwrap()
                    .get(0);
                assert!(encrypted >= 1, "{mode}: no encrypted server connection");
            }
            Some(cause) => {
                let e = got.unwrap_err();
                assert!(e.contains(cause), "{mode} {host}: {e}");
            }
        }
        proxy.stop();
    }
}

/// Large data over TLS on both sides: a 20 MB COPY in, a 20 MB result out (many TLS
/// records each way, partial writes that TLS holds back), then the bad-input cases over a
/// TLS client: a malformed message is 08P01 and the pool serves the next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_copy_and_results_over_tls_both_ways() {
    let db = TestDb::create("tls_large", &["acme"]).await;
    let dir = tempdir("tenantpool-tls-large");
    db.owner()
        .await
        .batch_execute(
            "CREATE TABLE tenant_acme.big (t text); GRANT ALL ON tenant_acme.big TO PUBLIC;",
        )
        .await
        .unwrap();
    let extra = format!(
        "{}auth_method = \"trust\"\n[server]\ntls = \"require\"\n",
        proxy_tls(&dir, "require")
    );
    let proxy = Proxy::start(db.config(1, &extra));
    let c = conn(&proxy, "127.0.0.1", "acme", "sslmode=require");
    // 200,000 lines of 100 bytes: 20 MB through COPY FROM STDIN.
    let line = format!("{}\n", "x".repeat(99));
    let data = line.repeat(200_000);
    let mut child = Command::new("psql")
        .arg(&c)
        .args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            "COPY big FROM STDIN",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(data.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        psql_with(&c, "SELECT count(*), sum(length(t)) FROM big").unwrap(),
        "200000|19800000"
    );
    // And 20 MB back: every row, as sent.
    let out = Command::new("psql")
        .arg(&c)
        .args(["-X", "-q", "-A", "-t", "-c", "SELECT t FROM big"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data.as_bytes());

    // Bad input over TLS: an empty Parse, a Bind with a broken count, a truncated Describe.
    for bad in [
        &b"P\0\0\0\x04"[..],
        b"B\0\0\0\x0a\0\0\0\x05\0\0",
        b"D\0\0\0\x05S",
    ] {
        let mut s = tls_client(proxy.addr, "localhost", None, false)
            .await
            .unwrap();
        let mut msgs = bad.to_vec();
        msgs.extend_from_slice(b"S\0\0\0\x04");
        let got =
            send_after_login(&mut s, &[("user", APP_USER), ("database", "acme")], &msgs).await;
        assert_eq!(
            got,
            Err("08P01".into()),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
        // The pool (one connection) serves the next client at once.
        assert_eq!(psql_with(&c, "SELECT count(*) FROM leads").unwrap(), "2");
    }
    proxy.stop();
}

/// `tenantpool check` reads the TLS files: a key that is not the certificate's, a missing
/// file, TLS asked for without a certificate.
#[test]
fn check_names_tls_file_problems() {
    let dir = tempdir("tenantpool-tls-check");
    let (crt, _) = test_ca().issue(&dir, "a", "localhost", &["DNS:localhost"], false);
    let (_, other_key) = test_ca().issue(&dir, "b", "localhost", &["DNS:localhost"], false);
    let base = "[server]\ndatabase = \"d\"\nuser = \"u\"\n[tenants.acme]\nschema = \"s\"\n\
                [users.app]\npassword = \"p\"\n";
    let run = |proxy: &str| {
        let path = dir.join("t.toml");
        std::fs::write(&path, format!("[proxy]\n{proxy}\n{base}")).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_tenantpool"))
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, text) = run(&format!(
        "client_tls = \"require\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"",
        crt.display(),
        other_key.display()
    ));
    assert!(
        !ok && text.contains("not the one of the certificate"),
        "{text}"
    );
    let (ok, text) = run("client_tls = \"require\"");
    assert!(!ok && text.contains("tls_cert_file"), "{text}");
    let (ok, text) = run(&format!(
        "client_tls = \"require\"\ntls_cert_file = \"{}/missing.crt\"\ntls_key_file = \"{}\"",
        dir.display(),
        other_key.display()
    ));
    assert!(!ok && text.contains("missing.crt"), "{text}");
}

/// A TLS client that sends part of a record is not out of reach: its socket is readable
/// but gives no plaintext yet, and the wait for the rest still hears the timer (and KILL
/// and shutdown, through the same wait). Without that it would stay open for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_stopped_in_the_middle_of_a_record_is_still_reached() {
    let db = TestDb::create("tls_partial_record", &["acme"]).await;
    let dir = tempdir("tenantpool-tls-partial");
    let proxy = Proxy::start(db.config(
        1,
        &format!(
            "{}auth_method = \"trust\"\n[limits]\nclient_idle_timeout = \"500ms\"\n",
            proxy_tls(&dir, "require")
        ),
    ));
    let params = [("user", APP_USER), ("database", "acme")];
    let mut s = tls_client(proxy.addr, "localhost", None, false)
        .await
        .unwrap();
    assert_eq!(run_over(&mut s, &params, "SELECT 1").await.unwrap(), ["1"]);
    // An application-data record header announcing 64 bytes, and 3 of them.
    s.get_mut()
        .0
        .write_all(&[0x17, 3, 3, 0, 64, 1, 2, 3])
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    tokio::time::timeout(std::time::Duration::from_secs(20), async {
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await
    .expect("the client was still connected after 20 s");
    proxy.stop();
}
