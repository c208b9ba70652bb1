//! `sendbridge oauth login` and `oauth status` as a person runs them, against
//! a local token endpoint. The test plays both the person and the provider's
//! sign-in page: it reads the printed address and sends the browser's
//! redirect itself (or pastes it on stdin). No token, code or secret may
//! appear in the output.

mod common;

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tokio::io::AsyncWriteExt;

use common::interactive::{Cli, query};
use common::token_endpoint::{
    CLIENT_SECRET, TokenEndpoint, USER_CODE, service_account_key, service_account_toml,
};
use sendbridge::oauth::Store;

const CODE: &str = "code-SECRET";
const LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// A config with `gmail` (authorization code) and `custom` (device code)
/// accounts whose endpoints are `endpoint`'s.
fn write_config(dir: &Path, endpoint: &TokenEndpoint) {
    let config = format!(
        r#"
        [spool]
        dir = "{spool}"
        [accounts.gmail]
        username = "me@example.com"
        auth = "oauth2"
        [accounts.gmail.oauth2]
        provider = "google"
        client_id = "client-id"
        client_secret = "{CLIENT_SECRET}"
        token_url = "{token}"
        auth_url = "{auth}"
        [accounts.custom]
        username = "me@example.org"
        auth = "oauth2"
        [accounts.custom.oauth2]
        provider = "custom"
        flow = "device_code"
        client_id = "client-id"
        client_secret = "{CLIENT_SECRET}"
        token_url = "{token}"
        device_url = "{device}"
        scopes = ["smtp", "offline_access"]
        "#,
        spool = dir.join("spool").display(),
        token = endpoint.url("/token"),
        auth = endpoint.url("/auth"),
        device = endpoint.url("/device"),
    );
    std::fs::write(dir.join("sendbridge.toml"), config).unwrap();
}

/// `sendbridge --config sendbridge.toml ARGS...` in `dir`.
fn oauth_cli(dir: &Path, args: &[&str]) -> Cli {
    let mut all = vec!["--config", "sendbridge.toml"];
    all.extend_from_slice(args);
    Cli::start(dir, &all, &[])
}

/// The PKCE check the provider makes: S256(code_verifier) == code_challenge.
fn s256(verifier: &str) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verifier.as_bytes());
    URL_SAFE_NO_PAD.encode(digest.as_ref())
}

fn stored_refresh_token(dir: &Path, account: &str) -> String {
    let store = Store::new(&dir.join("spool"), account).unwrap();
    let stored = store.load().unwrap().expect("the store was written");
    stored.refresh_token.unwrap().expose().to_string()
}

/// The browser's redirect to the loopback listener: status and page.
async fn redirect(redirect_uri: &str, query: &str) -> (u16, String) {
    let url = format!("{redirect_uri}?{query}");
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(LIMIT))
            .build()
            .into();
        let mut response = agent.get(&url).call().unwrap();
        let page = response.body_mut().read_to_string().unwrap();
        (response.status().as_u16(), page)
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn login_completes_through_the_loopback_redirect() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = TokenEndpoint::start().await;
    write_config(dir.path(), &endpoint);
    let mut cli = oauth_cli(dir.path(), &["oauth", "login", "gmail"]);
    let url = cli.line_starting(&endpoint.url("/auth?")).await;
    let params = query(&url);
    assert_eq!(params["code_challenge_method"], "S256");
    assert_eq!(params["scope"], "https://mail.google.com/");
    assert_eq!(params["login_hint"], "me@example.com");
    let redirect_uri = &params["redirect_uri"];
    assert!(
        redirect_uri.starts_with("http://127.0.0.1:"),
        "{redirect_uri}"
    );

    // A forged redirect (another state) is turned away; the real one is taken.
    let (status, _) = redirect(redirect_uri, &format!("code={CODE}&state=forged")).await;
    assert_eq!(status, 400);
    let (status, page) = redirect(
        redirect_uri,
        &format!("code={CODE}&state={}", params["state"]),
    )
    .await;
    assert_eq!(status, 200);
    assert!(page.contains("Signed in"), "{page}");

    let (status, output) = cli.finish().await;
    assert!(status.success(), "{output}");
    assert!(
        output.contains("signed in: the refresh token for account gmail"),
        "{output}"
    );
    let form = endpoint.last_form("authorization_code");
    assert_eq!(form["code"], CODE);
    assert_eq!(&form["redirect_uri"], redirect_uri);
    assert_eq!(s256(&form["code_verifier"]), params["code_challenge"]);
    assert_eq!(
        stored_refresh_token(dir.path(), "gmail"),
        "refresh-SECRET-1"
    );
}

