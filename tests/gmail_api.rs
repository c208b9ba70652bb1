//! The Gmail API transport through the whole relay, over real sockets: a
//! message submitted by SMTP reaches a local HTTPS fake of the Gmail API
//! (`users.messages.send`) as the same MIME, with Bcc for envelope-only
//! recipients; large messages take the resumable upload; each of Google's
//! documented errors ends in its outcome class with its hint. Tokens come
//! from the local token endpoint: a person's refresh token, or a service
//! account's signed assertion.

mod common;

use std::path::Path;
use std::time::Duration;

use common::gmail_api::{Failure, FakeGmailApi};
use common::interactive::Cli;
use common::log_capture::LogCapture;
use common::relay::{LOCAL_PASSWORD, LOCAL_USER, Relay};
use common::token_endpoint::{
    CLIENT_SECRET, SERVICE_ACCOUNT_CLIENT_ID, TokenEndpoint, service_account_key,
    store_refresh_token,
};
use sendbridge::config::Config;
use sendbridge::spool::{Spool, State};

const WAIT: Duration = Duration::from_secs(20);
const MAILBOX: &str = "printer@example.com";
const SEND_SCOPE: &str = "https://www.googleapis.com/auth/gmail.send";
const CONTENT: &str = "From: printer@example.com\r\nTo: customer@example.com\r\nSubject: invoice 42\r\nMessage-ID: <42@legacy.example>\r\nDate: Mon, 07 Dec 2026 15:00:00 +0000\r\n\r\nInvoice 42.\r\n";

/// Everything a test talks to: the fake API, the token endpoint, and a
/// relay whose account `gmail` sends through the API.
struct Setup {
    api: FakeGmailApi,
    endpoint: TokenEndpoint,
    relay: Relay,
    _spool_dir: tempfile::TempDir,
}

/// Account `gmail` with `transport = "gmail-api"`, signed in by `sign_in`
/// (the oauth2 table's lines).
fn config(api: &FakeGmailApi, sign_in: &str, extra: &str) -> Config {
    Config::from_toml(&config_toml(api, sign_in, extra)).expect("test configuration is valid")
}

fn config_toml(api: &FakeGmailApi, sign_in: &str, extra: &str) -> String {
    format!(
        r#"
        [accounts.gmail]
        transport = "gmail-api"
        api_url = "{api_url}"
        ca_file = "{ca_file}"
        username = "{MAILBOX}"
        timeout = "10s"
        auth = "oauth2"
        [accounts.gmail.oauth2]
        provider = "google"
        {sign_in}
        [users.{LOCAL_USER}]
        password = "{LOCAL_PASSWORD}"
        account = "gmail"
        {extra}
        "#,
        api_url = api.base(),
        ca_file = api.ca_file().display(),
    )
}

/// The oauth2 lines of a person's sign-in at `endpoint`, and its stored
/// refresh token under `spool`, as `oauth login` leaves it.
fn person_signed_in(endpoint: &TokenEndpoint, spool: &Path) -> String {
    endpoint.script().refresh_token = Some("refresh-SECRET-0".into());
    store_refresh_token(spool, "gmail", MAILBOX, "refresh-SECRET-0");
    format!(
        "client_id = \"client-id\"\nclient_secret = \"{CLIENT_SECRET}\"\ntoken_url = \"{}\"",
        endpoint.url("/token")
    )
}

/// A person signed in once (`oauth login`): a stored refresh token.
async fn signed_in_by_a_person(extra: &str) -> Setup {
    let api = FakeGmailApi::start().await;
    let endpoint = TokenEndpoint::start().await;
    let spool_dir = tempfile::tempdir().unwrap();
    let spool = spool_dir.path().join("spool");
    let sign_in = person_signed_in(&endpoint, &spool);
    let relay = Relay::start_with_spool(config(&api, &sign_in, extra), spool).await;
    Setup {
        api,
        endpoint,
        relay,
        _spool_dir: spool_dir,
    }
}

/// A Workspace service account with domain-wide delegation for
/// `delegated`.
async fn signed_in_by_a_service_account(delegated: &str) -> Setup {
    let api = FakeGmailApi::start().await;
    let endpoint = TokenEndpoint::start().await;
    let spool_dir = tempfile::tempdir().unwrap();
    let (key_file, assertions) = service_account_key(
        spool_dir.path(),
        &endpoint.url("/token"),
        MAILBOX,
        delegated,
    );
    endpoint.script().service_account = Some(assertions);
    let sign_in = format!(
        "flow = \"service_account\"\nservice_account_file = \"{}\"",
        key_file.display()
    );
    let spool = spool_dir.path().join("spool");
    let relay = Relay::start_with_spool(config(&api, &sign_in, ""), spool).await;
    Setup {
        api,
        endpoint,
        relay,
        _spool_dir: spool_dir,
    }
}

