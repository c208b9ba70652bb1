//! Notices: when the relay cannot keep its promise, a person hears of it.
//! Bounces and delay warnings to the sender, alerts to the admin.

pub mod compose;
mod mime;
pub mod notice;
pub mod texts;
