//! HTTP for the registry protocol: a thin layer over [`ureq`] that adds what registries need and
//! ureq leaves to its user.
//!
//! - One [`Http`] (one ureq agent, so one connection pool) per operation: a pull or a push
//!   reuses its connections to the registry, its token service and its storage.
//! - Redirects are followed here, not by ureq, for GET and HEAD only (registries send blob
//!   downloads to object storage), at most [`MAX_REDIRECTS`], and each hop chooses its own proxy
//!   and drops the `Authorization` header once it leaves the first URL's origin.
//! - Proxies from the environment, with `NO_PROXY`, by the rules in [`super::proxy`].
//! - TLS through rustls with the ring provider: Mozilla's roots (built in, so a static plyroot
//!   works on hosts without a CA bundle), the host's bundle, and the per-registry CA files that
//!   podman and docker read (`/etc/containers/certs.d/HOST[:PORT]/*.crt`, `/etc/docker/certs.d/…`).
//! - [`Deadlines`]: to connect (through a proxy and TLS included); for progress (no byte sent
//!   or received, and no byte of a body, however much else comes: a read of the body that
//!   only brings chunked trailers or chunk extensions makes none), enforced on each
//!   connection by [`Watched`]; for a response head (endless `100 Continue`s included); and a
//!   body, received or sent, must move at least 1 KiB/s averaged over each minute. Sending is
//!   bounded by plyroot's own TCP transport ([`super::socket`]): ureq's per-write timeout bounds
//!   each `write(2)` only. A registry that goes silent, trickles, babbles or stops reading an
//!   upload fails the command with what happened ("no progress from HOST for 120 s", "the
//!   registry at HOST read no more of the upload for 120 s") instead of holding it, while a slow
//!   but moving transfer of any size completes.
//! - No thread, ever: plyroot creates user namespaces later in the same process, which a second
//!   thread would make fail. ureq's own resolver starts one when a resolve or overall deadline is
//!   set; plyroot sets neither and plugs a resolver that resolves on the calling thread anyway
//!   (bounded by the system resolver's own timeouts), which also covers a proxy's host name.
//!
//! Header names and values are checked before anything is sent (the `http` crate refuses CR, LF
//! and other control characters), and so is every URL. What a server chose and plyroot would
//! send (a redirect's or an upload's `Location`, a challenge's realm, service and scope) is
//! refused first, by [`sendable`], with an error that names the server: a control character
//! anywhere, a space or non-ASCII byte in what is to be a URL. (A response head with a bare CR
//! or an ASCII control in a header is refused by the parser before that.)

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::net::ToSocketAddrs;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ureq::config::{AutoHeaderValue, Config};
use ureq::http::{self as h, Uri};
use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};
use ureq::unversioned::resolver::{ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::time::Duration as TimeDuration;
use ureq::unversioned::transport::{Buffers, ConnectionDetails, ConnectProxyConnector, Connector, NextTimeout, RustlsConnector, Transport};

use super::proxy::{Proxies, Setting};
use super::socket::{Stalled, Tcp};

/// How long plyroot waits, in each phase of a request. Every one of them can be set, in whole
/// seconds, by an environment variable (tests wait seconds, not minutes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Deadlines {
    /// Connecting, through a proxy and the TLS handshake included (`PLYROOT_CONNECT_TIMEOUT`, 30).
    pub connect: Duration,
    /// No progress for this long ends a request (`PLYROOT_IDLE_TIMEOUT`, 120): no byte sent or
    /// received, and no byte of a body however much else the server sends (endless chunked
    /// trailers or chunk extensions).
    pub idle: Duration,
    /// The whole response head, interim `1xx` responses included, must arrive within this
    /// (`PLYROOT_HEAD_TIMEOUT`, 300), counted from the end of the request.
    pub head: Duration,
    /// A body must move at least 1 KiB for each second of every window of this length spent
    /// waiting for the server, to read it or to take it (`PLYROOT_RATE_WINDOW`, 60): a server
    /// that trickles (a byte a second passes every per-read or per-write deadline) cannot hold a
    /// transfer open.
    pub rate_window: Duration,
}

impl Deadlines {
    const DEFAULT: Deadlines = Deadlines { connect: Duration::from_secs(30), idle: Duration::from_secs(120), head: Duration::from_secs(300), rate_window: Duration::from_secs(60) };

    /// The defaults, with what the environment sets instead.
    pub(crate) fn get() -> Deadlines {
        static D: OnceLock<Deadlines> = OnceLock::new();
        *D.get_or_init(|| Deadlines::from_lookup(|k| std::env::var(k).ok()))
    }

    fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Deadlines {
        let d = Deadlines::DEFAULT;
        let read = |var: &str, default: Duration| match get(var) {
            None => default,
            Some(v) => match v.trim().parse::<u64>() {
                Ok(n) if n > 0 => Duration::from_secs(n),
                _ => {
                    crate::diag::warn!("ignoring {var}={}: not a whole number of seconds above 0; using {} s", crate::text::escape(&v), default.as_secs());
                    default
                }
            },
        };
        Deadlines {
            connect: read("PLYROOT_CONNECT_TIMEOUT", d.connect),
            idle: read("PLYROOT_IDLE_TIMEOUT", d.idle),
            head: read("PLYROOT_HEAD_TIMEOUT", d.head),
            rate_window: read("PLYROOT_RATE_WINDOW", d.rate_window),
        }
    }
}

