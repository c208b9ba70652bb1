//! The JWT a Google service account signs to get an access token as a
//! mailbox of its Workspace domain (RFC 7523 §2.1; Google's "Using OAuth 2.0
//! for Server to Server Applications"): RS256 over header and claims, both
//! base64url JSON. No refresh token: a new assertion for each token.

use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::RSA_PKCS1_SHA256;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::json;

use crate::config::ServiceAccountKey;
use crate::secret::Secret;

/// Google accepts assertions valid for at most an hour.
pub const ASSERTION_LIFETIME: Duration = Duration::from_secs(3600);

/// What the assertion asks for.
pub struct Claims<'a> {
    /// The mailbox the service account acts as (domain-wide delegation).
    pub subject: &'a str,
    pub scope: &'a str,
    /// The token endpoint that redeems it.
    pub audience: &'a str,
    /// Seconds since the Unix epoch.
    pub issued_at: u64,
}

/// The signed assertion, `header.claims.signature`.
pub fn assertion(key: &ServiceAccountKey, claims: &Claims<'_>) -> Result<Secret, String> {
    let header = json!({ "alg": "RS256", "typ": "JWT" });
    let body = json!({
        "iss": key.client_email,
        "sub": claims.subject,
        "scope": claims.scope,
        "aud": claims.audience,
        "iat": claims.issued_at,
        "exp": claims.issued_at + ASSERTION_LIFETIME.as_secs(),
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(body.to_string())
    );
    let signing_key = key.signing_key()?;
    let mut signature = vec![0; signing_key.public_modulus_len()];
    signing_key
        .sign(
            &RSA_PKCS1_SHA256,
            &SystemRandom::new(),
            signing_input.as_bytes(),
            &mut signature,
        )
        .map_err(|_| "signing the service account's assertion failed".to_string())?;
    Ok(Secret::new(format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature)
    )))
}

#[cfg(test)]
mod tests {
    use aws_lc_rs::signature::{KeyPair as _, RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};

    use super::*;

    fn decode(part: &str) -> serde_json::Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    }

    #[test]
    fn the_assertion_says_who_for_whom_and_verifies_with_the_public_key() {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let key = ServiceAccountKey {
            kind: "service_account".into(),
            client_email: "relay@project.iam.gserviceaccount.com".into(),
            client_id: "109876543210987654321".into(),
            private_key: Secret::new(pair.serialize_pem()),
            token_uri: "https://oauth2.googleapis.com/token".into(),
        };
        let claims = Claims {
            subject: "printer@example.com",
            scope: "https://www.googleapis.com/auth/gmail.send",
            audience: "https://oauth2.googleapis.com/token",
            issued_at: 1_700_000_000,
        };
        let jwt = assertion(&key, &claims).unwrap();
        let parts: Vec<&str> = jwt.expose().split('.').collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(decode(parts[0]), json!({ "alg": "RS256", "typ": "JWT" }));
        assert_eq!(
            decode(parts[1]),
            json!({
                "iss": "relay@project.iam.gserviceaccount.com",
                "sub": "printer@example.com",
                "scope": "https://www.googleapis.com/auth/gmail.send",
                "aud": "https://oauth2.googleapis.com/token",
                "iat": 1_700_000_000,
                "exp": 1_700_003_600,
            })
        );
        let signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        let signed = format!("{}.{}", parts[0], parts[1]);
        let rsa = aws_lc_rs::signature::RsaKeyPair::from_pkcs8(&pair.serialize_der()).unwrap();
        let public_key = rsa.public_key().as_ref().to_vec();
        let verifier = UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &public_key);
        verifier.verify(signed.as_bytes(), &signature).unwrap();
        let other = format!("{}.{}", parts[0], parts[0]);
        assert!(verifier.verify(other.as_bytes(), &signature).is_err());
    }
}
