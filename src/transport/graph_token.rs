//! What a Microsoft access token says it grants: the `roles` claim
//! (application permissions) or `scp` (delegated scopes) of its JWT
//! payload, read without verifying the signature. The token is for Graph,
//! not for us; this only lets `check` say what it seems to grant (with RBAC
//! for Applications, Exchange grants Mail.Send without the token naming it).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::secret::Secret;

/// The permissions `token` names; `None` when it is not a JWT that names
/// any (an opaque token: nothing can be said before Graph answers).
pub fn permissions(token: &Secret) -> Option<Vec<String>> {
    let payload = token.expose().split('.').nth(1)?;
    let json = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&json).ok()?;
    let mut permissions: Vec<String> = Vec::new();
    if let Some(roles) = claims["roles"].as_array() {
        permissions.extend(roles.iter().filter_map(|r| r.as_str()).map(String::from));
    }
    if let Some(scp) = claims["scp"].as_str() {
        permissions.extend(scp.split_whitespace().map(String::from));
    }
    let named = claims.get("roles").is_some() || claims.get("scp").is_some();
    named.then_some(permissions)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &str) -> Secret {
        Secret::new(format!(
            "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.{}.c2lnbmF0dXJl",
            URL_SAFE_NO_PAD.encode(claims)
        ))
    }

    #[test]
    fn roles_and_scopes_are_read_from_the_payload() {
        // (token, permissions)
        let table: [(Secret, Option<&[&str]>); 6] = [
            (jwt(r#"{"roles":["Mail.Send"]}"#), Some(&["Mail.Send"])),
            (
                jwt(r#"{"scp":"Mail.Send Mail.ReadWrite User.Read"}"#),
                Some(&["Mail.Send", "Mail.ReadWrite", "User.Read"]),
            ),
            // An app-only token without consent names no roles at all.
            (jwt(r#"{"roles":[]}"#), Some(&[])),
            (jwt(r#"{"aud":"https://graph.microsoft.com"}"#), None),
            (Secret::new("EwBwA8l6BAAU-opaque"), None),
            (Secret::new("a.!!!.c"), None),
        ];
        for (token, expected) in table {
            let expected = expected.map(|p| p.iter().map(|s| s.to_string()).collect());
            assert_eq!(permissions(&token), expected);
        }
    }
}
