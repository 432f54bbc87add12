//! TLS with rustls and its ring provider: the configs for the client side (tenantpool as a
//! TLS server) and for the server side (tenantpool as a TLS client of PostgreSQL), and the
//! checks `tenantpool check` runs on certificate and key files. Nothing here is
//! hand-written crypto: rustls does the protocol, webpki the certificate checks.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

/// The ALPN protocol name of PostgreSQL (required for direct TLS, PostgreSQL 17).
pub const ALPN: &[u8] = b"postgresql";

/// The crypto provider every config uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain and its private key, read from PEM files.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({} certificates)", self.chain.len())
    }
}

/// Reads a certificate chain (leaf first) and a private key.
pub fn load_identity(cert_file: &str, key_file: &str) -> Result<Identity, String> {
    let chain = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| format!("{cert_file}: {e}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{cert_file}: {e}"))?;
    if chain.is_empty() {
        return Err(format!("{cert_file}: no certificate in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| format!("{key_file}: {e}"))?;
    Ok(Identity { chain, key })
}

/// Reads the CA certificates of a PEM file into a root store.
pub fn load_roots(ca_file: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_file)
        .map_err(|e| format!("{ca_file}: {e}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{ca_file}: {e}"))?;
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!("{ca_file}: no CA certificate in the file"));
    }
    Ok(roots)
}

/// The system's CA bundle (`SSL_CERT_FILE`, else the usual Debian/Red Hat/Alpine paths).
pub fn system_roots() -> Result<RootCertStore, String> {
    let env = std::env::var("SSL_CERT_FILE").ok();
    let candidates = env.iter().map(String::as_str).chain([
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
        "/etc/ssl/cert.pem",
    ]);
    for path in candidates {
        if std::path::Path::new(path).exists() {
            return load_roots(path);
        }
    }
    Err("no system CA bundle found: give server.tls_ca_file".into())
}

/// The config of tenantpool's TLS listener: its certificate, ALPN `postgresql`, and
/// client certificates checked against `client_ca` when given (required when
/// `require_client_cert`, as for `auth_method = "cert"`).
pub fn acceptor_config(
    identity: Identity,
    client_ca: Option<&str>,
    require_client_cert: bool,
) -> Result<Arc<ServerConfig>, String> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_ca {
        Some(ca) => {
            let roots = Arc::new(load_roots(ca)?);
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider());
            let verifier = if require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| e.to_string())?)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(identity.chain, identity.key)
        .map_err(|e| format!("certificate and key: {e}"))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// How tenantpool checks PostgreSQL's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Encryption only (`prefer`, `require`, as libpq's sslmode): any certificate.
    None,
    /// The chain up to a trusted CA, whatever name it carries (`verify-ca`).
    Chain,
    /// The chain and the host name (`verify-full`).
    Full,
}

