//! Every known provider reply, sent by the fake upstream with Gmail's or
//! Microsoft's exact text at the point the provider sends it: the message
//! ends in the right place (class), and the log line says why (reason code)
//! and what to change (hint), without any secret.

mod common;

use common::fake_upstream::{FakeUpstream, FakeUpstreamOptions, Script, UpstreamTls, gmail};
use common::log_capture::LogCapture;
use common::relay::{LOCAL_PASSWORD, Relay, UPSTREAM_PASSWORD, UPSTREAM_USER, config_for};
use sendbridge::provider_replies::{Class, KNOWN_REPLIES, diagnose, lookup};
use sendbridge::reply::Reply;
use sendbridge::spool::{Spool, State};

const CONTENT: &str = "From: billing@legacy.example\r\nSubject: invoice\r\n\r\nInvoice.\r\n";
const MS_TRAILER: &str =
    "[AM0PR01CA0001.eurprd01.prod.exchangelabs.com 2026-11-23T10:00:00.000Z 08DE0123456789AB]";

/// Where in the dialogue the provider answers.
#[derive(Clone, Copy, Debug)]
enum Step {
    Auth,
    Mail,
    Data,
}

fn samples() -> Vec<(Step, String)> {
    let ms = |text: &str| format!("{text} {MS_TRAILER}");
    vec![
        (Step::Auth, gmail::BAD_CREDENTIALS.into()),
        (Step::Auth, gmail::APP_PASSWORD_REQUIRED.into()),
        (Step::Auth, "534-5.7.14 <https://accounts.google.com/signin/continue?sarp=1&scc=1&plt=AKgnsbtExample>\r\n534-5.7.14 Please log in via your web browser and then try again.\r\n534-5.7.14  Learn more at\r\n534 5.7.14  https://support.google.com/mail/answer/78754 a1b2c3d4e5f6 - gsmtp".into()),
        (Step::Mail, "530 5.7.0 Must issue a STARTTLS command first. a1b2c3d4e5f6 - gsmtp".into()),
        (Step::Mail, "530-5.7.0 Authentication Required. For more information, go to\r\n530 5.7.0  https://support.google.com/mail/?p=WantAuthError a1b2c3d4e5f6 - gsmtp".into()),
        (Step::Auth, "454-4.7.0 Too many login attempts, please try again later. For more\r\n454-4.7.0 information, go to\r\n454 4.7.0  https://support.google.com/mail/answer/7126229 a1b2c3d4e5f6 - gsmtp".into()),
        (Step::Data, gmail::DAILY_LIMIT.into()),
        (Step::Data, "552-5.2.3 Your message exceeded Google's message size limits. For more\r\n552-5.2.3 information, go to\r\n552 5.2.3  https://support.google.com/mail/?p=MaxSizeError a1b2c3d4e5f6 - gsmtp".into()),
        (Step::Data, gmail::UNAUTHENTICATED_SENDER.into()),
        (Step::Data, "550-5.7.1 [192.0.2.1] Gmail has detected that this message is likely\r\n550-5.7.1 unsolicited mail. To reduce the amount of spam sent to Gmail, this\r\n550-5.7.1 message has been blocked. For more information, go to\r\n550 5.7.1  https://support.google.com/mail/?p=UnsolicitedMessageError a1b2c3d4e5f6 - gsmtp".into()),
        (Step::Auth, ms("535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.")),
        (Step::Auth, ms("535 5.7.139 Authentication unsuccessful, basic authentication is disabled.")),
        (Step::Auth, ms("535 5.7.139 Authentication unsuccessful, the request did not meet the criteria to be authenticated successfully. Contact your administrator.")),
        (Step::Auth, ms("550 5.7.30 Basic authentication is not supported for Client Submission.")),
        (Step::Mail, ms("530 5.7.57 Client not authenticated to send mail.")),
        (Step::Data, ms("554 5.2.252 SendAsDenied; me@gmail.com not allowed to send as billing@legacy.example; STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; Failed to process message due to a permanent exception with message [BeginDiagnosticData]Cannot submit message.")),
        (Step::Data, ms("550 5.7.60 SMTP; Client does not have permissions to send as this sender.")),
        (Step::Data, ms("554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process message due to a permanent exception with message [BeginDiagnosticData]Cannot submit message.")),
    ]
}