/// A response head larger than this is not from a registry.
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
    #[error("{var}={value} is not a proxy plyroot can use: {reason}")]
    BadProxy { var: &'static str, value: String, reason: &'static str },
    #[error("cannot reach {host} through the proxy {proxy} (from {var}): {reason}; if {host} should be reached directly, add it to NO_PROXY")]
    Proxy { host: String, proxy: String, var: &'static str, reason: String },
    #[error("TLS with {host} failed{hint}")]
    Tls {
        host: String,
        hint: String,
        #[source]
        source: Box<ureq::Error>,
    },
    #[error("{method} {url}: {what}")]
    Timeout { method: String, url: String, what: String },
    #[error("{method} {url}: the header {name} cannot be sent (it holds a control character or is malformed)")]
    Header { method: String, url: String, name: String },
    #[error("{method} {url}: the server closed the connection while the request was being sent, and its answer was lost (it may have refused the upload: not allowed, or too large)")]
    Closed {
        method: String,
        url: String,
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
    #[error("{method} {url} failed")]
    Client {
        method: String,
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },
    #[error("{method} {url}: malformed response: {reason}")]
    Malformed { method: String, url: String, reason: String },
    #[error("{host} sent {what} with {problem} in it, which plyroot does not put in a request: {value}")]
    Unsendable { host: String, what: &'static str, problem: &'static str, value: String },
    #[error("{url}: more than {MAX_REDIRECTS} redirects")]
    Redirects { url: String },
    #[error("{from} redirected to {to}, from TLS to plain HTTP: refused (with --insecure it is followed)")]
    Downgrade { from: String, to: String },
}

/// What makes a string a server chose unfit for a request: a control character (CR, LF, tab, NUL,
/// DEL, C1) always; a space or any other byte a URL cannot hold when it is to be a URL.
pub(crate) fn unsendable(value: &[u8], url: bool) -> Option<&'static str> {
    if value.iter().any(|b| b.is_ascii_control()) {
        return Some("a control character");
    }
    if String::from_utf8_lossy(value).chars().any(char::is_control) {
        return Some("a control character");
    }
    if url && value.contains(&b' ') {
        return Some("a space");
    }
    if url && value.iter().any(|b| !b.is_ascii_graphic()) {
        return Some("a byte a URL cannot hold");
    }
    None
}

