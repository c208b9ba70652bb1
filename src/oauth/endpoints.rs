//! Where each provider's OAuth 2.0 endpoints are and which scopes mail
//! sending needs, through the account's transport (SMTP, Graph, the Gmail
//! API). The `*_url` and `scopes` overrides always win.

use crate::config::{AccountConfig, OAuthFlow, OAuthProvider, TransportKind};

const GOOGLE_AUTH: &str = "https://accounts.google.com/o/oauth2/v2/auth";
const GOOGLE_TOKEN: &str = "https://oauth2.googleapis.com/token";
const GOOGLE_DEVICE: &str = "https://oauth2.googleapis.com/device/code";
const GOOGLE_MAIL_SCOPE: &str = "https://mail.google.com/";
const MICROSOFT_BASE: &str = "https://login.microsoftonline.com";
const MICROSOFT_DELEGATED_SCOPES: [&str; 2] =
    ["https://outlook.office.com/SMTP.Send", "offline_access"];
const MICROSOFT_APP_SCOPE: &str = "https://outlook.office365.com/.default";
/// Graph's permissions are named under its base URL (another one in
/// sovereign clouds): `{api_url}/.default` for the application permissions
/// granted, `{api_url}/Mail.Send` delegated.
const GRAPH_DELEGATED_SCOPES: [&str; 2] = ["Mail.Send", "offline_access"];
const GMAIL_SEND_SCOPE: &str = "https://www.googleapis.com/auth/gmail.send";

/// An account's resolved endpoints and scopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    pub provider: OAuthProvider,
    pub token_url: String,
    /// Where a person signs in (authorization code flow).
    pub auth_url: Option<String>,
    /// Where device codes are issued.
    pub device_url: Option<String>,
    pub scopes: Vec<String>,
}

impl Endpoints {
    /// The endpoints of `account`, an `auth = "oauth2"` account.
    pub fn resolve(account: &AccountConfig) -> Endpoints {
        let config = account
            .oauth2
            .as_ref()
            .expect("config validation requires [oauth2] with auth = \"oauth2\"");
        let api_url = account.api_url().unwrap_or_default();
        let (token, auth, device, scopes) = match config.provider {
            OAuthProvider::Google => (
                Some(GOOGLE_TOKEN.to_string()),
                Some(GOOGLE_AUTH.to_string()),
                Some(GOOGLE_DEVICE.to_string()),
                match account.transport {
                    TransportKind::GmailApi => vec![GMAIL_SEND_SCOPE.to_string()],
                    _ => vec![GOOGLE_MAIL_SCOPE.to_string()],
                },
            ),
            OAuthProvider::Microsoft => {
                let tenant = config.tenant.as_deref().unwrap_or(match config.flow {
                    // Device codes for work accounts need an organisational authority.
                    OAuthFlow::DeviceCode => "organizations",
                    _ => "common",
                });
                let url =
                    |endpoint: &str| format!("{MICROSOFT_BASE}/{tenant}/oauth2/v2.0/{endpoint}");
                let scopes = match (account.transport, config.flow) {
                    (TransportKind::Graph, OAuthFlow::ClientCredentials) => {
                        vec![format!("{api_url}/.default")]
                    }
                    (TransportKind::Graph, _) => vec![
                        format!("{api_url}/{}", GRAPH_DELEGATED_SCOPES[0]),
                        GRAPH_DELEGATED_SCOPES[1].to_string(),
                    ],
                    (_, OAuthFlow::ClientCredentials) => vec![MICROSOFT_APP_SCOPE.to_string()],
                    _ => MICROSOFT_DELEGATED_SCOPES.map(String::from).to_vec(),
                };
                (
                    Some(url("token")),
                    Some(url("authorize")),
                    Some(url("devicecode")),
                    scopes,
                )
            }
            OAuthProvider::Custom => (None, None, None, Vec::new()),
        };
        // A service account's key names its token endpoint.
        let token = match &config.service_account {
            Some(key) => Some(key.token_uri.clone()),
            None => token,
        };
        Endpoints {
            provider: config.provider,
            // Validation makes custom accounts name a token_url.
            token_url: config.token_url.clone().or(token).unwrap_or_default(),
            auth_url: config.auth_url.clone().or(auth),
            device_url: config.device_url.clone().or(device),
            scopes: config.scopes.clone().unwrap_or(scopes),
        }
    }

