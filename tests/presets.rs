//! Provider presets on a running relay: an account configured with
//! `provider = "gmail"` and an app password pasted as Google shows it signs
//! in upstream, and the start says the spaces were removed, never the
//! password.

mod common;

use std::time::Duration;

use common::fake_upstream::{FakeUpstream, FakeUpstreamOptions, UpstreamTls};
use common::log_capture::LogCapture;
use common::relay::{LOCAL_PASSWORD, LOCAL_USER, Relay, UPSTREAM_USER};
use sendbridge::config::Config;

const APP_PASSWORD: &str = "qwerasdfzxcvtyui";
const AS_GOOGLE_SHOWS_IT: &str = "qwer asdf zxcv tyui";

#[tokio::test(flavor = "current_thread")]
async fn a_pasted_google_app_password_signs_in_and_the_start_says_it_was_cleaned() {
    let logs = LogCapture::start();
    let options = FakeUpstreamOptions::new(UpstreamTls::StartTls, UPSTREAM_USER, APP_PASSWORD);
    let upstream = FakeUpstream::start(options).await;
    // The preset's host and port, smtp.gmail.com:587, point at the fake.
    let config = Config::from_toml(&format!(
        r#"
        [accounts.gmail]
        provider = "gmail"
        host = "localhost"
        port = {port}
        username = "{UPSTREAM_USER}"
        password = "{AS_GOOGLE_SHOWS_IT}"
        ca_file = "{ca}"
        [users.{LOCAL_USER}]
        password = "{LOCAL_PASSWORD}"
        "#,
        port = upstream.port(),
        ca = upstream.ca_file().display(),
    ))
    .unwrap();
    let relay = Relay::start(config).await;

    let mut client = relay.signed_in_client().await;
    let reply = client
        .send_mail(
            "a@office.example",
            &["c@example.com"],
            "Subject: hi\r\n\r\nhi\r\n",
        )
        .await;

    assert_eq!(reply.code, 250, "{reply:?}");
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
