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
/// Most of passt's and pasta's output kept in `net.log`.
const MAX_NET_LOG: u64 = 256 * 1024;
/// How long passt gets to bind its socket.
const READY_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Missing(#[from] crate::hosttools::MissingTool),
    #[error("cannot start the guest network helpers (passt, pasta)")]
    Spawn(#[source] std::io::Error),
    /// pasta needs a default IPv4 route to link the guest to.
    #[error(
        "the host has no IPv4 default route, so the guest network has nothing to connect to; \
         create the VM with `--no-network` (commands still work), or connect the host"
    )]
    NoRoute,
    #[error("cannot read the host's addresses (to keep the guest from them): {0}")]
    HostAddresses(String),
    #[error("the network helper exited during start-up ({status}): {log}; `smolvm doctor` checks what it needs")]
    EarlyExit { status: String, log: String },
    #[error("{1} did not get ready within {0:?}")]
    Timeout(Duration, String),
    /// The egress policy could not be applied (nft failed, the holder died).
    #[error("cannot apply the egress policy: {0}")]
    Policy(String),
}

/// The guest's network for one VM: passt inside a private user+network
/// namespace, and pasta linking that namespace to the host. Both end when
/// this is dropped (and with the supervisor: parent-death signal).
pub struct GuestNet {
    /// The namespace holder (passt is its child).
    passt: Child,
    pasta: Child,
    /// The holder's policy line protocol (see `dns::holder_main`).
    control: std::sync::Arc<std::sync::Mutex<Control>>,
}

/// The supervisor's end of the holder's policy pipe: lines of JSON
/// policies out, `ok` / `err MESSAGE` lines back.
struct Control {
    stdin: std::process::ChildStdin,
    acks: std::sync::mpsc::Receiver<String>,
    /// Set when the host has no nft: then only `open` can be applied.
    no_nft: Option<crate::hosttools::MissingTool>,
    /// Lines sent whose answer never came in time: the holder answers in
    /// order, so that many answers still to come belong to them.
    unanswered: usize,
}

/// How long the holder gets to apply a policy (one nft transaction).
const POLICY_DEADLINE: Duration = Duration::from_secs(10);

impl Control {
    fn send(&mut self, policy: &crate::config::EgressPolicy) -> Result<(), NetError> {
        use std::io::Write as _;
        if let Some(m) = self.no_nft.as_ref() {
            if *policy != crate::config::EgressPolicy::Open {
                return Err(NetError::Missing(m.clone()));
            }
        }
        let mut line = serde_json::to_string(policy)
            .map_err(|e| NetError::Policy(format!("cannot encode the policy: {e}")))?;
        line.push('\n');
        self.stdin
            .write_all(line.as_bytes())
            .and_then(|()| self.stdin.flush())
            .map_err(|e| NetError::Policy(format!("the network holder is gone: {e}")))?;
        let deadline = std::time::Instant::now() + POLICY_DEADLINE;
        let answer = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.acks.recv_timeout(left) {
                // The late answer to a line that timed out: not ours.
                Ok(_) if self.unanswered > 0 => self.unanswered -= 1,
                other => break other,
            }
        };
        if answer.is_err() {
            // Whatever the holder does with this line, its answer is stale.
            self.unanswered += 1;
        }
        match answer {
            Ok(a) if a == "ok" => Ok(()),
            Ok(a) => Err(NetError::Policy(
                a.strip_prefix("err ").unwrap_or(&a).to_string(),
            )),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(NetError::Timeout(
                POLICY_DEADLINE,
                "the egress policy".into(),
            )),
            Err(_) => Err(NetError::Policy("the network holder is gone".into())),
        }
    }
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
        super::dns::UPSTREAM,
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

/// What the namespace holder (`dns::holder_main`) applies at the gate,
/// once pasta has configured the namespace, before it starts passt. Inside
/// the namespace, policy routing sends to a table of `prohibit` routes
/// (such a connection fails inside the namespace and never leaves it; the
/// guest sees it fail, as a time-out with passt 2023-03):
///
/// - the host's own addresses (every local IPv4 address of the host when
///   the VM starts — a docker bridge, a second interface, a VPN): through
///   pasta they would reach services the host binds to 0.0.0.0;
/// - the guest's own subnet: a guest connecting to its gateway (10.0.2.2)
///   would otherwise send a real packet to that address on the host's
///   network (passt does not map the gateway). The resolver address
///   10.0.2.3 is made local to the namespace, where the DNS relay answers;
/// - the relay's upstream address, except for the relay's own (marked)
///   packets: only sanitized queries reach the host's resolver.
///
/// As one `ip -batch` file (one process, however many addresses the host
/// has).
fn gate_rules(host_addrs: &[std::net::Ipv4Addr]) -> String {
    use super::dns::{UPSTREAM, UPSTREAM_MARK};
    let mut r = String::new();
    r.push_str(&format!("addr add {DNS}/32 dev lo\n"));
    r.push_str(&format!("route add prohibit {UPSTREAM}/32 table 100\n"));
    r.push_str(&format!(
        "rule add fwmark {UPSTREAM_MARK:#x} to {UPSTREAM}/32 lookup main priority 90\n"
    ));
    r.push_str(&format!(
        "rule add to {UPSTREAM}/32 lookup 100 priority 95\n"
    ));
    for a in host_addrs {
        r.push_str(&format!("route add prohibit {a}/32 table 100\n"));
        r.push_str(&format!("rule add to {a}/32 lookup 100 priority 150\n"));
    }
    r.push_str(&format!("route add prohibit {SUBNET} table 100\n"));
    r.push_str(&format!("rule add to {SUBNET} lookup 100 priority 200\n"));
    r
}

