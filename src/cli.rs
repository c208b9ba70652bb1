//! Subcommands besides `run`.

use std::borrow::Cow;
use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context;
use rustls::ProtocolVersion;

use crate::admin::client::AdminClient;
use crate::admin::status::{Readiness, Status};
use crate::config::{AccountConfig, Config, TlsProfile, UpstreamTls, preset};
use crate::maildrop::Maildrop;
use crate::oauth::token_service;
use crate::policy::{open_relay_warnings, open_relay_warnings_for};
use crate::routes::Routes;
use crate::secret::Secret;
use crate::spool::operations::locate;
use crate::spool::{Spool, State, unix_millis};
use crate::terminal::{format_time, table};
use crate::transport::{Deferral, Outcome, Transport};
use crate::users::hash_password;
use crate::{out, outln};

/// `health` runs as a container health check: it must answer quickly.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

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
    outln!("{}", hash_password(&Secret::new(password))?)?;
    Ok(())
}

/// `sendbridge cert`: the certificate the listeners present (generated
/// where `run` would generate it, when missing), with what a device's
/// certificate import asks for.
pub fn cert(config: &Config) -> anyhow::Result<()> {
    let pair = crate::tls::certificate(&config.tls, &config.server.hostname, &config.spool.dir)?
        .context("no certificate, and none can be generated: set tls.cert and tls.key")?;
    let cert = crate::tls::self_signed::describe(&pair.cert)?;
    let path = std::path::absolute(&cert.path).unwrap_or(cert.path);
    outln!("certificate: {}", path.display())?;
    outln!("SHA-256:     {}", cert.sha256)?;
    outln!("SHA-1:       {}", cert.sha1)?;
    outln!("names:       {}", cert.names.join(", "))?;
    outln!("valid until: {}", cert.not_after)?;
    Ok(())
}

/// `sendbridge check [ACCOUNT]`: summarises the configuration, then signs
/// in to every upstream account (or only `only`) at once and prints a table.
/// An error when any sign-in fails. Prints no secret.
pub async fn check(config: &Config, only: Option<&str>) -> anyhow::Result<()> {
    let accounts = accounts_to_check(config, only)?;
    let tokens = token_service(&config.spool.dir);
    let upstreams = accounts
        .iter()
        .map(|(name, account)| Transport::new(name, account, &config.server.hostname, &tokens))
        .map(|upstream| upstream.map(Arc::new))
        .collect::<anyhow::Result<Vec<_>>>()?;
    summarise(config)?;
    if upstreams.is_empty() {
        outln!("\nno upstream account to sign in to")?;
        return Ok(());
    }
    let attempts: Vec<_> = upstreams
        .iter()
        .map(|upstream| tokio::spawn(sign_in(upstream.clone())))
        .collect();
    let mut rows = Vec::new();
    for (((_, account), upstream), attempt) in accounts.into_iter().zip(&upstreams).zip(attempts) {
        let (tls_version, result, access) = attempt.await?;
        let mut row = CheckRow::new(upstream, account, tls_version, result);
        if let (Some(access), "ok") = (access, row.auth) {
            row.detail = access;
        }
        rows.push(row);
    }
    out!("\n{}", check_table(&rows))?;
    let failed = rows.iter().filter(|row| row.auth != "ok").count();
    anyhow::ensure!(
        failed == 0,
        "{failed} of {} account(s) could not sign in",
        rows.len()
    );
    Ok(())
}

/// Every account, or just the one named; an unknown name lists the known ones.
fn accounts_to_check<'a>(
    config: &'a Config,
    only: Option<&str>,
) -> anyhow::Result<Vec<(&'a String, &'a AccountConfig)>> {
    let chosen: Vec<_> = config
        .accounts
        .iter()
        .filter(|(name, _)| only.is_none_or(|only| only == name.as_str()))
        .collect();
    match only {
        Some(only) if chosen.is_empty() => {
            let known = config.accounts.keys().cloned().collect::<Vec<_>>();
            let known = if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            };
            anyhow::bail!("no account named {only:?} (configured: {known})")
        }
        _ => Ok(chosen),
    }
}

