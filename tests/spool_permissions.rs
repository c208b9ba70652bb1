//! Everything under the spool (message data, envelopes, transcripts, the
//! daily-limit logs, the pid file, a certificate generated there) is
//! readable by the relay's user only: files 0600 in folders 0700, whatever
//! the umask, and a spool left readable by an older version is closed when
//! the relay starts.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::fake_upstream::{FakeUpstream, FakeUpstreamOptions, Script, UpstreamTls, gmail};
use common::process::RelayProcess;
use common::relay::{LOCAL_PASSWORD, LOCAL_USER, UPSTREAM_PASSWORD, UPSTREAM_USER, as_refs};
use common::smtp::Client;

const SENDER: &str = "billing@legacy.example";
const CUSTOMER: &str = "customer@example.com";
const UNKNOWN: &str = "nobody@example.com";
const MESSAGE: &str = "Subject: payslip\r\n\r\nconfidential\r\n";

/// Every file and folder under `root` (not `root` itself) with its mode.
fn walk(root: &Path) -> Vec<(PathBuf, u32, bool)> {
    let mut found = Vec::new();
    for entry in fs::read_dir(root).unwrap() {
        let path = entry.unwrap().path();
        let metadata = fs::symlink_metadata(&path).unwrap();
        let mode = metadata.permissions().mode() & 0o777;
        found.push((path.clone(), mode, metadata.is_dir()));
        if metadata.is_dir() {
            found.extend(walk(&path));
        }
    }
    found
}

#[tokio::test]
async fn spool_files_are_0600_in_0700_folders_whatever_the_umask() {
    let upstream = FakeUpstream::start(FakeUpstreamOptions {
        script: Script {
            rcpt_for: vec![(UNKNOWN.to_string(), gmail::RECIPIENT_UNKNOWN.to_string())],
            ..Script::default()
        },
        ..FakeUpstreamOptions::new(UpstreamTls::StartTls, UPSTREAM_USER, UPSTREAM_PASSWORD)
    })
    .await;
    let mut exposed = Vec::new();
    for umask in ["000", "022"] {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        // An older version left these readable by everyone.
        for old in [spool.join("data"), spool.join("deferred")] {
            fs::create_dir_all(&old).unwrap();
            fs::set_permissions(&old, fs::Permissions::from_mode(0o755)).unwrap();
        }
        // tls.cert cannot be written (its folder is a file): the
        // certificate is generated under the spool.
        fs::write(dir.path().join("not-a-folder"), "").unwrap();
        let port = upstream.port().to_string();
        let ca_file = upstream.ca_file().display().to_string();
        let env = [
            ("SENDBRIDGE_ACCOUNTS__GMAIL__HOST", "localhost"),
            ("SENDBRIDGE_ACCOUNTS__GMAIL__PORT", &port),
            ("SENDBRIDGE_ACCOUNTS__GMAIL__CA_FILE", &ca_file),
            ("SENDBRIDGE_ACCOUNTS__GMAIL__USERNAME", UPSTREAM_USER),
            ("SENDBRIDGE_ACCOUNTS__GMAIL__PASSWORD", UPSTREAM_PASSWORD),
            ("SENDBRIDGE_ACCOUNTS__GMAIL__DAILY_MESSAGE_LIMIT", "100"),
            ("SENDBRIDGE_USERS__INVOICES__PASSWORD", LOCAL_PASSWORD),
            ("SENDBRIDGE_LOG__TRANSCRIPTS", "all"),
            ("SENDBRIDGE_TLS__CERT", "not-a-folder/sendbridge.crt"),
            ("SENDBRIDGE_TLS__KEY", "not-a-folder/sendbridge.key"),
        ];
        let relay = RelayProcess::start_after(
            dir.path(),
            &as_refs(&owned(&env)),
            &format!("umask {umask}"),
        )
        .await;

        let mut client = Client::connect(relay.addr).await;
        client.ehlo().await;
        assert_eq!(
            client.login_plain(LOCAL_USER, LOCAL_PASSWORD).await.code,
            235
        );
        assert_eq!(
            client.send_mail(SENDER, &[CUSTOMER], MESSAGE).await.code,
            250
        );
        // Refused by the provider: data and envelope stay, in rejected/.
        assert_eq!(
            client.send_mail(SENDER, &[UNKNOWN], MESSAGE).await.code,
            550
        );
        client.expect("QUIT", 221).await;
        relay.wait_for_line("session closed").await;

        let found = walk(&spool);
        for expected in [
            "sendbridge.pid",
            "certs/sendbridge.key",
            "certs/sendbridge.crt",
            "limits/gmail.log",
            "transcripts",
            "rejected",
            "data",
        ] {
            assert!(
                found.iter().any(|(path, _, _)| path.ends_with(expected)),
                "umask {umask}: no {expected} in {found:#?}"
            );
        }
        // The refused message was copied out of the journal into a file of
        // its own; the journal keeps its (drained) segment and `.done` file.
        for (kind, files) in [
            ("transcripts", 1),
            ("rejected", 1),
            ("data", 0),
            ("journal", 2),
        ] {
            assert_eq!(
                fs::read_dir(spool.join(kind)).unwrap().count(),
                files,
                "{kind}"
            );
        }
        exposed.extend(
            std::iter::once((spool.clone(), mode(&spool), true))
                .chain(found)
                .filter(|(_, mode, is_dir)| *mode != if *is_dir { 0o700 } else { 0o600 })
                .map(|(path, mode, _)| format!("umask {umask}: {mode:o} {}", path.display())),
        );
        relay.terminate().await;
    }
    assert!(
        exposed.is_empty(),
        "{} exposed: {exposed:#?}",
        exposed.len()
    );
    upstream.stop().await;
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn owned(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect()
}
