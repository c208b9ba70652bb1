//! `Tokens`: an account's access tokens for XOAUTH2, cached in memory and
//! refreshed ahead of expiry; the upstream side reaches it through the
//! `AccessTokens` trait.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::time::Instant;

use super::client::{EndpointError, Issued, TokenClient};
use super::hints::{service_account_hint, sign_in_hint};
use super::service_account::{Claims, assertion};
use super::store::{Store, Stored};
use crate::access_tokens::{AccessTokens, TokenFailure, TokenFuture};
use crate::config::{AccountConfig, OAuth2Config, OAuthFlow, TransportKind};
use crate::secret::Secret;
use crate::spool::unix_millis;

/// Refresh when less than this is left (or a tenth of the token's lifetime,
/// for short-lived tokens).
const REFRESH_AHEAD: Duration = Duration::from_secs(300);

/// Plug into the upstream side as `Arc<dyn AccessTokens>`. The store is
/// read at each refresh, so an `oauth login` while the relay runs takes
/// effect at the next `current` without a restart. `SignInNeeded` means
/// hold the account; `Unavailable` means retry later.
pub struct Tokens {
    account: String,
    /// The mailbox (`username`): a service account's subject.
    mailbox: String,
    config: OAuth2Config,
    transport: TransportKind,
    client: TokenClient,
    store: Store,
    cached: Mutex<Option<Cached>>,
    /// Held during a refresh, so concurrent callers wait for it instead of
    /// starting their own.
    refreshing: tokio::sync::Mutex<()>,
}

struct Cached {
    token: Secret,
    scope: Option<String>,
    obtained: Instant,
    expires: Instant,
}

impl Cached {
    fn is_fresh(&self, now: Instant) -> bool {
        let ahead = REFRESH_AHEAD.min((self.expires - self.obtained) / 10);
        now + ahead < self.expires
    }
}

impl Tokens {
    /// The tokens of `account` (an `auth = "oauth2"` account), its refresh
    /// token kept under `spool_dir`. Nothing is fetched yet.
    pub fn new(
        account: &str,
        config: &AccountConfig,
        spool_dir: &Path,
    ) -> anyhow::Result<Arc<Tokens>> {
        let oauth2 = config
            .oauth2
            .clone()
            .with_context(|| format!("account {account} has no [accounts.{account}.oauth2]"))?;
        Ok(Arc::new(Tokens {
            account: account.to_string(),
            mailbox: config.username.clone(),
            client: TokenClient::new(config)?,
            config: oauth2,
            transport: config.transport,
            store: Store::new(spool_dir, account)?,
            cached: Mutex::new(None),
            refreshing: tokio::sync::Mutex::new(()),
        }))
    }

    fn fresh(&self) -> Option<Secret> {
        let cached = self.cached.lock().unwrap();
        let cached = cached.as_ref()?;
        cached
            .is_fresh(Instant::now())
            .then(|| cached.token.clone())
    }

    /// A cached token that has not expired yet, refreshed ahead or not.
    fn unexpired(&self) -> Option<Secret> {
        let cached = self.cached.lock().unwrap();
        let cached = cached.as_ref()?;
        (Instant::now() < cached.expires).then(|| cached.token.clone())
    }

    async fn obtain(&self) -> Result<Secret, TokenFailure> {
        if let Some(token) = self.fresh() {
            return Ok(token);
        }
        let _refreshing = self.refreshing.lock().await;
        // Whoever held the lock before us may have refreshed already.
        if let Some(token) = self.fresh() {
            return Ok(token);
        }
        let obtained = Instant::now();
        match self.fetch().await {
            Ok(issued) => {
                tracing::info!(
                    account = %self.account,
                    expires_in = issued.expires_in.as_secs(),
                    "oauth: new access token"
                );
                let token = issued.access_token.clone();
                *self.cached.lock().unwrap() = Some(Cached {
                    token: issued.access_token,
                    scope: issued.scope,
                    obtained,
                    expires: obtained + issued.expires_in,
                });
                Ok(token)
            }
            Err(TokenFailure::Unavailable { reason }) => match self.unexpired() {
                Some(token) => {
                    tracing::warn!(account = %self.account, %reason, "oauth: refresh failed; the current access token is still valid");
                    Ok(token)
                }
                None => Err(TokenFailure::Unavailable { reason }),
            },
            Err(failure) => Err(failure),
        }
    }

