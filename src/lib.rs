//! sendbridge: an SMTP relay that lets legacy programs keep sending mail
//! after providers switched off plain-password sign-in. See DESIGN.md for
//! the module map.

pub mod access_tokens;
pub mod address;
pub mod admin;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod maildrop;
pub mod notify;
pub mod oauth;
pub mod observe;
pub mod pickup;
pub mod policy;
pub mod private_files;
pub mod provider_replies;
pub mod relay;
pub mod reply;
pub mod rewrite;
pub mod routes;
pub mod secret;
pub mod send_window;
pub mod sendmail;
pub mod server;
pub mod session;
pub mod spool;
pub mod spool_space;
pub mod terminal;
pub mod tls;
pub mod transport;
pub mod users;
