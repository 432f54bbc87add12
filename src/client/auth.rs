//! Client authentication: the `[users.*]` logins and the SCRAM-SHA-256, md5 and trust
//! exchanges with a client.
//!
//! SCRAM's server side is pgwire's (`ScramServerAuth`); md5 hashing is postgres-protocol's.
//! pgwire's decoders are only given exact frames whose structure was checked first, since
//! they panic on truncated input.

use std::collections::HashMap;

use crate::tls::Stream;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::BytesMut;
use pgwire::api::auth::sasl::scram::{ScramSecret, ScramServerAuth, gen_salted_password};
use pgwire::messages::Message;
use pgwire::messages::startup::{Authentication, PasswordMessageFamily};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::{AuthMethod, Config};
use crate::error::PgError;

/// SCRAM key material of a user: what PostgreSQL stores in `pg_authid`.
#[derive(Clone)]
pub struct ScramKeys {
    pub salt: Vec<u8>,
    pub iterations: usize,
    pub stored_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

impl ScramKeys {
    fn secret(&self) -> ScramSecret {
        ScramSecret::Verifier {
            salt: self.salt.clone(),
            iterations: self.iterations,
            stored_key: self.stored_key.clone(),
            server_key: self.server_key.clone(),
        }
    }

    /// Derives the keys from a cleartext password with a fresh random salt.
    fn from_password(password: &str) -> ScramKeys {
        let salt: [u8; 16] = rand::random();
        let iterations = 4096;
        let salted = gen_salted_password(password, &salt, iterations);
        match ScramSecret::verifier_from_salted_password(salt.to_vec(), salted, iterations) {
            ScramSecret::Verifier {
                salt,
                iterations,
                stored_key,
                server_key,
            } => ScramKeys {
                salt,
                iterations,
                stored_key,
                server_key,
            },
            ScramSecret::SaltedPassword { .. } => unreachable!("verifier_from_salted_password"),
        }
    }
}

/// Parses `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64 parts).
pub fn parse_scram_verifier(s: &str) -> Result<ScramKeys, String> {
    let bad = || "expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>".to_string();
    let rest = s.strip_prefix("SCRAM-SHA-256$").ok_or_else(bad)?;
    let (iter_salt, keys) = rest.split_once('$').ok_or_else(bad)?;
    let (iter, salt) = iter_salt.split_once(':').ok_or_else(bad)?;
    let (stored, server) = keys.split_once(':').ok_or_else(bad)?;
    let iterations: usize = iter.parse().map_err(|_| bad())?;
    if iterations == 0 {
        return Err(bad());
    }
    let dec = |x: &str| STANDARD.decode(x).map_err(|_| bad());
    let keys = ScramKeys {
        salt: dec(salt)?,
        iterations,
        stored_key: dec(stored)?,
        server_key: dec(server)?,
    };
    if keys.stored_key.len() != 32 || keys.server_key.len() != 32 {
        return Err("StoredKey and ServerKey must be 32 bytes (SHA-256)".into());
    }
    Ok(keys)
}

/// One login.
pub struct User {
    pub name: std::sync::Arc<str>,
    scram: Option<ScramKeys>,
    cleartext: Option<String>,
    /// `None` means every tenant.
    tenants: Option<Vec<String>>,
}

impl User {
    pub fn may_open(&self, tenant: &str) -> bool {
        match &self.tenants {
            None => true,
            Some(list) => list.iter().any(|t| t == tenant),
        }
    }
}

/// All logins, built once from the config (SCRAM keys are derived here, not per login).
pub struct UserDb {
    users: HashMap<String, User>,
}

impl UserDb {
    pub fn from_config(config: &Config) -> UserDb {
        let mut users = HashMap::new();
        for (name, u) in &config.users {
            let cleartext = u.cleartext_password();
            let scram = match &u.scram {
                Some(v) => parse_scram_verifier(v).ok(),
                None => cleartext.as_deref().map(ScramKeys::from_password),
            };
            let tenants = (!u.tenants.iter().any(|t| t == "*")).then(|| u.tenants.clone());
            users.insert(
                name.clone(),
                User {
                    name: name.as_str().into(),
                    scram,
                    cleartext,
                    tenants,
                },
            );
        }
        UserDb { users }
    }