async fn submit(relay: &Relay, recipients: &[&str], content: &str) -> common::smtp::Reply {
    let mut client = relay.signed_in_client().await;
    let reply = client
        .send_mail("billing@legacy.example", recipients, content)
        .await;
    client.expect("QUIT", 221).await;
    reply
}

/// The invoice to the customer; the client's reply code.
async fn submit_invoice(relay: &Relay) -> u16 {
    submit(relay, &["customer@example.com"], CONTENT).await.code
}

fn in_state(relay: &Relay, state: State) -> usize {
    Spool::open(&relay.spool)
        .unwrap()
        .list(state)
        .unwrap()
        .len()
}

#[tokio::test]
async fn a_message_reaches_the_api_as_the_same_mime_with_bcc_for_envelope_only_recipients() {
    let setup = signed_in_by_a_person("").await;
    let reply = submit(
        &setup.relay,
        &["customer@example.com", "audit@example.com"],
        CONTENT,
    )
    .await;
    assert_eq!(reply.code, 250, "{reply:?}");
    let sent = setup.api.wait_for_sent(1, WAIT).await;
    assert_eq!(sent.len(), 1, "one call for both recipients");
    assert_eq!(sent[0].way, "json");
    assert_eq!(
        sent[0].as_written_after("Bcc: audit@example.com\r\n"),
        CONTENT
    );
    assert_eq!(sent[0].token, "access-SECRET-1");
    assert_eq!(
        setup.api.requests(),
        ["POST /gmail/v1/users/me/messages/send"]
    );
    assert_eq!(setup.endpoint.requests("refresh_token"), 1);
}

#[tokio::test]
async fn a_large_message_goes_by_resumable_upload_byte_for_byte() {
    let setup = signed_in_by_a_person("[server]\nmax_message_size = 10000000").await;
    let line = format!("{}\r\n", "x".repeat(76));
    let content = format!("{CONTENT}{}", line.repeat(4 * 1024 * 1024 / line.len()));
    let reply = submit(&setup.relay, &["customer@example.com"], &content).await;
    assert_eq!(reply.code, 250, "{reply:?}");
    let sent = setup.api.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].way, "upload");
    assert!(sent[0].as_written_after("") == content, "the same bytes");
    assert_eq!(
        setup.api.requests(),
        [
            "POST /upload/gmail/v1/users/me/messages/send?uploadType=resumable",
            "PUT /upload/gmail/v1/users/me/messages/send?uploadType=resumable",
        ]
    );
}

#[tokio::test]
async fn a_413_to_the_json_request_takes_the_upload() {
    let setup = signed_in_by_a_person("").await;
    setup.api.limit_json(100);
    let reply = submit(&setup.relay, &["customer@example.com"], CONTENT).await;
    assert_eq!(reply.code, 250, "{reply:?}");
    let sent = setup.api.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].way, "upload");
    assert_eq!(sent[0].as_written_after(""), CONTENT);
    assert_eq!(setup.api.requests().len(), 3, "{:?}", setup.api.requests());
}

#[tokio::test]
async fn a_refused_token_is_refreshed_once_then_the_account_is_held() {
    let setup = signed_in_by_a_person("").await;
    // Revoked early: a fresh token goes through.
    setup.api.refuse_token("access-SECRET-1");
    assert_eq!(submit_invoice(&setup.relay).await, 250);
    let sent = setup.api.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].token, "access-SECRET-2");
    assert_eq!(setup.endpoint.requests("refresh_token"), 2);

    // Both refused: held, not bounced, and one more refresh only.
    let log = LogCapture::start();
    setup.api.refuse_token("access-SECRET-2");
    setup.api.refuse_token("access-SECRET-3");
    assert_eq!(submit_invoice(&setup.relay).await, 250);
    assert_eq!(in_state(&setup.relay, State::Held), 1);
    let hold = log.lines_with("account on hold");
    assert_eq!(hold.len(), 1, "{}", log.text());
    assert_eq!(hold[0]["reason"], "api_auth");
    assert!(
        hold[0]["hint"]
            .as_str()
            .unwrap()
            .contains("sendbridge oauth login gmail")
    );
    assert!(!log.text().contains("SECRET"), "no token is logged");
}

