//! The kernel side as the agent sees it: the embedded object, loading it with its maps pinned,
//! attaching and detaching programs, and reading and writing the maps. This is the only module
//! that talks to the kernel's BPF interfaces.

use std::{
    collections::BTreeMap,
    ffi::CString,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader, Pod,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, PerCpuHashMap, lpm_trie},
    programs::{
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};
use dataplane_common::{
    Address, Config, DropReason, IfaceStats, IfaceStatsKey, In6Addr, MAGLEV_DEFAULT_SIZE,
    MAGLEV_MAX_SIZE, MAGLEV_MIN_SIZE, PROGS6_DROP_SLOT, PROGS6_NAT64_SLOT, PolicyKey, PolicyMeta,
    PolicyPrefixOf, PolicyVerdict, PrefixKey, PrefixKey6, PrefixKeyOf, capacity, hook, is_prime,
    maglev_elements, maglev_stride, map_names, program_names, tcp_flag_count,
};
use serde::Serialize;

mod batch;
pub mod conntrack;
pub mod maps;
pub mod netdev;
pub mod pin_lock;
pub mod sockets;

use maps::{
    Backends, Backends6, Conntrack, ConntrackNew, Endpoints, Endpoints6, HashMapSpec, LocalAddrs,
    LocalAddrs6, Policy, Ports, Ports6, Reconciled, Services, Services6, SockLbs, SockNetnsMap,
    SockRevNats,
};
#[cfg(test)]
mod tests;

/// Where the maps and links are pinned unless `--pin-dir` says otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/dataplane";

/// The kernel programs, built by build.rs (aya-build) and embedded here.
static KERNEL_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dataplane-ebpf"));

/// bpffs magic number (statfs f_type), from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("cannot prepare the pin directory {path}: {message}")]
    PinDir { path: PathBuf, message: String },
    #[error(
        "loading the kernel programs failed: {0}. Run as root on Linux >= 6.6; if maps pinned by \
         an older version are in the way, remove the pin directory"
    )]
    Load(#[source] aya::EbpfError),
    #[error("program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("attaching {program} to {interface}: {source}")]
    Attach {
        program: &'static str,
        interface: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("map {0} is missing from the kernel object")]
    MissingMap(&'static str),
    #[error("pinning the link of {program} on {interface} at {path}: {message}")]
    PinLink {
        program: &'static str,
        interface: String,
        path: PathBuf,
        message: String,
    },
    #[error("load settings: {0}")]
    Settings(String),
    #[error(
        "the map pinned at {path} has another layout (key {key_size} / value {value_size} bytes, \
         expected {expected_key} / {expected_value}): it was left by an incompatible version. \
         Remove it (its connections reset) and start again"
    )]
    PinnedLayout {
        path: PathBuf,
        key_size: u32,
        value_size: u32,
        expected_key: u32,
        expected_value: u32,
    },
}

/// Where a program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Hook {
    /// tc ingress of a container's host-side veth.
    ContainerIngress,
    UplinkIngress,
    UplinkEgress,
    UplinkXdp,
    /// cgroup connect4 on the cgroup of the host's processes (target: the cgroup's path).
    SockConnect4,
    /// cgroup sendmsg4, recvmsg4 and getpeername4 on the same cgroup.
    SockSendmsg4,
    SockRecvmsg4,
    SockGetpeername4,
    /// connect6, sendmsg6, recvmsg6 and getpeername6 on the same cgroup: AF_INET6 sockets.
    SockConnect6,
    SockSendmsg6,
    SockRecvmsg6,
    SockGetpeername6,
}

impl Hook {
    pub fn program(self) -> &'static str {
        match self {
            Hook::ContainerIngress => program_names::CONTAINER_INGRESS,
            Hook::UplinkIngress => program_names::UPLINK_INGRESS,
            Hook::UplinkEgress => program_names::UPLINK_EGRESS,
            Hook::UplinkXdp => program_names::UPLINK_XDP,
            Hook::SockConnect4 => program_names::SOCK_CONNECT4,
            Hook::SockSendmsg4 => program_names::SOCK_SENDMSG4,
            Hook::SockRecvmsg4 => program_names::SOCK_RECVMSG4,
            Hook::SockGetpeername4 => program_names::SOCK_GETPEERNAME4,
            Hook::SockConnect6 => program_names::SOCK_CONNECT6,
            Hook::SockSendmsg6 => program_names::SOCK_SENDMSG6,
            Hook::SockRecvmsg6 => program_names::SOCK_RECVMSG6,
            Hook::SockGetpeername6 => program_names::SOCK_GETPEERNAME6,
        }
    }

    /// The number the kernel's counters use for this hook.
    pub fn number(self) -> u32 {
        match self {
            Hook::ContainerIngress => hook::CONTAINER_INGRESS,
            Hook::UplinkIngress => hook::UPLINK_INGRESS,
            Hook::UplinkEgress => hook::UPLINK_EGRESS,
            Hook::UplinkXdp => hook::UPLINK_XDP,
            Hook::SockConnect4 => hook::SOCK_CONNECT4,
            Hook::SockSendmsg4 => hook::SOCK_SENDMSG4,
            Hook::SockRecvmsg4 => hook::SOCK_RECVMSG4,
            Hook::SockGetpeername4 => hook::SOCK_GETPEERNAME4,
            Hook::SockConnect6 => hook::SOCK_CONNECT6,
            Hook::SockSendmsg6 => hook::SOCK_SENDMSG6,
            Hook::SockRecvmsg6 => hook::SOCK_RECVMSG6,
            Hook::SockGetpeername6 => hook::SOCK_GETPEERNAME6,
        }
    }

    /// The socket-level hooks, attached together to one cgroup: connect4/6 and sendmsg4/6
    /// translate, recvmsg4/6 and getpeername4/6 translate back.
    pub const CGROUP: [Hook; 8] = [
        Hook::SockConnect4,
        Hook::SockSendmsg4,
        Hook::SockRecvmsg4,
        Hook::SockGetpeername4,
        Hook::SockConnect6,
        Hook::SockSendmsg6,
        Hook::SockRecvmsg6,
        Hook::SockGetpeername6,
    ];

    /// Whether the hook attaches to a cgroup rather than to an interface.
    pub fn is_cgroup(self) -> bool {
        Hook::CGROUP.contains(&self)
    }
}

/// An attached program: the kernel link, pinned so that it outlives the agent (a crash or
/// SIGKILL leaves the datapath running; the next agent adopts the link and swaps in its
/// program atomically).
struct Attachment {
    ifindex: u32,
    link: FdLink,
    pin: PathBuf,
}

/// The loaded kernel programs and their maps.
pub struct Datapath {
    // Field order matters for drop: the mapping goes before the maps.
    maglev: MaglevTables,
    ebpf: Ebpf,
    pin_dir: PathBuf,
    links: BTreeMap<(String, Hook), Attachment>,
    /// Services the maps hold (from the pinned maps when adopted).
    max_services: u32,
    /// The kernel's TCP flag counters when this agent loaded its programs, IPv4's and IPv6's
    /// (the maps are pinned and count across agents): [`Datapath::tcp_flags`] counts from here.
    tcp_flags_at_load: [TcpFlagTotals; 2],
}

