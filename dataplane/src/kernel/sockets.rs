//! Resets the connections that reached dockerd's placeholder socket on a port before the agent
//! published it (issue 14.3).
//!
//! With `--userland-proxy=false` dockerd still listens on every published port, only to hold
//! it. Until the agent has applied a new container, a client's SYN to that port finds the
//! listener: the host's kernel completes the handshake, the request lands in the accept queue
//! of a socket nobody reads, and the client waits until it gives up. Once the port is in the
//! maps new packets go to the container, but those connections are already established with
//! the host. So, right after a port is published, the agent destroys (SOCK_DESTROY over
//! NETLINK_SOCK_DIAG, what `ss -K` does) every TCP socket of this namespace on that local port
//! that is not the listener: the kernel sends the client a RST, and the client's retry reaches
//! the container. A socket is taken only when a listener holds the same port, so an outgoing
//! connection that happens to use the number as its source port is left alone (the kernel
//! never picks an ephemeral port a listener holds).
//!
//! Plain byte layouts of `linux/inet_diag.h`, no bindings: the messages are four fixed structs.

use std::{collections::BTreeSet, io};

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x01;
const NLM_F_ACK: u16 = 0x04;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_HDRLEN: usize = 16;
/// `struct inet_diag_sockid`.
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, sockid.
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// `struct inet_diag_msg` up to the end of its sockid (family, state, timer, retrans, id).
const MSG_ID_END: usize = 4 + SOCKID_LEN;

const TCP_LISTEN: u8 = 10;
/// Every TCP state but LISTEN, TIME_WAIT and CLOSE: the ones with a peer waiting on them
/// (ESTABLISHED 1, SYN_RECV 3, CLOSE_WAIT 8, NEW_SYN_RECV 12; FIN_WAIT and LAST_ACK too).
const CONNECTED_STATES: u32 =
    1 << 1 | 1 << 3 | 1 << 4 | 1 << 5 | 1 << 8 | 1 << 9 | 1 << 11 | 1 << 12;

/// One socket of a dump: its state, local port and the sockid that names it for SOCK_DESTROY.
struct Found {
    family: u8,
    state: u8,
    local_port: u16,
    id: [u8; SOCKID_LEN],
}

/// Destroys every connected TCP socket (IPv4 and IPv6, as dockerd's listener may be either)
/// whose local port is one of `ports` and is also held by a listener; returns how many.
pub fn reset_placeholder_connections(ports: &BTreeSet<u16>) -> io::Result<usize> {
    if ports.is_empty() {
        return Ok(0);
    }
    let mut reset = 0;
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let found = dump(family, CONNECTED_STATES | 1 << TCP_LISTEN)?;
        let listening: BTreeSet<u16> = found
            .iter()
            .filter(|s| s.state == TCP_LISTEN)
            .map(|s| s.local_port)
            .collect();
        for socket in found.iter().filter(|s| {
            s.state != TCP_LISTEN
                && ports.contains(&s.local_port)
                && listening.contains(&s.local_port)
        }) {
            match destroy(socket) {
                Ok(()) => reset += 1,
                // Gone meanwhile (closed by its peer): nothing to reset.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(reset)
}

fn request(kind: u16, flags: u16, family: u8, states: u32, id: &[u8; SOCKID_LEN]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(NLMSG_HDRLEN + REQ_LEN);
    buf.extend_from_slice(&((NLMSG_HDRLEN + REQ_LEN) as u32).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    buf.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 0, 0]);
    buf.extend_from_slice(&states.to_ne_bytes());
    buf.extend_from_slice(id);
    buf
}

fn socket() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    Ok(socket)
}

/// The netlink messages in one datagram: (type, payload).
fn messages(data: &[u8]) -> io::Result<Vec<(u16, &[u8])>> {
    let mut out = Vec::new();
    let mut rest = data;
    while rest.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "sock_diag: bad message length",
            ));
        }
        let kind = u16::from_ne_bytes(rest[4..6].try_into().expect("2 bytes"));
        out.push((kind, &rest[NLMSG_HDRLEN..len]));
        rest = rest.get((len + 3) & !3..).unwrap_or_default();
    }
    Ok(out)
}

/// An NLMSG_ERROR payload as a result (code 0 is the acknowledgement).
fn error_of(payload: &[u8]) -> io::Result<()> {
    let code = payload
        .get(0..4)
        .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
        .unwrap_or(-libc::EINVAL);
    match code {
        0 => Ok(()),
        code => Err(io::Error::from_raw_os_error(-code)),
    }
}