/// The reply as sendbridge sees it: code, enhanced status, text lines.
fn parse(raw: &str) -> Reply {
    let lines: Vec<&str> = raw.split("\r\n").collect();
    let code = lines[0][..3].parse().unwrap();
    let status_text = |line: &str| -> (Vec<u8>, String) {
        let (status, text) = line[4..].split_once(' ').unwrap_or((&line[4..], ""));
        let status = status.split('.').map(|n| n.parse().unwrap()).collect();
        (status, text.trim_start().to_string())
    };
    let (status, _) = status_text(lines[0]);
    let text: Vec<String> = lines.iter().map(|line| status_text(line).1).collect();
    Reply::new(code, [status[0], status[1], status[2]], text.join("\n"))
}

#[test]
fn the_samples_cover_every_known_reply() {
    let matched: Vec<*const _> = samples()
        .iter()
        .map(|(_, raw)| lookup(&parse(raw)).expect("a known reply") as *const _)
        .collect();
    // The HTTP APIs' answers are not SMTP replies: tests/graph.rs sends
    // them from the fake Graph.
    for known in KNOWN_REPLIES
        .iter()
        .filter(|known| known.provider != "Microsoft Graph")
    {
        assert!(
            matched.contains(&(known as *const _)),
            "no sample for {} {:?} {:?}",
            known.code,
            known.status,
            known.text
        );
    }
}

#[tokio::test]
async fn each_known_reply_is_classed_and_explained() {
    sendbridge::tls::install_crypto_provider();
    for (step, raw) in samples() {
        let reply = parse(&raw);
        let known = lookup(&reply).unwrap();
        let expected_hint = diagnose("gmail", &reply).hint.unwrap();
        let log = LogCapture::start();
        let mut options =
            FakeUpstreamOptions::new(UpstreamTls::StartTls, UPSTREAM_USER, UPSTREAM_PASSWORD);
        options.script = match step {
            Step::Auth => Script {
                auth: Some(raw.clone()),
                ..Script::default()
            },
            Step::Mail => Script {
                mail: Some(raw.clone()),
                ..Script::default()
            },
            Step::Data => Script {
                data: Some(raw.clone()),
                ..Script::default()
            },
        };
        let upstream = FakeUpstream::start(options).await;
        let relay = Relay::start(config_for(&upstream, UpstreamTls::StartTls, "")).await;
        let mut client = relay.signed_in_client().await;

        let client_reply = client
            .send_mail("billing@legacy.example", &["a@x.example"], CONTENT)
            .await;
        // The message's fate is settled before the client hears back.
        let case = format!("{step:?} {raw:?}");
        let spool = Spool::open(&relay.spool).unwrap();
        let (state, message) = match known.class {
            Class::AuthFailed => (State::Held, "account on hold"),
            Class::Rejected => (State::Rejected, "session closed after a rejection"),
            Class::OverLimit => (State::Deferred, "daily sending limit's window"),
            Class::Deferred => (State::Deferred, "message deferred"),
        };
        assert_eq!(
            spool.list(state).unwrap().len(),
            1,
            "{case}: message in {state}"
        );
        client.expect("QUIT", 221).await;
        relay.stop().await;

        let line = log.lines_with(message);
        assert_eq!(line.len(), 1, "{case}: {}", log.text());
        assert_eq!(line[0]["reason"], known.reason, "{case}");
        assert_eq!(line[0]["hint"], expected_hint.as_str(), "{case}");
        if known.class == Class::Rejected {
            // The provider's verdict passes through to the client.
            let [a, b, c] = reply.status.unwrap();
            assert_eq!(client_reply.code, reply.code, "{case}");
            assert!(
                client_reply.text.starts_with(&format!("{a}.{b}.{c} ")),
                "{case}"
            );
        } else {
            assert_eq!(
                client_reply.code, 250,
                "{case}: kept and retried, not bounced"
            );
        }
        let text = log.text();
        for secret in [UPSTREAM_PASSWORD, LOCAL_PASSWORD] {
            assert!(!text.contains(secret), "{case}: a secret was logged");
        }
    }
}