/// Packets counted per TCP flag kind (indexed by `tcp_flag_count::SYN` ...), summed over CPUs
/// and counting points.
pub type TcpFlagTotals = [u64; tcp_flag_count::KINDS as usize];

/// Load-time choices.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Capacity of the conntrack map (applies when the map is created, not to a pinned one).
    pub ct_max_entries: u32,
    /// How many services the maps hold (sizes the Maglev tables; as above, at creation).
    pub max_services: u32,
    /// Whether the programs send flow events.
    pub flow_events: bool,
    /// Capacity of the published-ports map (one entry per port number and protocol; as above,
    /// at creation).
    pub max_ports: u32,
    /// Slots of each service's Maglev table, a prime (sizes the Maglev map; as above).
    pub maglev_size: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            ct_max_entries: capacity::CONNTRACK,
            max_services: capacity::SERVICES,
            flow_events: true,
            max_ports: capacity::PORTS,
            maglev_size: MAGLEV_DEFAULT_SIZE,
        }
    }
}

/// The Maglev tables, mapped into the agent's memory (the map is BPF_F_MMAPABLE): a table is
/// written as one copy instead of one syscall per slot.
struct MaglevTables {
    base: *mut u32,
    /// Slots of one table (`--maglev-size`).
    size: u32,
    /// Slots (u32) in the map: two per element.
    slots: usize,
    bytes: usize,
}

// SAFETY: the mapping is owned by this value and only touched through &self/&mut self.
unsafe impl Send for MaglevTables {}

impl MaglevTables {
    fn map(ebpf: &Ebpf, size: u32) -> Result<MaglevTables, DatapathError> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let name = map_names::MAGLEV;
        let data = match ebpf.map(name).ok_or(DatapathError::MissingMap(name))? {
            aya::maps::Map::Array(data) => data,
            _ => return Err(DatapathError::MissingMap(name)),
        };
        let info = data
            .info()
            .map_err(|source| DatapathError::Map { map: name, source })?;
        let slots = info.max_entries() as usize * 2;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let bytes = (slots * 4).div_ceil(page) * page;
        let fd = data.fd().as_fd().as_raw_fd();
        // SAFETY: mapping a BPF array fd as the kernel allows for BPF_F_MMAPABLE maps; the
        // length is the map's size rounded up to whole pages.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(DatapathError::Settings(format!(
                "mapping {name} into memory: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(MaglevTables {
            base: base.cast(),
            size,
            slots,
            bytes,
        })
    }

    fn range(&self, id: u32) -> Option<std::ops::Range<usize>> {
        let size = self.size as usize;
        let start = id as usize * maglev_stride(self.size) as usize;
        (start + size <= self.slots).then(|| start..start + size)
    }

    fn get(&self, id: u32) -> &[u32] {
        let Some(range) = self.range(id) else {
            return &[];
        };
        // SAFETY: the range lies inside the mapping, which lives as long as self.
        unsafe { std::slice::from_raw_parts(self.base.add(range.start), range.len()) }
    }

    fn set(&mut self, id: u32, table: &[u32]) -> Result<(), DatapathError> {
        let range = self
            .range(id)
            .filter(|r| r.len() == table.len())
            .ok_or_else(|| {
                DatapathError::Settings(format!("Maglev table {id} is outside the map"))
            })?;
        // SAFETY: as in get(); the kernel reads slots one u32 at a time, so a reader sees old
        // or new backend indexes, both valid while the table changes.
        unsafe {
            std::ptr::copy_nonoverlapping(table.as_ptr(), self.base.add(range.start), table.len())
        };
        Ok(())
    }
}

impl Drop for MaglevTables {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what map() mapped.
        unsafe { libc::munmap(self.base.cast(), self.bytes) };
    }
}

/// Refuses a Maglev table size that is not a prime within bounds (Maglev's permutations need
/// a prime), or that would not fit the map with `max_services` tables.
pub fn check_maglev_size(size: u32, max_services: u32) -> Result<(), String> {
    if !(MAGLEV_MIN_SIZE..=MAGLEV_MAX_SIZE).contains(&size) || !is_prime(size) {
        return Err(format!(
            "--maglev-size {size}: must be a prime from {MAGLEV_MIN_SIZE} to {MAGLEV_MAX_SIZE} \
             (e.g. 1021, 4093, 16381, 65521)"
        ));
    }
    // Slot numbers are u32 in the programs, and the map has at most u32::MAX elements.
    let slots = (u64::from(max_services) + 1) * u64::from(maglev_stride(size));
    if slots > u64::from(u32::MAX) {
        return Err(format!(
            "--max-services {max_services} with --maglev-size {size} is {slots} Maglev slots, \
             more than the programs can index (2^32); lower either"
        ));
    }
    Ok(())
}

/// The capacity (max entries) of a loaded map.
fn map_capacity(ebpf: &Ebpf, name: &'static str) -> Result<u32, DatapathError> {
    use aya::maps::Map;
    let data = match ebpf.map(name).ok_or(DatapathError::MissingMap(name))? {
        Map::HashMap(d) | Map::LruHashMap(d) | Map::Array(d) => d,
        _ => return Err(DatapathError::MissingMap(name)),
    };
    Ok(data
        .info()
        .map_err(|source| DatapathError::Map { map: name, source })?
        .max_entries())
}

/// One map's fill level, for `status` and metrics.
#[derive(Debug, Clone, Serialize)]
pub struct MapFill {
    pub name: &'static str,
    pub entries: u32,
    pub capacity: u32,
}

/// Makes sure `pin_dir` is on a bpffs, mounting one on /sys/fs/bpf if none is there.
pub fn prepare_pin_dir(pin_dir: &Path) -> Result<(), DatapathError> {
    let err = |message: String| DatapathError::PinDir {
        path: pin_dir.to_owned(),
        message,
    };
    let bpffs_root = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(bpffs_root) && !is_bpffs(bpffs_root) {
        std::fs::create_dir_all(bpffs_root).map_err(|e| err(e.to_string()))?;
        let status = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(bpffs_root)
            .status()
            .map_err(|e| err(format!("running mount: {e}")))?;
        if !status.success() {
            return Err(err(format!(
                "mount -t bpf bpf {} failed",
                bpffs_root.display()
            )));
        }
        log::info!("mounted bpffs on {}", bpffs_root.display());
    }
    std::fs::create_dir_all(pin_dir).map_err(|e| err(e.to_string()))?;
    if !is_bpffs(pin_dir) {
        return Err(err(
            "is not on a bpf filesystem (mount -t bpf bpf DIR)".into()
        ));
    }
    Ok(())
}

