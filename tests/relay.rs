//! End to end over real sockets: a legacy client talks to the relay, the
//! relay delivers to a fake Gmail over verified TLS.

mod common;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::fake_upstream::{FakeUpstream, FakeUpstreamOptions, Script, UpstreamTls, gmail};
use common::log_capture::LogCapture;
use common::relay::{
    LOCAL_PASSWORD, LOCAL_USER, Relay, UPSTREAM_PASSWORD, UPSTREAM_USER, config_for,
    config_with_account,
};
use common::smtp::{Client, Reply, plain};

const PASSTHROUGH: &str = "[delivery]\nmode = \"passthrough\"";
const WAIT: Duration = Duration::from_secs(10);
/// Complete, so the relay adds nothing but its Received field.
const MESSAGE: &str = "From: Invoices <billing@legacy.example>\r\nTo: customer@example.com\r\nSubject: Invoice 42\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <42@legacy.example>\r\n\r\nPlease find invoice 42.\r\n";

/// A fake Gmail and a relay delivering to it.
struct Setup {
    upstream: FakeUpstream,
    relay: Relay,
}

impl Setup {
    async fn new() -> Setup {
        Setup::scripted(Script::default()).await
    }

    async fn scripted(script: Script) -> Setup {
        Setup::scripted_with(script, "").await
    }

    /// Passthrough mode: the client hears the upstream's verdict and retries
    /// failures itself, as before the spool existed.
    async fn passthrough(script: Script) -> Setup {
        Setup::scripted_with(script, PASSTHROUGH).await
    }

    async fn scripted_with(script: Script, extra: &str) -> Setup {
        let mut options =
            FakeUpstreamOptions::new(UpstreamTls::StartTls, UPSTREAM_USER, UPSTREAM_PASSWORD);
        options.script = script;
        Setup::with(options, extra).await
    }

    /// `extra` is appended to the relay's TOML configuration.
    async fn configured(extra: &str) -> Setup {
        let options =
            FakeUpstreamOptions::new(UpstreamTls::StartTls, UPSTREAM_USER, UPSTREAM_PASSWORD);
        Setup::with(options, extra).await
    }

    async fn with(options: FakeUpstreamOptions, extra: &str) -> Setup {
        let tls = options.tls;
        let upstream = FakeUpstream::start(options).await;
        let relay = Relay::start(config_for(&upstream, tls, extra)).await;
        Setup { upstream, relay }
    }
}

/// Sends MESSAGE to one recipient and asserts the upstream accepted it.
async fn assert_relays(client: &mut Client) {
    let reply = client
        .send_mail("a@legacy.example", &["b@example.com"], MESSAGE)
        .await;
    assert_eq!(reply.code, 250, "{reply:?}");
}

/// Signs in and relays MESSAGE to `to`; returns the reply to the data and
/// the still-open client.
async fn send(relay: &Relay, to: &[&str]) -> (Reply, Client) {
    let mut client = relay.signed_in_client().await;
    let reply = client.send_mail("a@legacy.example", to, MESSAGE).await;
    (reply, client)
}

#[tokio::test]
async fn auth_plain_client_mail_arrives_upstream_via_starttls() {
    let setup = Setup::new().await;
    let (upstream, relay) = (&setup.upstream, &setup.relay);
    let mut client = relay.signed_in_client().await;

    let reply = client
        .send_mail(
            "billing@legacy.example",
            &["customer@example.com", "cc@example.com"],
            MESSAGE,
        )
        .await;

    assert_eq!(reply.code, 250, "{reply:?}");
    assert!(reply.text.starts_with("2.0.0 OK queued as "), "{reply:?}");
    let received = upstream.wait_for_messages(1, WAIT).await;
    assert_eq!(received.len(), 1);
    let message = &received[0];
    assert_eq!(message.auth_user, UPSTREAM_USER);
    // The envelope sender upstream is the account's sender.
    assert_eq!(message.mail_from, UPSTREAM_USER);
    assert_eq!(message.rcpt_to, ["customer@example.com", "cc@example.com"]);
    assert_eq!(message.without_trace(), MESSAGE);
}

