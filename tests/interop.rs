//! Real third-party SMTP clients (Python's smtplib, curl, swaks) against the
//! relay: legacy programs are built on clients like these, and each has its
//! own ideas about AUTH mechanisms, dot-stuffing, line endings and TLS.
//!
//! A test whose client is not installed is skipped on a developer machine
//! but fails under CI (`CI` set).

mod common;

use std::process::{Output, Stdio};
use std::time::Duration;

use common::fake_upstream::FakeUpstream;
use common::relay::{LOCAL_PASSWORD, LOCAL_USER, Relay, UPSTREAM_USER, relay_with_upstream};
use common::smtp::Client;
use common::tools::tool_available;
use tokio::process::Command;

const WAIT: Duration = Duration::from_secs(10);
/// Bounds every client run, so a client stuck waiting for a reply fails the
/// test instead of hanging it.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
const SENDER: &str = "billing@legacy.example";
const RECIPIENTS: [&str; 2] = ["customer@example.com", "cc@example.com"];

/// The message smtplib sends: a subject "Rechnung für März" as an RFC 2047
/// encoded word, and lines starting with dots, which the client must stuff
/// and the relay unstuff.
const MESSAGE: &str = "From: Invoices <billing@legacy.example>\r\n\
    To: customer@example.com\r\n\
    Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n\
    Message-ID: <42@legacy.example>\r\n\
    Subject: =?UTF-8?B?UmVjaG51bmcgZsO8ciBNw6Ryeg==?=\r\n\
    \r\n\
    Total due: 42 EUR\r\n\
    .signature line starting with a dot\r\n\
    ..and one with two\r\n\
    .\r\n\
    end\r\n";

/// The file curl uploads, as a legacy program writes it: LF line endings.
const MESSAGE_FILE: &str = "From: billing@legacy.example\n\
    To: customer@example.com\n\
    Date: Mon, 23 Nov 2026 10:00:00 +0000\n\
    Message-ID: <43@legacy.example>\n\
    Subject: curl test\n\
    \n\
    Invoice attached.\n\
    .dot line\n";

/// How a client reaches the relay.
#[derive(Clone, Copy)]
enum Transport {
    /// Plain text on the main port, no STARTTLS.
    Plain,
    /// STARTTLS on the main port, verifying the relay's certificate.
    StartTls,
    /// The implicit-TLS listener, verifying the relay's certificate.
    ImplicitTls,
}

impl Transport {
    /// The relay port to connect to.
    fn port(self, relay: &Relay) -> u16 {
        match self {
            Transport::Plain | Transport::StartTls => relay.addr.port(),
            Transport::ImplicitTls => relay.tls_addr.expect("start() enables listen_tls").port(),
        }
    }
}

/// A fake Gmail and a relay in front of it, with the implicit-TLS listener on.
async fn start() -> (FakeUpstream, Relay) {
    start_with("").await
}

/// `start` with more `[server]` settings.
async fn start_with(server: &str) -> (FakeUpstream, Relay) {
    relay_with_upstream(&format!("[server]\nlisten_tls = \"127.0.0.1:0\"\n{server}")).await
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

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("client output and test messages are UTF-8")
}

/// Signs in with `user` and `password` (smtplib picks the mechanism) and
/// sends `message`. Prints the TLS version in use, or the reply code of a
/// failed sign-in (then exits 1).
const SMTPLIB_SCRIPT: &str = r#"
import smtplib, ssl, sys

host, port, transport, cafile, user, password, sender, recipients, message = sys.argv[1:]
context = ssl.create_default_context(cafile=cafile)
if transport == "implicit":
    smtp = smtplib.SMTP_SSL(host, int(port), context=context, timeout=30)
else:
    smtp = smtplib.SMTP(host, int(port), timeout=30)
smtp.ehlo()
if transport == "starttls":
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