/// Refuses maps pinned by a version whose key or value layout differs from this one's: the
/// programs would read them wrongly (a layout change gets a new map name; this catches what
/// slipped through).
fn check_layouts(ebpf: &Ebpf, pin_dir: &Path) -> Result<(), DatapathError> {
    use std::mem::size_of;

    use aya::maps::Map;
    use dataplane_common::SockRevNatKey;
    use dataplane_common::{Backend, BackendKey, ServiceInfo, ServiceKey};
    use dataplane_common::{
        Backend6, CtEntry6, CtKey6, DropAggKey6, DropAggValue6, EndpointInfo6, FragKey6, In6Addr,
        PortKey6, PortTarget6, ServiceKey6, SockLb6, SockLbKey6, SockRevNat6, SockRevNatKey6,
    };
    use dataplane_common::{CtEntry, CtKey, EndpointInfo, PortKey, PortTarget};
    use dataplane_common::{FragEntry, FragKey, SockLb, SockLbKey, SockNetns, SockRevNat};
    let expected: [(&'static str, usize, usize); 30] = [
        (
            map_names::SOCK_NETNS,
            size_of::<u64>(),
            size_of::<SockNetns>(),
        ),
        (
            map_names::SOCK_LB,
            size_of::<SockLbKey>(),
            size_of::<SockLb>(),
        ),
        (
            map_names::SOCK_REV_NAT,
            size_of::<SockRevNatKey>(),
            size_of::<SockRevNat>(),
        ),
        (
            map_names::POLICY,
            size_of::<PolicyKey>(),
            size_of::<PolicyVerdict>(),
        ),
        (
            map_names::POLICY_META,
            size_of::<u32>(),
            size_of::<PolicyMeta>(),
        ),
        (
            map_names::SERVICES,
            size_of::<ServiceKey>(),
            size_of::<ServiceInfo>(),
        ),
        (
            map_names::BACKENDS,
            size_of::<BackendKey>(),
            size_of::<Backend>(),
        ),
        (map_names::MAGLEV, size_of::<u32>(), size_of::<[u32; 2]>()),
        (
            map_names::CONNTRACK,
            size_of::<CtKey>(),
            size_of::<CtEntry>(),
        ),
        (
            map_names::CONNTRACK_NEW,
            size_of::<CtKey>(),
            size_of::<CtEntry>(),
        ),
        (
            map_names::FRAGMENTS,
            size_of::<FragKey>(),
            size_of::<FragEntry>(),
        ),
        (
            map_names::PORTS,
            size_of::<PortKey>(),
            size_of::<PortTarget>(),
        ),
        (
            map_names::ENDPOINTS,
            size_of::<u32>(),
            size_of::<EndpointInfo>(),
        ),
        (map_names::LOCAL_ADDRS, size_of::<u32>(), size_of::<u8>()),
        (map_names::CONFIG, size_of::<u32>(), size_of::<Config>()),
        (
            map_names::IFACE_STATS,
            size_of::<IfaceStatsKey>(),
            size_of::<IfaceStats>(),
        ),
        (map_names::DROPS, size_of::<u32>(), size_of::<u64>()),
        (map_names::TCP_FLAGS, size_of::<u32>(), size_of::<u64>()),
        (map_names::TCP_FLAGS6, size_of::<u32>(), size_of::<u64>()),
        (
            map_names::CONNTRACK6,
            size_of::<CtKey6>(),
            size_of::<CtEntry6>(),
        ),
        (
            map_names::CONNTRACK6_NEW,
            size_of::<CtKey6>(),
            size_of::<CtEntry6>(),
        ),
        (
            map_names::FRAGMENTS6,
            size_of::<FragKey6>(),
            size_of::<FragEntry>(),
        ),
        (
            map_names::DROP_AGGREGATES6,
            size_of::<DropAggKey6>(),
            size_of::<DropAggValue6>(),
        ),
        (
            map_names::ENDPOINTS6,
            size_of::<In6Addr>(),
            size_of::<EndpointInfo6>(),
        ),
        (
            map_names::PORTS6,
            size_of::<PortKey6>(),
            size_of::<PortTarget6>(),
        ),
        (
            map_names::LOCAL_ADDRS6,
            size_of::<In6Addr>(),
            size_of::<u8>(),
        ),
        (
            map_names::SERVICES6,
            size_of::<ServiceKey6>(),
            size_of::<ServiceInfo>(),
        ),
        (
            map_names::BACKENDS6,
            size_of::<BackendKey>(),
            size_of::<Backend6>(),
        ),
        (
            map_names::SOCK_REV_NAT6,
            size_of::<SockRevNatKey6>(),
            size_of::<SockRevNat6>(),
        ),
        (
            map_names::SOCK_LB6,
            size_of::<SockLbKey6>(),
            size_of::<SockLb6>(),
        ),
    ];
    for (name, key, value) in expected {
        let data = match ebpf.map(name).ok_or(DatapathError::MissingMap(name))? {
            Map::HashMap(d)
            | Map::LruHashMap(d)
            | Map::PerCpuHashMap(d)
            | Map::Array(d)
            | Map::PerCpuArray(d) => d,
            _ => return Err(DatapathError::MissingMap(name)),
        };
        let info = data
            .info()
            .map_err(|source| DatapathError::Map { map: name, source })?;
        if (info.key_size(), info.value_size()) != (key as u32, value as u32) {
            return Err(DatapathError::PinnedLayout {
                path: pin_dir.join(name),
                key_size: info.key_size(),
                value_size: info.value_size(),
                expected_key: key as u32,
                expected_value: value as u32,
            });
        }
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs is plain data, for which all-zero bytes are a valid value.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is NUL-terminated and stat is a valid out-pointer.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
    rc == 0 && stat.f_type == BPF_FS_MAGIC
}

impl Datapath {
    /// Loads the kernel programs, reusing maps already pinned in `pin_dir` (so connections and
    /// counters survive an agent restart) and pinning new ones there. Returns the datapath and
    /// the one writable handle on each map the programs fill, for the collector.
    pub fn load(
        pin_dir: &Path,
        options: &LoadOptions,
    ) -> Result<(Datapath, conntrack::KernelFilledMaps), DatapathError> {
        prepare_pin_dir(pin_dir)?;
        if options.ct_max_entries == 0 {
            return Err(DatapathError::Settings(
                "conntrack capacity must be above 0".into(),
            ));
        }
        check_maglev_size(options.maglev_size, options.max_services)
            .map_err(DatapathError::Settings)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .map_max_entries(map_names::CONNTRACK, options.ct_max_entries)
            .map_max_entries(
                map_names::CONNTRACK_NEW,
                capacity::conntrack_new(options.ct_max_entries),
            )
            .map_max_entries(map_names::SERVICES, options.max_services)
            // IPv6's maps take the sizes of their IPv4 namesakes.
            .map_max_entries(map_names::CONNTRACK6, options.ct_max_entries)
            .map_max_entries(
                map_names::CONNTRACK6_NEW,
                capacity::conntrack_new(options.ct_max_entries),
            )
            .map_max_entries(map_names::SERVICES6, options.max_services)
            .map_max_entries(map_names::PORTS6, options.max_ports)
            .map_max_entries(
                map_names::MAGLEV,
                // check_maglev_size made sure it fits.
                maglev_elements(options.max_services, options.maglev_size) as u32,
            )
            .map_max_entries(map_names::RR_POSITION, options.max_services + 1)
            .map_max_entries(map_names::PORTS, options.max_ports)
            .override_global(
                dataplane_common::globals::FLOW_EVENTS_ON,
                &u8::from(options.flow_events),
                true,
            )
            .override_global(
                dataplane_common::globals::MAGLEV_SIZE,
                &options.maglev_size,
                true,
            )
            .load(KERNEL_OBJECT)
            .map_err(DatapathError::Load)?;
        check_layouts(&ebpf, pin_dir)?;
        let maglev = MaglevTables::map(&ebpf, options.maglev_size)?;
        // Pinned maps keep the size they were made with: trust them over the options. The
        // Maglev map must then be the one of this table size, else the programs (which take
        // the size from this load) would index it wrongly.
        let max_services = map_capacity(&ebpf, map_names::SERVICES)?;
        let stride = maglev_stride(options.maglev_size) as usize;
        if maglev.slots / stride != max_services as usize + 1 {
            return Err(DatapathError::Settings(format!(
                "the Maglev map pinned at {} holds {} slots, which is not {} services' tables \
                 of {} slots: it was made with another --maglev-size (or --max-services). \
                 Start with the size it was made with, or remove that pin (and the services \
                 map's) to make it anew",
                pin_dir.join(map_names::MAGLEV).display(),
                maglev.slots,
                max_services + 1,
                options.maglev_size
            )));
        }
        for hook in [
            Hook::ContainerIngress,
            Hook::UplinkIngress,
            Hook::UplinkEgress,
        ] {
            let program: &mut SchedClassifier = program_mut(&mut ebpf, hook.program())?;
            program.load().map_err(|source| DatapathError::Program {
                program: hook.program(),
                source,
            })?;
            log_verified(hook.program(), program.info());
        }
        load_ipv6_programs(&mut ebpf)?;
        let xdp: &mut Xdp = program_mut(&mut ebpf, Hook::UplinkXdp.program())?;
        xdp.load().map_err(|source| DatapathError::Program {
            program: Hook::UplinkXdp.program(),
            source,
        })?;
        for hook in Hook::CGROUP {
            let program: &mut CgroupSockAddr = program_mut(&mut ebpf, hook.program())?;
            program.load().map_err(|source| DatapathError::Program {
                program: hook.program(),
                source,
            })?;
        }
        let conntrack = conntrack::KernelFilledMaps::open(pin_dir)?;
        let mut datapath = Datapath {
            maglev,
            ebpf,
            pin_dir: pin_dir.to_owned(),
            links: BTreeMap::new(),
            max_services,
            tcp_flags_at_load: [[0; tcp_flag_count::KINDS as usize]; 2],
        };
        datapath.tcp_flags_at_load = [
            datapath.tcp_flag_totals(map_names::TCP_FLAGS)?,
            datapath.tcp_flag_totals(map_names::TCP_FLAGS6)?,
        ];
        Ok((datapath, conntrack))
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    fn link_pin(&self, target: &str, hook: Hook) -> PathBuf {
        // A cgroup target is a path: flatten it into one file name.
        let target = target.trim_start_matches('/').replace('/', "_");
        self.pin_dir
            .join("links")
            .join(format!("{target}@{}", hook.program()))
    }

    /// Attaches the program of the socket hook `hook` to the cgroup at `cgroup`. A link
    /// pinned by an earlier agent keeps running the old program until the new one is attached
    /// beside it (cgroup links cannot be updated in place); then the old pin goes, and the old
    /// link with it.
    fn attach_cgroup(&mut self, cgroup: &str, hook: Hook) -> Result<(), DatapathError> {
        let key = (cgroup.to_owned(), hook);
        if self.links.contains_key(&key) {
            return Ok(());
        }
        let pin = self.link_pin(cgroup, hook);
        let attach_err = |source| DatapathError::Attach {
            program: hook.program(),
            interface: cgroup.to_owned(),
            source,
        };
        let file = std::fs::File::open(cgroup).map_err(|e| {
            attach_err(aya::programs::ProgramError::IOError(std::io::Error::new(
                e.kind(),
                format!("opening cgroup {cgroup}: {e}"),
            )))
        })?;
        let program: &mut CgroupSockAddr = program_mut(&mut self.ebpf, hook.program())?;
        let id = program
            // Single means no flags, which is what link_create wants; cgroup links always
            // coexist with other programs on the cgroup.
            .attach(&file, CgroupAttachMode::Single)
            .map_err(attach_err)?;
        let link = program.take_link(id).map_err(attach_err)?;
        let link = FdLink::try_from(link).map_err(|e| self.pin_err(cgroup, hook, &pin, e))?;
        if pin.exists() {
            log::info!(
                "replacing the {} link an earlier agent pinned on {cgroup}",
                hook.program()
            );
            let _ = std::fs::remove_file(&pin);
        }
        if let Some(dir) = pin.parent() {
            std::fs::create_dir_all(dir).map_err(|e| self.pin_err(cgroup, hook, &pin, e))?;
        }
        let link: FdLink = link
            .pin(&pin)
            .map_err(|e| self.pin_err(cgroup, hook, &pin, e))?
            .into();
        log::info!("attached {} to cgroup {cgroup}", hook.program());
        self.links.insert(
            key,
            Attachment {
                ifindex: 0,
                link,
                pin,
            },
        );
        Ok(())
    }

    /// Attaches the program of `hook` to `interface`: adopts a link pinned by an earlier agent
    /// (replacing its program atomically) or creates and pins a new one. Attaching what is
    /// already attached is a no-op; an attachment to an interface that has since been replaced
    /// (same name, new index) is redone.
    pub fn attach(&mut self, interface: &str, hook: Hook) -> Result<(), DatapathError> {
        if hook.is_cgroup() {
            return self.attach_cgroup(interface, hook);
        }
        let attach_err = |source| DatapathError::Attach {
            program: hook.program(),
            interface: interface.to_owned(),
            source,
        };
        let ifindex = crate::kernel::netdev::ifindex(interface).ok_or_else(|| {
            attach_err(aya::programs::ProgramError::UnknownInterface {
                name: interface.to_owned(),
            })
        })?;
        let key = (interface.to_owned(), hook);
        match self.links.get(&key) {
            Some(a) if a.ifindex == ifindex => return Ok(()),
            Some(_) => self.detach(interface, hook)?,
            None => {}
        }
        let pin = self.link_pin(interface, hook);
        if pin.exists() {
            match self.adopt(&pin, hook) {
                Ok(link) => {
                    log::info!("adopted the pinned {} link on {interface}", hook.program());
                    self.links.insert(key, Attachment { ifindex, link, pin });
                    return Ok(());
                }
                Err(e) => {
                    // E.g. the interface was recreated and the old link died with it.
                    log::info!(
                        "pinned link {} is stale ({e}); attaching anew",
                        pin.display()
                    );
                    let _ = std::fs::remove_file(&pin);
                }
            }
        }
        let link: FdLink = match hook {
            Hook::UplinkXdp => {
                let program: &mut Xdp = program_mut(&mut self.ebpf, hook.program())?;
                let id = program
                    .attach_to_if_index(ifindex, XdpMode::Default)
                    .map_err(attach_err)?;
                let link = program.take_link(id).map_err(attach_err)?;
                FdLink::try_from(link).map_err(|e| self.pin_err(interface, hook, &pin, e))?
            }
            Hook::SockConnect4
            | Hook::SockSendmsg4
            | Hook::SockRecvmsg4
            | Hook::SockGetpeername4
            | Hook::SockConnect6
            | Hook::SockSendmsg6
            | Hook::SockRecvmsg6
            | Hook::SockGetpeername6 => unreachable!("cgroup hooks attach in attach_cgroup"),
            Hook::ContainerIngress | Hook::UplinkIngress | Hook::UplinkEgress => {
                let direction = if hook == Hook::UplinkEgress {
                    TcAttachType::Egress
                } else {
                    TcAttachType::Ingress
                };
                let program: &mut SchedClassifier = program_mut(&mut self.ebpf, hook.program())?;
                let id = program.attach(interface, direction).map_err(attach_err)?;
                let link = program.take_link(id).map_err(attach_err)?;
                FdLink::try_from(link).map_err(|e| self.pin_err(interface, hook, &pin, e))?
            }
        };
        if let Some(dir) = pin.parent() {
            std::fs::create_dir_all(dir).map_err(|e| self.pin_err(interface, hook, &pin, e))?;
        }
        let link: FdLink = link
            .pin(&pin)
            .map_err(|e| self.pin_err(interface, hook, &pin, e))?
            .into();
        log::info!(
            "attached {} to {interface} (ifindex {ifindex})",
            hook.program()
        );
        self.links.insert(key, Attachment { ifindex, link, pin });
        Ok(())
    }

    fn pin_err(
        &self,
        interface: &str,
        hook: Hook,
        pin: &Path,
        e: impl std::fmt::Display,
    ) -> DatapathError {
        DatapathError::PinLink {
            program: hook.program(),
            interface: interface.to_owned(),
            path: pin.to_owned(),
            message: e.to_string(),
        }
    }

    /// Takes over a pinned link: this agent's program replaces the running one in place.
    fn adopt(&mut self, pin: &Path, hook: Hook) -> anyhow::Result<FdLink> {
        let old: FdLink = PinnedLink::from_pin(pin)?.into();
        Ok(match hook {
            Hook::UplinkXdp => {
                let program: &mut Xdp = program_mut(&mut self.ebpf, hook.program())?;
                let id = program.attach_to_link(XdpLink::try_from(old)?)?;
                FdLink::try_from(program.take_link(id)?)?
            }
            Hook::SockConnect4
            | Hook::SockSendmsg4
            | Hook::SockRecvmsg4
            | Hook::SockGetpeername4
            | Hook::SockConnect6
            | Hook::SockSendmsg6
            | Hook::SockRecvmsg6
            | Hook::SockGetpeername6 => anyhow::bail!("cgroup links are replaced, not adopted"),
            Hook::ContainerIngress | Hook::UplinkIngress | Hook::UplinkEgress => {
                let program: &mut SchedClassifier = program_mut(&mut self.ebpf, hook.program())?;
                let id = program.attach_to_link(SchedClassifierLink::try_from(old)?)?;
                FdLink::try_from(program.take_link(id)?)?
            }
        })
    }

    /// Detaches the program of `hook` from `interface`: unpins and closes its link. A
    /// vanished interface has already lost its attachment in the kernel; that is not an error.
    pub fn detach(&mut self, interface: &str, hook: Hook) -> Result<(), DatapathError> {
        let Some(attachment) = self.links.remove(&(interface.to_owned(), hook)) else {
            return Ok(());
        };
        if let Err(e) = std::fs::remove_file(&attachment.pin) {
            log::warn!("unpinning {}: {e}", attachment.pin.display());
        }
        drop(attachment.link);
        log::info!("detached {} from {interface}", hook.program());
        Ok(())
    }

    /// Forgets attachments whose interface (or cgroup) is gone or was replaced: the kernel
    /// dropped those links with the interface; what remains here is the record, its fd and its
    /// pin. Returns what it forgot.
    pub fn prune_vanished(&mut self) -> Vec<String> {
        let vanished: Vec<(String, Hook)> = self
            .links
            .iter()
            .filter(|((target, hook), attachment)| {
                if hook.is_cgroup() {
                    !Path::new(target).is_dir()
                } else {
                    crate::kernel::netdev::ifindex(target) != Some(attachment.ifindex)
                }
            })
            .map(|(key, _)| key.clone())
            .collect();
        vanished
            .into_iter()
            .map(|(target, hook)| {
                // detach() only unpins and closes here; the kernel side is already gone.
                let _ = self.detach(&target, hook);
                format!("{}@{target}", hook.program())
            })
            .collect()
    }

    /// Removes link pins of interfaces that are gone (a container stopped while no agent ran):
    /// the kernel dropped those links with the interface, the pins only keep dead links.
    /// Cgroup links are left to [`Datapath::attach`]. Returns the pins removed.
    pub fn remove_stale_link_pins(pin_dir: &Path) -> Vec<PathBuf> {
        let Ok(dir) = std::fs::read_dir(pin_dir.join("links")) else {
            return Vec::new();
        };
        let mut removed = Vec::new();
        for path in dir.filter_map(|e| e.ok().map(|e| e.path())) {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            let Some((interface, program)) = name.rsplit_once('@') else {
                continue;
            };
            let cgroup = Hook::CGROUP.iter().any(|h| h.program() == program);
            if !cgroup
                && netdev::ifindex(interface).is_none()
                && std::fs::remove_file(&path).is_ok()
            {
                removed.push(path);
            }
        }
        removed
    }

    /// Detaches everything (on shutdown). Maps stay pinned.
    pub fn detach_all(&mut self) {
        let attached: Vec<(String, Hook)> = self.links.keys().cloned().collect();
        for (interface, hook) in attached {
            // detach() cannot fail once the attachment is known.
            let _ = self.detach(&interface, hook);
        }
    }

    /// What is attached where: (interface, hook, ifindex at attach time).
    pub fn attachments(&self) -> Vec<(String, Hook, u32)> {
        self.links
            .iter()
            .map(|((interface, hook), a)| (interface.clone(), *hook, a.ifindex))
            .collect()
    }

    fn map_ref(&self, name: &'static str) -> Result<&aya::maps::Map, DatapathError> {
        self.ebpf.map(name).ok_or(DatapathError::MissingMap(name))
    }

    fn hash<K: Pod, V: Pod>(
        &self,
        name: &'static str,
    ) -> Result<HashMap<&MapData, K, V>, DatapathError> {
        HashMap::try_from(self.map_ref(name)?)
            .map_err(|source| DatapathError::Map { map: name, source })
    }

    fn hash_mut<K: Pod, V: Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<&mut MapData, K, V>, DatapathError> {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap(name))?;
        HashMap::try_from(map).map_err(|source| DatapathError::Map { map: name, source })
    }

    /// Every entry of hash map `M` (including entries pinned by an earlier agent).
    pub fn entries<M: HashMapSpec>(&self) -> Result<BTreeMap<M::Key, M::Value>, DatapathError> {
        use aya::maps::IterableMap as _;
        let map = self.hash::<M::Key, M::Value>(M::NAME)?;
        batch::entries::<M::Key, M::Value, BTreeMap<_, _>>(M::NAME, map.map(), || {
            map.iter()
                .map(|entry| {
                    entry.map_err(|source| DatapathError::Map {
                        map: M::NAME,
                        source,
                    })
                })
                .collect()
        })
    }

    /// Writes one entry of a map the reconciler owns (see [`maps`] for who writes what).
    pub fn set<M: Reconciled>(
        &mut self,
        key: M::Key,
        value: M::Value,
    ) -> Result<(), DatapathError> {
        self.hash_mut::<M::Key, M::Value>(M::NAME)?
            .insert(key, value, 0)
            .map_err(|source| DatapathError::Map {
                map: M::NAME,
                source,
            })
    }

    /// Removes `key` from a map the reconciler owns; a key already gone is not an error.
    pub fn remove<M: Reconciled>(&mut self, key: M::Key) -> Result<(), DatapathError> {
        removed(
            M::NAME,
            self.hash_mut::<M::Key, M::Value>(M::NAME)?.remove(&key),
        )
    }

    /// Number of entries in hash map `M`.
    pub fn count<M: HashMapSpec>(&self) -> Result<u32, DatapathError> {
        use aya::maps::IterableMap as _;
        let map = self.hash::<M::Key, M::Value>(M::NAME)?;
        batch::count::<M::Key, M::Value>(M::NAME, map.map(), || Ok(map.keys().count() as u32))
    }

    pub fn max_services(&self) -> u32 {
        self.max_services
    }

    /// Every prefix of the policy trie, both halves: (half, prefix length, address in
    /// network byte order) -> CIDR class.
    pub fn policy_prefixes(&self) -> Result<BTreeMap<(u32, u8, u32), u32>, DatapathError> {
        self.prefixes_of(map_names::POLICY_PREFIXES)
    }

    /// Slots of each service's Maglev table.
    pub fn maglev_size(&self) -> u32 {
        self.maglev.size
    }

    /// Sets (`Some(class)`) or removes the policy trie's prefix `addr/len` of half `slot`.
    pub fn set_policy_prefix(
        &mut self,
        prefix: (u32, u8, u32),
        class: Option<u32>,
    ) -> Result<(), DatapathError> {
        self.set_prefix_of(map_names::POLICY_PREFIXES, prefix, class)
    }

    /// Which half of the policy is live and the key shapes it has.
    pub fn policy_meta(&self) -> Result<PolicyMeta, DatapathError> {
        let name = map_names::POLICY_META;
        let err = |source| DatapathError::Map { map: name, source };
        let array: Array<&MapData, PolicyMeta> =
            Array::try_from(self.map_ref(name)?).map_err(err)?;
        array.get(&0, 0).map_err(err)
    }

    /// Switches the live half of the policy (one write: programs see the old rules or the
    /// new ones).
    pub fn set_policy_meta(&mut self, meta: PolicyMeta) -> Result<(), DatapathError> {
        let name = map_names::POLICY_META;
        let err = |source| DatapathError::Map { map: name, source };
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap(name))?;
        let mut array: Array<&mut MapData, PolicyMeta> = Array::try_from(map).map_err(err)?;
        array.set(0, meta, 0).map_err(err)
    }

    /// The prefixes on the XDP deny list.
    pub fn deny_sources(&self) -> Result<std::collections::BTreeSet<PrefixKey>, DatapathError> {
        self.deny_sources_of(map_names::DENY_SOURCES)
    }

    /// Puts `prefix` on the XDP deny list (`deny`) or takes it off.
    pub fn set_deny_source(&mut self, prefix: PrefixKey, deny: bool) -> Result<(), DatapathError> {
        self.set_deny_source_of(map_names::DENY_SOURCES, prefix, deny)
    }

    /// The IPv6 policy trie, both halves: (half, length, address) -> CIDR class (as
    /// [`Datapath::policy_prefixes`]).
    pub fn policy_prefixes6(&self) -> Result<BTreeMap<(u32, u8, In6Addr), u32>, DatapathError> {
        self.prefixes_of(map_names::POLICY_PREFIXES6)
    }

    /// Sets (`Some(class)`) or removes the IPv6 policy trie's prefix `addr/len` of half
    /// `slot`.
    pub fn set_policy_prefix6(
        &mut self,
        prefix: (u32, u8, In6Addr),
        class: Option<u32>,
    ) -> Result<(), DatapathError> {
        self.set_prefix_of(map_names::POLICY_PREFIXES6, prefix, class)
    }

    /// The prefixes on the IPv6 deny list.
    pub fn deny_sources6(&self) -> Result<std::collections::BTreeSet<PrefixKey6>, DatapathError> {
        self.deny_sources_of(map_names::DENY_SOURCES6)
    }

    /// Puts `prefix` on the IPv6 deny list (`deny`) or takes it off.
    pub fn set_deny_source6(
        &mut self,
        prefix: PrefixKey6,
        deny: bool,
    ) -> Result<(), DatapathError> {
        self.set_deny_source_of(map_names::DENY_SOURCES6, prefix, deny)
    }

    // The LPM tries of both families, one copy: `name` is the family's map, `A` its address.

    /// Every (key, value) of the LPM trie `name`.
    fn lpm_entries<K: Pod, V: Pod>(
        &self,
        name: &'static str,
    ) -> Result<Vec<(lpm_trie::Key<K>, V)>, DatapathError> {
        let err = |source| DatapathError::Map { map: name, source };
        let trie: LpmTrie<&MapData, K, V> = LpmTrie::try_from(self.map_ref(name)?).map_err(err)?;
        trie.iter().map(|entry| entry.map_err(err)).collect()
    }

    /// Inserts (`Some(value)`) or removes `key` of the LPM trie `name` (a key already gone is
    /// not an error).
    fn lpm_set<K: Pod, V: Pod>(
        &mut self,
        name: &'static str,
        key: lpm_trie::Key<K>,
        value: Option<V>,
    ) -> Result<(), DatapathError> {
        let err = |source| DatapathError::Map { map: name, source };
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap(name))?;
        let mut trie: LpmTrie<&mut MapData, K, V> = LpmTrie::try_from(map).map_err(err)?;
        match value {
            Some(value) => trie.insert(&key, value, 0).map_err(err),
            None => match trie.remove(&key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                Err(e) => Err(err(e)),
            },
        }
    }

    /// A policy trie's prefixes: the half leads the key (network byte order), so the
    /// prefix length counts its 32 bits too.
    fn prefixes_of<A: Address + Pod>(
        &self,
        name: &'static str,
    ) -> Result<BTreeMap<(u32, u8, A), u32>, DatapathError> {
        Ok(self
            .lpm_entries::<PolicyPrefixOf<A>, u32>(name)?
            .into_iter()
            .map(|(k, class)| {
                let data = k.data();
                let len = k.prefix_len().saturating_sub(32) as u8;
                ((u32::from_be(data.slot), len, data.addr), class)
            })
            .collect())
    }

    fn set_prefix_of<A: Address + Pod>(
        &mut self,
        name: &'static str,
        (slot, len, addr): (u32, u8, A),
        class: Option<u32>,
    ) -> Result<(), DatapathError> {
        let data = PolicyPrefixOf {
            slot: slot.to_be(),
            addr,
        };
        self.lpm_set(name, lpm_trie::Key::new(32 + u32::from(len), data), class)
    }

    fn deny_sources_of<A: Address + Pod>(
        &self,
        name: &'static str,
    ) -> Result<std::collections::BTreeSet<PrefixKeyOf<A>>, DatapathError> {
        Ok(self
            .lpm_entries::<A, u8>(name)?
            .into_iter()
            .map(|(k, _)| PrefixKeyOf {
                prefix_len: k.prefix_len(),
                addr: k.data(),
            })
            .collect())
    }

    fn set_deny_source_of<A: Address + Pod>(
        &mut self,
        name: &'static str,
        prefix: PrefixKeyOf<A>,
        deny: bool,
    ) -> Result<(), DatapathError> {
        let key = lpm_trie::Key::new(prefix.prefix_len, prefix.addr);
        self.lpm_set(name, key, deny.then_some(1u8))
    }

    /// The Maglev table of service `id` as the kernel sees it.
    pub fn maglev(&self, id: u32) -> Vec<u32> {
        self.maglev.get(id).to_vec()
    }

    pub fn set_maglev(&mut self, id: u32, table: &[u32]) -> Result<(), DatapathError> {
        self.maglev.set(id, table)
    }

    pub fn config(&self) -> Result<Config, DatapathError> {
        let err = |source| DatapathError::Map {
            map: map_names::CONFIG,
            source,
        };
        let array: Array<&MapData, Config> =
            Array::try_from(self.map_ref(map_names::CONFIG)?).map_err(err)?;
        array.get(&0, 0).map_err(err)
    }

    pub fn set_config(&mut self, config: Config) -> Result<(), DatapathError> {
        let err = |source| DatapathError::Map {
            map: map_names::CONFIG,
            source,
        };
        let map = self
            .ebpf
            .map_mut(map_names::CONFIG)
            .ok_or(DatapathError::MissingMap(map_names::CONFIG))?;
        let mut array: Array<&mut MapData, Config> = Array::try_from(map).map_err(err)?;
        array.set(0, config, 0).map_err(err)
    }

    /// Packets and bytes per (ifindex, hook number), summed over CPUs.
    pub fn iface_stats(&self) -> Result<Vec<(IfaceStatsKey, IfaceStats)>, DatapathError> {
        let err = |source| DatapathError::Map {
            map: map_names::IFACE_STATS,
            source,
        };
        let map = self
            .ebpf
            .map(map_names::IFACE_STATS)
            .ok_or(DatapathError::MissingMap(map_names::IFACE_STATS))?;
        let map: PerCpuHashMap<&MapData, IfaceStatsKey, IfaceStats> =
            PerCpuHashMap::try_from(map).map_err(err)?;
        let mut stats = Vec::new();
        for entry in map.iter() {
            let (key, per_cpu) = entry.map_err(err)?;
            let total = per_cpu
                .iter()
                .fold(IfaceStats::default(), |sum, v| IfaceStats {
                    packets: sum.packets + v.packets,
                    bytes: sum.bytes + v.bytes,
                });
            stats.push((key, total));
        }
        stats.sort_by_key(|(k, _)| (k.ifindex, k.hook));
        Ok(stats)
    }

    /// Drops per reason, summed over CPUs.
    pub fn drops(&self) -> Result<Vec<(DropReason, u64)>, DatapathError> {
        let err = |source| DatapathError::Map {
            map: map_names::DROPS,
            source,
        };
        let map = self
            .ebpf
            .map(map_names::DROPS)
            .ok_or(DatapathError::MissingMap(map_names::DROPS))?;
        let map: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map).map_err(err)?;
        DropReason::ALL
            .into_iter()
            .map(|reason| {
                let per_cpu = map.get(&(reason as u32), 0).map_err(err)?;
                Ok((reason, per_cpu.iter().sum()))
            })
            .collect()
    }

    /// The capacity hash map `M` was created with (a pinned map keeps its own).
    pub fn capacity<M: HashMapSpec>(&self) -> Result<u32, DatapathError> {
        match self.map_ref(M::NAME)? {
            aya::maps::Map::HashMap(data) | aya::maps::Map::LruHashMap(data) => data
                .info()
                .map(|i| i.max_entries())
                .map_err(|source| DatapathError::Map {
                    map: M::NAME,
                    source,
                }),
            _ => Err(DatapathError::MissingMap(M::NAME)),
        }
    }

    /// How full each map is.
    pub fn map_fill(&self) -> Result<Vec<MapFill>, DatapathError> {
        let ct_capacity = self.capacity::<Conntrack>()?;
        Ok(vec![
            MapFill {
                name: map_names::CONNTRACK,
                entries: self.count::<Conntrack>()?,
                capacity: ct_capacity,
            },
            MapFill {
                name: map_names::CONNTRACK_NEW,
                entries: self.count::<ConntrackNew>()?,
                capacity: self.capacity::<ConntrackNew>()?,
            },
            MapFill {
                name: map_names::CONNTRACK6,
                entries: self.count::<maps::Conntrack6>()?,
                capacity: self.capacity::<maps::Conntrack6>()?,
            },
            MapFill {
                name: map_names::CONNTRACK6_NEW,
                entries: self.count::<maps::Conntrack6New>()?,
                capacity: self.capacity::<maps::Conntrack6New>()?,
            },
            MapFill {
                name: map_names::PORTS,
                entries: self.count::<Ports>()?,
                capacity: self.capacity::<Ports>()?,
            },
            MapFill {
                name: map_names::SERVICES,
                entries: self.count::<Services>()?,
                capacity: self.max_services,
            },
            MapFill {
                name: map_names::BACKENDS,
                entries: self.count::<Backends>()?,
                capacity: capacity::BACKENDS,
            },
            MapFill {
                name: map_names::ENDPOINTS,
                entries: self.count::<Endpoints>()?,
                capacity: capacity::ENDPOINTS,
            },
            MapFill {
                name: map_names::LOCAL_ADDRS,
                entries: self.count::<LocalAddrs>()?,
                capacity: capacity::LOCAL_ADDRS,
            },
            // IPv6's reconciled maps, with their IPv4 namesakes' capacities.
            MapFill {
                name: map_names::ENDPOINTS6,
                entries: self.count::<Endpoints6>()?,
                capacity: capacity::ENDPOINTS,
            },
            MapFill {
                name: map_names::PORTS6,
                entries: self.count::<Ports6>()?,
                capacity: self.capacity::<Ports6>()?,
            },
            MapFill {
                name: map_names::SERVICES6,
                entries: self.count::<Services6>()?,
                capacity: self.max_services,
            },
            MapFill {
                name: map_names::BACKENDS6,
                entries: self.count::<Backends6>()?,
                capacity: capacity::BACKENDS,
            },
            MapFill {
                name: map_names::LOCAL_ADDRS6,
                entries: self.count::<LocalAddrs6>()?,
                capacity: capacity::LOCAL_ADDRS,
            },
            MapFill {
                // Both halves: between two applies only the live one has entries.
                name: map_names::POLICY,
                entries: self.count::<Policy>()?,
                capacity: capacity::POLICY_ENTRIES * 2,
            },
            MapFill {
                name: map_names::SOCK_REV_NAT,
                entries: self.count::<SockRevNats>()?,
                capacity: self.capacity::<SockRevNats>()?,
            },
            MapFill {
                name: map_names::SOCK_NETNS,
                entries: self.count::<SockNetnsMap>()?,
                capacity: capacity::SOCK_NETNS,
            },
            MapFill {
                name: map_names::SOCK_LB,
                entries: self.count::<SockLbs>()?,
                capacity: self.capacity::<SockLbs>()?,
            },
            MapFill {
                name: map_names::IFACE_STATS,
                entries: self.iface_stats()?.len() as u32,
                capacity: capacity::IFACE_STATS,
            },
        ])
    }
}