#[tokio::test]
async fn auth_login_with_and_without_initial_response() {
    let setup = Setup::new().await;
    let (upstream, relay) = (&setup.upstream, &setup.relay);
    let user = BASE64.encode(LOCAL_USER);
    let password = BASE64.encode(LOCAL_PASSWORD);

    let mut client = relay.greeted_client().await;
    let challenge = client.expect("AUTH LOGIN", 334).await;
    assert_eq!(challenge.text, "VXNlcm5hbWU6");
    client.expect(&user, 334).await;
    client.expect(&password, 235).await;
    assert_relays(&mut client).await;

    let mut client = relay.greeted_client().await;
    client.expect(&format!("AUTH LOGIN {user}"), 334).await;
    client.expect(&password, 235).await;
    assert_relays(&mut client).await;

    assert_eq!(upstream.wait_for_messages(2, WAIT).await.len(), 2);
}

#[tokio::test]
async fn auth_plain_without_initial_response_and_cancel() {
    let setup = Setup::new().await;
    let relay = &setup.relay;
    let mut client = relay.greeted_client().await;

    client.expect("AUTH PLAIN", 334).await;
    let cancelled = client.expect("*", 501).await;
    assert!(cancelled.text.starts_with("5.0.0"), "{cancelled:?}");

    client.expect("AUTH PLAIN", 334).await;
    client.expect(&plain(LOCAL_USER, LOCAL_PASSWORD), 235).await;
    client.expect("AUTH PLAIN", 503).await;
}

#[tokio::test]
async fn helo_only_client_from_trusted_network_sends_without_auth() {
    let extra = "[server]\ntrusted_networks = [\"127.0.0.0/8\"]\ndefault_account = \"gmail\"";
    let setup = Setup::configured(extra).await;
    let (upstream, relay) = (&setup.upstream, &setup.relay);

    let mut client = Client::connect(relay.addr).await;
    let helo = client.expect("HELO printer", 250).await;
    assert_eq!(helo.text, "relay.test");
    let reply = client
        .send_mail("scanner@office.example", &["me@example.com"], MESSAGE)
        .await;

    assert_eq!(reply.code, 250, "{reply:?}");
    let received = upstream.wait_for_messages(1, WAIT).await;
    assert_eq!(received[0].rcpt_to, ["me@example.com"]);
}

#[tokio::test]
async fn untrusted_client_without_auth_is_refused() {
    let setup = Setup::new().await;
    let (upstream, relay) = (&setup.upstream, &setup.relay);
    let mut client = relay.greeted_client().await;

    let reply = client.expect("MAIL FROM:<spammer@example.com>", 530).await;

    assert_eq!(reply.text, "5.7.0 Authentication required");
    client.expect("RCPT TO:<victim@example.com>", 503).await;
    assert_eq!(upstream.connections(), 0, "nothing may reach the upstream");
}

#[tokio::test]
async fn wrong_local_password_is_a_local_535() {
    let setup = Setup::new().await;
    let (upstream, relay) = (&setup.upstream, &setup.relay);
    let mut client = relay.greeted_client().await;

    let reply = client.login_plain(LOCAL_USER, "not-the-password").await;
    assert_eq!(
        (reply.code, reply.text.as_str()),
        (535, "5.7.8 Authentication credentials invalid")
    );
    assert_eq!(client.login_plain("nobody", LOCAL_PASSWORD).await.code, 535);
    // The third failure also closes the connection.
    assert_eq!(
        client.login_plain(LOCAL_USER, "again wrong").await.code,
        535
    );
    assert_eq!(client.read_reply().await.code, 421);
    assert!(client.is_closed().await);
    assert_eq!(upstream.connections(), 0);
}

#[tokio::test]
async fn client_starttls_then_auth_and_send() {
    let setup = Setup::new().await;
    let (upstream, relay) = (&setup.upstream, &setup.relay);
    let mut client = Client::connect(relay.addr).await;
    assert!(client.ehlo().await.text.contains("STARTTLS"));

    let mut client = client.starttls(&relay.cert).await;
    let ehlo = client.ehlo().await;
    assert!(!ehlo.text.contains("STARTTLS"), "{ehlo:?}");
    assert_eq!(
        client.login_plain(LOCAL_USER, LOCAL_PASSWORD).await.code,
        235
    );
    assert_relays(&mut client).await;
    assert_eq!(upstream.wait_for_messages(1, WAIT).await.len(), 1);
}

