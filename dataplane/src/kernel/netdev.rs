//! Network interfaces of the namespace the calling thread is in: links and addresses by
//! rtnetlink (NETLINK_ROUTE), plus a few facts read from /proc.
//!
//! What the libraries do for us: `netlink-packet-route` (rtnetlink's message types) builds
//! and parses the messages and their attributes, `netlink-sys` is the socket. Requests here
//! are synchronous (a socket per request, like `if_nametoindex` makes): the callers are
//! synchronous, and a socket opened on a thread that entered another namespace dumps that
//! namespace (see `source::docker::links`).

use std::{
    io,
    net::{IpAddr, Ipv4Addr},
};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkBuffer, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
    link::{LinkAttribute, LinkMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// One interface as the kernel describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    /// IFLA_LINK: for a veth, the ifindex of its peer (in the peer's namespace).
    pub peer_index: Option<u32>,
}

impl From<LinkMessage> for Link {
    fn from(message: LinkMessage) -> Link {
        let mut link = Link {
            index: message.header.index,
            name: String::new(),
            mac: None,
            peer_index: None,
        };
        for attribute in message.attributes {
            match attribute {
                LinkAttribute::IfName(name) => link.name = name,
                LinkAttribute::Address(mac) => link.mac = <[u8; 6]>::try_from(mac).ok(),
                LinkAttribute::Link(peer) => link.peer_index = Some(peer),
                _ => {}
            }
        }
        link
    }
}

/// One address of an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub index: u32,
    pub ip: IpAddr,
    pub prefix_len: u8,
}

impl Address {
    fn from_message(message: AddressMessage) -> Option<Address> {
        // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on a
        // point-to-point link and the same as IFA_LOCAL elsewhere (IPv6 has only IFA_ADDRESS).
        let mut local = None;
        let mut address = None;
        for attribute in message.attributes {
            match attribute {
                AddressAttribute::Local(ip) => local = Some(ip),
                AddressAttribute::Address(ip) => address = Some(ip),
                _ => {}
            }
        }
        Some(Address {
            index: message.header.index,
            ip: local.or(address)?,
            prefix_len: message.header.prefix_len,
        })
    }
}

fn invalid(error: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("rtnetlink answer: {error}"),
    )
}

/// Sends one request on a new NETLINK_ROUTE socket and collects the answers: every message
/// of a dump, or the one answer of a plain request.
fn request(message: RouteNetlinkMessage, dump: bool) -> io::Result<Vec<RouteNetlinkMessage>> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut packet = NetlinkMessage::from(message);
    packet.header.flags = NLM_F_REQUEST | if dump { NLM_F_DUMP } else { 0 };
    packet.header.sequence_number = 1;
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut answers = Vec::new();
    loop {
        let data = match socket.recv_from_full() {
            Ok((data, _)) => data,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if data.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "netlink closed inside an answer",
            ));
        }
        let mut rest = &data[..];
        while !rest.is_empty() {
            let length = NetlinkBuffer::new_checked(rest).map_err(invalid)?.length() as usize;
            let one = rest
                .get(..length)
                .ok_or_else(|| invalid("message length"))?;
            let message =
                NetlinkMessage::<RouteNetlinkMessage>::deserialize(one).map_err(invalid)?;
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(answers),
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                NetlinkPayload::InnerMessage(m) => {
                    answers.push(m);
                    if !dump {
                        return Ok(answers);
                    }
                }
                _ => {}
            }
            // Messages are 4-byte aligned.
            rest = rest.get((length + 3) & !3..).unwrap_or_default();
        }
    }
}

/// Every link of this network namespace (one RTM_GETLINK dump).
pub fn links() -> io::Result<Vec<Link>> {
    Ok(
        request(RouteNetlinkMessage::GetLink(LinkMessage::default()), true)?
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(link) => Some(Link::from(link)),
                _ => None,
            })
            .collect(),
    )
}

/// One link, by name or by index; None when there is no such link.
fn link(name: Option<&str>, index: u32) -> Option<Link> {
    let mut message = LinkMessage::default();
    message.header.index = index;
    if let Some(name) = name {
        message
            .attributes
            .push(LinkAttribute::IfName(name.to_owned()));
    }
    match request(RouteNetlinkMessage::GetLink(message), false) {
        Ok(answers) => answers.into_iter().find_map(|m| match m {
            RouteNetlinkMessage::NewLink(link) => Some(Link::from(link)),
            _ => None,
        }),
        Err(e) => {
            // ENODEV: no such interface; anything else is worth a word.
            if e.raw_os_error() != Some(libc::ENODEV) {
                log::debug!("rtnetlink: looking up interface {name:?}/{index}: {e}");
            }
            None
        }
    }
}

/// The index of interface `name`, or None when it does not exist.
pub fn ifindex(name: &str) -> Option<u32> {
    // The kernel takes at most IFNAMSIZ-1 bytes; a longer name names nothing.
    if name.is_empty() || name.len() >= libc::IF_NAMESIZE || name.contains('\0') {
        return None;
    }
    link(Some(name), 0).map(|l| l.index)
}

/// The name of interface `index`, or None when no interface has it.
pub fn ifname(index: u32) -> Option<String> {
    if index == 0 {
        return None;
    }
    link(None, index).map(|l| l.name)
}

/// Every address of every interface in this network namespace, IPv4 and IPv6 (one
/// RTM_GETADDR dump).
pub fn addresses() -> io::Result<Vec<Address>> {
    let mut message = AddressMessage::default();
    message.header.family = AddressFamily::Unspec;
    Ok(request(RouteNetlinkMessage::GetAddress(message), true)?
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewAddress(a) => Address::from_message(a),
            _ => None,
        })
        .collect())
}

