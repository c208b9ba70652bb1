//! `sendbridge sendmail`, also run as `sendmail` through a symbolic link
//! (`/usr/sbin/sendmail -> sendbridge`): the command line cron, scripts and
//! PHP's `mail()` use. The message is read from stdin, put in the maildrop
//! durably (`maildrop`) and the running relay is woken to pick it up; when
//! the relay is not running, the message waits there for its start. Exit
//! codes follow sysexits.h, so callers can tell a bad call from a
//! temporary failure.

use std::io::{self, BufRead, BufReader, ErrorKind, Read};
use std::path::PathBuf;

use mail_parser::{HeaderName, MessageParser};

use crate::address::{Role, parse_path};
use crate::config::Config;
use crate::maildrop::{DropEnvelope, Maildrop};

/// sysexits.h.
pub const EX_USAGE: u8 = 64;
pub const EX_DATAERR: u8 = 65;
pub const EX_NOUSER: u8 = 67;
pub const EX_SOFTWARE: u8 = 70;
pub const EX_OSERR: u8 = 71;
pub const EX_CANTCREAT: u8 = 73;
pub const EX_TEMPFAIL: u8 = 75;
pub const EX_NOPERM: u8 = 77;
pub const EX_CONFIG: u8 = 78;

/// What the command line asked for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Invocation {
    /// `-t`: recipients also from To, Cc and Bcc (Bcc never goes upstream).
    pub extract_recipients: bool,
    /// `-i`, `-oi`: a line with a lone dot does not end the message.
    pub ignore_dots: bool,
    /// `-f`, `-r`: the envelope sender.
    pub from: Option<String>,
    /// `-F`: the full name of a From field the message lacks.
    pub full_name: Option<String>,
    /// `-C`: the configuration file.
    pub config: Option<PathBuf>,
    pub recipients: Vec<String>,
}

/// Why the command failed, with its sysexits code.
#[derive(Debug, PartialEq, Eq)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

fn fail<T>(code: u8, message: impl Into<String>) -> Result<T, Failure> {
    Err(Failure {
        code,
        message: message.into(),
    })
}

/// Options that take a value, attached (`-fuser@x`) or as the next
/// argument; all but `-f`, `-r`, `-F`, `-C`, `-o` and `-b` are ignored.
const WITH_VALUE: &[u8] = b"fFrCoObBNRVXLhdp";
/// Options without a value that scripts pass and that change nothing here:
/// verbose, "me too", no aliasing, submission flags.
const IGNORED: &[u8] = b"vmnGU";

/// Reads sendmail's command line (without the program name) as Postfix
/// does: options may be grouped (`-ti`), values attached or separate, and
/// recipients may be comma-separated.
pub fn parse_args(args: &[String]) -> Result<Invocation, Failure> {
    let mut invocation = Invocation::default();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let Some(options) = arg.strip_prefix('-').filter(|o| !o.is_empty()) else {
            invocation.add_recipients(arg);
            continue;
        };
        if options == "-" {
            args.by_ref().for_each(|arg| invocation.add_recipients(arg));
            break;
        }
        if options.starts_with('-') {
            return fail(
                EX_USAGE,
                format!(
                    "unknown option -{options}: sendmail's options are single letters (-t, -i, -f ADDR, -F NAME)"
                ),
            );
        }
        for (at, option) in options.char_indices() {
            let option_byte = option as u32 as u8;
            if option.is_ascii() && WITH_VALUE.contains(&option_byte) {
                let attached = &options[at + 1..];
                let value = match attached {
                    "" => match args.next() {
                        Some(value) => value.clone(),
                        None => return fail(EX_USAGE, format!("-{option} needs a value")),
                    },
                    attached => attached.to_string(),
                };
                invocation.set(option, value)?;
                break;
            }
            match option {
                't' => invocation.extract_recipients = true,
                'i' => invocation.ignore_dots = true,
                'q' => {
                    return fail(
                        EX_USAGE,
                        "-q: the relay runs its queue by itself; use `sendbridge queue list` and `sendbridge queue retry`",
                    );
                }
                other if other.is_ascii() && IGNORED.contains(&(other as u32 as u8)) => {}
                other => return fail(EX_USAGE, format!("unknown option -{other}")),
            }
        }
    }
    Ok(invocation)
}

impl Invocation {
    fn add_recipients(&mut self, arg: &str) {
        let addresses = arg.split(',').map(str::trim).filter(|a| !a.is_empty());
        self.recipients.extend(addresses.map(str::to_string));
    }

