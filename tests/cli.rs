//! The binary as users run it: configuration from files and environment,
//! exit codes, and what the logs say (and never say).

mod common;

use std::time::Duration;

use common::fake_upstream::{FakeUpstream, FakeUpstreamOptions, UpstreamTls};
use common::process::{RelayProcess, sendbridge};
use common::smtp::Client;

const WAIT: Duration = Duration::from_secs(30);

async fn output(
    dir: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> std::process::Output {
    let command = sendbridge(dir, args, env).output();
    tokio::time::timeout(WAIT, command)
        .await
        .expect("command finishes")
        .unwrap()
}

#[tokio::test]
async fn invalid_config_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("SENDBRIDGE_ACCOUNTS__GMAIL__USERNAME", "me@gmail.com"),
        ("SENDBRIDGE_ACCOUNTS__GMAIL__PASSWORD", "abcdabcdabcdabcd"),
        ("SENDBRIDGE_ACCOUNTS__GMAIL__PORT", "abc"),
    ];

    for subcommand in ["run", "check"] {
        let out = output(dir.path(), &[subcommand], &env).await;
        assert_eq!(out.status.code(), Some(2), "{subcommand}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            stderr.trim(),
            "sendbridge: invalid configuration: accounts.gmail.port: expected a number, got \"abc\""
        );
        assert!(!stderr.contains("abcdabcdabcdabcd"));
    }
}

#[tokio::test]
async fn explicit_config_file_must_exist() {
    let dir = tempfile::tempdir().unwrap();
    let out = output(dir.path(), &["--config", "missing.toml", "check"], &[]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml does not exist"));
}

#[tokio::test]
async fn config_file_and_env_combine() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("config")).unwrap();
    std::fs::write(
        dir.path().join("config/sendbridge.toml"),
        "[accounts.gmail]\nusername = \"me@gmail.com\"\n[users.invoices]\npassword = \"x\"\n",
    )
    .unwrap();
    // The file lacks the app password: env supplies it.
    let out = output(dir.path(), &["check"], &[]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("accounts.gmail.password: missing"));

    let env = [("SENDBRIDGE_ACCOUNTS__GMAIL__PASSWORD", "abcdabcdabcdabcd")];
    let out = output(dir.path(), &["check"], &env).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("account gmail: me@gmail.com@smtp.gmail.com:587"),
        "{stdout}"
    );
    assert!(
        stdout.contains("user invoices: sends through gmail"),
        "{stdout}"
    );
    assert!(!stdout.contains("abcdabcdabcdabcd"));
}

#[tokio::test]
async fn starts_without_accounts_and_says_what_to_set() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(dir.path(), &[]).await;

    let mut client = Client::connect(relay.addr).await;
    client.ehlo().await;
    client.expect("MAIL FROM:<a@legacy.example>", 530).await;

    let (code, log) = relay.terminate().await;
    assert_eq!(code, Some(0), "SIGTERM is a clean stop");
    let hints: Vec<_> = log
        .iter()
        .filter(|l| l.contains("no upstream account configured"))
        .collect();
    assert_eq!(hints.len(), 1, "{log:#?}");
    assert!(hints[0].contains("SENDBRIDGE_ACCOUNTS__GMAIL__PASSWORD"));
    assert!(
        dir.path().join("certs/sendbridge.crt").is_file(),
        "certificate generated"
    );
}

/// The README's scenario: configured by environment variables only, with
/// passwords that look like numbers (which figment would otherwise parse).
#[tokio::test]
async fn env_only_configuration_relays_and_never_logs_secrets() {
    const APP_PASSWORD: &str = "0123456789012345";
    // Long enough not to occur by chance in timestamps or ids.
    const LOCAL_PASSWORD: &str = "004200917";
    let upstream = FakeUpstream::start(FakeUpstreamOptions::new(
        UpstreamTls::StartTls,
        "me@gmail.com",
        APP_PASSWORD,
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let port = upstream.port().to_string();
    let env = [
        ("SENDBRIDGE_ACCOUNTS__GMAIL__HOST", "localhost"),
        ("SENDBRIDGE_ACCOUNTS__GMAIL__PORT", port.as_str()),
        (
            "SENDBRIDGE_ACCOUNTS__GMAIL__CA_FILE",
            upstream.ca_file().to_str().unwrap(),
        ),
        ("SENDBRIDGE_ACCOUNTS__GMAIL__USERNAME", "me@gmail.com"),
        ("SENDBRIDGE_ACCOUNTS__GMAIL__PASSWORD", APP_PASSWORD),
        ("SENDBRIDGE_USERS__INVOICES__PASSWORD", LOCAL_PASSWORD),
        ("SENDBRIDGE_USERS__INVOICES__ACCOUNT", "gmail"),
        ("SENDBRIDGE_LOG", "trace"),
    ];
    let relay = RelayProcess::start(dir.path(), &env).await;

    let mut client = Client::connect(relay.addr).await;
    client.ehlo().await;
    assert_eq!(
        client.login_plain("invoices", "Wr0ng-Passw0rd").await.code,
        535
    );
    assert_eq!(
        client.login_plain("INVOICES", LOCAL_PASSWORD).await.code,
        235
    );
    let reply = client
        .send_mail(
            "billing@legacy.example",
            &["customer@example.com"],
            "Subject: s\r\n\r\nbody\r\n",
        )
        .await;
    assert_eq!(reply.code, 250, "{reply:?}");
    client.expect("QUIT", 221).await;

    let received = upstream.wait_for_messages(1, WAIT).await;
    assert_eq!(received[0].auth_user, "me@gmail.com");
    let (code, log) = relay.terminate().await;
    assert_eq!(code, Some(0));
    let log = log.join("\n");
    assert!(
        log.contains("message received") && log.contains("message delivered"),
        "{log}"
    );
    assert!(
        log.contains("local sign-in failed") && log.contains("invoices"),
        "{log}"
    );
    for secret in [APP_PASSWORD, LOCAL_PASSWORD, "Wr0ng-Passw0rd"] {
        assert!(
            !log.contains(secret),
            "{secret:?} appears in the log:\n{log}"
        );
    }
    use base64::Engine;
    let payload =
        base64::engine::general_purpose::STANDARD.encode(format!("\0INVOICES\0{LOCAL_PASSWORD}"));
    assert!(!log.contains(&payload), "AUTH payload in the log");
}

#[tokio::test]
async fn hash_password_output_is_accepted_as_password_hash() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = sendbridge(dir.path(), &["hash-password"], &[])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use tokio::io::AsyncWriteExt;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"old-password\n")
        .await
        .unwrap();
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(hash.starts_with("$argon2id$"), "{hash}");

    let env = [
        ("SENDBRIDGE_ACCOUNTS__GMAIL__USERNAME", "me@gmail.com"),
        ("SENDBRIDGE_ACCOUNTS__GMAIL__PASSWORD", "abcdabcdabcdabcd"),
        ("SENDBRIDGE_USERS__INVOICES__PASSWORD_HASH", hash.as_str()),
    ];
    let relay = RelayProcess::start(dir.path(), &env).await;
    let mut client = Client::connect(relay.addr).await;
    client.ehlo().await;
    assert_eq!(
        client.login_plain("invoices", "old-password").await.code,
        235
    );
    assert_eq!(
        client.login_plain("invoices", "old-password\n").await.code,
        503
    );
    relay.terminate().await;
}
