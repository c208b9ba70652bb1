//! `[[listeners]]`: SMTP listeners besides `server.listen` and
//! `server.listen_tls`, each with its own TLS mode, TLS profile and rules
//! for who may send without signing in.

use std::net::SocketAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::values::optional_networks;
use super::{Config, ConfigError};

/// One `[[listeners]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    #[serde(default)]
    pub tls: ListenerTls,
    #[serde(default)]
    pub tls_profile: TlsProfile,
    /// Replaces `server.trusted_networks` for this listener when set.
    #[serde(default, deserialize_with = "optional_networks")]
    pub trusted_networks: Option<Vec<IpNet>>,
    /// Every client must sign in, whatever its address.
    #[serde(default)]
    pub require_auth: bool,
}

/// How a listener speaks TLS with its clients.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerTls {
    /// Plain SMTP only; STARTTLS is not offered.
    None,
    /// Plain SMTP that offers STARTTLS (when a certificate is available).
    #[default]
    Starttls,
    /// TLS from the first byte (SMTPS, usually port 465).
    Implicit,
}

/// Which TLS versions and cipher suites a listener accepts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsProfile {
    /// rustls: TLS 1.2 and 1.3 with forward-secret AEAD suites.
    #[default]
    Modern,
    /// OpenSSL: also TLS 1.0 and 1.1 and the RSA key exchange and CBC
    /// suites of old printers and scanners.
    Legacy,
}

impl ListenerTls {
    /// As written in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            ListenerTls::None => "none",
            ListenerTls::Starttls => "starttls",
            ListenerTls::Implicit => "implicit",
        }
    }
}

impl TlsProfile {
    /// As written in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            TlsProfile::Modern => "modern",
            TlsProfile::Legacy => "legacy",
        }
    }
}

/// A listener as the relay runs it, named by the key that configured it.
#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    /// `server.listen`, `server.listen_tls` or `listeners[N]`, for messages.
    pub key: String,
    pub settings: ListenerConfig,
}

impl Config {
    /// Every SMTP listener: `server.listen` (STARTTLS), `server.listen_tls`
    /// (implicit TLS) when set, then the `[[listeners]]` entries in order.
    pub fn all_listeners(&self) -> Vec<Listener> {
        let server = |address, tls| ListenerConfig {
            address,
            tls,
            tls_profile: TlsProfile::Modern,
            trusted_networks: None,
            require_auth: false,
        };
        let main = Listener {
            key: "server.listen".to_string(),
            settings: server(self.server.listen, ListenerTls::Starttls),
        };
        let implicit = self.server.listen_tls.map(|address| Listener {
            key: "server.listen_tls".to_string(),
            settings: server(address, ListenerTls::Implicit),
        });
        let listed = self
            .listeners
            .iter()
            .enumerate()
            .map(|(n, settings)| Listener {
                key: format!("listeners[{n}]"),
                settings: settings.clone(),
            });
        std::iter::once(main)
            .chain(implicit)
            .chain(listed)
            .collect()
    }

    /// Settings of a listener that contradict each other.
    pub(super) fn validate_listeners(&self) -> Result<(), ConfigError> {
        for listener in self.all_listeners() {
            let settings = &listener.settings;
            if settings.tls_profile == TlsProfile::Legacy && settings.tls == ListenerTls::None {
                return Err(ConfigError::new(
                    format!("{}.tls_profile", listener.key),
                    "\"legacy\" needs tls = \"starttls\" or \"implicit\"",
                ));
            }
            if settings.require_auth && settings.trusted_networks.is_some() {
                return Err(ConfigError::new(
                    format!("{}.trusted_networks", listener.key),
                    "has no effect with require_auth = true (every client signs in); remove one of them",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_listeners_come_first_then_the_listed_ones() {
        let config = Config::from_toml(
            r#"
            [server]
            listen = "127.0.0.1:2525"
            listen_tls = "127.0.0.1:4465"
            [[listeners]]
            address = "192.168.1.10:25"
            tls_profile = "legacy"
            trusted_networks = ["192.168.1.50", "10.0.0.0/8"]
            [[listeners]]
            address = "0.0.0.0:587"
            require_auth = true
            "#,
        )
        .unwrap();

        let listeners = config.all_listeners();

        let summary: Vec<_> = listeners
            .iter()
            .map(|l| {
                let s = &l.settings;
                (l.key.as_str(), s.address.to_string(), s.tls, s.tls_profile)
            })
            .collect();
        assert_eq!(
            summary,
            [
                (
                    "server.listen",
                    "127.0.0.1:2525".into(),
                    ListenerTls::Starttls,
                    TlsProfile::Modern
                ),
                (
                    "server.listen_tls",
                    "127.0.0.1:4465".into(),
                    ListenerTls::Implicit,
                    TlsProfile::Modern
                ),
                (
                    "listeners[0]",
                    "192.168.1.10:25".into(),
                    ListenerTls::Starttls,
                    TlsProfile::Legacy
                ),
                (
                    "listeners[1]",
                    "0.0.0.0:587".into(),
                    ListenerTls::Starttls,
                    TlsProfile::Modern
                ),
            ]
        );
        let networks = listeners[2].settings.trusted_networks.as_ref().unwrap();
        let networks: Vec<_> = networks.iter().map(|n| n.to_string()).collect();
        assert_eq!(networks, ["192.168.1.50/32", "10.0.0.0/8"]);
        assert!(listeners[3].settings.require_auth);
        assert_eq!(listeners[3].settings.trusted_networks, None);
    }

    #[test]
    fn contradicting_listener_settings_name_the_key() {
        // (listener entry, key of the error)
        let cases = [
            (
                "address = \"127.0.0.1:25\"\ntls = \"none\"\ntls_profile = \"legacy\"",
                "listeners[0].tls_profile",
            ),
            (
                "address = \"127.0.0.1:25\"\nrequire_auth = true\ntrusted_networks = [\"10.0.0.0/8\"]",
                "listeners[0].trusted_networks",
            ),
            (
                "address = \"127.0.0.1:25\"\ntls = \"implicit\"\ntls_profile = \"legacy\"",
                "",
            ),
        ];
        for (entry, key) in cases {
            let result = Config::from_toml(&format!("[[listeners]]\n{entry}"));
            match result {
                Err(err) => assert_eq!(err.key, key, "{entry}: {err}"),
                Ok(_) => assert_eq!(key, "", "{entry} is accepted"),
            }
        }
    }
}