/// The result of removing a key, where a key already gone counts as removed.
fn removed(
    map: &'static str,
    result: Result<(), aya::maps::MapError>,
) -> Result<(), DatapathError> {
    match result {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(())
        }
        Err(source) => Err(DatapathError::Map { map, source }),
    }
}

/// How many instructions the verifier walked for a program just loaded (its limit is 1M per
/// program: the container hook's IPv4 program is the closest to it), at debug level.
fn log_verified(name: &str, info: Result<aya::programs::ProgramInfo, aya::programs::ProgramError>) {
    if let Some(count) = info.ok().and_then(|i| i.verified_instruction_count()) {
        log::debug!("{name}: {count} instructions verified");
    }
}

/// Loads the IPv6 halves of the tc programs and puts each at its hook's number in the program
/// array the IPv4 programs tail-call for IPv6 frames (and their drop reporter at slot 0, the
/// IPv6 balancing program at slot 5, NAT64 at 4, the judgement of open connections after a
/// policy change at 6) (pinned: across a restart, the programs
/// still attached keep finding IPv6 programs there until this load's replace them).
fn load_ipv6_programs(ebpf: &mut Ebpf) -> Result<(), DatapathError> {
    use aya::maps::ProgramArray;
    let mut fds = Vec::new();
    for (number, name) in [
        (hook::CONTAINER_INGRESS, program_names::CONTAINER_INGRESS6),
        (hook::UPLINK_INGRESS, program_names::UPLINK_INGRESS6),
        (hook::UPLINK_EGRESS, program_names::UPLINK_EGRESS6),
        (
            dataplane_common::PROGS6_BALANCE_SLOT,
            program_names::BALANCE6,
        ),
        (PROGS6_NAT64_SLOT, program_names::NAT64),
        (PROGS6_DROP_SLOT, program_names::DROP6),
        (
            dataplane_common::PROGS6_REJUDGE_SLOT,
            program_names::REJUDGE6,
        ),
    ] {
        let program: &mut SchedClassifier = program_mut(ebpf, name)?;
        let error = |source| DatapathError::Program {
            program: name,
            source,
        };
        program.load().map_err(error)?;
        log_verified(name, program.info());
        fds.push((
            number,
            program
                .fd()
                .map_err(error)?
                .try_clone()
                .map_err(|e| error(aya::programs::ProgramError::IOError(e)))?,
        ));
    }
    let map = ebpf
        .map_mut(map_names::PROGS6)
        .ok_or(DatapathError::MissingMap(map_names::PROGS6))?;
    let map_error = |source| DatapathError::Map {
        map: map_names::PROGS6,
        source,
    };
    let mut programs = ProgramArray::try_from(map).map_err(map_error)?;
    for (number, fd) in &fds {
        programs.set(*number, fd, 0).map_err(map_error)?;
    }
    Ok(())
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(DatapathError::Program {
        program: name,
        source: aya::programs::ProgramError::NotLoaded,
    })?;
    program.try_into().map_err(|source| DatapathError::Program {
        program: name,
        source,
    })
}

