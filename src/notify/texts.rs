//! Every word a person reads in a notice, per language. A language is one
//! `Texts` value; adding one means adding a value and a `Language` variant,
//! and the compiler names every sentence still missing.
//!
//! Times are shown in UTC and say so: the relay cannot know the reader's
//! time zone, and a wrong local time is worse than a labelled UTC one.

use mail_parser::DateTime;

use crate::config::Language;

use super::notice::Event;

/// The sentences and labels of notices in one language. Sentences with
/// values are functions, so each language orders its words itself. A
/// paragraph is one line: email wraps it, chat apps and phones wrap by
/// themselves.
pub struct Texts {
    /// A moment for people, e.g. "14 Nov 2023, 22:13 UTC" (unix millis).
    pub date: fn(u64) -> String,
    /// A span, e.g. "4 hours", as it follows "for" / "seit" (millis).
    pub span: fn(u64) -> String,
    /// "1 message", "300 messages".
    pub messages: fn(usize) -> String,

    // Notices to the sender (bounces and delay warnings).
    /// Subject of a bounce, given the original subject.
    pub bounce_subject: fn(&str) -> String,
    /// Subject of a delay warning, given the original subject.
    pub delay_subject: fn(&str) -> String,
    /// Stands in for a missing original subject: the first recipient and
    /// how many more.
    pub your_message_to: fn(&str, usize) -> String,
    /// Opens a bounce, given the relay's host name.
    pub bounce_lead: fn(&str) -> String,
    /// Opens a delay warning, given the relay's host name and how long
    /// the message has waited.
    pub delay_lead: fn(&str, &str) -> String,
    /// When the relay gives up on a delayed message.
    pub delay_gives_up: fn(&str) -> String,
    pub subject_label: &'static str,
    pub sent_label: &'static str,
    pub recipient_label: &'static str,
    /// The provider refused for good (a 5xx).
    pub refused_replied: &'static str,
    /// The relay gave up after this long; the provider's last reply follows.
    pub gave_up_replied: fn(&str) -> String,
    /// The relay gave up after this long and never had a reply.
    pub gave_up_no_reply: fn(&str) -> String,
    /// Why a delayed message waits: the reply follows.
    pub waiting_replied: &'static str,
    pub waiting_no_reply: &'static str,
    pub bounce_hint_label: &'static str,
    /// What to do after a bounce when the relay knows nothing better.
    pub bounce_default_hint: &'static str,
    /// A hint in a delay warning is for whoever runs the relay.
    pub delay_hint_label: &'static str,
    pub headers_attached: &'static str,

    // Alerts to the admin.
    /// Names the event and, where there is one, the account.
    pub alert_title: fn(Event, Option<&str>) -> String,
    /// What happened and what it means, in sentences.
    pub alert_lead: fn(Event, Option<&str>) -> String,
    /// The label of `count`: messages waiting, sent, or concerned.
    pub count_label: fn(Event) -> &'static str,
    pub account_label: &'static str,
    pub message_label: &'static str,
    pub recipients_label: &'static str,
    pub time_label: &'static str,
    pub relay_label: &'static str,
    pub reply_label: &'static str,
    pub hint_label: &'static str,
}

pub fn texts(language: Language) -> &'static Texts {
    match language {
        Language::En => &EN,
        Language::De => &DE,
    }
}

/// An account an alert should name but does not shows as "?", so the
/// sentence still reads.
fn account_or<'a>(account: Option<&'a str>, unnamed: &'a str) -> &'a str {
    account.unwrap_or(unnamed)
}

fn civil(unix_millis: u64) -> DateTime {
    DateTime::from_timestamp((unix_millis / 1000) as i64)
}

/// Minutes below an hour, hours below two days, then days.
fn span_parts(millis: u64) -> (u64, SpanUnit) {
    let minutes = millis / 60_000;
    match minutes {
        0..60 => (minutes, SpanUnit::Minutes),
        60..2880 => (minutes / 60, SpanUnit::Hours),
        _ => (minutes / 1440, SpanUnit::Days),
    }
}

enum SpanUnit {
    Minutes,
    Hours,
    Days,
}

