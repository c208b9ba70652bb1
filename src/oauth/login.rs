//! `sendbridge oauth login ACCOUNT`: a person signs in once and the refresh
//! token goes to the store. Made for servers without a browser: the sign-in
//! URL can be opened on any machine; the code comes back through a loopback
//! listener (browser on this machine) or as the redirected address pasted on
//! stdin (browser elsewhere), whichever comes first. Or a device code.

use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::client::{EndpointError, Issued, TokenClient};
use super::hints::sign_in_hint;
use super::store::{Store, Stored};
use crate::config::{AccountConfig, AuthMethod, Config, OAuth2Config, OAuthFlow, OAuthProvider};
use crate::outln;
use crate::secret::Secret;
use crate::spool::State;
use crate::spool::operations::{RetryTarget, retry};
use crate::spool::unix_millis;

/// How long a browser gets to send its request to the listener.
const CALLBACK_READ_TIMEOUT: Duration = Duration::from_secs(10);

pub struct LoginOptions {
    /// Device-code flow even when the account's flow is `authorization_code`.
    pub device: bool,
    /// No loopback listener: the redirected address is pasted on stdin.
    pub no_listener: bool,
    /// The whole sign-in, from printing the URL to the code.
    pub timeout: Duration,
}

pub async fn login(config: &Config, account: &str, options: &LoginOptions) -> anyhow::Result<()> {
    let (account_config, oauth2) = oauth2_account(config, account)?;
    let client = TokenClient::new(account_config)?;
    let refused = |err: EndpointError| {
        let error = match &err {
            EndpointError::Refused { error, .. } => Some(error.as_str()),
            EndpointError::Unreachable(_) => None,
        };
        let transport = account_config.transport;
        let hint = error.map(|error| {
            sign_in_hint(
                account,
                oauth2.provider,
                oauth2.flow,
                transport,
                Some(error),
            )
        });
        anyhow::anyhow!(
            "{}{}",
            err.reason(),
            hint.map(|hint| format!("\nhint: {hint}"))
                .unwrap_or_default()
        )
    };
    if oauth2.flow == OAuthFlow::ServiceAccount {
        outln!(
            "account {account} signs in as a service account with its key ({}): no sign-in is needed; `sendbridge oauth status --check` tries it",
            oauth2
                .service_account_file
                .as_ref()
                .map_or(String::new(), |path| path.display().to_string())
        )?;
        return Ok(());
    }
    if oauth2.flow == OAuthFlow::ClientCredentials {
        client.client_credentials().await.map_err(refused)?;
        outln!(
            "app-only sign-in for account {account} works: the relay fetches its tokens with the client secret; nothing to store"
        )?;
        return Ok(());
    }
    let issued = if options.device || oauth2.flow == OAuthFlow::DeviceCode {
        device_code(&client, oauth2, options.timeout).await?
    } else {
        authorization_code(&client, account_config, options).await?
    }
    .map_err(refused)?;
    let refresh_token = issued.refresh_token.with_context(|| {
        format!(
            "the provider issued no refresh token, so the relay could not sign in later; {}",
            match oauth2.provider {
                OAuthProvider::Microsoft => "the scopes must include offline_access",
                _ => "revoke the app's access in the account's security settings and sign in again",
            }
        )
    })?;
    let store = Store::new(&config.spool.dir, account)?;
    store
        .save(&Stored {
            refresh_token: Some(refresh_token),
            username: account_config.username.clone(),
            scopes: client.endpoints().scopes.clone(),
            access_expires_at: Some(unix_millis() + issued.expires_in.as_millis() as u64),
        })
        .with_context(|| format!("writing {}", store.path().display()))?;
    outln!(
        "signed in: the refresh token for account {account} is in {}",
        store.path().display()
    )?;
    // Held mail need not wait for the relay's next hold probe.
    let spool = crate::spool::Spool::open(&config.spool.dir)?;
    let target = RetryTarget::AccountIn(account.to_string(), State::Held);
    let due = retry(&spool, target)?.due;
    if due > 0 {
        outln!(
            "{due} held message(s) due now: the running relay sends them within delivery.scan_interval"
        )?;
    }
    if oauth2.provider == OAuthProvider::Google {
        outln!(
            "note: while the app's OAuth consent screen is in \"Testing\", Google ends this sign-in after 7 days; publish the app (\"In production\") to keep it"
        )?;
    }
    Ok(())
}

