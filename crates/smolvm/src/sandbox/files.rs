//! Files and directories in and out of the guest, and filesystem requests.
//!
//! Transfers are streamed in 64 KiB chunks under the protocol's flow
//! control, so their size is never bounded by memory. Uploads are atomic on
//! the guest (the agent renames a finished temporary file into place);
//! downloads are atomic on the host the same way. A downloaded tree is
//! recreated only inside the destination: names from the guest are checked
//! to be single path components, directories are created before files,
//! files only in directories this download created or found to be real
//! directories, and symlinks last and as symlinks — never followed.

use super::Sandbox;
use crate::error::{Error, ErrorKind, Result};
use crate::supervisor::{AgentStream, ClientError, SupervisorClient};
use smolvm_proto::{
    DirEntry, FileKind, FileStat, GuestMsg, HostMsg, OpReply, OpRequest, ReadFileRequest,
    WriteFileRequest, MAX_CHUNK_LEN,
};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

/// Most entries a directory transfer handles (it holds the list in memory).
pub const MAX_TREE_ENTRIES: usize = 1_000_000;
/// Deepest directory nesting a transfer follows.
const MAX_TREE_DEPTH: usize = 256;
/// The most bytes of names and symlink targets a tree download holds.
const MAX_TREE_NAME_BYTES: usize = 256 * 1024 * 1024;
/// How long one filesystem request may take before the guest is deemed
/// unresponsive (a sync of a large dirty cache under emulation included).
const OP_DEADLINE: Duration = Duration::from_secs(300);

/// What a directory transfer moved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TreeSummary {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    /// Devices, sockets and FIFOs, which are never transferred.
    pub skipped: u64,
}

/// Metadata of a guest path.
pub type GuestStat = FileStat;

fn guest_kind(k: smolvm_proto::ErrorKind) -> ErrorKind {
    use smolvm_proto::ErrorKind as P;
    match k {
        P::NotFound => ErrorKind::PathNotFound,
        P::AlreadyExists | P::NotEmpty => ErrorKind::PathExists,
        P::PermissionDenied => ErrorKind::PermissionDenied,
        P::NoSpace => ErrorKind::NoSpace,
        P::InvalidRequest | P::Unsupported => ErrorKind::InvalidInput,
        P::Busy => ErrorKind::Busy,
        P::Unavailable => ErrorKind::AgentUnavailable,
        P::Other | P::FlowControl => ErrorKind::Guest,
    }
}

/// A guest path must be absolute: there is no "current directory" between
/// requests.
fn check_guest_path(path: &str) -> Result<()> {
    if !path.starts_with('/') {
        return Err(Error::Invalid(format!(
            "guest path {path:?} is relative; give an absolute path (e.g. /root/{})",
            path.trim_start_matches("./")
        )));
    }
    if path.contains('\0') {
        return Err(Error::Invalid(
            "a guest path cannot contain a NUL byte".into(),
        ));
    }
    Ok(())
}

/// Joins a guest directory and a name.
fn guest_join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// A name from the guest is used on the host only when it is one plain
/// path component.
fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0')
}

/// The umask of this process (read without changing it).
fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

/// The mode a downloaded file or directory gets: the guest's permission
/// bits without setuid/setgid/sticky, and never more than our umask allows
/// (a guest cannot make a world-writable file on a shared host).
fn local_mode(guest_mode: u32) -> u32 {
    guest_mode & 0o777 & !umask()
}

/// Removes a temporary file unless disarmed (a dropped download leaves
/// nothing behind).
struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn unix_mtime_ns(md: &std::fs::Metadata) -> i64 {
    md.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(md.mtime_nsec())
}

fn set_local_mtime(path: &Path, mtime_ns: i64) -> std::io::Result<()> {
    let t = std::time::UNIX_EPOCH + Duration::from_nanos(u64::try_from(mtime_ns).unwrap_or(0));
    let f = std::fs::File::options()
        .write(true)
        .open(path)
        .or_else(|_| std::fs::File::open(path))?;
    f.set_modified(t)
}

