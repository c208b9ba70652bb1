//! Who may send, and through which upstream account. The relay is never
//! open: a client either signed in as a configured user or comes from a
//! configured trusted network.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::config::Config;
use crate::reply::Reply;

pub struct Policy {
    trusted_networks: Vec<IpNet>,
    default_account: Option<String>,
}

impl Policy {
    pub fn new(config: &Config) -> Self {
        Policy {
            trusted_networks: config.server.trusted_networks.clone(),
            default_account: config.server.default_account.clone(),
        }
    }

    pub fn is_trusted(&self, client: IpAddr) -> bool {
        let client = client.to_canonical();
        self.trusted_networks
            .iter()
            .any(|net| net.contains(&client))
    }

    /// The account a transaction sends through, or the reply refusing MAIL.
    /// `user_account` is the account of the signed-in user, if any.
    pub fn account_for(&self, user_account: Option<&str>, client: IpAddr) -> Result<String, Reply> {
        if let Some(account) = user_account {
            return Ok(account.to_string());
        }
        if !self.is_trusted(client) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn policy_with(trusted: &[&str], default: Option<&str>) -> Policy {
        Policy {
            trusted_networks: trusted.iter().map(|n| n.parse().unwrap()).collect(),
            default_account: default.map(str::to_string),
        }
    }

    #[test]
    fn untrusted_clients_must_sign_in() {
        let policy = policy_with(&["10.0.0.0/8"], Some("gmail"));
        let reply = policy
            .account_for(None, "192.0.2.1".parse().unwrap())
            .unwrap_err();
        assert_eq!((reply.code, reply.status), (530, Some([5, 7, 0])));
        // Loopback is not trusted unless configured.
        assert!(
            policy
                .account_for(None, "127.0.0.1".parse().unwrap())
                .is_err()
        );
    }

    #[test]
    fn trusted_clients_use_the_default_account() {
        let policy = policy_with(&["10.0.0.0/8"], Some("gmail"));
        assert_eq!(
            policy
                .account_for(None, "10.1.2.3".parse().unwrap())
                .unwrap(),
            "gmail"
        );
        // An IPv4-mapped IPv6 client is the same host.
        assert!(policy.is_trusted("::ffff:10.1.2.3".parse().unwrap()));
        let reply = policy_with(&["10.0.0.0/8"], None)
            .account_for(None, "10.1.2.3".parse().unwrap())
            .unwrap_err();
        assert_eq!(reply.code, 451);
    }

    #[test]
    fn signed_in_users_use_their_account() {
        let policy = policy_with(&[], None);
        assert_eq!(
            policy
                .account_for(Some("m365"), "192.0.2.1".parse().unwrap())
                .unwrap(),
            "m365"
        );
    }
}
