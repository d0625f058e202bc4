//! Packet tests of the entry programs: a crafted packet in, verdict and packet out, through
//! BPF_PROG_TEST_RUN on programs that are loaded but not attached. Table-driven, like Katran's
//! tester: {description, input, expected verdict, expected output}.

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::programs::{TestRun, TestRunOptions};
use dataplane_common::{DropReason, hook};

use super::packet::{Ipv4Spec, TCP_SYN, assert_checksums, ipv4_frame, tcp, udp};
use crate::kernel::{Datapath, Hook, LoadOptions, maps::Endpoints};

pub(super) const TC_PASS: u32 = -1i32 as u32; // TC_ACT_UNSPEC: on to the next program / the stack
pub(super) const TC_SHOT: u32 = 2;
const XDP_PASS: u32 = 2;
/// BPF_PROG_TEST_RUN runs skb programs as if on the namespace's loopback device.
const TEST_RUN_IFINDEX: u32 = 1;

/// A loaded datapath with its own pin directory, removed on drop so tests can run in
/// parallel and leave nothing behind.
pub(super) struct TestDatapath {
    datapath: Option<Datapath>,
    pin_dir: PathBuf,
}

/// `let mut t = loaded_or_skip!();` (or `loaded_or_skip!(&options)`): a [`TestDatapath`], or
/// the test returns at once (passing) when not root, after [`TestDatapath::load_with`] said so.
macro_rules! loaded_or_skip {
    () => {
        loaded_or_skip!(&$crate::kernel::LoadOptions::default())
    };
    ($options:expr) => {
        match $crate::kernel::tests::programs::TestDatapath::load_with($options) {
            Some(loaded) => loaded,
            None => return,
        }
    };
}
pub(super) use loaded_or_skip;

impl TestDatapath {
    /// The programs loaded with their own pins; None when not root (loading BPF programs needs
    /// it), after a line on the terminal saying how to run the packet tests.
    pub(super) fn load_with(options: &LoadOptions) -> Option<TestDatapath> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            say_skipped_once();
            return None;
        }
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/dp-unit-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let (datapath, _conntrack) = Datapath::load(&pin_dir, options).unwrap_or_else(|e| {
            let _ = std::fs::remove_dir_all(&pin_dir);
            panic!("loading the kernel programs (root needed): {e}")
        });
        Some(TestDatapath {
            datapath: Some(datapath),
            pin_dir,
        })
    }

    pub(super) fn get(&mut self) -> &mut Datapath {
        self.datapath.as_mut().expect("loaded")
    }

    /// Removes `key` from both IPv6 conntrack tables, as the table of handshakes (an LRU map)
    /// evicts one entry of a pair under a flood, or the collector one it found expired.
    pub(super) fn forget6(&self, key: &dataplane_common::CtKey6) {
        use crate::kernel::maps::{Conntrack6, Conntrack6New, KernelFilled};
        KernelFilled::<Conntrack6>::open(&self.pin_dir, aya::maps::Map::HashMap)
            .unwrap()
            .remove_all([key]);
        KernelFilled::<Conntrack6New>::open(&self.pin_dir, aya::maps::Map::LruHashMap)
            .unwrap()
            .remove_all([key]);
    }
}

/// Straight to stderr, not through `eprintln!`, which the test harness captures from passing
/// tests: the user must see that these tests did not run.
fn say_skipped_once() {
    use std::io::Write as _;
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        let _ = writeln!(
            std::io::stderr(),
            "skipped: the packet tests (BPF_PROG_TEST_RUN) need root; run `sudo cargo xtask \
             test`, which also runs the whole-host tests (tests/)"
        );
    });
}

