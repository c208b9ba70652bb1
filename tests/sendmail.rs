//! `sendmail` as scripts, cron and PHP call it: through a symbolic link
//! named `sendmail` to the built binary, from another directory, with the
//! configuration from `SENDBRIDGE_CONFIG` and no secret in its environment.
//! The relay runs as a process with the secrets; messages go through the
//! maildrop to the fake upstream.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use common::fake_upstream::{FakeUpstream, FakeUpstreamOptions, Received, Script, UpstreamTls};
use common::process::RelayProcess;
use common::relay::{LOCAL_PASSWORD, UPSTREAM_PASSWORD, UPSTREAM_USER};

const WAIT: Duration = Duration::from_secs(30);

/// An upstream, a relay directory with its configuration file (no secrets
/// in it) and spool, and another directory with the `sendmail` link.
struct Setup {
    upstream: FakeUpstream,
    relay_dir: tempfile::TempDir,
    elsewhere: tempfile::TempDir,
    config_file: PathBuf,
}

impl Setup {
    /// `keys`: TOML lines added to `[server]`.
    async fn new(server_keys: &str) -> Setup {
        Setup::with_upstream_script(server_keys, Script::default()).await
    }

    /// `new` with an upstream that answers as `script` says.
    async fn with_upstream_script(server_keys: &str, script: Script) -> Setup {
        let mut options =
            FakeUpstreamOptions::new(UpstreamTls::StartTls, UPSTREAM_USER, UPSTREAM_PASSWORD);
        options.script = script;
        let upstream = FakeUpstream::start(options).await;
        let relay_dir = tempfile::tempdir().unwrap();
        let spool = relay_dir.path().join("spool");
        std::fs::create_dir(&spool).unwrap();
        std::fs::create_dir(relay_dir.path().join("config")).unwrap();
        let config_file = relay_dir.path().join("config/sendbridge.toml");
        // A scan interval of an hour: mail arriving at once shows that
        // sendmail woke the relay.
        let config = format!(
            "[server]\n{server_keys}\n[delivery]\nscan_interval = \"1h\"\n[spool]\ndir = '{}'\n[sendmail]\nuser = \"invoices\"\n[accounts.gmail]\nhost = \"localhost\"\nport = {}\nca_file = '{}'\nusername = \"{UPSTREAM_USER}\"\n[users.invoices]\naccount = \"gmail\"\n",
            spool.display(),
            upstream.port(),
            upstream.ca_file().display()
        );
        std::fs::write(&config_file, config).unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(
            env!("CARGO_BIN_EXE_sendbridge"),
            elsewhere.path().join("sendmail"),
        )
        .unwrap();
        Setup {
            upstream,
            relay_dir,
            elsewhere,
            config_file,
        }
    }

    /// The relay, with the secrets the configuration file lacks.
    async fn start_relay(&self) -> RelayProcess {
        self.start_relay_with(&[]).await
    }

    async fn start_relay_with(&self, extra: &[(&str, &str)]) -> RelayProcess {
        let secrets = [
            ("SENDBRIDGE_ACCOUNTS__GMAIL__PASSWORD", UPSTREAM_PASSWORD),
            ("SENDBRIDGE_USERS__INVOICES__PASSWORD", LOCAL_PASSWORD),
        ];
        RelayProcess::start(self.relay_dir.path(), &[&secrets[..], extra].concat()).await
    }

    fn maildrop(&self) -> PathBuf {
        self.relay_dir.path().join("spool/maildrop")
    }

    /// `sendmail ARGS < input` as a script runs it: the link, run from
    /// another directory, configured by `SENDBRIDGE_CONFIG` alone.
    async fn sendmail(&self, args: &[&str], input: &str) -> Output {
        let config = self.config_file.display().to_string();
        run(
            &self.elsewhere.path().join("sendmail"),
            args,
            self.elsewhere.path(),
            &[("SENDBRIDGE_CONFIG", &config)],
            input,
        )
        .await
    }

