//! OAuth 2.0 for XOAUTH2 accounts: the token side. `Tokens` hands out access
//! tokens (the `AccessTokens` trait the upstream sign-in uses); `login` and
//! `status` are the `sendbridge oauth` commands that obtain and show the
//! stored refresh tokens.
//!
//! ```ignore
//! let tokens: Arc<dyn AccessTokens> = oauth::Tokens::new("gmail", &account, &config.spool.dir)?;
//! let token = tokens.current().await?;
//! ```

mod client;
mod endpoints;
mod hints;
mod login;
mod service_account;
mod status;
mod store;
mod tokens;

pub use login::{LoginOptions, login};
pub use status::status;
pub use store::{Store, Stored};
pub use tokens::Tokens;

use std::sync::Arc;

use crate::access_tokens::{AccessTokens, TokenSource};

/// The relay's token source: [`Tokens`], keeping refresh tokens under the
/// spool directory.
pub fn token_service(spool_dir: &std::path::Path) -> TokenSource {
    let spool_dir = spool_dir.to_path_buf();
    Arc::new(move |name, account| {
        let tokens: Arc<dyn AccessTokens> = Tokens::new(name, account, &spool_dir)?;
        Ok(tokens)
    })
}
