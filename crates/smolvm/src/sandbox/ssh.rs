//! SSH into a sandbox with the system OpenSSH client (docs/network.md
//! "SSH"). smolvm keeps one client key pair in the data dir; the guest's
//! sshd (started on demand by the agent, on the guest's loopback) lets it
//! in as root; the guest's host key comes back over the agent channel and
//! is pinned in the VM's own `known_hosts` under the alias `smolvm-<id>`,
//! so the client verifies it (`StrictHostKeyChecking=yes`, never "accept
//! any key"). The client reaches sshd through a host port forward.

use super::Sandbox;
use crate::config::PortForward;
use crate::error::{Error, Result};
use smolvm_proto::{HostMsg, OpReply, OpRequest};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The guest port sshd listens on (guest loopback).
pub const GUEST_SSH_PORT: u16 = 22;
const KEY_NAME: &str = "id_ed25519";
/// The VM directory's pinned host key.
const KNOWN_HOSTS: &str = "known_hosts";
/// How long the guest gets to start its SSH server.
const SSH_START_WAIT: Duration = Duration::from_secs(60);

/// What a client needs to log in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshAccess {
    pub host: IpAddr,
    pub port: u16,
    pub user: String,
    /// smolvm's private key.
    pub key: PathBuf,
    /// The VM's pinned host key.
    pub known_hosts: PathBuf,
    /// The name the host key is pinned under.
    pub alias: String,
    /// The pinned host key (`ssh-ed25519 AAAA...`).
    pub host_key: String,
}

impl SshAccess {
    /// `ssh` options that make the login use exactly this key and verify
    /// exactly the pinned host key, whatever the user's own config says.
    pub fn options(&self) -> Vec<String> {
        let mut v: Vec<String> = vec!["-F".into(), "/dev/null".into()];
        for o in [
            "IdentitiesOnly=yes".to_string(),
            format!("IdentityFile={}", self.key.display()),
            format!("UserKnownHostsFile={}", self.known_hosts.display()),
            "GlobalKnownHostsFile=/dev/null".into(),
            "StrictHostKeyChecking=yes".into(),
            format!("HostKeyAlias={}", self.alias),
            "HostKeyAlgorithms=ssh-ed25519".into(),
            "UpdateHostKeys=no".into(),
            "PasswordAuthentication=no".into(),
            "LogLevel=ERROR".into(),
        ] {
            v.push("-o".into());
            v.push(o);
        }
        v.push("-p".into());
        v.push(self.port.to_string());
        v
    }

    /// The whole `ssh` command line (`ssh OPTIONS root@127.0.0.1`).
    pub fn argv(&self) -> Vec<String> {
        let mut v = vec!["ssh".to_string()];
        v.extend(self.options());
        v.push(format!("{}@{}", self.user, self.host));
        v
    }

    /// The command as a person would type it (shell-quoted).
    pub fn command_line(&self) -> String {
        self.argv()
            .iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Quotes `s` for a POSIX shell when it needs it.
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@%+,".contains(&b));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// smolvm's client key pair, made on first use (Ed25519, no passphrase,
/// 0600 in a 0700 directory). Returns (private key, public key line).
/// The caller holds the key lock: one maker at a time, so the pair in
/// place is always one pair.
fn client_key() -> Result<(PathBuf, String)> {
    let dir = crate::paths::ssh_dir();
    let key = dir.join(KEY_NAME);
    let public = dir.join(format!("{KEY_NAME}.pub"));
    if let (true, Ok(p)) = (key.exists(), std::fs::read_to_string(&public)) {
        return Ok((key, p.trim().to_string()));
    }
    crate::private::dir_all(&dir).map_err(|e| Error::io(format!("{}", dir.display()), e))?;
    // Made under a temporary name and renamed into place, public key
    // first (a private key in place means its public key is too).
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{KEY_NAME}.{}.{seq}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_file(tmp.with_extension("pub"));
    let out = crate::hosttools::command("ssh-keygen")?
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "smolvm", "-f"])
        .arg(&tmp)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| Error::io("cannot run ssh-keygen", e))?;
    if !out.status.success() {
        return Err(Error::io(
            "ssh-keygen failed",
            std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        ));
    }
    let tmp_pub = PathBuf::from(format!("{}.pub", tmp.display()));
    std::fs::rename(&tmp_pub, &public).map_err(|e| Error::io("cannot store the SSH key", e))?;
    std::fs::rename(&tmp, &key).map_err(|e| Error::io("cannot store the SSH key", e))?;
    let p =
        std::fs::read_to_string(&public).map_err(|e| Error::io("cannot read the SSH key", e))?;
    Ok((key, p.trim().to_string()))
}