fn dump(family: u8, states: u32) -> io::Result<Vec<Found>> {
    let socket = socket()?;
    let wildcard = [0u8; SOCKID_LEN];
    socket.send(
        &request(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            family,
            states,
            &wildcard,
        ),
        0,
    )?;
    let mut found = Vec::new();
    loop {
        let (data, _) = match socket.recv_from_full() {
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if data.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "sock_diag closed inside a dump",
            ));
        }
        for (kind, payload) in messages(&data)? {
            match kind {
                NLMSG_DONE => return Ok(found),
                NLMSG_ERROR => error_of(payload)?,
                SOCK_DIAG_BY_FAMILY if payload.len() >= MSG_ID_END => {
                    let id: [u8; SOCKID_LEN] = payload[4..MSG_ID_END].try_into().expect("sockid");
                    found.push(Found {
                        family: payload[0],
                        state: payload[1],
                        // idiag_sport, network byte order.
                        local_port: u16::from_be_bytes([id[0], id[1]]),
                        id,
                    });
                }
                _ => {}
            }
        }
    }
}

fn destroy(found: &Found) -> io::Result<()> {
    let socket = socket()?;
    socket.send(
        &request(
            SOCK_DESTROY,
            NLM_F_REQUEST | NLM_F_ACK,
            found.family,
            1 << found.state,
            &found.id,
        ),
        0,
    )?;
    loop {
        let (data, _) = match socket.recv_from_full() {
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for (kind, payload) in messages(&data)? {
            if kind == NLMSG_ERROR {
                return error_of(payload);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_the_kernel_layout() {
        let mut id = [0u8; SOCKID_LEN];
        id[0..2].copy_from_slice(&8080u16.to_be_bytes());
        let req = request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, 2, 1 << 1, &id);
        assert_eq!(req.len(), 72, "nlmsghdr 16 + inet_diag_req_v2 56");
        assert_eq!(u32::from_ne_bytes(req[0..4].try_into().unwrap()), 72);
        assert_eq!(u16::from_ne_bytes(req[4..6].try_into().unwrap()), 21);
        assert_eq!(&req[16..20], &[2, 6, 0, 0], "AF_INET, TCP");
        assert_eq!(u32::from_ne_bytes(req[20..24].try_into().unwrap()), 2);
        assert_eq!(&req[24..26], &8080u16.to_be_bytes());
    }

    #[test]
    fn a_truncated_answer_is_an_error_not_a_panic() {
        let mut msg = vec![0u8; 20];
        msg[0..4].copy_from_slice(&100u32.to_ne_bytes());
        assert!(messages(&msg).is_err());
        assert!(messages(&[1, 2, 3]).unwrap().is_empty());
        assert!(error_of(&(-libc::ENOENT).to_ne_bytes()).is_err());
        assert!(error_of(&0i32.to_ne_bytes()).is_ok());
    }

    /// A connection to a listener on loopback of a namespace of its own is reset; the
    /// listener stays. Needs root (a new network namespace); skipped otherwise.
    #[test]
    fn connections_to_a_held_port_are_reset_and_the_listener_stays() {
        if !is_root() {
            eprintln!("skipped: needs root for a network namespace of its own");
            return;
        }
        let outcome = std::thread::spawn(|| {
            // SAFETY: unshare changes only this thread, which ends with the test.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let up = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()?;
            assert!(up.success());
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            let port = listener.local_addr()?.port();
            let mut client = std::net::TcpStream::connect(("127.0.0.1", port))?;
            let other = std::net::TcpListener::bind("127.0.0.1:0")?;
            let other_port = other.local_addr()?.port();
            let _kept = std::net::TcpStream::connect(("127.0.0.1", other_port))?;
            let reset = reset_placeholder_connections(&[port].into())?;
            use std::io::Read as _;
            client.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
            let read = client.read(&mut [0u8; 16]);
            let again = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
            Ok((reset, read.map_err(|e| e.kind()), again))
        })
        .join()
        .unwrap()
        .unwrap();
        // Two sockets of the connection are on the port: the accepted one (local port = the
        // listener's) is reset; the client's own end has an ephemeral local port.
        assert_eq!(outcome.0, 1, "{outcome:?}");
        assert_eq!(
            outcome.1,
            Err(io::ErrorKind::ConnectionReset),
            "{outcome:?}"
        );
        assert!(outcome.2, "the listener still accepts");
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }
}
