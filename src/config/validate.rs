//! Checks a loaded configuration: values in range, references between
//! sections, and secrets read from their `*_file` keys (trimmed), so the
//! rest of the relay only sees `Secret`s.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::presets::ungrouped_app_password;
use super::{
    AccountConfig, AdminConfig, AuthMethod, Config, ConfigError, GMAIL_HOST, MICROSOFT_HOST,
    OAuth2Config, OAuthFlow, OAuthProvider, Preset, Secrets, ServiceAccountKey, UserConfig, preset,
};
use crate::address::SenderPattern;
use crate::secret::Secret;

impl Config {
    /// Checks references between sections and reads secret files.
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        self.validate_needing(Secrets::All)
    }

    /// Like `validate`, reading and requiring only `secrets`: a command
    /// that signs in nowhere starts without app passwords or their files.
    pub fn validate_needing(&mut self, secrets: Secrets) -> Result<(), ConfigError> {
        if self.server.hostname.trim().is_empty() {
            return Err(ConfigError::new("server.hostname", "must not be empty"));
        }
        if self.server.max_connections == 0 {
            return Err(ConfigError::new(
                "server.max_connections",
                "must be at least 1",
            ));
        }
        if self.server.message_memory_budget < self.server.max_message_size {
            return Err(ConfigError::new(
                "server.message_memory_budget",
                format!(
                    "must be at least server.max_message_size ({} bytes), or no message of that size could be received",
                    self.server.max_message_size
                ),
            ));
        }
        if self.server.auth_failure_limit == 0 {
            return Err(ConfigError::new(
                "server.auth_failure_limit",
                "must be at least 1",
            ));
        }
        if self.server.auth_failure_window.is_zero() {
            return Err(ConfigError::new(
                "server.auth_failure_window",
                "must be longer than zero",
            ));
        }
        if self.server.auth_mechanisms.is_empty() {
            return Err(ConfigError::new(
                "server.auth_mechanisms",
                "empty: list at least one of \"PLAIN\", \"LOGIN\", \"CRAM-MD5\" (default [\"PLAIN\", \"LOGIN\"])",
            ));
        }
        if self.server.max_recipients == 0 {
            return Err(ConfigError::new(
                "server.max_recipients",
                "must be at least 1",
            ));
        }
        let all = secrets == Secrets::All;
        self.validate_listeners()?;
        for (name, account) in &mut self.accounts {
            account.validate(name, all, &mut self.notes)?;
        }
        if let Some(default) = &self.server.default_account {
            if !self.accounts.contains_key(default) {
                return Err(ConfigError::new(
                    "server.default_account",
                    format!("no account named \"{default}\" in [accounts]"),
                ));
            }
        }
        self.validate_routes()?;
        let fallback_account = self.fallback_account().map(str::to_string);
        for (name, user) in &mut self.users {
            let routed = self.routes.iter().any(|route| route.applies_to(name));
            user.validate(
                name,
                fallback_account.as_deref(),
                routed,
                &self.accounts,
                all,
            )?;
        }
        if let Some(user) = &self.sendmail.user {
            if !self.users.contains_key(user) {
                return Err(ConfigError::new(
                    "sendmail.user",
                    format!("no user named \"{user}\" in [users]"),
                ));
            }
        }
        self.validate_notify()?;
        if secrets == Secrets::None {
            return Ok(());
        }
        self.admin.validate()
    }

    fn validate_routes(&self) -> Result<(), ConfigError> {
        for (n, route) in self.routes.iter().enumerate() {
            // Numbered from 0, as figment names the entries in type errors.
            let key = |field: &str| format!("routes.{n}.{field}");
            if let Err(problem) = SenderPattern::parse(&route.sender) {
                return Err(ConfigError::new(key("sender"), problem));
            }
            if !self.accounts.contains_key(&route.account) {
                return Err(ConfigError::new(
                    key("account"),
                    format!("no account named \"{}\" in [accounts]", route.account),
                ));
            }
            let Some(users) = &route.users else { continue };
            if users.is_empty() {
                return Err(ConfigError::new(
                    key("users"),
                    "empty: list the users the route is for, or leave users out to route every client",
                ));
            }
            let known = |user: &String| {
                self.users
                    .keys()
                    .any(|name| name.eq_ignore_ascii_case(user))
            };
            if let Some(unknown) = users.iter().find(|user| !known(user)) {
                return Err(ConfigError::new(
                    key("users"),
                    format!("no user named \"{unknown}\" in [users]"),
                ));
            }
        }
        Ok(())
    }

    fn validate_notify(&self) -> Result<(), ConfigError> {
        let notify = &self.notify;
        if let Some(address) = notify.admin.iter().find(|a| !a.contains('@')) {
            return Err(ConfigError::new(
                "notify.admin",
                format!("\"{address}\" is not an email address"),
            ));
        }
        if let Some(account) = &notify.account {
            if !self.accounts.contains_key(account) {
                return Err(ConfigError::new(
                    "notify.account",
                    format!("no account named \"{account}\" in [accounts]"),
                ));
            }
        }
        if let Some(url) = &notify.webhook {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return Err(ConfigError::new(
                    "notify.webhook",
                    "must be an http:// or https:// URL",
                ));
            }
        }
        Ok(())
    }

    /// The account for logins that name none: `server.default_account`, or
    /// the only account when there is exactly one.
    fn fallback_account(&self) -> Option<&str> {
        match (&self.server.default_account, self.accounts.len()) {
            (Some(name), _) => Some(name),
            (None, 1) => self.accounts.keys().next().map(String::as_str),
            _ => None,
        }
    }
}

