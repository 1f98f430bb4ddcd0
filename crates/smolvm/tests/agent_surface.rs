//! The agent surface against one real VM: streaming, stdin, per-stream flow
//! control, files and directories both ways, filesystem requests, the
//! persistent environment, guest ports.

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use common::*;
use sha2::{Digest, Sha256};
use smolvm::sandbox::{ExecEvent, FileKind};
use smolvm::{Command, ErrorKind, ExecOptions, Sandbox, SandboxConfig};
use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

const BOOT: Duration = Duration::from_secs(120);

fn sh(s: &str) -> Command {
    Command::Shell(s.to_string())
}

fn e2s(e: smolvm::Error) -> String {
    smolvm::error::chain(&e)
}

async fn run(vm: &Sandbox, s: &str) -> Result<smolvm::ExecOutput, String> {
    vm.exec(sh(s), &ExecOptions::default()).await.map_err(e2s)
}

async fn out(vm: &Sandbox, s: &str) -> Result<String, String> {
    let o = run(vm, s).await?;
    check_eq!(o.exit_code, Some(0));
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

fn hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

async fn output_streams_as_it_is_produced(vm: &Sandbox) -> Result<(), String> {
    let t = Instant::now();
    let mut s = vm
        .exec_stream(
            sh("for i in 1 2 3; do echo $i; sleep 1; done"),
            &ExecOptions::default(),
        )
        .await
        .map_err(e2s)?;
    let mut first = None;
    let mut all = Vec::new();
    loop {
        match s.next().await.map_err(|e| e.to_string())? {
            Some(ExecEvent::Stdout(b)) => {
                first.get_or_insert(t.elapsed());
                all.extend(b);
            }
            Some(ExecEvent::Exited(st)) => {
                check_eq!(st.code, Some(0));
                break;
            }
            Some(ExecEvent::Started { .. }) => {}
            other => return Err(format!("unexpected {other:?}")),
        }
    }
    let (first, total) = (first.unwrap_or_default(), t.elapsed());
    check_eq!(all, b"1\n2\n3\n".to_vec());
    check!(
        first + Duration::from_millis(1500) < total,
        "the first line came at {first:?}, the end at {total:?}: not streamed"
    );
    Ok(())
}

async fn stdin_round_trip(vm: &Sandbox) -> Result<(), String> {
    let data = noise(5 * 1024 * 1024, 5);
    let o = vm
        .exec(
            Command::Argv(vec!["cat".into()]),
            &ExecOptions {
                stdin: Some(data.clone()),
                ..Default::default()
            },
        )
        .await
        .map_err(e2s)?;
    check!(
        o.stdout == data,
        "cat echoed {} of {} bytes",
        o.stdout.len(),
        data.len()
    );
    let o = vm
        .exec(
            Command::Argv(vec!["wc".into(), "-c".into()]),
            &ExecOptions {
                stdin: Some(data),
                ..Default::default()
            },
        )
        .await
        .map_err(e2s)?;
    check_eq!(String::from_utf8_lossy(&o.stdout).trim(), "5242880");
    // Interactive: write, read the answer, write again, close.
    let mut s = vm
        .exec_stream(
            Command::Argv(vec!["cat".into()]),
            &ExecOptions {
                open_stdin: true,
                ..Default::default()
            },
        )
        .await
        .map_err(e2s)?;
    let w = s.stdin();
    let mut got = Vec::new();
    for word in ["ping\n", "pong\n"] {
        w.write(word.as_bytes()).await.map_err(|e| e.to_string())?;
        while !got.ends_with(word.as_bytes()) {
            match s.next().await.map_err(|e| e.to_string())? {
                Some(ExecEvent::Stdout(b)) => got.extend(b),
                Some(ExecEvent::Started { .. }) => {}
                other => return Err(format!("unexpected {other:?}")),
            }
        }
    }
    w.close().await.map_err(|e| e.to_string())?;
    loop {
        match s.next().await.map_err(|e| e.to_string())? {
            Some(ExecEvent::Exited(st)) => {
                check_eq!(st.code, Some(0));
                break;
            }
            Some(ExecEvent::Stdout(b)) => got.extend(b),
            other => return Err(format!("unexpected {other:?}")),
        }
    }
    check_eq!(got, b"ping\npong\n".to_vec());
    Ok(())
}

async fn undrained_stream_for_60s_loses_nothing(vm: &Sandbox) -> Result<(), String> {
    let t = Instant::now();
    let mut held = vm
        .exec_stream(sh("seq 1 2000000; echo end >&2"), &ExecOptions::default())
        .await
        .map_err(e2s)?;
    // The same handle runs 100 commands meanwhile.
    for i in 0..100 {
        let o = tokio::time::timeout(Duration::from_secs(30), run(vm, &format!("echo {i}")))
            .await
            .map_err(|_| format!("command {i} waited 30 s behind an undrained stream"))??;
        check_eq!(String::from_utf8_lossy(&o.stdout), format!("{i}\n"));
    }
    let ping = vm.ping().await.map_err(e2s)?;
    check!(ping < Duration::from_secs(1), "ping took {ping:?}");
    if let Some(left) = Duration::from_secs(60).checked_sub(t.elapsed()) {
        tokio::time::sleep(left).await;
    }
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    loop {
        match held.next().await.map_err(|e| e.to_string())? {
            Some(ExecEvent::Stdout(b)) => stdout.extend(b),
            Some(ExecEvent::Stderr(b)) => stderr.extend(b),
            Some(ExecEvent::Started { .. }) => {}
            Some(ExecEvent::Exited(st)) => {
                check_eq!(st.code, Some(0));
                break;
            }
            other => return Err(format!("unexpected {other:?}")),
        }
    }
    let want: String = (1..=2_000_000).map(|i| format!("{i}\n")).collect();
    check!(
        stdout == want.as_bytes(),
        "after a 60 s stall the output differs ({} of {} bytes)",
        stdout.len(),
        want.len()
    );
    check_eq!(stderr, b"end\n".to_vec());
    Ok(())
}

async fn hundred_mib_up_and_down(vm: &Sandbox) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let up = dir.path().join("up.bin");
    let data = noise(100 * 1024 * 1024, 9);
    std::fs::write(&up, &data).map_err(|e| e.to_string())?;
    std::fs::set_permissions(&up, std::fs::Permissions::from_mode(0o640))
        .map_err(|e| e.to_string())?;
    let n = vm
        .upload_file(&up, "/root/files/big.bin", true)
        .await
        .map_err(e2s)?;
    check_eq!(n, data.len() as u64);
    let want = hex(&data);
    check_eq!(
        out(vm, "sha256sum /root/files/big.bin | cut -d' ' -f1").await?,
        want
    );
    check_eq!(out(vm, "stat -c %a /root/files/big.bin").await?, "640");
    let down = dir.path().join("down.bin");
    let n = vm
        .download_file("/root/files/big.bin", &down, false, None)
        .await
        .map_err(e2s)?;
    check_eq!(n, data.len() as u64);
    let got = std::fs::read(&down).map_err(|e| e.to_string())?;
    check_eq!(hex(&got), want);
    let md = std::fs::metadata(&down).map_err(|e| e.to_string())?;
    check_eq!(md.mode() & 0o777, 0o640);
    check_eq!(
        md.mtime(),
        std::fs::metadata(&up).map_err(|e| e.to_string())?.mtime()
    );
    // max_bytes refuses a larger file and writes nothing.
    let small = dir.path().join("small.bin");
    let e = vm
        .download_file("/root/files/big.bin", &small, false, Some(1024))
        .await
        .err()
        .ok_or("max_bytes was not enforced")?;
    check_eq!(e.kind(), ErrorKind::InvalidInput);
    check!(!small.exists());
    check!(
        dir_entries(dir.path()).len() == 2,
        "a temporary file was left"
    );
    Ok(())
}

