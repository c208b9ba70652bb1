//! Notices: when the relay cannot keep its promise, a person hears of it.
//! Bounces and delay warnings to the sender, alerts to the admin.

mod account_alerts;
pub mod channels;
pub mod compose;
mod engine;
mod loops;
mod mime;
pub mod notice;
mod recent;
pub mod texts;
mod trial;

pub use channels::SendingAccount;
pub use engine::{GivenUp, Notifier};
pub use recent::Recent;
pub use trial::{Tried, send_test};
