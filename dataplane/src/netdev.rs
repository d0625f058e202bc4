//! Network interfaces of the namespace the agent runs in, by name and index.

use std::ffi::{CStr, CString};

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

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_round_trips() {
        let index = super::ifindex("lo").expect("every namespace has lo");
        assert_eq!(super::ifname(index).as_deref(), Some("lo"));
        assert_eq!(super::ifindex("no-such-if0"), None);
    }
}
