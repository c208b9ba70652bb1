//! The binary as users run it: configuration from files and environment,
//! exit codes, and what the logs say (and never say).

mod common;

use std::path::Path;
use std::time::Duration;

use common::fake_upstream::{FakeUpstream, FakeUpstreamOptions, UpstreamTls, gmail};
use common::process::{RelayProcess, sendbridge};
use common::smtp::Client;

const WAIT: Duration = Duration::from_secs(30);
const UPSTREAM_USER: &str = "me@gmail.com";
const APP_PASSWORD: &str = "abcdabcdabcdabcd";

async fn output(
    dir: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> std::process::Output {
    let command = sendbridge(dir, args, env).output();
    tokio::time::timeout(WAIT, command)
        .await
        .expect("command finishes")
        .unwrap()
}

#[tokio::test]
async fn invalid_config_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("SENDBRIDGE_ACCOUNTS__GMAIL__USERNAME", "me@gmail.com"),
        ("SENDBRIDGE_ACCOUNTS__GMAIL__PASSWORD", "abcdabcdabcdabcd"),
        ("SENDBRIDGE_ACCOUNTS__GMAIL__PORT", "abc"),
    ];

    for subcommand in ["run", "check"] {
        let out = output(dir.path(), &[subcommand], &env).await;
        assert_eq!(out.status.code(), Some(2), "{subcommand}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            stderr.trim(),
            "sendbridge: invalid configuration: accounts.gmail.port: expected a number, got \"abc\""
        );
        assert!(!stderr.contains("abcdabcdabcdabcd"));
    }
}

#[tokio::test]
async fn explicit_config_file_must_exist() {
    let dir = tempfile::tempdir().unwrap();
    let out = output(dir.path(), &["--config", "missing.toml", "check"], &[]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml does not exist"));
}

/// `SENDBRIDGE_CONFIG` moves the default path (the container image uses it):
/// the file is read when present and, unlike `--config`, may be absent.
#[tokio::test]
async fn config_path_from_env_is_read_when_present() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sendbridge.toml");
    std::fs::write(&file, "[server]\nlisten_port = 25\n").unwrap();
    let env = [("SENDBRIDGE_CONFIG", file.to_str().unwrap())];
    let out = output(dir.path(), &["queue", "list"], &env).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.listen_port: unknown key"));

    let missing = dir.path().join("missing.toml");
    let env = [("SENDBRIDGE_CONFIG", missing.to_str().unwrap())];
    // `queue` manages an existing spool; it no longer creates one.
    std::fs::create_dir(dir.path().join("spool")).unwrap();
    let out = output(dir.path(), &["queue", "list"], &env).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes `config/sendbridge.toml` in `dir` from TOML tables.
fn write_config(dir: &Path, tables: &[String]) {
    std::fs::create_dir_all(dir.join("config")).unwrap();
    std::fs::write(dir.join("config/sendbridge.toml"), tables.concat()).unwrap();
}

/// An `[accounts.NAME]` table signing in to `upstream` as UPSTREAM_USER,
/// with `keys` (TOML lines) added.
fn account(name: &str, upstream: &FakeUpstream, keys: &str) -> String {
    format!(
        "[accounts.{name}]\nhost = \"localhost\"\nport = {}\nusername = \"{UPSTREAM_USER}\"\n{keys}",
        upstream.port()
    )
}

/// The `ca_file` line that makes an account trust `upstream`'s test CA.
fn trusting(upstream: &FakeUpstream) -> String {
    format!("ca_file = '{}'\n", upstream.ca_file().display())
}

#[tokio::test]
async fn sigterm_right_after_the_relay_says_it_is_ready_stops_it_cleanly() {
    // The signal handlers were once installed by a spawned task, which
    // might not have run yet when the readiness line was out: a SIGTERM
    // then killed the process (exit by signal, no clean stop), about once
    // in 25 starts on a loaded 2-core machine.
    for _ in 0..10 {
        let dir = tempfile::tempdir().unwrap();
        let relay = RelayProcess::start(dir.path(), &[]).await;
        let (code, log) = relay.terminate().await;
        assert_eq!(code, Some(0), "{log:#?}");
        assert!(
            log.iter().any(|line| line.contains("sendbridge stopped")),
            "{log:#?}"
        );
    }
}

async fn start_upstream(tls: UpstreamTls) -> FakeUpstream {
    FakeUpstream::start(FakeUpstreamOptions::new(tls, UPSTREAM_USER, APP_PASSWORD)).await
}

/// `sendbridge check` in `dir`: exit code, stdout and stderr.
async fn check(dir: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = output(dir, &[&["check"], args].concat(), &[]).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code(), stdout, stderr)
}

