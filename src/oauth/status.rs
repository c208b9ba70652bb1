//! `sendbridge oauth status [--check]`: each OAuth 2.0 account's flow and
//! token store, and with `--check` whether a token can be had right now.
//! Never prints a token.

use crate::access_tokens::{AccessTokens, TokenFailure};
use crate::config::{AuthMethod, Config, OAuthFlow};
use crate::terminal::{format_time, table};
use crate::{out, outln};

use super::endpoints::Endpoints;
use super::store::Store;
use super::tokens::Tokens;

pub async fn status(config: &Config, check: bool) -> anyhow::Result<()> {
    let accounts: Vec<_> = config
        .accounts
        .iter()
        .filter(|(_, account)| account.auth == AuthMethod::Oauth2)
        .filter_map(|(name, account)| Some((name, account, account.oauth2.as_ref()?)))
        .collect();
    if accounts.is_empty() {
        outln!("no account signs in with OAuth 2.0 (auth = \"oauth2\")")?;
        return Ok(());
    }
    let mut rows = Vec::new();
    let mut failed = 0;
    for (name, account, oauth2) in accounts {
        let store = Store::new(&config.spool.dir, name)?;
        let stored = store.load()?;
        let app_only = matches!(
            oauth2.flow,
            OAuthFlow::ClientCredentials | OAuthFlow::ServiceAccount
        );
        let yes_no = |yes: bool| if yes { "yes" } else { "no" }.to_string();
        let (file, refresh_token) = match (&stored, app_only) {
            (_, true) => ("not needed".to_string(), "not needed".to_string()),
            (None, false) => (
                format!("{} (missing)", store.path().display()),
                yes_no(false),
            ),
            (Some(stored), false) => (
                store.path().display().to_string(),
                yes_no(stored.refresh_token.is_some()),
            ),
        };
        let expires = stored
            .as_ref()
            .and_then(|stored| stored.access_expires_at)
            .map_or("-".to_string(), format_time);
        let (checked, hint) = match check {
            false => ("-".to_string(), None),
            true => match Tokens::new(name, account, &config.spool.dir)?
                .current()
                .await
            {
                Ok(_) => ("ok".to_string(), None),
                Err(TokenFailure::SignInNeeded { reason, hint }) => (
                    format!("sign-in needed: {reason}"),
                    Some(format!("hint: {hint}")),
                ),
                Err(TokenFailure::Unavailable { reason }) => {
                    (format!("unavailable: {reason}"), None)
                }
            },
        };
        failed += usize::from(checked != "ok" && check);
        let flow = match oauth2.flow {
            OAuthFlow::AuthorizationCode => "authorization_code",
            OAuthFlow::DeviceCode => "device_code",
            OAuthFlow::ClientCredentials => "client_credentials",
            OAuthFlow::ServiceAccount => "service_account",
        };
        rows.push((
            [
                name.clone(),
                flow.to_string(),
                Endpoints::resolve(account).scope(),
                file,
                refresh_token,
                expires,
                checked,
            ],
            hint,
        ));
    }
    out!(
        "{}",
        table(
            [
                "ACCOUNT",
                "FLOW",
                "SCOPES",
                "TOKEN STORE",
                "REFRESH TOKEN",
                "LAST ACCESS TOKEN EXPIRES",
                "CHECK"
            ],
            &rows
        )
    )?;
    anyhow::ensure!(
        failed == 0,
        "{failed} account(s) could not get an access token"
    );
    Ok(())
}