/// Google's answer, what the relay does with the message, the log line,
/// its reason code and a fragment of its hint.
struct Case {
    failure: Failure,
    state: State,
    message: &'static str,
    reason: &'static str,
    hint: &'static str,
    client_code: u16,
}

fn failure(
    status: u16,
    reason: &'static str,
    grpc_status: &'static str,
    message: &'static str,
) -> Failure {
    Failure {
        status,
        reason,
        grpc_status,
        message,
        retry_after: None,
    }
}

#[tokio::test]
async fn each_documented_error_ends_in_its_class_with_its_hint() {
    sendbridge::tls::install_crypto_provider();
    let cases = [
        Case {
            failure: failure(
                403,
                "insufficientPermissions",
                "PERMISSION_DENIED",
                "Request had insufficient authentication scopes.",
            ),
            state: State::Held,
            message: "account on hold",
            reason: "api_permission",
            hint: "https://www.googleapis.com/auth/gmail.send",
            client_code: 250,
        },
        Case {
            failure: failure(
                400,
                "failedPrecondition",
                "FAILED_PRECONDITION",
                "Precondition check failed.",
            ),
            state: State::Held,
            message: "account on hold",
            reason: "mail_service_not_enabled",
            hint: "accounts.gmail.username has no Gmail",
            client_code: 250,
        },
        Case {
            failure: failure(
                400,
                "invalidArgument",
                "INVALID_ARGUMENT",
                "Invalid To header",
            ),
            state: State::Rejected,
            message: "session closed after a rejection",
            reason: "invalid_recipient",
            hint: "",
            client_code: 550,
        },
        Case {
            failure: failure(
                503,
                "backendError",
                "UNAVAILABLE",
                "The service is currently unavailable.",
            ),
            state: State::Deferred,
            message: "message deferred",
            reason: "provider_unavailable",
            hint: "",
            client_code: 250,
        },
        Case {
            failure: failure(
                429,
                "rateLimitExceeded",
                "RESOURCE_EXHAUSTED",
                "Too many concurrent requests for user",
            ),
            state: State::Deferred,
            message: "message deferred",
            reason: "rate_limited",
            hint: "",
            client_code: 250,
        },
    ];
    for case in cases {
        let label = format!("{} {}", case.failure.status, case.failure.reason);
        let log = LogCapture::start();
        let setup = signed_in_by_a_person("").await;
        setup.api.fail_next(case.failure);
        let reply = submit(&setup.relay, &["customer@example.com"], CONTENT).await;
        assert_eq!(reply.code, case.client_code, "{label}: {reply:?}");
        assert_eq!(in_state(&setup.relay, case.state), 1, "{label}");
        let Setup { relay, .. } = setup;
        relay.stop().await;
        let lines = log.lines_with(case.message);
        assert!(!lines.is_empty(), "{label}: {}", log.text());
        assert_eq!(lines[0]["reason"], case.reason, "{label}");
        if !case.hint.is_empty() {
            let hint = lines[0]["hint"].as_str().unwrap_or_default();
            assert!(hint.contains(case.hint), "{label}: {hint}");
        }
        assert!(
            !log.text().contains("SECRET"),
            "{label}: no token is logged"
        );
    }
}

#[tokio::test]
async fn retry_after_holds_the_next_attempt_back() {
    // The backoff alone would retry after a second.
    let setup =
        signed_in_by_a_person("[delivery]\nretry_initial = \"1s\"\nscan_interval = \"1s\"").await;
    setup.api.fail_next(Failure {
        retry_after: Some("3"),
        ..failure(
            429,
            "rateLimitExceeded",
            "RESOURCE_EXHAUSTED",
            "Too many concurrent requests for user",
        )
    });
    let started = tokio::time::Instant::now();
    assert_eq!(submit_invoice(&setup.relay).await, 250);
    let sent = setup.api.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].as_written_after(""), CONTENT);
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "not before Retry-After"
    );
}