    /// A new access token from the endpoint; a rotated refresh token is
    /// stored before it is used.
    async fn fetch(&self) -> Result<Issued, TokenFailure> {
        match self.config.flow {
            OAuthFlow::ClientCredentials => {
                return self
                    .client
                    .client_credentials()
                    .await
                    .map_err(|err| self.failure(err));
            }
            OAuthFlow::ServiceAccount => return self.service_account_token().await,
            OAuthFlow::AuthorizationCode | OAuthFlow::DeviceCode => {}
        }
        let stored = match self.store.load() {
            Ok(stored) => stored.unwrap_or_default(),
            // A damaged file takes a new sign-in, which rewrites it.
            Err(err) if err.kind() == std::io::ErrorKind::InvalidData => {
                return Err(TokenFailure::SignInNeeded {
                    reason: err.to_string(),
                    hint: self.hint(None),
                });
            }
            Err(err) => {
                return Err(TokenFailure::Unavailable {
                    reason: format!("reading {}: {err}", self.store.path().display()),
                });
            }
        };
        let Some(refresh_token) = stored.refresh_token.clone() else {
            return Err(TokenFailure::SignInNeeded {
                reason: format!("no refresh token in {}", self.store.path().display()),
                hint: self.hint(None),
            });
        };
        let issued = self
            .client
            .refresh(&refresh_token)
            .await
            .map_err(|err| self.failure(err))?;
        let updated = Stored {
            refresh_token: issued.refresh_token.clone().or(Some(refresh_token)),
            access_expires_at: Some(unix_millis() + issued.expires_in.as_millis() as u64),
            ..stored
        };
        let store = self.store.clone();
        let saved = tokio::task::spawn_blocking(move || store.save(&updated)).await;
        if let Err(err) = saved.map_err(std::io::Error::other).and_then(|saved| saved) {
            tracing::error!(account = %self.account, path = %self.store.path().display(), error = %err, "oauth: could not update the token store");
        }
        Ok(issued)
    }

    /// A token for a new assertion as the mailbox.
    async fn service_account_token(&self) -> Result<Issued, TokenFailure> {
        let key = self
            .config
            .service_account
            .as_ref()
            .expect("validation reads the service account's key");
        let endpoints = self.client.endpoints();
        let claims = Claims {
            subject: &self.mailbox,
            scope: &endpoints.scope(),
            audience: &endpoints.token_url,
            issued_at: unix_millis() / 1000,
        };
        let assertion = assertion(key, &claims).map_err(|reason| TokenFailure::SignInNeeded {
            reason,
            hint: self.hint(None),
        })?;
        self.client
            .jwt_bearer(&assertion)
            .await
            .map_err(|err| self.failure(err))
    }

    fn failure(&self, err: EndpointError) -> TokenFailure {
        match err {
            EndpointError::Unreachable(reason) => TokenFailure::Unavailable { reason },
            EndpointError::Refused { ref error, .. } => TokenFailure::SignInNeeded {
                hint: self.hint(Some(error)),
                reason: err.reason(),
            },
        }
    }

    fn hint(&self, error: Option<&str>) -> String {
        if self.config.flow == OAuthFlow::ServiceAccount {
            return service_account_hint(
                &self.account,
                &self.config.client_id,
                &self.client.endpoints().scope(),
                error,
            );
        }
        let OAuth2Config { provider, flow, .. } = self.config;
        sign_in_hint(&self.account, provider, flow, self.transport, error)
    }
}

impl AccessTokens for Tokens {
    fn current(&self) -> TokenFuture<'_> {
        Box::pin(self.obtain())
    }

    fn granted_scope(&self) -> Option<String> {
        let cached = self.cached.lock().unwrap();
        cached.as_ref()?.scope.clone()
    }

    fn refused(&self, token: &Secret) {
        let mut cached = self.cached.lock().unwrap();
        // Only the token refused: an older one reported late must not throw
        // away a new token (and cause refresh after refresh).
        if cached.as_ref().is_some_and(|cached| &cached.token == token) {
            *cached = None;
        }
    }
}