/// Connects, secures, signs in and says goodbye: what `run` does before
/// its first message. The TLS version negotiated, also when signing in
/// then failed, and for an API transport what its access allows.
async fn sign_in(
    upstream: Arc<Transport>,
) -> (Option<ProtocolVersion>, Result<(), Outcome>, Option<String>) {
    let mut tls_version = None;
    let result = upstream.probe(&mut tls_version).await;
    let access = match result {
        Ok(()) => upstream.access().await,
        Err(_) => None,
    };
    (tls_version, result, access)
}

/// One account's line in the `check` table.
struct CheckRow {
    account: String,
    server: String,
    tls: String,
    auth: &'static str,
    /// The reply or the reason.
    detail: String,
    /// What to fix, printed beneath the row.
    hint: Option<String>,
}

impl CheckRow {
    fn new(
        upstream: &Transport,
        account: &AccountConfig,
        tls_version: Option<ProtocolVersion>,
        result: Result<(), Outcome>,
    ) -> Self {
        let (auth, detail, hint) = match result {
            Ok(()) => ("ok", format!("signed in as {}", account.username), None),
            Err(outcome) => failure(outcome),
        };
        CheckRow {
            account: upstream.name().to_string(),
            server: match account.api_url() {
                Some(url) => url.to_string(),
                None => format!("{}:{}", account.host, account.port),
            },
            tls: match account.transport.is_api() {
                true => "https".to_string(),
                false => tls_name(tls_version, account.tls_mode()),
            },
            auth,
            detail,
            hint,
        }
    }

    /// The columns of the table, in order.
    fn cells(&self) -> [&str; 5] {
        [
            &self.account,
            &self.server,
            &self.tls,
            self.auth,
            &self.detail,
        ]
    }
}

/// The AUTH column, the reply or reason, and the hint for a failed sign-in.
fn failure(outcome: Outcome) -> (&'static str, String, Option<String>) {
    match outcome {
        Outcome::AuthFailed(failure) => ("refused", failure.reply.one_line(), failure.hint),
        // No SMTP reply to show: connecting, TLS or a timeout failed; the
        // reason says which, and what to change, in its cell.
        Outcome::Deferred(deferral @ Deferral { reply: None, .. }) => {
            ("failed", deferral.explained(), None)
        }
        Outcome::Deferred(Deferral {
            reply: Some(reply),
            hint,
            ..
        }) => ("error", reply.one_line(), hint),
        Outcome::Rejected(failure) | Outcome::OverLimit(failure) => {
            ("error", failure.reply.one_line(), failure.hint)
        }
        Outcome::Delivered(reply) => ("error", reply.one_line(), None),
    }
}

/// "TLSv1.3" as operators write it (rustls spells it `TLSv1_3`); "none"
/// for an account without TLS, "-" when the attempt ended before TLS.
fn tls_name(version: Option<ProtocolVersion>, mode: UpstreamTls) -> String {
    match (version, mode) {
        (Some(ProtocolVersion::TLSv1_3), _) => "TLSv1.3".to_string(),
        (Some(ProtocolVersion::TLSv1_2), _) => "TLSv1.2".to_string(),
        (Some(other), _) => format!("{other:?}"),
        (None, UpstreamTls::None) => "none".to_string(),
        (None, _) => "-".to_string(),
    }
}

/// The `check` table: each hint on an indented line of its own.
fn check_table(rows: &[CheckRow]) -> String {
    const HEADER: [&str; 5] = ["ACCOUNT", "SERVER", "TLS", "AUTH", "REPLY / REASON"];
    let rows: Vec<_> = rows
        .iter()
        .map(|row| {
            (
                row.cells(),
                row.hint.as_ref().map(|hint| format!("hint: {hint}")),
            )
        })
        .collect();
    table(HEADER, &rows)
}

