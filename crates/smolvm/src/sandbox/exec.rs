//! Running commands: options and collected results.

use super::transitions::{plan, Op};
use super::Command;
use super::Sandbox;
use crate::error::{Error, Result};
use crate::state::VmState;
use crate::supervisor::{ExecEvent, ExecStream, SupervisorClient};
use smolvm_proto::ExecRequest;
use std::time::{Duration, Instant};

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
    /// Gives the command a stdin pipe that the caller writes through
    /// [`ExecStream::stdin`] (ignored when `stdin` is given).
    pub open_stdin: bool,
    /// Runs the command on a pseudo-terminal of (rows, cols): its
    /// controlling terminal, with stdin, stdout and stderr on it (so all
    /// its output comes as stdout). Resize with [`ExecStream::resize`].
    pub pty: Option<(u16, u16)>,
    /// Most bytes [`Sandbox::exec`] collects per stream (at most, and by
    /// default, [`MAX_COLLECTED_OUTPUT`]); past it output is dropped and
    /// `truncated` set. The guest keeps running either way.
    pub max_output: Option<usize>,
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
            // A status, as a shell has it: 0-255 (the signal is the guest's).
            (None, Some(s)) => s.saturating_add(128).clamp(0, 255),
            _ => 255,
        }
    }
}

impl Sandbox {
    pub(super) async fn require_running(&self) -> Result<SupervisorClient> {
        Ok(self.require_running_rec().await?.0)
    }

    /// A connection to the running VM, and its record as of now.
    pub(super) async fn require_running_rec(
        &self,
    ) -> Result<(SupervisorClient, crate::state::VmRecord)> {
        let rec = self.record().await?;
        plan(Op::Exec, &self.id, rec.state, rec.last_error.as_deref())?;
        Ok((self.connect().await?, rec))
    }

