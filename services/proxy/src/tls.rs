//! The TLS listener's server configuration: rustls with the `ring` provider (the one the NATS
//! client already brings, so TLS adds no second crypto library), the certificate chain and key
//! from PEM files (`proxy.tls.cert_path`, `proxy.tls.key_path`), and ALPN offering `h2` then
//! `http/1.1`. The connection itself is served by the same auto (HTTP/1.1 or HTTP/2) builder as
//! the plain listener, which reads the HTTP/2 preface a client that negotiated `h2` sends.
//!
//! Certificates are read once at start; a renewed certificate takes effect at the next restart.

use std::path::Path;
use std::sync::Arc;

use stone_kit::config::ProxyTlsConfig;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Protocols offered in ALPN, most preferred first.
pub const ALPN_PROTOCOLS: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Reads the certificate and key and builds the acceptor; every error names the key and file.
pub fn acceptor(settings: &ProxyTlsConfig) -> anyhow::Result<TlsAcceptor> {
    let certificates = read_certificates(&settings.cert_path)?;
    let key = PrivateKeyDer::from_pem_file(&settings.key_path).map_err(|error| {
        anyhow::anyhow!("invalid configuration: proxy.tls.key_path: {}: {error}", settings.key_path.display())
    })?;
    let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|error| anyhow::anyhow!("TLS: {error}"))?
        .with_no_client_auth()
        .with_single_cert(certificates, key)
        .map_err(|error| {
            anyhow::anyhow!(
                "invalid configuration: proxy.tls: the certificate in {} and the key in {} are not usable together: \
                 {error}",
                settings.cert_path.display(),
                settings.key_path.display()
            )
        })?;
    config.alpn_protocols = ALPN_PROTOCOLS.iter().map(|protocol| protocol.to_vec()).collect();
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn read_certificates(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let fail =
        |message: String| anyhow::anyhow!("invalid configuration: proxy.tls.cert_path: {}: {message}", path.display());
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|error| fail(error.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| fail(error.to_string()))?;
    if certificates.is_empty() {
        return Err(fail("no CERTIFICATE block in the file".to_owned()));
    }
    Ok(certificates)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_files_name_the_key_and_the_file() {
        let settings = ProxyTlsConfig {
            cert_path: "/nonexistent/cert.pem".into(),
            key_path: "/nonexistent/key.pem".into(),
            ..ProxyTlsConfig::default()
        };
        let message = acceptor(&settings).err().map(|error| error.to_string()).unwrap_or_default();
        assert!(message.contains("proxy.tls.cert_path") && message.contains("/nonexistent/cert.pem"), "{message}");

        let dir = std::env::temp_dir().join(format!("stone-tls-test-{}", uuid::Uuid::now_v7().simple()));
        assert!(std::fs::create_dir_all(&dir).is_ok());
        let empty = dir.join("empty.pem");
        assert!(std::fs::write(&empty, "not a certificate\n").is_ok());
        let settings = ProxyTlsConfig { cert_path: empty, ..settings };
        let message = acceptor(&settings).err().map(|error| error.to_string()).unwrap_or_default();
        assert!(message.contains("proxy.tls.cert_path") && message.contains("no CERTIFICATE"), "{message}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
