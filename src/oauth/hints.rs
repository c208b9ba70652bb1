//! What to do when the token endpoint refuses: the hint that goes with
//! `TokenFailure::SignInNeeded`, worded for the provider and the flow.

use crate::config::{OAuthFlow, OAuthProvider, TransportKind};

/// The hint for an OAuth `error` code (`None`: no sign-in stored yet), for
/// an account sending through `transport`.
pub fn sign_in_hint(
    account: &str,
    provider: OAuthProvider,
    flow: OAuthFlow,
    transport: TransportKind,
    error: Option<&str>,
) -> String {
    let key = format!("accounts.{account}.oauth2");
    let graph = transport == TransportKind::Graph;
    if flow == OAuthFlow::ClientCredentials {
        return match provider {
            OAuthProvider::Microsoft if graph => format!(
                "app-only sign-in was refused: check {key}.client_id, client_secret (Entra client secrets expire) and tenant; the app needs the Microsoft Graph application permission Mail.Send with admin consent"
            ),
            OAuthProvider::Microsoft => format!(
                "app-only sign-in was refused: check {key}.client_id, client_secret (Entra client secrets expire) and tenant; the app needs the Office 365 Exchange Online permission SMTP.SendAsApp with admin consent, and an Exchange service principal with access to the mailbox (New-ServicePrincipal, Add-MailboxPermission)"
            ),
            _ => {
                format!("client credentials were refused: check {key}.client_id and client_secret")
            }
        };
    }
    let login = format!("run `sendbridge oauth login {account}`");
    match error {
        None => format!("nobody has signed in for this account yet: {login}"),
        Some("invalid_client" | "unauthorized_client") => format!(
            "the provider does not accept this OAuth client: check {key}.client_id and client_secret (a client secret may have expired), then {login}"
        ),
        Some("invalid_grant") => match provider {
            OAuthProvider::Google => format!(
                "the refresh token was revoked or has expired: {login}. If this happens about 7 days after every sign-in, the app's OAuth consent screen in the Google Cloud console is in \"Testing\", where refresh tokens expire after 7 days: publish the app (status \"In production\")"
            ),
            OAuthProvider::Microsoft => format!(
                "the refresh token was revoked or has expired (a password change, 90 days unused, or a policy): {login}. If sign-in keeps failing, an administrator may have to grant admin consent for {} (Entra admin center, App registrations, API permissions) or let the app through conditional access; the AADSTS code in the reason names the cause",
                if graph {
                    "Microsoft Graph Mail.Send"
                } else {
                    "SMTP.Send"
                }
            ),
            OAuthProvider::Custom => {
                format!("the refresh token was revoked or has expired: {login}")
            }
        },
        Some(error) => format!(
            "the token endpoint refused the request ({error}): check {key} (client_id, tenant, scopes), then {login}"
        ),
    }
}

/// The hint for a service account whose assertion was refused with the
/// OAuth `error` (`None`: its key could not sign). Google answers
/// `unauthorized_client` when domain-wide delegation lacks the scope and
/// `invalid_grant` for a bad key, subject or clock.
pub fn service_account_hint(
    account: &str,
    client_id: &str,
    scope: &str,
    error: Option<&str>,
) -> String {
    let key = format!("accounts.{account}.oauth2.service_account_file");
    let delegation = format!(
        "in the Google Admin console (Security, Access and data control, API controls, Manage Domain Wide Delegation) the service account's client ID {client_id} must be listed with the scope {scope}; a new entry can take hours to apply"
    );
    match error {
        None => format!(
            "the key in {key} cannot sign: download a new JSON key (Cloud console, IAM & Admin, Service accounts, Keys)"
        ),
        Some("unauthorized_client") => {
            format!("domain-wide delegation does not cover this sign-in: {delegation}")
        }
        Some(_) => format!(
            "Google refused the service account's assertion: \"Invalid JWT Signature\" means the key in {key} was deleted or disabled (make a new one); \"Invalid email or User ID\" means accounts.{account}.username is not a user of the Workspace domain; a clock off by minutes is refused too (keep it in sync with NTP). And {delegation}"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_service_account_is_told_about_delegation_and_its_key() {
        let scope = "https://www.googleapis.com/auth/gmail.send";
        let hint = |error| service_account_hint("workspace", "1098765", scope, error);
        for error in [Some("unauthorized_client"), Some("invalid_grant")] {
            let hint = hint(error);
            assert!(hint.contains("Domain Wide Delegation"), "{hint}");
            assert!(hint.contains("client ID 1098765 must be listed with the scope https://www.googleapis.com/auth/gmail.send"), "{hint}");
        }
        assert!(hint(Some("invalid_grant")).contains("accounts.workspace.username"));
        assert!(hint(None).contains("accounts.workspace.oauth2.service_account_file"));
    }

    #[test]
    fn each_refusal_gets_its_own_advice() {
        let google = |error| {
            sign_in_hint(
                "gmail",
                OAuthProvider::Google,
                OAuthFlow::AuthorizationCode,
                TransportKind::Smtp,
                error,
            )
        };
        assert!(google(None).contains("nobody has signed in"));
        assert!(google(Some("invalid_grant")).contains("In production"));
        assert!(google(Some("invalid_client")).contains("accounts.gmail.oauth2.client_id"));
        assert!(google(Some("invalid_scope")).contains("(invalid_scope)"));
        let microsoft = sign_in_hint(
            "m365",
            OAuthProvider::Microsoft,
            OAuthFlow::DeviceCode,
            TransportKind::Smtp,
            Some("invalid_grant"),
        );
        assert!(microsoft.contains("admin consent") && microsoft.contains("conditional access"));
        assert!(microsoft.contains("sendbridge oauth login m365"));
        let app_only = |transport| {
            sign_in_hint(
                "m365",
                OAuthProvider::Microsoft,
                OAuthFlow::ClientCredentials,
                transport,
                Some("invalid_client"),
            )
        };
        assert!(app_only(TransportKind::Smtp).contains("SMTP.SendAsApp"));
        let graph = app_only(TransportKind::Graph);
        assert!(graph.contains("Microsoft Graph application permission Mail.Send"));
        assert!(!graph.contains("SMTP"), "{graph}");
    }
}
