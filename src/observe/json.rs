//! The JSON log format: one object per event with every field at the top
//! level, as the README's "Log reference" promises: `timestamp`, `level`,
//! `target`, the fields of the spans the event happened in (the session's
//! `session` and `client`), then the event's own fields, which win over a
//! span's of the same name. Values are JSON values: strings as they are
//! (log strings with `%` or as `&str`: `?` would quote them twice), numbers,
//! booleans, a [`list`] as an array, and a field the event names but has
//! no value for (an `Option` that is `None`) as `null`.

use std::error::Error;
use std::fmt;

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value;
use tracing::field::{Field, Visit};
use tracing::span::Record;
use tracing::{Event, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::{LookupSpan, Scope};

/// A list as a log field value: a JSON array in the JSON format, `["a",
/// "b"]` in the text format. `rewrites = observe::list(&changes)`.
pub fn list<S: AsRef<str>>(items: &[S]) -> Box<dyn Error + Send + Sync> {
    let items = items.iter().map(|item| item.as_ref().to_owned()).collect();
    Box::new(List(items))
}

/// tracing has no list values (short of its unstable `valuable`), and a
/// formatter sees most values only as text; an error is the one value it
/// may downcast, so a list travels as one.
#[derive(Debug)]
struct List(Vec<String>);

impl fmt::Display for List {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl Error for List {}

/// Formats an event as one JSON object; see the module's doc.
pub struct FlatJson;

/// The fields of spans, kept for [`FlatJson`] (as a JSON array of name and
/// value pairs, in order).
pub struct JsonFields;

/// Field names and JSON values in the order they were first set.
#[derive(Default)]
struct Fields(Vec<(String, Value)>);

impl Fields {
    fn set(&mut self, name: &str, value: Value) {
        match self.0.iter_mut().find(|(known, _)| known == name) {
            Some((_, old)) => *old = value,
            None => self.0.push((name.to_owned(), value)),
        }
    }

    /// A span's fields as [`JsonFields`] stored them.
    fn of_span(stored: &str) -> Fields {
        Fields(serde_json::from_str(stored).unwrap_or_default())
    }

    fn stored(&self) -> Result<String, fmt::Error> {
        serde_json::to_string(&self.0).map_err(|_| fmt::Error)
    }
}

/// An object: `{"name":value,…}`.
impl Serialize for Fields {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, value) in &self.0 {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

impl Visit for Fields {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.set(field.name(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.set(field.name(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.set(field.name(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.set(field.name(), value.into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.set(field.name(), value.into());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn Error + 'static)) {
        let value = match value.downcast_ref::<List>() {
            Some(List(items)) => items.clone().into(),
            None => value.to_string().into(),
        };
        self.set(field.name(), value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.set(field.name(), format!("{value:?}").into());
    }
}

impl<'writer> FormatFields<'writer> for JsonFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut recorded = Fields::default();
        fields.record(&mut recorded);
        writer.write_str(&recorded.stored()?)
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &Record<'_>,
    ) -> fmt::Result {
        let mut recorded = Fields::of_span(&current.fields);
        fields.record(&mut recorded);
        current.fields = recorded.stored()?;
        Ok(())
    }
}

impl<S> FormatEvent<S, JsonFields> for FlatJson
where
    S: Subscriber + for<'lookup> LookupSpan<'lookup>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let metadata = event.metadata();
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        let mut fields = Fields::default();
        fields.set("timestamp", timestamp.into());
        fields.set("level", metadata.level().as_str().into());
        fields.set("target", metadata.target().into());
        for span in ctx.event_scope().into_iter().flat_map(Scope::from_root) {
            if let Some(stored) = span.extensions().get::<FormattedFields<JsonFields>>() {
                for (name, value) in Fields::of_span(&stored.fields).0 {
                    fields.set(&name, value);
                }
            }
        }
        // Named first, so a field without a value stays, as null.
        for field in metadata.fields() {
            fields.set(field.name(), Value::Null);
        }
        event.record(&mut fields);
        let line = serde_json::to_string(&fields).map_err(|_| fmt::Error)?;
        writeln!(writer, "{line}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::tests::Buffer;

    fn logged(log: impl FnOnce()) -> Value {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(JsonFields)
            .event_format(FlatJson)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, log);
        let text = buffer.text();
        assert_eq!(text.lines().count(), 1, "{text}");
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn values_are_json_values_and_span_fields_are_at_the_top_level() {
        let line = logged(|| {
            let span = tracing::info_span!("session", session = "s1", client = "127.0.0.1:4000");
            let _entered = span.enter();
            let from = "me@gmail.com".to_string();
            let reply = "550 5.1.1 no such user\n https://support.google.com/mail/?p=NoSuchUser";
            tracing::info!(
                id = "m1",
                from = %from,
                rewrites = crate::observe::list(&["added Date", "bare LF"]),
                listen_tls = Option::<&str>::None,
                starttls = true,
                size = 42u64,
                reply,
                "message received"
            );
        });

        assert_eq!(
            line,
            serde_json::json!({
                "timestamp": line["timestamp"],
                "level": "INFO",
                "target": "sendbridge::observe::json::tests",
                "session": "s1",
                "client": "127.0.0.1:4000",
                "message": "message received",
                "id": "m1",
                "from": "me@gmail.com",
                "rewrites": ["added Date", "bare LF"],
                "listen_tls": null,
                "starttls": true,
                "size": 42,
                "reply": "550 5.1.1 no such user\n https://support.google.com/mail/?p=NoSuchUser",
            })
        );
        assert!(line["timestamp"].as_str().unwrap().ends_with('Z'), "{line}");
    }

    #[test]
    fn an_event_field_wins_over_a_span_field_of_the_same_name() {
        let line = logged(|| {
            let span =
                tracing::info_span!("session", session = "s1", client = tracing::field::Empty);
            let _entered = span.enter();
            span.record("client", "127.0.0.1:4000");
            tracing::info!(session = "s1 (event)", "session closed");
        });

        assert_eq!(line["session"], "s1 (event)");
        assert_eq!(line["client"], "127.0.0.1:4000", "recorded later: {line}");
    }

    #[test]
    fn a_list_is_written_as_text_in_the_text_format() {
        assert_eq!(list(&["a", "b\nc"]).to_string(), r#"["a", "b\nc"]"#);
    }
}