impl AdminConfig {
    fn validate(&mut self) -> Result<(), ConfigError> {
        self.token = resolve_secret("admin.token", self.token.take(), &self.token_file)?;
        let Some(token) = &self.token else {
            return Ok(());
        };
        // It travels in URLs (the status page's links) and headers as is.
        let url_safe = |b: u8| b.is_ascii_alphanumeric() || b"-._~".contains(&b);
        if token.expose().len() < 16 || !token.expose().bytes().all(url_safe) {
            return Err(ConfigError::new(
                "admin.token",
                "use at least 16 letters, digits or -._~ (e.g. the output of `openssl rand -hex 32`)",
            ));
        }
        Ok(())
    }
}

impl AccountConfig {
    /// `secrets`: read and require the password (or OAuth client secret).
    /// `notes` gets what was changed on the way (a cleaned app password).
    fn validate(
        &mut self,
        name: &str,
        secrets: bool,
        notes: &mut Vec<String>,
    ) -> Result<(), ConfigError> {
        let key = |field: &str| format!("accounts.{name}.{field}");
        // The name also names files in the spool.
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(ConfigError::new(
                format!("accounts.{name}"),
                "account names may use letters, digits, - and _ only",
            ));
        }
        // The API transports reach their provider at `api_url` instead.
        if self.transport.is_api() {
            self.validate_api(name)?;
        } else if self.host.trim().is_empty() {
            return Err(ConfigError::new(key("host"), "must not be empty"));
        }
        if self.port == 0 {
            return Err(ConfigError::new(key("port"), "must not be 0"));
        }
        if self.max_connections == 0 {
            return Err(ConfigError::new(
                key("max_connections"),
                "must be at least 1",
            ));
        }
        if self.max_recipients_per_message == 0 {
            return Err(ConfigError::new(
                key("max_recipients_per_message"),
                "must be at least 1",
            ));
        }
        if let Some(entry) = self.allowed_from.iter().find(|entry| !entry.contains('@')) {
            return Err(ConfigError::new(
                key("allowed_from"),
                format!("\"{entry}\" is neither an address nor @domain"),
            ));
        }
        let is_field_name = |name: &String| {
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
        };
        if let Some(name) = self.remove_headers.iter().find(|name| !is_field_name(name)) {
            return Err(ConfigError::new(
                key("remove_headers"),
                format!("\"{name}\" is not a header field name"),
            ));
        }
        if self.username.trim().is_empty() {
            return Err(ConfigError::new(
                key("username"),
                "missing: set it to the mailbox address, e.g. me@gmail.com",
            ));
        }
        let mut password = if secrets {
            resolve_secret(&key("password"), self.password.take(), &self.password_file)?
        } else {
            None
        };
        let preset = self.provider.map(preset);
        if let Some(preset) = &preset {
            self.check_preset(name, preset, &mut password, notes)?;
        }
        let setup = preset.map(|preset| format!("; {}", preset.setup_for(name)));
        match (self.auth, password, &mut self.oauth2) {
            (AuthMethod::Password, Some(password), _) => self.password = Some(password),
            (AuthMethod::Password, None, _) if !secrets => {}
            (AuthMethod::Password, None, _) => {
                return Err(ConfigError::new(
                    key("password"),
                    "missing: set password or password_file (for Gmail a 16-character app password)",
                ));
            }
            (AuthMethod::Oauth2, _, None) => {
                return Err(ConfigError::new(
                    key("oauth2"),
                    format!(
                        "missing: auth = \"oauth2\" needs [accounts.<name>.oauth2] with provider and client_id{}",
                        setup.unwrap_or_default()
                    ),
                ));
            }
            (AuthMethod::Oauth2, _, Some(oauth2)) => {
                oauth2.validate(&key("oauth2"), secrets)?;
                // The default host is Gmail's; Microsoft accounts mean Microsoft's.
                if oauth2.provider == OAuthProvider::Microsoft && self.host == GMAIL_HOST {
                    self.host = MICROSOFT_HOST.to_string();
                }
            }
        }
        if let Some(ca_file) = &self.ca_file {
            if !ca_file.is_file() {
                return Err(ConfigError::new(
                    key("ca_file"),
                    format!("{} does not exist", ca_file.display()),
                ));
            }
        }
        Ok(())
    }
}