/// The guest's subnet, in CIDR form.
const SUBNET: &str = "10.0.2.0/24";

impl GuestNet {
    /// Starts the guest network of the VM in `vm_dir` and waits until
    /// passt's socket is bound.
    pub fn start(
        vm_dir: &super::super::VmDir,
        policy: &crate::config::EgressPolicy,
    ) -> Result<GuestNet, NetError> {
        if !has_default_route() {
            return Err(NetError::NoRoute);
        }
        // Fail closed: without the host's addresses the gate cannot close them.
        let addrs = host_addresses().map_err(NetError::HostAddresses)?;
        crate::private::write_atomic(&vm_dir.net_rules(), gate_rules(&addrs).as_bytes())
            .map_err(NetError::Spawn)?;
        let sock = vm_dir.net_socket();
        let pidfile = vm_dir.pasta_pid();
        let _ = std::fs::remove_file(&sock);
        let _ = std::fs::remove_file(&pidfile);
        let log_path = vm_dir.net_log();
        // passt and pasta log little (--quiet), but a capped log holds
        // whatever they print.
        let log =
            crate::private::CappedLog::create(&log_path, MAX_NET_LOG).map_err(NetError::Spawn)?;
        let clone_log = || log.stdio().map_err(NetError::Spawn);
        let passt_bin = crate::hosttools::require(PASST)?;
        let ip_bin = crate::hosttools::require("ip")?;
        // nft programs every policy but `open` (which then needs no nft).
        let (nft_bin, no_nft) = match crate::hosttools::require("nft") {
            Ok(p) => (p, None),
            Err(e) if *policy != crate::config::EgressPolicy::Open => return Err(e.into()),
            Err(e) => ("-".into(), Some(e)),
        };
        let pasta_bin = crate::hosttools::require(PASTA)?;
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };

        // 1. The namespace holder: a private user+network namespace (only
        //    our uid mapped, as its root), waiting at the gate.
        // It is our own binary: it applies the gate's rules, relays DNS and
        // runs passt as its child (see `dns::holder_main`).
        let holder_bin = crate::locate::supervisor_binary()
            .map_err(|e| NetError::Spawn(std::io::Error::other(e.to_string())))?;
        let mut holder = std::process::Command::new(&holder_bin);
        holder
            .arg("--net-holder")
            .arg(files::NET_RULES)
            .arg(&ip_bin)
            .arg(&nft_bin)
            .arg(&passt_bin)
            .args(passt_args())
            .current_dir(vm_dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(clone_log()?);
        super::confine_child(&mut holder);
        crate::sys::die_with_parent(&mut holder);
        crate::sys::enter_private_netns(&mut holder, uid, gid);
        let spawned = holder.spawn();
        // The command holds write ends of the log pipe: gone with it.
        drop(holder);
        let mut passt = spawned.map_err(NetError::Spawn)?;
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
            .stdout(clone_log()?)
            .stderr(clone_log()?);
        super::confine_child(&mut pasta_cmd);
        crate::sys::die_with_parent(&mut pasta_cmd);
        let spawned = pasta_cmd.spawn();
        drop(pasta_cmd);
        let pasta = match spawned {
            Ok(p) => p,
            Err(e) => {
                kill(&mut passt);
                return Err(NetError::Spawn(e));
            }
        };
        let mut log = log;
        log.close_writer();
        let (stdin, acks) = match (passt.stdin.take(), passt.stdout.take()) {
            (Some(i), Some(o)) => (i, ack_lines(o)),
            _ => {
                kill(&mut passt);
                return Err(NetError::Spawn(std::io::Error::other(
                    "no pipe to the holder",
                )));
            }
        };
        let control = std::sync::Arc::new(std::sync::Mutex::new(Control {
            stdin,
            acks,
            no_nft,
            unanswered: 0,
        }));
        let mut net = GuestNet {
            passt,
            pasta,
            control,
        };
        let start = Instant::now();
        // Err(Some(status)): a helper exited; Err(None): the deadline passed.
        let wait = |net: &mut GuestNet, done: &dyn Fn() -> bool| loop {
            for (name, c) in [("pasta", &mut net.pasta), ("passt", &mut net.passt)] {
                if let Ok(Some(st)) = c.try_wait() {
                    return Err(Some(format!("{name} {st}")));
                }
            }
            if done() {
                return Ok(());
            }
            if start.elapsed() > READY_DEADLINE {
                return Err(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let fail =
            |net: GuestNet, mut log: crate::private::CappedLog, why: Option<String>, what: &str| {
                drop(net); // both helpers killed: the log is complete
                log.finish();
                match why {
                    Some(status) => NetError::EarlyExit {
                        status,
                        log: crate::text::tail_file(&log_path, 1000),
                    },
                    None => NetError::Timeout(READY_DEADLINE, what.to_string()),
                }
            };
        if let Err(why) = wait(&mut net, &|| pidfile.metadata().is_ok_and(|m| m.len() > 0)) {
            return Err(fail(net, log, why, "pasta"));
        }
        // 3. Open the gate with the initial policy: the holder closes what
        //    must be closed, loads the policy, starts passt and relays DNS,
        //    inside the namespace.
        let gate = net.control.clone();
        if let Err(e) = gate.lock().unwrap_or_else(|e| e.into_inner()).send(policy) {
            drop(net);
            log.finish();
            return Err(match e {
                NetError::Policy(m) => NetError::EarlyExit {
                    status: m,
                    log: crate::text::tail_file(&log_path, 1000),
                },
                e => e,
            });
        }
        if let Err(why) = wait(&mut net, &|| sock.exists()) {
            return Err(fail(net, log, why, "passt"));
        }
        Ok(net)
    }
}

impl GuestNet {
    /// A handle that changes the egress policy of the running network
    /// (blocking: one round trip to the holder, one nft transaction).
    pub fn policy_handle(&self) -> PolicyHandle {
        PolicyHandle(self.control.clone())
    }
}

/// Changes the egress policy of a running guest network.
#[derive(Clone)]
pub struct PolicyHandle(std::sync::Arc<std::sync::Mutex<Control>>);

impl PolicyHandle {
    /// Applies `policy` (already normalised): the holder loads it in one
    /// nft transaction and its relay switches names at the same moment.
    /// Blocking.
    pub fn set_policy(&self, policy: &crate::config::EgressPolicy) -> Result<(), NetError> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(policy)
    }
}

/// The holder's answer lines, read by a thread of their own (bounded: a
/// line is a few bytes; anything longer is cut).
fn ack_lines(out: std::process::ChildStdout) -> std::sync::mpsc::Receiver<String> {
    use std::io::{BufRead as _, Read as _};
    let (tx, rx) = std::sync::mpsc::sync_channel(8);
    std::thread::spawn(move || {
        let mut r = std::io::BufReader::new(out);
        let mut line = String::new();
        loop {
            line.clear();
            match (&mut r).take(4096).read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    if tx.send(line.trim_end().to_string()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

impl Drop for GuestNet {
    fn drop(&mut self) {
        for c in [&mut self.passt, &mut self.pasta] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// True when the host has an IPv4 default route (`/proc/net/route`: a
/// destination and mask of 0).
pub fn has_default_route() -> bool {
    std::fs::read_to_string("/proc/net/route")
        .map(|t| {
            t.lines().skip(1).any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.get(1) == Some(&"00000000") && f.get(7) == Some(&"00000000")
            })
        })
        .unwrap_or(false)
}

/// The host's own IPv4 addresses, from `/proc/net/fib_trie`'s `/32 host
/// LOCAL` entries (every local address of every interface), loopback
/// excluded (the namespace has its own).
pub fn host_addresses() -> Result<Vec<std::net::Ipv4Addr>, String> {
    let t = std::fs::read_to_string("/proc/net/fib_trie")
        .map_err(|e| format!("/proc/net/fib_trie: {e}"))?;
    let mut out: Vec<std::net::Ipv4Addr> = Vec::new();
    let mut last: Option<std::net::Ipv4Addr> = None;
    for l in t.lines() {
        let l = l.trim();
        if let Some(a) = l.strip_prefix("|-- ") {
            last = a.parse().ok();
        } else if l.contains("/32 host LOCAL") {
            if let Some(a) = last.filter(|a| !a.is_loopback()) {
                if !out.contains(&a) {
                    out.push(a);
                }
            }
        }
    }
    Ok(out)
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
