//! A full spool disk (issue 10, item 6): delivery and removal go on, new
//! mail gets `452 4.3.1`, the log says so once a minute, and everything
//! resumes by itself when space returns. The spool is a small tmpfs filled
//! to the last page. A test binary of its own: it mounts a file system and
//! captures the log (see `oauth_logs.rs` for why captures live alone).

mod common;

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::fake_upstream::{FakeUpstream, FakeUpstreamOptions, Script, UpstreamTls, gmail};
use common::http;
use common::log_capture::LogCapture;
use common::relay::{Relay, UPSTREAM_PASSWORD, UPSTREAM_USER, config_for};
use common::wait::eventually;

const WAIT: Duration = Duration::from_secs(20);
/// Retries are due 1 s after the first attempt.
const RETRIED: Duration = Duration::from_secs(10);
/// Gmail's temporary refusal of one recipient.
const RECIPIENT_BUSY: &str = "450 4.2.1 The user you are trying to contact is receiving mail at a rate that prevents additional messages from being delivered. a1b2c3d4e5f6 - gsmtp";

/// A tmpfs mounted on a temporary directory; unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` when this process may not mount (not root, no CAP_SYS_ADMIN);
    /// on CI that is a failure instead.
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let target = CString::new(dir.path().as_os_str().as_bytes()).unwrap();
        let options = CString::new(format!("size={size},mode=0700")).unwrap();
        // SAFETY: every pointer is a NUL-terminated string that outlives the call.
        let mounted = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                options.as_ptr().cast(),
            )
        };
        if mounted != 0 {
            let err = std::io::Error::last_os_error();
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must be able to mount a tmpfs for this test: {err}"
            );
            eprintln!("SKIPPED: cannot mount a tmpfs ({err}); run as root to test a full spool");
            return None;
        }
        Some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target = CString::new(self.dir.path().as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path. Lazy: files the relay still holds
        // open must not keep the mount.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Appends to `filler` until the file system has no page left.
fn fill(filler: &Path) {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(filler)
        .unwrap();
    loop {
        match file.write_all(&[b'x'; 4096]) {
            Ok(()) => {}
            Err(err) if err.raw_os_error() == Some(libc::ENOSPC) => return,
            Err(err) => panic!("filling the spool: {err}"),
        }
    }
}

fn is_empty(dir: PathBuf) -> bool {
    std::fs::read_dir(dir).unwrap().next().is_none()
}

fn message(n: usize) -> String {
    format!("Message-ID: <{n}@legacy.example>\r\nSubject: invoice {n}\r\n\r\nInvoice {n}.\r\n")
}

async fn spool_full_gauge(relay: &Relay) -> String {
    let metrics = http::get(relay.admin_addr.unwrap(), "/metrics", &[]).await;
    metrics
        .body
        .lines()
        .find(|line| line.starts_with("sendbridge_spool_full "))
        .unwrap_or("sendbridge_spool_full absent")
        .to_string()
}

#[tokio::test]
async fn a_full_spool_keeps_delivering_and_refuses_new_mail_until_space_returns() {
    let log = LogCapture::start();
    let Some(disk) = Tmpfs::mount("1m") else {
        return;
    };
    let spool = disk.path().join("spool");
    let filler = disk.path().join("filler");
    let mut options =
        FakeUpstreamOptions::new(UpstreamTls::StartTls, UPSTREAM_USER, UPSTREAM_PASSWORD);
    options.script.mail = Some(gmail::TRY_AGAIN_LATER.into());
    let upstream = FakeUpstream::start(options).await;
    let extra = "[delivery]\nretry_initial = \"1s\"\nscan_interval = \"200ms\"";
    let config = config_for(&upstream, UpstreamTls::StartTls, extra);
    let relay = Relay::start_with_spool(config, spool.clone()).await;
    let mut client = relay.signed_in_client().await;

    // Two messages wait for a provider that is down.
    for (n, first) in ["one@example.com", "two@example.com"].iter().enumerate() {
        let to = [*first, "busy@example.com"];
        let reply = client
            .send_mail("billing@legacy.example", &to, &message(n))
            .await;
        assert_eq!(reply.code, 250, "{reply:?}");
    }
    assert!(is_empty(spool.join("active")));
    fill(&filler);

    // The provider is back but defers one recipient: the others are
    // delivered; that result cannot be written, and must not be forgotten.
    upstream.set_script(Script {
        rcpt_for: vec![("busy@example.com".into(), RECIPIENT_BUSY.into())],
        ..Script::default()
    });
    let retried = tokio::time::timeout(RETRIED, upstream.wait_for_messages(2, WAIT)).await;
    assert!(
        retried.is_ok(),
        "while the spool is full: {} of 2 messages retried in {RETRIED:?}, {} 'No space left' lines",
        upstream.received().len(),
        log.text().matches("No space left").count()
    );
    upstream.set_script(Script::default());
    let received = upstream.wait_for_messages(4, WAIT).await;
    let mut recipients: Vec<String> = received.iter().flat_map(|m| m.rcpt_to.clone()).collect();
    recipients.sort();
    assert_eq!(
        recipients,
        [
            "busy@example.com",
            "busy@example.com",
            "one@example.com",
            "two@example.com"
        ],
        "each recipient exactly once"
    );
    eventually("delivered mail leaves the full spool", || async {
        ["data", "active", "deferred"]
            .iter()
            .all(|dir| is_empty(spool.join(dir)))
    })
    .await;

    // New mail is refused at once while the disk is full; the session's
    // transcript cannot be saved either, which the warning covers. Each
    // message is larger than a page: a smaller one may still fit in the
    // journal's last page, and is then stored (and answered 250) rightly.
    fill(&filler);
    let mut refused = relay.signed_in_client().await;
    for n in 10..15 {
        let larger_than_a_page = message(n) + &format!("{}\r\n", "x".repeat(76)).repeat(80);
        let reply = refused
            .send_mail(
                "billing@legacy.example",
                &["x@example.com"],
                &larger_than_a_page,
            )
            .await;
        assert_eq!(reply.code, 452, "{reply:?}");
        assert!(reply.text.starts_with("4.3.1 "), "{reply:?}");
    }
    refused.expect("QUIT", 221).await;
    eventually("the refused session's closing line", || async {
        !log.lines_with("session closed after a rejection")
            .is_empty()
    })
    .await;
    let closed = log.lines_with("session closed after a rejection");
    assert_eq!(closed[0]["reason"], "spool_full", "{closed:#?}");
    let unsaved = log.lines_with("cannot save the session transcript");
    assert_eq!(unsaved.len(), 0, "{unsaved:#?}");
    assert_eq!(spool_full_gauge(&relay).await, "sendbridge_spool_full 1");
    let warnings = log.lines_with("spool is full");
    assert_eq!(warnings.len(), 1, "one warning a minute: {warnings:#?}");
    assert_eq!(warnings[0]["level"], "WARN");
    assert!(
        warnings[0]["hint"]
            .as_str()
            .unwrap()
            .contains(spool.to_str().unwrap()),
        "{warnings:#?}"
    );

    // Space returns: new mail is accepted and delivered again.
    std::fs::remove_file(&filler).unwrap();
    let reply = client
        .send_mail("billing@legacy.example", &["x@example.com"], &message(20))
        .await;
    assert_eq!(reply.code, 250, "{reply:?}");
    upstream.wait_for_messages(5, WAIT).await;
    let writable = log.lines_with("spool writable again");
    assert_eq!(writable.len(), 1, "{writable:#?}");
    assert_eq!(spool_full_gauge(&relay).await, "sendbridge_spool_full 0");
}
