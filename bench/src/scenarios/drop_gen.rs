//! The paced packet generator of the `xdp-drop` scenario, and the statistics it reports: CPU
//! time per packet of sending denied packets into the path under test and, interleaved with
//! them, the same packets into a sink device that frees them unreceived.
//!
//! It runs as `dataplane-bench drop-gen ...` (a hidden subcommand, like the latency probe) in
//! the outside namespace, pinned to one CPU. It sends the way trafgen's rate-limited mode
//! does (a raw `AF_PACKET` socket with `PACKET_QDISC_BYPASS`, one prebuilt frame), but in
//! blocks of [`BLOCK`] packets, alternating between the path's device and the sink's, each
//! block timed with the thread's own CPU clock (`CLOCK_THREAD_CPUTIME_ID`, nanoseconds).
//! On a veth pair the receiver runs in the sender's context (the packet is processed in the
//! softirq that `local_bh_enable` runs at the end of the send; with XDP on the peer, veth's
//! NAPI poll runs there too), and this kernel has no IRQ time accounting, so that softirq
//! time is charged to the sending thread: a path block's CPU time is the generator's work
//! plus the whole receive and drop; a sink block's is the generator's work alone. Their
//! difference per packet is what the dataplane spends on the drop.
//!
//! Why not trafgen: its `--rate` sends each second's quota at once and sleeps the rest of the
//! second, and one trafgen process sends to one device, so the reference and the path can
//! only be compared between whole runs of separate processes. Measured here, such runs of the
//! same trafgen into the same reference veth differed by ±10% (3.0-3.4 µs a packet), as much
//! as the drop costs; blocks a few milliseconds apart in one thread, compared pair by pair,
//! cancel what the machine's other work does to the generator.

use std::{
    ffi::CString,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// Packets per block: at ~2 µs a packet a block lasts about a millisecond, long against the
/// clock reads around it, short against the slow drift of the machine's other work.
pub const BLOCK: usize = 256;
/// The frame: Ethernet, IPv4 (20 bytes), UDP (8) and 18 bytes of zeros: 60 bytes, the
/// minimum Ethernet frame without its FCS.
pub const FRAME_LEN: usize = 60;
const UDP_PAYLOAD: usize = 18;

/// What the generator is asked to do.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The device towards the path under test, and the sink device.
    pub dev: String,
    pub sink: String,
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub saddr: Ipv4Addr,
    pub daddr: Ipv4Addr,
    /// Packets per second to the path (and, interleaved, as many to the sink).
    pub rate: u32,
    pub secs: u32,
    /// The CPU the generator pins itself to.
    pub cpu: usize,
}

/// A 60-byte UDP frame (source port 40000, destination port 9, discard) with its IPv4 header
/// checksum; UDP's checksum is 0 (none, allowed over IPv4).
pub fn frame(plan: &Plan) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[0..6].copy_from_slice(&plan.dst_mac);
    f[6..12].copy_from_slice(&plan.src_mac);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + 8 + UDP_PAYLOAD) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&plan.saddr.octets());
    ip[16..20].copy_from_slice(&plan.daddr.octets());
    let csum = ipv4_checksum(ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    let udp = &mut f[34..42];
    udp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    udp[2..4].copy_from_slice(&9u16.to_be_bytes());
    udp[4..6].copy_from_slice(&((8 + UDP_PAYLOAD) as u16).to_be_bytes());
    f
}

/// The Internet checksum of a header whose checksum field is zero (or, over a header with its
/// checksum in place, 0 when it is right).
pub fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Which device block `k` of the run goes to: path, sink, sink, path, path, sink, ... so that
/// each pair (2i, 2i+1) has one of each and neither always comes first (the first block after
/// a pause finds colder caches).
pub fn block_to_path(k: usize) -> bool {
    matches!(k % 4, 0 | 3)
}

/// CPU nanoseconds per packet of one block.
pub fn per_packet(cpu_ns: u64, packets: usize) -> f64 {
    cpu_ns as f64 / packets.max(1) as f64
}

