//! A small HTTP/1.1 client: what the registry protocol needs and no more.
//!
//! One connection per request (`Connection: close`), plain TCP or TLS (rustls, with the Mozilla
//! roots built in plus the host's CA bundle), bodies delimited by `Content-Length`, chunked
//! transfer-encoding or the end of the connection, and redirects for GET/HEAD (registries send
//! blob downloads to object storage) that drop the `Authorization` header when they leave the
//! origin. No thread, no async runtime: plyroot creates user namespaces later in the same
//! process, which a second thread would make fail.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A registry that sends nothing for this long is gone; the command fails instead of hanging.
const IO_TIMEOUT: Duration = Duration::from_secs(120);
const MAX_HEADER_BYTES: usize = 64 * 1024;
const MAX_REDIRECTS: usize = 10;

#[derive(Debug, thiserror::Error)]
pub(crate) enum HttpError {
    #[error("{url} is not a URL plyroot can fetch: {reason}")]
    Url { url: String, reason: &'static str },
    #[error("cannot resolve {host}")]
    Resolve {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot connect to {host}")]
    Connect {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("TLS with {host} failed{hint}")]
    Tls {
        host: String,
        hint: String,
        #[source]
        source: io::Error,
    },
    #[error("{method} {url} failed")]
    Io {
        method: String,
        url: String,
        #[source]
        source: io::Error,
    },
    #[error("{method} {url}: malformed response: {reason}")]
    Malformed { method: String, url: String, reason: String },
    #[error("{url}: more than {MAX_REDIRECTS} redirects")]
    Redirects { url: String },
}

/// An `http://` or `https://` URL, split the way a request needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Url {
    pub tls: bool,
    /// As written, with brackets around an IPv6 address.
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Url {
    pub(crate) fn parse(s: &str) -> Result<Url, HttpError> {
        let err = |reason| HttpError::Url { url: s.to_owned(), reason };
        let (tls, rest) = if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(err("only http:// and https:// are supported"));
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
        let (host, port) = match authority.rfind(':') {
            Some(i) if !authority[i..].contains(']') => {
                let port = authority[i + 1..].parse().map_err(|_| err("the port is not a number"))?;
                (&authority[..i], port)
            }
            _ => (authority, if tls { 443 } else { 80 }),
        };
        if host.is_empty() || host.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
            return Err(err("no host"));
        }
        let path = if path.starts_with('?') { format!("/{path}") } else { path.to_owned() };
        let path = path.split('#').next().unwrap_or("/").to_owned();
        Ok(Url { tls, host: host.to_owned(), port, path })
    }

    /// Resolves a `Location` header against this URL.
    pub(crate) fn join(&self, location: &str) -> Result<Url, HttpError> {
        if location.starts_with("http://") || location.starts_with("https://") {
            return Url::parse(location);
        }
        if let Some(rest) = location.strip_prefix("//") {
            return Url::parse(&format!("{}://{rest}", if self.tls { "https" } else { "http" }));
        }
        let mut u = self.clone();
        if location.starts_with('/') {
            u.path = location.to_owned();
        } else {
            let base = self.path.split('?').next().unwrap_or("/");
            let dir = &base[..base.rfind('/').map_or(0, |i| i + 1)];
            u.path = format!("{}{location}", if dir.is_empty() { "/" } else { dir });
        }
        Ok(u)
    }

    fn same_origin(&self, other: &Url) -> bool {
        self.tls == other.tls && self.host.eq_ignore_ascii_case(&other.host) && self.port == other.port
    }

    /// `host[:port]`, the port left out when it is the scheme's default.
    pub(crate) fn authority(&self) -> String {
        if self.port == if self.tls { 443 } else { 80 } {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Signed storage URLs carry credentials in the query: show the path only.
        let path = self.path.split('?').next().unwrap_or("/");
        write!(f, "{}://{}{path}", if self.tls { "https" } else { "http" }, self.authority())
    }
}

/// What a request sends.
pub(crate) enum Body<'a> {
    Empty,
    Bytes(&'a [u8]),
    /// A file from its current offset, this many bytes.
    File(&'a mut File, u64),
}

/// A response whose body is read through `Read`.
pub(crate) struct Response {
    pub status: u16,
    /// Where the response came from (after redirects).
    pub url: Url,
    pub method: String,
    headers: Vec<(String, String)>,
    body: BodyReader,
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Response").field("status", &self.status).field("url", &self.url.to_string()).finish_non_exhaustive()
    }
}

impl Response {
    /// The first header of that name (case-insensitive).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub(crate) fn content_length(&self) -> Option<u64> {
        self.header("content-length").and_then(|v| v.trim().parse().ok())
    }

    /// The whole body, refusing more than `limit` bytes.
    pub(crate) fn bytes(mut self, limit: u64) -> Result<Vec<u8>, HttpError> {
        let mut buf = Vec::new();
        let method = self.method.clone();
        let url = self.url.to_string();
        (&mut self).take(limit + 1).read_to_end(&mut buf).map_err(|source| HttpError::Io { method: method.clone(), url: url.clone(), source })?;
        if buf.len() as u64 > limit {
            return Err(HttpError::Malformed { method, url, reason: format!("the body is larger than {limit} bytes") });
        }
        Ok(buf)
    }

    /// The start of the body, for an error message; never fails.
    pub(crate) fn snippet(self) -> String {
        let text = self.bytes(64 * 1024).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        if text.chars().count() > 300 {
            format!("{}…", text.chars().take(300).collect::<String>())
        } else {
            text
        }
    }
}

impl Read for Response {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.body.read(buf)
    }
}

