//! A small client of the Docker Engine API over its unix socket: hand-written HTTP/1.1 GETs
//! (one connection per request), bodies with Content-Length, chunked or read to the end, and
//! the `/events` stream of newline-separated JSON objects. Only the fields the dataplane uses
//! are decoded; everything else the engine sends is ignored.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, de::DeserializeOwned};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixStream,
};

/// The API version the client speaks: dockerd 20.10's. Newer engines accept it; an older
/// engine is spoken to in its own version (every field used here exists since 1.24).
pub const API_VERSION: (u32, u32) = (1, 41);
const OLDEST_API_VERSION: (u32, u32) = (1, 24);
/// How long one request (not the event stream) may take, connect to last byte.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Limits that keep a confused peer from making the agent allocate without bound.
const MAX_HEADER_BYTES: usize = 64 * 1024;
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("cannot connect to the Docker engine at {socket}: {source}")]
    Connect {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("GET {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("GET {path}: no answer within {REQUEST_TIMEOUT:?}")]
    Timeout { path: String },
    #[error("GET {path}: the engine answered {status}: {message}")]
    Status {
        path: String,
        status: u16,
        message: String,
    },
    #[error("GET {path}: not a valid HTTP response: {message}")]
    Protocol { path: String, message: String },
    #[error("GET {path}: cannot decode the engine's JSON: {source}")]
    Decode {
        path: String,
        source: serde_json::Error,
    },
    #[error("the engine speaks API {version}; this agent needs at least 1.24")]
    TooOld { version: String },
}

impl DockerError {
    /// The engine does not know the object (e.g. a container removed meanwhile).
    pub fn is_not_found(&self) -> bool {
        matches!(self, DockerError::Status { status: 404, .. })
    }
}

fn protocol(path: &str, message: impl Into<String>) -> DockerError {
    DockerError::Protocol {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// The engine's API on a unix socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    /// `/v1.41`, or the engine's own version when it is older.
    prefix: String,
}

impl Client {
    pub fn new(socket: &Path) -> Client {
        Client {
            socket: socket.to_owned(),
            prefix: format!("/v{}.{}", API_VERSION.0, API_VERSION.1),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Pings the engine and settles the API version: ours, or the engine's when it is older.
    pub async fn negotiate(&mut self) -> Result<String, DockerError> {
        let response = self.get_raw("/_ping").await?;
        let version = response
            .header("api-version")
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{}.{}", API_VERSION.0, API_VERSION.1));
        let parsed = version
            .split_once('.')
            .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)));
        let chosen = match parsed {
            Some(v) if v < OLDEST_API_VERSION => return Err(DockerError::TooOld { version }),
            Some(v) if v < API_VERSION => v,
            _ => API_VERSION,
        };
        self.prefix = format!("/v{}.{}", chosen.0, chosen.1);
        Ok(version)
    }

    /// GET `path` (below the version prefix) and decode the JSON body.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, DockerError> {
        let full = format!("{}{path}", self.prefix);
        let response = self.get_raw(&full).await?;
        serde_json::from_slice(&response.body)
            .map_err(|source| DockerError::Decode { path: full, source })
    }

    pub async fn containers(&self) -> Result<Vec<ContainerSummary>, DockerError> {
        self.get("/containers/json").await
    }

    pub async fn inspect_container(&self, id: &str) -> Result<ContainerInspect, DockerError> {
        self.get(&format!("/containers/{}/json", encode(id))).await
    }

    pub async fn networks(&self) -> Result<Vec<NetworkInspect>, DockerError> {
        self.get("/networks").await
    }

    /// Opens the event stream of containers and networks, from now on.
    pub async fn events(&self) -> Result<EventStream, DockerError> {
        let filters = r#"{"type":["container","network"]}"#;
        let path = format!("{}/events?filters={}", self.prefix, encode(filters));
        let (reader, head) = tokio::time::timeout(REQUEST_TIMEOUT, self.open(&path))
            .await
            .map_err(|_| DockerError::Timeout { path: path.clone() })??;
        if head.status != 200 {
            // An error has a short body; read it for the message.
            let body = tokio::time::timeout(REQUEST_TIMEOUT, read_body(reader, &head, &path))
                .await
                .map_err(|_| DockerError::Timeout { path: path.clone() })??;
            return Err(status_error(&path, head.status, &body));
        }
        Ok(EventStream {
            body: BodyReader::new(reader, &head),
            path,
            pending: Vec::new(),
        })
    }

    async fn get_raw(&self, path: &str) -> Result<Response, DockerError> {
        let request = async {
            let (reader, head) = self.open(path).await?;
            let body = read_body(reader, &head, path).await?;
            Ok::<_, DockerError>(Response { head, body })
        };
        let response = tokio::time::timeout(REQUEST_TIMEOUT, request)
            .await
            .map_err(|_| DockerError::Timeout {
                path: path.to_owned(),
            })??;
        if !(200..300).contains(&response.head.status) {
            return Err(status_error(path, response.head.status, &response.body));
        }
        Ok(response)
    }

    /// Connects, sends the request and reads the status line and headers.
    async fn open(&self, path: &str) -> Result<(BufReader<UnixStream>, Head), DockerError> {
        let mut stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| DockerError::Connect {
                    socket: self.socket.clone(),
                    source,
                })?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: docker\r\nUser-Agent: dataplane/{}\r\n\
             Accept: application/json\r\nConnection: close\r\n\r\n",
            env!("CARGO_PKG_VERSION")
        );
        let io = |source| DockerError::Io {
            path: path.to_owned(),
            source,
        };
        stream.write_all(request.as_bytes()).await.map_err(io)?;
        let mut reader = BufReader::new(stream);
        let head = read_head(&mut reader, path).await?;
        Ok((reader, head))
    }
}