/// The words of the table row for `account`.
fn row<'a>(stdout: &'a str, account: &str) -> Vec<&'a str> {
    let line = stdout
        .lines()
        .find(|line| line.split_whitespace().next() == Some(account))
        .unwrap_or_else(|| panic!("no row for {account}:\n{stdout}"));
    line.split_whitespace().collect()
}

#[tokio::test]
async fn config_file_and_env_combine() {
    let upstream = start_upstream(UpstreamTls::StartTls).await;
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        &[
            account("gmail", &upstream, &trusting(&upstream)),
            "[users.invoices]\npassword = \"x\"\n".to_string(),
        ],
    );
    // The file lacks the app password: env supplies it.
    let out = output(dir.path(), &["check"], &[]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("accounts.gmail.password: missing"));

    let env = [("SENDBRIDGE_ACCOUNTS__GMAIL__PASSWORD", APP_PASSWORD)];
    let out = output(dir.path(), &["check"], &env).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let server = format!("localhost:{}", upstream.port());
    assert!(
        stdout.contains(&format!("account gmail: {UPSTREAM_USER}@{server}")),
        "{stdout}"
    );
    assert!(
        stdout.contains("user invoices: sends through gmail"),
        "{stdout}"
    );
    assert!(!stdout.contains(APP_PASSWORD));
}

/// A preset account signs in with an app password pasted as Google shows
/// it; `check` shows the preset's setup steps, says that the spaces were
/// removed (never the password) and lists the routes.
#[tokio::test]
async fn check_shows_the_preset_the_cleaned_app_password_and_the_routes() {
    let upstream = start_upstream(UpstreamTls::StartTls).await;
    let dir = tempfile::tempdir().unwrap();
    let grouped: Vec<&str> = APP_PASSWORD
        .as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    let grouped = grouped.join(" ");
    let keys = format!(
        "provider = \"gmail\"\npassword = \"{grouped}\"\n{}",
        trusting(&upstream)
    );
    write_config(
        dir.path(),
        &[
            account("gmail", &upstream, &keys),
            "[users.invoices]\npassword = \"x\"\n".to_string(),
            "[[routes]]\nsender = \"@billing.example\"\naccount = \"gmail\"\nusers = [\"invoices\"]\n".to_string(),
        ],
    );

    let (code, stdout, stderr) = check(dir.path(), &[]).await;

    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert_eq!(row(&stdout, "gmail")[3], "ok", "signed in: {stdout}");
    for expected in [
        "note: accounts.gmail.password: removed the spaces from the app password",
        "  preset gmail: Gmail: turn on 2-Step Verification, create an app password at https://myaccount.google.com/apppasswords and set it as accounts.gmail.password",
        "route 1: @billing.example (envelope sender) → gmail, for invoices",
    ] {
        assert!(stdout.contains(expected), "{expected:?} in:\n{stdout}");
    }
    assert!(
        !stdout.contains(APP_PASSWORD) && !stdout.contains(&grouped),
        "{stdout}"
    );
}

