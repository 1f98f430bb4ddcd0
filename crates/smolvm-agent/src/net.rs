//! Guest networking from the kernel command line: loopback always, eth0 and
//! the default route when the host asked for them, and /etc/resolv.conf.
//! Plain ioctls on an AF_INET datagram socket; failures are logged.

use crate::cmdline::{netmask, BootConfig};
use crate::sys::{cvt, os_message};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

pub fn configure(cfg: &BootConfig) {
    let sock = match socket() {
        Ok(s) => s,
        Err(e) => {
            error!("network: socket: {}", os_message(&e));
            return;
        }
    };
    if let Err(e) = set_addr(&sock, "lo", Ipv4Addr::LOCALHOST, 8).and_then(|()| set_up(&sock, "lo"))
    {
        error!("network: lo: {}", os_message(&e));
    }
    if let Some((addr, prefix)) = cfg.ip {
        if !Path::new("/sys/class/net/eth0").exists() {
            error!("network: smolvm.ip given but there is no eth0");
        } else if let Err(e) =
            set_addr(&sock, "eth0", addr, prefix).and_then(|()| set_up(&sock, "eth0"))
        {
            error!("network: eth0 {addr}/{prefix}: {}", os_message(&e));
        } else if let Some(gw) = cfg.gw {
            match default_route(&sock, gw) {
                Ok(()) => info!("network: eth0 {addr}/{prefix} via {gw}"),
                Err(e) => error!("network: default route via {gw}: {}", os_message(&e)),
            }
        } else {
            info!("network: eth0 {addr}/{prefix}");
        }
    }
    if let Some(dns) = cfg.dns {
        if let Err(e) = write_resolv_conf(dns) {
            error!("network: /etc/resolv.conf: {}", os_message(&e));
        }
    }
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments.
    let fd = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` was just returned by a successful socket(2).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        // AF_INET (2) fits sa_family_t.
        sin_family: libc::sa_family_t::try_from(libc::AF_INET).unwrap_or_default(),
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16-byte plain-old-data
    // structs; every bit pattern is valid for sockaddr.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *dst = src.cast_signed();
    }
    req
}

fn ioctl<T>(sock: &OwnedFd, request: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: every request used here takes a pointer to exactly the struct
    // type the caller passes (ifreq or rtentry), which is valid and writable.
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), request, arg as *mut T) }).map(drop)
}

fn set_addr(sock: &OwnedFd, dev: &str, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
    let mut req = ifreq(dev);
    req.ifr_ifru.ifru_addr = sockaddr(addr);
    ioctl(sock, libc::SIOCSIFADDR, &mut req)?;
    let mut req = ifreq(dev);
    req.ifr_ifru.ifru_netmask = sockaddr(netmask(prefix));
    ioctl(sock, libc::SIOCSIFNETMASK, &mut req)
}

fn set_up(sock: &OwnedFd, dev: &str) -> io::Result<()> {
    let mut req = ifreq(dev);
    ioctl(sock, libc::SIOCGIFFLAGS, &mut req)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    // IFF_UP | IFF_RUNNING (0x41) fits the short flags field.
    let up = libc::c_short::try_from(libc::IFF_UP | libc::IFF_RUNNING).unwrap_or(0x41);
    req.ifr_ifru.ifru_flags = flags | up;
    ioctl(sock, libc::SIOCSIFFLAGS, &mut req)
}

fn default_route(sock: &OwnedFd, gw: Ipv4Addr) -> io::Result<()> {
    // SAFETY: rtentry is plain old data; all-zero (null rt_dev) is valid.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr(gw);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    match ioctl(sock, libc::SIOCADDRT, &mut rt) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        r => r,
    }
}

fn write_resolv_conf(dns: Ipv4Addr) -> io::Result<()> {
    let path = Path::new("/etc/resolv.conf");
    // A dangling link (e.g. to systemd-resolved's file) would make the write fail.
    if path
        .symlink_metadata()
        .is_ok_and(|m| m.file_type().is_symlink())
    {
        std::fs::remove_file(path)?;
    }
    std::fs::write(path, format!("nameserver {dns}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddr_is_network_order() {
        let sa = sockaddr(Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(sa.sa_family, libc::AF_INET as libc::sa_family_t);
        // sin_port (2 bytes) then the address, big-endian.
        let data: Vec<u8> = sa.sa_data.iter().map(|&b| b as u8).collect();
        assert_eq!(&data[2..6], &[10, 0, 2, 15]);
    }

    #[test]
    fn ifreq_name_is_terminated() {
        let r = ifreq("a-very-long-interface-name");
        assert_eq!(r.ifr_name[libc::IFNAMSIZ - 1], 0);
        assert_eq!(r.ifr_name[0] as u8, b'a');
    }
}
