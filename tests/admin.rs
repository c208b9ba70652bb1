//! The admin interface: readiness, metrics, access rules, the `health` and
//! `status` commands, and the status page in a real browser.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::fake_upstream::{FakeUpstream, FakeUpstreamOptions, Script, UpstreamTls, gmail};
use common::http::{self, Answer};
use common::process::{RelayProcess, sendbridge};
use common::relay::{
    LOCAL_PASSWORD, LOCAL_USER, Relay, UPSTREAM_PASSWORD, UPSTREAM_USER, as_refs, config_for,
    env_for,
};
use common::smtp::Client;
use common::tools::tool_available;
use common::wait::eventually;
use tokio::process::Command;

const WAIT: Duration = Duration::from_secs(30);
const SENDER: &str = "billing@legacy.example";
const CUSTOMER: &str = "customer@example.com";
const UNKNOWN: &str = "nobody@example.com";
const MESSAGE: &str = "Subject: invoice\r\n\r\nTotal due: 42 EUR\r\n";
const TOKEN: &str = "0123456789abcdef0123456789abcdef";

fn options() -> FakeUpstreamOptions {
    FakeUpstreamOptions::new(UpstreamTls::StartTls, UPSTREAM_USER, UPSTREAM_PASSWORD)
}

/// A fake Gmail answering as `script` says.
async fn upstream(script: Script) -> FakeUpstream {
    FakeUpstream::start(FakeUpstreamOptions {
        script,
        ..options()
    })
    .await
}

/// The relay as a process in a directory of its own, delivering to
/// `upstream`.
async fn relay_process(upstream: &FakeUpstream) -> (RelayProcess, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(dir.path(), &as_refs(&env_for(upstream))).await;
    (relay, dir)
}

/// Gmail refusing the app password.
fn refusing_sign_in() -> Script {
    Script {
        auth: Some(gmail::BAD_CREDENTIALS.to_string()),
        ..Script::default()
    }
}

/// Gmail not knowing `UNKNOWN`.
fn refusing_unknown_recipient() -> Script {
    Script {
        rcpt_for: vec![(UNKNOWN.to_string(), gmail::RECIPIENT_UNKNOWN.to_string())],
        ..Script::default()
    }
}

async fn send(client: &mut Client, to: &str) -> u16 {
    client.send_mail(SENDER, &[to], MESSAGE).await.code
}

/// The form token the status page embeds in its retry forms.
fn form_token(html: &str) -> String {
    let marker = "name=\"form_token\" value=\"";
    let start = html.find(marker).expect("a retry form") + marker.len();
    html[start..].split('"').next().unwrap().to_string()
}

async fn readiness(admin: SocketAddr) -> (u16, serde_json::Value) {
    let answer = http::get(admin, "/readyz", &[]).await;
    (answer.status, serde_json::from_str(&answer.body).unwrap())
}

/// The account's hold, as `/status.json` says.
async fn hold(admin: SocketAddr) -> serde_json::Value {
    let answer = http::get(admin, "/status.json", &[]).await;
    let status: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
    status["accounts"][0]["hold"].clone()
}

/// Presses the status page's "Retry held mail" button of account gmail.
async fn retry_held(admin: SocketAddr, form_token: &str) -> Answer {
    let fields = [
        ("account", "gmail"),
        ("state", "held"),
        ("form_token", form_token),
    ];
    http::post_form(admin, "/retry", &fields).await
}

#[tokio::test]
async fn readiness_follows_an_account_hold_and_its_release() {
    let upstream = upstream(refusing_sign_in()).await;
    let relay = Relay::start(config_for(&upstream, UpstreamTls::StartTls, "")).await;
    let admin = relay.admin_addr.unwrap();
    let (status, ready) = readiness(admin).await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(
        ready,
        serde_json::json!({"ready": true, "checks": {"listeners": "ok", "spool": "ok", "accounts": {"gmail": "ok"}}})
    );

    // The first attempt is refused sign-in; the client's 250 comes after
    // the account went on hold.
    let mut client = relay.signed_in_client().await;
    assert_eq!(send(&mut client, CUSTOMER).await, 250);

    let (status, ready) = readiness(admin).await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["ready"], false);
    assert_eq!(ready["checks"]["spool"], "ok");
    let gmail = ready["checks"]["accounts"]["gmail"].as_str().unwrap();
    assert!(
        gmail.starts_with("on hold: 535 5.7.8 Username and Password not accepted.")
            && gmail.contains("— hint: ")
            && gmail.contains("app password"),
        "{gmail}"
    );

    // The app password is fixed at the provider; the operator presses the
    // status page's button.
    upstream.set_script(Script::default());
    let page = http::get(admin, "/", &[]).await;
    let answer = retry_held(admin, &form_token(&page.body)).await;
    assert_eq!(answer.status, 303, "{answer:?}");
    assert_eq!(answer.location.as_deref(), Some("/?retried=1"));

    upstream.wait_for_messages(1, WAIT).await;
    eventually("ready again once the hold is released", || async {
        readiness(admin).await.0 == 200
    })
    .await;
}