/// The config tenantpool connects to PostgreSQL with: roots from `ca_file` or the system,
/// an optional client certificate, ALPN `postgresql`.
pub fn connector_config(
    verify: Verify,
    ca_file: Option<&str>,
    identity: Option<Identity>,
) -> Result<Arc<ClientConfig>, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match verify {
        Verify::None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider()))),
        Verify::Chain | Verify::Full => {
            let roots = match ca_file {
                Some(f) => load_roots(f)?,
                None => system_roots()?,
            };
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .map_err(|e| e.to_string())?;
            if verify == Verify::Full {
                builder.with_webpki_verifier(webpki)
            } else {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(AnyName(webpki)))
            }
        }
    };
    let mut config = match identity {
        Some(id) => builder
            .with_client_auth_cert(id.chain, id.key)
            .map_err(|e| format!("server.tls_cert_file and tls_key_file: {e}"))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// Accepts any certificate, but still checks the handshake's signatures with it (libpq's
/// `sslmode=require`: encrypted, not authenticated).
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The webpki checks except the host name (libpq's `sslmode=verify-ca`).
#[derive(Debug)]
struct AnyName(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A socket to a client or to PostgreSQL: plain TCP, TLS over it, or a Unix socket (never
/// TLS, as in PostgreSQL). The relay and the login speak to each the same way; the one
/// difference that shows is [`Stream::poll_flush_pending`]: TLS may hold written bytes back
/// until flushed.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
    Unix(UnixStream),
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stream::Plain(_) => write!(f, "Stream(tcp)"),
            Stream::Tls(_) => write!(f, "Stream(tls)"),
            Stream::Unix(_) => write!(f, "Stream(unix)"),
        }
    }
}

impl Stream {
    /// The TCP socket underneath (none for a Unix socket).
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Plain(s) => Some(s),
            Stream::Tls(s) => Some(s.get_ref().0),
            Stream::Unix(_) => None,
        }
    }

    /// Resolves once the peer has closed the socket (end of stream or an error); never
    /// while it is open, whether or not it sent more (that waits in the socket).
    pub async fn closed(&self) {
        let open = match self.tcp() {
            Some(tcp) => {
                let mut byte = [0u8; 1];
                matches!(tcp.peek(&mut byte).await, Ok(n) if n > 0)
            }
            None => crate::listener::unix_open(self).await,
        };
        if open {
            std::future::pending::<()>().await;
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// The server name the client asked for (SNI), on a TLS connection from a client.
    pub fn sni(&self) -> Option<&str> {
        match self {
            Stream::Tls(s) => match &**s {
                tokio_rustls::TlsStream::Server(s) => s.get_ref().1.server_name(),
                tokio_rustls::TlsStream::Client(_) => None,
            },
            Stream::Plain(_) | Stream::Unix(_) => None,
        }
    }

    /// The common name of the certificate the peer presented (verified by rustls).
    pub fn peer_common_name(&self) -> Option<String> {
        let cert = self.peer_certificate()?;
        x509_certificate::CapturedX509Certificate::from_der(cert.to_vec())
            .ok()?
            .subject_common_name()
    }

    /// The peer's (leaf) certificate, on TLS.
    pub fn peer_certificate(&self) -> Option<&[u8]> {
        match self {
            Stream::Tls(s) => {
                let certs = match &**s {
                    tokio_rustls::TlsStream::Server(s) => s.get_ref().1.peer_certificates(),
                    tokio_rustls::TlsStream::Client(s) => s.get_ref().1.peer_certificates(),
                }?;
                certs.first().map(|c| c.as_ref())
            }
            Stream::Plain(_) | Stream::Unix(_) => None,
        }
    }

    /// Ready when a read would find something (or the end): for TLS, bytes rustls has
    /// already decrypted count too. Needs no read buffer.
    pub fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Plain(s) => s.poll_read_ready(cx),
            Stream::Unix(s) => s.poll_read_ready(cx),
            Stream::Tls(s) => {
                let (tcp, buffered) = match &mut **s {
                    tokio_rustls::TlsStream::Server(s) => {
                        let (tcp, c) = s.get_mut();
                        (tcp, c.process_new_packets())
                    }
                    tokio_rustls::TlsStream::Client(s) => {
                        let (tcp, c) = s.get_mut();
                        (tcp, c.process_new_packets())
                    }
                };
                match buffered {
                    Ok(state) if state.plaintext_bytes_to_read() > 0 || state.peer_has_closed() => {
                        Poll::Ready(Ok(()))
                    }
                    Ok(_) => tcp.poll_read_ready(cx),
                    // The next read reports the error.
                    Err(_) => Poll::Ready(Ok(())),
                }
            }
        }
    }

    /// Flushes what TLS still holds of earlier writes: `Ready` when nothing is left.
    pub fn poll_flush_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Plain(_) | Stream::Unix(_) => Poll::Ready(Ok(())),
            Stream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    /// Writes what the socket takes now, best effort (a Terminate on the way out).
    pub fn try_write(&mut self, bytes: &[u8]) {
        match self {
            Stream::Plain(s) => {
                let _ = s.try_write(bytes);
            }
            Stream::Unix(s) => {
                let _ = s.try_write(bytes);
            }
            Stream::Tls(s) => {
                let mut cx = Context::from_waker(std::task::Waker::noop());
                let _ = Pin::new(&mut **s).poll_write(&mut cx, bytes);
                let _ = Pin::new(&mut **s).poll_flush(&mut cx);
            }
        }
    }

    /// Reads what is there without waiting (`WouldBlock` when nothing is).
    pub fn try_read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.try_read_buf(buf),
            Stream::Unix(s) => s.try_read_buf(buf),
            Stream::Tls(s) => {
                use std::future::Future;
                use tokio::io::AsyncReadExt;
                let mut cx = Context::from_waker(std::task::Waker::noop());
                let read = std::pin::pin!(s.read_buf(buf));
                match read.poll(&mut cx) {
                    Poll::Ready(r) => r,
                    Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
                }
            }
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// What the listener needs to speak TLS with clients: the acceptor, and SCRAM bound to
/// its certificate (SCRAM-SHA-256-PLUS, channel binding `tls-server-end-point`).
pub struct Listener {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub scram: pgwire::api::auth::sasl::scram::ScramServerAuth,
}

