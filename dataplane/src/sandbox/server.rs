//! The tiny server every sandbox container runs (`dataplane sandbox serve`, hidden).
//!
//! It answers TCP and UDP with `{name} {peer_ip}:{peer_port}\n`, so a test sees both which
//! container answered (load balancing, port publishing) and which source address the container
//! saw (published ports must preserve the client's address, masquerade must not apply between
//! containers). TCP speaks just enough HTTP/1.1 with keep-alive for curl and wrk; anything
//! else (nc, a silent client) gets the bare reply line.
//!
//! Plain std threads: the sandbox runs one copy per container and a benchmark needs thousands of
//! connections per second, not tens of thousands of concurrent ones.

use std::{
    io::{self, BufRead, BufReader, ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;

/// How long a new TCP connection may stay silent before it gets the bare reply line: long
/// enough for an HTTP client's request to arrive, short enough for `nc </dev/null`.
const FIRST_DATA_WAIT: Duration = Duration::from_millis(300);
/// An idle keep-alive connection is closed after this, so forgotten clients free their thread.
const KEEP_ALIVE_IDLE: Duration = Duration::from_secs(60);
/// After the bare reply, how long to read (and drop) what the client still sends. Closing a
/// socket with unread data makes the kernel send RST, which can destroy the reply in flight.
const DRAIN_FOR: Duration = Duration::from_millis(200);
/// Headers longer than this end the connection (nobody legitimate sends them here).
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Per-connection thread stack: the handler needs little, and small stacks make thread creation
/// cheaper when a benchmark opens thousands of connections per second.
const CONNECTION_STACK: usize = 128 * 1024;
/// Accept queue length asked for (the kernel caps it at net.core.somaxconn); std's default of
/// 128 overflows under bursts of new connections from a load generator.
const LISTEN_BACKLOG: libc::c_int = 4096;

/// `dataplane sandbox serve`: the arguments the sandbox passes.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// The container's name, sent back in every reply.
    #[arg(long)]
    pub name: String,
    /// TCP ports to listen on, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub tcp: Vec<u16>,
    /// UDP ports to listen on, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub udp: Vec<u16>,
    /// Listen on [::] too (IPv6 only there, so IPv4 clients keep showing as IPv4).
    #[arg(long)]
    pub ipv6: bool,
}

/// Binds every port on 0.0.0.0, says "ready" on stdout (the sandbox waits for that line), and
/// serves until killed.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let name: Arc<str> = Arc::from(args.name.as_str());
    let mut threads = Vec::new();
    for port in dedup(&args.tcp) {
        let listener = TcpListener::bind(("0.0.0.0", port))
            .with_context(|| format!("binding TCP port {port}"))?;
        raise_backlog(&listener);
        println!("{name}: serving tcp/{port}");
        threads.push(spawn_tcp(listener, name.clone())?);
        if args.ipv6 {
            let listener = TcpListener::from(
                bind_v6only(port, libc::SOCK_STREAM)
                    .with_context(|| format!("binding TCP port [::]:{port}"))?,
            );
            raise_backlog(&listener);
            threads.push(spawn_tcp(listener, name.clone())?);
        }
    }
    for port in dedup(&args.udp) {
        let socket = UdpSocket::bind(("0.0.0.0", port))
            .with_context(|| format!("binding UDP port {port}"))?;
        println!("{name}: serving udp/{port}");
        threads.push(spawn_udp(socket, name.clone())?);
        if args.ipv6 {
            let socket = UdpSocket::from(
                bind_v6only(port, libc::SOCK_DGRAM)
                    .with_context(|| format!("binding UDP port [::]:{port}"))?,
            );
            threads.push(spawn_udp(socket, name.clone())?);
        }
    }
    println!("{name}: ready");
    io::stdout().flush().ok();
    for thread in threads {
        // The loops only end on a panic; keep serving the other ports regardless.
        let _ = thread.join();
    }
    Ok(())
}

