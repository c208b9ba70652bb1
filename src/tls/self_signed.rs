//! The self-signed certificate generated on first start: the names clients
//! reach the relay by, and what `sendbridge cert` shows of a certificate
//! for importing it into devices.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use anyhow::Context;
use openssl::hash::MessageDigest;
use openssl::x509::X509;

use crate::config::TlsConfig;
use crate::private_files;

/// Generates an RSA certificate and key at `pair`: RSA, because the old
/// devices of `legacy` listeners know only RSA key exchange and signatures.
pub(super) fn generate(pair: &TlsConfig, hostname: &str) -> anyhow::Result<()> {
    // OpenSSL makes the key: its build is optimised even in debug builds,
    // where aws-lc's RSA key generation takes ten times as long.
    let rsa = openssl::pkey::PKey::from_rsa(openssl::rsa::Rsa::generate(2048)?)?;
    let key = rcgen::KeyPair::try_from(rsa.private_key_to_pkcs8()?.as_slice())?;
    let mut params = rcgen::CertificateParams::new(names(hostname, &interface_addresses()))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, hostname);
    let cert = params.self_signed(&key)?;
    for path in [&pair.cert, &pair.key] {
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            private_files::create_dir_all(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    // Both 0600: the pair may be generated under the spool.
    private_files::write(&pair.cert, cert.pem().as_bytes())
        .with_context(|| format!("writing {}", pair.cert.display()))?;
    write_new(&pair.key, key.serialize_pem().as_bytes())
        .with_context(|| format!("writing {}", pair.key.display()))?;
    tracing::info!(
        cert = %pair.cert.display(),
        key = %pair.key.display(),
        "generated a self-signed certificate for STARTTLS (`sendbridge cert` shows its fingerprint for importing into devices)"
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

/// The names a client may check the certificate against: the host name,
/// `localhost`, both loopback addresses and the machine's own addresses
/// (a printer is often given the relay's IP address), each once.
fn names(hostname: &str, addresses: &[IpAddr]) -> Vec<String> {
    let loopback = [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ];
    // A link-local address means something else on every link.
    let reachable = addresses
        .iter()
        .filter(|ip| !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local()));
    let mut names = vec![hostname.to_string(), "localhost".to_string()];
    for ip in loopback.iter().chain(reachable) {
        let name = ip.to_string();
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// The addresses of the machine's interfaces (`getifaddrs`); none when it
/// fails.
fn interface_addresses() -> Vec<IpAddr> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: on success `list` is a linked list that stays valid until
    // `freeifaddrs`, which is called once below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Vec::new();
    }
    let mut found = Vec::new();
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: a non-null entry of the list; `ifa_addr` is null or points
        // to a sockaddr of the family it names.
        unsafe {
            let address = (*entry).ifa_addr;
            if !address.is_null() {
                match i32::from((*address).sa_family) {
                    libc::AF_INET => {
                        let v4 = &*(address as *const libc::sockaddr_in);
                        found.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr))));
                    }
                    libc::AF_INET6 => {
                        let v6 = &*(address as *const libc::sockaddr_in6);
                        found.push(IpAddr::from(v6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            entry = (*entry).ifa_next;
        }
    }
    // SAFETY: the list from the successful call above, freed once.
    unsafe { libc::freeifaddrs(list) };
    found
}

/// What a device's certificate import asks for.
pub struct Description {
    pub path: PathBuf,
    /// Upper-case hex bytes separated by colons, as `openssl x509
    /// -fingerprint` and most device UIs show them.
    pub sha256: String,
    pub sha1: String,
    /// `DNS:name` and `IP:address`, in the certificate's order.
    pub names: Vec<String>,
    pub not_after: String,
}

/// Reads the first certificate of the PEM file at `path`.
pub fn describe(path: &Path) -> anyhow::Result<Description> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let cert = X509::from_pem(&pem)
        .with_context(|| format!("{} is not a PEM certificate", path.display()))?;
    let fingerprint = |digest| -> anyhow::Result<String> {
        let bytes = cert.digest(digest)?;
        let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02X}")).collect();
        Ok(hex.join(":"))
    };
    let names = cert
        .subject_alt_names()
        .into_iter()
        .flatten()
        .filter_map(|name| {
            if let Some(dns) = name.dnsname() {
                return Some(format!("DNS:{dns}"));
            }
            let ip = match name.ipaddress()? {
                &[a, b, c, d] => IpAddr::from([a, b, c, d]),
                bytes => IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
            };
            Some(format!("IP:{ip}"))
        })
        .collect();
    Ok(Description {
        path: path.to_path_buf(),
        sha256: fingerprint(MessageDigest::sha256())?,
        sha1: fingerprint(MessageDigest::sha1())?,
        names,
        not_after: cert.not_after().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_names_are_the_host_localhost_loopback_and_reachable_addresses_once() {
        let ips = |written: &[&str]| -> Vec<IpAddr> {
            written.iter().map(|ip| ip.parse().unwrap()).collect()
        };
        // (interface addresses, names after the host name and localhost)
        let cases: [(&[&str], &[&str]); 3] = [
            (&[], &["127.0.0.1", "::1"]),
            (
                &[
                    "127.0.0.1",
                    "192.168.1.10",
                    "::1",
                    "fe80::1",
                    "2001:db8::10",
                ],
                &["127.0.0.1", "::1", "192.168.1.10", "2001:db8::10"],
            ),
            (&["10.0.0.5", "10.0.0.5"], &["127.0.0.1", "::1", "10.0.0.5"]),
        ];
        for (addresses, expected) in cases {
            let names = names("relay.example", &ips(addresses));
            let mut all = vec!["relay.example", "localhost"];
            all.extend(expected);
            assert_eq!(names, all, "{addresses:?}");
        }
    }

    #[test]
    fn the_interfaces_include_loopback() {
        let found = interface_addresses();
        assert!(
            found.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)),
            "{found:?}"
        );
    }

    #[test]
    fn a_generated_certificate_is_rsa_and_names_its_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let pair = TlsConfig {
            cert: dir.path().join("c.crt"),
            key: dir.path().join("c.key"),
        };
        generate(&pair, "relay.example").unwrap();

        let description = describe(&pair.cert).unwrap();

        let names = &description.names;
        for expected in [
            "DNS:relay.example",
            "DNS:localhost",
            "IP:127.0.0.1",
            "IP:::1",
        ] {
            assert!(names.iter().any(|n| n == expected), "{expected}: {names:?}");
        }
        for ip in interface_addresses().iter().filter(|ip| !ip.is_loopback()) {
            let link_local = matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local());
            let named = names.contains(&format!("IP:{ip}"));
            assert_eq!(named, !link_local, "{ip}: {names:?}");
        }
        assert_eq!(description.sha256.len(), 32 * 3 - 1);
        assert_eq!(description.sha1.len(), 20 * 3 - 1);
        let key = std::fs::read(&pair.key).unwrap();
        let key = openssl::pkey::PKey::private_key_from_pem(&key).unwrap();
        assert_eq!(key.id(), openssl::pkey::Id::RSA);
    }
}
