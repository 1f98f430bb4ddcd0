//! Per-stream flow control and the file/filesystem requests, end to end on
//! the host against `smolvm-agent --stdio`.

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use common::{argv, data_bytes, noise, process_gone, scratch, shell, stdio_agent, WAIT};
use smolvm_proto::{
    Bytes, ErrorKind, FileKind, GuestMsg, HostMsg, OpReply, OpRequest, ReadFileRequest,
    WriteFileRequest, STREAM_WINDOW,
};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

fn terminal(m: &[GuestMsg]) -> bool {
    m.last().is_some_and(GuestMsg::is_terminal)
}

#[test]
fn an_undrained_stream_stalls_only_itself_and_loses_nothing() {
    let mut a = stdio_agent();
    a.hold(1);
    a.send(
        1,
        HostMsg::Exec(shell("head -c 5000000 /dev/zero; echo done >&2")),
    );
    // It sends its window and stops.
    a.wait_until(1, WAIT, |m| data_bytes(m) >= u64::from(STREAM_WINDOW));
    // Meanwhile other streams on the same connection run freely.
    for i in 0..50u32 {
        let o = a.exec(100 + i, argv(&["echo", "hi"]));
        assert_eq!(o.stdout, b"hi\n");
        a.ping(1000 + i, u64::from(i));
    }
    std::thread::sleep(Duration::from_millis(300));
    let msgs = a.wait_until(1, WAIT, |_| true);
    assert_eq!(
        data_bytes(&msgs),
        u64::from(STREAM_WINDOW),
        "a held stream never gets past its window"
    );
    assert!(!terminal(&msgs), "the held command cannot finish");
    // Drain it: grant as we go; everything arrives, in order.
    let mut granted = u64::from(STREAM_WINDOW);
    loop {
        let msgs = a.wait_until(1, WAIT, |m| terminal(m) || data_bytes(m) >= granted);
        if terminal(&msgs) {
            break;
        }
        a.grant(1, 64 * 1024);
        granted += 64 * 1024;
    }
    let o = a.finish(1);
    assert_eq!(o.stdout.len(), 5_000_000);
    assert!(o.stdout.iter().all(|b| *b == 0));
    assert_eq!(o.stderr, b"done\n");
    assert_eq!(o.exit().code, Some(0));
}

#[test]
fn input_past_credit_is_refused_and_other_streams_go_on() {
    let mut a = stdio_agent();
    // A reader that starts late: what the agent accepts is its window plus
    // the little it could pass on into the pipe meanwhile.
    let mut req = shell("sleep 1; wc -c");
    req.stdin = true;
    a.send(1, HostMsg::Exec(req));
    // Ignore the credit: 5 windows at once.
    let chunk = vec![7u8; 64 * 1024];
    for _ in 0..(5 * STREAM_WINDOW as usize / chunk.len()) {
        a.send(1, HostMsg::Data(Bytes(chunk.clone())));
    }
    a.send(1, HostMsg::Eof);
    let o = a.finish(1);
    let n: u64 = o.stdout_str().trim().parse().unwrap();
    assert!(
        n <= 2 * u64::from(STREAM_WINDOW),
        "the agent took {n} bytes past a {STREAM_WINDOW}-byte window"
    );
    let o = a.exec(2, argv(&["echo", "fine"]));
    assert_eq!(o.stdout, b"fine\n");
}

#[test]
fn stdin_credit_comes_back_as_the_process_reads() {
    let mut a = stdio_agent();
    let mut req = argv(&["wc", "-c"]);
    req.stdin = true;
    a.send(1, HostMsg::Exec(req));
    let data = noise(5 * 1024 * 1024, 3);
    a.send_input(1, &data);
    a.send(1, HostMsg::Eof);
    let o = a.finish(1);
    assert_eq!(o.stdout_str().trim(), "5242880");
    assert!(a.credit_in(1) >= 5 * 1024 * 1024 - u64::from(STREAM_WINDOW));
}

