//! Hardening tests against real VMs (TCG here), as an attacker sees them:
//!
//! - the guest network reaches other machines but never the host's
//!   loopback, through no address and not with a crafted raw packet. It runs
//!   in two network namespaces of the test's own ("host" and "outside",
//!   198.51.100.0/24 on a veth pair): no packet of it leaves this machine;
//! - everything smolvm creates is private (no group/other bits), another
//!   uid can neither read a VM's memory nor talk to its supervisor, and the
//!   supervisor refuses another uid's connection even on a loosened socket;
//! - QEMU runs under seccomp with no_new_privs, passt and pasta with
//!   no_new_privs, passt in a network namespace of its own;
//! - `smolvm logs` shows guest escape sequences escaped (`--raw` as sent);
//! - a frozen VMM (SIGSTOP) gets host deadlines: a timed exec and a pause
//!   are timeouts that say what to run, the VM is marked, a stop stops it,
//!   and once continued the VMM answers again;
//! - each kind of failure comes out of the library as its own kind.
//!
//! Runs as root (namespaces, `setpriv` to uid 65534). Uses the CLI next to
//! the test binary (`scripts/build.sh dev`; or `SMOLVM_CLI_BIN`).

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use common::*;
use smolvm::{Command, ExecOptions, Sandbox, SandboxConfig};
use smolvm_proto::supervisor::{ClientMsg, SupervisorMsg, SUPERVISOR_PROTOCOL_VERSION};
use smolvm_proto::{encode_frame, Decoder, Frame};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

const BOOT: Duration = Duration::from_secs(120);
const CASE_LIMIT: Duration = Duration::from_secs(300);
const CMD_LIMIT: Duration = Duration::from_secs(240);
/// The system interpreter (another uid cannot use root's pyenv shims).
const PYTHON: &str = "/usr/bin/python3";
const NOBODY: u32 = 65534;

// ---------------------------------------------------------------- helpers

fn cli_bin() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("SMOLVM_CLI_BIN") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    // target/debug/deps/hardening-* -> target/debug/smolvm
    for d in exe.ancestors().skip(1).take(3) {
        let p = d.join("smolvm");
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(format!(
        "smolvm CLI not found near {}; build it with `scripts/build.sh dev` or set SMOLVM_CLI_BIN",
        exe.display()
    ))
}

struct Out {
    code: Option<i32>,
    stdout: Vec<u8>,
    stderr: String,
}

impl Out {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).to_string()
    }
}

async fn output(
    prog: impl AsRef<std::ffi::OsStr>,
    args: &[&str],
    limit: Duration,
) -> Result<Out, String> {
    let prog = prog.as_ref().to_owned();
    let what = format!("{} {}", prog.to_string_lossy(), args.join(" "));
    let what: String = what.chars().take(200).collect();
    let mut c = tokio::process::Command::new(&prog);
    c.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let o = match tokio::time::timeout(limit, c.output()).await {
        Err(_) => return Err(format!("`{what}` did not finish within {limit:?}")),
        Ok(r) => r.map_err(|e| format!("cannot run `{what}`: {e}"))?,
    };
    Ok(Out {
        code: o.status.code(),
        stdout: o.stdout,
        stderr: String::from_utf8_lossy(&o.stderr).to_string(),
    })
}

/// Runs a synchronous setup command that must succeed.
fn must(prog: &str, args: &[&str]) -> Result<(), String> {
    let o = std::process::Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {prog}: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "`{prog} {}` failed ({}): {}",
            args.join(" "),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok(())
}

async fn sh(vm: &Sandbox, s: &str) -> Result<smolvm::ExecOutput, String> {
    vm.exec(Command::Shell(s.to_string()), &ExecOptions::default())
        .await
        .map_err(|e| smolvm::error::chain(&e))
}

/// The VM's directory, from the documented layout (`DATA/vms/ID`).
fn vm_dir(vm: &Sandbox) -> PathBuf {
    data_dir().join("vms").join(vm.id())
}

fn data_dir() -> PathBuf {
    PathBuf::from(std::env::var_os("SMOLVM_DATA_DIR").expect("SMOLVM_DATA_DIR is set by main"))
}

/// A field of `/proc/PID/status` (`Seccomp`, `NoNewPrivs`, ...).
fn proc_status(pid: u32, key: &str) -> Result<String, String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    s.lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{key}:"))
                .map(|v| v.trim().to_string())
        })
        .ok_or_else(|| format!("/proc/{pid}/status has no {key}"))
}

fn ns_of(pid: u32, ns: &str) -> Result<PathBuf, String> {
    std::fs::read_link(format!("/proc/{pid}/ns/{ns}"))
        .map_err(|e| format!("/proc/{pid}/ns/{ns}: {e}"))
}

/// Restores the modes it changed when dropped (also when a check fails).
struct Modes(Vec<(PathBuf, u32)>);

impl Modes {
    fn set(&mut self, p: &Path, mode: u32) -> Result<(), String> {
        let old = std::fs::symlink_metadata(p)
            .map_err(|e| format!("{}: {e}", p.display()))?
            .permissions()
            .mode()
            & 0o7777;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("chmod {}: {e}", p.display()))?;
        self.0.push((p.to_path_buf(), old));
        Ok(())
    }
}

impl Drop for Modes {
    fn drop(&mut self) {
        for (p, m) in self.0.drain(..).rev() {
            let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m));
        }
    }
}

/// Probes run by `setpriv` as another uid (or as us, for the controls).
/// Each argument `KIND|PATH[|HEX|SECS]` prints `KIND PATH RESULT`.
const PROBE: &str = r#"
import errno, os, socket, sys, time
print("uid", os.getuid(), os.getgid(), os.getgroups(), flush=True)
def hello(path, hexdata, secs):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(path)
    try:
        s.sendall(bytes.fromhex(hexdata))
    except OSError as e:
        return "SENDERR-" + errno.errorcode.get(e.errno, str(e.errno)) + " 0.00s -"
    got = b""
    t = time.monotonic()
    s.settimeout(float(secs))
    end = "EOF"
    try:
        while True:
            b = s.recv(65536)
            if not b:
                break
            got += b
    except socket.timeout:
        end = "TIMEOUT"
    except OSError as e:
        end = "ERR-" + errno.errorcode.get(e.errno, str(e.errno))
    return "%s %.2fs %s" % (end, time.monotonic() - t, got.hex() or "-")
