//! plyroot's TCP transport under ureq: it connects within [`Deadlines::connect`] and sends under
//! the same deadlines that govern receiving.
//!
//! ureq's own TCP transport sets `SO_SNDTIMEO` once and calls `write_all`, so its per-write
//! timeout bounds each `write(2)`, not the request: a registry that takes a few bytes of an
//! upload now and then lets every `write(2)` return in time, and `plyroot push` would wait for
//! as long as it kept doing so. Here each `write(2)` may wait only until the earlier of two
//! deadlines: no byte taken for [`Deadlines::idle`] since the last one was, and the end of the
//! current minimum-rate window ([`Rate`]), at which the bytes the kernel took in that window are
//! counted. A registry that stops reading an upload fails it after the idle deadline, one that
//! reads it at less than 1 KiB/s after a window, each with an error that says so (see
//! [`Stalled`]).
//!
//! Receiving works as in ureq (a read timeout per `read(2)`); [`super::http`]'s `Watched` bounds
//! the rest of a response from above this transport, through TLS.
//!
//! [`Deadlines::connect`]: super::http::Deadlines
//! [`Deadlines::idle`]: super::http::Deadlines

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use ureq::unversioned::transport::time::Duration as TimeDuration;
use ureq::unversioned::transport::{Buffers, ConnectionDetails, Connector, Either, LazyBuffers, NextTimeout, ShutdownHandle, Transport};
use super::http::Rate;

/// Why a send ended before the server took what it was sent, carried through ureq (and TLS) to
/// `Http::error`, which names the host and the setting.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Stalled {
    /// No byte taken for the whole idle deadline.
    #[error("the server read nothing for {0} s")]
    Idle(u64),
    /// A window ended with less than 1 KiB/s taken.
    #[error("the server read {bytes} bytes in {secs} s")]
    Slow { bytes: u64, secs: u64 },
}

/// Makes [`Socket`]s; in the connector chain where ureq's `TcpConnector` would be.
#[derive(Debug)]
pub(crate) struct Tcp {
    pub idle: Duration,
    pub rate_window: Duration,
}

impl<In: Transport> Connector<In> for Tcp {
    type Out = Either<In, Socket>;

    fn connect(&self, details: &ConnectionDetails, chained: Option<In>) -> Result<Option<Self::Out>, ureq::Error> {
        // A connection made before this link (to a proxy, through CONNECT) is the one to use.
        if let Some(c) = chained {
            return Ok(Some(Either::A(c)));
        }
        let stream = connect(&details.addrs, details.timeout)?;
        if details.config.no_delay() {
            stream.set_nodelay(true)?;
        }
        let stream = Arc::new(stream);
        (details.register_shutdown)(Arc::downgrade(&stream) as Weak<dyn ShutdownHandle>)?;
        let buffers = LazyBuffers::new(details.config.input_buffer_size(), details.config.output_buffer_size());
        Ok(Some(Either::B(Socket { stream, buffers, idle: self.idle, sending: Rate::new(self.rate_window), read_timeout: None, write_timeout: None })))
    }
}

/// Tries each address in turn within the connect deadline: every address but the last gets
/// half of what is left (a host whose first address is a black hole still has its others
/// tried), the last all of it.
fn connect(addrs: &[SocketAddr], timeout: NextTimeout) -> Result<TcpStream, ureq::Error> {
    let budget = timeout.not_zero().map(|t| *t);
    let start = Instant::now();
    let mut last = None;
    for (i, addr) in addrs.iter().enumerate() {
        let per_addr = budget.map(|b| {
            let left = b.saturating_sub(start.elapsed());
            if i + 1 == addrs.len() { left } else { left / 2 }.max(Duration::from_millis(10))
        });
        let result = match per_addr {
            Some(t) => TcpStream::connect_timeout(addr, t),
            None => TcpStream::connect(addr),
        };
        match result {
            Ok(s) => return Ok(s),
            Err(e) if matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock) => last = Some(ureq::Error::Timeout(timeout.reason)),
            // What concerns only this address: the next one may still answer.
            Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable | io::ErrorKind::NetworkDown | io::ErrorKind::AddrNotAvailable) => {
                last = Some(e.into())
            }
            Err(e) => return Err(e.into()),
        }
        if budget.is_some_and(|b| start.elapsed() >= b) {
            return Err(ureq::Error::Timeout(timeout.reason));
        }
    }
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::AddrNotAvailable, "the host has no address").into()))
}

