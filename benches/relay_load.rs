//! Load benchmark: throughput through the relay against a reference measured
//! in the same run (the same load sent straight to the fake upstream), and
//! the relay's memory use. How to run and read it: bench/README.md.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use mail_send::smtp::AssertReply;
use mail_send::smtp::message::Parameters;
use mail_send::{Credentials, SmtpClient};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use fake_upstream::{FakeUpstream, FakeUpstreamOptions, Received, UpstreamTls};

// The bench uses only part of the test helpers.
#[allow(dead_code)]
#[path = "../tests/common/fake_upstream.rs"]
mod fake_upstream;
#[allow(dead_code)]
#[path = "../tests/common/process.rs"]
mod process;

const UPSTREAM_USER: &str = "me@gmail.com";
const UPSTREAM_PASSWORD: &str = "abcdabcdabcdabcd";
const LOCAL_USER: &str = "invoices";
const LOCAL_PASSWORD: &str = "old-password";
const MAIL_FROM: &str = "billing@example.com";
const RCPT_TO: &str = "customer@example.net";
const HELO: &str = "bench.test";
/// A name on the fake upstream's certificate.
const UPSTREAM_TLS_NAME: &str = "localhost";

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// 2000 × 4 KiB from 10 clients over one session each; also what a custom
/// scenario leaves out.
const SMALL_MESSAGES: Scenario = Scenario {
    messages: 2000,
    sessions: 10,
    size: 4 * KIB,
    connections: Connections::OneSession,
};

const STANDARD_SCENARIOS: [Scenario; 4] = [
    SMALL_MESSAGES,
    // A legacy program that signs in on every connection.
    Scenario {
        connections: Connections::PerMessage,
        ..SMALL_MESSAGES
    },
    // The same from a trusted network, without AUTH: what the sign-in
    // costs is the difference.
    Scenario {
        connections: Connections::PerMessageTrusted,
        ..SMALL_MESSAGES
    },
    Scenario {
        messages: 200,
        size: MIB,
        ..SMALL_MESSAGES
    },
];

/// Pairs of relay runs that measure the sign-in's cost (see
/// `sign_in_pairs`).
const DEFAULT_SIGN_IN_PAIRS: usize = 10;

const IDLE_CONNECTIONS: usize = 1000;
const IDLE_LIMIT_MIB: f64 = 50.0;
const LARGE_MESSAGE: usize = 25 * MIB;
/// The message may be held once per session, plus buffers.
const LARGE_LIMIT_MIB: f64 = 2.0 * 25.0;
/// Room for the idle connections plus the load sessions.
const RELAY_MAX_CONNECTIONS: &str = "2000";

const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

const USAGE: &str = "usage: cargo bench --bench relay_load [-- [--messages N] [--sessions C] [--size BYTES] [--connection-per-message | --connection-per-message-trusted] [--sign-in-cost] [--rounds N] [--sign-in-pairs N] [--skip-memory-checks]]
Without --messages/--sessions/--size/--connection-per-message* it runs the standard scenarios; a value left out\nof a custom scenario is that of the one-session standard one (2000 messages, 10 sessions, 4096 bytes, one connection per session).\n--connection-per-message-trusted sends without AUTH, from the trusted network 127.0.0.1.\n--sign-in-cost runs only the two standard scenarios with a connection per message, with and without AUTH.\n--rounds N (default 5): every scenario once per round (reference, then relay), the order reversed every other round; the medians are reported.\n--sign-in-pairs N (default 10, 0 for none): pairs of relay runs with and without AUTH, back to back, for the sign-in's cost.";

/// Runs of each scenario: one run of a second or two swings by a third on a
/// busy 2-core machine, the median of three much less.
const DEFAULT_ROUNDS: usize = 5;

