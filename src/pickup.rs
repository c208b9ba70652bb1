//! The relay's side of the maildrop: each message `sendbridge sendmail`
//! dropped is taken as a local submission by `sendmail.user`, with the
//! account choice of a client signed in as that user (`Policy::account_for`),
//! the same limits and rewrites as SMTP, then handed to the queue. Drops are
//! taken at start (mail queued while the relay was down), when `sendmail`
//! wakes the relay, and every `delivery.scan_interval` in case a wake-up
//! was lost. A drop is removed only once the queue has it; one that can
//! never be taken is moved to `maildrop/refused/` and logged with the fix.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UnixDatagram;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::address::{Role, parse_path};
use crate::maildrop::{DropEnvelope, Maildrop};
use crate::observe;
use crate::policy::{Choice, Denied, Trust};
use crate::reply::{Refusal, Reply};
use crate::rewrite::{RewriteError, RewritePolicy, Trace, from_address, rewrite};
use crate::routes::FromHeader;
use crate::session::{SessionContext, Settings};
use crate::spool::{Envelope, State, unix_millis};
use crate::transport::BodyFlags;

/// Picks up the maildrop of a running relay.
pub struct Pickup {
    maildrop: Maildrop,
    ctx: Arc<SessionContext>,
    /// `None` when it could not be bound: the scan interval still applies.
    wake_ups: Option<UnixDatagram>,
    interval: Duration,
}

impl Pickup {
    /// Creates the maildrop and binds its wake-up socket, replacing one a
    /// relay that died left behind.
    pub fn bind(
        spool_dir: &Path,
        ctx: Arc<SessionContext>,
        interval: Duration,
    ) -> io::Result<Self> {
        let maildrop = Maildrop::new(spool_dir);
        maildrop.create()?;
        match maildrop.remove_abandoned() {
            Ok(0) => {}
            Ok(removed) => info!(
                removed,
                "removed files sendmail left half-written in the maildrop (never acknowledged)"
            ),
            Err(err) => warn!(error = %err, "cannot clean the maildrop"),
        }
        let socket = maildrop.socket_path();
        let _ = fs::remove_file(&socket);
        // 0600 like everything under the spool: only who may drop mail may
        // wake the relay (the folder is 0700 besides).
        let bound = UnixDatagram::bind(&socket).and_then(|wake_ups| {
            fs::set_permissions(&socket, fs::Permissions::from_mode(0o600))?;
            Ok(wake_ups)
        });
        let wake_ups = match bound {
            Ok(wake_ups) => Some(wake_ups),
            Err(err) => {
                warn!(
                    error = %err,
                    socket = %socket.display(),
                    "cannot listen for sendmail's wake-ups: mail from `sendbridge sendmail` is picked up every delivery.scan_interval instead (a shorter spool.dir keeps the socket path under 108 bytes)"
                );
                None
            }
        };
        Ok(Pickup {
            maildrop,
            ctx,
            wake_ups,
            interval,
        })
    }