fn make_tree(root: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(root.join("a/b/c"))?;
    std::fs::create_dir_all(root.join("empty"))?;
    std::fs::write(root.join("a/file.txt"), b"hello\n")?;
    std::fs::write(root.join("a/b/c/deep.bin"), noise(300_000, 4))?;
    std::fs::write(root.join("run.sh"), b"#!/bin/sh\necho ran\n")?;
    std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(
        root.join("a/file.txt"),
        std::fs::Permissions::from_mode(0o600),
    )?;
    std::fs::set_permissions(root.join("a/b"), std::fs::Permissions::from_mode(0o750))?;
    std::os::unix::fs::symlink("a/file.txt", root.join("link"))?;
    std::os::unix::fs::symlink("/does/not/exist", root.join("dangling"))?;
    Ok(())
}

async fn directory_tree_round_trip(vm: &Sandbox) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let src = dir.path().join("src");
    make_tree(&src).map_err(|e| e.to_string())?;
    let s = vm.upload_dir(&src, "/root/tree").await.map_err(e2s)?;
    check_eq!((s.files, s.symlinks), (3, 2));
    check_eq!(out(vm, "/root/tree/run.sh").await?, "ran");
    check_eq!(out(vm, "readlink /root/tree/link").await?, "a/file.txt");
    check_eq!(
        out(vm, "stat -c %a /root/tree/a/file.txt /root/tree/a/b").await?,
        "600\n750"
    );
    check_eq!(out(vm, "ls -A /root/tree/empty | wc -l").await?, "0");
    let back = dir.path().join("back");
    let s = vm.download_dir("/root/tree", &back).await.map_err(e2s)?;
    check_eq!((s.files, s.symlinks), (3, 2));
    for f in ["a/file.txt", "a/b/c/deep.bin", "run.sh"] {
        check!(
            std::fs::read(src.join(f)).ok() == std::fs::read(back.join(f)).ok(),
            "{f} differs after the round trip"
        );
        let (m1, m2) = (
            std::fs::metadata(src.join(f)).map_err(|e| e.to_string())?,
            std::fs::metadata(back.join(f)).map_err(|e| e.to_string())?,
        );
        check!(m1.mode() & 0o777 == m2.mode() & 0o777, "mode of {f}");
        check!(m1.mtime() == m2.mtime(), "mtime of {f}");
    }
    check_eq!(
        std::fs::read_link(back.join("link")).map_err(|e| e.to_string())?,
        Path::new("a/file.txt")
    );
    check_eq!(
        std::fs::read_link(back.join("dangling")).map_err(|e| e.to_string())?,
        Path::new("/does/not/exist")
    );
    check!(back.join("empty").is_dir());
    check_eq!(
        std::fs::metadata(back.join("a/b"))
            .map_err(|e| e.to_string())?
            .mode()
            & 0o777,
        0o750
    );
    Ok(())
}

