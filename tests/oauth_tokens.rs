//! `oauth::Tokens` against a local token endpoint over real HTTP: refresh
//! ahead of expiry on tokio's frozen clock, one refresh for concurrent
//! callers and for a refused token, rotation, and what a refusal says.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sendbridge::access_tokens::{AccessTokens, TokenFailure};
use sendbridge::oauth::{Store, Tokens};
use sendbridge::secret::Secret;

use common::frozen_clock::FrozenClock;
use common::token_endpoint::{
    SERVICE_ACCOUNT_CLIENT_ID, TokenEndpoint, gmail_tokens, service_account_key,
    service_account_toml, store_refresh_token,
};

const LIMIT: Duration = Duration::from_secs(20);

/// An oauth2 account `gmail` whose token endpoint is `endpoint`.
fn tokens(endpoint: &TokenEndpoint, spool: &Path, extra: &str) -> Arc<Tokens> {
    gmail_tokens(&endpoint.url("/token"), spool, extra)
}

/// A signed-in account: the endpoint accepts the stored refresh token.
async fn signed_in(spool: &Path) -> (TokenEndpoint, Arc<Tokens>) {
    let endpoint = TokenEndpoint::start().await;
    endpoint.script().refresh_token = Some("refresh-SECRET-0".into());
    store_refresh_token(spool, "gmail", "me@example.com", "refresh-SECRET-0");
    let tokens = tokens(&endpoint, spool, "");
    (endpoint, tokens)
}

async fn current(clock: &FrozenClock, tokens: &Tokens) -> Result<Secret, TokenFailure> {
    clock.within(LIMIT, tokens.current()).await
}

#[tokio::test(start_paused = true)]
async fn refreshes_ahead_of_expiry() {
    let clock = FrozenClock::new();
    let spool = tempfile::tempdir().unwrap();
    let (endpoint, tokens) = signed_in(spool.path()).await;
    let first = current(&clock, &tokens).await.unwrap();
    assert_eq!(first.expose(), "access-SECRET-1");
    // An hour's token is refreshed when less than 5 minutes are left.
    tokio::time::advance(Duration::from_secs(3600 - 310)).await;
    assert_eq!(current(&clock, &tokens).await.unwrap(), first);
    assert_eq!(endpoint.requests("refresh_token"), 1);
    tokio::time::advance(Duration::from_secs(20)).await;
    assert_eq!(
        current(&clock, &tokens).await.unwrap().expose(),
        "access-SECRET-2"
    );
    assert_eq!(endpoint.requests("refresh_token"), 2);
    let stored = Store::new(spool.path(), "gmail")
        .unwrap()
        .load()
        .unwrap()
        .unwrap();
    assert!(stored.access_expires_at.is_some());
}