#[tokio::test]
async fn check_signs_in_to_every_account_and_shows_the_tls_version() {
    let starttls = start_upstream(UpstreamTls::StartTls).await;
    let implicit = start_upstream(UpstreamTls::Implicit).await;
    let dir = tempfile::tempdir().unwrap();
    let password = format!("password = \"{APP_PASSWORD}\"\n");
    write_config(
        dir.path(),
        &[
            account(
                "work",
                &starttls,
                &(password.clone() + &trusting(&starttls)),
            ),
            account(
                "backup",
                &implicit,
                &(password + &trusting(&implicit) + "tls = \"implicit\"\n"),
            ),
        ],
    );

    let (code, stdout, stderr) = check(dir.path(), &[]).await;

    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.starts_with("configuration is valid\n"), "{stdout}");
    for (name, upstream) in [("work", &starttls), ("backup", &implicit)] {
        let server = format!("localhost:{}", upstream.port());
        assert_eq!(row(&stdout, name)[..4], [name, &server, "TLSv1.3", "ok"]);
        assert_eq!(upstream.auth_attempts(), 1);
    }
    // Aligned: each row's AUTH column starts where its header does.
    let header = stdout.lines().find(|l| l.starts_with("ACCOUNT")).unwrap();
    let column = header.find("AUTH").unwrap();
    for name in ["work", "backup"] {
        let line = stdout.lines().find(|l| l.starts_with(name)).unwrap();
        assert_eq!(&line[column..column + 3], "ok ", "{stdout}");
    }
    assert!(!stdout.contains(APP_PASSWORD) && !stderr.contains(APP_PASSWORD));
}

#[tokio::test]
async fn check_with_a_wrong_password_shows_the_reply_and_the_key_to_fix() {
    const WRONG: &str = "wrongwrongwrong1";
    let upstream = start_upstream(UpstreamTls::StartTls).await;
    let dir = tempfile::tempdir().unwrap();
    let keys = format!("password = \"{WRONG}\"\n{}", trusting(&upstream));
    write_config(dir.path(), &[account("work", &upstream, &keys)]);

    let (code, stdout, stderr) = check(dir.path(), &[]).await;

    assert_eq!(code, Some(1), "{stdout}{stderr}");
    // TLS was negotiated before the sign-in was refused.
    assert_eq!(
        row(&stdout, "work")[2..4],
        ["TLSv1.3", "refused"],
        "{stdout}"
    );
    // Gmail's whole reply, its lines ("535-5.7.8 ...") joined.
    let text: Vec<_> = gmail::BAD_CREDENTIALS
        .lines()
        .map(|line| line["535-5.7.8 ".len()..].trim())
        .collect();
    let reply = format!("535 5.7.8 {}", text.join(" "));
    assert!(stdout.contains(&reply), "{stdout}");
    // The hint has the line beneath the row.
    let mut lines = stdout.lines().skip_while(|l| !l.starts_with("work "));
    let hint = lines.nth(1).unwrap_or_default();
    assert!(
        hint.starts_with("    hint: ") && hint.contains("accounts.work.password"),
        "{stdout}"
    );
    assert!(
        stderr.contains("1 of 1 account(s) could not sign in"),
        "{stderr}"
    );
    assert!(!stdout.contains(WRONG) && !stderr.contains(WRONG));
}

#[tokio::test]
async fn check_names_ca_file_for_an_untrusted_certificate() {
    let mut options = FakeUpstreamOptions::new(UpstreamTls::StartTls, UPSTREAM_USER, APP_PASSWORD);
    options.trusted_cert = false;
    let upstream = FakeUpstream::start(options).await;
    let dir = tempfile::tempdir().unwrap();
    let keys = format!("password = \"{APP_PASSWORD}\"\n");
    write_config(dir.path(), &[account("work", &upstream, &keys)]);

    let (code, stdout, stderr) = check(dir.path(), &[]).await;

    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert_eq!(row(&stdout, "work")[2], "-", "no TLS: {stdout}");
    let row = row(&stdout, "work").join(" ");
    assert!(row.contains("certificate is not trusted"), "{stdout}");
    assert!(row.contains("accounts.work.ca_file"), "{stdout}");
    assert_eq!(
        upstream.auth_attempts(),
        0,
        "no password for an unverified server"
    );
}

