//! `transport = "graph"` on the wire: the relay against a local Microsoft
//! Graph over real TLS (`common::fake_graph`) answering with Graph's status
//! codes, error bodies and headers. Messages go out as their MIME with Bcc
//! for envelope-only recipients; large ones as a draft with an upload
//! session; each error lands in its outcome class.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::fake_graph::{FakeGraph, MAX_REQUEST, Scripted};
use common::log_capture::LogCapture;
use common::process::sendbridge;
use common::relay::{LOCAL_PASSWORD, LOCAL_USER, Relay};
use common::token_endpoint::{CLIENT_SECRET, TokenEndpoint};
use common::tokens::TestTokens;
use common::wait::eventually;
use sendbridge::config::Config;
use sendbridge::spool::{Spool, State, unix_millis};

const WAIT: Duration = Duration::from_secs(20);
const MAILBOX: &str = "printer@contoso.com";
const TOKEN: &str = "graph-access-token";
const MESSAGE: &str = "From: printer@contoso.com\r\nTo: a@example.com\r\nSubject: invoice\r\n\r\nInvoice attached.\r\n";

/// Account `m365` sending through `graph` as `MAILBOX`, app-only; `extra`
/// ends the account's table (more keys, or tables of its own).
fn config(graph: &FakeGraph, token_url: &str, extra: &str) -> Config {
    Config::from_toml(&config_toml(graph, token_url, extra)).expect("test configuration is valid")
}

fn config_toml(graph: &FakeGraph, token_url: &str, extra: &str) -> String {
    format!(
        r#"
        [accounts.m365]
        transport = "graph"
        api_url = "{api_url}"
        ca_file = "{ca_file}"
        username = "{MAILBOX}"
        timeout = "10s"
        auth = "oauth2"
        {extra}
        [accounts.m365.oauth2]
        provider = "microsoft"
        flow = "client_credentials"
        tenant = "contoso.com"
        client_id = "sendbridge-test"
        client_secret = "{CLIENT_SECRET}"
        token_url = "{token_url}"
        [users.{LOCAL_USER}]
        password = "{LOCAL_PASSWORD}"
        account = "m365"
        [delivery]
        retry_initial = "1h"
        [notify]
        bounces = false
        "#,
        api_url = graph.url(),
        ca_file = graph.ca_file().display(),
    )
}

/// A Graph whose next sendMail gets `status` with Graph's error `code` and
/// `message`, and a relay in front of it.
async fn graph_refusing_once(
    status: u16,
    code: &'static str,
    message: &'static str,
) -> (FakeGraph, Relay) {
    let graph = FakeGraph::start(TOKEN).await;
    graph.script(Scripted::error("/sendMail", status, code, message));
    let relay = relay(&graph, &TestTokens::new(TOKEN), "").await;
    (graph, relay)
}

async fn relay(graph: &FakeGraph, tokens: &Arc<TestTokens>, extra: &str) -> Relay {
    let config = config(graph, "http://127.0.0.1:9/token", extra);
    Relay::start_with(config, Some(tokens.source())).await
}

async fn send(relay: &Relay, to: &[&str], content: &str) -> u16 {
    let mut client = relay.signed_in_client().await;
    client
        .send_mail("billing@legacy.example", to, content)
        .await
        .code
}

fn envelopes(spool: &Path, state: State) -> Vec<sendbridge::spool::Envelope> {
    Spool::open(spool).unwrap().list(state).unwrap()
}