    /// Takes drops until `stop` is cancelled, then waits for the ones being
    /// taken (each within `delivery.sync_timeout`).
    pub async fn run(self, stop: CancellationToken) {
        let taking = Arc::new(Mutex::new(HashSet::new()));
        let tasks = TaskTracker::new();
        let mut buffer = [0u8; 64];
        loop {
            self.scan(&taking, &tasks).await;
            let woken = async {
                match &self.wake_ups {
                    Some(socket) => drop(socket.recv(&mut buffer).await),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = woken => {}
                () = tokio::time::sleep(self.interval) => {}
                () = stop.cancelled() => break,
            }
        }
        tasks.close();
        tasks.wait().await;
        if self.wake_ups.is_some() {
            let _ = fs::remove_file(self.maildrop.socket_path());
        }
    }

    /// Starts taking every drop not being taken already.
    async fn scan(&self, taking: &Arc<Mutex<HashSet<String>>>, tasks: &TaskTracker) {
        let maildrop = self.maildrop.clone();
        let ids = match tokio::task::spawn_blocking(move || maildrop.ids()).await {
            Ok(Ok(ids)) => ids,
            Ok(Err(err)) => {
                warn!(error = %err, dir = %self.maildrop.dir().display(), "cannot read the maildrop");
                return;
            }
            Err(_) => return,
        };
        for id in ids {
            if !taking.lock().expect("taking lock").insert(id.clone()) {
                continue;
            }
            let (maildrop, ctx, taking) = (self.maildrop.clone(), self.ctx.clone(), taking.clone());
            tasks.spawn(async move {
                take(&maildrop, &ctx, &id).await;
                taking.lock().expect("taking lock").remove(&id);
            });
        }
    }
}

/// One drop into the queue, or aside.
async fn take(maildrop: &Maildrop, ctx: &SessionContext, id: &str) {
    let read = {
        let (maildrop, id) = (maildrop.clone(), id.to_string());
        tokio::task::spawn_blocking(move || maildrop.read(&id)).await
    };
    let (dropped, message) = match read {
        Ok(Ok(read)) => read,
        Ok(Err(err)) => {
            let refusal = Refusal::new("unreadable", format!("the drop is damaged: {err}"));
            return set_aside(
                maildrop,
                id,
                &Reply::new(554, [5, 6, 0], "Unreadable"),
                &refusal,
            );
        }
        Err(_) => return,
    };
    let settings = ctx.settings();
    let local = match local_submission(&settings, id, dropped, message, unix_millis() / 1000) {
        Ok(local) => local,
        Err((reply, refusal)) => return set_aside(maildrop, id, &reply, &refusal),
    };
    let (user, account, from, recipients, size) = (
        local.envelope.user.clone(),
        local.envelope.account.clone(),
        local.envelope.mail_from.clone(),
        local.envelope.recipients.len(),
        local.message.len(),
    );
    let submitted = ctx
        .delivery
        .submit(local.envelope, local.message)
        .await
        .answer_for_no_client()
        .await;
    // The drop goes first, so the log line below means it is done.
    match &submitted.refusal {
        None => {
            if let Err(err) = maildrop.remove(id) {
                // Taken again at the next scan: at least once, as over SMTP.
                error!(error = %err, drop = id, "cannot remove a drop the queue has taken");
            }
        }
        Some(refusal) if submitted.reply.code >= 500 => {
            set_aside(maildrop, id, &submitted.reply, refusal)
        }
        // Temporary (spool full, the account on hold in passthrough mode):
        // the drop waits for the next scan.
        Some(refusal) => warn!(
            drop = id,
            reply = %submitted.reply,
            reason = refusal.reason,
            hint = refusal.hint.as_deref().unwrap_or("-"),
            "a message from the maildrop waits: the queue refused it for now"
        ),
    }
    info!(
        id = submitted.id.as_deref().unwrap_or("-"),
        drop = id,
        state = submitted.state.map_or("-", State::dir_name),
        user = user.as_deref().unwrap_or("-"),
        account = %account,
        from = from.as_str(),
        recipients,
        size,
        rewrites = observe::list(&local.changes),
        reply = %submitted.reply,
        "message picked up from the maildrop"
    );
}

fn set_aside(maildrop: &Maildrop, id: &str, reply: &Reply, refusal: &Refusal) {
    let aside = maildrop.set_aside(id);
    let path = aside
        .as_ref()
        .map_or("-".to_string(), |p| p.display().to_string());
    error!(
        drop = id,
        reply = %reply,
        reason = refusal.reason,
        hint = refusal.hint.as_deref().unwrap_or("-"),
        kept = path,
        "a message from the maildrop cannot be sent: kept aside; fix the cause, then move it back into the maildrop folder to send it"
    );
}

/// A drop made ready for the queue.
#[derive(Debug)]
struct Local {
    envelope: Envelope,
    message: Vec<u8>,
    changes: Vec<String>,
}

/// Why a drop cannot be queued: what SMTP would have answered, and why.
type Refused = (Reply, Refusal);

fn refused(code: u16, status: [u8; 3], text: &str, reason: &'static str, hint: String) -> Refused {
    (Reply::new(code, status, text), Refusal::new(reason, hint))
}

/// What SMTP checks and repairs, for a drop: the user and its account, the
/// limits, the addresses, the From the command line asked for, the rewrites.
fn local_submission(
    settings: &Settings,
    id: &str,
    dropped: DropEnvelope,
    mut message: Vec<u8>,
    now_unix: u64,
) -> Result<Local, Refused> {
    // Routes see the sender asked for with -f, else the From field's.
    let from = from_address(&message);
    let routing_sender = match &dropped.mail_from {
        Some(asked) => parse_path(asked.as_bytes(), Role::Sender, true).unwrap_or_default(),
        None => from.clone().unwrap_or_default(),
    };
    let (user, account, policy) = sending_account(settings, &routing_sender, from.as_deref())?;
    let max = settings.server.max_message_size;
    if message.len() > max {
        return Err(refused(
            552,
            [5, 3, 4],
            "Message size exceeds fixed maximum message size",
            "too_large",
            format!("the message is larger than server.max_message_size ({max} bytes)"),
        ));
    }
    let (mail_from, recipients) = envelope_addresses(settings, &dropped, policy)?;
    let mut changes = Vec::new();
    if (dropped.mail_from.is_some() || dropped.full_name.is_some()) && !has_from_field(&message) {
        // The null sender (`-f '<>'`) is no From address.
        let address = match dropped.mail_from {
            Some(_) if !mail_from.is_empty() => &mail_from,
            _ => &policy.sender,
        };
        let field = from_field(dropped.full_name.as_deref(), address);
        message.splice(..0, field.into_bytes());
        changes.push("added From from -f/-F".to_string());
    }
    let trace = Trace {
        helo: "localhost".to_string(),
        client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        protocol: "local",
        session_id: id.to_string(),
        now_unix: now_unix as i64,
    };
    let rewritten = rewrite(message, policy, &trace).map_err(
        |RewriteError::LineTooLong { line, length }| {
            refused(
                550,
                [5, 6, 0],
                &format!("Line {line} is {length} octets long; at most 998 are allowed (RFC 5322)"),
                "long_lines",
                format!("set accounts.{account}.long_lines = \"wrap\" to wrap long lines"),
            )
        },
    )?;
    changes.extend(rewritten.changes);
    let flags = BodyFlags {
        eight_bit: !rewritten.message.is_ascii(),
        smtputf8: !mail_from.is_ascii() || recipients.iter().any(|r| !r.is_ascii()),
    };
    let envelope = Envelope {
        session_id: id.to_string(),
        client: format!("maildrop (uid {})", dropped.uid),
        user: Some(user),
        account,
        mail_from,
        recipients,
        flags,
        ..Envelope::default()
    };
    Ok(Local {
        envelope,
        message: rewritten.message,
        changes,
    })
}

/// `sendmail.user`, the account it sends through (chosen as for a client
/// signed in as that user, by its routes for `sender` and `from`) and that
/// account's rewrites.
fn sending_account<'a>(
    settings: &'a Settings,
    sender: &str,
    from: Option<&str>,
) -> Result<(String, String, &'a RewritePolicy), Refused> {
    let Some(name) = &settings.sendmail_user else {
        return Err(refused(
            451,
            [4, 3, 5],
            "No sender",
            "no_sendmail_user",
            "set sendmail.user to the [users] entry mail from `sendbridge sendmail` is sent as"
                .into(),
        ));
    };
    let Some(user) = settings.users.local(name) else {
        return Err(refused(
            451,
            [4, 3, 5],
            "No such user",
            "no_sendmail_user",
            format!("sendmail.user names \"{name}\", which is not in [users]"),
        ));
    };
    let account = settings
        .policy
        .account_for(
            Some(&user.user),
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            // A drop is the user's, never a trusted network's.
            &Trust::Nobody,
            sender,
            FromHeader::Received(from),
        )
        .map_err(|Denied { reply, refusal }| (reply, refusal))?;
    let Choice::Account(account) = account else {
        unreachable!("with the From field known the policy always chooses")
    };
    let Some(policy) = settings.rewrites.get(&account) else {
        return Err(refused(
            451,
            [4, 3, 5],
            "No such upstream account configured",
            "no_account",
            format!("add [accounts.{account}] to the configuration"),
        ));
    };
    Ok((user.user, account, policy))
}