    /// The first message upstream, checked to have gone to `recipients`.
    async fn delivered_to(&self, recipients: &[&str]) -> Received {
        let received = self.upstream.wait_for_messages(1, WAIT).await.remove(0);
        let mut sent_to = received.rcpt_to.clone();
        sent_to.sort();
        assert_eq!(sent_to, recipients);
        received
    }
}

/// `program ARGS < input` in `dir`, with no inherited `SENDBRIDGE_*`.
async fn run(
    program: &Path,
    args: &[&str],
    dir: &Path,
    env: &[(&str, &str)],
    input: &str,
) -> Output {
    let mut command = Command::new(program);
    command
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (key, _) in std::env::vars() {
        if key.starts_with("SENDBRIDGE_") {
            command.env_remove(key);
        }
    }
    command.envs(env.iter().copied());
    let mut child = command.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // A command that refuses early may not read it all.
    let _ = stdin.write_all(input.as_bytes()).await;
    drop(stdin);
    tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("sendmail finishes")
        .unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Drops waiting in the maildrop (its `refused/` folder apart).
fn drops(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .filter(|entry| {
                let name = entry.as_ref().unwrap().file_name();
                name.to_string_lossy().ends_with(".drop")
            })
            .count()
    })
}

/// PHP's `sendmail_path = "/usr/sbin/sendmail -t -i"`, with the relay
/// running: every To, Cc and Bcc recipient gets the message, Bcc is gone
/// from it, a lone dot stays content, and the relay was woken at once.
#[tokio::test]
async fn php_style_sendmail_t_i_through_the_link_reaches_the_upstream_without_bcc() {
    let setup = Setup::new("").await;
    let relay = setup.start_relay().await;
    let message = "To: Alice <alice@example.com>\nCc: bob@example.com\nBcc: secret@example.com\nSubject: Invoice 42\n\nHello\n.\nstill the body\n";

    let output = setup.sendmail(&["-t", "-i"], message).await;

    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(stderr(&output), "", "a successful sendmail says nothing");
    let received = setup
        .delivered_to(&["alice@example.com", "bob@example.com", "secret@example.com"])
        .await;
    let text = received.without_trace();
    assert!(
        !text.to_lowercase().contains("bcc") && !text.contains("secret@"),
        "{text}"
    );
    assert!(text.contains("To: Alice <alice@example.com>\r\n"), "{text}");
    assert!(
        text.contains("Date: ") && text.contains("Message-ID: "),
        "{text}"
    );
    assert!(text.contains(&format!("From: {UPSTREAM_USER}")), "{text}");
    assert!(
        received
            .body()
            .ends_with(b"Hello\r\n.\r\nstill the body\r\n")
    );
    let picked = relay
        .wait_for_line("message picked up from the maildrop")
        .await;
    assert!(
        picked.contains("user=\"invoices\"") && picked.contains("account=gmail"),
        "{picked}"
    );
    assert_eq!(drops(&setup.maildrop()), 0, "the queue has it");
    relay.terminate().await;
}