#[tokio::test]
async fn check_of_an_unknown_account_names_the_configured_ones() {
    let upstream = start_upstream(UpstreamTls::StartTls).await;
    let dir = tempfile::tempdir().unwrap();
    let keys = format!("password = \"{APP_PASSWORD}\"\n");
    write_config(
        dir.path(),
        &[
            account("work", &upstream, &keys),
            account("backup", &upstream, &keys),
        ],
    );

    let (code, stdout, stderr) = check(dir.path(), &["gmail"]).await;

    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert_eq!(
        stderr.trim(),
        "sendbridge: no account named \"gmail\" (configured: backup, work)"
    );
    assert!(stdout.is_empty(), "{stdout}");
    assert_eq!(upstream.connections(), 0);
}

#[tokio::test]
async fn starts_without_accounts_and_says_what_to_set() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(dir.path(), &[]).await;

    let mut client = Client::connect(relay.addr).await;
    client.ehlo().await;
    client.expect("MAIL FROM:<a@legacy.example>", 530).await;

    let (code, log) = relay.terminate().await;
    assert_eq!(code, Some(0), "SIGTERM is a clean stop");
    let hints: Vec<_> = log
        .iter()
        .filter(|l| l.contains("no upstream account configured"))
        .collect();
    assert_eq!(hints.len(), 1, "{log:#?}");
    assert!(hints[0].contains("SENDBRIDGE_ACCOUNTS__GMAIL__PASSWORD"));
    assert!(
        dir.path().join("certs/sendbridge.crt").is_file(),
        "certificate generated"
    );
}

/// In the container image tls.cert points into a read-only directory: the
/// generated certificate goes under the spool, and later starts reuse it.
#[tokio::test]
async fn unwritable_cert_location_falls_back_to_the_spool() {
    let dir = tempfile::tempdir().unwrap();
    // A path below a regular file cannot be created, even by root (whom a
    // read-only mode would not stop).
    let read_only = dir.path().join("read-only");
    std::fs::write(&read_only, "").unwrap();
    let cert = read_only.join("sendbridge.crt");
    let key = read_only.join("sendbridge.key");
    let env = [
        ("SENDBRIDGE_TLS__CERT", cert.to_str().unwrap()),
        ("SENDBRIDGE_TLS__KEY", key.to_str().unwrap()),
    ];
    let generated = dir.path().join("spool/certs/sendbridge.crt");

    let mut first_cert = None;
    for expected_log in [
        "generated a self-signed certificate",
        "using the self-signed certificate generated under the spool",
    ] {
        let relay = RelayProcess::start(dir.path(), &env).await;
        let mut client = Client::connect(relay.addr).await;
        assert!(client.ehlo().await.text.contains("STARTTLS"));
        let mut client = client.starttls(&generated).await;
        client.ehlo().await;

        let (code, log) = relay.terminate().await;
        assert_eq!(code, Some(0));
        let logged = log
            .iter()
            .any(|line| line.contains(expected_log) && line.contains("spool/certs/sendbridge.crt"));
        assert!(logged, "{log:#?}");
        let pem = std::fs::read(&generated).unwrap();
        assert_eq!(
            first_cert.get_or_insert_with(|| pem.clone()),
            &pem,
            "reused"
        );
    }
}

