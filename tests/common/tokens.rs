//! A stand-in for the OAuth 2.0 token service: hands out the access tokens a
//! test sets (the ones the fake upstream accepts, or not), and counts how it
//! is asked.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use sendbridge::access_tokens::TokenSource;
use sendbridge::access_tokens::{AccessTokens, TokenFailure, TokenFuture};
use sendbridge::config::AccountConfig;
use sendbridge::secret::Secret;

#[derive(Default)]
struct State {
    current: Option<Result<String, TokenFailure>>,
    /// What a refresh after a refusal yields, as a token endpoint would.
    refreshed: Option<String>,
    refused: Vec<String>,
}

#[derive(Default)]
pub struct TestTokens {
    state: Mutex<State>,
    current_calls: AtomicUsize,
}

impl TestTokens {
    /// Hands out `token` until told otherwise.
    pub fn new(token: &str) -> Arc<TestTokens> {
        let tokens = Arc::new(TestTokens::default());
        tokens.set(Ok(token.to_string()));
        tokens
    }

    /// What `current` answers from now on (after `sendbridge oauth login`,
    /// a revocation, an unreachable token endpoint, …).
    pub fn set(&self, current: Result<String, TokenFailure>) {
        self.state.lock().unwrap().current = Some(current);
    }

    /// After the next refusal, `current` hands out `token`.
    pub fn refresh_to(&self, token: &str) {
        self.state.lock().unwrap().refreshed = Some(token.to_string());
    }

    pub fn current_calls(&self) -> usize {
        self.current_calls.load(Ordering::SeqCst)
    }

    /// The tokens the relay reported as refused, in order.
    pub fn refused(&self) -> Vec<String> {
        self.state.lock().unwrap().refused.clone()
    }

    /// The source the relay asks for every `auth = "oauth2"` account.
    pub fn source(self: &Arc<Self>) -> TokenSource {
        let tokens = self.clone();
        Arc::new(move |_: &str, _: &AccountConfig| Ok(tokens.clone() as Arc<dyn AccessTokens>))
    }
}

impl AccessTokens for TestTokens {
    fn current(&self) -> TokenFuture<'_> {
        self.current_calls.fetch_add(1, Ordering::SeqCst);
        let current = self.state.lock().unwrap().current.clone();
        Box::pin(async move { current.expect("the test set a token").map(Secret::new) })
    }

    fn refused(&self, token: &Secret) {
        let mut state = self.state.lock().unwrap();
        state.refused.push(token.expose().to_string());
        if let Some(fresh) = state.refreshed.take() {
            state.current = Some(Ok(fresh));
        }
    }
}