#[tokio::test]
async fn plaintext_pipelined_after_starttls_is_discarded() {
    let setup = Setup::new().await;
    let relay = &setup.relay;
    let mut client = relay.greeted_client().await;

    // An attacker on the path appends a command to STARTTLS (CVE-2011-0411).
    client.write(b"STARTTLS\r\nNOOP injected\r\n").await;
    let mut client = {
        assert_eq!(client.read_reply().await.code, 220);
        client.into_tls(&relay.cert).await
    };

    // The first reply inside TLS answers our EHLO, not the injected NOOP.
    let ehlo = client.ehlo().await;
    assert!(ehlo.text.starts_with("relay.test"), "{ehlo:?}");
}

#[tokio::test]
async fn implicit_tls_listener() {
    let extra = "[server]\nlisten_tls = \"127.0.0.1:0\"";
    let setup = Setup::configured(extra).await;
    let (upstream, relay) = (&setup.upstream, &setup.relay);

    let mut client = Client::connect_tls(relay.tls_addr.unwrap(), &relay.cert).await;
    client.ehlo().await;
    assert_eq!(
        client.login_plain(LOCAL_USER, LOCAL_PASSWORD).await.code,
        235
    );
    assert_relays(&mut client).await;
    assert_eq!(upstream.wait_for_messages(1, WAIT).await.len(), 1);
}

#[tokio::test]
async fn upstream_via_implicit_tls() {
    let options = FakeUpstreamOptions::new(UpstreamTls::Implicit, UPSTREAM_USER, UPSTREAM_PASSWORD);
    let setup = Setup::with(options, "").await;
    let (upstream, relay) = (&setup.upstream, &setup.relay);

    let (reply, _client) = send(relay, &["b@example.com"]).await;

    assert_eq!(reply.code, 250, "{reply:?}");
    assert_eq!(
        upstream.wait_for_messages(1, WAIT).await[0].auth_user,
        UPSTREAM_USER
    );
}

#[tokio::test]
async fn passthrough_untrusted_upstream_certificate_fails_clearly() {
    let mut options =
        FakeUpstreamOptions::new(UpstreamTls::StartTls, UPSTREAM_USER, UPSTREAM_PASSWORD);
    options.trusted_cert = false;
    let setup = Setup::with(options, PASSTHROUGH).await;
    let (upstream, relay) = (&setup.upstream, &setup.relay);

    let (reply, _client) = send(relay, &["b@example.com"]).await;

    assert_eq!(reply.code, 451, "{reply:?}");
    assert!(reply.text.starts_with("4.4.1"), "{reply:?}");
    assert!(
        reply.text.contains("certificate is not trusted"),
        "{reply:?}"
    );
    assert!(reply.text.contains("accounts.gmail.ca_file"), "{reply:?}");
    assert_eq!(
        upstream.auth_attempts(),
        0,
        "no password may be sent to an unverified server"
    );
    assert!(upstream.received().is_empty());
}

#[tokio::test]
async fn upstream_rejecting_a_recipient_passes_its_reply_through() {
    let setup = Setup::scripted(Script {
        rcpt: Some(gmail::RECIPIENT_UNKNOWN.to_string()),
        ..Script::default()
    })
    .await;
    let relay = &setup.relay;
    let (reply, mut client) = send(relay, &["typo@example.com"]).await;

    assert_eq!(reply.code, 550);
    assert!(
        reply
            .text
            .starts_with("5.1.1 The email account that you tried to reach does not exist"),
        "{reply:?}"
    );
    assert!(
        reply.text.contains("NoSuchUser"),
        "multi-line text is kept: {reply:?}"
    );
    // The session goes on.
    client.expect("NOOP", 250).await;
}

#[tokio::test]
async fn upstream_rejecting_the_message_passes_its_reply_through() {
    let setup = Setup::scripted(Script {
        data: Some(gmail::UNAUTHENTICATED_SENDER.to_string()),
        ..Script::default()
    })
    .await;
    let relay = &setup.relay;
    let (reply, _client) = send(relay, &["b@example.com"]).await;

    assert_eq!(reply.code, 550);
    assert!(
        reply.text.starts_with("5.7.26 This mail has been blocked"),
        "{reply:?}"
    );
}