#[test]
fn cancel_kills_the_process_and_ends_the_stream_silently() {
    let mut a = stdio_agent();
    a.send(1, HostMsg::Exec(argv(&["sleep", "100"])));
    let msgs = a.wait_until(1, WAIT, |m| !m.is_empty());
    let GuestMsg::Started { pid } = msgs[0] else {
        panic!("{msgs:?}")
    };
    a.send(1, HostMsg::Cancel);
    assert!(process_gone(pid, WAIT), "cancel must kill the process");
    // A cancelled stream that was held (waiting for credit) ends too.
    a.hold(2);
    a.send(2, HostMsg::Exec(shell("head -c 5000000 /dev/zero")));
    a.wait_until(2, WAIT, |m| data_bytes(m) >= u64::from(STREAM_WINDOW));
    a.send(2, HostMsg::Cancel);
    std::thread::sleep(Duration::from_millis(300));
    for s in [1, 2] {
        let m = a.wait_until(s, WAIT, |_| true);
        assert!(!terminal(&m), "nothing follows a cancel: {m:?}");
    }
    // The ids are free again.
    let o = a.exec(3, argv(&["true"]));
    assert_eq!(o.exit().code, Some(0));
    a.send(1, HostMsg::Exec(argv(&["true"])));
    let m = a.wait_until(1, WAIT, terminal);
    assert!(matches!(m.last(), Some(GuestMsg::Exited(e)) if e.code == Some(0)));
}

fn write_file(
    a: &mut common::Conn,
    stream: u32,
    path: &str,
    data: &[u8],
    mode: u32,
    mtime_ns: Option<i64>,
) -> Vec<GuestMsg> {
    a.send(
        stream,
        HostMsg::WriteFile(WriteFileRequest {
            path: path.into(),
            mode,
            mtime_ns,
            make_dirs: true,
        }),
    );
    a.send_input(stream, data);
    a.send(stream, HostMsg::Eof);
    a.wait_until(stream, WAIT, terminal)
}

fn op(a: &mut common::Conn, stream: u32, req: OpRequest) -> Vec<GuestMsg> {
    a.send(stream, HostMsg::Op(req));
    a.wait_until(stream, WAIT, terminal)
}

fn error_kind(m: &[GuestMsg]) -> Option<ErrorKind> {
    match m.last() {
        Some(GuestMsg::Error(e)) => Some(e.kind),
        _ => None,
    }
}