for arg in sys.argv[1:]:
    kind, path, *rest = arg.split("|")
    try:
        if kind == "read":
            with open(path, "rb") as f:
                f.read(1)
            r = "OK"
        elif kind == "write":
            with open(path, "r+b") as f:
                pass
            r = "OK"
        elif kind == "stat":
            os.stat(path)
            r = "OK"
        elif kind == "list":
            os.listdir(path)
            r = "OK"
        elif kind == "connect":
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(5)
            s.connect(path)
            s.close()
            r = "OK"
        elif kind == "hello":
            r = "CONNECTED " + hello(path, rest[0], rest[1])
        else:
            r = "BADKIND"
    except OSError as e:
        r = "ERR-" + errno.errorcode.get(e.errno, str(e.errno))
    print(kind, path, r, flush=True)
"#;

/// Runs [`PROBE`] with `ops`, as uid/gid 65534 when `nobody`. Returns
/// `"KIND PATH" -> RESULT`.
async fn probe(nobody: bool, ops: &[String]) -> Result<HashMap<String, String>, String> {
    let mut args: Vec<String> = Vec::new();
    let prog = if nobody {
        args.extend([
            format!("--reuid={NOBODY}"),
            format!("--regid={NOBODY}"),
            "--clear-groups".into(),
            PYTHON.into(),
        ]);
        "setpriv"
    } else {
        PYTHON
    };
    args.extend(["-I".to_string(), "-c".to_string(), PROBE.to_string()]);
    args.extend(ops.iter().cloned());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = output(prog, &argv, Duration::from_secs(60)).await?;
    let text = o.text();
    check!(
        o.code == Some(0),
        "probe exited {:?}: {}\n{}",
        o.code,
        o.stderr,
        text
    );
    let mut lines = text.lines();
    let first = lines.next().unwrap_or("");
    let want_uid = if nobody { NOBODY } else { 0 };
    check!(
        first.starts_with(&format!("uid {want_uid} {want_uid} []"))
            || (!nobody && first.starts_with("uid 0 0")),
        "probe ran as the wrong user: {first:?}"
    );
    let mut res = HashMap::new();
    for l in lines {
        let mut it = l.splitn(3, ' ');
        let (Some(k), Some(p), Some(r)) = (it.next(), it.next(), it.next()) else {
            return Err(format!("bad probe line {l:?}"));
        };
        res.insert(format!("{k} {p}"), r.to_string());
    }
    for op in ops {
        let mut it = op.split('|');
        let key = format!("{} {}", it.next().unwrap_or(""), it.next().unwrap_or(""));
        check!(
            res.contains_key(&key),
            "probe gave no result for {key}: {text}"
        );
    }
    Ok(res)
}

fn result<'a>(r: &'a HashMap<String, String>, kind: &str, p: &Path) -> &'a str {
    r.get(&format!("{kind} {}", p.display()))
        .map(String::as_str)
        .unwrap_or("")
}

fn client_hello_hex() -> String {
    let b = encode_frame(&Frame::new(
        0,
        ClientMsg::Hello {
            version: SUPERVISOR_PROTOCOL_VERSION,
        },
    ))
    .expect("encode hello");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}

// ------------------------------------------------------ cases on one VM

struct Shared {
    vm: Sandbox,
}

/// Entries under `root` (relative) with their problems: group/other bits,
/// another owner, a symlink (nothing is skipped).
fn walk(
    root: &Path,
    p: &Path,
    seen: &mut Vec<(String, std::fs::Metadata)>,
    bad: &mut Vec<String>,
) -> Result<(), String> {
    let meta = std::fs::symlink_metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
    let rel = p
        .strip_prefix(root)
        .map(|r| r.display().to_string())
        .unwrap_or_else(|_| p.display().to_string());
    let rel = if rel.is_empty() { ".".to_string() } else { rel };
    let mode = meta.permissions().mode() & 0o7777;
    let ft = meta.file_type();
    if ft.is_symlink() {
        bad.push(format!(
            "{rel}: a symlink (-> {:?})",
            std::fs::read_link(p).ok()
        ));
    } else if mode & 0o077 != 0 {
        bad.push(format!("{rel}: mode {mode:04o} ({ft:?})"));
    }
    // SAFETY: geteuid has no preconditions.
    if meta.uid() != unsafe { libc::geteuid() } {
        bad.push(format!("{rel}: owned by uid {}", meta.uid()));
    }
    let is_dir = ft.is_dir();
    seen.push((rel, meta));
    if is_dir {
        let rd = std::fs::read_dir(p).map_err(|e| format!("read_dir {}: {e}", p.display()))?;
        for e in rd {
            let e = e.map_err(|e| format!("read_dir {}: {e}", p.display()))?;
            walk(root, &e.path(), seen, bad)?;
        }
    }
    Ok(())
}

async fn files_are_private(s: &Shared) -> Result<(), String> {
    let root = data_dir();
    let mut seen = Vec::new();
    let mut bad = Vec::new();
    walk(&root, &root, &mut seen, &mut bad)?;
    check!(
        bad.is_empty(),
        "not private ({} of {} entries): {bad:#?}",
        bad.len(),
        seen.len()
    );
    let vm = format!("vms/{}", s.vm.id());
    let find = |name: &str| seen.iter().find(|(r, _)| r == name).map(|(_, m)| m);
    for d in ["locks".to_string(), "vms".into(), vm.clone()] {
        let m = find(&d).ok_or_else(|| format!("no directory {d} under the data dir"))?;
        check!(m.is_dir(), "{d} is not a directory");
    }
    for f in ["smolvm.db".to_string()].into_iter().chain(
        ["memory", "disk.qcow2", "console.log", "vmm.log", "net.log"].map(|f| format!("{vm}/{f}")),
    ) {
        let m = find(&f).ok_or_else(|| format!("no file {f} under the data dir"))?;
        check!(m.is_file(), "{f} is not a regular file");
    }
    for f in [
        "agent.sock",
        "qmp.sock",
        "console.sock",
        "net.sock",
        "sup.sock",
    ] {
        let f = format!("{vm}/{f}");
        let m = find(&f).ok_or_else(|| format!("no socket {f} under the data dir"))?;
        check!(m.file_type().is_socket(), "{f} is not a socket");
    }
    Ok(())
}

