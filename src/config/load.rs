//! Where the configuration comes from: built-in defaults < TOML file <
//! `SENDBRIDGE_*` environment variables (`__` nests), and errors that name
//! the key.

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};

use super::{
    CONFIG_PATH_ENV, Config, ConfigError, DEFAULT_CONFIG_PATH, SYSTEM_CONFIG_PATH, Secrets,
};

const ENV_PREFIX: &str = "SENDBRIDGE_";

impl Config {
    /// Loads and validates the configuration with every secret, as `run`
    /// needs it.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_needing(path, Secrets::All)
    }

    /// Loads and validates the configuration, reading and requiring only
    /// the `secrets` the command needs. `path` is the `--config` argument:
    /// when given it must exist; otherwise `$SENDBRIDGE_CONFIG`, else
    /// `config/sendbridge.toml`, else `/etc/sendbridge/sendbridge.toml`, each
    /// optional so that environment variables alone can configure the relay.
    pub fn load_needing(path: Option<&Path>, secrets: Secrets) -> Result<Config, ConfigError> {
        let file = match path {
            Some(path) if !path.is_file() => {
                return Err(ConfigError::new(
                    "--config",
                    format!("{} does not exist or is not a file", path.display()),
                ));
            }
            Some(path) => path.to_path_buf(),
            None => std::env::var_os(CONFIG_PATH_ENV).map_or_else(default_file, PathBuf::from),
        };
        let mut config = Self::from_figment(Figment::from(Toml::file(&file)), secrets)?;
        config.file = file.is_file().then_some(file);
        Ok(config)
    }

    /// Builds the configuration from a TOML string plus the environment; for
    /// tests and `check`.
    pub fn from_toml(toml: &str) -> Result<Config, ConfigError> {
        Self::from_figment(Figment::from(Toml::string(toml)), Secrets::All)
    }

    fn from_figment(figment: Figment, secrets: Secrets) -> Result<Config, ConfigError> {
        // Only variables with a `__` name a key: `SENDBRIDGE_LOG` is the log
        // filter, not the `[log]` section.
        let env = Env::prefixed(ENV_PREFIX)
            .filter(|key| key.as_str().contains("__"))
            .split("__");
        let mut figment = figment.merge(env.clone());
        // Figment parses env values, so a password such as `0123` or `true`
        // would arrive as a number or bool, or lose its leading zero. Secrets
        // are merged again as the raw strings they were.
        for (key, raw) in env.iter() {
            if is_secret_key(key.as_str()) {
                figment = figment.merge(Serialized::global(key.as_str(), raw));
            }
        }
        let figment = super::presets::join(figment);
        let mut config: Config = figment.extract().map_err(describe_figment_error)?;
        config.validate_needing(secrets)?;
        Ok(config)
    }
}

impl Config {
    /// The spool directory of the relay a command manages, which must
    /// exist: `queue` and `sendmail` refuse rather than start an empty
    /// spool somewhere else (a relative `spool.dir` run from another
    /// directory).
    pub fn existing_spool_dir(&self) -> Result<&Path, ConfigError> {
        let dir = &self.spool.dir;
        if dir.is_dir() {
            return Ok(dir);
        }
        let absolute = std::path::absolute(dir).unwrap_or_else(|_| dir.clone());
        Err(ConfigError::new(
            "spool.dir",
            format!(
                "{} does not exist, so no relay runs there ({}); give the running relay's configuration with --config or {CONFIG_PATH_ENV}, or an absolute spool.dir",
                absolute.display(),
                self.described_file()
            ),
        ))
    }

    /// Which configuration file was read, for messages.
    pub fn described_file(&self) -> String {
        match &self.file {
            Some(file) => {
                let absolute = std::path::absolute(file).unwrap_or_else(|_| file.clone());
                format!("configuration read from {}", absolute.display())
            }
            None => "no configuration file was found, only defaults and SENDBRIDGE_* variables"
                .to_string(),
        }
    }
}

/// `config/sendbridge.toml` when the working directory has one, else the
/// system-wide file.
fn default_file() -> PathBuf {
    let local = PathBuf::from(DEFAULT_CONFIG_PATH);
    if local.is_file() {
        local
    } else {
        PathBuf::from(SYSTEM_CONFIG_PATH)
    }
}

fn is_secret_key(key: &str) -> bool {
    let last = key.rsplit('.').next().unwrap_or(key);
    last == "password" || last == "token" || last.ends_with("secret")
}

/// Turns figment's error into `key: problem` without the provider noise.
fn describe_figment_error(err: figment::Error) -> ConfigError {
    use figment::error::{Actual, Kind};

    let key = err.path.join(".");
    let expected = |what: &str| match what {
        "u8" | "u16" | "u32" | "u64" | "usize" | "i32" | "i64" => "a number".to_string(),
        "a boolean" | "bool" => "true or false".to_string(),
        other => other.to_string(),
    };
    let got = |actual: &Actual| match actual {
        Actual::Str(s) => format!("\"{s}\""),
        other => other.to_string(),
    };
    let problem = match &err.kind {
        Kind::InvalidType(actual, exp) | Kind::InvalidValue(actual, exp) => {
            format!("expected {}, got {}", expected(exp), got(actual))
        }
        // figment's path already ends with the unknown key.
        Kind::UnknownField(..) => "unknown key (misspelled?)".to_string(),
        Kind::UnknownVariant(value, allowed) => {
            format!("\"{value}\" is not one of: {}", allowed.join(", "))
        }
        other => other.to_string(),
    };
    ConfigError::new(
        if key.is_empty() {
            "config".to_string()
        } else {
            key
        },
        problem,
    )
}