#[tokio::test]
async fn passthrough_app_password_required_is_temporary_with_a_hint() {
    let setup = Setup::passthrough(Script {
        auth: Some(gmail::APP_PASSWORD_REQUIRED.to_string()),
        ..Script::default()
    })
    .await;
    let relay = &setup.relay;
    let (reply, _client) = send(relay, &["b@example.com"]).await;

    // Not a 535: the client's own login was fine, and it should retry later.
    assert_eq!(reply.code, 454, "{reply:?}");
    assert!(reply.text.contains("534 5.7.9"), "{reply:?}");
    assert!(
        reply.text.contains("app password") && reply.text.contains("accounts.gmail.password"),
        "{reply:?}"
    );
    assert!(!reply.text.contains(UPSTREAM_PASSWORD));

    // The account is now on hold: the next message gets the same answer at
    // once, without another sign-in, and nothing stays in the spool.
    let sign_ins = setup.upstream.auth_attempts();
    let (again, _client) = send(relay, &["b@example.com"]).await;
    assert_eq!(again.code, 454, "{again:?}");
    assert_eq!(setup.upstream.auth_attempts(), sign_ins);
    let spooled = ["active", "deferred", "held", "rejected"]
        .iter()
        .flat_map(|state| std::fs::read_dir(relay.spool.join(state)).unwrap())
        .count();
    assert_eq!(
        spooled, 0,
        "the client keeps its messages in passthrough mode"
    );
}

#[tokio::test]
async fn passthrough_wrong_app_password_is_temporary() {
    let setup = Setup::passthrough(Script::default()).await;
    let (upstream, relay) = (&setup.upstream, &setup.relay);
    upstream.set_password("a-different-app-password");

    let (reply, _client) = send(relay, &["b@example.com"]).await;

    assert_eq!(reply.code, 454, "{reply:?}");
    assert!(reply.text.contains("535 5.7.8"), "{reply:?}");
}

#[tokio::test]
async fn passthrough_try_again_later_is_451_not_421() {
    let setup = Setup::passthrough(Script {
        mail: Some(gmail::TRY_AGAIN_LATER.to_string()),
        ..Script::default()
    })
    .await;
    let relay = &setup.relay;
    let (reply, mut client) = send(relay, &["b@example.com"]).await;

    assert_eq!(reply.code, 451, "{reply:?}");
    assert!(reply.text.starts_with("4.7.0 Try again later"), "{reply:?}");
    client.expect("NOOP", 250).await;
}

#[tokio::test]
async fn passthrough_upstream_unreachable_is_451() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let ca = tempfile::NamedTempFile::new().unwrap();
    let config = config_with_account(port, "starttls", ca.path().to_str().unwrap(), PASSTHROUGH);
    // ca_file must hold a certificate to be loaded; an empty one is refused.
    let config = sendbridge::config::Config {
        accounts: config
            .accounts
            .into_iter()
            .map(|(name, mut account)| {
                account.ca_file = None;
                (name, account)
            })
            .collect(),
        ..config
    };
    let relay = Relay::start(config).await;
    let (reply, _client) = send(&relay, &["b@example.com"]).await;

    assert_eq!(reply.code, 451, "{reply:?}");
    assert!(
        reply.text.starts_with("4.4.1 Upstream unavailable"),
        "{reply:?}"
    );
}