/// Sends `MESSAGE` with Python's smtplib. For TLS it connects to
/// "localhost", the name smtplib checks the certificate against; smtplib
/// tries every address the name resolves to, so a ::1 first is harmless.
async fn smtplib(relay: &Relay, transport: Transport, password: &str) -> Output {
    let (host, mode) = match transport {
        Transport::Plain => ("127.0.0.1", "plain"),
        Transport::StartTls => ("localhost", "starttls"),
        Transport::ImplicitTls => ("localhost", "implicit"),
    };
    let port = transport.port(relay).to_string();
    run(Command::new("python3")
        .args(["-c", SMTPLIB_SCRIPT, host, &port, mode])
        .arg(&relay.cert)
        .args([LOCAL_USER, password, SENDER, &RECIPIENTS.join(","), MESSAGE]))
    .await
}

/// Uploads `MESSAGE_FILE` with curl.
async fn curl(relay: &Relay, transport: Transport) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("message.txt");
    std::fs::write(&file, MESSAGE_FILE).unwrap();
    let port = transport.port(relay);
    let mut command = Command::new("curl");
    command
        .args(["--silent", "--show-error", "--mail-from", SENDER])
        .args(RECIPIENTS.iter().flat_map(|rcpt| ["--mail-rcpt", rcpt]))
        // curl sends the file's LFs as they are unless told to convert them.
        .arg("--crlf")
        .arg("--upload-file")
        .arg(&file)
        .args(["--user", &format!("{LOCAL_USER}:{LOCAL_PASSWORD}")]);
    let url = match transport {
        Transport::Plain => format!("smtp://127.0.0.1:{port}"),
        Transport::StartTls => format!("smtp://localhost:{port}"),
        Transport::ImplicitTls => format!("smtps://localhost:{port}"),
    };
    if !matches!(transport, Transport::Plain) {
        // The certificate names "localhost"; pin it to the relay's address
        // rather than trust the resolver.
        command
            .args([
                "--ssl-reqd",
                "--resolve",
                &format!("localhost:{port}:127.0.0.1"),
            ])
            .arg("--cacert")
            .arg(&relay.cert);
    }
    run(command.arg(url)).await
}

/// Sends swaks's own test message, subject "swaks test", body "hello".
async fn swaks(relay: &Relay, transport: Transport) -> Output {
    swaks_signing_in(relay, transport, "PLAIN", LOCAL_PASSWORD).await
}

