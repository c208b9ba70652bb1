//! Third-party programs tests drive (SMTP clients, a browser).

/// Whether `tool` is on PATH. A missing tool skips the test (false) on a
/// developer machine, but fails it under CI, which must install it.
pub fn tool_available(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()) {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{tool} not installed: .ci/run must apt-get install {tool}"
    );
    eprintln!("skipped: {tool} is not installed");
    false
}
