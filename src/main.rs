use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use sendbridge::config::Config;
use sendbridge::outln;
use sendbridge::terminal::StdoutClosed;

#[derive(Parser)]
#[command(
    version,
    about = "SMTP relay for legacy programs: local password in, app password or OAuth 2.0 out"
)]
struct Cli {
    /// Configuration file [default: $SENDBRIDGE_CONFIG or config/sendbridge.toml, optional]
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the relay
    Run,
    /// Validate the configuration, then sign in to each upstream account and print a table (no secrets)
    Check {
        /// Check only this account
        account: Option<String>,
    },
    /// Print an argon2 hash of a password read from stdin, for users.<name>.password_hash
    HashPassword,
    /// Make the running relay re-read its configuration and secret files (SIGHUP)
    Reload,
    /// Ask the running relay whether it is alive (exit 0) or not (exit 1, with the reason); for health checks
    Health {
        /// Whether it is ready: listeners up, spool writable, no account on hold
        #[arg(long)]
        ready: bool,
    },
    /// Show the running relay's accounts, queue and last rejections
    Status,
    /// Inspect and manage the queue (works while the relay runs)
    Queue {
        #[command(subcommand)]
        action: QueueAction,
    },
    /// Notices: bounces, delay warnings and admin alerts
    Notify {
        #[command(subcommand)]
        action: NotifyAction,
    },
    /// Sign in OAuth 2.0 accounts (Gmail, Microsoft 365) and show their tokens' state
    Oauth {
        #[command(subcommand)]
        action: OauthAction,
    },
    /// Print the listeners' TLS certificate (file, SHA-256 and SHA-1 fingerprints, names) for importing into printers; generates it when missing, as `run` does
    Cert,
}

#[derive(Subcommand)]
enum NotifyAction {
    /// Send a test alert through every configured channel (notify.admin by email, notify.webhook); exit 1 with the reason when one fails
    Test,
}

#[derive(Subcommand)]
enum OauthAction {
    /// Sign in once and store the refresh token; works headless (open the printed address on any machine)
    Login {
        account: String,
        /// Device-code flow: a code typed at the provider's page on any device (Microsoft)
        #[arg(long)]
        device: bool,
        /// No loopback listener for the browser's redirect: paste the address the browser ends on
        #[arg(long)]
        no_browser_listener: bool,
    },
    /// Each OAuth 2.0 account: flow, token store, refresh token present, last expiry (never a token)
    Status {
        /// Also get an access token now to see that it works
        #[arg(long)]
        check: bool,
    },
}

#[derive(Subcommand)]
enum QueueAction {
    /// List queued messages: id, state, account, from, recipients, size, age, attempts, last reply
    List {
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
    /// Show one message: envelope, history and headers
    Show { id: String },
    /// Make messages due now; held and rejected ones are sent again
    Retry {
        /// One message
        #[arg(conflicts_with_all = ["all", "account"], required_unless_present_any = ["all", "account"])]
        id: Option<String>,
        /// Every deferred, held and rejected message
        #[arg(long)]
        all: bool,
        /// Every deferred, held and rejected message of this account
        #[arg(long, conflicts_with = "all")]
        account: Option<String>,
    },
    /// Delete one message
    Delete { id: String },
}

/// Exit code for an invalid configuration (as sysexits' EX_USAGE family does).
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::HashPassword = cli.command {
        return report(sendbridge::cli::hash_password_from_stdin());
    }
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("sendbridge: invalid configuration: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match cli.command {
        Command::Check { account } => {
            sendbridge::tls::install_crypto_provider();
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            report(runtime.block_on(sendbridge::cli::check(&config, account.as_deref())))
        }
        Command::Run => {
            sendbridge::tls::install_crypto_provider();
            sendbridge::observe::init_tracing(&config.log);
            sendbridge::observe::metrics::install(&config.admin);
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            report(runtime.block_on(sendbridge::relay::run(config, cli.config)))
        }
        Command::Reload => report(sendbridge::relay::signal_reload(&config)),
        Command::Health { ready } => report(sendbridge::cli::health(&config, ready)),
        Command::Status => report(sendbridge::cli::status(&config)),
        Command::Queue { action } => report(queue(&config, action)),
        Command::Oauth { action } => {
            sendbridge::tls::install_crypto_provider();
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            report(runtime.block_on(oauth(&config, action)))
        }
        Command::Notify {
            action: NotifyAction::Test,
        } => {
            sendbridge::tls::install_crypto_provider();
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            report(runtime.block_on(sendbridge::cli::notify_test(&config)))
        }
        Command::Cert => report(sendbridge::cli::cert(&config)),
        Command::HashPassword => unreachable!("handled above"),
    }
}

fn queue(config: &Config, action: QueueAction) -> anyhow::Result<()> {
    use sendbridge::cli::{queue_list, queue_show};
    use sendbridge::spool::operations::{RetryTarget, delete, retry};
    let spool = sendbridge::spool::Spool::open(&config.spool.dir)?;
    match action {
        QueueAction::List { json } => queue_list(&spool, json),
        QueueAction::Show { id } => queue_show(&spool, &id),
        QueueAction::Retry { id, all, account } => {
            let target = match (id, all, account) {
                (Some(id), _, _) => RetryTarget::One(id),
                (None, _, Some(account)) => RetryTarget::Account(account),
                _ => RetryTarget::All,
            };
            let retried = retry(&spool, target)?;
            for skipped in &retried.skipped {
                outln!("{skipped}")?;
            }
            outln!(
                "{} message(s) due now; the running relay sends them within delivery.scan_interval",
                retried.due
            )?;
            Ok(())
        }
        QueueAction::Delete { id } => {
            delete(&spool, &id)?;
            outln!("deleted {id}")?;
            Ok(())
        }
    }
}

/// Bounds `oauth login` from printing the address to getting the code.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(600);

async fn oauth(config: &Config, action: OauthAction) -> anyhow::Result<()> {
    match action {
        OauthAction::Login {
            account,
            device,
            no_browser_listener,
        } => {
            let options = sendbridge::oauth::LoginOptions {
                device,
                no_listener: no_browser_listener,
                timeout: LOGIN_TIMEOUT,
            };
            sendbridge::oauth::login(config, &account, &options).await
        }
        OauthAction::Status { check } => sendbridge::oauth::status(config, check).await,
    }
}

/// What a shell reports for a program that SIGPIPE ended, as it ends
/// other programs whose reader went away (`| head`).
const EXIT_STDOUT_CLOSED: u8 = 128 + libc::SIGPIPE as u8;

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.is::<StdoutClosed>() => ExitCode::from(EXIT_STDOUT_CLOSED),
        Err(err) => {
            eprintln!("sendbridge: {err:#}");
            ExitCode::FAILURE
        }
    }
}
