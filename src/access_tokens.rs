//! The seam between the OAuth 2.0 token machinery (`oauth`) and the upstream
//! sign-in (`upstream`): where an XOAUTH2 account gets its access tokens.

use std::future::Future;
use std::pin::Pin;

use std::sync::Arc;

use crate::config::AccountConfig;
use crate::secret::Secret;

/// Why no access token could be had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenFailure {
    /// For good until a person acts (`invalid_grant`: revoked, expired, or
    /// Google's 7-day limit for apps in "Testing"; or no sign-in yet). The
    /// account goes on hold; `hint` says exactly what to do.
    SignInNeeded { reason: String, hint: String },
    /// Worth retrying later (token endpoint unreachable, 5xx, timeout).
    Unavailable { reason: String },
}

pub type TokenFuture<'a> = Pin<Box<dyn Future<Output = Result<Secret, TokenFailure>> + Send + 'a>>;

/// An account's access tokens, cached and refreshed ahead of expiry;
/// concurrent callers share one refresh.
pub trait AccessTokens: Send + Sync {
    /// A token valid for a while yet.
    fn current(&self) -> TokenFuture<'_>;
    /// The upstream refused `token`: the next `current` refreshes instead
    /// of returning it again.
    fn refused(&self, token: &Secret);
    /// The scopes the current token was granted (space-separated), when
    /// the token endpoint said.
    fn granted_scope(&self) -> Option<String> {
        None
    }
}

/// Makes the access-token source of an `auth = "oauth2"` account from its
/// name and settings. The composition root passes
/// `oauth::token_service`; tests pass a stand-in.
pub type TokenSource =
    Arc<dyn Fn(&str, &AccountConfig) -> anyhow::Result<Arc<dyn AccessTokens>> + Send + Sync>;
