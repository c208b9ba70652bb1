//! The retry schedule on tokio's paused clock: a dead upstream is retried
//! after retry_initial, doubling, capped at retry_max, and given up after
//! max_age — hours of schedule in milliseconds of test time.

use std::time::Duration;

use sendbridge::config::Config;
use sendbridge::delivery::Delivery;
use sendbridge::oauth::token_service;
use sendbridge::spool::{Envelope, State};
use tokio_util::sync::CancellationToken;

#[tokio::test(start_paused = true)]
async fn temporary_failures_back_off_exponentially_then_expire() {
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
            b"Subject: s\r\n\r\nbody\r\n",
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
