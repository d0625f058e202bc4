//! Processes: commands run to completion within a time limit ([`run_timed`]), long-running ones
//! stopped on drop ([`Process`]), and what the sandbox, agent and engine guards need to find
//! and remove what a process left (pids by command line, cgroups, mounts).

use std::{
    fs,
    io::Read as _,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{Error, Result, interrupt, io};

/// How long a stopped process gets between SIGTERM and SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(3);

/// What a command printed, captured by [`run_timed`].
#[derive(Debug)]
pub struct Captured {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Captured {
    /// stderr (or stdout when stderr is empty), trimmed, for error messages.
    pub fn complaint(&self) -> String {
        let text = if self.stderr.trim().is_empty() {
            &self.stdout
        } else {
            &self.stderr
        };
        let text = text.trim();
        if text.is_empty() {
            format!("{} with no output", self.status)
        } else {
            format!("{}: {}", self.status, last_lines(text, 5))
        }
    }

    /// stdout, or [`Error::Failed`] naming `what` unless the command succeeded.
    pub fn ok(self, what: &str) -> Result<String> {
        if !self.status.success() {
            return Err(Error::Failed(format!("{what}: {}", self.complaint())));
        }
        Ok(self.stdout)
    }
}

/// `cmd` as a person would type it, for messages.
pub fn command_line(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Runs a command to completion with its output captured; kills it when `timeout` passes or a
/// signal interrupts (see [`interrupt`]).
pub fn run_timed(cmd: &mut Command, timeout: Duration) -> Result<Captured> {
    let line = command_line(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io(format!("cannot run `{line}`")))?;
    // Readers on threads: a child that fills a pipe while we only poll its exit would block.
    let reader = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = reader(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = reader(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .map_err(io(format!("waiting for `{line}`")))?
        {
            break status;
        }
        if interrupt::requested() || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let _ = (stdout.join(), stderr.join());
            interrupt::check()?;
            return Err(Error::Failed(format!(
                "`{line}` did not finish within {timeout:?}"
            )));
        }
        thread::sleep(Duration::from_millis(20));
    };
    Ok(Captured {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// Status, stdout and stderr of a finished command, for panic messages.
pub fn output_text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The last `n` lines of `text`, joined with ` | ` (one line for an error message).
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Where a [`Process`]'s output goes.
pub enum Stdout {
    /// stdout piped (for [`Process::wait_for_line`] and [`Process::wait_output`]), stderr
    /// dropped.
    Piped,
    /// stdout and stderr appended to this file (read back by [`Process::log_tail`]).
    Log(PathBuf),
}

/// A long-running process: SIGTERM, [`TERM_GRACE`], then SIGKILL on drop. It runs in a process
/// group of its own, so a Ctrl-C meant for the clients does not stop it before its guard does.
pub struct Process {
    what: String,
    child: Child,
    log: Option<PathBuf>,
}

impl Process {
    /// Starts `cmd` (stdin from /dev/null); `what` names it in messages.
    pub fn spawn(what: &str, cmd: &mut Command, stdout: Stdout) -> Result<Process> {
        cmd.stdin(Stdio::null()).process_group(0);
        let log = match stdout {
            Stdout::Piped => {
                cmd.stdout(Stdio::piped()).stderr(Stdio::null());
                None
            }
            Stdout::Log(path) => {
                let file = fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(io(format!("opening {}", path.display())))?;
                let copy = file
                    .try_clone()
                    .map_err(io(format!("duplicating {}", path.display())))?;
                cmd.stdout(copy).stderr(file);
                Some(path)
            }
        };
        let child = cmd
            .spawn()
            .map_err(io(format!("starting {what} (`{}`)", command_line(cmd))))?;
        Ok(Process {
            what: what.to_owned(),
            child,
            log,
        })
    }

    pub fn what(&self) -> &str {
        &self.what
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The whole log ("" for a piped process or an unreadable log).
    pub fn log_text(&self) -> String {
        self.log
            .as_ref()
            .and_then(|log| fs::read_to_string(log).ok())
            .unwrap_or_default()
    }

    /// The last `n` lines of its log, joined with ` | `.
    pub fn log_tail(&self, n: usize) -> String {
        last_lines(self.log_text().trim(), n)
    }

    /// Fails with the end of its log if it has exited.
    pub fn check_running(&mut self) -> Result<()> {
        let exited = self
            .child
            .try_wait()
            .map_err(io(format!("checking {}", self.what)))?;
        if let Some(status) = exited {
            return Err(Error::Failed(format!(
                "{} exited ({status}): {}",
                self.what,
                self.log_tail(10)
            )));
        }
        Ok(())
    }

    /// Waits until the process prints a line containing `text` (e.g. a "ready" line); panics
    /// after 10 s or when it ends first. Needs [`Stdout::Piped`].
    pub fn wait_for_line(&mut self, text: &str) {
        use std::io::BufRead as _;
        let stdout = self.child.stdout.take().expect("stdout is piped");
        let mut lines = std::io::BufReader::new(stdout).lines();
        let text = text.to_owned();
        let found = thread::spawn(move || lines.any(|l| l.is_ok_and(|l| l.contains(&text))));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !found.is_finished() {
            assert!(
                Instant::now() < deadline,
                "{} printed no ready line",
                self.what
            );
            thread::sleep(Duration::from_millis(20));
        }
        assert!(
            found.join().unwrap(),
            "{} ended before its ready line",
            self.what
        );
    }

    /// Waits for the process to end and returns what it printed (needs [`Stdout::Piped`]).
    pub fn wait_output(mut self) -> String {
        let mut text = String::new();
        if let Some(mut stdout) = self.child.stdout.take() {
            let _ = stdout.read_to_string(&mut text);
        }
        let _ = self.child.wait();
        text
    }

    /// Sends `signal` and waits for the process to exit.
    pub fn signal_and_wait(&mut self, signal: libc::c_int) -> Result<ExitStatus> {
        signal_pid(self.child.id() as i32, signal);
        self.child
            .wait()
            .map_err(io(format!("waiting for {}", self.what)))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            terminate(&[self.child.id() as i32]);
        }
        let _ = self.child.wait();
    }
}

fn signal_pid(pid: i32, signal: libc::c_int) {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// Whether `pid` runs (not a zombie: a zombie holds no namespace and no port).
pub use dataplane::sandbox::is_alive;

/// SIGTERM, [`TERM_GRACE`] to go, then SIGKILL; returns once they are gone.
pub fn terminate(pids: &[i32]) {
    dataplane::sandbox::terminate_within(pids, TERM_GRACE);
}

/// SIGKILL to every pid (processes found by what they belong to, e.g. a cgroup of ours).
pub fn kill_all(pids: impl IntoIterator<Item = i32>) {
    for pid in pids {
        signal_pid(pid, libc::SIGKILL);
    }
}

/// Pids of the processes (other than us) whose command line contains `text`: a directory only
/// one of our guards uses.
pub fn processes_mentioning(text: &str) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(text))
        })
        .collect()
}

/// The cgroup directories named `name` (e.g. dockerd's `--cgroup-parent`) up to five levels
/// below /sys/fs/cgroup, in every hierarchy, each with everything below it, deepest first.
pub fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, name: &str, depth: u32, found: &mut Vec<PathBuf>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = entry.path();
            if entry.file_name() == name {
                // The cgroup and every one below it, children before parents.
                let mut stack = vec![path];
                let mut all = Vec::new();
                while let Some(p) = stack.pop() {
                    if let Ok(children) = fs::read_dir(&p) {
                        stack.extend(
                            children
                                .flatten()
                                .filter(|c| c.file_type().is_ok_and(|t| t.is_dir()))
                                .map(|c| c.path()),
                        );
                    }
                    all.push(p);
                }
                all.reverse();
                found.extend(all);
            } else if depth > 0 {
                walk(&path, name, depth - 1, found);
            }
        }
    }
    let mut found = Vec::new();
    walk(Path::new("/sys/fs/cgroup"), name, 5, &mut found);
    found
}

