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
    BackendKey, CtKey, CtKey6, DropReason, In6Addr, PortKey, PortKey6, ServiceKey6, SockLb,
    SockLb6, SockLbKey, SockLbKey6, SockRevNat, SockRevNat6, SockRevNatKey, SockRevNatKey6,
    ct_origin, ct_rewrite, tcp_flag,
};

use crate::{
    flow, lb,
    maps::{
        BACKENDS, BACKENDS6, CONFIG, LOCAL_ADDRS, LOCAL_ADDRS6, PORTS, PORTS6, SERVICES, SERVICES6,
        SOCK_LB, SOCK_LB6, SOCK_NETNS, SOCK_REV_NAT, SOCK_REV_NAT6,
    },
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

/// `::1`.
const LOOPBACK6: In6Addr = In6Addr([0, 0, 0, u32::to_be(1)]);

/// Whether two IPv6 addresses are equal, a word at a time (no comparison of arrays, which
/// LLVM's BPF backend lowers badly).
#[inline(always)]
fn same6(a: &In6Addr, b: &In6Addr) -> bool {
    ((a.0[0] ^ b.0[0]) | (a.0[1] ^ b.0[1]) | (a.0[2] ^ b.0[2]) | (a.0[3] ^ b.0[3])) == 0
}

/// Whether `a` is ::.
#[inline(always)]
fn unspecified6(a: &In6Addr) -> bool {
    (a.0[0] | a.0[1] | a.0[2] | a.0[3]) == 0
}

/// Reads an IPv6 address of the context one 32-bit word at a time: the verifier allows
/// only word-sized loads of `bpf_sock`'s address fields.
///
/// # Safety
/// `words` points at four readable words of the program's context.
#[inline(always)]
unsafe fn read_ip6(words: *const u32) -> In6Addr {
    // SAFETY: the caller's promise; volatile keeps the compiler from merging the loads.
    unsafe {
        In6Addr([
            core::ptr::read_volatile(words),
            core::ptr::read_volatile(words.add(1)),
            core::ptr::read_volatile(words.add(2)),
            core::ptr::read_volatile(words.add(3)),
        ])
    }
}

/// Writes an IPv6 address into the context one 32-bit word at a time (the only store size
/// the verifier allows there).
///
/// # Safety
/// `words` points at four writable words of the program's context.
#[inline(always)]
unsafe fn write_ip6(words: *mut u32, addr: In6Addr) {
    // SAFETY: the caller's promise.
    unsafe {
        core::ptr::write_volatile(words, addr.0[0]);
        core::ptr::write_volatile(words.add(1), addr.0[1]);
        core::ptr::write_volatile(words.add(2), addr.0[2]);
        core::ptr::write_volatile(words.add(3), addr.0[3]);
    }
}

/// Whether `addr` (network byte order) is in 127.0.0.0/8: its first octet is the lowest byte.
#[inline(always)]
fn is_loopback(addr: u32) -> bool {
    addr & 0xff == 127
}

/// Whose socket `sa` is, by its network namespace. A plain struct, not an enum with a
/// payload: passed to a function that is not inlined, an enum's undefined payload (the host's
/// "address") becomes a register the verifier refuses to read.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Owner {
    /// One of the `OWNER_*` kinds.
    kind: u32,
    /// A container's address (network byte order); 0 for the others.
    addr: u32,
    /// The Swarm overlay networks a container is on (`SockNetns::overlays`); 0 for the others.
    overlays: u32,
}

/// The agent's namespace: a host process.
const OWNER_HOST: u32 = 0;
/// A container's namespace.
const OWNER_CONTAINER: u32 = 1;
/// Any other: left alone.
const OWNER_OTHER: u32 = 2;

impl Owner {
    const HOST: Owner = Owner {
        kind: OWNER_HOST,
        addr: 0,
        overlays: 0,
    };
    const OTHER: Owner = Owner {
        kind: OWNER_OTHER,
        addr: 0,
        overlays: 0,
    };

    /// The container's address, if a container's.
    #[inline(always)]
    fn container(self) -> Option<u32> {
        (self.kind == OWNER_CONTAINER).then_some(self.addr)
    }
}

