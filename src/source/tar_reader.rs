//! Reading a tar stream the way GNU tar 1.34 reads it, one member at a time, streaming.
//!
//! Formats: v7, ustar, GNU and old GNU, POSIX pax (local and global extended headers), star's
//! ustar variant. Extensions: GNU long names and link targets, pax `path`/`linkpath`/`size`/
//! `uid`/`gid`/`mtime`/`SCHILY.xattr.*`, and every sparse format GNU tar writes: the old GNU
//! map in the header and its extension blocks, and pax sparse 0.0 (`GNU.sparse.offset` and
//! `numbytes` records), 0.1 (`GNU.sparse.map`) and 1.0 (the map at the start of the data, the
//! member named `…/GNUSparseFile.N/NAME` with the real name in `GNU.sparse.name`).
//!
//! GNU tar's leniency is kept where it decides what an archive means: a numeric field of only
//! spaces or NULs is 0; of several long-name, long-link or pax headers before one member the last
//! one counts; a NUL ends a name; the first zero block ends the archive; a regular-file member
//! whose name ends in `/` is a directory; a directory's size field is not followed by data; an
//! unknown type flag is a regular file. Where GNU tar reports an error (a bad checksum after the
//! first header, a truncated member, a malformed extended header or sparse map), this reader
//! refuses, naming the byte offset, rather than guess.
//!
//! Name handling is in [`header_name`] and [`c_string`]: names are bytes throughout.

use std::io::{self, Read};

use rustix::fs::Timespec;

const BLOCK: u64 = 512;
/// An extended header (pax records, a long name) is held in memory: larger ones are refused, as
/// no archiver writes them and a hostile one must not exhaust memory.
const MAX_EXTENSION: u64 = 16 << 20;
/// Sparse maps are held in memory (16 bytes a region), before the data they describe.
const MAX_REGIONS: usize = 1 << 21;
const XATTR_PREFIX: &[u8] = b"SCHILY.xattr.";

/// What a member creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    File,
    Dir,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
    /// Volume labels and GNU's obsolete name lists: nothing to create.
    Skip,
}

/// One extent of a sparse file: `len` bytes of data at `offset`; a zero `len` truncates the file
/// at `offset` (GNU tar's way of ending a file in a hole).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Region {
    pub offset: u64,
    pub len: u64,
}

/// One archive member, with every extension that applies to it already applied.
#[derive(Debug)]
pub(super) struct Member {
    pub kind: Kind,
    /// As the archive gives it (not normalized).
    pub name: Vec<u8>,
    pub link: Vec<u8>,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: Timespec,
    pub dev: (u32, u32),
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// A sparse file's map: the member's data is these regions' bytes, in order.
    pub sparse: Option<Vec<Region>>,
    /// A type flag GNU tar does not know: the member is extracted as a regular file, as GNU tar does.
    pub unknown_type: Option<u8>,
}

/// Why a stream cannot be read as a tar archive.
#[derive(Debug)]
pub(super) enum ReadError {
    /// The input failed, or ended inside a member.
    Io(io::Error),
    /// What GNU tar reports as an error: a damaged header, a malformed extension.
    Damaged { offset: u64, reason: String },
    /// The first block is not a tar header.
    NotTar,
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

fn damaged(offset: u64, reason: impl Into<String>) -> ReadError {
    ReadError::Damaged { offset, reason: reason.into() }
}

type Records = Vec<(Vec<u8>, Vec<u8>)>;

/// A tar stream being read member by member.
pub(super) struct Reader<'r> {
    r: &'r mut dyn Read,
    /// Offset in the stream of the next byte to read.
    pos: u64,
    /// Bytes of the current member's data not read yet, and the padding after them.
    left: u64,
    pad: u64,
    /// The records of the last global (`g`) header: they apply to every member after it.
    globals: Records,
    headers: u64,
    dangling: bool,
}