async fn downloaded_symlinks_never_escape(vm: &Sandbox) -> Result<(), String> {
    // A tree whose symlinks point at the host's /tmp and far above the
    // destination, including a directory symlink with files "inside".
    let marker = format!("smolvm-escape-{}", std::process::id());
    run(
        vm,
        &format!(
            "rm -rf /root/evil && mkdir -p /root/evil/sub /tmp/{marker} && \
             echo x > /tmp/{marker}/inside && ln -s /tmp /root/evil/tmp && \
             ln -s ../../../../../../../tmp /root/evil/sub/up && ln -s /tmp/{marker} /root/evil/dir && \
             echo ok > /root/evil/sub/real"
        ),
    )
    .await?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let dest = dir.path().join("dest");
    let before: Vec<String> = dir_entries(Path::new("/tmp"));
    let s = vm.download_dir("/root/evil", &dest).await.map_err(e2s)?;
    check_eq!((s.files, s.symlinks), (1, 3));
    for l in ["tmp", "sub/up", "dir"] {
        let md = std::fs::symlink_metadata(dest.join(l)).map_err(|e| e.to_string())?;
        check!(md.file_type().is_symlink(), "{l} was not kept as a symlink");
    }
    check!(
        !Path::new(&format!("/tmp/{marker}")).exists(),
        "something was written through a guest symlink into the host's /tmp"
    );
    let after: Vec<String> = dir_entries(Path::new("/tmp"));
    check!(
        after
            .iter()
            .all(|e| before.contains(e) || !e.contains("smolvm-escape")),
        "new /tmp entries: {:?}",
        after
            .iter()
            .filter(|e| !before.contains(e))
            .collect::<Vec<_>>()
    );
    // A download into an existing tree that holds a symlink where the
    // guest has a directory is refused, not followed.
    let trap = dir.path().join("trap");
    std::fs::create_dir_all(&trap).map_err(|e| e.to_string())?;
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).map_err(|e| e.to_string())?;
    std::os::unix::fs::symlink(&outside, trap.join("sub")).map_err(|e| e.to_string())?;
    let e = vm.download_dir("/root/evil", &trap).await.err();
    check!(
        e.is_some(),
        "writing through a local symlink was not refused"
    );
    check!(
        dir_entries(&outside).is_empty(),
        "something was written through it"
    );
    Ok(())
}

