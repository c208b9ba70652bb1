//! The relay as a child process, configured by environment variables only,
//! the way a container runs it.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

const STARTUP: Duration = Duration::from_secs(30);

pub struct RelayProcess {
    pub addr: SocketAddr,
    /// The admin interface, unless the environment turned it off.
    pub admin: Option<SocketAddr>,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    /// Counts log lines, to wait for one.
    logged: tokio::sync::watch::Receiver<usize>,
    log_done: Option<tokio::task::JoinHandle<()>>,
}

/// A `sendbridge` command in `dir` (so the default config path and the
/// generated certificate stay inside it), with no inherited `SENDBRIDGE_*`.
pub fn sendbridge(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sendbridge"));
    command.args(args).current_dir(dir).kill_on_drop(true);
    for (key, _) in std::env::vars() {
        if key.starts_with("SENDBRIDGE_") {
            command.env_remove(key);
        }
    }
    command.envs(env.iter().copied());
    command
}

impl RelayProcess {
    /// Starts `sendbridge run` listening on a free loopback port and waits
    /// for its "accepting connections" line.
    pub async fn start(dir: &Path, env: &[(&str, &str)]) -> RelayProcess {
        Self::spawn(sendbridge(dir, &["run"], env)).await
    }

    /// Like `start`, but the relay may write files of at most `kib` KiB
    /// (RLIMIT_FSIZE), as on a nearly full disk. SIGXFSZ is ignored so writes
    /// fail with EFBIG instead of killing the process.
    pub async fn start_with_file_size_limit(
        dir: &Path,
        env: &[(&str, &str)],
        kib: u64,
    ) -> RelayProcess {
        Self::start_after(dir, env, &format!("ulimit -f {kib}; trap '' XFSZ")).await
    }

    /// Like `start`, but a shell runs `setup` (e.g. `umask 000`) first, so
    /// it applies to the relay only.
    pub async fn start_after(dir: &Path, env: &[(&str, &str)], setup: &str) -> RelayProcess {
        let script = format!("{setup}; exec \"$0\" run");
        let command = sendbridge(dir, &[], env);
        let program = command.as_std().get_program().to_owned();
        let mut wrapped = Command::new("bash");
        wrapped
            .arg("-c")
            .arg(script)
            .arg(program)
            .current_dir(dir)
            .kill_on_drop(true);
        for (key, value) in command.as_std().get_envs() {
            match value {
                Some(value) => wrapped.env(key, value),
                None => wrapped.env_remove(key),
            };
        }
        Self::spawn(wrapped).await
    }

    /// Like `start`, but with these open-file limits (RLIMIT_NOFILE), as
    /// `ulimit -Sn SOFT -Hn HARD` would set.
    pub async fn start_with_descriptor_limits(
        dir: &Path,
        env: &[(&str, &str)],
        soft: u64,
        hard: u64,
    ) -> RelayProcess {
        let mut command = sendbridge(dir, &["run"], env);
        // SAFETY: between fork and exec only setrlimit(2) runs, which is
        // async-signal-safe and allocates nothing.
        unsafe {
            command.pre_exec(move || {
                let rlimit = libc::rlimit {
                    rlim_cur: soft,
                    rlim_max: hard,
                };
                match libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) {
                    0 => Ok(()),
                    _ => Err(std::io::Error::last_os_error()),
                }
            });
        }
        Self::spawn(command).await
    }

    async fn spawn(mut command: Command) -> RelayProcess {
        // Tests that stop the relay with a client still connected need not
        // wait the default 10 s grace; the admin interface on a free port
        // ("" turns it off). A test may set its own.
        default_env(&mut command, "SENDBRIDGE_SERVER__SHUTDOWN_GRACE", "1s");
        default_env(&mut command, "SENDBRIDGE_ADMIN__LISTEN", "127.0.0.1:0");
        command
            .env("SENDBRIDGE_SERVER__LISTEN", "127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("sendbridge starts");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (listening_tx, mut listening_rx) = mpsc::channel(1);
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let sink = log.clone();
        let (count, logged) = tokio::sync::watch::channel(0);
        let log_done = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(addresses) = listen_addresses(&line) {
                    let _ = listening_tx.try_send(addresses);
                }
                let mut log = sink.lock().unwrap();
                log.push(line);
                count.send_replace(log.len());
            }
        });
        let (addr, admin) = tokio::time::timeout(STARTUP, listening_rx.recv())
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("relay did not start; log: {:#?}", log.lock().unwrap()));
        RelayProcess {
            addr,
            admin,
            child,
            log,
            logged,
            log_done: Some(log_done),
        }
    }

    /// Sends SIGTERM and returns the exit code once the relay stopped.
    pub async fn terminate(mut self) -> (Option<i32>, Vec<String>) {
        let pid = self.child.id().expect("running").to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap();
        assert!(status.success());
        let exit = tokio::time::timeout(STARTUP, self.child.wait())
            .await
            .expect("relay stops after SIGTERM")
            .unwrap();
        (exit.code(), self.finish_log().await)
    }

    /// Kills the relay with SIGKILL, as a crash or power loss would.
    pub async fn kill(mut self) -> Vec<String> {
        self.child.kill().await.expect("kill the relay");
        self.finish_log().await
    }

    /// The relay's process id, e.g. to read its memory use from /proc.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// CPU time the relay used so far, user and system (/proc/PID/stat).
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // The fields after the command name, which may hold spaces, in
        // parentheses: utime and stime are the 12th and 13th of them.
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // SAFETY: sysconf reads a constant of the system.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        Duration::from_millis(ticks * 1000 / per_second)
    }

    /// Waits until a log line contains `needle`, and returns it.
    pub async fn wait_for_line(&self, needle: &str) -> String {
        let mut logged = self.logged.clone();
        let found = tokio::time::timeout(STARTUP, async {
            loop {
                if let Some(line) = self.log().into_iter().find(|l| l.contains(needle)) {
                    return line;
                }
                if logged.changed().await.is_err() {
                    panic!("the relay exited before logging {needle:?}");
                }
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("no log line with {needle:?}: {:#?}", self.log()))
    }

    /// Everything logged so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    async fn finish_log(&mut self) -> Vec<String> {
        if let Some(done) = self.log_done.take() {
            let _ = tokio::time::timeout(STARTUP, done).await;
        }
        self.log()
    }
}

/// Sets `key` unless the command already has it.
fn default_env(command: &mut Command, key: &str, value: &str) {
    if !command.as_std().get_envs().any(|(set, _)| set == key) {
        command.env(key, value);
    }
}

/// The SMTP and admin addresses from `... sendbridge is accepting
/// connections listen=127.0.0.1:PORT ... admin=127.0.0.1:PORT` (or
/// `admin=off`), or from its JSON form (`SENDBRIDGE_LOG__FORMAT=json`).
fn listen_addresses(line: &str) -> Option<(SocketAddr, Option<SocketAddr>)> {
    if !line.contains("accepting connections") {
        return None;
    }
    if let Ok(json) = serde_json::from_str::<serde_json::Value>(line) {
        let field = |name: &str| json[name].as_str().map(str::to_owned);
        return Some((field("listen")?.parse().ok()?, field("admin")?.parse().ok()));
    }
    let field = |name: &str| {
        let start = line.find(&format!(" {name}="))? + name.len() + 2;
        line[start..].split_whitespace().next()
    };
    Some((field("listen")?.parse().ok()?, field("admin")?.parse().ok()))
}