#[tokio::test]
async fn a_token_admits_any_client_that_has_it() {
    let upstream = upstream(Script::default()).await;
    let extra = format!("[admin]\ntoken = \"{TOKEN}\"");
    let relay = Relay::start(config_for(&upstream, UpstreamTls::StartTls, &extra)).await;
    let admin = relay.admin_addr.unwrap();
    let bearer = format!("Bearer {TOKEN}");

    assert_eq!(http::get(admin, "/healthz", &[]).await.status, 401);
    let wrong = [("Authorization", "Bearer 0123456789abcdef0123456789abcdeX")];
    assert_eq!(http::get(admin, "/healthz", &wrong).await.status, 401);
    let right = [("Authorization", bearer.as_str())];
    assert_eq!(http::get(admin, "/healthz", &right).await.status, 200);
    assert_eq!(http::get(admin, "/metrics", &right).await.status, 200);
    let page = http::get(admin, &format!("/?token={TOKEN}"), &[]).await;
    assert_eq!(page.status, 200);
    assert!(
        page.body
            .contains(&format!("href=\"/status.json?token={TOKEN}\"")),
        "links keep the token: {}",
        page.body
    );

    // A form post needs the page's form token besides the access token.
    let fields = [
        ("account", "gmail"),
        ("state", "held"),
        ("form_token", "forged"),
    ];
    let forged = http::post_form(admin, &format!("/retry?token={TOKEN}"), &fields).await;
    assert_eq!(forged.status, 403, "{forged:?}");
    let huge = "x".repeat(10_000);
    let oversized = [("account", huge.as_str())];
    let refused = http::post_form(admin, &format!("/retry?token={TOKEN}"), &oversized).await;
    assert_eq!(refused.status, 413, "request bodies are bounded");
}

/// A web page posting the retry form with a log line of its own in
/// `account` (and terminal escapes): refused, and the value is logged
/// escaped, inside the one line of the refusal.
#[tokio::test]
async fn a_refused_form_cannot_forge_log_lines() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(dir.path(), &[]).await;
    let forged = "x\n2026-01-01T00:00:00Z ERROR sendbridge: forged \x1b[31mred\x1b[0m\r";
    let fields = [
        ("account", forged),
        ("state", "held"),
        ("form_token", "guess"),
    ];
    let answer = http::post_form(relay.admin.unwrap(), "/retry", &fields).await;
    assert_eq!(answer.status, 403, "{answer:?}");
    relay.wait_for_line("retry form refused").await;
    let (_, log) = relay.terminate().await;

    let forged_lines: Vec<_> = log
        .iter()
        .filter(|line| line.starts_with("2026-01-01T00:00:00Z"))
        .collect();
    assert!(forged_lines.is_empty(), "forged lines: {forged_lines:#?}");
    let raw_controls: Vec<_> = log
        .iter()
        .filter(|line| line.contains(['\x1b', '\r']))
        .collect();
    assert!(
        raw_controls.is_empty(),
        "raw control bytes: {raw_controls:#?}"
    );
    let refused = log
        .iter()
        .find(|line| line.contains("retry form refused"))
        .unwrap();
    assert!(
        refused.contains(r#"account="x\n2026-01-01T00:00:00Z ERROR sendbridge: forged "#),
        "{refused}"
    );
}

