//! Files and filesystem requests: `ReadFile`, `WriteFile` and `Op`.
//!
//! Each request runs on its own thread (a slow disk or a large directory
//! must never stall the channel's reader) and sends data only against the
//! stream's credit, like an exec's output.

use crate::streams::{Credit, InMsg, InputRx, Streams};
use crate::sys::{cstr, cvt, os_message};
use crate::writer::Outbox;
use smolvm_proto::{
    Bytes, DirEntry, ErrorInfo, ErrorKind, FileKind, FileStat, GuestMsg, OpReply, OpRequest,
    ReadFileRequest, WriteFileRequest, MAX_CHUNK_LEN,
};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Longest path accepted (Linux's PATH_MAX).
const MAX_PATH: usize = 4096;
/// Directory entries per `Entries` frame at most (by wire cost).
const ENTRIES_BATCH_COST: u64 = 48 * 1024;
/// How long `PortOpen` tries to connect.
const PORT_PROBE_TIMEOUT: Duration = Duration::from_millis(500);

fn err(kind: ErrorKind, msg: impl Into<String>) -> ErrorInfo {
    ErrorInfo::new(kind, msg)
}

/// An OS error about `path`, with the kind a caller can act on.
pub fn io_error(path: &str, e: &io::Error) -> ErrorInfo {
    let kind = match e.raw_os_error() {
        Some(libc::ENOENT) => ErrorKind::NotFound,
        Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => ErrorKind::PermissionDenied,
        Some(libc::EEXIST) => ErrorKind::AlreadyExists,
        Some(libc::ENOTEMPTY) => ErrorKind::NotEmpty,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorKind::NoSpace,
        Some(libc::EISDIR) | Some(libc::ENOTDIR) | Some(libc::EINVAL) | Some(libc::ELOOP) => {
            ErrorKind::InvalidRequest
        }
        _ => ErrorKind::Other,
    };
    err(kind, format!("{path}: {}", os_message(e)))
}

/// A guest path from the host: absolute, no NUL, bounded.
fn check_path(path: &str) -> Result<&Path, ErrorInfo> {
    if !path.starts_with('/') {
        return Err(err(
            ErrorKind::InvalidRequest,
            format!("{path:?} is not an absolute path"),
        ));
    }
    if path.contains('\0') || path.len() > MAX_PATH {
        return Err(err(
            ErrorKind::InvalidRequest,
            "the path contains a NUL byte or is too long",
        ));
    }
    Ok(Path::new(path))
}

fn stat_of(md: &fs::Metadata, path: &Path) -> FileStat {
    let ft = md.file_type();
    let kind = if ft.is_symlink() {
        FileKind::Symlink
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    };
    let link_target = if ft.is_symlink() {
        fs::read_link(path)
            .ok()
            .map(|t| t.to_string_lossy().into_owned())
    } else {
        None
    };
    FileStat {
        kind,
        size: md.size(),
        mode: md.mode() & 0o7777,
        mtime_ns: md
            .mtime()
            .saturating_mul(1_000_000_000)
            .saturating_add(md.mtime_nsec()),
        link_target,
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), ErrorInfo> {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(128 * 1024)
        .spawn(f)
        .map(drop)
        .map_err(|e| err(ErrorKind::Busy, format!("cannot start a thread: {e}")))
}

/// Starts a `ReadFile`: `FileStart`, `FileData`..., `Done`.
pub fn read_file(
    streams: &Arc<Streams>,
    stream: u32,
    req: ReadFileRequest,
    out: &Outbox,
) -> Result<(), ErrorInfo> {
    let path = check_path(&req.path)?.to_path_buf();
    // Only regular files are opened (opening a device can act on it).
    let pre = fs::metadata(&path).map_err(|e| io_error(&req.path, &e))?;
    let (file, md) = if pre.is_file() {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
            .open(&path)
            .map_err(|e| io_error(&req.path, &e))?;
        let md = file.metadata().map_err(|e| io_error(&req.path, &e))?;
        (Some(file), md)
    } else {
        (None, pre)
    };
    if !md.is_file() {
        let what = if md.is_dir() {
            "is a directory (download it as a directory)"
        } else {
            "is not a regular file"
        };
        return Err(err(
            ErrorKind::InvalidRequest,
            format!("{}: {what}", req.path),
        ));
    }
    let Some(file) = file else {
        return Err(err(
            ErrorKind::InvalidRequest,
            format!("{}: is not a regular file", req.path),
        ));
    };
    let (slot, credit, _) = streams.open(stream, true, false, out)?;
    let Some(credit) = credit else {
        streams.close(slot);
        return Err(err(ErrorKind::Other, "no credit for the stream"));
    };
    let (out, me) = (out.clone(), Arc::clone(streams));
    let stat = stat_of(&md, &path);
    let r = spawn(&format!("read-{stream}"), move || {
        let end = send_file(file, stat, &credit, stream, &out, &req.path);
        me.close(slot);
        match end {
            Some(Ok(n)) => out.send(stream, GuestMsg::Done { bytes: n }),
            Some(Err(e)) => out.send(stream, GuestMsg::Error(e)),
            None => {} // cancelled
        }
    });
    if r.is_err() {
        streams.close(slot);
    }
    r
}

fn send_file(
    mut file: File,
    stat: FileStat,
    credit: &Credit,
    stream: u32,
    out: &Outbox,
    path: &str,
) -> Option<Result<u64, ErrorInfo>> {
    // Regular files never block, O_NONBLOCK or not; it only kept the open
    // from hanging on a FIFO.
    if !credit.send(out, stream, GuestMsg::FileStart(stat)) {
        return None;
    }
    let mut buf = vec![0u8; MAX_CHUNK_LEN];
    let mut total = 0u64;
    loop {
        if !credit.wait() {
            return None;
        }
        let want = credit.take(buf.len());
        match file.read(&mut buf[..want]) {
            Ok(0) => {
                credit.untake(want);
                return Some(Ok(total));
            }
            Ok(n) => {
                credit.untake(want - n);
                total += n as u64;
                out.send(stream, GuestMsg::FileData(Bytes(buf[..n].to_vec())));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => credit.untake(want),
            Err(e) => return Some(Err(io_error(path, &e))),
        }
    }
}

static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Starts a `WriteFile`: takes `Data` until `Eof`, then commits.
pub fn write_file(
    streams: &Arc<Streams>,
    stream: u32,
    req: WriteFileRequest,
    out: &Outbox,
) -> Result<(), ErrorInfo> {
    let path = check_path(&req.path)?.to_path_buf();
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(err(
            ErrorKind::InvalidRequest,
            format!("{}: not a file path", req.path),
        ));
    };
    if req.make_dirs {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(|e| io_error(&parent.to_string_lossy(), &e))?;
    }
    if let Ok(md) = fs::symlink_metadata(&path) {
        if md.is_dir() {
            return Err(err(
                ErrorKind::InvalidRequest,
                format!("{}: is a directory", req.path),
            ));
        }
    }
    // Short, whatever the name's length (a long name plus a suffix could
    // pass NAME_MAX).
    let _ = name;
    let tmp = parent.join(format!(
        ".smolvm-upload-{}-{}",
        std::process::id(),
        TEMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| io_error(&req.path, &e))?;
    let (slot, _, input) = match streams.open(stream, false, true, out) {
        Ok(x) => x,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let Some(input) = input else {
        let _ = fs::remove_file(&tmp);
        streams.close(slot);
        return Err(err(ErrorKind::Other, "no input for the stream"));
    };
    let (out, me) = (out.clone(), Arc::clone(streams));
    let t = tmp.clone();
    let r = spawn(&format!("write-{stream}"), move || {
        let end = receive_file(file, input, &t, &path, &req);
        if !matches!(end, Some(Ok(_))) {
            let _ = fs::remove_file(&t);
        }
        me.close(slot);
        match end {
            Some(Ok(n)) => out.send(stream, GuestMsg::Done { bytes: n }),
            Some(Err(e)) => out.send(stream, GuestMsg::Error(e)),
            None => {}
        }
    });
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
        streams.close(slot);
    }
    r
}

fn receive_file(
    mut file: File,
    mut input: InputRx,
    tmp: &Path,
    path: &PathBuf,
    req: &WriteFileRequest,
) -> Option<Result<u64, ErrorInfo>> {
    let mut total = 0u64;
    loop {
        match input.recv() {
            Some(InMsg::Data(b)) => {
                if let Err(e) = file.write_all(&b) {
                    return Some(Err(io_error(&req.path, &e)));
                }
                total += b.len() as u64;
                input.consumed(b.len());
            }
            Some(InMsg::Eof) => break,
            Some(InMsg::Violation) => {
                return Some(Err(err(
                    ErrorKind::FlowControl,
                    "the host sent data past its credit",
                )))
            }
            Some(InMsg::Cancel) | None => return None,
        }
    }
    let commit = || -> io::Result<()> {
        file.sync_data()?;
        file.set_permissions(fs::Permissions::from_mode(req.mode & 0o7777))?;
        if let Some(ns) = req.mtime_ns {
            set_mtime_fd(&file, ns)?;
        }
        fs::rename(tmp, path)
    };
    Some(
        commit()
            .map(|()| total)
            .map_err(|e| io_error(&req.path, &e)),
    )
}

fn timespecs(mtime_ns: i64) -> [libc::timespec; 2] {
    [
        // atime: leave as is.
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: mtime_ns.div_euclid(1_000_000_000),
            tv_nsec: mtime_ns.rem_euclid(1_000_000_000),
        },
    ]
}

fn set_mtime_fd(f: &File, mtime_ns: i64) -> io::Result<()> {
    let ts = timespecs(mtime_ns);
    // SAFETY: a valid fd and a valid array of two timespecs.
    cvt(unsafe { libc::futimens(f.as_raw_fd(), ts.as_ptr()) }).map(drop)
}

fn set_mtime_path(path: &str, mtime_ns: i64) -> io::Result<()> {
    let c = cstr(path)?;
    let ts = timespecs(mtime_ns);
    // SAFETY: a valid C string and a valid array of two timespecs.
    cvt(unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// Starts an `Op` on its own thread; its reply ends the stream.
pub fn op(
    streams: &Arc<Streams>,
    stream: u32,
    req: OpRequest,
    out: &Outbox,
) -> Result<(), ErrorInfo> {
    // Listings send data: they need credit, and the stream's slot.
    let (slot, credit, _) =
        streams.open(stream, matches!(req, OpRequest::List { .. }), false, out)?;
    let (out, me) = (out.clone(), Arc::clone(streams));
    let r = spawn(&format!("op-{stream}"), move || {
        let listing = matches!(req, OpRequest::List { .. });
        let r = match (req, credit) {
            (OpRequest::List { path }, Some(c)) => list(&path, &c, stream, &out),
            (req, _) => Some(run_op(req)),
        };
        me.close(slot);
        let msg = match r {
            Some(Ok(reply)) => GuestMsg::Op(reply),
            Some(Err(e)) => GuestMsg::Error(e),
            None => return,
        };
        // A listing's end follows its entries; other replies are control.
        if listing {
            out.send(stream, msg);
        } else {
            out.send_control(stream, msg);
        }
    });
    if r.is_err() {
        streams.close(slot);
    }
    r
}

fn run_op(req: OpRequest) -> Result<OpReply, ErrorInfo> {
    match req {
        OpRequest::Stat { path, follow } => {
            let p = check_path(&path)?;
            let md = if follow {
                fs::metadata(p)
            } else {
                fs::symlink_metadata(p)
            };
            let md = md.map_err(|e| io_error(&path, &e))?;
            Ok(OpReply::Stat(stat_of(&md, p)))
        }
        OpRequest::List { .. } => Err(err(ErrorKind::Other, "a listing needs credit")),
        OpRequest::Mkdir {
            path,
            parents,
            mode,
        } => {
            let p = check_path(&path)?;
            fs::DirBuilder::new()
                .recursive(parents)
                .mode(mode & 0o7777)
                .create(p)
                .map_err(|e| io_error(&path, &e))?;
            Ok(OpReply::Ok)
        }
        OpRequest::Remove { path, recursive } => {
            let p = check_path(&path)?;
            if path == "/" {
                return Err(err(ErrorKind::InvalidRequest, "refusing to remove /"));
            }
            let md = fs::symlink_metadata(p).map_err(|e| io_error(&path, &e))?;
            // remove_dir_all never follows symlinks (it unlinks them).
            let r = if md.is_dir() && recursive {
                fs::remove_dir_all(p)
            } else if md.is_dir() {
                fs::remove_dir(p)
            } else {
                fs::remove_file(p)
            };
            r.map_err(|e| io_error(&path, &e))?;
            Ok(OpReply::Ok)
        }
        OpRequest::Rename { from, to } => {
            let (f, t) = (check_path(&from)?, check_path(&to)?);
            fs::rename(f, t).map_err(|e| io_error(&format!("{from} -> {to}"), &e))?;
            Ok(OpReply::Ok)
        }
        OpRequest::Symlink { path, target } => {
            let p = check_path(&path)?;
            if target.contains('\0') || target.len() > MAX_PATH {
                return Err(err(ErrorKind::InvalidRequest, "bad symlink target"));
            }
            std::os::unix::fs::symlink(&target, p).map_err(|e| io_error(&path, &e))?;
            Ok(OpReply::Ok)
        }
        OpRequest::SetAttrs {
            path,
            mode,
            mtime_ns,
        } => {
            let p = check_path(&path)?;
            let md = fs::symlink_metadata(p).map_err(|e| io_error(&path, &e))?;
            // A symlink's own mode means nothing on Linux; never chmod
            // through it.
            if let (Some(m), false) = (mode, md.file_type().is_symlink()) {
                fs::set_permissions(p, fs::Permissions::from_mode(m & 0o7777))
                    .map_err(|e| io_error(&path, &e))?;
            }
            if let Some(ns) = mtime_ns {
                set_mtime_path(&path, ns).map_err(|e| io_error(&path, &e))?;
            }
            Ok(OpReply::Ok)
        }
        OpRequest::Sync => {
            crate::sys::sync();
            Ok(OpReply::Ok)
        }
        OpRequest::PortOpen { port } => {
            let open = [
                std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
            ]
            .iter()
            .any(|a| std::net::TcpStream::connect_timeout(a, PORT_PROBE_TIMEOUT).is_ok());
            Ok(OpReply::PortOpen(open))
        }
        OpRequest::Procs
        | OpRequest::ProcSignal { .. }
        | OpRequest::ProcStdin { .. }
        | OpRequest::ProcForget { .. }
        | OpRequest::SshStart { .. } => Err(err(
            ErrorKind::InvalidRequest,
            "process requests are not filesystem requests",
        )),
    }
}

/// Streams the entries of a directory as `Entries` frames within the
/// stream's credit. `None` when cancelled.
fn list(
    path: &str,
    credit: &Credit,
    stream: u32,
    out: &Outbox,
) -> Option<Result<OpReply, ErrorInfo>> {
    let p = match check_path(path) {
        Ok(p) => p,
        Err(e) => return Some(Err(e)),
    };
    let dir = match fs::read_dir(p) {
        Ok(d) => d,
        Err(e) => return Some(Err(io_error(path, &e))),
    };
    let mut batch: Vec<DirEntry> = Vec::new();
    let mut cost = 0u64;
    let flush = |batch: &mut Vec<DirEntry>, cost: &mut u64| -> bool {
        if batch.is_empty() {
            return true;
        }
        // Sent once the credit covers the whole batch.
        *cost = 0;
        credit.send(out, stream, GuestMsg::Entries(std::mem::take(batch)))
    };
    for entry in dir {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => return Some(Err(io_error(path, &e))),
        };
        let full = entry.path();
        let Ok(md) = fs::symlink_metadata(&full) else {
            continue; // removed meanwhile
        };
        let e = DirEntry {
            name: entry.file_name().to_string_lossy().into_owned(),
            stat: stat_of(&md, &full),
        };
        let c = e.wire_cost();
        if cost + c > ENTRIES_BATCH_COST && !flush(&mut batch, &mut cost) {
            return None;
        }
        cost += c;
        batch.push(e);
    }
    if !flush(&mut batch, &mut cost) {
        return None;
    }
    Some(Ok(OpReply::Ok))
}