#[tokio::test]
async fn login_takes_the_redirected_address_pasted_on_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = TokenEndpoint::start().await;
    write_config(dir.path(), &endpoint);
    let mut cli = oauth_cli(
        dir.path(),
        &["oauth", "login", "gmail", "--no-browser-listener"],
    );
    let url = cli.line_starting(&endpoint.url("/auth?")).await;
    let params = query(&url);
    let pasted = format!(
        "{}?state={}&code={CODE}&scope=https://mail.google.com/\n",
        params["redirect_uri"], params["state"]
    );
    cli.stdin.write_all(pasted.as_bytes()).await.unwrap();
    let (status, output) = cli.finish().await;
    assert!(status.success(), "{output}");
    let form = endpoint.last_form("authorization_code");
    assert_eq!(form["code"], CODE);
    assert_eq!(s256(&form["code_verifier"]), params["code_challenge"]);
    assert_eq!(
        stored_refresh_token(dir.path(), "gmail"),
        "refresh-SECRET-1"
    );
}

#[tokio::test]
async fn login_by_device_code_polls_until_signed_in() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = TokenEndpoint::start().await;
    endpoint.script().pending_polls = 2;
    write_config(dir.path(), &endpoint);
    let mut cli = oauth_cli(dir.path(), &["oauth", "login", "custom"]);
    let line = cli.line_starting("Open https://login.example/device").await;
    assert!(line.contains(USER_CODE), "{line}");
    let (status, output) = cli.finish().await;
    assert!(status.success(), "{output}");
    assert_eq!(endpoint.requests("device"), 1);
    assert_eq!(
        endpoint.requests("urn:ietf:params:oauth:grant-type:device_code"),
        3
    );
    assert_eq!(
        endpoint.last_form("urn:ietf:params:oauth:grant-type:device_code")["client_id"],
        "client-id"
    );
    assert_eq!(
        stored_refresh_token(dir.path(), "custom"),
        "refresh-SECRET-1"
    );
}

#[tokio::test]
async fn google_refuses_the_device_flow_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = TokenEndpoint::start().await;
    write_config(dir.path(), &endpoint);
    let (status, output) = oauth_cli(dir.path(), &["oauth", "login", "gmail", "--device"])
        .finish()
        .await;
    assert!(!status.success());
    assert!(
        output.contains("Google's device flow does not allow"),
        "{output}"
    );
    assert_eq!(endpoint.requests("device"), 0);
}

#[tokio::test]
async fn status_shows_each_account_without_its_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = TokenEndpoint::start().await;
    write_config(dir.path(), &endpoint);
    let mut cli = oauth_cli(
        dir.path(),
        &["oauth", "login", "gmail", "--no-browser-listener"],
    );
    let params = query(&cli.line_starting(&endpoint.url("/auth?")).await);
    let pasted = format!("?code={CODE}&state={}\n", params["state"]);
    cli.stdin.write_all(pasted.as_bytes()).await.unwrap();
    assert!(cli.finish().await.0.success());

    let (status, output) = oauth_cli(dir.path(), &["oauth", "status", "--check"])
        .finish()
        .await;
    // `custom` never signed in: the check fails for it, and says what to do.
    assert!(!status.success(), "{output}");
    let gmail = output
        .lines()
        .find(|line| line.starts_with("gmail"))
        .unwrap();
    assert!(
        gmail.contains("authorization_code") && gmail.contains(" yes "),
        "{output}"
    );
    assert!(gmail.trim_end().ends_with("ok"), "{output}");
    let custom = output
        .lines()
        .find(|line| line.starts_with("custom"))
        .unwrap();
    assert!(
        custom.contains("(missing)") && custom.contains("sign-in needed"),
        "{output}"
    );
    assert!(output.contains("sendbridge oauth login custom"), "{output}");
}

