//! `auth = "oauth2"` on the wire: AUTH XOAUTH2 against the fake upstream,
//! a refused token refreshed and retried once, holds when a person must
//! sign in again, and no token in any log line. The token service is a
//! stand-in (`common::tokens`).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::fake_upstream::{FakeUpstream, FakeUpstreamOptions, Script, UpstreamTls};
use common::log_capture::LogCapture;
use common::relay::{LOCAL_USER, Relay, UPSTREAM_PASSWORD, UPSTREAM_USER, oauth_config_for};
use common::smtp::Reply;
use common::tokens::TestTokens;
use sendbridge::access_tokens::TokenFailure;
use sendbridge::spool::{Spool, State};

const WAIT: Duration = Duration::from_secs(20);
const TOKEN: &str = "ya29.first-access-token";
const FRESH_TOKEN: &str = "ya29.fresh-access-token";
/// An EHLO reply like Gmail's, without XOAUTH2.
const EHLO_WITHOUT_XOAUTH2: &str = "250-smtp.fake.test at your service\r\n250-SIZE 35882577\r\n250-AUTH LOGIN PLAIN\r\n250 ENHANCEDSTATUSCODES";

async fn upstream_accepting(token: &str, script: Script) -> FakeUpstream {
    let mut options =
        FakeUpstreamOptions::new(UpstreamTls::StartTls, UPSTREAM_USER, UPSTREAM_PASSWORD);
    options.script = script;
    let upstream = FakeUpstream::start(options).await;
    upstream.set_access_token(token);
    upstream
}

/// Retries and hold probes an hour apart: nothing happens behind a test's
/// back.
async fn relay(upstream: &FakeUpstream, tokens: &Arc<TestTokens>) -> Relay {
    relay_with(upstream, tokens, "[delivery]\nretry_initial = \"1h\"").await
}

async fn relay_with(upstream: &FakeUpstream, tokens: &Arc<TestTokens>, extra: &str) -> Relay {
    Relay::start_with(oauth_config_for(upstream, extra), Some(tokens.source())).await
}

async fn send_one(relay: &Relay) -> Reply {
    let mut client = relay.signed_in_client().await;
    client
        .send_mail(
            "billing@legacy.example",
            &["customer@example.com"],
            "Subject: invoice\r\n\r\nInvoice.\r\n",
        )
        .await
}

fn count(spool: &Path, state: State) -> usize {
    Spool::open(spool).unwrap().list(state).unwrap().len()
}

/// Neither a token nor an XOAUTH2 initial response carrying one was logged.
fn assert_no_token_logged(log: &LogCapture, tokens: &[&str]) {
    let text = log.text();
    for token in tokens {
        let initial = BASE64.encode(format!(
            "user={UPSTREAM_USER}\x01auth=Bearer {token}\x01\x01"
        ));
        assert!(!text.contains(token), "{token} logged: {text}");
        assert!(!text.contains(&initial), "XOAUTH2 response logged: {text}");
    }
}

#[tokio::test]
async fn a_fresh_token_signs_in_with_xoauth2_and_delivers() {
    let log = LogCapture::start();
    let upstream = upstream_accepting(TOKEN, Script::default()).await;
    let tokens = TestTokens::new(TOKEN);
    let relay = relay(&upstream, &tokens).await;

    assert_eq!(send_one(&relay).await.code, 250);

    let received = upstream.wait_for_messages(1, WAIT).await;
    assert_eq!(received[0].auth_user, UPSTREAM_USER);
    assert_eq!(upstream.xoauth2_attempts(), 1);
    assert_eq!(upstream.auth_attempts(), 0, "no password sign-in");
    assert!(tokens.refused().is_empty());
    assert_no_token_logged(&log, &[TOKEN]);
}

