//! Routing by sender over real sockets: `[[routes]]` send one user's mail
//! through two upstream accounts, refuse senders no route allows (at MAIL,
//! or at the end of DATA for From routes), route trusted-network clients,
//! and are swapped by a reload and shown on the status page.

mod common;

use std::time::Duration;

use common::fake_upstream::{FakeUpstream, FakeUpstreamOptions, Received, UpstreamTls};
use common::http;
use common::relay::{
    LOCAL_PASSWORD, LOCAL_USER, Relay, UPSTREAM_PASSWORD, UPSTREAM_USER, config_for,
};
use common::smtp::{Client, Reply};
use sendbridge::config::Config;

const WAIT: Duration = Duration::from_secs(20);
const BILLING_USER: &str = "billing@office.example";
const BILLING_PASSWORD: &str = "bbbbccccddddeeee";
/// A local user without an account of its own: only its routes send.
const SCANNER: &str = "scanner";

/// Account `gmail` (the user's own, from `config_for`) and account
/// `billing` on a second upstream, with these routes.
struct Offices {
    gmail: FakeUpstream,
    billing: FakeUpstream,
    relay: Relay,
}

fn routes(billing: &FakeUpstream, first_route_account: &str) -> String {
    format!(
        r#"
        [users.{SCANNER}]
        password = "{LOCAL_PASSWORD}"
        [accounts.billing]
        host = "localhost"
        port = {port}
        tls = "starttls"
        username = "{BILLING_USER}"
        password = "{BILLING_PASSWORD}"
        ca_file = "{ca}"
        timeout = "10s"
        [server]
        trusted_networks = ["127.0.0.2/32"]
        [[routes]]
        sender = "billing@office.example"
        account = "{first_route_account}"
        users = ["{LOCAL_USER}"]
        [[routes]]
        sender = "scans@Office.Example"
        account = "billing"
        users = ["{SCANNER}"]
        [[routes]]
        sender = "@lan.example"
        account = "billing"
        [[routes]]
        sender = "@billing.example"
        match = "from"
        account = "billing"
        users = ["{LOCAL_USER}"]
        "#,
        port = billing.port(),
        ca = billing.ca_file().display(),
    )
}

fn config(gmail: &FakeUpstream, billing: &FakeUpstream, first_route_account: &str) -> Config {
    let extra = routes(billing, first_route_account);
    config_for(gmail, UpstreamTls::StartTls, &extra)
}

async fn upstream(user: &str, password: &str) -> FakeUpstream {
    FakeUpstream::start(FakeUpstreamOptions::new(
        UpstreamTls::StartTls,
        user,
        password,
    ))
    .await
}

async fn offices() -> Offices {
    let gmail = upstream(UPSTREAM_USER, UPSTREAM_PASSWORD).await;
    let billing = upstream(BILLING_USER, BILLING_PASSWORD).await;
    let relay = Relay::start(config(&gmail, &billing, "billing")).await;
    Offices {
        gmail,
        billing,
        relay,
    }
}

/// Sends a message with `subject` and the From field `from` as `envelope`
/// to one recipient.
async fn send(client: &mut Client, envelope: &str, subject: &str, from: &str) -> Reply {
    let message = format!("From: {from}\r\nSubject: {subject}\r\n\r\n{subject}.\r\n");
    client
        .send_mail(envelope, &["c@example.com"], &message)
        .await
}

/// The one message `upstream` received, with the account it signed in as.
async fn one_message(upstream: &FakeUpstream) -> Received {
    let mut received = upstream.wait_for_messages(1, WAIT).await;
    assert_eq!(received.len(), 1, "{received:?}");
    received.remove(0)
}

/// Sends as `send` does; the relay must accept it and `upstream` get it.
async fn delivered(
    client: &mut Client,
    upstream: &FakeUpstream,
    envelope: &str,
    subject_text: &str,
    from: &str,
) -> Received {
    let reply = send(client, envelope, subject_text, from).await;
    assert_eq!(reply.code, 250, "{reply:?}");
    let received = one_message(upstream).await;
    assert_eq!(subject(&received), format!("Subject: {subject_text}"));
    received
}

fn subject(received: &Received) -> String {
    let text = received.without_trace();
    let line = text.lines().find(|line| line.starts_with("Subject: "));
    line.unwrap_or_default().to_string()
}

async fn signed_in_as(relay: &Relay, user: &str) -> Client {
    let mut client = relay.greeted_client().await;
    let reply = client.login_plain(user, LOCAL_PASSWORD).await;
    assert_eq!(reply.code, 235, "{reply:?}");
    client
}

#[tokio::test]
async fn two_senders_of_one_user_go_through_two_accounts() {
    let Offices {
        gmail,
        billing,
        relay,
    } = offices().await;
    let mut client = relay.signed_in_client().await;

    let own = "invoices@office.example";
    let routed = "billing@office.example";
    let through_gmail = delivered(&mut client, &gmail, own, "own", own).await;
    let through_billing = delivered(&mut client, &billing, routed, "routed", routed).await;

    assert_eq!(through_gmail.auth_user, UPSTREAM_USER);
    assert_eq!(through_billing.auth_user, BILLING_USER);
}

