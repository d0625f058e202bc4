//! The kernel side as the agent sees it: the embedded object, loading it with its maps pinned,
//! attaching and detaching programs, and reading and writing the maps. This is the only module
//! that talks to the kernel's BPF interfaces.

use std::{
    collections::BTreeMap,
    ffi::CString,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, PerCpuHashMap},
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode, tc::SchedClassifierLinkId, xdp::XdpLinkId,
    },
};
use dataplane_common::{
    DropReason, EndpointInfo, IfaceStats, IfaceStatsKey, capacity, hook, map_names, program_names,
};
use serde::Serialize;

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
}

impl Hook {
    pub fn program(self) -> &'static str {
        match self {
            Hook::ContainerIngress => program_names::CONTAINER_INGRESS,
            Hook::UplinkIngress => program_names::UPLINK_INGRESS,
            Hook::UplinkEgress => program_names::UPLINK_EGRESS,
            Hook::UplinkXdp => program_names::UPLINK_XDP,
        }
    }

    /// The number the kernel's counters use for this hook.
    pub fn number(self) -> u32 {
        match self {
            Hook::ContainerIngress => hook::CONTAINER_INGRESS,
            Hook::UplinkIngress => hook::UPLINK_INGRESS,
            Hook::UplinkEgress => hook::UPLINK_EGRESS,
            Hook::UplinkXdp => hook::UPLINK_XDP,
        }
    }
}

enum LinkId {
    Tc(SchedClassifierLinkId),
    Xdp(XdpLinkId),
}

/// The loaded kernel programs and their maps.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    links: BTreeMap<(String, Hook), (u32, LinkId)>,
}

/// One map's fill level, for `status` and metrics.
#[derive(Debug, Clone, Serialize)]
pub struct MapFill {
    pub name: &'static str,
    pub entries: u32,
    pub capacity: u32,
}

/// Makes sure `pin_dir` is on a bpffs, mounting one on /sys/fs/bpf if none is there.
fn prepare_pin_dir(pin_dir: &Path) -> Result<(), DatapathError> {
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

fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is NUL-terminated and stat is a valid out-pointer.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
    rc == 0 && stat.f_type == BPF_FS_MAGIC
}

