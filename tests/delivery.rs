//! The spool-first delivery engine end to end: what the client hears, what
//! stays in the spool, retries, holds, connection reuse and the queue CLI.

mod common;

use std::path::Path;
use std::time::Duration;

use common::fake_upstream::{FakeUpstream, FakeUpstreamOptions, Script, UpstreamTls, gmail};
use common::process::sendbridge;
use common::relay::{Relay, UPSTREAM_PASSWORD, UPSTREAM_USER, config_for};
use common::smtp::{Client, Reply};

const WAIT: Duration = Duration::from_secs(20);

fn message(n: usize) -> String {
    format!("Message-ID: <{n}@legacy.example>\r\nSubject: invoice {n}\r\n\r\nInvoice {n}.\r\n")
}

async fn upstream_with(script: Script) -> FakeUpstream {
    let mut options =
        FakeUpstreamOptions::new(UpstreamTls::StartTls, UPSTREAM_USER, UPSTREAM_PASSWORD);
    options.script = script;
    FakeUpstream::start(options).await
}

async fn relay(upstream: &FakeUpstream, extra: &str) -> Relay {
    Relay::start(config_for(upstream, UpstreamTls::StartTls, extra)).await
}

async fn send(client: &mut Client, n: usize) -> Reply {
    client
        .send_mail(
            "billing@legacy.example",
            &["customer@example.com"],
            &message(n),
        )
        .await
}

/// Envelope files in one state directory of the spool.
fn count(spool: &Path, state: &str) -> usize {
    std::fs::read_dir(spool.join(state))
        .map(|entries| {
            entries
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .path()
                        .extension()
                        .is_some_and(|x| x == "json")
                })
                .count()
        })
        .unwrap_or(0)
}