#[tokio::test]
async fn oversize_message_is_refused_at_mail_and_at_data() {
    let extra = "[server]\nmax_message_size = 1000";
    let setup = Setup::configured(extra).await;
    let (upstream, relay) = (&setup.upstream, &setup.relay);
    let mut client = relay.signed_in_client().await;

    // Announced size over the limit (EHLO advertised it as SIZE 1000).
    let reply = client
        .expect("MAIL FROM:<a@legacy.example> SIZE=5000", 552)
        .await;
    assert!(reply.text.starts_with("5.3.4"), "{reply:?}");

    // Not announced: the content is drained and then refused.
    client.expect("MAIL FROM:<a@legacy.example>", 250).await;
    client.expect("RCPT TO:<b@example.com>", 250).await;
    client.expect("DATA", 354).await;
    let line = "x".repeat(98) + "\r\n";
    client.write(line.repeat(200).as_bytes()).await;
    client.write(b".\r\n").await;
    let reply = client.read_reply().await;
    assert_eq!(reply.code, 552, "{reply:?}");
    assert!(reply.text.starts_with("5.3.4"), "{reply:?}");

    // The session is still in step and a small message goes through.
    assert_eq!(
        client
            .send_mail(
                "a@legacy.example",
                &["b@example.com"],
                "Subject: s\r\n\r\nok\r\n"
            )
            .await
            .code,
        250
    );
    assert_eq!(upstream.wait_for_messages(1, WAIT).await.len(), 1);
}

#[tokio::test]
async fn too_many_recipients_is_452() {
    let extra = "[server]\nmax_recipients = 2";
    let setup = Setup::configured(extra).await;
    let (upstream, relay) = (&setup.upstream, &setup.relay);
    let mut client = relay.signed_in_client().await;

    client.expect("MAIL FROM:<a@legacy.example>", 250).await;
    client.expect("RCPT TO:<one@example.com>", 250).await;
    client.expect("RCPT TO:<two@example.com>", 250).await;
    let reply = client.expect("RCPT TO:<three@example.com>", 452).await;
    assert!(reply.text.starts_with("4.5.3"), "{reply:?}");

    // The accepted two still get the message.
    client.expect("DATA", 354).await;
    client.write(MESSAGE.as_bytes()).await;
    client.write(b".\r\n").await;
    assert_eq!(client.read_reply().await.code, 250);
    assert_eq!(
        upstream.wait_for_messages(1, WAIT).await[0].rcpt_to.len(),
        2
    );
}

#[tokio::test]
async fn pipelined_transaction_gets_every_reply_in_order() {
    let setup = Setup::new().await;
    let (upstream, relay) = (&setup.upstream, &setup.relay);
    let mut client = Client::connect(relay.addr).await;
    let token = plain(LOCAL_USER, LOCAL_PASSWORD);

    client
        .write(
            format!(
                "EHLO legacy.test\r\nAUTH PLAIN {token}\r\nMAIL FROM:<a@legacy.example>\r\nRCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n"
            )
            .as_bytes(),
        )
        .await;

    let mut got = Vec::new();
    for _ in 0..6 {
        got.push(client.read_reply().await.code);
    }
    assert_eq!(got, [250, 235, 250, 250, 250, 354]);
    client
        .write(format!("{MESSAGE}.\r\nQUIT\r\n").as_bytes())
        .await;
    assert_eq!(client.read_reply().await.code, 250);
    assert_eq!(client.read_reply().await.code, 221);
    assert_eq!(
        upstream.wait_for_messages(1, WAIT).await[0].rcpt_to.len(),
        2
    );
}

#[tokio::test]
async fn empty_message_and_leading_dot_are_handled() {
    let setup = Setup::new().await;
    let (upstream, relay) = (&setup.upstream, &setup.relay);
    let mut client = relay.signed_in_client().await;

    // DATA followed at once by the terminator: an empty message.
    let reply = client
        .send_mail("a@legacy.example", &["b@example.com"], "")
        .await;
    assert_eq!(reply.code, 250, "{reply:?}");
    // A first line starting with a dot, stuffed on the wire.
    let reply = client
        .send_mail("a@legacy.example", &["b@example.com"], "..first\r\n")
        .await;
    assert_eq!(reply.code, 250, "{reply:?}");

    let received = upstream.wait_for_messages(2, WAIT).await;
    // An empty message gets the fields every message needs, and no body.
    let empty = received[0].without_trace();
    assert!(empty.starts_with("From: me@gmail.com\r\nDate: "), "{empty}");
    assert!(!empty.contains("\r\n\r\n"), "{empty}");
    // A line that is no header field starts the body.
    assert_eq!(received[1].body(), b".first\r\n");
}