impl<'r> Reader<'r> {
    pub(super) fn new(r: &'r mut dyn Read) -> Self {
        Reader { r, pos: 0, left: 0, pad: 0, globals: Vec::new(), headers: 0, dangling: false }
    }

    /// Valid headers read so far (extension headers included).
    pub(super) fn headers(&self) -> u64 {
        self.headers
    }

    /// Whether the archive ended after an extension header (long name, pax) that describes no
    /// member: GNU tar ignores it, and so does this reader; the caller may warn.
    pub(super) fn dangling_extension(&self) -> bool {
        self.dangling
    }

    /// The next member, after skipping what is left of the current one; `None` at the end.
    pub(super) fn next(&mut self) -> Result<Option<Member>, ReadError> {
        self.skip(self.left + self.pad)?;
        self.left = 0;
        self.pad = 0;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut pax: Option<Records> = None;
        let mut pending = false;
        loop {
            let start = self.pos;
            let mut block = [0u8; BLOCK as usize];
            if !self.read_block(&mut block)? || block.iter().all(|&b| b == 0) {
                // GNU tar ends at the first zero block (warning when no second one follows).
                self.dangling = pending;
                return Ok(None);
            }
            if !checksum_ok(&block) {
                if self.headers == 0 {
                    return Err(ReadError::NotTar);
                }
                return Err(damaged(start, "a header's checksum does not match"));
            }
            self.headers += 1;
            let flag = block[156];
            let size = match flag {
                b'1' => 0,
                _ => unsigned(&block[124..136]).map_err(|r| damaged(start, format!("the size field {r}")))?,
            };
            match flag {
                b'L' | b'K' => {
                    let data = self.extension(size, start)?;
                    let value = c_string(&data).to_vec();
                    *(if flag == b'L' { &mut long_name } else { &mut long_link }) = Some(value);
                }
                b'x' | b'X' => pax = Some(parse_records(&self.extension(size, start)?, start)?),
                b'g' => self.globals = parse_records(&self.extension(size, start)?, start)?,
                _ => return self.member(&block, start, size, long_name, long_link, pax).map(Some),
            }
            pending |= flag != b'g';
        }
    }

    /// Reads the current member's data; 0 at its end.
    pub(super) fn data(&mut self) -> Data<'_, 'r> {
        Data(self)
    }

