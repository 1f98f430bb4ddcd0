//! Running host tools: streaming their output as log lines, or piping bytes
//! through them.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;

use super::ImageError;

/// Lines of a failed tool's output quoted in its error.
const TAIL_LINES: usize = 12;

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

/// Runs `cmd`, handing each line it prints on stdout or stderr to `on_line`
/// as it arrives. A failure carries the last lines printed.
pub(crate) fn run_streaming(
    cmd: &mut Command,
    tool: &str,
    on_line: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    tracing::debug!(?cmd, "running");
    // SAFETY: the closure runs in the forked child before exec and only
    // calls prctl, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            // If we die (say, Ctrl-C or kill -9 of the CLI), the tool gets
            // SIGTERM instead of running on; mmdebstrap cleans up on it.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(ImageError::io(format!("cannot run `{tool}`")))?;
    let (tx, rx) = mpsc::channel::<String>();
    let mut readers = Vec::new();
    let pipes: [Option<Box<dyn Read + Send>>; 2] = [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    ];
    for pipe in pipes.into_iter().flatten() {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&buf);
                        // apt redraws progress with '\r': keep the last state.
                        let line = text.trim_end().rsplit('\r').next().unwrap_or("").trim_end();
                        if !line.is_empty() && tx.send(line.to_string()).is_err() {
                            break;
                        }
                    }
                }
            }
        }));
    }
    drop(tx);
    let mut tail = VecDeque::with_capacity(TAIL_LINES);
    for line in rx {
        on_line(&line);
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    for r in readers {
        let _ = r.join();
    }
    let status = child
        .wait()
        .map_err(ImageError::io(format!("cannot wait for `{tool}`")))?;
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
    fn streams_lines_from_both_pipes() {
        let mut lines = Vec::new();
        run_streaming(
            Command::new("sh").args(["-c", "echo out1; echo err1 >&2; printf 'a\\rb\\n'"]),
            "sh",
            &mut |l| lines.push(l.to_string()),
        )
        .unwrap();
        lines.sort();
        assert_eq!(lines, ["b", "err1", "out1"]);
    }

    #[test]
    fn failure_quotes_the_tail() {
        let err = run_streaming(
            Command::new("sh").args(["-c", "echo first; echo boom >&2; exit 3"]),
            "sh",
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