/// Sends a request, following redirects for GET and HEAD. `headers` are sent as given, except
/// `Authorization`, which is dropped once a redirect leaves the first URL's origin.
pub(crate) fn fetch(method: &str, url: &Url, headers: &[(&str, String)], mut body: Body<'_>) -> Result<Response, HttpError> {
    let mut url = url.clone();
    let origin = url.clone();
    for _ in 0..=MAX_REDIRECTS {
        let same = url.same_origin(&origin);
        let hs: Vec<(&str, String)> = headers.iter().filter(|(k, _)| same || !k.eq_ignore_ascii_case("authorization")).cloned().collect();
        let resp = send(method, &url, &hs, &mut body)?;
        let redirect = matches!(resp.status, 301 | 302 | 303 | 307 | 308) && matches!(method, "GET" | "HEAD");
        if !redirect {
            return Ok(resp);
        }
        let Some(location) = resp.header("location") else { return Ok(resp) };
        let next = url.join(location)?;
        crate::diag::debug!("{method} {url}: redirected to {next}");
        url = next;
    }
    Err(HttpError::Redirects { url: origin.to_string() })
}

/// One request on a fresh connection.
fn send(method: &str, url: &Url, headers: &[(&str, String)], body: &mut Body<'_>) -> Result<Response, HttpError> {
    let io_err = |source| HttpError::Io { method: method.to_owned(), url: url.to_string(), source };
    let stream = connect(url)?;
    let mut stream = BufReader::with_capacity(256 * 1024, stream);
    let mut head = format!("{method} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: plyroot/{}\r\nConnection: close\r\n", url.path, url.authority(), env!("CARGO_PKG_VERSION"));
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    match body {
        Body::Empty if matches!(method, "POST" | "PUT" | "PATCH") => head.push_str("Content-Length: 0\r\n"),
        Body::Empty => {}
        Body::Bytes(b) => head.push_str(&format!("Content-Length: {}\r\n", b.len())),
        Body::File(_, n) => head.push_str(&format!("Content-Length: {n}\r\n")),
    }
    head.push_str("\r\n");
    let w = stream.get_mut();
    w.write_all(head.as_bytes()).map_err(io_err)?;
    match body {
        Body::Empty => {}
        Body::Bytes(b) => w.write_all(b).map_err(io_err)?,
        Body::File(f, n) => {
            let copied = io::copy(&mut (&mut **f).take(*n), w).map_err(io_err)?;
            if copied != *n {
                return Err(io_err(io::Error::new(io::ErrorKind::UnexpectedEof, "the file to upload is shorter than it was")));
            }
        }
    }
    w.flush().map_err(io_err)?;

    let malformed = |reason: String| HttpError::Malformed { method: method.to_owned(), url: url.to_string(), reason };
    // Skip interim 1xx responses (100 Continue).
    let (status, headers) = loop {
        let lines = read_head(&mut stream).map_err(io_err)?;
        let status_line = lines.first().ok_or_else(|| malformed("empty response".into()))?;
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or("");
        let status: u16 = parts.next().and_then(|s| s.parse().ok()).ok_or_else(|| malformed(format!("bad status line {status_line:?}")))?;
        if !version.starts_with("HTTP/1.") {
            return Err(malformed(format!("bad status line {status_line:?}")));
        }
        let headers: Vec<(String, String)> = lines[1..]
            .iter()
            .filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned())))
            .collect();
        if (100..200).contains(&status) {
            continue;
        }
        break (status, headers);
    };
    let get = |name: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str());
    let no_body = method == "HEAD" || status == 204 || status == 304;
    let body = if no_body {
        BodyReader::Empty
    } else if get("transfer-encoding").is_some_and(|te| te.to_ascii_lowercase().contains("chunked")) {
        BodyReader::Chunked { r: stream, left: 0, done: false }
    } else if let Some(len) = get("content-length") {
        let len: u64 = len.trim().parse().map_err(|_| malformed(format!("bad Content-Length {len:?}")))?;
        BodyReader::Length { r: stream, left: len }
    } else {
        BodyReader::Eof(stream)
    };
    Ok(Response { status, url: url.clone(), method: method.to_owned(), headers, body })
}