impl Listener {
    /// From `[proxy]`'s TLS keys; `None` when `client_tls = "disable"`.
    pub fn from_config(config: &crate::config::Config) -> Result<Option<Listener>, String> {
        let proxy = &config.proxy;
        if proxy.client_tls == crate::config::ClientTls::Disable {
            return Ok(None);
        }
        let (Some(cert), Some(key)) = (&proxy.tls_cert_file, &proxy.tls_key_file) else {
            return Err("proxy.tls_cert_file and tls_key_file are needed".into());
        };
        let identity = load_identity(cert, key)?;
        let require_client_cert = proxy.auth_method == crate::config::AuthMethod::Cert;
        let config = acceptor_config(
            identity,
            proxy.tls_client_ca_file.as_deref(),
            require_client_cert,
        )?;
        let pem = std::fs::read(cert).map_err(|e| format!("{cert}: {e}"))?;
        let mut scram = pgwire::api::auth::sasl::scram::ScramServerAuth::new();
        scram
            .configure_certificate(&pem)
            .map_err(|e| format!("{cert}: channel binding: {e}"))?;
        Ok(Some(Listener {
            acceptor: tokio_rustls::TlsAcceptor::from(config),
            scram,
        }))
    }
}

/// How tenantpool speaks TLS to PostgreSQL (`[server] tls` other than `disable`).
pub struct Connector {
    connector: tokio_rustls::TlsConnector,
    /// `prefer`: plain TCP when the server does not offer TLS.
    optional: bool,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Connector(optional: {})", self.optional)
    }
}

/// The SSLRequest packet.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

impl Connector {
    /// From `[server]`'s TLS keys; `None` for `tls = "disable"`.
    pub fn from_config(config: &crate::config::Config) -> Result<Option<Connector>, String> {
        Connector::from_server(&config.server)
    }

    /// From one server's TLS keys (`[server]` or a `[servers.NAME]`).
    pub fn from_server(server: &crate::config::ServerConfig) -> Result<Option<Connector>, String> {
        use crate::config::ServerTls;
        let verify = match server.tls {
            ServerTls::Disable => return Ok(None),
            ServerTls::Prefer | ServerTls::Require => Verify::None,
            ServerTls::VerifyCa => Verify::Chain,
            ServerTls::VerifyFull => Verify::Full,
        };
        let identity = match (&server.tls_cert_file, &server.tls_key_file) {
            (Some(c), Some(k)) => Some(load_identity(c, k)?),
            _ => None,
        };
        let config = connector_config(verify, server.tls_ca_file.as_deref(), identity)?;
        Ok(Some(Connector {
            connector: tokio_rustls::TlsConnector::from(config),
            optional: server.tls == ServerTls::Prefer,
        }))
    }

