//! Hostile traffic on a namespaced host: a spoofed SYN flood at a published port (bounded, a
//! few seconds, inside the sandbox's namespaces) locks nobody out and leaves an established
//! connection alone; UDP datagrams that must be fragmented arrive whole, with their replies,
//! through a published port, masquerade and a VIP, and over IPv6 (the fragment header); orphan
//! and out-of-order fragments are counted; a flood of denied packets keeps earlier records in `observe` and costs the agent
//! little CPU.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    process::Command,
    sync::{Mutex, MutexGuard},
    thread,
    time::{Duration, Instant},
};

use dataplane_tests::{Agent, Sandbox, StatusExt as _, dataplane_bin, in_netns};
use serde_json::Value;

/// The host: two containers, a published TCP port. Its sandbox serves the container ports
/// named here; those the fragment test's own UDP servers use are published afterwards
/// ([`UDP_SERVICES`]).
const SPEC: &str = r#"
uplink: eth0
networks:
  - {name: front, bridge: br-front, subnet: 172.30.1.0/24, gateway: 172.30.1.1}
endpoints:
  - name: web1
    labels: {app: dns}
    interfaces: [{network: front, ip: 172.30.1.2, mac: "02:42:ac:1e:01:02", host_veth: veth-web1}]
  - name: web2
    interfaces: [{network: front, ip: 172.30.1.3, mac: "02:42:ac:1e:01:03", host_veth: veth-web2}]
ports:
  - {endpoint: web1, protocol: tcp, host_port: 8080, container_port: 80}
"#;

/// A published UDP port and a UDP VIP, both to web1:5300.
const UDP_SERVICES: &str = r#"  - {endpoint: web1, protocol: udp, host_port: 5300, container_port: 5300}
services:
  - {name: dns, vip: 10.96.0.53, port: 5300, protocol: udp, target_port: 5300, selector: {app: dns}}
"#;

/// The tests of this file run one at a time. A flood fills the per-CPU backlog that every
/// veth shares, whatever its namespace, so a flood in one test drops another test's packets.
/// Once, in CI, two lost SYNs of a connection made by another test timed it out. Each test takes
/// [`one_at_a_time`] first.
static FLOODS: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    // A test that failed while holding it poisons it; the next test still runs alone.
    FLOODS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

const HOST: &str = "192.0.2.1";
const OUTSIDE: &str = "192.0.2.2";
const WEB1: &str = "172.30.1.2";
const VIP: &str = "10.96.0.53";

fn curl(sandbox: &Sandbox, from: &str, url: &str) -> std::process::Output {
    sandbox.exec(from, &["curl", "-sS", "--max-time", "3", url])
}

/// An HTTP keep-alive connection of the outside client through the published port.
struct KeepAlive(TcpStream);

impl KeepAlive {
    fn open(sandbox: &Sandbox) -> KeepAlive {
        KeepAlive::open_to(sandbox, format!("{HOST}:8080"))
    }

    /// To `addr` (`[2001:db8::1]:8080` over IPv6).
    fn open_to(sandbox: &Sandbox, addr: String) -> KeepAlive {
        let stream = in_netns(&sandbox.netns("outside"), move || {
            TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(3))
        })
        .expect("connecting through the published port");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        KeepAlive(stream)
    }

    fn get(&mut self) -> std::io::Result<String> {
        self.0.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")?;
        let mut buf = [0u8; 1024];
        let mut text = String::new();
        while !text.contains("\r\n\r\n") || !text.ends_with('\n') {
            let n = self.0.read(&mut buf)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        Ok(text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned())
    }
}

/// Runs `cmd` in `target`'s namespace for at most `secs` seconds (a bounded flood).
fn bounded(sandbox: &Sandbox, target: &str, secs: u32, cmd: &[&str]) {
    let mut full = vec![
        "timeout".to_owned(),
        "-s".into(),
        "INT".into(),
        secs.to_string(),
    ];
    full.extend(cmd.iter().map(|s| (*s).to_owned()));
    let args: Vec<&str> = full.iter().map(String::as_str).collect();
    // timeout exits 124 when it had to stop the flood: that is the normal end.
    let out = sandbox.exec(target, &args);
    assert!(
        matches!(out.status.code(), Some(0 | 124 | 130)),
        "{cmd:?}: {out:?}"
    );
}