/// The `sendbridge` command with `args`, run in `dir`.
async fn run(dir: &Path, args: &[&str]) -> std::process::Output {
    let command = sendbridge(dir, args, &[]).output();
    tokio::time::timeout(WAIT, command).await.unwrap().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn a_message_goes_out_as_its_mime_with_bcc_for_envelope_only_recipients() {
    let log = LogCapture::start();
    let endpoint = TokenEndpoint::start().await;
    let graph = FakeGraph::start("access-SECRET-1").await;
    let config = config(&graph, &endpoint.url("/token"), "");
    let relay = Relay::start(config).await;

    let code = send(&relay, &["a@example.com", "boss@example.com"], MESSAGE).await;
    assert_eq!(code, 250);

    let sent = graph.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].mailbox, MAILBOX);
    assert_eq!(sent[0].via, "sendMail");
    let mime = text(&sent[0].mime);
    assert!(mime.starts_with("Bcc: boss@example.com\r\n"), "{mime}");
    assert!(mime.contains("\r\nTo: a@example.com\r\n"), "{mime}");
    assert!(mime.ends_with("\r\n\r\nInvoice attached.\r\n"), "{mime}");
    // App-only: the client's own credentials, for Graph's .default scope.
    let form = endpoint.last_form("client_credentials");
    assert_eq!(form["scope"], format!("{}/.default", graph.url()));
    let seen = graph.seen();
    assert_eq!(seen.len(), 1, "one request: {seen:?}");
    assert_eq!(seen[0].path, format!("/v1.0/users/{MAILBOX}/sendMail"));
    assert!(
        !log.text().contains("SECRET"),
        "a token or secret was logged"
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_refused_token_is_refreshed_once_and_a_second_refusal_holds_the_account() {
    let graph = FakeGraph::start("fresh-token").await;
    let tokens = TestTokens::new(TOKEN);
    tokens.refresh_to("fresh-token");
    let relay = relay(&graph, &tokens, "").await;

    assert_eq!(send(&relay, &["a@example.com"], MESSAGE).await, 250);
    graph.wait_for_sent(1, WAIT).await;
    assert_eq!(tokens.refused(), [TOKEN]);

    // Graph now refuses every token it is given.
    graph.set_token("revoked");
    send(&relay, &["a@example.com"], MESSAGE).await;
    eventually("the account is held", || async {
        envelopes(&relay.spool, State::Held).len() == 1
    })
    .await;
    assert_eq!(tokens.refused(), [TOKEN, "fresh-token", "fresh-token"]);
    let held = &envelopes(&relay.spool, State::Held)[0];
    let last = held.last_reply.clone().unwrap_or_default();
    assert!(
        last.contains("Graph 401 InvalidAuthenticationToken"),
        "{last}"
    );
    relay.stop().await;
}

#[tokio::test]
async fn graph_errors_land_in_their_outcome_class_with_hints() {
    // (status, error code, message, state, the hold's hint says)
    let table: [(u16, &str, &str, State, &[&str]); 4] = [
        (
            403,
            "ErrorAccessDenied",
            "Access is denied. Check credentials and try again.",
            State::Held,
            &["Mail.Send", "admin consent", "New-ApplicationAccessPolicy"],
        ),
        (
            404,
            "ErrorInvalidUser",
            "The requested user 'printer@contoso.com' is invalid.",
            State::Held,
            &["accounts.m365.username"],
        ),
        (
            400,
            "ErrorMimeContentInvalidBase64String",
            "Invalid base64 string for MIME content.",
            State::Rejected,
            &[],
        ),
        (
            503,
            "ServiceUnavailable",
            "Service Unavailable",
            State::Deferred,
            &[],
        ),
    ];
    for (status, code, message, state, hint) in table {
        let (graph, relay) = graph_refusing_once(status, code, message).await;
        send(&relay, &["a@example.com"], MESSAGE).await;
        eventually(code, || async { envelopes(&relay.spool, state).len() == 1 }).await;
        let last = envelopes(&relay.spool, state)[0].last_reply.clone();
        let expected = format!("Graph {status} {code}: {message}");
        assert!(
            last.as_deref().unwrap_or_default().ends_with(&expected),
            "{last:?}"
        );
        if state == State::Held {
            // What the status page and `sendbridge status` say to do.
            let answer = common::http::get(relay.admin_addr.unwrap(), "/status.json", &[]).await;
            let status: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
            let said = status["accounts"][0]["hold"]["hint"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            for word in hint {
                assert!(said.contains(word), "{code}: no {word:?} in {said}");
            }
        }
        assert!(graph.sent().is_empty());
        relay.stop().await;
    }
}

#[tokio::test]
async fn throttling_defers_no_sooner_than_retry_after() {
    // (status, Retry-After, seconds at least)
    let table = [(429, "3600", 3590), (503, "120", 115)];
    for (status, after, at_least) in table {
        let graph = FakeGraph::start(TOKEN).await;
        graph.script(Scripted {
            retry_after: Some(after),
            ..Scripted::error(
                "/sendMail",
                status,
                "ApplicationThrottled",
                "Application is over its MailboxConcurrency limit.",
            )
        });
        // A backoff far shorter than what Graph asks for.
        let mut config = config(&graph, "http://127.0.0.1:9/token", "");
        config.delivery.retry_initial = Duration::from_secs(1);
        let relay = Relay::start_with(config, Some(TestTokens::new(TOKEN).source())).await;
        let before = unix_millis();
        assert_eq!(send(&relay, &["a@example.com"], MESSAGE).await, 250);
        eventually("deferred", || async {
            envelopes(&relay.spool, State::Deferred).len() == 1
        })
        .await;
        let deferred = &envelopes(&relay.spool, State::Deferred)[0];
        let wait_s = deferred.next_attempt_at.saturating_sub(before) / 1000;
        assert!(wait_s >= at_least, "{status}: retried after {wait_s} s");
        assert!(
            wait_s <= at_least + 30,
            "{status}: retried after {wait_s} s"
        );
        relay.stop().await;
    }
}

#[tokio::test]
async fn a_recipient_graph_refuses_by_name_is_refused_alone() {
    let (graph, relay) = graph_refusing_once(400, "ErrorInvalidRecipients", "At least one recipient is not valid., Recipient 'nobody@example.com' is not resolved. All recipients must be resolved before a message can be submitted.").await;
    let content = "From: printer@contoso.com\r\nTo: a@example.com, nobody@example.com\r\nSubject: invoice\r\n\r\nInvoice.\r\n";

    send(&relay, &["a@example.com", "nobody@example.com"], content).await;

    let sent = graph.wait_for_sent(1, WAIT).await;
    let mime = text(&sent[0].mime);
    assert!(mime.contains("\r\nTo: a@example.com\r\n"), "{mime}");
    assert!(!mime.contains("nobody@example.com"), "{mime}");
    assert_eq!(
        graph.seen().len(),
        2,
        "the refused one, then the copy without it"
    );
    relay.stop().await;
}

/// A message with a `size`-byte PDF and a small PNG, base64 in 76-column lines.
fn with_attachments(size: usize) -> (String, Vec<u8>) {
    let pdf: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
    let lines = |bytes: &[u8]| {
        BASE64
            .encode(bytes)
            .as_bytes()
            .chunks(76)
            .map(|line| String::from_utf8(line.to_vec()).unwrap())
            .collect::<Vec<_>>()
            .join("\r\n")
    };
    let content = format!(
        "From: printer@contoso.com\r\nTo: a@example.com\r\nSubject: scans\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n\
         --b1\r\nContent-Type: text/plain\r\n\r\nThe scans.\r\n\
         --b1\r\nContent-Type: application/pdf; name=\"scan.pdf\"\r\nContent-Disposition: attachment; filename=\"scan.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{}\r\n\
         --b1\r\nContent-Type: image/png; name=\"logo.png\"\r\nContent-Disposition: attachment; filename=\"logo.png\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{}\r\n\
         --b1--\r\n",
        lines(&pdf),
        lines(b"\x89PNG small"),
    );
    (content, pdf)
}

#[tokio::test]
async fn a_large_message_goes_as_a_draft_with_its_attachment_through_an_upload_session() {
    let graph = FakeGraph::start(TOKEN).await;
    let relay = relay(&graph, &TestTokens::new(TOKEN), "").await;
    let (content, pdf) = with_attachments(7 * 1024 * 1024);
    assert!(content.len() > MAX_REQUEST);

    assert_eq!(send(&relay, &["a@example.com"], &content).await, 250);

    let sent = graph.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].via, "draft");
    let mime = text(&sent[0].mime);
    assert!(mime.contains("The scans."), "the draft keeps the text");
    assert!(!mime.contains("scan.pdf"), "the large attachment came out");
    assert!(
        mime.contains("logo.png"),
        "the small one stayed in the MIME"
    );
    assert_eq!(sent[0].attachments.len(), 1);
    assert_eq!(sent[0].attachments[0].0, "scan.pdf");
    assert!(
        sent[0].attachments[0].1 == pdf,
        "the attachment arrived whole"
    );
    let seen = graph.seen();
    let puts: Vec<_> = seen.iter().filter(|s| s.method == "PUT").collect();
    assert_eq!(puts.len(), 3, "7 MiB in 3,200 KiB ranges");
    assert!(
        puts.iter().all(|put| put.bearer.is_none()),
        "no token to the upload URL"
    );
    assert!(
        seen.iter().all(|s| s.len <= MAX_REQUEST),
        "every request within 4 MB"
    );
    assert_eq!(
        puts[2].content_range.as_deref(),
        Some(format!("bytes 6553600-{}/{}", pdf.len() - 1, pdf.len()).as_str())
    );
    assert_eq!(graph.drafts_left(), 0);
    relay.stop().await;
}