/// `value` as text when [`unsendable`] finds nothing wrong with it; else the error, naming
/// `host`, the server that sent it.
pub(crate) fn sendable(host: &str, what: &'static str, value: &[u8], url: bool) -> Result<String, HttpError> {
    match unsendable(value, url) {
        None => Ok(String::from_utf8_lossy(value).into_owned()),
        Some(problem) => Err(HttpError::Unsendable { host: host.to_owned(), what, problem, value: crate::text::escape(&String::from_utf8_lossy(value)).into_owned() }),
    }
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
    /// Any scheme (RFC 3986: a letter, then letters, digits, `+`, `-`, `.`, then `:`) makes it
    /// absolute: `http` and `https` in any case are followed, every other one is refused.
    pub(crate) fn join(&self, location: &str) -> Result<Url, HttpError> {
        let scheme_len = location.find(':').filter(|&i| {
            let s = &location.as_bytes()[..i];
            !s.is_empty() && s[0].is_ascii_alphabetic() && s.iter().all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(b))
        });
        if let Some(i) = scheme_len {
            let scheme = location[..i].to_ascii_lowercase();
            if scheme != "http" && scheme != "https" {
                return Err(HttpError::Url { url: crate::text::escape(location).into_owned(), reason: "a redirect may lead to http:// or https:// only" });
            }
            return Url::parse(&format!("{scheme}{}", &location[i..]));
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

    pub(crate) fn same_origin(&self, other: &Url) -> bool {
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

    /// The full URL, query included, as ureq takes it; refused when it is not a valid URI
    /// (a space or a control character from a `Location`, say).
    fn uri(&self) -> Result<Uri, HttpError> {
        let s = format!("{}://{}:{}{}", if self.tls { "https" } else { "http" }, self.host, self.port, self.path);
        s.parse().map_err(|_| HttpError::Url { url: self.to_string(), reason: "it holds characters a URL cannot (spaces, control characters)" })
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
#[derive(Clone, Copy)]
pub(crate) enum Body<'a> {
    Empty,
    Bytes(&'a [u8]),
    /// A whole file (its length is the `Content-Length`).
    File(&'a File),
}

/// A response whose body is read through `Read`.
pub(crate) struct Response {
    pub status: u16,
    /// Where the response came from (after redirects).
    pub url: Url,
    pub method: String,
    headers: h::HeaderMap,
    body: ureq::BodyReader<'static>,
    rate: Rate,
    /// Body bytes read so far, and the `Content-Length` when there is one: a body cut short
    /// says how much of it came.
    received: u64,
    length: Option<u64>,
    /// Each read of the body must bring a byte of it within `idle`.
    progress: Progress,
    idle: Duration,
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Response").field("status", &self.status).field("url", &self.url.to_string()).finish_non_exhaustive()
    }
}

impl Response {
    /// The first header of that name (case-insensitive), when it is text.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The first header of that name as the server sent it (which may be any bytes but CR, LF
    /// and NUL), for values that must be checked, and shown escaped, rather than skipped.
    pub(crate) fn header_bytes(&self, name: &str) -> Option<&[u8]> {
        self.headers.get(name).map(h::HeaderValue::as_bytes)
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
        let start = std::time::Instant::now();
        self.progress.set(Some(start + self.idle));
        let result = self.body.read(buf);
        self.progress.set(None);
        let n = result.map_err(|e| self.cut_short(e))?;
        self.received += n as u64;
        self.rate.check(start.elapsed(), n, n == 0).map_err(|(bytes, secs)| {
            let var = "PLYROOT_RATE_WINDOW";
            io::Error::new(io::ErrorKind::TimedOut, format!("{} sent {bytes} bytes in {secs} s, less than 1 KiB/s ({var}): giving up", self.url.authority()))
        })?;
        Ok(n)
    }
}

impl Response {
    /// A body read that failed because the server closed the connection, said with how much of
    /// the body came (ureq says only "Peer disconnected"); any other error as it is.
    fn cut_short(&self, e: io::Error) -> io::Error {
        use io::ErrorKind::*;
        let timed_out = e.kind() == TimedOut || e.get_ref().and_then(|inner| inner.downcast_ref::<ureq::Error>()).is_some_and(|u| matches!(u, ureq::Error::Timeout(_)));
        if timed_out {
            return io::Error::new(TimedOut, format!("no progress from {} for {} s", self.url.authority(), self.idle.as_secs()));
        }
        if !matches!(e.kind(), UnexpectedEof | ConnectionReset | ConnectionAborted) {
            return e;
        }
        let host = self.url.authority();
        let what = match self.length {
            // ureq never reads past the length, so `received` is below it here; saturating
            // all the same, so that no count can wrap around.
            Some(len) => format!("{host} closed the connection after {} of {len} bytes ({} bytes missing)", self.received, len.saturating_sub(self.received)),
            None => format!("{host} closed the connection after {} bytes, before the end of the body", self.received),
        };
        io::Error::new(e.kind(), what)
    }
}

/// The minimum transfer rate of a body, received or sent: at least 1 KiB for each second of
/// each window ([`Deadlines::rate_window`]) spent waiting for the server. Only the time inside
/// reads (or blocked writes) counts, so a slow consumer (a disk, a long fsync) or producer is
/// never blamed on the server.
pub(super) struct Rate {
    window: Duration,
    waited: Duration,
    bytes: u64,
}

impl Rate {
    pub(super) fn new(window: Duration) -> Rate {
        Rate { window, waited: Duration::ZERO, bytes: 0 }
    }

    /// Counts `n` bytes moved in `spent`; `ended` when this was the end of the transfer (a read
    /// of 0), which no window blames. The error is the slow window's bytes and seconds.
    pub(super) fn check(&mut self, spent: Duration, n: usize, ended: bool) -> Result<(), (u64, u64)> {
        self.waited += spent;
        self.bytes += n as u64;
        if self.waited < self.window {
            return Ok(());
        }
        if self.bytes < 1024 * self.window.as_secs() && !ended {
            return Err((self.bytes, self.waited.as_secs()));
        }
        *self = Rate::new(self.window);
        Ok(())
    }

    /// The waiting left in the current window, after which [`Rate::check`] judges it.
    pub(super) fn left(&self) -> Duration {
        self.window.saturating_sub(self.waited)
    }
}

/// The HTTP side of one registry operation: one connection pool, the proxy settings read once.
pub(crate) struct Http {
    agent: ureq::Agent,
    proxies: Proxies,
    /// The registry whose certs.d CAs the agent trusts.
    registry: String,
    /// Whether a redirect may lead from https to http (`--insecure` for this registry).
    insecure: bool,
    deadlines: Deadlines,
    /// The progress deadline of the body being read, which every connection of the agent obeys.
    progress: Progress,
}

impl Http {
    /// A client for one operation on `registry` (`host[:port]`, as certs.d names it); with
    /// `insecure`, plain HTTP is acceptable, also after a redirect from TLS.
    pub(crate) fn new(registry: &str, insecure: bool) -> Http {
        let d = Deadlines::get();
        let config = Config::builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .proxy(None)
            .user_agent(format!("plyroot/{}", env!("CARGO_PKG_VERSION")))
            .accept_encoding(AutoHeaderValue::None)
            .max_response_header_size(MAX_HEADER_BYTES)
            .timeout_connect(Some(d.connect))
            .timeout_per_read(Some(d.idle))
            // No per-write timeout: ureq's would bound each write(2), not a send; the socket
            // transport bounds sends by `idle` and the minimum rate instead.
            // Not a resolve or global deadline: those would make ureq resolve on a thread.
            .timeout_recv_response(Some(d.head))
            .tls_config(tls_config(registry))
            .build();
        let progress = Progress::default();
        // ureq's default chain (CONNECT proxies, TCP, rustls) with plyroot's TCP transport; no
        // SOCKS (refused in `proxy_for`).
        let chain = ().chain(ConnectProxyConnector::default()).chain(Tcp { idle: d.idle, rate_window: d.rate_window }).chain(RustlsConnector::default());
        let agent = ureq::Agent::with_parts(config, Watcher { inner: chain, progress: progress.clone() }, InlineResolver);
        Http { agent, proxies: Proxies::from_env(), registry: registry.to_owned(), insecure, deadlines: d, progress }
    }

    /// Sends a request, following redirects for GET and HEAD. `headers` are sent as given, except
    /// `Authorization`, which is dropped once a redirect leaves the first URL's origin.
    pub(crate) fn fetch(&self, method: &str, url: &Url, headers: &[(&str, String)], body: Body<'_>) -> Result<Response, HttpError> {
        let mut url = url.clone();
        let origin = url.clone();
        for _ in 0..=MAX_REDIRECTS {
            let same = url.same_origin(&origin);
            let hs: Vec<(&str, String)> = headers.iter().filter(|(k, _)| same || !k.eq_ignore_ascii_case("authorization")).cloned().collect();
            let resp = self.send(method, &url, &hs, body)?;
            let redirect = matches!(resp.status, 301 | 302 | 303 | 307 | 308) && matches!(method, "GET" | "HEAD");
            if !redirect {
                return Ok(resp);
            }
            let Some(location) = resp.header_bytes("location") else { return Ok(resp) };
            let location = sendable(&url.authority(), "a redirect Location", location, true)?;
            let next = url.join(&location)?;
            self.check_redirect(&url, &next)?;
            crate::diag::debug!("{method} {url}: redirected to {next}");
            url = next;
        }
        Err(HttpError::Redirects { url: origin.to_string() })
    }

    /// A redirect (or an upload location) from TLS to plain HTTP is followed only for an insecure
    /// registry.
    pub(crate) fn check_redirect(&self, from: &Url, to: &Url) -> Result<(), HttpError> {
        if from.tls && !to.tls && !self.insecure {
            return Err(HttpError::Downgrade { from: from.to_string(), to: to.to_string() });
        }
        Ok(())
    }

    /// One request, on a pooled connection when there is one.
    fn send(&self, method: &str, url: &Url, headers: &[(&str, String)], body: Body<'_>) -> Result<Response, HttpError> {
        let mut req = h::Request::builder().method(method).uri(url.uri()?);
        for (name, value) in headers {
            let bad = || HttpError::Header { method: method.to_owned(), url: url.to_string(), name: (*name).to_owned() };
            let name = h::HeaderName::from_bytes(name.as_bytes()).map_err(|_| bad())?;
            let value = h::HeaderValue::from_str(value).map_err(|_| bad())?;
            req = req.header(name, value);
        }
        let proxy = self.proxy_for(url)?;
        let result = match body {
            // Requests that carry a body say so even when it is empty (a proxy or registry may
            // insist on a length).
            Body::Empty if matches!(method, "POST" | "PUT" | "PATCH") => self.run(req, &b""[..], url, &proxy),
            Body::Empty => self.run(req, (), url, &proxy),
            Body::Bytes(b) => self.run(req, b, url, &proxy),
            Body::File(f) => self.run(req, f, url, &proxy),
        };
        let resp = result.map_err(|e| self.error(method, url, proxy.as_ref().map(|(s, _)| s), e))?;
        let status = resp.status().as_u16();
        let (parts, body) = resp.into_parts();
        // One length per response: two (ureq refuses two that differ) are how a response is
        // read one way by plyroot and another by a proxy in between.
        let lengths: Vec<&[u8]> = parts.headers.get_all(h::header::CONTENT_LENGTH).iter().flat_map(|v| v.as_bytes().split(|b| *b == b',')).collect();
        if lengths.len() > 1 {
            return Err(HttpError::Malformed { method: method.to_owned(), url: url.to_string(), reason: format!("it sent {} Content-Length values; a response has one", lengths.len()) });
        }
        let chunked = parts.headers.get_all(h::header::TRANSFER_ENCODING).iter().any(|v| v.as_bytes().to_ascii_lowercase().windows(7).any(|w| w == b"chunked"));
        let length = lengths.first().filter(|_| !chunked).and_then(|v| std::str::from_utf8(v).ok()).and_then(|v| v.trim().parse().ok());
        Ok(Response {
            status,
            url: url.clone(),
            method: method.to_owned(),
            headers: parts.headers,
            body: body.into_reader(),
            rate: Rate::new(self.deadlines.rate_window),
            received: 0,
            length,
            progress: self.progress.clone(),
            idle: self.deadlines.idle,
        })
    }

    fn run(&self, req: h::request::Builder, body: impl ureq::AsSendBody, url: &Url, proxy: &Option<(Setting, ureq::Proxy)>) -> Result<h::Response<ureq::Body>, ureq::Error> {
        let req = req.body(body)?;
        let other_cas = url.authority() != self.registry && !certs_d_files(&url.authority()).is_empty();
        if proxy.is_none() && !other_cas {
            return self.agent.run(req);
        }
        // A request-level setting; connections stay pooled per proxy (ureq keys its pool by
        // proxy); another host's own CAs give it connections of its own.
        let mut config = self.agent.configure_request(req).proxy(proxy.as_ref().map(|(_, p)| p.clone()));
        if other_cas {
            config = config.tls_config(tls_config(&url.authority()));
        }
        self.agent.run(config.build())
    }

    /// The proxy `url` goes through, if any: the setting it came from and ureq's form of it.
    fn proxy_for(&self, url: &Url) -> Result<Option<(Setting, ureq::Proxy)>, HttpError> {
        let Some(setting) = self.proxies.for_url(url) else { return Ok(None) };
        let bad = |reason| HttpError::BadProxy { var: setting.var, value: redact(&setting.url), reason };
        let scheme = setting.url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
        if matches!(scheme.as_deref(), Some(s) if s != "http" && s != "https") {
            return Err(bad("plyroot speaks to HTTP and HTTPS proxies only (not SOCKS)"));
        }
        let proxy = ureq::Proxy::new(&setting.url).map_err(|_| bad("it is not a proxy URL such as http://proxy.example:3128"))?;
        crate::diag::debug!("{url}: through the proxy {} (from {})", redact(&setting.url), setting.var);
        Ok(Some((setting.clone(), proxy)))
    }

    /// ureq's error as one that names the request, the host, and what to do.
    fn error(&self, method: &str, url: &Url, proxy: Option<&Setting>, e: ureq::Error) -> HttpError {
        let (method, host) = (method.to_owned(), url.authority());
        if let Some(p) = proxy {
            let reason = match &e {
                ureq::Error::ConnectProxyFailed(r) => Some(r.clone()),
                ureq::Error::Io(io) if is_connect_error(io) => Some(format!("the proxy is unreachable: {io}")),
                ureq::Error::Other(o) if o.downcast_ref::<ResolveError>().is_some() && !o.to_string().contains(&url.host) => Some(o.to_string()),
                _ => None,
            };
            if let Some(reason) = reason {
                return HttpError::Proxy { host, proxy: redact(&p.url), var: p.var, reason };
            }
        }
        match e {
            ureq::Error::Other(o) if o.downcast_ref::<ResolveError>().is_some() => {
                let r = o.downcast::<ResolveError>().expect("checked above");
                HttpError::Resolve { host: r.host, source: r.source }
            }
            ureq::Error::HostNotFound => HttpError::Resolve { host, source: io::Error::new(io::ErrorKind::NotFound, "the name has no address") },
            ureq::Error::Io(io) if is_connect_error(&io) => HttpError::Connect { host, source: io },
            ureq::Error::Timeout(t) => HttpError::Timeout { method, url: url.to_string(), what: timeout_text(t, &host, self.deadlines) },
            ureq::Error::Other(o) if o.downcast_ref::<Stalled>().is_some() => {
                let what = match o.downcast_ref::<Stalled>().expect("checked above") {
                    Stalled::Idle(secs) => format!("the registry at {host} read no more of the {} for {secs} s (PLYROOT_IDLE_TIMEOUT)", sent_what(&method)),
                    Stalled::Slow { bytes, secs } => {
                        format!("the registry at {host} read {bytes} bytes of the {} in {secs} s, less than 1 KiB/s (PLYROOT_RATE_WINDOW): giving up", sent_what(&method))
                    }
                };
                HttpError::Timeout { method, url: url.to_string(), what }
            }
            ureq::Error::Http(_) => HttpError::Header { method, url: url.to_string(), name: "(a request header)".into() },
            ureq::Error::BadUri(_) => HttpError::Url { url: url.to_string(), reason: "ureq refused it" },
            // The response head breaks HTTP (two different Content-Length values, say).
            ureq::Error::Protocol(p) => {
                let said = p.to_string();
                let reason = if said.contains("invalid header") {
                    format!("{host} sent a header holding a control character (a bare CR, NUL, …) or another byte HTTP does not allow ({said})")
                } else {
                    said
                };
                HttpError::Malformed { method, url: url.to_string(), reason }
            }
            e if tls_failure(&e).is_some() => {
                let hint = match tls_failure(&e) {
                    Some(rustls::Error::InvalidCertificate(_)) => format!(
                        " (its certificate is not trusted: put the CA that signed it in /etc/containers/certs.d/{host}/ca.crt, or name a CA bundle in SSL_CERT_FILE)"
                    ),
                    Some(rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. }) => " (if the registry speaks plain HTTP, use --insecure)".to_owned(),
                    _ => String::new(),
                };
                HttpError::Tls { host, hint, source: Box::new(e) }
            }
            // The server closed while we sent, or before it answered what we sent (it answers
            // with its status first when the request says `Expect: 100-continue`, which uploads
            // do). Body reads never come here: this is the request and the response head.
            ureq::Error::Io(source)
                if matches!(source.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof) && matches!(method.as_str(), "PUT" | "POST" | "PATCH") =>
            {
                HttpError::Closed { method, url: url.to_string(), source }
            }
            ureq::Error::Io(source) => HttpError::Io { method, url: url.to_string(), source },
            source => HttpError::Client { method, url: url.to_string(), source: Box::new(source) },
        }
    }
}

fn is_connect_error(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(e.kind(), ConnectionRefused | HostUnreachable | NetworkUnreachable | AddrNotAvailable)
}

/// The rustls error under a failed handshake, if that is what `e` is.
fn tls_failure(e: &ureq::Error) -> Option<&rustls::Error> {
    match e {
        ureq::Error::Rustls(r) => Some(r),
        ureq::Error::Io(io) => io.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()),
        _ => None,
    }
}

/// What a request with `method` sends, for messages.
fn sent_what(method: &str) -> &'static str {
    if matches!(method, "PUT" | "PATCH" | "POST") {
        "upload"
    } else {
        "request"
    }
}

fn timeout_text(t: ureq::Timeout, host: &str, d: Deadlines) -> String {
    match t {
        ureq::Timeout::Connect => format!("no connection to {host} within {} s (PLYROOT_CONNECT_TIMEOUT)", d.connect.as_secs()),
        ureq::Timeout::PerRead | ureq::Timeout::RecvBody => format!("no progress from {host} for {} s", d.idle.as_secs()),
        ureq::Timeout::RecvResponse => format!("no complete response from {host} within {} s", d.head.as_secs()),
        other => format!("timed out ({other})"),
    }
}

/// The deadline by which the body read in progress must bring a byte, shared by an [`Http`],
/// its responses and its connections (one request at a time: plyroot has one thread).
#[derive(Clone, Debug, Default)]
struct Progress(Arc<Mutex<Option<Instant>>>);

impl Progress {
    fn set(&self, deadline: Option<Instant>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = deadline;
    }

    fn get(&self) -> Option<Instant> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// ureq's connector, whose connections are [`Watched`].
#[derive(Debug)]
struct Watcher<C> {
    inner: C,
    progress: Progress,
}

impl<C: Connector<()>> Connector<()> for Watcher<C> {
    type Out = Watched;

    fn connect(&self, details: &ConnectionDetails, chained: Option<()>) -> Result<Option<Watched>, ureq::Error> {
        Ok(self.inner.connect(details, chained)?.map(|inner| Watched { inner: Box::new(inner), progress: self.progress.clone() }))
    }
}

/// A connection that gives up waiting for input once the [`Progress`] deadline has passed:
/// ureq keeps reading while what comes is no body (a chunk's trailers, its extensions), each
/// read with a fresh per-read timeout, so a server that sends those forever would hold it.
#[derive(Debug)]
struct Watched {
    inner: Box<dyn Transport>,
    progress: Progress,
}

impl Transport for Watched {
    fn buffers(&mut self) -> &mut dyn Buffers {
        self.inner.buffers()
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        self.inner.transmit_output(amount, timeout)
    }

    fn await_input(&mut self, mut timeout: NextTimeout) -> Result<bool, ureq::Error> {
        if let Some(deadline) = self.progress.get() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ureq::Error::Timeout(ureq::Timeout::RecvBody));
            }
            if TimeDuration::from(left) < timeout.after {
                timeout.after = left.into();
                timeout.reason = ureq::Timeout::RecvBody;
            }
        }
        self.inner.await_input(timeout)
    }

    fn is_open(&mut self) -> bool {
        self.inner.is_open()
    }

    fn is_tls(&self) -> bool {
        self.inner.is_tls()
    }
}

