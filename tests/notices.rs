//! Notices end to end: bounces to the sender, delay warnings, admin alerts
//! by email and webhook, through an account that can sign in, never twice.

mod common;

use std::time::Duration;

use common::fake_upstream::{FakeUpstream, FakeUpstreamOptions, Script, UpstreamTls};
use common::log_capture::LogCapture;
use common::relay::{Relay, UPSTREAM_PASSWORD, UPSTREAM_USER, config_for};
use common::wait::eventually;
use common::webhook::WebhookReceiver;
use mail_parser::{MessageParser, MimeHeaders};
use sendbridge::spool::{Envelope, Spool, State};

const WAIT: Duration = Duration::from_secs(30);
const SENDER: &str = "billing@legacy.example";
const ADMIN: &str = "it@example.com";
const REFUSED: &str = "nobody@example.com";
const REFUSAL: &str = "550-5.1.1 The email account that you tried to reach does not exist.\r\n550 5.1.1  https://support.google.com/mail/?p=NoSuchUser a1b2 - gsmtp";

async fn upstream(script: Script) -> FakeUpstream {
    let mut options =
        FakeUpstreamOptions::new(UpstreamTls::StartTls, UPSTREAM_USER, UPSTREAM_PASSWORD);
    options.script = script;
    FakeUpstream::start(options).await
}

fn refusing_one() -> Script {
    Script {
        rcpt_for: vec![(REFUSED.to_string(), REFUSAL.to_string())],
        ..Script::default()
    }
}

/// Every envelope in the spool, in any state.
fn queued(spool: &std::path::Path) -> Vec<Envelope> {
    let spool = Spool::open(spool).unwrap();
    State::ALL
        .into_iter()
        .flat_map(|state| spool.list(state).unwrap())
        .collect()
}

#[tokio::test]
async fn a_refused_recipient_bounces_to_the_sender_listing_only_it() {
    let upstream = upstream(refusing_one()).await;
    let relay = Relay::start(config_for(&upstream, UpstreamTls::StartTls, "")).await;
    let mut client = relay.signed_in_client().await;

    let reply = client
        .send_mail(
            SENDER,
            &["ok@example.com", REFUSED],
            "Subject: Invoice 1\r\n\r\nx\r\n",
        )
        .await;
    assert_eq!(reply.code, 250, "{reply:?}");

    let received = upstream.wait_for_messages(2, WAIT).await;
    let bounce = &received[1];
    assert_eq!(
        bounce.rcpt_to,
        [SENDER],
        "the bounce goes to the envelope sender"
    );
    let message = MessageParser::new().parse(&bounce.data).unwrap();
    let content_type = message.content_type().unwrap();
    assert_eq!(
        (content_type.ctype(), content_type.subtype()),
        ("multipart", Some("report"))
    );
    assert_eq!(
        content_type.attribute("report-type"),
        Some("delivery-status")
    );
    assert_eq!(
        message.header_raw("Auto-Submitted").map(str::trim),
        Some("auto-replied")
    );
    let parts: Vec<&[u8]> = message
        .parts
        .iter()
        .skip(1)
        .map(|part| &bounce.data[part.offset_body as usize..part.offset_end as usize])
        .collect();
    let status = String::from_utf8_lossy(parts[1]);
    assert!(
        status.contains(&format!("Final-Recipient: rfc822; {REFUSED}")),
        "{status}"
    );
    assert!(
        status.contains("Action: failed") && status.contains("Status: 5.1.1"),
        "{status}"
    );
    assert!(
        status.contains("NoSuchUser"),
        "the provider's whole reply: {status}"
    );
    assert!(
        !status.contains("ok@example.com"),
        "only the refused one: {status}"
    );
    assert!(String::from_utf8_lossy(parts[2]).contains("Subject: Invoice 1"));
    let rejected: Vec<Envelope> = queued(&relay.spool)
        .into_iter()
        .filter(|envelope| !envelope.is_notice)
        .collect();
    assert_eq!(rejected.len(), 1);
    assert!(
        rejected[0].notices.bounced,
        "recorded with the move to rejected/"
    );
}