async fn other_user_locked_out(s: &Shared) -> Result<(), String> {
    let root = data_dir();
    let dir = vm_dir(&s.vm);
    let memory = dir.join("memory");
    let sock = dir.join("sup.sock");
    let secrets = [
        memory.clone(),
        dir.join("disk.qcow2"),
        dir.join("console.log"),
        root.join("smolvm.db"),
    ];
    let mut ops: Vec<String> = secrets
        .iter()
        .map(|p| format!("read|{}", p.display()))
        .collect();
    ops.push(format!("connect|{}", sock.display()));
    ops.push(format!("connect|{}", dir.join("agent.sock").display()));
    ops.push(format!("connect|{}", dir.join("qmp.sock").display()));
    ops.push(format!("list|{}", root.display()));

    // Control: we (the owner) can do all of it.
    let r = probe(false, &ops).await?;
    for (k, v) in &r {
        check!(v == "OK", "the owner cannot {k}: {v}");
    }
    // 1. As they are: all refused.
    let r = probe(true, &ops).await?;
    for (k, v) in &r {
        check!(v.starts_with("ERR-"), "uid {NOBODY} could {k}: {v}");
    }
    // 2. With every directory on the way opened for traversal, the files'
    //    and sockets' own modes still refuse.
    let mut modes = Modes(Vec::new());
    modes.set(&root, 0o711)?;
    modes.set(&root.join("vms"), 0o711)?;
    modes.set(&dir, 0o755)?;
    let mut ops2: Vec<String> = ops
        .iter()
        .filter(|o| !o.starts_with("list|"))
        .cloned()
        .collect();
    ops2.push(format!("stat|{}", memory.display()));
    ops2.push(format!("write|{}", memory.display()));
    let r = probe(true, &ops2).await?;
    check!(
        result(&r, "stat", &memory) == "OK",
        "control: uid {NOBODY} cannot even stat the memory file with the directories opened: {r:?}"
    );
    for (k, v) in &r {
        if !k.starts_with("stat ") {
            check!(
                v.starts_with("ERR-"),
                "with the directories opened, uid {NOBODY} could {k}: {v}"
            );
        }
    }
    drop(modes);
    Ok(())
}