/// A temporary name beside `dest` for an atomic write (short, whatever
/// the name's length).
fn temp_beside(dest: &Path) -> PathBuf {
    let mut rnd = [0u8; 6];
    let _ = getrandom::fill(&mut rnd);
    let tag: String = rnd.iter().map(|b| format!("{b:02x}")).collect();
    dest.with_file_name(format!(".smolvm-download-{tag}"))
}

impl Sandbox {
    fn guest_error(&self, e: smolvm_proto::ErrorInfo) -> Error {
        let e = e.bounded();
        Error::GuestPath {
            id: self.id.clone(),
            kind: guest_kind(e.kind),
            // Guest text: on one line, escaped (it ends up on terminals).
            message: crate::text::escape_line(&e.message),
        }
    }

    /// A request's answer, within [`OP_DEADLINE`] (a frozen guest is a
    /// timeout, not a hang).
    async fn recv_op(&self, s: &mut AgentStream, what: &str) -> Result<GuestMsg> {
        match tokio::time::timeout(OP_DEADLINE, s.recv()).await {
            Ok(r) => r.map_err(|e| self.client_error(e)),
            Err(_) => Err(Error::Timeout {
                id: self.id.clone(),
                what: format!("the guest did not answer a {what} request"),
                after: OP_DEADLINE,
                hint: format!(
                    "the guest is not answering; `smolvm stop {0}` ends it (or `smolvm rm -f {0}`)",
                    self.id
                ),
            }),
        }
    }

    pub(super) fn client_error(&self, source: ClientError) -> Error {
        self.forget_client();
        Error::Client {
            id: self.id.clone(),
            source,
        }
    }

    async fn stream(&self, client: &SupervisorClient, first: HostMsg) -> Result<AgentStream> {
        client
            .open_stream(first)
            .await
            .map_err(|e| self.client_error(e))
    }

    /// One `Op` request: its reply, or the guest's error.
    async fn op(&self, req: OpRequest) -> Result<OpReply> {
        let client = self.require_running().await?;
        self.op_with(&client, req).await
    }

    /// Metadata of a guest path (`follow`: of what a final symlink points to).
    pub async fn stat(&self, path: &str, follow: bool) -> Result<GuestStat> {
        check_guest_path(path)?;
        match self
            .op(OpRequest::Stat {
                path: path.into(),
                follow,
            })
            .await?
        {
            OpReply::Stat(s) => Ok(s),
            _ => Err(self.client_error(ClientError::Unexpected)),
        }
    }

