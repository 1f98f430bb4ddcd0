//! Running host tools: streaming their output as log lines, or piping bytes
//! through them.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use super::ImageError;

/// Lines of a failed tool's output quoted in its error.
const TAIL_LINES: usize = 12;

/// How often a running tool's log is checked for new lines.
const POLL: Duration = Duration::from_millis(50);

fn status_text(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}

fn tail_text(lines: &VecDeque<String>) -> String {
    if lines.is_empty() {
        return String::new();
    }
    let mut s = String::from(":");
    for l in lines {
        s.push_str("\n    ");
        s.push_str(l);
    }
    s
}

/// mmdebstrap `--mode` for this user.
pub(crate) fn mmdebstrap_mode() -> &'static str {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        "root"
    } else {
        "unshare"
    }
}

/// Splits complete lines off the front of `buf`, cleaned for display
/// (apt redraws progress with `\r`: keep the last state).
fn drain_lines(buf: &mut Vec<u8>, all: bool, mut emit: impl FnMut(String)) {
    let mut start = 0;
    while let Some(pos) = buf[start..].iter().position(|&b| b == b'\n') {
        let text = String::from_utf8_lossy(&buf[start..start + pos]);
        let line = text.trim_end().rsplit('\r').next().unwrap_or("").trim_end();
        if !line.is_empty() {
            emit(line.to_string());
        }
        start += pos + 1;
    }
    buf.drain(..start);
    if all && !buf.is_empty() {
        buf.push(b'\n');
        drain_lines(buf, false, emit);
    }
}

/// Runs `cmd` with stdout and stderr going to the file `log`, handing each
/// line to `on_line` as it appears. A failure carries the last lines.
///
/// Output goes through a file rather than pipes so that a tool outliving
/// us (we were killed) never dies of SIGPIPE halfway: mmdebstrap would
/// leave its /proc and /sys mounts behind. It gets SIGTERM instead and
/// cleans up.
pub(crate) fn run_streaming(
    cmd: &mut Command,
    tool: &str,
    log: &Path,
    on_line: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    tracing::debug!(?cmd, log = %log.display(), "running");
    let log_err = || ImageError::io(format!("cannot write {}", log.display()));
    let out = File::create(log).map_err(log_err())?;
    let err = out.try_clone().map_err(log_err())?;
    let mut reader = File::open(log).map_err(log_err())?;
    // SAFETY: the closure runs in the forked child before exec and only
    // calls prctl, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(ImageError::io(format!("cannot run `{tool}`")))?;
    let mut tail = VecDeque::with_capacity(TAIL_LINES);
    let mut pending = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let status = loop {
        let exited = child
            .try_wait()
            .map_err(ImageError::io(format!("cannot wait for `{tool}`")))?;
        let mut got = false;
        loop {
            match reader.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    pending.extend_from_slice(&chunk[..n]);
                    got = true;
                }
            }
        }
        drain_lines(&mut pending, exited.is_some(), |line| {
            on_line(&line);
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        });
        if let Some(status) = exited {
            break status;
        }
        if !got {
            std::thread::sleep(POLL);
        }
    };
    if status.success() {
        Ok(())
    } else {
        Err(ImageError::Command {
            tool: tool.to_string(),
            status: status_text(status),
            tail: tail_text(&tail),
        })
    }
}

/// Pipes `input` through `cmd` and returns what it wrote to stdout.
/// `ok_codes` lists the exit codes that count as success.
pub(crate) fn filter(
    cmd: &mut Command,
    tool: &str,
    input: &[u8],
    ok_codes: &[i32],
) -> Result<Vec<u8>, ImageError> {
    tracing::debug!(?cmd, "running");
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(ImageError::io(format!("cannot run `{tool}`")))?;
    let output = std::thread::scope(|s| {
        let stdin = child.stdin.take();
        // Feed stdin from a second thread so a full stdout pipe cannot
        // deadlock us. A write error shows up as the tool's failure.
        let writer = s.spawn(move || {
            if let Some(mut stdin) = stdin {
                let _ = stdin.write_all(input);
            }
        });
        let out = child.wait_with_output();
        let _ = writer.join();
        out
    })
    .map_err(ImageError::io(format!("cannot run `{tool}`")))?;
    let ok = output
        .status
        .code()
        .is_some_and(|c| c == 0 || ok_codes.contains(&c));
    if ok {
        return Ok(output.stdout);
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: VecDeque<String> = stderr
        .lines()
        .rev()
        .take(TAIL_LINES)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .map(str::to_string)
        .collect();
    Err(ImageError::Command {
        tool: tool.to_string(),
        status: status_text(output.status),
        tail: tail_text(&lines),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_lines_from_stdout_and_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = Vec::new();
        run_streaming(
            Command::new("sh").args([
                "-c",
                "echo out1; echo err1 >&2; sleep 0.1; printf 'a\\rb\\n'; printf 'last'",
            ]),
            "sh",
            &dir.path().join("log"),
            &mut |l| lines.push(l.to_string()),
        )
        .unwrap();
        assert_eq!(lines, ["out1", "err1", "b", "last"]);
    }

    #[test]
    fn failure_quotes_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let err = run_streaming(
            Command::new("sh").args(["-c", "echo first; echo boom >&2; exit 3"]),
            "sh",
            &dir.path().join("log"),
            &mut |_| {},
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("`sh` failed (exit status 3):"), "{msg}");
        assert!(msg.contains("boom"), "{msg}");
    }

    #[test]
    fn filters_bytes() {
        let big = vec![b'x'; 1 << 20];
        let out = filter(&mut Command::new("cat"), "cat", &big, &[]).unwrap();
        assert_eq!(out.len(), big.len());
        let err = filter(Command::new("sh").args(["-c", "exit 2"]), "sh", b"", &[]).unwrap_err();
        assert!(err.to_string().contains("exit status 2"));
        filter(Command::new("sh").args(["-c", "exit 2"]), "sh", b"", &[2]).unwrap();
    }
}
