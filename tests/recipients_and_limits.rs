//! Provider limits: messages for more recipients than the provider takes at
//! once go out in parts, refused recipients do not hold back the others, and
//! daily sending limits (ours and the provider's) make mail wait instead of
//! bouncing.

mod common;

use std::time::Duration;

use common::fake_upstream::{FakeUpstream, FakeUpstreamOptions, Script, UpstreamTls, gmail};
use common::frozen_clock::FrozenClock;
use common::relay::{Relay, UPSTREAM_PASSWORD, UPSTREAM_USER, config_for};
use sendbridge::config::Config;
use sendbridge::delivery::Delivery;
use sendbridge::oauth::token_service;
use sendbridge::spool::{Envelope, Spool, State};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);
const CONTENT: &str = "From: billing@legacy.example\r\nSubject: invoice\r\n\r\nInvoice.\r\n";

async fn upstream_with(script: Script) -> FakeUpstream {
    let mut options =
        FakeUpstreamOptions::new(UpstreamTls::StartTls, UPSTREAM_USER, UPSTREAM_PASSWORD);
    options.script = script;
    FakeUpstream::start(options).await
}

fn config(
    upstream: &FakeUpstream,
    extra: &str,
    account: impl FnOnce(&mut sendbridge::config::AccountConfig),
) -> Config {
    let mut config = config_for(upstream, UpstreamTls::StartTls, extra);
    account(config.accounts.get_mut("gmail").unwrap());
    config
}

fn envelopes(spool: &std::path::Path, state: State) -> Vec<Envelope> {
    Spool::open(spool).unwrap().list(state).unwrap()
}

#[tokio::test]
async fn a_long_recipient_list_goes_out_in_parts() {
    // Like Gmail, the upstream refuses recipients beyond its limit.
    let upstream = upstream_with(Script {
        max_recipients: Some(2),
        ..Script::default()
    })
    .await;
    let relay = Relay::start(config(&upstream, "", |gmail| {
        gmail.max_recipients_per_message = 2
    }))
    .await;
    let recipients = [
        "a@x.example",
        "b@x.example",
        "c@x.example",
        "d@x.example",
        "e@x.example",
    ];
    let mut client = relay.signed_in_client().await;

    let reply = client
        .send_mail("billing@legacy.example", &recipients, CONTENT)
        .await;

    assert_eq!(reply.code, 250, "{reply:?}");
    let received = upstream.wait_for_messages(3, WAIT).await;
    let parts: Vec<Vec<String>> = received.iter().map(|m| m.rcpt_to.clone()).collect();
    assert_eq!(
        parts,
        [
            vec!["a@x.example", "b@x.example"],
            vec!["c@x.example", "d@x.example"],
            vec!["e@x.example"]
        ]
    );
    assert!(received.iter().all(|m| m.data == received[0].data));
    assert!(
        received.iter().all(|m| m.connection == 1),
        "one connection for all parts"
    );
    for state in State::ALL {
        assert!(
            envelopes(&relay.spool, state).is_empty(),
            "{state} is empty"
        );
    }
}