#[test]
fn a_spoofed_syn_flood_locks_nobody_out_and_spares_established_connections() {
    let _alone = one_at_a_time();
    let sandbox = Sandbox::up(SPEC);
    // A small main table (4,096 entries; 1,024 for handshakes under way) so that the flood
    // really fills what it can reach.
    let agent = Agent::start_with(&sandbox, &["--ct-max-entries", "4096"]);
    let _server = sandbox.serve_outside("9999", None);
    let mut established = KeepAlive::open(&sandbox);
    assert!(
        established
            .get()
            .expect("before the flood")
            .starts_with("web1 ")
    );

    // ~3 s of SYNs from random sources at the published port (hping3, inside the sandbox).
    let flood = {
        let outside = sandbox.netns("outside");
        thread::spawn(move || {
            Command::new("nsenter")
                .arg(format!("--net=/run/netns/{outside}"))
                .args([
                    "timeout",
                    "-s",
                    "INT",
                    "3",
                    "hping3",
                    "-q",
                    "-S",
                    "--flood",
                    "--rand-source",
                    "-p",
                    "8080",
                    HOST,
                ])
                .output()
                .expect("running hping3 (cargo xtask setup installs it)")
        })
    };
    // The established connection keeps working throughout.
    let started = Instant::now();
    let mut during = 0;
    while started.elapsed() < Duration::from_millis(2500) {
        let body = established
            .get()
            .expect("the established connection during the flood");
        assert!(body.starts_with("web1 "), "{body}");
        during += 1;
        thread::sleep(Duration::from_millis(200));
    }
    let out = flood.join().unwrap();
    assert!(matches!(out.status.code(), Some(0 | 124 | 130)), "{out:?}");
    let status = agent.status();
    let new_entries = status.map_entries("dp_ct_new_v1");
    assert!(
        new_entries > 500,
        "the flood filled the table of handshakes: {new_entries} entries"
    );

    // At once (within 2 s) new clients and containers' outbound connections get in.
    let deadline = Instant::now() + Duration::from_secs(2);
    let inbound = curl(&sandbox, "outside", &format!("http://{HOST}:8080/"));
    assert!(
        String::from_utf8_lossy(&inbound.stdout).starts_with("web1 "),
        "{inbound:?}"
    );
    let outbound = sandbox.exec("web2", &["nc", "-w2", OUTSIDE, "9999"]);
    assert!(
        String::from_utf8_lossy(&outbound.stdout).starts_with(&format!("outside {HOST}:")),
        "{outbound:?}"
    );
    assert!(
        Instant::now() < deadline,
        "new connections took longer than 2 s"
    );
    assert!(
        established
            .get()
            .expect("after the flood")
            .starts_with("web1 ")
    );
    assert!(during >= 5, "{during} requests during the flood");
    let status = agent.status();
    assert_eq!(status.drops("CT_MAP_INSERTION_FAILED"), 0, "{status:#?}");
}

/// A UDP server on `port` in `netns` that answers every datagram with one of the same length
/// and contents; returns its socket's thread, which ends after `count` datagrams, with
/// (length, peer) of each.
fn udp_echo(
    netns: String,
    port: u16,
    count: usize,
) -> thread::JoinHandle<Vec<(usize, SocketAddr)>> {
    udp_echo_on(netns, "0.0.0.0", port, count)
}

/// [`udp_echo`] on address `addr` (`::` for IPv6 clients).
fn udp_echo_on(
    netns: String,
    addr: &'static str,
    port: u16,
    count: usize,
) -> thread::JoinHandle<Vec<(usize, SocketAddr)>> {
    let socket = in_netns(&netns, move || UdpSocket::bind((addr, port))).expect("binding");
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 65536];
        for _ in 0..count {
            let Ok((n, peer)) = socket.recv_from(&mut buf) else {
                break;
            };
            assert!(
                pattern_ok(&buf[..n]),
                "datagram of {n} bytes arrived corrupted"
            );
            socket.send_to(&buf[..n], peer).unwrap();
            seen.push((n, peer));
        }
        seen
    })
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

