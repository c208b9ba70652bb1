//! The settings a running relay sets up once: listeners, certificates, the
//! spool, the delivery engine, logging, the admin interface and connection
//! limits. A reload cannot change them, so it names the ones that changed.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use super::{Config, DeliveryConfig, ListenerConfig, LogFormat, TlsConfig};
use crate::secret::Secret;

/// Everything a running relay cannot change, compared as a whole. Each
/// field is named by its configuration key (a `*` stands for each account
/// name), so [`Startup::changed_keys`] names a field added here without
/// further code.
#[derive(Debug, PartialEq, Serialize)]
pub struct Startup {
    #[serde(rename = "server.listen")]
    listen: SocketAddr,
    #[serde(rename = "server.listen_tls")]
    listen_tls: Option<SocketAddr>,
    /// Bound, with their TLS and trust settings, at start.
    listeners: Vec<ListenerConfig>,
    #[serde(rename = "server.max_connections")]
    max_connections: usize,
    #[serde(rename = "server.shutdown_grace")]
    shutdown_grace: Duration,
    /// One budget shared by every session, made at start.
    #[serde(rename = "server.message_memory_budget")]
    message_memory_budget: usize,
    /// The certificate is read (or generated) at start.
    tls: TlsConfig,
    #[serde(rename = "spool.dir")]
    spool_dir: PathBuf,
    delivery: DeliveryConfig,
    log: LogStartup,
    admin: AdminStartup,
    /// An account's workers are started with it.
    #[serde(rename = "accounts.*.max_connections")]
    account_max_connections: BTreeMap<String, usize>,
}

/// The logger is installed, and the transcript cleaner started, once.
#[derive(Debug, PartialEq, Serialize)]
struct LogStartup {
    level: String,
    format: LogFormat,
    transcript_max_age: Duration,
    transcript_max_bytes: u64,
}

/// The admin interface binds, and takes its token, once.
#[derive(Debug, PartialEq, Serialize)]
struct AdminStartup {
    listen: Option<SocketAddr>,
    #[serde(serialize_with = "fingerprint")]
    token: Option<Secret>,
}

impl Config {
    /// The settings that take effect only at start.
    pub fn startup(&self) -> Startup {
        Startup {
            listen: self.server.listen,
            listen_tls: self.server.listen_tls,
            listeners: self.listeners.clone(),
            max_connections: self.server.max_connections,
            shutdown_grace: self.server.shutdown_grace,
            message_memory_budget: self.server.message_memory_budget,
            tls: self.tls.clone(),
            spool_dir: self.spool.dir.clone(),
            delivery: self.delivery.clone(),
            log: LogStartup {
                level: self.log.level.clone(),
                format: self.log.format,
                transcript_max_age: self.log.transcript_max_age,
                transcript_max_bytes: self.log.transcript_max_bytes,
            },
            admin: AdminStartup {
                listen: self.admin.listen,
                token: self.admin.token.clone(),
            },
            account_max_connections: self
                .accounts
                .iter()
                .map(|(name, account)| (name.clone(), account.max_connections))
                .collect(),
        }
    }
}

impl Startup {
    /// The keys whose value differs in `new`, in the order of the fields.
    /// An account in only one of the two is not named: a reload starts or
    /// stops it whole.
    pub fn changed_keys(&self, new: &Startup) -> Vec<String> {
        let running: BTreeMap<String, Value> = keyed(self).into_iter().collect();
        keyed(new)
            .into_iter()
            .filter(|(key, value)| running.get(key).is_some_and(|old| old != value))
            .map(|(key, _)| key)
            .collect()
    }
}

/// The fields as (key, value) in the order declared, a `*` key expanded to
/// one key per name. Through the JSON text, which keeps the order (a
/// `serde_json::Value` map would sort the keys).
fn keyed(startup: &Startup) -> Vec<(String, Value)> {
    let json = serde_json::to_string(startup).expect("plain settings serialize");
    let Entries(fields) = serde_json::from_str(&json).expect("serde_json reads its own output");
    fields
        .into_iter()
        .flat_map(|(key, value)| match (key.split_once('*'), value) {
            (Some((before, after)), Value::Object(per_name)) => per_name
                .into_iter()
                .map(|(name, value)| (format!("{before}{name}{after}"), value))
                .collect(),
            (_, value) => vec![(key, value)],
        })
        .collect()
}

