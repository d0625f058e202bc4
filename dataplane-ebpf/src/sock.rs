//! Socket-level translation for processes of the host: a connect() to a published port (on
//! localhost or on one of the host's addresses) is pointed at the container before the first
//! packet exists, so host processes reach published ports without a proxy in between and
//! without any packet rewriting. Lookups are the ones the packet path uses.

use aya_ebpf::{helpers::bpf_get_netns_cookie, programs::SockAddrContext};
use dataplane_common::PortKey;

use crate::{
    maps::{CONFIG, LOCAL_ADDRS, PORTS},
    parse::{IPPROTO_TCP, IPPROTO_UDP},
};

/// Whether `addr` (network byte order) is in 127.0.0.0/8: its first octet is the lowest byte.
#[inline(always)]
fn is_loopback(addr: u32) -> bool {
    addr & 0xff == 127
}

#[inline(always)]
pub fn connect4(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    let Some(config) = CONFIG.get_ptr(0) else {
        return;
    };
    // SAFETY: `sa` is the context the kernel passed; `config` is array element 0.
    unsafe {
        // The hook sees every process of its cgroup, in any namespace: act only in ours.
        let cookie = bpf_get_netns_cookie(sa.cast());
        if (*config).netns_cookie == 0 || cookie != (*config).netns_cookie {
            return;
        }
        let proto = (*sa).protocol as u8;
        if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
            return;
        }
        let addr = (*sa).user_ip4;
        // user_port holds the port in network byte order in its low 16 bits.
        let port = (*sa).user_port as u16;
        let mut key = PortKey {
            addr,
            port,
            proto,
            _pad: 0,
        };
        let target = match PORTS.get_ptr(&key) {
            Some(target) => *target,
            None => {
                if !is_loopback(addr) && LOCAL_ADDRS.get_ptr(&addr).is_none() {
                    return;
                }
                key.addr = 0;
                match PORTS.get_ptr(&key) {
                    Some(target) => *target,
                    None => return,
                }
            }
        };
        (*sa).user_ip4 = target.addr;
        (*sa).user_port = u32::from(target.port);
    }
}
