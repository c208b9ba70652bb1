//! The `legacy` TLS profile, through OpenSSL: rustls will never speak
//! TLS 1.0/1.1 or the RSA key exchange and CBC suites that office printers
//! and scanners of the 2010s still need.

use anyhow::Context;
use openssl::pkey::Id;
use openssl::ssl::{SslAcceptor, SslFiletype, SslMethod, SslOptions, SslVersion};

use crate::config::TlsConfig;

/// OpenSSL's default suites, which include TLS_RSA_WITH_AES_128_CBC_SHA
/// and its kin, at security level 0: OpenSSL 3 refuses TLS 1.0 and 1.1
/// (SHA-1 handshake signatures) at any higher level.
const CIPHERS: &str = "DEFAULT:@SECLEVEL=0";

/// What start and `sendbridge check` say of a legacy listener.
pub fn warning(address: impl std::fmt::Display) -> String {
    format!(
        "listener {address} accepts TLS 1.0/1.1 and CBC suites for old devices; restrict its trusted_networks (or set require_auth = true)"
    )
}

/// An acceptor for TLS 1.0 to 1.3 with the certificate at `pair`. With
/// server preference, a client that can do better still gets ECDHE and
/// AES-GCM (or TLS 1.3); only the old ones fall back.
pub fn acceptor(pair: &TlsConfig) -> anyhow::Result<SslAcceptor> {
    let mut builder = SslAcceptor::mozilla_intermediate(SslMethod::tls_server())?;
    builder.clear_options(SslOptions::NO_TLSV1_3);
    builder.set_options(SslOptions::CIPHER_SERVER_PREFERENCE);
    builder.set_min_proto_version(Some(SslVersion::TLS1))?;
    builder.set_max_proto_version(None)?;
    builder.set_cipher_list(CIPHERS)?;
    builder
        .set_certificate_chain_file(&pair.cert)
        .with_context(|| format!("tls.cert: cannot read {}", pair.cert.display()))?;
    builder
        .set_private_key_file(&pair.key, SslFiletype::PEM)
        .with_context(|| format!("tls.key: cannot read {}", pair.key.display()))?;
    builder
        .check_private_key()
        .context("tls.cert/tls.key do not form a usable certificate")?;
    let acceptor = builder.build();
    let rsa = acceptor
        .context()
        .private_key()
        .is_some_and(|key| key.id() == Id::RSA);
    if !rsa {
        tracing::warn!(
            cert = %pair.cert.display(),
            "the certificate's key is not RSA: devices that know only TLS_RSA suites cannot connect to legacy listeners; use an RSA certificate in tls.cert/tls.key (or delete a generated one: the next start generates an RSA one)"
        );
    }
    Ok(acceptor)
}
