//! The guest's network. See `docs/network.md` for the choice and what it
//! guarantees.
//!
//! QEMU (in the host's network namespace) talks over a unix socket
//! (`-netdev stream`) to `passt`, a user-mode network stack that opens
//! ordinary sockets for the guest. passt runs inside a **private user +
//! network namespace** of its own, whose loopback holds nothing; `pasta`
//! (the same program) links that namespace to the host's network. So no
//! guest packet can reach the host's loopback — not through the gateway
//! address (`--no-map-gw` on both, and `-T none`: no loopback port is mapped
//! into the namespace), and not with a crafted destination of 127.0.0.1
//! (measured: passt alone, in the host namespace, connects such a packet to
//! the host's 127.0.0.1). DNS sent to the guest's resolver address goes to
//! the host's resolver.

use super::super::files;
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// The guest's address plan (static: the agent configures it from the
/// kernel command line; passt learns the guest's address from its packets
/// and answers ARP for the gateway).
pub const GUEST_ADDR: &str = "10.0.2.15";
pub const GUEST_PREFIX: u8 = 24;
pub const GATEWAY: &str = "10.0.2.2";
pub const DNS: &str = "10.0.2.3";

const PASST: &str = "passt";
const PASTA: &str = "pasta";
/// How long passt gets to bind its socket.
const READY_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Missing(#[from] crate::hosttools::MissingTool),
    #[error("cannot start passt")]
    Spawn(#[source] std::io::Error),
    #[error("the network helper exited during start-up ({status}): {log}")]
    EarlyExit { status: String, log: String },
    #[error("{1} did not get ready within {0:?}")]
    Timeout(Duration, String),
}

/// The guest's network for one VM: passt inside a private user+network
/// namespace, and pasta linking that namespace to the host. Both end when
/// this is dropped (and with the supervisor: parent-death signal).
pub struct GuestNet {
    passt: Child,
    pasta: Child,
}

/// passt's command line (it runs in the VM directory, in the private
/// namespace, where it is uid 0 of a namespace that maps only our uid).
pub fn passt_args() -> Vec<String> {
    [
        "--foreground",
        "--quiet",
        // Exit when QEMU, its one client, goes away.
        "--one-off",
        "--ipv4-only",
        "--no-map-gw",
        "--socket",
        files::NET_SOCKET,
        "--address",
        GUEST_ADDR,
        "--netmask",
        &GUEST_PREFIX.to_string(),
        "--gateway",
        GATEWAY,
        // The guest asks DNS at `DNS`: passt sends it on like any other
        // packet, into the namespace, where pasta answers for that address
        // with the host's resolver.
        "--dns",
        DNS,
        // No host port reaches the guest through passt (port forwards go
        // through the agent channel).
        "--tcp-ports",
        "none",
        "--udp-ports",
        "none",
        "--no-dhcpv6",
        "--no-ndp",
        "--no-ra",
        // Stay uid 0 of the namespace (= our uid outside): passt would
        // switch to `nobody`, which the namespace does not map.
        "--runas",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// pasta's command line, attaching to the namespace of process `pid`.
pub fn pasta_args(uid: u32, pid: u32) -> Vec<String> {
    [
        "--foreground",
        "--quiet",
        "--pid",
        files::NET_PASTA_PID,
        "--config-net",
        "--ipv4-only",
        // The namespace's gateway is not the host's loopback either.
        "--no-map-gw",
        // No ports forwarded in either direction: above all not `-T auto`,
        // which would map the host's loopback ports into the namespace.
        "--tcp-ports",
        "none",
        "--udp-ports",
        "none",
        "--tcp-ns",
        "none",
        "--udp-ns",
        "none",
        "--dns-forward",
        DNS,
        // As root pasta would switch to `nobody` (and lose the parent-death
        // signal); it stays the invoking user.
        "--runas",
        &uid.to_string(),
        &pid.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The shell gate the namespace holder runs: it waits until pasta has
/// configured the namespace, closes the guest's own subnet there, then
/// becomes passt.
///
/// Without the rules, a guest connecting to its gateway (10.0.2.2) or to
/// any port but 53 of its resolver (10.0.2.3) would send a real packet to
/// that address on the host's network (passt does not map the gateway).
/// With them, such connections are refused inside the namespace at once;
/// only DNS to the resolver address goes on, to pasta, which answers it.
const GATE: &str = r#"read -r _ || exit 1
"$SMOLVM_IP" route add prohibit "$SMOLVM_SUBNET" table 100 &&
"$SMOLVM_IP" rule add to "$SMOLVM_DNS/32" ipproto udp dport 53 lookup main priority 100 &&
"$SMOLVM_IP" rule add to "$SMOLVM_DNS/32" ipproto tcp dport 53 lookup main priority 101 &&
"$SMOLVM_IP" rule add to "$SMOLVM_SUBNET" lookup 100 priority 200 || exit 1
exec "$0" "$@" </dev/null"#;

/// The guest's subnet, in CIDR form.
const SUBNET: &str = "10.0.2.0/24";

fn pdeathsig(cmd: &mut std::process::Command) {
    // SAFETY: prctl is async-signal-safe; it only sets this child's
    // parent-death signal (SIGKILL when the supervisor's thread exits).
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

impl GuestNet {
    /// Starts the guest network of the VM in `vm_dir` and waits until
    /// passt's socket is bound.
    pub fn start(vm_dir: &super::super::VmDir) -> Result<GuestNet, NetError> {
        let sock = vm_dir.net_socket();
        let pidfile = vm_dir.pasta_pid();
        let _ = std::fs::remove_file(&sock);
        let _ = std::fs::remove_file(&pidfile);
        let log_path = vm_dir.net_log();
        let log = crate::private::create(&log_path).map_err(NetError::Spawn)?;
        let clone_log = || log.try_clone().map_err(NetError::Spawn);
        let passt_bin = crate::hosttools::require(PASST)?;
        let ip_bin = crate::hosttools::require("ip")?;
        let pasta_bin = crate::hosttools::require(PASTA)?;
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };

        // 1. The namespace holder: a private user+network namespace (only
        //    our uid mapped, as its root), waiting at the gate.
        let mut holder = std::process::Command::new("/bin/sh");
        holder
            .arg("-c")
            .arg(GATE)
            .arg(&passt_bin)
            .args(passt_args())
            .env("SMOLVM_IP", &ip_bin)
            .env("SMOLVM_SUBNET", SUBNET)
            .env("SMOLVM_DNS", DNS)
            .current_dir(vm_dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::from(clone_log()?))
            .stderr(Stdio::from(clone_log()?));
        super::confine_child(&mut holder);
        pdeathsig(&mut holder);
        crate::sys::enter_private_netns(&mut holder, uid, gid);
        let mut passt = holder.spawn().map_err(NetError::Spawn)?;
        let kill = |c: &mut Child| {
            let _ = c.kill();
            let _ = c.wait();
        };

        // 2. pasta links the namespace to the host; with --foreground it
        //    writes its pid file once the namespace is configured.
        let mut pasta_cmd = std::process::Command::new(&pasta_bin);
        pasta_cmd
            .args(pasta_args(uid, passt.id()))
            .current_dir(vm_dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(clone_log()?))
            .stderr(Stdio::from(clone_log()?));
        super::confine_child(&mut pasta_cmd);
        pdeathsig(&mut pasta_cmd);
        let pasta = match pasta_cmd.spawn() {
            Ok(p) => p,
            Err(e) => {
                kill(&mut passt);
                return Err(NetError::Spawn(e));
            }
        };
        let mut net = GuestNet { passt, pasta };
        let start = Instant::now();
        let wait = |net: &mut GuestNet, done: &dyn Fn() -> bool, what: &str| loop {
            for (name, c) in [("pasta", &mut net.pasta), ("passt", &mut net.passt)] {
                if let Ok(Some(st)) = c.try_wait() {
                    return Err(NetError::EarlyExit {
                        status: format!("{name} {st}"),
                        log: crate::text::tail_file(&log_path, 1000),
                    });
                }
            }
            if done() {
                return Ok(());
            }
            if start.elapsed() > READY_DEADLINE {
                return Err(NetError::Timeout(READY_DEADLINE, what.to_string()));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        wait(
            &mut net,
            &|| pidfile.metadata().is_ok_and(|m| m.len() > 0),
            "pasta",
        )?;
        // 3. Open the gate: the holder becomes passt, inside the namespace.
        if let Some(mut gate) = net.passt.stdin.take() {
            use std::io::Write as _;
            let _ = gate.write_all(b"go\n");
        }
        wait(&mut net, &|| sock.exists(), "passt")?;
        Ok(net)
    }
}

impl Drop for GuestNet {
    fn drop(&mut self) {
        for c in [&mut self.passt, &mut self.pasta] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The kernel command line keys that give the guest its address plan.
pub fn guest_cmdline() -> String {
    use smolvm_proto::cmdline as k;
    format!(
        "{}={GUEST_ADDR}/{GUEST_PREFIX} {}={GATEWAY} {}={DNS}",
        k::IP,
        k::GATEWAY,
        k::DNS
    )
}