async fn filesystem_requests(vm: &Sandbox) -> Result<(), String> {
    vm.mkdir("/root/fs/x/y", true).await.map_err(e2s)?;
    check!(vm.exists("/root/fs/x/y").await.map_err(e2s)?);
    check!(!vm.exists("/root/fs/nope").await.map_err(e2s)?);
    let e = vm
        .mkdir("/root/fs/x/y", false)
        .await
        .err()
        .ok_or("mkdir twice")?;
    check_eq!(e.kind(), ErrorKind::PathExists);
    run(vm, "echo hi > /root/fs/x/f").await?;
    let st = vm.stat("/root/fs/x/f", false).await.map_err(e2s)?;
    check_eq!((st.kind, st.size), (FileKind::File, 3));
    let mut names: Vec<_> = vm
        .list_dir("/root/fs/x")
        .await
        .map_err(e2s)?
        .into_iter()
        .map(|e| (e.name, e.stat.kind))
        .collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    check_eq!(
        names,
        vec![
            ("f".to_string(), FileKind::File),
            ("y".to_string(), FileKind::Dir)
        ]
    );
    vm.rename("/root/fs/x/f", "/root/fs/x/g")
        .await
        .map_err(e2s)?;
    check_eq!(out(vm, "cat /root/fs/x/g").await?, "hi");
    let e = vm
        .remove("/root/fs/x", false)
        .await
        .err()
        .ok_or("rmdir of a full dir")?;
    check_eq!(e.kind(), ErrorKind::PathExists);
    vm.remove("/root/fs", true).await.map_err(e2s)?;
    check!(!vm.exists("/root/fs").await.map_err(e2s)?);
    let e = vm
        .stat("/root/fs", false)
        .await
        .err()
        .ok_or("stat of a removed path")?;
    check_eq!(e.kind(), ErrorKind::PathNotFound);
    for bad in ["relative/path", "./x", ""] {
        let e = vm.stat(bad, false).await.err().ok_or("a relative path")?;
        check_eq!(e.kind(), ErrorKind::InvalidInput);
        check!(e.to_string().contains("absolute"), "{e}");
    }
    vm.sync().await.map_err(e2s)?;
    Ok(())
}

async fn wait_for_a_guest_port(vm: &Sandbox) -> Result<(), String> {
    let e = vm
        .wait_for_port(8123, Duration::from_millis(500))
        .await
        .err()
        .ok_or("nothing listens yet")?;
    check_eq!(e.kind(), ErrorKind::Timeout);
    run(
        vm,
        "cd /tmp && (sleep 1; exec python3 -m http.server 8123 --bind 127.0.0.1) >/dev/null 2>&1 </dev/null & echo started",
    )
    .await?;
    vm.wait_for_port(8123, Duration::from_secs(60))
        .await
        .map_err(e2s)?;
    run(vm, "pkill -f 'http.server 8123' || true").await?;
    Ok(())
}

async fn persistent_env_holds_across_restart(vm: &Sandbox) -> Result<(), String> {
    let set = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    vm.set_env(set(&[("ALPHA", "1"), ("BETA", "two words")]), true)
        .await
        .map_err(e2s)?;
    check_eq!(out(vm, "echo \"$ALPHA|$BETA\"").await?, "1|two words");
    // Merge keeps the others; another handle (another process) sees it.
    let other = Sandbox::from_id(vm.id()).await.map_err(e2s)?;
    other
        .set_env(set(&[("GAMMA", "3")]), true)
        .await
        .map_err(e2s)?;
    check_eq!(
        out(vm, "echo \"$ALPHA|$BETA|$GAMMA\"").await?,
        "1|two words|3"
    );
    other.unset_env(vec!["BETA".into()]).await.map_err(e2s)?;
    check_eq!(
        out(vm, "echo \"$ALPHA|${BETA-unset}|$GAMMA\"").await?,
        "1|unset|3"
    );
    // A command's own variable wins.
    let o = vm
        .exec(
            sh("echo $ALPHA"),
            &ExecOptions {
                env: vec![("ALPHA".into(), "mine".into())],
                ..Default::default()
            },
        )
        .await
        .map_err(e2s)?;
    check_eq!(o.stdout, b"mine\n".to_vec());
    let e = vm
        .set_env(set(&[("1BAD", "x")]), true)
        .await
        .err()
        .ok_or("a bad key was taken")?;
    check_eq!(e.kind(), ErrorKind::InvalidInput);
    vm.stop(Duration::from_secs(10)).await.map_err(e2s)?;
    vm.start(BOOT).await.map_err(e2s)?;
    check_eq!(out(vm, "echo \"$ALPHA|$GAMMA\"").await?, "1|3");
    check_eq!(
        vm.env().await.map_err(e2s)?,
        set(&[("ALPHA", "1"), ("GAMMA", "3")])
    );
    // Replace drops the rest.
    vm.set_env(set(&[("ONLY", "y")]), false)
        .await
        .map_err(e2s)?;
    check_eq!(vm.env().await.map_err(e2s)?, set(&[("ONLY", "y")]));
    Ok(())
}

