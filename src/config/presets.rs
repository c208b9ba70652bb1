//! `accounts.<name>.provider`: the SMTP settings each provider documents,
//! so an account needs only its username and secret. A preset fills in the
//! keys the file and the environment leave out (figment's `join`), so every
//! explicit key overrides it.

use figment::Figment;
use figment::providers::Serialized;
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use super::{AuthMethod, OAuthProvider, UpstreamTls};

/// A provider whose settings sendbridge knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Provider {
    Gmail,
    GoogleWorkspace,
    Microsoft365,
    /// Outlook.com, Hotmail and Live personal accounts.
    Outlook,
    Yahoo,
    Icloud,
    Zoho,
    Gmx,
    Webde,
    Ionos,
}

impl std::fmt::Display for Provider {
    /// As written in the configuration: `google-workspace`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = serde_json::to_value(self).ok();
        f.write_str(name.as_ref().and_then(|name| name.as_str()).unwrap_or("?"))
    }
}

/// What a provider documents for SMTP submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preset {
    pub host: &'static str,
    pub port: u16,
    pub tls: UpstreamTls,
    /// The sign-ins the provider accepts, the recommended first.
    pub accepts: &'static [AuthMethod],
    /// `oauth2.provider`, for accounts that sign in with OAuth.
    pub oauth_provider: Option<OAuthProvider>,
    /// `oauth2.tenant` (Microsoft's personal accounts: `consumers`).
    pub tenant: Option<&'static str>,
    /// The provider's own setup steps, in one line naming the key to set;
    /// `{account}` stands for the account's name.
    pub setup: &'static str,
    /// App passwords are shown in groups with spaces that are not part of
    /// them (Google: `abcd efgh ijkl mnop`).
    pub grouped_app_password: bool,
}

const PASSWORD: &[AuthMethod] = &[AuthMethod::Password];
const PASSWORD_OR_OAUTH: &[AuthMethod] = &[AuthMethod::Password, AuthMethod::Oauth2];
const OAUTH_OR_PASSWORD: &[AuthMethod] = &[AuthMethod::Oauth2, AuthMethod::Password];
const OAUTH_ONLY: &[AuthMethod] = &[AuthMethod::Oauth2];

/// The documented settings of `provider` (README, "Provider presets").
pub fn preset(provider: Provider) -> Preset {
    use UpstreamTls::{Implicit, Starttls};
    let google = |setup| Preset {
        host: "smtp.gmail.com",
        port: 587,
        tls: Starttls,
        accepts: PASSWORD_OR_OAUTH,
        oauth_provider: Some(OAuthProvider::Google),
        tenant: None,
        setup,
        grouped_app_password: true,
    };
    let password = |host, port, tls, setup| Preset {
        host,
        port,
        tls,
        accepts: PASSWORD,
        oauth_provider: None,
        tenant: None,
        setup,
        grouped_app_password: false,
    };
    match provider {
        Provider::Gmail => google(
            "Gmail: turn on 2-Step Verification, create an app password at https://myaccount.google.com/apppasswords and set it as accounts.{account}.password (or sign in with OAuth: auth = \"oauth2\")",
        ),
        Provider::GoogleWorkspace => google(
            "Google Workspace: the user creates an app password at https://myaccount.google.com/apppasswords (2-Step Verification on, app passwords allowed by the admin) for accounts.{account}.password, or use OAuth (auth = \"oauth2\")",
        ),
        Provider::Microsoft365 => Preset {
            host: "smtp.office365.com",
            port: 587,
            tls: Starttls,
            accepts: OAUTH_OR_PASSWORD,
            oauth_provider: Some(OAuthProvider::Microsoft),
            tenant: None,
            setup: "Microsoft 365: use OAuth (register an app in Entra ID with SMTP.Send, set [accounts.{account}.oauth2] client_id, run `sendbridge oauth login {account}`); Microsoft is retiring password sign-in for SMTP, which also needs Authenticated SMTP enabled for the mailbox",
            grouped_app_password: false,
        },
        Provider::Outlook => Preset {
            host: "smtp-mail.outlook.com",
            port: 587,
            tls: Starttls,
            accepts: OAUTH_ONLY,
            oauth_provider: Some(OAuthProvider::Microsoft),
            tenant: Some("consumers"),
            setup: "Outlook.com accepts only OAuth since 16 Sep 2024: register an app for personal Microsoft accounts, set [accounts.{account}.oauth2] client_id (provider microsoft and tenant consumers are preset) and run `sendbridge oauth login {account}`",
            grouped_app_password: false,
        },
        Provider::Yahoo => password(
            "smtp.mail.yahoo.com",
            465,
            Implicit,
            "Yahoo: create an app password under Account info → Account security → Generate app password and set it as accounts.{account}.password",
        ),
        Provider::Icloud => password(
            "smtp.mail.me.com",
            587,
            Starttls,
            "iCloud: create an app-specific password at https://account.apple.com (Sign-In and Security → App-Specific Passwords, two-factor authentication on) and set it as accounts.{account}.password",
        ),
        Provider::Zoho => password(
            "smtp.zoho.com",
            465,
            Implicit,
            "Zoho: with two-factor authentication create an application-specific password (My Account → Security → App Passwords) for accounts.{account}.password; organisation accounts set accounts.{account}.host = \"smtppro.zoho.com\", other data centres smtp.zoho.eu / smtp.zoho.in",
        ),
        Provider::Gmx => password(
            "mail.gmx.net",
            587,
            Starttls,
            "GMX: allow sending by external programs (E-Mail → Einstellungen → POP3/IMAP Abruf) and set the account password, or an app password with two-factor authentication, as accounts.{account}.password",
        ),
        Provider::Webde => password(
            "smtp.web.de",
            587,
            Starttls,
            "WEB.DE: allow POP3/IMAP access (E-Mail → Einstellungen → POP3/IMAP Abruf) and set the account password, or an app password with two-factor authentication, as accounts.{account}.password",
        ),
        Provider::Ionos => password(
            "smtp.ionos.de",
            587,
            Starttls,
            "IONOS: set the mailbox password from the IONOS email settings as accounts.{account}.password; outside Germany set accounts.{account}.host = \"smtp.ionos.com\" (or smtp.ionos.co.uk …)",
        ),
    }
}

