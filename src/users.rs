//! The local users legacy programs sign in as, and password checks against
//! their argon2 hashes on a few dedicated threads with a bounded queue.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, mpsc};

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use subtle::ConstantTimeEq;
use tokio::sync::oneshot;

use crate::config::Config;
use crate::secret::Secret;

/// Password checks run on this many dedicated threads, each reusing one
/// argon2 memory buffer (~19 MiB with default parameters). Allocating it per
/// check made RSS grow by that much per sign-in: glibc raises its mmap
/// threshold after the first free and then keeps such blocks in the heap
/// (measured with the load benchmark). Two threads also bound how many
/// checks a flood of AUTH attempts can run at once.
const CHECK_THREADS: usize = 2;
/// Checks waiting for a thread. Beyond this a sign-in is answered "try again
/// later" at once: a client waiting behind a long queue holds a connection
/// slot, and its check would run long after it gave up.
const CHECK_QUEUE: usize = 2 * CHECK_THREADS * 4;

/// A password to check against a PHC hash; the answer goes to `reply`.
struct Check {
    hash: String,
    password: Secret,
    reply: oneshot::Sender<bool>,
}

/// A signed-in local user.
#[derive(Debug, Clone)]
pub struct SignedIn {
    pub user: String,
    pub account: String,
}

struct LocalUser {
    name: String,
    password_hash: String,
    account: String,
}

/// The configured local users, keyed by lower-case name: configuration
/// keys are lower-case, legacy programs are not always.
pub struct Users {
    by_name: HashMap<String, Arc<LocalUser>>,
    checks: mpsc::SyncSender<Check>,
}

/// Every checker thread is busy and the queue is full.
#[derive(Debug)]
pub struct Busy;

/// A queued password check. Dropping it before the answer drops the check
/// too, if no thread has started it yet.
pub struct PendingCheck {
    user: Option<Arc<LocalUser>>,
    answer: oneshot::Receiver<bool>,
}

impl PendingCheck {
    /// The signed-in user, when the name and the password match.
    pub async fn outcome(self) -> Option<SignedIn> {
        let matches = self.answer.await.unwrap_or(false);
        let user = self.user.filter(|_| matches)?;
        Some(SignedIn {
            user: user.name.clone(),
            account: user.account.clone(),
        })
    }
}

impl Users {
    /// Plain-text passwords from the config are hashed here, once, so every
    /// check takes the same constant-time argon2 path.
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let mut by_name = HashMap::new();
        for (name, user) in &config.users {
            let password_hash = match (&user.password_hash, &user.password) {
                (Some(hash), _) => hash.clone(),
                (None, Some(password)) => hash_password(password)?,
                (None, None) => unreachable!("config validation requires a password"),
            };
            let account = user
                .account
                .clone()
                .expect("config validation sets the account");
            by_name.insert(
                name.to_lowercase(),
                Arc::new(LocalUser {
                    name: name.clone(),
                    password_hash,
                    account,
                }),
            );
        }
        // Computed now rather than on the runtime at the first unknown name.
        dummy_hash();
        Ok(Users {
            by_name,
            checks: start_checkers()?,
        })
    }

    /// Queues the check of a user name and password. Unknown names cost the
    /// same as wrong passwords, so timing does not reveal which names exist.
    pub fn check(&self, username: &str, password: Secret) -> Result<PendingCheck, Busy> {
        let user = self.by_name.get(&username.to_lowercase()).cloned();
        let hash = match &user {
            Some(user) => user.password_hash.clone(),
            None => dummy_hash().to_string(),
        };
        let (reply, answer) = oneshot::channel();
        // Disconnected means the checker threads are gone: as busy as can be.
        self.checks
            .try_send(Check {
                hash,
                password,
                reply,
            })
            .map_err(|_| Busy)?;
        Ok(PendingCheck { user, answer })
    }

    /// `username` as it may appear in a log line: a configured name always,
    /// anything else only when it looks like a user name rather than a
    /// password typed into the wrong field.
    pub fn loggable<'a>(&self, username: &'a str) -> Cow<'a, str> {
        if self.by_name.contains_key(&username.to_lowercase()) || looks_like_user_name(username) {
            Cow::Owned(format!("{username:?}"))
        } else {
            Cow::Borrowed("(not shown: does not look like a user name)")
        }
    }
}

/// Short, and only the characters of login names and mail addresses: no
/// spaces, punctuation or control characters, which passwords often have.
fn looks_like_user_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@+-".contains(&b))
}

/// The checker threads; they end when `Users` (the sender) is dropped.
fn start_checkers() -> std::io::Result<mpsc::SyncSender<Check>> {
    let (sender, receiver) = mpsc::sync_channel::<Check>(CHECK_QUEUE);
    let receiver = Arc::new(Mutex::new(receiver));
    for n in 0..CHECK_THREADS {
        let receiver = receiver.clone();
        std::thread::Builder::new()
            .name(format!("password-check-{n}"))
            .spawn(move || {
                let mut memory = Vec::new();
                loop {
                    let next = receiver.lock().expect("checker lock").recv();
                    let Ok(check) = next else { return };
                    run(check, &mut memory);
                }
            })?;
    }
    Ok(sender)
}

/// Answers a check, unless its client has gone: argon2 is the expensive
/// part of a sign-in, and nobody would hear the answer.
fn run(check: Check, memory: &mut Vec<Block>) {
    if check.reply.is_closed() {
        return;
    }
    let matches = verify(check.password.expose().as_bytes(), &check.hash, memory);
    let _ = check.reply.send(matches);
}

