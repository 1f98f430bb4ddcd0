//! Egress policies against real VMs (TCG here), real passt and real
//! nftables.
//!
//! The whole test runs inside namespaces of its own: it re-executes itself
//! under `unshare -rnm` (user + network + mount namespace), where the only
//! link is a veth pair to a second network namespace ("world") holding the
//! test's servers: HTTP on 192.0.2.10/.11/.12 (listed names' addresses),
//! 198.51.100.20 (a listed CIDR) and 203.0.113.30 (unlisted), and a DNS
//! server of the test's own at 192.0.2.53 whose zone the test rewrites.
//! `/etc/resolv.conf` is bind-mounted to point at it, so pasta forwards the
//! relay's queries there. Neither namespace has a route anywhere else: no
//! packet of this test leaves the machine.
//!
//! Uses the CLI next to the test binary (`scripts/build.sh dev`; or
//! `SMOLVM_CLI_BIN`) for the cases that check what the CLI refuses.

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use common::*;
use smolvm::config::EgressPolicy;
use smolvm::{Command, ExecOptions, Sandbox, SandboxConfig};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

const BOOT: Duration = Duration::from_secs(120);
const CASE_LIMIT: Duration = Duration::from_secs(240);
const PYTHON: &str = "/usr/bin/python3";
const INNER: &str = "SMOLVM_EGRESS_TEST_INNER";

const OUTER_ADDR: &str = "172.31.99.1";
const WORLD_ADDR: &str = "172.31.99.2";
const LISTED: &str = "192.0.2.10"; // ok.test
const LISTED_NEW: &str = "192.0.2.11"; // ok.test after its address changed
const WILD: &str = "192.0.2.12"; // x.wild.test
const CIDR_HOST: &str = "198.51.100.20"; // in the listed 198.51.100.0/24
const UNLISTED: &str = "203.0.113.30"; // bad.test
const RESOLVER: &str = "192.0.2.53";

/// HTTP servers (`ADDR` each: answers `BODY-ADDR`) and a DNS server at
/// `RESOLVER` answering A records from the zone file (`NAME ADDR` lines,
/// read again for each query), logging each query as `dns NAME TYPE`.
const SERVER: &str = r#"
import socket, sys, threading
zone, log = sys.argv[1], open(sys.argv[2], "a", buffering=1)
lock = threading.Lock()
def conn(c, tag):
    try:
        c.settimeout(3)
        try: c.recv(4096)
        except OSError: pass
        body = ("BODY-" + tag).encode()
        c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    except OSError: pass
    finally: c.close()
def serve(ls, tag):
    while True:
        c, _ = ls.accept()
        threading.Thread(target=conn, args=(c, tag), daemon=True).start()
def tick(c):
    # A long-lived connection: a line every 0.2 s until it breaks.
    try:
        while True:
            c.sendall(b"TICK\n"); threading.Event().wait(0.2)
    except OSError: pass
    finally: c.close()
def ticks(ls):
    while True:
        c, _ = ls.accept()
        threading.Thread(target=tick, args=(c,), daemon=True).start()