/// IPv4 addresses of every interface in this network namespace: (interface, address).
pub fn ipv4_addresses() -> Vec<(String, Ipv4Addr)> {
    let (Ok(addresses), Ok(links)) = (addresses(), links()) else {
        return Vec::new();
    };
    addresses
        .into_iter()
        .filter_map(|a| {
            let IpAddr::V4(ip) = a.ip else { return None };
            let name = links.iter().find(|l| l.index == a.index)?.name.clone();
            Some((name, ip))
        })
        .collect()
}

/// IPv6 addresses of every interface in this network namespace but link-local ones
/// (fe80::/10: every interface has its own, the same on many, and nothing is published or
/// balanced on them): (interface, address).
pub fn ipv6_addresses() -> Vec<(String, std::net::Ipv6Addr)> {
    let (Ok(addresses), Ok(links)) = (addresses(), links()) else {
        return Vec::new();
    };
    addresses
        .into_iter()
        .filter_map(|a| {
            let IpAddr::V6(ip) = a.ip else { return None };
            if ip.segments()[0] & 0xffc0 == 0xfe80 {
                return None;
            }
            let name = links.iter().find(|l| l.index == a.index)?.name.clone();
            Some((name, ip))
        })
        .collect()
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

/// The cookie of the network namespace the file `netns` stands for (`/proc/PID/ns/net` or a
/// bind mount of it, such as /run/netns/NAME): read with SO_NETNS_COOKIE on a socket made by
/// a thread of its own that enters the namespace and then ends, so no thread of the agent
/// ever changes namespace. Cached by the path and the namespace's inode (number and change
/// time: an inode number of a namespace that is gone can come back for a new one, its time
/// not), so each namespace costs one thread once.
pub fn netns_cookie_of(netns: &std::path::Path) -> std::io::Result<u64> {
    use std::{collections::HashMap, os::fd::AsRawFd as _, os::unix::fs::MetadataExt as _};
    type Inode = (std::path::PathBuf, u64, u64, i64, i64);
    static CACHE: std::sync::Mutex<Option<HashMap<Inode, u64>>> = std::sync::Mutex::new(None);
    let meta = std::fs::metadata(netns)?;
    let inode = (
        netns.to_owned(),
        meta.dev(),
        meta.ino(),
        meta.ctime(),
        meta.ctime_nsec(),
    );
    if let Some(cookie) = CACHE
        .lock()
        .ok()
        .and_then(|c| c.as_ref().and_then(|c| c.get(&inode).copied()))
    {
        return Ok(cookie);
    }
    let path = netns.to_owned();
    let cookie = std::thread::Builder::new()
        .name("netns-cookie".into())
        .spawn(move || {
            let file = std::fs::File::open(&path)?;
            // SAFETY: a namespace file descriptor we hold open; setns changes only this
            // thread, which ends right after reading the cookie.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            netns_cookie()
        })?
        .join()
        .map_err(|_| std::io::Error::other("the netns thread panicked"))??;
    if let Ok(mut cache) = CACHE.lock() {
        let cache = cache.get_or_insert_with(HashMap::new);
        // Namespaces come and go; the cache stays small (one entry per container ever seen
        // since the last clear).
        if cache.len() > 65_536 {
            cache.clear();
        }
        cache.insert(inode, cookie);
    }
    Ok(cookie)
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
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    #[test]
    fn loopback_round_trips() {
        let index = super::ifindex("lo").expect("every namespace has lo");
        assert_eq!(super::ifname(index).as_deref(), Some("lo"));
        assert_eq!(super::ifindex("no-such-if0"), None);
        assert_eq!(super::ifindex(""), None);
        assert_eq!(super::ifindex("a-name-longer-than-ifnamsiz"), None);
        assert_eq!(super::ifname(0), None);
        assert_eq!(super::ifname(u32::MAX), None);
        assert!(super::ipv4_addresses().contains(&("lo".to_string(), Ipv4Addr::LOCALHOST)));
        assert_ne!(super::netns_cookie().unwrap(), 0);
    }

    #[test]
    fn addresses_include_ipv6() {
        let lo = super::ifindex("lo").unwrap();
        let addresses = super::addresses().unwrap();
        let on_lo = |ip: IpAddr, prefix_len| {
            addresses
                .iter()
                .any(|a| a.index == lo && a.ip == ip && a.prefix_len == prefix_len)
        };
        assert!(on_lo(Ipv4Addr::LOCALHOST.into(), 8), "{addresses:?}");
        // ::1 unless IPv6 is off in this namespace.
        let ipv6_off = std::fs::read_to_string("/proc/sys/net/ipv6/conf/lo/disable_ipv6")
            .map(|v| v.trim() == "1")
            .unwrap_or(true);
        assert!(
            ipv6_off || on_lo(Ipv6Addr::LOCALHOST.into(), 128),
            "{addresses:?}"
        );
        let v6 = super::ipv6_addresses();
        assert!(
            ipv6_off || v6.contains(&("lo".to_string(), Ipv6Addr::LOCALHOST)),
            "{v6:?}"
        );
        assert!(v6.iter().all(|(_, ip)| ip.segments()[0] & 0xffc0 != 0xfe80));
    }

    #[test]
    fn links_dump_matches_lookups() {
        let links = super::links().unwrap();
        let lo = links.iter().find(|l| l.name == "lo").expect("lo");
        assert_eq!(lo.mac, Some([0; 6]));
        for link in &links {
            assert_eq!(super::ifindex(&link.name), Some(link.index));
            assert_eq!(
                super::ifname(link.index).as_deref(),
                Some(link.name.as_str())
            );
        }
    }
}
