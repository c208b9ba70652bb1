//! Signals a running relay answers: SIGTERM/SIGINT shut it down gracefully,
//! SIGHUP reloads its configuration. `sendbridge reload` finds the relay
//! through a pid file in the spool directory and sends it SIGHUP.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::config::Config;
use crate::private_files;
use crate::server::Reloader;

const PID_FILE: &str = "sendbridge.pid";

/// Large buffers (messages being received or delivered) go back to the
/// system when freed. glibc raises its mmap threshold after the first such
/// free and then keeps later large blocks in the heap, so RSS stayed at the
/// peak of a burst of big messages (8 × 24 MiB left 267 MiB behind). A
/// fixed threshold keeps every block over it mmap'd and returned at free.
pub fn return_large_buffers_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called at start-up.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

/// Cancels `stop` on SIGTERM or SIGINT; reloads `path` on SIGHUP. An invalid
/// configuration is refused and the running one stays.
pub async fn handle_signals(stop: CancellationToken, reloader: Reloader, path: Option<PathBuf>) {
    let (Ok(mut terminate), Ok(mut hangup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        error!("cannot install signal handlers; stop the relay with SIGKILL");
        return;
    };
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = hangup.recv() => reload(&reloader, path.as_deref()).await,
        }
    }
    info!(
        "shutting down: no new connections; open sessions may finish within server.shutdown_grace"
    );
    stop.cancel();
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
    println!(
        "asked the relay (pid {pid}) to reload its configuration; its log says whether it did"
    );
    Ok(())
}