#[inline(always)]
fn owner(sa: *mut bpf_sock_addr) -> Owner {
    // SAFETY: `sa` is the context the kernel passed.
    let cookie = unsafe { bpf_get_netns_cookie(sa.cast()) };
    if let Some(config) = CONFIG.get_ptr(0) {
        // SAFETY: array element 0, read in place.
        let ours = unsafe { (*config).netns_cookie };
        if ours != 0 && cookie == ours {
            return Owner::HOST;
        }
    }
    match SOCK_NETNS.get_ptr(&cookie) {
        // SAFETY: a map value from this program run's lookup.
        Some(netns) => unsafe {
            Owner {
                kind: OWNER_CONTAINER,
                addr: (*netns).addr,
                overlays: (*netns).overlays,
            }
        },
        None => Owner::OTHER,
    }
}

/// Where a destination leads: the address and port to use instead, and how it was found.
#[derive(Clone, Copy)]
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
/// packet path hashes the 5-tuple, and `source` where it hashes the client address. A VIP on
/// every port (port 0 in its key, a Swarm VIP's) answers the ports no service of its own
/// has, each to the same port of the backend; an overlay network's VIP only sockets of the
/// containers on that network (bits of `overlays`), as only they reach its tasks.
#[inline(always)]
fn service_backend(
    vip: u32,
    port: u16,
    proto: u8,
    cookie: u64,
    source: u32,
    overlays: u32,
) -> Option<Lookup> {
    let mut key = dataplane_common::ServiceKey {
        vip,
        port,
        proto,
        _pad: 0,
    };
    // SAFETY: map values from this program run's lookups.
    let service = match SERVICES.get_ptr(&key) {
        Some(service) => unsafe { *service },
        None => {
            key.port = 0;
            unsafe { *SERVICES.get_ptr(&key)? }
        }
    };
    if service.overlay != 0 && overlays & (1u32 << (u32::from(service.overlay - 1) & 31)) == 0 {
        return None;
    }
    let hashes = lb::Hashes {
        flow: lb::mix(cookie as u32 ^ lb::mix((cookie >> 32) as u32)),
        source: lb::mix(source),
    };
    Some(match lb::pick_hashed(&service, &hashes) {
        Some(b) => Lookup::Found(Target {
            addr: b.addr,
            port: if b.port == 0 { port } else { b.port },
            origin: ct_origin::SERVICE,
        }),
        None => Lookup::NoBackend,
    })
}

