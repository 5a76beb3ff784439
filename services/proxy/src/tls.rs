//! The TLS listener's server configuration: rustls with the `ring` provider (the one the NATS
//! client already brings, so TLS adds no second crypto library), the certificate chain and key
//! from PEM files (`proxy.tls.cert_path`, `proxy.tls.key_path`), and ALPN offering `h2` then
//! `http/1.1`. The connection itself is served by the same auto (HTTP/1.1 or HTTP/2) builder as
//! the plain listener, which reads the HTTP/2 preface a client that negotiated `h2` sends.
//!
//! The files are checked every [`RELOAD_CHECK`]: a renewed certificate (say, from an ACME
//! client) is used for the handshakes that follow, without a restart; connections already open
//! keep theirs. A pair that cannot be used (unreadable, half written, key not matching) is logged
//! and counted (`stone_proxy_tls_reloads_total{outcome}`), and the certificate in force stays.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use stone_kit::config::ProxyTlsConfig;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::crypto::{CryptoProvider, ring};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

/// How often the certificate and key files are checked for a change (two `stat` calls).
pub const RELOAD_CHECK: Duration = Duration::from_secs(2);

/// Protocols offered in ALPN, most preferred first.
pub const ALPN_PROTOCOLS: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Reads the certificate and key, builds the acceptor and starts watching the files until `token`
/// is cancelled; every error names the key and file.
pub fn acceptor(settings: &ProxyTlsConfig, token: CancellationToken) -> anyhow::Result<TlsAcceptor> {
    let provider = Arc::new(ring::default_provider());
    let certified = load(settings, &provider)?;
    let resolver = Arc::new(Reloading { current: RwLock::new(Arc::new(certified)) });
    let mut config = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|error| anyhow::anyhow!("TLS: {error}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::clone(&resolver) as Arc<dyn ResolvesServerCert>);
    config.alpn_protocols = ALPN_PROTOCOLS.iter().map(|protocol| protocol.to_vec()).collect();
    tokio::spawn(watch(settings.clone(), provider, resolver, token));
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The certificate in force, swapped when the files change.
#[derive(Debug)]
struct Reloading {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|current| Arc::clone(&current))
    }
}

/// The chain and key from the files, checked to belong together.
fn load(settings: &ProxyTlsConfig, provider: &CryptoProvider) -> anyhow::Result<CertifiedKey> {
    let certificates = read_certificates(&settings.cert_path)?;
    let key = PrivateKeyDer::from_pem_file(&settings.key_path).map_err(|error| {
        anyhow::anyhow!("invalid configuration: proxy.tls.key_path: {}: {error}", settings.key_path.display())
    })?;
    CertifiedKey::from_der(certificates, key, provider).map_err(|error| {
        anyhow::anyhow!(
            "invalid configuration: proxy.tls: the certificate in {} and the key in {} are not usable together: \
             {error}",
            settings.cert_path.display(),
            settings.key_path.display()
        )
    })
}

/// Modification time and length of both files: what a renewal changes.
fn stamp(settings: &ProxyTlsConfig) -> Option<[(SystemTime, u64); 2]> {
    let of = |path: &Path| std::fs::metadata(path).ok().and_then(|meta| Some((meta.modified().ok()?, meta.len())));
    Some([of(&settings.cert_path)?, of(&settings.key_path)?])
}

async fn watch(
    settings: ProxyTlsConfig,
    provider: Arc<CryptoProvider>,
    resolver: Arc<Reloading>,
    token: CancellationToken,
) {
    let mut seen = stamp(&settings);
    loop {
        tokio::select! {
            () = tokio::time::sleep(RELOAD_CHECK) => {}
            () = token.cancelled() => return,
        }
        let now = stamp(&settings);
        if now.is_none() || now == seen {
            continue;
        }
        seen = now;
        match load(&settings, &provider) {
            Ok(certified) => {
                if let Ok(mut current) = resolver.current.write() {
                    *current = Arc::new(certified);
                }
                metrics::counter!("stone_proxy_tls_reloads_total", "outcome" => "reloaded").increment(1);
                tracing::info!(cert = %settings.cert_path.display(), "TLS certificate reloaded");
            }
            Err(error) => {
                metrics::counter!("stone_proxy_tls_reloads_total", "outcome" => "failed").increment(1);
                tracing::warn!(%error, "TLS certificate not reloaded; keeping the one in force");
            }
        }
    }
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
        let message =
            acceptor(&settings, CancellationToken::new()).err().map(|error| error.to_string()).unwrap_or_default();
        assert!(message.contains("proxy.tls.cert_path") && message.contains("/nonexistent/cert.pem"), "{message}");

        let dir = std::env::temp_dir().join(format!("stone-tls-test-{}", uuid::Uuid::now_v7().simple()));
        assert!(std::fs::create_dir_all(&dir).is_ok());
        let empty = dir.join("empty.pem");
        assert!(std::fs::write(&empty, "not a certificate\n").is_ok());
        let settings = ProxyTlsConfig { cert_path: empty, ..settings };
        let message =
            acceptor(&settings, CancellationToken::new()).err().map(|error| error.to_string()).unwrap_or_default();
        assert!(message.contains("proxy.tls.cert_path") && message.contains("no CERTIFICATE"), "{message}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