#[tokio::test]
async fn a_refused_token_is_refreshed_once_and_the_retry_delivers() {
    let log = LogCapture::start();
    let upstream = upstream_accepting(FRESH_TOKEN, Script::default()).await;
    let tokens = TestTokens::new(TOKEN);
    tokens.refresh_to(FRESH_TOKEN);
    let relay = relay(&upstream, &tokens).await;

    assert_eq!(send_one(&relay).await.code, 250);

    upstream.wait_for_messages(1, WAIT).await;
    assert_eq!(tokens.refused(), [TOKEN], "one refusal reported");
    assert_eq!(tokens.current_calls(), 2, "one refresh");
    assert_eq!(upstream.xoauth2_attempts(), 2);
    assert_eq!(count(&relay.spool, State::Held), 0);
    assert_no_token_logged(&log, &[TOKEN, FRESH_TOKEN]);
}

#[tokio::test]
async fn gmails_error_challenge_is_answered_with_an_empty_line_and_its_status_logged() {
    let log = LogCapture::start();
    let upstream = upstream_accepting("a-token-nobody-has", Script::default()).await;
    let tokens = TestTokens::new(TOKEN);
    tokens.refresh_to(FRESH_TOKEN);
    let relay = relay(&upstream, &tokens).await;

    assert_eq!(send_one(&relay).await.code, 250, "kept, not bounced");

    assert_eq!(count(&relay.spool, State::Held), 1);
    assert_eq!(upstream.xoauth2_challenge_answers(), ["", ""]);
    assert_eq!(tokens.refused(), [TOKEN, FRESH_TOKEN]);
    let refusals = log.lines_with("refused the OAuth 2.0 access token");
    assert_eq!(refusals.len(), 2, "{}", log.text());
    assert_eq!(refusals[0]["account"], "gmail");
    assert_eq!(refusals[0]["oauth_status"], "400");
    assert_eq!(refusals[0]["oauth_scope"], "https://mail.google.com/");
    let hold = log.lines_with("account on hold");
    assert_eq!(hold.len(), 1, "{}", log.text());
    assert!(
        hold[0]["upstream_reply"]
            .as_str()
            .unwrap()
            .starts_with("535 5.7.8 Username and Password not accepted"),
        "{hold:?}"
    );
    let hint = hold[0]["hint"].as_str().unwrap();
    assert!(
        hint.contains("refreshed OAuth 2.0 access token") && !hint.contains("app password"),
        "{hint}"
    );
    assert_no_token_logged(&log, &[TOKEN, FRESH_TOKEN]);
}

#[tokio::test]
async fn microsofts_direct_refusal_is_retried_once_then_held() {
    let upstream = upstream_accepting(
        TOKEN,
        Script {
            auth: Some("535 5.7.3 Authentication unsuccessful [AM0PR01CA0001.eurprd01.prod.exchangelabs.com]".into()),
            ..Script::default()
        },
    )
    .await;
    let tokens = TestTokens::new(TOKEN);
    let relay = relay(&upstream, &tokens).await;

    assert_eq!(send_one(&relay).await.code, 250);

    assert_eq!(count(&relay.spool, State::Held), 1);
    assert_eq!(tokens.refused(), [TOKEN, TOKEN]);
    assert!(upstream.xoauth2_challenge_answers().is_empty());
}

#[tokio::test]
async fn a_needed_sign_in_holds_mail_until_a_new_login_then_it_goes_out() {
    let log = LogCapture::start();
    let upstream = upstream_accepting(FRESH_TOKEN, Script::default()).await;
    let tokens = TestTokens::new(TOKEN);
    let hint = "run `sendbridge oauth login gmail` and sign in as me@gmail.com";
    tokens.set(Err(TokenFailure::SignInNeeded {
        reason: "invalid_grant: Token has been expired or revoked.".into(),
        hint: hint.into(),
    }));
    // The hold is probed every 100-200 ms, so the new sign-in is noticed soon.
    let fast_probes = "[delivery]\nretry_initial = \"100ms\"\nretry_max = \"200ms\"";
    let relay = relay_with(&upstream, &tokens, fast_probes).await;

    assert_eq!(send_one(&relay).await.code, 250);

    assert_eq!(count(&relay.spool, State::Held), 1);
    assert_eq!(upstream.connections(), 0, "no token, no connection");
    let hold = log.lines_with("account on hold");
    assert_eq!(hold.len(), 1, "{}", log.text());
    assert_eq!(hold[0]["hint"], hint);
    assert_eq!(
        hold[0]["upstream_reply"],
        "535 5.7.8 OAuth 2.0 sign-in needed: invalid_grant: Token has been expired or revoked."
    );

    // `sendbridge oauth login`: the token service has a token again, and
    // the hold prober's next sign-in finds it.
    tokens.set(Ok(FRESH_TOKEN.to_string()));
    upstream.wait_for_messages(1, WAIT).await;
    assert!(tokens.refused().is_empty());
    assert_no_token_logged(&log, &[TOKEN, FRESH_TOKEN]);
}

