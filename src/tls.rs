//! TLS material: the inbound certificate (loaded, or generated on first start),
//! the acceptors of the listeners (rustls; OpenSSL for `legacy` ones) and
//! the trust store used to verify upstream servers.

use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::TlsConfig;

mod acceptor;
pub mod legacy;
pub mod self_signed;

pub use acceptor::{Acceptor, InboundTls};

/// Installs the one crypto provider this binary ships (aws-lc-rs). rustls
/// refuses to guess when a dependency compiles in a second one.
pub fn install_crypto_provider() {
    // An error only means a provider is already installed (tests start many relays).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The certificate and key of the relay's TLS listeners. When neither
/// configured file exists, a self-signed certificate is generated there or,
/// when that location cannot be written (a read-only mount in a container),
/// under `<spool>/certs/`, where later starts find it again. `None` when
/// neither works: the relay then runs without TLS.
pub fn certificate(
    config: &TlsConfig,
    hostname: &str,
    spool_dir: &Path,
) -> anyhow::Result<Option<TlsConfig>> {
    let in_spool = TlsConfig {
        cert: spool_dir.join("certs/sendbridge.crt"),
        key: spool_dir.join("certs/sendbridge.key"),
    };
    if pair_exists(config)? {
        return Ok(Some(config.clone()));
    }
    if pair_exists(&in_spool)? {
        tracing::info!(
            cert = %in_spool.cert.display(),
            "using the self-signed certificate generated under the spool (tls.cert does not exist)"
        );
        return Ok(Some(in_spool));
    }
    let Err(err) = self_signed::generate(config, hostname) else {
        return Ok(Some(config.clone()));
    };
    tracing::info!(
        cert = %config.cert.display(),
        error = %format!("{err:#}"),
        "cannot write the self-signed certificate at tls.cert; generating it under the spool"
    );
    if let Err(err) = self_signed::generate(&in_spool, hostname) {
        tracing::warn!(
            cert = %in_spool.cert.display(),
            error = %format!("{err:#}"),
            "cannot create a self-signed certificate; STARTTLS is not offered (set tls.cert and tls.key)"
        );
        return Ok(None);
    }
    Ok(Some(in_spool))
}

/// The rustls acceptor of `modern` listeners.
pub fn modern_acceptor(pair: &TlsConfig) -> anyhow::Result<TlsAcceptor> {
    let certs = read_certs(&pair.cert).context("tls.cert")?;
    let key = read_key(&pair.key).context("tls.key")?;
    let server = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("tls.cert/tls.key do not form a usable certificate")?;
    Ok(TlsAcceptor::from(Arc::new(server)))
}

/// Whether both files exist; one without the other is an error.
fn pair_exists(pair: &TlsConfig) -> anyhow::Result<bool> {
    match (pair.cert.exists(), pair.key.exists()) {
        (true, true) => Ok(true),
        (false, false) => Ok(false),
        (true, false) => bail!("tls.key: {} does not exist", pair.key.display()),
        (false, true) => bail!("tls.cert: {} does not exist", pair.cert.display()),
    }
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not PEM", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no certificate", path.display());
    }
    Ok(certs)
}

fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    rustls_pemfile::private_key(&mut BufReader::new(file))
        .with_context(|| format!("{} is not PEM", path.display()))?
        .with_context(|| format!("{} holds no private key", path.display()))
}

/// A connector that verifies upstream servers against the system's roots,
/// the bundled Mozilla roots (a `scratch` container has no system store) and
/// the account's `ca_file`.
pub fn upstream_connector(ca_file: Option<&Path>) -> anyhow::Result<TlsConnector> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // Unreadable system certificates are skipped; the bundled roots remain.
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(ca_file) = ca_file {
        for cert in read_certs(ca_file)? {
            roots.add(cert).with_context(|| {
                format!("{} holds an unusable CA certificate", ca_file.display())
            })?;
        }
    }
    let client = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(client)))
}
