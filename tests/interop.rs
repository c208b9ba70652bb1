//! Real third-party SMTP clients (Python's smtplib, curl, swaks) against the
//! relay: legacy programs are built on libraries like these, and each has its
//! own ideas about AUTH mechanisms, dot-stuffing, line endings and TLS.
//!
//! python3 must be installed. curl and swaks are skipped when missing, except
//! under CI (where `CI` is set), where a missing tool fails the test.

mod common;

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::process::{Output, Stdio};
use std::time::Duration;

use common::fake_upstream::{FakeUpstream, FakeUpstreamOptions, Received, UpstreamTls};
use common::relay::{
    LOCAL_PASSWORD, LOCAL_USER, Relay, UPSTREAM_PASSWORD, UPSTREAM_USER, config_for,
};
use tokio::process::Command;

const WAIT: Duration = Duration::from_secs(10);
/// Bounds every client run, so a client stuck on a reply fails the test.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
const SENDER: &str = "billing@legacy.example";
const RECIPIENTS: [&str; 2] = ["customer@example.com", "cc@example.com"];

/// "Rechnung für März" as an RFC 2047 encoded word, and body lines that
/// start with dots, which the client must stuff and the relay unstuff.
const MESSAGE: &str = "From: Invoices <billing@legacy.example>\r\n\
    To: customer@example.com\r\n\
    Subject: =?UTF-8?B?UmVjaG51bmcgZsO8ciBNw6Ryeg==?=\r\n\
    \r\n\
    Total due: 42 EUR\r\n\
    .signature line starting with a dot\r\n\
    ..and one with two\r\n\
    .\r\n\
    end\r\n";

/// A fake Gmail and a relay in front of it, with the implicit-TLS listener on.
async fn start() -> (FakeUpstream, Relay) {
    let upstream = FakeUpstream::start(FakeUpstreamOptions::new(
        UpstreamTls::StartTls,
        UPSTREAM_USER,
        UPSTREAM_PASSWORD,
    ))
    .await;
    let extra = "[server]\nlisten_tls = \"127.0.0.1:0\"";
    let relay = Relay::start(config_for(&upstream, UpstreamTls::StartTls, extra)).await;
    (upstream, relay)
}

fn implicit_tls_addr(relay: &Relay) -> SocketAddr {
    relay.tls_addr.expect("start() enables listen_tls")
}

/// Runs a client to completion with no input; a client still running after
/// `CLIENT_TIMEOUT` is killed and fails the test.
async fn run(command: &mut Command) -> Output {
    command.stdin(Stdio::null()).kill_on_drop(true);
    let program = command.as_std().get_program().to_owned();
    tokio::time::timeout(CLIENT_TIMEOUT, command.output())
        .await
        .unwrap_or_else(|_| panic!("{program:?} did not finish within {CLIENT_TIMEOUT:?}"))
        .unwrap_or_else(|err| panic!("cannot run {program:?}: {err}"))
}

fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "client failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
}

/// Waits for exactly one message upstream and checks its envelope: sent as
/// the account, to `recipients`.
async fn delivered(upstream: &FakeUpstream, recipients: &[&str]) -> Received {
    let received = upstream.wait_for_messages(1, WAIT).await;
    assert_eq!(received.len(), 1, "{received:?}");
    let message = received.into_iter().next().unwrap();
    assert_eq!(message.auth_user, UPSTREAM_USER);
    assert_eq!(message.mail_from, UPSTREAM_USER);
    assert_eq!(message.rcpt_to, recipients);
    message
}

fn text(data: &[u8]) -> String {
    String::from_utf8(data.to_vec()).expect("the test messages are UTF-8")
}

/// Whether `tool` is on PATH. A missing tool skips the test (returns false)
/// on a developer machine, but fails it under CI, which must install it.
fn tool_available(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()) {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{tool} not installed: .ci/run must apt-get install {tool}"
    );
    eprintln!("skipped: {tool} is not installed");
    false
}

// ---------------------------------------------------------------- smtplib

/// Signs in as `invoices` with `password` (smtplib picks the mechanism) and
/// sends `MESSAGE` from `SENDER` to `RECIPIENTS`. Prints the TLS version in
/// use, or the code of a failed sign-in (and exits 1).
const SMTPLIB_CLIENT: &str = r#"
import smtplib, ssl, sys

host, port, tls, cafile, user, password, sender, recipients, message = sys.argv[1:]
context = ssl.create_default_context(cafile=cafile)
if tls == "implicit":
    smtp = smtplib.SMTP_SSL(host, int(port), context=context, timeout=30)
