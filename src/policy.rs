//! Who may send, and through which upstream account. The relay is never
//! open: a client either signed in as a configured user or comes from a
//! configured trusted network. The account is the first matching route's
//! (`routes`), else the user's own.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};
use tracing::warn;

use crate::config::{Config, ListenerConfig};
use crate::reply::{Refusal, Reply};
use crate::routes::{FromHeader, Routed, Routes};

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
    routes: Routes,
    /// Each user's own account (`users.<name>.account`), keyed by
    /// lower-case name as sign-ins are.
    user_accounts: HashMap<String, Option<String>>,
}

/// Which account a transaction goes through.
#[derive(Debug, PartialEq, Eq)]
pub enum Choice {
    Account(String),
    /// A route matches on the From field: ask again with the message.
    AfterData,
}

/// A sender refused: the reply for the client and what the log says.
#[derive(Debug)]
pub struct Denied {
    pub reply: Reply,
    pub refusal: Refusal,
}

impl Policy {
    /// Warns about trusted networks that trust everyone: built at start and
    /// at each reload, so the warning comes with every configuration.
    pub fn new(config: &Config) -> Self {
        for warning in open_relay_warnings(&config.server.trusted_networks) {
            warn!("{warning}");
        }
        let mut policy = Policy::trusting(
            &config.server.trusted_networks,
            config.server.default_account.clone(),
        );
        policy.routes = Routes::new(&config.routes);
        policy.user_accounts = config
            .users
            .iter()
            .map(|(name, user)| (name.to_lowercase(), user.account.clone()))
            .collect();
        policy
    }