#[tokio::test]
async fn a_413_from_send_mail_takes_the_draft_way() {
    let (graph, relay) = graph_refusing_once(
        413,
        "ErrorRequestEntityTooLarge",
        "The request is too large.",
    )
    .await;
    let (content, _) = with_attachments(1000);

    assert_eq!(send(&relay, &["a@example.com"], &content).await, 250);

    let sent = graph.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].via, "draft");
    relay.stop().await;
}

#[tokio::test]
async fn without_sent_items_the_draft_is_marked_to_be_deleted_after_sending() {
    let graph = FakeGraph::start(TOKEN).await;
    let relay = relay(
        &graph,
        &TestTokens::new(TOKEN),
        "save_to_sent_items = false",
    )
    .await;

    assert_eq!(send(&relay, &["a@example.com"], MESSAGE).await, 250);

    let sent = graph.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].via, "draft");
    assert_eq!(sent[0].patched, ["\"Boolean 0x0E01\"=\"true\""]);
    relay.stop().await;
}

#[tokio::test]
async fn check_gets_a_token_and_says_which_permissions_each_way_needs() {
    let endpoint = TokenEndpoint::start().await;
    let graph = FakeGraph::start("access-SECRET-1").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("config")).unwrap();
    let toml = config_toml(&graph, &endpoint.url("/token"), "");
    std::fs::write(dir.path().join("config/sendbridge.toml"), toml).unwrap();

    let out = run(dir.path(), &["check"]).await;

    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    let row = stdout
        .lines()
        .find(|l| l.starts_with("m365 "))
        .expect("a row for m365");
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cells[..4],
        ["m365", graph.url().as_str(), "https", "ok"],
        "{stdout}"
    );
    assert!(
        row.contains("Mail.Send") && row.contains("Mail.ReadWrite"),
        "{row}"
    );
    assert!(
        stdout.contains(&format!(
            "account m365: {MAILBOX} through graph at {}",
            graph.url()
        )),
        "{stdout}"
    );
    assert_eq!(endpoint.requests("client_credentials"), 1);
    assert!(graph.sent().is_empty(), "check sends nothing");
    let seen = graph.seen();
    assert_eq!(seen.len(), 1, "one probe: {seen:?}");
    assert!(!stdout.contains("SECRET"));

    // `oauth status` names the flow and the scope Graph gets asked for.
    let out = run(dir.path(), &["oauth", "status", "--check"]).await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let row = stdout
        .lines()
        .find(|l| l.starts_with("m365 "))
        .expect("a row for m365");
    let cells: Vec<&str> = row.split_whitespace().collect();
    let scope = format!("{}/.default", graph.url());
    assert_eq!(
        cells[..3],
        ["m365", "client_credentials", scope.as_str()],
        "{stdout}"
    );
    assert!(row.trim_end().ends_with("ok"), "{stdout}");
    assert!(!stdout.contains("SECRET"));
}