#[tokio::test]
async fn dot_stuffed_lines_arrive_unchanged() {
    let setup = Setup::new().await;
    let (upstream, relay) = (&setup.upstream, &setup.relay);
    let mut client = relay.signed_in_client().await;
    let content = "Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nend\r\n";
    // On the wire every line starting with a dot gets one more.
    let stuffed = "Subject: dots\r\n\r\n..leading dot\r\n...two dots\r\n..\r\nend\r\n";

    assert_eq!(
        client
            .send_mail("a@legacy.example", &["b@example.com"], stuffed)
            .await
            .code,
        250
    );

    let received = upstream.wait_for_messages(1, WAIT).await;
    assert_eq!(
        received[0].body(),
        content.split_once("\r\n\r\n").unwrap().1.as_bytes()
    );
}

#[tokio::test]
async fn bare_lf_dot_cannot_smuggle_a_second_message() {
    let setup = Setup::new().await;
    let (upstream, relay) = (&setup.upstream, &setup.relay);
    let mut client = relay.signed_in_client().await;
    let smuggled = "Subject: hello\r\n\r\nhi\n.\nMAIL FROM:<ceo@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nSubject: smuggled\r\n\r\nsend money\r\n";

    let reply = client
        .send_mail("a@legacy.example", &["b@example.com"], smuggled)
        .await;

    assert_eq!(reply.code, 250, "{reply:?}");
    client.expect("NOOP", 250).await;
    let received = upstream.wait_for_messages(1, WAIT).await;
    assert_eq!(received.len(), 1, "exactly one message");
    let data = String::from_utf8_lossy(&received[0].data);
    assert!(
        data.contains("send money") && data.contains("MAIL FROM:<ceo@example.com>"),
        "{data}"
    );
    assert_eq!(received[0].rcpt_to, ["b@example.com"]);
}

/// The content after 354 is read straight into the message's buffer, many
/// bytes at a time: commands a client pipelines right after the final dot
/// come in the same reads and must still run, in order.
#[tokio::test]
async fn commands_pipelined_right_after_a_large_message_run_in_order() {
    let setup = Setup::new().await;
    let client = setup.relay.signed_in_client().await;
    pipeline_after_a_large_message(client, &setup.upstream).await;
}

/// The same inside STARTTLS, where reads come out of TLS records.
#[tokio::test]
async fn a_large_message_and_pipelined_commands_over_starttls() {
    let setup = Setup::new().await;
    let relay = &setup.relay;
    let mut client = Client::connect(relay.addr).await;
    client.ehlo().await;
    let mut client = client.starttls(&relay.cert).await;
    client.ehlo().await;
    let reply = client.login_plain(LOCAL_USER, LOCAL_PASSWORD).await;
    assert_eq!(reply.code, 235, "{reply:?}");
    pipeline_after_a_large_message(client, &setup.upstream).await;
}

/// About 200 KB, every line dot-stuffed so reads end inside them, with
/// MAIL, RCPT and DATA in the same write as its final dot; then a second
/// message. Both arrive, each to its own recipient, the first unstuffed
/// once.
async fn pipeline_after_a_large_message(mut client: Client, upstream: &FakeUpstream) {
    client.expect("MAIL FROM:<a@legacy.example>", 250).await;
    client.expect("RCPT TO:<b@example.com>", 250).await;
    client.expect("DATA", 354).await;
    let body = "..a line that starts with a dot\r\n".repeat(6000);
    let first = format!(
        "Subject: first\r\n\r\n{body}.\r\nMAIL FROM:<a@legacy.example>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n"
    );
    client.write(first.as_bytes()).await;

    for (what, code) in [
        ("first message", 250),
        ("MAIL", 250),
        ("RCPT", 250),
        ("DATA", 354),
    ] {
        let reply = client.read_reply().await;
        assert_eq!(reply.code, code, "{what}: {reply:?}");
    }
    client.write(b"Subject: second\r\n\r\nok\r\n.\r\n").await;
    assert_eq!(client.read_reply().await.code, 250);

    let received = upstream.wait_for_messages(2, WAIT).await;
    let by_subject = |subject: &str| {
        received
            .iter()
            .find(|message| String::from_utf8_lossy(&message.data).contains(subject))
            .unwrap_or_else(|| panic!("no message with {subject}"))
    };
    let first = by_subject("Subject: first");
    assert_eq!(first.rcpt_to, ["b@example.com"]);
    let unstuffed = ".a line that starts with a dot\r\n".repeat(6000);
    assert!(
        String::from_utf8_lossy(&first.data).ends_with(&format!("\r\n\r\n{unstuffed}")),
        "the body arrives whole, unstuffed once"
    );
    assert_eq!(by_subject("Subject: second").rcpt_to, ["c@example.com"]);
}