/// A JSON object's entries in the order written.
struct Entries(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntriesVisitor;

        impl<'de> Visitor<'de> for EntriesVisitor {
            type Value = Entries;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }

        deserializer.deserialize_map(EntriesVisitor)
    }
}

/// A digest instead of the secret: enough to see that it changed.
fn fingerprint<S: Serializer>(secret: &Option<Secret>, serializer: S) -> Result<S::Ok, S::Error> {
    let digest = secret.as_ref().map(|secret| {
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, secret.expose().as_bytes())
            .as_ref()
            .to_vec()
    });
    digest.serialize(serializer)
}

#[cfg(test)]
mod tests {
    // One account and one user.
    use super::super::tests::GMAIL as RUNNING;
    use super::*;

    fn needs_restart(running: &Config, new: &Config) -> Vec<String> {
        running.startup().changed_keys(&new.startup())
    }

    #[test]
    fn a_reload_names_what_waits_for_a_restart() {
        let running = Config::from_toml(RUNNING).unwrap();
        let reloaded = Config::from_toml(&format!(
            "{RUNNING}\n[users.scanner]\npassword = \"x\"\n[server]\nlisten = \"127.0.0.1:2526\"\n[delivery]\nmode = \"queue\""
        ))
        .unwrap();

        assert_eq!(
            needs_restart(&running, &reloaded),
            ["server.listen", "delivery"]
        );
        assert!(needs_restart(&running, &running).is_empty());
    }

    #[test]
    fn each_startup_setting_is_named_by_its_key() {
        let account = |name: &str, extra: &str| {
            format!(
                "[accounts.{name}]\nusername = \"me@gmail.com\"\npassword = \"abcdabcdabcdabcd\"\n{extra}\n"
            )
        };
        // (running, reloaded, keys named)
        let cases: [(&str, String, &[&str]); 14] = [
            (
                "",
                "[server]\nlisten_tls = \"127.0.0.1:4465\"".into(),
                &["server.listen_tls"],
            ),
            (
                "",
                "[[listeners]]\naddress = \"127.0.0.1:25\"".into(),
                &["listeners"],
            ),
            (
                "[[listeners]]\naddress = \"127.0.0.1:25\"",
                "[[listeners]]\naddress = \"127.0.0.1:25\"\ntrusted_networks = [\"10.0.0.0/8\"]"
                    .into(),
                &["listeners"],
            ),
            (
                "",
                "[server]\nmax_connections = 10".into(),
                &["server.max_connections"],
            ),
            (
                "",
                "[server]\nshutdown_grace = \"1m\"".into(),
                &["server.shutdown_grace"],
            ),
            (
                "",
                "[server]\nmessage_memory_budget = 1073741824".into(),
                &["server.message_memory_budget"],
            ),
            ("", "[tls]\ncert = \"other.crt\"".into(), &["tls"]),
            (
                "",
                "[spool]\ndir = \"/var/spool/other\"".into(),
                &["spool.dir"],
            ),
            ("", "[log]\nformat = \"json\"".into(), &["log"]),
            ("", "[log]\ntranscript_max_bytes = 1".into(), &["log"]),
            ("", "[admin]\nlisten = \"\"".into(), &["admin"]),
            (
                "",
                "[admin]\ntoken = \"0123456789abcdef0123\"".into(),
                &["admin"],
            ),
            (
                "[accounts.gmail]\nusername = \"me@gmail.com\"\npassword = \"abcdabcdabcdabcd\"",
                account("gmail", "max_connections = 9"),
                &["accounts.gmail.max_connections"],
            ),
            // Reloadable settings, and accounts added: nothing waits.
            (
                "",
                format!(
                    "[server]\nhostname = \"other.test\"\nmax_recipients = 5\n[log]\ntranscripts = \"all\"\n{}",
                    account("m365", "max_connections = 9")
                ),
                &[],
            ),
        ];
        for (running, reloaded, keys) in cases {
            let running = Config::from_toml(running).unwrap();
            let reloaded = Config::from_toml(&reloaded).unwrap();
            assert_eq!(needs_restart(&running, &reloaded), keys, "{reloaded:?}");
        }
    }

    #[test]
    fn the_admin_token_is_compared_without_being_kept() {
        let token = "0123456789abcdef0123";
        let config = Config::from_toml(&format!("[admin]\ntoken = \"{token}\"")).unwrap();
        let json = serde_json::to_string(&config.startup()).unwrap();
        assert!(!json.contains(token), "{json}");
    }
}
