//! `[[listeners]]`: the legacy TLS profile as old printers speak it (driven
//! with `openssl s_client` and swaks pinned to TLS 1.0/1.1 and TLS_RSA CBC
//! suites), a modern listener still refusing them, and each listener's own
//! trusted networks and `require_auth`.
//!
//! A test whose client is not installed is skipped on a developer machine
//! but fails under CI (`CI` set).

mod common;

use std::net::SocketAddr;
use std::process::{Output, Stdio};
use std::time::Duration;

use common::fake_upstream::FakeUpstream;
use common::process::RelayProcess;
use common::relay::{LOCAL_PASSWORD, LOCAL_USER, Relay, relay_with_upstream};
use common::smtp::{Client, plain};
use common::tools::tool_available;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

const WAIT: Duration = Duration::from_secs(10);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// Debian's OpenSSL 3 client, like the relay's, needs security level 0 for
/// TLS 1.0/1.1 (SHA-1 handshake signatures) and for the TLS_RSA suites.
const OLD_CIPHERS: &str = "DEFAULT:@SECLEVEL=0";

/// `server.trusted_networks` trusts 127.0.0.2; listeners[0] and [1] are
/// legacy (STARTTLS, implicit TLS), [2] trusts only 127.0.0.3 and offers
/// no TLS, [3] requires every client to sign in.
const LISTENERS: &str = r#"
[server]
trusted_networks = ["127.0.0.2"]
default_account = "gmail"

[[listeners]]
address = "127.0.0.1:0"
tls_profile = "legacy"

[[listeners]]
address = "127.0.0.1:0"
tls = "implicit"
tls_profile = "legacy"

[[listeners]]
address = "127.0.0.1:0"
tls = "none"
trusted_networks = ["127.0.0.3"]

[[listeners]]
address = "127.0.0.1:0"
require_auth = true
"#;

async fn start() -> (FakeUpstream, Relay) {
    relay_with_upstream(LISTENERS).await
}

/// The one SMTP session every client below types: sign in, one message, quit.
fn smtp_session() -> String {
    format!(
        "EHLO printer.lan\r\nAUTH PLAIN {}\r\nMAIL FROM:<scanner@office.example>\r\n\
         RCPT TO:<office@example.com>\r\nDATA\r\nSubject: scan\r\n\r\nscanned page\r\n.\r\nQUIT\r\n",
        plain(LOCAL_USER, LOCAL_PASSWORD)
    )
}

/// How an `openssl s_client` run went.
struct Handshake {
    /// The client saw the relay accept the message and say goodbye.
    sent: bool,
    /// `Protocol version:` and `Ciphersuite:` from `-brief`.
    protocol: Option<String>,
    cipher: Option<String>,
    output: Output,
}

/// Runs `openssl s_client` to `addr` with `args`, verifying the relay's
/// certificate against the address it connects to (`-verify_ip`), and
/// types `smtp_session` (commands letters off, so `RCPT` is no
/// renegotiation).
async fn s_client(relay: &Relay, addr: SocketAddr, args: &[&str]) -> Handshake {
    let mut command = Command::new("openssl");
    command
        .args(["s_client", "-connect", &addr.to_string()])
        .args(["-brief", "-ign_eof", "-nocommands", "-verify_return_error"])
        .args(["-verify_ip", "127.0.0.1", "-CAfile"])
        .arg(&relay.cert)
        .args(args);
    let output = run(&mut command, smtp_session().as_bytes()).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let field = |name: &str| {
        stderr
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(|value| value.trim().to_string())
    };
    Handshake {
        sent: stdout.contains("\n235 ") && stdout.contains("\n354 ") && stdout.contains("\n221 "),
        protocol: field("Protocol version:"),
        cipher: field("Ciphersuite:"),
        output,
    }
}

/// Runs a client with `input` on its stdin; a client still running after
/// `CLIENT_TIMEOUT` is killed and fails the test.
async fn run(command: &mut Command, input: &[u8]) -> Output {
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("the client runs");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).await.unwrap();
    drop(stdin);
    tokio::time::timeout(CLIENT_TIMEOUT, child.wait_with_output())
        .await
        .expect("the client finishes")
        .unwrap()
}

fn listener(relay: &Relay, key: &str) -> SocketAddr {
    relay
        .listeners
        .iter()
        .find_map(|(listener, addr)| (listener == key).then_some(*addr))
        .unwrap_or_else(|| panic!("{key} is bound: {:?}", relay.listeners))
}

