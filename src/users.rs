//! The local users legacy programs sign in as, and password checks against
//! their argon2 hashes on a few dedicated threads with a bounded queue,
//! skipped for credentials verified a short while ago.

mod cache;
pub mod cram_md5;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::mpsc::{self, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use subtle::ConstantTimeEq;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::warn;

use crate::config::{AuthMechanism, Config};
use crate::secret::Secret;
pub use cache::CredentialCache;
use cache::{Answer, Digest, Flight};

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

/// A password to check against a PHC hash; the answer goes to everyone
/// waiting on `answer`.
struct Check {
    hash: String,
    password: Secret,
    answer: Answer,
    /// Where a shared check ends and a match is remembered.
    landing: Option<Landing>,
}

/// The cache a check's answer lands in: a configured user, the cache on.
struct Landing {
    cache: Arc<CredentialCache>,
    user: String,
    digest: Digest,
    /// Whether sign-ins with the same credentials joined this check.
    shared: bool,
    /// When the check was asked for: an entry expires counting from then
    /// (and the checker threads have no runtime clock).
    asked_at: Instant,
}

impl Landing {
    /// A match is remembered before the shared check ends, so a sign-in
    /// meanwhile finds one or the other.
    fn land(self, answer: &Answer, matches: bool) {
        if matches {
            self.cache.remember(&self.user, self.digest, self.asked_at);
        }
        if self.shared {
            self.cache.land(&self.user, answer);
        }
    }
}

/// A signed-in local user.
#[derive(Debug, Clone)]
pub struct SignedIn {
    /// As configured: the key of `[users.<name>]`.
    pub user: String,
}

struct LocalUser {
    name: String,
    password_hash: String,
    /// Kept only while CRAM-MD5 is offered, which needs the password
    /// itself.
    cram_md5_password: Option<Secret>,
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

/// How a sign-in is decided.
pub enum Checked {
    /// The same credentials were verified within the cache's lifetime.
    Cached(SignedIn),
    Pending(PendingCheck),
}

/// A queued password check, or one this sign-in joined. Dropping it before
/// the answer drops the check too, if nobody else waits for it and no
/// thread has started it yet.
pub struct PendingCheck {
    user: Option<Arc<LocalUser>>,
    answer: watch::Receiver<Option<bool>>,
}

impl PendingCheck {
    /// The signed-in user, when the name and the password match.
    pub async fn outcome(mut self) -> Option<SignedIn> {
        // A closed channel without an answer: the checker threads are gone.
        let matches = self
            .answer
            .wait_for(Option::is_some)
            .await
            .is_ok_and(|answer| *answer == Some(true));
        let user = self.user.filter(|_| matches)?;
        Some(user.signed_in())
    }
}

impl LocalUser {
    fn signed_in(&self) -> SignedIn {
        SignedIn {
            user: self.name.clone(),
        }
    }
}

impl Users {
    /// Plain-text passwords from the config are hashed here, once, so every
    /// check takes the same constant-time argon2 path; CRAM-MD5, when
    /// offered, keeps them too. Warns about users CRAM-MD5 cannot sign in.
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let cram_md5 = config
            .server
            .auth_mechanisms
            .contains(&AuthMechanism::CramMd5);
        let hash_only: Vec<&str> = config
            .users
            .iter()
            .filter(|(_, user)| user.password.is_none())
            .map(|(name, _)| name.as_str())
            .collect();
        if cram_md5 && !hash_only.is_empty() {
            warn!(
                users = hash_only.join(", "),
                "server.auth_mechanisms lists CRAM-MD5, but these users have only a password_hash, from which CRAM-MD5 cannot be checked: they can sign in with PLAIN or LOGIN only; give them password or password_file (users.<name>.password) if their device needs CRAM-MD5"
            );
        }
        let mut by_name = HashMap::new();
        for (name, user) in &config.users {
            let password_hash = match (&user.password_hash, &user.password) {
                (Some(hash), _) => hash.clone(),
                (None, Some(password)) => hash_password(password)?,
                (None, None) => unreachable!("config validation requires a password"),
            };
            by_name.insert(
                name.to_lowercase(),
                Arc::new(LocalUser {
                    name: name.clone(),
                    password_hash,
                    cram_md5_password: user.password.clone().filter(|_| cram_md5),
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

    /// Answers from `cache` when these credentials were verified less than
    /// `ttl` ago, else queues the check of the user name and password.
    /// Unknown names cost the same as wrong passwords, so timing does not
    /// reveal which names exist.
    pub fn check(
        &self,
        username: &str,
        password: Secret,
        cache: &Arc<CredentialCache>,
        ttl: Duration,
    ) -> Result<Checked, Busy> {
        let key = username.to_lowercase();
        let user = self.by_name.get(&key).cloned();
        let (answer, landing) = match &user {
            Some(user) if !ttl.is_zero() => {
                let digest = cache.digest(&key, &user.password_hash, &password);
                let asked_at = Instant::now();
                if cache.verified(&key, &digest, asked_at, ttl) {
                    return Ok(Checked::Cached(user.signed_in()));
                }
                let (answer, shared) = match cache.take_off(&key, &digest) {
                    Flight::Joined(answer) => {
                        let user = Some(user.clone());
                        return Ok(Checked::Pending(PendingCheck { user, answer }));
                    }
                    Flight::Started(answer) => (answer, true),
                    Flight::Alone(answer) => (answer, false),
                };
                let cache = cache.clone();
                let landing = Landing {
                    cache,
                    user: key,
                    digest,
                    shared,
                    asked_at,
                };
                (answer, Some(landing))
            }
            _ => (Answer::new(None), None),
        };
        let hash = match &user {
            Some(user) => user.password_hash.clone(),
            None => dummy_hash().to_string(),
        };
        let pending = PendingCheck {
            user,
            answer: answer.subscribe(),
        };
        let check = Check {
            hash,
            password,
            answer,
            landing,
        };
        // Disconnected means the checker threads are gone: as busy as can be.
        match self.checks.try_send(check) {
            Ok(()) => Ok(Checked::Pending(pending)),
            Err(TrySendError::Full(check) | TrySendError::Disconnected(check)) => {
                if let Some(landing) = check.landing {
                    landing.land(&check.answer, false);
                }
                Err(Busy)
            }
        }
    }

    /// A configured user as if signed in, without a password: for mail the
    /// relay's own user queued as `sendmail.user` (the maildrop).
    pub fn local(&self, name: &str) -> Option<SignedIn> {
        self.by_name
            .get(&name.to_lowercase())
            .map(|user| user.signed_in())
    }

    /// Checks a CRAM-MD5 answer: `digest` to `challenge` from `username`.
    /// Cheap, so on the runtime; unknown users and users without a plain
    /// password are checked against a made-up one, as long as a real check.
    pub fn check_cram_md5(
        &self,
        username: &str,
        challenge: &str,
        digest: &str,
    ) -> Option<SignedIn> {
        let user = self.by_name.get(&username.to_lowercase());
        let password = user.and_then(|user| user.cram_md5_password.as_ref());
        let unknown = Secret::new("no such user");
        let matches = cram_md5::verify(password.unwrap_or(&unknown), challenge, digest);
        user.filter(|_| matches && password.is_some())
            .map(|user| user.signed_in())
    }

    /// Whether `other` has the user keyed `key` with the same password
    /// hash: a reload keeps that user's verified credentials.
    pub fn same_password(&self, other: &Users, key: &str) -> bool {
        match (self.by_name.get(key), other.by_name.get(key)) {
            (Some(this), Some(that)) => this.password_hash == that.password_hash,
            _ => false,
        }
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

/// Answers a check, unless every client waiting for it has gone: argon2 is
/// the expensive part of a sign-in, and nobody would hear the answer.
fn run(check: Check, memory: &mut Vec<Block>) {
    let matches = check.answer.receiver_count() > 0
        && verify(check.password.expose().as_bytes(), &check.hash, memory);
    if let Some(landing) = check.landing {
        landing.land(&check.answer, matches);
    }
    check.answer.send_replace(Some(matches));
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

    const TTL: Duration = Duration::from_secs(3600);

    fn cache() -> Arc<CredentialCache> {
        Arc::new(CredentialCache::new().unwrap())
    }

    /// How a sign-in ended: `"cache"`, `"argon2"` or `"wrong"`.
    async fn decided(
        users: &Users,
        cache: &Arc<CredentialCache>,
        ttl: Duration,
        name: &str,
        password: &str,
    ) -> &'static str {
        match users
            .check(name, Secret::new(password), cache, ttl)
            .ok()
            .unwrap()
        {
            Checked::Cached(_) => "cache",
            Checked::Pending(check) => match check.outcome().await {
                Some(_) => "argon2",
                None => "wrong",
            },
        }
    }

    async fn sign_in(users: &Users, name: &str, password: &str) -> Option<SignedIn> {
        match users
            .check(name, Secret::new(password), &cache(), TTL)
            .ok()?
        {
            Checked::Pending(check) => check.outcome().await,
            Checked::Cached(_) => unreachable!("a fresh cache"),
        }
    }

    #[tokio::test]
    async fn check_accepts_only_the_right_password() {
        let users = users();
        let signed_in = sign_in(&users, "INVOICES", "old-password").await.unwrap();
        assert_eq!(signed_in.user, "Invoices");
        assert!(sign_in(&users, "invoices", "wrong").await.is_none());
        assert!(sign_in(&users, "nobody", "old-password").await.is_none());
    }

    #[test]
    fn a_check_whose_clients_have_gone_is_not_run() {
        let hash = hash_password(&Secret::new("old-password")).unwrap();
        let check = |answer| Check {
            hash: hash.clone(),
            password: Secret::new("old-password"),
            answer,
            landing: None,
        };
        let mut memory = Vec::new();

        run(check(Answer::new(None)), &mut memory);

        assert!(memory.is_empty(), "argon2 did not run");
        let answer = Answer::new(None);
        let waiting = answer.subscribe();
        run(check(answer), &mut memory);
        assert_eq!(*waiting.borrow(), Some(true));
    }

    #[tokio::test]
    async fn sign_ins_with_the_same_credentials_meanwhile_share_one_check() {
        let (cache, users) = (cache(), users());
        for (password, expected) in [("old-password", true), ("guess", false)] {
            // More than the queue holds: each would need a place of its own.
            let checks: Vec<PendingCheck> = (0..3 * (CHECK_THREADS + CHECK_QUEUE))
                .map(
                    |_| match users.check("invoices", Secret::new(password), &cache, TTL) {
                        Ok(Checked::Pending(check)) => check,
                        Ok(Checked::Cached(_)) => {
                            panic!("{password}: cached before the check ended")
                        }
                        Err(Busy) => panic!("{password}: a sign-in took a place in the queue"),
                    },
                )
                .collect();
            let mut checks = checks.into_iter();
            // The one who started the check leaves: the others still hear.
            drop(checks.next());
            for check in checks {
                assert_eq!(check.outcome().await.is_some(), expected, "{password}");
            }
        }
        assert_eq!(
            decided(&users, &cache, TTL, "invoices", "old-password").await,
            "cache"
        );
        let guess = users.check("invoices", Secret::new("guess"), &cache, TTL);
        assert!(
            matches!(guess, Ok(Checked::Pending(_))),
            "a failure is not remembered after its check"
        );
    }

    #[test]
    fn a_full_queue_answers_busy_at_once() {
        let users = users();
        // Checks take milliseconds each: these are queued far faster.
        let checks: Vec<_> = (0..CHECK_THREADS + CHECK_QUEUE + 8)
            .map(|_| users.check("invoices", Secret::new("guess"), &cache(), TTL))
            .collect();
        let queued = checks.iter().filter(|check| check.is_ok()).count();
        assert!(
            (CHECK_QUEUE..checks.len()).contains(&queued),
            "{queued} queued"
        );
    }

    enum Step {
        SignIn(&'static str, &'static str),
        /// The clock moves on by this many seconds.
        Wait(u64),
        /// The configuration now has this password hash for the user.
        Reload(&'static str),
    }

    /// Users with an explicit hash: a reload of the same hash keeps it.
    fn users_with_hash(hash: &str) -> Users {
        let config = Config::from_toml(&format!(
            "[accounts.gmail]\nusername = \"me@gmail.com\"\npassword = \"x\"\n[users.Invoices]\npassword_hash = \"{hash}\""
        ))
        .unwrap();
        Users::new(&config).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn verified_credentials_skip_argon2_until_they_expire_or_change() {
        use Step::*;
        let old = hash_password(&Secret::new("old-password")).unwrap();
        let new = hash_password(&Secret::new("new-password")).unwrap();
        let hashes = [("old", old.as_str()), ("new", new.as_str())];
        let cases: [(&str, u64, &[Step]); 8] = [
            (
                "hit",
                3600,
                &[
                    SignIn("old-password", "argon2"),
                    SignIn("OLD-PASSWORD", "wrong"),
                    SignIn("old-password", "cache"),
                ],
            ),
            (
                "any spelling of the name",
                3600,
                &[
                    SignIn("old-password", "argon2"),
                    SignIn("old-password", "cache"),
                ],
            ),
            (
                "a wrong password after a success",
                3600,
                &[
                    SignIn("old-password", "argon2"),
                    SignIn("guess", "wrong"),
                    SignIn("guess", "wrong"),
                ],
            ),
            (
                "failures are never cached",
                3600,
                &[
                    SignIn("guess", "wrong"),
                    SignIn("guess", "wrong"),
                    SignIn("old-password", "argon2"),
                ],
            ),
            (
                "expired",
                3600,
                &[
                    SignIn("old-password", "argon2"),
                    Wait(3599),
                    SignIn("old-password", "cache"),
                    Wait(1),
                    SignIn("old-password", "argon2"),
                    SignIn("old-password", "cache"),
                ],
            ),
            (
                "a reload with the same hash keeps it",
                3600,
                &[
                    SignIn("old-password", "argon2"),
                    Reload("old"),
                    SignIn("old-password", "cache"),
                ],
            ),
            (
                "a reload with a new hash drops it",
                3600,
                &[
                    SignIn("old-password", "argon2"),
                    Reload("new"),
                    SignIn("old-password", "wrong"),
                    SignIn("new-password", "argon2"),
                    SignIn("new-password", "cache"),
                ],
            ),
            (
                "ttl 0 is off",
                0,
                &[
                    SignIn("old-password", "argon2"),
                    SignIn("old-password", "argon2"),
                ],
            ),
        ];
        for (case, ttl, steps) in cases {
            let ttl = Duration::from_secs(ttl);
            let cache = cache();
            let mut users = users_with_hash(&old);
            for (n, step) in steps.iter().enumerate() {
                match step {
                    SignIn(password, expected) => {
                        let name = if n % 2 == 0 { "Invoices" } else { "INVOICES" };
                        let got = decided(&users, &cache, ttl, name, password).await;
                        assert_eq!(got, *expected, "{case}, step {n}");
                    }
                    Wait(seconds) => tokio::time::advance(Duration::from_secs(*seconds)).await,
                    Reload(hash) => {
                        let hash = hashes.iter().find(|(name, _)| name == hash).unwrap().1;
                        let reloaded = users_with_hash(hash);
                        cache.retain(|user| users.same_password(&reloaded, user));
                        users = reloaded;
                    }
                }
            }
        }
    }

    #[tokio::test]
    async fn a_cached_sign_in_needs_no_checker_thread() {
        let (cache, users) = (cache(), users());
        assert_eq!(
            decided(&users, &cache, TTL, "invoices", "old-password").await,
            "argon2"
        );
        // Different guesses: the same one would share one check.
        let queued: Vec<_> = (0..)
            .map(|n| users.check("invoices", Secret::new(format!("guess {n}")), &cache, TTL))
            .take_while(Result::is_ok)
            .collect();
        assert!(queued.len() >= CHECK_QUEUE, "{} queued", queued.len());

        let checked = users.check("invoices", Secret::new("old-password"), &cache, TTL);
        assert!(matches!(checked, Ok(Checked::Cached(_))), "busy, or queued");
    }

    #[tokio::test]
    async fn the_digest_binds_the_stored_hash() {
        let old = hash_password(&Secret::new("old-password")).unwrap();
        let (cache, users) = (cache(), users_with_hash(&old));
        assert_eq!(
            decided(&users, &cache, TTL, "invoices", "old-password").await,
            "argon2"
        );
        // A new hash of the same password, its entry kept: the digest no
        // longer matches, so argon2 decides.
        let rehashed = users_with_hash(&hash_password(&Secret::new("old-password")).unwrap());
        assert_eq!(
            decided(&rehashed, &cache, TTL, "invoices", "old-password").await,
            "argon2"
        );
        assert_eq!(
            decided(&rehashed, &cache, TTL, "invoices", "old-password").await,
            "cache"
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
