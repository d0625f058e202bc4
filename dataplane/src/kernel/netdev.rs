//! Network interfaces of the namespace the agent runs in, by name and index.

use std::{
    ffi::{CStr, CString},
    net::Ipv4Addr,
};

/// The index of interface `name`, or None when it does not exist.
pub fn ifindex(name: &str) -> Option<u32> {
    let c_name = CString::new(name).ok()?;
    // SAFETY: c_name is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    (index != 0).then_some(index)
}

/// The name of interface `index`, or None when no interface has it.
pub fn ifname(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires.
    let name = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if name.is_null() {
        return None;
    }
    // SAFETY: on success if_indextoname wrote a NUL-terminated name into buf.
    let name = unsafe { CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// IPv4 addresses of every interface in this network namespace: (interface, address).
pub fn ipv4_addresses() -> Vec<(String, Ipv4Addr)> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Vec::new();
    }
    let mut addresses = Vec::new();
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: cursor walks the list getifaddrs returned, which stays valid until freed.
        let entry = unsafe { &*cursor };
        if !entry.ifa_addr.is_null()
            // SAFETY: ifa_addr is non-null and points at a sockaddr.
            && i32::from(unsafe { (*entry.ifa_addr).sa_family }) == libc::AF_INET
        {
            // SAFETY: an AF_INET address is a sockaddr_in.
            let sin = unsafe { &*entry.ifa_addr.cast::<libc::sockaddr_in>() };
            // SAFETY: ifa_name is a NUL-terminated string.
            let name = unsafe { CStr::from_ptr(entry.ifa_name) }
                .to_string_lossy()
                .into_owned();
            addresses.push((name, Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))));
        }
        cursor = entry.ifa_next;
    }
    // SAFETY: head came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    addresses
}

/// The cookie the kernel gives this network namespace (SO_NETNS_COOKIE), which kernel
/// programs compare with bpf_get_netns_cookie.
pub fn netns_cookie() -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: plain socket syscalls on a descriptor we own and close.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(err);
        }
        Ok(cookie)
    }
}

/// Where the cgroup2 hierarchy is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on
/// hybrid hosts), from /proc/self/mounts.
pub fn cgroup2_root() -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, mount_point, fs_type) = (fields.next()?, fields.next()?, fields.next()?);
        (fs_type == "cgroup2").then(|| mount_point.to_owned())
    })
}

/// The interface of the default IPv4 route, read from /proc/net/route.
pub fn default_route_interface() -> Option<String> {
    let routes = std::fs::read_to_string("/proc/net/route").ok()?;
    routes.lines().skip(1).find_map(|line| {
        let mut fields = line.split_whitespace();
        let interface = fields.next()?;
        let destination = fields.next()?;
        (destination == "00000000").then(|| interface.to_owned())
    })
}

/// The driver of `interface` in this network namespace, as `ethtool -i` names it (ETHTOOL_GDRVINFO;
/// sysfs is not used because it shows the namespace it was mounted in, not the agent's).
pub fn driver(interface: &str) -> std::io::Result<String> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    if interface.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    // SAFETY: zeroed plain C structs; the ioctl writes at most size_of::<DrvInfo>() into the
    // buffer `ifr_data` points at; the socket is ours and closed below.
    unsafe {
        let mut info: DrvInfo = std::mem::zeroed();
        info.cmd = ETHTOOL_GDRVINFO;
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (dst, src) in ifr.ifr_name.iter_mut().zip(interface.bytes()) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_data = (&mut info as *mut DrvInfo).cast();
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let rc = libc::ioctl(fd, SIOCETHTOOL, &mut ifr);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc < 0 {
            return Err(err);
        }
        let end = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
        Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
    }
}

/// Whether XDP on `interface` runs before a socket buffer exists, so that an early drop
/// there saves work: true for NIC drivers. Virtual devices (veth, bridge, vxlan, macvlan,
/// tun, ...) build the skb first (veth's native XDP even converts it back), and any XDP
/// program on a veth turns GRO off; there tc ingress is the cheaper place to drop.
pub fn xdp_saves_work(interface: &str) -> bool {
    const VIRTUAL: [&str; 9] = [
        "veth", "bridge", "vxlan", "macvlan", "ipvlan", "tun", "dummy", "bonding", "",
    ];
    driver(interface).is_ok_and(|d| !VIRTUAL.contains(&d.as_str()))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    #[test]
    fn loopback_round_trips() {
        let index = super::ifindex("lo").expect("every namespace has lo");
        assert_eq!(super::ifname(index).as_deref(), Some("lo"));
        assert_eq!(super::ifindex("no-such-if0"), None);
        assert!(super::ipv4_addresses().contains(&("lo".to_string(), Ipv4Addr::LOCALHOST)));
        assert_ne!(super::netns_cookie().unwrap(), 0);
    }
}