    fn trusting(networks: &[IpNet], default_account: Option<String>) -> Self {
        Policy {
            trusted_networks: networks.iter().copied().map(canonical).collect(),
            default_account,
            routes: Routes::default(),
            user_accounts: HashMap::new(),
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

    /// The routes, for `check` and the status page.
    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    /// The account a message of `user` (signed in; `None`: not signed in)
    /// from `client` with envelope sender `sender` goes through, or why it
    /// is refused. The first route for the client that matches decides,
    /// else the user's own account (`server.default_account` for trusted
    /// clients). At MAIL `from` is [`FromHeader::NotYetReceived`], and the
    /// answer may be [`Choice::AfterData`]; with the From address it never
    /// is. `trust` is that of the listener the client came in on. The
    /// session and `sendbridge sendmail` choose through here.
    pub fn account_for(
        &self,
        user: Option<&str>,
        client: IpAddr,
        trust: &Trust,
        sender: &str,
        from: FromHeader,
    ) -> Result<Choice, Denied> {
        if user.is_none() && !self.is_trusted(client, trust) {
            let reply = Reply::new(530, [5, 7, 0], "Authentication required");
            let hint = "the client neither signed in nor is in server.trusted_networks: set the SMTP user and password from [users] in the sending program, or add its network to server.trusted_networks";
            return Err(Denied {
                reply,
                refusal: Refusal::new("relay_denied", hint),
            });
        }
        match self.routes.route(user, sender, from) {
            Routed::Account(account) => return Ok(Choice::Account(account.to_string())),
            Routed::AfterData => return Ok(Choice::AfterData),
            Routed::Unrouted => {}
        }
        let own = match user {
            Some(user) => self
                .user_accounts
                .get(&user.to_lowercase())
                .cloned()
                .flatten(),
            None => self.default_account.clone(),
        };
        if let Some(account) = own {
            return Ok(Choice::Account(account));
        }
        Err(self.unrouted(user, sender, from))
    }

    fn unrouted(&self, user: Option<&str>, sender: &str, from: FromHeader) -> Denied {
        if self.routes.is_empty() && user.is_none() {
            // A configuration without routes for trusted clients: nothing
            // the client could change.
            let reply = Reply::new(
                451,
                [4, 3, 5],
                "No upstream account for unauthenticated clients: set server.default_account",
            );
            let hint = "trusted-network clients have no account: set server.default_account or add [[routes]]";
            return Denied {
                reply,
                refusal: Refusal::new("no_account", hint),
            };
        }
        let own_key = match user {
            Some(user) => format!("users.{user}.account"),
            None => "server.default_account".to_string(),
        };
        let address = match from {
            FromHeader::Received(Some(from)) => format!("<{sender}> (From {from})"),
            _ => format!("<{sender}>"),
        };
        let reply = Reply::new(
            550,
            [5, 7, 1],
            format!("Sender {address} is not allowed: no route matches (see routes and {own_key})"),
        );
        let hint = format!(
            "no [[routes]] entry for this client matches sender {address}, and {own_key} is not set: add a route for the sender (routes) or set {own_key}"
        );
        Denied {
            reply,
            refusal: Refusal::new("sender_not_routed", hint),
        }
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
            let account = policy.account_for(
                None,
                client,
                &trust,
                "a@b.example",
                FromHeader::Received(None),
            );
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

    const ROUTED: &str = r#"
        [server]
        trusted_networks = ["10.0.0.0/8"]
        default_account = "office"
        [accounts.office]
        username = "office@x.example"
        password = "x"
        [accounts.billing]
        username = "billing@x.example"
        password = "x"
        [accounts.support]
        username = "support@x.example"
        password = "x"
        [users.invoices]
        password = "x"
        account = "billing"
        [users.scanner]
        password = "x"
        [[routes]]
        sender = "support@x.example"
        account = "support"
        users = ["invoices"]
        [[routes]]
        sender = "@billing.example"
        match = "from"
        account = "billing"
        users = ["scanner"]
        [[routes]]
        sender = "scans@x.example"
        account = "office"
        users = ["scanner"]
    "#;

    /// The account chosen, or the reply's code and status.
    fn chosen(
        policy: &Policy,
        user: Option<&str>,
        client: &str,
        sender: &str,
        from: FromHeader,
    ) -> String {
        match policy.account_for(user, client.parse().unwrap(), &Trust::Server, sender, from) {
            Ok(Choice::Account(account)) => account,
            Ok(Choice::AfterData) => "after data".to_string(),
            Err(denied) => denied.reply.to_string().lines().next().unwrap().to_string(),
        }
    }

    #[test]
    fn the_account_comes_from_the_first_route_then_the_users_own() {
        let policy = Policy::new(&Config::from_toml(ROUTED).unwrap());
        let none = FromHeader::Received(None);
        // (user, client, sender, From, chosen)
        let cases: [(Option<&str>, &str, &str, FromHeader, &str); 11] = [
            (
                Some("invoices"),
                "192.0.2.1",
                "support@x.example",
                none,
                "support",
            ),
            (
                Some("invoices"),
                "192.0.2.1",
                "invoices@x.example",
                none,
                "billing",
            ),
            (
                Some("INVOICES"),
                "192.0.2.1",
                "support@X.EXAMPLE",
                none,
                "support",
            ),
            // Not the exact local part: the user's own account.
            (
                Some("invoices"),
                "192.0.2.1",
                "Support@x.example",
                none,
                "billing",
            ),
            (
                Some("scanner"),
                "192.0.2.1",
                "scans@x.example",
                FromHeader::NotYetReceived,
                "after data",
            ),
            (
                Some("scanner"),
                "192.0.2.1",
                "scans@x.example",
                none,
                "office",
            ),
            (
                Some("scanner"),
                "192.0.2.1",
                "a@else.example",
                FromHeader::Received(Some("b@billing.example")),
                "billing",
            ),
            // server.default_account is the account of users without one.
            (
                Some("scanner"),
                "192.0.2.1",
                "a@else.example",
                none,
                "office",
            ),
            // Routes with users are not for trusted clients.
            (None, "10.1.2.3", "support@x.example", none, "office"),
            (None, "::ffff:10.1.2.3", "a@else.example", none, "office"),
            (
                None,
                "192.0.2.1",
                "support@x.example",
                none,
                "530 5.7.0 Authentication required",
            ),
        ];
        for (user, client, sender, from, expected) in cases {
            assert_eq!(
                chosen(&policy, user, client, sender, from),
                expected,
                "{user:?} {client} {sender}"
            );
        }
    }

    #[test]
    fn senders_no_route_and_no_account_allows_are_refused() {
        let with_route = ROUTED.replace("default_account = \"office\"", "")
            + "[[routes]]\nsender = \"@lan.example\"\naccount = \"office\"\n";
        let policy = Policy::new(&Config::from_toml(&with_route).unwrap());
        let none = FromHeader::Received(None);
        assert_eq!(
            chosen(&policy, None, "10.0.0.1", "a@lan.example", none),
            "office"
        );
        assert_eq!(
            chosen(&policy, None, "10.0.0.1", "a@else.example", none),
            "550 5.7.1 Sender <a@else.example> is not allowed: no route matches (see routes and server.default_account)"
        );
        // A user without an account of its own, and no route for the sender.
        let from = FromHeader::Received(Some("b@else.example"));
        assert_eq!(
            chosen(
                &policy,
                Some("scanner"),
                "192.0.2.1",
                "a@else.example",
                from
            ),
            "550 5.7.1 Sender <a@else.example> (From b@else.example) is not allowed: no route matches (see routes and users.scanner.account)"
        );
        // Without routes, as before routes existed: the configuration
        // lacks an account, which the client cannot change.
        let policy = policy_with(&["10.0.0.0/8"], None);
        let reply = chosen(&policy, None, "10.1.2.3", "a@b.example", none);
        assert!(reply.starts_with("451 4.3.5"), "{reply}");
        // Loopback is not trusted unless configured.
        let reply = chosen(&policy, None, "127.0.0.1", "a@b.example", none);
        assert!(reply.starts_with("530 5.7.0"), "{reply}");
    }
}
