//! The state file as a source: a thread of its own watches the file, waits until a change is
//! whole, reads, parses and validates it (all off the agent's main loop, within the caps of
//! [`crate::model::parse`]) and hands the agent a [`Reading`]: the model or why there is none.
//!
//! When a change is whole:
//! - a file replaced by rename (`mv tmp state.yaml`, most editors) is read at once: a rename
//!   is atomic, the new file is complete. inotify on the file's directory tells of it;
//! - a file written in place and closed (`cp`, `generate > state.yaml`, an editor that saves
//!   in place: inotify's IN_CLOSE_WRITE) is read once it has not changed for
//!   [`CLOSED_SETTLE`] after the close: a writer is done with what it wrote when it closes,
//!   and one that writes again at once (`echo a > f; echo b >> f`) is waited for;
//! - anything else (a file still open for writing, a slow writer, a truncation) is read once
//!   the file has not changed for [`SETTLE`], so the first half of a write in two parts is
//!   never applied. The file's identity (inode, size, modification and change times) is
//!   re-checked after the read; a file that changed while being read waits again;
//! - the file is also polled every [`POLL_INTERVAL`], for where inotify does not reach (a
//!   symlinked path, a directory that is itself replaced, a full inotify table).
//!
//! Only regular files are read (opened non-blocking, so a FIFO at the path cannot hang the
//! reader; it is refused by its type). An empty file is refused (an empty state is `{}`).
//! The same content is handed over once: a file restored to what is in force is handed over
//! again (so an error clears), a file that did not change is not.