async fn pty_has_a_terminal_that_resizes(vm: &Sandbox) -> Result<(), String> {
    let mut s = vm
        .exec_stream(
            sh("tty; stty size; read x; stty size; exit 6"),
            &ExecOptions {
                pty: Some((24, 80)),
                ..Default::default()
            },
        )
        .await
        .map_err(e2s)?;
    let mut text = String::new();
    let mut resized = false;
    let code = loop {
        match s.next().await.map_err(|e| e.to_string())? {
            Some(ExecEvent::Stdout(b)) => text.push_str(&String::from_utf8_lossy(&b)),
            Some(ExecEvent::Started { .. }) => {}
            Some(ExecEvent::Exited(st)) => break st.code,
            other => return Err(format!("unexpected {other:?} (got {text:?})")),
        }
        if !resized && text.contains("24 80") {
            s.resize(50, 132).await.map_err(|e| e.to_string())?;
            s.write_stdin(b"\r").await.map_err(|e| e.to_string())?;
            resized = true;
        }
    };
    check!(text.starts_with("/dev/pts/"), "{text:?}");
    check!(
        text.contains("50 132"),
        "the resize did not reach the terminal: {text:?}"
    );
    check_eq!(code, Some(6));
    Ok(())
}

async fn background_process_outlives_its_client(vm: &Sandbox) -> Result<(), String> {
    // Started from a handle (a connection) that then goes away.
    let handle = {
        let first = Sandbox::from_id(vm.id()).await.map_err(e2s)?;
        let sp = first
            .spawn(sh("echo up; exec sleep 1000"), &ExecOptions::default())
            .await
            .map_err(e2s)?;
        sp.handle
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A new client re-attaches, reads what it printed, signals it, sees it end.
    let second = Sandbox::from_id(vm.id()).await.map_err(e2s)?;
    let listed = second.processes().await.map_err(e2s)?;
    let p = listed
        .iter()
        .find(|p| p.handle == handle)
        .ok_or("the background process is not listed")?;
    check!(p.exit.is_none(), "it should still run: {p:?}");
    let mut s = second.attach(handle, Some(0)).await.map_err(e2s)?;
    let mut got = Vec::new();
    let mut signalled = false;
    let exit = loop {
        match s.next().await.map_err(|e| e.to_string())? {
            Some(ExecEvent::Attached { dropped, .. }) => check_eq!(dropped, 0),
            Some(ExecEvent::Stdout(b)) => got.extend(b),
            Some(ExecEvent::Exited(st)) => break st,
            other => return Err(format!("unexpected {other:?}")),
        }
        if !signalled && got == b"up\n" {
            second.signal_process(handle, 15).await.map_err(e2s)?;
            signalled = true;
        }
    };
    check_eq!(exit.signal, Some(15));
    second.forget_process(handle).await.map_err(e2s)?;
    let e = second
        .signal_process(handle, 9)
        .await
        .err()
        .ok_or("a forgotten handle")?;
    check_eq!(e.kind(), ErrorKind::ProcessNotFound);
    Ok(())
}

fn main() {
    let filters = filter();
    let cases = cases![Sandbox:
        output_streams_as_it_is_produced,
        stdin_round_trip,
        hundred_mib_up_and_down,
        directory_tree_round_trip,
        downloaded_symlinks_never_escape,
        filesystem_requests,
        wait_for_a_guest_port,
        pty_has_a_terminal_that_resizes,
        background_process_outlives_its_client,
        undrained_stream_for_60s_loses_nothing,
        persistent_env_holds_across_restart,
    ];
    list_if_asked(&case_names(&cases));
    let data = isolated_data_dir("smolvm-surface-");
    let rt = runtime();
    let code = rt.block_on(async {
        let vm = match Sandbox::create(SandboxConfig::default()).await {
            Ok(vm) => vm,
            Err(e) => {
                eprintln!("cannot create the shared VM: {}", smolvm::error::chain(&e));
                return summary(0, &["setup".to_string()]);
            }
        };
        if let Err(e) = vm.start(BOOT).await {
            eprintln!("cannot boot the shared VM: {}", smolvm::error::chain(&e));
            let _ = vm.delete().await;
            return summary(0, &["setup".to_string()]);
        }
        let (passed, mut failed) = run_cases(
            &cases,
            &vm,
            &filters,
            Some(Duration::from_secs(300)),
            || async {},
        )
        .await;
        if let Err(e) = vm.delete().await {
            eprintln!("cannot delete the shared VM: {e}");
            failed.push("teardown".into());
        }
        summary(passed, &failed)
    });
    drop(rt);
    drop(data);
    std::process::exit(code);
}