/// The envelope sender (`-f`, else the account's) and the recipients, in
/// RFC 5321 form and within `server.max_recipients`.
fn envelope_addresses(
    settings: &Settings,
    dropped: &DropEnvelope,
    policy: &RewritePolicy,
) -> Result<(String, Vec<String>), Refused> {
    let bad_address = |address: &str| {
        let hint = format!("{address:?} is not an address");
        refused(
            501,
            [5, 1, 3],
            "Invalid address syntax (RFC 5321)",
            "bad_address",
            hint,
        )
    };
    let max = settings.server.max_recipients;
    if dropped.recipients.len() > max {
        return Err(refused(
            452,
            [4, 5, 3],
            "Too many recipients",
            "too_many_recipients",
            format!("more than server.max_recipients ({max}) recipients"),
        ));
    }
    let recipients = dropped
        .recipients
        .iter()
        .map(|r| parse_path(r.as_bytes(), Role::Recipient, true).map_err(|_| bad_address(r)))
        .collect::<Result<Vec<_>, _>>()?;
    if recipients.is_empty() {
        return Err(refused(
            554,
            [5, 5, 1],
            "No valid recipients",
            "no_recipients",
            "sendmail was given no recipient".into(),
        ));
    }
    let mail_from = match &dropped.mail_from {
        Some(from) => {
            parse_path(from.as_bytes(), Role::Sender, true).map_err(|_| bad_address(from))?
        }
        None => policy.sender.clone(),
    };
    Ok((mail_from, recipients))
}

