//! The agent's control socket: local clients (`status`, `observe`) send one request line and
//! read the reply until the agent closes the connection. A request that follows something
//! (`observe --follow`) gets more lines after its reply, for as long as the client stays.

pub mod status;

use std::{
    io::{BufReader, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _},
    net::UnixListener,
    sync::{mpsc, oneshot},
};

/// A request from a client, handed to the agent's main loop (the only owner of the kernel
/// state), with the channel for its reply.
pub struct Request {
    pub command: String,
    pub reply: oneshot::Sender<String>,
    /// Lines written to the client after the reply, until every sender is dropped or the
    /// client goes away (a request that keeps no clone of it ends with its reply).
    pub stream: mpsc::Sender<String>,
}

/// Lines a streaming client (observe --follow) may have waiting; the agent skips lines for a
/// client this far behind rather than wait for it, so a slow reader never holds it up.
const STREAM_QUEUE: usize = 4096;

/// Where local clients find the agent unless `--socket` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/dataplane/dataplane.sock";

/// Binds the control socket. What is at the path is replaced only when it is a stale socket
/// (one nobody listens on, left by a killed agent); anything else is refused, never deleted.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("looking at {}", path.display())),
        Ok(meta) if !meta.file_type().is_socket() => anyhow::bail!(
            "{} exists and is not a socket; not replacing it (give --socket another path)",
            path.display()
        ),
        Ok(_) => {
            if UnixStream::connect(path).is_ok() {
                anyhow::bail!(
                    "another agent is listening on {}; give this one its own --socket",
                    path.display()
                );
            }
            log::info!("replacing the stale socket {}", path.display());
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale socket {}", path.display()))?;
        }
    }
    UnixListener::bind(path).with_context(|| format!("binding control socket {}", path.display()))
}

/// Accepts clients forever, passing each request line to `requests`.
pub async fn serve(listener: UnixListener, requests: mpsc::Sender<Request>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let requests = requests.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let mut reader = tokio::io::BufReader::new(read);
            if reader.read_line(&mut line).await.is_err() {
                return;
            }
            let (reply, answer) = oneshot::channel();
            let (stream, mut lines) = mpsc::channel::<String>(STREAM_QUEUE);
            let request = Request {
                command: line.trim().to_owned(),
                reply,
                stream,
            };
            if requests.send(request).await.is_err() {
                return;
            }
            let Ok(text) = answer.await else {
                return;
            };
            if write.write_all(text.as_bytes()).await.is_err() {
                return;
            }
            // Streamed lines until the agent drops the stream or the client hangs up (EOF or
            // an error on its side of the socket).
            let mut rest = [0u8; 256];
            loop {
                tokio::select! {
                    line = lines.recv() => {
                        let Some(mut line) = line else { break };
                        line.push('\n');
                        if write.write_all(line.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    read = reader.read(&mut rest) => {
                        if matches!(read, Ok(0) | Err(_)) {
                            return;
                        }
                    }
                }
            }
            let _ = write.shutdown().await;
        });
    }
}

/// Client side: sends `command` and returns the whole reply.
pub fn request(socket: &Path, command: &str) -> anyhow::Result<String> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the agent on {} (is `dataplane agent` running? give --socket if it \
             uses another)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    writeln!(stream, "{command}")?;
    let mut reply = String::new();
    BufReader::new(&mut stream)
        .read_to_string(&mut reply)
        .context("reading the agent's reply")?;
    Ok(reply)
}

/// Removes the socket file when the agent stops, if it is still the one this agent bound.
pub struct SocketFile {
    path: PathBuf,
    inode: Option<u64>,
}

impl SocketFile {
    pub fn new(path: PathBuf) -> SocketFile {
        use std::os::unix::fs::MetadataExt as _;
        let inode = std::fs::symlink_metadata(&path).ok().map(|m| m.ino());
        SocketFile { path, inode }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt as _;
        let now = std::fs::symlink_metadata(&self.path).ok().map(|m| m.ino());
        if now.is_some() && now == self.inode {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