impl Datapath {
    /// Loads the kernel programs, reusing maps already pinned in `pin_dir` (so connections and
    /// counters survive an agent restart) and pinning new ones there.
    pub fn load(pin_dir: &Path) -> Result<Datapath, DatapathError> {
        prepare_pin_dir(pin_dir)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(KERNEL_OBJECT)
            .map_err(DatapathError::Load)?;
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
        }
        let xdp: &mut Xdp = program_mut(&mut ebpf, Hook::UplinkXdp.program())?;
        xdp.load().map_err(|source| DatapathError::Program {
            program: Hook::UplinkXdp.program(),
            source,
        })?;
        Ok(Datapath {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            links: BTreeMap::new(),
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Attaches the program of `hook` to `interface`. Attaching twice is a no-op.
    pub fn attach(&mut self, interface: &str, hook: Hook) -> Result<(), DatapathError> {
        if self.links.contains_key(&(interface.to_owned(), hook)) {
            return Ok(());
        }
        let attach_err = |source| DatapathError::Attach {
            program: hook.program(),
            interface: interface.to_owned(),
            source,
        };
        let ifindex = crate::netdev::ifindex(interface).ok_or_else(|| {
            attach_err(aya::programs::ProgramError::UnknownInterface {
                name: interface.to_owned(),
            })
        })?;
        let link = match hook {
            Hook::UplinkXdp => {
                let program: &mut Xdp = program_mut(&mut self.ebpf, hook.program())?;
                LinkId::Xdp(
                    program
                        .attach_to_if_index(ifindex, XdpMode::Default)
                        .map_err(attach_err)?,
                )
            }
            Hook::ContainerIngress | Hook::UplinkIngress | Hook::UplinkEgress => {
                let direction = if hook == Hook::UplinkEgress {
                    TcAttachType::Egress
                } else {
                    TcAttachType::Ingress
                };
                let program: &mut SchedClassifier = program_mut(&mut self.ebpf, hook.program())?;
                LinkId::Tc(program.attach(interface, direction).map_err(attach_err)?)
            }
        };
        log::info!(
            "attached {} to {interface} (ifindex {ifindex})",
            hook.program()
        );
        self.links
            .insert((interface.to_owned(), hook), (ifindex, link));
        Ok(())
    }

    /// Detaches the program of `hook` from `interface`. A vanished interface has already lost
    /// its attachment in the kernel; that is not an error.
    pub fn detach(&mut self, interface: &str, hook: Hook) -> Result<(), DatapathError> {
        let Some((_, link)) = self.links.remove(&(interface.to_owned(), hook)) else {
            return Ok(());
        };
        let result = match link {
            LinkId::Tc(id) => {
                let program: &mut SchedClassifier = program_mut(&mut self.ebpf, hook.program())?;
                program.detach(id)
            }
            LinkId::Xdp(id) => {
                let program: &mut Xdp = program_mut(&mut self.ebpf, hook.program())?;
                program.detach(id)
            }
        };
        match result {
            Ok(()) => log::info!("detached {} from {interface}", hook.program()),
            Err(e) => log::warn!(
                "detaching {} from {interface}: {e} (interface gone?)",
                hook.program()
            ),
        }
        Ok(())
    }

    /// Detaches everything (on shutdown). Maps stay pinned.
    pub fn detach_all(&mut self) {
        let attached: Vec<(String, Hook)> = self.links.keys().cloned().collect();
        for (interface, hook) in attached {
            // detach() only fails on a missing program, which load() has ruled out.
            let _ = self.detach(&interface, hook);
        }
    }

    /// What is attached where: (interface, hook, ifindex at attach time).
    pub fn attachments(&self) -> Vec<(String, Hook, u32)> {
        self.links
            .iter()
            .map(|((interface, hook), (ifindex, _))| (interface.clone(), *hook, *ifindex))
            .collect()
    }

    fn endpoints_map(&self) -> Result<HashMap<&MapData, u32, EndpointInfo>, DatapathError> {
        let map = self
            .ebpf
            .map(map_names::ENDPOINTS)
            .ok_or(DatapathError::MissingMap(map_names::ENDPOINTS))?;
        HashMap::try_from(map).map_err(|source| DatapathError::Map {
            map: map_names::ENDPOINTS,
            source,
        })
    }

    fn endpoints_map_mut(
        &mut self,
    ) -> Result<HashMap<&mut MapData, u32, EndpointInfo>, DatapathError> {
        let map = self
            .ebpf
            .map_mut(map_names::ENDPOINTS)
            .ok_or(DatapathError::MissingMap(map_names::ENDPOINTS))?;
        HashMap::try_from(map).map_err(|source| DatapathError::Map {
            map: map_names::ENDPOINTS,
            source,
        })
    }

    /// The endpoints map as the kernel has it (including entries pinned by an earlier agent).
    pub fn endpoints(&self) -> Result<BTreeMap<Ipv4Addr, EndpointInfo>, DatapathError> {
        let map = self.endpoints_map()?;
        map.iter()
            .map(|entry| {
                entry
                    .map(|(ip, info)| (Ipv4Addr::from(u32::from_be(ip)), info))
                    .map_err(|source| DatapathError::Map {
                        map: map_names::ENDPOINTS,
                        source,
                    })
            })
            .collect()
    }

    pub fn set_endpoint(&mut self, ip: Ipv4Addr, info: EndpointInfo) -> Result<(), DatapathError> {
        self.endpoints_map_mut()?
            .insert(u32::from(ip).to_be(), info, 0)
            .map_err(|source| DatapathError::Map {
                map: map_names::ENDPOINTS,
                source,
            })
    }

    pub fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), DatapathError> {
        self.endpoints_map_mut()?
            .remove(&u32::from(ip).to_be())
            .map_err(|source| DatapathError::Map {
                map: map_names::ENDPOINTS,
                source,
            })
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

    /// How full each map is.
    pub fn map_fill(&self) -> Result<Vec<MapFill>, DatapathError> {
        Ok(vec![
            MapFill {
                name: map_names::ENDPOINTS,
                entries: self.endpoints()?.len() as u32,
                capacity: capacity::ENDPOINTS,
            },
            MapFill {
                name: map_names::IFACE_STATS,
                entries: self.iface_stats()?.len() as u32,
                capacity: capacity::IFACE_STATS,
            },
            MapFill {
                name: map_names::DROPS,
                entries: DropReason::SLOTS,
                capacity: DropReason::SLOTS,
            },
        ])
    }
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

impl Drop for Datapath {
    fn drop(&mut self) {
        self.detach_all();
    }
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
