//! A Google service account's JSON key (`[accounts.<name>.oauth2]
//! service_account_file`), as the Cloud console downloads it. Read like
//! every `*_file` secret; the private key is a `Secret` and never printed.

use std::path::Path;

use aws_lc_rs::signature::RsaKeyPair;
use serde::Deserialize;

use super::ConfigError;
use super::validate::resolve_secret;
use crate::secret::Secret;

/// The fields of the key file the JWT bearer grant needs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ServiceAccountKey {
    /// `service_account` (an OAuth client's JSON says `installed` or `web`).
    #[serde(rename = "type")]
    pub kind: String,
    /// The JWT's issuer, e.g. `relay@project.iam.gserviceaccount.com`.
    pub client_email: String,
    /// The numeric client ID an administrator enters for domain-wide
    /// delegation.
    #[serde(default)]
    pub client_id: String,
    /// PEM, PKCS#8 RSA.
    pub private_key: Secret,
    /// Where the assertion is redeemed (and its audience).
    pub token_uri: String,
}

impl ServiceAccountKey {
    /// Reads and checks the key file named by `{prefix}.service_account_file`.
    pub(super) fn read(prefix: &str, path: &Path) -> Result<ServiceAccountKey, ConfigError> {
        let file_key = format!("{prefix}.service_account_file");
        let problem = |problem: String| ConfigError::new(&file_key, problem);
        let text = resolve_secret(
            &format!("{prefix}.service_account"),
            None,
            &Some(path.to_path_buf()),
        )?
        .expect("a file was named");
        // serde_json's messages quote no values, so none of the key leaks.
        let key: ServiceAccountKey = serde_json::from_str(text.expose()).map_err(|err| {
            problem(format!(
                "{} is not a service account key (JSON with client_email, private_key and token_uri): line {}, column {}",
                path.display(),
                err.line(),
                err.column()
            ))
        })?;
        if key.kind != "service_account" {
            return Err(problem(format!(
                "{} is a key of type \"{}\", not \"service_account\": download a key of the service account (Cloud console, IAM & Admin, Service accounts, Keys, Add key, JSON)",
                path.display(),
                key.kind
            )));
        }
        key.signing_key()
            .map_err(|err| problem(format!("{}: {err}", path.display())))?;
        Ok(key)
    }

    /// The RSA key that signs the assertions.
    pub fn signing_key(&self) -> Result<RsaKeyPair, String> {
        let mut pem = self.private_key.expose().as_bytes();
        let der = match rustls_pemfile::private_key(&mut pem) {
            Ok(Some(rustls::pki_types::PrivateKeyDer::Pkcs8(der))) => der,
            _ => return Err("private_key is not a PEM PKCS#8 private key".to_string()),
        };
        RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
            .map_err(|_| "private_key is not an RSA key aws-lc-rs accepts".to_string())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, OAuthFlow};

    fn load(oauth2: &str, key_file: Option<&str>) -> Result<Config, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.json");
        if let Some(text) = key_file {
            std::fs::write(&path, text).unwrap();
        }
        Config::from_toml(&format!(
            "[accounts.ws]\nusername = \"printer@example.com\"\nauth = \"oauth2\"\n[accounts.ws.oauth2]\n{}",
            oauth2.replace("KEY", &path.display().to_string())
        ))
        .map_err(|err| err.to_string())
    }

    fn key_json(kind: &str, private_key: &str) -> String {
        serde_json::json!({
            "type": kind,
            "client_email": "relay@project.iam.gserviceaccount.com",
            "client_id": "1098765",
            "private_key": private_key,
            "token_uri": "https://oauth2.googleapis.com/token",
        })
        .to_string()
    }

    #[test]
    fn a_service_account_key_is_read_and_its_client_id_taken() {
        let pem = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256)
            .unwrap()
            .serialize_pem();
        let config = load(
            "provider = \"google\"\nflow = \"service_account\"\nservice_account_file = \"KEY\"",
            Some(&key_json("service_account", &pem)),
        )
        .unwrap();
        let oauth2 = config.accounts["ws"].oauth2.as_ref().unwrap();
        assert_eq!(oauth2.flow, OAuthFlow::ServiceAccount);
        assert_eq!(oauth2.client_id, "1098765");
        let key = oauth2.service_account.as_ref().unwrap();
        assert_eq!(key.client_email, "relay@project.iam.gserviceaccount.com");
        assert!(!format!("{config:?}").contains("PRIVATE KEY"));
    }

    #[test]
    fn a_wrong_or_missing_key_is_named_without_its_contents() {
        let flow =
            "provider = \"google\"\nflow = \"service_account\"\nservice_account_file = \"KEY\"";
        let ec = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let rsa = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256)
            .unwrap()
            .serialize_pem();
        // (oauth2 table, key file, what the error says)
        let table = [
            (
                flow,
                None,
                "accounts.ws.oauth2.service_account_file: cannot read",
            ),
            (
                flow,
                Some("{\"private_key\": \"x\"}".to_string()),
                "is not a service account key",
            ),
            (
                flow,
                Some(key_json("installed", "x")),
                "not \"service_account\"",
            ),
            (
                flow,
                Some(key_json("service_account", "PRIVATE-x")),
                "not a PEM PKCS#8",
            ),
            (
                flow,
                Some(key_json("service_account", &ec)),
                "not an RSA key",
            ),
            (
                "provider = \"google\"\nflow = \"service_account\"",
                None,
                "accounts.ws.oauth2.service_account_file: missing",
            ),
            (
                "provider = \"google\"\nclient_id = \"id\"\nservice_account_file = \"KEY\"",
                Some("{}".to_string()),
                "only used with flow = \"service_account\"",
            ),
            (
                "provider = \"microsoft\"\nflow = \"service_account\"\nservice_account_file = \"KEY\"",
                Some(key_json("service_account", &rsa)),
                "accounts.ws.oauth2.flow: \"service_account\" is Google's",
            ),
        ];
        for (oauth2, file, expected) in table {
            let err = load(oauth2, file.as_deref()).unwrap_err();
            assert!(err.contains(expected), "{oauth2}: {err}");
            assert!(!err.contains("PRIVATE"), "{err}");
        }
    }
}