/// A host key as the guest reported it: `ssh-ed25519 BASE64`, bounded.
fn check_host_key(k: &str) -> Option<String> {
    let mut f = k.trim().split(' ');
    let (ty, blob) = (f.next()?, f.next()?);
    let ok = ty == "ssh-ed25519"
        && f.next().is_none()
        && (60..=100).contains(&blob.len())
        && blob
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=');
    ok.then(|| format!("{ty} {blob}"))
}

/// Drops the VM's pinned host key: its machine was replaced (a restore),
/// so the next SSH start makes the guest a new host key.
pub(crate) fn forget_host_key(vm_dir: &Path) {
    let _ = std::fs::remove_file(vm_dir.join(KNOWN_HOSTS));
}

impl Sandbox {
    fn alias(&self) -> String {
        format!("smolvm-{}", self.id)
    }

    fn known_hosts(&self) -> PathBuf {
        self.vm_dir.path().join(KNOWN_HOSTS)
    }

    /// The pinned host key, when SSH was set up in this VM.
    pub fn pinned_host_key(&self) -> Option<String> {
        let t = std::fs::read_to_string(self.known_hosts()).ok()?;
        let line = t.lines().next()?;
        let rest = line.strip_prefix(&format!("{} ", self.alias()))?;
        check_host_key(rest)
    }

    /// Makes SSH work: sshd runs in the guest and lets smolvm's key in,
    /// its host key is pinned, and a host port forwards to it. Idempotent
    /// (the existing forward is reused).
    pub async fn ensure_ssh(&self) -> Result<SshAccess> {
        // One set-up per VM at a time: two first callers would each ask for
        // a new host key, and the pin could end up the older one.
        let _ssh = self.ssh_lock().await?;
        self.ensure_ssh_locked().await
    }

    /// One SSH set-up (or pin change) of this VM at a time.
    async fn ssh_lock(&self) -> Result<super::VmLock> {
        super::VmLock::acquire_at(&self.vm_dir.path().join("ssh.lock"), &self.id).await
    }