#[tokio::test]
async fn null_senders_reports_and_auto_submitted_mail_get_no_bounce() {
    let upstream = upstream(refusing_one()).await;
    let extra = format!("[delivery]\nmode = \"queue\"\n[notify]\nadmin = [\"{ADMIN}\"]");
    let relay = Relay::start(config_for(&upstream, UpstreamTls::StartTls, &extra)).await;
    let mut client = relay.signed_in_client().await;
    let messages = [
        ("", "Subject: null sender\r\n"),
        (
            SENDER,
            "Subject: report\r\nContent-Type: multipart/report; report-type=delivery-status;\r\n boundary=x\r\n",
        ),
        (
            SENDER,
            "Subject: vacation\r\nAuto-Submitted: auto-replied\r\n",
        ),
    ];
    for (from, headers) in messages {
        let reply = client
            .send_mail(from, &[REFUSED], &format!("{headers}\r\nx\r\n"))
            .await;
        assert_eq!(reply.code, 250, "{reply:?}");
    }

    // Each refusal still alerts the admin; the alert is queued right after
    // the bounce would be.
    let received = upstream.wait_for_messages(3, WAIT).await;
    assert!(
        received.iter().all(|message| message.rcpt_to == [ADMIN]),
        "{received:?}"
    );
    let to_sender = queued(&relay.spool)
        .into_iter()
        .filter(|envelope| envelope.is_notice && envelope.recipients != [ADMIN])
        .count();
    assert_eq!(to_sender, 0);
}

/// `[accounts.backup]` at `backup`, the admin and the webhook.
fn with_backup_and_admin(backup: &FakeUpstream, webhook: &WebhookReceiver) -> String {
    format!(
        r#"
        [delivery]
        mode = "queue"
        [notify]
        admin = ["{ADMIN}"]
        webhook = "{}"
        [accounts.backup]
        host = "localhost"
        port = {}
        username = "{UPSTREAM_USER}"
        password = "{UPSTREAM_PASSWORD}"
        ca_file = "{}"
        "#,
        webhook.url(),
        backup.port(),
        backup.ca_file().display(),
    )
}

#[tokio::test]
async fn a_held_account_is_one_alert_through_another_account_even_across_a_restart() {
    let log = LogCapture::start();
    // The account's password is wrong: the upstream refuses the sign-in.
    let gmail = upstream(Script::default()).await;
    gmail.set_password("changed-by-someone");
    let backup = upstream(Script::default()).await;
    let webhook = WebhookReceiver::start().await;
    let extra = with_backup_and_admin(&backup, &webhook);
    let mut config = config_for(&gmail, UpstreamTls::StartTls, &extra);
    // One worker: the first refusal holds the account before the next try.
    config.accounts.get_mut("gmail").unwrap().max_connections = 1;
    let relay = Relay::start(config.clone()).await;
    let mut client = relay.signed_in_client().await;
    for n in 0..3 {
        let content = format!("Subject: Invoice {n}\r\n\r\nx\r\n");
        assert_eq!(
            client
                .send_mail(SENDER, &["customer@example.com"], &content)
                .await
                .code,
            250
        );
    }
    drop(client);

    let alerts = backup.wait_for_messages(1, WAIT).await;
    assert_eq!(alerts[0].rcpt_to, [ADMIN]);
    let text = String::from_utf8_lossy(&alerts[0].data);
    assert!(
        text.contains("account_held") && text.contains("gmail"),
        "{text}"
    );
    let posted = webhook.wait_for(1).await;
    assert!(posted[0].text().contains("account_held"), "{:?}", posted[0]);
    eventually("all three held", || async {
        Spool::open(&relay.spool)
            .unwrap()
            .ids(State::Held)
            .unwrap()
            .len()
            == 3
    })
    .await;
    assert_eq!(
        gmail.auth_attempts(),
        1,
        "the held account carried no notice"
    );
    eventually("the delivered alert left the spool", || async {
        !queued(&relay.spool)
            .iter()
            .any(|envelope| envelope.is_notice)
    })
    .await;

    // Restarted: the hold carries over and is probed at once, still
    // refused, and not alerted again.
    let dir = relay.stop().await;
    let relay = Relay::start_with_spool(config.clone(), dir.path().join("spool")).await;
    eventually("the probe at start", || async {
        !log.lines_with("account still on hold").is_empty()
    })
    .await;
    assert_eq!(gmail.auth_attempts(), 2);
    assert!(
        !queued(&relay.spool)
            .iter()
            .any(|envelope| envelope.is_notice)
    );
    assert_eq!(backup.received().len(), 1);
    assert_eq!(webhook.posted().len(), 1);

    // Fixed: released, and said once, through the account itself now.
    gmail.set_password("new-app-password");
    let mut fixed = config.clone();
    fixed.accounts.get_mut("gmail").unwrap().password =
        Some(sendbridge::secret::Secret::new("new-app-password"));
    relay.reload(fixed).await.unwrap();
    let received = gmail.wait_for_messages(4, WAIT).await;
    let released: Vec<_> = received.iter().filter(|m| m.rcpt_to == [ADMIN]).collect();
    assert_eq!(released.len(), 1, "{received:?}");
    assert!(String::from_utf8_lossy(&released[0].data).contains("account_released"));
    let posted = webhook.wait_for(2).await;
    assert!(
        posted[1].text().contains("account_released"),
        "{:?}",
        posted[1]
    );
    drop(dir);
}