fn pattern_ok(data: &[u8]) -> bool {
    data.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8)
}

/// Sends datagrams of each size in `sizes` from `netns` to `to` and expects each echoed back
/// whole from `to` itself.
fn exchange(netns: &str, to: &str, sizes: &[usize]) {
    let to: SocketAddr = to.parse().unwrap();
    let sizes = sizes.to_vec();
    in_netns(netns, move || {
        let any = if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
        let socket = UdpSocket::bind(any).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = vec![0u8; 65536];
        for size in sizes {
            socket.send_to(&pattern(size), to).unwrap();
            let (n, from) = socket
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("no reply to {size} bytes to {to}: {e}"));
            assert_eq!(from, to, "the reply comes from where the datagram went");
            assert_eq!(n, size, "the reply to {size} bytes to {to} arrived whole");
            assert!(pattern_ok(&buf[..n]));
        }
    });
}

#[test]
fn fragmented_udp_datagrams_arrive_whole_with_their_replies() {
    let _alone = one_at_a_time();
    let sandbox = Sandbox::up(SPEC);
    let agent = Agent::start(&sandbox);
    sandbox.write_state(&format!("{SPEC}{UDP_SERVICES}"));
    agent.wait_for("the UDP port and VIP", |s| {
        s.last_error.is_none() && s.map_entries("dp_services_v1") == 1
    });
    let sizes = [4000, 60000];
    // Through the published port: the container sees the client's address.
    let server = udp_echo(sandbox.netns("web1"), 5300, sizes.len());
    exchange(&sandbox.netns("outside"), &format!("{HOST}:5300"), &sizes);
    let seen = server.join().unwrap();
    assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), sizes);
    assert!(
        seen.iter()
            .all(|(_, peer)| peer.ip().to_string() == OUTSIDE),
        "{seen:?}"
    );
    // Through masquerade: every fragment leaves with the host's address.
    let server = udp_echo(sandbox.netns("outside"), 7777, sizes.len());
    exchange(&sandbox.netns("web2"), &format!("{OUTSIDE}:7777"), &sizes);
    let seen = server.join().unwrap();
    assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), sizes);
    assert!(
        seen.iter().all(|(_, peer)| peer.ip().to_string() == HOST),
        "{seen:?}"
    );
    // To a VIP from another container.
    let server = udp_echo(sandbox.netns("web1"), 5300, sizes.len());
    exchange(&sandbox.netns("web2"), &format!("{VIP}:5300"), &sizes);
    let seen = server.join().unwrap();
    assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), sizes);
    // Container to container, straight.
    let server = udp_echo(sandbox.netns("web1"), 5301, sizes.len());
    exchange(&sandbox.netns("web2"), &format!("{WEB1}:5301"), &sizes);
    assert_eq!(server.join().unwrap().len(), sizes.len());
    let status = agent.status();
    assert_eq!(
        status.drops("FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND"),
        0,
        "{status:#?}"
    );
}

/// [`SPEC`] with IPv6 on the network and the containers (Docker's `--ipv6` network).
const SPEC6: &str = r#"
uplink: eth0
networks:
  - {name: front, bridge: br-front, subnet: 172.30.1.0/24, gateway: 172.30.1.1,
     subnet6: "fd00:30:1::/64", gateway6: "fd00:30:1::1"}
endpoints:
  - name: web1
    interfaces: [{network: front, ip: 172.30.1.2, ip6: "fd00:30:1::2", mac: "02:42:ac:1e:01:02", host_veth: veth-web1}]
  - name: web2
    interfaces: [{network: front, ip: 172.30.1.3, ip6: "fd00:30:1::3", mac: "02:42:ac:1e:01:03", host_veth: veth-web2}]
ports:
  - {endpoint: web1, protocol: tcp, host_port: 8080, container_port: 80}
"#;

const HOST6: &str = "2001:db8::1";
const OUTSIDE6: &str = "2001:db8::2";