use std::{
    ffi::{CString, OsString},
    io::Read as _,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _, fs::OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use crate::model::{Model, StateError, parse::MAX_FILE_BYTES};

/// How often the file is looked at when nothing tells of a change.
pub const POLL_INTERVAL: Duration = Duration::from_millis(300);
/// How long a file changed in place must stay unchanged before it is read.
pub const SETTLE: Duration = Duration::from_secs(1);
/// How long a file changed in place and then closed by its writer must stay unchanged before
/// it is read: long enough for a shell's next `>>` onto it, short beside any apply.
pub const CLOSED_SETTLE: Duration = Duration::from_millis(10);

/// One read of the file.
#[derive(Debug, Clone)]
pub struct Reading {
    /// SHA-256 of the bytes read (what `sha256sum FILE` prints); None when nothing was read.
    pub sha256: Option<String>,
    /// The file's modification time, seconds since the Unix epoch.
    pub modified_unix: Option<u64>,
    pub read_unix: u64,
    pub result: Result<Model, StateError>,
}

/// What the source tells the agent.
#[derive(Debug, Clone)]
pub enum Event {
    /// A change was seen and is not read yet: why (settling, being parsed).
    Pending {
        reason: String,
        since_unix: u64,
    },
    Read(Reading),
}

pub struct Source {
    events: mpsc::Receiver<Event>,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// [`unix_now`] in microseconds.
pub fn unix_now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

impl Source {
    /// Starts watching `path`; the first [`Reading`] comes at once.
    pub fn start(path: PathBuf) -> Source {
        let (tx, events) = mpsc::channel(16);
        std::thread::Builder::new()
            .name("state-file".into())
            .spawn(move || Watcher::new(path, tx).run())
            .expect("spawning the state file thread");
        Source { events }
    }

    /// The first reading (the agent's initial state), skipping pending notes.
    pub async fn first(&mut self) -> Reading {
        loop {
            if let Event::Read(reading) = self.next().await {
                return reading;
            }
        }
    }

    pub async fn next(&mut self) -> Event {
        match self.events.recv().await {
            Some(event) => event,
            // The thread only ends when the agent drops its receiver.
            None => std::future::pending().await,
        }
    }
}

/// What identifies a version of the file without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Identity {
    File {
        dev: u64,
        ino: u64,
        size: u64,
        mtime_ns: i128,
        ctime_ns: i128,
    },
    Error(String),
}

fn identity(path: &Path) -> Identity {
    match std::fs::metadata(path) {
        Ok(m) => Identity::File {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        },
        Err(e) => Identity::Error(e.kind().to_string()),
    }
}

struct Watcher {
    path: PathBuf,
    tx: mpsc::Sender<Event>,
    inotify: Option<Inotify>,
    /// The content (its hash) or the error last handed over, so each is handed over once.
    last_sent: Option<String>,
    /// A pending note went out since the last reading: the next reading goes out even when
    /// its content is the last one's, so the note does not stay.
    pending_sent: bool,
}

/// What one look at the file gave.
enum Outcome {
    /// It changed while being read.
    Changing,
    /// The same content or error as last handed over.
    Same,
    Fresh(Reading),
}

impl Watcher {
    fn new(path: PathBuf, tx: mpsc::Sender<Event>) -> Watcher {
        let inotify = Inotify::watch(&path);
        if inotify.is_none() {
            log::warn!(
                "state file {}: no inotify watch on its directory; polling every {:?}",
                path.display(),
                POLL_INTERVAL
            );
        }
        Watcher {
            path,
            tx,
            inotify,
            last_sent: None,
            pending_sent: false,
        }
    }

    fn send(&mut self, event: Event) -> bool {
        self.pending_sent = matches!(event, Event::Pending { .. });
        self.tx.blocking_send(event).is_ok()
    }

    /// Whether content or error `key` is to be handed over (and remembers it).
    fn is_news(&mut self, key: &str) -> bool {
        let news = self.pending_sent || self.last_sent.as_deref() != Some(key);
        self.last_sent = Some(key.to_owned());
        news
    }

    fn run(mut self) {
        let mut seen: Option<Identity> = None;
        let mut changed_at = Instant::now();
        let mut dirty = true;
        // The first read, and a rename onto the path, do not wait to settle.
        let mut at_once = true;
        let mut told_pending = false;
        // The writer closed the file since its last change (so it settles in CLOSED_SETTLE),
        // and whether the last wait was woken by such a close.
        let mut closed = false;
        let mut woke_closed = false;
        loop {
            let now = identity(&self.path);
            if seen.as_ref() != Some(&now) {
                seen = Some(now.clone());
                changed_at = Instant::now();
                dirty = true;
                told_pending = false;
                // A change seen together with a close is the closed write's own; one seen
                // without is a new write, which has to close again.
                closed = woke_closed;
            } else if woke_closed {
                closed = true;
            }
            let settle = if closed { CLOSED_SETTLE } else { SETTLE };
            if dirty && (at_once || changed_at.elapsed() >= settle) {
                match self.read(&now) {
                    Outcome::Fresh(reading) => {
                        dirty = false;
                        at_once = false;
                        if !self.send(Event::Read(reading)) {
                            return;
                        }
                    }
                    Outcome::Same => {
                        dirty = false;
                        at_once = false;
                    }
                    Outcome::Changing => {
                        // Changed while being read: wait for it to settle again.
                        seen = None;
                        at_once = false;
                    }
                }
            } else if dirty && !told_pending {
                told_pending = true;
                let reason = format!(
                    "the file is changing; it is read once unchanged for {SETTLE:?}, or for \
                     {CLOSED_SETTLE:?} after its writer closes it (at once when renamed into \
                     place)"
                );
                if !self.send(Event::Pending {
                    reason,
                    since_unix: unix_now(),
                }) {
                    return;
                }
            }
            if self.tx.is_closed() {
                return;
            }
            let wait = if dirty {
                settle
                    .saturating_sub(changed_at.elapsed())
                    .clamp(Duration::from_millis(1), POLL_INTERVAL)
            } else {
                POLL_INTERVAL
            };
            let woke = match &mut self.inotify {
                Some(inotify) => inotify.wait(wait),
                None => {
                    std::thread::sleep(wait);
                    Woke::default()
                }
            };
            if woke.renamed {
                at_once = true;
            }
            woke_closed = woke.closed;
        }
    }

    /// Reads, parses and validates the file whose identity was `before`; content read before
    /// is not parsed again.
    fn read(&mut self, before: &Identity) -> Outcome {
        match self.read_file(before) {
            Err(e) => {
                if self.is_news(&e.to_string()) {
                    Outcome::Fresh(Reading {
                        sha256: None,
                        modified_unix: None,
                        read_unix: unix_now(),
                        result: Err(e),
                    })
                } else {
                    Outcome::Same
                }
            }
            Ok(None) => Outcome::Changing,
            Ok(Some((bytes, modified_unix))) => {
                let sha256 = hex(&Sha256::digest(&bytes));
                if !self.is_news(&sha256) {
                    return Outcome::Same;
                }
                if bytes.len() > 4096 {
                    // Worth telling `status` while a big file is parsed.
                    if !self.send(Event::Pending {
                        reason: format!("being parsed and validated ({} bytes)", bytes.len()),
                        since_unix: unix_now(),
                    }) {
                        return Outcome::Same;
                    }
                    self.pending_sent = false;
                }
                let path_text = self.path.display().to_string();
                let result = match String::from_utf8(bytes) {
                    Ok(text) => Model::from_text(&path_text, &text).map(|(_, model)| model),
                    Err(e) => Err(StateError::Syntax {
                        path: path_text,
                        message: format!(
                            "not UTF-8 text (byte {} is invalid)",
                            e.utf8_error().valid_up_to()
                        ),
                    }),
                };
                Outcome::Fresh(Reading {
                    sha256: Some(sha256),
                    modified_unix,
                    read_unix: unix_now(),
                    result,
                })
            }
        }
    }

    /// The file's bytes and modification time; None when it changed while being read.
    #[allow(clippy::type_complexity)]
    fn read_file(&self, before: &Identity) -> Result<Option<(Vec<u8>, Option<u64>)>, StateError> {
        let path_text = self.path.display().to_string();
        let read_error = |message: String| StateError::Read {
            path: path_text.clone(),
            message,
        };
        // Non-blocking: opening a FIFO for reading would otherwise wait for a writer.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&self.path)
            .map_err(|e| read_error(e.to_string()))?;
        let meta = file.metadata().map_err(|e| read_error(e.to_string()))?;
        if !meta.file_type().is_file() {
            return Err(read_error(format!(
                "is {}, not a regular file; only regular files are read",
                kind_of(&meta.file_type())
            )));
        }
        if meta.len() > MAX_FILE_BYTES as u64 {
            return Err(StateError::Limit {
                path: path_text,
                limit: "MAX_FILE_BYTES",
                max: MAX_FILE_BYTES as u64,
                found: format!("{} bytes", meta.len()),
            });
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        (&file)
            .take(MAX_FILE_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| read_error(e.to_string()))?;
        if identity(&self.path) != *before || bytes.len() as u64 != meta.len() {
            return Ok(None);
        }
        let modified_unix = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs());
        Ok(Some((bytes, modified_unix)))
    }
}

fn kind_of(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "not a file"
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What woke an [`Inotify::wait`] about the file's name.
#[derive(Debug, Default, Clone, Copy)]
struct Woke {
    /// Something was renamed onto it.
    renamed: bool,
    /// A writer closed it, and nothing wrote to it after.
    closed: bool,
}

/// An inotify watch on the directory of the state file (the file itself may be replaced, so
/// a watch on it would go with it).
struct Inotify {
    fd: OwnedFd,
    name: OsString,
}

impl Inotify {
    fn watch(path: &Path) -> Option<Inotify> {
        let name = path.file_name()?.to_owned();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let dir = CString::new(dir.as_os_str().as_bytes()).ok()?;
        // SAFETY: plain syscall; the fd is owned below.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return None;
        }
        // SAFETY: raw is a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mask = libc::IN_MOVED_TO
            | libc::IN_MOVED_FROM
            | libc::IN_CREATE
            | libc::IN_DELETE
            | libc::IN_MODIFY
            | libc::IN_CLOSE_WRITE
            | libc::IN_ATTRIB;
        // SAFETY: dir is NUL-terminated; fd is an inotify instance.
        if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), dir.as_ptr(), mask) } < 0 {
            return None;
        }
        Some(Inotify { fd, name })
    }

    /// Waits up to `timeout` for events in the directory; says whether one of them was a
    /// rename onto the file's name, or its writer closing it.
    fn wait(&mut self, timeout: Duration) -> Woke {
        let mut poll = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut poll, 1, timeout.as_millis() as i32) };
        let mut woke = Woke::default();
        if ready <= 0 {
            return woke;
        }
        // Aligned for struct inotify_event.
        let mut buf = [0u64; 512];
        loop {
            // SAFETY: buf is writable for its whole size.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    std::mem::size_of_val(&buf),
                )
            };
            if n <= 0 {
                return woke;
            }
            // SAFETY: the kernel wrote n bytes of whole events into buf.
            let bytes =
                unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n as usize) };
            let header = std::mem::size_of::<libc::inotify_event>();
            let mut at = 0;
            while at + header <= bytes.len() {
                // SAFETY: a whole header lies at `at`; read unaligned to be safe.
                let event: libc::inotify_event =
                    unsafe { std::ptr::read_unaligned(bytes[at..].as_ptr().cast()) };
                let name_bytes =
                    &bytes[at + header..(at + header + event.len as usize).min(bytes.len())];
                let name = name_bytes.split(|b| *b == 0).next().unwrap_or_default();
                if name == self.name.as_bytes() {
                    woke.renamed |= event.mask & libc::IN_MOVED_TO != 0;
                    // Closed only if no write came after the close (events come in order).
                    if event.mask & libc::IN_MODIFY != 0 {
                        woke.closed = false;
                    }
                    if event.mask & libc::IN_CLOSE_WRITE != 0 {
                        woke.closed = true;
                    }
                }
                at += header + event.len as usize;
            }
        }
    }
}
