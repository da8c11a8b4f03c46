//! TLS for the API's optional TCP listener (`run --flows-listen`) and its
//! clients (`observe --server`): PEM files read and checked up front, so
//! that a bad file stops the agent (or the client) with one clear line
//! instead of failing every handshake later.
//!
//! Certificates and keys are PEM (`CERTIFICATE`; `PRIVATE KEY`, `RSA
//! PRIVATE KEY` or `EC PRIVATE KEY`). TLS is rustls with ring.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::pki_types::pem::{self, PemObject as _};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// How long a client may take to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the TLS files cannot be used. `what` names the file's role
/// ("certificate", "private key", "client CA", "CA").
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS {what} {}: {source}", .path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS {what} {}: invalid PEM: {reason}", .path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("TLS {what} {}: no PEM CERTIFICATE block in it", .path.display())]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("TLS private key {}: no PEM private key in it (PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)", .path.display())]
    NoKey { path: PathBuf },
    #[error("TLS {what} {}: not a usable CA certificate: {reason}", .path.display())]
    BadCa {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// The files parse but do not go together (e.g. the key is not the
    /// certificate's).
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn pem_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(pem::Error) -> TlsError + 'a {
    move |e| TlsError::Pem {
        what,
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

/// Reads a PEM file of certificates (at least one).
fn certificates(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let bytes = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error(what, path))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

/// Reads a PEM file of CA certificates, each of which must be usable as a
/// trust anchor.
fn ca(what: &'static str, path: &Path) -> Result<Certificate, TlsError> {
    let bytes = certificates(what, path)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&bytes) {
        let cert = cert.map_err(pem_error(what, path))?;
        roots.add(cert).map_err(|e| TlsError::BadCa {
            what,
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    }
    Ok(Certificate::from_pem(bytes))
}

/// Reads a certificate chain and its private key.
fn identity(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
    let cert = certificates("certificate", cert)?;
    let key_bytes = read("private key", key)?;
    match PrivateKeyDer::from_pem_slice(&key_bytes) {
        Ok(_) => {}
        Err(pem::Error::NoItemsFound) => {
            return Err(TlsError::NoKey {
                path: key.to_owned(),
            });
        }
        Err(e) => return Err(pem_error("private key", key)(e)),
    }
    Ok(Identity::from_pem(cert, key_bytes))
}

/// rustls picks its crypto from the process default; ring is the one this
/// tree builds (as kube's client does).
fn install_ring() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The error with its causes, on one line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        // Wrappers often repeat their cause's text.
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// The server's TLS: its certificate chain and key; with `client_ca`,
/// clients must present a certificate signed by it (mutual TLS).
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<ServerTlsConfig, TlsError> {
    install_ring();
    let mut config = ServerTlsConfig::new()
        .identity(identity(cert, key)?)
        .timeout(HANDSHAKE_TIMEOUT);
    if let Some(path) = client_ca {
        config = config.client_ca_root(ca("client CA", path)?);
    }
    // Builds the rustls configuration now: the key must match the
    // certificate.
    tonic::transport::Server::builder()
        .tls_config(config.clone())
        .map_err(|e| TlsError::Config(chain(&e)))?;
    Ok(config)
}

/// A client's TLS: the CA that signed the agent's certificate, and with
/// `identity` (certificate, key) the client's own certificate for mutual
/// TLS.
pub fn client_config(
    ca_path: &Path,
    identity_files: Option<(&Path, &Path)>,
) -> Result<ClientTlsConfig, TlsError> {
    install_ring();
    let mut config = ClientTlsConfig::new()
        .ca_certificate(ca("CA", ca_path)?)
        .timeout(HANDSHAKE_TIMEOUT);
    if let Some((cert, key)) = identity_files {
        config = config.identity(identity(cert, key)?);
    }
    tonic::transport::Endpoint::from_static("https://palisade-agent")
        .tls_config(config.clone())
        .map_err(|e| TlsError::Config(chain(&e)))?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Files {
        dir: PathBuf,
    }

    impl Files {
        fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("palisade-tls-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self { dir }
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        }
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// A self-signed CA, and a server certificate (127.0.0.1) it signed:
    /// (ca, cert, key) as PEM.
    fn generate() -> (String, String, String) {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        (ca.pem(), cert.pem(), key.serialize_pem())
    }

    #[test]
    fn good_files_load() {
        let files = Files::new("good");
        let (ca_pem, cert_pem, key_pem) = generate();
        let ca = files.write("ca.pem", &ca_pem);
        let cert = files.write("cert.pem", &cert_pem);
        let key = files.write("key.pem", &key_pem);
        server_config(&cert, &key, None).unwrap();
        server_config(&cert, &key, Some(&ca)).unwrap();
        client_config(&ca, None).unwrap();
        client_config(&ca, Some((&cert, &key))).unwrap();
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let files = Files::new("bad");
        let (ca_pem, cert_pem, key_pem) = generate();
        let ca = files.write("ca.pem", &ca_pem);
        let cert = files.write("cert.pem", &cert_pem);
        let key = files.write("key.pem", &key_pem);
        let missing = files.dir.join("missing.pem");
        let empty = files.write("empty.pem", "");
        let text = files.write("text.pem", "hello\n");
        let truncated = files.write(
            "truncated.pem",
            &cert_pem[..cert_pem.find("-----END").unwrap()],
        );
        let garbage = files.write(
            "garbage.pem",
            "-----BEGIN CERTIFICATE-----\n!!!not base64!!!\n-----END CERTIFICATE-----\n",
        );
        let not_x509 = files.write(
            "notx509.pem",
            "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n",
        );
        let (_, _, other_key_pem) = generate();
        let other_key = files.write("other-key.pem", &other_key_pem);

        let err = server_config(&missing, &key, None).unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::Read {
                    what: "certificate",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("missing.pem"), "{err}");
        let err = server_config(&cert, &missing, None).unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::Read {
                    what: "private key",
                    ..
                }
            ),
            "{err}"
        );
        for bad in [&empty, &text, &key] {
            let err = server_config(bad, &key, None).unwrap_err();
            assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
        }
        for bad in [&truncated, &garbage] {
            let err = server_config(bad, &key, None).unwrap_err();
            assert!(matches!(err, TlsError::Pem { .. }), "{err}");
        }
        for bad in [&empty, &cert] {
            let err = server_config(&cert, bad, None).unwrap_err();
            assert!(matches!(err, TlsError::NoKey { .. }), "{err}");
        }
        let err = server_config(&cert, &other_key, None).unwrap_err();
        assert!(matches!(err, TlsError::Config(_)), "{err}");
        let err = server_config(&cert, &key, Some(&not_x509)).unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::BadCa {
                    what: "client CA",
                    ..
                }
            ),
            "{err}"
        );
        let err = server_config(&cert, &key, Some(&missing)).unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::Read {
                    what: "client CA",
                    ..
                }
            ),
            "{err}"
        );
        let err = client_config(&text, None).unwrap_err();
        assert!(
            matches!(err, TlsError::NoCertificate { what: "CA", .. }),
            "{err}"
        );
        let err = client_config(&ca, Some((&cert, &other_key))).unwrap_err();
        assert!(matches!(err, TlsError::Config(_)), "{err}");
        // Every message is one line naming the file.
        for err in [
            server_config(&garbage, &key, None).unwrap_err(),
            server_config(&cert, &key, Some(&not_x509)).unwrap_err(),
        ] {
            let text = err.to_string();
            assert_eq!(text.lines().count(), 1, "{text}");
            assert!(text.contains(&files.dir.display().to_string()), "{text}");
        }
    }
}
