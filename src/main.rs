use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use sendbridge::config::{Config, Secrets};
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
    /// The sendmail command line for scripts, cron and PHP (-t, -i, -f, -F; message on stdin); also runs as `sendmail` through a symbolic link
    #[command(disable_help_flag = true, disable_version_flag = true)]
    Sendmail {
        /// sendmail's options and recipients
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
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

impl Command {
    /// Only the commands that sign in upstream or send mail themselves read
    /// the secrets; the others start without app passwords in the
    /// environment.
    fn secrets(&self) -> Secrets {
        match self {
            Command::Run
            | Command::Check { .. }
            | Command::Oauth { .. }
            | Command::Notify { .. } => Secrets::All,
            Command::Health { .. } | Command::Status => Secrets::AdminToken,
            Command::HashPassword
            | Command::Cert
            | Command::Reload
            | Command::Queue { .. }
            | Command::Sendmail { .. } => Secrets::None,
        }
    }
}

fn main() -> ExitCode {
    let mut args = std::env::args_os();
    let program = args.next().unwrap_or_default();
    // `/usr/sbin/sendmail -> sendbridge`: the sendmail command line as is.
    if Path::new(&program).file_name() == Some("sendmail".as_ref()) {
        return sendmail(None, args.collect());
    }
    let cli = Cli::parse();
    if let Command::HashPassword = cli.command {
        return report(sendbridge::cli::hash_password_from_stdin());
    }
    if let Command::Sendmail { args } = cli.command {
        return sendmail(cli.config, args);
    }
    let config = match Config::load_needing(cli.config.as_deref(), cli.command.secrets()) {
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
            // On a worker rather than the thread that blocks on it: there
            // the accept loop would hand every new session to a worker
            // through a wake-up of another thread.
            let relay = runtime.spawn(sendbridge::relay::run(config, cli.config));
            report(
                runtime
                    .block_on(relay)
                    .unwrap_or_else(|panic| Err(panic.into())),
            )
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
        Command::HashPassword | Command::Sendmail { .. } => unreachable!("handled above"),
    }
}

/// `sendbridge sendmail ARGS` or `sendmail ARGS`: sysexits codes, one line
/// on stderr when something went wrong or the relay is not running.
fn sendmail(config_path: Option<PathBuf>, args: Vec<OsString>) -> ExitCode {
    use sendbridge::sendmail::{EX_CONFIG, EX_USAGE, Failure, Queued, parse_args, send};
    let result = (|| {
        let args = args
            .into_iter()
            .map(|arg| arg.into_string())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|arg| Failure {
                code: EX_USAGE,
                message: format!("{arg:?} is not UTF-8"),
            })?;
        let invocation = parse_args(&args)?;
        let path = invocation.config.clone().or(config_path);
        let config =
            Config::load_needing(path.as_deref(), Secrets::None).map_err(|err| Failure {
                code: EX_CONFIG,
                message: format!("invalid configuration: {err}"),
            })?;
        send(&config, &invocation, std::io::stdin().lock())
    })();
    match result {
        Ok(Queued::RelayWoken) => ExitCode::SUCCESS,
        Ok(Queued::RelayNotRunning) => {
            eprintln!(
                "sendbridge sendmail: queued; the relay is not running, it will be sent when sendbridge starts"
            );
            ExitCode::SUCCESS
        }
        Err(failure) => {
            eprintln!("sendbridge sendmail: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

fn queue(config: &Config, action: QueueAction) -> anyhow::Result<()> {
    use sendbridge::cli::{queue_list, queue_show};
    use sendbridge::spool::operations::{RetryTarget, delete, retry};
    let spool = sendbridge::spool::Spool::open(config.existing_spool_dir()?)?;
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
