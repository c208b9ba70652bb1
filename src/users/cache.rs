//! Verified credentials, as Dovecot's auth cache: after argon2 accepts a
//! password, a keyed digest of it lets later sign-ins with the same
//! credentials skip argon2 (~30 ms of CPU each) until the entry is older
//! than `server.auth_cache_ttl`.
//!
//! Only a digest is kept, never the password: HMAC-SHA256 under a key drawn
//! at start and never stored, over the user name, the stored hash and the
//! password, so a changed hash can no longer match. Failed checks are never
//! remembered: a wrong password always costs argon2.
//!
//! Sign-ins presenting the same credentials while their check is queued or
//! running wait for that check instead of starting their own (a legacy
//! program often opens several connections at once with one login): the
//! same input gets the same answer, so one argon2 run decides them all.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use aws_lc_rs::hmac;
use aws_lc_rs::rand::SystemRandom;
use subtle::ConstantTimeEq;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::secret::Secret;

/// A keyed digest of presented credentials. No `Debug`: it never reaches a
/// log.
#[derive(Clone)]
pub struct Digest([u8; 32]);

/// The answer of one password check, `None` until it is known; everyone
/// who presented the same credentials meanwhile holds a receiver.
pub type Answer = watch::Sender<Option<bool>>;

/// How a sign-in that missed the cache gets its answer.
pub enum Flight {
    /// The same credentials are being checked: wait for that answer.
    Joined(watch::Receiver<Option<bool>>),
    /// A check of its own, which later sign-ins with the same credentials
    /// may join; it must [`CredentialCache::land`] when done.
    Started(Answer),
    /// Another password of this user is being checked: a check of its own,
    /// not shared.
    Alone(Answer),
}

struct Checking {
    digest: Digest,
    answer: Answer,
}

struct Entry {
    digest: Digest,
    verified_at: Instant,
}

/// Shared by every session and outlives reloads. At most one entry per
/// configured user: a user's latest verified password.
pub struct CredentialCache {
    key: hmac::Key,
    by_user: Mutex<HashMap<String, Entry>>,
    /// At most one shared check per user.
    checking: Mutex<HashMap<String, Checking>>,
}

impl CredentialCache {
    pub fn new() -> anyhow::Result<Self> {
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &SystemRandom::new())
            .map_err(|_| anyhow::anyhow!("no random key for the credentials cache"))?;
        Ok(CredentialCache {
            key,
            by_user: Mutex::default(),
            checking: Mutex::default(),
        })
    }

    /// The digest of `password` presented for the user keyed `user` whose
    /// stored hash is `hash`. Each part is length-prefixed, so no two
    /// different triples share an input.
    pub fn digest(&self, user: &str, hash: &str, password: &Secret) -> Digest {
        let mut context = hmac::Context::with_key(&self.key);
        for part in [user, hash, password.expose()] {
            context.update(&(part.len() as u64).to_be_bytes());
            context.update(part.as_bytes());
        }
        let mut digest = [0u8; 32];
        digest.copy_from_slice(context.sign().as_ref());
        Digest(digest)
    }

    /// Whether `digest` was verified for `user` less than `ttl` ago; the
    /// comparison takes the same time wherever the digests differ.
    pub fn verified(&self, user: &str, digest: &Digest, now: Instant, ttl: Duration) -> bool {
        let by_user = self.by_user.lock().expect("credentials cache lock");
        by_user.get(user).is_some_and(|entry| {
            now.duration_since(entry.verified_at) < ttl
                && bool::from(entry.digest.0.ct_eq(&digest.0))
        })
    }

    /// Remembers that argon2 accepted `digest` for `user`, replacing the
    /// user's earlier entry.
    pub fn remember(&self, user: &str, digest: Digest, now: Instant) {
        let entry = Entry {
            digest,
            verified_at: now,
        };
        let mut by_user = self.by_user.lock().expect("credentials cache lock");
        by_user.insert(user.to_string(), entry);
    }

    /// Joins the check of the same credentials in progress, or starts one.
    pub fn take_off(&self, user: &str, digest: &Digest) -> Flight {
        let mut checking = self.checking.lock().expect("credentials cache lock");
        match checking.get(user) {
            Some(check) if bool::from(check.digest.0.ct_eq(&digest.0)) => {
                Flight::Joined(check.answer.subscribe())
            }
            Some(_) => Flight::Alone(Answer::new(None)),
            None => {
                let answer = Answer::new(None);
                let check = Checking {
                    digest: digest.clone(),
                    answer: answer.clone(),
                };
                checking.insert(user.to_string(), check);
                Flight::Started(answer)
            }
        }
    }

    /// Ends the shared check `answer` of `user`: sign-ins from now on start
    /// their own (or hit the cache, when it was remembered first).
    pub fn land(&self, user: &str, answer: &Answer) {
        let mut checking = self.checking.lock().expect("credentials cache lock");
        if checking
            .get(user)
            .is_some_and(|check| check.answer.same_channel(answer))
        {
            checking.remove(user);
        }
    }

    /// Keeps the entries of users `keep` says are configured as before: a
    /// reload drops removed users and those whose password changed.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        let mut by_user = self.by_user.lock().expect("credentials cache lock");
        by_user.retain(|user, _| keep(user));
    }
}
