//! Socket-level translation (cgroup hooks), as Cilium's socket LB does: a connect() or an
//! unconnected UDP sendmsg() to a service VIP (and, for host processes, to a published port
//! on localhost or on one of the host's addresses) is pointed at a backend or the container
//! before the first packet exists, so the connection needs no proxy and no per-packet
//! rewriting. recvmsg() and getpeername() put the address the process asked for back, so a
//! UDP reply comes from the VIP (or host:port) the request went to.
//!
//! Whose sockets: the hooks run for every process of the cgroups they are attached to, and
//! act on sockets of two kinds of network namespace only (by netns cookie):
//! - the agent's own (the host's processes): VIPs and published ports;
//! - a container's (`SOCK_NETNS`, written by the reconciler from each endpoint's
//!   namespace): VIPs only; the container is the source identity (bound address, or its
//!   address from the map), judged by policy as the packet path judges it. Its published
//!   ports and a VIP whose pick is the container itself (a hairpin, which needs a source
//!   rewrite) are left to the packet path. The connection's packets then go container ->
//!   backend untranslated; `SOCK_LB` tells the container veth's tc program which service the
//!   socket asked for, so that it tracks and reports the connection as the service's, once.
//!
//! The lookups are the packet path's (published ports, services, the Maglev tables) and so is
//! the policy, judged against the translated destination.

use aya_ebpf::{
    bindings::{bpf_sock_addr, sockaddr},
    helpers::{
        bpf_bind, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval,
    },
    programs::SockAddrContext,
};
use dataplane_common::{
    CtKey, DropReason, PortKey, SockLb, SockLbKey, SockRevNat, SockRevNatKey, ct_origin,
    ct_rewrite, tcp_flag,
};

use crate::{
    flow, lb,
    maps::{CONFIG, LOCAL_ADDRS, PORTS, SERVICES, SOCK_LB, SOCK_NETNS, SOCK_REV_NAT},
    parse::{IPPROTO_TCP, IPPROTO_UDP},
    policy::{self, Via},
    stats,
};

/// What a cgroup sock_addr program returns to let the call go on, and to fail it.
pub const PROCEED: i32 = 1;
pub const REJECT: i32 = 0;

const AF_INET: u16 = 2;
/// errno of a refused call: no backend (what a TCP reset gives a client of the packet path).
const ECONNREFUSED: i32 = 111;

/// Which forward hook runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    Connect,
    Sendmsg,
}

impl Forward {
    fn hook(self) -> u32 {
        match self {
            Forward::Connect => dataplane_common::hook::SOCK_CONNECT4,
            Forward::Sendmsg => dataplane_common::hook::SOCK_SENDMSG4,
        }
    }
}

/// `struct sockaddr_in`, for bpf_bind.
#[repr(C)]
struct SockaddrIn {
    family: u16,
    port: u16,
    addr: u32,
    zero: [u8; 8],
}

/// Whether `addr` (network byte order) is in 127.0.0.0/8: its first octet is the lowest byte.
#[inline(always)]
fn is_loopback(addr: u32) -> bool {
    addr & 0xff == 127
}

/// Whose socket `sa` is, by its network namespace.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// The agent's namespace: a host process.
    Host,
    /// A container's namespace; its address (network byte order).
    Container(u32),
    /// Any other: left alone.
    Other,
}

#[inline(always)]
fn owner(sa: *mut bpf_sock_addr) -> Owner {
    // SAFETY: `sa` is the context the kernel passed.
    let cookie = unsafe { bpf_get_netns_cookie(sa.cast()) };
    if let Some(config) = CONFIG.get_ptr(0) {
        // SAFETY: array element 0, read in place.
        let ours = unsafe { (*config).netns_cookie };
        if ours != 0 && cookie == ours {
            return Owner::Host;
        }
    }
    match SOCK_NETNS.get_ptr(&cookie) {
        // SAFETY: a map value from this program run's lookup.
        Some(netns) => Owner::Container(unsafe { (*netns).addr }),
        None => Owner::Other,
    }
}