    fn set(&mut self, option: char, value: String) -> Result<(), Failure> {
        match option {
            'f' | 'r' => {
                let value = value.trim();
                let unbracketed = value
                    .strip_prefix('<')
                    .and_then(|v| v.strip_suffix('>'))
                    .unwrap_or(value);
                self.from = Some(unbracketed.to_string());
            }
            'F' => self.full_name = Some(value),
            'C' => self.config = Some(PathBuf::from(value)),
            'o' if value == "i" => self.ignore_dots = true,
            'b' if value != "m" => {
                return fail(
                    EX_USAGE,
                    format!(
                        "-b{value} is not supported: only -bm (read a message from stdin and send it); the queue is `sendbridge queue list`"
                    ),
                );
            }
            // -oem, -oee, -odb, -B8BITMIME, -N never, -X and the like.
            _ => {}
        }
        Ok(())
    }
}

/// Whether the relay was running to pick the message up at once.
#[derive(Debug, PartialEq, Eq)]
pub enum Queued {
    RelayWoken,
    RelayNotRunning,
}

/// Reads the message from `input`, finds its recipients and puts it in
/// the maildrop. Ok only once the message is on disk.
pub fn send(config: &Config, invocation: &Invocation, input: impl Read) -> Result<Queued, Failure> {
    if config.sendmail.user.is_none() {
        return fail(
            EX_CONFIG,
            format!(
                "sendmail.user is not set: name the [users] entry whose account sends this mail ({})",
                config.described_file()
            ),
        );
    }
    let spool = config
        .existing_spool_dir()
        .or_else(|err| fail(EX_CONFIG, err.to_string()))?;
    let max = config.server.max_message_size;
    let message = match read_message(input, invocation.ignore_dots, max) {
        Ok(Some(message)) => message,
        Ok(None) => {
            return fail(
                EX_DATAERR,
                format!("the message is larger than server.max_message_size ({max} bytes)"),
            );
        }
        Err(err) => {
            return fail(
                EX_OSERR,
                format!("cannot read the message from stdin: {err}"),
            );
        }
    };
    let mut recipients = invocation.recipients.clone();
    if invocation.extract_recipients {
        recipients.extend(header_recipients(&message));
    }
    for recipient in &recipients {
        if parse_path(recipient.as_bytes(), Role::Recipient, true).is_err() {
            return fail(EX_NOUSER, format!("{recipient:?} is not an address"));
        }
    }
    if recipients.is_empty() {
        return fail(
            EX_NOUSER,
            "no recipients: give them as arguments, or use -t to read them from To, Cc and Bcc",
        );
    }
    let max = config.server.max_recipients;
    if recipients.len() > max {
        return fail(
            EX_DATAERR,
            format!(
                "{} recipients, more than server.max_recipients ({max})",
                recipients.len()
            ),
        );
    }
    if let Some(from) = &invocation.from {
        if parse_path(from.as_bytes(), Role::Sender, true).is_err() {
            return fail(EX_USAGE, format!("-f {from:?} is not an address"));
        }
    }
    let envelope = DropEnvelope {
        mail_from: invocation.from.clone(),
        recipients,
        full_name: invocation.full_name.clone(),
        // SAFETY: getuid has no preconditions and cannot fail.
        uid: unsafe { libc::getuid() },
    };
    let maildrop = Maildrop::new(spool);
    maildrop
        .create()
        .and_then(|()| maildrop.put(&envelope, &message))
        .map_err(|err| cannot_store(&maildrop, &err))?;
    Ok(if maildrop.wake_relay() {
        Queued::RelayWoken
    } else {
        Queued::RelayNotRunning
    })
}

fn cannot_store(maildrop: &Maildrop, err: &io::Error) -> Failure {
    let dir = maildrop.dir().display();
    let (code, why) = match err.kind() {
        ErrorKind::PermissionDenied => (
            EX_NOPERM,
            "only the relay's user (the owner of spool.dir) and root may queue mail",
        ),
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded => {
            (EX_TEMPFAIL, "the spool's disk is full; try again later")
        }
        _ => (EX_CANTCREAT, "check spool.dir"),
    };
    Failure {
        code,
        message: format!("cannot queue the message in {dir}: {err}: {why}"),
    }
}

/// The message with CRLF line ends, up to a lone dot unless `ignore_dots`,
/// or EOF; `None` when it is larger than `max`.
fn read_message(input: impl Read, ignore_dots: bool, max: usize) -> io::Result<Option<Vec<u8>>> {
    // One octet over the limit is enough to know; CRLF only grows it.
    let mut input = BufReader::new(input.take(max as u64 + 1));
    let mut message = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if input.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        let content = line
            .strip_suffix(b"\n")
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
        let content = content.unwrap_or(&line);
        if !ignore_dots && content == b"." {
            break;
        }
        message.extend_from_slice(content);
        message.extend_from_slice(b"\r\n");
    }
    Ok((message.len() <= max).then_some(message))
}

