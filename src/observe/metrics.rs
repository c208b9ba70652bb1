//! Prometheus metrics: their names, the one-line calls the relay makes where
//! it logs an event, and the scrape. README ("Metrics") lists them.
//!
//! Events go to the global `metrics` recorder, which the binary installs
//! once ([`install`]); without it the calls cost next to nothing.

use std::sync::OnceLock;
use std::time::Duration;

use ::metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::config::AdminConfig;

const SESSIONS_OPEN: &str = "sendbridge_sessions_open";
const SESSIONS: &str = "sendbridge_sessions_total";
const LOCAL_AUTH_FAILURES: &str = "sendbridge_local_auth_failures_total";
const MESSAGES: &str = "sendbridge_messages_total";
const UPSTREAM_REPLIES: &str = "sendbridge_upstream_replies_total";
const DELIVERY_SECONDS: &str = "sendbridge_delivery_seconds";
const QUEUE: &str = "sendbridge_queue_messages";
const SPOOL_BYTES: &str = "sendbridge_spool_bytes";
const SPOOL_FULL: &str = "sendbridge_spool_full";
const NOTICES: &str = "sendbridge_notices_total";
const ACCOUNT_INFO: &str = "sendbridge_account_info";

/// From a second to a day: hybrid deliveries take seconds, held mail days.
const DELIVERY_BUCKETS: [f64; 12] = [
    0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0,
];

/// What happened to a message: the `outcome` label of
/// `sendbridge_messages_total`.
#[derive(Debug, Clone, Copy)]
pub enum MessageEvent {
    /// Stored in the spool: the client heard (or will hear) 250.
    Accepted,
    Delivered,
    /// Waits for a retry or the daily sending window.
    Deferred,
    /// Moved to `rejected/` (refused upstream, or given up after max_age).
    Rejected,
    /// Moved to `held/` because the account cannot sign in.
    Held,
    /// Passthrough: the client got the refusal and keeps the message.
    Returned,
}

impl MessageEvent {
    fn label(self) -> &'static str {
        match self {
            MessageEvent::Accepted => "accepted",
            MessageEvent::Delivered => "delivered",
            MessageEvent::Deferred => "deferred",
            MessageEvent::Rejected => "rejected",
            MessageEvent::Held => "held",
            MessageEvent::Returned => "returned",
        }
    }
}

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder for this process, once; later calls
/// (several relays in one test process) keep the first. Nothing happens
/// when the admin interface is off: nobody could read the metrics, and
/// histogram samples are only drained by reading them.
pub fn install(config: &AdminConfig) {
    if config.listen.is_none() {
        return;
    }
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(DELIVERY_SECONDS.into()), &DELIVERY_BUCKETS)
            .expect("buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Fails only when another recorder was installed first.
        ::metrics::set_global_recorder(recorder).ok()?;
        describe();
        Some(handle)
    });
}

fn describe() {
    describe_gauge!(SESSIONS_OPEN, "SMTP client connections open now");
    describe_counter!(SESSIONS, "SMTP client connections accepted");
    describe_counter!(
        LOCAL_AUTH_FAILURES,
        "Failed sign-ins of legacy programs (wrong local user name or password)"
    );
    describe_counter!(
        MESSAGES,
        "Messages by account and outcome: accepted, delivered, deferred, rejected, held, returned"
    );
    describe_counter!(
        UPSTREAM_REPLIES,
        "Replies of upstream servers that decided a sign-in, recipient or message, by account and code"
    );
    describe_histogram!(
        DELIVERY_SECONDS,
        Unit::Seconds,
        "Time from spooling to delivery, by account"
    );
    describe_gauge!(QUEUE, "Messages in the queue by state, at scrape time");
    describe_gauge!(
        SPOOL_BYTES,
        Unit::Bytes,
        "Size of the queue on disk: messages and envelopes (spool data/ and state folders), at scrape time"
    );
    describe_gauge!(
        SPOOL_FULL,
        "1 while the spool's disk is full (new mail gets 452 4.3.1), else 0"
    );
    describe_gauge!(
        ACCOUNT_INFO,
        "1 for each account and the transport it sends through (smtp, graph, gmail-api)"
    );
    describe_counter!(
        NOTICES,
        "Notices handed to a channel (email, webhook), or none when no channel could take them, by event (bounce, delay_warning, account_held, ...)"
    );
}

/// `account` sends through `transport` (1), or no longer does (0).
pub fn account_transport(account: &str, transport: &str, current: bool) {
    gauge!(ACCOUNT_INFO, "account" => account.to_string(), "transport" => transport.to_string())
        .set(if current { 1.0 } else { 0.0 });
}

pub fn session_opened() {
    counter!(SESSIONS).increment(1);
    gauge!(SESSIONS_OPEN).increment(1);
}

pub fn session_closed() {
    gauge!(SESSIONS_OPEN).decrement(1);
}

pub fn local_auth_failure() {
    counter!(LOCAL_AUTH_FAILURES).increment(1);
}

/// Whether the last write to the spool failed for lack of space.
pub fn spool_full(full: bool) {
    gauge!(SPOOL_FULL).set(if full { 1.0 } else { 0.0 });
}

pub fn message(account: &str, event: MessageEvent) {
    counter!(MESSAGES, "account" => account.to_string(), "outcome" => event.label()).increment(1);
}

/// A delivered message and how long it waited since it was spooled.
pub fn delivered(account: &str, waited: Duration) {
    message(account, MessageEvent::Delivered);
    histogram!(DELIVERY_SECONDS, "account" => account.to_string()).record(waited.as_secs_f64());
}

/// Counts a reply code of an upstream server that decided a sign-in,
/// recipient or message.
pub fn upstream_reply(account: &str, code: u16) {
    counter!(UPSTREAM_REPLIES, "account" => account.to_string(), "code" => code.to_string())
        .increment(1);
}

/// Counts a notice by its event and the channel that took it (`email`,
/// `webhook`, or `none` when it could not be sent).
pub fn notice(event: &'static str, channel: &'static str) {
    counter!(NOTICES, "event" => event, "channel" => channel).increment(1);
}

/// What the queue holds at scrape time.
pub struct QueueGauges {
    /// Messages per state directory.
    pub messages: Vec<(&'static str, usize)>,
    pub spool_bytes: u64,
}

/// The Prometheus text, with the queue gauges as read now. `None` when no
/// recorder of ours is installed.
pub fn render(queue: &QueueGauges) -> Option<String> {
    let handle = HANDLE.get().and_then(Option::as_ref)?;
    for &(state, count) in &queue.messages {
        gauge!(QUEUE, "state" => state).set(count as f64);
    }
    gauge!(SPOOL_BYTES).set(queue.spool_bytes as f64);
    handle.run_upkeep();
    Some(handle.render())
}

/// Drains histogram samples into their buckets, which otherwise keep every
/// sample until the next scrape; the admin server calls it periodically.
pub fn upkeep() {
    if let Some(handle) = HANDLE.get().and_then(Option::as_ref) {
        handle.run_upkeep();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installing_twice_keeps_the_first_recorder() {
        let config = AdminConfig::default();
        install(&config);
        install(&config);
        local_auth_failure();
        let queue = QueueGauges {
            messages: vec![("held", 0)],
            spool_bytes: 0,
        };

        let text = render(&queue).expect("our recorder");

        assert!(
            text.contains("sendbridge_local_auth_failures_total"),
            "{text}"
        );
        assert!(
            text.contains("sendbridge_queue_messages{state=\"held\"} 0"),
            "{text}"
        );
    }
}
