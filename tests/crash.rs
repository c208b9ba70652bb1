//! Nothing acknowledged is ever lost: the relay is killed with SIGKILL while
//! clients are sending, or runs out of disk, and every message that got a
//! `250` still reaches the upstream.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::fake_upstream::{
    FakeUpstream, FakeUpstreamOptions, Received, Script, UpstreamTls, gmail,
};
use common::process::RelayProcess;
use common::relay::{as_refs, env_for};
use common::smtp::{Client, plain};
use std::net::SocketAddr;
use tokio::sync::Notify;

const WAIT: Duration = Duration::from_secs(60);
const CLIENTS: usize = 4;
const PER_CLIENT: usize = 40;
/// The relay is killed once this many messages were acknowledged.
const KILL_AFTER: usize = 50;

/// Retries after a second, so requeued messages go out within the test.
fn relay_env(upstream: &FakeUpstream) -> Vec<(String, String)> {
    let mut env = env_for(upstream);
    env.push(("SENDBRIDGE_DELIVERY__RETRY_INITIAL".into(), "1s".into()));
    env
}

fn tag(message: &Received) -> String {
    let text = String::from_utf8_lossy(&message.data);
    text.lines()
        .find_map(|line| line.strip_prefix("Subject: "))
        .unwrap_or_default()
        .to_string()
}

/// One client: sends its messages until the connection breaks and records
/// those acknowledged with 250.
async fn client(relay: SocketAddr, n: usize, acked: Arc<Mutex<Vec<String>>>, enough: Arc<Notify>) {
    let Ok(stream) = tokio::net::TcpStream::connect(relay).await else {
        return;
    };
    let mut client = Client::over(Box::new(stream));
    let _ = send_until_broken(&mut client, n, &acked, &enough).await;
}

async fn send_until_broken(
    client: &mut Client,
    n: usize,
    acked: &Mutex<Vec<String>>,
    enough: &Notify,
) -> Option<()> {
    client.try_reply().await?;
    client.try_cmd("EHLO legacy.test").await?;
    client
        .try_cmd(&format!("AUTH PLAIN {}", plain("invoices", "old-password")))
        .await?;
    for i in 0..PER_CLIENT {
        let subject = format!("client {n} message {i}");
        client.try_cmd("MAIL FROM:<billing@legacy.example>").await?;
        client.try_cmd("RCPT TO:<customer@example.com>").await?;
        client.try_cmd("DATA").await?;
        let body = format!("Subject: {subject}\r\n\r\n{}\r\n.\r\n", "x".repeat(2000));
        if client.try_cmd_raw(body.as_bytes()).await?.code == 250 {
            let mut acked = acked.lock().unwrap();
            acked.push(subject);
            if acked.len() == KILL_AFTER {
                enough.notify_one();
            }
        }
    }
    Some(())
}

#[tokio::test]
async fn sigkill_mid_stream_loses_no_acknowledged_message() {
    let mut options =
        FakeUpstreamOptions::new(UpstreamTls::StartTls, "me@gmail.com", "abcdabcdabcdabcd");
    // Until the restart every attempt is deferred, so each acknowledged
    // message must survive in the spool.
    options.script.mail = Some(gmail::TRY_AGAIN_LATER.to_string());
    let upstream = FakeUpstream::start(options).await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = relay_env(&upstream);
    env.push(("SENDBRIDGE_DELIVERY__MODE".into(), "queue".into()));
    let relay = RelayProcess::start(dir.path(), &as_refs(&env)).await;
    let acked = Arc::new(Mutex::new(Vec::new()));
    let enough = Arc::new(Notify::new());

    let clients: Vec<_> = (0..CLIENTS)
        .map(|n| tokio::spawn(client(relay.addr, n, acked.clone(), enough.clone())))
        .collect();
    tokio::time::timeout(WAIT, enough.notified())
        .await
        .expect("clients got far enough");
    relay.kill().await;
    for client in clients {
        client.await.unwrap();
    }
    let acked: BTreeSet<String> = acked.lock().unwrap().iter().cloned().collect();
    assert!(
        upstream.received().is_empty(),
        "{:?}",
        upstream.received().iter().map(tag).collect::<Vec<_>>()
    );
    upstream.set_script(Script::default());

    let relay = RelayProcess::start(dir.path(), &as_refs(&env)).await;
    let mut wanted = acked.len();
    let received = loop {
        let received = upstream.wait_for_messages(wanted, WAIT).await;
        let tags: BTreeSet<String> = received.iter().map(tag).collect();
        let missing = acked.difference(&tags).count();
        if missing == 0 {
            break received;
        }
        wanted = received.len() + missing;
    };

    let mut copies: BTreeMap<String, usize> = BTreeMap::new();
    for message in &received {
        *copies.entry(tag(message)).or_default() += 1;
    }
    let duplicates: usize = copies.values().map(|n| n - 1).sum();
    println!(
        "acknowledged {}, delivered after the restart {} ({} distinct, {duplicates} duplicate(s))",
        acked.len(),
        received.len(),
        copies.len()
    );
    assert!(acked.iter().all(|subject| copies.contains_key(subject)));
    let (code, log) = relay.terminate().await;
    assert_eq!(code, Some(0));
    assert!(
        log.iter().any(|line| line.contains("spool recovered")),
        "{log:#?}"
    );
}