/// The README's scenario: configured by environment variables only, with
/// passwords that look like numbers (which figment would otherwise parse).
#[tokio::test]
async fn env_only_configuration_relays_and_never_logs_secrets() {
    const APP_PASSWORD: &str = "0123456789012345";
    // Long enough not to occur by chance in timestamps or ids.
    const LOCAL_PASSWORD: &str = "004200917";
    let upstream = FakeUpstream::start(FakeUpstreamOptions::new(
        UpstreamTls::StartTls,
        "me@gmail.com",
        APP_PASSWORD,
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let port = upstream.port().to_string();
    let env = [
        ("SENDBRIDGE_ACCOUNTS__GMAIL__HOST", "localhost"),
        ("SENDBRIDGE_ACCOUNTS__GMAIL__PORT", port.as_str()),
        (
            "SENDBRIDGE_ACCOUNTS__GMAIL__CA_FILE",
            upstream.ca_file().to_str().unwrap(),
        ),
        ("SENDBRIDGE_ACCOUNTS__GMAIL__USERNAME", "me@gmail.com"),
        ("SENDBRIDGE_ACCOUNTS__GMAIL__PASSWORD", APP_PASSWORD),
        ("SENDBRIDGE_USERS__INVOICES__PASSWORD", LOCAL_PASSWORD),
        ("SENDBRIDGE_USERS__INVOICES__ACCOUNT", "gmail"),
        ("SENDBRIDGE_LOG", "trace"),
    ];
    let relay = RelayProcess::start(dir.path(), &env).await;

    let mut client = Client::connect(relay.addr).await;
    client.ehlo().await;
    assert_eq!(
        client.login_plain("invoices", "Wr0ng-Passw0rd").await.code,
        535
    );
    assert_eq!(
        client.login_plain("INVOICES", LOCAL_PASSWORD).await.code,
        235
    );
    let reply = client
        .send_mail(
            "billing@legacy.example",
            &["customer@example.com"],
            "Subject: s\r\n\r\nbody\r\n",
        )
        .await;
    assert_eq!(reply.code, 250, "{reply:?}");
    client.expect("QUIT", 221).await;

    let received = upstream.wait_for_messages(1, WAIT).await;
    assert_eq!(received[0].auth_user, "me@gmail.com");
    let (code, log) = relay.terminate().await;
    assert_eq!(code, Some(0));
    let log = log.join("\n");
    assert!(
        log.contains("message received") && log.contains("message delivered"),
        "{log}"
    );
    assert!(
        log.contains("local sign-in failed") && log.contains("invoices"),
        "{log}"
    );
    for secret in [APP_PASSWORD, LOCAL_PASSWORD, "Wr0ng-Passw0rd"] {
        assert!(
            !log.contains(secret),
            "{secret:?} appears in the log:\n{log}"
        );
    }
    use base64::Engine;
    let payload =
        base64::engine::general_purpose::STANDARD.encode(format!("\0INVOICES\0{LOCAL_PASSWORD}"));
    assert!(!log.contains(&payload), "AUTH payload in the log");
}

#[tokio::test]
async fn hash_password_output_is_accepted_as_password_hash() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = sendbridge(dir.path(), &["hash-password"], &[])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use tokio::io::AsyncWriteExt;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"old-password\n")
        .await
        .unwrap();
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(hash.starts_with("$argon2id$"), "{hash}");

    let env = [
        ("SENDBRIDGE_ACCOUNTS__GMAIL__USERNAME", "me@gmail.com"),
        ("SENDBRIDGE_ACCOUNTS__GMAIL__PASSWORD", "abcdabcdabcdabcd"),
        ("SENDBRIDGE_USERS__INVOICES__PASSWORD_HASH", hash.as_str()),
    ];
    let relay = RelayProcess::start(dir.path(), &env).await;
    let mut client = Client::connect(relay.addr).await;
    client.ehlo().await;
    assert_eq!(
        client.login_plain("invoices", "old-password").await.code,
        235
    );
    assert_eq!(
        client.login_plain("invoices", "old-password\n").await.code,
        503
    );
    relay.terminate().await;
}