#[tokio::test]
async fn the_status_page_and_metrics_show_the_transport() {
    let graph = FakeGraph::start(TOKEN).await;
    let relay = relay(&graph, &TestTokens::new(TOKEN), "").await;
    let admin = relay.admin_addr.unwrap();

    let status = common::http::get(admin, "/status.json", &[]).await;
    let status: serde_json::Value = serde_json::from_str(&status.body).unwrap();
    assert_eq!(status["accounts"][0]["transport"], "graph", "{status}");
    let page = common::http::get(admin, "/", &[]).await.body;
    assert!(page.contains("<td>m365</td><td>graph</td>"), "{page}");
    let metrics = common::http::get(admin, "/metrics", &[]).await.body;
    assert!(
        metrics.contains("sendbridge_account_info{account=\"m365\",transport=\"graph\"} 1"),
        "{metrics}"
    );
    relay.stop().await;
}

#[tokio::test]
async fn an_access_denied_hold_stays_until_graph_lets_the_mailbox_send() {
    let graph = FakeGraph::start(TOKEN).await;
    let denied = "Access is denied. Check credentials and try again.";
    graph.script(Scripted::error(
        "/sendMail",
        403,
        "ErrorAccessDenied",
        denied,
    ));
    // The probe (a message without recipients) is refused the same way.
    graph.script(Scripted::error(
        "/sendMail",
        403,
        "ErrorAccessDenied",
        denied,
    ));
    let mut config = config(&graph, "http://127.0.0.1:9/token", "");
    config.delivery.retry_initial = Duration::from_millis(200);
    let relay = Relay::start_with(config, Some(TestTokens::new(TOKEN).source())).await;

    send(&relay, &["a@example.com"], MESSAGE).await;

    // Held; the first probe finds access still denied, the second one
    // passes (the admin consented) and the held message goes out.
    let sent = graph.wait_for_sent(1, WAIT).await;
    assert!(text(&sent[0].mime).contains("Invoice attached."));
    let sendmails = graph
        .seen()
        .iter()
        .filter(|s| s.path.ends_with("/sendMail"))
        .count();
    assert_eq!(
        sendmails, 4,
        "message, refused probe, passing probe, message"
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_graph_that_never_answers_defers_after_the_accounts_timeout() {
    let graph = FakeGraph::start(TOKEN).await;
    // Accepts connections and never says a word (not even TLS).
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let held_open = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            open.push(socket);
        }
    });
    let mut config = config(&graph, "http://127.0.0.1:9/token", "");
    let account = config.accounts.get_mut("m365").unwrap();
    account.api_url = Some(format!("https://127.0.0.1:{port}"));
    account.timeout = Duration::from_secs(1);
    let relay = Relay::start_with(config, Some(TestTokens::new(TOKEN).source())).await;

    let started = std::time::Instant::now();
    assert_eq!(send(&relay, &["a@example.com"], MESSAGE).await, 250);
    eventually("deferred", || async {
        envelopes(&relay.spool, State::Deferred).len() == 1
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let deferred = &envelopes(&relay.spool, State::Deferred)[0];
    let last = deferred.last_reply.clone().unwrap_or_default();
    assert!(last.contains("no answer to POST"), "{last}");
    assert!(!last.contains(TOKEN));
    held_open.abort();
    relay.stop().await;
}

#[tokio::test]
async fn swaks_mail_with_a_blind_copy_reaches_graph_with_bcc_and_the_to_it_wrote() {
    if !common::tools::tool_available("swaks") {
        return;
    }
    let graph = FakeGraph::start(TOKEN).await;
    let relay = relay(&graph, &TestTokens::new(TOKEN), "").await;

    let mut command = tokio::process::Command::new("swaks");
    command
        .args(["--server", &relay.addr.to_string()])
        .args(["--auth", "PLAIN", "--auth-user", LOCAL_USER])
        .args(["--auth-password", LOCAL_PASSWORD])
        .args(["--from", "billing@legacy.example"])
        .args(["--to", "a@example.com,boss@example.com"])
        .args([
            "--header",
            "To: a@example.com",
            "--header",
            "Subject: swaks test",
        ])
        .args(["--body", "hello", "--silent", "2"]);
    let output = tokio::time::timeout(WAIT, command.output())
        .await
        .unwrap()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));

    let sent = graph.wait_for_sent(1, WAIT).await;
    let mime = text(&sent[0].mime);
    assert!(mime.starts_with("Bcc: boss@example.com\r\n"), "{mime}");
    assert!(mime.contains("\r\nTo: a@example.com\r\n"), "{mime}");
    assert!(mime.contains("Subject: swaks test"), "{mime}");
    relay.stop().await;
}