fn summarise(config: &Config) -> anyhow::Result<()> {
    outln!("configuration is valid")?;
    outln!("listen: {}", config.server.listen)?;
    if let Some(tls) = config.server.listen_tls {
        outln!("listen_tls: {tls}")?;
    }
    for (n, listener) in config.listeners.iter().enumerate() {
        let key = format!("listeners[{n}]");
        let trust = match &listener.trusted_networks {
            _ if listener.require_auth => "every client signs in".to_string(),
            Some(networks) => format!("trusted networks {networks:?}"),
            None => "trusted networks of server.trusted_networks".to_string(),
        };
        outln!(
            "{key}: {} (tls {}, profile {}), {trust}",
            listener.address,
            listener.tls.name(),
            listener.tls_profile.name()
        )?;
        if listener.tls_profile == TlsProfile::Legacy {
            outln!("warning: {}", crate::tls::legacy::warning(listener.address))?;
        }
        let networks = listener.trusted_networks.as_deref().unwrap_or_default();
        for warning in open_relay_warnings_for(&format!("{key}.trusted_networks"), networks) {
            outln!("warning: {warning}")?;
        }
    }
    for note in &config.notes {
        outln!("note: {note}")?;
    }
    for (name, account) in &config.accounts {
        match account.api_url() {
            Some(url) => outln!(
                "account {name}: {} through {} at {url}",
                account.username,
                account.transport.name()
            )?,
            None => outln!(
                "account {name}: {}@{}:{} ({:?}), sender {}",
                account.username,
                account.host,
                account.port,
                account.tls_mode(),
                account.sender()
            )?,
        }
        if let Some(provider) = account.provider {
            outln!("  preset {provider}: {}", preset(provider).setup_for(name))?;
        }
    }
    for (name, user) in &config.users {
        outln!(
            "user {name}: sends through {}",
            user.account
                .as_deref()
                .unwrap_or("the account its routes choose")
        )?;
    }
    if let Some(user) = &config.sendmail.user {
        outln!("sendmail: sends as user {user}")?;
    }
    for (n, route) in Routes::new(&config.routes).views().iter().enumerate() {
        outln!("route {}: {route}", n + 1)?;
    }
    if !config.server.trusted_networks.is_empty() {
        outln!(
            "trusted networks (no AUTH, account {}): {:?}",
            config.server.default_account.as_deref().unwrap_or("-"),
            config.server.trusted_networks
        )?;
    }
    for warning in open_relay_warnings(&config.server.trusted_networks) {
        outln!("warning: {warning}")?;
    }
    Ok(())
}

/// `sendbridge health [--ready]`: asks the running relay's admin interface
/// whether it is alive (or ready); an error with the reason unless it
/// answers 200.
pub fn health(config: &Config, ready: bool) -> anyhow::Result<()> {
    let path = if ready { "/readyz" } else { "/healthz" };
    let answer = AdminClient::new(&config.admin, HEALTH_TIMEOUT)?.get(path)?;
    if answer.status == 200 {
        outln!("{}", if ready { "ready" } else { "ok" })?;
        return Ok(());
    }
    let reason = match serde_json::from_str::<Readiness>(&answer.body) {
        Ok(readiness) => readiness.checks.problems().join("; "),
        Err(_) => answer.body.lines().next().unwrap_or_default().to_string(),
    };
    anyhow::bail!("{path} answered {}: {reason}", answer.status)
}

/// `sendbridge status`: what the status page shows, as tables.
pub fn status(config: &Config) -> anyhow::Result<()> {
    let answer = AdminClient::new(&config.admin, STATUS_TIMEOUT)?.get("/status.json")?;
    anyhow::ensure!(
        answer.status == 200,
        "/status.json answered {}: {}",
        answer.status,
        answer.body.lines().next().unwrap_or_default()
    );
    let status: Status =
        serde_json::from_str(&answer.body).context("/status.json answered something else")?;
    out!("{}", status_tables(&status))?;
    Ok(())
}