fn oauth2_account<'a>(
    config: &'a Config,
    account: &str,
) -> anyhow::Result<(&'a AccountConfig, &'a OAuth2Config)> {
    let found = config.accounts.get(account).with_context(|| {
        let known: Vec<_> = config.accounts.keys().cloned().collect();
        format!(
            "no account named {account:?} (configured: {})",
            known.join(", ")
        )
    })?;
    match (&found.auth, &found.oauth2) {
        (AuthMethod::Oauth2, Some(oauth2)) => Ok((found, oauth2)),
        _ => anyhow::bail!(
            "account {account} signs in with a password: set accounts.{account}.auth = \"oauth2\" and [accounts.{account}.oauth2] first"
        ),
    }
}

/// Authorization code with PKCE (RFC 7636, S256) and a checked `state`.
async fn authorization_code(
    client: &TokenClient,
    account: &AccountConfig,
    options: &LoginOptions,
) -> anyhow::Result<Result<Issued, EndpointError>> {
    let endpoints = client.endpoints();
    let auth_url = endpoints
        .auth_url
        .as_deref()
        .context("no auth_url for this provider: set oauth2.auth_url")?;
    let verifier = Secret::new(random_text(48));
    let state = random_text(16);
    let listener = match options.no_listener {
        true => None,
        false => Some(
            TcpListener::bind("127.0.0.1:0")
                .await
                .context("binding a loopback port for the browser's redirect")?,
        ),
    };
    let redirect_uri = match &listener {
        Some(listener) => format!("http://127.0.0.1:{}/", listener.local_addr()?.port()),
        // Nothing answers there: the address bar keeps the code for pasting.
        None => "http://127.0.0.1/".to_string(),
    };
    let mut query = form_urlencoded::Serializer::new(String::new());
    query
        .append_pair("response_type", "code")
        .append_pair("client_id", client.client_id())
        .append_pair("redirect_uri", &redirect_uri)
        .append_pair("scope", &endpoints.scope())
        .append_pair("state", &state)
        .append_pair("code_challenge", &code_challenge(&verifier))
        .append_pair("code_challenge_method", "S256")
        .append_pair("login_hint", &account.username);
    if endpoints.provider == OAuthProvider::Google {
        // Without these Google issues a refresh token only on first consent.
        query
            .append_pair("access_type", "offline")
            .append_pair("prompt", "consent");
    }
    let separator = if auth_url.contains('?') { '&' } else { '?' };
    outln!(
        "Open this address in a browser, on this machine or any other, and sign in as {}:\n\n{auth_url}{separator}{}\n",
        account.username,
        query.finish()
    )?;
    match listener {
        Some(_) => outln!(
            "When the browser runs on this machine, that is all. Elsewhere it ends on an address starting with {redirect_uri} that does not load: paste that address here and press Enter."
        )?,
        None => outln!(
            "The browser ends on an address starting with {redirect_uri} that does not load: paste that address here and press Enter."
        )?,
    }
    let has_listener = listener.is_some();
    let code = tokio::select! {
        code = redirected(listener, &state) => code?,
        code = pasted(&state, has_listener) => code?,
        () = tokio::time::sleep(options.timeout) => anyhow::bail!(
            "no sign-in within {}: run the command again", humantime::format_duration(options.timeout)
        ),
    };
    Ok(client.exchange_code(&code, &verifier, &redirect_uri).await)
}

