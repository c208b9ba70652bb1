//! Who may send, and through which upstream account. The relay is never
//! open: a client either signed in as a configured user or comes from a
//! configured trusted network.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};
use tracing::warn;

use crate::config::{Config, ListenerConfig};
use crate::reply::Reply;

/// Which clients of a listener may send without signing in.
#[derive(Debug, Clone, PartialEq)]
pub enum Trust {
    /// Those in `server.trusted_networks` (as last reloaded).
    Server,
    /// Those in the listener's own `trusted_networks`.
    Networks(Vec<IpNet>),
    /// None: the listener has `require_auth = true`.
    Nobody,
}

impl Trust {
    pub fn of(listener: &ListenerConfig) -> Trust {
        match &listener.trusted_networks {
            _ if listener.require_auth => Trust::Nobody,
            Some(networks) => Trust::Networks(networks.iter().copied().map(canonical).collect()),
            None => Trust::Server,
        }
    }
}

pub struct Policy {
    trusted_networks: Vec<IpNet>,
    default_account: Option<String>,
}

impl Policy {
    /// Warns about trusted networks that trust everyone: built at start and
    /// at each reload, so the warning comes with every configuration.
    pub fn new(config: &Config) -> Self {
        for warning in open_relay_warnings(&config.server.trusted_networks) {
            warn!("{warning}");
        }
        Policy::trusting(
            &config.server.trusted_networks,
            config.server.default_account.clone(),
        )
    }

    fn trusting(networks: &[IpNet], default_account: Option<String>) -> Self {
        Policy {
            trusted_networks: networks.iter().copied().map(canonical).collect(),
            default_account,
        }
    }

    /// Both sides compare in canonical form: a client of a dual-stack
    /// listener arrives as `::ffff:a.b.c.d`, and a network may be written so.
    pub fn is_trusted(&self, client: IpAddr, trust: &Trust) -> bool {
        let client = client.to_canonical();
        let networks = match trust {
            Trust::Server => &self.trusted_networks,
            Trust::Networks(networks) => networks,
            Trust::Nobody => return false,
        };
        networks.iter().any(|net| net.contains(&client))
    }

    /// The account a transaction sends through, or the reply refusing MAIL.
    /// `user_account` is the account of the signed-in user, if any; `trust`
    /// that of the listener the client came in on.
    pub fn account_for(
        &self,
        user_account: Option<&str>,
        client: IpAddr,
        trust: &Trust,
    ) -> Result<String, Reply> {
        if let Some(account) = user_account {
            return Ok(account.to_string());
        }
        if !self.is_trusted(client, trust) {
            return Err(Reply::new(530, [5, 7, 0], "Authentication required"));
        }
        self.default_account.clone().ok_or_else(|| {
            Reply::new(
                451,
                [4, 3, 5],
                "No upstream account for unauthenticated clients: set server.default_account",
            )
        })
    }
}

/// An IPv4-mapped IPv6 network (`::ffff:10.0.0.0/104`) as the IPv4
/// network it stands for (`10.0.0.0/8`); any other network as it is.
fn canonical(net: IpNet) -> IpNet {
    let IpNet::V6(v6) = net else {
        return net;
    };
    match v6.addr().to_ipv4_mapped() {
        Some(v4) if v6.prefix_len() >= 96 => {
            IpNet::V4(Ipv4Net::new(v4, v6.prefix_len() - 96).expect("a prefix of at most 32"))
        }
        _ => net,
    }
}

/// One sentence for each trusted network that trusts every client (of its
/// address family): anyone who can reach the port may relay through it.
pub fn open_relay_warnings(networks: &[IpNet]) -> Vec<String> {
    open_relay_warnings_for("server.trusted_networks", networks)
}

