//! OAuth 2.0 through the whole relay process, with no stand-ins: a local
//! token endpoint issues the tokens, `oauth::Tokens` keeps them, and the fake
//! upstream accepts only the access token the endpoint issued last. Revoked
//! consent holds the mail with a hint; after a new sign-in it goes out.

mod common;

use std::time::Duration;

use common::fake_upstream::{FakeUpstream, FakeUpstreamOptions, UpstreamTls};
use common::interactive::{Cli, query};
use common::process::RelayProcess;
use common::relay::{LOCAL_PASSWORD, LOCAL_USER, UPSTREAM_PASSWORD, UPSTREAM_USER};
use common::smtp::Client;
use common::token_endpoint::{CLIENT_SECRET, TokenEndpoint, store_refresh_token};
use tokio::io::AsyncWriteExt;

const WAIT: Duration = Duration::from_secs(20);

async fn send(client: &mut Client, subject: &str) -> u16 {
    let content = format!("Subject: {subject}\r\n\r\ninvoice\r\n");
    client
        .send_mail(
            "billing@legacy.example",
            &["customer@example.com"],
            &content,
        )
        .await
        .code
}

#[tokio::test]
async fn revoked_consent_holds_mail_until_a_new_sign_in() {
    let endpoint = TokenEndpoint::start().await;
    endpoint.script().refresh_token = Some("refresh-SECRET-login-1".into());
    let upstream = FakeUpstream::start(FakeUpstreamOptions::new(
        UpstreamTls::StartTls,
        UPSTREAM_USER,
        UPSTREAM_PASSWORD,
    ))
    .await;
    upstream.set_access_token("access-SECRET-1");
    let dir = tempfile::tempdir().unwrap();
    store_refresh_token(
        &dir.path().join("spool"),
        "gmail",
        UPSTREAM_USER,
        "refresh-SECRET-login-1",
    );
    let port = upstream.port().to_string();
    let ca_file = upstream.ca_file().display().to_string();
    let token_url = endpoint.url("/token");
    let auth_url = endpoint.url("/auth");
    let env = [
        ("SENDBRIDGE_ACCOUNTS__GMAIL__HOST", "localhost"),
        ("SENDBRIDGE_ACCOUNTS__GMAIL__PORT", port.as_str()),
        ("SENDBRIDGE_ACCOUNTS__GMAIL__CA_FILE", ca_file.as_str()),
        ("SENDBRIDGE_ACCOUNTS__GMAIL__USERNAME", UPSTREAM_USER),
        ("SENDBRIDGE_ACCOUNTS__GMAIL__AUTH", "oauth2"),
        ("SENDBRIDGE_ACCOUNTS__GMAIL__OAUTH2__PROVIDER", "google"),
        ("SENDBRIDGE_ACCOUNTS__GMAIL__OAUTH2__CLIENT_ID", "client-id"),
        (
            "SENDBRIDGE_ACCOUNTS__GMAIL__OAUTH2__CLIENT_SECRET",
            CLIENT_SECRET,
        ),
        (
            "SENDBRIDGE_ACCOUNTS__GMAIL__OAUTH2__TOKEN_URL",
            token_url.as_str(),
        ),
        (
            "SENDBRIDGE_ACCOUNTS__GMAIL__OAUTH2__AUTH_URL",
            auth_url.as_str(),
        ),
        ("SENDBRIDGE_DELIVERY__SCAN_INTERVAL", "1s"),
        ("SENDBRIDGE_USERS__INVOICES__PASSWORD", LOCAL_PASSWORD),
        ("SENDBRIDGE_LOG", "trace"),
    ];
    let relay = RelayProcess::start(dir.path(), &env).await;
    let mut client = Client::connect(relay.addr).await;
    client.ehlo().await;
    assert_eq!(
        client.login_plain(LOCAL_USER, LOCAL_PASSWORD).await.code,
        235
    );

    // Signed in with the access token the stored refresh token brought.
    assert_eq!(send(&mut client, "first").await, 250);
    let received = upstream.wait_for_messages(1, WAIT).await;
    assert_eq!(received[0].auth_user, UPSTREAM_USER);
    assert_eq!(endpoint.requests("refresh_token"), 1);

    // Consent revoked: the provider refuses the token and the refresh.
    upstream.set_access_token("access-SECRET-never-issued");
    endpoint.script().refuse_refresh = Some("invalid_grant");
    assert_eq!(send(&mut client, "second").await, 250, "accepted and held");
    let hold = relay.wait_for_line("account on hold").await;
    assert!(hold.contains("sendbridge oauth login gmail"), "{hold}");

    // A person signs in again; the address is pasted back, as on a server
    // without a browser. The endpoint issues access token 2 and a new
    // refresh token, which the relay then trades for access token 3.
    endpoint.script().refuse_refresh = None;
    upstream.set_access_token("access-SECRET-3");
    let login = ["oauth", "login", "gmail", "--no-browser-listener"];
    let mut cli = Cli::start(dir.path(), &login, &env);
    let url = cli.line_starting(&endpoint.url("/auth?")).await;
    let params = query(&url);
    let pasted = format!(
        "{}?state={}&code=code-SECRET\n",
        params["redirect_uri"], params["state"]
    );
    cli.stdin.write_all(pasted.as_bytes()).await.unwrap();
    let (status, output) = cli.finish().await;
    assert!(status.success(), "{output}");
    assert!(output.contains("1 held message(s) due now"), "{output}");

    let received = upstream.wait_for_messages(2, WAIT).await;
    let text = String::from_utf8_lossy(&received[1].data).into_owned();
    assert!(text.contains("Subject: second"), "{text}");
    drop(client);
    let (code, log) = relay.terminate().await;
    assert_eq!(code, Some(0));
    // Every token, secret and code of the endpoint contains "SECRET".
    for line in &log {
        assert!(!line.contains("SECRET"), "a secret in the log: {line}");
    }
}