/// A proxy URL without its password, for messages.
fn redact(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").map_or(("", url), |(s, r)| (s, r));
    let shown = match rest.split_once('@') {
        Some((userinfo, host)) => format!("{}:…@{host}", userinfo.split(':').next().unwrap_or("")),
        None => rest.to_owned(),
    };
    if scheme.is_empty() {
        shown
    } else {
        format!("{scheme}://{shown}")
    }
}

/// Resolves on the calling thread (ureq's default resolver starts a thread when a deadline
/// applies to the lookup).
#[derive(Debug)]
struct InlineResolver;

/// A failed lookup, carried through ureq to [`Http::error`].
#[derive(Debug, thiserror::Error)]
#[error("cannot resolve {host}: {source}")]
struct ResolveError {
    host: String,
    source: io::Error,
}

impl Resolver for InlineResolver {
    fn resolve(&self, uri: &Uri, config: &Config, _timeout: NextTimeout) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let authority = uri.authority().ok_or_else(|| ureq::Error::BadUri(format!("{uri} has no host")))?;
        let port = authority.port_u16().or_else(|| match uri.scheme_str() {
            Some("https") => Some(443),
            Some("http") => Some(80),
            _ => None,
        });
        let port = port.ok_or_else(|| ureq::Error::BadUri(format!("{uri} has no port")))?;
        let host = authority.host();
        let fail = |source| ureq::Error::Other(Box::new(ResolveError { host: host.to_owned(), source }));
        let addrs = format!("{host}:{port}").to_socket_addrs().map_err(fail)?;
        let mut out = self.empty();
        // ureq keeps at most 16 addresses.
        for a in config.ip_family().keep_wanted(addrs).take(16) {
            out.push(a);
        }
        if out.is_empty() {
            return Err(fail(io::Error::new(io::ErrorKind::NotFound, "the name has no address")));
        }
        Ok(out)
    }
}