async fn supervisor_refuses_other_uid(s: &Shared) -> Result<(), String> {
    let root = data_dir();
    let dir = vm_dir(&s.vm);
    let sock = dir.join("sup.sock");
    let hello = client_hello_hex();
    let op = format!("hello|{}|{hello}|2", sock.display());

    // Control: our own uid gets the supervisor's hello for these bytes.
    let r = probe(false, std::slice::from_ref(&op)).await?;
    let mine = result(&r, "hello", &sock).to_string();
    let parts: Vec<&str> = mine.split(' ').collect();
    check!(
        parts.first() == Some(&"CONNECTED") && parts.len() == 4,
        "control: {mine}"
    );
    let mut dec = Decoder::new();
    dec.push(&unhex(parts[3]));
    match dec.next_frame::<SupervisorMsg>() {
        Ok(Some(f)) => check!(
            matches!(f.msg, SupervisorMsg::Hello { .. }),
            "control: first frame is not the hello: {:?}",
            f.msg
        ),
        other => {
            return Err(format!(
                "control: no hello frame from the supervisor ({other:?}; {mine})"
            ))
        }
    }

    let log = dir.join("supervisor.log");
    let log_before = std::fs::read(&log).map(|b| b.len()).unwrap_or(0);
    // Loosen everything on the way, the socket included: only the peer
    // check is left.
    let mut modes = Modes(Vec::new());
    modes.set(&root, 0o711)?;
    modes.set(&root.join("vms"), 0o711)?;
    modes.set(&dir, 0o755)?;
    modes.set(&sock, 0o777)?;
    let t = Instant::now();
    let r = probe(true, std::slice::from_ref(&op)).await?;
    drop(modes);
    let theirs = result(&r, "hello", &sock).to_string();
    let parts: Vec<&str> = theirs.split(' ').collect();
    // Connected (the mode let it), then closed without a byte, well before
    // the supervisor's 10 s hello timeout.
    check!(
        parts.first() == Some(&"CONNECTED"),
        "uid {NOBODY} could not even connect to the loosened socket: {theirs}"
    );
    check!(
        parts.get(3) == Some(&"-"),
        "the supervisor sent uid {NOBODY} {} bytes: {theirs}",
        parts.get(3).map(|h| h.len() / 2).unwrap_or(0)
    );
    check!(
        matches!(
            parts.get(1),
            Some(&"EOF")
                | Some(&"ERR-ECONNRESET")
                | Some(&"SENDERR-EPIPE")
                | Some(&"SENDERR-ECONNRESET")
        ),
        "connection of uid {NOBODY} not closed by the supervisor: {theirs}"
    );
    check!(
        t.elapsed() < Duration::from_secs(8),
        "took {:?}",
        t.elapsed()
    );
    let logged = std::fs::read(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let new = String::from_utf8_lossy(&logged[log_before.min(logged.len())..]).to_string();
    check!(
        new.contains("another user"),
        "supervisor.log says nothing of the refusal: {new:?}"
    );
    // The supervisor still serves us.
    let o = sh(&s.vm, "echo alive").await?;
    check_eq!(o.stdout, b"alive\n".to_vec());
    Ok(())
}

async fn vmm_confined(s: &Shared) -> Result<(), String> {
    let info = s.vm.info().await.map_err(|e| smolvm::error::chain(&e))?;
    let vmm = info.vmm_pid.ok_or("no vmm_pid")?;
    let sup = info.supervisor_pid.ok_or("no supervisor_pid")?;
    check_eq!(proc_status(vmm, "Seccomp")?, "2");
    check_eq!(proc_status(vmm, "NoNewPrivs")?, "1");
    let kids = children_of(sup);
    check!(
        kids.iter().any(|(p, _)| *p == vmm),
        "QEMU {vmm} is not a child of the supervisor {sup}: {kids:?}"
    );
    // Both run the same binary (comm `passt.avx2` for both here): tell
    // them apart by argv[0].
    let argv0 = |pid: u32| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .ok()
            .and_then(|b| {
                b.split(|&c| c == 0)
                    .next()
                    .map(|a| String::from_utf8_lossy(a).to_string())
            })
            .map(|a| a.rsplit('/').next().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    let find = |parent: u32, name: &str| {
        let kids = children_of(parent);
        let found: Vec<u32> = kids
            .iter()
            .map(|(p, _)| *p)
            .filter(|p| argv0(*p).starts_with(name))
            .collect();
        match found.as_slice() {
            [p] => Ok(*p),
            _ => Err(format!(
                "want one {name} child of {parent}, found {found:?} among {kids:?}"
            )),
        }
    };
    // The supervisor's children: QEMU, pasta and the namespace holder (our
    // binary, which relays DNS); passt is the holder's child.
    let holder = find(sup, "smolvm-supervisor")?;
    let passt = find(holder, "passt")?;
    let pasta = find(sup, "pasta")?;
    check!(
        ns_of(holder, "net")? == ns_of(passt, "net")?,
        "the holder is not in passt's namespace"
    );
    for (name, pid) in [("passt", passt), ("pasta", pasta), ("holder", holder)] {
        check!(
            proc_status(pid, "NoNewPrivs")? == "1",
            "{name} ({pid}) runs without no_new_privs"
        );
    }
    // passt has a network (and user) namespace of its own; pasta sits in
    // the supervisor's, linking the two.
    check!(
        ns_of(passt, "net")? != ns_of(sup, "net")?,
        "passt shares the host's network namespace"
    );
    check!(
        ns_of(passt, "user")? != ns_of(sup, "user")?,
        "passt shares the host's user namespace"
    );
    check_eq!(ns_of(pasta, "net")?, ns_of(sup, "net")?);
    Ok(())
}

async fn logs_escape_guest_text(s: &Shared) -> Result<(), String> {
    let o = sh(
        &s.vm,
        r"printf 'HARDEN-A\033]52;c;cHduZWQ=\007\033[2J\233HARDEN-B\n' > /dev/console",
    )
    .await?;
    check!(o.ok(), "printf to the console failed: {o:?}");
    let console = vm_dir(&s.vm).join("console.log");
    let t = Instant::now();
    loop {
        let b = std::fs::read(&console).unwrap_or_default();
        if b.windows(8).any(|w| w == b"HARDEN-B") {
            break;
        }
        check!(
            t.elapsed() < Duration::from_secs(30),
            "the marker never reached console.log"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cli = cli_bin()?;
    let o = output(&cli, &["logs", s.vm.id()], Duration::from_secs(60)).await?;
    check!(
        o.code == Some(0),
        "smolvm logs: exit {:?}: {}",
        o.code,
        o.stderr
    );
    let out = &o.stdout;
    let controls: Vec<(usize, u8)> = out
        .iter()
        .enumerate()
        .filter(|(_, &b)| (b < 0x20 && b != b'\n' && b != b'\t') || b == 0x7f)
        .map(|(i, &b)| (i, b))
        .take(10)
        .collect();
    check!(
        controls.is_empty(),
        "smolvm logs printed control bytes (offset, byte): {controls:?}"
    );
    let text = String::from_utf8_lossy(out);
    let c1: Vec<char> = text
        .chars()
        .filter(|c| ('\u{80}'..='\u{9f}').contains(c))
        .take(10)
        .collect();
    check!(c1.is_empty(), "smolvm logs printed C1 controls: {c1:?}");
    let want = r"HARDEN-A\x1b]52;c;cHduZWQ=\x07\x1b[2J";
    check!(
        text.contains(want),
        "escaped sequence missing from `smolvm logs`: {:?}",
        text.lines()
            .filter(|l| l.contains("HARDEN"))
            .collect::<Vec<_>>()
    );
    check!(text.contains("HARDEN-B"), "marker B missing");
    let o = output(&cli, &["logs", "--raw", s.vm.id()], Duration::from_secs(60)).await?;
    check!(
        o.code == Some(0),
        "smolvm logs --raw: exit {:?}: {}",
        o.code,
        o.stderr
    );
    let raw_want: &[u8] = b"HARDEN-A\x1b]52;c;cHduZWQ=\x07\x1b[2J\x9bHARDEN-B";
    check!(
        o.stdout.windows(raw_want.len()).any(|w| w == raw_want),
        "`smolvm logs --raw` does not hold the guest's bytes as sent"
    );
    Ok(())
}

// ------------------------------------------------------- guest network

const HOST_ADDR: &str = "198.51.100.1";
const OUTSIDE_ADDR: &str = "198.51.100.2";
const SECRET_PORT: u16 = 18001; // 127.0.0.1 of the host namespace
const ANY_PORT: u16 = 18002; // 0.0.0.0 of the host namespace
const OUTSIDE_PORT: u16 = 18003; // the outside namespace's address
/// A "LAN machine" in the outside namespace that owns the guest's gateway
/// and resolver addresses (10.0.2.2, 10.0.2.3): a connection from the guest
/// to them must be refused inside the guest network's namespace, never
/// leave the host for whoever has that address on its network.
const LAN_PORT: u16 = 18004;
/// Another address of the host namespace (on a dummy interface).
const OTHER_HOST_ADDR: &str = "203.0.113.7";

/// TCP listeners: each accept is logged (`accept TAG PEER`) and answered
/// `BODY-TAG`. Prints `ready` once all are bound.
const SERVER: &str = r#"
import socket, sys, threading
log = open(sys.argv[1], "a", buffering=1)
lock = threading.Lock()
def conn(c, tag):
    try:
        c.settimeout(2)
        try:
            c.recv(4096)
        except OSError:
            pass
        body = ("BODY-" + tag).encode()
        c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    except OSError:
        pass
    finally:
        c.close()
def serve(ls, tag):
    while True:
        c, peer = ls.accept()
        with lock:
            log.write("accept %s %s:%d\n" % (tag, peer[0], peer[1]))
        threading.Thread(target=conn, args=(c, tag), daemon=True).start()
def dns(us):
    # Answers every query with one A record 198.51.100.77 (the name echoed).
    while True:
        q, peer = us.recvfrom(512)
        with lock:
            log.write("udp %s %s\n" % (peer[0], q.hex()))
        if len(q) < 12:
            continue
        i = 12
        while i < len(q) and q[i] != 0:
            i += q[i] + 1
        question = q[12:i + 5]
        with lock:
            log.write("dns %s\n" % peer[0])
        r = q[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00" + question
        r += b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + bytes([198, 51, 100, 77])
        us.sendto(r, peer)
for spec in sys.argv[2:]:
    addr, port, tag = spec.split(":")
    if tag == "dns":
        us = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        us.bind((addr, int(port)))
        threading.Thread(target=dns, args=(us,), daemon=True).start()
        continue
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((addr, int(port)))
    ls.listen(64)
    threading.Thread(target=serve, args=(ls, tag), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"#;

/// Guest side: a hand-made TCP SYN on eth0 to DST:PORT, sent to the
/// gateway's MAC; prints `RAW TAG synack|rst|none|flags=0x..`.
const RAW_SYN: &str = r#"
import socket, struct, sys, time, subprocess
tag = sys.argv[1]; dst = sys.argv[2]; port = int(sys.argv[3])
subprocess.run(["ping", "-c1", "-W1", "10.0.2.2"], capture_output=True)
out = subprocess.run(["ip", "neigh", "show", "10.0.2.2"], capture_output=True, text=True).stdout.split()
if "lladdr" not in out:
    print("RAW", tag, "no-gateway-mac", " ".join(out)); sys.exit(0)
gwmac = bytes.fromhex(out[out.index("lladdr") + 1].replace(":", ""))
mymac = bytes.fromhex(open("/sys/class/net/eth0/address").read().strip().replace(":", ""))
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xffff); s += s >> 16
    return (~s) & 0xffff
src = socket.inet_aton("10.0.2.15"); d = socket.inet_aton(dst)
sport = 40000 + port % 1000
tcp = struct.pack("!HHIIBBHHH", sport, port, 1234, 0, 5 << 4, 0x02, 64240, 0, 0)
ph = src + d + struct.pack("!BBH", 0, 6, len(tcp))
tcp = tcp[:16] + struct.pack("!H", csum(ph + tcp)) + tcp[18:]
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0, src, d)
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800)); s.bind(("eth0", 0))
s.settimeout(0.2)
# The same SYN once a second (a slow host may lose the first), up to 8 s.
t0 = time.time(); end = t0 + 8; got = "none"; sent = 0
while time.time() < end:
    if time.time() >= t0 + sent:
        s.send(gwmac + mymac + b"\x08\x00" + ip + tcp); sent += 1
    try: f = s.recv(2000)
    except socket.timeout: continue
    if f[12:14] == b"\x08\x00" and f[23] == 6 and f[26:30] == d:
        ihl = (f[14] & 0x0f) * 4
        if struct.unpack("!H", f[14 + ihl + 2:14 + ihl + 4])[0] != sport: continue
        flags = f[14 + ihl + 13]
        got = "synack" if flags & 0x12 == 0x12 else ("rst" if flags & 0x04 else "flags=0x%02x" % flags)
        break
print("RAW", tag, got, "after %.2fs, %d SYNs" % (time.time() - t0, sent), flush=True)
"#;

fn b64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Two namespaces of the test's own, the servers in them and the run's
/// data dir: all removed on drop (also when a check fails).
struct NetLab {
    host: String,
    outside: String,
    servers: Vec<std::process::Child>,
    etc: PathBuf,
    made_etc_netns: bool,
    data: Option<tempfile::TempDir>,
    logs: tempfile::TempDir,
}

impl NetLab {
    fn new() -> Result<NetLab, String> {
        let pid = std::process::id();
        let host = format!("smh-{pid}");
        let etc_netns = Path::new("/etc/netns");
        let lab = NetLab {
            etc: etc_netns.join(&host),
            host,
            outside: format!("smx-{pid}"),
            servers: Vec::new(),
            made_etc_netns: !etc_netns.exists(),
            data: Some(
                tempfile::Builder::new()
                    .prefix("smolvm-net-")
                    .tempdir()
                    .map_err(|e| e.to_string())?,
            ),
            logs: tempfile::Builder::new()
                .prefix("smolvm-netlog-")
                .tempdir()
                .map_err(|e| e.to_string())?,
        };
        let (h, x) = (lab.host.clone(), lab.outside.clone());
        let (vh, vx) = (format!("vh-{pid}"), format!("vx-{pid}"));
        must("ip", &["netns", "add", &h])?;
        must("ip", &["netns", "add", &x])?;
        // The veth pair is made inside the host namespace: nothing touches
        // this machine's own network.
        must(
            "ip",
            &[
                "-n", &h, "link", "add", &vh, "type", "veth", "peer", "name", &vx, "netns", &x,
            ],
        )?;
        must(
            "ip",
            &[
                "-n",
                &h,
                "addr",
                "add",
                &format!("{HOST_ADDR}/24"),
                "dev",
                &vh,
            ],
        )?;
        must(
            "ip",
            &[
                "-n",
                &x,
                "addr",
                "add",
                &format!("{OUTSIDE_ADDR}/24"),
                "dev",
                &vx,
            ],
        )?;
        for (ns, dev) in [(&h, &vh), (&x, &vx)] {
            must("ip", &["-n", ns, "link", "set", "lo", "up"])?;
            must("ip", &["-n", ns, "link", "set", dev, "up"])?;
        }
        must(
            "ip",
            &["-n", &h, "route", "add", "default", "via", OUTSIDE_ADDR],
        )?;
        for a in ["10.0.2.2/32", "10.0.2.3/32"] {
            must("ip", &["-n", &x, "addr", "add", a, "dev", &vx])?;
        }
        // A second address of the host (as a docker bridge or a VPN would
        // add): pasta does not copy it, so only the gate keeps the guest
        // from it. (On lo: these kernels have no dummy interfaces.)
        must(
            "ip",
            &[
                "-n",
                &h,
                "addr",
                "add",
                &format!("{OTHER_HOST_ADDR}/32"),
                "dev",
                "lo",
            ],
        )?;
        // The host namespace's resolver is in the outside namespace too.
        std::fs::create_dir_all(&lab.etc).map_err(|e| format!("{}: {e}", lab.etc.display()))?;
        std::fs::write(
            lab.etc.join("resolv.conf"),
            format!("nameserver {OUTSIDE_ADDR}\n"),
        )
        .map_err(|e| e.to_string())?;
        Ok(lab)
    }

    fn log(&self, ns: &str) -> PathBuf {
        self.logs.path().join(format!("{ns}.log"))
    }

    fn accepts(&self, ns: &str) -> Vec<String> {
        std::fs::read_to_string(self.log(ns))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Starts the listeners `specs` (`ADDR:PORT:TAG`) in namespace `ns` and
    /// waits until they are bound.
    fn serve(&mut self, ns: &str, specs: &[String]) -> Result<(), String> {
        let log = self.log(ns);
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", ns, PYTHON, "-I", "-c", SERVER])
            .arg(&log)
            .args(specs)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = c
            .spawn()
            .map_err(|e| format!("cannot start a server: {e}"))?;
        let stdout = child.stdout.take();
        self.servers.push(child);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            if let Some(s) = stdout {
                let _ = BufReader::new(s).read_line(&mut line);
            }
            let _ = tx.send(line);
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(l) if l.trim() == "ready" => Ok(()),
            Ok(l) => Err(format!("server in {ns} did not start: {l:?}")),
            Err(_) => Err(format!("server in {ns} not ready within 20 s")),
        }
    }

    /// Removes everything; says what could not be removed.
    fn teardown(&mut self) -> Result<(), String> {
        let mut errs = Vec::new();
        for mut c in self.servers.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(d) = self.data.take() {
            kill_processes_in(d.path());
            drop(d);
        }
        for ns in [&self.host, &self.outside] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        if self.etc.exists() {
            if let Err(e) = std::fs::remove_dir_all(&self.etc) {
                errs.push(format!("{}: {e}", self.etc.display()));
            }
        }
        if self.made_etc_netns {
            let _ = std::fs::remove_dir("/etc/netns");
            self.made_etc_netns = false;
        }
        let left = std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        for ns in [&self.host, &self.outside] {
            if left.split_whitespace().any(|w| w == ns.as_str()) {
                errs.push(format!("namespace {ns} is still there"));
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs.join("; "))
        }
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        let _ = self.teardown();
    }
}

async fn in_ns_curl(ns: &str, url: &str) -> Result<Out, String> {
    output(
        "ip",
        &[
            "netns",
            "exec",
            ns,
            "curl",
            "-s",
            "--noproxy",
            "*",
            "-m",
            "3",
            url,
        ],
        Duration::from_secs(20),
    )
    .await
}

async fn guest_network_no_host_loopback() -> Result<(), String> {
    let cli = cli_bin()?;
    let mut lab = NetLab::new()?;
    let (h, x) = (lab.host.clone(), lab.outside.clone());
    lab.serve(
        &h,
        &[
            format!("127.0.0.1:{SECRET_PORT}:secret"),
            format!("0.0.0.0:{ANY_PORT}:any"),
        ],
    )?;
    lab.serve(
        &x,
        &[
            format!("{OUTSIDE_ADDR}:{OUTSIDE_PORT}:outside"),
            // The host namespace's resolver (its /etc/netns resolv.conf).
            format!("{OUTSIDE_ADDR}:53:dns"),
            format!("0.0.0.0:{LAN_PORT}:lan"),
            // TCP to the resolver address's port 53 (pasta forwards only
            // UDP DNS): must be refused in the namespace, not leave.
            "0.0.0.0:53:lan".to_string(),
        ],
    )?;

    // Controls: the topology works as meant.
    let o = in_ns_curl(&h, &format!("http://127.0.0.1:{SECRET_PORT}/")).await?;
    check!(
        o.text() == "BODY-secret",
        "control: the host's loopback server: {:?} {}",
        o.code,
        o.text()
    );
    let o = in_ns_curl(&x, &format!("http://{HOST_ADDR}:{ANY_PORT}/")).await?;
    check!(
        o.text() == "BODY-any",
        "control: the host's 0.0.0.0 server from outside: {:?} {}",
        o.code,
        o.text()
    );
    let o = in_ns_curl(&x, &format!("http://{HOST_ADDR}:{SECRET_PORT}/")).await?;
    check!(
        o.code != Some(0),
        "control: the loopback server answers from outside"
    );
    let o = in_ns_curl(&h, &format!("http://{OUTSIDE_ADDR}:{OUTSIDE_PORT}/")).await?;
    check!(
        o.text() == "BODY-outside",
        "control: the outside server: {:?} {}",
        o.code,
        o.text()
    );
    let host_before = lab.accepts(&h).len();
    let outside_before = lab.accepts(&x).len();

    let must_fail = [
        ("gw-secret", format!("http://10.0.2.2:{SECRET_PORT}/")),
        ("gw-any", format!("http://10.0.2.2:{ANY_PORT}/")),
        ("dns-secret", format!("http://10.0.2.3:{SECRET_PORT}/")),
        ("dns-any", format!("http://10.0.2.3:{ANY_PORT}/")),
        ("gw-lan", format!("http://10.0.2.2:{LAN_PORT}/")),
        ("dns-lan", format!("http://10.0.2.3:{LAN_PORT}/")),
        ("dns-tcp53", "http://10.0.2.3:53/".to_string()),
        ("self-secret", format!("http://{HOST_ADDR}:{SECRET_PORT}/")),
        ("self-any", format!("http://{HOST_ADDR}:{ANY_PORT}/")),
        ("other-any", format!("http://{OTHER_HOST_ADDR}:{ANY_PORT}/")),
        (
            "other-secret",
            format!("http://{OTHER_HOST_ADDR}:{SECRET_PORT}/"),
        ),
        // The host's gateway, which pasta must not map to the host's loopback.
        (
            "hostgw-secret",
            format!("http://{OUTSIDE_ADDR}:{SECRET_PORT}/"),
        ),
    ];
    let outside_url = format!("http://{OUTSIDE_ADDR}:{OUTSIDE_PORT}/");
    let curl = |n: &str, u: &str, secs: u32| {
        format!("b=$(curl -s --noproxy '*' -m {secs} '{u}'); echo \"CURL {n} $? [$b]\"\n")
    };
    let mut script =
        String::from("ip -4 addr show dev eth0 | grep -q 'inet 10.0.2.15/24' && echo ADDR ok\n");
    script.push_str(&curl("outside", &outside_url, 20));
    // DNS works: the guest's resolver (10.0.2.3) reaches the host's one.
    script.push_str("echo \"DNS [$(getent hosts smolvm-test.example)]\"\n");
    // Not a DNS query: to the resolver address, and straight to the relay's
    // upstream address. Neither may reach the host's resolver.
    script.push_str(
        "python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); \
         [s.sendto(b\"ARBITRARY-UDP-PAYLOAD-XYZ\", (a, 53)) for a in (\"10.0.2.3\", \"10.0.3.53\")]'\n",
    );
    for (n, u) in &must_fail {
        script.push_str(&curl(n, u, 3));
    }
    script.push_str(&format!(
        "echo {} | base64 -d > /tmp/raw.py\n",
        b64(RAW_SYN.as_bytes())
    ));
    for (tag, dst, port) in [
        ("lo-secret", "127.0.0.1", SECRET_PORT),
        ("lo-any", "127.0.0.1", ANY_PORT),
        ("outside", OUTSIDE_ADDR, OUTSIDE_PORT),
    ] {
        script.push_str(&format!("python3 /tmp/raw.py {tag} {dst} {port}\n"));
    }
    script.push_str(&curl("outside-after", &outside_url, 20));
    script.push_str("exit 0\n");

    let data = lab
        .data
        .as_ref()
        .map(|d| d.path().to_path_buf())
        .ok_or("no data dir")?;
    let cli_s = cli.display().to_string();
    let data_s = data.display().to_string();
    let o = output(
        "ip",
        &[
            "netns",
            "exec",
            &h,
            "env",
            &format!("SMOLVM_DATA_DIR={data_s}"),
            &cli_s,
            "run",
            "--quiet",
            "--boot-timeout",
            "120",
            "--",
            "sh",
            "-c",
            &script,
        ],
        CMD_LIMIT,
    )
    .await?;
    let text = o.text();
    check!(
        o.code == Some(0),
        "smolvm run: exit {:?}\nstdout: {text}\nstderr: {}",
        o.code,
        o.stderr
    );
    check!(
        text.lines().any(|l| l == "ADDR ok"),
        "guest address is not 10.0.2.15/24: {text}"
    );
    let curl: HashMap<&str, (&str, &str)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("CURL "))
        .filter_map(|l| {
            let mut it = l.splitn(3, ' ');
            Some((it.next()?, (it.next()?, it.next()?)))
        })
        .collect();
    // RAW TAG RESULT [after ...]
    let raw: HashMap<&str, &str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("RAW "))
        .filter_map(|l| {
            let mut it = l.split(' ');
            Some((it.next()?, it.next()?))
        })
        .collect();
    let mut problems = Vec::new();
    match text.lines().find(|l| l.starts_with("DNS [")) {
        Some(l) if l.contains("198.51.100.77") && l.contains("smolvm-test.example") => {}
        other => problems.push(format!("DNS through 10.0.2.3 did not resolve: {other:?}")),
    }
    for (n, u) in &must_fail {
        match curl.get(n) {
            None => problems.push(format!("{n}: no result")),
            Some((rc, body)) if *rc == "0" || body.contains("BODY-") => {
                problems.push(format!("{n} ({u}) answered: rc {rc} {body}"))
            }
            Some(_) => {}
        }
    }
    for n in ["outside", "outside-after"] {
        match curl.get(n) {
            Some(&("0", "[BODY-outside]")) => {}
            other => problems.push(format!(
                "control: {n}: the outside server not reached: {other:?}"
            )),
        }
    }
    for tag in ["lo-secret", "lo-any"] {
        match raw.get(tag) {
            Some(&"synack") => problems.push(format!("raw SYN {tag} to 127.0.0.1 got a SYN-ACK")),
            Some(r) if ["rst", "none"].contains(r) || r.starts_with("flags=") => {}
            other => problems.push(format!("raw SYN {tag}: {other:?}")),
        }
    }
    if raw.get("outside") != Some(&"synack") {
        problems.push(format!(
            "control: raw SYN to the outside server: {:?}",
            raw.get("outside")
        ));
    }
    let host_new: Vec<String> = lab.accepts(&h).into_iter().skip(host_before).collect();
    if !host_new.is_empty() {
        problems.push(format!(
            "the host namespace's servers accepted: {host_new:?}"
        ));
    }
    let garbage = b"-UDP-PAYLOAD"
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    let leaked: Vec<String> = lab
        .accepts(&x)
        .into_iter()
        .filter(|l| l.starts_with("udp ") && l.contains(&garbage))
        .collect();
    if !leaked.is_empty() {
        problems.push(format!(
            "non-DNS datagrams reached the host's resolver: {leaked:?}"
        ));
    }
    let lan: Vec<String> = lab
        .accepts(&x)
        .into_iter()
        .filter(|l| l.starts_with("accept lan "))
        .collect();
    if !lan.is_empty() {
        problems.push(format!(
            "connections to the guest's gateway/resolver addresses left the host: {lan:?}"
        ));
    }
    let outside_new = lab.accepts(&x).len() - outside_before;
    if outside_new < 3 {
        problems.push(format!(
            "control: the outside server saw {outside_new} connections (want 2 curls + a raw SYN)"
        ));
    }
    check!(
        problems.is_empty(),
        "{problems:#?}\nguest output:\n{text}\nstderr: {}",
        o.stderr
    );
    no_processes_in(&data).await?;
    lab.teardown()?;
    Ok(())
}