#[tokio::test]
async fn a_request_without_an_answer_is_not_sent_again_at_once() {
    let graph = FakeGraph::start(TOKEN).await;
    let mut config = config(&graph, "http://127.0.0.1:9/token", "");
    let account = config.accounts.get_mut("m365").unwrap();
    account.timeout = Duration::from_secs(1);
    // One worker: the second message goes over the first one's connection.
    account.max_connections = 1;
    let relay = Relay::start_with(config, Some(TestTokens::new(TOKEN).source())).await;
    assert_eq!(send(&relay, &["a@example.com"], MESSAGE).await, 250);
    graph.wait_for_sent(1, WAIT).await;

    // The next sendMail gets its answer only after the relay gave up: Graph
    // may have sent it.
    graph.script(Scripted {
        delay: Some(Duration::from_secs(3)),
        ..Scripted::error("/sendMail", 503, "ServiceUnavailable", "late")
    });
    assert_eq!(send(&relay, &["a@example.com"], MESSAGE).await, 250);
    eventually("deferred", || async {
        envelopes(&relay.spool, State::Deferred).len() == 1
    })
    .await;
    let sendmails = graph
        .seen()
        .iter()
        .filter(|s| s.path.ends_with("/sendMail"))
        .count();
    assert_eq!(
        sendmails, 2,
        "no second request right after the one unanswered"
    );
    relay.stop().await;
}