/// The pids in a cgroup directory.
pub fn cgroup_pids(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Detaches every mount point at or below `dir`, deepest first.
pub fn unmount_below(dir: &Path) {
    let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = dir.display().to_string();
    let mut points: Vec<String> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        // mountinfo escapes spaces and such as \040; our paths have none.
        .filter(|p| *p == prefix || p.starts_with(&format!("{prefix}/")))
        .map(str::to_owned)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    for point in points {
        let Ok(c_point) = std::ffi::CString::new(point.clone()) else {
            continue;
        };
        // SAFETY: a NUL-terminated path; MNT_DETACH only detaches this mount.
        if unsafe { libc::umount2(c_point.as_ptr(), libc::MNT_DETACH) } != 0 {
            eprintln!("umount {point}: {}", std::io::Error::last_os_error());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_lines_joins_the_tail() {
        assert_eq!(last_lines("a\nb\nc", 2), "b | c");
        assert_eq!(last_lines("", 2), "");
    }

    #[test]
    fn run_timed_captures_and_times_out() {
        let out = run_timed(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(
            (out.stdout.as_str(), out.stderr.as_str()),
            ("out\n", "err\n")
        );
        assert_eq!(out.status.code(), Some(3));
        assert!(out.complaint().ends_with(": err"), "{}", out.complaint());
        let slow = run_timed(Command::new("sleep").arg("30"), Duration::from_millis(200));
        assert!(
            matches!(&slow, Err(Error::Failed(m)) if m.contains("did not finish")),
            "{slow:?}"
        );
    }

    #[test]
    fn a_process_is_stopped_on_drop() {
        let process =
            Process::spawn("sleep", Command::new("sleep").arg("60"), Stdout::Piped).unwrap();
        let pid = process.pid() as i32;
        assert!(is_alive(pid));
        drop(process);
        assert!(!is_alive(pid));
    }

    #[test]
    fn an_exited_process_reports_its_log() {
        let log = std::env::temp_dir().join(format!("testbed-log-{}", std::process::id()));
        let mut process = Process::spawn(
            "failing",
            Command::new("sh").args(["-c", "echo broken; exit 1"]),
            Stdout::Log(log.clone()),
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let err = loop {
            if let Err(e) = process.check_running() {
                break e.to_string();
            }
            assert!(Instant::now() < deadline, "sh did not exit");
            thread::sleep(Duration::from_millis(20));
        };
        let _ = fs::remove_file(&log);
        assert!(
            err.contains("failing exited") && err.contains("broken"),
            "{err}"
        );
    }
}
