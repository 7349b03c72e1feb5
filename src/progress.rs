//! A one-line progress counter on stderr for long imports.
//!
//! Owns the progress line only: bytes consumed (a `tar:` file's compressed input; an image
//! layer's uncompressed tar, which is what the disk gets), entries
//! written and the rate, redrawn in place with `\r` at most ten times a second, and only when
//! stderr is a terminal and the caller enabled it. Otherwise every call is a counter increment.
//! The label (a source, an image's layer) is outside text: it is escaped when set.
//!
//! There is deliberately no ticker thread: plyroot later creates user namespaces, and
//! `unshare(CLONE_NEWUSER)` fails in a multi-threaded process. Redraws happen from the calls the
//! unpacker makes anyway (one per entry and per copied buffer).

use std::cell::Cell;
use std::io::{self, Read, Write};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// How often the line may be redrawn.
const REDRAW: Duration = Duration::from_millis(100);

pub(crate) struct Progress {
    label: String,
    total: Option<u64>,
    /// Shared with [`CountingReader`]s so that input bytes are counted while the unpacker holds
    /// `&mut Progress` too; `Rc` not `Arc` because there is only one thread.
    bytes: Rc<Cell<u64>>,
    entries: u64,
    /// `None` when nothing is ever drawn.
    draw: Option<DrawState>,
}

struct DrawState {
    start: Instant,
    last: Option<Instant>,
    /// Whether a line is on screen that `finish` must end with a newline.
    drawn: bool,
}

impl Progress {
    /// A progress line labelled `label`; drawn only if `enabled` and stderr is a terminal.
    pub(crate) fn new(label: &str, total_bytes: Option<u64>, enabled: bool) -> Self {
        let draw = (enabled && rustix::termios::isatty(io::stderr()))
            .then(|| DrawState { start: Instant::now(), last: None, drawn: false });
        Self { label: crate::text::escape(label).into_owned(), total: total_bytes, bytes: Rc::default(), entries: 0, draw }
    }

    /// Counts but never draws.
    #[cfg(test)]
    pub(crate) fn hidden() -> Self {
        Self::new("", None, false)
    }

    /// A fresh line for one part of the work (a layer of an image): its own label, total and
    /// counts, drawn where this one would be.
    #[cfg(feature = "registry")]
    pub(crate) fn sub(&self, label: &str, total_bytes: Option<u64>) -> Self {
        let draw = self.draw.as_ref().map(|_| DrawState { start: Instant::now(), last: None, drawn: false });
        Self { label: crate::text::escape(label).into_owned(), total: total_bytes, bytes: Rc::default(), entries: 0, draw }
    }

    pub(crate) fn set_label(&mut self, label: &str) {
        self.label = crate::text::escape(label).into_owned();
    }

    /// The expected number of input bytes, when it becomes known after `new`.
    pub(crate) fn set_total(&mut self, total_bytes: Option<u64>) {
        self.total = total_bytes;
    }

    pub(crate) fn add_bytes(&mut self, n: u64) {
        self.bytes.set(self.bytes.get() + n);
        self.tick();
    }

    pub(crate) fn add_entry(&mut self) {
        self.entries += 1;
        self.tick();
    }

    /// Wraps `r` so that every byte read from it is counted: wrap the compressed input, so the
    /// count matches the file size shown as the total.
    pub(crate) fn counting<R: Read>(&self, r: R) -> CountingReader<R> {
        CountingReader { inner: r, bytes: Rc::clone(&self.bytes) }
    }

    /// Redraws the line if it is due; cheap enough to call per buffer.
    pub(crate) fn tick(&mut self) {
        let Some(state) = &mut self.draw else { return };
        let now = Instant::now();
        if state.last.is_some_and(|last| now.duration_since(last) < REDRAW) {
            return;
        }
        state.last = Some(now);
        state.drawn = true;
        let line = render(&self.label, self.bytes.get(), self.total, self.entries, now - state.start);
        // A failed write to stderr is not worth failing an import for.
        let _ = write!(io::stderr().lock(), "\r{line}\x1b[K");
    }

    /// Draws the final state and ends the line, if anything was drawn.
    pub(crate) fn finish(&mut self) {
        let Some(state) = &mut self.draw else { return };
        if !state.drawn {
            return;
        }
        let line = render(&self.label, self.bytes.get(), self.total, self.entries, state.start.elapsed());
        let _ = writeln!(io::stderr().lock(), "\r{line}\x1b[K");
        state.drawn = false;
    }
}

/// A reader that adds the bytes read through it to a [`Progress`].
pub(crate) struct CountingReader<R> {
    inner: R,
    bytes: Rc<Cell<u64>>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes.set(self.bytes.get() + n as u64);
        Ok(n)
    }
}

fn render(label: &str, bytes: u64, total: Option<u64>, entries: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(0.001);
    let rate = human(bytes as f64 / secs);
    let done = human(bytes as f64);
    let sep = if label.is_empty() { "" } else { " " };
    match total {
        Some(t) if t > 0 => {
            let pct = (bytes as f64 * 100.0 / t as f64).min(100.0);
            format!("{label}{sep}{done} / {} ({pct:.0}%), {entries} entries, {rate}/s", human(t as f64))
        }
        _ => format!("{label}{sep}{done}, {entries} entries, {rate}/s"),
    }
}

fn human(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut n = n;
    let mut unit = 0;
    while n >= 1024.0 && unit + 1 < UNITS.len() {
        n /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n:.0} {}", UNITS[unit])
    } else {
        format!("{n:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_without_drawing() {
        let mut p = Progress::hidden();
        let data = [7u8; 1000];
        let mut r = p.counting(&data[..]);
        std::io::copy(&mut r, &mut std::io::sink()).unwrap();
        p.add_bytes(24);
        p.add_entry();
        p.finish();
        assert_eq!(p.bytes.get(), 1024);
        assert_eq!(p.entries, 1);
    }

    #[test]
    fn renders_units_and_percent() {
        let line = render("import", 512 * 1024, Some(1024 * 1024), 3, Duration::from_secs(1));
        assert_eq!(line, "import 512.0 KiB / 1.0 MiB (50%), 3 entries, 512.0 KiB/s");
        assert_eq!(render("", 10, None, 0, Duration::from_secs(1)), "10 B, 0 entries, 10 B/s");
    }
}