/// What a redirect back from the provider says.
enum Callback {
    Code(Secret),
    /// A code for another sign-in (or a forged one).
    WrongState,
    Refused(String),
    Nothing,
}

fn callback(query: &str, state: &str) -> Callback {
    let mut code = None;
    let mut got_state = None;
    let mut error = None;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match key.as_ref() {
            "code" => code = Some(value.into_owned()),
            "state" => got_state = Some(value.into_owned()),
            "error" | "error_description" => {
                let text = error.map_or(String::new(), |text: String| text + ": ");
                error = Some(text + &value);
            }
            _ => {}
        }
    }
    match (code, error) {
        (_, Some(error)) => Callback::Refused(error),
        (Some(_), _) if got_state.as_deref() != Some(state) => Callback::WrongState,
        (Some(code), _) => Callback::Code(Secret::new(code)),
        (None, None) => Callback::Nothing,
    }
}

/// Waits for the browser's redirect on the loopback listener. Never
/// returns without a listener. Each connection is served on its own task,
/// so an idle one (browsers pre-connect) holds nothing up.
async fn redirected(listener: Option<TcpListener>, state: &str) -> anyhow::Result<Secret> {
    let Some(listener) = listener else {
        return std::future::pending().await;
    };
    let (found, mut outcomes) = mpsc::channel(1);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted?;
                let (found, state) = (found.clone(), state.to_string());
                tokio::spawn(async move {
                    if let Some(outcome) = serve_redirect(stream, &state).await {
                        let _ = found.send(outcome).await;
                    }
                });
            }
            Some(outcome) = outcomes.recv() => return outcome,
        }
    }
}

/// Answers one request with a short page; the code or the refusal it
/// carried, if any.
async fn serve_redirect(mut stream: TcpStream, state: &str) -> Option<anyhow::Result<Secret>> {
    let query = tokio::time::timeout(CALLBACK_READ_TIMEOUT, request_query(&mut stream))
        .await
        .ok()?
        .ok()?;
    let (status, page, outcome) = match callback(&query, state) {
        Callback::Code(code) => (
            "200 OK",
            "Signed in. sendbridge has the code; you can close this tab.",
            Some(Ok(code)),
        ),
        Callback::Refused(error) => (
            "200 OK",
            "Sign-in refused; see the terminal.",
            Some(Err(anyhow::anyhow!("sign-in refused: {error}"))),
        ),
        Callback::WrongState => (
            "400 Bad Request",
            "This answer belongs to another sign-in; start again from the address in the terminal.",
            None,
        ),
        Callback::Nothing => ("404 Not Found", "Not found.", None),
    };
    let _ = answer(&mut stream, status, page).await;
    outcome
}

/// The query string of an HTTP request's target.
async fn request_query(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut buf = [0; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    let target = head.split_whitespace().nth(1).unwrap_or("");
    Ok(target
        .split_once('?')
        .map_or("", |(_, query)| query)
        .to_string())
}

async fn answer(stream: &mut TcpStream, status: &str, text: &str) -> std::io::Result<()> {
    let body = format!(
        "<!doctype html><meta charset=utf-8><title>sendbridge</title><p style=\"font-family:sans-serif\">{text}</p>"
    );
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Waits for the redirected address (or only the code) on stdin. On end of
/// input it waits for the listener, if there is one.
async fn pasted(state: &str, has_listener: bool) -> anyhow::Result<Secret> {
    let mut lines = stdin_lines();
    while let Some(line) = lines.recv().await {
        let line = line.trim();
        let query = line.split_once('?').map_or(line, |(_, query)| query);
        let query = query.split_once('#').map_or(query, |(query, _)| query);
        match callback(query, state) {
            Callback::Code(code) => return Ok(code),
            Callback::Refused(error) => anyhow::bail!("sign-in refused: {error}"),
            Callback::WrongState => outln!(
                "that address belongs to another sign-in (its state differs): paste the one from this sign-in"
            )?,
            // Just the code, copied from the address bar.
            Callback::Nothing if !line.is_empty() && !line.contains(['=', ' ', '/']) => {
                return Ok(Secret::new(line));
            }
            Callback::Nothing => {}
        }
    }
    anyhow::ensure!(has_listener, "stdin ended before an address was pasted");
    std::future::pending().await
}

/// stdin, line by line, read on a thread of its own: a blocking read on
/// tokio's pool would keep the runtime from shutting down.
fn stdin_lines() -> mpsc::Receiver<String> {
    let (sender, receiver) = mpsc::channel(4);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if sender.blocking_send(line).is_err() {
                break;
            }
        }
    });
    receiver
}