/// A socket of `kind` bound to [::]:`port` with IPV6_V6ONLY (beside the one on 0.0.0.0,
/// which a dual-stack socket would collide with), listening if it is a stream socket.
fn bind_v6only(port: u16, kind: libc::c_int) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    // SAFETY: plain socket syscalls; the descriptor is owned by the OwnedFd from creation on,
    // and every pointer passed points at a live local of the size given.
    unsafe {
        let fd = libc::socket(libc::AF_INET6, kind | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let owned = OwnedFd::from_raw_fd(fd);
        let one: libc::c_int = 1;
        for option in [
            (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY),
            (libc::SOL_SOCKET, libc::SO_REUSEADDR),
        ] {
            if libc::setsockopt(
                fd,
                option.0,
                option.1,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        let mut addr: libc::sockaddr_in6 = std::mem::zeroed();
        addr.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        addr.sin6_port = port.to_be();
        if libc::bind(
            fd,
            (&addr as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        if kind == libc::SOCK_STREAM && libc::listen(fd, LISTEN_BACKLOG) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(owned)
    }
}

fn dedup(ports: &[u16]) -> Vec<u16> {
    let mut ports = ports.to_vec();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Re-issues listen(2) with a larger backlog; calling it on a listening socket only updates the
/// queue length. Best effort: the default still works, just with a shorter queue.
fn raise_backlog(listener: &TcpListener) {
    // SAFETY: the descriptor belongs to `listener`, which outlives the call; listen(2) neither
    // takes ownership of it nor touches memory.
    let rc = unsafe { libc::listen(listener.as_raw_fd(), LISTEN_BACKLOG) };
    if rc != 0 {
        log::warn!("raising the listen backlog: {}", io::Error::last_os_error());
    }
}

/// The line every reply carries.
fn reply_line(name: &str, peer: SocketAddr) -> String {
    format!("{name} {}:{}\n", peer.ip(), peer.port())
}

/// Accepts connections on `listener` forever, one thread per connection.
pub fn spawn_tcp(listener: TcpListener, name: Arc<str>) -> io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name(format!("tcp-{}", listener.local_addr()?.port()))
        .spawn(move || {
            loop {
                let (stream, peer) = match listener.accept() {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Typically EMFILE under overload: back off instead of spinning.
                        log::warn!("accept: {e}");
                        thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                let name = name.clone();
                let spawned =
                    thread::Builder::new()
                        .stack_size(CONNECTION_STACK)
                        .spawn(move || {
                            if let Err(e) = handle_connection(stream, peer, &name) {
                                log::debug!("connection from {peer}: {e}");
                            }
                        });
                if let Err(e) = spawned {
                    // Dropping the stream (moved into the failed closure) closes the connection.
                    log::warn!("no thread for a connection from {peer}: {e}");
                }
            }
        })
}

/// Answers every datagram on `socket` with the reply line, forever.
pub fn spawn_udp(socket: UdpSocket, name: Arc<str>) -> io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name(format!("udp-{}", socket.local_addr()?.port()))
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match socket.recv_from(&mut buf) {
                    Ok((_, peer)) => {
                        if let Err(e) = socket.send_to(reply_line(&name, peer).as_bytes(), peer) {
                            log::debug!("udp reply to {peer}: {e}");
                        }
                    }
                    Err(e) => {
                        log::warn!("udp receive: {e}");
                        thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        })
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Whether the first bytes of a connection look like an HTTP request line: an uppercase method
/// and a space. A prefix that is still all uppercase letters (the rest not yet arrived) counts.
fn looks_like_http(first: &[u8]) -> bool {
    let method_len = first.iter().take_while(|b| b.is_ascii_uppercase()).count();
    match first.get(method_len) {
        Some(b' ') => (1..=16).contains(&method_len),
        Some(_) => false,
        None => method_len >= 1,
    }
}

fn handle_connection(stream: TcpStream, peer: SocketAddr, name: &str) -> io::Result<()> {
    let reply = reply_line(name, peer);
    stream.set_read_timeout(Some(FIRST_DATA_WAIT))?;
    let mut reader = BufReader::with_capacity(4096, stream.try_clone()?);
    let http = match reader.fill_buf() {
        Ok(first) => looks_like_http(first),
        Err(e) if is_timeout(&e) => false,
        Err(e) => return Err(e),
    };
    if http {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(KEEP_ALIVE_IDLE))?;
        serve_http(reader, &stream, &reply)
    } else {
        plain_reply(reader, &stream, &reply)
    }
}

/// Writes the bare reply, half-closes, then reads briefly so that closing does not reset the
/// connection while the reply is still in flight.
fn plain_reply(
    mut reader: BufReader<TcpStream>,
    mut stream: &TcpStream,
    reply: &str,
) -> io::Result<()> {
    stream.write_all(reply.as_bytes())?;
    stream.shutdown(Shutdown::Write)?;
    let deadline = Instant::now() + DRAIN_FOR;
    let mut sink = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        stream.set_read_timeout(Some(left))?;
        match reader.read(&mut sink) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if is_timeout(&e) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// One parsed request head: just what decides the connection's fate.
#[derive(Debug, Default, PartialEq)]
struct RequestHead {
    keep_alive: bool,
    body_len: u64,
}

/// Reads one request head (up to the empty line). `None` at a clean end of the connection.
fn read_head(reader: &mut impl BufRead, line: &mut Vec<u8>) -> io::Result<Option<RequestHead>> {
    let mut head = RequestHead::default();
    let mut total = 0;
    let mut first_line = true;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', line)?;
        if n == 0 {
            return if first_line && total == 0 {
                Ok(None)
            } else {
                Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "request head cut short",
                ))
            };
        }
        total += n;
        if total > MAX_HEADER_BYTES {
            return Err(io::Error::new(
                ErrorKind::InvalidData,
                "request head too long",
            ));
        }
        let text = trim_line_end(line);
        if first_line {
            if text.is_empty() {
                // Tolerate stray empty lines between requests (RFC 9112 section 2.2).
                continue;
            }
            first_line = false;
            // HTTP/1.1 keeps the connection by default, HTTP/1.0 closes it.
            head.keep_alive = !text.ends_with(b"HTTP/1.0");
            continue;
        }
        if text.is_empty() {
            return Ok(Some(head));
        }
        let Some(colon) = text.iter().position(|b| *b == b':') else {
            continue;
        };
        let (key, value) = (&text[..colon], trim_ascii(&text[colon + 1..]));
        if key.eq_ignore_ascii_case(b"connection") {
            if value.eq_ignore_ascii_case(b"close") {
                head.keep_alive = false;
            } else if value.eq_ignore_ascii_case(b"keep-alive") {
                head.keep_alive = true;
            }
        } else if key.eq_ignore_ascii_case(b"content-length") {
            head.body_len = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| io::Error::new(ErrorKind::InvalidData, "bad Content-Length"))?;
        }
    }
}

fn trim_line_end(line: &[u8]) -> &[u8] {
    let mut end = line.len();
    while end > 0 && matches!(line[end - 1], b'\n' | b'\r') {
        end -= 1;
    }
    &line[..end]
}

fn trim_ascii(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &bytes[start..end]
}

/// Serves requests on one connection until the client closes it, asks to, or idles out. The
/// response is the same for every request on a connection, so it is formatted once.
fn serve_http(mut reader: impl BufRead, mut stream: &TcpStream, reply: &str) -> io::Result<()> {
    let keep = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{reply}",
        reply.len()
    );
    let close = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n{reply}",
        reply.len()
    );
    let mut line = Vec::with_capacity(256);
    loop {
        let head = match read_head(&mut reader, &mut line) {
            Ok(Some(head)) => head,
            Ok(None) => return Ok(()),
            Err(e) if is_timeout(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        // Bodies are ignored, but must be consumed so they are not taken for the next request.
        let skipped = io::copy(&mut (&mut reader).take(head.body_len), &mut io::sink())?;
        if skipped < head.body_len {
            return Ok(());
        }
        if head.keep_alive {
            stream.write_all(keep.as_bytes())?;
        } else {
            stream.write_all(close.as_bytes())?;
            stream.shutdown(Shutdown::Write)?;
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server for `name` on ephemeral loopback ports: (tcp address, udp address).
    fn start(name: &str) -> (SocketAddr, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addrs = (listener.local_addr().unwrap(), socket.local_addr().unwrap());
        spawn_tcp(listener, Arc::from(name)).unwrap();
        spawn_udp(socket, Arc::from(name)).unwrap();
        addrs
    }

    fn connect(addr: SocketAddr) -> TcpStream {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream
    }

    /// Reads one HTTP response with a Content-Length; returns (head, body).
    fn read_response(reader: &mut BufReader<TcpStream>) -> (String, String) {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            assert!(
                reader.read_line(&mut line).unwrap() > 0,
                "response cut short: {head:?}"
            );
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .expect("a Content-Length header")
            .trim()
            .parse()
            .unwrap();
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body).unwrap();
        (head, String::from_utf8(body).unwrap())
    }

    #[test]
    fn silent_tcp_client_gets_the_reply_line() {
        let (tcp, _) = start("web1");
        let mut stream = connect(tcp);
        let local = stream.local_addr().unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        assert_eq!(text, format!("web1 127.0.0.1:{}\n", local.port()));
    }

    #[test]
    fn non_http_data_gets_the_reply_line() {
        let (tcp, _) = start("db");
        let mut stream = connect(tcp);
        let local = stream.local_addr().unwrap();
        stream.write_all(b"hello\n").unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        assert_eq!(text, format!("db 127.0.0.1:{}\n", local.port()));
    }

    #[test]
    fn http_keep_alive_serves_several_requests_on_one_connection() {
        let (tcp, _) = start("web2");
        let stream = connect(tcp);
        let local = stream.local_addr().unwrap();
        let expected = format!("web2 127.0.0.1:{}\n", local.port());
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut writer = &stream;
        // The second request carries a body that must not be taken for a third request.
        writer
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let (head, body) = read_response(&mut reader);
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("Content-Type: text/plain\r\n"), "{head}");
        assert_eq!(body, expected);
        writer
            .write_all(b"POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nGET /")
            .unwrap();
        let (_, body) = read_response(&mut reader);
        assert_eq!(body, expected);
        writer
            .write_all(b"GET /last HTTP/1.1\r\nconnection: Close\r\n\r\n")
            .unwrap();
        let (head, body) = read_response(&mut reader);
        assert!(head.contains("Connection: close\r\n"), "{head}");
        assert_eq!(body, expected);
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "the server closed after Connection: close");
    }

    #[test]
    fn http_1_0_closes_after_one_response() {
        let (tcp, _) = start("web3");
        let mut stream = connect(tcp);
        stream.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.ends_with(&format!(
            "\r\n\r\nweb3 127.0.0.1:{}\n",
            stream.local_addr().unwrap().port()
        )));
    }

    #[test]
    fn udp_datagrams_get_the_reply_line() {
        let (_, udp) = start("dns");
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let local = client.local_addr().unwrap();
        for _ in 0..2 {
            client.send_to(b"ping", udp).unwrap();
            let mut buf = [0u8; 256];
            let (n, from) = client.recv_from(&mut buf).unwrap();
            assert_eq!(from, udp);
            assert_eq!(
                std::str::from_utf8(&buf[..n]).unwrap(),
                format!("dns 127.0.0.1:{}\n", local.port())
            );
        }
    }

    #[test]
    fn http_detection() {
        assert!(looks_like_http(b"GET / HTTP/1.1\r\n"));
        assert!(looks_like_http(b"OPTIONS * HTTP/1.1\r\n"));
        assert!(looks_like_http(b"GE"));
        assert!(!looks_like_http(b"hello"));
        assert!(!looks_like_http(b"Get / HTTP/1.1"));
        assert!(!looks_like_http(b" GET"));
        assert!(!looks_like_http(b""));
    }
}
