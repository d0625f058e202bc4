//! `--flow-log PATH|-`: every flow record as a JSON line, for log shippers (Fluent Bit, Vector,
//! Filebeat read such files). A file is rotated by size the way logrotate's `copytruncate`-free
//! scheme does it: PATH becomes PATH.1, PATH.1 becomes PATH.2, ..., keeping `keep` old files,
//! and writing goes on in a new PATH. Shippers that follow by name pick up the new file.

use std::{
    fs::{File, OpenOptions},
    io::{BufWriter, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("flow log {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

enum Sink {
    Stdout(BufWriter<std::io::Stdout>),
    File {
        path: PathBuf,
        writer: BufWriter<File>,
        /// Bytes in the current file.
        written: u64,
    },
}

pub struct FlowLog {
    sink: Sink,
    max_bytes: u64,
    keep: u32,
}

fn open_append(path: &Path) -> Result<(File, u64), ExportError> {
    let err = |source| ExportError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    // Never through a symlink planted at the path (the agent runs as root), and readable by
    // its owner only: flow records name every connection of the host.
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    if !meta.file_type().is_file() {
        return Err(err(std::io::Error::other("is not a regular file")));
    }
    Ok((file, meta.len()))
}

/// `PATH.n`
fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

impl FlowLog {
    /// `target` is a file path, or `-` for stdout (never rotated). An existing file is
    /// appended to.
    pub fn open(target: &str, max_bytes: u64, keep: u32) -> Result<FlowLog, ExportError> {
        let sink = if target == "-" {
            Sink::Stdout(BufWriter::new(std::io::stdout()))
        } else {
            let path = PathBuf::from(target);
            let (file, written) = open_append(&path)?;
            Sink::File {
                path,
                writer: BufWriter::new(file),
                written,
            }
        };
        Ok(FlowLog {
            sink,
            max_bytes,
            keep,
        })
    }

    /// Writes one record's line (without its newline). A file that would grow past the size
    /// limit is rotated first; a single line longer than the limit still goes into a file of
    /// its own.
    pub fn write_line(&mut self, line: &str) -> Result<(), ExportError> {
        let len = line.len() as u64 + 1;
        if let Sink::File { written, .. } = &self.sink
            && *written > 0
            && *written + len > self.max_bytes
        {
            self.rotate()?;
        }
        match &mut self.sink {
            Sink::Stdout(out) => writeln!(out, "{line}").map_err(|source| ExportError::Io {
                path: PathBuf::from("-"),
                source,
            }),
            Sink::File {
                path,
                writer,
                written,
            } => {
                writeln!(writer, "{line}").map_err(|source| ExportError::Io {
                    path: path.clone(),
                    source,
                })?;
                *written += len;
                Ok(())
            }
        }
    }

    /// Hands what is buffered to the kernel (after every batch of records, so a shipper sees
    /// them within moments without a write per record).
    pub fn flush(&mut self) -> Result<(), ExportError> {
        match &mut self.sink {
            Sink::Stdout(out) => out.flush().map_err(|source| ExportError::Io {
                path: PathBuf::from("-"),
                source,
            }),
            Sink::File { path, writer, .. } => writer.flush().map_err(|source| ExportError::Io {
                path: path.clone(),
                source,
            }),
        }
    }

    fn rotate(&mut self) -> Result<(), ExportError> {
        self.flush()?;
        let Sink::File {
            path,
            writer,
            written,
        } = &mut self.sink
        else {
            return Ok(());
        };
        let err = |path: &Path, source| ExportError::Io {
            path: path.to_owned(),
            source,
        };
        let ignore_missing = |result: std::io::Result<()>, at: &Path| match result {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(err(at, e)),
            _ => Ok(()),
        };
        // PATH.(keep-1) -> PATH.keep (replacing the oldest), ..., PATH.1 -> PATH.2.
        for n in (1..self.keep).rev() {
            let from = rotated(path, n);
            ignore_missing(std::fs::rename(&from, rotated(path, n + 1)), &from)?;
        }
        if self.keep > 0 {
            ignore_missing(std::fs::rename(&*path, rotated(path, 1)), path)?;
        } else {
            ignore_missing(std::fs::remove_file(&*path), path)?;
        }
        let (file, size) = open_append(path)?;
        *writer = BufWriter::new(file);
        *written = size;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let dir = std::env::temp_dir()
                .join(format!("dataplane-flowlog-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_default()
    }

    #[test]
    fn files_rotate_by_size_and_keep_the_newest_old_ones() {
        let dir = TempDir::new("rotate");
        let path = dir.0.join("sub/flows.json");
        // Lines of 9 bytes + newline; room for 3 per file.
        let mut log = FlowLog::open(path.to_str().unwrap(), 30, 2).unwrap();
        for i in 0..10 {
            log.write_line(&format!("record-{i:02}")).unwrap();
        }
        log.flush().unwrap();
        assert_eq!(read(&path), "record-09\n");
        assert_eq!(
            read(&rotated(&path, 1)),
            "record-06\nrecord-07\nrecord-08\n"
        );
        assert_eq!(
            read(&rotated(&path, 2)),
            "record-03\nrecord-04\nrecord-05\n"
        );
        // Only `keep` old files: the first three records are gone.
        assert!(!rotated(&path, 3).exists());
        for file in [path.clone(), rotated(&path, 1), rotated(&path, 2)] {
            assert!(std::fs::metadata(&file).unwrap().len() <= 30);
        }
    }

    #[test]
    fn an_existing_file_is_appended_to_and_counts_towards_the_limit() {
        let dir = TempDir::new("append");
        let path = dir.0.join("flows.json");
        std::fs::write(&path, "old-line-\n").unwrap();
        let mut log = FlowLog::open(path.to_str().unwrap(), 25, 1).unwrap();
        log.write_line("new-one-1").unwrap();
        log.write_line("new-one-2").unwrap();
        log.flush().unwrap();
        assert_eq!(read(&rotated(&path, 1)), "old-line-\nnew-one-1\n");
        assert_eq!(read(&path), "new-one-2\n");
    }

    #[test]
    fn keep_zero_starts_over_and_long_lines_still_get_written() {
        let dir = TempDir::new("zero");
        let path = dir.0.join("flows.json");
        let mut log = FlowLog::open(path.to_str().unwrap(), 8, 0).unwrap();
        log.write_line("a-line-longer-than-the-limit").unwrap();
        log.write_line("second-long-line").unwrap();
        log.flush().unwrap();
        assert_eq!(read(&path), "second-long-line\n");
        assert!(!rotated(&path, 1).exists());
    }

    #[test]
    fn the_log_is_private_and_never_opened_through_a_symlink() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("flowlog-perm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("flows.json");
        FlowLog::open(path.to_str().unwrap(), 1000, 1).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let victim = dir.join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let link = dir.join("link.json");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(FlowLog::open(link.to_str().unwrap(), 1000, 1).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