fn status_tables(status: &Status) -> String {
    let accounts: Vec<_> = status
        .accounts
        .iter()
        .map(|account| {
            let reply = account
                .hold
                .as_ref()
                .map_or("-", |hold| hold.reply.as_str());
            let cells = [
                account.name.clone(),
                account.state().to_string(),
                account.held.to_string(),
                account.rejected.to_string(),
                reply.to_string(),
            ];
            let hint = account
                .hold
                .as_ref()
                .map(|hold| format!("hint: {}", hold.hint));
            (cells, hint)
        })
        .collect();
    let header = ["ACCOUNT", "STATE", "HELD", "REJECTED", "PROVIDER REPLY"];
    let mut text = table(header, &accounts);
    let counts: Vec<_> = status
        .queue
        .iter()
        .map(|(state, count)| format!("{state} {count}"))
        .collect();
    text += &format!("\nQUEUE  {}\n", counts.join("  "));
    for (n, route) in status.routes.iter().enumerate() {
        text += &format!("ROUTE {}  {route}\n", n + 1);
    }
    if status.rejections.is_empty() {
        text += "\nLAST REJECTIONS  none\n";
        return text;
    }
    let rejections: Vec<_> = status
        .rejections
        .iter()
        .map(|rejection| {
            let cells = [
                format_time(rejection.at),
                rejection.id.clone(),
                rejection.account.clone(),
                rejection.recipients.join(", "),
                first_line(rejection.last_reply.as_deref().unwrap_or("-")).into_owned(),
            ];
            (cells, None)
        })
        .collect();
    let header = ["REJECTED AT", "ID", "ACCOUNT", "RECIPIENTS", "LAST REPLY"];
    text += &format!("\nLAST REJECTIONS\n{}", table(header, &rejections));
    text
}

/// `sendbridge queue list`: every queued message, oldest first.
pub fn queue_list(spool: &Spool, json: bool) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for state in State::ALL {
        for envelope in spool.list(state)? {
            rows.push((state, envelope));
        }
    }
    rows.sort_by(|a, b| a.1.id.cmp(&b.1.id));
    if json {
        let entries: Vec<_> = rows
            .iter()
            .map(|(state, envelope)| serde_json::json!({ "state": state, "envelope": envelope }))
            .collect();
        outln!("{}", serde_json::to_string_pretty(&entries)?)?;
        return Ok(());
    }
    // Mail `sendmail` queued that the relay has not taken yet (it is not
    // running, or takes it now).
    let dropped = Maildrop::new(spool.root()).ids().map_or(0, |ids| ids.len());
    if dropped > 0 {
        outln!("{dropped} message(s) in the maildrop, waiting for the relay to pick them up")?;
    }
    if rows.is_empty() {
        outln!("the queue is empty")?;
        return Ok(());
    }
    outln!(
        "{:<20}  {:<8}  {:<10}  {:<28}  {:>4}  {:>9}  {:>6}  {:>4}  LAST REPLY",
        "ID",
        "STATE",
        "ACCOUNT",
        "FROM",
        "RCPT",
        "SIZE",
        "AGE",
        "TRY"
    )?;
    let now = unix_millis();
    for (state, envelope) in rows {
        outln!(
            "{:<20}  {:<8}  {:<10}  {:<28}  {:>4}  {:>9}  {:>6}  {:>4}  {}",
            envelope.id,
            state,
            clip(&envelope.account, 10),
            clip(&envelope.mail_from, 28),
            envelope.recipients.len(),
            envelope.size,
            age(now.saturating_sub(envelope.received_at)),
            envelope.attempts,
            first_line(envelope.last_reply.as_deref().unwrap_or("-")),
        )?;
    }
    Ok(())
}

