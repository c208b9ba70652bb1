//! Notices end to end: bounces to the sender, delay warnings, admin alerts
//! by email and webhook, through an account that can sign in, never twice.

mod common;

use std::time::Duration;

use common::fake_upstream::{FakeUpstream, FakeUpstreamOptions, Script, UpstreamTls};
use common::log_capture::LogCapture;
use common::relay::{Relay, UPSTREAM_PASSWORD, UPSTREAM_USER, config_for};
use common::wait::eventually;
use common::webhook::WebhookReceiver;
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
    let text = String::from_utf8_lossy(&bounce.data);
    assert!(text.contains(REFUSED), "{text}");
    assert!(
        text.contains("NoSuchUser"),
        "the provider's whole reply: {text}"
    );
    assert!(
        !text.contains("ok@example.com"),
        "the delivered one is not listed: {text}"
    );
    assert!(text.contains("mailer-daemon@relay.test"), "{text}");
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