    /// The scopes as a request parameter.
    pub fn scope(&self) -> String {
        self.scopes.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oauth2(toml: &str) -> AccountConfig {
        on("", toml)
    }

    /// An account with `account` lines and `[oauth2]` lines.
    fn on(account: &str, oauth2: &str) -> AccountConfig {
        let config = crate::config::Config::from_toml(&format!(
            "[accounts.a]\nusername = \"me@example.com\"\nauth = \"oauth2\"\n{account}\n[accounts.a.oauth2]\nclient_id = \"id\"\n{oauth2}"
        ))
        .unwrap();
        config.accounts["a"].clone()
    }

    #[test]
    fn the_api_transports_ask_for_their_own_scopes() {
        const APP: &str = "provider = \"microsoft\"\nflow = \"client_credentials\"\ntenant = \"contoso.com\"\nclient_secret = \"s\"";
        // (account lines, oauth2 lines, scope)
        let table = [
            (
                "transport = \"graph\"",
                APP,
                "https://graph.microsoft.com/.default",
            ),
            (
                "transport = \"graph\"",
                "provider = \"microsoft\"",
                "https://graph.microsoft.com/Mail.Send offline_access",
            ),
            // A sovereign cloud names its permissions under its own base.
            (
                "transport = \"graph\"\napi_url = \"https://graph.microsoft.us\"",
                APP,
                "https://graph.microsoft.us/.default",
            ),
            (
                "transport = \"gmail-api\"",
                "provider = \"google\"",
                "https://www.googleapis.com/auth/gmail.send",
            ),
            (
                "transport = \"graph\"",
                &format!("{APP}\nscopes = [\"x\"]"),
                "x",
            ),
        ];
        for (account, oauth2, scope) in table {
            assert_eq!(
                Endpoints::resolve(&on(account, oauth2)).scope(),
                scope,
                "{account} {oauth2}"
            );
        }
    }

    #[test]
    fn google_needs_the_full_mail_scope() {
        let endpoints = Endpoints::resolve(&oauth2("provider = \"google\""));
        assert_eq!(endpoints.token_url, GOOGLE_TOKEN);
        assert_eq!(endpoints.auth_url.as_deref(), Some(GOOGLE_AUTH));
        assert_eq!(endpoints.scope(), "https://mail.google.com/");
    }

    #[test]
    fn microsoft_tenant_and_scopes_follow_the_flow() {
        let delegated = Endpoints::resolve(&oauth2("provider = \"microsoft\""));
        assert_eq!(
            delegated.token_url,
            "https://login.microsoftonline.com/common/oauth2/v2.0/token"
        );
        assert_eq!(
            delegated.scope(),
            "https://outlook.office.com/SMTP.Send offline_access"
        );
        let device =
            Endpoints::resolve(&oauth2("provider = \"microsoft\"\nflow = \"device_code\""));
        assert_eq!(
            device.device_url.as_deref(),
            Some("https://login.microsoftonline.com/organizations/oauth2/v2.0/devicecode")
        );
        let app = Endpoints::resolve(&oauth2(
            "provider = \"microsoft\"\nflow = \"client_credentials\"\ntenant = \"contoso.com\"\nclient_secret = \"s\"",
        ));
        assert_eq!(
            app.token_url,
            "https://login.microsoftonline.com/contoso.com/oauth2/v2.0/token"
        );
        assert_eq!(app.scope(), "https://outlook.office365.com/.default");
    }

    #[test]
    fn overrides_win() {
        let endpoints = Endpoints::resolve(&oauth2(
            "provider = \"google\"\ntoken_url = \"http://127.0.0.1:9/token\"\nscopes = [\"a\", \"b\"]",
        ));
        assert_eq!(endpoints.token_url, "http://127.0.0.1:9/token");
        assert_eq!(endpoints.scope(), "a b");
    }
}