/// `sendbridge queue show ID`: envelope, history and the message headers.
pub fn queue_show(spool: &Spool, id: &str) -> anyhow::Result<()> {
    let state = locate(spool, id)?;
    let envelope = spool.read_envelope(state, id)?;
    outln!("id:         {}", envelope.id)?;
    outln!("state:      {state}")?;
    outln!("account:    {}", envelope.account)?;
    outln!("from:       {}", envelope.mail_from)?;
    outln!("recipients: {}", envelope.recipients.join(", "))?;
    outln!("size:       {} bytes", envelope.size)?;
    outln!(
        "client:     {} (user {}, session {})",
        envelope.client,
        envelope.user.as_deref().unwrap_or("-"),
        envelope.session_id
    )?;
    outln!("attempts:   {}", envelope.attempts)?;
    // A provider's reply may span lines: each under the first.
    outln!(
        "last reply: {}",
        envelope
            .last_reply
            .as_deref()
            .unwrap_or("-")
            .replace('\n', "\n            ")
    )?;
    outln!("\nhistory:")?;
    for event in &envelope.history {
        outln!(
            "  {}  {}",
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(event.at)),
            event.what
        )?;
    }
    outln!("\nheaders:")?;
    let message = spool.read_message(id)?;
    let end = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(message.len(), |at| at + 2);
    out!(
        "{}",
        String::from_utf8_lossy(&message[..end.min(64 * 1024)])
    )?;
    Ok(())
}

/// A table cell of a reply that may span lines: its first line, and " …"
/// when more follow (`queue show` and `--json` have the whole reply).
fn first_line(reply: &str) -> Cow<'_, str> {
    match reply.split_once('\n') {
        Some((first, _)) => format!("{} …", first.trim_end()).into(),
        None => reply.into(),
    }
}

fn clip(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    let mut clipped: String = text.chars().take(width - 1).collect();
    clipped.push('…');
    clipped
}

fn age(millis: u64) -> String {
    let secs = millis / 1000;
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

/// `sendbridge notify test`: a test alert through every configured channel;
/// an error naming each channel that failed, or that none is configured.
pub async fn notify_test(config: &Config) -> anyhow::Result<()> {
    let tokens = token_service(&config.spool.dir);
    let tried = crate::notify::send_test(config, &tokens).await;
    if tried.is_empty() {
        anyhow::bail!(
            "no notice channel configured: set notify.admin (email addresses) and/or notify.webhook"
        );
    }
    let mut failed = Vec::new();
    for tried in &tried {
        match &tried.result {
            Ok(answer) => outln!("{}: sent ({answer})", tried.channel)?,
            Err(why) => {
                outln!("{}: FAILED: {why}", tried.channel)?;
                failed.push(tried.channel.clone());
            }
        }
    }
    if !failed.is_empty() {
        anyhow::bail!("the test notice could not be sent by {}", failed.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_cell_is_its_first_line_marked_when_more_follow() {
        let table = [
            ("421 4.7.0 Try again later", "421 4.7.0 Try again later"),
            (
                "550 5.1.1 The email account that you tried to reach does not exist. Please try\n https://support.google.com/mail/?p=NoSuchUser",
                "550 5.1.1 The email account that you tried to reach does not exist. Please try …",
            ),
            ("-", "-"),
        ];
        for (reply, cell) in table {
            assert_eq!(first_line(reply), cell);
        }
    }

    #[test]
    fn status_lists_the_routes_in_order_after_the_queue() {
        let route = |sender: &str, account: &str| crate::routes::RouteView {
            sender: sender.to_string(),
            matches: crate::config::RouteMatch::Envelope,
            account: account.to_string(),
            users: Vec::new(),
        };
        let status = Status {
            accounts: Vec::new(),
            queue: [("held".to_string(), 0)].into(),
            rejections: Vec::new(),
            notices: Vec::new(),
            routes: vec![route("@billing.example", "billing"), route("*", "gmail")],
        };
        let text = status_tables(&status);
        let routes: Vec<&str> = text
            .lines()
            .filter(|line| line.starts_with("ROUTE"))
            .collect();
        assert_eq!(
            routes,
            [
                "ROUTE 1  @billing.example (envelope sender) → billing, for every client",
                "ROUTE 2  * (envelope sender) → gmail, for every client",
            ],
            "{text}"
        );
    }
}