def dns(us):
    while True:
        q, peer = us.recvfrom(512)
        if len(q) < 12: continue
        i, labels = 12, []
        while i < len(q) and q[i] != 0:
            labels.append(q[i + 1:i + 1 + q[i]].decode("ascii", "replace")); i += q[i] + 1
        name = ".".join(labels).lower()
        qtype = int.from_bytes(q[i + 1:i + 3], "big")
        with lock: log.write("dns %s %d %s\n" % (name, qtype, peer[0]))
        table = dict(l.split() for l in open(zone) if l.strip())
        question = q[12:i + 5]
        if name not in table:
            us.sendto(q[:2] + b"\x81\x83\x00\x01\x00\x00\x00\x00\x00\x00" + question, peer); continue
        if qtype != 1:
            us.sendto(q[:2] + b"\x81\x80\x00\x01\x00\x00\x00\x00\x00\x00" + question, peer); continue
        r = q[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00" + question
        r += b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x05\x00\x04" + socket.inet_aton(table[name])
        us.sendto(r, peer)
for a in sys.argv[3:]:
    ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((a, 80)); ls.listen(64)
    threading.Thread(target=serve, args=(ls, a), daemon=True).start()
    ts = socket.socket(); ts.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ts.bind((a, 81)); ts.listen(64)
    threading.Thread(target=ticks, args=(ts,), daemon=True).start()
us = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); us.bind(("192.0.2.53", 53))
threading.Thread(target=dns, args=(us,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"#;

/// Guest side: a DNS query for ok.test sent straight to the address in
/// argv (not through the guest's resolver); prints `ANSWER n` or
/// `NOANSWER why`.
const DIRECT_DNS: &str = r#"import socket,sys
s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(3)
q=bytes.fromhex("123401000001000000000000026f6b04746573740000010001")
try:
    s.sendto(q,(sys.argv[1],53)); print("ANSWER", len(s.recv(512)))
except Exception as e:
    print("NOANSWER", type(e).__name__)
"#;

// ---------------------------------------------------------------- the lab

/// The world namespace (a process holding it), its servers, and files.
struct Lab {
    world: std::process::Child,
    server: Option<std::process::Child>,
    files: tempfile::TempDir,
}

impl Lab {
    fn zone(&self) -> PathBuf {
        self.files.path().join("zone")
    }
    fn dns_log(&self) -> PathBuf {
        self.files.path().join("dns.log")
    }
    fn world_ns(&self) -> String {
        format!("--net=/proc/{}/ns/net", self.world.id())
    }

    fn set_zone(&self, ok_addr: &str) -> Result<(), String> {
        let z = format!("ok.test {ok_addr}\nx.wild.test {WILD}\nbad.test {UNLISTED}\n");
        let tmp = self.files.path().join("zone.tmp");
        std::fs::write(&tmp, z).map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, self.zone()).map_err(|e| e.to_string())
    }

    /// Queries the test's DNS server has seen, as `NAME TYPE PEER` lines.
    fn dns_queries(&self) -> Vec<String> {
        std::fs::read_to_string(self.dns_log())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("dns ").map(str::to_string))
            .collect()
    }

    fn new() -> Result<Lab, String> {
        let files = tempfile::Builder::new()
            .prefix("smolvm-egress-lab-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let world = std::process::Command::new("unshare")
            .args(["-n", "--", "sleep", "100000"])
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start the world namespace: {e}"))?;
        let mut lab = Lab {
            world,
            server: None,
            files,
        };
        // `unshare -n` has switched namespaces once its netns differs from ours.
        let ours = std::fs::read_link("/proc/self/ns/net").map_err(|e| e.to_string())?;
        let t = Instant::now();
        while std::fs::read_link(format!("/proc/{}/ns/net", lab.world.id())).ok()
            == Some(ours.clone())
        {
            if t.elapsed() > Duration::from_secs(10) {
                return Err("the world namespace did not appear".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let pid = lab.world.id().to_string();
        let w = lab.world_ns();
        must("ip", &["link", "set", "lo", "up"])?;
        must(
            "ip",
            &[
                "link", "add", "eg0", "type", "veth", "peer", "name", "eg1", "netns", &pid,
            ],
        )?;
        must(
            "ip",
            &["addr", "add", &format!("{OUTER_ADDR}/24"), "dev", "eg0"],
        )?;
        must("ip", &["link", "set", "eg0", "up"])?;
        must("ip", &["route", "add", "default", "via", WORLD_ADDR])?;
        let inw = |args: &[&str]| {
            let mut a = vec![w.as_str(), "ip"];
            a.extend_from_slice(args);
            must("nsenter", &a)
        };
        inw(&["link", "set", "lo", "up"])?;
        inw(&["addr", "add", &format!("{WORLD_ADDR}/24"), "dev", "eg1"])?;
        inw(&["link", "set", "eg1", "up"])?;
        for a in [LISTED, LISTED_NEW, WILD, CIDR_HOST, UNLISTED, RESOLVER] {
            inw(&["addr", "add", &format!("{a}/32"), "dev", "lo"])?;
        }
        // The resolver smolvm's network (pasta) forwards DNS to.
        let resolv = lab.files.path().join("resolv.conf");
        std::fs::write(&resolv, format!("nameserver {RESOLVER}\n")).map_err(|e| e.to_string())?;
        must(
            "mount",
            &["--bind", &resolv.display().to_string(), "/etc/resolv.conf"],
        )?;
        lab.set_zone(LISTED)?;
        let mut c = std::process::Command::new("nsenter");
        c.args([w.as_str(), PYTHON, "-I", "-c", SERVER])
            .arg(lab.zone())
            .arg(lab.dns_log())
            .args([LISTED, LISTED_NEW, WILD, CIDR_HOST, UNLISTED])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut server = c
            .spawn()
            .map_err(|e| format!("cannot start the servers: {e}"))?;
        let out = server.stdout.take();
        lab.server = Some(server);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            if let Some(o) = out {
                let _ = BufReader::new(o).read_line(&mut line);
            }
            let _ = tx.send(line);
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(l) if l.trim() == "ready" => {}
            other => return Err(format!("the servers did not start: {other:?}")),
        }
        lab.check_sealed()?;
        Ok(lab)
    }

    /// Nothing can leave: our namespace's only interfaces are lo and the
    /// veth, its only routes go to the world namespace, which has no
    /// default route at all.
    fn check_sealed(&self) -> Result<(), String> {
        let links = capture("ip", &["-o", "link", "show"])?;
        let names: Vec<&str> = links
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap_or(""))
            .collect();
        check!(names == ["lo", "eg0"], "unexpected interfaces: {names:?}");
        let routes = capture("ip", &["-4", "route", "show"])?;
        for r in routes.lines() {
            check!(
                r.starts_with(&format!("default via {WORLD_ADDR} dev eg0"))
                    || r.starts_with("172.31.99.0/24 dev eg0"),
                "unexpected route {r:?}"
            );
        }
        let w = capture("nsenter", &[&self.world_ns(), "ip", "-4", "route", "show"])?;
        check!(
            !w.contains("default"),
            "the world namespace has a default route: {w}"
        );
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = self.world.kill();
        let _ = self.world.wait();
    }
}

fn must(prog: &str, args: &[&str]) -> Result<(), String> {
    capture(prog, args).map(|_| ())
}

fn capture(prog: &str, args: &[&str]) -> Result<String, String> {
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
    Ok(String::from_utf8_lossy(&o.stdout).to_string())
}

fn cli_bin() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("SMOLVM_CLI_BIN") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    for d in exe.ancestors().skip(1).take(3) {
        let p = d.join("smolvm");
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(
        "smolvm CLI not found near the test; run `scripts/build.sh dev` or set SMOLVM_CLI_BIN"
            .into(),
    )
}

// ------------------------------------------------------------- the guest

struct Shared {
    vm: Sandbox,
    lab: Lab,
}

/// Runs `script` in the guest; its stdout.
async fn sh(vm: &Sandbox, script: &str) -> Result<String, String> {
    let o = vm
        .exec(Command::Shell(script.to_string()), &ExecOptions::default())
        .await
        .map_err(|e| smolvm::error::chain(&e))?;
    Ok(String::from_utf8_lossy(&o.stdout).to_string())
}

/// What the guest got from each probe: `name -> "BODY-... rc=N"`.
async fn probe(vm: &Sandbox, probes: &[(&str, &str)]) -> Result<Vec<(String, String)>, String> {
    let mut s = String::new();
    for (name, what) in probes {
        let line = match what.strip_prefix("dns:") {
            Some(host) => {
                format!("r=$(getent ahostsv4 {host} | head -1); echo \"P {name} [$r] rc=$?\"\n")
            }
            None => match what.strip_prefix("direct-dns:") {
                Some(addr) => format!("echo \"P {name} $(python3 -c \"$DIRECT\" {addr})\"\n"),
                None => format!(
                    "b=$(curl -s --noproxy '*' -m 5 {what}); echo \"P {name} [$b] rc=$?\"\n"
                ),
            },
        };
        s.push_str(&line);
    }
    let script = format!("DIRECT='{DIRECT_DNS}'\n{s}");
    let out = sh(vm, &script).await?;
    Ok(out
        .lines()
        .filter_map(|l| l.strip_prefix("P "))
        .filter_map(|l| l.split_once(' '))
        .map(|(n, r)| (n.to_string(), r.to_string()))
        .collect())
}

fn result<'a>(got: &'a [(String, String)], name: &str) -> &'a str {
    got.iter()
        .find(|(n, _)| n == name)
        .map_or("(no result)", |(_, r)| r.as_str())
}