/// `sendbridge notify test` with `env`: exit code, stdout, stderr.
async fn notify_test(env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let output = common::process::sendbridge(dir.path(), &["notify", "test"], env)
        .output()
        .await
        .unwrap();
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (
        output.status.code(),
        text(&output.stdout),
        text(&output.stderr),
    )
}

#[tokio::test]
async fn notify_test_exits_0_when_every_channel_took_it_and_1_naming_the_one_that_failed() {
    let upstream = upstream(Script::default()).await;
    let webhook = WebhookReceiver::start().await;
    let env = common::relay::env_for(&upstream);
    let mut env = common::relay::as_refs(&env);
    let (code, _, stderr) = notify_test(&env).await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("no notice channel configured"), "{stderr}");

    let admin = format!("[\"{ADMIN}\"]");
    let url = webhook.url();
    env.extend([
        ("SENDBRIDGE_NOTIFY__ADMIN", admin.as_str()),
        ("SENDBRIDGE_NOTIFY__WEBHOOK", url.as_str()),
    ]);
    let (code, stdout, stderr) = notify_test(&env).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert_eq!(upstream.received()[0].rcpt_to, [ADMIN]);
    assert_eq!(webhook.posted().len(), 1);
    assert!(
        !stdout.contains("SECRET"),
        "the webhook's query stays out: {stdout}"
    );

    webhook.answer_with(500);
    let (code, stdout, stderr) = notify_test(&env).await;
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("HTTP 500") && stderr.contains("webhook"),
        "{stdout}{stderr}"
    );
    assert!(stdout.contains("email to it@example.com: sent"), "{stdout}");
}

/// Every alert event in every webhook format, POSTed by the relay's own
/// webhook channel to a real local HTTP receiver.
#[tokio::test]
async fn a_webhook_receiver_gets_every_event_in_every_format() {
    use sendbridge::config::{Language, WebhookFormat};
    use sendbridge::notify::notice::{Alert, Event};
    use sendbridge::notify::{channels, compose};
    use std::sync::Arc;

    sendbridge::tls::install_crypto_provider();
    let receiver = WebhookReceiver::start().await;
    let formats = [
        WebhookFormat::Json,
        WebhookFormat::Slack,
        WebhookFormat::Ntfy,
    ];
    for format in formats {
        for event in Event::ALL {
            let alert = Alert {
                event,
                account: Some("gmail".into()),
                message_id: Some("20261129-abc".into()),
                recipients: vec!["boss@office.example".into()],
                reply: Some("550-5.1.1 first line\n550 5.1.1 second line".into()),
                hint: Some("set accounts.gmail.password".into()),
                count: Some(3),
                at: 1_790_000_000_000,
                relay: "relay.test".into(),
            };
            let body = Arc::new(compose::webhook_body(&alert, format, Language::En));
            let status = channels::post(receiver.url(), body, &[]).await;
            assert_eq!(status, Ok(200), "{format:?} {event:?}");
        }
    }

    let posted = receiver.wait_for(3 * Event::ALL.len()).await;
    let (json, rest) = posted.split_at(Event::ALL.len());
    let (slack, ntfy) = rest.split_at(Event::ALL.len());
    for (n, event) in Event::ALL.iter().enumerate() {
        let fields: serde_json::Value = serde_json::from_slice(&json[n].body).unwrap();
        assert_eq!(fields["event"], event.name());
        assert_eq!(fields["account"], "gmail");
        assert_eq!(json[n].header("content-type"), Some("application/json"));
        let text: serde_json::Value = serde_json::from_slice(&slack[n].body).unwrap();
        assert!(text["text"].as_str().unwrap().contains("gmail"), "{text}");
        assert!(ntfy[n].header("title").is_some(), "{:?}", ntfy[n].headers);
        assert!(ntfy[n].text().contains("gmail"), "{}", ntfy[n].text());
    }
}