/// The addresses in To, Cc and Bcc (every such field, groups included).
fn header_recipients(message: &[u8]) -> Vec<String> {
    let fields = [HeaderName::To, HeaderName::Cc, HeaderName::Bcc];
    let parser = fields.iter().fold(MessageParser::new(), |parser, field| {
        parser.header_address(field.clone())
    });
    let Some(parsed) = parser.parse_headers(message) else {
        return Vec::new();
    };
    fields
        .into_iter()
        .flat_map(|field| parsed.header_values(field).collect::<Vec<_>>())
        .filter_map(|value| value.as_address())
        .flat_map(|address| address.iter())
        .filter_map(|addr| addr.address())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split(' ')
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn command_lines_scripts_use_are_read_as_postfix_reads_them() {
        let invocation = |t, i, from: Option<&str>, name: Option<&str>, to: &[&str]| Invocation {
            extract_recipients: t,
            ignore_dots: i,
            from: from.map(str::to_string),
            full_name: name.map(str::to_string),
            config: None,
            recipients: to.iter().map(|r| r.to_string()).collect(),
        };
        // (command line, what it asks for)
        let cases = [
            // PHP's sendmail_path
            ("-t -i", invocation(true, true, None, None, &[])),
            ("-ti", invocation(true, true, None, None, &[])),
            // cron (cronie, Debian's cron)
            (
                "-FCronDaemon -i -B8BITMIME -oem root",
                invocation(false, true, None, Some("CronDaemon"), &["root"]),
            ),
            (
                "-i -FCronDaemon -odi -oem -oi -t",
                invocation(true, true, None, Some("CronDaemon"), &[]),
            ),
            (
                "-f sender@example.com a@example.com,b@example.com",
                invocation(
                    false,
                    false,
                    Some("sender@example.com"),
                    None,
                    &["a@example.com", "b@example.com"],
                ),
            ),
            (
                "-f<sender@example.com> -F Billing -oi -v x@example.com",
                invocation(
                    false,
                    true,
                    Some("sender@example.com"),
                    Some("Billing"),
                    &["x@example.com"],
                ),
            ),
            (
                "-r bounce@example.com -oee -N never -- -odd@example.com",
                invocation(
                    false,
                    false,
                    Some("bounce@example.com"),
                    None,
                    &["-odd@example.com"],
                ),
            ),
            (
                "-bm -G -U -O DeliveryMode=b a@example.com",
                invocation(false, false, None, None, &["a@example.com"]),
            ),
            (
                "-f <> a@example.com",
                invocation(false, false, Some(""), None, &["a@example.com"]),
            ),
        ];
        for (line, expected) in cases {
            assert_eq!(parse_args(&args(line)).as_ref(), Ok(&expected), "{line}");
        }
    }

    #[test]
    fn unsupported_calls_are_usage_errors() {
        for line in [
            "-bs",
            "-bp",
            "-q",
            "-q30m",
            "-f",
            "-x a@example.com",
            "-t -F",
        ] {
            let failure = parse_args(&args(line)).unwrap_err();
            assert_eq!(failure.code, EX_USAGE, "{line}: {}", failure.message);
        }
    }

    #[test]
    fn a_lone_dot_ends_the_message_unless_dots_are_ignored() {
        let input = "Subject: dots\n\nfirst\n..stuffed stays\n.\nafter the dot\n";
        // (ignore dots, message)
        let cases: [(bool, &[u8]); 2] = [
            (false, b"Subject: dots\r\n\r\nfirst\r\n..stuffed stays\r\n"),
            (
                true,
                b"Subject: dots\r\n\r\nfirst\r\n..stuffed stays\r\n.\r\nafter the dot\r\n",
            ),
        ];
        for (ignore_dots, expected) in cases {
            let message = read_message(input.as_bytes(), ignore_dots, 1000).unwrap();
            assert_eq!(
                message.as_deref(),
                Some(expected),
                "ignore dots {ignore_dots}"
            );
        }
        // CRLF input stays CRLF; a last line without its end gets one.
        let message = read_message(&b"a\r\n.\r\nb"[..], true, 1000).unwrap();
        assert_eq!(message.as_deref(), Some(&b"a\r\n.\r\nb\r\n"[..]));
        assert_eq!(read_message(&[b'x'; 1001][..], true, 1000).unwrap(), None);
        assert!(
            read_message(&[b'x'; 998][..], true, 1000)
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn recipients_come_from_every_to_cc_and_bcc_field() {
        let message = b"To: A <a@example.com>, b@example.com\r\nCc: team: c@example.com, d@example.com;\r\nBcc: e@example.com\r\nTo: f@example.com\r\nReply-To: no@example.com\r\n\r\nTo: body@example.com\r\n";
        assert_eq!(
            header_recipients(message),
            [
                "a@example.com",
                "b@example.com",
                "f@example.com",
                "c@example.com",
                "d@example.com",
                "e@example.com"
            ]
        );
    }
}