pub static EN: Texts = Texts {
    date: |at| {
        const MONTHS: [&str; 12] = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        let t = civil(at);
        let month = MONTHS[usize::from(t.month.clamp(1, 12)) - 1];
        format!(
            "{} {month} {}, {:02}:{:02} UTC",
            t.day, t.year, t.hour, t.minute
        )
    },
    span: |millis| {
        let (n, unit) = span_parts(millis);
        let unit = match (unit, n == 1) {
            (SpanUnit::Minutes, true) => "minute",
            (SpanUnit::Minutes, false) => "minutes",
            (SpanUnit::Hours, true) => "hour",
            (SpanUnit::Hours, false) => "hours",
            (SpanUnit::Days, true) => "day",
            (SpanUnit::Days, false) => "days",
        };
        format!("{n} {unit}")
    },
    messages: |n| match n {
        1 => "1 message".to_string(),
        n => format!("{n} messages"),
    },

    bounce_subject: |subject| format!("Not delivered: {subject}"),
    delay_subject: |subject| format!("Not delivered yet: {subject}"),
    your_message_to: |first, more| match more {
        0 => format!("your message to {first}"),
        more => format!("your message to {first} and {more} more"),
    },
    bounce_lead: |relay| {
        format!(
            "This is the mail system at host {relay}. Your message could not be delivered. \
             Nothing was sent to the recipients below."
        )
    },
    delay_lead: |relay, waited| {
        format!(
            "This is the mail system at host {relay}. Your message has not been delivered yet; \
             it has been waiting for {waited}. \
             There is nothing for you to do, and please do not send it again: the relay \
             keeps trying and sends it as soon as the provider accepts it."
        )
    },
    delay_gives_up: |at| format!("If it still cannot be delivered by {at}, the relay gives up."),
    subject_label: "Subject:",
    sent_label: "Sent:",
    recipient_label: "Recipient:",
    refused_replied: "The provider refused it and replied:",
    gave_up_replied: |waited| {
        format!("The relay tried for {waited} and gave up. The provider's last reply:")
    },
    gave_up_no_reply: |waited| {
        format!("The relay tried for {waited} and gave up; the provider could not be reached.")
    },
    waiting_replied: "Why: the provider replied:",
    waiting_no_reply: "Why: the provider could not be reached yet.",
    bounce_hint_label: "What to do:",
    bounce_default_hint: "check the recipient's address; once the cause is fixed, send the message again.",
    delay_hint_label: "For the administrator:",
    headers_attached: "The headers of your message are attached.",

    alert_title: |event, account| {
        let account = account_or(account, "?");
        match event {
            Event::AccountHeld => format!("Account {account} is on hold: sign-in refused"),
            Event::AccountReleased => format!("Account {account} sends again"),
            Event::MessageRejected => format!("Message refused by the provider ({account})"),
            Event::MessageExpired => format!("Message given up, not delivered in time ({account})"),
            Event::MessageDelayed => format!("Message not delivered yet ({account})"),
            Event::SigninNeeded => format!("Account {account} needs a new sign-in"),
            Event::SpoolFull => "Spool disk full: new mail is refused".to_string(),
            Event::Test => "Test notice from sendbridge".to_string(),
        }
    },
    alert_lead: |event, account| {
        let account = account_or(account, "?");
        match event {
            Event::AccountHeld => format!(
                "The provider refused sign-in for account {account}. Its mail waits on the \
                 relay (held/): nothing is lost, and nothing is sent until sign-in works \
                 again. Once it is fixed (reload the configuration or run \
                 `sendbridge queue retry`), the held mail goes out by itself."
            ),
            Event::AccountReleased => {
                format!("Account {account} can sign in again; the mail held for it has gone out.")
            }
            Event::MessageRejected => {
                "The provider refused a message for good. Nothing was sent to the \
                 recipients listed; the message is kept in rejected/."
                    .to_string()
            }
            Event::MessageExpired => {
                "A message could not be delivered within delivery.max_age and was \
                 given up. Nothing was sent to the recipients listed; the message is \
                 kept in rejected/."
                    .to_string()
            }
            Event::MessageDelayed => {
                "A message is still not delivered after notify.delay_warning. The \
                 relay keeps trying until delivery.max_age."
                    .to_string()
            }
            Event::SigninNeeded => format!(
                "The provider refused the OAuth refresh token of account {account}: \
                 someone must sign in again with `sendbridge oauth login {account}`. \
                 Until then its mail waits on the relay."
            ),
            Event::SpoolFull => {
                "The spool's disk is full: new mail is refused with 452 4.3.1, and \
                 the sending programs try again later. Free space on the spool's disk."
                    .to_string()
            }
            Event::Test => "This is a test from `sendbridge notify test`: notices reach \
                            you on this channel. Nothing needs doing."
                .to_string(),
        }
    },
    count_label: |event| match event {
        Event::AccountHeld | Event::SigninNeeded => "Waiting:",
        Event::AccountReleased => "Sent:",
        _ => "Messages:",
    },
    account_label: "Account:",
    message_label: "Message:",
    recipients_label: "Recipients:",
    time_label: "Time:",
    relay_label: "Relay:",
    reply_label: "The provider replied:",
    hint_label: "What to do:",
};