/// `open_relay_warnings` for the networks configured at `key`.
pub fn open_relay_warnings_for(key: &str, networks: &[IpNet]) -> Vec<String> {
    networks
        .iter()
        .map(|&net| (net, canonical(net)))
        .filter(|(_, canonical)| canonical.prefix_len() == 0)
        .map(|(net, canonical)| {
            let family = match canonical {
                IpNet::V4(_) => "IPv4",
                IpNet::V6(_) => "IPv6",
            };
            format!(
                "{key}: {net} makes every {family} client trusted, an open relay for anyone who can reach the port; list only the networks of the sending programs"
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn networks(written: &[&str]) -> Vec<IpNet> {
        written.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn policy_with(trusted: &[&str], default: Option<&str>) -> Policy {
        Policy::trusting(&networks(trusted), default.map(str::to_string))
    }

    #[test]
    fn mapped_addresses_compare_as_ipv4_on_both_sides() {
        // (trusted network, client, trusted)
        let cases = [
            ("::ffff:127.0.0.2/128", "127.0.0.2", true),
            ("::ffff:127.0.0.2/128", "::ffff:127.0.0.2", true),
            ("::ffff:127.0.0.2/128", "127.0.0.3", false),
            ("::ffff:10.0.0.0/104", "10.1.2.3", true),
            ("::ffff:10.0.0.0/104", "11.1.2.3", false),
            ("10.0.0.0/8", "::ffff:10.1.2.3", true),
            ("10.0.0.0/8", "::ffff:11.1.2.3", false),
            ("127.0.0.1/32", "::1", false),
            ("::1/128", "127.0.0.1", false),
            ("::1/128", "::1", true),
            ("2001:db8::/32", "2001:db8::7", true),
            ("2001:db8::/32", "192.0.2.7", false),
        ];
        for (network, client, trusted) in cases {
            let policy = policy_with(&[network], None);
            assert_eq!(
                policy.is_trusted(client.parse().unwrap(), &Trust::Server),
                trusted,
                "{network} trusts {client}"
            );
        }
    }

    #[test]
    fn a_listener_trusts_the_server_networks_its_own_or_nobody() {
        let policy = policy_with(&["10.0.0.0/8"], Some("gmail"));
        // (the listener's settings, client, trusted)
        let cases = [
            ("", "10.1.2.3", true),
            ("", "192.168.1.50", false),
            (
                "trusted_networks = [\"192.168.1.50\"]",
                "192.168.1.50",
                true,
            ),
            ("trusted_networks = [\"192.168.1.50\"]", "10.1.2.3", false),
            ("trusted_networks = []", "10.1.2.3", false),
            (
                "trusted_networks = [\"::ffff:192.168.1.0/120\"]",
                "192.168.1.7",
                true,
            ),
            ("require_auth = true", "10.1.2.3", false),
        ];
        for (settings, client, trusted) in cases {
            let toml = format!("[[listeners]]\naddress = \"127.0.0.1:25\"\n{settings}");
            let config = Config::from_toml(&toml).unwrap();
            let trust = Trust::of(&config.listeners[0]);
            let client = client.parse().unwrap();
            assert_eq!(
                policy.is_trusted(client, &trust),
                trusted,
                "{settings}: {client}"
            );
            let account = policy.account_for(None, client, &trust);
            assert_eq!(account.is_ok(), trusted, "{settings}: {client}");
        }
    }

    #[test]
    fn networks_that_trust_everyone_are_warned_about() {
        // (trusted networks, warnings naming ...)
        let cases: [(&[&str], &[&str]); 5] = [
            (&["0.0.0.0/0"], &["0.0.0.0/0 makes every IPv4 client"]),
            (&["::/0"], &["::/0 makes every IPv6 client"]),
            (
                &["::ffff:0.0.0.0/96"],
                &["::ffff:0.0.0.0/96 makes every IPv4 client"],
            ),
            (&["10.0.0.0/8", "::1/128", "0.0.0.0/1"], &[]),
            (&[], &[]),
        ];
        for (trusted, expected) in cases {
            let warnings = open_relay_warnings(&networks(trusted));
            assert_eq!(warnings.len(), expected.len(), "{trusted:?}: {warnings:?}");
            for (warning, expected) in warnings.iter().zip(expected) {
                assert!(
                    warning.starts_with("server.trusted_networks: ")
                        && warning.contains(expected)
                        && warning.contains("open relay"),
                    "{warning}"
                );
            }
        }
    }

    #[test]
    fn untrusted_clients_must_sign_in() {
        let policy = policy_with(&["10.0.0.0/8"], Some("gmail"));
        let reply = policy
            .account_for(None, "192.0.2.1".parse().unwrap(), &Trust::Server)
            .unwrap_err();
        assert_eq!((reply.code, reply.status), (530, Some([5, 7, 0])));
        // Loopback is not trusted unless configured.
        assert!(
            policy
                .account_for(None, "127.0.0.1".parse().unwrap(), &Trust::Server)
                .is_err()
        );
    }

    #[test]
    fn trusted_clients_use_the_default_account() {
        let policy = policy_with(&["10.0.0.0/8"], Some("gmail"));
        assert_eq!(
            policy
                .account_for(None, "10.1.2.3".parse().unwrap(), &Trust::Server)
                .unwrap(),
            "gmail"
        );
        // An IPv4-mapped IPv6 client is the same host.
        assert!(policy.is_trusted("::ffff:10.1.2.3".parse().unwrap(), &Trust::Server));
        let reply = policy_with(&["10.0.0.0/8"], None)
            .account_for(None, "10.1.2.3".parse().unwrap(), &Trust::Server)
            .unwrap_err();
        assert_eq!(reply.code, 451);
    }

    #[test]
    fn signed_in_users_use_their_account() {
        let policy = policy_with(&[], None);
        assert_eq!(
            policy
                .account_for(Some("m365"), "192.0.2.1".parse().unwrap(), &Trust::Server)
                .unwrap(),
            "m365"
        );
    }
}