/// The TLS settings for an operation on `authority`: rustls with ring; Mozilla's roots, the
/// host's bundle, and the authority's certs.d CAs.
fn tls_config(authority: &str) -> TlsConfig {
    static BASE: OnceLock<Vec<Certificate<'static>>> = OnceLock::new();
    let base = BASE.get_or_init(|| {
        let mut roots: Vec<Certificate<'static>> = webpki_root_certs::TLS_SERVER_ROOT_CERTS.iter().map(|c| Certificate::from_der(c.as_ref()).to_owned()).collect();
        let bundle = std::env::var_os("SSL_CERT_FILE").map(std::path::PathBuf::from);
        for f in bundle.iter().map(|p| p.as_path()).chain(["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"].map(Path::new)) {
            if add_pem_file(&mut roots, f) > 0 {
                break;
            }
        }
        roots
    });
    let mut roots = base.clone();
    for f in certs_d_files(authority) {
        add_pem_file(&mut roots, &f);
    }
    TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .root_certs(RootCerts::Specific(Arc::new(roots)))
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .build()
}

/// The `*.crt` files podman and docker read for `authority`.
fn certs_d_files(authority: &str) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for dir in ["/etc/containers/certs.d", "/etc/docker/certs.d"] {
        if let Ok(rd) = std::fs::read_dir(Path::new(dir).join(authority)) {
            files.extend(rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "crt")));
        }
    }
    files
}