#[tokio::test]
async fn full_disk_answers_452_and_keeps_what_it_acknowledged() {
    let upstream = FakeUpstream::start(FakeUpstreamOptions::new(
        UpstreamTls::StartTls,
        "me@gmail.com",
        "abcdabcdabcdabcd",
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = relay_env(&upstream);
    // Queue mode: acknowledged messages wait in the spool, as when the
    // upstream is slow, so the limit is hit while they are there.
    env.push(("SENDBRIDGE_DELIVERY__MODE".into(), "queue".into()));
    let relay = RelayProcess::start_with_file_size_limit(dir.path(), &as_refs(&env), 64).await;
    let mut client = Client::connect(relay.addr).await;
    client.ehlo().await;
    assert_eq!(
        client.login_plain("invoices", "old-password").await.code,
        235
    );

    let small = client
        .send_mail(
            "a@legacy.example",
            &["b@example.com"],
            "Subject: small\r\n\r\nfits\r\n",
        )
        .await;
    let large_body = format!(
        "Subject: large\r\n\r\n{}",
        "y".repeat(78).repeat(1200).replace("yy", "y\r\n")
    );
    let large = client
        .send_mail("a@legacy.example", &["b@example.com"], &large_body)
        .await;
    let after = client
        .send_mail(
            "a@legacy.example",
            &["b@example.com"],
            "Subject: after\r\n\r\nfits\r\n",
        )
        .await;

    assert_eq!(small.code, 250, "{small:?}");
    assert_eq!(large.code, 452, "{large:?}");
    assert!(large.text.starts_with("4.3.1"), "{large:?}");
    assert_eq!(after.code, 250, "{after:?}");
    let received = upstream.wait_for_messages(2, WAIT).await;
    let tags: BTreeSet<String> = received.iter().map(tag).collect();
    assert_eq!(
        tags,
        BTreeSet::from(["after".to_string(), "small".to_string()])
    );
    let (_, log) = relay.terminate().await;
    assert!(
        log.iter().any(|line| line.contains("spool_failed")),
        "{log:#?}"
    );
}

/// SIGTERM while a delivery hangs: the relay still exits 0 after the grace
/// period, and the message, back in the queue, goes out after a restart.
#[tokio::test]
async fn sigterm_during_a_hanging_delivery_loses_nothing() {
    let mut options =
        FakeUpstreamOptions::new(UpstreamTls::StartTls, "me@gmail.com", "abcdabcdabcdabcd");
    options.script.stall_after_data = true;
    let upstream = FakeUpstream::start(options).await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = relay_env(&upstream);
    env.push(("SENDBRIDGE_DELIVERY__MODE".into(), "queue".into()));
    let relay = RelayProcess::start(dir.path(), &as_refs(&env)).await;
    let mut client = Client::connect(relay.addr).await;
    client.ehlo().await;
    assert_eq!(
        client.login_plain("invoices", "old-password").await.code,
        235
    );
    let reply = client
        .send_mail(
            "a@legacy.example",
            &["b@example.com"],
            "Subject: hanging\r\n\r\nx\r\n",
        )
        .await;
    assert_eq!(reply.code, 250);
    client.expect("QUIT", 221).await;
    // The relay has sent the message and waits for the upstream's verdict.
    upstream.wait_for_stall(WAIT).await;

    let (code, log) = relay.terminate().await;

    assert_eq!(code, Some(0), "{log:#?}");
    assert!(upstream.received().is_empty());
    upstream.set_script(Script::default());
    let restarted = RelayProcess::start(dir.path(), &as_refs(&env)).await;
    let received = upstream.wait_for_messages(1, WAIT).await;
    assert_eq!(tag(&received[0]), "hanging");
    restarted.terminate().await;
}