/// With the relay down, `sendmail` still queues, says so on stderr and
/// exits 0; the relay sends the message when it starts. Also `-f`, `-F`,
/// recipients as arguments, and a lone dot ending the message without -i.
#[tokio::test]
async fn with_the_relay_down_sendmail_queues_and_the_relay_sends_it_at_start() {
    let setup = Setup::new("").await;
    let message = "Subject: Nightly backup\n\nbackup ok\n.\nnot part of the message\n";

    let output = setup
        .sendmail(
            &[
                "-f",
                "backup@example.com",
                "-F",
                "Backup Job",
                "carol@example.com,dave@example.com",
            ],
            message,
        )
        .await;

    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(
        stderr(&output).trim(),
        "sendbridge sendmail: queued; the relay is not running, it will be sent when sendbridge starts"
    );
    assert_eq!(drops(&setup.maildrop()), 1);
    assert!(setup.upstream.received().is_empty());
    let config = setup.config_file.display().to_string();
    let program = Path::new(env!("CARGO_BIN_EXE_sendbridge"));
    let env = [("SENDBRIDGE_CONFIG", config.as_str())];
    let list = run(
        program,
        &["queue", "list"],
        setup.elsewhere.path(),
        &env,
        "",
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&list.stdout),
        "1 message(s) in the maildrop, waiting for the relay to pick them up\nthe queue is empty\n"
    );

    let relay = setup.start_relay().await;
    let received = setup
        .delivered_to(&["carol@example.com", "dave@example.com"])
        .await;
    let text = received.without_trace();
    assert!(
        text.contains("From: \"Backup Job\" <backup@example.com>\r\n"),
        "{text}"
    );
    assert_eq!(received.body(), b"backup ok\r\n");
    relay
        .wait_for_line("message picked up from the maildrop")
        .await;
    assert_eq!(drops(&setup.maildrop()), 0);
    relay.terminate().await;
}

/// Each way a call can fail has its sysexits code and leaves nothing in
/// the maildrop.
#[tokio::test]
async fn bad_calls_exit_with_sysexits_codes_and_queue_nothing() {
    let setup = Setup::new("max_message_size = 2000").await;
    let large = format!("To: a@example.com\n\n{}\n", "x".repeat(3000));
    // (arguments, stdin, exit code, stderr names)
    let cases: [(&[&str], &str, i32, &str); 6] = [
        (&["-bs"], "", 64, "-bs is not supported"),
        (&["-q"], "", 64, "sendbridge queue"),
        (
            &["-x", "a@example.com"],
            "Subject: x\n\n",
            64,
            "unknown option -x",
        ),
        (
            &["-t", "-i"],
            "Subject: no recipients\n\nbody\n",
            67,
            "no recipients",
        ),
        (
            &["not an address"],
            "Subject: x\n\n",
            67,
            "is not an address",
        ),
        (
            &["-t", "-i"],
            &large,
            65,
            "server.max_message_size (2000 bytes)",
        ),
    ];
    for (args, input, code, names) in cases {
        let output = setup.sendmail(args, input).await;
        assert_eq!(
            output.status.code(),
            Some(code),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains(names),
            "{args:?}: {}",
            stderr(&output)
        );
    }
    assert_eq!(drops(&setup.maildrop()), 0);

    // `sendbridge sendmail` is the same command.
    let output = run(
        Path::new(env!("CARGO_BIN_EXE_sendbridge")),
        &[
            "--config",
            setup.config_file.to_str().unwrap(),
            "sendmail",
            "-bs",
        ],
        setup.elsewhere.path(),
        &[],
        "",
    )
    .await;
    assert_eq!(output.status.code(), Some(64), "{}", stderr(&output));
}

/// A configuration that cannot say where mail goes is EX_CONFIG (78): no
/// `sendmail.user`, or a spool that does not exist (named with the file
/// the configuration came from), and no new spool is created.
#[tokio::test]
async fn a_configuration_without_sendmail_user_or_spool_is_ex_config() {
    let setup = Setup::new("").await;
    let config = std::fs::read_to_string(&setup.config_file).unwrap();
    std::fs::write(
        &setup.config_file,
        config.replace("user = \"invoices\"\n", ""),
    )
    .unwrap();
    let output = setup.sendmail(&["a@example.com"], "Subject: x\n\n").await;
    assert_eq!(output.status.code(), Some(78));
    assert!(
        stderr(&output).contains("sendmail.user is not set"),
        "{}",
        stderr(&output)
    );

    std::fs::write(
        &setup.config_file,
        config.replace("dir = '", "dir = 'missing-"),
    )
    .unwrap();
    let output = setup.sendmail(&["a@example.com"], "Subject: x\n\n").await;
    assert_eq!(output.status.code(), Some(78));
    let said = stderr(&output);
    assert!(
        said.contains("spool.dir: ")
            && said.contains("does not exist")
            && said.contains(&format!(
                "configuration read from {}",
                setup.config_file.display()
            )),
        "{said}"
    );
    assert!(!setup.elsewhere.path().join("missing-").exists());
}