/// Reads a response head (status line and headers) up to the empty line.
fn read_head(r: &mut impl BufRead) -> io::Result<Vec<String>> {
    let mut lines = Vec::new();
    let mut total = 0;
    loop {
        let mut line = Vec::new();
        let n = r.by_ref().take((MAX_HEADER_BYTES - total) as u64 + 1).read_until(b'\n', &mut line)?;
        total += n;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the connection closed before a complete response head"));
        }
        if total > MAX_HEADER_BYTES {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "the response head is too large"));
        }
        let line = String::from_utf8_lossy(&line).trim_end_matches(['\r', '\n']).to_owned();
        if line.is_empty() {
            if lines.is_empty() {
                continue; // stray CRLF before a status line
            }
            return Ok(lines);
        }
        lines.push(line);
    }
}

enum BodyReader {
    Empty,
    Length { r: BufReader<Stream>, left: u64 },
    Chunked { r: BufReader<Stream>, left: u64, done: bool },
    Eof(BufReader<Stream>),
}

impl Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            BodyReader::Empty => Ok(0),
            BodyReader::Length { r, left } => {
                if *left == 0 || buf.is_empty() {
                    return Ok(0);
                }
                let max = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                let n = r.read(&mut buf[..max])?;
                if n == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("the connection closed {left} bytes before the end of the body")));
                }
                *left -= n as u64;
                Ok(n)
            }
            BodyReader::Chunked { r, left, done } => {
                if *done || buf.is_empty() {
                    return Ok(0);
                }
                if *left == 0 {
                    let size = read_chunk_size(r)?;
                    if size == 0 {
                        // Trailers, up to the empty line.
                        loop {
                            let mut line = String::new();
                            if r.by_ref().take(MAX_HEADER_BYTES as u64).read_line(&mut line)? == 0 || line.trim_end().is_empty() {
                                break;
                            }
                        }
                        *done = true;
                        return Ok(0);
                    }
                    *left = size;
                }
                let max = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                let n = r.read(&mut buf[..max])?;
                if n == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the connection closed inside a chunk"));
                }
                *left -= n as u64;
                if *left == 0 {
                    let mut crlf = [0u8; 2];
                    r.read_exact(&mut crlf)?;
                    if &crlf != b"\r\n" {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "a chunk does not end with CRLF"));
                    }
                }
                Ok(n)
            }
            BodyReader::Eof(r) => match r.read(buf) {
                // A TLS peer that closes without close_notify: the body is delimited by the
                // close, and what it held is verified by digest anyway.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
                other => other,
            },
        }
    }
}

