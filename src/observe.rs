//! Logging setup. Log lines carry facts (ids, addresses, codes), never
//! passwords, tokens, AUTH payloads or message content.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

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
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}