    /// Reads a sparse member's data: the bytes of each region of `map` in turn (GNU tar starts
    /// each region's data at a block boundary).
    pub(super) fn sparse_data<'a>(&'a mut self, map: &'a [Region]) -> SparseData<'a, 'r> {
        SparseData { reader: self, regions: map.iter(), current: 0, consumed: 0 }
    }

    /// The member whose header is `block`, with the long names and extended records read before
    /// it applied; positions the reader at its data.
    fn member(
        &mut self,
        block: &[u8; 512],
        start: u64,
        mut size: u64,
        long_name: Option<Vec<u8>>,
        long_link: Option<Vec<u8>>,
        pax: Option<Records>,
    ) -> Result<Member, ReadError> {
        let flag = block[156];
        let posix = &block[257..263] == b"ustar\0";
        let gnu = &block[257..265] == b"ustar  \0";
        let mut m = header_member(block, start, posix || gnu, long_name, long_link)?;
        let mut sparse = PaxSparse::default();
        for (k, v) in self.globals.iter().chain(pax.iter().flatten()) {
            apply_record(&mut m, &mut size, &mut sparse, k, v, start)?;
        }
        m.kind = member_kind(flag, &mut m, start)?;
        // A directory's size field describes no data in the archive (GNU tar does not skip any).
        let data_len = if flag == b'5' { 0 } else { size };
        self.left = data_len;
        self.pad = (BLOCK - data_len % BLOCK) % BLOCK;

        // The old GNU map's extension blocks follow the header whatever the member turns out to be.
        let old_gnu_map = if gnu && flag == b'S' { Some(self.old_gnu_map(block, start)?) } else { None };
        if m.kind == Kind::File {
            m.sparse = self.sparse_map(old_gnu_map, sparse, posix, size, start)?;
        }
        Ok(m)
    }

    /// A regular file's sparse map, if it is sparse: the old GNU one, or the PAX records' (read
    /// from the data for format 1.0), checked against the file's size and the member's data.
    fn sparse_map(&mut self, old_gnu_map: Option<Vec<Region>>, mut sparse: PaxSparse, posix: bool, size: u64, start: u64) -> Result<Option<Vec<Region>>, ReadError> {
        let map = if old_gnu_map.is_some() {
            old_gnu_map
        } else if sparse.major > 0 || (posix && !sparse.map.is_empty()) {
            if sparse.major >= 1 {
                self.pax_1_map(&mut sparse, start)?;
            }
            let real = sparse.size.unwrap_or(size);
            check_map(&sparse.map, real, start)?;
            Some(std::mem::take(&mut sparse.map))
        } else {
            None
        };
        if let Some(map) = &map {
            // Each region's data starts at a block boundary: they must all fit in the member.
            let blocks: u64 = map.iter().map(|r| r.len.div_ceil(BLOCK)).sum();
            if blocks > self.left.div_ceil(BLOCK) {
                return Err(damaged(start, "the sparse map describes more data than the member holds"));
            }
        }
        Ok(map)
    }

    /// The old GNU sparse map: four regions in the header, more in extension blocks after it.
    fn old_gnu_map(&mut self, block: &[u8; 512], start: u64) -> Result<Vec<Region>, ReadError> {
        let real = unsigned(&block[483..495]).map_err(|r| damaged(start, format!("the sparse real size {r}")))?;
        let mut map = Vec::new();
        let mut done = false;
        let mut add = |entry: &[u8], map: &mut Vec<Region>| -> Result<(), ReadError> {
            // An entry whose length field starts with NUL ends the map.
            if done || entry[12] == 0 {
                done = true;
                return Ok(());
            }
            let num = |f: &[u8]| unsigned(f).map_err(|r| damaged(start, format!("a sparse map entry {r}")));
            let region = Region { offset: num(&entry[..12])?, len: num(&entry[12..24])? };
            if map.len() >= MAX_REGIONS {
                return Err(damaged(start, format!("the sparse map has more than {MAX_REGIONS} regions")));
            }
            map.push(region);
            Ok(())
        };
        for entry in block[386..482].chunks(24) {
            add(entry, &mut map)?;
        }
        let mut extended = block[482] != 0;
        while extended {
            let at = self.pos;
            let mut ext = [0u8; BLOCK as usize];
            if !self.read_block(&mut ext)? {
                return Err(ReadError::Io(io::Error::new(io::ErrorKind::UnexpectedEof, format!("the archive ends in a sparse map (at byte {at})"))));
            }
            for entry in ext[..504].chunks(24) {
                add(entry, &mut map)?;
            }
            extended = ext[504] != 0;
        }
        check_map(&map, real, start)?;
        Ok(map)
    }

    /// Pax sparse 1.0: the map is at the start of the data, as decimal lines (a count, then an
    /// offset and a length per region), padded to a block.
    fn pax_1_map(&mut self, sparse: &mut PaxSparse, start: u64) -> Result<(), ReadError> {
        let total = self.left;
        let mut line = Vec::new();
        let mut next_number = |reader: &mut Self| -> Result<u64, ReadError> {
            line.clear();
            loop {
                let mut b = [0u8; 1];
                if reader.read_data(&mut b)? == 0 {
                    return Err(damaged(start, "the sparse map ends before the member's data does"));
                }
                if b[0] == b'\n' {
                    break;
                }
                // GNU tar allows a number as long as the largest one.
                if line.len() >= 20 {
                    return Err(damaged(start, "a number in the sparse map is too long"));
                }
                line.push(b[0]);
            }
            decimal(&line).ok_or_else(|| damaged(start, format!("malformed sparse map entry '{}'", String::from_utf8_lossy(&line))))
        };
        let count = next_number(self)?;
        sparse.map.clear();
        for _ in 0..count {
            let offset = next_number(self)?;
            let len = next_number(self)?;
            sparse.push(Region { offset, len }).map_err(|r| damaged(start, r))?;
        }
        let used = total - self.left;
        let pad = ((BLOCK - used % BLOCK) % BLOCK).min(self.left);
        self.skip(pad)?;
        self.left -= pad;
        Ok(())
    }

    /// Reads an extension header's data (and its padding) into memory.
    fn extension(&mut self, size: u64, start: u64) -> Result<Vec<u8>, ReadError> {
        if size > MAX_EXTENSION {
            return Err(damaged(start, format!("an extended header of {size} bytes (more than {MAX_EXTENSION})")));
        }
        let mut data = vec![0u8; size as usize];
        self.read_exact(&mut data, start)?;
        self.skip((BLOCK - size % BLOCK) % BLOCK)?;
        Ok(data)
    }

    /// Reads data of the current member, at most `left` bytes.
    fn read_data(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = loop {
            match self.r.read(&mut buf[..want]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r?,
            }
        };
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("the archive ends inside a member's data (at byte {})", self.pos)));
        }
        self.left -= n as u64;
        self.pos += n as u64;
        Ok(n)
    }

    /// Reads one block; `false` on a clean end of input before it.
    fn read_block(&mut self, block: &mut [u8; 512]) -> Result<bool, ReadError> {
        let mut n = 0;
        while n < block.len() {
            match self.r.read(&mut block[n..]) {
                Ok(0) if n == 0 => return Ok(false),
                Ok(0) => return Err(ReadError::Io(io::Error::new(io::ErrorKind::UnexpectedEof, format!("the archive ends inside a header (at byte {})", self.pos)))),
                Ok(k) => {
                    n += k;
                    self.pos += k as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }

    fn read_exact(&mut self, buf: &mut [u8], start: u64) -> Result<(), ReadError> {
        self.r.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => ReadError::Io(io::Error::new(e.kind(), format!("the archive ends inside the extended header at byte {start}"))),
            _ => ReadError::Io(e),
        })?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    /// Skips `n` bytes of input; ending early is an error (a truncated member).
    fn skip(&mut self, n: u64) -> io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        let got = io::copy(&mut (&mut self.r).take(n), &mut io::sink())?;
        self.pos += got;
        if got < n {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("the archive ends inside a member (at byte {})", self.pos)));
        }
        Ok(())
    }
}