fn status_error(path: &str, status: u16, body: &[u8]) -> DockerError {
    #[derive(Deserialize)]
    struct Message {
        message: String,
    }
    let message = serde_json::from_slice::<Message>(body)
        .map(|m| m.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).trim().to_owned());
    DockerError::Status {
        path: path.to_owned(),
        status,
        message,
    }
}

/// Percent-encodes everything but unreserved characters (RFC 3986), for a path segment or a
/// query value.
pub fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 responses.

#[derive(Debug)]
struct Head {
    status: u16,
    /// Header names in lower case.
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn chunked(&self) -> bool {
        self.header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    }

    fn content_length(&self) -> Option<usize> {
        self.header("content-length")?.trim().parse().ok()
    }
}

#[derive(Debug)]
struct Response {
    head: Head,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.header(name)
    }
}

/// Reads one CRLF- (or LF-) terminated line; None at the end of the stream.
async fn read_line<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    path: &str,
    limit: usize,
) -> Result<Option<String>, DockerError> {
    let mut line = Vec::new();
    let n = (&mut *reader)
        .take(limit as u64 + 1)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|source| DockerError::Io {
            path: path.to_owned(),
            source,
        })?;
    if n == 0 {
        return Ok(None);
    }
    if !line.ends_with(b"\n") {
        return Err(protocol(
            path,
            if n > limit {
                format!("a line longer than {limit} bytes")
            } else {
                "the connection closed in the middle of a line".to_owned()
            },
        ));
    }
    while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        line.pop();
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| protocol(path, "a header line that is not UTF-8"))
}

