//! Logging setup. Log lines carry facts (ids, addresses, codes), never
//! passwords, tokens, AUTH payloads or message content.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// `SENDBRIDGE_LOG` (env-filter syntax) wins over `[log] level`.
pub fn init_tracing(config: &LogConfig) {
    let filter = std::env::var("SENDBRIDGE_LOG")
        .ok()
        .and_then(|spec| EnvFilter::try_new(spec).ok())
        .or_else(|| EnvFilter::try_new(&config.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}