/// A member's data, as a reader.
pub(super) struct Data<'a, 'r>(&'a mut Reader<'r>);

impl Read for Data<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read_data(buf)
    }
}

/// A sparse member's data, region after region, without the padding between them.
pub(super) struct SparseData<'a, 'r> {
    reader: &'a mut Reader<'r>,
    regions: std::slice::Iter<'a, Region>,
    /// Bytes of the current region not read yet, and read so far.
    current: u64,
    consumed: u64,
}

impl Read for SparseData<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current == 0 {
            // The previous region's last block is padded: the next one starts on a boundary.
            let pad = ((BLOCK - self.consumed % BLOCK) % BLOCK).min(self.reader.left);
            if pad > 0 {
                self.reader.skip(pad)?;
                self.reader.left -= pad;
            }
            self.consumed = 0;
            match self.regions.next() {
                Some(r) => self.current = r.len,
                None => return Ok(0),
            }
        }
        let want = buf.len().min(usize::try_from(self.current).unwrap_or(usize::MAX));
        let n = self.reader.read_data(&mut buf[..want])?;
        self.current -= n as u64;
        self.consumed += n as u64;
        Ok(n)
    }
}

/// A member as its header block says it is (before extended records): names, mode, owners,
/// mtime, and the device numbers of a ustar or GNU (`ustar_format`) device node.
fn header_member(block: &[u8; 512], start: u64, ustar_format: bool, long_name: Option<Vec<u8>>, long_link: Option<Vec<u8>>) -> Result<Member, ReadError> {
    let flag = block[156];
    let posix = &block[257..263] == b"ustar\0";
    let field = |range: std::ops::Range<usize>, what: &str| unsigned(&block[range]).map_err(|r| damaged(start, format!("the {what} field {r}")));
    let mut m = Member {
        kind: Kind::File,
        name: long_name.unwrap_or_else(|| header_name(block, posix)),
        link: long_link.unwrap_or_else(|| c_string(&block[157..257]).to_vec()),
        mode: (field(100..108, "mode")? & 0o7777) as u32,
        uid: field(108..116, "uid")?,
        gid: field(116..124, "gid")?,
        mtime: Timespec { tv_sec: signed(&block[136..148]).map_err(|r| damaged(start, format!("the mtime field {r}")))?, tv_nsec: 0 },
        dev: (0, 0),
        xattrs: Vec::new(),
        sparse: None,
        unknown_type: None,
    };
    if ustar_format && matches!(flag, b'3' | b'4') {
        let (major, minor) = (field(329..337, "devmajor")?, field(337..345, "devminor")?);
        m.dev = (u32::try_from(major).unwrap_or(u32::MAX), u32::try_from(minor).unwrap_or(u32::MAX));
    }
    Ok(m)
}

