//! A `sendbridge` command a person answers: its output read line by line,
//! its stdin written to. Everything it prints is checked for secrets (the
//! token endpoint's all contain "SECRET").

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use super::process::sendbridge;

const LIMIT: Duration = Duration::from_secs(30);

/// A running `sendbridge oauth ...`, its stdout read line by line.
pub struct Cli {
    child: Child,
    pub stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    output: String,
}

impl Cli {
    pub fn start(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Cli {
        let mut child = sendbridge(dir, args, env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Cli {
            stdin: child.stdin.take().unwrap(),
            stdout: BufReader::new(child.stdout.take().unwrap()).lines(),
            child,
            output: String::new(),
        }
    }

    /// The first line (trimmed) that starts with `prefix`.
    pub async fn line_starting(&mut self, prefix: &str) -> String {
        let read = async {
            while let Some(line) = self.stdout.next_line().await.unwrap() {
                self.output.push_str(&line);
                self.output.push('\n');
                if line.trim().starts_with(prefix) {
                    return Some(line.trim().to_string());
                }
            }
            None
        };
        match tokio::time::timeout(LIMIT, read).await {
            Ok(Some(line)) => line,
            _ => panic!("no line starting with {prefix}:\n{}", self.output),
        }
    }

    /// Exit status and everything printed (stdout and stderr).
    pub async fn finish(mut self) -> (ExitStatus, String) {
        drop(self.stdin);
        let mut output = self.output;
        let wait = async {
            while let Some(line) = self.stdout.next_line().await.unwrap() {
                output.push_str(&line);
                output.push('\n');
            }
            let mut stderr = String::new();
            let mut pipe = self.child.stderr.take().unwrap();
            pipe.read_to_string(&mut stderr).await.unwrap();
            output.push_str(&stderr);
            self.child.wait().await.unwrap()
        };
        let status = tokio::time::timeout(LIMIT, wait).await.unwrap();
        assert!(
            !output.contains("SECRET"),
            "a secret was printed:\n{output}"
        );
        (status, output)
    }
}

/// The query parameters of a URL.
pub fn query(url: &str) -> BTreeMap<String, String> {
    let query = url.split_once('?').unwrap().1;
    form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}