fn allowlist() -> EgressPolicy {
    EgressPolicy::Allowlist {
        domains: vec!["OK.test.".into(), "*.wild.test".into()],
        cidrs: vec!["198.51.100.0/24".into()],
    }
}

async fn set(vm: &Sandbox, p: EgressPolicy) -> Result<EgressPolicy, String> {
    vm.set_egress(p)
        .await
        .map_err(|e| format!("set_egress: {}", smolvm::error::chain(&e)))
}

/// Guest side: reads the tick service at argv[1]:81 into /tmp/ticks (one
/// line per tick), then how it ended: `END reset`, `END eof`, `END timeout`.
const TICK_CLIENT: &str = r#"import socket,sys
f=open("/tmp/ticks","w",buffering=1)
s=socket.create_connection((sys.argv[1],81),timeout=5); s.settimeout(20)
how="eof"
try:
    while True:
        b=s.recv(4096)
        if not b: break
        f.write(b.decode())
except ConnectionResetError: how="reset"
except socket.timeout: how="timeout"
except OSError as e: how="error %s" % e
f.write("END %s\n" % how)
"#;

// ----------------------------------------------------------------- cases

async fn open_reaches_everything(s: &Shared) -> Result<(), String> {
    set(&s.vm, EgressPolicy::Open).await?;
    let got = probe(
        &s.vm,
        &[
            ("name", "http://ok.test/"),
            ("cidr", &format!("http://{CIDR_HOST}/")),
            ("unlisted", &format!("http://{UNLISTED}/")),
            ("bad-dns", "dns:bad.test"),
        ],
    )
    .await?;
    check_eq!(result(&got, "name"), format!("[BODY-{LISTED}] rc=0"));
    check_eq!(result(&got, "cidr"), format!("[BODY-{CIDR_HOST}] rc=0"));
    check_eq!(result(&got, "unlisted"), format!("[BODY-{UNLISTED}] rc=0"));
    check!(
        result(&got, "bad-dns").contains(UNLISTED),
        "open: bad.test does not resolve: {got:?}"
    );
    Ok(())
}