/// Applies one extended header record (global or the member's own) to the member, its data
/// size, and the PAX sparse description being gathered.
fn apply_record(m: &mut Member, size: &mut u64, sparse: &mut PaxSparse, k: &[u8], v: &[u8], start: u64) -> Result<(), ReadError> {
    let bad = || damaged(start, format!("malformed extended header record {}={}", String::from_utf8_lossy(k), String::from_utf8_lossy(v)));
    let num = || decimal(v).ok_or_else(bad);
    match k {
        b"path" | b"GNU.sparse.name" => m.name = c_string(v).to_vec(),
        b"linkpath" => m.link = c_string(v).to_vec(),
        b"size" => *size = num()?,
        b"uid" => m.uid = num()?,
        b"gid" => m.gid = num()?,
        b"mtime" => m.mtime = parse_pax_time(v).ok_or_else(bad)?,
        b"GNU.sparse.major" => sparse.major = num()?,
        b"GNU.sparse.minor" => {
            num()?;
        }
        b"GNU.sparse.size" | b"GNU.sparse.realsize" => sparse.size = Some(num()?),
        b"GNU.sparse.numblocks" => {
            num()?;
            sparse.map.clear();
        }
        b"GNU.sparse.offset" => sparse.offset = Some(num()?),
        b"GNU.sparse.numbytes" => {
            let len = num()?;
            let offset = sparse.offset.take().ok_or_else(bad)?;
            sparse.push(Region { offset, len }).map_err(|r| damaged(start, r))?;
        }
        b"GNU.sparse.map" => sparse.parse_map(v).ok_or_else(bad)?,
        _ => {
            if let Some(name) = k.strip_prefix(XATTR_PREFIX) {
                m.xattrs.retain(|(n, _)| n.as_slice() != name);
                m.xattrs.push((name.to_vec(), v.to_vec()));
            }
        }
    }
    Ok(())
}