    /// Asks the server for TLS (SSLRequest) and does the handshake, with `host` as the
    /// server name (SNI, and what verify-full checks). Plain TCP only when the server
    /// declines and TLS is optional.
    pub async fn negotiate(&self, mut tcp: TcpStream, host: &str) -> Result<Stream, String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        tcp.write_all(&SSL_REQUEST)
            .await
            .map_err(|e| format!("SSLRequest: {e}"))?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer)
            .await
            .map_err(|e| format!("SSLRequest: {e}"))?;
        match answer[0] {
            b'S' => {}
            b'N' if self.optional => return Ok(Stream::Plain(tcp)),
            b'N' => {
                return Err(format!(
                    "{host} does not accept TLS connections (server.tls requires TLS)"
                ));
            }
            other => return Err(format!("{host} answered the SSLRequest with {other:#04x}")),
        }
        let name = ServerName::try_from(host.to_string())
            .map_err(|_| format!("\"{host}\" is not a host name TLS can verify"))?;
        let tls = self
            .connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake with {host} failed: {}", describe(&e)))?;
        Ok(Stream::Tls(Box::new(tokio_rustls::TlsStream::Client(tls))))
    }
}

/// Says what went wrong in a handshake the way an operator acts on it.
pub fn describe(e: &io::Error) -> String {
    let Some(err) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return e.to_string();
    };
    use rustls::CertificateError as C;
    match err {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => {
                "the certificate is signed by an unknown CA (see server.tls_ca_file)".into()
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                "the certificate does not name this host (name mismatch)".into()
            }
            C::Expired | C::ExpiredContext { .. } => "the certificate has expired".into(),
            C::NotValidYet | C::NotValidYetContext { .. } => {
                "the certificate is not valid yet".into()
            }
            C::Revoked => "the certificate is revoked".into(),
            other => format!("invalid certificate: {other:?}"),
        },
        other => other.to_string(),
    }
}

/// The `tls-server-end-point` channel binding data of a certificate (RFC 5929): its hash
/// with the algorithm of its signature, SHA-256 for SHA-1 and MD5.
pub fn end_point_hash(cert: &[u8]) -> Option<Vec<u8>> {
    use x509_certificate::SignatureAlgorithm as S;
    let x509 = x509_certificate::CapturedX509Certificate::from_der(cert.to_vec()).ok()?;
    let algorithm = match x509.signature_algorithm()? {
        S::RsaSha384 | S::EcdsaSha384 => &ring::digest::SHA384,
        S::RsaSha512 => &ring::digest::SHA512,
        _ => &ring::digest::SHA256,
    };
    Some(ring::digest::digest(algorithm, cert).as_ref().to_vec())
}

/// What is wrong with a certificate and key pair, for `tenantpool check`: unreadable,
/// empty, a key that is not the certificate's, a certificate expired or not valid yet.
pub fn check_identity(cert_file: &str, key_file: &str) -> Vec<String> {
    let id = match load_identity(cert_file, key_file) {
        Ok(id) => id,
        Err(e) => return vec![e],
    };
    let mut problems = Vec::new();
    let signing = match provider().key_provider.load_private_key(id.key.clone_key()) {
        Ok(k) => k,
        Err(e) => return vec![format!("{key_file}: {e}")],
    };
    let certified = rustls::sign::CertifiedKey::new(id.chain.clone(), signing);
    match certified.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => problems
            .push(format!(
                "{key_file}: the key is not the one of the certificate in {cert_file}"
            )),
        Err(e) => problems.push(format!("{cert_file}: {e}")),
    }
    if let Some(p) = validity(&id.chain, cert_file) {
        problems.push(p);
    }
    problems
}

