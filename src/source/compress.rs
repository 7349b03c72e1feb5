//! Decompression chosen by content, and sha256 over a stream as it passes.
//!
//! Formats are detected from magic bytes, never from a file name or media type: registries and
//! users mislabel layers, and `tar:-` has no name at all.

use std::io::{self, BufReader, Read};

use sha2::{Digest, Sha256};

/// Input is read in blocks this large; tar headers are 512 bytes, so unbuffered plain input would
/// cost a syscall per header.
const INPUT_BUF: usize = 256 * 1024;

const GZIP: &[u8] = &[0x1f, 0x8b];
const ZSTD: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
const XZ: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0x00];
const BZIP2: &[u8] = b"BZh";

/// Wraps `r` in the decoder its first bytes call for: gzip, xz, zstd, or none. Concatenated
/// members/streams/frames are all decoded, as `gzip -d`, `xz -d` and `zstd -d` do.
pub(crate) fn decompress<'a>(mut r: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
    // Read the magic by hand rather than through `BufReader::fill_buf`, which may return fewer
    // bytes than a magic number (a pipe) and cannot be topped up; then put it back with `chain`.
    let mut magic = [0u8; 6];
    let mut n = 0;
    while n < magic.len() {
        match r.read(&mut magic[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let head = &magic[..n];
    let format = if head.starts_with(GZIP) {
        Format::Gzip
    } else if head.starts_with(ZSTD) {
        Format::Zstd
    } else if head.starts_with(XZ) {
        Format::Xz
    } else if head.starts_with(BZIP2) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bzip2 input is not supported; recompress it with gzip, xz or zstd",
        ));
    } else {
        Format::Plain
    };
    let r = BufReader::with_capacity(INPUT_BUF, io::Cursor::new(magic).take(n as u64).chain(r));
    Ok(match format {
        Format::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(r)),
        Format::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(r)?),
        Format::Xz => Box::new(xz2::bufread::XzDecoder::new_multi_decoder(r)),
        Format::Plain => Box::new(r),
    })
}

enum Format {
    Plain,
    Gzip,
    Zstd,
    Xz,
}

/// A reader that hashes everything read through it with sha256.
pub(crate) struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> HashingReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self { inner, hasher: Sha256::new() }
    }

    /// Reads the rest of the stream (a tar ends before its padding, a compressed blob may have
    /// trailing bytes; the digest covers all of it) and returns `sha256:HEX`.
    pub(crate) fn drain_and_digest(mut self) -> io::Result<String> {
        io::copy(&mut self, &mut io::sink())?;
        Ok(format!("sha256:{}", hex::encode(self.hasher.finalize())))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn sample() -> Vec<u8> {
        (0..200_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect()
    }

    fn roundtrip(compressed: Vec<u8>) -> Vec<u8> {
        let mut out = Vec::new();
        decompress(&compressed[..]).unwrap().read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn detects_each_format_by_content() {
        let data = sample();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&data).unwrap();
        assert_eq!(roundtrip(gz.finish().unwrap()), data);

        let mut xz = xz2::write::XzEncoder::new(Vec::new(), 1);
        xz.write_all(&data).unwrap();
        assert_eq!(roundtrip(xz.finish().unwrap()), data);

        assert_eq!(roundtrip(zstd::encode_all(&data[..], 1).unwrap()), data);
        assert_eq!(roundtrip(data.clone()), data);
        assert_eq!(roundtrip(Vec::new()), Vec::<u8>::new());
        assert_eq!(roundtrip(b"ab".to_vec()), b"ab".to_vec());
    }

    #[test]
    fn decodes_concatenated_gzip_members() {
        let mut all = Vec::new();
        for part in [&b"hello "[..], b"world"] {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(part).unwrap();
            all.extend(gz.finish().unwrap());
        }
        assert_eq!(roundtrip(all), b"hello world");
    }

    /// A reader that returns one byte per read, like a slow pipe.
    struct Trickle<'a>(&'a [u8]);
    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let Some((&b, rest)) = self.0.split_first() else { return Ok(0) };
            if buf.is_empty() {
                return Ok(0);
            }
            buf[0] = b;
            self.0 = rest;
            Ok(1)
        }
    }

    #[test]
    fn detects_magic_across_short_reads() {
        let data = sample();
        let z = zstd::encode_all(&data[..], 1).unwrap();
        let mut out = Vec::new();
        decompress(Trickle(&z)).unwrap().read_to_end(&mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn rejects_bzip2() {
        let err = decompress(&b"BZh91AY&SY"[..]).err().unwrap();
        assert!(err.to_string().contains("bzip2"));
    }

    #[test]
    fn hashes_whole_stream() {
        let h = HashingReader::new(&b"abc"[..]).drain_and_digest().unwrap();
        assert_eq!(h, "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