#[tokio::test]
async fn a_sender_no_route_allows_is_refused_at_mail() {
    let Offices { billing, relay, .. } = offices().await;
    let mut client = signed_in_as(&relay, SCANNER).await;

    let reply = client.cmd("MAIL FROM:<other@office.example>").await;

    assert_eq!(reply.code, 550, "{reply:?}");
    assert!(
        reply
            .text
            .starts_with("5.7.1 Sender <other@office.example> is not allowed")
            && reply.text.contains("routes")
            && reply.text.contains("users.scanner.account"),
        "{reply:?}"
    );
    // Its route's sender, the domain in another case, goes through.
    let sender = "scans@office.example";
    let received = delivered(&mut client, &billing, sender, "scan", sender).await;
    assert_eq!(received.auth_user, BILLING_USER);
}

#[tokio::test]
async fn a_from_route_decides_at_the_end_of_data() {
    let Offices {
        gmail,
        billing,
        relay,
    } = offices().await;
    let mut client = relay.signed_in_client().await;
    let envelope = "invoices@office.example";

    delivered(
        &mut client,
        &billing,
        envelope,
        "by From",
        "Billing <a@Billing.Example>",
    )
    .await;

    // Another From: the user's own account.
    delivered(&mut client, &gmail, envelope, "own", envelope).await;
}

#[tokio::test]
async fn a_from_no_route_allows_is_refused_at_the_end_of_data() {
    let gmail = upstream(UPSTREAM_USER, UPSTREAM_PASSWORD).await;
    // The user has no account of its own: only its From route sends.
    let extra = format!(
        r#"
        [accounts.other]
        username = "other@x.example"
        password = "x"
        [users.{SCANNER}]
        password = "{LOCAL_PASSWORD}"
        [[routes]]
        sender = "@office.example"
        match = "from"
        account = "gmail"
        users = ["{SCANNER}"]
        "#
    );
    let relay = Relay::start(config_for(&gmail, UpstreamTls::StartTls, &extra)).await;
    let mut client = signed_in_as(&relay, SCANNER).await;

    let reply = send(&mut client, "scans@x.example", "x", "a@else.example").await;

    assert_eq!(reply.code, 550, "{reply:?}");
    assert!(
        reply
            .text
            .starts_with("5.7.1 Sender <scans@x.example> (From a@else.example) is not allowed"),
        "{reply:?}"
    );
    delivered(
        &mut client,
        &gmail,
        "scans@x.example",
        "ok",
        "a@office.example",
    )
    .await;
}

#[tokio::test]
async fn a_trusted_network_client_is_routed_by_sender() {
    let Offices { billing, relay, .. } = offices().await;
    let mut client = Client::connect_from("127.0.0.2", relay.addr).await;
    assert_eq!(client.read_reply().await.code, 220);
    client.ehlo().await;

    // Without a route or server.default_account, no account would do.
    let reply = client.cmd("MAIL FROM:<printer@else.example>").await;
    assert_eq!(reply.code, 550, "{reply:?}");
    assert!(reply.text.contains("server.default_account"), "{reply:?}");
    let sender = "printer@lan.example";
    let received = delivered(&mut client, &billing, sender, "printed", sender).await;
    assert_eq!(received.auth_user, BILLING_USER);
}

#[tokio::test]
async fn the_status_page_shows_the_routes_and_a_reload_swaps_them() {
    let Offices {
        gmail,
        billing,
        relay,
    } = offices().await;
    let first_route = async || {
        let admin = relay.admin_addr.expect("admin interface on");
        let answer = http::get(admin, "/status.json", &[]).await;
        assert_eq!(answer.status, 200, "{answer:?}");
        let status: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
        assert_eq!(status["routes"].as_array().unwrap().len(), 4, "{status}");
        status["routes"][0].clone()
    };
    assert_eq!(
        first_route().await,
        serde_json::json!({
            "sender": "billing@office.example",
            "matches": "envelope",
            "account": "billing",
            "users": [LOCAL_USER],
        })
    );

    relay
        .reload(config(&gmail, &billing, "gmail"))
        .await
        .unwrap();

    assert_eq!(first_route().await["account"], "gmail");
    let mut client = relay.signed_in_client().await;
    let sender = "billing@office.example";
    delivered(&mut client, &gmail, sender, "reloaded", sender).await;
    let page = http::get(relay.admin_addr.unwrap(), "/", &[]).await;
    assert!(
        page.body.contains(
            "<td>billing@office.example</td><td>envelope sender</td><td>invoices</td><td>gmail</td>"
        ),
        "{}",
        page.body
    );
}