#[tokio::test]
async fn protocol_errors_get_the_proper_codes() {
    let setup = Setup::new().await;
    let relay = &setup.relay;
    let mut client = Client::connect(relay.addr).await;

    client.expect("MAIL FROM:<a@legacy.example>", 503).await; // before EHLO
    client.ehlo().await;
    client.expect("FROB", 500).await;
    client.expect("EXPN staff", 502).await;
    client.expect("MAIL FROM:a@b", 501).await;
    client.expect("RCPT TO:<b@example.com>", 503).await;
    client.expect("DATA", 503).await;
    let long = format!("NOOP {}", "x".repeat(5000));
    let reply = client.cmd(&long).await;
    assert_eq!(reply.code, 500, "{reply:?}");
    assert!(reply.text.contains("too long"), "{reply:?}");
    client.expect("VRFY someone", 252).await;
    client.expect("HELP", 214).await;
    client.expect("AUTH CRAM-MD5", 504).await;
    client.expect("RSET", 250).await;
    client.expect("QUIT", 221).await;
}

#[tokio::test]
async fn connections_over_the_limit_get_421() {
    let log = LogCapture::start();
    let extra = "[server]\nmax_connections = 2";
    let setup = Setup::configured(extra).await;
    let relay = &setup.relay;
    let _first = Client::connect(relay.addr).await;
    let _second = Client::connect(relay.addr).await;

    let stream = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let mut third = Client::over(Box::new(stream));
    let reply = third.read_reply().await;

    assert_eq!(reply.code, 421);
    assert!(reply.text.starts_with("4.3.2"), "{reply:?}");
    assert!(third.is_closed().await);
    // The configured limit, not the free slots (none).
    let refused = log.lines_with("over server.max_connections");
    assert_eq!(refused.len(), 1, "{}", log.text());
    assert_eq!(refused[0]["limit"], 2, "{}", log.text());
}

#[tokio::test]
async fn open_sessions_finish_during_the_shutdown_grace_then_get_421() {
    let setup = Setup::configured("[server]\nshutdown_grace = \"2s\"").await;
    let relay = setup.relay;
    let addr = relay.addr;
    let mut finishing = relay.signed_in_client().await;
    let mut lingering = relay.greeted_client().await;
    let started = tokio::time::Instant::now();
    let stopping = tokio::spawn(relay.stop());

    // New connections are refused at once.
    let refused = async {
        loop {
            match tokio::net::TcpStream::connect(addr).await {
                Err(_) => break,
                Ok(_) => tokio::task::yield_now().await,
            }
        }
    };
    tokio::time::timeout(WAIT, refused)
        .await
        .expect("listener closed");
    // An open session may still send.
    let reply = finishing
        .send_mail("a@legacy.example", &["b@example.com"], MESSAGE)
        .await;
    assert_eq!(reply.code, 250, "{reply:?}");
    finishing.expect("QUIT", 221).await;
    // One that stays idle is closed when the grace period is over.
    let reply = lingering.read_reply().await;

    assert_eq!(reply.code, 421);
    assert!(reply.text.starts_with("4.3.0"), "{reply:?}");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(2), "{waited:?}");
    tokio::time::timeout(WAIT, stopping).await.unwrap().unwrap();
    assert_eq!(setup.upstream.received().len(), 1);
}

#[tokio::test]
async fn shutdown_ends_at_once_when_no_session_is_open() {
    let setup = Setup::configured("[server]\nshutdown_grace = \"1h\"").await;
    let mut client = setup.relay.greeted_client().await;
    client.expect("QUIT", 221).await;

    tokio::time::timeout(WAIT, setup.relay.stop())
        .await
        .expect("no waiting for the grace period");
}