#[tokio::test]
async fn a_refused_recipient_does_not_hold_back_the_others_and_is_retried_alone() {
    let upstream = upstream_with(Script {
        rcpt_for: vec![("typo@x.example".into(), gmail::RECIPIENT_UNKNOWN.into())],
        ..Script::default()
    })
    .await;
    let relay = Relay::start(config(&upstream, "", |_| {})).await;
    let mut client = relay.signed_in_client().await;

    let reply = client
        .send_mail(
            "billing@legacy.example",
            &["a@x.example", "typo@x.example", "b@x.example"],
            CONTENT,
        )
        .await;

    // Delivered to some: the client hears 250; the rest is the operator's.
    assert_eq!(reply.code, 250, "{reply:?}");
    let received = upstream.wait_for_messages(1, WAIT).await;
    assert_eq!(received[0].rcpt_to, ["a@x.example", "b@x.example"]);
    let rejected = envelopes(&relay.spool, State::Rejected);
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].delivered, ["a@x.example", "b@x.example"]);
    assert_eq!(rejected[0].refused.len(), 1);
    assert_eq!(rejected[0].refused[0].address, "typo@x.example");
    assert_eq!(rejected[0].refused[0].reply.status, Some([5, 1, 1]));

    // The mailbox now exists; a retry sends to the refused recipient only.
    upstream.set_script(Script::default());
    sendbridge::spool::operations::retry(
        &Spool::open(&relay.spool).unwrap(),
        sendbridge::spool::operations::RetryTarget::One(rejected[0].id.clone()),
    )
    .unwrap();
    // Besides the bounce to the sender about the first refusal.
    let received = upstream.wait_for_messages(3, WAIT).await;
    let retried: Vec<_> = received[1..]
        .iter()
        .filter(|message| message.rcpt_to != ["billing@legacy.example"])
        .collect();
    assert_eq!(retried.len(), 1);
    assert_eq!(retried[0].rcpt_to, ["typo@x.example"]);
}

#[tokio::test]
async fn the_providers_daily_limit_defers_instead_of_bouncing() {
    let upstream = upstream_with(Script {
        data: Some(gmail::DAILY_LIMIT.into()),
        ..Script::default()
    })
    .await;
    let relay = Relay::start(config(&upstream, "", |_| {})).await;
    let mut client = relay.signed_in_client().await;

    let reply = client
        .send_mail("billing@legacy.example", &["a@x.example"], CONTENT)
        .await;

    assert_eq!(reply.code, 250, "{reply:?}");
    let deferred = envelopes(&relay.spool, State::Deferred);
    assert_eq!(deferred.len(), 1, "waits in the queue, not in rejected/");
    let wait = deferred[0].next_attempt_at - deferred[0].received_at;
    assert!(
        wait >= 23 * 3600 * 1000,
        "waits for the 24-hour window, not a short retry: {wait} ms"
    );
    assert_eq!(deferred[0].attempts, 0, "waiting is not a failed attempt");
    assert!(deferred[0].last_reply.as_deref().unwrap().contains("5.4.5"));
}

#[tokio::test(start_paused = true)]
async fn mail_over_the_daily_cap_waits_and_goes_out_when_the_window_frees() {
    sendbridge::tls::install_crypto_provider();
    let clock = FrozenClock::new();
    let upstream = upstream_with(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    // Hybrid: the answer comes once the first attempt has settled.
    let mut config = config(&upstream, "", |gmail| gmail.daily_message_limit = Some(2));
    config.spool.dir = dir.path().to_path_buf();
    // No delay warning to the sender (it would wait for the window too).
    config.notify.delay_warning = Duration::ZERO;
    let tokens = token_service(&config.spool.dir);
    let delivery = Delivery::start(&config, CancellationToken::new(), tokens).unwrap();

    for n in 0..3 {
        let envelope = Envelope {
            account: "gmail".into(),
            mail_from: "billing@legacy.example".into(),
            recipients: vec![format!("customer{n}@x.example")],
            ..Envelope::default()
        };
        let submitted = async {
            let submission = delivery.submit(envelope, CONTENT.as_bytes().to_vec());
            submission.await.answer().await
        };
        let reply = clock.within(WAIT, submitted).await.reply;
        assert_eq!(reply.code, 250, "accepted even over the cap");
    }

    assert_eq!(upstream.received().len(), 2, "two within the cap");
    let waiting = delivery.spool().list(State::Deferred).unwrap();
    assert_eq!(waiting.len(), 1);
    assert_eq!(waiting[0].attempts, 0, "waiting is not a failed attempt");

    tokio::time::advance(Duration::from_secs(23 * 3600)).await;
    tokio::task::yield_now().await;
    assert_eq!(upstream.received().len(), 2, "still waiting after 23 hours");

    tokio::time::advance(Duration::from_secs(3600)).await;
    let received = clock
        .within(WAIT, upstream.wait_for_messages(3, Duration::MAX))
        .await;
    assert_eq!(received[2].rcpt_to, ["customer2@x.example"]);
}
