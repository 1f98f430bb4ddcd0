//! The `smolvm.*` keys of the guest kernel command line: how the host
//! tells the guest agent (and the initramfs init) who it is and how its
//! network looks, before any channel exists. Host and agent both name them
//! from here.

/// `smolvm.id=<id>`: the VM id, used as the guest's hostname.
pub const ID: &str = "smolvm.id";
/// `smolvm.ip=<addr>/<prefix>`: eth0's IPv4 address.
pub const IP: &str = "smolvm.ip";
/// `smolvm.gw=<addr>`: the default gateway.
pub const GATEWAY: &str = "smolvm.gw";
/// `smolvm.dns=<addr>`: the resolver.
pub const DNS: &str = "smolvm.dns";
/// `smolvm.resize=1`: grow the root filesystem to fill its disk.
pub const RESIZE: &str = "smolvm.resize";
/// `smolvm.probe=1`: the accelerator probe (the init prints a marker and
/// powers off; read by the initramfs init script).
pub const PROBE: &str = "smolvm.probe";