    /// The wire request for `command` with `opts` (the VM's persistent
    /// environment as stored now, then the command's own variables).
    pub(super) fn exec_request(
        &self,
        command: Command,
        opts: &ExecOptions,
        rec: &crate::state::VmRecord,
    ) -> Result<ExecRequest> {
        let vm_env = super::record::config_of(rec)?.env;
        let mut env: Vec<(String, String)> = vm_env
            .iter()
            .filter(|(k, _)| !opts.env.iter().any(|(ck, _)| ck == *k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        env.extend(opts.env.iter().cloned());
        let req = ExecRequest {
            command: command.into(),
            env,
            workdir: opts.workdir.clone(),
            timeout_ms: opts.timeout.map(crate::sys::millis),
            stdin: opts.stdin.is_some() || opts.open_stdin || opts.pty.is_some(),
            pty: opts
                .pty
                .map(|(rows, cols)| smolvm_proto::PtySize { rows, cols }),
        };
        Ok(req)
    }

    /// Starts a command and returns its event stream (output as it comes).
    pub async fn exec_stream(&self, command: Command, opts: &ExecOptions) -> Result<ExecStream> {
        let (client, rec) = self.require_running_rec().await?;
        let req = self.exec_request(command, opts, &rec)?;
        let mut stream = match client.exec(req).await {
            Ok(s) => s,
            Err(source) => {
                self.forget_client();
                return Err(Error::Client {
                    id: self.id.clone(),
                    source,
                });
            }
        };
        let host_deadline = opts
            .timeout
            .map(|t| t.saturating_add(crate::supervisor::GUEST_GRACE));
        if let Some(d) = host_deadline {
            stream.set_host_deadline(d);
        }
        if let Some(data) = opts.stdin.clone() {
            // Written alongside the reading: a command that echoes its input
            // (`cat`) needs its output drained to go on taking input. The
            // writer ends with the stream (its credit is closed then).
            let w = stream.stdin();
            tokio::spawn(async move {
                if w.write(&data).await.is_ok() {
                    let _ = w.close().await;
                }
            });
        }
        Ok(stream)
    }

    /// Runs a command to completion and collects its output.
    pub async fn exec(&self, command: Command, opts: &ExecOptions) -> Result<ExecOutput> {
        let mut stream = self.exec_stream(command, opts).await?;
        let cap = opts
            .max_output
            .map_or(MAX_COLLECTED_OUTPUT, |m| m.min(MAX_COLLECTED_OUTPUT));
        let mut out = ExecOutput::default();
        loop {
            let ev = match stream.next().await {
                Ok(ev) => ev,
                Err(crate::supervisor::ClientError::GuestTimeout(after)) => {
                    return Err(self.guest_unresponsive(after).await)
                }
                Err(source) => {
                    return Err(Error::Client {
                        id: self.id.clone(),
                        source,
                    })
                }
            };
            match ev {
                None => {
                    return Err(Error::AgentUnavailable {
                        id: self.id.clone(),
                        message: "the command stream ended early".into(),
                    })
                }
                Some(ExecEvent::Started { .. } | ExecEvent::Attached { .. }) => {}
                Some(ExecEvent::Stdout(b)) => append(&mut out.stdout, &b, cap, &mut out.truncated),
                Some(ExecEvent::Stderr(b)) => append(&mut out.stderr, &b, cap, &mut out.truncated),
                Some(ExecEvent::Exited(st)) => {
                    out.exit_code = st.code;
                    out.signal = st.signal;
                    out.timed_out = st.timed_out;
                    out.duration_ms = st.duration_ms;
                    return Ok(out);
                }
                Some(ExecEvent::Failed(e)) => {
                    return Err(match e.kind {
                        crate::error::ErrorKind::AgentUnavailable => Error::AgentUnavailable {
                            id: self.id.clone(),
                            message: e.message,
                        },
                        kind => Error::Exec {
                            id: self.id.clone(),
                            kind,
                            message: e.message,
                        },
                    })
                }
            }
        }
    }

    /// A command's host deadline passed: the VM is marked as needing
    /// attention (its `last_error` says so; it stays `running`, since its
    /// VMM lives) and the error says what to do.
    pub async fn guest_unresponsive(&self, after: Duration) -> Error {
        let note = format!(
            "the guest stopped answering: a command was still running {:.1}s after it started, past its timeout",
            after.as_secs_f64()
        );
        let id = self.id.clone();
        let _ = tokio::task::spawn_blocking(move || {
            super::record::store().and_then(|s| {
                s.transition(&id, &[VmState::Running], VmState::Running, Some(&note))
                    .map_err(Error::from)
            })
        })
        .await;
        Error::Timeout {
            id: self.id.clone(),
            what: "its command did not end".into(),
            after,
            hint: format!(
                "the guest is not answering (hung, or its VMM is stopped); `smolvm stop {0}` ends it (or `smolvm rm -f {0}`)",
                self.id
            ),
        }
    }

    /// Shell convenience: `/bin/sh -c <cmd>`.
    pub async fn run(&self, cmd: &str) -> Result<ExecOutput> {
        self.exec(Command::Shell(cmd.to_string()), &ExecOptions::default())
            .await
    }

    /// Waits until the guest agent answers, at most `timeout`: for a VM
    /// that is running, or that another process is starting right now (it
    /// holds the VM's lock). A VM that is not running and that nobody is
    /// starting is an `InvalidState` error at once, naming the fix.
    pub async fn wait_until_ready(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let left = timeout.saturating_sub(start.elapsed());
            let rec = self.record().await?;
            let booting = matches!(rec.state, VmState::Created | VmState::Stopped)
                && super::lock::VmLock::is_held(&self.id);
            if rec.state == VmState::Running {
                let try_for = left.min(Duration::from_secs(1));
                match tokio::time::timeout(try_for, self.ping()).await {
                    Ok(Ok(_)) => return Ok(()),
                    // Not there yet, or the connection just went away.
                    Ok(Err(e)) if matches!(e.kind(), crate::ErrorKind::AgentUnavailable) => {}
                    Ok(Err(e)) if matches!(e.kind(), crate::ErrorKind::InvalidState) => {}
                    Ok(Err(e)) => return Err(e),
                    Err(_) => {}
                }
            } else if !booting {
                plan(Op::Exec, &self.id, rec.state, rec.last_error.as_deref())?;
            }
            if start.elapsed() >= timeout {
                return Err(Error::Timeout {
                    id: self.id.clone(),
                    what: "its guest agent did not become ready".into(),
                    after: timeout,
                    hint: format!("`smolvm logs {}` shows its console", self.id),
                });
            }
            tokio::time::sleep(Duration::from_millis(50).min(left)).await;
        }
    }

    /// Agent round trip.
    pub async fn ping(&self) -> Result<Duration> {
        let client = self.require_running().await?;
        let t = Instant::now();
        client
            .ping(crate::state::now_ms().cast_unsigned() ^ 0x5eed)
            .await
            .map_err(|source| {
                self.forget_client();
                Error::Client {
                    id: self.id.clone(),
                    source,
                }
            })?;
        Ok(t.elapsed())
    }
}

fn append(buf: &mut Vec<u8>, data: &[u8], cap: usize, truncated: &mut bool) {
    let room = cap.saturating_sub(buf.len());
    if data.len() > room {
        *truncated = true;
    }
    buf.extend_from_slice(&data[..data.len().min(room)]);
}