impl AccountConfig {
    /// Refuses a sign-in the provider does not accept, and takes out the
    /// spaces of an app password pasted as Google shows it.
    fn check_preset(
        &self,
        name: &str,
        preset: &Preset,
        password: &mut Option<Secret>,
        notes: &mut Vec<String>,
    ) -> Result<(), ConfigError> {
        let key = |field: &str| format!("accounts.{name}.{field}");
        let provider = self.provider.expect("a preset comes from the provider");
        if !preset.accepts.contains(&self.auth) {
            return Err(ConfigError::new(
                key("auth"),
                format!("{provider} does not accept it: {}", preset.setup_for(name)),
            ));
        }
        if password.is_some() && !preset.accepts.contains(&AuthMethod::Password) {
            return Err(ConfigError::new(
                key("password"),
                format!(
                    "{provider} does not accept passwords: {}",
                    preset.setup_for(name)
                ),
            ));
        }
        let grouped = password
            .as_ref()
            .filter(|_| preset.grouped_app_password)
            .and_then(|secret| ungrouped_app_password(secret.expose()));
        if let Some(ungrouped) = grouped {
            *password = Some(Secret::new(ungrouped));
            notes.push(format!(
                "accounts.{name}.password: removed the spaces from the app password, which Google shows in four groups of four letters; the password is the 16 letters without them"
            ));
        }
        Ok(())
    }

    /// `transport = "graph"` or `"gmail-api"`: signed in with OAuth 2.0 (the
    /// APIs take no passwords), over HTTPS only.
    fn validate_api(&self, name: &str) -> Result<(), ConfigError> {
        let key = |field: &str| format!("accounts.{name}.{field}");
        if self.auth != AuthMethod::Oauth2 {
            return Err(ConfigError::new(
                key("auth"),
                format!(
                    "transport = \"{}\" needs auth = \"oauth2\" with [accounts.{name}.oauth2]",
                    self.transport.name()
                ),
            ));
        }
        if let Some(url) = &self.api_url {
            if !url.starts_with("https://") {
                return Err(ConfigError::new(
                    key("api_url"),
                    "must be an https:// URL (the bare base, e.g. https://graph.microsoft.com)",
                ));
            }
        }
        Ok(())
    }
}