async fn allowlist_admits_only_listed(s: &Shared) -> Result<(), String> {
    let p = set(&s.vm, allowlist()).await?;
    check_eq!(
        p,
        EgressPolicy::Allowlist {
            domains: vec!["*.wild.test".into(), "ok.test".into()],
            cidrs: vec!["198.51.100.0/24".into()],
        }
    );
    check_eq!(s.vm.egress().await.map_err(|e| e.to_string())?, p);
    let before = s.lab.dns_queries().len();
    let got = probe(
        &s.vm,
        &[
            ("name", "http://ok.test/"),
            ("wild", "http://x.wild.test/"),
            ("cidr", &format!("http://{CIDR_HOST}/")),
            ("bad-dns", "dns:bad.test"),
            ("bad-name", "http://bad.test/"),
            ("bad-ip", &format!("http://{UNLISTED}/")),
            ("resolver-http", &format!("http://{RESOLVER}/")),
            ("direct-dns", &format!("direct-dns:{RESOLVER}")),
        ],
    )
    .await?;
    check_eq!(result(&got, "name"), format!("[BODY-{LISTED}] rc=0"));
    check_eq!(result(&got, "wild"), format!("[BODY-{WILD}] rc=0"));
    check_eq!(result(&got, "cidr"), format!("[BODY-{CIDR_HOST}] rc=0"));
    check!(
        !result(&got, "bad-dns").contains(UNLISTED),
        "an unlisted name resolved: {got:?}"
    );
    for n in ["bad-name", "bad-ip", "resolver-http"] {
        let r = result(&got, n);
        check!(
            !r.contains("BODY-") && !r.ends_with("rc=0"),
            "{n} connected under the allowlist: {r}"
        );
    }
    check!(
        result(&got, "direct-dns").starts_with("NOANSWER"),
        "DNS to another resolver was answered: {got:?}"
    );
    let seen: Vec<String> = s.lab.dns_queries().split_off(before);
    check!(
        !seen.iter().any(|q| q.starts_with("bad.test")),
        "the unlisted name's query left the relay: {seen:?}"
    );
    check!(
        seen.iter().any(|q| q.starts_with("ok.test 1")),
        "the listed name's query did not reach the resolver: {seen:?}"
    );
    check!(
        !seen.iter().any(|q| !q.ends_with(OUTER_ADDR)),
        "a query reached the resolver not through the relay: {seen:?}"
    );
    Ok(())
}