    async fn ensure_ssh_locked(&self) -> Result<SshAccess> {
        let state = self.status().await?;
        if state != crate::state::VmState::Running {
            return Err(Error::InvalidState {
                id: self.id.clone(),
                state,
                hint: format!(
                    "SSH needs a running VM; start (or resume) it first: smolvm start {}",
                    self.id
                ),
            });
        }
        let (key, public) = {
            let _key = super::VmLock::acquire_at(&crate::paths::ssh_dir().join(".lock"), "ssh key")
                .await?;
            tokio::task::spawn_blocking(client_key)
                .await
                .map_err(|e| Error::Invalid(format!("the key set-up failed: {e}")))??
        };
        let pinned = self.pinned_host_key();
        let c = self.connect().await?;
        // Bounded: a guest that never answers must not hold the locks (the
        // VM's own, when `start` asks) forever. The agent's own limits add
        // up to ~45 s (key generation, sshd's start, an old sshd's end);
        // dropping the stream on a timeout cancels the request.
        let ask = async {
            let mut s = c
                .open_stream(HostMsg::Op(OpRequest::SshStart {
                    authorized_key: public,
                    new_host_key: pinned.is_none(),
                }))
                .await?;
            s.recv().await
        };
        let reply = tokio::time::timeout(SSH_START_WAIT, ask)
            .await
            .map_err(|_| Error::Timeout {
                id: self.id.clone(),
                what: "starting the guest's SSH server".into(),
                after: SSH_START_WAIT,
                hint: "the guest agent did not answer; `smolvm logs ID` shows the console".into(),
            })?
            .map_err(|source| Error::Client {
                id: self.id.clone(),
                source,
            })?;
        let host_key = match reply {
            smolvm_proto::GuestMsg::Op(OpReply::Ssh { host_key }) => host_key,
            smolvm_proto::GuestMsg::Error(e) => {
                return Err(self.ssh_error(format!(
                    "the guest could not start its SSH server: {}",
                    crate::text::escape_line(&e.bounded().message)
                )))
            }
            _ => return Err(self.ssh_error("unexpected answer to the SSH start")),
        };
        let Some(host_key) = check_host_key(&host_key) else {
            return Err(self.ssh_error("the guest's SSH host key is not an ed25519 key line"));
        };
        match pinned {
            Some(p) if p != host_key => {
                return Err(self.ssh_error(format!(
                    "the guest's SSH host key changed (pinned {p}, now {host_key}); \
                     refusing to trust it. If that was on purpose, give the guest a new \
                     key and pin it: smolvm ssh {} --forget-host-key",
                    self.id
                )))
            }
            Some(_) => {}
            None => {
                let line = format!("{} {host_key}\n", self.alias());
                crate::private::write_atomic(&self.known_hosts(), line.as_bytes())
                    .map_err(|e| Error::io("cannot write the VM's known_hosts", e))?;
            }
        }
        let existing = self
            .ports()
            .await?
            .into_iter()
            .find(|p| p.guest_port == GUEST_SSH_PORT && p.host_addr.is_loopback());
        let fwd = match existing {
            Some(f) => f,
            None => {
                self.expose(PortForward {
                    host_addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
                    host_port: 0,
                    guest_port: GUEST_SSH_PORT,
                })
                .await?
            }
        };
        Ok(SshAccess {
            host: fwd.host_addr,
            port: fwd.host_port,
            user: "root".into(),
            key,
            known_hosts: self.known_hosts(),
            alias: self.alias(),
            host_key,
        })
    }

    fn ssh_error(&self, message: impl Into<String>) -> Error {
        Error::Network {
            id: self.id.clone(),
            message: message.into(),
        }
    }

