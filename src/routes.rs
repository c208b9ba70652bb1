//! `[[routes]]`: which upstream account a message goes through, chosen by
//! its envelope sender or its From address. The first route that applies
//! to the client and matches wins; a pure decision over the configuration.

use serde::Serialize;

use crate::address::SenderPattern;
use crate::config::{RouteConfig, RouteMatch};

/// The routes of one configuration, in order.
#[derive(Debug, Default)]
pub struct Routes {
    routes: Vec<Route>,
}

#[derive(Debug)]
struct Route {
    pattern: SenderPattern,
    /// As written, for `check` and the status page.
    sender: String,
    account: String,
    /// Lower-case user names; `None`: every client.
    users: Option<Vec<String>>,
    matches: RouteMatch,
}

/// The From address, as far as the session knows it.
#[derive(Debug, Clone, Copy)]
pub enum FromHeader<'a> {
    /// At MAIL: the message has not arrived yet.
    NotYetReceived,
    /// The first address of the From field, if the message has one.
    Received(Option<&'a str>),
}

/// What the routes say about a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Routed<'a> {
    Account(&'a str),
    /// A From route comes first: only the message can tell.
    AfterData,
    /// No route matches: the user's own account decides, if any.
    Unrouted,
}

/// A route as `check` and the status page show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RouteView {
    pub sender: String,
    pub matches: RouteMatch,
    pub account: String,
    /// Empty: every client.
    pub users: Vec<String>,
}

impl Routes {
    /// From a validated configuration: every pattern parses.
    pub fn new(routes: &[RouteConfig]) -> Routes {
        let routes = routes
            .iter()
            .map(|route| Route {
                pattern: SenderPattern::parse(&route.sender)
                    .expect("config validation checks patterns"),
                sender: route.sender.trim().to_string(),
                account: route.account.clone(),
                users: route
                    .users
                    .as_ref()
                    .map(|users| users.iter().map(|user| user.to_lowercase()).collect()),
                matches: route.matches,
            })
            .collect();
        Routes { routes }
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The account of the first route that is for `user` (signed in;
    /// `None` for a trusted-network client) and matches `sender` (the
    /// envelope sender) or `from`.
    pub fn route(&self, user: Option<&str>, sender: &str, from: FromHeader) -> Routed<'_> {
        let user = user.map(str::to_lowercase);
        let applies = |route: &&Route| match (&route.users, &user) {
            (None, _) => true,
            (Some(users), Some(user)) => users.contains(user),
            (Some(_), None) => false,
        };
        for route in self.routes.iter().filter(applies) {
            let address = match (route.matches, from) {
                (RouteMatch::Envelope, _) => sender,
                (RouteMatch::From, FromHeader::NotYetReceived) => return Routed::AfterData,
                (RouteMatch::From, FromHeader::Received(Some(from))) => from,
                (RouteMatch::From, FromHeader::Received(None)) => continue,
            };
            if route.pattern.matches(address) {
                return Routed::Account(&route.account);
            }
        }
        Routed::Unrouted
    }

    pub fn views(&self) -> Vec<RouteView> {
        self.routes
            .iter()
            .map(|route| RouteView {
                sender: route.sender.clone(),
                matches: route.matches,
                account: route.account.clone(),
                users: route.users.clone().unwrap_or_default(),
            })
            .collect()
    }
}

impl RouteView {
    /// Which address the route reads, in words.
    pub fn matched_on(&self) -> &'static str {
        match self.matches {
            RouteMatch::Envelope => "envelope sender",
            RouteMatch::From => "From field",
        }
    }

    /// Whose mail the route is for, in words.
    pub fn for_whom(&self) -> String {
        match self.users.is_empty() {
            true => "every client".to_string(),
            false => self.users.join(", "),
        }
    }
}