/// `swaks` signing in with SASL `mechanism` and `password`.
async fn swaks_signing_in(
    relay: &Relay,
    transport: Transport,
    mechanism: &str,
    password: &str,
) -> Output {
    // "localhost", the name in the certificate, for swaks versions that
    // check it; -4 because the relay listens on 127.0.0.1 only.
    let (host, tls_args): (&str, &[&str]) = match transport {
        Transport::Plain => ("127.0.0.1", &[]),
        Transport::StartTls => ("localhost", &["-4", "--tls"]),
        Transport::ImplicitTls => ("localhost", &["-4", "--tls-on-connect"]),
    };
    let mut command = Command::new("swaks");
    command
        .args(["--server", &format!("{host}:{}", transport.port(relay))])
        .args(["--auth", mechanism, "--auth-user", LOCAL_USER])
        .args(["--auth-password", password])
        .args(["--from", SENDER, "--to", &RECIPIENTS.join(",")])
        .args(["--header", "Subject: swaks test", "--body", "hello"])
        .args(["--silent", "2"])
        .args(tls_args);
    if !matches!(transport, Transport::Plain) {
        command
            .args(["--tls-verify", "--tls-ca-path"])
            .arg(&relay.cert);
    }
    run(&mut command).await
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

/// What a client produced by sending one message through a fresh relay.
struct Relayed {
    stdout: String,
    /// The message as it arrived upstream.
    content: String,
}

/// Starts a fake Gmail and a relay, has `client` send one message through
/// the relay, and checks that the client succeeded and that the message went
/// upstream as the account to `RECIPIENTS`. `None` (skip the test) when
/// `program` is not installed.
async fn relay_one_message(
    program: &str,
    client: impl AsyncFnOnce(&Relay) -> Output,
) -> Option<Relayed> {
    if !tool_available(program) {
        return None;
    }
    let (upstream, relay) = start().await;

    let output = client(&relay).await;

    assert_success(&output);
    let received = upstream.wait_for_messages(1, WAIT).await;
    assert_eq!(received.len(), 1, "{received:?}");
    let message = &received[0];
    assert_eq!(message.auth_user, UPSTREAM_USER);
    assert_eq!(message.mail_from, UPSTREAM_USER);
    assert_eq!(message.rcpt_to, RECIPIENTS);
    Some(Relayed {
        stdout: text(&output.stdout),
        content: message.without_trace(),
    })
}

/// Declares one test per transport for a check `async fn(Transport)`, so
/// each shows up (and fails) on its own.
macro_rules! test_each_transport {
    ($check:ident: $plain:ident, $starttls:ident, $implicit_tls:ident) => {
        #[tokio::test]
        async fn $plain() {
            $check(Transport::Plain).await;
        }

        #[tokio::test]
        async fn $starttls() {
            $check(Transport::StartTls).await;
        }

        #[tokio::test]
        async fn $implicit_tls() {
            $check(Transport::ImplicitTls).await;
        }
    };
}

/// smtplib sends `MESSAGE`; it must arrive byte for byte, and smtplib must
/// report the connection as encrypted exactly when the transport is TLS.
async fn smtplib_relays_message(transport: Transport) {
    let client = async |relay: &Relay| smtplib(relay, transport, LOCAL_PASSWORD).await;
    let Some(relayed) = relay_one_message("python3", client).await else {
        return;
    };
    let reported_tls = match transport {
        Transport::Plain => "tls: none",
        Transport::StartTls | Transport::ImplicitTls => "tls: TLSv1.",
    };
    assert!(
        relayed.stdout.starts_with(reported_tls),
        "{}",
        relayed.stdout
    );
    assert_eq!(relayed.content, MESSAGE);
}

test_each_transport!(smtplib_relays_message:
    python_smtplib_login_and_sendmail,
    python_smtplib_starttls_verifying_the_relay_certificate,
    python_smtplib_ssl_on_the_implicit_tls_listener);

#[tokio::test]
async fn python_smtplib_wrong_password_raises_535() {
    if !tool_available("python3") {
        return;
    }
    let (upstream, relay) = start().await;

    let output = smtplib(&relay, Transport::Plain, "wrong-password").await;

    assert!(!output.status.success(), "{output:?}");
    assert_eq!(
        text(&output.stdout).trim(),
        "auth failed: 535",
        "{output:?}"
    );
    assert_eq!(upstream.connections(), 0);
}

/// curl uploads `MESSAGE_FILE`; it must arrive with CRLF line endings.
async fn curl_relays_file(transport: Transport) {
    let client = async |relay: &Relay| curl(relay, transport).await;
    let Some(relayed) = relay_one_message("curl", client).await else {
        return;
    };
    assert_eq!(relayed.content, MESSAGE_FILE.replace('\n', "\r\n"));
}

test_each_transport!(curl_relays_file:
    curl_uploads_a_file_with_lf_line_endings,
    curl_starttls_verifying_the_relay_certificate,
    curl_smtps_on_the_implicit_tls_listener);

/// swaks sends its test message; subject and body must arrive.
async fn swaks_relays_message(transport: Transport) {
    let client = async |relay: &Relay| swaks(relay, transport).await;
    let Some(Relayed { content, .. }) = relay_one_message("swaks", client).await else {
        return;
    };
    let (header, body) = content.split_once("\r\n\r\n").expect("header and body");
    assert!(
        header.contains("\r\nSubject: swaks test\r\n"),
        "{content:?}"
    );
    // swaks ends its body with blank lines of its own.
    assert_eq!(body.trim_end_matches("\r\n"), "hello", "{content:?}");
}

test_each_transport!(swaks_relays_message:
    swaks_auth_plain,
    swaks_starttls_verifying_the_relay_certificate,
    swaks_tls_on_connect_to_the_implicit_tls_listener);

const WITH_CRAM_MD5: &str = r#"auth_mechanisms = ["PLAIN", "LOGIN", "CRAM-MD5"]"#;

/// Ricoh-style devices sign in with CRAM-MD5 (RFC 2195) when it is offered.
#[tokio::test]
async fn swaks_auth_cram_md5_with_the_right_and_a_wrong_password() {
    if !tool_available("swaks") {
        return;
    }
    let (upstream, relay) = start_with(WITH_CRAM_MD5).await;

    let right = swaks_signing_in(&relay, Transport::Plain, "CRAM-MD5", LOCAL_PASSWORD).await;
    let wrong = swaks_signing_in(&relay, Transport::Plain, "CRAM-MD5", "wrong-password").await;

    assert_success(&right);
    let received = upstream.wait_for_messages(1, WAIT).await;
    assert_eq!(received.len(), 1, "{received:?}");
    assert!(!wrong.status.success(), "{wrong:?}");
    assert!(
        text(&wrong.stdout).contains("535 5.7.8 Authentication credentials invalid"),
        "{wrong:?}"
    );
    assert_eq!(
        upstream.received().len(),
        1,
        "nothing sent after the wrong one"
    );
}

/// smtplib prefers CRAM-MD5 over PLAIN and LOGIN when the relay offers it;
/// its debug output shows the AUTH command it sent.
const SMTPLIB_CRAM_MD5_SCRIPT: &str = r#"
import smtplib, sys

port, user, password = sys.argv[1:]
smtp = smtplib.SMTP("127.0.0.1", int(port), timeout=30)
smtp.set_debuglevel(1)
smtp.login(user, password)
smtp.sendmail("billing@legacy.example", ["customer@example.com"], "Subject: cram\r\n\r\nhi\r\n")
smtp.quit()
"#;

#[tokio::test]
async fn python_smtplib_picks_cram_md5_when_offered() {
    if !tool_available("python3") {
        return;
    }
    let (upstream, relay) = start_with(WITH_CRAM_MD5).await;

    let output = run(Command::new("python3")
        .args(["-c", SMTPLIB_CRAM_MD5_SCRIPT])
        .arg(relay.addr.port().to_string())
        .args([LOCAL_USER, LOCAL_PASSWORD]))
    .await;

    assert_success(&output);
    let debug = text(&output.stderr);
    assert!(debug.contains("send: 'AUTH CRAM-MD5\\r\\n'"), "{debug}");
    assert!(debug.contains("reply: retcode (235)"), "{debug}");
    assert_eq!(upstream.wait_for_messages(1, WAIT).await.len(), 1);
}

#[tokio::test]
async fn cram_md5_is_offered_and_accepted_only_when_auth_mechanisms_lists_it() {
    let (_upstream, relay) = start().await;
    let mut client = Client::connect(relay.addr).await;
    let ehlo = client.ehlo().await;
    assert!(ehlo.text.contains("AUTH PLAIN LOGIN\n"), "{ehlo:?}");
    assert!(!ehlo.text.contains("CRAM-MD5"), "{ehlo:?}");
    let reply = client.cmd("AUTH CRAM-MD5").await;
    assert_eq!(
        (reply.code, reply.text.as_str()),
        (
            504,
            "5.5.4 Unrecognized authentication type; use PLAIN or LOGIN"
        )
    );

    let (_upstream, relay) = start_with(WITH_CRAM_MD5).await;
    let mut client = Client::connect(relay.addr).await;
    let ehlo = client.ehlo().await;
    assert!(ehlo.text.contains("CRAM-MD5"), "{ehlo:?}");
    let challenge = client.cmd("AUTH CRAM-MD5").await;
    assert_eq!(challenge.code, 334, "{challenge:?}");
}