fn read_chunk_size(r: &mut impl BufRead) -> io::Result<u64> {
    let mut line = String::new();
    if r.by_ref().take(1024).read_line(&mut line)? == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the connection closed before a chunk"));
    }
    let hex = line.split(';').next().unwrap_or("").trim();
    u64::from_str_radix(hex, 16).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("bad chunk size line {:?}", line.trim_end())))
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

fn connect(url: &Url) -> Result<Stream, HttpError> {
    let host = url.host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<_> = (host, url.port).to_socket_addrs().map_err(|source| HttpError::Resolve { host: url.host.clone(), source })?.collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the name has no address");
    let mut tcp = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, CONNECT_TIMEOUT) {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = e,
        }
    }
    let connect_err = |source| HttpError::Connect { host: url.authority(), source };
    let tcp = tcp.ok_or_else(|| connect_err(last))?;
    tcp.set_read_timeout(Some(IO_TIMEOUT)).map_err(connect_err)?;
    tcp.set_write_timeout(Some(IO_TIMEOUT)).map_err(connect_err)?;
    let _ = tcp.set_nodelay(true);
    if !url.tls {
        return Ok(Stream::Plain(tcp));
    }
    let tls_err = |source: io::Error| {
        let rustls_err = source.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
        let hint = match rustls_err {
            Some(rustls::Error::InvalidCertificate(_)) => format!(
                " (its certificate is not trusted: put the CA that signed it in /etc/containers/certs.d/{}/ca.crt, or name a CA bundle in SSL_CERT_FILE)",
                url.authority()
            ),
            Some(rustls::Error::InvalidMessage(_)) | Some(rustls::Error::InappropriateMessage { .. }) => " (if the registry speaks plain HTTP, use --insecure)".to_owned(),
            _ => String::new(),
        };
        HttpError::Tls { host: url.authority(), hint, source }
    };
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| tls_err(io::Error::new(io::ErrorKind::InvalidInput, e.to_string())))?;
    let conn = rustls::ClientConnection::new(tls_config(&url.authority()), name).map_err(|e| tls_err(io::Error::other(e)))?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    // Handshake now, so that a TLS failure is reported as one, not as a failed write.
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).map_err(tls_err)?;
    }
    Ok(Stream::Tls(Box::new(s)))
}

