//! Subcommands besides `run`.

use std::io::Read;

use anyhow::Context;

use crate::config::Config;
use crate::secret::Secret;
use crate::session::hash_password;

/// `sendbridge hash-password`: reads a password from stdin (one line, the
/// newline is not part of it) and prints its argon2 hash for `password_hash`.
pub fn hash_password_from_stdin() -> anyhow::Result<()> {
    let mut input = String::new();
    std::io::stdin()
        .take(4096)
        .read_to_string(&mut input)
        .context("reading the password from stdin")?;
    let password = input.strip_suffix('\n').unwrap_or(&input);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        anyhow::bail!(
            "no password on stdin; e.g. `printf %s 'old-password' | sendbridge hash-password`"
        );
    }
    println!("{}", hash_password(&Secret::new(password))?);
    Ok(())
}

/// `sendbridge check`: validates the configuration and summarises it
/// without printing any secret.
pub fn check(config: &Config) {
    println!("configuration is valid");
    println!("listen: {}", config.server.listen);
    if let Some(tls) = config.server.listen_tls {
        println!("listen_tls: {tls}");
    }
    for (name, account) in &config.accounts {
        println!(
            "account {name}: {}@{}:{} ({:?}), sender {}",
            account.username,
            account.host,
            account.port,
            account.tls_mode(),
            account.sender()
        );
    }
    for (name, user) in &config.users {
        println!(
            "user {name}: sends through {}",
            user.account.as_deref().unwrap_or("-")
        );
    }
    if !config.server.trusted_networks.is_empty() {
        println!(
            "trusted networks (no AUTH, account {}): {:?}",
            config.server.default_account.as_deref().unwrap_or("-"),
            config.server.trusted_networks
        );
    }
}