/// A spoofed IPv6 SYN flood, sent by a packet socket in the outside namespace (hping3 has no
/// IPv6): 4,096 SYNs from random sources of 2001:db8:ffff::/48 and random ports to the
/// published port, again and again for `secs` seconds, each with its TCP checksum over the
/// IPv6 pseudo-header. Prints how many it sent.
const SYN_FLOOD6: &str = r#"
import random, socket, struct, sys, time
dst, dmac, port, secs = sys.argv[1], bytes.fromhex(sys.argv[2].replace(':', '')), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(('eth0', 0))
smac = s.getsockname()[4]
daddr = socket.inet_pton(socket.AF_INET6, dst)
def csum(b):
    t = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    while t >> 16:
        t = (t & 0xffff) + (t >> 16)
    return ~t & 0xffff
frames = []
for _ in range(4096):
    saddr = socket.inet_pton(socket.AF_INET6, '2001:db8:ffff::%x:%x' % (random.randrange(1, 65536), random.randrange(1, 65536)))
    tcp = struct.pack('!HHIIBBHHH', random.randrange(1024, 65535), port, random.getrandbits(32), 0, 5 << 4, 0x02, 64240, 0, 0)
    c = csum(saddr + daddr + struct.pack('!IxxxB', len(tcp), 6) + tcp)
    tcp = tcp[:16] + struct.pack('!H', c) + tcp[18:]
    ip = struct.pack('!IHBB', 0x60000000, len(tcp), 6, 64) + saddr + daddr
    frames.append(dmac + smac + b'\x86\xdd' + ip + tcp)
end, sent = time.time() + secs, 0
while time.time() < end:
    for f in frames:
        s.send(f)
    sent += len(frames)
print(sent)
"#;

/// The MAC address of `target`'s eth0 (the uplink's, in `host`).
fn mac_of(sandbox: &Sandbox, target: &str) -> String {
    let link = sandbox.exec_ok(target, &["ip", "-o", "link", "show", "eth0"]);
    link.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .expect("eth0's MAC")
        .to_owned()
}