pub static DE: Texts = Texts {
    date: |at| {
        let t = civil(at);
        format!(
            "{:02}.{:02}.{}, {:02}:{:02} Uhr UTC",
            t.day, t.month, t.year, t.hour, t.minute
        )
    },
    // Dative, as it follows "seit": "seit 4 Stunden", "seit 1 Tag".
    span: |millis| {
        let (n, unit) = span_parts(millis);
        let unit = match (unit, n == 1) {
            (SpanUnit::Minutes, true) => "Minute",
            (SpanUnit::Minutes, false) => "Minuten",
            (SpanUnit::Hours, true) => "Stunde",
            (SpanUnit::Hours, false) => "Stunden",
            (SpanUnit::Days, true) => "Tag",
            (SpanUnit::Days, false) => "Tagen",
        };
        format!("{n} {unit}")
    },
    messages: |n| match n {
        1 => "1 Nachricht".to_string(),
        n => format!("{n} Nachrichten"),
    },

    bounce_subject: |subject| format!("Nicht zugestellt: {subject}"),
    delay_subject: |subject| format!("Noch nicht zugestellt: {subject}"),
    your_message_to: |first, more| match more {
        0 => format!("Ihre Nachricht an {first}"),
        more => format!("Ihre Nachricht an {first} und {more} weitere"),
    },
    bounce_lead: |relay| {
        format!(
            "Dies ist das Mailsystem auf dem Server {relay}. Ihre Nachricht konnte nicht zugestellt \
             werden. An die unten genannten Empfänger wurde nichts gesendet."
        )
    },
    delay_lead: |relay, waited| {
        format!(
            "Dies ist das Mailsystem auf dem Server {relay}. Ihre Nachricht wurde noch nicht \
             zugestellt; sie wartet seit {waited}. \
             Sie müssen nichts tun und die Nachricht bitte nicht erneut senden: Das \
             Relay versucht es weiter und stellt sie zu, sobald der Anbieter sie annimmt."
        )
    },
    delay_gives_up: |at| {
        format!("Kann sie bis zum {at} nicht zugestellt werden, gibt das Relay auf.")
    },
    subject_label: "Betreff:",
    sent_label: "Gesendet:",
    recipient_label: "Empfänger:",
    refused_replied: "Der Anbieter hat die Nachricht abgelehnt und geantwortet:",
    gave_up_replied: |waited| {
        format!(
            "Das Relay hat es {waited} lang versucht und dann aufgegeben. Die letzte \
             Antwort des Anbieters:"
        )
    },
    gave_up_no_reply: |waited| {
        format!(
            "Das Relay hat es {waited} lang versucht und dann aufgegeben; der Anbieter \
             war nicht erreichbar."
        )
    },
    waiting_replied: "Grund: Der Anbieter hat geantwortet:",
    waiting_no_reply: "Grund: Der Anbieter war bisher nicht erreichbar.",
    bounce_hint_label: "Was Sie tun können:",
    bounce_default_hint: "Prüfen Sie die Adresse des Empfängers und senden Sie die Nachricht erneut, sobald die Ursache behoben ist.",
    delay_hint_label: "Hinweis für die Administration:",
    headers_attached: "Die Kopfzeilen Ihrer Nachricht finden Sie im Anhang.",

    alert_title: |event, account| {
        let account = account_or(account, "?");
        match event {
            Event::AccountHeld => format!("Konto {account} angehalten: Anmeldung abgelehnt"),
            Event::AccountReleased => format!("Konto {account} sendet wieder"),
            Event::MessageRejected => format!("Nachricht vom Anbieter abgelehnt ({account})"),
            Event::MessageExpired => {
                format!("Nachricht aufgegeben, nicht rechtzeitig zugestellt ({account})")
            }
            Event::MessageDelayed => format!("Nachricht noch nicht zugestellt ({account})"),
            Event::SigninNeeded => format!("Konto {account}: erneute Anmeldung erforderlich"),
            Event::SpoolFull => "Spool-Datenträger voll: neue Mails werden abgewiesen".to_string(),
            Event::Test => "Testbenachrichtigung von sendbridge".to_string(),
        }
    },
    alert_lead: |event, account| {
        let account = account_or(account, "?");
        match event {
            Event::AccountHeld => format!(
                "Der Anbieter hat die Anmeldung für das Konto {account} abgelehnt. Dessen \
                 Mails warten auf dem Relay (held/): Es geht nichts verloren, aber es wird \
                 nichts gesendet, bis die Anmeldung wieder funktioniert. Sobald der Fehler \
                 behoben ist (Konfiguration neu laden oder `sendbridge queue retry`), \
                 werden die wartenden Mails von selbst gesendet."
            ),
            Event::AccountReleased => format!(
                "Das Konto {account} kann sich wieder anmelden; die zurückgehaltenen Mails \
                 wurden gesendet."
            ),
            Event::MessageRejected => {
                "Der Anbieter hat eine Nachricht endgültig abgelehnt. An die genannten \
                 Empfänger wurde nichts gesendet; die Nachricht liegt in rejected/."
                    .to_string()
            }
            Event::MessageExpired => {
                "Eine Nachricht konnte nicht innerhalb von delivery.max_age zugestellt \
                 werden und wurde aufgegeben. An die genannten Empfänger wurde nichts \
                 gesendet; die Nachricht liegt in rejected/."
                    .to_string()
            }
            Event::MessageDelayed => {
                "Eine Nachricht ist nach notify.delay_warning noch immer nicht \
                 zugestellt. Das Relay versucht es weiter, bis delivery.max_age erreicht ist."
                    .to_string()
            }
            Event::SigninNeeded => format!(
                "Der Anbieter hat das OAuth-Refresh-Token des Kontos {account} abgelehnt: \
                 Jemand muss sich mit `sendbridge oauth login {account}` neu anmelden. \
                 Bis dahin warten die Mails dieses Kontos auf dem Relay."
            ),
            Event::SpoolFull => {
                "Der Datenträger des Spools ist voll: Neue Mails werden mit 452 4.3.1 \
                 abgewiesen, die sendenden Programme versuchen es später erneut. Geben \
                 Sie Speicherplatz auf dem Datenträger des Spools frei."
                    .to_string()
            }
            Event::Test => "Dies ist ein Test von `sendbridge notify test`: \
                            Benachrichtigungen erreichen Sie über diesen Kanal. \
                            Es ist nichts zu tun."
                .to_string(),
        }
    },
    count_label: |event| match event {
        Event::AccountHeld | Event::SigninNeeded => "Wartend:",
        Event::AccountReleased => "Gesendet:",
        _ => "Nachrichten:",
    },
    account_label: "Konto:",
    message_label: "Nachricht:",
    recipients_label: "Empfänger:",
    time_label: "Zeit:",
    relay_label: "Relay:",
    reply_label: "Antwort des Anbieters:",
    hint_label: "Was zu tun ist:",
};

