//! The relay out of file descriptors: it pauses accepting instead of
//! spinning, says so once in a while, keeps serving its open sessions and
//! accepts again when descriptors free up.

mod common;

use std::time::Duration;

use common::process::RelayProcess;
use common::smtp::Client;
use tokio::net::TcpStream;

/// Few enough that a handful of connections exhaust them.
const LIMIT: u64 = 64;
/// How long the relay is watched while it cannot accept.
const WATCHED: Duration = Duration::from_secs(2);

#[tokio::test]
async fn out_of_descriptors_the_relay_pauses_accepting_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    // Soft and hard alike: the relay raises its soft limit to the hard one.
    let relay = RelayProcess::start_with_descriptor_limits(dir.path(), &[], LIMIT, LIMIT).await;
    let warning = relay.wait_for_line("open-file limit is below").await;
    assert!(
        warning.contains("limit=64") && warning.contains("lower server.max_connections"),
        "{warning}"
    );
    let mut open_session = Client::connect(relay.addr).await;
    open_session.expect("EHLO legacy.example", 250).await;

    // More connections than the relay has descriptors for; the kernel
    // completes them all, the relay cannot accept the last ones.
    let mut crowd = Vec::new();
    for _ in 0..LIMIT {
        crowd.push(TcpStream::connect(relay.addr).await.unwrap());
    }
    relay.wait_for_line("accept failed").await;
    let cpu_before = relay.cpu_time();
    tokio::time::sleep(WATCHED).await;
    let cpu = relay.cpu_time() - cpu_before;

    let failures = relay
        .log()
        .iter()
        .filter(|line| line.contains("accept failed"))
        .count();
    let figures = format!("{failures} accept failures logged, {cpu:?} of CPU in {WATCHED:?}");
    assert!(failures <= 3, "{figures}");
    assert!(cpu < Duration::from_millis(300), "{figures}");
    open_session.expect("NOOP", 250).await;

    drop(crowd);
    let mut newcomer = Client::connect(relay.addr).await;
    newcomer.expect("EHLO legacy.example", 250).await;
    let (code, log) = relay.terminate().await;
    assert_eq!(code, Some(0), "{log:#?}");
}

#[tokio::test]
async fn the_relay_raises_its_open_file_limit_to_the_hard_limit() {
    let dir = tempfile::tempdir().unwrap();
    // Enough for 100 connections; a hard limit of 1024 is allowed almost
    // everywhere.
    let env = [("SENDBRIDGE_SERVER__MAX_CONNECTIONS", "100")];
    let relay = RelayProcess::start_with_descriptor_limits(dir.path(), &env, 64, 1024).await;

    let limits = std::fs::read_to_string(format!("/proc/{}/limits", relay.pid())).unwrap();
    let open_files: Vec<&str> = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(open_files[3..5], ["1024", "1024"], "{limits}");
    let (code, log) = relay.terminate().await;
    assert_eq!(code, Some(0));
    assert!(
        !log.iter().any(|line| line.contains("open-file limit")),
        "{log:#?}"
    );
}