async fn names_are_matched_each_time(s: &Shared) -> Result<(), String> {
    set(&s.vm, allowlist()).await?;
    let got = probe(&s.vm, &[("before", "http://ok.test/")]).await?;
    check_eq!(result(&got, "before"), format!("[BODY-{LISTED}] rc=0"));
    // The listed name moves to an address never seen before.
    s.lab.set_zone(LISTED_NEW)?;
    let got = probe(
        &s.vm,
        &[
            ("after", "http://ok.test/"),
            ("raw-new", &format!("http://{LISTED_NEW}/")),
        ],
    )
    .await?;
    s.lab.set_zone(LISTED)?;
    check_eq!(result(&got, "after"), format!("[BODY-{LISTED_NEW}] rc=0"));
    check_eq!(result(&got, "raw-new"), format!("[BODY-{LISTED_NEW}] rc=0"));
    Ok(())
}

async fn live_changes_take_effect(s: &Shared) -> Result<(), String> {
    set(&s.vm, allowlist()).await?;
    let got = probe(&s.vm, &[("blocked", &format!("http://{UNLISTED}/"))]).await?;
    check!(
        !result(&got, "blocked").contains("BODY-"),
        "allowlist: the unlisted address answered: {got:?}"
    );
    // Back to open: the same address answers.
    set(&s.vm, EgressPolicy::Open).await?;
    let got = probe(&s.vm, &[("open", &format!("http://{UNLISTED}/"))]).await?;
    check_eq!(result(&got, "open"), format!("[BODY-{UNLISTED}] rc=0"));
    // Off on a VM with a NIC: nothing, not even a listed CIDR or DNS; exec works.
    set(&s.vm, EgressPolicy::Off).await?;
    let got = probe(
        &s.vm,
        &[
            ("cidr", &format!("http://{CIDR_HOST}/")),
            ("dns", "dns:ok.test"),
        ],
    )
    .await?;
    check!(
        !result(&got, "cidr").contains("BODY-"),
        "off: a server answered: {got:?}"
    );
    check!(
        !result(&got, "dns").contains(LISTED),
        "off: a name resolved: {got:?}"
    );
    // The stored config says it too (what `info` and the next start use).
    let info = s.vm.info().await.map_err(|e| e.to_string())?;
    check_eq!(info.egress, EgressPolicy::Off);
    set(&s.vm, EgressPolicy::Open).await?;
    let got = probe(&s.vm, &[("again", &format!("http://{CIDR_HOST}/"))]).await?;
    check_eq!(result(&got, "again"), format!("[BODY-{CIDR_HOST}] rc=0"));
    Ok(())
}

