//! Hostile sign-ins over real sockets: a flood of wrong passwords from one
//! address must not slow down or lock out a client at another address, and
//! what a client types as its user name reaches the log only when it looks
//! like one.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::fake_upstream::{FakeUpstream, FakeUpstreamOptions, UpstreamTls};
use common::log_capture::LogCapture;
use common::relay::{
    LOCAL_PASSWORD, LOCAL_USER, Relay, UPSTREAM_PASSWORD, UPSTREAM_USER, config_for,
};
use common::smtp::{Client, plain};
use sendbridge::secret::Secret;
use sendbridge::users::{cram_md5, hash_password};

const FLOOD: Duration = Duration::from_secs(3);
const FLOOD_THREADS: usize = 4;
/// Longer than any sign-in may take, short enough to fail fast.
const GIVE_UP: Duration = Duration::from_secs(5);

async fn relay(extra: &str) -> (FakeUpstream, Relay) {
    let options = FakeUpstreamOptions::new(UpstreamTls::StartTls, UPSTREAM_USER, UPSTREAM_PASSWORD);
    let upstream = FakeUpstream::start(options).await;
    let relay = Relay::start(config_for(&upstream, UpstreamTls::StartTls, extra)).await;
    (upstream, relay)
}

/// Threads that connect from 127.0.0.1, send EHLO and a wrong AUTH PLAIN
/// and hang up without waiting for the answer, until stopped.
struct Flood {
    stop: Arc<AtomicBool>,
    connections: Arc<AtomicUsize>,
    /// Greetings that said `421 4.3.2`: no connection slot was free.
    no_slot: Arc<AtomicUsize>,
    threads: Vec<JoinHandle<()>>,
}

impl Flood {
    fn start(relay: SocketAddr) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let no_slot = Arc::new(AtomicUsize::new(0));
        let commands = format!(
            "EHLO flood\r\nAUTH PLAIN {}\r\n",
            plain(LOCAL_USER, "guess")
        );
        let threads = (0..FLOOD_THREADS)
            .map(|_| {
                let (stop, connections, no_slot) =
                    (stop.clone(), connections.clone(), no_slot.clone());
                let commands = commands.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let Ok(mut stream) = TcpStream::connect(relay) else {
                            continue;
                        };
                        connections.fetch_add(1, Ordering::Relaxed);
                        stream.set_read_timeout(Some(GIVE_UP)).unwrap();
                        let mut greeting = String::new();
                        let _ = BufReader::new(&stream).read_line(&mut greeting);
                        if greeting.starts_with("421 4.3.2") {
                            no_slot.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        let _ = stream.write_all(commands.as_bytes());
                    }
                })
            })
            .collect();
        Flood {
            stop,
            connections,
            no_slot,
            threads,
        }
    }

    /// Stops the threads; returns (connections, connections refused for
    /// lack of a slot).
    fn stop(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            thread.join().unwrap();
        }
        (
            self.connections.load(Ordering::Relaxed),
            self.no_slot.load(Ordering::Relaxed),
        )
    }
}

/// How long a correct sign-in from 127.0.0.2 takes, from connect to 235,
/// or what went wrong instead.
async fn sign_in_from_another_address(relay: SocketAddr) -> Result<Duration, String> {
    let started = Instant::now();
    let sign_in = async {
        let mut client = Client::connect_from("127.0.0.2", relay).await;
        let greeting = client.read_reply().await;
        if greeting.code != 220 {
            return Err(format!("greeted with {greeting:?}"));
        }
        client.ehlo().await;
        let reply = client.login_plain(LOCAL_USER, LOCAL_PASSWORD).await;
        match reply.code {
            235 => Ok(started.elapsed()),
            _ => Err(format!("answered {reply:?}")),
        }
    };
    tokio::time::timeout(GIVE_UP, sign_in)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {GIVE_UP:?}")))
}