    /// Whether a guest path exists (a dangling symlink exists).
    pub async fn exists(&self, path: &str) -> Result<bool> {
        match self.stat(path, false).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::PathNotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The entries of a guest directory (one level, any order).
    pub async fn list_dir(&self, path: &str) -> Result<Vec<DirEntry>> {
        check_guest_path(path)?;
        let client = self.require_running().await?;
        self.list_with(&client, path).await
    }

    async fn list_with(&self, client: &SupervisorClient, path: &str) -> Result<Vec<DirEntry>> {
        let mut s = self
            .stream(client, HostMsg::Op(OpRequest::List { path: path.into() }))
            .await?;
        let mut out = Vec::new();
        loop {
            match self.recv_op(&mut s, "directory listing").await? {
                GuestMsg::Entries(e) => {
                    if out.len() + e.len() > MAX_TREE_ENTRIES {
                        return Err(Error::Invalid(format!(
                            "{path} has more than {MAX_TREE_ENTRIES} entries"
                        )));
                    }
                    out.extend(e);
                }
                GuestMsg::Op(_) => return Ok(out),
                GuestMsg::Error(e) => return Err(self.guest_error(e)),
                _ => return Err(self.client_error(ClientError::Unexpected)),
            }
        }
    }

    /// Creates a guest directory (`parents`: and missing parents, and an
    /// existing directory is fine).
    pub async fn mkdir(&self, path: &str, parents: bool) -> Result<()> {
        check_guest_path(path)?;
        self.op(OpRequest::Mkdir {
            path: path.into(),
            parents,
            mode: 0o755,
        })
        .await
        .map(drop)
    }

    /// Removes a guest file, symlink or empty directory; `recursive`: a
    /// whole tree (symlinks in it are removed, never followed).
    pub async fn remove(&self, path: &str, recursive: bool) -> Result<()> {
        check_guest_path(path)?;
        self.op(OpRequest::Remove {
            path: path.into(),
            recursive,
        })
        .await
        .map(drop)
    }

    /// Renames a guest path (replacing a file at `to`).
    pub async fn rename(&self, from: &str, to: &str) -> Result<()> {
        check_guest_path(from)?;
        check_guest_path(to)?;
        self.op(OpRequest::Rename {
            from: from.into(),
            to: to.into(),
        })
        .await
        .map(drop)
    }

    /// Flushes the guest's filesystems to its disk.
    pub async fn sync(&self) -> Result<()> {
        self.op(OpRequest::Sync).await.map(drop)
    }

    /// Waits until something in the guest accepts TCP connections on
    /// `127.0.0.1:port` (or `[::1]:port`), at most `timeout`.
    pub async fn wait_for_port(&self, port: u16, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if let OpReply::PortOpen(true) = self.op(OpRequest::PortOpen { port }).await? {
                return Ok(());
            }
            if start.elapsed() >= timeout {
                return Err(Error::Timeout {
                    id: self.id.clone(),
                    what: format!("nothing listens on guest port {port}"),
                    after: timeout,
                    hint: "start the server in the guest first (e.g. in the background: `nohup CMD &`)"
                        .into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Uploads a local file to `guest_path` (atomically: a finished
    /// temporary file is renamed into place), keeping its mode and mtime.
    /// Returns the bytes written.
    pub async fn upload_file(
        &self,
        local: &Path,
        guest_path: &str,
        make_dirs: bool,
    ) -> Result<u64> {
        check_guest_path(guest_path)?;
        let client = self.require_running().await?;
        self.upload_with(&client, local, guest_path, make_dirs)
            .await
    }

    async fn upload_with(
        &self,
        client: &SupervisorClient,
        local: &Path,
        guest_path: &str,
        make_dirs: bool,
    ) -> Result<u64> {
        let ctx = || format!("cannot read {}", local.display());
        let mut f = tokio::fs::File::open(local)
            .await
            .map_err(|e| Error::io(ctx(), e))?;
        let md = f.metadata().await.map_err(|e| Error::io(ctx(), e))?;
        if !md.is_file() {
            return Err(Error::Invalid(format!(
                "{} is not a regular file{}",
                local.display(),
                if md.is_dir() {
                    " (upload a directory with upload_dir / `smolvm cp`, which copies directories whole)"
                } else {
                    ""
                }
            )));
        }
        let req = WriteFileRequest {
            path: guest_path.into(),
            mode: md.mode() & 0o7777,
            mtime_ns: Some(unix_mtime_ns(&md)),
            make_dirs,
        };
        let mut s = self.stream(client, HostMsg::WriteFile(req)).await?;
        let w = s.writer();
        let id = self.id.clone();
        // Read and send while watching the reply: the guest may refuse the
        // upload (a full disk) before we are done sending.
        let send = async {
            let mut buf = vec![0u8; MAX_CHUNK_LEN];
            loop {
                let n = f.read(&mut buf).await.map_err(|e| Error::io(ctx(), e))?;
                if n == 0 {
                    break;
                }
                w.write(&buf[..n]).await.map_err(|source| Error::Client {
                    id: id.clone(),
                    source,
                })?;
            }
            w.close().await.map_err(|source| Error::Client {
                id: id.clone(),
                source,
            })
        };
        tokio::pin!(send);
        let mut sent = false;
        loop {
            tokio::select! {
                r = &mut send, if !sent => { r?; sent = true; }
                m = s.recv() => return match m.map_err(|e| self.client_error(e))? {
                    GuestMsg::Done { bytes } if sent => Ok(bytes),
                    GuestMsg::Error(e) => Err(self.guest_error(e)),
                    _ => Err(self.client_error(ClientError::Unexpected)),
                },
            }
        }
    }

    /// Downloads a guest file to `local` (atomically), keeping its mode
    /// (without setuid/setgid/sticky bits) and mtime. A symlink at
    /// `guest_path` is followed in the guest. `max_bytes` refuses a larger
    /// file (also one that grows past it while being read). Returns the
    /// bytes written.
    pub async fn download_file(
        &self,
        guest_path: &str,
        local: &Path,
        make_dirs: bool,
        max_bytes: Option<u64>,
    ) -> Result<u64> {
        check_guest_path(guest_path)?;
        if make_dirs {
            if let Some(p) = local.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(p)
                    .map_err(|e| Error::io(format!("cannot create {}", p.display()), e))?;
            }
        }
        let client = self.require_running().await?;
        self.download_with(&client, guest_path, local, max_bytes)
            .await
    }

    async fn download_with(
        &self,
        client: &SupervisorClient,
        guest_path: &str,
        local: &Path,
        max_bytes: Option<u64>,
    ) -> Result<u64> {
        if let Ok(md) = std::fs::symlink_metadata(local) {
            if md.is_dir() {
                return Err(Error::Invalid(format!(
                    "{} is a directory; name the file to write",
                    local.display()
                )));
            }
        }
        let mut s = self
            .stream(
                client,
                HostMsg::ReadFile(ReadFileRequest {
                    path: guest_path.into(),
                }),
            )
            .await?;
        let stat = match s.recv().await.map_err(|e| self.client_error(e))? {
            GuestMsg::FileStart(st) => st,
            GuestMsg::Error(e) => return Err(self.guest_error(e)),
            _ => return Err(self.client_error(ClientError::Unexpected)),
        };
        let too_big = |n: u64| {
            Error::Invalid(format!(
                "{guest_path} is larger than the {n}-byte limit (max_bytes)"
            ))
        };
        if let Some(max) = max_bytes {
            if stat.size > max {
                return Err(too_big(max)); // dropping the stream cancels it
            }
        }
        let tmp = temp_beside(local);
        let ctx = || format!("cannot write {}", local.display());
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(|e| Error::io(ctx(), e))?;
        let mut guard = TempGuard(Some(tmp.clone()));
        let r = async {
            let mut total = 0u64;
            loop {
                match s.recv().await.map_err(|e| self.client_error(e))? {
                    GuestMsg::FileData(b) => {
                        total += b.len() as u64;
                        if max_bytes.is_some_and(|m| total > m) {
                            return Err(too_big(max_bytes.unwrap_or(0)));
                        }
                        // Local disk writes: short, and never on a guest's clock.
                        file.write_all(&b).map_err(|e| Error::io(ctx(), e))?;
                    }
                    GuestMsg::Done { .. } => break,
                    GuestMsg::Error(e) => return Err(self.guest_error(e)),
                    _ => return Err(self.client_error(ClientError::Unexpected)),
                }
            }
            file.sync_data().map_err(|e| Error::io(ctx(), e))?;
            file.set_permissions(std::fs::Permissions::from_mode(local_mode(stat.mode)))
                .map_err(|e| Error::io(ctx(), e))?;
            let t = std::time::UNIX_EPOCH
                + Duration::from_nanos(u64::try_from(stat.mtime_ns).unwrap_or(0));
            let _ = file.set_modified(t);
            std::fs::rename(&tmp, local).map_err(|e| Error::io(ctx(), e))?;
            guard.0 = None;
            Ok(total)
        }
        .await;
        r
    }

    /// Uploads a local directory tree to `guest_dir` (created, with its
    /// missing parents): files, empty directories and symlinks (as
    /// symlinks), with modes and mtimes. Local symlinks are never followed.
    pub async fn upload_dir(&self, local: &Path, guest_dir: &str) -> Result<TreeSummary> {
        check_guest_path(guest_dir)?;
        let md = std::fs::symlink_metadata(local)
            .map_err(|e| Error::io(format!("cannot read {}", local.display()), e))?;
        if !md.is_dir() {
            return Err(Error::Invalid(format!(
                "{} is not a directory",
                local.display()
            )));
        }
        let client = self.require_running().await?;
        let mut sum = TreeSummary::default();
        // (guest dir, local dir, mode, mtime) to fix up after their contents.
        let mut dirs: Vec<(String, u32, i64)> = Vec::new();
        let mut stack = vec![(local.to_path_buf(), guest_dir.to_string(), 0usize)];
        self.op_with(
            &client,
            OpRequest::Mkdir {
                path: guest_dir.into(),
                parents: true,
                mode: 0o755,
            },
        )
        .await?;
        dirs.push((
            guest_dir.to_string(),
            md.mode() & 0o7777,
            unix_mtime_ns(&md),
        ));
        sum.dirs += 1;
        let mut seen = 0usize;
        while let Some((ldir, gdir, depth)) = stack.pop() {
            if depth > MAX_TREE_DEPTH {
                return Err(Error::Invalid(format!(
                    "{} nests deeper than {MAX_TREE_DEPTH} levels",
                    local.display()
                )));
            }
            let rd = std::fs::read_dir(&ldir)
                .map_err(|e| Error::io(format!("cannot read {}", ldir.display()), e))?;
            for entry in rd {
                let entry =
                    entry.map_err(|e| Error::io(format!("cannot read {}", ldir.display()), e))?;
                seen += 1;
                if seen > MAX_TREE_ENTRIES {
                    return Err(Error::Invalid(format!(
                        "{} has more than {MAX_TREE_ENTRIES} entries",
                        local.display()
                    )));
                }
                let lpath = entry.path();
                let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                    return Err(Error::Invalid(format!(
                        "{} is not valid UTF-8; rename it to upload it",
                        lpath.display()
                    )));
                };
                let gpath = guest_join(&gdir, &name);
                let md = std::fs::symlink_metadata(&lpath)
                    .map_err(|e| Error::io(format!("cannot read {}", lpath.display()), e))?;
                let ft = md.file_type();
                if ft.is_dir() {
                    self.op_with(
                        &client,
                        OpRequest::Mkdir {
                            path: gpath.clone(),
                            parents: false,
                            mode: 0o755,
                        },
                    )
                    .await
                    .or_else(|e| {
                        if e.kind() == ErrorKind::PathExists {
                            Ok(OpReply::Ok)
                        } else {
                            Err(e)
                        }
                    })?;
                    dirs.push((gpath.clone(), md.mode() & 0o7777, unix_mtime_ns(&md)));
                    sum.dirs += 1;
                    stack.push((lpath, gpath, depth + 1));
                } else if ft.is_symlink() {
                    let target = std::fs::read_link(&lpath)
                        .map_err(|e| Error::io(format!("cannot read {}", lpath.display()), e))?;
                    let Some(target) = target.to_str() else {
                        return Err(Error::Invalid(format!(
                            "the target of {} is not valid UTF-8",
                            lpath.display()
                        )));
                    };
                    // Replace what is there (as a re-upload would a file).
                    let _ = self
                        .op_with(
                            &client,
                            OpRequest::Remove {
                                path: gpath.clone(),
                                recursive: false,
                            },
                        )
                        .await;
                    self.op_with(
                        &client,
                        OpRequest::Symlink {
                            path: gpath,
                            target: target.into(),
                        },
                    )
                    .await?;
                    sum.symlinks += 1;
                } else if ft.is_file() {
                    sum.bytes += self.upload_with(&client, &lpath, &gpath, false).await?;
                    sum.files += 1;
                } else {
                    sum.skipped += 1;
                }
            }
        }
        // Modes and mtimes last, deepest first: adding entries changed them.
        for (path, mode, mtime) in dirs.into_iter().rev() {
            self.op_with(
                &client,
                OpRequest::SetAttrs {
                    path,
                    mode: Some(mode),
                    mtime_ns: Some(mtime),
                },
            )
            .await?;
        }
        Ok(sum)
    }

    async fn op_with(&self, client: &SupervisorClient, req: OpRequest) -> Result<OpReply> {
        let mut s = self.stream(client, HostMsg::Op(req)).await?;
        match self.recv_op(&mut s, "filesystem").await? {
            GuestMsg::Op(r) => Ok(r),
            GuestMsg::Error(e) => Err(self.guest_error(e)),
            _ => Err(self.client_error(ClientError::Unexpected)),
        }
    }

    /// Downloads a guest directory tree into `local` (created when missing;
    /// an existing one must be a real directory, and is merged into):
    /// files, empty directories and symlinks, with modes (without
    /// setuid/setgid/sticky) and mtimes. Nothing is ever written outside
    /// `local`: a symlink in the tree is recreated as a symlink, never
    /// followed, and an existing local path that is not a real directory
    /// where the tree has one is refused.
    pub async fn download_dir(&self, guest_dir: &str, local: &Path) -> Result<TreeSummary> {
        self.download_dir_limited(guest_dir, local, None).await
    }

    /// [`Sandbox::download_dir`] refusing a tree whose files add up to more
    /// than `max_bytes` (checked on the listing before anything is written,
    /// and again as files are read, in case they grow meanwhile).
    pub async fn download_dir_limited(
        &self,
        guest_dir: &str,
        local: &Path,
        max_bytes: Option<u64>,
    ) -> Result<TreeSummary> {
        check_guest_path(guest_dir)?;
        let client = self.require_running().await?;
        let root = self.stat(guest_dir, true).await?;
        if root.kind != FileKind::Dir {
            return Err(Error::Invalid(format!(
                "{guest_dir} is not a directory in the guest (download it as a file)"
            )));
        }
        // Walk the guest tree first. Each node: (parent index, name, depth);
        // node 0 is the root. Bounded: entries, name bytes, depth.
        let mut nodes: Vec<(usize, String, usize)> = vec![(0, String::new(), 0)];
        let mut dirs: Vec<(usize, FileStat)> = vec![(0, root)];
        let mut files: Vec<usize> = Vec::new();
        let mut links: Vec<(usize, String)> = Vec::new();
        let mut sum = TreeSummary::default();
        let mut name_bytes = 0usize;
        let mut listed_bytes = 0u64;
        let too_big = |what: &str| {
            Error::Invalid(format!(
                "{guest_dir} is too large to download as a tree ({what}); copy parts of it"
            ))
        };
        let mut i = 0;
        while i < dirs.len() {
            let (node, _) = dirs[i];
            i += 1;
            let gpath = guest_path_of(&nodes, node, guest_dir);
            let depth = nodes[node].2;
            for e in self.list_with(&client, &gpath).await? {
                if nodes.len() > MAX_TREE_ENTRIES {
                    return Err(too_big(&format!("more than {MAX_TREE_ENTRIES} entries")));
                }
                if !safe_name(&e.name) {
                    // A guest that lists `..`, `a/b` or a 1 MB name is
                    // broken or hostile.
                    return Err(Error::Invalid(format!(
                        "the guest listed an unusable name {:?} in {}; nothing more was written",
                        crate::text::escape_line(&e.name.chars().take(80).collect::<String>()),
                        crate::text::escape_line(&gpath)
                    )));
                }
                name_bytes += e.name.len();
                if name_bytes > MAX_TREE_NAME_BYTES {
                    return Err(too_big("its names"));
                }
                let idx = nodes.len();
                match e.stat.kind {
                    FileKind::Dir => {
                        if depth + 1 > MAX_TREE_DEPTH {
                            return Err(too_big(&format!(
                                "nested deeper than {MAX_TREE_DEPTH} levels"
                            )));
                        }
                        nodes.push((node, e.name, depth + 1));
                        dirs.push((idx, e.stat));
                    }
                    FileKind::File => {
                        listed_bytes = listed_bytes.saturating_add(e.stat.size);
                        if let Some(max) = max_bytes.filter(|m| listed_bytes > *m) {
                            return Err(Error::Invalid(format!(
                                "{guest_dir} holds more than the {max}-byte limit (max_bytes); nothing was written"
                            )));
                        }
                        nodes.push((node, e.name, depth + 1));
                        files.push(idx);
                    }
                    FileKind::Symlink => match e.stat.link_target {
                        Some(t) if !t.contains('\0') && t.len() <= 4096 => {
                            name_bytes += t.len();
                            nodes.push((node, e.name, depth + 1));
                            links.push((idx, t));
                        }
                        _ => sum.skipped += 1,
                    },
                    FileKind::Other => sum.skipped += 1,
                }
            }
        }
        let local_of = |node: usize| -> PathBuf {
            path_parts(&nodes, node)
                .iter()
                .fold(local.to_path_buf(), |p, c| p.join(c))
        };
        // Directories, parents first. Each must end up a real directory.
        for (node, _) in &dirs {
            let p = local_of(*node);
            match std::fs::create_dir(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) if *node == 0 && e.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::create_dir_all(&p)
                        .map_err(|e| Error::io(format!("cannot create {}", p.display()), e))?;
                }
                Err(e) => return Err(Error::io(format!("cannot create {}", p.display()), e)),
            }
            let md = std::fs::symlink_metadata(&p)
                .map_err(|e| Error::io(format!("cannot read {}", p.display()), e))?;
            if !md.is_dir() {
                return Err(Error::Invalid(format!(
                    "{} exists and is not a directory; nothing was written through it",
                    p.display()
                )));
            }
            sum.dirs += 1;
        }
        for node in &files {
            let gpath = guest_path_of(&nodes, *node, guest_dir);
            let p = local_of(*node);
            let left = max_bytes.map(|m| m.saturating_sub(sum.bytes));
            sum.bytes += self.download_with(&client, &gpath, &p, left).await?;
            sum.files += 1;
        }
        for (node, target) in &links {
            let p = local_of(*node);
            if let Ok(md) = std::fs::symlink_metadata(&p) {
                if md.file_type().is_symlink() || md.is_file() {
                    let _ = std::fs::remove_file(&p);
                }
            }
            std::os::unix::fs::symlink(target, &p)
                .map_err(|e| Error::io(format!("cannot create the symlink {}", p.display()), e))?;
            sum.symlinks += 1;
        }
        // Directory modes and mtimes last, deepest first.
        for (node, st) in dirs.iter().rev() {
            let p = local_of(*node);
            let _ =
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(local_mode(st.mode)));
            let _ = set_local_mtime(&p, st.mtime_ns);
        }
        Ok(sum)
    }
}

/// The guest path of a node of a walked tree.
fn guest_path_of(nodes: &[(usize, String, usize)], node: usize, root: &str) -> String {
    path_parts(nodes, node)
        .iter()
        .fold(root.to_string(), |p, c| guest_join(&p, c))
}

/// The names from the root down to a node of a walked tree.
fn path_parts(nodes: &[(usize, String, usize)], node: usize) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut n = node;
    while n != 0 {
        parts.push(nodes[n].1.as_str());
        n = nodes[n].0;
    }
    parts.reverse();
    parts
}