// ------------------------------------------------- host-side deadlines

/// With its VMM stopped (SIGSTOP) the guest cannot answer: a timed exec
/// still returns (a Timeout, soon after its timeout), the VM is marked,
/// and a stop still stops it (the VMM killed), all within bounds.
async fn frozen_vmm_has_host_deadlines() -> Result<(), String> {
    let vm = Sandbox::create(SandboxConfig {
        name: Some("frozen".into()),
        ..SandboxConfig::default()
    })
    .await
    .map_err(|e| smolvm::error::chain(&e))?;
    let r = async {
        vm.start(BOOT).await.map_err(|e| smolvm::error::chain(&e))?;
        let pid = vm
            .info()
            .await
            .map_err(|e| e.to_string())?
            .vmm_pid
            .ok_or("no VMM pid")?;
        // SAFETY: kill(2) of the VMM this test started (its pid from the store).
        check_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
        let t = Instant::now();
        let r = vm
            .exec(
                Command::shell("sleep 100"),
                &ExecOptions {
                    timeout: Some(Duration::from_secs(2)),
                    ..ExecOptions::default()
                },
            )
            .await;
        let took = t.elapsed();
        match &r {
            Err(e @ smolvm::Error::Timeout { .. }) => {
                check_eq!(e.kind(), smolvm::ErrorKind::Timeout);
                check!(
                    e.to_string().contains("smolvm stop frozen"),
                    "no fix in: {e}"
                );
            }
            other => return Err(format!("a frozen guest's timed exec gave {other:?}")),
        }
        // 2 s timeout + the 5 s grace, with slack for a loaded host.
        check!(
            took < Duration::from_secs(20),
            "the timed exec took {took:?}"
        );
        let info = vm.info().await.map_err(|e| e.to_string())?;
        check!(
            info.last_error
                .as_deref()
                .is_some_and(|e| e.contains("stopped answering")),
            "the VM is not marked: {:?}",
            info.last_error
        );
        // Pause of a stopped VMM: a timeout that says what ends it.
        let t = Instant::now();
        match vm.pause().await {
            Err(e) => {
                check_eq!(e.kind(), smolvm::ErrorKind::Timeout);
                check!(
                    e.to_string().contains("smolvm stop frozen"),
                    "no fix in: {e}"
                );
            }
            Ok(()) => return Err("pause of a stopped VMM succeeded".into()),
        }
        check!(
            t.elapsed() < Duration::from_secs(20),
            "pause took {:?}",
            t.elapsed()
        );
        // Continued, the VMM answers again (the control connection is made
        // anew after the timeout) and the guest is back.
        // SAFETY: kill(2) of the VMM this test started.
        check_eq!(unsafe { libc::kill(pid as i32, libc::SIGCONT) }, 0);
        vm.pause().await.map_err(|e| smolvm::error::chain(&e))?;
        vm.resume().await.map_err(|e| smolvm::error::chain(&e))?;
        check_eq!(sh(&vm, "echo back").await?.stdout, b"back\n".to_vec());
        // SAFETY: as above.
        check_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
        let t = Instant::now();
        vm.stop(Duration::from_secs(3))
            .await
            .map_err(|e| smolvm::error::chain(&e))?;
        let took = t.elapsed();
        check!(took < Duration::from_secs(30), "stop took {took:?}");
        check_eq!(
            vm.status().await.map_err(|e| e.to_string())?,
            smolvm::VmState::Stopped
        );
        check!(
            wait_pid_gone(pid, Duration::from_secs(10)).await,
            "the frozen VMM {pid} still exists"
        );
        Ok(())
    }
    .await;
    let _ = vm.delete().await;
    r
}

