//! Through the whole relay: old programs' mail is repaired before it is
//! queued, and a refused session leaves a log line and a transcript that
//! explain it.

mod common;

use std::time::Duration;

use common::fake_upstream::{FakeUpstream, FakeUpstreamOptions, UpstreamTls};
use common::log_capture::LogCapture;
use common::relay::{
    LOCAL_PASSWORD, LOCAL_USER, Relay, UPSTREAM_PASSWORD, UPSTREAM_USER, config_for,
};
use common::smtp::plain;
use sendbridge::config::{Config, FromPolicy, LongLines, Transcripts};

const WAIT: Duration = Duration::from_secs(20);

async fn upstream() -> FakeUpstream {
    let options = FakeUpstreamOptions::new(UpstreamTls::StartTls, UPSTREAM_USER, UPSTREAM_PASSWORD);
    FakeUpstream::start(options).await
}

fn config(upstream: &FakeUpstream, change: impl FnOnce(&mut Config)) -> Config {
    let mut config = config_for(upstream, UpstreamTls::StartTls, "");
    change(&mut config);
    config
}

#[tokio::test]
async fn from_bcc_and_unwanted_fields_are_repaired_before_sending() {
    let upstream = upstream().await;
    let relay = Relay::start(config(&upstream, |config| {
        let gmail = config.accounts.get_mut("gmail").unwrap();
        gmail.from_policy = FromPolicy::Rewrite;
        gmail.remove_headers = vec!["X-Mailer".into()];
    }))
    .await;
    let message = "From: \"Rechnungsstelle M\u{fc}ller\" <billing@legacy.example>\r\n\
        To: customer@example.com\r\n\
        Bcc: boss@legacy.example,\r\n auditor@legacy.example\r\n\
        X-Mailer: Invoice2000\r\n\
        Subject: Rechnung f\u{fc}r M\u{e4}rz\r\n\
        \r\n\
        Total: 42 EUR\r\n";
    let mut client = relay.signed_in_client().await;

    let reply = client
        .send_mail(
            "billing@legacy.example",
            &["customer@example.com", "boss@legacy.example"],
            message,
        )
        .await;

    assert_eq!(reply.code, 250, "{reply:?}");
    let received = upstream.wait_for_messages(1, WAIT).await;
    let sent = received[0].without_trace();
    let (header, body) = sent.split_once("\r\n\r\n").unwrap();
    let fields: Vec<&str> = header.split("\r\n").collect();
    assert_eq!(
        fields[..4],
        [
            "From: \"Rechnungsstelle M\u{fc}ller\" <me@gmail.com>",
            "To: customer@example.com",
            "Subject: Rechnung f\u{fc}r M\u{e4}rz",
            "Reply-To: \"Rechnungsstelle M\u{fc}ller\" <billing@legacy.example>",
        ],
        "{header}"
    );
    assert!(fields[4].starts_with("Date: ") && fields[5].starts_with("Message-ID: <"));
    assert!(fields[5].ends_with("@relay.test>"), "{header}");
    assert_eq!(fields.len(), 6, "Bcc and X-Mailer are gone: {header}");
    assert_eq!(body, "Total: 42 EUR\r\n");
    // Bcc recipients stay in the envelope.
    assert_eq!(
        received[0].rcpt_to,
        ["customer@example.com", "boss@legacy.example"]
    );
}

/// A bare LF is a line end, and a dot stuffed after it is unstuffed, as
/// Postfix does; before, `\n..x` reached the provider as `..x`.
#[tokio::test]
async fn bare_line_feeds_become_crlf_without_doubling_dots() {
    let upstream = upstream().await;
    let relay = Relay::start(config(&upstream, |_| {})).await;
    let mut client = relay.signed_in_client().await;
    let content = "Subject: lf\nDate: Mon, 23 Nov 2026 10:00:00 +0000\nMessage-ID: <1@x>\n\nline one\n..dot line\nlast\r\n";

    let reply = client
        .send_mail("a@legacy.example", &["b@example.com"], content)
        .await;

    assert_eq!(reply.code, 250, "{reply:?}");
    let received = upstream.wait_for_messages(1, WAIT).await;
    assert_eq!(received[0].body(), b"line one\r\n.dot line\r\nlast\r\n");
}

#[tokio::test]
async fn a_refused_session_is_logged_once_with_its_reason_and_kept_as_a_transcript() {
    let upstream = upstream().await;
    let relay = Relay::start(config(&upstream, |config| {
        config.accounts.get_mut("gmail").unwrap().long_lines = LongLines::Reject;
        config.log.transcripts = Transcripts::Rejected;
    }))
    .await;
    let log = LogCapture::start();
    let transcripts = relay.spool.join("transcripts");
    let long_line = "x".repeat(1200);
    let mut client = relay.greeted_client().await;
    client
        .expect(
            &format!("AUTH PLAIN {}", plain(LOCAL_USER, LOCAL_PASSWORD)),
            235,
        )
        .await;

    let reply = client
        .send_mail(
            "billing@legacy.example",
            &["customer@example.com"],
            &format!("Subject: report\r\n\r\n{long_line}\r\nsecret body text\r\n"),
        )
        .await;
    client.expect("QUIT", 221).await;
    assert!(client.is_closed().await);

    assert_eq!(reply.code, 550, "{reply:?}");
    assert!(
        reply.text.starts_with("5.6.0 Line 3 is 1200 octets long"),
        "{reply:?}"
    );
    assert!(upstream.received().is_empty());
    let _spool = relay.stop().await;
    let files: Vec<_> = std::fs::read_dir(&transcripts).unwrap().collect();
    assert_eq!(files.len(), 1, "one transcript");
    let transcript = std::fs::read_to_string(files[0].as_ref().unwrap().path()).unwrap();

    let lines = log.lines_with("session closed");
    assert_eq!(lines.len(), 1, "{}", log.text());
    let line = &lines[0];
    assert_eq!(line["reason"], "long_lines");
    assert_eq!(line["user"], LOCAL_USER);
    assert!(line["reply"].as_str().unwrap().starts_with("550 5.6.0"));
    assert!(
        line["hint"]
            .as_str()
            .unwrap()
            .contains("accounts.gmail.long_lines")
    );
    assert!(line["transcript"].as_str().unwrap().ends_with(".log"));
    assert!(transcript.contains("C: AUTH PLAIN ***\n"), "{transcript}");
    assert!(transcript.contains("C: Subject: report\n"), "{transcript}");
    assert!(transcript.contains("S: 550 5.6.0 Line 3"), "{transcript}");
    for secret in [
        LOCAL_PASSWORD,
        &plain(LOCAL_USER, LOCAL_PASSWORD),
        "secret body text",
    ] {
        assert!(!transcript.contains(secret), "{transcript}");
        assert!(!log.text().contains(secret));
    }
}

#[tokio::test]
async fn clean_sessions_leave_no_transcript_unless_all_are_kept() {
    for (mode, kept) in [(Transcripts::Rejected, 0), (Transcripts::All, 1)] {
        let upstream = upstream().await;
        let relay = Relay::start(config(&upstream, |config| config.log.transcripts = mode)).await;
        let mut client = relay.signed_in_client().await;
        let reply = client
            .send_mail(
                "a@legacy.example",
                &["b@example.com"],
                "Subject: s\r\n\r\nhi\r\n",
            )
            .await;
        assert_eq!(reply.code, 250);
        client.expect("QUIT", 221).await;
        let transcripts = relay.spool.join("transcripts");
        let _spool = relay.stop().await;

        let files = std::fs::read_dir(&transcripts).unwrap().count();
        assert_eq!(files, kept, "{mode:?}");
    }
}
