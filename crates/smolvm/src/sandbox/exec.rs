//! Running commands: options and collected results.

use std::time::Duration;

/// Most output `exec` collects per stream; past it the rest is dropped and
/// `truncated` is set (a hostile or runaway guest cannot exhaust the host).
pub const MAX_COLLECTED_OUTPUT: usize = 256 * 1024 * 1024;

#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
    pub timeout: Option<Duration>,
    /// Bytes written to the command's stdin, then closed.
    pub stdin: Option<Vec<u8>>,
}

/// A finished command.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecOutput {
    /// Exit code when the command exited normally.
    pub exit_code: Option<i32>,
    /// Signal number when it was killed by a signal.
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// True when output past `MAX_COLLECTED_OUTPUT` was dropped.
    pub truncated: bool,
    pub duration_ms: u64,
}

impl ExecOutput {
    pub fn ok(&self) -> bool {
        self.exit_code == Some(0)
    }

    /// The exit status a shell would report: the code, or 128 + signal.
    pub fn shell_status(&self) -> i32 {
        match (self.exit_code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            _ => 255,
        }
    }
}