#[test]
fn files_up_and_down_keep_bytes_mode_and_mtime() {
    let mut a = stdio_agent();
    let dir = scratch("files");
    let d = dir.to_str().unwrap().to_string();
    let data = noise(3 * 1024 * 1024 + 17, 11);
    let path = format!("{d}/sub/deeper/blob.bin");
    let mtime = 1_600_000_000_123_456_789i64;
    let m = write_file(&mut a, 1, &path, &data, 0o640, Some(mtime));
    assert_eq!(
        m.last(),
        Some(&GuestMsg::Done {
            bytes: data.len() as u64
        })
    );
    assert!(std::fs::read(&path).unwrap() == data);
    let md = std::fs::metadata(&path).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o640);
    assert_eq!(md.mtime() * 1_000_000_000 + md.mtime_nsec(), mtime);
    // No temporary file is left beside it.
    let names: Vec<_> = std::fs::read_dir(format!("{d}/sub/deeper"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["blob.bin"]);

    a.send(2, HostMsg::ReadFile(ReadFileRequest { path: path.clone() }));
    let m = a.wait_until(2, WAIT, terminal);
    let GuestMsg::FileStart(st) = &m[0] else {
        panic!("{:?}", &m[..1])
    };
    assert_eq!(
        (st.kind, st.size, st.mode),
        (FileKind::File, data.len() as u64, 0o640)
    );
    let got: Vec<u8> = m
        .iter()
        .filter_map(|m| match m {
            GuestMsg::FileData(b) => Some(b.0.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert!(got == data);
    assert_eq!(
        m.last(),
        Some(&GuestMsg::Done {
            bytes: data.len() as u64
        })
    );

    // Relative paths, directories and missing files are refused clearly.
    a.send(
        3,
        HostMsg::ReadFile(ReadFileRequest {
            path: "rel/x".into(),
        }),
    );
    assert_eq!(
        error_kind(&a.wait_until(3, WAIT, terminal)),
        Some(ErrorKind::InvalidRequest)
    );
    a.send(4, HostMsg::ReadFile(ReadFileRequest { path: d.clone() }));
    assert_eq!(
        error_kind(&a.wait_until(4, WAIT, terminal)),
        Some(ErrorKind::InvalidRequest)
    );
    a.send(
        5,
        HostMsg::ReadFile(ReadFileRequest {
            path: format!("{d}/nope"),
        }),
    );
    assert_eq!(
        error_kind(&a.wait_until(5, WAIT, terminal)),
        Some(ErrorKind::NotFound)
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_cancelled_upload_leaves_the_destination_as_it_was() {
    let mut a = stdio_agent();
    let dir = scratch("cancel-up");
    let path = dir.join("keep.txt");
    std::fs::write(&path, b"original").unwrap();
    let p = path.to_str().unwrap().to_string();
    a.send(
        1,
        HostMsg::WriteFile(WriteFileRequest {
            path: p.clone(),
            mode: 0o644,
            mtime_ns: None,
            make_dirs: false,
        }),
    );
    a.send_input(1, &noise(100_000, 1));
    a.send(1, HostMsg::Cancel);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(std::fs::read(&path).unwrap(), b"original");
    let names: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(names.len(), 1, "the temporary file is removed");
    // Writing over a directory is refused before any data is taken.
    let m = write_file(&mut a, 2, dir.to_str().unwrap(), b"x", 0o644, None);
    assert_eq!(error_kind(&m), Some(ErrorKind::InvalidRequest));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn filesystem_ops() {
    let mut a = stdio_agent();
    let dir = scratch("ops");
    let d = dir.to_str().unwrap().to_string();
    assert_eq!(
        op(
            &mut a,
            1,
            OpRequest::Mkdir {
                path: format!("{d}/a/b"),
                parents: true,
                mode: 0o750
            }
        )
        .last(),
        Some(&GuestMsg::Op(OpReply::Ok))
    );
    let m = op(
        &mut a,
        2,
        OpRequest::Mkdir {
            path: format!("{d}/a/b"),
            parents: false,
            mode: 0o750,
        },
    );
    assert_eq!(error_kind(&m), Some(ErrorKind::AlreadyExists));
    std::fs::write(format!("{d}/a/f"), b"12345").unwrap();
    assert!(matches!(
        op(
            &mut a,
            3,
            OpRequest::Symlink {
                path: format!("{d}/a/l"),
                target: "../../etc".into()
            }
        )
        .last(),
        Some(GuestMsg::Op(OpReply::Ok))
    ));
    let m = op(
        &mut a,
        4,
        OpRequest::Stat {
            path: format!("{d}/a/l"),
            follow: false,
        },
    );
    let Some(GuestMsg::Op(OpReply::Stat(st))) = m.last() else {
        panic!("{m:?}")
    };
    assert_eq!(st.kind, FileKind::Symlink);
    assert_eq!(st.link_target.as_deref(), Some("../../etc"));
    let m = op(
        &mut a,
        5,
        OpRequest::Stat {
            path: format!("{d}/a/b"),
            follow: true,
        },
    );
    let Some(GuestMsg::Op(OpReply::Stat(st))) = m.last() else {
        panic!("{m:?}")
    };
    assert_eq!((st.kind, st.mode), (FileKind::Dir, 0o750));

    // List: every entry once, with its kind; the reply ends the listing.
    for i in 0..2000 {
        std::fs::write(format!("{d}/a/b/file-{i:04}-{}", "x".repeat(100)), b"").unwrap();
    }
    let m = op(
        &mut a,
        6,
        OpRequest::List {
            path: format!("{d}/a"),
        },
    );
    let names: Vec<_> = m
        .iter()
        .filter_map(|m| match m {
            GuestMsg::Entries(e) => Some(e.clone()),
            _ => None,
        })
        .flatten()
        .map(|e| (e.name, e.stat.kind))
        .collect();
    let mut sorted = names.clone();
    sorted.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        sorted,
        [
            ("b".to_string(), FileKind::Dir),
            ("f".to_string(), FileKind::File),
            ("l".to_string(), FileKind::Symlink)
        ]
    );
    let m = op(
        &mut a,
        7,
        OpRequest::List {
            path: format!("{d}/a/b"),
        },
    );
    let n: usize = m
        .iter()
        .map(|m| match m {
            GuestMsg::Entries(e) => e.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(n, 2000, "a big listing arrives whole, in several frames");
    assert!(
        m.iter()
            .filter(|m| matches!(m, GuestMsg::Entries(_)))
            .count()
            > 1
    );

    assert!(matches!(
        op(
            &mut a,
            8,
            OpRequest::Rename {
                from: format!("{d}/a/f"),
                to: format!("{d}/a/g")
            }
        )
        .last(),
        Some(GuestMsg::Op(OpReply::Ok))
    ));
    assert_eq!(std::fs::read(format!("{d}/a/g")).unwrap(), b"12345");
    let m = op(
        &mut a,
        9,
        OpRequest::Remove {
            path: format!("{d}/a/b"),
            recursive: false,
        },
    );
    assert_eq!(error_kind(&m), Some(ErrorKind::NotEmpty));
    // Recursive removal unlinks the symlink, never what it points to.
    let outside = scratch("ops-outside");
    std::fs::write(outside.join("precious"), b"keep").unwrap();
    std::os::unix::fs::symlink(&outside, format!("{d}/a/b/escape")).unwrap();
    assert!(matches!(
        op(
            &mut a,
            10,
            OpRequest::Remove {
                path: format!("{d}/a"),
                recursive: true
            }
        )
        .last(),
        Some(GuestMsg::Op(OpReply::Ok))
    ));
    assert!(!std::path::Path::new(&format!("{d}/a")).exists());
    assert_eq!(std::fs::read(outside.join("precious")).unwrap(), b"keep");
    let m = op(
        &mut a,
        11,
        OpRequest::Stat {
            path: format!("{d}/a"),
            follow: false,
        },
    );
    assert_eq!(error_kind(&m), Some(ErrorKind::NotFound));
    assert_eq!(
        error_kind(&op(
            &mut a,
            12,
            OpRequest::Mkdir {
                path: "relative".into(),
                parents: true,
                mode: 0o755
            }
        )),
        Some(ErrorKind::InvalidRequest)
    );
    assert!(matches!(
        op(&mut a, 13, OpRequest::Sync).last(),
        Some(GuestMsg::Op(OpReply::Ok))
    ));

    // PortOpen sees a listener on loopback, and its absence.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    assert_eq!(
        op(&mut a, 14, OpRequest::PortOpen { port }).last(),
        Some(&GuestMsg::Op(OpReply::PortOpen(true)))
    );
    drop(l);
    assert_eq!(
        op(&mut a, 15, OpRequest::PortOpen { port }).last(),
        Some(&GuestMsg::Op(OpReply::PortOpen(false)))
    );
    std::fs::remove_dir_all(dir).unwrap();
    std::fs::remove_dir_all(outside).unwrap();
}

#[test]
fn a_pty_exec_has_a_terminal_that_resizes() {
    let mut a = stdio_agent();
    let mut req = shell("tty; stty size; read x; stty size; echo \"got $x\"; exit 7");
    req.pty = Some(smolvm_proto::PtySize { rows: 24, cols: 80 });
    a.send(1, HostMsg::Exec(req));
    let text = |m: &[GuestMsg]| {
        String::from_utf8_lossy(
            &m.iter()
                .filter_map(|m| match m {
                    GuestMsg::Stdout(b) => Some(b.0.clone()),
                    _ => None,
                })
                .flatten()
                .collect::<Vec<u8>>(),
        )
        .into_owned()
    };
    let m = a.wait_until(1, WAIT, |m| text(m).contains("24 80"));
    assert!(text(&m).starts_with("/dev/pts/"), "{:?}", text(&m));
    a.send(
        1,
        HostMsg::Resize(smolvm_proto::PtySize {
            rows: 50,
            cols: 132,
        }),
    );
    a.send_input(1, b"hello\r");
    let m = a.wait_until(1, WAIT, terminal);
    let t = text(&m);
    assert!(t.contains("50 132"), "{t:?}");
    assert!(t.contains("got hello"), "{t:?}");
    // Everything came as stdout; the terminal echoed the input.
    assert!(!m.iter().any(|m| matches!(m, GuestMsg::Stderr(_))));
    assert!(t.contains("hello\r\n"), "{t:?}");
    assert!(matches!(m.last(), Some(GuestMsg::Exited(e)) if e.code == Some(7)));

    // Ctrl-C on the terminal interrupts the foreground process, not us.
    let mut req = shell("trap 'echo INT; exit 3' INT; echo ready; while :; do sleep 0.1; done");
    req.pty = Some(smolvm_proto::PtySize { rows: 24, cols: 80 });
    a.send(2, HostMsg::Exec(req));
    a.wait_until(2, WAIT, |m| text(m).contains("ready"));
    a.send_input(2, &[3]);
    let m = a.wait_until(2, WAIT, terminal);
    assert!(text(&m).contains("INT"), "{:?}", text(&m));
    assert!(matches!(m.last(), Some(GuestMsg::Exited(e)) if e.code == Some(3)));
}

fn spawned(m: &[GuestMsg]) -> u64 {
    match m.last() {
        Some(GuestMsg::Spawned { handle, .. }) => *handle,
        other => panic!("not spawned: {other:?}"),
    }
}

fn out_of(m: &[GuestMsg]) -> Vec<u8> {
    m.iter()
        .filter_map(|m| match m {
            GuestMsg::Stdout(b) | GuestMsg::Stderr(b) => Some(b.0.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

#[test]
fn background_processes_outlive_streams_and_replay_their_output() {
    let mut a = stdio_agent();
    // Output and exit, replayed from the start after the fact.
    a.send(
        1,
        HostMsg::Spawn(shell(
            "for i in 1 2 3; do echo $i; done; echo e >&2; exit 3",
        )),
    );
    let h = spawned(&a.wait_until(1, WAIT, terminal));
    std::thread::sleep(Duration::from_millis(500));
    a.send(
        2,
        HostMsg::Attach(smolvm_proto::AttachRequest {
            handle: h,
            from: Some(0),
        }),
    );
    let m = a.wait_until(2, WAIT, terminal);
    assert_eq!(
        m[0],
        GuestMsg::Attached {
            offset: 0,
            dropped: 0
        }
    );
    assert_eq!(out_of(&m), b"1\n2\n3\ne\n");
    assert!(matches!(m.last(), Some(GuestMsg::Exited(e)) if e.code == Some(3)));

    // More output than the buffer holds: the replay says what was dropped.
    a.send(3, HostMsg::Spawn(shell("head -c 3000000 /dev/zero")));
    let h2 = spawned(&a.wait_until(3, WAIT, terminal));
    std::thread::sleep(Duration::from_secs(1));
    a.send(
        4,
        HostMsg::Attach(smolvm_proto::AttachRequest {
            handle: h2,
            from: Some(0),
        }),
    );
    let m = a.wait_until(4, WAIT, terminal);
    let GuestMsg::Attached { offset, dropped } = m[0] else {
        panic!("{:?}", m[0])
    };
    assert_eq!(offset, dropped);
    assert!(dropped >= 3_000_000 - 1024 * 1024, "dropped {dropped}");
    assert_eq!(out_of(&m).len() as u64, 3_000_000 - offset);

    // stdin by ProcStdin; a long-running one is listed, signalled, ends.
    let mut cat = argv(&["cat"]);
    cat.stdin = true;
    a.send(5, HostMsg::Spawn(cat));
    let h3 = spawned(&a.wait_until(5, WAIT, terminal));
    a.send(
        6,
        HostMsg::Op(OpRequest::ProcStdin {
            handle: h3,
            data: Bytes(b"hello\n".to_vec()),
            eof: true,
        }),
    );
    assert_eq!(
        a.wait_until(6, WAIT, terminal).last(),
        Some(&GuestMsg::Op(OpReply::Written(6)))
    );
    a.send(
        7,
        HostMsg::Attach(smolvm_proto::AttachRequest {
            handle: h3,
            from: Some(0),
        }),
    );
    let m = a.wait_until(7, WAIT, terminal);
    assert_eq!(out_of(&m), b"hello\n");

    // Without stdin asked for, its stdin is /dev/null: a reader ends at once.
    a.send(15, HostMsg::Spawn(shell("cat; echo eof-seen")));
    let h5 = spawned(&a.wait_until(15, WAIT, terminal));
    a.send(
        16,
        HostMsg::Attach(smolvm_proto::AttachRequest {
            handle: h5,
            from: Some(0),
        }),
    );
    assert_eq!(out_of(&a.wait_until(16, WAIT, terminal)), b"eof-seen\n");
    a.send(8, HostMsg::Spawn(argv(&["sleep", "1000"])));
    let h4 = spawned(&a.wait_until(8, WAIT, terminal));
    // An attach that is cancelled leaves the process running.
    a.send(
        9,
        HostMsg::Attach(smolvm_proto::AttachRequest {
            handle: h4,
            from: None,
        }),
    );
    a.wait_until(9, WAIT, |m| !m.is_empty());
    a.send(9, HostMsg::Cancel);
    let m = op(&mut a, 10, OpRequest::Procs);
    let Some(GuestMsg::Op(OpReply::Procs(ps))) = m.last() else {
        panic!("{m:?}")
    };
    let p = ps.iter().find(|p| p.handle == h4).expect("listed");
    assert!(p.exit.is_none() && p.command.contains("sleep"));
    assert!(ps
        .iter()
        .any(|p| p.handle == h && p.exit.as_ref().and_then(|e| e.code) == Some(3)));
    a.send(
        11,
        HostMsg::Attach(smolvm_proto::AttachRequest {
            handle: h4,
            from: None,
        }),
    );
    op(
        &mut a,
        12,
        OpRequest::ProcSignal {
            handle: h4,
            signal: 15,
        },
    );
    let m = a.wait_until(11, WAIT, terminal);
    assert!(matches!(m.last(), Some(GuestMsg::Exited(e)) if e.signal == Some(15)));
    assert!(matches!(
        op(&mut a, 13, OpRequest::ProcForget { handle: h4 }).last(),
        Some(GuestMsg::Op(OpReply::Ok))
    ));
    assert_eq!(
        error_kind(&op(
            &mut a,
            14,
            OpRequest::ProcSignal {
                handle: h4,
                signal: 9
            }
        )),
        Some(ErrorKind::NotFound)
    );
}