/// What the member is, from its type flag (and a trailing `/` on a regular file's name).
/// Unknown types are read as regular files, and remembered (`unknown_type`).
fn member_kind(flag: u8, m: &mut Member, start: u64) -> Result<Kind, ReadError> {
    let trailing_slash = m.name.ends_with(b"/");
    Ok(match flag {
        b'0' | b'\0' | b'7' | b'S' if trailing_slash => Kind::Dir,
        b'0' | b'\0' | b'7' | b'S' => Kind::File,
        b'1' => Kind::Hardlink,
        b'2' => Kind::Symlink,
        b'3' => Kind::Char,
        b'4' => Kind::Block,
        b'5' | b'D' => Kind::Dir,
        b'6' => Kind::Fifo,
        b'V' | b'N' => Kind::Skip,
        b'M' => return Err(damaged(start, "the member continues a file from another volume of a multi-volume archive; extract it with all its volumes (tar -M)")),
        other => {
            m.unknown_type = Some(other);
            Kind::File
        }
    })
}

/// The sparse records of pax headers (formats 0.0, 0.1, 1.0).
#[derive(Default)]
struct PaxSparse {
    major: u64,
    size: Option<u64>,
    offset: Option<u64>,
    map: Vec<Region>,
}

impl PaxSparse {
    fn push(&mut self, r: Region) -> Result<(), String> {
        if self.map.len() >= MAX_REGIONS {
            return Err(format!("the sparse map has more than {MAX_REGIONS} regions"));
        }
        self.map.push(r);
        Ok(())
    }

    /// `GNU.sparse.map=OFFSET,LEN,OFFSET,LEN…` (format 0.1).
    fn parse_map(&mut self, v: &[u8]) -> Option<()> {
        self.map.clear();
        let mut numbers = v.split(|&b| b == b',');
        while let Some(offset) = numbers.next() {
            let len = numbers.next()?;
            self.push(Region { offset: decimal(offset)?, len: decimal(len)? }).ok()?;
        }
        Some(())
    }
}

/// GNU tar refuses a region that ends past the file's real size ("invalid sparse archive member").
fn check_map(map: &[Region], real: u64, start: u64) -> Result<(), ReadError> {
    for r in map {
        if r.offset.checked_add(r.len).is_none_or(|end| end > real) {
            return Err(damaged(start, format!("invalid sparse member: a region ({} bytes at {}) ends past the file's size ({real})", r.len, r.offset)));
        }
    }
    Ok(())
}

/// The name in a header: `name`, after `prefix` and a slash in POSIX ustar headers (GNU headers
/// keep other data where the prefix would be).
fn header_name(block: &[u8; 512], posix: bool) -> Vec<u8> {
    let name = c_string(&block[..100]);
    let prefix = c_string(&block[345..500]);
    if posix && !prefix.is_empty() {
        [prefix, b"/", name].concat()
    } else {
        name.to_vec()
    }
}

/// A name field, a long name or a pax path: everything before the first NUL.
fn c_string(b: &[u8]) -> &[u8] {
    b.iter().position(|&c| c == 0).map_or(b, |i| &b[..i])
}

/// GNU tar accepts a header whose checksum is the unsigned or the signed sum of its bytes, the
/// checksum field counted as spaces.
fn checksum_ok(block: &[u8; 512]) -> bool {
    let Ok(recorded) = octal(&block[148..156]) else { return false };
    let (mut unsigned_sum, mut signed_sum) = (0i64, 0i64);
    for (i, &b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned_sum += i64::from(b);
        signed_sum += i64::from(b as i8);
    }
    recorded == unsigned_sum || recorded == signed_sum
}

/// Octal digits, as in a checksum field: spaces and NULs around them.
fn octal(field: &[u8]) -> Result<i64, &'static str> {
    let digits = trim_field(field);
    if digits.is_empty() {
        return Ok(0);
    }
    let mut v: i64 = 0;
    for &d in digits {
        if !(b'0'..=b'7').contains(&d) {
            return Err("is not a number");
        }
        v = v.checked_mul(8).and_then(|v| v.checked_add(i64::from(d - b'0'))).ok_or("is out of range")?;
    }
    Ok(v)
}

