//! Delay warnings and expiry bounces on tokio's paused clock: one warning
//! per message after `notify.delay_warning`, one bounce when it is given up
//! after `max_age`, and never a notice about a notice.

use std::time::Duration;

use sendbridge::config::Config;
use sendbridge::delivery::Delivery;
use sendbridge::oauth::token_service;
use sendbridge::spool::{Envelope, State};
use tokio_util::sync::CancellationToken;

/// Notices in the spool whose history says they were generated as `label`.
fn notices(delivery: &Delivery, label: &str) -> Vec<Envelope> {
    let generated = format!("{label} notice generated");
    State::ALL
        .into_iter()
        .flat_map(|state| delivery.spool().list(state).unwrap())
        .filter(|envelope| envelope.is_notice && envelope.history[0].what == generated)
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_late_message_is_warned_once_and_bounced_once_when_given_up() {
    sendbridge::tls::install_crypto_provider();
    // Nothing listens on this port: every attempt fails at once.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::from_toml(&format!(
        r#"
        [delivery]
        mode = "queue"
        retry_initial = "1m"
        retry_max = "4m"
        max_age = "15m"
        scan_interval = "1h"
        [notify]
        delay_warning = "5m"
        [accounts.gmail]
        host = "127.0.0.1"
        port = {port}
        username = "me@gmail.com"
        password = "abcdabcdabcdabcd"
        "#
    ))
    .unwrap();
    config.spool.dir = dir.path().to_path_buf();
    let tokens = token_service(&config.spool.dir);
    let delivery = Delivery::start(&config, CancellationToken::new(), tokens).unwrap();
    let envelope = Envelope {
        account: "gmail".into(),
        mail_from: "billing@legacy.example".into(),
        recipients: vec!["customer@example.com".into()],
        ..Envelope::default()
    };
    let reply = delivery
        .submit(envelope, b"Subject: s\r\n\r\nbody\r\n".to_vec())
        .await;
    assert_eq!(reply.reply.code, 250);

    tokio::time::sleep(Duration::from_secs(4 * 60)).await;
    assert!(notices(&delivery, "delay_warning").is_empty(), "not yet");
    tokio::time::sleep(Duration::from_secs(2 * 60)).await;
    let warnings = notices(&delivery, "delay_warning");
    assert_eq!(warnings.len(), 1, "at 5 minutes");
    assert_eq!(warnings[0].recipients, ["billing@legacy.example"]);

    // Past max_age of the message and of the warning itself (queued at 5m,
    // through the same dead account).
    tokio::time::sleep(Duration::from_secs(30 * 60)).await;
    assert_eq!(
        notices(&delivery, "delay_warning").len(),
        1,
        "once per message"
    );
    let bounces = notices(&delivery, "bounce");
    assert_eq!(bounces.len(), 1, "the message's; none about the warning");
    assert_eq!(bounces[0].recipients, ["billing@legacy.example"]);
    let rejected: Vec<Envelope> = delivery
        .spool()
        .list(State::Rejected)
        .unwrap()
        .into_iter()
        .filter(|envelope| !envelope.is_notice)
        .collect();
    assert_eq!(rejected.len(), 1);
    assert!(rejected[0].notices.bounced && rejected[0].notices.delay_warned);
    assert_eq!(
        delivery.spool().list(State::Rejected).unwrap().len(),
        3,
        "the warning and the bounce were given up too, silently"
    );
}