/// A local user other than the relay's (here `nobody`, run through
/// `setpriv`) cannot write the 0700 maildrop: exit 77, and nothing queued,
/// so nobody else can send as `sendmail.user`.
#[tokio::test]
async fn another_local_user_cannot_queue_mail() {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root, to run sendmail as another user"
        );
        eprintln!("SKIPPED: run as root to test sendmail as another user");
        return;
    }
    let setup = Setup::new("").await;
    // The configuration is readable by everyone; the spool stays 0700.
    for dir in [setup.relay_dir.path(), setup.elsewhere.path()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let config_dir = setup.config_file.parent().unwrap();
    std::fs::set_permissions(config_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&setup.config_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let spool = setup.relay_dir.path().join("spool");
    std::fs::set_permissions(&spool, std::fs::Permissions::from_mode(0o700)).unwrap();

    let link = setup.elsewhere.path().join("sendmail");
    let config = setup.config_file.display().to_string();
    let output = run(
        Path::new("setpriv"),
        &[
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            link.to_str().unwrap(),
            "a@example.com",
        ],
        setup.elsewhere.path(),
        &[("SENDBRIDGE_CONFIG", &config)],
        "Subject: x\n\nbody\n",
    )
    .await;

    assert_eq!(output.status.code(), Some(77), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("only the relay's user"),
        "{}",
        stderr(&output)
    );
    assert_eq!(drops(&setup.maildrop()), 0);
}

/// Root's cron queues into a spool that belongs to the relay's user: the
/// maildrop and the drop are handed to that user, so the relay can read
/// and remove them.
#[tokio::test]
async fn mail_root_queues_belongs_to_the_relays_user() {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        assert!(std::env::var_os("CI").is_none(), "CI runs as root");
        eprintln!("SKIPPED: run as root to test sendmail as root");
        return;
    }
    let setup = Setup::new("").await;
    let spool = setup.relay_dir.path().join("spool");
    std::os::unix::fs::chown(&spool, Some(65534), Some(65534)).unwrap();

    let output = setup
        .sendmail(&["a@example.com"], "Subject: x\n\nbody\n")
        .await;

    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let maildrop = setup.maildrop();
    let mut owners = vec![std::fs::metadata(&maildrop).unwrap().uid()];
    for entry in std::fs::read_dir(&maildrop).unwrap() {
        owners.push(entry.unwrap().metadata().unwrap().uid());
    }
    // The folder, refused/ and the drop.
    assert_eq!(owners, [65534; 3]);
}