/// The s_client options of each old client: (options, protocol, cipher).
const OLD_CLIENTS: [(&[&str], &str, Option<&str>); 3] = [
    (&["-tls1", "-cipher", OLD_CIPHERS], "TLSv1", None),
    (&["-tls1_1", "-cipher", OLD_CIPHERS], "TLSv1.1", None),
    // TLS_RSA_WITH_AES_128_CBC_SHA: RSA key exchange, as Ricoh controllers.
    (
        &["-tls1_2", "-cipher", "AES128-SHA:@SECLEVEL=0"],
        "TLSv1.2",
        Some("AES128-SHA"),
    ),
];

fn describe(handshake: &Handshake) -> String {
    format!(
        "{:?} {:?}\nstdout: {}\nstderr: {}",
        handshake.protocol,
        handshake.cipher,
        String::from_utf8_lossy(&handshake.output.stdout),
        String::from_utf8_lossy(&handshake.output.stderr)
    )
}

#[tokio::test]
async fn old_tls_clients_send_through_a_legacy_starttls_listener() {
    if !tool_available("openssl") {
        return;
    }
    let (upstream, relay) = start().await;
    let legacy = listener(&relay, "listeners[0]");

    for (n, (options, protocol, cipher)) in OLD_CLIENTS.into_iter().enumerate() {
        let mut args = vec!["-starttls", "smtp"];
        args.extend(options);
        let handshake = s_client(&relay, legacy, &args).await;

        assert!(handshake.sent, "{options:?}: {}", describe(&handshake));
        assert_eq!(handshake.protocol.as_deref(), Some(protocol));
        if let Some(cipher) = cipher {
            assert_eq!(handshake.cipher.as_deref(), Some(cipher));
        }
        let received = upstream.wait_for_messages(n + 1, WAIT).await;
        assert_eq!(received.len(), n + 1, "{options:?}");
        assert!(received[n].without_trace().contains("scanned page"));
    }
}

#[tokio::test]
async fn an_old_tls_client_sends_through_a_legacy_implicit_tls_listener() {
    if !tool_available("openssl") {
        return;
    }
    let (upstream, relay) = start().await;
    let legacy = listener(&relay, "listeners[1]");

    let handshake = s_client(&relay, legacy, &["-tls1", "-cipher", OLD_CIPHERS]).await;

    assert!(handshake.sent, "{}", describe(&handshake));
    assert_eq!(handshake.protocol.as_deref(), Some("TLSv1"));
    assert_eq!(upstream.wait_for_messages(1, WAIT).await.len(), 1);
}

/// The same clients against `server.listen`, which stays on rustls.
#[tokio::test]
async fn a_modern_listener_still_refuses_old_tls() {
    if !tool_available("openssl") {
        return;
    }
    let (upstream, relay) = start().await;

    for (options, _, _) in OLD_CLIENTS {
        let mut args = vec!["-starttls", "smtp"];
        args.extend(options);
        let handshake = s_client(&relay, relay.addr, &args).await;

        assert!(!handshake.sent, "{options:?}: {}", describe(&handshake));
        assert!(!handshake.output.status.success(), "{options:?}");
        assert_eq!(handshake.protocol, None, "{options:?}");
    }
    // A current client is served there, verifying the certificate by IP.
    let handshake = s_client(&relay, relay.addr, &["-starttls", "smtp"]).await;
    assert!(handshake.sent, "{}", describe(&handshake));
    assert_eq!(handshake.protocol.as_deref(), Some("TLSv1.3"));
    assert_eq!(upstream.wait_for_messages(1, WAIT).await.len(), 1);
}

#[tokio::test]
async fn swaks_sends_over_tls_1_0_through_a_legacy_listener() {
    if !tool_available("swaks") {
        return;
    }
    let (upstream, relay) = start().await;
    let legacy = listener(&relay, "listeners[0]");
    let mut command = Command::new("swaks");
    command
        .args(["--server", "127.0.0.1", "--port"])
        .arg(legacy.port().to_string())
        .args([
            "--tls",
            "--tls-protocol",
            "tlsv1",
            "--tls-cipher",
            OLD_CIPHERS,
        ])
        .args(["--tls-verify", "--tls-ca-path"])
        .arg(&relay.cert)
        .args(["--auth", "PLAIN", "--auth-user", LOCAL_USER])
        .args(["--auth-password", LOCAL_PASSWORD])
        .args([
            "--from",
            "scanner@office.example",
            "--to",
            "office@example.com",
        ])
        .args(["--helo", "printer.lan", "--timeout", "30"]);

    let output = run(&mut command, b"").await;

    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("TLS started with cipher TLSv1:"),
        "{stdout}"
    );
    assert_eq!(upstream.wait_for_messages(1, WAIT).await.len(), 1);
}