/// Runs `sendbridge queue ...` against the relay's spool.
async fn queue(spool: &Path, args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut all = vec!["queue"];
    all.extend_from_slice(args);
    let out = tokio::time::timeout(
        WAIT,
        sendbridge(
            dir.path(),
            &all,
            &[("SENDBRIDGE_SPOOL__DIR", spool.to_str().unwrap())],
        )
        .output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(
        out.status.success(),
        "queue {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn subjects(received: &[common::fake_upstream::Received]) -> Vec<String> {
    let mut subjects: Vec<String> = received
        .iter()
        .map(|m| {
            let text = String::from_utf8_lossy(&m.data).into_owned();
            text.lines()
                .find(|l| l.starts_with("Subject:"))
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    subjects.sort();
    subjects
}

#[tokio::test]
async fn hybrid_permanent_rejection_is_answered_and_kept_in_rejected() {
    let upstream = upstream_with(Script {
        rcpt: Some(gmail::RECIPIENT_UNKNOWN.into()),
        ..Script::default()
    })
    .await;
    let relay = relay(&upstream, "").await;
    let mut client = relay.signed_in_client().await;

    let reply = send(&mut client, 1).await;

    assert_eq!(reply.code, 550, "{reply:?}");
    assert!(
        reply.text.starts_with("5.1.1 The email account"),
        "{reply:?}"
    );
    assert_eq!(count(&relay.spool, "rejected"), 1);
    let listing = queue(&relay.spool, &["list"]).await;
    assert!(
        listing.contains("rejected") && listing.contains("550 5.1.1"),
        "{listing}"
    );
}

#[tokio::test]
async fn temporary_failure_is_accepted_and_delivered_when_the_upstream_recovers() {
    let upstream = upstream_with(Script {
        mail: Some(gmail::TRY_AGAIN_LATER.into()),
        ..Script::default()
    })
    .await;
    let relay = relay(&upstream, "[delivery]\nretry_initial = \"1s\"").await;
    let mut client = relay.signed_in_client().await;

    let reply = send(&mut client, 1).await;

    assert_eq!(reply.code, 250, "{reply:?}");
    assert!(reply.text.starts_with("2.0.0 OK queued as "), "{reply:?}");
    assert_eq!(
        count(&relay.spool, "deferred"),
        1,
        "the first attempt was deferred"
    );
    upstream.set_script(Script::default());
    let received = upstream.wait_for_messages(1, WAIT).await;
    assert_eq!(subjects(&received), ["Subject: invoice 1"]);
}

#[tokio::test]
async fn dead_upstream_is_retried_until_it_comes_back() {
    let mut options =
        FakeUpstreamOptions::new(UpstreamTls::StartTls, UPSTREAM_USER, UPSTREAM_PASSWORD);
    let first = FakeUpstream::start(options.clone()).await;
    let relay = relay(&first, "[delivery]\nretry_initial = \"1s\"").await;
    options.port = first.port();
    first.stop().await;
    let mut client = relay.signed_in_client().await;

    assert_eq!(send(&mut client, 1).await.code, 250);
    assert_eq!(count(&relay.spool, "deferred"), 1);

    let upstream = FakeUpstream::start(options).await;
    let received = upstream.wait_for_messages(1, WAIT).await;
    assert_eq!(subjects(&received), ["Subject: invoice 1"]);
}

#[tokio::test]
async fn wrong_app_password_holds_mail_and_queue_retry_sends_it_once() {
    let upstream = upstream_with(Script::default()).await;
    upstream.set_password("the-new-app-password");
    // Probes are far apart here: only `queue retry` releases the hold.
    let relay = relay(
        &upstream,
        "[delivery]\nretry_initial = \"1h\"\nscan_interval = \"200ms\"",
    )
    .await;
    let mut client = relay.signed_in_client().await;

    for n in 1..=3 {
        let reply = send(&mut client, n).await;
        assert_eq!(reply.code, 250, "{reply:?}");
    }

    assert_eq!(count(&relay.spool, "held"), 3);
    assert_eq!(
        upstream.auth_attempts(),
        1,
        "one refused sign-in, no retry storm"
    );
    // The operator fixes the app password at the provider and releases it.
    upstream.set_password(UPSTREAM_PASSWORD);
    let output = queue(&relay.spool, &["retry", "--account", "gmail"]).await;
    assert!(output.starts_with("3 message(s) due now"), "{output}");
    let received = upstream.wait_for_messages(3, WAIT).await;
    assert_eq!(
        subjects(&received),
        [
            "Subject: invoice 1",
            "Subject: invoice 2",
            "Subject: invoice 3"
        ]
    );
    // A later message arrives after them and nothing was sent twice.
    assert_eq!(send(&mut client, 4).await.code, 250);
    assert_eq!(upstream.wait_for_messages(4, WAIT).await.len(), 4);
    assert_eq!(
        count(&relay.spool, "held") + count(&relay.spool, "deferred"),
        0
    );
}

#[tokio::test]
async fn hold_is_released_by_the_probe_once_sign_in_works() {
    let upstream = upstream_with(Script {
        auth: Some(gmail::APP_PASSWORD_REQUIRED.into()),
        ..Script::default()
    })
    .await;
    let relay = relay(&upstream, "[delivery]\nretry_initial = \"1s\"").await;
    let mut client = relay.signed_in_client().await;
    assert_eq!(send(&mut client, 1).await.code, 250);
    assert_eq!(send(&mut client, 2).await.code, 250);
    assert_eq!(count(&relay.spool, "held"), 2);

    // The account owner creates the app password; nobody touches the relay.
    upstream.set_script(Script::default());

    let received = upstream.wait_for_messages(2, WAIT).await;
    assert_eq!(
        subjects(&received),
        ["Subject: invoice 1", "Subject: invoice 2"]
    );
}

#[tokio::test]
async fn upstream_connections_are_reused() {
    let upstream = upstream_with(Script::default()).await;
    let mut config = config_for(
        &upstream,
        UpstreamTls::StartTls,
        "[delivery]\nmode = \"queue\"",
    );
    config.accounts.get_mut("gmail").unwrap().max_connections = 2;
    let relay = Relay::start(config).await;
    let mut client = relay.signed_in_client().await;

    for n in 0..20 {
        assert_eq!(send(&mut client, n).await.code, 250);
    }

    assert_eq!(upstream.wait_for_messages(20, WAIT).await.len(), 20);
    let connections = upstream.connections();
    println!("20 messages over {connections} upstream connection(s)");
    assert!(
        connections <= 2,
        "{connections} connections for 20 messages"
    );
}

#[tokio::test]
async fn a_reused_upstream_connection_is_reset_only_after_an_unfinished_transaction() {
    let refused = "nobody@example.com";
    let upstream = upstream_with(Script {
        rcpt_for: vec![(refused.to_string(), gmail::RECIPIENT_UNKNOWN.to_string())],
        ..Script::default()
    })
    .await;
    let mut config = config_for(&upstream, UpstreamTls::StartTls, "");
    config.accounts.get_mut("gmail").unwrap().max_connections = 1;
    let relay = Relay::start(config).await;
    let mut client = relay.signed_in_client().await;

    // Each delivered before the next is sent (hybrid mode): a finished
    // transaction leaves nothing to reset.
    for n in 0..3 {
        assert_eq!(send(&mut client, n).await.code, 250);
    }
    assert_eq!(upstream.wait_for_messages(3, WAIT).await.len(), 3);
    assert_eq!(upstream.rsets(), 0, "RSETs after delivered messages");

    // Its only recipient refused, this transaction ends without DATA: the
    // next MAIL needs a RSET first.
    let reply = client
        .send_mail("billing@legacy.example", &[refused], &message(3))
        .await;
    assert_eq!(reply.code, 550, "{reply:?}");
    assert_eq!(send(&mut client, 4).await.code, 250);
    assert_eq!(upstream.wait_for_messages(4, WAIT).await.len(), 4);
    assert_eq!(upstream.rsets(), 1);
    assert_eq!(upstream.connections(), 1);
}

/// Gmail's capabilities without PIPELINING.
const EHLO_WITHOUT_PIPELINING: &str = "250-smtp.fake.test at your service\r\n250-SIZE 35882577\r\n250-8BITMIME\r\n250-AUTH LOGIN PLAIN XOAUTH2\r\n250 ENHANCEDSTATUSCODES";

/// Sends one message to `recipients` through a relay in front of an
/// upstream playing `script`; returns whom the upstream received it for.
async fn delivered_to(script: Script, recipients: &[&str]) -> Vec<String> {
    let upstream = upstream_with(script).await;
    let relay = relay(&upstream, "").await;
    let mut client = relay.signed_in_client().await;
    let reply = client
        .send_mail("billing@legacy.example", recipients, &message(1))
        .await;
    assert_eq!(reply.code, 250, "{reply:?}");
    let mut received = upstream.wait_for_messages(1, WAIT).await;
    received.remove(0).rcpt_to
}

#[tokio::test]
async fn the_envelope_goes_in_one_round_trip_when_the_upstream_offers_pipelining() {
    // This upstream answers MAIL and RCPT only once DATA has arrived too:
    // a relay waiting for each reply before its next command never
    // delivers.
    let refused = "nobody@example.com";
    let script = Script {
        answer_with_data: true,
        rcpt_for: vec![(refused.to_string(), gmail::RECIPIENT_UNKNOWN.to_string())],
        ..Script::default()
    };
    let recipients = ["customer@example.com", refused, "accounts@example.com"];
    assert_eq!(
        delivered_to(script, &recipients).await,
        ["customer@example.com", "accounts@example.com"]
    );
}

#[tokio::test]
async fn without_pipelining_each_command_waits_for_its_reply() {
    // Like Postfix with reject_unauth_pipelining, this upstream refuses a
    // command sent before the reply to the one before.
    let script = Script {
        ehlo: Some(EHLO_WITHOUT_PIPELINING.to_string()),
        ..Script::default()
    };
    let recipients = ["customer@example.com", "accounts@example.com"];
    assert_eq!(delivered_to(script, &recipients).await, recipients);
}

#[tokio::test]
async fn spool_failure_is_452_and_nothing_is_acknowledged() {
    let upstream = upstream_with(Script::default()).await;
    let relay = relay(&upstream, "").await;
    let mut client = relay.signed_in_client().await;
    assert_eq!(send(&mut client, 1).await.code, 250);
    assert_eq!(upstream.wait_for_messages(1, WAIT).await.len(), 1);
    // The directory new messages are stored in disappears (a broken disk
    // or mount), with the journal file being written to.
    std::fs::remove_dir_all(relay.spool.join("journal")).unwrap();

    let reply = send(&mut client, 2).await;

    assert_eq!(reply.code, 452, "{reply:?}");
    assert!(reply.text.starts_with("4.3.1"), "{reply:?}");
    // Refused before any delivery job existed: nothing to wait for.
    assert_eq!(upstream.received().len(), 1, "nothing more was sent");
}

#[tokio::test]
async fn queue_cli_shows_retries_and_deletes() {
    let upstream = upstream_with(Script {
        data: Some("554 5.7.1 Message refused".into()),
        ..Script::default()
    })
    .await;
    let relay = relay(&upstream, "[delivery]\nscan_interval = \"200ms\"").await;
    let mut client = relay.signed_in_client().await;
    assert_eq!(send(&mut client, 1).await.code, 554);
    assert_eq!(send(&mut client, 2).await.code, 554);
    let list = queue(&relay.spool, &["list", "--json"]).await;
    let entries: serde_json::Value = serde_json::from_str(&list).unwrap();
    let ids: Vec<&str> = entries
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["envelope"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);

    let shown = queue(&relay.spool, &["show", ids[0]]).await;
    assert!(shown.contains("state:      rejected"), "{shown}");
    assert!(shown.contains("Subject: invoice 1"), "headers: {shown}");
    assert!(
        shown.contains("rejected: 554 5.7.1 Message refused"),
        "history: {shown}"
    );

    queue(&relay.spool, &["delete", ids[1]]).await;
    assert_eq!(count(&relay.spool, "rejected"), 1);
    // The cause is fixed; replaying the rejected message delivers it.
    upstream.set_script(Script::default());
    queue(&relay.spool, &["retry", ids[0]]).await;
    let received = upstream.wait_for_messages(1, WAIT).await;
    assert_eq!(subjects(&received), ["Subject: invoice 1"]);
}

/// Messages already queued when a hold starts must wait in held/ like the
/// rest, not vanish: their clients were told 250.
#[tokio::test]
async fn messages_queued_when_a_hold_starts_are_all_held() {
    let upstream = upstream_with(Script::default()).await;
    upstream.set_password("the-new-app-password");
    let mut config = config_for(
        &upstream,
        UpstreamTls::StartTls,
        "[delivery]\nretry_initial = \"1h\"",
    );
    // One worker: the first message's refused sign-in starts the hold while
    // the others wait in its queue.
    config.accounts.get_mut("gmail").unwrap().max_connections = 1;
    let relay = Relay::start(config).await;
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(relay.signed_in_client().await);
    }

    // All at once, each from its own session.
    let sends: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(n, mut client)| tokio::spawn(async move { send(&mut client, n).await }))
        .collect();
    let mut replies = Vec::new();
    for sent in sends {
        replies.push(sent.await.unwrap());
    }

    assert!(replies.iter().all(|reply| reply.code == 250), "{replies:?}");
    assert_eq!(
        count(&relay.spool, "held"),
        8,
        "every acknowledged message is kept"
    );
    assert_eq!(upstream.auth_attempts(), 1);
}