/// `health` and `status` run elsewhere, like `sendmail`, reach the relay
/// its configuration file names, without the secrets the relay has in its
/// environment (they need only `admin.token`, unset here).
#[tokio::test]
async fn health_and_status_from_another_directory_need_no_app_password() {
    let setup = Setup::new("").await;
    let relay = setup.start_relay().await;
    let admin = relay.admin.expect("the admin interface").to_string();
    let config = setup.config_file.display().to_string();
    // The relay's admin port is picked at start; the file cannot know it.
    let env = [
        ("SENDBRIDGE_CONFIG", config.as_str()),
        ("SENDBRIDGE_ADMIN__LISTEN", admin.as_str()),
    ];
    let program = Path::new(env!("CARGO_BIN_EXE_sendbridge"));
    for (command, says) in [("health", "ok"), ("status", "QUEUE")] {
        let output = run(program, &[command], setup.elsewhere.path(), &env, "").await;
        assert_eq!(
            output.status.code(),
            Some(0),
            "{command}: {}",
            stderr(&output)
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(stdout.contains(says), "{command}: {stdout}");
    }
    relay.terminate().await;
}

/// PHP's own `mail()` with `sendmail_path` set to the link, as php.ini
/// would: the real client the issue names.
#[tokio::test]
async fn php_mail_through_sendmail_path_reaches_the_upstream() {
    if !common::tools::tool_available("php") {
        return;
    }
    let setup = Setup::new("").await;
    let relay = setup.start_relay().await;
    let link = setup.elsewhere.path().join("sendmail");
    let sendmail_path = format!("sendmail_path={} -t -i", link.display());
    let script = r#"exit(mail("alice@example.com", "Invoice 42", "Dear Alice,\n.\nregards", "Cc: bob@example.com\r\nBcc: audit@example.com\r\nFrom: Billing <billing@example.com>") ? 0 : 1);"#;
    let config = setup.config_file.display().to_string();

    let output = run(
        Path::new("php"),
        &["-n", "-d", &sendmail_path, "-r", script],
        setup.elsewhere.path(),
        &[("SENDBRIDGE_CONFIG", &config)],
        "",
    )
    .await;

    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let received = setup
        .delivered_to(&["alice@example.com", "audit@example.com", "bob@example.com"])
        .await;
    let text = received.without_trace();
    assert!(
        text.contains("Subject: Invoice 42\r\n") && !text.contains("audit@"),
        "{text}"
    );
    assert!(
        text.contains("From: Billing <billing@example.com>\r\n"),
        "{text}"
    );
    assert!(
        received
            .body()
            .ends_with(b"Dear Alice,\r\n.\r\nregards\r\n"),
        "{text}"
    );
    relay.terminate().await;
}

/// A message the relay will not take (its limit is lower than the one
/// `sendmail` saw) is not lost: it is kept in `maildrop/refused/` and the
/// error names the key; nothing goes upstream.
#[tokio::test]
async fn a_drop_the_relay_refuses_is_kept_aside_with_the_key_to_fix() {
    let setup = Setup::new("").await;
    let message = format!("Subject: large\n\n{}\n", "x".repeat(500));
    let output = setup.sendmail(&["a@example.com"], &message).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));

    let relay = setup
        .start_relay_with(&[("SENDBRIDGE_SERVER__MAX_MESSAGE_SIZE", "300")])
        .await;
    let line = relay
        .wait_for_line("a message from the maildrop cannot be sent")
        .await;

    assert!(
        line.contains("reason=\"too_large\"")
            && line.contains("server.max_message_size (300 bytes)"),
        "{line}"
    );
    assert_eq!(drops(&setup.maildrop()), 0);
    assert_eq!(drops(&setup.maildrop().join("refused")), 1);
    assert!(setup.upstream.received().is_empty());
    relay.terminate().await;
}

/// A drop whose recipient the provider refuses is the queue's like any
/// message told `250`: nobody heard the refusal, so it bounces to the
/// sender. (Merged with the log-order change, the pickup first took the
/// hybrid mode's 5xx as its own answer: the drop was set aside as refused
/// and the sender heard nothing.)
#[tokio::test]
async fn a_drop_the_provider_refuses_bounces_to_its_sender() {
    let refused = "nobody@example.com";
    let script = Script {
        rcpt_for: vec![(
            refused.to_string(),
            "550 5.1.1 The email account that you tried to reach does not exist.".to_string(),
        )],
        ..Script::default()
    };
    let setup = Setup::with_upstream_script("", script).await;
    let relay = setup.start_relay().await;

    let output = setup
        .sendmail(&["-f", "backup@example.com", refused], "Subject: s\n\nx\n")
        .await;

    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let bounce = setup.upstream.wait_for_messages(1, WAIT).await.remove(0);
    assert_eq!(bounce.rcpt_to, ["backup@example.com"]);
    assert!(
        String::from_utf8_lossy(&bounce.data).contains(refused),
        "the bounce names the refused recipient"
    );
    assert_eq!(drops(&setup.maildrop()), 0);
    assert_eq!(drops(&setup.maildrop().join("refused")), 0);
    relay.terminate().await;
}
