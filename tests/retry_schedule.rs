//! The retry schedule on tokio's paused clock: a dead upstream is retried
//! after retry_initial, doubling, capped at retry_max, and given up after
//! max_age; one delay warning per message after `notify.delay_warning`, one
//! bounce when it is given up, never a notice about a notice — hours of
//! schedule in milliseconds of test time.

use std::sync::Arc;
use std::time::Duration;

use sendbridge::config::Config;
use sendbridge::delivery::Delivery;
use sendbridge::oauth::token_service;
use sendbridge::spool::{Envelope, State};
use tokio_util::sync::CancellationToken;

/// A delivery engine alone on the paused clock, whose account points at a
/// port nothing listens on (every attempt fails at once), configured with
/// `extra` TOML, with one invoice submitted; and its spool directory.
async fn dead_upstream_engine_with_an_invoice(extra: &str) -> (Arc<Delivery>, tempfile::TempDir) {
    sendbridge::tls::install_crypto_provider();
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
        {extra}
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
        .await
        .answer()
        .await;
    assert_eq!(reply.reply.code, 250);
    (delivery, dir)
}

#[tokio::test(start_paused = true)]
async fn temporary_failures_back_off_exponentially_then_expire() {
    let (delivery, _dir) = dead_upstream_engine_with_an_invoice("").await;
    // Virtual time: the relay's timers fire in order as the clock advances.
    tokio::time::sleep(Duration::from_secs(20 * 60)).await;

    let rejected = delivery.spool().list(State::Rejected).unwrap();
    assert_eq!(rejected.len(), 1, "given up after max_age");
    let history = &rejected[0].history;
    let attempts: Vec<u64> = history
        .iter()
        .filter(|event| event.what.starts_with("deferred") || event.what.starts_with("rejected"))
        .map(|event| (event.at - rejected[0].received_at) / 1000)
        .collect();
    // Attempts at 0, then +1m, +2m, +4m, +4m (capped), +4m: the last one
    // is past max_age (15m) and gives up.
    assert_eq!(attempts, [0, 60, 180, 420, 660, 900], "{history:#?}");
    assert!(
        rejected[0]
            .last_reply
            .as_deref()
            .unwrap()
            .contains("refused"),
        "{:?}",
        rejected[0].last_reply
    );
}

#[tokio::test(start_paused = true)]
async fn mail_for_an_account_no_longer_configured_stays_deferred() {
    sendbridge::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    // Queued by an earlier configuration that had an account "old".
    let spool = sendbridge::spool::Spool::open(dir.path()).unwrap();
    let mut envelope = Envelope {
        account: "old".into(),
        recipients: vec!["customer@example.com".into()],
        ..Envelope::default()
    };
    spool
        .accept(
            &mut envelope,
            &std::sync::Arc::new(b"Subject: s\r\n\r\nbody\r\n".to_vec()),
            State::Deferred,
        )
        .unwrap();
    let mut config = Config::from_toml(
        "[accounts.gmail]\nusername = \"me@gmail.com\"\npassword = \"abcdabcdabcdabcd\"",
    )
    .unwrap();
    config.spool.dir = dir.path().to_path_buf();

    let tokens = token_service(&config.spool.dir);
    let delivery = Delivery::start(&config, CancellationToken::new(), tokens).unwrap();
    // Several scheduler passes.
    tokio::time::sleep(config.delivery.scan_interval * 3).await;

    // Not stranded in active/, where nothing would ever pick it up.
    assert_eq!(
        delivery.spool().find(&envelope.id).unwrap(),
        Some(State::Deferred)
    );
}

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
    let (delivery, _dir) =
        dead_upstream_engine_with_an_invoice("[notify]\ndelay_warning = \"5m\"").await;

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