impl Preset {
    /// The `auth` an account gets: OAuth when its `[oauth2]` table is
    /// there and the provider takes it, else the recommended sign-in.
    fn auth(&self, has_oauth2: bool) -> AuthMethod {
        match (has_oauth2, self.accepts.contains(&AuthMethod::Oauth2)) {
            (true, true) => AuthMethod::Oauth2,
            _ if self.accepts.contains(&AuthMethod::Password) => AuthMethod::Password,
            _ => AuthMethod::Oauth2,
        }
    }

    /// `setup` for the account `name`.
    pub fn setup_for(&self, name: &str) -> String {
        self.setup.replace("{account}", name)
    }
}

/// Just what presets read of an account; the rest is checked later.
#[derive(Deserialize)]
struct Named {
    provider: Option<Provider>,
    port: Option<IgnoredAny>,
    tls: Option<IgnoredAny>,
    oauth2: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct Accounts {
    #[serde(default)]
    accounts: BTreeMap<String, Named>,
}

/// `figment` with each account's preset under what it sets itself. An
/// account that cannot be read is left alone: the full extraction names
/// its error.
pub(super) fn join(mut figment: Figment) -> Figment {
    let Ok(found) = figment.extract::<Accounts>() else {
        return figment;
    };
    for (name, account) in found.accounts {
        let Some(provider) = account.provider else {
            continue;
        };
        let preset = preset(provider);
        let key = |field: &str| format!("accounts.{name}.{field}");
        figment = figment
            .join(Serialized::default(&key("host"), preset.host))
            .join(Serialized::default(&key("port"), preset.port))
            .join(Serialized::default(
                &key("auth"),
                preset.auth(account.oauth2.is_some()),
            ));
        // A port of its own means the TLS that port implies, unless said.
        if account.port.is_none() || account.tls.is_some() {
            figment = figment.join(Serialized::default(&key("tls"), preset.tls));
        }
        // Only into a table the account has: alone these would make one.
        if account.oauth2.is_some() {
            if let Some(oauth_provider) = preset.oauth_provider {
                figment =
                    figment.join(Serialized::default(&key("oauth2.provider"), oauth_provider));
            }
            if let Some(tenant) = preset.tenant {
                figment = figment.join(Serialized::default(&key("oauth2.tenant"), tenant));
            }
        }
    }
    figment
}

/// A Google app password as Google shows it, four groups of four letters,
/// without the spaces; `None` when `password` is not one.
pub(super) fn ungrouped_app_password(password: &str) -> Option<String> {
    let groups: Vec<&str> = password.split(' ').collect();
    let letters = |group: &&str| group.len() == 4 && group.bytes().all(|b| b.is_ascii_alphabetic());
    (groups.len() == 4 && groups.iter().all(letters)).then(|| groups.concat())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn each_preset_has_the_providers_documented_settings() {
        use AuthMethod::{Oauth2, Password};
        use UpstreamTls::{Implicit, Starttls};
        // (provider as written, host, port, tls, accepted sign-ins)
        let cases: [(&str, &str, u16, UpstreamTls, &[AuthMethod]); 10] = [
            (
                "gmail",
                "smtp.gmail.com",
                587,
                Starttls,
                &[Password, Oauth2],
            ),
            (
                "google-workspace",
                "smtp.gmail.com",
                587,
                Starttls,
                &[Password, Oauth2],
            ),
            (
                "microsoft365",
                "smtp.office365.com",
                587,
                Starttls,
                &[Oauth2, Password],
            ),
            ("outlook", "smtp-mail.outlook.com", 587, Starttls, &[Oauth2]),
            ("yahoo", "smtp.mail.yahoo.com", 465, Implicit, &[Password]),
            ("icloud", "smtp.mail.me.com", 587, Starttls, &[Password]),
            ("zoho", "smtp.zoho.com", 465, Implicit, &[Password]),
            ("gmx", "mail.gmx.net", 587, Starttls, &[Password]),
            ("webde", "smtp.web.de", 587, Starttls, &[Password]),
            ("ionos", "smtp.ionos.de", 587, Starttls, &[Password]),
        ];
        for (written, host, port, tls, accepts) in cases {
            let provider: Provider =
                serde_json::from_value(serde_json::json!(written)).expect(written);
            let preset = preset(provider);
            assert_eq!(
                (preset.host, preset.port, preset.tls, preset.accepts),
                (host, port, tls, accepts),
                "{written}"
            );
            assert!(
                preset.setup.contains("accounts.{account}."),
                "{written}: the setup names a key: {}",
                preset.setup
            );
        }
    }

    #[test]
    fn outlook_is_oauth_only_with_tenant_consumers() {
        let outlook = preset(Provider::Outlook);
        assert_eq!(
            (outlook.oauth_provider, outlook.tenant),
            (Some(OAuthProvider::Microsoft), Some("consumers"))
        );
        assert!(outlook.setup.contains("OAuth since 16 Sep 2024"));
        assert_eq!(outlook.auth(false), AuthMethod::Oauth2);
        let gmail = preset(Provider::Gmail);
        assert_eq!(gmail.auth(false), AuthMethod::Password);
        assert_eq!(gmail.auth(true), AuthMethod::Oauth2);
        assert_eq!(preset(Provider::Yahoo).auth(true), AuthMethod::Password);
    }

    #[test]
    fn explicit_keys_override_the_preset() {
        let config = Config::from_toml(
            "[accounts.zoho]\nprovider = \"zoho\"\nhost = \"smtppro.zoho.com\"\nusername = \"a@x.example\"\npassword = \"x\"\n\
             [accounts.yahoo]\nprovider = \"yahoo\"\nport = 587\nusername = \"a@yahoo.com\"\npassword = \"x\"",
        )
        .unwrap();
        let zoho = &config.accounts["zoho"];
        assert_eq!(
            (zoho.host.as_str(), zoho.port, zoho.tls_mode()),
            ("smtppro.zoho.com", 465, UpstreamTls::Implicit)
        );
        // A port of its own implies its TLS, as without a preset.
        let yahoo = &config.accounts["yahoo"];
        assert_eq!(
            (yahoo.host.as_str(), yahoo.port, yahoo.tls_mode()),
            ("smtp.mail.yahoo.com", 587, UpstreamTls::Starttls)
        );
    }

    #[test]
    fn outlook_signs_in_with_oauth_as_a_personal_account_or_not_at_all() {
        let outlook = |keys: &str| {
            Config::from_toml(&format!(
                "[accounts.home]\nprovider = \"outlook\"\nusername = \"me@outlook.com\"\n{keys}"
            ))
        };
        let config = outlook("[accounts.home.oauth2]\nclient_id = \"app\"").unwrap();
        let home = &config.accounts["home"];
        let oauth2 = home.oauth2.as_ref().unwrap();
        assert_eq!(
            (home.host.as_str(), home.port, home.tls_mode(), home.auth),
            (
                "smtp-mail.outlook.com",
                587,
                UpstreamTls::Starttls,
                AuthMethod::Oauth2
            )
        );
        assert_eq!(
            (oauth2.provider, oauth2.tenant.as_deref()),
            (OAuthProvider::Microsoft, Some("consumers"))
        );
        // (keys, the key named, words of the problem)
        let refused = [
            ("password = \"x\"", "accounts.home.password", "16 Sep 2024"),
            ("", "accounts.home.oauth2", "tenant consumers are preset"),
            (
                "auth = \"password\"\npassword = \"x\"",
                "accounts.home.auth",
                "16 Sep 2024",
            ),
        ];
        for (keys, key, words) in refused {
            let err = outlook(keys).unwrap_err();
            assert_eq!(err.key, key, "{keys}: {err}");
            assert!(err.problem.contains(words), "{keys}: {err}");
        }
    }

    #[test]
    fn an_oauth2_table_makes_microsoft_365_and_gmail_sign_in_with_oauth() {
        let config = Config::from_toml(
            "[accounts.work]\nprovider = \"microsoft365\"\nusername = \"me@firm.example\"\n\
             [accounts.work.oauth2]\nclient_id = \"app\"\ntenant = \"firm.example\"\n\
             [accounts.mail]\nprovider = \"gmail\"\nusername = \"me@gmail.com\"\n\
             [accounts.mail.oauth2]\nclient_id = \"app\"",
        )
        .unwrap();
        let work = &config.accounts["work"];
        let oauth2 = work.oauth2.as_ref().unwrap();
        assert_eq!(
            (work.host.as_str(), work.auth),
            ("smtp.office365.com", AuthMethod::Oauth2)
        );
        assert_eq!(
            (oauth2.provider, oauth2.tenant.as_deref()),
            (OAuthProvider::Microsoft, Some("firm.example"))
        );
        let mail = &config.accounts["mail"];
        assert_eq!(mail.auth, AuthMethod::Oauth2);
        assert_eq!(
            mail.oauth2.as_ref().unwrap().provider,
            OAuthProvider::Google
        );
        assert!(config.notes.is_empty());
    }

    #[test]
    fn a_grouped_google_app_password_is_cleaned_with_a_note_that_does_not_show_it() {
        let config = Config::from_toml(
            "[accounts.mail]\nprovider = \"google-workspace\"\nusername = \"me@firm.example\"\npassword = \"abcd efgh ijkl mnop\"\n\
             [accounts.other]\nprovider = \"icloud\"\nusername = \"me@icloud.com\"\npassword = \"abcd efgh ijkl mnop\"",
        )
        .unwrap();
        let password = |name: &str| {
            config.accounts[name]
                .password
                .as_ref()
                .unwrap()
                .expose()
                .to_string()
        };
        assert_eq!(password("mail"), "abcdefghijklmnop");
        // Only Google shows its app passwords so.
        assert_eq!(password("other"), "abcd efgh ijkl mnop");
        assert_eq!(config.notes.len(), 1, "{:?}", config.notes);
        assert!(config.notes[0].starts_with("accounts.mail.password: removed the spaces"));
        assert!(!config.notes[0].contains("abcd efgh") && !config.notes[0].contains("efghijkl"));
    }

    #[test]
    fn google_app_passwords_lose_the_spaces_google_shows() {
        let cases = [
            ("abcd efgh ijkl mnop", Some("abcdefghijklmnop")),
            ("ABCD efgh IJKL mnop", Some("ABCDefghIJKLmnop")),
            ("abcdefghijklmnop", None),
            ("abcd efgh ijkl", None),
            ("abcd efgh ijkl mnop ", None),
            ("ab1d efgh ijkl mnop", None),
            ("correct horse battery staple", None),
        ];
        for (pasted, expected) in cases {
            assert_eq!(
                ungrouped_app_password(pasted).as_deref(),
                expected,
                "{pasted:?}"
            );
        }
    }
}
