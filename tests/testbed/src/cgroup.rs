//! A cgroup (v2) of a test's own, for the agent's socket hooks (`--cgroup`) and the "host"
//! processes that should meet them; never the root cgroup. On drop its processes are killed
//! and it is removed.

use std::{
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use crate::{Error, Result, io, process};

pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    /// `{cgroup2 root}/dataplane-test-{name}`; an error where the host has no cgroup2.
    pub fn create(name: &str) -> Result<TestCgroup> {
        let root = dataplane::kernel::netdev::cgroup2_root()
            .ok_or_else(|| Error::Failed("no cgroup2 mounted".into()))?;
        let path = Path::new(&root).join(format!("dataplane-test-{name}"));
        fs::create_dir_all(&path).map_err(io(format!("creating {}", path.display())))?;
        Ok(TestCgroup { path })
    }

    pub fn path_str(&self) -> &str {
        self.path.to_str().expect("UTF-8 cgroup path")
    }

    /// Makes `cmd` join this cgroup between fork and exec.
    pub fn enter(&self, cmd: &mut Command) {
        let procs = self.path.join("cgroup.procs");
        // SAFETY: the closure runs in the child between fork and exec and only writes a file.
        unsafe {
            cmd.pre_exec(move || fs::write(&procs, "0"));
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        process::kill_all(process::cgroup_pids(&self.path));
        for _ in 0..50 {
            if fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        eprintln!("could not remove cgroup {}", self.path.display());
    }
}