/// The IPv6 SYN flood at a published port locks nobody out either: it only churns the table
/// of handshakes under way (IPv6's own, `dp_ct6_new_v1`), an established IPv6 connection goes
/// on answering throughout, and new clients get in at once after it.
#[test]
fn a_spoofed_ipv6_syn_flood_locks_nobody_out_and_spares_established_connections() {
    let _alone = one_at_a_time();
    let sandbox = Sandbox::up(SPEC6);
    let agent = Agent::start_with(&sandbox, &["--ct-max-entries", "4096"]);
    let mut established = KeepAlive::open_to(&sandbox, format!("[{HOST6}]:8080"));
    assert!(
        established
            .get()
            .expect("before the flood")
            .starts_with("web1 ")
    );
    let uplink_mac = mac_of(&sandbox, "host");
    let flood = {
        let outside = sandbox.netns("outside");
        thread::spawn(move || {
            Command::new("nsenter")
                .arg(format!("--net=/run/netns/{outside}"))
                .args([
                    "/usr/bin/python3",
                    "-c",
                    SYN_FLOOD6,
                    HOST6,
                    &uplink_mac,
                    "8080",
                    "3",
                ])
                .output()
                .expect("running the IPv6 SYN flood")
        })
    };
    let started = Instant::now();
    let mut during = 0;
    while started.elapsed() < Duration::from_millis(2500) {
        let body = established
            .get()
            .expect("the established IPv6 connection during the flood");
        assert!(body.starts_with("web1 "), "{body}");
        during += 1;
        thread::sleep(Duration::from_millis(200));
    }
    let out = flood.join().unwrap();
    assert!(out.status.success(), "{out:?}");
    let sent: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    let status = agent.status();
    let new_entries = status.map_entries("dp_ct6_new_v1");
    assert!(
        new_entries > 500,
        "the flood ({sent} SYNs) filled the table of handshakes: {new_entries} entries"
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    let inbound = curl(&sandbox, "outside", &format!("http://[{HOST6}]:8080/"));
    assert!(
        String::from_utf8_lossy(&inbound.stdout).starts_with("web1 "),
        "{inbound:?}"
    );
    assert!(
        Instant::now() < deadline,
        "a new client took longer than 2 s"
    );
    assert!(
        established
            .get()
            .expect("after the flood")
            .starts_with("web1 ")
    );
    assert!(during >= 5, "{during} requests during the flood");
    let status = agent.status();
    assert_eq!(status.drops("CT_MAP_INSERTION_FAILED"), 0, "{status:#?}");
    eprintln!("IPv6 SYN flood: {sent} SYNs in 3 s, {new_entries} handshake entries");
}

/// The IPv6 fragment header's way: UDP datagrams bigger than the path, split by their sender
/// into fragments (IPv6 routers never split), arrive whole with their replies through a
/// published port (the container sees the client) and through NAT66 (every fragment leaves
/// from the host's address).
#[test]
fn fragmented_ipv6_udp_datagrams_arrive_whole_with_their_replies() {
    let _alone = one_at_a_time();
    let sandbox = Sandbox::up(SPEC6);
    let agent = Agent::start(&sandbox);
    sandbox.write_state(&format!(
        "{SPEC6}  - {{endpoint: web1, protocol: udp, host_port: 5300, container_port: 5300}}\n"
    ));
    agent.wait_for("the UDP port", |s| {
        s.last_error.is_none() && s.map_entries("dp_ports6_v1") == 2
    });
    let sizes = [4000, 60000];
    let server = udp_echo_on(sandbox.netns("web1"), "::", 5300, sizes.len());
    exchange(
        &sandbox.netns("outside"),
        &format!("[{HOST6}]:5300"),
        &sizes,
    );
    let seen = server.join().unwrap();
    assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), sizes);
    assert!(
        seen.iter()
            .all(|(_, peer)| peer.ip().to_string() == OUTSIDE6),
        "{seen:?}"
    );
    let server = udp_echo_on(sandbox.netns("outside"), "::", 7777, sizes.len());
    exchange(
        &sandbox.netns("web2"),
        &format!("[{OUTSIDE6}]:7777"),
        &sizes,
    );
    let seen = server.join().unwrap();
    assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), sizes);
    assert!(
        seen.iter().all(|(_, peer)| peer.ip().to_string() == HOST6),
        "{seen:?}"
    );
    let status = agent.status();
    assert_eq!(
        status.drops("FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND"),
        0,
        "{status:#?}"
    );
    // An orphan later fragment, then a datagram's fragments last-first: each later fragment
    // that comes before its first is dropped and counted, as over IPv4.
    let script = format!(
        "from scapy.all import IPv6, IPv6ExtHdrFragment, UDP, Raw, fragment6, send\n\
         send(IPv6(dst='{HOST6}')/IPv6ExtHdrFragment(id=4242, offset=100, nh=17)/Raw(b'x'*64), iface='eth0', verbose=0)\n\
         parts = fragment6(IPv6(dst='{HOST6}')/IPv6ExtHdrFragment(id=4343)/UDP(sport=7000, dport=5300)/Raw(b'y'*3000), 1000)\n\
         send(list(reversed(parts)), iface='eth0', verbose=0)\n"
    );
    sandbox.exec_ok("outside", &["/usr/bin/python3", "-c", &script]);
    let status = agent.wait_for("IPv6 fragments counted", |s| {
        s.drops("FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND") >= 3
    });
    assert!(status.last_error.is_none());
}

#[test]
fn orphan_and_out_of_order_fragments_are_dropped_and_counted() {
    let _alone = one_at_a_time();
    let sandbox = Sandbox::up(SPEC);
    let agent = Agent::start(&sandbox);
    // scapy (Debian's, for /usr/bin/python3): an orphan later fragment to the published
    // port's address, then a whole datagram's fragments sent last-first.
    let script = format!(
        "from scapy.all import IP, UDP, Raw, fragment, send\n\
         send(IP(dst='{HOST}', id=4242, frag=100, proto=17)/Raw(b'x'*64), iface='eth0', verbose=0)\n\
         parts = fragment(IP(dst='{HOST}', id=4343)/UDP(sport=7000, dport=8080)/Raw(b'y'*3000), fragsize=1000)\n\
         send(list(reversed(parts)), iface='eth0', verbose=0)\n"
    );
    sandbox.exec_ok("outside", &["/usr/bin/python3", "-c", &script]);
    let status = agent.wait_for("fragments counted", |s| {
        s.drops("FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND") >= 3
    });
    assert!(status.last_error.is_none());
}