    /// Waits until an SSH login (key and pinned host key checked) runs a
    /// command, within `timeout`.
    pub async fn wait_for_ssh(&self, timeout: Duration) -> Result<SshAccess> {
        let deadline = Instant::now() + timeout;
        let mut last: String;
        loop {
            match self.ensure_ssh().await {
                Ok(a) => {
                    let r = self
                        .ssh_output(&a, &["true".to_string()], Duration::from_secs(10), false)
                        .await;
                    match r {
                        Ok((0, _, _)) => return Ok(a),
                        Ok((code, _, err)) => {
                            last = format!(
                                "ssh exited {code}: {}",
                                crate::text::escape_line(String::from_utf8_lossy(&err).trim())
                            );
                        }
                        Err(e) => last = e.to_string(),
                    }
                }
                // Booting: the agent is not there yet.
                Err(e) if e.kind() == crate::error::ErrorKind::AgentUnavailable => {
                    last = e.to_string();
                }
                Err(e) => return Err(e),
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    id: self.id.clone(),
                    what: format!("waiting for SSH (last: {last})"),
                    after: timeout,
                    hint: "check the guest with `smolvm ps ID` (sshd runs as a background process)"
                        .into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The ControlMaster socket for this VM's persistent SSH connection.
    fn control_path(&self) -> PathBuf {
        self.vm_dir.path().join("ssh.ctl")
    }

    /// Runs `argv` (joined as one remote shell command) over SSH; returns
    /// (exit code, stdout, stderr). `persistent` reuses one connection per
    /// VM (OpenSSH ControlMaster, kept 5 minutes idle).
    pub async fn ssh_output(
        &self,
        access: &SshAccess,
        argv: &[String],
        timeout: Duration,
        persistent: bool,
    ) -> Result<(i32, Vec<u8>, Vec<u8>)> {
        let mut cmd = tokio::process::Command::new(crate::hosttools::require("ssh")?);
        cmd.args(access.options());
        cmd.args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]);
        if persistent {
            cmd.args([
                "-o".to_string(),
                "ControlMaster=auto".to_string(),
                "-o".to_string(),
                format!("ControlPath={}", self.control_path().display()),
                "-o".to_string(),
                "ControlPersist=300".to_string(),
            ]);
        }
        cmd.arg(format!("{}@{}", access.user, access.host));
        cmd.arg("--");
        cmd.args(argv);
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(|e| Error::io("cannot run ssh", e))?;
        let out = tokio::time::timeout(timeout, child.wait_with_output())
            .await
            .map_err(|_| Error::Timeout {
                id: self.id.clone(),
                what: "an SSH command".into(),
                after: timeout,
                hint: "the guest or its sshd stopped answering".into(),
            })?
            .map_err(|e| Error::io("ssh failed", e))?;
        let code = out.status.code().unwrap_or(255);
        if code == 255 {
            // ssh's own failure (connection, authentication, host key).
            return Err(self.ssh_error(format!(
                "ssh failed: {}",
                crate::text::escape_multiline(String::from_utf8_lossy(&out.stderr).trim())
            )));
        }
        Ok((code, out.stdout, out.stderr))
    }

    /// The SSH access of a running VM whose SSH is set up already (a pin
    /// and a forward to guest port 22), without asking the guest anything;
    /// `None` otherwise.
    pub async fn ssh_access_if_set_up(&self) -> Option<SshAccess> {
        let host_key = self.pinned_host_key()?;
        let fwd = self
            .ports()
            .await
            .ok()?
            .into_iter()
            .find(|p| p.guest_port == GUEST_SSH_PORT && p.host_addr.is_loopback())?;
        let key = crate::paths::ssh_dir().join(KEY_NAME);
        key.exists().then(|| SshAccess {
            host: fwd.host_addr,
            port: fwd.host_port,
            user: "root".into(),
            key,
            known_hosts: self.known_hosts(),
            alias: self.alias(),
            host_key,
        })
    }

    /// Forgets the VM's pinned host key: the next SSH set-up gives the
    /// guest a new host key and pins it.
    pub async fn forget_host_key(&self) -> Result<()> {
        let _ssh = self.ssh_lock().await?;
        self.close_ssh_master().await;
        forget_host_key(self.vm_dir.path());
        Ok(())
    }

    /// Ends this VM's persistent SSH connection, if one is open (bounded:
    /// a master that does not answer is left to die with the VM's forward).
    pub async fn close_ssh_master(&self) {
        let ctl = self.control_path();
        if !ctl.exists() {
            return;
        }
        let Ok(ssh) = crate::hosttools::require("ssh") else {
            return;
        };
        let child = tokio::process::Command::new(ssh)
            .args(["-F", "/dev/null", "-o"])
            .arg(format!("ControlPath={}", ctl.display()))
            .args(["-O", "exit", "x"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .status();
        let _ = tokio::time::timeout(Duration::from_secs(5), child).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_keys_are_checked() {
        let k = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB9d2yCkbqYpm2E9tD3wFQYQbDjVEA0r6rR5UiAcmPqS";
        assert_eq!(check_host_key(k).as_deref(), Some(k));
        assert_eq!(check_host_key(&format!("{k}\n")).as_deref(), Some(k));
        for bad in [
            "",
            "ssh-rsa AAAAB3NzaC1yc2E",
            "ssh-ed25519",
            &format!("{k} comment"),
            &format!("{k}\x1b[2J"),
            "ssh-ed25519 AAAA;rm -rf",
        ] {
            assert!(check_host_key(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("root@127.0.0.1"), "root@127.0.0.1");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