#[tokio::test(flavor = "current_thread")]
async fn a_wrong_password_flood_from_one_address_leaves_others_fast() {
    let logs = LogCapture::start();
    let (_upstream, relay) = relay("[server]\nmax_connections = 64").await;

    let flood = Flood::start(relay.addr);
    let flood_ends = Instant::now() + FLOOD;
    let mut during = Vec::new();
    while Instant::now() < flood_ends {
        during.push(sign_in_from_another_address(relay.addr).await);
    }
    // Joined off the runtime, which must keep serving the flood meanwhile.
    let (connections, no_slot) = tokio::task::spawn_blocking(move || flood.stop())
        .await
        .unwrap();
    let after = sign_in_from_another_address(relay.addr).await;

    let slowest = during.iter().flatten().max();
    let failed: Vec<&String> = during.iter().filter_map(|d| d.as_ref().err()).collect();
    println!(
        "flood: {connections} connections, {no_slot} got 421 for lack of a slot; \
         from 127.0.0.2 during it: {} sign-ins, slowest {slowest:?}, {} failed (first: {:?}); \
         after it: {after:?}",
        during.len(),
        failed.len(),
        failed.first(),
    );
    assert!(
        connections > 100,
        "the flood ran: {connections} connections"
    );
    for sign_in in during.iter().chain([&after]) {
        let took = sign_in.as_ref().expect("signed in");
        assert!(*took < Duration::from_millis(500), "took {took:?}");
    }
    assert_eq!(no_slot, 0, "connections refused for lack of a slot");
    // Every session has ended and logged.
    let _spool = relay.stop().await;
    let throttled = logs.lines_with("sign-ins from this address are throttled");
    let addresses: Vec<&str> = throttled
        .iter()
        .map(|line| line["address"].as_str().unwrap_or("-"))
        .collect();
    assert_eq!(addresses, ["127.0.0.1"], "{throttled:?}");
    assert_eq!(throttled[0]["level"], "WARN");
}

#[tokio::test(flavor = "current_thread")]
async fn a_password_typed_as_the_user_name_stays_out_of_the_log() {
    let logs = LogCapture::start();
    let (_upstream, relay) = relay("").await;
    let password_like = [
        "correct horse battery staple",
        "Tr0ub4dor&3!",
        "pässwört",
        "x\u{1b}[31m",
        &"a".repeat(65),
    ];
    for (n, typed) in password_like.iter().chain(&["scanner"]).enumerate() {
        // One address each, so the failures are not throttled.
        let mut client = Client::connect_from(&format!("127.0.0.{}", 10 + n), relay.addr).await;
        assert_eq!(client.read_reply().await.code, 220);
        client.ehlo().await;
        // AUTH LOGIN: the user name is its own line, as old clients type it.
        client.expect("AUTH LOGIN", 334).await;
        client.expect(&BASE64.encode(typed), 334).await;
        let reply = client.cmd(&BASE64.encode("wrong")).await;
        assert_eq!(reply.code, 535, "{reply:?}");
        client.expect("QUIT", 221).await;
        assert!(client.is_closed().await);
    }
    // Every session has ended and logged.
    let _spool = relay.stop().await;
    let closed = logs.lines_with("session closed after a rejection");
    assert_eq!(closed.len(), password_like.len() + 1, "{closed:?}");

    let text = logs.text();
    for typed in password_like {
        let escaped = serde_json::to_string(typed).unwrap();
        let escaped = escaped.trim_matches('"');
        assert!(!text.contains(escaped), "{typed:?} was logged");
        assert!(
            !text.contains(&format!("{typed:?}")),
            "{typed:?} was logged"
        );
    }
    let shown: Vec<&str> = closed
        .iter()
        .map(|line| line["hint"].as_str().unwrap())
        .collect();
    assert!(
        shown[..password_like.len()]
            .iter()
            .all(|hint| hint.contains("(not shown: does not look like a user name)")),
        "{shown:?}"
    );
    assert!(
        shown[password_like.len()].contains(r#"user "scanner""#),
        "{shown:?}"
    );
}

/// A program with a connection pool signs in on many connections at once
/// from one address: none of them may wait for the failure throttle (found
/// by the load benchmark: sign-ins 4 to 10 waited 1 s, 2 s, … 15 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_correct_sign_ins_from_one_address_are_not_slowed() {
    let (_upstream, relay) = relay("").await;
    let started = Instant::now();

    let sign_ins: Vec<_> = (0..12)
        .map(|_| {
            let addr = relay.addr;
            tokio::spawn(async move {
                let mut client = Client::connect(addr).await;
                client.ehlo().await;
                client.login_plain(LOCAL_USER, LOCAL_PASSWORD).await.code
            })
        })
        .collect();
    let mut codes = Vec::new();
    for sign_in in sign_ins {
        codes.push(sign_in.await.unwrap());
    }

    assert_eq!(codes, [235; 12]);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

/// A repeated correct sign-in is answered from the verified-credentials
/// cache, without argon2; a wrong password after it is still checked and
/// refused.
#[tokio::test(flavor = "current_thread")]
async fn a_repeated_correct_sign_in_skips_the_password_check_a_wrong_one_does_not() {
    let logs = LogCapture::start();
    let (_upstream, relay) = relay("").await;
    let attempts = [
        (LOCAL_PASSWORD, 235),
        (LOCAL_PASSWORD, 235),
        ("guess", 535),
        (LOCAL_PASSWORD, 235),
    ];
    for (password, code) in attempts {
        let mut client = relay.greeted_client().await;
        let reply = client.login_plain(LOCAL_USER, password).await;
        assert_eq!(reply.code, code, "{reply:?}");
        client.expect("QUIT", 221).await;
        assert!(client.is_closed().await);
    }
    // Every session has ended and logged.
    let _spool = relay.stop().await;
    assert_eq!(verified_by(&logs), ["argon2", "cache", "cache"]);
    assert_eq!(logs.lines_with("local sign-in failed").len(), 1);
}

/// A reload keeps the verified credentials of a user whose password hash
/// did not change, and drops them when it did: the old password is then
/// refused at once.
#[tokio::test(flavor = "current_thread")]
async fn a_reload_that_changes_a_password_drops_its_cached_sign_in() {
    let logs = LogCapture::start();
    let options = FakeUpstreamOptions::new(UpstreamTls::StartTls, UPSTREAM_USER, UPSTREAM_PASSWORD);
    let upstream = FakeUpstream::start(options).await;
    let with_password = |password: &str| {
        let mut config = config_for(&upstream, UpstreamTls::StartTls, "");
        let user = config.users.get_mut(LOCAL_USER).unwrap();
        user.password = None;
        user.password_hash = Some(hash_password(&Secret::new(password)).unwrap());
        config
    };
    let unchanged = with_password(LOCAL_PASSWORD);
    let relay = Relay::start(unchanged.clone()).await;
    let sign_in = |password: &'static str| {
        let relay = &relay;
        async move {
            let mut client = relay.greeted_client().await;
            let code = client.login_plain(LOCAL_USER, password).await.code;
            client.expect("QUIT", 221).await;
            code
        }
    };

    assert_eq!(sign_in(LOCAL_PASSWORD).await, 235);
    relay.reload(unchanged).await.unwrap();
    assert_eq!(sign_in(LOCAL_PASSWORD).await, 235);
    relay.reload(with_password("changed")).await.unwrap();
    assert_eq!(sign_in(LOCAL_PASSWORD).await, 535);
    assert_eq!(sign_in("changed").await, 235);
    assert_eq!(sign_in("changed").await, 235);

    let _spool = relay.stop().await;
    assert_eq!(verified_by(&logs), ["argon2", "cache", "argon2", "cache"]);
}