#[tokio::test]
async fn a_reload_releases_the_hold_only_when_the_oauth_settings_changed() {
    let upstream = upstream_accepting(FRESH_TOKEN, Script::default()).await;
    let tokens = TestTokens::new(TOKEN);
    tokens.set(Err(TokenFailure::SignInNeeded {
        reason: "invalid_grant".into(),
        hint: "sign in again".into(),
    }));
    let relay = relay(&upstream, &tokens).await;
    assert_eq!(send_one(&relay).await.code, 250);
    assert_eq!(count(&relay.spool, State::Held), 1);
    tokens.set(Ok(FRESH_TOKEN.to_string()));

    let unchanged = oauth_config_for(&upstream, "");
    relay.reload(unchanged).await.unwrap();
    assert_eq!(count(&relay.spool, State::Held), 1, "still on hold");

    let mut changed = oauth_config_for(&upstream, "");
    let account = changed.accounts.get_mut("gmail").unwrap();
    account.oauth2.as_mut().unwrap().client_id = "another-client".into();
    relay.reload(changed).await.unwrap();
    upstream.wait_for_messages(1, WAIT).await;
}

#[tokio::test]
async fn an_unreachable_token_service_defers_the_message() {
    let log = LogCapture::start();
    let upstream = upstream_accepting(TOKEN, Script::default()).await;
    let tokens = TestTokens::new(TOKEN);
    tokens.set(Err(TokenFailure::Unavailable {
        reason: "token endpoint unreachable".into(),
    }));
    let relay = relay(&upstream, &tokens).await;

    assert_eq!(send_one(&relay).await.code, 250);

    assert_eq!(count(&relay.spool, State::Deferred), 1);
    let deferred = log.lines_with("message deferred");
    assert_eq!(
        deferred[0]["last_reply"],
        "no OAuth 2.0 access token: token endpoint unreachable"
    );
}

#[tokio::test]
async fn a_server_without_xoauth2_defers_with_a_clear_reason() {
    let log = LogCapture::start();
    let upstream = upstream_accepting(
        TOKEN,
        Script {
            ehlo: Some(EHLO_WITHOUT_XOAUTH2.into()),
            ..Script::default()
        },
    )
    .await;
    let tokens = TestTokens::new(TOKEN);
    let relay = relay(&upstream, &tokens).await;

    assert_eq!(send_one(&relay).await.code, 250);

    assert_eq!(count(&relay.spool, State::Deferred), 1);
    assert_eq!(upstream.xoauth2_attempts(), 0);
    let deferred = log.lines_with("message deferred");
    let reason = deferred[0]["last_reply"].as_str().unwrap();
    assert!(reason.contains("does not offer AUTH XOAUTH2"), "{reason}");
}

#[tokio::test]
async fn a_wrong_local_password_never_asks_for_a_token() {
    let upstream = upstream_accepting(TOKEN, Script::default()).await;
    let tokens = TestTokens::new(TOKEN);
    let relay = relay(&upstream, &tokens).await;
    let mut client = relay.greeted_client().await;

    let reply = client.login_plain(LOCAL_USER, "not-the-password").await;

    assert_eq!(reply.code, 535);
    assert_eq!(tokens.current_calls(), 0);
    assert_eq!(upstream.connections(), 0);
}