#[tokio::test]
async fn a_service_account_sends_as_the_mailbox_with_only_gmail_send() {
    let setup = signed_in_by_a_service_account(SEND_SCOPE).await;
    let reply = submit(&setup.relay, &["customer@example.com"], CONTENT).await;
    assert_eq!(reply.code, 250, "{reply:?}");
    let sent = setup.api.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].as_written_after(""), CONTENT);
    // The endpoint verified the assertion's signature and claims (subject
    // the mailbox, scope gmail.send) before it issued this token.
    assert_eq!(sent[0].token, "access-SECRET-1");
    assert_eq!(
        setup
            .endpoint
            .requests("urn:ietf:params:oauth:grant-type:jwt-bearer"),
        1
    );
}

#[tokio::test]
async fn a_service_account_without_delegation_is_held_with_the_admin_console_steps() {
    let log = LogCapture::start();
    let setup = signed_in_by_a_service_account("https://mail.google.com/").await;
    assert_eq!(submit_invoice(&setup.relay).await, 250);
    assert_eq!(in_state(&setup.relay, State::Held), 1);
    assert!(setup.api.requests().is_empty(), "no token, no call");
    let hold = log.lines_with("account on hold");
    assert_eq!(hold.len(), 1, "{}", log.text());
    let hint = hold[0]["hint"].as_str().unwrap();
    assert!(hint.contains("Manage Domain Wide Delegation"), "{hint}");
    assert!(
        hint.contains(&format!(
            "client ID {SERVICE_ACCOUNT_CLIENT_ID} must be listed with the scope {SEND_SCOPE}"
        )),
        "{hint}"
    );
    assert!(!log.text().contains("PRIVATE KEY"));
}

/// `sendbridge check` with the token endpoint granting `scope` (when it
/// lists scopes) and Gmail answering `failure` first.
async fn check_granting(
    scope: Option<&str>,
    failure: Option<Failure>,
) -> (bool, String, FakeGmailApi) {
    let api = FakeGmailApi::start().await;
    if let Some(failure) = failure {
        api.fail_next(failure);
    }
    let endpoint = TokenEndpoint::start().await;
    endpoint.script().scope = scope.map(str::to_string);
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let sign_in = person_signed_in(&endpoint, &spool);
    let config = format!(
        "[spool]\ndir = \"{}\"\n{}",
        spool.display(),
        config_toml(&api, &sign_in, "")
    );
    std::fs::write(dir.path().join("sendbridge.toml"), config).unwrap();
    let args = ["--config", "sendbridge.toml", "check", "gmail"];
    let (status, output) = Cli::start(dir.path(), &args, &[]).finish().await;
    assert!(!output.contains("SECRET"), "{output}");
    (status.success(), output, api)
}

#[tokio::test]
async fn check_proves_sending_with_a_message_nobody_gets_and_says_what_the_token_grants() {
    let (success, output, api) = check_granting(Some(SEND_SCOPE), None).await;
    assert!(success, "{output}");
    let row = output
        .lines()
        .find(|line| line.starts_with("gmail"))
        .unwrap();
    assert!(row.contains(" ok "), "{output}");
    assert!(
        row.contains(&format!("token grants: {SEND_SCOPE}"))
            && row.contains("users.getProfile needs a read scope")
            && row.contains("Recipient address required"),
        "{output}"
    );
    // Proven by a message without recipients, which Google refuses.
    assert_eq!(api.requests(), ["POST /gmail/v1/users/me/messages/send"]);
    assert!(api.sent().is_empty(), "nothing was sent");
}

#[tokio::test]
async fn check_refuses_a_token_that_cannot_send() {
    let (success, output, _api) =
        check_granting(Some("https://www.googleapis.com/auth/gmail.readonly"), None).await;
    assert!(!success, "{output}");
    assert!(output.contains("refused"), "{output}");
    assert!(
        output.contains(&format!("hint: the access token lacks the scope {SEND_SCOPE}: run `sendbridge oauth login gmail`")),
        "{output}"
    );
}

#[tokio::test]
async fn check_proves_the_scope_when_the_token_endpoint_does_not_list_it() {
    let missing = failure(
        403,
        "insufficientPermissions",
        "PERMISSION_DENIED",
        "Request had insufficient authentication scopes.",
    );
    let (success, output, api) = check_granting(None, Some(missing)).await;
    assert!(!success, "{output}");
    assert!(
        output.contains("refused") && output.contains("insufficientPermissions"),
        "{output}"
    );
    assert!(
        output.contains(&format!("lacks the scope {SEND_SCOPE}")),
        "{output}"
    );
    assert!(api.sent().is_empty());
}
