//! What operator commands print: stdout that ends quietly when its reader
//! goes away, aligned tables, and times as operators read them. A leaf, so
//! every command (`cli`, `oauth login`/`status`, the status page) can use it.

use std::io::Write;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context;

/// `println!` for command output, but a reader that went away
/// (`sendbridge queue list | head`) is an error, [`StdoutClosed`], where
/// `println!` would panic.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::terminal::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` as [`outln!`] is `println!`.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::terminal::write_stdout(format_args!($($arg)*))
    };
}

/// Nobody reads the command's output any more: it may end quietly.
#[derive(Debug, thiserror::Error)]
#[error("stdout was closed")]
pub struct StdoutClosed;

/// Writes to stdout at once; a closed pipe becomes [`StdoutClosed`].
pub fn write_stdout(text: std::fmt::Arguments) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_fmt(text).and_then(|()| stdout.flush()) {
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        written => written.context("writing to stdout"),
    }
}

/// Aligned columns under a header; a row's note goes on an indented line
/// beneath it.
pub fn table<S: AsRef<str>, const N: usize>(
    header: [&str; N],
    rows: &[([S; N], Option<String>)],
) -> String {
    let mut widths = header.map(|title| title.chars().count());
    for (cells, _) in rows {
        for (width, cell) in widths.iter_mut().zip(cells) {
            *width = (*width).max(cell.as_ref().chars().count());
        }
    }
    let line = |cells: [&str; N]| {
        let padded: Vec<_> = cells
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut table = line(header);
    for (cells, note) in rows {
        table += &line(cells.each_ref().map(AsRef::as_ref));
        if let Some(note) = note {
            table += &format!("    {note}\n");
        }
    }
    table
}

/// `2026-11-23T10:00:00Z`, from unix milliseconds.
pub fn format_time(unix_millis: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(unix_millis)).to_string()
}