fn main() -> ExitCode {
    let options = match Options::parse(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(err) => {
            eprintln!("relay_load: {err:#}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("build the tokio runtime");
    match runtime.block_on(run(options)) {
        Ok(report) if report.passed => ExitCode::SUCCESS,
        Ok(_) => {
            eprintln!("relay_load: a memory check failed");
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("relay_load failed: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(options: Options) -> anyhow::Result<Report> {
    raise_fd_limit(IDLE_CONNECTIONS as u64 + 512)?;
    let rounds = run_rounds(&options.scenarios, options.rounds).await?;
    let scenarios: Vec<ScenarioResult> = options
        .scenarios
        .into_iter()
        .zip(rounds)
        .map(|(scenario, rounds)| ScenarioResult::new(scenario, rounds))
        .collect();
    let mut per_message_ratios = Vec::new();
    if let Some((signed_in, trusted)) = sign_in_pair(&scenarios)
        && options.sign_in_pairs > 0
    {
        let samples = sign_in_pairs(&signed_in, &trusted, options.sign_in_pairs).await?;
        per_message_ratios.push(PerMessageRatio::new(
            "sign-in per message / the same without AUTH from a trusted network, pairs of relay runs",
            samples,
        ));
    }
    per_message_ratios.extend(PerMessageRatio::against_one_session(&scenarios));
    let mut memory_checks = Vec::new();
    if options.memory_checks {
        memory_checks.push(idle_connections_check().await?);
        memory_checks.push(large_message_check().await?);
    }
    let report = Report {
        cpus: std::thread::available_parallelism().map_or(0, usize::from),
        rounds: options.rounds,
        passed: memory_checks.iter().all(|check| check.passed),
        scenarios,
        per_message_ratios,
        memory_checks,
    };
    report.print();
    let path = results_path();
    report.write_json(&path)?;
    println!("\nresults written to {}", path.display());
    Ok(report)
}

struct Options {
    scenarios: Vec<Scenario>,
    memory_checks: bool,
    rounds: usize,
    sign_in_pairs: usize,
}

impl Options {
    fn parse(mut args: impl Iterator<Item = String>) -> anyhow::Result<Options> {
        let mut custom: Option<Scenario> = None;
        let mut memory_checks = true;
        let mut rounds = DEFAULT_ROUNDS;
        let mut sign_in_cost_only = false;
        let mut sign_in_pairs = DEFAULT_SIGN_IN_PAIRS;
        while let Some(arg) = args.next() {
            let mut value = || -> anyhow::Result<usize> {
                let value = args
                    .next()
                    .with_context(|| format!("{arg} needs a value"))?;
                value
                    .parse()
                    .with_context(|| format!("{arg}: not a number: {value:?}"))
            };
            match arg.as_str() {
                "--messages" => custom.get_or_insert(SMALL_MESSAGES).messages = value()?,
                "--sessions" => custom.get_or_insert(SMALL_MESSAGES).sessions = value()?,
                "--size" => custom.get_or_insert(SMALL_MESSAGES).size = value()?,
                "--connection-per-message" => {
                    custom.get_or_insert(SMALL_MESSAGES).connections = Connections::PerMessage
                }
                "--connection-per-message-trusted" => {
                    custom.get_or_insert(SMALL_MESSAGES).connections =
                        Connections::PerMessageTrusted
                }
                "--sign-in-cost" => sign_in_cost_only = true,
                "--skip-memory-checks" => memory_checks = false,
                "--rounds" => rounds = value()?,
                "--sign-in-pairs" => sign_in_pairs = value()?,
                // cargo bench passes it to every bench target.
                "--bench" => {}
                other => bail!("unknown argument {other:?}"),
            }
        }
        let scenarios = match (custom, sign_in_cost_only) {
            (Some(_), true) => bail!("--sign-in-cost runs standard scenarios, not a custom one"),
            (Some(custom), false) => vec![custom],
            (None, true) => STANDARD_SCENARIOS
                .into_iter()
                .filter(|scenario| scenario.connections != Connections::OneSession)
                .collect(),
            (None, false) => STANDARD_SCENARIOS.to_vec(),
        };
        for scenario in &scenarios {
            scenario.validate()?;
        }
        ensure!(rounds > 0, "--rounds must be at least 1");
        Ok(Options {
            scenarios,
            memory_checks,
            rounds,
            sign_in_pairs,
        })
    }
}

/// N messages of `size` bytes from `sessions` concurrent clients; each sends
/// its share one after another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
struct Scenario {
    messages: usize,
    sessions: usize,
    #[serde(rename = "size_bytes")]
    size: usize,
    connections: Connections,
}

/// How a client uses connections for its share of the messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Connections {
    /// One connection, signed in once, for all of them.
    OneSession,
    /// Connect, sign in, send one message, QUIT: for every message.
    PerMessage,
    /// Connect, send one message, QUIT, without AUTH (the relay trusts
    /// 127.0.0.1): for every message.
    PerMessageTrusted,
}

impl Scenario {
    fn validate(&self) -> anyhow::Result<()> {
        ensure!(self.messages > 0, "--messages must be at least 1");
        ensure!(
            (1..=self.messages).contains(&self.sessions),
            "--sessions must be between 1 and the number of messages"
        );
        MessageTemplate::new(self.size).map(drop)
    }

    fn name(&self) -> String {
        let clients = match self.connections {
            Connections::OneSession => "sessions",
            Connections::PerMessage => "clients, login/msg",
            Connections::PerMessageTrusted => "clients, conn/msg, trusted",
        };
        format!(
            "{} x {} / {} {clients}",
            self.messages,
            human_size(self.size),
            self.sessions
        )
    }

    /// Sequence numbers of the messages session `index` sends: an even split,
    /// the remainder going to the first sessions.
    fn share(&self, index: usize) -> Range<usize> {
        let (base, remainder) = (self.messages / self.sessions, self.messages % self.sessions);
        let start = index * base + index.min(remainder);
        start..start + base + usize::from(index < remainder)
    }

    /// Generous bound on one load run, so a broken relay fails the bench
    /// instead of hanging it.
    fn deadline(&self) -> Duration {
        let total_mib = (self.messages * self.size) as f64 / MIB as f64;
        Duration::from_secs_f64(60.0 + 0.02 * self.messages as f64 + total_mib)
    }
}

fn human_size(bytes: usize) -> String {
    match bytes {
        b if b >= MIB && b % MIB == 0 => format!("{} MiB", b / MIB),
        b if b >= KIB && b % KIB == 0 => format!("{} KiB", b / KIB),
        b => format!("{b} B"),
    }
}

/// A message of an exact size: realistic headers, then text lines of at most
/// 78 characters, CRLF line endings, no line starting with ".". Messages
/// differ only in the fixed-width sequence number in Message-ID.
struct MessageTemplate {
    bytes: Vec<u8>,
    sequence_at: usize,
}

const SEQUENCE_WIDTH: usize = 8;
/// Body text; it has no "." so that no line can start with one.
const BODY_TEXT: &str = "Dear customer, please find below the details of your invoice for the \
    services provided last month; payment is due within thirty days of the invoice date, \
    and our billing team answers any question on working days ";

impl MessageTemplate {
    fn new(size: usize) -> anyhow::Result<MessageTemplate> {
        let before_sequence = format!(
            "From: Billing <{MAIL_FROM}>\r\n\
             To: Customer <{RCPT_TO}>\r\n\
             Subject: Your invoice ({size} bytes)\r\n\
             Date: Mon, 04 Mar 2024 09:30:00 +0000\r\n\
             Message-ID: <"
        );
        let after_sequence = "@relay-load.example.com>\r\n\
             MIME-Version: 1.0\r\n\
             Content-Type: text/plain; charset=us-ascii\r\n\
             Content-Transfer-Encoding: 7bit\r\n\
             \r\n";
        let header_len = before_sequence.len() + SEQUENCE_WIDTH + after_sequence.len();
        // The body needs room for at least one (empty) line.
        ensure!(
            size >= header_len + 2,
            "--size must be at least {} bytes",
            header_len + 2
        );
        let mut bytes = Vec::with_capacity(size);
        bytes.extend_from_slice(before_sequence.as_bytes());
        bytes.resize(bytes.len() + SEQUENCE_WIDTH, b'0');
        bytes.extend_from_slice(after_sequence.as_bytes());
        append_body(&mut bytes, size - header_len);
        assert_eq!(bytes.len(), size);
        Ok(MessageTemplate {
            bytes,
            sequence_at: before_sequence.len(),
        })
    }

    fn render(&self, sequence: usize) -> Vec<u8> {
        let mut message = self.bytes.clone();
        let digits = format!("{sequence:0SEQUENCE_WIDTH$}");
        message[self.sequence_at..self.sequence_at + SEQUENCE_WIDTH]
            .copy_from_slice(digits.as_bytes());
        message
    }
}

/// Appends exactly `len` (at least 2) bytes of CRLF-terminated text lines.
fn append_body(bytes: &mut Vec<u8>, len: usize) {
    let text = BODY_TEXT.as_bytes();
    let mut offset = 0;
    let mut remaining = len;
    while remaining > 0 {
        // Lines of 76 characters; the last takes up to 78, so that no single
        // byte is left over that could not form a line.
        let width = if remaining <= 80 { remaining - 2 } else { 76 };
        bytes.extend((offset..offset + width).map(|i| text[i % text.len()]));
        bytes.extend_from_slice(b"\r\n");
        offset += width;
        remaining -= width + 2;
    }
}

/// Where a load goes: straight to the fake upstream (STARTTLS, as the relay
/// itself connects to it) or to the relay (plain TCP, as a legacy program).
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    starttls: Option<TlsConnector>,
    /// `None`: a client on a trusted network, which does not sign in.
    credentials: Option<Credentials<String>>,
}

impl Target {
    fn upstream(upstream: &FakeUpstream) -> anyhow::Result<Target> {
        Ok(Target {
            addr: upstream.addr(),
            starttls: Some(connector_trusting(upstream.ca_file())?),
            credentials: Some(Credentials::new(
                UPSTREAM_USER.into(),
                UPSTREAM_PASSWORD.into(),
            )),
        })
    }

    fn relay(relay: &RelayProcess, connections: Connections) -> Target {
        let signed_in = connections != Connections::PerMessageTrusted;
        Target {
            addr: relay.addr,
            starttls: None,
            credentials: signed_in
                .then(|| Credentials::new(LOCAL_USER.into(), LOCAL_PASSWORD.into())),
        }
    }
}

fn connector_trusting(ca_file: &Path) -> anyhow::Result<TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file)? {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Connects and reads the greeting. TCP_NODELAY as in real clients: without
/// it Nagle's algorithm can hold back the final "." for a delayed ACK.
async fn connect(addr: SocketAddr) -> anyhow::Result<SmtpClient<TcpStream>> {
    let stream = tokio::time::timeout(COMMAND_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow!("connecting to {addr} timed out"))??;
    stream.set_nodelay(true)?;
    let mut client = SmtpClient {
        stream,
        timeout: COMMAND_TIMEOUT,
    };
    tokio::time::timeout(COMMAND_TIMEOUT, client.read())
        .await
        .map_err(|_| anyhow!("no greeting from {addr}"))??
        .assert_positive_completion()?;
    Ok(client)
}

/// A signed-in client session.
enum Session {
    Plain(SmtpClient<TcpStream>),
    // Boxed: a TLS client is large next to a plain one.
    Tls(Box<SmtpClient<TlsStream<TcpStream>>>),
}

impl Session {
    async fn open(target: &Target) -> anyhow::Result<Session> {
        let mut client = connect(target.addr).await?;
        let mut session = match &target.starttls {
            None => Session::Plain(client),
            Some(tls) => {
                client.ehlo(HELO).await?;
                Session::Tls(Box::new(client.start_tls(tls, UPSTREAM_TLS_NAME).await?))
            }
        };
        match &mut session {
            Session::Plain(client) => sign_in(client, &target.credentials).await?,
            Session::Tls(client) => sign_in(client.as_mut(), &target.credentials).await?,
        }
        Ok(session)
    }

    async fn send(&mut self, message: &[u8]) -> anyhow::Result<()> {
        match self {
            Session::Plain(client) => transact(client, message).await,
            Session::Tls(client) => transact(client.as_mut(), message).await,
        }
    }

    async fn quit(self) -> anyhow::Result<()> {
        match self {
            Session::Plain(client) => client.quit().await?,
            Session::Tls(client) => (*client).quit().await?,
        }
        Ok(())
    }
}

/// EHLO, then AUTH unless the client is trusted by its address.
async fn sign_in<T: AsyncRead + AsyncWrite + Unpin>(
    client: &mut SmtpClient<T>,
    credentials: &Option<Credentials<String>>,
) -> anyhow::Result<()> {
    let capabilities = client.ehlo(HELO).await?;
    if let Some(credentials) = credentials {
        client.authenticate(credentials, &capabilities).await?;
    }
    Ok(())
}

async fn transact<T: AsyncRead + AsyncWrite + Unpin>(
    client: &mut SmtpClient<T>,
    message: &[u8],
) -> anyhow::Result<()> {
    client.mail_from(MAIL_FROM, &Parameters::new()).await?;
    client.rcpt_to(RCPT_TO, &Parameters::new()).await?;
    // data() appends CRLF "." CRLF itself; the message's own final CRLF
    // would otherwise arrive as an extra empty line.
    let content = message.strip_suffix(b"\r\n").unwrap_or(message);
    client.data(content).await?;
    Ok(())
}

/// One client's part of a load: sign in, send, quit; once for all its
/// messages or once for each.
async fn run_client(
    target: Target,
    template: Arc<MessageTemplate>,
    sequences: Range<usize>,
    connections: Connections,
) -> anyhow::Result<()> {
    match connections {
        Connections::OneSession => {
            let mut session = Session::open(&target).await?;
            for sequence in sequences {
                session.send(&template.render(sequence)).await?;
            }
            session.quit().await
        }
        Connections::PerMessage | Connections::PerMessageTrusted => {
            for sequence in sequences {
                let mut session = Session::open(&target).await?;
                session.send(&template.render(sequence)).await?;
                session.quit().await?;
            }
            Ok(())
        }
    }
}

/// Sends the scenario's load to `target` and returns the time from the first
/// connect until `upstream` has received every message.
async fn measure_load(
    target: &Target,
    upstream: &FakeUpstream,
    scenario: &Scenario,
) -> anyhow::Result<Duration> {
    let template = Arc::new(MessageTemplate::new(scenario.size)?);
    let start = Instant::now();
    let mut sessions = JoinSet::new();
    for index in 0..scenario.sessions {
        sessions.spawn(run_client(
            target.clone(),
            template.clone(),
            scenario.share(index),
            scenario.connections,
        ));
    }
    let clients = async {
        while let Some(session) = sessions.join_next().await {
            session.context("client session panicked")??;
        }
        anyhow::Ok(())
    };
    let delivered = async {
        let received = await_delivery(upstream, scenario.messages, scenario.deadline()).await?;
        let elapsed = start.elapsed();
        if let Some(wrong) = received.iter().find(|m| content_size(m) != scenario.size) {
            bail!(
                "the upstream received a message of {} bytes; {} were sent",
                content_size(wrong),
                scenario.size
            );
        }
        Ok(elapsed)
    };
    let ((), elapsed) = tokio::try_join!(clients, delivered)?;
    Ok(elapsed)
}

/// The size of what the client sent: without the Received field the relay
/// adds (the messages carry Date and Message-ID, so nothing else is added).
fn content_size(message: &Received) -> usize {
    if message.data.starts_with(b"Received: ") {
        message.without_trace().len()
    } else {
        message.data.len()
    }
}

/// Waits until the upstream holds `count` messages.
async fn await_delivery(
    upstream: &FakeUpstream,
    count: usize,
    deadline: Duration,
) -> anyhow::Result<Vec<Received>> {
    // wait_for_messages panics on its own timeout, printing every message
    // received; give up first, with a short error.
    tokio::time::timeout(deadline, upstream.wait_for_messages(count, 2 * deadline))
        .await
        .map_err(|_| {
            anyhow!(
                "the upstream received {} of {count} messages within {deadline:?}",
                upstream.received().len()
            )
        })
}

async fn start_upstream() -> FakeUpstream {
    FakeUpstream::start(FakeUpstreamOptions::new(
        UpstreamTls::StartTls,
        UPSTREAM_USER,
        UPSTREAM_PASSWORD,
    ))
    .await
}

/// `sendbridge run` (release build) as a child process in a temporary
/// directory, configured by environment variables only, delivering to a
/// fake upstream. Killed when dropped.
struct RelayProcess {
    addr: SocketAddr,
    process: process::RelayProcess,
    _dir: tempfile::TempDir,
}

impl RelayProcess {
    async fn start(upstream: &FakeUpstream) -> anyhow::Result<RelayProcess> {
        let dir = tempfile::tempdir()?;
        let env = relay_env(upstream);
        let env: Vec<(&str, &str)> = env
            .iter()
            .map(|(key, value)| (*key, value.as_str()))
            .collect();
        let process = process::RelayProcess::start(dir.path(), &env).await;
        Ok(RelayProcess {
            addr: process.addr,
            process,
            _dir: dir,
        })
    }

    fn memory(&self) -> anyhow::Result<Memory> {
        Memory::of(self.process.pid())
    }

    /// CPU time the relay process has used so far, from /proc/PID/stat.
    fn cpu_time(&self) -> anyhow::Result<CpuTime> {
        let pid = self.process.pid();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .context("read the relay's /proc/PID/stat")?;
        // Fields after the command name, which is in parentheses.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .context("a /proc/PID/stat line")?
            .1
            .split_whitespace()
            .collect();
        let ticks = |index: usize| -> anyhow::Result<u64> {
            Ok(fields.get(index).context("utime/stime")?.parse()?)
        };
        // SAFETY: sysconf only reads a system constant.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        let time = |ticks: u64| Duration::from_micros(ticks * 1_000_000 / per_second);
        // utime and stime are fields 14 and 15 of the line (11 and 12 here).
        Ok(CpuTime {
            user: time(ticks(11)?),
            system: time(ticks(12)?),
        })
    }

    /// Resets the peak (VmHWM) to the current RSS, so that a later peak
    /// measures only what follows.
    fn reset_peak(&self) -> anyhow::Result<()> {
        std::fs::write(format!("/proc/{}/clear_refs", self.process.pid()), "5")
            .context("reset the relay's peak RSS (/proc/PID/clear_refs)")
    }

    /// Appends the end of the relay's log to `err`, to explain it.
    fn explain(&self, err: anyhow::Error) -> anyhow::Error {
        let log = self.process.log();
        let tail = log[log.len().saturating_sub(20)..].join("\n");
        anyhow!("{err:#}\nrelay log (last lines):\n{tail}")
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.process.kill().await;
        Ok(())
    }
}

fn relay_env(upstream: &FakeUpstream) -> Vec<(&'static str, String)> {
    vec![
        (
            "SENDBRIDGE_SERVER__MAX_CONNECTIONS",
            RELAY_MAX_CONNECTIONS.into(),
        ),
        ("SENDBRIDGE_ACCOUNTS__GMAIL__HOST", "127.0.0.1".into()),
        (
            "SENDBRIDGE_ACCOUNTS__GMAIL__PORT",
            upstream.port().to_string(),
        ),
        ("SENDBRIDGE_ACCOUNTS__GMAIL__USERNAME", UPSTREAM_USER.into()),
        (
            "SENDBRIDGE_ACCOUNTS__GMAIL__PASSWORD",
            UPSTREAM_PASSWORD.into(),
        ),
        (
            "SENDBRIDGE_ACCOUNTS__GMAIL__CA_FILE",
            upstream.ca_file().display().to_string(),
        ),
        (
            "SENDBRIDGE_USERS__INVOICES__PASSWORD",
            LOCAL_PASSWORD.into(),
        ),
        ("SENDBRIDGE_USERS__INVOICES__ACCOUNT", "gmail".into()),
        // For the scenario without AUTH; the others sign in all the same.
        (
            "SENDBRIDGE_SERVER__TRUSTED_NETWORKS",
            "[\"127.0.0.1\"]".into(),
        ),
        ("SENDBRIDGE_SERVER__DEFAULT_ACCOUNT", "gmail".into()),
    ]
}

/// A process's CPU time: in its own code (user) and in the kernel on its
/// behalf (system: fsyncs, file and socket calls).
#[derive(Clone, Copy)]
struct CpuTime {
    user: Duration,
    system: Duration,
}

impl CpuTime {
    fn since(self, earlier: CpuTime) -> CpuTime {
        CpuTime {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }
}

/// From /proc/PID/status, in KiB.
#[derive(Clone, Copy, Debug, Serialize)]
struct Memory {
    /// VmRSS: resident now.
    rss_kib: u64,
    /// VmHWM: the peak since start (or since `reset_peak`).
    peak_kib: u64,
}

impl Memory {
    fn of(pid: u32) -> anyhow::Result<Memory> {
        let path = format!("/proc/{pid}/status");
        let status = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name)?.trim().strip_suffix(" kB"))
                .and_then(|kib| kib.trim().parse().ok())
                .with_context(|| format!("no {name} in {path}"))
        };
        Ok(Memory {
            rss_kib: field("VmRSS:")?,
            peak_kib: field("VmHWM:")?,
        })
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Every scenario once per round, the order reversed every other round: a
/// drift of the machine (the disk's fsync time, other load) then weighs on
/// all scenarios alike. The rounds of each scenario, in order.
async fn run_rounds(
    scenarios: &[Scenario],
    rounds: usize,
) -> anyhow::Result<Vec<Vec<RoundResult>>> {
    let mut results: Vec<Vec<RoundResult>> = scenarios
        .iter()
        .map(|_| Vec::with_capacity(rounds))
        .collect();
    for round in 1..=rounds {
        let label = format!("round {round} of {rounds}");
        let mut order: Vec<usize> = (0..scenarios.len()).collect();
        if round % 2 == 0 {
            order.reverse();
        }
        for index in order {
            results[index].push(run_round(&scenarios[index], &label).await?);
        }
    }
    Ok(results)
}

/// The same load to the fake upstream directly, then through a relay, each
/// with a fresh upstream.
async fn run_round(scenario: &Scenario, round: &str) -> anyhow::Result<RoundResult> {
    let reference = reference_run(scenario, round).await?;
    let (through_relay, cpu, memory) = relay_run(scenario, round).await?;
    Ok(RoundResult::new(
        scenario,
        reference,
        through_relay,
        cpu,
        memory,
    ))
}

/// The relay's throughput with a sign-in per message over its throughput
/// without (`trusted`), from `pairs` pairs of relay runs back to back, in
/// turn first: runs a second apart, without the per-message references
/// (8 s each) between them, so a machine whose speed drifts from one
/// second to the next weighs on both alike. One ratio per pair.
async fn sign_in_pairs(
    signed_in: &Scenario,
    trusted: &Scenario,
    pairs: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut ratios = Vec::with_capacity(pairs);
    for pair in 1..=pairs {
        let label = format!("sign-in pair {pair} of {pairs}");
        let (signed_in_run, trusted_run) = if pair % 2 == 1 {
            let first = relay_run(signed_in, &label).await?;
            (first, relay_run(trusted, &label).await?)
        } else {
            let first = relay_run(trusted, &label).await?;
            (relay_run(signed_in, &label).await?, first)
        };
        let rate = |scenario: &Scenario, elapsed: Duration| {
            Throughput::new(scenario.messages, elapsed).messages_per_second
        };
        ratios.push(rate(signed_in, signed_in_run.0) / rate(trusted, trusted_run.0));
    }
    Ok(ratios)
}

/// The per-message scenarios with and without sign-in, when both ran
/// with the same load.
fn sign_in_pair(scenarios: &[ScenarioResult]) -> Option<(Scenario, Scenario)> {
    let signed_in = scenarios
        .iter()
        .find(|result| result.scenario.connections == Connections::PerMessage)?
        .scenario;
    let trusted = Scenario {
        connections: Connections::PerMessageTrusted,
        ..signed_in
    };
    scenarios
        .iter()
        .any(|result| result.scenario == trusted)
        .then_some((signed_in, trusted))
}

async fn reference_run(scenario: &Scenario, round: &str) -> anyhow::Result<Duration> {
    eprintln!("{}: reference run, {round}", scenario.name());
    // Dropped at the end, with the messages it holds.
    let upstream = start_upstream().await;
    measure_load(&Target::upstream(&upstream)?, &upstream, scenario)
        .await
        .context("reference run")
}

/// The load's duration through a relay, with the relay's CPU time and
/// memory.
async fn relay_run(
    scenario: &Scenario,
    round: &str,
) -> anyhow::Result<(Duration, CpuTime, Memory)> {
    eprintln!("{}: relay run, {round}", scenario.name());
    let upstream = start_upstream().await;
    let relay = RelayProcess::start(&upstream).await?;
    let cpu_before = relay.cpu_time()?;
    let target = Target::relay(&relay, scenario.connections);
    let through_relay = measure_load(&target, &upstream, scenario)
        .await
        .map_err(|err| relay.explain(err))
        .context("relay run")?;
    let cpu = relay.cpu_time()?.since(cpu_before);
    let memory = relay.memory()?;
    relay.stop().await?;
    Ok((through_relay, cpu, memory))
}

/// RSS the relay adds for idle client connections (connected, greeted,
/// EHLO answered).
async fn idle_connections_check() -> anyhow::Result<MemoryCheck> {
    eprintln!("memory: {IDLE_CONNECTIONS} idle connections");
    let upstream = start_upstream().await;
    let relay = RelayProcess::start(&upstream).await?;
    // One connection first, so that what the first one sets up once is not
    // counted as a cost per connection.
    drop(greeted(relay.addr).await?);
    let baseline = relay.memory()?.rss_kib;
    let mut held = Vec::with_capacity(IDLE_CONNECTIONS);
    for _ in 0..IDLE_CONNECTIONS {
        held.push(
            greeted(relay.addr)
                .await
                .map_err(|err| relay.explain(err))?,
        );
    }
    let increase = relay.memory()?.rss_kib.saturating_sub(baseline);
    drop(held);
    relay.stop().await?;
    let per_connection_kib = increase as f64 / IDLE_CONNECTIONS as f64;
    Ok(MemoryCheck::new(
        format!("{IDLE_CONNECTIONS} idle connections"),
        increase,
        IDLE_LIMIT_MIB,
        format!("{per_connection_kib:.1} KiB per connection"),
    ))
}

async fn greeted(addr: SocketAddr) -> anyhow::Result<SmtpClient<TcpStream>> {
    let mut client = connect(addr).await?;
    client.ehlo(HELO).await?;
    Ok(client)
}

/// Peak RSS the relay adds while relaying one large message.
async fn large_message_check() -> anyhow::Result<MemoryCheck> {
    eprintln!("memory: one {} message", human_size(LARGE_MESSAGE));
    let upstream = start_upstream().await;
    let relay = RelayProcess::start(&upstream).await?;
    let deadline = Duration::from_secs(120);
    // Sign in and relay a small message first: the argon2 password check
    // and the first upstream connection are not the large message's cost.
    let mut session = Session::open(&Target::relay(&relay, Connections::OneSession)).await?;
    session
        .send(&MessageTemplate::new(4 * KIB)?.render(0))
        .await?;
    await_delivery(&upstream, 1, deadline).await?;

    let large = MessageTemplate::new(LARGE_MESSAGE)?.render(1);
    relay.reset_peak()?;
    let baseline = relay.memory()?.rss_kib;
    let relayed = async {
        session.send(&large).await?;
        let received = await_delivery(&upstream, 2, deadline).await?;
        ensure!(
            content_size(&received[1]) == LARGE_MESSAGE,
            "the upstream got a truncated message"
        );
        anyhow::Ok(())
    };
    relayed.await.map_err(|err| relay.explain(err))?;
    let increase = relay.memory()?.peak_kib.saturating_sub(baseline);
    session.quit().await?;
    relay.stop().await?;
    Ok(MemoryCheck::new(
        format!("one {} message", human_size(LARGE_MESSAGE)),
        increase,
        LARGE_LIMIT_MIB,
        format!("peak {:.1} MiB over the RSS before it", mib(increase)),
    ))
}

#[derive(Serialize)]
struct Throughput {
    seconds: f64,
    messages_per_second: f64,
}

impl Throughput {
    fn new(messages: usize, elapsed: Duration) -> Throughput {
        Throughput {
            seconds: elapsed.as_secs_f64(),
            messages_per_second: messages as f64 / elapsed.as_secs_f64(),
        }
    }
}

/// A scenario's figures: the median of each over its rounds.
#[derive(Serialize)]
struct ScenarioResult {
    name: String,
    #[serde(flatten)]
    scenario: Scenario,
    #[serde(flatten)]
    median: RoundResult,
    /// The lowest and highest ratio of a round.
    ratio_range: (f64, f64),
    rounds: Vec<RoundResult>,
}

impl ScenarioResult {
    fn new(scenario: Scenario, rounds: Vec<RoundResult>) -> ScenarioResult {
        let median = |figure: fn(&RoundResult) -> f64| median(rounds.iter().map(figure));
        let rate = |messages_per_second: f64| Throughput {
            seconds: scenario.messages as f64 / messages_per_second,
            messages_per_second,
        };
        let median_result = RoundResult {
            reference: rate(median(|round| round.reference.messages_per_second)),
            relay: rate(median(|round| round.relay.messages_per_second)),
            ratio: median(|round| round.ratio),
            relay_cpu_us_per_message: median(|round| round.relay_cpu_us_per_message),
            relay_user_cpu_us_per_message: median(|round| round.relay_user_cpu_us_per_message),
            relay_peak_rss_mib: median(|round| round.relay_peak_rss_mib),
            relay_rss_at_end_mib: median(|round| round.relay_rss_at_end_mib),
        };
        ScenarioResult {
            name: scenario.name(),
            scenario,
            median: median_result,
            ratio_range: range(rounds.iter().map(|round| round.ratio)),
            rounds,
        }
    }
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    match values.len() % 2 {
        1 => values[middle],
        _ => (values[middle - 1] + values[middle]) / 2.0,
    }
}

/// The lowest and the highest.
fn range(values: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    (
        values.clone().fold(f64::INFINITY, f64::min),
        values.fold(f64::NEG_INFINITY, f64::max),
    )
}

/// The relay's throughput with a connection and sign-in per message over
/// that of the same load sent another way, each sample from two runs close
/// in time (of one round, or one pair): steadier than the ratio of two
/// medians.
#[derive(Serialize)]
struct PerMessageRatio {
    what: &'static str,
    median: f64,
    range: (f64, f64),
    samples: Vec<f64>,
}

impl PerMessageRatio {
    fn new(what: &'static str, samples: Vec<f64>) -> PerMessageRatio {
        PerMessageRatio {
            what,
            median: median(samples.iter().copied()),
            range: range(samples.iter().copied()),
            samples,
        }
    }

    /// Connection and sign-in per message against one session per client,
    /// round by round, when both ran.
    fn against_one_session(scenarios: &[ScenarioResult]) -> Option<PerMessageRatio> {
        let per_message = scenarios
            .iter()
            .find(|result| result.scenario.connections == Connections::PerMessage)?;
        let wanted = Scenario {
            connections: Connections::OneSession,
            ..per_message.scenario
        };
        let one_session = scenarios.iter().find(|result| result.scenario == wanted)?;
        let samples = per_message
            .rounds
            .iter()
            .zip(&one_session.rounds)
            .map(|(per_message, one_session)| {
                per_message.relay.messages_per_second / one_session.relay.messages_per_second
            })
            .collect();
        Some(PerMessageRatio::new(
            "connection and sign-in per message / one session per client, round by round",
            samples,
        ))
    }
}

/// One reference run and one relay run of a scenario.
#[derive(Serialize)]
struct RoundResult {
    reference: Throughput,
    relay: Throughput,
    /// Relay throughput over reference throughput.
    ratio: f64,
    /// The relay process's CPU time (user + system) per message.
    relay_cpu_us_per_message: f64,
    /// Its user part: the relay's own code, without the kernel's work.
    relay_user_cpu_us_per_message: f64,
    relay_peak_rss_mib: f64,
    relay_rss_at_end_mib: f64,
}

impl RoundResult {
    fn new(
        scenario: &Scenario,
        reference: Duration,
        relay: Duration,
        relay_cpu: CpuTime,
        memory: Memory,
    ) -> RoundResult {
        let reference = Throughput::new(scenario.messages, reference);
        let relay = Throughput::new(scenario.messages, relay);
        let per_message = |cpu: Duration| cpu.as_secs_f64() * 1e6 / scenario.messages as f64;
        RoundResult {
            ratio: relay.messages_per_second / reference.messages_per_second,
            reference,
            relay,
            relay_cpu_us_per_message: per_message(relay_cpu.user + relay_cpu.system),
            relay_user_cpu_us_per_message: per_message(relay_cpu.user),
            relay_peak_rss_mib: mib(memory.peak_kib),
            relay_rss_at_end_mib: mib(memory.rss_kib),
        }
    }
}

#[derive(Serialize)]
struct MemoryCheck {
    name: String,
    increase_mib: f64,
    limit_mib: f64,
    passed: bool,
    detail: String,
}

impl MemoryCheck {
    fn new(name: String, increase_kib: u64, limit_mib: f64, detail: String) -> MemoryCheck {
        let increase_mib = mib(increase_kib);
        MemoryCheck {
            name,
            increase_mib,
            limit_mib,
            passed: increase_mib < limit_mib,
            detail,
        }
    }
}

#[derive(Serialize)]
struct Report {
    cpus: usize,
    rounds: usize,
    scenarios: Vec<ScenarioResult>,
    per_message_ratios: Vec<PerMessageRatio>,
    memory_checks: Vec<MemoryCheck>,
    passed: bool,
}

impl Report {
    fn print(&self) {
        println!(
            "\nsendbridge relay load ({} CPUs), medians of {} rounds\n",
            self.cpus, self.rounds
        );
        println!(
            "{:<46} {:>12} {:>12} {:>10} {:>13} {:>12} {:>8} {:>10} {:>12}",
            "scenario",
            "ref msg/s",
            "relay msg/s",
            "relay/ref",
            "(range)",
            "CPU µs/msg",
            "(user)",
            "peak MiB",
            "RSS end MiB"
        );
        for result in &self.scenarios {
            let median = &result.median;
            let (lowest, highest) = result.ratio_range;
            println!(
                "{:<46} {:>12.1} {:>12.1} {:>10.3} {:>13} {:>12.0} {:>8.0} {:>10.1} {:>12.1}",
                result.name,
                median.reference.messages_per_second,
                median.relay.messages_per_second,
                median.ratio,
                format!("{lowest:.3}–{highest:.3}"),
                median.relay_cpu_us_per_message,
                median.relay_user_cpu_us_per_message,
                median.relay_peak_rss_mib,
                median.relay_rss_at_end_mib
            );
        }
        let mut first = true;
        for ratio in &self.per_message_ratios {
            let gap = if std::mem::take(&mut first) { "\n" } else { "" };
            let (lowest, highest) = ratio.range;
            println!(
                "{gap}{}, relay msg/s (same load): {:.3} ({lowest:.3}–{highest:.3})",
                ratio.what, ratio.median
            );
        }
        if !self.memory_checks.is_empty() {
            println!("\nrelay memory checks");
        }
        for check in &self.memory_checks {
            println!(
                "{:<46} +{:.1} MiB (limit {:.0} MiB), {}: {}",
                check.name,
                check.increase_mib,
                check.limit_mib,
                check.detail,
                if check.passed { "ok" } else { "FAILED" }
            );
        }
    }

    fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(path, json + "\n").with_context(|| format!("write {}", path.display()))
    }
}

fn results_path() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("target"),
            PathBuf::from,
        )
        .join("bench-results")
        .join("relay_load.json")
}

/// The idle-connection check holds over a thousand sockets here and in the
/// relay, which inherits the limit.
fn raise_fd_limit(wanted: u64) -> anyhow::Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: both calls only access the struct passed to them.
    unsafe {
        ensure!(
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0,
            "getrlimit failed"
        );
        if limit.rlim_cur >= wanted {
            return Ok(());
        }
        limit.rlim_cur = wanted.min(limit.rlim_max);
        ensure!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0,
            "setrlimit failed"
        );
    }
    ensure!(
        limit.rlim_cur >= wanted,
        "the open-files limit is {}, the bench needs {wanted}: raise the hard limit (ulimit -Hn)",
        limit.rlim_cur
    );
    Ok(())
}