/// Adds the certificates of a PEM file; returns how many were added.
fn add_pem_file(roots: &mut Vec<Certificate<'static>>, path: &Path) -> usize {
    let Ok(pem) = std::fs::read(path) else { return 0 };
    let before = roots.len();
    for item in ureq::tls::parse_pem(&pem).flatten() {
        if let ureq::tls::PemItem::Certificate(c) = item {
            roots.push(c);
        }
    }
    roots.len() - before
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
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
        assert_eq!(base.join("HTTPS://Other.example/b").unwrap().to_string(), "https://Other.example/b", "schemes in any case");
        assert_eq!(base.join("HtTp://h:1/c").unwrap().path, "/c");
        for bad in ["file:///etc/passwd", "gopher://x/", "FTP://x/", "javascript:alert(1)", "data:,x"] {
            let e = base.join(bad).unwrap_err().to_string();
            assert!(e.contains("http:// or https:// only"), "{bad}: {e}");
        }
        assert_eq!(base.join("a/b:c").unwrap().path, "/v2/x/blobs/uploads/a/b:c", "a colon after a slash is no scheme");
        assert!(base.join("/a b").unwrap().uri().is_err(), "a space never reaches a request line");
        assert!(base.join("/a\rX-Injected: 1").unwrap().uri().is_err());
    }

    #[test]
    fn redirects_from_tls_to_plain_http_only_when_insecure() {
        let (tls, plain) = (Url::parse("https://reg.example/v2/").unwrap(), Url::parse("http://cdn.example/b").unwrap());
        let e = Http::new("reg.example", false).check_redirect(&tls, &plain).unwrap_err().to_string();
        assert!(e.contains("from TLS to plain HTTP") && e.contains("--insecure"), "{e}");
        assert!(Http::new("reg.example", true).check_redirect(&tls, &plain).is_ok());
        assert!(Http::new("reg.example", false).check_redirect(&plain, &tls).is_ok());
    }

    #[test]
    fn a_trickling_body_fails_a_moving_one_passes() {
        let sec = Duration::from_secs(1);
        let mut r = Rate::new(Duration::from_secs(60));
        // One byte a second: fine until a window has passed, then an error.
        for _ in 1..60 {
            r.check(sec, 1, false).unwrap();
        }
        assert_eq!(r.check(sec, 1, false).unwrap_err(), (60, 60));
        // 2 KiB a second over several windows: fine.
        let mut r = Rate::new(Duration::from_secs(60));
        for _ in 1..=300 {
            r.check(sec, 2048, false).unwrap();
        }
        // The end of the body (a read of 0) after a slow last window is no error.
        let mut r = Rate::new(Duration::from_secs(60));
        r.check(10 * sec, 100, false).unwrap();
        r.check(60 * sec, 0, true).unwrap();
        // A send that waited a whole window with nothing taken is slow, not ended.
        let mut r = Rate::new(Duration::from_secs(60));
        assert_eq!(r.left(), 60 * sec);
        r.check(20 * sec, 100, false).unwrap();
        assert_eq!(r.left(), 40 * sec);
        assert_eq!(r.check(40 * sec, 0, false).unwrap_err(), (100, 60));
    }

    #[test]
    fn deadlines_come_from_the_environment_in_seconds() {
        assert_eq!(Deadlines::from_lookup(|_| None), Deadlines::DEFAULT);
        let d = Deadlines::from_lookup(|k| match k {
            "PLYROOT_IDLE_TIMEOUT" => Some("2".into()),
            "PLYROOT_HEAD_TIMEOUT" => Some(" 5 ".into()),
            "PLYROOT_CONNECT_TIMEOUT" => Some("0".into()),
            "PLYROOT_RATE_WINDOW" => Some("soon".into()),
            _ => None,
        });
        let s = Duration::from_secs;
        assert_eq!((d.idle, d.head, d.connect, d.rate_window), (s(2), s(5), s(30), s(60)), "0 and words keep the default");
    }

    #[test]
    fn server_strings_with_controls_or_spaces_are_not_sent() {
        assert_eq!(unsendable(b"/v2/x/blobs/uploads/u?_state=a%20b", true), None);
        assert_eq!(unsendable(b"repository:a b:pull", false), None, "a space is fine where it is encoded");
        for bad in [&b"/a\rb"[..], b"/a\nb", b"/a\tb", b"/a\x00", b"/a\x7f", "/a\u{9b}2J".as_bytes(), "/a\u{85}".as_bytes()] {
            assert_eq!(unsendable(bad, true), Some("a control character"), "{bad:?}");
            assert_eq!(unsendable(bad, false), Some("a control character"), "{bad:?}");
        }
        assert_eq!(unsendable(b"/a b", true), Some("a space"));
        assert_eq!(unsendable("/caf\u{e9}".as_bytes(), true), Some("a byte a URL cannot hold"));
        let e = sendable("reg.example", "a redirect Location", b"/a\tb\x1b", true).unwrap_err().to_string();
        assert!(e.starts_with("reg.example sent a redirect Location with a control character") && !e.contains('\x1b') && !e.contains('\t'), "{e}");
    }

    #[test]
    fn redacts_proxy_passwords() {
        assert_eq!(redact("http://user:secret@proxy:3128"), "http://user:…@proxy:3128");
        assert_eq!(redact("proxy:3128"), "proxy:3128");
    }

    /// Reads one request (head and body) from `r`; None when the connection closed first.
    fn read_request(r: &mut BufReader<std::net::TcpStream>) -> Option<String> {
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).ok()? == 0 {
                return None;
            }
            let line = line.trim_end_matches(['\r', '\n']).to_owned();
            if line.is_empty() {
                break;
            }
            head.push(line);
        }
        let len = head.iter().find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap())).unwrap_or(0);
        let mut body = vec![0; len];
        r.read_exact(&mut body).ok()?;
        Some(format!("{}\n{}", head.join("\n"), String::from_utf8_lossy(&body)))
    }

    /// A scripted HTTP server on loopback for tests: answers requests with the canned answers in
    /// order, on as many connections as the client opens (each answer must carry its own length
    /// for a connection to be reused); the requests it saw come back from the join handle, each
    /// prefixed with the number of the connection it came on.
    pub(crate) fn serve(answers: Vec<Vec<u8>>) -> (String, std::thread::JoinHandle<Vec<String>>) {
        serve_at(|_| answers)
    }

    /// [`serve`] with answers that may name the server's own address.
    pub(crate) fn serve_at(answers: impl FnOnce(&str) -> Vec<Vec<u8>>) -> (String, std::thread::JoinHandle<Vec<String>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let answers = answers(&addr);
        let h = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut answers = answers.into_iter();
            let mut conn = 0;
            'accept: while answers.len() > 0 {
                let (s, _) = l.accept().unwrap();
                conn += 1;
                let mut r = BufReader::new(s);
                while answers.len() > 0 {
                    let Some(req) = read_request(&mut r) else { continue 'accept };
                    seen.push(format!("#{conn} {req}"));
                    let a = answers.next().unwrap();
                    let close = String::from_utf8_lossy(&a).to_ascii_lowercase().contains("connection: close");
                    r.get_mut().write_all(&a).unwrap();
                    if close {
                        continue 'accept;
                    }
                }
            }
            seen
        });
        (addr, h)
    }

    #[test]
    fn chunked_bodies_redirects_and_one_connection() {
        let (addr, server) = serve(vec![
            b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /storage/blob?sig=1\r\nContent-Length: 0\r\n\r\n".to_vec(),
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: y\r\n\r\n".to_vec(),
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
        ]);
        let http = Http::new(&addr, true);
        let url = Url::parse(&format!("http://{addr}/v2/x/blobs/sha256:1")).unwrap();
        let resp = http.fetch("GET", &url, &[("Authorization", "Bearer t".into())], Body::Empty).unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.url.path, "/storage/blob?sig=1");
        assert_eq!(resp.bytes(100).unwrap(), b"hello world");
        assert_eq!(http.fetch("GET", &url, &[], Body::Empty).unwrap().bytes(10).unwrap(), b"ok");
        let seen = server.join().unwrap();
        assert!(seen[1].starts_with("#1 GET /storage/blob?sig=1 HTTP/1.1"), "{seen:?}");
        assert!(seen[1].contains("authorization: Bearer t") || seen[1].contains("Authorization: Bearer t"), "same origin keeps the credentials: {seen:?}");
        assert!(seen.iter().all(|s| s.starts_with("#1 ")), "one connection for all three requests: {seen:?}");
    }

    #[test]
    fn redirect_to_another_origin_drops_authorization() {
        let (storage, storage_server) = serve(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec()]);
        let (addr, server) = serve(vec![format!("HTTP/1.1 302 Found\r\nLocation: http://{storage}/b\r\nContent-Length: 0\r\n\r\n").into_bytes()]);
        let http = Http::new(&addr, true);
        let url = Url::parse(&format!("http://{addr}/v2/x/blobs/sha256:1")).unwrap();
        let resp = http.fetch("GET", &url, &[("Authorization", "Bearer secret".into())], Body::Empty).unwrap();
        assert_eq!(resp.bytes(10).unwrap(), b"ok");
        drop(http);
        server.join().unwrap();
        let seen = storage_server.join().unwrap();
        assert!(!seen[0].contains("secret"), "{seen:?}");
    }

    #[test]
    fn truncated_bodies_fail_and_bodies_are_sent_with_their_length() {
        let (addr, server) = serve(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: close\r\n\r\nshort".to_vec(),
            b"HTTP/1.1 201 Created\r\nContent-Length: 13\r\n\r\nuntil the end".to_vec(),
            b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n".to_vec(),
        ]);
        let http = Http::new(&addr, true);
        let url = Url::parse(&format!("http://{addr}/")).unwrap();
        assert!(http.fetch("GET", &url, &[], Body::Empty).unwrap().bytes(100).is_err(), "a body shorter than its length is an error");
        let resp = http.fetch("PUT", &url, &[], Body::Bytes(b"data")).unwrap();
        assert_eq!((resp.status, resp.bytes(100).unwrap()), (201, b"until the end".to_vec()));
        assert_eq!(http.fetch("POST", &url, &[], Body::Empty).unwrap().status, 202);
        let seen = server.join().unwrap();
        let lower: Vec<String> = seen.iter().map(|s| s.to_ascii_lowercase()).collect();
        assert!(lower[1].contains("put / http/1.1") && lower[1].contains("content-length: 4") && lower[1].ends_with("\ndata"), "{seen:?}");
        assert!(lower[2].contains("post / http/1.1") && lower[2].contains("content-length: 0"), "{seen:?}");
    }

    #[test]
    fn header_values_with_line_breaks_are_refused() {
        let http = Http::new("127.0.0.1:9", true);
        let url = Url::parse("http://127.0.0.1:9/").unwrap();
        let e = http.fetch("GET", &url, &[("Authorization", "Bearer t\r\nX-Injected: yes".into())], Body::Empty).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, HttpError::Header { .. }) && !msg.contains("X-Injected"), "{msg}");
    }

    #[test]
    fn socks_proxies_are_refused_clearly() {
        let mut http = Http::new("reg.example", false);
        http.proxies = Proxies::from_lookup(|k| (k == "HTTPS_PROXY").then(|| "socks5://u:pw@p:1080".to_owned()));
        let e = http.fetch("GET", &Url::parse("https://reg.example/v2/").unwrap(), &[], Body::Empty).unwrap_err().to_string();
        assert!(e.contains("HTTPS_PROXY") && e.contains("SOCKS") && !e.contains("pw"), "{e}");
    }
}