/// `sendbridge queue show ID | head -1`: the reader goes away early, and the
/// command ends quietly instead of panicking.
#[tokio::test]
async fn output_into_a_closed_pipe_ends_quietly() {
    use sendbridge::spool::Envelope;
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().unwrap();
    // A recipients line longer than a pipe holds: the command is still
    // writing when the reader closes its end.
    let recipients = (0..10_000)
        .map(|n| format!("customer{n}@example.com"))
        .collect();
    let mut envelope = Envelope {
        account: "gmail".into(),
        recipients,
        ..Envelope::default()
    };
    queue_deferred(&dir.path().join("spool"), &mut envelope);

    let mut child = sendbridge(dir.path(), &["queue", "show", &envelope.id], &[])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).await.unwrap();
    assert_eq!(first, format!("id:         {}\n", envelope.id));
    drop(stdout);
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("the command ends")
        .unwrap();

    // No panic (exit code 101), no message: the exit code a shell shows
    // for a program ended by SIGPIPE.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.is_empty(), "{stderr}");
    assert_eq!(out.status.code(), Some(141), "{stderr}");
}

/// A relay's directory: its configuration file without any secret (the
/// relay has them in its environment; here even the admin token file is
/// missing) and a spool with one deferred message. The file and the id.
fn relay_directory_with_a_queued_message(dir: &Path) -> (std::path::PathBuf, String) {
    use sendbridge::spool::Envelope;
    let spool = dir.join("spool");
    let file = dir.join("sendbridge.toml");
    std::fs::write(
        &file,
        format!(
            "[spool]\ndir = '{}'\n[admin]\ntoken_file = '{}'\n[accounts.gmail]\nusername = \"{UPSTREAM_USER}\"\n[users.invoices]\naccount = \"gmail\"\n",
            spool.display(),
            dir.join("admin-token").display()
        ),
    )
    .unwrap();
    let mut envelope = Envelope {
        account: "gmail".into(),
        mail_from: "erp@legacy.example".into(),
        recipients: vec!["customer@example.com".into()],
        ..Envelope::default()
    };
    queue_deferred(&spool, &mut envelope);
    (file, envelope.id)
}

/// Stores a short message as deferred in the spool at `dir`; sets its id.
fn queue_deferred(dir: &Path, envelope: &mut sendbridge::spool::Envelope) {
    use sendbridge::spool::{Spool, State};
    Spool::open(dir)
        .unwrap()
        .accept(
            envelope,
            &std::sync::Arc::new(b"Subject: s\r\n\r\nbody\r\n".to_vec()),
            State::Deferred,
        )
        .unwrap();
}