#[tokio::test]
async fn a_declined_sign_in_ends_the_login() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = TokenEndpoint::start().await;
    write_config(dir.path(), &endpoint);
    let mut cli = oauth_cli(dir.path(), &["oauth", "login", "gmail"]);
    let params = query(&cli.line_starting(&endpoint.url("/auth?")).await);
    let declined = format!("error=access_denied&state={}", params["state"]);
    let (status, _) = redirect(&params["redirect_uri"], &declined).await;
    assert_eq!(status, 200);
    let (status, output) = cli.finish().await;
    assert!(!status.success());
    assert!(
        output.contains("sign-in refused: access_denied"),
        "{output}"
    );
    assert_eq!(endpoint.requests("authorization_code"), 0);
    assert!(!dir.path().join("spool/oauth/gmail.json").exists());
}

#[tokio::test]
async fn a_service_account_needs_no_login_and_its_status_check_signs_in() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = TokenEndpoint::start().await;
    let (key_file, assertions) = service_account_key(
        dir.path(),
        &endpoint.url("/token"),
        "printer@example.com",
        "https://mail.google.com/",
    );
    endpoint.script().service_account = Some(assertions);
    let spool = dir.path().join("spool");
    let config = format!(
        "[spool]\ndir = \"{}\"\n{}",
        spool.display(),
        service_account_toml(&key_file)
    );
    std::fs::write(dir.path().join("sendbridge.toml"), config).unwrap();

    let (status, output) = oauth_cli(dir.path(), &["oauth", "login", "ws"])
        .finish()
        .await;
    assert!(status.success(), "{output}");
    assert!(output.contains("no sign-in is needed"), "{output}");
    let grant = "urn:ietf:params:oauth:grant-type:jwt-bearer";
    assert_eq!(endpoint.requests(grant), 0);

    let (status, output) = oauth_cli(dir.path(), &["oauth", "status", "--check"])
        .finish()
        .await;
    assert!(status.success(), "{output}");
    let row = output.lines().find(|line| line.starts_with("ws")).unwrap();
    assert!(
        row.contains("service_account") && row.contains("not needed"),
        "{output}"
    );
    assert!(row.trim_end().ends_with("ok"), "{output}");
    assert_eq!(endpoint.requests(grant), 1);
    assert!(
        !output.contains("SECRET") && !output.contains("PRIVATE KEY"),
        "{output}"
    );
}

#[tokio::test]
async fn login_for_the_gmail_api_asks_only_for_gmail_send() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = TokenEndpoint::start().await;
    write_config(dir.path(), &endpoint);
    let args = [
        "--config",
        "sendbridge.toml",
        "oauth",
        "login",
        "gmail",
        "--no-browser-listener",
    ];
    let env = [("SENDBRIDGE_ACCOUNTS__GMAIL__TRANSPORT", "gmail-api")];
    let mut cli = Cli::start(dir.path(), &args, &env);
    let params = query(&cli.line_starting(&endpoint.url("/auth?")).await);
    let send_scope = "https://www.googleapis.com/auth/gmail.send";
    assert_eq!(params["scope"], send_scope, "not https://mail.google.com/");
    let pasted = format!("?code={CODE}&state={}\n", params["state"]);
    cli.stdin.write_all(pasted.as_bytes()).await.unwrap();
    let (status, output) = cli.finish().await;
    assert!(status.success(), "{output}");
    let stored = Store::new(&dir.path().join("spool"), "gmail")
        .unwrap()
        .load()
        .unwrap()
        .unwrap();
    assert_eq!(stored.scopes, [send_scope]);
}