/// The client configuration for `authority`: Mozilla's roots (built in, so a static plyroot
/// works on hosts without a CA bundle), the host's bundle, and the per-registry CA files that
/// podman and docker read (`/etc/containers/certs.d/HOST[:PORT]/*.crt`,
/// `/etc/docker/certs.d/…`).
fn tls_config(authority: &str) -> Arc<rustls::ClientConfig> {
    static BASE: OnceLock<rustls::RootCertStore> = OnceLock::new();
    let base = BASE.get_or_init(|| {
        let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        let bundle = std::env::var_os("SSL_CERT_FILE").map(std::path::PathBuf::from);
        for f in bundle.iter().map(|p| p.as_path()).chain(["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"].map(std::path::Path::new)) {
            if add_pem_file(&mut roots, f) > 0 {
                break;
            }
        }
        roots
    });
    let mut roots = base.clone();
    for dir in ["/etc/containers/certs.d", "/etc/docker/certs.d"] {
        if let Ok(rd) = std::fs::read_dir(std::path::Path::new(dir).join(authority)) {
            for e in rd.flatten() {
                if e.path().extension().is_some_and(|x| x == "crt") {
                    add_pem_file(&mut roots, &e.path());
                }
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// Adds the certificates of a PEM file; returns how many were added.
fn add_pem_file(roots: &mut rustls::RootCertStore, path: &std::path::Path) -> usize {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let Ok(iter) = CertificateDer::pem_file_iter(path) else { return 0 };
    let certs: Vec<_> = iter.flatten().collect();
    let (added, _) = roots.add_parsable_certificates(certs);
    added
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn parses_and_joins_urls() {
        let u = Url::parse("https://reg.io/v2/x/manifests/latest").unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port, u.path.as_str()), (true, "reg.io", 443, "/v2/x/manifests/latest"));
        let u = Url::parse("http://127.0.0.1:5000").unwrap();
        assert_eq!((u.tls, u.port, u.path.as_str(), u.authority()), (false, 5000, "/", "127.0.0.1:5000".to_owned()));
        let u = Url::parse("http://[::1]:8080/a?b=c#frag").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.path.as_str()), ("[::1]", 8080, "/a?b=c"));
        assert!(Url::parse("ftp://x/").is_err());
        assert!(Url::parse("http://:80/").is_err());
        let base = Url::parse("http://h:1/v2/x/blobs/uploads/").unwrap();
        assert_eq!(base.join("/v2/x/blobs/uploads/abc?_state=1").unwrap().path, "/v2/x/blobs/uploads/abc?_state=1");
        assert_eq!(base.join("abc").unwrap().path, "/v2/x/blobs/uploads/abc");
        let other = base.join("https://s3.example/bucket/blob?sig=secret").unwrap();
        assert_eq!(other.to_string(), "https://s3.example/bucket/blob", "no query in messages");
        assert!(!other.same_origin(&base));
        assert_eq!(base.join("//cdn.example/x").unwrap().authority(), "cdn.example");
    }

    /// A one-shot HTTP server on loopback for tests: each accepted connection gets the next
    /// canned answer; the requests it saw (head and body) come back from the join handle.
    pub(crate) fn serve(answers: Vec<Vec<u8>>) -> (String, std::thread::JoinHandle<Vec<String>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let h = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for a in answers {
                let (s, _) = l.accept().unwrap();
                let mut r = BufReader::new(s);
                let head = read_head(&mut r).unwrap();
                let len = head.iter().find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap())).unwrap_or(0);
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                seen.push(format!("{}\n{}", head.join("\n"), String::from_utf8_lossy(&body)));
                let mut s = r.into_inner();
                s.write_all(&a).unwrap();
            }
            seen
        });
        (addr, h)
    }

    #[test]
    fn chunked_bodies_and_redirects() {
        let (addr, server) = serve(vec![
            b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /storage/blob?sig=1\r\nContent-Length: 0\r\n\r\n".to_vec(),
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: y\r\n\r\n".to_vec(),
        ]);
        let url = Url::parse(&format!("http://{addr}/v2/x/blobs/sha256:1")).unwrap();
        let resp = fetch("GET", &url, &[("Authorization", "Bearer t".into())], Body::Empty).unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.url.path, "/storage/blob?sig=1");
        assert_eq!(resp.bytes(100).unwrap(), b"hello world");
        let seen = server.join().unwrap();
        assert!(seen[1].starts_with("GET /storage/blob?sig=1 HTTP/1.1"), "{seen:?}");
        assert!(seen[1].contains("Authorization: Bearer t"), "same origin keeps the credentials: {seen:?}");
    }

    #[test]
    fn redirect_to_another_origin_drops_authorization() {
        let (storage, storage_server) = serve(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec()]);
        let (addr, server) = serve(vec![format!("HTTP/1.1 302 Found\r\nLocation: http://{storage}/b\r\n\r\n").into_bytes()]);
        let url = Url::parse(&format!("http://{addr}/v2/x/blobs/sha256:1")).unwrap();
        let resp = fetch("GET", &url, &[("Authorization", "Bearer secret".into())], Body::Empty).unwrap();
        assert_eq!(resp.bytes(10).unwrap(), b"ok");
        server.join().unwrap();
        let seen = storage_server.join().unwrap();
        assert!(!seen[0].contains("secret"), "{seen:?}");
    }

    #[test]
    fn truncated_and_eof_bodies() {
        let (addr, server) = serve(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort".to_vec(),
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\nuntil the end".to_vec(),
        ]);
        let url = Url::parse(&format!("http://{addr}/")).unwrap();
        let err = fetch("GET", &url, &[], Body::Empty).unwrap().bytes(100).unwrap_err();
        assert!(format!("{:#}", anyhow::Error::from(err)).contains("5 bytes before the end"));
        let resp = fetch("PUT", &url, &[], Body::Bytes(b"data")).unwrap();
        assert_eq!(resp.bytes(100).unwrap(), b"until the end");
        let seen = server.join().unwrap();
        assert!(seen[1].starts_with("PUT / HTTP/1.1") && seen[1].contains("Content-Length: 4") && seen[1].ends_with("\ndata"), "{seen:?}");
    }
}