/// A numeric header field: octal (a field of only spaces or NULs is 0), or GNU's base-256
/// (first byte 0x80 for positive, 0xff for negative numbers).
fn signed(field: &[u8]) -> Result<i64, &'static str> {
    match field.first() {
        Some(&b) if b & 0x80 != 0 => {
            let negative = b & 0x40 != 0;
            let mut v: i128 = i128::from(b & 0x3f) - if negative { 0x40 } else { 0 };
            for &b in &field[1..] {
                v = v.checked_mul(256).and_then(|v| v.checked_add(i128::from(b))).ok_or("is out of range")?;
            }
            i64::try_from(v).map_err(|_| "is out of range")
        }
        _ => octal(field),
    }
}

fn unsigned(field: &[u8]) -> Result<u64, &'static str> {
    u64::try_from(signed(field)?).map_err(|_| "is negative")
}

/// The digits of an octal field: one leading NUL (old tars wrote one after an overflowing
/// field), leading spaces, then everything up to a NUL or space.
fn trim_field(field: &[u8]) -> &[u8] {
    let field = field.strip_prefix(b"\0").unwrap_or(field);
    let start = field.iter().position(|&b| b != b' ').unwrap_or(field.len());
    let field = &field[start..];
    let end = field.iter().position(|&b| b == 0 || b == b' ').unwrap_or(field.len());
    &field[..end]
}

/// A pax decimal number: digits only.
fn decimal(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Parses pax records `LEN KEY=VALUE\n`, in order (sparse 0.0 repeats keys and each counts).
fn parse_records(data: &[u8], start: u64) -> Result<Records, ReadError> {
    let bad = |what: &str| damaged(start, format!("malformed extended header: {what}"));
    let mut out = Vec::new();
    let mut rest = data;
    loop {
        let skip = rest.iter().position(|&b| b != b' ' && b != b'\t').unwrap_or(rest.len());
        // GNU tar stops quietly at the end or at NUL padding.
        if skip == rest.len() || rest[skip] == 0 {
            return Ok(out);
        }
        let digits = rest[skip..].iter().position(|b| !b.is_ascii_digit()).unwrap_or(rest.len() - skip);
        if digits == 0 {
            return Err(bad("a record has no length"));
        }
        let len: usize = std::str::from_utf8(&rest[skip..skip + digits]).ok().and_then(|s| s.parse().ok()).ok_or_else(|| bad("a record's length is out of range"))?;
        if len > rest.len() || len < skip + digits + 1 {
            return Err(bad("a record's length is out of range"));
        }
        let record = &rest[..len];
        let body = &record[skip + digits..];
        if !body.starts_with(b" ") && !body.starts_with(b"\t") {
            return Err(bad("no blank after a record's length"));
        }
        let body = &body[body.iter().position(|&b| b != b' ' && b != b'\t').unwrap_or(body.len())..];
        let eq = body.iter().position(|&b| b == b'=').ok_or_else(|| bad("a record has no '='"))?;
        if record.last() != Some(&b'\n') || eq + 1 > body.len() - 1 {
            return Err(bad("a record does not end with a newline"));
        }
        out.push((body[..eq].to_vec(), body[eq + 1..body.len() - 1].to_vec()));
        rest = &rest[len..];
    }
}

/// Parses a pax time (`SECONDS[.FRACTION]`, possibly negative) exactly, without floats.
pub(super) fn parse_pax_time(v: &[u8]) -> Option<Timespec> {
    let s = std::str::from_utf8(v).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i64 = secs.parse().ok()?;
    let mut nanos: i64 = 0;
    for (i, d) in frac.bytes().take(9).enumerate() {
        nanos += i64::from(d - b'0') * 10i64.pow(8 - i as u32);
    }
    Some(if !neg {
        Timespec { tv_sec: secs, tv_nsec: nanos }
    } else if nanos == 0 {
        Timespec { tv_sec: -secs, tv_nsec: 0 }
    } else {
        Timespec { tv_sec: -secs - 1, tv_nsec: 1_000_000_000 - nanos }
    })
}