/// Checks `password` against a PHC string in constant time, computing the
/// hash in `memory` (grown to the hash's memory cost and kept for reuse).
fn verify(password: &[u8], phc: &str, memory: &mut Vec<Block>) -> bool {
    let Ok(hash) = PasswordHash::new(phc) else {
        return false;
    };
    let (Some(expected), Some(salt)) = (hash.hash, hash.salt) else {
        return false;
    };
    let mut salt_bytes = [0u8; 64];
    let (Ok(params), Ok(algorithm), Ok(salt)) = (
        Params::try_from(&hash),
        Algorithm::try_from(hash.algorithm),
        salt.decode_b64(&mut salt_bytes),
    ) else {
        return false;
    };
    let Ok(version) = hash
        .version
        .map_or(Ok(Version::default()), Version::try_from)
    else {
        return false;
    };
    let blocks = params.block_count();
    if memory.len() < blocks {
        memory.resize(blocks, Block::default());
    }
    let mut computed = vec![0u8; expected.len()];
    Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(password, salt, &mut computed, &mut memory[..blocks])
        .is_ok()
        && bool::from(computed.ct_eq(expected.as_bytes()))
}

/// An argon2 PHC string for `password`, with a random salt.
pub fn hash_password(password: &Secret) -> anyhow::Result<String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.expose().as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|err| anyhow::anyhow!("hashing failed: {err}"))
}

fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        hash_password(&Secret::new("no such user")).expect("argon2 hashes a fixed password")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_reuses_memory_and_checks_in_constant_time() {
        let hash = hash_password(&Secret::new("old-password")).unwrap();
        let mut memory = Vec::new();
        assert!(verify(b"old-password", &hash, &mut memory));
        let allocated = memory.len();
        assert!(!verify(b"old-passworD", &hash, &mut memory));
        assert_eq!(memory.len(), allocated, "the buffer is reused");
        assert!(!verify(b"old-password", "$argon2id$garbage", &mut memory));
    }

    fn users() -> Users {
        let config = Config::from_toml(
            "[accounts.gmail]\nusername = \"me@gmail.com\"\npassword = \"x\"\n[users.Invoices]\npassword = \"old-password\"",
        )
        .unwrap();
        Users::new(&config).unwrap()
    }

    async fn sign_in(users: &Users, name: &str, password: &str) -> Option<SignedIn> {
        let check = users.check(name, Secret::new(password)).unwrap();
        check.outcome().await
    }

    #[tokio::test]
    async fn check_accepts_only_the_right_password() {
        let users = users();
        let signed_in = sign_in(&users, "INVOICES", "old-password").await.unwrap();
        assert_eq!(
            (signed_in.user.as_str(), signed_in.account.as_str()),
            ("Invoices", "gmail")
        );
        assert!(sign_in(&users, "invoices", "wrong").await.is_none());
        assert!(sign_in(&users, "nobody", "old-password").await.is_none());
    }

    #[test]
    fn a_check_whose_client_has_gone_is_not_run() {
        let hash = hash_password(&Secret::new("old-password")).unwrap();
        let check = |reply| Check {
            hash: hash.clone(),
            password: Secret::new("old-password"),
            reply,
        };
        let mut memory = Vec::new();
        let (reply, answer) = oneshot::channel();
        drop(answer);

        run(check(reply), &mut memory);

        assert!(memory.is_empty(), "argon2 did not run");
        let (reply, mut answer) = oneshot::channel();
        run(check(reply), &mut memory);
        assert_eq!(answer.try_recv(), Ok(true));
    }

    #[test]
    fn a_full_queue_answers_busy_at_once() {
        let users = users();
        // Checks take milliseconds each: these are queued far faster.
        let checks: Vec<_> = (0..CHECK_THREADS + CHECK_QUEUE + 8)
            .map(|_| users.check("invoices", Secret::new("guess")))
            .collect();
        let queued = checks.iter().filter(|check| check.is_ok()).count();
        assert!(
            (CHECK_QUEUE..checks.len()).contains(&queued),
            "{queued} queued"
        );
    }

    #[test]
    fn only_names_that_look_like_user_names_are_logged() {
        let users = users();
        let cases = [
            ("scanner", r#""scanner""#),
            ("invoices@office.example", r#""invoices@office.example""#),
            ("first.last+tag-2_x", r#""first.last+tag-2_x""#),
            // Configured names are logged whatever they look like.
            ("INVOICES", r#""INVOICES""#),
            ("", "(not shown: does not look like a user name)"),
            (
                "correct horse",
                "(not shown: does not look like a user name)",
            ),
            ("Tr0ub4dor&3", "(not shown: does not look like a user name)"),
            ("pässwört", "(not shown: does not look like a user name)"),
            ("tab\there", "(not shown: does not look like a user name)"),
            ("x\u{1b}[31m", "(not shown: does not look like a user name)"),
        ];
        for (typed, logged) in cases {
            assert_eq!(users.loggable(typed), logged, "{typed:?}");
        }
        assert_eq!(
            users.loggable(&"a".repeat(64)),
            format!("{:?}", "a".repeat(64))
        );
        assert_eq!(
            users.loggable(&"a".repeat(65)),
            "(not shown: does not look like a user name)"
        );
    }
}
