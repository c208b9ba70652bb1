//! Where the configuration comes from: built-in defaults < TOML file <
//! `SENDBRIDGE_*` environment variables (`__` nests), and errors that name
//! the key.

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};

use super::{CONFIG_PATH_ENV, Config, ConfigError, DEFAULT_CONFIG_PATH};

const ENV_PREFIX: &str = "SENDBRIDGE_";

impl Config {
    /// Loads and validates the configuration. `path` is the `--config`
    /// argument: when given it must exist; the default path (or
    /// `$SENDBRIDGE_CONFIG`) is optional so that environment variables alone
    /// can configure the relay.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let file = match path {
            Some(path) if !path.is_file() => {
                return Err(ConfigError::new(
                    "--config",
                    format!("{} does not exist or is not a file", path.display()),
                ));
            }
            Some(path) => path.to_path_buf(),
            None => std::env::var_os(CONFIG_PATH_ENV)
                .map_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH), PathBuf::from),
        };
        Self::from_figment(Figment::from(Toml::file(file)))
    }

    /// Builds the configuration from a TOML string plus the environment; for
    /// tests and `check`.
    pub fn from_toml(toml: &str) -> Result<Config, ConfigError> {
        Self::from_figment(Figment::from(Toml::string(toml)))
    }

    fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
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
        config.validate()?;
        Ok(config)
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
