//! What the relay tells its operator: logging setup here, Prometheus
//! metrics in [`metrics`]. A leaf: every stage may call it, it calls none.
//!
//! Logging setup. Log lines carry facts (ids, addresses, codes), never
//! passwords, tokens, AUTH payloads or message content.
//!
//! Many values come from outside (client commands, form fields, provider
//! replies): in the text format every field value passes through
//! [`EscapeControls`], so one event is always one line and a client cannot
//! forge lines or send escape sequences to the operator's terminal. JSON
//! strings are escaped by the serializer already; the JSON format is
//! [`json`]'s.

mod json;
pub mod metrics;

pub use json::{FlatJson, JsonFields, list};

use std::fmt::{self, Write};
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::{RecordFields, VisitOutput};
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};

use crate::config::{LogConfig, LogFormat};

/// Libraries that log request and response bodies (tokens, the admin
/// token header) at debug or trace: capped whatever level is asked for.
const PAYLOAD_LOGGERS: [&str; 4] = ["ureq", "ureq_proto", "hyper", "hyper_util"];

/// `SENDBRIDGE_LOG` (env-filter syntax) wins over `[log] level`.
pub fn init_tracing(config: &LogConfig) {
    let mut filter = std::env::var("SENDBRIDGE_LOG")
        .ok()
        .and_then(|spec| EnvFilter::try_new(spec).ok())
        .or_else(|| EnvFilter::try_new(&config.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    for target in PAYLOAD_LOGGERS {
        let cap = format!("{target}=info").parse().expect("a valid directive");
        filter = filter.add_directive(cap);
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only help a person at a terminal; files and log
        // collectors get plain text.
        .with_ansi(std::io::stderr().is_terminal());
    match config.format {
        LogFormat::Text => builder.fmt_fields(EscapedFields).init(),
        LogFormat::Json => builder.fmt_fields(JsonFields).event_format(FlatJson).init(),
    }
}

/// The text format's fields (`message key=value …`, strings quoted as
/// `?` shows them) with every control character escaped, including in
/// `%display` values and the message.
pub struct EscapedFields;

impl<'writer> FormatFields<'writer> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut escaped = EscapeControls(writer);
        // A plain writer: field names are not italicised on a terminal,
        // so everything written may be escaped.
        let mut visitor = DefaultVisitor::new(Writer::new(&mut escaped), true);
        fields.record(&mut visitor);
        visitor.finish()
    }
}

/// Passes text on with control characters (C0 including CR, LF and ESC,
/// DEL, C1) written as escapes: `\n`, `\r`, `\t`, `\0`, else `\xHH`.
pub struct EscapeControls<W>(pub W);

impl<W: Write> Write for EscapeControls<W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let mut clean_from = 0;
        for (at, control) in text.char_indices().filter(|(_, c)| c.is_control()) {
            self.0.write_str(&text[clean_from..at])?;
            match control {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                '\0' => self.0.write_str("\\0")?,
                // Every control character is below U+0100.
                other => write!(self.0, "\\x{:02x}", u32::from(other))?,
            }
            clean_from = at + control.len_utf8();
        }
        self.0.write_str(&text[clean_from..])
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use super::*;

    fn escaped(text: &str) -> String {
        let mut out = String::new();
        EscapeControls(&mut out).write_str(text).unwrap();
        out
    }

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        let cases = [
            ("plain text", "plain text"),
            ("a\nb\r\n", "a\\nb\\r\\n"),
            ("tab\there", "tab\\there"),
            ("nul\0", "nul\\0"),
            ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
            ("bell\x07 del\x7f", "bell\\x07 del\\x7f"),
            ("c1 \u{85} \u{9b}31m", "c1 \\x85 \\x9b31m"),
            ("üñí©ødé — \u{a0}ok", "üñí©ødé — \u{a0}ok"),
            ("back\\slash", "back\\slash"),
            ("", ""),
        ];
        for (input, expected) in cases {
            assert_eq!(escaped(input), expected, "{input:?}");
        }
    }

    /// Log lines written in a test.
    #[derive(Clone, Default)]
    pub(crate) struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Buffer {
        pub(crate) fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    impl io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn an_event_with_outside_values_is_one_escaped_line() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(EscapedFields)
            .with_ansi(false)
            .without_time()
            .with_writer(move || writer.clone())
            .finish();
        let forged = "x\n2026-01-01T00:00:00Z ERROR forged \x1b[2J";
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("session", client = %forged);
            let _entered = span.enter();
            tracing::warn!(shown = %forged, debugged = ?forged, plain = forged, "refused {forged}");
        });

        assert_eq!(
            buffer.text(),
            concat!(
                r#" WARN session{client=x\n2026-01-01T00:00:00Z ERROR forged \x1b[2J}: "#,
                r#"sendbridge::observe::tests: refused x\n2026-01-01T00:00:00Z ERROR forged \x1b[2J "#,
                r#"shown=x\n2026-01-01T00:00:00Z ERROR forged \x1b[2J "#,
                r#"debugged="x\n2026-01-01T00:00:00Z ERROR forged \u{1b}[2J" "#,
                r#"plain="x\n2026-01-01T00:00:00Z ERROR forged \u{1b}[2J""#,
                "\n"
            )
        );
    }
}