/// CPU time (user + system) of process `pid` in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn observe(agent: &Agent) -> Vec<Value> {
    let out = Command::new(dataplane_bin())
        .args(["observe", "-o", "json", "--last", "1000", "--socket"])
        .arg(&agent.socket)
        .output()
        .expect("running dataplane observe");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_drop_flood_keeps_earlier_records_and_costs_the_agent_little() {
    let _alone = one_at_a_time();
    let sandbox = Sandbox::up(SPEC);
    let log = sandbox.dir.join("flows.json");
    let agent = Agent::start_with(&sandbox, &["--flow-log", log.to_str().unwrap()]);
    // An earlier connection, whose records must survive the flood (a few tries: on a loaded
    // machine the first SYN can meet a sandbox server that is not listening yet).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = curl(&sandbox, "outside", &format!("http://{HOST}:8080/"));
        if String::from_utf8_lossy(&out.stdout).starts_with("web1 ") {
            break;
        }
        assert!(Instant::now() < deadline, "{out:?}");
        thread::sleep(Duration::from_millis(200));
    }
    let to_web = |records: &[Value]| {
        records
            .iter()
            .filter(|r| r["flow"]["verdict"] != "DROPPED")
            .filter(|r| {
                r["flow"]["l4"]["TCP"]["destination_port"] == 8080
                    || r["flow"]["l4"]["TCP"]["destination_port"] == 80
            })
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while to_web(&observe(&agent)) == 0 {
        assert!(
            Instant::now() < deadline,
            "no record of the first connection"
        );
        thread::sleep(Duration::from_millis(200));
    }
    // The outside client's address goes on the deny list; then it floods.
    sandbox.write_state(&format!(
        "{SPEC}policies:\n  - {{name: blocklist, action: deny, from: {{cidr: {OUTSIDE}/32}}}}\n"
    ));
    agent.wait_for("deny list applied", |_| {
        !String::from_utf8_lossy(&curl(&sandbox, "outside", &format!("http://{HOST}:8080/")).stdout)
            .starts_with("web1 ")
    });
    let before_cpu = cpu_seconds(agent.pid().expect("the agent runs"));
    let before_drops = agent.status().drops("POLICY_DENY");
    bounded(
        &sandbox,
        "outside",
        3,
        &["hping3", "-q", "-S", "--flood", "-p", "8080", HOST],
    );
    // Let the agent read whatever the flood left in the ring.
    thread::sleep(Duration::from_secs(2));
    let used = cpu_seconds(agent.pid().expect("the agent runs")) - before_cpu;
    let status = agent.status();
    let dropped = status.drops("POLICY_DENY") - before_drops;
    assert!(
        dropped > 10_000,
        "the flood was dropped in the kernel: {dropped}"
    );
    assert!(
        used < 1.0,
        "the agent used {used:.2} CPU-seconds for {dropped} drops"
    );
    let records = observe(&agent);
    assert!(
        to_web(&records) > 0,
        "the earlier connection's records are still there"
    );
    let drop_records: Vec<&Value> = records
        .iter()
        .filter(|r| r["flow"]["verdict"] == "DROPPED")
        .collect();
    assert!(
        !drop_records.is_empty() && drop_records.len() < 100,
        "{} drop records for {dropped} drops",
        drop_records.len()
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    let logged: Vec<Value> = logged
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        to_web(&logged) > 0,
        "the flow log still has the earlier connection"
    );
    eprintln!(
        "drop flood: {dropped} drops, {} records, agent {used:.2} CPU-s",
        drop_records.len()
    );
}
