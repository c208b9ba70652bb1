//! What operators read about a message: the JSON log's values and fields,
//! and a provider's multi-line reply kept whole (Gmail puts its help link on
//! the last line) in the log, `queue show`, `queue list --json` and the
//! status page. The relay runs as a process, configured as a container is.

mod common;

use std::path::Path;
use std::time::Duration;

use common::fake_upstream::{FakeUpstream, FakeUpstreamOptions, Script, UpstreamTls, gmail};
use common::process::{RelayProcess, sendbridge};
use common::relay::{
    LOCAL_PASSWORD, LOCAL_USER, UPSTREAM_PASSWORD, UPSTREAM_USER, as_refs, env_for,
};
use common::smtp::{Client, Reply};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);
/// Gmail's help link, on the last line of its reply.
const HELP_LINK: &str = "https://support.google.com/mail/?p=NoSuchUser";

async fn upstream(script: Script) -> FakeUpstream {
    let mut options =
        FakeUpstreamOptions::new(UpstreamTls::StartTls, UPSTREAM_USER, UPSTREAM_PASSWORD);
    options.script = script;
    FakeUpstream::start(options).await
}

/// Signs in as the local user and sends one message without a Date.
async fn send_one(relay: &RelayProcess) -> Reply {
    let mut client = Client::connect(relay.addr).await;
    client.ehlo().await;
    assert_eq!(
        client.login_plain(LOCAL_USER, LOCAL_PASSWORD).await.code,
        235
    );
    let reply = client
        .send_mail(
            "me@gmail.com",
            &["nobody@example.com"],
            "Subject: invoice\r\n\r\nbody\r\n",
        )
        .await;
    client.expect("QUIT", 221).await;
    reply
}

/// The first JSON log line whose message contains `message`.
fn json_line(log: &[String], message: &str) -> Value {
    log.iter()
        .map(|line| serde_json::from_str::<Value>(line).expect("a JSON log line"))
        .find(|line| line["message"].as_str().unwrap_or("").contains(message))
        .unwrap_or_else(|| panic!("no {message:?} line: {log:#?}"))
}

async fn stdout(dir: &Path, args: &[&str]) -> String {
    let out = tokio::time::timeout(WAIT, sendbridge(dir, args, &[]).output())
        .await
        .expect("the command finishes")
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The JSON log of a relay process that received and delivered one
/// message, then stopped.
async fn json_log_of_one_delivered_message() -> Vec<String> {
    let upstream = upstream(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = env_for(&upstream);
    env.push(("SENDBRIDGE_LOG__FORMAT".into(), "json".into()));
    let relay = RelayProcess::start(dir.path(), &as_refs(&env)).await;

    assert_eq!(send_one(&relay).await.code, 250);
    relay.wait_for_line("message delivered").await;
    let (_, log) = relay.terminate().await;
    log
}

#[tokio::test]
async fn json_log_lines_carry_json_values_and_the_session_fields() {
    let log = json_log_of_one_delivered_message().await;

    let start = json_line(&log, "sendbridge is accepting connections");
    assert_eq!(start["listen_tls"], Value::Null, "{start}");
    assert_eq!(start["starttls"], true, "{start}");
    let received = json_line(&log, "message received");
    assert_eq!(received["from"], "me@gmail.com", "{received}");
    let rewrites = received["rewrites"]
        .as_array()
        .expect("rewrites: a JSON array");
    assert!(rewrites.contains(&"added Date".into()), "{received}");
    assert_eq!(received["recipients"], 1, "{received}");
    // The session's fields, beside the message's own `id`.
    let session = received["session"].as_str().expect("the session's id");
    assert!(
        !session.is_empty() && received["id"] != session,
        "{received}"
    );
    assert!(
        received["client"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{received}"
    );
    let closed = json_line(&log, "session closed");
    assert_eq!(closed["session"], session, "{closed}");
}

/// A delivered message's story in the log: received (and stored), then
/// delivered; one line each, in that order (the default `hybrid` mode
/// answers the client after the first attempt).
#[tokio::test]
async fn a_delivered_message_is_two_log_lines() {
    let log = json_log_of_one_delivered_message().await;

    let received = json_line(&log, "message received");
    assert_eq!(received["state"], "active", "{received}");
    let id = received["id"].as_str().expect("the message's id");
    let lines: Vec<&String> = log.iter().filter(|line| line.contains(id)).collect();
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(lines[0].contains("message received"), "{lines:#?}");
    assert!(lines[1].contains("message delivered"), "{lines:#?}");
}

#[tokio::test]
async fn a_multi_line_refusal_is_kept_whole_everywhere() {
    let upstream = upstream(Script {
        data: Some(gmail::RECIPIENT_UNKNOWN.into()),
        ..Script::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let env = env_for(&upstream);
    let relay = RelayProcess::start(dir.path(), &as_refs(&env)).await;

    let reply = send_one(&relay).await;
    assert_eq!(reply.code, 550, "{reply:?}");
    let whole = "550 5.1.1 The email account that you tried to reach does not exist. Please try\n\
                 double-checking the recipient's email address for typos or\n\
                 unnecessary spaces. For more information, go to\n \
                 https://support.google.com/mail/?p=NoSuchUser a1b2c3d4e5f6 - gsmtp";

    // The text log: one line, the reply's line breaks escaped.
    for message in [
        "upstream refused the message",
        "session closed after a rejection",
    ] {
        let line = relay.wait_for_line(message).await;
        let escaped = whole.replace('\n', "\\n");
        assert!(line.contains(&escaped), "{line}");
    }

    let listed: Value =
        serde_json::from_str(&stdout(dir.path(), &["queue", "list", "--json"]).await).unwrap();
    let envelope = &listed[0]["envelope"];
    assert_eq!(envelope["last_reply"], whole, "{listed}");
    let id = envelope["id"].as_str().unwrap();

    let table = stdout(dir.path(), &["queue", "list"]).await;
    assert_eq!(table.lines().count(), 2, "a header and one line: {table}");
    assert!(table.contains("Please try …"), "{table}");

    let shown = stdout(dir.path(), &["queue", "show", id]).await;
    assert!(
        shown.contains(&whole.replace('\n', "\n            ")),
        "each line under the first: {shown}"
    );

    let admin = relay.admin.unwrap();
    let page = common::http::get(admin, "/", &[]).await.body;
    assert!(
        page.contains("Please try<br>double-checking the recipient&#39;s email address"),
        "{page}"
    );
    assert!(page.contains(HELP_LINK), "{page}");
    let status = common::http::get(admin, "/status.json", &[]).await.body;
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["rejections"][0]["last_reply"], whole, "{status}");
    relay.terminate().await;
}