/// Is the leaf certificate within its validity period? Checked by building its chain from
/// the file itself up to its last certificate (the root, or the leaf when self-signed).
fn validity(chain: &[CertificateDer<'static>], cert_file: &str) -> Option<String> {
    let leaf = webpki::EndEntityCert::try_from(&chain[0]).ok()?;
    let last = chain.last()?;
    let anchors = [webpki::anchor_from_trusted_cert(last).ok()?];
    let algs = provider().signature_verification_algorithms.all;
    let result = leaf.verify_for_usage(
        algs,
        &anchors,
        &chain[1..],
        UnixTime::now(),
        webpki::KeyUsage::server_auth(),
        None,
        None,
    );
    match result {
        Err(webpki::Error::CertExpired { .. }) => {
            Some(format!("{cert_file}: the certificate has expired"))
        }
        Err(webpki::Error::CertNotValidYet { .. }) => {
            Some(format!("{cert_file}: the certificate is not valid yet"))
        }
        Err(webpki::Error::InvalidCertValidity) => Some(format!(
            "{cert_file}: the certificate's validity period is invalid (it ends before it begins)"
        )),
        // Anything else (a root not in the file, say) is for the client to judge.
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a shell command (openssl makes the test certificates) in `dir`.
    fn sh(dir: &std::path::Path, cmd: &str) {
        let ok = std::process::Command::new("sh")
            .args(["-c", cmd])
            .current_dir(dir)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(ok, "failed: {cmd}");
    }

    /// A v3 certificate (webpki reads no other) signed by its own key, valid from
    /// `start` to `end` (openssl's YYYYMMDDHHMMSSZ).
    fn pair(dir: &std::path::Path, name: &str, start: &str, end: &str) -> (String, String) {
        sh(
            dir,
            "printf '[ca]\\ndefault_ca=CA\\n[CA]\\ndatabase=index.txt\\nnew_certs_dir=.\\n\\
             serial=serial\\ndefault_md=sha256\\npolicy=p\\n[p]\\ncommonName=supplied\\n\\
             [v3]\\nbasicConstraints=CA:FALSE\\nsubjectAltName=DNS:localhost\\n' > ca.cnf \\
             && : > index.txt && echo 01 > serial",
        );
        sh(
            dir,
            &format!(
                "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
                 -subj /CN=localhost -keyout {name}.key -out {name}.csr && \
                 openssl ca -selfsign -batch -config ca.cnf -extensions v3 -keyfile {name}.key \
                 -in {name}.csr -startdate {start} -enddate {end} -out {name}.crt"
            ),
        );
        let path = |ext: &str| {
            dir.join(format!("{name}.{ext}"))
                .to_string_lossy()
                .into_owned()
        };
        (path("crt"), path("key"))
    }

    #[test]
    fn check_names_what_is_wrong_with_the_files() {
        let dir = std::env::temp_dir().join(format!("tenantpool-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = pair(&dir, "good", "20200101000000Z", "20991231000000Z");
        assert_eq!(check_identity(&cert, &key), Vec::<String>::new());
        assert!(acceptor_config(load_identity(&cert, &key).unwrap(), None, false).is_ok());
        let (_, other_key) = pair(&dir, "other", "20200101000000Z", "20991231000000Z");
        let p = check_identity(&cert, &other_key);
        assert!(p.iter().any(|p| p.contains("not the one")), "{p:?}");
        let (old, old_key) = pair(&dir, "old", "20200101000000Z", "20200102000000Z");
        let p = check_identity(&old, &old_key);
        assert!(p.iter().any(|p| p.contains("expired")), "{p:?}");
        let missing = dir.join("missing.crt").to_string_lossy().into_owned();
        assert!(!check_identity(&missing, &key).is_empty());
        assert!(
            !check_identity(&key, &key).is_empty(),
            "a key is no certificate"
        );
    }
}
