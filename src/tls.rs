//! TLS material: the inbound certificate (loaded, or generated on first start)
//! and the trust store used to verify upstream servers.

use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::TlsConfig;
use crate::private_files;

/// Installs the one crypto provider this binary ships (aws-lc-rs). rustls
/// refuses to guess when a dependency compiles in a second one.
pub fn install_crypto_provider() {
    // An error only means a provider is already installed (tests start many relays).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The acceptor for STARTTLS and the implicit-TLS listener. When neither
/// configured file exists, a self-signed certificate is generated there or,
/// when that location cannot be written (a read-only mount in a container),
/// under `<spool>/certs/`, where later starts find it again. `None` when
/// neither works: the relay then runs without TLS.
pub fn inbound_acceptor(
    config: &TlsConfig,
    hostname: &str,
    spool_dir: &Path,
) -> anyhow::Result<Option<TlsAcceptor>> {
    let in_spool = TlsConfig {
        cert: spool_dir.join("certs/sendbridge.crt"),
        key: spool_dir.join("certs/sendbridge.key"),
    };
    let pair = if pair_exists(config)? {
        config
    } else if pair_exists(&in_spool)? {
        tracing::info!(
            cert = %in_spool.cert.display(),
            "using the self-signed certificate generated under the spool (tls.cert does not exist)"
        );
        &in_spool
    } else {
        match generate_self_signed(config, hostname) {
            Ok(()) => config,
            Err(err) => {
                tracing::info!(
                    cert = %config.cert.display(),
                    error = %format!("{err:#}"),
                    "cannot write the self-signed certificate at tls.cert; generating it under the spool"
                );
                if let Err(err) = generate_self_signed(&in_spool, hostname) {
                    tracing::warn!(
                        cert = %in_spool.cert.display(),
                        error = %format!("{err:#}"),
                        "cannot create a self-signed certificate; STARTTLS is not offered (set tls.cert and tls.key)"
                    );
                    return Ok(None);
                }
                &in_spool
            }
        }
    };
    let certs = read_certs(&pair.cert).context("tls.cert")?;
    let key = read_key(&pair.key).context("tls.key")?;
    let server = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("tls.cert/tls.key do not form a usable certificate")?;
    Ok(Some(TlsAcceptor::from(Arc::new(server))))
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

fn generate_self_signed(pair: &TlsConfig, hostname: &str) -> anyhow::Result<()> {
    let names = vec![hostname.to_string(), "localhost".to_string()];
    let certified = rcgen::generate_simple_self_signed(names)?;
    for path in [&pair.cert, &pair.key] {
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            private_files::create_dir_all(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    // Both 0600: the pair may be generated under the spool.
    private_files::write(&pair.cert, certified.cert.pem().as_bytes())
        .with_context(|| format!("writing {}", pair.cert.display()))?;
    write_new(&pair.key, certified.signing_key.serialize_pem().as_bytes())
        .with_context(|| format!("writing {}", pair.key.display()))?;
    tracing::info!(
        cert = %pair.cert.display(),
        key = %pair.key.display(),
        "generated a self-signed certificate for STARTTLS"
    );
    Ok(())
}

/// Writes a new file only its owner can read (never an existing one's mode).
fn write_new(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = private_files::options();
    options.write(true).create_new(true);
    options.open(path)?.write_all(contents)
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