else:
    smtp = smtplib.SMTP(host, int(port), timeout=30)
smtp.ehlo()
if tls == "starttls":
    smtp.starttls(context=context)
    smtp.ehlo()
try:
    smtp.login(user, password)
except smtplib.SMTPAuthenticationError as err:
    print("auth failed:", err.smtp_code)
    sys.exit(1)
smtp.sendmail(sender, recipients.split(","), message)
print("tls:", smtp.sock.version() if isinstance(smtp.sock, ssl.SSLSocket) else "none")
smtp.quit()
"#;

#[derive(Clone, Copy)]
enum Tls {
    None,
    StartTls,
    Implicit,
}

/// Runs `SMTPLIB_CLIENT` against the relay. With TLS it connects to
/// "localhost", the name in the relay's certificate, and verifies it.
async fn smtplib(relay: &Relay, tls: Tls, password: &str) -> Output {
    let (host, addr, mode) = match tls {
        Tls::None => ("127.0.0.1", relay.addr, "none"),
        Tls::StartTls => ("localhost", relay.addr, "starttls"),
        Tls::Implicit => ("localhost", implicit_tls_addr(relay), "implicit"),
    };
    let args: [&OsStr; 9] = [
        host.as_ref(),
        addr.port().to_string().as_ref(),
        mode.as_ref(),
        relay.cert.as_os_str(),
        LOCAL_USER.as_ref(),
        password.as_ref(),
        SENDER.as_ref(),
        RECIPIENTS.join(",").as_ref(),
        MESSAGE.as_ref(),
    ];
    run(Command::new("python3")
        .arg("-c")
        .arg(SMTPLIB_CLIENT)
        .args(args))
    .await
}

async fn smtplib_sends_message(tls: Tls, expected_tls: &str) {
    let (upstream, relay) = start().await;

    let output = smtplib(&relay, tls, LOCAL_PASSWORD).await;

    assert_success(&output);
    let stdout = text(&output.stdout);
    assert!(stdout.contains(expected_tls), "{stdout}");
    let message = delivered(&upstream, &RECIPIENTS).await;
    assert_eq!(text(&message.data), MESSAGE);
}

#[tokio::test]
async fn python_smtplib_plain_login_and_sendmail() {
    smtplib_sends_message(Tls::None, "tls: none").await;
}

#[tokio::test]
async fn python_smtplib_starttls_with_verified_certificate() {
    smtplib_sends_message(Tls::StartTls, "tls: TLSv1.").await;
}

#[tokio::test]
async fn python_smtplib_ssl_on_implicit_tls_listener() {
    smtplib_sends_message(Tls::Implicit, "tls: TLSv1.").await;
}

#[tokio::test]
async fn python_smtplib_wrong_password_raises_535() {
    let (upstream, relay) = start().await;

    let output = smtplib(&relay, Tls::None, "wrong-password").await;

    assert!(!output.status.success());
    assert_eq!(text(&output.stdout).trim(), "auth failed: 535", "{output:?}");
    assert!(upstream.received().is_empty());
    assert_eq!(upstream.connections(), 0);
}

// ------------------------------------------------------------------- curl

/// What a legacy program writes to a file: Unix line endings.
const CURL_MESSAGE: &str = "From: billing@legacy.example\nTo: customer@example.com\nSubject: curl test\n\nInvoice attached.\n.dot line\n";

/// Uploads `CURL_MESSAGE` with curl, signing in as `invoices`; `tls_args`
/// and `url` select the connection.
async fn curl(tls_args: &[&str], url: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("message.txt");
    std::fs::write(&file, CURL_MESSAGE).unwrap();
    run(Command::new("curl")
        .args(["--silent", "--show-error", "--mail-from", SENDER])
        .args(["--mail-rcpt", RECIPIENTS[0]])
        .arg("--upload-file")
        .arg(&file)
        .args(["--user", &format!("{LOCAL_USER}:{LOCAL_PASSWORD}")])
        .args(tls_args)
        .arg(url))
    .await
}

async fn curl_sends_message(tls_args: &[&str], url: &str) {
    
}

#[tokio::test]
async fn curl_uploads_a_file_with_lf_line_endings() {
    if !tool_available("curl") {
        return;
    }
    let (upstream, relay) = start().await;

    let output = curl(&[], &format!("smtp://127.0.0.1:{}", relay.addr.port())).await;

    assert_success(&output);
    let message = delivered(&upstream, &RECIPIENTS[..1]).await;
    assert_eq!(text(&message.data), CURL_MESSAGE.replace('\n', "\r\n"));
}
