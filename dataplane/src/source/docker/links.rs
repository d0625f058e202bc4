//! Network interfaces of a container's namespace and of the agent's, read with one rtnetlink
//! link dump each, to find the host-side end of a container's veth: the container's `eth0`
//! has `IFLA_LINK` = the host veth's ifindex, and the host veth's `IFLA_LINK` = the container
//! interface's ifindex.
//!
//! Netlink rather than sysfs: /sys shows the namespace that mounted it, not the caller's, so
//! `/sys/class/net/*/iflink` read after setns describes the wrong namespace.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

/// One interface as a link dump describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    /// IFLA_LINK: for a veth, the ifindex of its peer (in the peer's namespace).
    pub peer_index: Option<u32>,
}

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINK: u16 = 5;
const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;

/// Links of the network namespace the file `netns` stands for (`/proc/PID/ns/net` or a bind
/// mount of it). Runs on a thread of its own that enters the namespace and then ends, so no
/// thread of the agent ever changes namespace.
pub fn links_in(netns: &Path) -> io::Result<Vec<Link>> {
    let netns: PathBuf = netns.to_owned();
    std::thread::Builder::new()
        .name("netns-links".into())
        .spawn(move || {
            let file = std::fs::File::open(&netns)?;
            // SAFETY: a namespace file descriptor we hold open; setns changes only this thread,
            // which ends right after the dump.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            links_here()
        })?
        .join()
        .map_err(|_| io::Error::other("the netns thread panicked"))?
}

/// Links of the calling thread's network namespace.
pub fn links_here() -> io::Result<Vec<Link>> {
    // SAFETY: plain socket call; the descriptor is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut request = [0u8; NLMSG_HDRLEN + IFINFOMSG_LEN];
    let len = request.len() as u32;
    request[0..4].copy_from_slice(&len.to_ne_bytes());
    request[4..6].copy_from_slice(&RTM_GETLINK.to_ne_bytes());
    request[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    request[8..12].copy_from_slice(&1u32.to_ne_bytes()); // sequence number
    // ifinfomsg: family AF_UNSPEC and zeroes: every link.
    // SAFETY: sending a buffer we own on our socket; the kernel is the default destination.
    let sent = unsafe {
        libc::send(
            socket.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut links = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: receiving into a buffer we own, at most its length.
        let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "netlink closed inside a link dump",
            ));
        }
        if parse_messages(&buf[..n as usize], &mut links)? {
            return Ok(links);
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn bad(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed netlink {what}"),
    )
}

/// Parses one datagram of a dump into `links`; true when the dump is complete.
fn parse_messages(mut data: &[u8], links: &mut Vec<Link>) -> io::Result<bool> {
    while data.len() >= NLMSG_HDRLEN {
        let len = u32_at(data, 0) as usize;
        let kind = u16_at(data, 4);
        if len < NLMSG_HDRLEN || len > data.len() {
            return Err(bad("message length"));
        }
        let payload = &data[NLMSG_HDRLEN..len];
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                if payload.len() < 4 {
                    return Err(bad("error message"));
                }
                let code = i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]);
                if code != 0 {
                    return Err(io::Error::from_raw_os_error(-code));
                }
            }
            RTM_NEWLINK => links.push(parse_link(payload)?),
            _ => {}
        }
        // Messages are 4-byte aligned.
        let advance = (len + 3) & !3;
        data = data.get(advance..).unwrap_or_default();
    }
    Ok(false)
}

fn parse_link(payload: &[u8]) -> io::Result<Link> {
    if payload.len() < IFINFOMSG_LEN {
        return Err(bad("ifinfomsg"));
    }
    let mut link = Link {
        index: u32_at(payload, 4),
        name: String::new(),
        mac: None,
        peer_index: None,
    };
    let mut attrs = &payload[IFINFOMSG_LEN..];
    while attrs.len() >= 4 {
        let len = usize::from(u16_at(attrs, 0));
        let kind = u16_at(attrs, 2) & 0x3fff; // without NLA_F_NESTED / NLA_F_NET_BYTEORDER
        if len < 4 || len > attrs.len() {
            return Err(bad("attribute length"));
        }
        let value = &attrs[4..len];
        match kind {
            IFLA_IFNAME => {
                let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
                link.name = String::from_utf8_lossy(&value[..end]).into_owned();
            }
            IFLA_ADDRESS if value.len() == 6 => {
                link.mac = Some(value.try_into().expect("six bytes"));
            }
            IFLA_LINK if value.len() == 4 => link.peer_index = Some(u32_at(value, 0)),
            _ => {}
        }
        let advance = (len + 3) & !3;
        attrs = attrs.get(advance..).unwrap_or_default();
    }
    Ok(link)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_namespace_has_lo() {
        let links = links_here().unwrap();
        let lo = links.iter().find(|l| l.name == "lo").expect("lo");
        assert_eq!(Some(lo.index), crate::kernel::netdev::ifindex("lo"));
        assert_eq!(lo.mac, Some([0; 6]));
    }

    #[test]
    fn own_namespace_through_proc() {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return; // setns needs CAP_SYS_ADMIN; `sudo cargo xtask test` runs this one
        }
        let here = links_here().unwrap();
        let via_file = links_in(Path::new("/proc/self/ns/net")).unwrap();
        assert_eq!(here, via_file);
    }

    #[test]
    fn parses_a_newlink_message() {
        // RTM_NEWLINK for "eth0" (index 7, MAC 02:42:ac:12:00:02, peer 8), then NLMSG_DONE.
        let mut attrs = Vec::new();
        let mut attr = |kind: u16, value: &[u8]| {
            let len = 4 + value.len();
            attrs.extend_from_slice(&(len as u16).to_ne_bytes());
            attrs.extend_from_slice(&kind.to_ne_bytes());
            attrs.extend_from_slice(value);
            attrs.resize((attrs.len() + 3) & !3, 0);
        };
        attr(IFLA_IFNAME, b"eth0\0");
        attr(IFLA_ADDRESS, &[2, 0x42, 0xac, 0x12, 0, 2]);
        attr(IFLA_LINK, &8u32.to_ne_bytes());
        let mut ifinfo = [0u8; IFINFOMSG_LEN];
        ifinfo[4..8].copy_from_slice(&7u32.to_ne_bytes());
        let mut msg = Vec::new();
        let len = (NLMSG_HDRLEN + IFINFOMSG_LEN + attrs.len()) as u32;
        msg.extend_from_slice(&len.to_ne_bytes());
        msg.extend_from_slice(&RTM_NEWLINK.to_ne_bytes());
        msg.extend_from_slice(&[0; 10]);
        msg.extend_from_slice(&ifinfo);
        msg.extend_from_slice(&attrs);
        msg.extend_from_slice(&(NLMSG_HDRLEN as u32 + 4).to_ne_bytes());
        msg.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        msg.extend_from_slice(&[0; 14]);
        let mut links = Vec::new();
        assert!(parse_messages(&msg, &mut links).unwrap());
        assert_eq!(
            links,
            vec![Link {
                index: 7,
                name: "eth0".into(),
                mac: Some([2, 0x42, 0xac, 0x12, 0, 2]),
                peer_index: Some(8),
            }]
        );
        assert!(parse_messages(&msg[..10], &mut links).is_ok());
        let mut truncated = msg.clone();
        truncated[0] = 0xff;
        assert!(parse_messages(&truncated, &mut Vec::new()).is_err());
    }
}
