//! Provider presets on a running relay: an account configured with
//! `provider = "gmail"` and an app password pasted as Google shows it signs
//! in upstream, and the start says the spaces were removed, never the
//! password; a refused sign-in's hint ends with the provider's setup steps.

mod common;

use std::time::Duration;

use common::fake_upstream::{FakeUpstream, FakeUpstreamOptions, UpstreamTls};
use common::http;
use common::log_capture::LogCapture;
use common::relay::{LOCAL_PASSWORD, LOCAL_USER, Relay, UPSTREAM_USER};
use sendbridge::config::Config;

const APP_PASSWORD: &str = "qwerasdfzxcvtyui";
const AS_GOOGLE_SHOWS_IT: &str = "qwer asdf zxcv tyui";

/// Account `gmail` with `provider = "gmail"` and `password`, its host and
/// port (smtp.gmail.com:587 by the preset) pointing at `upstream`.
fn gmail_preset(upstream: &FakeUpstream, password: &str) -> Config {
    Config::from_toml(&format!(
        r#"
        [accounts.gmail]
        provider = "gmail"
        host = "localhost"
        port = {port}
        username = "{UPSTREAM_USER}"
        password = "{password}"
        ca_file = "{ca}"
        [users.{LOCAL_USER}]
        password = "{LOCAL_PASSWORD}"
        "#,
        port = upstream.port(),
        ca = upstream.ca_file().display(),
    ))
    .unwrap()
}

/// A fake Gmail that takes `APP_PASSWORD`, and a relay whose preset
/// account has `password`, through which one message was sent (`250`).
async fn one_message_sent(password: &str) -> (FakeUpstream, Relay) {
    let options = FakeUpstreamOptions::new(UpstreamTls::StartTls, UPSTREAM_USER, APP_PASSWORD);
    let upstream = FakeUpstream::start(options).await;
    let relay = Relay::start(gmail_preset(&upstream, password)).await;
    let mut client = relay.signed_in_client().await;
    let message = "Subject: hi\r\n\r\nhi\r\n";
    let reply = client
        .send_mail("a@office.example", &["c@example.com"], message)
        .await;
    assert_eq!(reply.code, 250, "{reply:?}");
    (upstream, relay)
}

#[tokio::test(flavor = "current_thread")]
async fn a_pasted_google_app_password_signs_in_and_the_start_says_it_was_cleaned() {
    let logs = LogCapture::start();
    let (upstream, _relay) = one_message_sent(AS_GOOGLE_SHOWS_IT).await;

    let received = upstream.wait_for_messages(1, Duration::from_secs(20)).await;
    assert_eq!(received[0].auth_user, UPSTREAM_USER);
    let notes = logs.lines_with("removed the spaces from the app password");
    assert_eq!(notes.len(), 1, "{}", logs.text());
    assert_eq!(notes[0]["level"], "INFO");
    let text = logs.text();
    assert!(
        !text.contains(APP_PASSWORD) && !text.contains(AS_GOOGLE_SHOWS_IT),
        "{text}"
    );
}

#[tokio::test]
async fn a_refused_sign_in_names_the_providers_setup_steps() {
    // Held, not refused: the client is told the mail is queued.
    let (_upstream, relay) = one_message_sent("the-account-password").await;

    let admin = relay.admin_addr.expect("admin interface on");
    let status = http::get(admin, "/status.json", &[]).await;
    let status: serde_json::Value = serde_json::from_str(&status.body).unwrap();
    let hint = status["accounts"][0]["hold"]["hint"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        hint.ends_with(". Gmail: turn on 2-Step Verification, create an app password at https://myaccount.google.com/apppasswords and set it as accounts.gmail.password (or sign in with OAuth: auth = \"oauth2\")"),
        "{status}"
    );
}