#[tokio::test(start_paused = true)]
async fn short_lived_tokens_are_refreshed_at_a_tenth_of_their_lifetime() {
    let clock = FrozenClock::new();
    let spool = tempfile::tempdir().unwrap();
    let (endpoint, tokens) = signed_in(spool.path()).await;
    endpoint.script().expires_in = 100;
    current(&clock, &tokens).await.unwrap();
    tokio::time::advance(Duration::from_secs(89)).await;
    current(&clock, &tokens).await.unwrap();
    assert_eq!(endpoint.requests("refresh_token"), 1);
    tokio::time::advance(Duration::from_secs(2)).await;
    current(&clock, &tokens).await.unwrap();
    assert_eq!(endpoint.requests("refresh_token"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_share_one_refresh() {
    let spool = tempfile::tempdir().unwrap();
    let (endpoint, tokens) = signed_in(spool.path()).await;
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let tokens = tokens.clone();
        callers.spawn(async move { tokens.current().await.unwrap() });
    }
    let issued = callers.join_all().await;
    assert!(
        issued
            .iter()
            .all(|token| token.expose() == "access-SECRET-1")
    );
    assert_eq!(endpoint.requests("refresh_token"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_refused_token_is_refreshed_once() {
    let clock = FrozenClock::new();
    let spool = tempfile::tempdir().unwrap();
    let (endpoint, tokens) = signed_in(spool.path()).await;
    let first = current(&clock, &tokens).await.unwrap();
    tokens.refused(&first);
    tokens.refused(&first);
    let second = current(&clock, &tokens).await.unwrap();
    assert_ne!(second, first);
    assert_eq!(current(&clock, &tokens).await.unwrap(), second);
    // A late report about the old token does not throw away the new one.
    tokens.refused(&first);
    assert_eq!(current(&clock, &tokens).await.unwrap(), second);
    assert_eq!(endpoint.requests("refresh_token"), 2);
}

#[tokio::test(start_paused = true)]
async fn a_rotated_refresh_token_is_stored_and_used() {
    let clock = FrozenClock::new();
    let spool = tempfile::tempdir().unwrap();
    let (endpoint, tokens) = signed_in(spool.path()).await;
    endpoint.script().rotate = true;
    let first = current(&clock, &tokens).await.unwrap();
    let store = Store::new(spool.path(), "gmail").unwrap();
    let stored = store.load().unwrap().unwrap();
    assert_eq!(stored.refresh_token.unwrap().expose(), "refresh-SECRET-1");
    assert_eq!(stored.username, "me@example.com");
    // The endpoint now accepts only the rotated token.
    tokens.refused(&first);
    current(&clock, &tokens).await.unwrap();
    assert_eq!(
        endpoint.last_form("refresh_token")["refresh_token"],
        "refresh-SECRET-1"
    );
}

#[tokio::test(start_paused = true)]
async fn invalid_grant_needs_a_sign_in_and_says_how() {
    let clock = FrozenClock::new();
    let spool = tempfile::tempdir().unwrap();
    let (endpoint, tokens) = signed_in(spool.path()).await;
    endpoint.script().refuse_refresh = Some("invalid_grant");
    let Err(TokenFailure::SignInNeeded { reason, hint }) = current(&clock, &tokens).await else {
        panic!("expected SignInNeeded");
    };
    assert_eq!(reason, "invalid_grant: Token has been expired or revoked.");
    assert!(hint.contains("sendbridge oauth login gmail"), "{hint}");
    assert!(
        hint.contains("7 days") && hint.contains("In production"),
        "{hint}"
    );
    assert!(!format!("{reason} {hint}").contains("SECRET"));
}

#[tokio::test(start_paused = true)]
async fn without_a_sign_in_the_hint_says_to_log_in() {
    let clock = FrozenClock::new();
    let spool = tempfile::tempdir().unwrap();
    let endpoint = TokenEndpoint::start().await;
    let tokens = tokens(&endpoint, spool.path(), "");
    let Err(TokenFailure::SignInNeeded { hint, .. }) = current(&clock, &tokens).await else {
        panic!("expected SignInNeeded");
    };
    assert!(hint.contains("sendbridge oauth login gmail"), "{hint}");
    assert_eq!(endpoint.requests("refresh_token"), 0);
}

#[tokio::test]
async fn an_unreachable_endpoint_is_worth_retrying() {
    let spool = tempfile::tempdir().unwrap();
    let (_endpoint, _) = signed_in(spool.path()).await;
    // A port nobody listens on any more.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let tokens = gmail_tokens(&format!("http://{addr}/token"), spool.path(), "");
    let failure = tokens.current().await.unwrap_err();
    assert!(
        matches!(failure, TokenFailure::Unavailable { .. }),
        "{failure:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn client_credentials_need_no_store() {
    let clock = FrozenClock::new();
    let spool = tempfile::tempdir().unwrap();
    let endpoint = TokenEndpoint::start().await;
    let tokens = tokens(&endpoint, spool.path(), r#"flow = "client_credentials""#);
    assert_eq!(
        current(&clock, &tokens).await.unwrap().expose(),
        "access-SECRET-1"
    );
    assert_eq!(endpoint.requests("client_credentials"), 1);
    assert_eq!(
        endpoint.last_form("client_credentials")["scope"],
        "https://mail.google.com/"
    );
    assert!(!spool.path().join("oauth").exists());
}

/// A service account account `ws` acting as the mailbox printer@example.com
/// (its key's token_uri is `endpoint`), domain-wide delegation granting it
/// `delegated`.
fn service_account(endpoint: &TokenEndpoint, dir: &Path, delegated: &str) -> Arc<Tokens> {
    let (key_file, assertions) = service_account_key(
        dir,
        &endpoint.url("/token"),
        "printer@example.com",
        delegated,
    );
    endpoint.script().service_account = Some(assertions);
    let config = sendbridge::config::Config::from_toml(&service_account_toml(&key_file)).unwrap();
    Tokens::new("ws", &config.accounts["ws"], &dir.join("spool")).unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_service_account_signs_an_assertion_for_each_token_and_stores_nothing() {
    let clock = FrozenClock::new();
    let dir = tempfile::tempdir().unwrap();
    let endpoint = TokenEndpoint::start().await;
    let tokens = service_account(&endpoint, dir.path(), "https://mail.google.com/");
    // The fake verified the signature and every claim before issuing.
    let first = current(&clock, &tokens).await.unwrap();
    assert_eq!(first.expose(), "access-SECRET-1");
    assert_eq!(current(&clock, &tokens).await.unwrap(), first, "cached");
    let form = endpoint.last_form("urn:ietf:params:oauth:grant-type:jwt-bearer");
    assert_eq!(
        form.keys().collect::<Vec<_>>(),
        ["assertion", "grant_type"],
        "the assertion is the only credential"
    );
    // No refresh token: a refused or expiring token gets a new assertion.
    tokens.refused(&first);
    assert_eq!(
        current(&clock, &tokens).await.unwrap().expose(),
        "access-SECRET-2"
    );
    tokio::time::advance(Duration::from_secs(3600)).await;
    current(&clock, &tokens).await.unwrap();
    assert_eq!(
        endpoint.requests("urn:ietf:params:oauth:grant-type:jwt-bearer"),
        3
    );
    assert!(!dir.path().join("spool").exists(), "nothing to store");
}

#[tokio::test(start_paused = true)]
async fn a_service_account_without_delegation_for_the_scope_is_held_with_the_admin_steps() {
    let clock = FrozenClock::new();
    let dir = tempfile::tempdir().unwrap();
    let endpoint = TokenEndpoint::start().await;
    let tokens = service_account(
        &endpoint,
        dir.path(),
        "https://www.googleapis.com/auth/calendar",
    );
    let Err(TokenFailure::SignInNeeded { reason, hint }) = current(&clock, &tokens).await else {
        panic!("expected SignInNeeded");
    };
    assert!(
        reason.starts_with("unauthorized_client: Client is unauthorized"),
        "{reason}"
    );
    assert!(hint.contains("Manage Domain Wide Delegation"), "{hint}");
    assert!(
        hint.contains(&format!(
            "client ID {SERVICE_ACCOUNT_CLIENT_ID} must be listed with the scope https://mail.google.com/"
        )),
        "{hint}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_service_account_key_for_another_mailbox_is_refused_with_google_s_words() {
    let clock = FrozenClock::new();
    let dir = tempfile::tempdir().unwrap();
    let endpoint = TokenEndpoint::start().await;
    let tokens = service_account(&endpoint, dir.path(), "https://mail.google.com/");
    endpoint.script().service_account.as_mut().unwrap().subject = "someone-else@example.com".into();
    let Err(TokenFailure::SignInNeeded { reason, hint }) = current(&clock, &tokens).await else {
        panic!("expected SignInNeeded");
    };
    assert_eq!(reason, "invalid_grant: Invalid email or User ID");
    assert!(
        hint.contains("accounts.ws.username is not a user"),
        "{hint}"
    );
}