/// The value of one series (`name{labels}`) in Prometheus text.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in:\n{metrics}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn metrics_count_what_happened() {
    let upstream = upstream(refusing_unknown_recipient()).await;
    let (relay, dir) = relay_process(&upstream).await;

    let mut client = Client::connect(relay.addr).await;
    client.ehlo().await;
    assert_eq!(client.login_plain(LOCAL_USER, "wrong").await.code, 535);
    assert_eq!(
        client.login_plain(LOCAL_USER, LOCAL_PASSWORD).await.code,
        235
    );
    for _ in 0..3 {
        assert_eq!(send(&mut client, CUSTOMER).await, 250);
    }
    assert_eq!(send(&mut client, UNKNOWN).await, 550);
    client.expect("QUIT", 221).await;
    upstream.wait_for_messages(3, WAIT).await;
    // Open while the metrics are read.
    let _open = Client::connect(relay.addr).await;

    let answer = http::get(relay.admin.unwrap(), "/metrics", &[]).await;

    assert_eq!(answer.status, 200);
    let metrics = answer.body;
    let expected = [
        (
            r#"sendbridge_messages_total{account="gmail",outcome="accepted"}"#,
            4.0,
        ),
        (
            r#"sendbridge_messages_total{account="gmail",outcome="delivered"}"#,
            3.0,
        ),
        (
            r#"sendbridge_messages_total{account="gmail",outcome="rejected"}"#,
            1.0,
        ),
        ("sendbridge_sessions_total", 2.0),
        ("sendbridge_sessions_open", 1.0),
        ("sendbridge_local_auth_failures_total", 1.0),
        (
            r#"sendbridge_upstream_replies_total{account="gmail",code="250"}"#,
            3.0,
        ),
        (
            r#"sendbridge_upstream_replies_total{account="gmail",code="550"}"#,
            1.0,
        ),
        (r#"sendbridge_delivery_seconds_count{account="gmail"}"#, 3.0),
        (r#"sendbridge_queue_messages{state="active"}"#, 0.0),
        (r#"sendbridge_queue_messages{state="deferred"}"#, 0.0),
        (r#"sendbridge_queue_messages{state="held"}"#, 0.0),
        (r#"sendbridge_queue_messages{state="rejected"}"#, 1.0),
    ];
    for (series, value) in expected {
        assert_eq!(sample(&metrics, series), value, "{series} in:\n{metrics}");
    }
    assert!(!metrics.contains(r#"outcome="held""#), "{metrics}");
    // The refused message, copied out of the journal with its updated
    // envelope: the one stored message (a drained journal segment holds
    // none).
    let kept = std::fs::metadata(only_file(&dir.path().join("spool/rejected")))
        .unwrap()
        .len();
    assert_eq!(sample(&metrics, "sendbridge_spool_bytes"), kept as f64);
    relay.terminate().await;
}

fn only_file(dir: &Path) -> std::path::PathBuf {
    let files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files[0].clone()
}

async fn command(dir: &Path, args: &[&str], admin: &str) -> Output {
    let env = [("SENDBRIDGE_ADMIN__LISTEN", admin)];
    tokio::time::timeout(WAIT, sendbridge(dir, args, &env).output())
        .await
        .expect("the command finishes")
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn health_and_status_commands_ask_the_running_relay() {
    let upstream = upstream(refusing_sign_in()).await;
    let (relay, dir) = relay_process(&upstream).await;
    let admin = relay.admin.unwrap().to_string();

    for (args, said) in [(&["health"][..], "ok"), (&["health", "--ready"], "ready")] {
        let out = command(dir.path(), args, &admin).await;
        assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
        assert_eq!(text(&out.stdout).trim(), said);
    }

    let mut client = Client::connect(relay.addr).await;
    client.ehlo().await;
    client.login_plain(LOCAL_USER, LOCAL_PASSWORD).await;
    assert_eq!(send(&mut client, CUSTOMER).await, 250);

    let out = command(dir.path(), &["health"], &admin).await;
    assert_eq!(out.status.code(), Some(0), "alive while on hold: {out:?}");
    let out = command(dir.path(), &["health", "--ready"], &admin).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let reason = text(&out.stderr);
    assert_eq!(reason.lines().count(), 1, "{reason}");
    assert!(
        reason.starts_with("sendbridge: /readyz answered 503: account gmail: on hold: 535 5.7.8"),
        "{reason}"
    );

    let out = command(dir.path(), &["status"], &admin).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let table = text(&out.stdout);
    let gmail = table
        .lines()
        .find(|line| line.starts_with("gmail"))
        .unwrap();
    let cells: Vec<_> = gmail
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(cells[..4], ["gmail", "on hold", "1", "0"], "{table}");
    assert!(
        cells[4].starts_with("535 5.7.8 Username and Password"),
        "{table}"
    );
    assert!(table.contains("    hint: "), "{table}");
    assert!(
        table.contains("QUEUE  active 0  deferred 0  held 1  rejected 0"),
        "{table}"
    );
    relay.terminate().await;
}

#[tokio::test]
async fn health_command_fails_when_nothing_listens() {
    let dir = tempfile::tempdir().unwrap();
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = unused.local_addr().unwrap().to_string();
    drop(unused);

    let out = command(dir.path(), &["health"], &addr).await;

    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let reason = text(&out.stderr);
    assert_eq!(
        reason.trim(),
        format!(
            "sendbridge: no answer from the admin interface at http://{addr}/healthz: io: Connection refused (os error 111)"
        )
    );
}

/// Headless Chromium with a profile of its own, bounded in time.
async fn chromium(args: &[&str], url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut command = Command::new("chromium");
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("chromium finishes")
        .expect("chromium runs");
    assert!(out.status.success(), "{out:?}");
    text(&out.stdout)
}

/// The page as the browser built it.
async fn dump_dom(url: &str) -> String {
    chromium(&["--dump-dom"], url).await
}

/// The text between `<tr id="account-gmail">` and the end of its row.
fn account_row(dom: &str) -> &str {
    let start = dom.find("id=\"account-gmail\"").expect("a row for gmail");
    let end = start + dom[start..].find("</tr>").unwrap();
    &dom[start..end]
}

/// An operator's morning: mail was rejected yesterday, today the account
/// is on hold. The page says so; "Retry held mail" sends it once the
/// password works again.
///
/// Chromium cannot click in `--dump-dom` mode, so the button press is the
/// form post the button makes, with the form token read from the DOM
/// Chromium built; its effect is checked by loading the page again.
#[tokio::test]
async fn status_page_in_a_browser() {
    if !tool_available("chromium") {
        return;
    }
    let upstream = upstream(refusing_unknown_recipient()).await;
    let port = upstream.port();
    let relay = Relay::start(config_for(&upstream, UpstreamTls::StartTls, "")).await;
    let admin = relay.admin_addr.unwrap();
    let url = format!("http://{admin}/");
    let mut client = relay.signed_in_client().await;
    assert_eq!(send(&mut client, UNKNOWN).await, 550);
    // The provider comes back refusing the app password: the relay's open
    // connection is gone, and signing in again fails.
    upstream.stop().await;
    let upstream = FakeUpstream::start(FakeUpstreamOptions {
        script: refusing_sign_in(),
        port,
        ..options()
    })
    .await;
    assert_eq!(send(&mut client, CUSTOMER).await, 250);

    let dom = dump_dom(&url).await;

    let row = account_row(&dom);
    assert!(row.contains("on hold"), "{row}");
    assert!(
        row.contains("535 5.7.8 Username and Password not accepted."),
        "{row}"
    );
    assert!(
        row.contains("What to do: ") && row.contains("app password"),
        "{row}"
    );
    assert!(row.contains("Retry held mail (1)"), "{row}");
    assert!(row.contains("Retry rejected mail (1)"), "{row}");
    assert!(
        dom.contains("held<b>1</b>") && dom.contains("rejected<b>1</b>"),
        "{dom}"
    );
    let rejections = &dom[dom.find("id=\"rejections\"").unwrap()..];
    assert!(
        rejections.contains(UNKNOWN) && rejections.contains("550 5.1.1"),
        "{rejections}"
    );
    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&screenshot);
    chromium(
        &[
            &format!("--screenshot={}", screenshot.display()),
            "--window-size=1000,800",
        ],
        &url,
    )
    .await;
    assert!(std::fs::metadata(&screenshot).unwrap().len() > 10_000);

    upstream.set_script(Script::default());
    let answer = retry_held(admin, &form_token(&dom)).await;
    assert_eq!(answer.status, 303, "{answer:?}");
    upstream.wait_for_messages(1, WAIT).await;
    eventually("the hold is released", || async {
        hold(admin).await.is_null()
    })
    .await;

    let dom = dump_dom(&format!("http://{admin}{}", answer.location.unwrap())).await;

    assert!(dom.contains("1 message(s) are due again"), "{dom}");
    let row = account_row(&dom);
    assert!(row.contains("<span class=\"ok\">ok</span>"), "{row}");
    assert!(!row.contains("Retry held mail"), "{row}");
    assert!(row.contains("Retry rejected mail (1)"), "{row}");
    assert!(dom.contains("held<b>0</b>"), "{dom}");
}