    pub fn get(&self, name: &str) -> Option<&User> {
        self.users.get(name)
    }
}

/// Largest authentication message accepted from a client.
const MAX_AUTH_MESSAGE: usize = 10_000;

/// Runs the configured exchange with the client. On success the client is authenticated
/// (AuthenticationOk is not sent yet). `buf` is the connection's read buffer; `out` gets
/// what goes to the client with AuthenticationOk, in the same write (SCRAM's final
/// message, which needs no answer).
pub async fn authenticate(
    stream: &mut Stream,
    buf: &mut BytesMut,
    out: &mut BytesMut,
    method: AuthMethod,
    tls: Option<&crate::tls::Listener>,
    user_name: &str,
    user: Option<&User>,
) -> Result<(), PgError> {
    match method {
        AuthMethod::Trust => {
            if user.is_none() {
                return Err(PgError::password_failed(user_name));
            }
            Ok(())
        }
        AuthMethod::Md5 => md5(stream, buf, user_name, user).await,
        AuthMethod::ScramSha256 => {
            // On TLS, SCRAM-SHA-256-PLUS too: channel binding to the certificate.
            let bound = tls.filter(|_| stream.is_tls()).map(|t| &t.scram);
            scram(stream, buf, out, bound, user_name, user).await
        }
        AuthMethod::Cert => {
            // rustls verified the certificate against tls_client_ca_file during the
            // handshake; its common name must be the user's name (as PostgreSQL's cert
            // authentication without a user map).
            let cn = stream.peer_common_name();
            match (cn, user) {
                (Some(cn), Some(_)) if cn == user_name => Ok(()),
                _ => Err(PgError::certificate_failed(user_name)),
            }
        }
    }
}

async fn send_auth(stream: &mut Stream, msg: Authentication) -> Result<(), PgError> {
    let mut out = BytesMut::with_capacity(128);
    msg.encode(&mut out)
        .map_err(|e| PgError::protocol_violation(e.to_string()))?;
    stream.write_all(&out).await.map_err(PgError::client_io)
}

/// Reads one whole password-family ('p') message body.
async fn read_password_message(
    stream: &mut Stream,
    buf: &mut BytesMut,
) -> Result<BytesMut, PgError> {
    loop {
        if let Some((tag, len)) = crate::protocol::header(buf) {
            if tag != b'p' {
                return Err(PgError::protocol_violation(format!(
                    "expected password response, got message type {:?}",
                    tag as char
                )));
            }
            let len = match len {
                Ok(l) if l <= MAX_AUTH_MESSAGE => l,
                _ => {
                    return Err(PgError::protocol_violation(
                        "invalid password message length",
                    ));
                }
            };
            if buf.len() >= len {
                let mut frame = buf.split_to(len);
                let _ = frame.split_to(crate::protocol::HEADER_LEN);
                return Ok(frame);
            }
        }
        buf.reserve(1024);
        let n = stream.read_buf(buf).await.map_err(PgError::client_io)?;
        if n == 0 {
            return Err(PgError::client_io("closed during authentication"));
        }
    }
}

async fn md5(
    stream: &mut Stream,
    buf: &mut BytesMut,
    user_name: &str,
    user: Option<&User>,
) -> Result<(), PgError> {
    let salt: [u8; 4] = rand::random();
    send_auth(stream, Authentication::MD5Password(salt.to_vec())).await?;
    let body = read_password_message(stream, buf).await?;
    let len = body.len() + 4;
    let mut body = body;
    let given = PasswordMessageFamily::decode_body(&mut body, len, &Default::default())
        .and_then(|m| m.into_password())
        .map_err(|e| PgError::protocol_violation(e.to_string()))?;
    let expected = user.and_then(|u| u.cleartext.as_deref()).map(|p| {
        postgres_protocol::authentication::md5_hash(user_name.as_bytes(), p.as_bytes(), salt)
    });
    match expected {
        Some(e) if constant_time_eq(e.as_bytes(), given.password.as_bytes()) => Ok(()),
        _ => Err(PgError::password_failed(user_name)),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks a SASLInitialResponse body's structure so pgwire's decoder cannot panic on it:
/// a mechanism name, then an i32 length that is -1 or fits in what follows.
fn sasl_initial_well_formed(body: &[u8]) -> bool {
    let Some(nul) = body.iter().position(|&b| b == 0) else {
        return false;
    };
    let rest = &body[nul + 1..];
    if rest.len() < 4 {
        return false;
    }
    let n = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
    n == -1 || (n >= 0 && n as usize <= rest.len() - 4)
}

async fn scram(
    stream: &mut Stream,
    buf: &mut BytesMut,
    out: &mut BytesMut,
    bound: Option<&ScramServerAuth>,
    user_name: &str,
    user: Option<&User>,
) -> Result<(), PgError> {
    // An unknown user (or one without SCRAM keys) goes through the same exchange with
    // random keys and fails at the end, so logins do not reveal which users exist.
    let keys = user
        .and_then(|u| u.scram.clone())
        .unwrap_or_else(|| ScramKeys {
            salt: rand::random::<[u8; 16]>().to_vec(),
            iterations: 4096,
            stored_key: rand::random::<[u8; 32]>().to_vec(),
            server_key: rand::random::<[u8; 32]>().to_vec(),
        });
    let mechanisms = match bound {
        Some(_) => vec!["SCRAM-SHA-256-PLUS".into(), "SCRAM-SHA-256".into()],
        None => vec!["SCRAM-SHA-256".into()],
    };
    send_auth(stream, Authentication::SASL(mechanisms)).await?;

    let mut body = read_password_message(stream, buf).await?;
    if !sasl_initial_well_formed(&body) {
        return Err(PgError::protocol_violation("malformed SASLInitialResponse"));
    }
    let len = body.len() + 4;
    let initial = PasswordMessageFamily::decode_body(&mut body, len, &Default::default())
        .and_then(|m| m.into_sasl_initial_response())
        .map_err(|e| PgError::protocol_violation(e.to_string()))?;
    let plus = initial.auth_method == "SCRAM-SHA-256-PLUS" && bound.is_some();
    if initial.auth_method != "SCRAM-SHA-256" && !plus {
        return Err(PgError::protocol_violation(format!(
            "SASL mechanism {} is not supported",
            initial.auth_method
        )));
    }
    let first = initial
        .data
        .ok_or_else(|| PgError::protocol_violation("empty SCRAM client-first message"))?;
    // With channel binding offered, pgwire also refuses a client that says it could bind
    // but believes the server cannot (a downgrade).
    let server = bound.cloned().unwrap_or_default();
    let (server_first, waiting) = server
        .on_client_first_message_with_secret(&first, keys.secret())
        .map_err(|e| PgError::protocol_violation(e.to_string()))?;
    send_auth(
        stream,
        Authentication::SASLContinue(server_first.into_bytes().into()),
    )
    .await?;

    let body = read_password_message(stream, buf).await?;
    match waiting.on_client_final_message(&body) {
        Ok(server_final) if user.is_some_and(|u| u.scram.is_some()) => {
            Authentication::SASLFinal(server_final.into_bytes().into())
                .encode(out)
                .map_err(|e| PgError::protocol_violation(e.to_string()))
        }
        _ => Err(PgError::password_failed(user_name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifier_round_trip() {
        // Made by PostgreSQL for password "secret".
        let v = postgres_protocol::password::scram_sha_256(b"secret");
        let keys = parse_scram_verifier(&v).unwrap();
        assert_eq!(keys.iterations, 4096);
        assert_eq!(keys.stored_key.len(), 32);
        assert!(parse_scram_verifier("SCRAM-SHA-256$x:abc$def:ghi").is_err());
        assert!(parse_scram_verifier("md5abc").is_err());
    }

    #[test]
    fn sasl_initial_structure() {
        assert!(sasl_initial_well_formed(b"SCRAM-SHA-256\0\0\0\0\x03abc"));
        assert!(sasl_initial_well_formed(b"SCRAM-SHA-256\0\xff\xff\xff\xff"));
        assert!(!sasl_initial_well_formed(b"SCRAM-SHA-256\0\0\0\0\x09abc"));
        assert!(!sasl_initial_well_formed(b"SCRAM-SHA-256\0\0\0"));
        assert!(!sasl_initial_well_formed(b"SCRAM-SHA-256"));
        assert!(!sasl_initial_well_formed(b"X\0\x80\0\0\0"));
    }
}