/// Test access to the loaded programs (BPF_PROG_TEST_RUN) for the packet tests.
#[cfg(test)]
impl Datapath {
    pub fn classifier(&mut self, hook: Hook) -> &mut SchedClassifier {
        program_mut(&mut self.ebpf, hook.program()).expect("program is loaded")
    }

    pub fn xdp(&mut self) -> &mut Xdp {
        program_mut(&mut self.ebpf, Hook::UplinkXdp.program()).expect("program is loaded")
    }
}

// ---------------------------------------------------------------------------------------------
// Flow events (flow logging, dataplane/src/flows): the ring buffer and its loss counter.

impl Datapath {
    /// Takes the flow-event ring buffer out of the loaded object: the reader task owns it from
    /// then on (the programs keep writing to it; only the agent's handle moves).
    pub fn take_flow_events(&mut self) -> Result<aya::maps::RingBuf<MapData>, DatapathError> {
        let name = map_names::FLOW_EVENTS;
        let map = self
            .ebpf
            .take_map(name)
            .ok_or(DatapathError::MissingMap(name))?;
        aya::maps::RingBuf::try_from(map).map_err(|source| DatapathError::Map { map: name, source })
    }

    /// TCP packets of one family (IPv4's, or IPv6's when `ipv6`) the programs passed per flag
    /// kind (Hubble's SYN, SYN-ACK, FIN, RST), summed over CPUs and counting points, since this
    /// agent loaded the programs.
    pub fn tcp_flags(&self, ipv6: bool) -> Result<TcpFlagTotals, DatapathError> {
        let name = if ipv6 {
            map_names::TCP_FLAGS6
        } else {
            map_names::TCP_FLAGS
        };
        let totals = self.tcp_flag_totals(name)?;
        let at_load = &self.tcp_flags_at_load[usize::from(ipv6)];
        Ok(std::array::from_fn(|kind| {
            totals[kind].saturating_sub(at_load[kind])
        }))
    }