/// Where a destination leads: the address and port to use instead, and how it was found.
struct Target {
    addr: u32,
    port: u16,
    origin: u8,
}

/// A destination this module translates, looked up as the packet path does.
enum Lookup {
    /// Not a VIP nor a published port: left alone.
    Untouched,
    Found(Target),
    /// A VIP (or a published port leading to one) with no backend.
    NoBackend,
}

/// The published port at `addr`:`port`: an exact binding, then one on every host address
/// when `addr` is the host's own (or loopback, which docker-proxy serves too).
#[inline(always)]
fn published(addr: u32, port: u16, proto: u8) -> Option<dataplane_common::PortTarget> {
    let mut key = PortKey {
        addr,
        port,
        proto,
        _pad: 0,
    };
    if let Some(target) = PORTS.get_ptr(&key) {
        // SAFETY: a map value from this program run's lookup.
        return Some(unsafe { *target });
    }
    if !is_loopback(addr) && LOCAL_ADDRS.get_ptr(&addr).is_none() {
        return None;
    }
    key.addr = 0;
    // SAFETY: as above.
    PORTS.get_ptr(&key).map(|target| unsafe { *target })
}

/// The backend of the service at `vip`:`port`, hashing `cookie` (the socket) where the
/// packet path hashes the 5-tuple, and `source` where it hashes the client address.
#[inline(always)]
fn service_backend(vip: u32, port: u16, proto: u8, cookie: u64, source: u32) -> Option<Lookup> {
    let key = dataplane_common::ServiceKey {
        vip,
        port,
        proto,
        _pad: 0,
    };
    // SAFETY: a map value from this program run's lookup.
    let service = unsafe { *SERVICES.get_ptr(&key)? };
    let hashes = lb::Hashes {
        flow: lb::mix(cookie as u32 ^ lb::mix((cookie >> 32) as u32)),
        source: lb::mix(source),
    };
    Some(match lb::pick_hashed(&service, &hashes) {
        Some(b) => Lookup::Found(Target {
            addr: b.addr,
            port: b.port,
            origin: ct_origin::SERVICE,
        }),
        None => Lookup::NoBackend,
    })
}

#[inline(always)]
fn lookup(addr: u32, port: u16, proto: u8, cookie: u64, source: u32, owner: Owner) -> Lookup {
    if let Some(found) = service_backend(addr, port, proto, cookie, source) {
        return found;
    }
    // A container's connections to published ports stay the packet path's (its hairpin
    // and Docker's source address for them need packet rewrites).
    if owner != Owner::Host {
        return Lookup::Untouched;
    }
    let Some(target) = published(addr, port, proto) else {
        return Lookup::Untouched;
    };
    if target.is_service == 0 {
        return Lookup::Found(Target {
            addr: target.addr,
            port: target.port,
            origin: ct_origin::PUBLISHED,
        });
    }
    match service_backend(target.addr, target.port, proto, cookie, source) {
        Some(Lookup::Found(mut t)) => {
            // Reached through a published port: judged and reported as one.
            t.origin = ct_origin::PUBLISHED;
            Lookup::Found(t)
        }
        _ => Lookup::NoBackend,
    }
}