impl std::fmt::Display for RouteView {
    /// One line: `@x.example (envelope sender) → office, for every client`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (sender, matched_on) = (&self.sender, self.matched_on());
        let (account, for_whom) = (&self.account, self.for_whom());
        write!(f, "{sender} ({matched_on}) → {account}, for {for_whom}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(
        sender: &str,
        account: &str,
        users: Option<&[&str]>,
        matches: RouteMatch,
    ) -> RouteConfig {
        RouteConfig {
            sender: sender.to_string(),
            account: account.to_string(),
            users: users.map(|users| users.iter().map(|u| u.to_string()).collect()),
            matches,
        }
    }

    #[test]
    fn the_first_route_for_the_client_that_matches_wins() {
        use RouteMatch::{Envelope, From};
        use Routed::*;
        let routes = Routes::new(&[
            route(
                "support@office.example",
                "support",
                Some(&["invoices"]),
                Envelope,
            ),
            route("@billing.example", "billing", None, From),
            route("Invoices@office.example", "capital", None, Envelope),
            route("@Office.Example", "office", None, Envelope),
            route("*", "scanner", Some(&["scanner"]), Envelope),
        ]);
        let received = |from| FromHeader::Received(from);
        // (user, envelope sender, From, routed)
        let cases: [(Option<&str>, &str, FromHeader, Routed); 15] = [
            (
                Some("invoices"),
                "support@office.example",
                received(None),
                Account("support"),
            ),
            // Users compare in any case, as sign-ins do.
            (
                Some("INVOICES"),
                "support@office.example",
                received(None),
                Account("support"),
            ),
            (
                Some("invoices"),
                "support@OFFICE.example",
                received(None),
                Account("support"),
            ),
            // The local part is exact: this is another mailbox.
            (
                Some("invoices"),
                "Support@office.example",
                received(None),
                Account("office"),
            ),
            // A route with users is not for other users or trusted clients.
            (
                Some("scanner"),
                "support@office.example",
                received(None),
                Account("office"),
            ),
            (
                None,
                "support@office.example",
                received(None),
                Account("office"),
            ),
            (
                None,
                "Invoices@office.example",
                received(None),
                Account("capital"),
            ),
            (
                None,
                "invoices@office.example",
                received(None),
                Account("office"),
            ),
            // A From route before any match waits for the message…
            (
                None,
                "a@office.example",
                FromHeader::NotYetReceived,
                AfterData,
            ),
            // …and then decides by the From field.
            (
                None,
                "a@office.example",
                received(Some("a@Billing.example")),
                Account("billing"),
            ),
            (
                None,
                "a@office.example",
                received(Some("a@else.example")),
                Account("office"),
            ),
            (None, "a@office.example", received(None), Account("office")),
            (Some("scanner"), "", received(None), Account("scanner")),
            (
                None,
                "a@elsewhere.example",
                received(Some("a@else.example")),
                Unrouted,
            ),
            (None, "", received(None), Unrouted),
        ];
        for (user, sender, from, routed) in cases {
            assert_eq!(
                routes.route(user, sender, from),
                routed,
                "{user:?} {sender:?} {from:?}"
            );
        }
    }

    #[test]
    fn an_envelope_match_before_any_from_route_decides_at_mail() {
        let routes = Routes::new(&[
            route("@office.example", "office", None, RouteMatch::Envelope),
            route("*", "other", None, RouteMatch::From),
        ]);
        let at_mail = FromHeader::NotYetReceived;
        assert_eq!(
            routes.route(None, "a@office.example", at_mail),
            Routed::Account("office")
        );
        assert_eq!(
            routes.route(None, "a@else.example", at_mail),
            Routed::AfterData
        );
    }

    #[test]
    fn views_show_each_route_on_one_line() {
        let routes = Routes::new(&[
            route(" @office.example ", "office", None, RouteMatch::Envelope),
            route(
                "a@b.example",
                "b",
                Some(&["Invoices", "scanner"]),
                RouteMatch::From,
            ),
        ]);
        let lines: Vec<String> = routes.views().iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "@office.example (envelope sender) → office, for every client",
                "a@b.example (From field) → b, for invoices, scanner",
            ]
        );
    }
}