impl OAuth2Config {
    fn validate(&mut self, prefix: &str, secrets: bool) -> Result<(), ConfigError> {
        let key = |field: &str| format!("{prefix}.{field}");
        match (&self.service_account_file, self.flow) {
            (Some(path), OAuthFlow::ServiceAccount) => {
                let service_account = ServiceAccountKey::read(prefix, path)?;
                if self.client_id.trim().is_empty() {
                    self.client_id = service_account.client_id.clone();
                }
                self.service_account = Some(service_account);
            }
            (None, OAuthFlow::ServiceAccount) => {
                return Err(ConfigError::new(
                    key("service_account_file"),
                    "missing: flow = \"service_account\" needs the service account's JSON key",
                ));
            }
            (Some(_), _) => {
                return Err(ConfigError::new(
                    key("service_account_file"),
                    "only used with flow = \"service_account\"",
                ));
            }
            (None, _) => {}
        }
        if self.flow == OAuthFlow::ServiceAccount && self.provider != OAuthProvider::Google {
            return Err(ConfigError::new(
                key("flow"),
                "\"service_account\" is Google's: set provider = \"google\"",
            ));
        }
        if self.client_id.trim().is_empty() {
            return Err(ConfigError::new(key("client_id"), "must not be empty"));
        }
        if !secrets {
            return Ok(());
        }
        self.client_secret = resolve_secret(
            &key("client_secret"),
            self.client_secret.take(),
            &self.client_secret_file,
        )?;
        if self.provider == OAuthProvider::Custom && self.token_url.is_none() {
            return Err(ConfigError::new(
                key("token_url"),
                "missing: provider = \"custom\" needs token_url (and auth_url or device_url for sign-in)",
            ));
        }
        if self.flow == OAuthFlow::ClientCredentials {
            if self.client_secret.is_none() {
                return Err(ConfigError::new(
                    key("client_secret"),
                    "missing: flow = \"client_credentials\" needs client_secret or client_secret_file",
                ));
            }
            if self.provider == OAuthProvider::Microsoft && self.tenant.is_none() {
                return Err(ConfigError::new(
                    key("tenant"),
                    "missing: app-only sign-in needs the tenant id or domain",
                ));
            }
        }
        Ok(())
    }
}

impl UserConfig {
    fn validate(
        &mut self,
        name: &str,
        fallback_account: Option<&str>,
        routed: bool,
        accounts: &BTreeMap<String, AccountConfig>,
        secrets: bool,
    ) -> Result<(), ConfigError> {
        let key = |field: &str| format!("users.{name}.{field}");
        let password = if secrets {
            resolve_secret(&key("password"), self.password.take(), &self.password_file)?
        } else {
            None
        };
        match (&self.password_hash, password) {
            (_, None) if !secrets => {}
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    key("password_hash"),
                    "set either password_hash or password/password_file, not both",
                ));
            }
            (None, None) => {
                return Err(ConfigError::new(
                    key("password"),
                    "missing: set password, password_file or password_hash",
                ));
            }
            (Some(hash), None) => {
                if argon2::PasswordHash::new(hash).is_err() {
                    return Err(ConfigError::new(
                        key("password_hash"),
                        "not an argon2 PHC string; create one with `sendbridge hash-password`",
                    ));
                }
            }
            (None, Some(password)) => self.password = Some(password),
        }
        match self.account.as_deref().or(fallback_account) {
            Some(account) if accounts.contains_key(account) => {
                self.account = Some(account.to_string());
                Ok(())
            }
            Some(account) => Err(ConfigError::new(
                key("account"),
                format!("no account named \"{account}\" in [accounts]"),
            )),
            // Routes choose the account of each message; one no route
            // matches is refused at MAIL.
            None if routed => Ok(()),
            None => Err(ConfigError::new(
                key("account"),
                "missing: name the upstream account this login sends through, or add [[routes]] for its senders",
            )),
        }
    }
}

/// Exactly one of an inline secret and a secret file; a file's trailing
/// newline (as editors and `echo` leave it) is not part of the secret.
pub(super) fn resolve_secret(
    key: &str,
    inline: Option<Secret>,
    file: &Option<PathBuf>,
) -> Result<Option<Secret>, ConfigError> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(ConfigError::new(
            key,
            format!("set either {key} or {key}_file, not both"),
        )),
        (Some(secret), None) => Ok(Some(secret)),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|err| {
                ConfigError::new(
                    format!("{key}_file"),
                    format!("cannot read {}: {err}", path.display()),
                )
            })?;
            let secret = text
                .strip_suffix('\n')
                .map(|rest| rest.strip_suffix('\r').unwrap_or(rest))
                .unwrap_or(&text);
            if secret.is_empty() {
                return Err(ConfigError::new(
                    format!("{key}_file"),
                    format!("{} is empty", path.display()),
                ));
            }
            Ok(Some(Secret::new(secret)))
        }
        (None, None) => Ok(None),
    }
}