/// Whether the header section has a From field.
fn has_from_field(message: &[u8]) -> bool {
    message
        .split(|&b| b == b'\n')
        .take_while(|line| !line.is_empty() && *line != b"\r")
        .any(|line| line.len() >= 5 && line[..5].eq_ignore_ascii_case(b"from:"))
}

/// `From: "Full Name" <address>`, the name quoted, or RFC 2047-encoded
/// when it is not ASCII; control characters are dropped.
fn from_field(full_name: Option<&str>, address: &str) -> String {
    let name: String = full_name
        .unwrap_or_default()
        .chars()
        .filter(|c| !c.is_control())
        .collect();
    let name = name.trim();
    if name.is_empty() {
        return format!("From: <{address}>\r\n");
    }
    let name = if name.is_ascii() {
        format!("\"{}\"", name.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        use base64::Engine;
        let encoded = base64::engine::general_purpose::STANDARD.encode(name);
        format!("=?utf-8?b?{encoded}?=")
    };
    format!("From: {name} <{address}>\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// Account `gmail`, user `invoices`, at most 200 bytes and 2 recipients.
    fn settings(sendmail: &str) -> Settings {
        let toml = format!(
            "[server]\nmax_message_size = 200\nmax_recipients = 2\n{sendmail}\n[accounts.gmail]\nusername = \"me@gmail.com\"\npassword = \"abcdabcdabcdabcd\"\n[users.invoices]\npassword = \"old-password\"\n"
        );
        Settings::new(&Config::from_toml(&toml).unwrap()).unwrap()
    }

    const AS_INVOICES: &str = "[sendmail]\nuser = \"invoices\"";

    fn dropped(from: Option<&str>, name: Option<&str>, to: &[&str]) -> DropEnvelope {
        DropEnvelope {
            mail_from: from.map(str::to_string),
            recipients: to.iter().map(|r| r.to_string()).collect(),
            full_name: name.map(str::to_string),
            uid: 1000,
        }
    }

    #[test]
    fn a_drop_goes_as_the_sendmail_user_through_its_account_with_the_from_asked_for() {
        let settings = settings(AS_INVOICES);
        // (-f, -F, message, envelope sender, From field)
        let cases = [
            (
                None,
                None,
                "Subject: x\r\n\r\nbody\r\n",
                "me@gmail.com",
                "From: me@gmail.com\r\n",
            ),
            (
                Some("backup@example.com"),
                Some("Backup Job"),
                "Subject: x\r\n\r\nbody\r\n",
                "backup@example.com",
                "From: \"Backup Job\" <backup@example.com>\r\n",
            ),
            (
                None,
                Some("Cron Daemon"),
                "Subject: x\r\n\r\nbody\r\n",
                "me@gmail.com",
                "From: \"Cron Daemon\" <me@gmail.com>\r\n",
            ),
            (
                Some("backup@example.com"),
                Some("Ignored"),
                "From: me@gmail.com\r\n\r\nbody\r\n",
                "backup@example.com",
                "From: me@gmail.com\r\n",
            ),
        ];
        for (from, name, message, sender, from_field) in cases {
            let drop = dropped(from, name, &["a@example.com"]);
            let local =
                local_submission(&settings, "d1", drop, message.into(), 1_700_000_000).unwrap();
            let text = String::from_utf8(local.message).unwrap();
            assert_eq!(local.envelope.account, "gmail");
            assert_eq!(local.envelope.user.as_deref(), Some("invoices"));
            assert_eq!(local.envelope.mail_from, sender, "{from:?} {name:?}");
            assert_eq!(local.envelope.recipients, ["a@example.com"]);
            assert_eq!(local.envelope.client, "maildrop (uid 1000)");
            assert!(
                text.contains(from_field) && text.matches("From: ").count() == 1,
                "{text}"
            );
            assert!(
                text.starts_with("Received: from localhost ([127.0.0.1])"),
                "{text}"
            );
            assert!(text.contains("with local id d1;"), "{text}");
        }
    }

    #[test]
    fn a_drop_is_routed_by_its_sender_or_else_its_from_field() {
        let toml = "[sendmail]\nuser = \"invoices\"\n\
            [accounts.gmail]\nusername = \"me@gmail.com\"\npassword = \"abcdabcdabcdabcd\"\n\
            [accounts.billing]\nusername = \"billing@gmail.com\"\npassword = \"abcdabcdabcdabcd\"\n\
            [users.invoices]\npassword = \"old-password\"\naccount = \"gmail\"\n\
            [[routes]]\nsender = \"@billing.example\"\naccount = \"billing\"\n";
        let settings = Settings::new(&Config::from_toml(toml).unwrap()).unwrap();
        // (-f, message, account)
        let cases = [
            (
                Some("a@billing.example"),
                "Subject: x\r\n\r\nb\r\n",
                "billing",
            ),
            (None, "From: b@billing.example\r\n\r\nb\r\n", "billing"),
            // -f decides over the From field.
            (
                Some("c@else.example"),
                "From: b@billing.example\r\n\r\nb\r\n",
                "gmail",
            ),
            (None, "Subject: x\r\n\r\nb\r\n", "gmail"),
        ];
        for (from, message, account) in cases {
            let drop = dropped(from, None, &["a@example.com"]);
            let local =
                local_submission(&settings, "d1", drop, message.into(), 1_700_000_000).unwrap();
            assert_eq!(local.envelope.account, account, "{from:?} {message:?}");
        }
    }

    #[test]
    fn drops_smtp_would_refuse_are_refused_naming_the_key() {
        let large = format!("Subject: x\r\n\r\n{}\r\n", "x".repeat(200));
        // (sendmail section, recipients, message, reason, hint names)
        let cases: [(&str, &[&str], &str, &str, &str); 5] = [
            (
                "",
                &["a@example.com"],
                "Subject: x\r\n\r\n",
                "no_sendmail_user",
                "sendmail.user",
            ),
            (
                AS_INVOICES,
                &["a@example.com"],
                &large,
                "too_large",
                "server.max_message_size",
            ),
            (
                AS_INVOICES,
                &["a@example.com", "b@example.com", "c@example.com"],
                "Subject: x\r\n\r\n",
                "too_many_recipients",
                "server.max_recipients",
            ),
            (
                AS_INVOICES,
                &[],
                "Subject: x\r\n\r\n",
                "no_recipients",
                "no recipient",
            ),
            (
                AS_INVOICES,
                &["not an address"],
                "Subject: x\r\n\r\n",
                "bad_address",
                "not an address",
            ),
        ];
        for (sendmail, to, message, reason, hint) in cases {
            let drop = dropped(None, None, to);
            let (reply, refusal) =
                local_submission(&settings(sendmail), "d1", drop, message.into(), 0).unwrap_err();
            assert_eq!(refusal.reason, reason, "{reply}");
            assert!(
                refusal.hint.as_deref().unwrap().contains(hint),
                "{reason}: {:?}",
                refusal.hint
            );
        }
    }

    #[test]
    fn a_from_field_is_found_only_in_the_header_section() {
        // (message, has a From field)
        let cases: [(&[u8], bool); 5] = [
            (b"From: a@example.com\r\nSubject: x\r\n\r\nbody", true),
            (b"subject: x\nFROM: a@example.com\n\nbody", true),
            (b"Subject: x\r\n\r\nFrom: in the body\r\n", false),
            (b"Subject: x\nFrom-Agent: no\n\n", false),
            (b"", false),
        ];
        for (message, expected) in cases {
            assert_eq!(
                has_from_field(message),
                expected,
                "{}",
                String::from_utf8_lossy(message)
            );
        }
    }

    #[test]
    fn a_generated_from_quotes_or_encodes_the_full_name() {
        // (-F, address, field)
        let cases = [
            (None, "a@example.com", "From: <a@example.com>\r\n"),
            (
                Some("Cron Daemon"),
                "a@example.com",
                "From: \"Cron Daemon\" <a@example.com>\r\n",
            ),
            (
                Some("Say \"hi\" \\ o"),
                "a@example.com",
                "From: \"Say \\\"hi\\\" \\\\ o\" <a@example.com>\r\n",
            ),
            (
                Some("Jörg\r\nBcc: x@evil.example"),
                "a@example.com",
                "From: =?utf-8?b?SsO2cmdCY2M6IHhAZXZpbC5leGFtcGxl?= <a@example.com>\r\n",
            ),
            (Some("  "), "a@example.com", "From: <a@example.com>\r\n"),
        ];
        for (name, address, field) in cases {
            assert_eq!(from_field(name, address), field, "{name:?}");
        }
    }
}