/// The median of `values` (NaN when empty).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The drop's cost per packet: the median over pairs of adjacent blocks of (path block's ns
/// per packet − sink block's). Pairing cancels the drift of what else the machine does; the
/// median leaves out blocks that an interrupt or a neighbour's cache use hit.
pub fn paired_difference(pairs: &[(f64, f64)]) -> f64 {
    let diffs: Vec<f64> = pairs.iter().map(|(path, sink)| path - sink).collect();
    median(&diffs)
}

/// What one run of the generator measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Measured {
    /// Packets sent to the path and to the sink.
    pub path_packets: u64,
    pub sink_packets: u64,
    /// Medians over blocks: CPU ns per packet into the path, into the sink.
    pub path_ns: f64,
    pub sink_ns: f64,
    /// Median over pairs of the difference: the drop's ns per packet.
    pub drop_ns: f64,
    /// Packets per second the path got, over the whole run.
    pub rate_pps: f64,
    /// CPU ns of the CPU's ksoftirqd over the run, per path packet: receive work that left the
    /// sender's context (should be about 0; it is not in the numbers above).
    pub ksoftirqd_ns: f64,
    /// Sends that failed (ENOBUFS and the like): those packets are not counted as sent.
    pub errors: u64,
}

impl Measured {
    pub fn line(&self) -> String {
        format!(
            "XTASK_DROPGEN path_packets={} sink_packets={} path_ns={:.1} sink_ns={:.1} \
             drop_ns={:.1} rate_pps={:.0} ksoftirqd_ns={:.1} errors={}",
            self.path_packets,
            self.sink_packets,
            self.path_ns,
            self.sink_ns,
            self.drop_ns,
            self.rate_pps,
            self.ksoftirqd_ns,
            self.errors
        )
    }

    pub fn parse(stdout: &str) -> anyhow::Result<Measured> {
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix("XTASK_DROPGEN "))
            .with_context(|| format!("no XTASK_DROPGEN line in {:?}", stdout.trim()))?;
        let field = |name: &str| -> anyhow::Result<f64> {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .with_context(|| format!("no {name} in {line:?}"))?
                .parse()
                .with_context(|| format!("{name} in {line:?}"))
        };
        Ok(Measured {
            path_packets: field("path_packets")? as u64,
            sink_packets: field("sink_packets")? as u64,
            path_ns: field("path_ns")?,
            sink_ns: field("sink_ns")?,
            drop_ns: field("drop_ns")?,
            rate_pps: field("rate_pps")?,
            ksoftirqd_ns: field("ksoftirqd_ns")?,
            errors: field("errors")? as u64,
        })
    }
}

/// A MAC address from `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> anyhow::Result<[u8; 6]> {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("MAC address {text:?}"))?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("MAC address {text:?}: not 6 bytes"))
}

// ---------------------------------------------------------------------------------------------
// The generator's side (in the outside namespace).

/// A raw packet socket that sends one frame to one device without going through its qdisc.
struct Sender {
    fd: libc::c_int,
    /// Boxed: the message headers point at it.
    addr: Box<libc::sockaddr_ll>,
    /// The one frame every message sends (boxed for the same reason).
    iov: Box<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
}

impl Sender {
    /// A socket sending `frame` (which must outlive it) to `dev`.
    fn open(dev: &str, frame: &'static [u8]) -> anyhow::Result<Sender> {
        let name = CString::new(dev)?;
        // SAFETY: a plain call with a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            bail!("no device {dev}: {}", std::io::Error::last_os_error());
        }
        // Protocol 0: the socket receives nothing (no tap on the device's traffic).
        // SAFETY: a plain call.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        let one: libc::c_int = 1;
        // SAFETY: `one` outlives the call and its size is passed.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: our own fd.
            unsafe { libc::close(fd) };
            bail!("PACKET_QDISC_BYPASS: {e}");
        }
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_IP as u16).to_be();
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        let mut sender = Sender {
            fd,
            addr: Box::new(addr),
            iov: Box::new(libc::iovec {
                iov_base: frame.as_ptr() as *mut libc::c_void,
                iov_len: frame.len(),
            }),
            msgs: Vec::with_capacity(BLOCK),
        };
        for _ in 0..BLOCK {
            // SAFETY: mmsghdr is plain data; all-zero is a valid value.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_name = (&mut *sender.addr as *mut libc::sockaddr_ll).cast();
            m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            m.msg_hdr.msg_iov = &mut *sender.iov;
            m.msg_hdr.msg_iovlen = 1;
            sender.msgs.push(m);
        }
        Ok(sender)
    }

    /// Sends [`BLOCK`] copies of the frame (sendmmsg); the number sent and the number that
    /// failed.
    fn send_block(&mut self) -> (u64, u64) {
        let count = BLOCK;
        let (mut sent, mut failed) = (0u64, 0u64);
        let mut at = 0;
        while at < count {
            // SAFETY: `msgs[at..]` are valid headers pointing at `self.iov`, the frame and
            // `self.addr`, which all outlive the call.
            let n = unsafe {
                libc::sendmmsg(
                    self.fd,
                    self.msgs[at..].as_mut_ptr(),
                    (count - at) as libc::c_uint,
                    0,
                )
            };
            if n <= 0 {
                // The first message of the rest failed (ENOBUFS from the device, say): count
                // it and go on with the next.
                failed += 1;
                at += 1;
            } else {
                sent += n as u64;
                at += n as usize;
            }
        }
        (sent, failed)
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        // SAFETY: our own fd, closed once.
        unsafe { libc::close(self.fd) };
    }
}