/// The connect4 and sendmsg4 hooks: translate the destination of a host process's or a
/// container's socket. Returns the program's verdict.
#[inline(always)]
pub fn forward(ctx: &SockAddrContext, hook: Forward) -> i32 {
    let sa = ctx.sock_addr;
    let owner = owner(sa);
    if owner == Owner::Other {
        return PROCEED;
    }
    // SAFETY: `sa` is the context the kernel passed, and its `sk` the socket it is about
    // (always set for sock_addr programs).
    let (proto, addr, port, bound_addr, bound_port, msg_src) = unsafe {
        let sk = (*sa).__bindgen_anon_1.sk;
        (
            (*sa).protocol as u8,
            (*sa).user_ip4,
            // user_port holds the port in network byte order in its low 16 bits.
            (*sa).user_port as u16,
            (*sk).src_ip4,
            // bpf_sock's src_port is in host byte order.
            (*sk).src_port as u16,
            if hook == Forward::Sendmsg {
                (*sa).msg_src_ip4
            } else {
                0
            },
        )
    };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return PROCEED;
    }
    // SAFETY: a helper on the context the kernel passed.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    // The source the connection will have where it is already known (a bound socket, a
    // datagram's IP_PKTINFO); 0 when the kernel picks it after this hook.
    let mut source = if msg_src != 0 { msg_src } else { bound_addr };
    // A container's unbound socket leaves from the container's address: its identity.
    if let (0, Owner::Container(own)) = (source, owner) {
        source = own;
    }
    let tuple = CtKey {
        saddr: source,
        daddr: addr,
        sport: bound_port.to_be(),
        dport: port,
        proto,
        _pad: [0; 3],
    };
    let target = match lookup(addr, port, proto, cookie, source, owner) {
        Lookup::Untouched => return PROCEED,
        Lookup::Found(target) => target,
        Lookup::NoBackend => {
            refused(&tuple, DropReason::ServiceBackendNotFound, hook);
            // SAFETY: plain helper call; the value becomes the call's errno.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            return REJECT;
        }
    };
    // A connection to one of the host's own addresses leaves from that address, as it would
    // through Docker's DNAT in OUTPUT (which keeps the source chosen for the original
    // destination): the container sees the host's address, not the bridge's. Loopback is
    // the exception: 127.0.0.1 cannot leave the host, so the kernel's choice (the bridge's
    // address, what Docker's MASQUERADE of 127.0.0.0/8 gives) stays.
    if owner == Owner::Host
        && source == 0
        && !is_loopback(addr)
        && LOCAL_ADDRS.get_ptr(&addr).is_some()
    {
        source = keep_local_source(sa, hook, addr, bound_port);
    }
    // A container picked as its own VIP's backend: a hairpin, which needs the packet path's
    // source rewrite (a socket connected to its own address would see itself as the peer).
    if let Owner::Container(own) = owner
        && (target.addr == own || target.addr == source)
    {
        return PROCEED;
    }
    let via = if target.origin == ct_origin::PUBLISHED {
        Via::Published
    } else {
        Via::Direct
    };
    if let Err(reason) = policy::check(source, target.addr, proto, target.port, via) {
        refused(&tuple, reason, hook);
        // The kernel's errno for a rejected call: EPERM.
        return REJECT;
    }
    let key = SockRevNatKey {
        cookie,
        addr: target.addr,
        port: target.port,
        _pad: 0,
        _pad_family: (),
    };
    let asked = SockRevNat {
        addr,
        port,
        _pad: 0,
    };
    // Each datagram of an unconnected socket comes here, and a non-blocking connect() may
    // too, more than once: a socket's first translation to this backend is the "connection"
    // that is reported (cookies are never reused, so a new socket always is new).
    let new = SOCK_REV_NAT.get_ptr(&key).is_none();
    // A full LRU map evicts an older socket's entry; an error leaves replies untranslated.
    let _ = SOCK_REV_NAT.insert(&key, &asked, 0);
    // SAFETY: `sa` is the context the kernel passed; both fields are writable in connect4
    // and sendmsg4 (the port as a whole u32).
    unsafe {
        (*sa).user_ip4 = target.addr;
        (*sa).user_port = u32::from(target.port);
    }
    if owner != Owner::Host {
        // The container's veth sees this connection's packets: its tc program tracks and
        // reports it as the service's (it finds the service address here), once.
        let pending = SockLbKey {
            saddr: source,
            daddr: target.addr,
            dport: target.port,
            proto,
            _pad: 0,
        };
        let service = SockLb {
            // SAFETY: a helper without arguments.
            time_ns: unsafe { bpf_ktime_get_ns() },
            vip: addr,
            vip_port: port,
            _pad: 0,
            _pad_family: (),
        };
        // A full LRU evicts an older pair: at worst this connection is reported as plain.
        let _ = SOCK_LB.insert(&pending, &service, 0);
    } else if new {
        flow::new_connection(&flow::NewFlow {
            forward: CtKey {
                saddr: source,
                ..tuple
            },
            origin: target.origin,
            rewrite: ct_rewrite::DST,
            nat_addr: target.addr,
            nat_port: target.port,
            packets: 0,
            bytes: 0,
            tcp_flags: if proto == IPPROTO_TCP {
                tcp_flag::SYN
            } else {
                0
            },
            hook: hook.hook(),
            ifindex: 0,
            hairpin_port: 0,
            // Socket hooks see TCP and UDP only.
            icmp_type: 0,
            icmp_code: 0,
        });
    }
    PROCEED
}

