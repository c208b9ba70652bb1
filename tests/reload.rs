//! SIGHUP and `sendbridge reload` on the relay as a child process: a fixed
//! app password releases held mail, users change without dropping
//! connections, and an invalid configuration is refused while the running
//! one stays.

mod common;

use std::path::Path;
use std::time::Duration;

use common::fake_upstream::{FakeUpstream, FakeUpstreamOptions, UpstreamTls};
use common::process::{RelayProcess, sendbridge};
use common::relay::{LOCAL_PASSWORD, LOCAL_USER, UPSTREAM_PASSWORD, UPSTREAM_USER};
use common::smtp::{Client, plain};

const WAIT: Duration = Duration::from_secs(20);
const CONTENT: &str = "Subject: invoice\r\n\r\nInvoice.\r\n";

async fn upstream() -> FakeUpstream {
    let options = FakeUpstreamOptions::new(UpstreamTls::StartTls, UPSTREAM_USER, UPSTREAM_PASSWORD);
    FakeUpstream::start(options).await
}

/// The relay's configuration file, as an operator edits it.
fn write_config(dir: &Path, upstream: &FakeUpstream, password_file: &Path, users: &str) {
    let config = format!(
        r#"
        [accounts.gmail]
        host = "localhost"
        port = {port}
        username = "{UPSTREAM_USER}"
        password_file = "{password_file}"
        ca_file = "{ca_file}"
        timeout = "10s"
        {users}
        "#,
        port = upstream.port(),
        password_file = password_file.display(),
        ca_file = upstream.ca_file().display(),
    );
    std::fs::create_dir_all(dir.join("config")).unwrap();
    std::fs::write(dir.join("config/sendbridge.toml"), config).unwrap();
}

fn user(name: &str, password: &str) -> String {
    format!("[users.{name}]\npassword = \"{password}\"\naccount = \"gmail\"\n")
}

async fn reload(dir: &Path) {
    let out = tokio::time::timeout(WAIT, sendbridge(dir, &["reload"], &[]).output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn send(client: &mut Client) -> u16 {
    client
        .send_mail("billing@legacy.example", &["customer@example.com"], CONTENT)
        .await
        .code
}

#[tokio::test]
async fn a_fixed_app_password_releases_held_mail_on_reload() {
    let upstream = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("app-password");
    std::fs::write(&password_file, "the-old-account-password\n").unwrap();
    write_config(
        dir.path(),
        &upstream,
        &password_file,
        &user(LOCAL_USER, LOCAL_PASSWORD),
    );
    // Every level, so the secret check below covers debug and trace lines.
    let relay = RelayProcess::start(dir.path(), &[("SENDBRIDGE_LOG", "trace")]).await;
    let mut client = Client::connect(relay.addr).await;
    client.ehlo().await;
    let wrong = client.login_plain(LOCAL_USER, "wrong-local-password").await;
    assert_eq!(wrong.code, 535);
    let right = client.login_plain(LOCAL_USER, LOCAL_PASSWORD).await;
    assert_eq!(right.code, 235);
    assert_eq!(send(&mut client).await, 250, "accepted and held");
    relay.wait_for_line("account on hold").await;

    std::fs::write(&password_file, format!("{UPSTREAM_PASSWORD}\n")).unwrap();
    reload(dir.path()).await;

    let received = upstream.wait_for_messages(1, WAIT).await;
    assert_eq!(received[0].rcpt_to, ["customer@example.com"]);
    relay.wait_for_line("its credentials changed").await;
    // The session from before the reload goes on.
    assert_eq!(send(&mut client).await, 250);
    upstream.wait_for_messages(2, WAIT).await;
    drop(client);
    let (code, log) = relay.terminate().await;
    assert_eq!(code, Some(0));
    let secrets = [
        UPSTREAM_PASSWORD.to_string(),
        LOCAL_PASSWORD.to_string(),
        "wrong-local-password".to_string(),
        "the-old-account-password".to_string(),
        plain(LOCAL_USER, LOCAL_PASSWORD),
        plain(UPSTREAM_USER, UPSTREAM_PASSWORD),
    ];
    assert!(log.len() > 20, "trace level logs plenty: {log:#?}");
    for line in &log {
        for secret in &secrets {
            assert!(
                !line.contains(secret.as_str()),
                "a secret in the log: {line}"
            );
        }
    }
}

#[tokio::test]
async fn users_change_without_dropping_connections_and_a_bad_config_is_refused() {
    let upstream = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("app-password");
    std::fs::write(&password_file, UPSTREAM_PASSWORD).unwrap();
    write_config(
        dir.path(),
        &upstream,
        &password_file,
        &user(LOCAL_USER, LOCAL_PASSWORD),
    );
    let relay = RelayProcess::start(dir.path(), &[]).await;
    let mut open = Client::connect(relay.addr).await;
    open.ehlo().await;
    assert_eq!(open.login_plain(LOCAL_USER, LOCAL_PASSWORD).await.code, 235);

    // A second program gets its own login.
    let users = user(LOCAL_USER, LOCAL_PASSWORD) + &user("scanner", "scan-pass");
    write_config(dir.path(), &upstream, &password_file, &users);
    reload(dir.path()).await;
    relay.wait_for_line("configuration reloaded").await;

    let mut scanner = Client::connect(relay.addr).await;
    scanner.ehlo().await;
    assert_eq!(scanner.login_plain("scanner", "scan-pass").await.code, 235);
    assert_eq!(send(&mut scanner).await, 250);
    assert_eq!(send(&mut open).await, 250, "the open session was kept");

    // A broken edit: `sendbridge reload` checks it first and does not
    // signal; a plain SIGHUP is refused by the relay, which keeps running.
    std::fs::write(
        dir.path().join("config/sendbridge.toml"),
        "[accounts.gmail]\nport = \"abc\"\n",
    )
    .unwrap();
    let out = sendbridge(dir.path(), &["reload"], &[])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("accounts.gmail.port"));
    let hangup = tokio::process::Command::new("kill")
        .args(["-HUP", &relay.pid().to_string()])
        .status()
        .await
        .unwrap();
    assert!(hangup.success());
    let refused = relay.wait_for_line("reload refused").await;
    assert!(refused.contains("accounts.gmail.port"), "{refused}");
    let mut again = Client::connect(relay.addr).await;
    again.ehlo().await;
    assert_eq!(again.login_plain("scanner", "scan-pass").await.code, 235);
    assert_eq!(send(&mut again).await, 250);
    upstream.wait_for_messages(3, WAIT).await;
    drop((open, scanner, again));
    let (code, _) = relay.terminate().await;
    assert_eq!(code, Some(0));
}