// ---------------------------------------------------------- error kinds

/// Each kind of failure comes out of the library as its own variant and
/// kind, without parsing text.
async fn errors_have_kinds() -> Result<(), String> {
    use smolvm::{Error, ErrorKind};
    let kind = |r: Result<(), Error>| r.err().map(|e| (e.kind(), e));
    // not found
    match Sandbox::from_id("no-such-vm").await {
        Err(e @ Error::NotFound(_)) => check_eq!(e.kind(), ErrorKind::NotFound),
        Err(e) => return Err(format!("from_id of nothing: {e:?}")),
        Ok(_) => return Err("from_id of nothing succeeded".into()),
    }
    // invalid input
    let bad = Sandbox::create(SandboxConfig {
        memory_mib: 1,
        ..SandboxConfig::default()
    })
    .await;
    match bad {
        Err(e) => check_eq!(e.kind(), ErrorKind::InvalidInput),
        Ok(_) => return Err("1 MiB of memory was accepted".into()),
    }
    let vm = Sandbox::create(SandboxConfig {
        name: Some("kinds".into()),
        ..SandboxConfig::default()
    })
    .await
    .map_err(|e| e.to_string())?;
    let r = async {
        // already exists
        let dup = Sandbox::create(SandboxConfig {
            name: Some("kinds".into()),
            ..SandboxConfig::default()
        })
        .await;
        match dup {
            Err(e) => check_eq!(e.kind(), ErrorKind::AlreadyExists),
            Ok(_) => return Err("a second VM of the same name".into()),
        }
        // invalid state, naming the state
        match vm.run("true").await {
            Err(
                e @ Error::InvalidState {
                    state: smolvm::VmState::Created,
                    ..
                },
            ) => {
                check_eq!(e.kind(), ErrorKind::InvalidState);
                check!(e.to_string().contains("smolvm start kinds"), "{e}");
            }
            other => return Err(format!("exec on a created VM: {other:?}")),
        }
        match kind(vm.pause().await) {
            Some((ErrorKind::InvalidState, _)) => {}
            other => return Err(format!("pause of a created VM: {other:?}")),
        }
        // the VMM dies at start (its disk is garbage): VmmDied, not
        // "cannot start the supervisor"
        std::fs::write(vm.vm_dir().disk(), b"not a qcow2 image").map_err(|e| e.to_string())?;
        match vm.start(BOOT).await {
            Err(e @ Error::VmmDied { .. }) => {
                check_eq!(e.kind(), ErrorKind::VmmDied);
                check!(!e.to_string().contains("supervisor"), "{e}");
            }
            other => return Err(format!("start with a garbage disk: {other:?}")),
        }
        check_eq!(
            vm.status().await.map_err(|e| e.to_string())?,
            smolvm::VmState::Created
        );
        Ok(())
    }
    .await;
    let _ = vm.delete().await;
    r
}