/// Makes a socket that is not bound yet leave from `local` (one of the host's addresses);
/// returns the source it will have (0: the kernel still picks it).
#[inline(always)]
fn keep_local_source(sa: *mut bpf_sock_addr, hook: Forward, local: u32, bound_port: u16) -> u32 {
    match hook {
        // bpf_bind is for connect4 only. Port 0 binds the address alone (the kernel passes
        // BIND_FORCE_ADDRESS_NO_PORT): connect() still picks the port for the whole 4-tuple.
        // A socket bound to a port (on no address) cannot be bound again: left alone.
        Forward::Connect if bound_port == 0 => {
            let mut sin = SockaddrIn {
                family: AF_INET,
                port: 0,
                addr: local,
                zero: [0; 8],
            };
            // SAFETY: `sin` is a sockaddr_in on this program's stack, of the size passed.
            let bound = unsafe {
                bpf_bind(
                    sa,
                    (&mut sin as *mut SockaddrIn).cast::<sockaddr>(),
                    core::mem::size_of::<SockaddrIn>() as i32,
                )
            };
            if bound == 0 { local } else { 0 }
        }
        Forward::Connect => 0,
        // A datagram's source can be set per datagram.
        Forward::Sendmsg => {
            // SAFETY: msg_src_ip4 is writable in sendmsg4.
            unsafe { (*sa).msg_src_ip4 = local };
            local
        }
    }
}

/// Counts a refused call and reports it as a drop of the connection it would have been.
#[inline(always)]
fn refused(tuple: &CtKey, reason: DropReason, hook: Forward) {
    stats::count_drop(reason);
    flow::dropped(&flow::Dropped {
        tuple: *tuple,
        tcp_flags: if tuple.proto == IPPROTO_TCP {
            tcp_flag::SYN
        } else {
            0
        },
        len: 0,
        reason,
        hook: hook.hook(),
        ifindex: 0,
        icmp_type: 0,
        icmp_code: 0,
    });
}

/// The recvmsg4 and getpeername4 hooks: a socket translated by [`forward`] sees the address
/// it asked for as its peer (a UDP reply's source, getpeername()). Never fails the call.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    if owner(sa) == Owner::Other {
        return PROCEED;
    }
    // SAFETY: `sa` is the context the kernel passed; a helper on it.
    unsafe {
        let proto = (*sa).protocol as u8;
        if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
            return PROCEED;
        }
        let key = SockRevNatKey {
            cookie: bpf_get_socket_cookie(sa.cast()),
            addr: (*sa).user_ip4,
            port: (*sa).user_port as u16,
            _pad: 0,
            _pad_family: (),
        };
        if let Some(asked) = SOCK_REV_NAT.get_ptr(&key) {
            (*sa).user_ip4 = (*asked).addr;
            (*sa).user_port = u32::from((*asked).port);
        }
    }
    PROCEED
}