/// The relay's own log at start, from the binary.
#[tokio::test]
async fn a_legacy_listener_is_warned_about_at_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("config")).unwrap();
    let config = "[[listeners]]\naddress = \"127.0.0.1:0\"\ntls_profile = \"legacy\"\n\
        [[listeners]]\naddress = \"127.0.0.1:0\"\n";
    std::fs::write(dir.path().join("config/sendbridge.toml"), config).unwrap();

    let relay = RelayProcess::start(dir.path(), &[]).await;
    let (code, log) = relay.terminate().await;

    assert_eq!(code, Some(0), "{log:#?}");
    let warnings: Vec<_> = log
        .iter()
        .filter(|line| line.contains("accepts TLS 1.0/1.1 and CBC suites for old devices"))
        .collect();
    assert_eq!(warnings.len(), 1, "only the legacy one: {log:#?}");
    let warning = warnings[0];
    assert!(warning.contains(" WARN "), "{warning}");
    assert!(warning.contains("listener 127.0.0.1:"), "{warning}");
    assert!(
        warning.contains("restrict its trusted_networks"),
        "{warning}"
    );
    assert!(warning.contains("listener=listeners[0]"), "{warning}");
}

/// MAIL's reply code for a client from `source` that did not sign in.
async fn mail_without_sign_in(source: &str, addr: SocketAddr) -> u16 {
    let mut client = Client::connect_from(source, addr).await;
    assert_eq!(client.read_reply().await.code, 220);
    client.ehlo().await;
    client.cmd("MAIL FROM:<scanner@office.example>").await.code
}

#[tokio::test]
async fn each_listener_trusts_its_own_networks() {
    let (_upstream, relay) = start().await;
    let own_networks = listener(&relay, "listeners[2]");
    let require_auth = listener(&relay, "listeners[3]");

    // (client address, listener, MAIL reply without signing in)
    let cases = [
        ("127.0.0.2", relay.addr, 250),
        ("127.0.0.3", relay.addr, 530),
        ("127.0.0.3", own_networks, 250),
        ("127.0.0.2", own_networks, 530),
        ("127.0.0.2", require_auth, 530),
        ("127.0.0.3", require_auth, 530),
    ];
    for (source, addr, code) in cases {
        assert_eq!(
            mail_without_sign_in(source, addr).await,
            code,
            "{source} to {addr}"
        );
    }
}

#[tokio::test]
async fn a_trusted_client_of_a_require_auth_listener_still_signs_in() {
    let (upstream, relay) = start().await;
    let require_auth = listener(&relay, "listeners[3]");
    let mut client = Client::connect_from("127.0.0.2", require_auth).await;
    assert_eq!(client.read_reply().await.code, 220);
    let ehlo = client.ehlo().await;
    assert!(ehlo.text.contains("AUTH PLAIN LOGIN"), "{ehlo:?}");
    assert!(ehlo.text.contains("STARTTLS"), "{ehlo:?}");

    let refused = client.cmd("MAIL FROM:<scanner@office.example>").await;
    assert_eq!(
        (refused.code, refused.text.as_str()),
        (530, "5.7.0 Authentication required")
    );
    let reply = client.login_plain(LOCAL_USER, LOCAL_PASSWORD).await;
    assert_eq!(reply.code, 235, "{reply:?}");
    let reply = client
        .send_mail(
            "scanner@office.example",
            &["office@example.com"],
            "Subject: scan\r\n\r\nscanned page\r\n",
        )
        .await;
    assert_eq!(reply.code, 250, "{reply:?}");
    assert_eq!(upstream.wait_for_messages(1, WAIT).await.len(), 1);
}

#[tokio::test]
async fn a_listener_without_tls_offers_no_starttls() {
    let (_upstream, relay) = start().await;
    let mut client = Client::connect(listener(&relay, "listeners[2]")).await;

    let ehlo = client.ehlo().await;

    assert!(!ehlo.text.contains("STARTTLS"), "{ehlo:?}");
    let reply = client.cmd("STARTTLS").await;
    assert_eq!(reply.code, 502, "{reply:?}");
}
