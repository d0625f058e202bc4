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
const AF_INET6: u16 = 10;
/// errno of a refused call: no backend (what a TCP reset gives a client of the packet path).
const ECONNREFUSED: i32 = 111;

/// Which forward hook runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    Connect4,
    Sendmsg4,
    Connect6,
    Sendmsg6,
}

impl Forward {
    fn hook(self) -> u32 {
        match self {
            Forward::Connect4 => dataplane_common::hook::SOCK_CONNECT4,
            Forward::Sendmsg4 => dataplane_common::hook::SOCK_SENDMSG4,
            Forward::Connect6 => dataplane_common::hook::SOCK_CONNECT6,
            Forward::Sendmsg6 => dataplane_common::hook::SOCK_SENDMSG6,
        }
    }

    fn is_connect(self) -> bool {
        matches!(self, Forward::Connect4 | Forward::Connect6)
    }

    /// Whether the socket is an AF_INET6 one (its addresses are `user_ip6`).
    fn is_inet6(self) -> bool {
        matches!(self, Forward::Connect6 | Forward::Sendmsg6)
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

/// `struct sockaddr_in6`, for bpf_bind.
#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    port: u16,
    flowinfo: u32,
    addr: [u32; 4],
    scope_id: u32,
}

/// The third word of a v4-mapped IPv6 address (`::ffff:a.b.c.d`), as on the wire.
const V4_MAPPED_WORD: u32 = u32::from_be(0x0000_ffff);

/// `::ffff:addr` (`addr` in network byte order): how an AF_INET6 socket names an IPv4 peer.
#[inline(always)]
fn v4_mapped(addr: u32) -> [u32; 4] {
    [0, 0, V4_MAPPED_WORD, addr]
}

/// The IPv4 address of a v4-mapped IPv6 address.
#[inline(always)]
fn mapped_v4(addr: &[u32; 4]) -> Option<u32> {
    (addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_WORD).then_some(addr[3])
}

/// `::1`.
#[inline(always)]
fn is_loopback6(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == u32::from_be(1)
}

/// Reads an IPv6 address of the context one 32-bit word at a time: the verifier allows
/// only word-sized loads of `bpf_sock`'s address fields.
///
/// # Safety
/// `words` points at four readable words of the program's context.
#[inline(always)]
unsafe fn read_ip6(words: *const u32) -> [u32; 4] {
    // SAFETY: the caller's promise; volatile keeps the compiler from merging the loads.
    unsafe {
        [
            core::ptr::read_volatile(words),
            core::ptr::read_volatile(words.add(1)),
            core::ptr::read_volatile(words.add(2)),
            core::ptr::read_volatile(words.add(3)),
        ]
    }
}

/// Writes an IPv6 address into the context one 32-bit word at a time (the only store size
/// the verifier allows there).
///
/// # Safety
/// `words` points at four writable words of the program's context.
#[inline(always)]
unsafe fn write_ip6(words: *mut u32, addr: [u32; 4]) {
    // SAFETY: the caller's promise.
    unsafe {
        core::ptr::write_volatile(words, addr[0]);
        core::ptr::write_volatile(words.add(1), addr[1]);
        core::ptr::write_volatile(words.add(2), addr[2]);
        core::ptr::write_volatile(words.add(3), addr[3]);
    }
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

/// What a forward hook was asked (network byte order but `bound_port`), for an IPv4
/// destination: an AF_INET socket's, or the IPv4 address of an AF_INET6 socket's v4-mapped
/// destination.
#[derive(Clone, Copy)]
struct Call {
    proto: u8,
    addr: u32,
    port: u16,
    /// The socket's bound IPv4 address, 0 when none.
    bound_addr: u32,
    /// The socket's bound port, host byte order (bpf_sock's), 0 when none.
    bound_port: u16,
    /// A datagram's source (IP_PKTINFO), 0 when none.
    msg_src: u32,
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
    let call = unsafe {
        let sk = (*sa).__bindgen_anon_1.sk;
        Call {
            proto: (*sa).protocol as u8,
            addr: (*sa).user_ip4,
            // user_port holds the port in network byte order in its low 16 bits.
            port: (*sa).user_port as u16,
            bound_addr: (*sk).src_ip4,
            // bpf_sock's src_port is in host byte order.
            bound_port: (*sk).src_port as u16,
            msg_src: if hook == Forward::Sendmsg4 {
                (*sa).msg_src_ip4
            } else {
                0
            },
        }
    };
    translate4(sa, hook, owner, &call)
}

/// The connect6 and sendmsg6 hooks: an AF_INET6 socket's destination. A v4-mapped one
/// (`::ffff:127.0.0.1`) is an IPv4 destination and translated as connect4 does, to a
/// v4-mapped backend or container (the kernel's tcp_v6_connect and ip6_datagram_connect
/// then connect over IPv4). An unconnected datagram to a v4-mapped address never comes here:
/// udpv6_sendmsg hands it to the IPv4 path, whose sendmsg4 hook translates it.
#[inline(always)]
pub fn forward6(ctx: &SockAddrContext, hook: Forward) -> i32 {
    let sa = ctx.sock_addr;
    let owner = owner(sa);
    if owner == Owner::Other {
        return PROCEED;
    }
    // SAFETY: `sa` is the context the kernel passed and `sk` its socket; the address
    // fields are four words each.
    let (proto, addr, port, bound, bound_port) = unsafe {
        let sk = (*sa).__bindgen_anon_1.sk;
        (
            (*sa).protocol as u8,
            read_ip6((*sa).user_ip6.as_ptr()),
            (*sa).user_port as u16,
            read_ip6((*sk).src_ip6.as_ptr()),
            (*sk).src_port as u16,
        )
    };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return PROCEED;
    }
    // The socket's bound address as IPv4: none (::), or a v4-mapped one. A socket bound to
    // an IPv6 address cannot reach an IPv4 peer: left alone.
    let bound_addr = if bound == [0; 4] {
        0
    } else if let Some(v4) = mapped_v4(&bound) {
        v4
    } else {
        return PROCEED;
    };
    // (sendmsg6 never sees one: udpv6_sendmsg sends those datagrams through sendmsg4.)
    if let (Some(v4), Forward::Connect6) = (mapped_v4(&addr), hook) {
        let call = Call {
            proto,
            addr: v4,
            port,
            bound_addr,
            bound_port,
            msg_src: 0,
        };
        return translate4(sa, hook, owner, &call);
    }
    PROCEED
}

/// Translates `call`, an IPv4 destination of the socket of `sa`, as the packet path would,
/// and writes the translation back into `sa` (as an IPv4 address, or v4-mapped for an
/// AF_INET6 socket). Returns the program's verdict.
#[inline(always)]
fn translate4(sa: *mut bpf_sock_addr, hook: Forward, owner: Owner, call: &Call) -> i32 {
    let Call {
        proto,
        addr,
        port,
        bound_addr,
        bound_port,
        msg_src,
    } = *call;
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
    // SAFETY: `sa` is the context the kernel passed; the address fields are writable in
    // connect4/6 and sendmsg4/6 (the port as a whole u32).
    unsafe {
        if hook.is_inet6() {
            write_ip6((*sa).user_ip6.as_mut_ptr(), v4_mapped(target.addr));
        } else {
            (*sa).user_ip4 = target.addr;
        }
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
        // bpf_bind is for connect4/6 only. Port 0 binds the address alone (the kernel passes
        // BIND_FORCE_ADDRESS_NO_PORT): connect() still picks the port for the whole 4-tuple.
        // A socket bound to a port (on no address) cannot be bound again: left alone.
        Forward::Connect4 | Forward::Connect6 if bound_port == 0 => {
            if bind_address(sa, hook, local) {
                local
            } else {
                0
            }
        }
        Forward::Connect4 | Forward::Connect6 => 0,
        // A datagram's source can be set per datagram.
        Forward::Sendmsg4 => {
            // SAFETY: msg_src_ip4 is writable in sendmsg4.
            unsafe { (*sa).msg_src_ip4 = local };
            local
        }
        // Never an IPv4 destination (udpv6_sendmsg sends those through sendmsg4); and
        // msg_src_ip4 is not sendmsg6's to write.
        Forward::Sendmsg6 => 0,
    }
}

/// Binds the socket of `sa` (connect4/6) to the IPv4 address `local` with no port (v4-mapped
/// for an AF_INET6 socket); whether the kernel took it. An AF_INET6 socket with IPV6_V6ONLY
/// refuses any v4-mapped address, 0.0.0.0 included: that is how its hooks tell one.
#[inline(always)]
fn bind_address(sa: *mut bpf_sock_addr, hook: Forward, local: u32) -> bool {
    let bound = if hook.is_inet6() {
        let mut sin6 = SockaddrIn6 {
            family: AF_INET6,
            port: 0,
            flowinfo: 0,
            addr: v4_mapped(local),
            scope_id: 0,
        };
        // SAFETY: `sin6` is a sockaddr_in6 on this program's stack, of the size passed.
        unsafe {
            bpf_bind(
                sa,
                (&mut sin6 as *mut SockaddrIn6).cast::<sockaddr>(),
                core::mem::size_of::<SockaddrIn6>() as i32,
            )
        }
    } else {
        let mut sin = SockaddrIn {
            family: AF_INET,
            port: 0,
            addr: local,
            zero: [0; 8],
        };
        // SAFETY: `sin` is a sockaddr_in on this program's stack, of the size passed.
        unsafe {
            bpf_bind(
                sa,
                (&mut sin as *mut SockaddrIn).cast::<sockaddr>(),
                core::mem::size_of::<SockaddrIn>() as i32,
            )
        }
    };
    bound == 0
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

/// The recvmsg6 and getpeername6 hooks: as [`reverse`], for AF_INET6 sockets. A peer that is
/// v4-mapped was translated as an IPv4 destination (by connect6, or by sendmsg4 for a
/// datagram the kernel sent over IPv4): its entry is the IPv4 one, by the real IPv4 peer.
#[inline(always)]
pub fn reverse6(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    if owner(sa) == Owner::Other {
        return PROCEED;
    }
    // SAFETY: `sa` is the context the kernel passed; a helper on it; user_ip6 is four
    // words, readable and writable in these hooks.
    unsafe {
        let proto = (*sa).protocol as u8;
        if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
            return PROCEED;
        }
        let peer = read_ip6((*sa).user_ip6.as_ptr());
        let Some(peer4) = mapped_v4(&peer) else {
            return PROCEED;
        };
        let key = SockRevNatKey {
            cookie: bpf_get_socket_cookie(sa.cast()),
            addr: peer4,
            port: (*sa).user_port as u16,
            _pad: 0,
        };
        if let Some(asked) = SOCK_REV_NAT.get_ptr(&key) {
            write_ip6((*sa).user_ip6.as_mut_ptr(), v4_mapped((*asked).addr));
            (*sa).user_port = u32::from((*asked).port);
        }
    }
    PROCEED
}