    /// IPv4's per counting point (`tcp_flag_count::FROM_CONTAINER` ...), since the map was
    /// created: what the packet tests look at.
    pub fn tcp_flags_at(&self, point: u32) -> Result<TcpFlagTotals, DatapathError> {
        self.tcp_flags_in(map_names::TCP_FLAGS, point)
    }

    /// The counters of map `name` (IPv4's or IPv6's) at counting point `point`.
    fn tcp_flags_in(&self, name: &'static str, point: u32) -> Result<TcpFlagTotals, DatapathError> {
        let err = |source| DatapathError::Map { map: name, source };
        let map: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.map_ref(name)?).map_err(err)?;
        let mut totals = [0; tcp_flag_count::KINDS as usize];
        for (kind, total) in totals.iter_mut().enumerate() {
            let slot = point * tcp_flag_count::KINDS + kind as u32;
            *total = map.get(&slot, 0).map_err(err)?.iter().sum();
        }
        Ok(totals)
    }

    fn tcp_flag_totals(&self, name: &'static str) -> Result<TcpFlagTotals, DatapathError> {
        let mut sum = [0; tcp_flag_count::KINDS as usize];
        for point in 0..tcp_flag_count::POINTS {
            for (total, at) in sum.iter_mut().zip(self.tcp_flags_in(name, point)?) {
                *total += at;
            }
        }
        Ok(sum)
    }

    /// Flow events that found the ring full, summed over CPUs, since the map was created (it
    /// is pinned: an agent restart keeps counting).
    pub fn flow_events_lost(&self) -> Result<u64, DatapathError> {
        let name = map_names::FLOW_EVENTS_LOST;
        let err = |source| DatapathError::Map { map: name, source };
        let map: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.map_ref(name)?).map_err(err)?;
        Ok(map.get(&0, 0).map_err(err)?.iter().sum())
    }
}