/// This thread's CPU time so far (ns): its own work and the softirqs run in its context.
fn thread_cpu_ns() -> u64 {
    // SAFETY: timespec is plain data; the call fills it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid clock id and a pointer to a local.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn pin_to(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: cpu_set_t is plain data; the CPU_* helpers write inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("pinning to CPU {cpu}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The run time (ns) of the `ksoftirqd/CPU` thread so far, from its /proc schedstat.
fn ksoftirqd_ns(cpu: usize) -> u64 {
    let name = format!("ksoftirqd/{cpu}");
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for entry in dir.flatten() {
        let path = entry.path();
        let is_it = std::fs::read_to_string(path.join("comm")).is_ok_and(|c| c.trim() == name);
        if is_it {
            return std::fs::read_to_string(path.join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok())
                .unwrap_or(0);
        }
    }
    0
}

/// The generator's side: sends for `plan.secs` and prints one `XTASK_DROPGEN ...` line.
pub fn main(plan: &Plan) -> anyhow::Result<()> {
    let measured = generate(plan)?;
    println!("{}", measured.line());
    Ok(())
}

fn generate(plan: &Plan) -> anyhow::Result<Measured> {
    pin_to(plan.cpu)?;
    // Leaked: one 60-byte frame for the life of this short process, which the sockets'
    // message headers point at.
    let frame: &'static [u8] = Box::leak(Box::new(frame(plan)));
    let mut path = Sender::open(&plan.dev, frame)?;
    let mut sink = Sender::open(&plan.sink, frame)?;
    // Each block has its slot: the path gets `rate` packets a second and so does the sink.
    let slot = Duration::from_secs_f64(BLOCK as f64 / (2.0 * f64::from(plan.rate.max(1))));
    let blocks = (2 * plan.rate as usize * plan.secs as usize).div_ceil(BLOCK);
    let mut path_ns = Vec::with_capacity(blocks / 2 + 1);
    let mut sink_ns = Vec::with_capacity(blocks / 2 + 1);
    let mut pairs = Vec::with_capacity(blocks / 2 + 1);
    let (mut path_packets, mut sink_packets, mut errors) = (0u64, 0u64, 0u64);
    // One block of each first, unmeasured: sockets, routes and caches warm.
    path.send_block();
    sink.send_block();
    let soft0 = ksoftirqd_ns(plan.cpu);
    let started = Instant::now();
    let mut pending: Option<(bool, f64)> = None;
    for k in 0..blocks {
        let due = started + slot * k as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let to_path = block_to_path(k);
        let sender = if to_path { &mut path } else { &mut sink };
        let cpu0 = thread_cpu_ns();
        let (sent, failed) = sender.send_block();
        let cpu = thread_cpu_ns() - cpu0;
        errors += failed;
        let ns = per_packet(cpu, BLOCK);
        if to_path {
            path_packets += sent;
            path_ns.push(ns);
        } else {
            sink_packets += sent;
            sink_ns.push(ns);
        }
        pending = match pending {
            None => Some((to_path, ns)),
            Some((first_to_path, first)) => {
                pairs.push(if first_to_path {
                    (first, ns)
                } else {
                    (ns, first)
                });
                None
            }
        };
    }
    let elapsed = started.elapsed().as_secs_f64();
    let soft = ksoftirqd_ns(plan.cpu).saturating_sub(soft0);
    Ok(Measured {
        path_packets,
        sink_packets,
        path_ns: median(&path_ns),
        sink_ns: median(&sink_ns),
        drop_ns: paired_difference(&pairs),
        rate_pps: path_packets as f64 / elapsed,
        ksoftirqd_ns: soft as f64 / path_packets.max(1) as f64,
        errors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan {
            dev: "eth0".into(),
            sink: "sink0".into(),
            dst_mac: [0x02, 0, 0, 0, 0, 1],
            src_mac: [0x02, 0, 0, 0, 0, 2],
            saddr: Ipv4Addr::new(198, 51, 100, 7),
            daddr: Ipv4Addr::new(192, 0, 2, 1),
            rate: 50_000,
            secs: 3,
            cpu: 0,
        }
    }

    #[test]
    fn the_frame_is_a_valid_udp_datagram() {
        let f = frame(&plan());
        assert_eq!(f.len(), 60);
        assert_eq!(&f[0..6], &[0x02, 0, 0, 0, 0, 1]);
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        // A header with its checksum in place sums to 0 (RFC 1071).
        assert_eq!(ipv4_checksum(&f[14..34]), 0);
        assert_eq!(u16::from_be_bytes([f[16], f[17]]), 46, "IP total length");
        assert_eq!(&f[26..30], &[198, 51, 100, 7]);
        assert_eq!(&f[30..34], &[192, 0, 2, 1]);
        assert_eq!(u16::from_be_bytes([f[36], f[37]]), 9, "destination port");
        assert_eq!(u16::from_be_bytes([f[38], f[39]]), 26, "UDP length");
    }

    #[test]
    fn checksum_of_a_known_header() {
        // The example of RFC 1071 section 3 / Wikipedia's IPv4 header checksum: b861.
        let header = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_checksum(&header), 0xb861);
    }

    #[test]
    fn blocks_alternate_within_every_pair() {
        let order: Vec<bool> = (0..8).map(block_to_path).collect();
        assert_eq!(
            order,
            [true, false, false, true, true, false, false, true],
            "path, sink, sink, path, ..."
        );
        for pair in order.chunks(2) {
            assert_ne!(pair[0], pair[1]);
        }
    }

    #[test]
    fn medians_and_paired_differences() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(per_packet(256_000, 256), 1000.0);
        assert_eq!(per_packet(5, 0), 5.0, "no packets: no division by zero");
        // The machine slows down halfway (both blocks of a pair alike): the pairs still say
        // 100 ns; an outlier pair (an interrupt in one block) does not move the median.
        let pairs = [
            (1100.0, 1000.0),
            (1101.0, 1000.0),
            (1600.0, 1500.0),
            (1599.0, 1500.0),
            (9000.0, 1500.0),
        ];
        assert_eq!(paired_difference(&pairs), 100.0);
    }

    #[test]
    fn the_report_line_round_trips() {
        let m = Measured {
            path_packets: 150_016,
            sink_packets: 150_016,
            path_ns: 1834.5,
            sink_ns: 1610.26,
            drop_ns: 221.0,
            rate_pps: 49_990.0,
            ksoftirqd_ns: 0.5,
            errors: 0,
        };
        let parsed = Measured::parse(&format!("noise\n{}\n", m.line())).unwrap();
        assert_eq!(parsed.path_packets, 150_016);
        assert_eq!(parsed.drop_ns, 221.0);
        assert_eq!(parsed.sink_ns, 1610.3, "one decimal");
        assert!(Measured::parse("nothing here").is_err());
    }

    #[test]
    fn macs_parse() {
        assert_eq!(
            parse_mac("fa:28:85:08:fc:fc").unwrap(),
            [0xfa, 0x28, 0x85, 0x08, 0xfc, 0xfc]
        );
        assert!(parse_mac("fa:28:85").is_err());
        assert!(parse_mac("zz:28:85:08:fc:fc").is_err());
    }
}