/// CRAM-MD5 needs the password itself, which an argon2 hash cannot give:
/// such a user is refused even with the right answer, and the start says
/// which users CRAM-MD5 cannot sign in.
#[tokio::test(flavor = "current_thread")]
async fn cram_md5_cannot_sign_in_a_user_with_only_a_password_hash() {
    let logs = LogCapture::start();
    let options = FakeUpstreamOptions::new(UpstreamTls::StartTls, UPSTREAM_USER, UPSTREAM_PASSWORD);
    let upstream = FakeUpstream::start(options).await;
    let extra = r#"[server]
        auth_mechanisms = ["PLAIN", "CRAM-MD5"]"#;
    let mut config = config_for(&upstream, UpstreamTls::StartTls, extra);
    let user = config.users.get_mut(LOCAL_USER).unwrap();
    user.password = None;
    user.password_hash = Some(hash_password(&Secret::new(LOCAL_PASSWORD)).unwrap());
    let relay = Relay::start(config).await;

    let warnings = logs.lines_with("CRAM-MD5 cannot be checked");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0]["users"], LOCAL_USER);
    let mut client = relay.greeted_client().await;
    let challenge = client.cmd("AUTH CRAM-MD5").await;
    assert_eq!(challenge.code, 334, "{challenge:?}");
    let challenge = String::from_utf8(BASE64.decode(&challenge.text).unwrap()).unwrap();
    let digest = cram_md5::digest_of(&Secret::new(LOCAL_PASSWORD), &challenge);
    let answer = client
        .cmd(&BASE64.encode(format!("{LOCAL_USER} {digest}")))
        .await;
    assert_eq!(answer.code, 535, "{answer:?}");
    // PLAIN still works for it.
    let reply = client.login_plain(LOCAL_USER, LOCAL_PASSWORD).await;
    assert_eq!(reply.code, 235, "{reply:?}");
}

/// How each signed-in session's sign-in was verified, in order: `argon2`
/// or `cache`, from the sessions' closing lines.
fn verified_by(logs: &LogCapture) -> Vec<String> {
    logs.lines_with("session closed")
        .iter()
        .filter(|line| line["user"] != "-")
        .map(|line| line["verified_by"].as_str().unwrap_or("-").to_string())
        .collect()
}