/// Device authorization (RFC 8628): a code typed on any device.
async fn device_code(
    client: &TokenClient,
    oauth2: &OAuth2Config,
    timeout: Duration,
) -> anyhow::Result<Result<Issued, EndpointError>> {
    anyhow::ensure!(
        oauth2.provider != OAuthProvider::Google,
        "Google's device flow does not allow the Gmail scope (https://mail.google.com/): use the default flow (authorization_code); it works headless too: open the printed address on any machine and paste back the address the browser ends on"
    );
    let authorization = match client.device_authorization().await {
        Ok(authorization) => authorization,
        Err(err) => return Ok(Err(err)),
    };
    outln!(
        "Open {} on any device and enter the code {}",
        authorization.verification_uri,
        authorization.user_code
    )?;
    let deadline = Instant::now() + authorization.expires_in.min(timeout);
    // At least a second between polls, whatever the endpoint says.
    let mut interval = authorization.interval.max(Duration::from_secs(1));
    loop {
        tokio::time::sleep(interval).await;
        anyhow::ensure!(
            Instant::now() < deadline,
            "the code expired before sign-in completed: run the command again"
        );
        match client.poll_device(&authorization.device_code).await {
            Err(EndpointError::Refused { error, .. }) if error == "authorization_pending" => {}
            Err(EndpointError::Refused { error, .. }) if error == "slow_down" => {
                interval += Duration::from_secs(5);
            }
            Err(EndpointError::Refused { error, .. }) if error == "expired_token" => {
                anyhow::bail!("the code expired before sign-in completed: run the command again")
            }
            Err(EndpointError::Refused { error, .. }) if error == "access_denied" => {
                anyhow::bail!("sign-in was declined on the device")
            }
            // Keep polling through a network hiccup; the deadline bounds it.
            Err(EndpointError::Unreachable(reason)) => eprintln!("{reason}; trying again"),
            outcome => return Ok(outcome),
        }
    }
}

/// URL-safe random text from `bytes` random bytes (PKCE verifier, state).
fn random_text(bytes: usize) -> String {
    let mut random = vec![0; bytes];
    rand::thread_rng().fill_bytes(&mut random);
    URL_SAFE_NO_PAD.encode(random)
}

/// S256: BASE64URL(SHA-256(verifier)).
fn code_challenge(verifier: &Secret) -> String {
    let digest =
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verifier.expose().as_bytes());
    URL_SAFE_NO_PAD.encode(digest.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_challenge_matches_rfc7636_appendix_b() {
        let verifier = Secret::new("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk");
        assert_eq!(
            code_challenge(&verifier),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn callbacks_need_the_right_state() {
        assert!(
            matches!(callback("code=abc&state=s1", "s1"), Callback::Code(code) if code.expose() == "abc")
        );
        assert!(matches!(
            callback("code=abc&state=s2", "s1"),
            Callback::WrongState
        ));
        assert!(matches!(callback("code=abc", "s1"), Callback::WrongState));
        assert!(matches!(
            callback("error=access_denied&error_description=no", "s1"),
            Callback::Refused(error) if error == "access_denied: no"
        ));
        assert!(matches!(callback("", "s1"), Callback::Nothing));
    }
}