/// A policy change cuts an open connection, even one the new policy still
/// admits (docs/network.md: every connection is cut on a change).
async fn a_change_cuts_open_connections(s: &Shared) -> Result<(), String> {
    set(&s.vm, EgressPolicy::Open).await?;
    sh(&s.vm, "rm -f /tmp/ticks").await?;
    s.vm.spawn(
        Command::Argv(vec![
            "python3".into(),
            "-c".into(),
            TICK_CLIENT.into(),
            CIDR_HOST.into(),
        ]),
        &ExecOptions::default(),
    )
    .await
    .map_err(|e| smolvm::error::chain(&e))?;
    let ticks = || async { sh(&s.vm, "grep -c TICK /tmp/ticks 2>/dev/null || true").await };
    let until = Instant::now() + Duration::from_secs(60);
    while ticks().await?.trim().parse::<u32>().unwrap_or(0) < 3 {
        check!(
            Instant::now() < until,
            "the tick connection never got going"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The new policy still lists the server's CIDR.
    set(&s.vm, allowlist()).await?;
    let until = Instant::now() + Duration::from_secs(30);
    let end = loop {
        let t = sh(&s.vm, "grep END /tmp/ticks 2>/dev/null || true").await?;
        if !t.trim().is_empty() {
            break t.trim().to_string();
        }
        check!(
            Instant::now() < until,
            "the open connection outlived the policy change"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    check_eq!(end, "END reset");
    // New connections under the new policy work.
    let got = probe(&s.vm, &[("after", &format!("http://{CIDR_HOST}/"))]).await?;
    check_eq!(result(&got, "after"), format!("[BODY-{CIDR_HOST}] rc=0"));
    set(&s.vm, EgressPolicy::Open).await?;
    Ok(())
}

async fn invalid_entries_are_refused(s: &Shared) -> Result<(), String> {
    let cli = cli_bin()?;
    let ls = |cli: PathBuf| async move {
        let o = tokio::process::Command::new(cli)
            .args(["ls", "--all", "--json"])
            .output()
            .await
            .map_err(|e| e.to_string())?;
        Ok::<String, String>(String::from_utf8_lossy(&o.stdout).to_string())
    };
    let before = ls(cli.clone()).await?;
    for (args, want) in [
        (&["--allow", "https://example.com/x"][..], "a URL"),
        (&["--allow", "user:pw@example.com"][..], "credentials"),
        (&["--allow", "example.com:443"][..], "ports"),
        (&["--allow", "10.0.0.1/8"][..], "did you mean 10.0.0.0/8"),
        (&["--allow", "*"][..], "bare `*`"),
        (&["--egress", "allowlist"][..], "no entries"),
        (
            &["--egress", "off", "--allow", "example.com"][..],
            "cannot go with",
        ),
    ] {
        let o = tokio::process::Command::new(&cli)
            .arg("create")
            .args(args)
            .output()
            .await
            .map_err(|e| e.to_string())?;
        let err = String::from_utf8_lossy(&o.stderr);
        check!(
            !o.status.success() && err.contains(want),
            "create {args:?}: {:?} {err}",
            o.status.code()
        );
    }
    check_eq!(ls(cli.clone()).await?, before);
    // A running VM keeps its policy when the new one is invalid.
    let now = s.vm.egress().await.map_err(|e| e.to_string())?;
    let o = tokio::process::Command::new(&cli)
        .args(["network", "set", s.vm.id(), "--allow", "10.0.0.1/8"])
        .output()
        .await
        .map_err(|e| e.to_string())?;
    check_eq!(o.status.code(), Some(125));
    check_eq!(s.vm.egress().await.map_err(|e| e.to_string())?, now);
    // And the CLI's set and show work on it.
    let o = tokio::process::Command::new(&cli)
        .args([
            "network",
            "set",
            s.vm.id(),
            "--allow",
            "ok.test",
            "--allow",
            "198.51.100.0/24",
        ])
        .output()
        .await
        .map_err(|e| e.to_string())?;
    check!(
        o.status.success(),
        "network set: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = tokio::process::Command::new(&cli)
        .args(["network", s.vm.id()])
        .output()
        .await
        .map_err(|e| e.to_string())?;
    check_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!("{}: egress allowlist: ok.test, 198.51.100.0/24", s.vm.id())
    );
    set(&s.vm, EgressPolicy::Open).await?;
    Ok(())
}

/// `off` at creation: no NIC at all; exec works; no policy can add one.
async fn off_has_no_nic() -> Result<(), String> {
    let vm = Sandbox::create(SandboxConfig {
        egress: EgressPolicy::Off,
        ..SandboxConfig::default()
    })
    .await
    .map_err(|e| smolvm::error::chain(&e))?;
    let r = async {
        let info = vm.info().await.map_err(|e| e.to_string())?;
        check!(!info.network, "egress off at creation left a NIC");
        vm.start(BOOT).await.map_err(|e| smolvm::error::chain(&e))?;
        let got = probe(
            &vm,
            &[
                ("cidr", &format!("http://{CIDR_HOST}/")),
                ("dns", "dns:ok.test"),
            ],
        )
        .await?;
        check!(!result(&got, "cidr").contains("BODY-"), "off: {got:?}");
        let links = sh(&vm, "ls /sys/class/net; echo done").await?;
        check!(
            links.contains("done") && !links.contains("eth0"),
            "off: the guest has a NIC: {links}"
        );
        match vm.set_egress(EgressPolicy::Open).await {
            Err(e) if e.kind() == smolvm::ErrorKind::InvalidState => {}
            other => return Err(format!("open on a VM without a NIC: {other:?}")),
        }
        vm.set_egress(EgressPolicy::Off)
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }
    .await;
    let _ = vm.delete().await;
    r
}

// ------------------------------------------------------------------ main

/// Re-runs this binary inside a user + network + mount namespace of its
/// own; returns its exit code.
fn reexec_in_namespace() -> i32 {
    let exe = std::env::current_exe().expect("current_exe");
    let st = std::process::Command::new("unshare")
        .args(["-rnm", "--"])
        .arg(exe)
        .args(std::env::args_os().skip(1))
        .env(INNER, "1")
        .status();
    match st {
        Ok(s) => s.code().unwrap_or(1),
        Err(e) => {
            eprintln!("cannot run the test in a namespace of its own (unshare -rnm): {e}");
            1
        }
    }
}

fn main() {
    let vm_cases = cases![Shared:
        open_reaches_everything,
        allowlist_admits_only_listed,
        names_are_matched_each_time,
        live_changes_take_effect,
        a_change_cuts_open_connections,
        invalid_entries_are_refused,
    ];
    let own_cases = cases![off_has_no_nic];
    let mut names = case_names(&vm_cases);
    names.extend(case_names(&own_cases));
    list_if_asked(&names);
    if std::env::var_os(INNER).is_none() {
        std::process::exit(reexec_in_namespace());
    }

    let data = isolated_data_dir("smolvm-egress-");
    let filters = filter();
    let rt = runtime();
    let started = Instant::now();
    let code = rt.block_on(async {
        let lab = match Lab::new() {
            Ok(l) => l,
            Err(e) => {
                eprintln!("cannot set up the test's namespaces: {e}");
                return 1;
            }
        };
        let mut passed = 0;
        let mut failed = Vec::new();
        let mut lab = Some(lab);
        if vm_cases.iter().any(|(n, _)| selected(n, &filters)) {
            match boot_shared().await {
                Err(e) => {
                    eprintln!("cannot boot the shared VM: {e}");
                    failed.push("setup".to_string());
                }
                Ok(vm) => {
                    let shared = Shared {
                        vm,
                        lab: lab.take().expect("lab"),
                    };
                    let (p, f) =
                        run_cases(&vm_cases, &shared, &filters, Some(CASE_LIMIT), || async {})
                            .await;
                    passed += p;
                    failed.extend(f);
                    if let Err(e) = shared.vm.delete().await {
                        eprintln!("cannot delete the shared VM: {}", smolvm::error::chain(&e));
                        failed.push("teardown".into());
                    }
                    lab = Some(shared.lab);
                }
            }
        }
        let (p, f) = run_cases(&own_cases, &(), &filters, Some(CASE_LIMIT), || async {}).await;
        passed += p;
        failed.extend(f);
        drop(lab);
        if let Err(e) = no_processes_in(data.path()).await {
            eprintln!("{e}");
            failed.push("teardown".into());
        }
        summary(passed, &failed)
    });
    println!("egress: {:.1}s", started.elapsed().as_secs_f64());
    kill_processes_in(data.path());
    drop(rt);
    drop(data);
    std::process::exit(code);
}

async fn boot_shared() -> Result<Sandbox, String> {
    let vm = Sandbox::create(SandboxConfig::default())
        .await
        .map_err(|e| smolvm::error::chain(&e))?;
    if let Err(e) = vm.start(BOOT).await {
        let msg = smolvm::error::chain(&e);
        let _ = vm.delete().await;
        return Err(msg);
    }
    Ok(vm)
}