/// `queue` commands run from another directory find the relay through
/// `SENDBRIDGE_CONFIG` and start without the app password, the users'
/// passwords or the admin token; `check`, which signs in, still needs them.
#[tokio::test]
async fn queue_commands_from_another_directory_need_no_secrets() {
    let relay_dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let (file, id) = relay_directory_with_a_queued_message(relay_dir.path());
    let env = [("SENDBRIDGE_CONFIG", file.to_str().unwrap())];

    let list = output(elsewhere.path(), &["queue", "list"], &env).await;
    let stdout = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    assert!(
        stdout.contains(&id) && stdout.contains("erp@legacy.example"),
        "{stdout}"
    );
    let show = output(elsewhere.path(), &["queue", "show", &id], &env).await;
    assert!(
        show.status.success(),
        "{}",
        String::from_utf8_lossy(&show.stderr)
    );
    let retry = output(elsewhere.path(), &["queue", "retry", "--all"], &env).await;
    assert!(
        retry.status.success(),
        "{}",
        String::from_utf8_lossy(&retry.stderr)
    );
    assert!(!elsewhere.path().join("spool").exists());

    let check = output(elsewhere.path(), &["check"], &env).await;
    assert_eq!(check.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert!(
        stderr.contains("accounts.gmail.password: missing"),
        "{stderr}"
    );
}

/// Run where its (relative) spool is not, `queue` refuses, naming
/// `spool.dir`, the directory it looked for and the configuration file,
/// instead of opening a new empty spool and saying the queue is empty.
#[tokio::test]
async fn queue_commands_refuse_a_missing_spool_naming_spool_dir_and_the_config_file() {
    let relay_dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let file = relay_dir.path().join("sendbridge.toml");
    std::fs::write(&file, "[spool]\ndir = \"spool\"\n").unwrap();
    let file = file.to_str().unwrap();

    for args in [
        &["queue", "list"][..],
        &["--config", file, "queue", "retry", "--all"],
    ] {
        let out = output(elsewhere.path(), args, &[("SENDBRIDGE_CONFIG", file)]).await;
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let looked_for = elsewhere.path().join("spool");
        assert!(
            stderr.contains(&format!(
                "spool.dir: {} does not exist",
                looked_for.display()
            )) && stderr.contains(&format!("configuration read from {file}")),
            "{args:?}: {stderr}"
        );
        assert!(!looked_for.exists(), "{args:?} created a spool");
    }
}

/// `sendbridge cert` generates the certificate where `run` would, then shows
/// it again unchanged; openssl agrees on its fingerprints and names, which
/// include the machine's own addresses (`hostname -I`).
#[tokio::test]
async fn cert_prints_the_certificate_with_its_fingerprints_and_names() {
    if !common::tools::tool_available("openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let env = [("SENDBRIDGE_SERVER__HOSTNAME", "relay.test")];
    let cert = dir.path().join("certs/sendbridge.crt");

    let first = output(dir.path(), &["cert"], &env).await;
    let second = output(dir.path(), &["cert"], &env).await;

    assert!(first.status.success(), "{first:?}");
    let stdout = String::from_utf8(first.stdout).unwrap();
    assert_eq!(stdout, String::from_utf8(second.stdout).unwrap(), "reused");
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_else(|| panic!("{name} in {stdout}"))
    };
    assert_eq!(field("certificate:"), cert.display().to_string());
    let openssl = |args: &[&str]| {
        let output = std::process::Command::new("openssl")
            .args(["x509", "-noout", "-in"])
            .arg(&cert)
            .args(args)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    for (digest, name) in [("-sha256", "SHA-256:"), ("-sha1", "SHA-1:")] {
        let printed = openssl(&["-fingerprint", digest]);
        let (_, fingerprint) = printed.trim().split_once('=').unwrap();
        assert_eq!(field(name), fingerprint, "{digest}");
    }
    let names = field("names:");
    let openssl_names = openssl(&["-ext", "subjectAltName"]);
    for name in ["DNS:relay.test", "DNS:localhost", "IP:127.0.0.1", "IP:::1"] {
        assert!(names.contains(name), "{name}: {names}");
    }
    assert!(openssl_names.contains("DNS:relay.test, DNS:localhost, IP Address:127.0.0.1"));
    let own = std::process::Command::new("hostname").arg("-I").output();
    let own = String::from_utf8(own.unwrap().stdout).unwrap();
    for address in own.split_whitespace() {
        assert!(
            names.contains(&format!("IP:{address}")),
            "{address}: {names}"
        );
        if !address.contains(':') {
            let written = format!("IP Address:{address}");
            assert!(openssl_names.contains(&written), "{openssl_names}");
        }
    }
}

#[tokio::test]
async fn check_lists_the_listeners_and_warns_about_legacy_tls() {
    let dir = tempfile::tempdir().unwrap();
    let listeners = "[[listeners]]\naddress = \"192.168.1.10:25\"\ntls_profile = \"legacy\"\n\
        trusted_networks = [\"192.168.1.50\"]\n\
        [[listeners]]\naddress = \"192.168.1.10:587\"\nrequire_auth = true\n";
    write_config(dir.path(), &[listeners.to_string()]);

    let (code, stdout, stderr) = check(dir.path(), &[]).await;

    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let expected = [
        "listeners[0]: 192.168.1.10:25 (tls starttls, profile legacy), trusted networks [192.168.1.50/32]",
        "warning: listener 192.168.1.10:25 accepts TLS 1.0/1.1 and CBC suites for old devices; restrict its trusted_networks",
        "listeners[1]: 192.168.1.10:587 (tls starttls, profile modern), every client signs in",
    ];
    for line in expected {
        assert!(stdout.contains(line), "{line}\n{stdout}");
    }
}