async fn read_head<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    path: &str,
) -> Result<Head, DockerError> {
    let status_line = read_line(reader, path, MAX_HEADER_BYTES)
        .await?
        .ok_or_else(|| protocol(path, "the engine closed the connection without answering"))?;
    // "HTTP/1.1 200 OK"
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let status = parts.next().and_then(|s| s.parse::<u16>().ok());
    let status = match (version.starts_with("HTTP/1."), status) {
        (true, Some(status)) => status,
        _ => return Err(protocol(path, format!("status line {status_line:?}"))),
    };
    let mut headers = Vec::new();
    let mut total = status_line.len();
    loop {
        let line = read_line(reader, path, MAX_HEADER_BYTES)
            .await?
            .ok_or_else(|| protocol(path, "the connection closed inside the headers"))?;
        if line.is_empty() {
            break;
        }
        total += line.len();
        if total > MAX_HEADER_BYTES {
            return Err(protocol(
                path,
                format!("headers longer than {MAX_HEADER_BYTES} bytes"),
            ));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| protocol(path, format!("header line {line:?}")))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    Ok(Head { status, headers })
}

/// How a body is framed, and what is left of it.
#[derive(Debug)]
enum Framing {
    Chunked { done: bool },
    Length(usize),
    UntilClose { done: bool },
}

/// Reads a response body piece by piece: chunk by chunk, or as bytes arrive.
struct BodyReader<R> {
    reader: BufReader<R>,
    framing: Framing,
}

impl<R: AsyncRead + Unpin> BodyReader<R> {
    fn new(reader: BufReader<R>, head: &Head) -> BodyReader<R> {
        let framing = if head.chunked() {
            Framing::Chunked { done: false }
        } else if let Some(length) = head.content_length() {
            Framing::Length(length)
        } else {
            Framing::UntilClose { done: false }
        };
        BodyReader { reader, framing }
    }

    /// The next piece of the body; None at its end.
    async fn next(&mut self, path: &str) -> Result<Option<Vec<u8>>, DockerError> {
        let io = |source| DockerError::Io {
            path: path.to_owned(),
            source,
        };
        match &mut self.framing {
            Framing::Chunked { done: true }
            | Framing::UntilClose { done: true }
            | Framing::Length(0) => Ok(None),
            Framing::Chunked { done } => {
                let line = read_line(&mut self.reader, path, 1024)
                    .await?
                    .ok_or_else(|| protocol(path, "the connection closed before the last chunk"))?;
                // "1a2" or "1a2;extension"
                let size_text = line.split(';').next().unwrap_or_default().trim();
                let size = usize::from_str_radix(size_text, 16)
                    .map_err(|_| protocol(path, format!("chunk size line {line:?}")))?;
                if size == 0 {
                    // Trailers, if any, up to the empty line.
                    while let Some(trailer) = read_line(&mut self.reader, path, 8192).await? {
                        if trailer.is_empty() {
                            break;
                        }
                    }
                    *done = true;
                    return Ok(None);
                }
                if size > MAX_BODY_BYTES {
                    return Err(protocol(path, format!("a chunk of {size} bytes")));
                }
                let mut chunk = vec![0u8; size];
                self.reader.read_exact(&mut chunk).await.map_err(io)?;
                let mut crlf = [0u8; 2];
                self.reader.read_exact(&mut crlf).await.map_err(io)?;
                if &crlf != b"\r\n" {
                    return Err(protocol(path, "a chunk not followed by CRLF"));
                }
                Ok(Some(chunk))
            }
            Framing::Length(left) => {
                let mut buf = vec![0u8; (*left).min(64 * 1024)];
                let n = self.reader.read(&mut buf).await.map_err(io)?;
                if n == 0 {
                    return Err(protocol(
                        path,
                        format!("the connection closed {left} bytes before the body's end"),
                    ));
                }
                *left -= n;
                buf.truncate(n);
                Ok(Some(buf))
            }
            Framing::UntilClose { done } => {
                let mut buf = vec![0u8; 64 * 1024];
                let n = self.reader.read(&mut buf).await.map_err(io)?;
                if n == 0 {
                    *done = true;
                    return Ok(None);
                }
                buf.truncate(n);
                Ok(Some(buf))
            }
        }
    }
}

async fn read_body<R: AsyncRead + Unpin>(
    reader: BufReader<R>,
    head: &Head,
    path: &str,
) -> Result<Vec<u8>, DockerError> {
    if head.content_length().is_some_and(|l| l > MAX_BODY_BYTES) {
        return Err(protocol(path, "a body larger than 64 MiB"));
    }
    let mut body_reader = BodyReader::new(reader, head);
    let mut body = Vec::new();
    while let Some(piece) = body_reader.next(path).await? {
        body.extend_from_slice(&piece);
        if body.len() > MAX_BODY_BYTES {
            return Err(protocol(path, "a body larger than 64 MiB"));
        }
    }
    Ok(body)
}

// ---------------------------------------------------------------------------------------------
// Events.

/// The engine's event stream: one JSON object per line, in chunks that need not follow lines.
pub struct EventStream<R = UnixStream> {
    body: BodyReader<R>,
    path: String,
    /// Bytes received after the last complete line.
    pending: Vec<u8>,
}

impl<R: AsyncRead + Unpin> EventStream<R> {
    /// The next event; None when the engine ended the stream (e.g. it is shutting down).
    /// Not cancel-safe: run it in a task of its own.
    pub async fn next(&mut self) -> Result<Option<Event>, DockerError> {
        loop {
            if let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                let line = line.trim_ascii();
                if line.is_empty() {
                    continue;
                }
                return serde_json::from_slice(line).map(Some).map_err(|source| {
                    DockerError::Decode {
                        path: self.path.clone(),
                        source,
                    }
                });
            }
            match self.body.next(&self.path).await? {
                Some(piece) => {
                    self.pending.extend_from_slice(&piece);
                    if self.pending.len() > MAX_BODY_BYTES {
                        return Err(protocol(&self.path, "an event longer than 64 MiB"));
                    }
                }
                None => {
                    // A last object without a newline still counts.
                    let rest = std::mem::take(&mut self.pending);
                    let rest = rest.trim_ascii();
                    if rest.is_empty() {
                        return Ok(None);
                    }
                    return serde_json::from_slice(rest).map(Some).map_err(|source| {
                        DockerError::Decode {
                            path: self.path.clone(),
                            source,
                        }
                    });
                }
            }
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Event {
    #[serde(rename = "Type")]
    pub kind: String,
    #[serde(rename = "Action")]
    pub action: String,
    #[serde(rename = "Actor")]
    pub actor: Actor,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Actor {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(rename = "Attributes")]
    pub attributes: BTreeMap<String, String>,
}

// ---------------------------------------------------------------------------------------------
// Objects (only the fields used; `null` where the engine sends it reads as empty).

/// Decodes `null` as the type's default (the engine writes null for empty maps and lists).
fn nullable<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// An entry of `GET /containers/json` (running containers).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ContainerSummary {
    #[serde(rename = "Id")]
    pub id: String,
    #[serde(rename = "Names", deserialize_with = "nullable")]
    pub names: Vec<String>,
    #[serde(rename = "State")]
    pub state: String,
}

/// `GET /containers/{id}/json`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ContainerInspect {
    #[serde(rename = "Id")]
    pub id: String,
    /// With a leading '/'.
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "State")]
    pub state: ContainerState,
    #[serde(rename = "Config")]
    pub config: ContainerConfig,
    #[serde(rename = "HostConfig")]
    pub host_config: HostConfig,
    #[serde(rename = "NetworkSettings")]
    pub network_settings: NetworkSettings,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ContainerState {
    #[serde(rename = "Running")]
    pub running: bool,
    #[serde(rename = "Pid")]
    pub pid: u32,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ContainerConfig {
    #[serde(rename = "Labels", deserialize_with = "nullable")]
    pub labels: BTreeMap<String, String>,
    /// "80/tcp" -> {}.
    #[serde(rename = "ExposedPorts", deserialize_with = "nullable")]
    pub exposed_ports: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct HostConfig {
    /// "default" (the `bridge` network), a network name, "host", "none", "container:ID".
    #[serde(rename = "NetworkMode")]
    pub network_mode: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct NetworkSettings {
    /// The container's network namespace as a file (a bind mount under dockerd's exec-root).
    #[serde(rename = "SandboxKey")]
    pub sandbox_key: String,
    /// "80/tcp" -> bindings; null for a port that is exposed but not published.
    #[serde(rename = "Ports", deserialize_with = "nullable")]
    pub ports: BTreeMap<String, Option<Vec<PortBinding>>>,
    /// By network name.
    #[serde(rename = "Networks", deserialize_with = "nullable")]
    pub networks: BTreeMap<String, EndpointSettings>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct PortBinding {
    /// "" or "0.0.0.0" for every address, "::" for every IPv6 address.
    #[serde(rename = "HostIp")]
    pub host_ip: String,
    #[serde(rename = "HostPort")]
    pub host_port: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct EndpointSettings {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "IPAddress")]
    pub ip_address: String,
    #[serde(rename = "Gateway")]
    pub gateway: String,
    #[serde(rename = "MacAddress")]
    pub mac_address: String,
}

/// An entry of `GET /networks`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct NetworkInspect {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Id")]
    pub id: String,
    /// RFC 3339; orders networks by age.
    #[serde(rename = "Created")]
    pub created: String,
    #[serde(rename = "Driver")]
    pub driver: String,
    #[serde(rename = "Internal")]
    pub internal: bool,
    #[serde(rename = "ConfigOnly")]
    pub config_only: bool,
    #[serde(rename = "IPAM")]
    pub ipam: Ipam,
    #[serde(rename = "Options", deserialize_with = "nullable")]
    pub options: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Ipam {
    #[serde(rename = "Config", deserialize_with = "nullable")]
    pub config: Vec<IpamConfig>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct IpamConfig {
    #[serde(rename = "Subnet")]
    pub subnet: String,
    #[serde(rename = "Gateway")]
    pub gateway: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `raw` to the response reader as if it came from a socket.
    async fn parse(raw: &[u8]) -> Result<(Head, Vec<u8>), DockerError> {
        let mut reader = BufReader::new(raw);
        let head = read_head(&mut reader, "/test").await?;
        let body = read_body(reader, &head, "/test").await?;
        Ok((head, body))
    }

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn content_length_body() {
        // As dockerd 20.10 answers GET /_ping.
        let raw = b"HTTP/1.1 200 OK\r\nApi-Version: 1.41\r\nContent-Length: 2\r\n\
                    Content-Type: text/plain; charset=utf-8\r\n\r\nOK";
        let (head, body) = run(parse(raw)).unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(head.header("api-version"), Some("1.41"));
        assert_eq!(body, b"OK");
    }

    #[test]
    fn chunked_body_with_extension_and_trailer() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                    5\r\n[1,2,\r\n3;ext=1\r\n3]\n\r\n0\r\nX-Trailer: a\r\n\r\n";
        let (_, body) = run(parse(raw)).unwrap();
        assert_eq!(body, b"[1,2,3]\n");
    }

    #[test]
    fn broken_responses_are_errors() {
        for raw in [
            &b"SSH-2.0-OpenSSH\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabc",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nBad header\r\n\r\n",
            b"",
        ] {
            assert!(
                run(parse(raw)).is_err(),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn error_status_carries_the_engine_message() {
        let raw = b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n\
                    Content-Length: 38\r\n\r\n{\"message\":\"No such container: nope\"}\n";
        let (head, body) = run(parse(raw)).unwrap();
        let err = status_error("/v1.41/containers/nope/json", head.status, &body);
        assert!(err.is_not_found());
        assert_eq!(
            err.to_string(),
            "GET /v1.41/containers/nope/json: the engine answered 404: No such container: nope"
        );
    }

    #[test]
    fn events_split_across_chunks_and_lines() {
        // Two events as dockerd 20.10 sent them (one per chunk), but re-chunked at odd places.
        let events = concat!(
            r#"{"status":"start","id":"3277","from":"bb:latest","Type":"container","Action":"start","Actor":{"ID":"3277","Attributes":{"image":"bb:latest","name":"tmp1"}},"scope":"local","time":1795599247,"timeNano":1795599247915457466}"#,
            "\n",
            r#"{"Type":"network","Action":"connect","Actor":{"ID":"3715","Attributes":{"container":"43b0","name":"net2","type":"bridge"}},"scope":"local","time":1795599247,"timeNano":1795599247959613374}"#,
            "\n"
        );
        let (a, b) = events.as_bytes().split_at(100);
        let mut raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for piece in [a, b] {
            raw.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
            raw.extend_from_slice(piece);
            raw.extend_from_slice(b"\r\n");
        }
        raw.extend_from_slice(b"0\r\n\r\n");
        let decoded = run(async {
            let mut reader = BufReader::new(&raw[..]);
            let head = read_head(&mut reader, "/events").await.unwrap();
            let mut stream = EventStream {
                body: BodyReader::new(reader, &head),
                path: "/events".into(),
                pending: Vec::new(),
            };
            let mut out = Vec::new();
            while let Some(event) = stream.next().await.unwrap() {
                out.push(event);
            }
            out
        });
        assert_eq!(decoded.len(), 2);
        assert_eq!(
            (decoded[0].kind.as_str(), decoded[0].action.as_str()),
            ("container", "start")
        );
        assert_eq!(decoded[0].actor.id, "3277");
        assert_eq!(decoded[1].action, "connect");
        assert_eq!(decoded[1].actor.attributes["container"], "43b0");
    }

    #[test]
    fn encode_keeps_unreserved() {
        assert_eq!(
            encode(r#"{"type":["container"]}"#),
            "%7B%22type%22%3A%5B%22container%22%5D%7D"
        );
        assert_eq!(encode("abc-1.2_~"), "abc-1.2_~");
    }
}
