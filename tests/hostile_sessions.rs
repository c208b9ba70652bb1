//! Hostile and broken SMTP clients over real sockets: what they send must
//! not change what goes upstream, hang a session or grow memory without
//! bound, and broken-but-honest devices keep working.

mod common;

use std::time::{Duration, Instant};

use common::fake_upstream::{FakeUpstream, FakeUpstreamOptions, UpstreamTls};
use common::relay::{Relay, UPSTREAM_PASSWORD, UPSTREAM_USER, config_for, env_for};
use common::smtp::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(10);
const MESSAGE: &str = "Subject: test\r\n\r\nbody\r\n";

async fn upstream() -> FakeUpstream {
    FakeUpstream::start(FakeUpstreamOptions::new(
        UpstreamTls::StartTls,
        UPSTREAM_USER,
        UPSTREAM_PASSWORD,
    ))
    .await
}

/// A fake upstream and a relay delivering to it, with `extra` TOML.
async fn setup(extra: &str) -> (FakeUpstream, Relay) {
    let upstream = upstream().await;
    let relay = Relay::start(config_for(&upstream, UpstreamTls::StartTls, extra)).await;
    (upstream, relay)
}

#[tokio::test]
async fn quoted_local_parts_reach_the_upstream_quoted() {
    let (upstream, relay) = setup("").await;
    let mut client = relay.signed_in_client().await;
    let injected = r#""victim@evil.example> NOTIFY=SUCCESS ORCPT=rfc822;x"@c.example"#;

    client.expect("MAIL FROM:<a@b.example>", 250).await;
    client.expect(&format!("RCPT TO:<{injected}>"), 250).await;
    client.expect(r#"RCPT TO:<"a b"@c.example>"#, 250).await;
    client.expect("RCPT TO:<postmaster>", 250).await;
    client.expect("DATA", 354).await;
    client.write(format!("{MESSAGE}.\r\n").as_bytes()).await;
    assert_eq!(client.read_reply().await.code, 250);

    let received = upstream.wait_for_messages(1, WAIT).await;
    assert_eq!(
        received[0].commands[1..],
        [
            format!("RCPT TO:<{injected}>"),
            r#"RCPT TO:<"a b"@c.example>"#.to_string(),
            "RCPT TO:<postmaster>".to_string(),
        ]
    );
}

#[tokio::test]
async fn control_characters_in_addresses_are_refused() {
    let (upstream, relay) = setup("").await;
    let mut client = relay.signed_in_client().await;

    let reply = client.cmd("MAIL FROM:<\"a\tb\"@b.example>").await;
    assert_eq!((reply.code, &reply.text[..5]), (501, "5.1.7"), "{reply:?}");
    client.expect("MAIL FROM:<a@b.example>", 250).await;
    let reply = client.cmd("RCPT TO:<\"a\0b\"@c.example>").await;
    assert_eq!((reply.code, &reply.text[..5]), (501, "5.1.3"), "{reply:?}");
    let reply = client.cmd("RCPT TO:<\"a\x1b[2Jb\"@c.example>").await;
    assert_eq!((reply.code, &reply.text[..5]), (501, "5.1.3"), "{reply:?}");
    let reply = client.cmd("DATA").await;
    assert_eq!(reply.code, 503, "no recipient was accepted: {reply:?}");
    assert!(upstream.received().is_empty());
}

#[tokio::test]
async fn utf8_addresses_need_smtputf8() {
    let (upstream, relay) = setup("").await;
    let mut client = relay.signed_in_client().await;

    let reply = client.cmd("MAIL FROM:<jörg@b.example>").await;
    assert_eq!((reply.code, &reply.text[..5]), (553, "5.6.7"), "{reply:?}");
    client.expect("MAIL FROM:<a@b.example>", 250).await;
    let reply = client.cmd("RCPT TO:<jörg@bücher.example>").await;
    assert_eq!((reply.code, &reply.text[..5]), (553, "5.6.7"), "{reply:?}");
    client.expect("RSET", 250).await;

    client
        .expect("MAIL FROM:<jörg@b.example> SMTPUTF8", 250)
        .await;
    client.expect("RCPT TO:<jörg@bücher.example>", 250).await;
    client.expect("DATA", 354).await;
    client.write(format!("{MESSAGE}.\r\n").as_bytes()).await;
    assert_eq!(client.read_reply().await.code, 250);
    let received = upstream.wait_for_messages(1, WAIT).await;
    assert!(
        received[0].commands[0].ends_with(" SMTPUTF8"),
        "{:?}",
        received[0].commands
    );
    assert_eq!(received[0].commands[1], "RCPT TO:<jörg@bücher.example>");
}

#[tokio::test]
async fn an_over_long_command_line_is_answered_once_and_its_tail_never_runs() {
    let (_upstream, relay) = setup("").await;
    let mut client = relay.greeted_client().await;

    let line = format!("NOOP {}QUIT\r\n", "a".repeat(8187));
    let reply = client.try_cmd_raw(line.as_bytes()).await.unwrap();
    assert_eq!(
        (reply.code, reply.text.as_str()),
        (500, "5.5.2 Line too long")
    );

    // The next reply answers the next command: nothing of the tail ran.
    let reply = client.cmd("NOOP").await;
    assert_eq!((reply.code, reply.text.as_str()), (250, "2.0.0 OK"));
}

/// Sends `prefix`, then one byte every 300 ms (ignoring write errors once
/// the relay hangs up), and returns the first reply line after `prefix`'s
/// replies and when it came.
async fn trickle(relay: &Relay, prefix: &[u8], replies_to_prefix: usize) -> (String, Duration) {
    let stream = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let (reader, mut writer) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(reader);
    let mut line = String::new();
    use tokio::io::AsyncBufReadExt;
    lines.read_line(&mut line).await.unwrap();
    writer.write_all(prefix).await.unwrap();
    for _ in 0..replies_to_prefix {
        line.clear();
        lines.read_line(&mut line).await.unwrap();
        assert!(line.as_bytes()[3] == b' ', "one-line replies only: {line}");
    }
    let started = Instant::now();
    let trickling = tokio::spawn(async move {
        for _ in 0..100 {
            if writer.write_all(b"x").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    line.clear();
    tokio::time::timeout(WAIT, lines.read_line(&mut line))
        .await
        .expect("the relay answers within the deadline")
        .unwrap();
    trickling.abort();
    (line, started.elapsed())
}

#[tokio::test]
async fn a_trickled_command_line_ends_at_the_command_timeout() {
    let (_upstream, relay) = setup("[server]\ncommand_timeout = \"1s\"").await;

    // A byte every 300 ms would keep a per-read timeout of 1 s happy forever.
    let (reply, after) = trickle(&relay, b"HELO x\r\n", 1).await;

    assert!(reply.starts_with("421 4.4.2"), "{reply}");
    assert!(after < Duration::from_millis(1900), "{after:?}");
}

#[tokio::test]
async fn a_trickled_auth_response_ends_at_the_command_timeout() {
    let (_upstream, relay) = setup("[server]\ncommand_timeout = \"1s\"").await;

    let (reply, after) = trickle(&relay, b"HELO x\r\nAUTH LOGIN\r\n", 2).await;

    assert!(reply.starts_with("421 4.4.2"), "{reply}");
    assert!(after < Duration::from_millis(1900), "{after:?}");
}

#[tokio::test]
async fn a_trickled_message_ends_at_the_data_deadline() {
    let (upstream, relay) =
        setup("[server]\ndata_timeout = \"1s\"\ndata_deadline = \"2s\"\ntrusted_networks = [\"127.0.0.1\"]\ndefault_account = \"gmail\"").await;

    let prefix = b"HELO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n";
    let (reply, after) = trickle(&relay, prefix, 4).await;

    assert!(reply.starts_with("421 4.4.2"), "{reply}");
    assert!(
        (Duration::from_millis(1900)..Duration::from_millis(2900)).contains(&after),
        "{after:?}"
    );
    assert!(upstream.received().is_empty());
}

#[tokio::test]
async fn a_device_that_writes_bare_lf_everywhere_gets_its_message_through() {
    let (upstream, relay) = setup("").await;
    let mut client = Client::connect(relay.addr).await;
    let password = common::smtp::plain(common::relay::LOCAL_USER, common::relay::LOCAL_PASSWORD);

    for (line, code) in [
        ("EHLO scanner".to_string(), 250),
        (format!("AUTH PLAIN {password}"), 235),
        ("MAIL FROM:<scanner@office.example>".to_string(), 250),
        ("RCPT TO:<boss@office.example>".to_string(), 250),
        ("DATA".to_string(), 354),
    ] {
        let reply = client
            .try_cmd_raw(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        assert_eq!(reply.code, code, "{line}: {reply:?}");
    }
    let reply = client
        .try_cmd_raw(b"Subject: scan\n\npage 1\n..dotted\n.\n")
        .await
        .unwrap();
    assert_eq!(reply.code, 250, "{reply:?}");
    assert_eq!(client.try_cmd_raw(b"QUIT\n").await.unwrap().code, 221);

    let received = upstream.wait_for_messages(1, WAIT).await;
    assert_eq!(received[0].body(), b"page 1\r\n.dotted\r\n");
}

#[tokio::test]
async fn a_crlf_client_cannot_smuggle_a_second_message_with_bare_lf_dot() {
    let (upstream, relay) = setup("").await;
    let mut client = relay.signed_in_client().await;
    client.expect("MAIL FROM:<a@b.example>", 250).await;
    client.expect("RCPT TO:<c@d.example>", 250).await;
    client.expect("DATA", 354).await;

    client
        .write(b"Subject: one\r\n\r\nfirst\n.\nMAIL FROM:<ceo@b.example>\nRCPT TO:<x@evil.example>\nDATA\nSubject: smuggled\n\nsecond\n.\n")
        .await;
    client.write(b"\r\n.\r\n").await;

    let reply = client.read_reply().await;
    assert_eq!(reply.code, 250, "{reply:?}");
    client.expect("QUIT", 221).await;
    let received = upstream.wait_for_messages(1, WAIT).await;
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].rcpt_to, ["c@d.example"]);
    let body = String::from_utf8_lossy(received[0].body()).into_owned();
    assert!(
        body.contains("Subject: smuggled"),
        "the smuggled part stays content: {body:?}"
    );
}

#[tokio::test]
async fn tls_on_the_plain_port_is_named_in_the_log() {
    let upstream = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let env = env_for(&upstream);
    let relay =
        common::process::RelayProcess::start(dir.path(), &common::relay::as_refs(&env)).await;
    let mut stream = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let mut greeting = [0u8; 512];
    let _ = stream.read(&mut greeting).await.unwrap();

    // The start of a TLS 1.2 ClientHello record.
    stream
        .write_all(&[
            0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03,
        ])
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await;

    let line = relay.wait_for_line("tls_on_plain_port").await;
    assert!(line.contains("listen_tls"), "{line}");
    let errors = relay.log().iter().filter(|l| l.contains("500")).count();
    assert!(
        errors <= 1,
        "one refusal, not one per garbage line: {:#?}",
        relay.log()
    );
}

/// Resident and peak resident memory of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Sends one message of `size` bytes as a trusted client; returns the reply
/// code to the data.
async fn send_big(addr: std::net::SocketAddr, size: usize) -> u16 {
    let mut client = Client::connect(addr).await;
    client.expect("HELO printer", 250).await;
    client
        .expect("MAIL FROM:<scanner@office.example>", 250)
        .await;
    client.expect("RCPT TO:<boss@office.example>", 250).await;
    client.expect("DATA", 354).await;
    let line = format!("{}\r\n", "x".repeat(998));
    let body = format!("Subject: scan\r\n\r\n{}", line.repeat(size / line.len()));
    client.write(body.as_bytes()).await;
    client.write(b".\r\n").await;
    client.read_reply().await.code
}

const MIB: usize = 1024 * 1024;

/// The relay as a process that only receives: trusted clients, and
/// deliveries that fail at once (nothing listens at the account's port), so
/// only receiving holds message bytes. `budget`: the memory budget, if set.
async fn receiving_relay(
    budget: Option<&str>,
) -> (
    common::process::RelayProcess,
    FakeUpstream,
    tempfile::TempDir,
) {
    let upstream = upstream().await;
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    let mut env = env_for(&upstream);
    for (key, value) in [
        ("SENDBRIDGE_ACCOUNTS__GMAIL__PORT", closed_port.as_str()),
        ("SENDBRIDGE_SERVER__TRUSTED_NETWORKS", "[\"127.0.0.1\"]"),
        ("SENDBRIDGE_SERVER__DEFAULT_ACCOUNT", "gmail"),
        ("SENDBRIDGE_SERVER__MAX_MESSAGE_SIZE", "8388608"),
        ("SENDBRIDGE_DELIVERY__MODE", "queue"),
    ]
    .into_iter()
    .chain(budget.map(|bytes| ("SENDBRIDGE_SERVER__MESSAGE_MEMORY_BUDGET", bytes)))
    {
        env.push((key.to_string(), value.to_string()));
    }
    let relay =
        common::process::RelayProcess::start(dir.path(), &common::relay::as_refs(&env)).await;
    assert_eq!(send_big(relay.addr, 64 * 1024).await, 250, "warm-up");
    (relay, upstream, dir)
}

/// Sends `count` messages of `size` in parallel; returns their reply codes
/// and the relay's baseline RSS before them (KiB).
async fn burst(
    relay: &common::process::RelayProcess,
    count: usize,
    size: usize,
) -> (Vec<u16>, u64) {
    let (baseline, _) = memory_kib(relay.pid());
    let sends: Vec<_> = (0..count)
        .map(|_| tokio::spawn(send_big(relay.addr, size)))
        .collect();
    let mut codes = Vec::new();
    for send in sends {
        codes.push(send.await.unwrap());
    }
    (codes, baseline)
}

fn grown_mib(kib: u64, baseline: u64) -> f64 {
    kib.saturating_sub(baseline) as f64 / 1024.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_large_messages_stay_within_the_memory_budget() {
    let (relay, _upstream, _dir) = receiving_relay(Some("16777216")).await;

    let (codes, baseline) = burst(&relay, 8, 6 * MIB).await;

    let (_, peak) = memory_kib(relay.pid());
    let peak = grown_mib(peak, baseline);
    eprintln!("8 × 6 MiB, budget 16 MiB: peak +{peak:.1} MiB, replies {codes:?}");
    assert!(
        codes.iter().all(|&code| code == 250 || code == 452),
        "{codes:?}"
    );
    assert!(
        codes.iter().filter(|&&code| code == 250).count() >= 2,
        "{codes:?}"
    );
    assert!(peak < 40.0, "peak +{peak:.1} MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_returns_to_the_system_after_a_burst() {
    let (relay, _upstream, _dir) = receiving_relay(None).await;

    // Under glibc's (fixed) mmap threshold: these come from the heap.
    let (codes, baseline) = burst(&relay, 16, 3 * MIB / 2).await;
    assert_eq!(codes, [250; 16]);

    // The relay trims freed memory every 5 s; wait for that, a bounded while.
    let waiting = Instant::now();
    let after = loop {
        let (now, _) = memory_kib(relay.pid());
        if grown_mib(now, baseline) < 4.0 || waiting.elapsed() > Duration::from_secs(12) {
            break grown_mib(now, baseline);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!(
        "16 × 1.5 MiB: +{after:.1} MiB after {:?}",
        waiting.elapsed()
    );
    assert!(after < 4.0, "after +{after:.1} MiB");
}