#[inline(always)]
fn lookup(addr: u32, port: u16, proto: u8, cookie: u64, source: u32, owner: Owner) -> Lookup {
    if let Some(found) = service_backend(addr, port, proto, cookie, source, owner.overlays) {
        return found;
    }
    // A container's connections to published ports stay the packet path's (its hairpin
    // and Docker's source address for them need packet rewrites).
    if owner != Owner::HOST {
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
    match service_backend(target.addr, target.port, proto, cookie, source, 0) {
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
    if owner == Owner::OTHER {
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
/// udpv6_sendmsg hands it to the IPv4 path, whose sendmsg4 hook translates it. Any other is
/// an IPv6 destination: see [`translate6`].
#[inline(always)]
pub fn forward6(ctx: &SockAddrContext, hook: Forward) -> i32 {
    let sa = ctx.sock_addr;
    let owner = owner(sa);
    if owner == Owner::OTHER {
        return PROCEED;
    }
    // SAFETY: `sa` is the context the kernel passed; user_ip6 is four words.
    let addr = unsafe { read_ip6((*sa).user_ip6.as_ptr()) };
    // Each half in a function of its own, which reads what it needs from the context: one
    // body of both is more than LLVM's BPF backend handles (it crashed on it), and this
    // frame stays small, so each chain keeps within the 512 bytes of stack.
    if addr.as_mapped_v4().is_some() {
        if hook != Forward::Connect6 {
            return PROCEED;
        }
        return forward6_mapped(sa, hook, &owner);
    }
    translate6(sa, hook, &owner)
}

/// Reads what connect6 or sendmsg6 was asked.
#[inline(always)]
fn read_call6(sa: *mut bpf_sock_addr) -> Call6 {
    // SAFETY: `sa` is the context the kernel passed and `sk` its socket; the address
    // fields are four words each.
    unsafe {
        let sk = (*sa).__bindgen_anon_1.sk;
        Call6 {
            proto: (*sa).protocol as u8,
            addr: read_ip6((*sa).user_ip6.as_ptr()),
            port: (*sa).user_port as u16,
            bound: read_ip6((*sk).src_ip6.as_ptr()),
            bound_port: (*sk).src_port as u16,
        }
    }
}

/// connect6 to a v4-mapped destination: an IPv4 one, translated by [`translate4`].
#[inline(never)]
fn forward6_mapped(sa: *mut bpf_sock_addr, hook: Forward, owner: &Owner) -> i32 {
    let call = read_call6(sa);
    if call.proto != IPPROTO_TCP && call.proto != IPPROTO_UDP {
        return PROCEED;
    }
    // The socket's bound address as IPv4: none (::), or a v4-mapped one. A socket bound to
    // an IPv6 address cannot reach an IPv4 peer: left alone.
    let bound_addr = if unspecified6(&call.bound) {
        0
    } else if let Some(v4) = call.bound.as_mapped_v4() {
        v4
    } else {
        return PROCEED;
    };
    let Some(addr) = call.addr.as_mapped_v4() else {
        return PROCEED;
    };
    translate4(
        sa,
        hook,
        *owner,
        &Call {
            proto: call.proto,
            addr,
            port: call.port,
            bound_addr,
            bound_port: call.bound_port,
            msg_src: 0,
        },
    )
}

/// What connect6 or sendmsg6 was asked, for an IPv6 destination (network byte order but
/// `bound_port`).
#[derive(Clone, Copy)]
struct Call6 {
    proto: u8,
    addr: In6Addr,
    port: u16,
    /// The socket's bound address, :: when none.
    bound: In6Addr,
    /// The socket's bound port, host byte order, 0 when none.
    bound_port: u16,
}

/// Where an IPv6 destination leads: an IPv6 backend or container, or an IPv4 one as
/// v4-mapped `addr` (an IPv4-only container behind a port published on the host's IPv6
/// addresses, as docker-proxy serves it; a dual-stack service's backend that has no IPv6
/// address). A plain struct with every field set on every path, not an enum with payloads:
/// LLVM leaves an enum's unused payload undefined, and the verifier refuses to store it.
#[derive(Clone, Copy)]
struct Target6 {
    addr: In6Addr,
    port: u16,
    origin: u8,
    /// One of the `LOOKUP_*` outcomes.
    outcome: u8,
}

/// Not a VIP nor a published port: left alone.
const LOOKUP_UNTOUCHED: u8 = 0;
const LOOKUP_FOUND: u8 = 1;
/// A VIP (or a published port leading to one) with no backend.
const LOOKUP_NO_BACKEND: u8 = 2;

impl Target6 {
    #[inline(always)]
    fn outcome(outcome: u8) -> Target6 {
        Target6 {
            addr: In6Addr::UNSPECIFIED,
            port: 0,
            origin: 0,
            outcome,
        }
    }

    #[inline(always)]
    fn found(addr: In6Addr, port: u16, origin: u8) -> Target6 {
        Target6 {
            addr,
            port,
            origin,
            outcome: LOOKUP_FOUND,
        }
    }
}

/// The backend of the service at `vip`:`port`, picked as [`service_backend`] picks an IPv4
/// service's (the socket cookie hashed; a dual-stack service's backends share their indexes
/// in both families' maps): its IPv6 address, else its IPv4 one. Untouched: no such VIP.
#[inline(always)]
fn service_backend6(vip: In6Addr, port: u16, proto: u8, cookie: u64, origin: u8) -> Target6 {
    let key = ServiceKey6 {
        vip,
        port,
        proto,
        _pad: 0,
    };
    let Some(service) = SERVICES6.get_ptr(&key) else {
        return Target6::outcome(LOOKUP_UNTOUCHED);
    };
    // SAFETY: a map value from this program run's lookup.
    let service = unsafe { *service };
    let hashes = lb::Hashes {
        flow: lb::mix(cookie as u32 ^ lb::mix((cookie >> 32) as u32)),
        // The host's (or a container's unbound) socket has no source yet: one bucket.
        source: lb::mix(0),
    };
    let Some(index) = lb::pick_index(&service, &hashes) else {
        return Target6::outcome(LOOKUP_NO_BACKEND);
    };
    let key = BackendKey {
        service_id: service.id,
        index,
    };
    if let Some(b) = BACKENDS6.get_ptr(&key) {
        // SAFETY: a map value from this program run's lookup.
        return unsafe { Target6::found((*b).addr, (*b).port, origin) };
    }
    match BACKENDS.get_ptr(&key) {
        // SAFETY: as above.
        Some(b) => unsafe { Target6::found(In6Addr::mapped_v4((*b).addr), (*b).port, origin) },
        None => Target6::outcome(LOOKUP_NO_BACKEND),
    }
}

/// Whether `addr` is the host's: ::1, or one of its addresses (`dp_local_addrs6_v1`).
#[inline(always)]
fn is_host6(addr: &In6Addr) -> bool {
    same6(addr, &LOOPBACK6) || LOCAL_ADDRS6.get_ptr(addr).is_some()
}

/// An IPv6 destination, looked up as an IPv4 one is: a VIP, then (host processes only) a
/// port published on that address, on every IPv6 address of the host, or, for an IPv4
/// container whose port is published on every address (Docker's default, which docker-proxy
/// serves on `[::]` too), the IPv4 binding.
#[inline(always)]
fn lookup6(call: &Call6, cookie: u64, owner: Owner) -> Target6 {
    let found = service_backend6(call.addr, call.port, call.proto, cookie, ct_origin::SERVICE);
    if found.outcome != LOOKUP_UNTOUCHED || owner != Owner::HOST {
        return found;
    }
    let mut key = PortKey6 {
        addr: call.addr,
        port: call.port,
        proto: call.proto,
        _pad: 0,
    };
    let mut target = PORTS6.get_ptr(&key);
    let host = target.is_none() && is_host6(&call.addr);
    if host {
        key.addr = In6Addr::UNSPECIFIED;
        target = PORTS6.get_ptr(&key);
    }
    if let Some(target) = target {
        // SAFETY: a map value from this program run's lookup.
        let target = unsafe { *target };
        if target.is_service == 0 {
            // (An IPv4-only container's may be written v4-mapped: the same either way.)
            return Target6::found(target.addr, target.port, ct_origin::PUBLISHED);
        }
        let found = service_backend6(
            target.addr,
            target.port,
            call.proto,
            cookie,
            ct_origin::PUBLISHED,
        );
        return if found.outcome == LOOKUP_FOUND {
            found
        } else {
            Target6::outcome(LOOKUP_NO_BACKEND)
        };
    }
    if !host {
        return Target6::outcome(LOOKUP_UNTOUCHED);
    }
    let key = PortKey {
        addr: 0,
        port: call.port,
        proto: call.proto,
        _pad: 0,
    };
    let Some(target) = PORTS.get_ptr(&key) else {
        return Target6::outcome(LOOKUP_UNTOUCHED);
    };
    // SAFETY: a map value from this program run's lookup.
    let target = unsafe { *target };
    if target.is_service == 0 {
        return Target6::found(
            In6Addr::mapped_v4(target.addr),
            target.port,
            ct_origin::PUBLISHED,
        );
    }
    match service_backend(target.addr, target.port, call.proto, cookie, 0, 0) {
        Some(Lookup::Found(t)) => {
            Target6::found(In6Addr::mapped_v4(t.addr), t.port, ct_origin::PUBLISHED)
        }
        _ => Target6::outcome(LOOKUP_NO_BACKEND),
    }
}

/// An AF_INET6 socket to an IPv6 destination: a VIP (host processes and containers), a port
/// published on the host's IPv6 addresses or on [::1] (host processes). An IPv6 target
/// replaces the destination; an IPv4 one is written v4-mapped, which connect6 allows (the
/// kernel then connects over IPv4) and sendmsg6 does not (udpv6_sendmsg refuses a v4-mapped
/// rewrite with ENOTSUPP): such a datagram is left alone, to whoever serves the address
/// (docker-proxy, beside dockerd).
#[inline(never)]
fn translate6(sa: *mut bpf_sock_addr, hook: Forward, owner: &Owner) -> i32 {
    let owner = *owner;
    let call = &read_call6(sa);
    if call.proto != IPPROTO_TCP && call.proto != IPPROTO_UDP {
        return PROCEED;
    }
    // SAFETY: a helper on the context the kernel passed.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    let target = lookup6(call, cookie, owner);
    match target.outcome {
        LOOKUP_FOUND => {}
        LOOKUP_NO_BACKEND => {
            // Counted; the drop record of an IPv6 call waits for family-generic drop events.
            stats::count_drop(DropReason::ServiceBackendNotFound);
            // SAFETY: plain helper call; the value becomes the call's errno.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            return REJECT;
        }
        _ => return PROCEED,
    }
    match target.addr.as_mapped_v4() {
        Some(addr) => to_mapped_v4(
            sa,
            hook,
            owner,
            call,
            cookie,
            Target {
                addr,
                port: target.port,
                origin: target.origin,
            },
        ),
        None => to_v6(sa, hook, owner, call, cookie, &target),
    }
}

/// An IPv6 destination leading to an IPv4 target (connect6 only): the socket connects to it
/// v4-mapped, from the address the kernel picks for it (the bridge's for a container, as
/// docker-proxy's connection comes from: an IPv6 source cannot reach an IPv4 peer).
#[inline(always)]
fn to_mapped_v4(
    sa: *mut bpf_sock_addr,
    hook: Forward,
    owner: Owner,
    call: &Call6,
    cookie: u64,
    target: Target,
) -> i32 {
    // A datagram cannot be sent v4-mapped from sendmsg6 (see translate6); a socket bound to
    // an IPv6 address cannot reach IPv4; a container's IPv4 VIP is connect4's.
    if hook != Forward::Connect6 || !unspecified6(&call.bound) || owner != Owner::HOST {
        return PROCEED;
    }
    // An IPV6_V6ONLY socket cannot connect to a v4-mapped address (tcp_v6_connect gives
    // ENETUNREACH): it is left alone. No bpf_sock field tells, but the kernel refuses it any
    // v4-mapped bind, so binding the unbound socket to ::ffff:0.0.0.0 with no port (what
    // connect() to an IPv4 peer does anyway) asks. A socket already bound to a port cannot
    // be asked: taken as dual-stack, the default.
    if call.bound_port == 0 && !bind_address(sa, hook, 0) {
        return PROCEED;
    }
    let tuple = CtKey {
        saddr: 0,
        daddr: 0,
        sport: call.bound_port.to_be(),
        dport: call.port,
        proto: call.proto,
        _pad: [0; 3],
    };
    let via = if target.origin == ct_origin::PUBLISHED {
        Via::Published
    } else {
        Via::Direct
    };
    if let Err(reason) = policy::check(0, target.addr, call.proto, target.port, via) {
        // The IPv4 connection it would have been (to the target: the IPv6 address asked for
        // has no place in an IPv4 record).
        refused(
            &CtKey {
                daddr: target.addr,
                dport: target.port,
                ..tuple
            },
            reason,
            hook,
        );
        return REJECT;
    }
    let peer = In6Addr::mapped_v4(target.addr);
    let new = remember6(cookie, peer, target.port, call.addr, call.port);
    // SAFETY: `sa` is the context the kernel passed; both fields are writable in connect6.
    unsafe {
        write_ip6((*sa).user_ip6.as_mut_ptr(), peer);
        (*sa).user_port = u32::from(target.port);
    }
    if new {
        report6(call, target.origin, peer, target.port, hook);
    }
    PROCEED
}

/// An IPv6 destination leading to an IPv6 backend or container.
#[inline(always)]
fn to_v6(
    sa: *mut bpf_sock_addr,
    hook: Forward,
    owner: Owner,
    call: &Call6,
    cookie: u64,
    target: &Target6,
) -> i32 {
    let Target6 {
        addr, port, origin, ..
    } = *target;
    let mut source = call.bound;
    if hook == Forward::Sendmsg6 {
        // SAFETY: msg_src_ip6 is readable in sendmsg6.
        let msg_src = unsafe { read_ip6((*sa).msg_src_ip6.as_ptr()) };
        if !unspecified6(&msg_src) {
            source = msg_src;
        }
    }
    // A connection to one of the host's own IPv6 addresses leaves from it, as for IPv4 (see
    // translate4); ::1 keeps the kernel's choice (the bridge's address).
    if owner == Owner::HOST && unspecified6(&source) && !same6(&call.addr, &LOOPBACK6) {
        source = keep_local_source6(sa, hook, call.addr, call.bound_port);
    }
    // A container picked as its own VIP's backend: the connection stays inside its namespace.
    if owner != Owner::HOST && same6(&source, &addr) {
        return PROCEED;
    }
    let new = remember6(cookie, addr, port, call.addr, call.port);
    // SAFETY: `sa` is the context the kernel passed; both fields are writable in connect6
    // and sendmsg6 (the port as a whole u32).
    unsafe {
        write_ip6((*sa).user_ip6.as_mut_ptr(), addr);
        (*sa).user_port = u32::from(port);
    }
    if owner != Owner::HOST {
        // As translate4: the container veth's tc program finds the service here. The source
        // is the bound one; an unbound socket's is picked by the kernel after this hook, so
        // its pair has :: (the tc program's second lookup).
        let pending = SockLbKey6 {
            saddr: source,
            daddr: addr,
            dport: port,
            proto: call.proto,
            _pad: 0,
        };
        let service = SockLb6 {
            // SAFETY: a helper without arguments.
            time_ns: unsafe { bpf_ktime_get_ns() },
            vip: call.addr,
            vip_port: call.port,
            _pad: 0,
            _pad_family: 0,
        };
        let _ = SOCK_LB6.insert(&pending, &service, 0);
    } else if new {
        let call = Call6 {
            bound: source,
            ..*call
        };
        report6(&call, origin, addr, port, hook);
    }
    PROCEED
}

/// Remembers what the socket `cookie` asked for (`asked`:`asked_port`) now that it talks to
/// `peer`:`port` as its AF_INET6 socket names it; whether this is the socket's first
/// translation to that peer (the one reported).
#[inline(always)]
fn remember6(cookie: u64, peer: In6Addr, port: u16, asked: In6Addr, asked_port: u16) -> bool {
    let key = SockRevNatKey6 {
        cookie,
        addr: peer,
        port,
        _pad: 0,
        _pad_family: 0,
    };
    let new = SOCK_REV_NAT6.get_ptr(&key).is_none();
    let value = SockRevNat6 {
        addr: asked,
        port: asked_port,
        _pad: 0,
    };
    // A full LRU map evicts an older socket's entry; an error leaves replies untranslated.
    let _ = SOCK_REV_NAT6.insert(&key, &value, 0);
    new
}

/// The NEW record of a host process's AF_INET6 connection, as it asked for it (an IPv6
/// record; an IPv4 target appears v4-mapped, which the agent reads as IPv4).
#[inline(always)]
fn report6(call: &Call6, origin: u8, peer: In6Addr, port: u16, hook: Forward) {
    flow::new_connection(&flow::NewFlowOf::<In6Addr> {
        forward: CtKey6 {
            saddr: call.bound,
            daddr: call.addr,
            sport: call.bound_port.to_be(),
            dport: call.port,
            proto: call.proto,
            _pad: [0; 3],
        },
        origin,
        rewrite: ct_rewrite::DST,
        nat_addr: peer,
        nat_port: port,
        packets: 0,
        bytes: 0,
        tcp_flags: if call.proto == IPPROTO_TCP {
            tcp_flag::SYN
        } else {
            0
        },
        hook: hook.hook(),
        ifindex: 0,
        hairpin_port: 0,
        icmp_type: 0,
        icmp_code: 0,
    });
}

/// [`keep_local_source`] for an IPv6 host address.
#[inline(always)]
fn keep_local_source6(
    sa: *mut bpf_sock_addr,
    hook: Forward,
    local: In6Addr,
    bound_port: u16,
) -> In6Addr {
    match hook {
        Forward::Connect6 if bound_port == 0 => {
            let mut sin6 = SockaddrIn6 {
                family: AF_INET6,
                port: 0,
                flowinfo: 0,
                addr: local.0,
                scope_id: 0,
            };
            // SAFETY: `sin6` is a sockaddr_in6 on this program's stack, of the size passed.
            let bound = unsafe {
                bpf_bind(
                    sa,
                    (&mut sin6 as *mut SockaddrIn6).cast::<sockaddr>(),
                    core::mem::size_of::<SockaddrIn6>() as i32,
                )
            };
            if bound == 0 {
                local
            } else {
                In6Addr::UNSPECIFIED
            }
        }
        Forward::Sendmsg6 => {
            // SAFETY: msg_src_ip6 is writable in sendmsg6, a word at a time.
            unsafe { write_ip6((*sa).msg_src_ip6.as_mut_ptr(), local) };
            local
        }
        _ => In6Addr::UNSPECIFIED,
    }
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
    if let (0, Some(own)) = (source, owner.container()) {
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
    if owner == Owner::HOST
        && source == 0
        && !is_loopback(addr)
        && LOCAL_ADDRS.get_ptr(&addr).is_some()
    {
        source = keep_local_source(sa, hook, addr, bound_port);
    }
    // A container picked as its own VIP's backend: a hairpin, which needs the packet path's
    // source rewrite (a socket connected to its own address would see itself as the peer).
    if let Some(own) = owner.container()
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
            write_ip6((*sa).user_ip6.as_mut_ptr(), In6Addr::mapped_v4(target.addr));
        } else {
            (*sa).user_ip4 = target.addr;
        }
        (*sa).user_port = u32::from(target.port);
    }
    if owner != Owner::HOST {
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
            addr: In6Addr::mapped_v4(local).0,
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
    if owner(sa) == Owner::OTHER {
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

/// The recvmsg6 and getpeername6 hooks: as [`reverse`], for AF_INET6 sockets. A socket that
/// asked for an IPv6 address has its entry in `dp_sock_rev_nat6_v1`, by its peer as it names
/// it (an IPv4 one v4-mapped); one that asked for a v4-mapped address was translated as an
/// IPv4 destination (by connect6, or by sendmsg4 for a datagram the kernel sent over IPv4):
/// its entry is the IPv4 one, by the real IPv4 peer.
#[inline(always)]
pub fn reverse6(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    if owner(sa) == Owner::OTHER {
        return PROCEED;
    }
    // SAFETY: `sa` is the context the kernel passed; a helper on it; user_ip6 is four
    // words, readable and writable in these hooks.
    unsafe {
        let proto = (*sa).protocol as u8;
        if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
            return PROCEED;
        }
        let cookie = bpf_get_socket_cookie(sa.cast());
        let peer = read_ip6((*sa).user_ip6.as_ptr());
        let port = (*sa).user_port as u16;
        let key = SockRevNatKey6 {
            cookie,
            addr: peer,
            port,
            _pad: 0,
            _pad_family: 0,
        };
        if let Some(asked) = SOCK_REV_NAT6.get_ptr(&key) {
            write_ip6((*sa).user_ip6.as_mut_ptr(), (*asked).addr);
            (*sa).user_port = u32::from((*asked).port);
            return PROCEED;
        }
        let Some(peer4) = peer.as_mapped_v4() else {
            return PROCEED;
        };
        let key = SockRevNatKey {
            cookie,
            addr: peer4,
            port,
            _pad: 0,
            _pad_family: (),
        };
        if let Some(asked) = SOCK_REV_NAT.get_ptr(&key) {
            write_ip6(
                (*sa).user_ip6.as_mut_ptr(),
                In6Addr::mapped_v4((*asked).addr),
            );
            (*sa).user_port = u32::from((*asked).port);
        }
    }
    PROCEED
}