#[cfg(test)]
mod tests {
    use super::*;

    const LANGUAGES: [Language; 2] = [Language::En, Language::De];

    #[test]
    fn dates_and_spans_read_naturally() {
        const AT: u64 = 1_700_000_000_000; // 2023-11-14 22:13:20 UTC
        type Render = fn(&Texts) -> String;
        let cases: [(Language, Render, &str); 8] = [
            (Language::En, |t| (t.date)(AT), "14 Nov 2023, 22:13 UTC"),
            (Language::De, |t| (t.date)(AT), "14.11.2023, 22:13 Uhr UTC"),
            (Language::En, |t| (t.span)(59 * 60_000), "59 minutes"),
            (Language::En, |t| (t.span)(3_600_000), "1 hour"),
            (
                Language::De,
                |t| (t.span)(4 * 3_600_000 + 59_000),
                "4 Stunden",
            ),
            (Language::De, |t| (t.span)(47 * 3_600_000), "47 Stunden"),
            (Language::De, |t| (t.span)(5 * 86_400_000), "5 Tagen"),
            (Language::En, |t| (t.messages)(1), "1 message"),
        ];
        for (language, render, expected) in cases {
            assert_eq!(render(texts(language)), expected, "{language:?}");
        }
    }

    /// Every event has a title naming its account and a lead; an unnamed
    /// account shows as "?" rather than vanishing from the sentence.
    #[test]
    fn every_event_has_a_title_and_a_lead_in_every_language() {
        for language in LANGUAGES {
            let t = texts(language);
            for event in Event::ALL {
                let title = (t.alert_title)(event, Some("gmail"));
                let lead = (t.alert_lead)(event, Some("gmail"));
                assert!(!title.is_empty() && !lead.is_empty());
                // Relay-wide events name no account.
                if !matches!(event, Event::SpoolFull | Event::Test) {
                    assert!(title.contains("gmail"), "{language:?} {event:?}: {title}");
                }
                assert!(!(t.alert_title)(event, None).contains("None"));
            }
        }
    }

    #[test]
    fn german_is_german() {
        let t = texts(Language::De);
        assert_eq!(
            (t.bounce_subject)("Rechnung 4711"),
            "Nicht zugestellt: Rechnung 4711"
        );
        assert!((t.bounce_lead)("relay.example").contains("nichts gesendet"));
        assert!((t.delay_lead)("relay.example", "4 Stunden").contains("Sie müssen nichts tun"));
        assert_eq!(
            (t.alert_title)(Event::AccountHeld, Some("buchhaltung")),
            "Konto buchhaltung angehalten: Anmeldung abgelehnt"
        );
    }
}