impl Drop for TestDatapath {
    fn drop(&mut self) {
        self.datapath.take();
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// Runs the tc program of `hook` on `input`; returns (verdict, output packet).
pub(super) fn run_tc(dp: &mut Datapath, hook: Hook, input: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; input.len() + 256];
    let result = dp
        .classifier(hook)
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

struct Case {
    description: &'static str,
    input: Vec<u8>,
    verdict: u32,
    /// None: the packet must come out unchanged.
    output: Option<Vec<u8>>,
}

fn malformed_cases() -> Vec<Case> {
    let good_tcp = ipv4_frame(
        &Ipv4Spec::new([172, 30, 1, 2], [192, 0, 2, 2], 6),
        &tcp(40000, 80, TCP_SYN, b""),
    );
    let mut ihl_too_small = good_tcp.clone();
    ihl_too_small[14] = 0x44;
    let mut wrong_version = good_tcp.clone();
    wrong_version[14] = 0x65;
    let mut total_len_beyond_frame = good_tcp.clone();
    total_len_beyond_frame[16..18].copy_from_slice(&1500u16.to_be_bytes());
    // (A frame cut inside the 20-byte header is refused by BPF_PROG_TEST_RUN itself, so the
    // header-longer-than-packet case is made with IHL instead.)
    let mut header_beyond_total_len = good_tcp.clone();
    header_beyond_total_len[14] = 0x4f;
    let mut with_options = Ipv4Spec::new([172, 30, 1, 2], [192, 0, 2, 2], 17);
    with_options.options = vec![0x01, 0x01, 0x01, 0x00];
    let arp = {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[2, 0, 0, 0, 0, 2, 0x08, 0x06]);
        f.extend_from_slice(&[0; 28]);
        f
    };
    vec![
        Case {
            description: "TCP SYN passes unchanged",
            input: good_tcp,
            verdict: TC_PASS,
            output: None,
        },
        Case {
            description: "UDP with IPv4 options passes unchanged",
            input: ipv4_frame(&with_options, &udp(5353, 53, b"q")),
            verdict: TC_PASS,
            output: None,
        },
        Case {
            description: "ARP is not ours to judge",
            input: arp,
            verdict: TC_PASS,
            output: None,
        },
        Case {
            description: "IHL below 5 is dropped",
            input: ihl_too_small,
            verdict: TC_SHOT,
            output: None,
        },
        Case {
            description: "IP version 6 in an IPv4 frame is dropped",
            input: wrong_version,
            verdict: TC_SHOT,
            output: None,
        },
        Case {
            description: "total length beyond the frame is dropped",
            input: total_len_beyond_frame,
            verdict: TC_SHOT,
            output: None,
        },
        Case {
            description: "header length beyond total length is dropped",
            input: header_beyond_total_len,
            verdict: TC_SHOT,
            output: None,
        },
    ]
}

#[test]
fn container_ingress_verdicts() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    let cases = malformed_cases();
    for case in &cases {
        let (verdict, output) = run_tc(dp, Hook::ContainerIngress, &case.input);
        assert_eq!(verdict, case.verdict, "{}: verdict", case.description);
        let expected = case.output.as_ref().unwrap_or(&case.input);
        assert_eq!(&output, expected, "{}: output packet", case.description);
        if verdict == TC_PASS && output.len() > 34 && output[12..14] == [0x08, 0x00] {
            assert_checksums(&output);
        }
    }
    // Every run was counted on the test device, and every drop under its reason.
    let stats = dp.iface_stats().unwrap();
    let (_, seen) = stats
        .iter()
        .find(|(k, _)| k.ifindex == TEST_RUN_IFINDEX && k.hook == hook::CONTAINER_INGRESS)
        .expect("counters for the test device");
    assert_eq!(seen.packets, cases.len() as u64);
    assert_eq!(
        seen.bytes,
        cases.iter().map(|c| c.input.len() as u64).sum::<u64>()
    );
    let drops = dp.drops().unwrap();
    let malformed = drops
        .iter()
        .find(|(r, _)| *r == DropReason::Malformed)
        .unwrap()
        .1;
    assert_eq!(
        malformed,
        cases.iter().filter(|c| c.verdict == TC_SHOT).count() as u64
    );
}

#[test]
fn uplink_programs_pass_and_count() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    let frame = ipv4_frame(
        &Ipv4Spec::new([192, 0, 2, 2], [192, 0, 2, 1], 17),
        &udp(1000, 2000, b"x"),
    );
    for hook in [Hook::UplinkIngress, Hook::UplinkEgress] {
        let (verdict, output) = run_tc(dp, hook, &frame);
        assert_eq!(verdict, TC_PASS, "{hook:?}");
        assert_eq!(output, frame, "{hook:?}");
    }
    let mut out = vec![0u8; frame.len() + 256];
    let result = dp
        .xdp()
        .test_run(TestRunOptions {
            data_in: Some(&frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN on XDP");
    assert_eq!(result.return_value, XDP_PASS);
    assert_eq!(&out[..result.data_size_out as usize], &frame[..]);
    let stats = dp.iface_stats().unwrap();
    for h in [hook::UPLINK_INGRESS, hook::UPLINK_EGRESS, hook::UPLINK_XDP] {
        assert!(
            stats.iter().any(|(k, v)| k.hook == h && v.packets == 1),
            "hook {} counted one packet: {stats:?}",
            hook::name(h)
        );
    }
}

#[test]
fn maps_are_pinned_and_adopted_by_the_next_load() {
    let mut t = loaded_or_skip!();
    let ip = u32::from_be_bytes([172, 30, 1, 9]).to_be();
    let info = dataplane_common::EndpointInfo {
        ifindex: 7,
        network_id: 1,
        mac: [2, 0, 0, 0, 0, 9],
        endpoint_id: 1,
        ..Default::default()
    };
    t.get()
        .set::<crate::kernel::maps::Endpoints>(ip, info)
        .unwrap();
    for name in [
        dataplane_common::map_names::ENDPOINTS,
        dataplane_common::map_names::IFACE_STATS,
        dataplane_common::map_names::DROPS,
        dataplane_common::map_names::CONNTRACK,
        dataplane_common::map_names::PORTS,
        dataplane_common::map_names::LOCAL_ADDRS,
        dataplane_common::map_names::CONFIG,
    ] {
        assert!(t.pin_dir.join(name).exists(), "{name} is pinned");
    }
    // A second agent (a restart) sees the entry the first one wrote.
    let (again, _) = Datapath::load(&t.pin_dir, &LoadOptions::default()).unwrap();
    let endpoints = again.entries::<Endpoints>().unwrap();
    assert_eq!(endpoints.get(&ip), Some(&info));
}
