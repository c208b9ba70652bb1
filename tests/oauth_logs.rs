//! What `oauth::Tokens` logs, and that no token or secret is in it. A test
//! binary of its own: tracing caches per call site whether anyone listens,
//! and a sibling test on a thread without a subscriber could make this
//! test's thread-local capture miss events.

mod common;

use std::time::Duration;

use sendbridge::access_tokens::{AccessTokens, TokenFailure};

use common::frozen_clock::FrozenClock;
use common::log_capture::LogCapture;
use common::token_endpoint::{TokenEndpoint, gmail_tokens, store_refresh_token};

const LIMIT: Duration = Duration::from_secs(20);

#[tokio::test(start_paused = true)]
async fn refreshes_and_refusals_log_no_secret() {
    let log = LogCapture::start();
    let clock = FrozenClock::new();
    let spool = tempfile::tempdir().unwrap();
    let endpoint = TokenEndpoint::start().await;
    {
        let mut script = endpoint.script();
        script.refresh_token = Some("refresh-SECRET-0".into());
        script.rotate = true;
    }
    store_refresh_token(spool.path(), "gmail", "me@example.com", "refresh-SECRET-0");
    let tokens = gmail_tokens(&endpoint.url("/token"), spool.path(), "");

    let first = clock.within(LIMIT, tokens.current()).await.unwrap();
    tokens.refused(&first);
    clock.within(LIMIT, tokens.current()).await.unwrap();
    endpoint.script().refuse_refresh = Some("invalid_grant");
    tokio::time::advance(Duration::from_secs(3600)).await;
    let failure = clock.within(LIMIT, tokens.current()).await.unwrap_err();
    assert!(matches!(failure, TokenFailure::SignInNeeded { .. }));

    let text = log.text();
    assert_eq!(log.lines_with("new access token").len(), 2, "{text}");
    assert!(!text.contains("SECRET"), "{text}");
}
