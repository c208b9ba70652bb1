//! The relay as a Unix process. Signals it answers: SIGTERM/SIGINT shut it
//! down gracefully, SIGHUP reloads its configuration. `sendbridge reload`
//! finds the relay through a pid file in the spool directory and sends it
//! SIGHUP. At start, the relay takes as many file descriptors as it may and
//! tunes the allocator.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::Reloader;
use crate::config::Config;
use crate::outln;
use crate::private_files;

const PID_FILE: &str = "sendbridge.pid";
/// Descriptors besides one per client and upstream connection: listeners,
/// the runtime, the log, admin clients, spool files being written.
const DESCRIPTOR_MARGIN: u64 = 64;

/// Raises the soft open-file limit to the hard one (services often start
/// with 1024) and warns when even that is short of what the configured
/// connections need: out of descriptors, the relay cannot accept.
pub fn raise_descriptor_limit(config: &Config) {
    let needed = descriptors_needed(config);
    match raise_soft_nofile() {
        Ok(limit) if limit < needed => warn!(
            limit,
            needed,
            max_connections = config.server.max_connections,
            "the open-file limit is below what server.max_connections and the accounts' max_connections need: lower server.max_connections, or raise the limit (ulimit -n, systemd LimitNOFILE=, docker run --ulimit nofile=)"
        ),
        Ok(_) => {}
        Err(err) => warn!(error = %err, "cannot raise the open-file limit (RLIMIT_NOFILE)"),
    }
}

/// One descriptor per client connection and per upstream connection, and
/// the margin.
fn descriptors_needed(config: &Config) -> u64 {
    let upstream: usize = config.accounts.values().map(|a| a.max_connections).sum();
    (config.server.max_connections + upstream) as u64 + DESCRIPTOR_MARGIN
}

/// Sets the soft RLIMIT_NOFILE to the hard one; the soft limit now.
fn raise_soft_nofile() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write only the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(io::Error::last_os_error());
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                ..limit
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                return Err(io::Error::last_os_error());
            }
            limit = raised;
        }
    }
    Ok(limit.rlim_cur)
}

/// Large buffers (messages being received or delivered) go back to the
/// system when freed. glibc raises its mmap threshold after the first such
/// free and then keeps later large blocks in the heap, so RSS stayed at the
/// peak of a burst of big messages (8 × 24 MiB left 267 MiB behind). A
/// fixed threshold keeps every block over it mmap'd and returned at free.
/// Fresh pages cost page faults on every use, so it is not lower than
/// needed: at 256 KiB a 1 MiB message cost 0.9 ms more CPU (relay_load);
/// at 4 MiB the common small messages reuse the heap.
pub fn return_large_buffers_to_the_system() {
    const THRESHOLD: i32 = 4 * 1024 * 1024;
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called at start-up.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD);
    }
}

/// How often freed heap memory is handed back to the system.
const TRIM_INTERVAL: Duration = Duration::from_secs(5);

/// Hands freed heap memory back to the system every few seconds until
/// `stop`. Blocks under the mmap threshold that are freed in the middle of
/// glibc's heaps stay resident otherwise (8 parallel 6 MiB messages left
/// 17 MiB behind); `malloc_trim` releases their pages, and costs next to
/// nothing when there is nothing to release.
pub async fn trim_freed_memory(stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TRIM_INTERVAL) => {}
            _ = stop.cancelled() => return,
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only returns free pages to the system.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// Cancels `stop` on SIGTERM or SIGINT; reloads `path` on SIGHUP. An invalid
/// configuration is refused and the running one stays.
///
/// The handlers are installed by this call, not when the returned future
/// first runs: the relay announces it is accepting connections right after,
/// and a SIGTERM before the spawned task got a thread would meet the
/// default action and kill the process without a clean stop.
pub fn handle_signals(
    stop: CancellationToken,
    reloader: Reloader,
    path: Option<PathBuf>,
) -> impl Future<Output = ()> {
    let installed = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    );
    async move {
        let (Ok(mut terminate), Ok(mut interrupt), Ok(mut hangup)) = installed else {
            error!("cannot install signal handlers; stop the relay with SIGKILL");
            return;
        };
        loop {
            tokio::select! {
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
                _ = hangup.recv() => reload(&reloader, path.as_deref()).await,
            }
        }
        info!(
            "shutting down: no new connections; open sessions may finish within server.shutdown_grace"
        );
        stop.cancel();
    }
}

async fn reload(reloader: &Reloader, path: Option<&Path>) {
    let result = match Config::load(path) {
        Ok(config) => reloader.reload(config).await,
        Err(err) => Err(err.into()),
    };
    match result {
        Ok(()) => info!("configuration reloaded"),
        Err(err) => error!(
            error = format!("{err:#}"),
            reason = "reload_refused",
            "configuration reload refused; the running configuration stays"
        ),
    }
}

/// `<spool.dir>/sendbridge.pid` while the relay runs.
pub struct PidFile(PathBuf);

impl PidFile {
    pub fn create(spool: &Path) -> anyhow::Result<PidFile> {
        let path = spool.join(PID_FILE);
        private_files::write(&path, format!("{}\n", std::process::id()).as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(PidFile(path))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// `sendbridge reload`: SIGHUP to the relay running on this spool.
pub fn signal_reload(config: &Config) -> anyhow::Result<()> {
    let path = config.spool.dir.join(PID_FILE);
    let pid: libc::pid_t = fs::read_to_string(&path)
        .with_context(|| format!("no running relay found ({} is missing)", path.display()))?
        .trim()
        .parse()
        .with_context(|| format!("{} does not hold a process id", path.display()))?;
    // SAFETY: kill(2) with a plain pid and signal number has no memory effects.
    if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
        let err = io::Error::last_os_error();
        anyhow::bail!(
            "cannot signal the relay (pid {pid} from {}): {err}",
            path.display()
        );
    }
    outln!("asked the relay (pid {pid}) to reload its configuration; its log says whether it did")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_needed_count_client_and_upstream_connections() {
        let accounts = r#"
            [accounts.gmail]
            username = "me@gmail.com"
            password = "abcdabcdabcdabcd"
            max_connections = 3
            [accounts.m365]
            username = "me@example.com"
            password = "abcdabcdabcdabcd"
        "#;
        let cases = [
            ("", 1000 + 64),
            ("[server]\nmax_connections = 100", 100 + 64),
            (accounts, 1000 + 3 + 4 + 64),
        ];
        for (toml, needed) in cases {
            let config = Config::from_toml(toml).unwrap();
            assert_eq!(descriptors_needed(&config), needed, "{toml}");
        }
    }
}