/// One TCP connection.
pub(crate) struct Socket {
    stream: Arc<TcpStream>,
    buffers: LazyBuffers,
    idle: Duration,
    /// What the server took of what was sent, against the minimum rate; only time spent blocked
    /// in `write(2)` counts, so a pooled connection's quiet time is no one's fault.
    sending: Rate,
    /// The socket's timeouts as last set, to set them only when they change.
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Socket").field("peer", &self.stream.peer_addr().ok()).finish_non_exhaustive()
    }
}

/// ureq's timeout as a std one; `None` when it is not to happen.
fn std_timeout(t: TimeDuration) -> Option<Duration> {
    (!t.is_not_happening()).then(|| *t)
}

impl Transport for Socket {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        // ureq's deadline for this send (none unless a request sets one: plyroot leaves ureq's
        // per-write timeout unset, `idle` replaces it), and ours: no byte taken for `idle`.
        let started = Instant::now();
        let theirs = std_timeout(timeout.after);
        let mut last_taken = started;
        let mut sent = 0;
        while sent < amount {
            let now = Instant::now();
            let idle_left = self.idle.saturating_sub(now - last_taken);
            if idle_left.is_zero() {
                return Err(stalled(Stalled::Idle(self.idle.as_secs())));
            }
            let mut wait = idle_left.min(self.sending.left());
            if let Some(t) = theirs {
                let left = t.saturating_sub(now - started);
                if left.is_zero() {
                    return Err(ureq::Error::Timeout(timeout.reason));
                }
                wait = wait.min(left);
            }
            // SO_SNDTIMEO: this write(2) returns what it copied by then, or EAGAIN.
            let wait = wait.max(Duration::from_millis(1));
            if self.write_timeout != Some(wait) {
                self.stream.set_write_timeout(Some(wait))?;
                self.write_timeout = Some(wait);
            }
            let result = (&*self.stream).write(&self.buffers.output()[sent..amount]);
            let spent = now.elapsed();
            let n = match result {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                Ok(n) => n,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted) => 0,
                Err(e) => return Err(e.into()),
            };
            sent += n;
            if n > 0 {
                last_taken = Instant::now();
            }
            self.sending.check(spent, n, false).map_err(|(bytes, secs)| stalled(Stalled::Slow { bytes, secs }))?;
        }
        Ok(())
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        let timeout = timeout.for_read();
        let wait = std_timeout(timeout.after);
        if wait.is_some_and(|w| w.is_zero()) {
            return Err(ureq::Error::Timeout(timeout.reason));
        }
        let started = Instant::now();
        loop {
            // What is left of the deadline after any interrupted read(2).
            let left = wait.map(|w| w.saturating_sub(started.elapsed()).max(Duration::from_millis(1)));
            if self.read_timeout != left {
                self.stream.set_read_timeout(left)?;
                self.read_timeout = left;
            }
            let input = self.buffers.input_append_buf();
            match (&*self.stream).read(input) {
                Ok(n) => {
                    self.buffers.input_appended(n);
                    return Ok(n > 0);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted && wait.is_none_or(|w| started.elapsed() < w) => continue,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted) => return Err(ureq::Error::Timeout(timeout.reason)),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Whether a pooled connection can be used again: nothing waiting to be read (a server
    /// sends nothing unasked), not closed.
    fn is_open(&mut self) -> bool {
        let probe = || -> io::Result<bool> {
            self.stream.set_nonblocking(true)?;
            let open = matches!((&*self.stream).read(&mut [0u8]), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
            self.stream.set_nonblocking(false)?;
            Ok(open)
        };
        probe().unwrap_or(false)
    }
}

fn stalled(s: Stalled) -> ureq::Error {
    ureq::Error::Other(Box::new(s))
}