// ------------------------------------------------------------------ main

fn main() {
    let vm_cases = cases![Shared:
        files_are_private,
        other_user_locked_out,
        supervisor_refuses_other_uid,
        vmm_confined,
        logs_escape_guest_text,
    ];
    let own_cases = cases![
        guest_network_no_host_loopback,
        frozen_vmm_has_host_deadlines,
        errors_have_kinds,
    ];
    let mut names = case_names(&vm_cases);
    names.extend(case_names(&own_cases));
    list_if_asked(&names);

    let data = isolated_data_dir("smolvm-hard-");
    let filters = filter();
    let rt = runtime();
    let started = Instant::now();
    let code = rt.block_on(async {
        let mut passed = 0;
        let mut failed = Vec::new();
        if vm_cases.iter().any(|(n, _)| selected(n, &filters)) {
            match boot_shared().await {
                Err(e) => {
                    eprintln!("cannot boot the shared VM: {e}");
                    failed.push("setup".to_string());
                }
                Ok(shared) => {
                    let (p, f) =
                        run_cases(&vm_cases, &shared, &filters, Some(CASE_LIMIT), || async {})
                            .await;
                    passed += p;
                    failed.extend(f);
                    if let Err(e) = shared.vm.delete().await {
                        eprintln!("cannot delete the shared VM: {}", smolvm::error::chain(&e));
                        failed.push("teardown".into());
                    }
                }
            }
        }
        let (p, f) = run_cases(&own_cases, &(), &filters, Some(CASE_LIMIT), || async {}).await;
        passed += p;
        failed.extend(f);
        if let Err(e) = no_processes_in(&data_dir()).await {
            eprintln!("{e}");
            failed.push("teardown".into());
        }
        summary(passed, &failed)
    });
    println!("hardening: {:.1}s", started.elapsed().as_secs_f64());
    kill_processes_in(data.path());
    drop(rt);
    drop(data);
    std::process::exit(code);
}

async fn boot_shared() -> Result<Shared, String> {
    let vm = Sandbox::create(SandboxConfig::default())
        .await
        .map_err(|e| smolvm::error::chain(&e))?;
    if let Err(e) = vm.start(BOOT).await {
        let msg = smolvm::error::chain(&e);
        let _ = vm.delete().await;
        return Err(msg);
    }
    Ok(Shared { vm })
}
