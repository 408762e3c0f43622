//! Verifying readers. Both hold back the last chunk of output until the
//! content hash has matched, so a consumer never receives a corrupt blob in
//! full: it gets `InvalidData` before the final bytes.

use std::fs::File;
use std::io::{self, Read};
use std::mem;
use std::os::unix::fs::FileExt;

use sha2::{Digest as _, Sha256};
use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};

use super::{Cas, Digest, IoContext, Result};

/// Output chunk size; also the amount held back until verification.
const CHUNK: usize = 256 * 1024;
const IN_CHUNK: usize = 128 * 1024;

impl Cas {
    /// Decompressed content, verified as it streams.
    pub fn open_blob(&self, d: &Digest) -> Result<BlobReader> {
        BlobReader::new(*d, self.open_blob_file(d)?)
    }

    /// The compressed on-disk bytes (one zstd frame), verified as they stream.
    pub fn open_raw(&self, d: &Digest) -> Result<RawReader> {
        let file = self.open_blob_file(d)?;
        let len = file.metadata().ctx(|| format!("stat blob {d}"))?.len();
        Ok(RawReader {
            inner: HoldBack::new(Check::new(*d, file)?, true),
            len,
        })
    }
}

impl BlobReader {
    /// Verifying reader over a blob file that should hold `d`.
    pub(crate) fn new(d: Digest, file: File) -> Result<BlobReader> {
        let mut hdr = [0u8; 18];
        let n = read_at_most(&file, &mut hdr).ctx(|| format!("read blob {d}"))?;
        let len_hint = zstd::zstd_safe::get_frame_content_size(&hdr[..n])
            .ok()
            .flatten();
        Ok(BlobReader {
            inner: HoldBack::new(Check::new(d, file)?, false),
            len_hint,
        })
    }

    /// Content size from the frame header (unverified until EOF).
    pub fn len_hint(&self) -> Option<u64> {
        self.len_hint
    }
}

fn read_at_most(f: &File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Decompressed bytes of a blob; `InvalidData` instead of the final EOF if
/// the content does not hash to its digest.
pub struct BlobReader {
    inner: HoldBack,
    len_hint: Option<u64>,
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

/// Compressed bytes of a blob exactly as stored, for `Content-Encoding:
/// zstd` passthrough; decompressed and hashed alongside.
pub struct RawReader {
    inner: HoldBack,
    len: u64,
}

impl RawReader {
    /// Length of the stored (compressed) file.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Read for RawReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

/// Decompresses a blob file and hashes the content.
struct Check {
    digest: Digest,
    file: File,
    dec: Decoder<'static>,
    hasher: Sha256,
    input: Vec<u8>,
    in_pos: usize,
    file_eof: bool,
    frame_done: bool,
    scratch: Vec<u8>,
}

impl Check {
    fn new(digest: Digest, file: File) -> Result<Check> {
        Ok(Check {
            digest,
            file,
            dec: Decoder::new().ctx(|| "create zstd decoder".into())?,
            hasher: Sha256::new(),
            input: Vec::with_capacity(IN_CHUNK),
            in_pos: 0,
            file_eof: false,
            frame_done: false,
            scratch: Vec::new(),
        })
    }

    fn corrupt(&self, why: impl std::fmt::Display) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("blob {} is corrupt: {why}", self.digest),
        )
    }

    fn read_file(&mut self, buf: &mut Vec<u8>, want: usize) -> io::Result<usize> {
        let start = buf.len();
        (&self.file).take(want as u64).read_to_end(buf)?;
        Ok(buf.len() - start)
    }

    /// Append up to `CHUNK` decompressed bytes to `out`; nothing appended
    /// means the frame ended (and nothing follows it in the file).
    fn fill_decoded(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        out.reserve(CHUNK);
        let start = out.len();
        let limit = start + CHUNK;
        loop {
            if self.frame_done {
                self.expect_end()?;
                break;
            }
            if out.len() >= limit {
                break;
            }
            if self.in_pos == self.input.len() && !self.file_eof {
                let mut input = mem::take(&mut self.input);
                input.clear();
                self.in_pos = 0;
                let n = self.read_file(&mut input, IN_CHUNK);
                self.input = input;
                if n? == 0 {
                    self.file_eof = true;
                }
            }
            let (hint, read, wrote) = {
                let mut inb = InBuffer::around(&self.input[self.in_pos..]);
                let before = out.len();
                let mut outb = OutBuffer::around_pos(out, before);
                let hint = self
                    .dec
                    .run(&mut inb, &mut outb)
                    .map_err(|e| self.corrupt(format!("zstd: {e}")))?;
                (hint, inb.pos(), outb.pos() - before)
            };
            self.in_pos += read;
            if hint == 0 {
                self.frame_done = true;
            } else if read == 0 && wrote == 0 && self.file_eof {
                return Err(self.corrupt("truncated zstd frame"));
            }
        }
        self.hasher.update(&out[start..]);
        Ok(())
    }

    /// Append up to `CHUNK` raw file bytes to `out`, decompressing them to
    /// hash the content; nothing appended means end of file.
    fn fill_raw(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        let start = out.len();
        let n = self.read_file(out, CHUNK)?;
        if self.scratch.is_empty() {
            self.scratch = vec![0; CHUNK];
        }
        if n == 0 {
            // End of file: flush what the decoder still holds.
            while !self.frame_done {
                let (hint, _, wrote) = self.run_scratch(&[])?;
                if hint == 0 {
                    self.frame_done = true;
                } else if wrote < self.scratch.len() {
                    return Err(self.corrupt("truncated zstd frame"));
                }
            }
            return Ok(());
        }
        let mut pos = start;
        loop {
            if self.frame_done {
                if pos < out.len() {
                    return Err(self.corrupt("trailing data after the zstd frame"));
                }
                return Ok(());
            }
            let (hint, read, wrote) = self.run_scratch(&out[pos..])?;
            pos += read;
            if hint == 0 {
                self.frame_done = true;
            } else if pos == out.len() && wrote < self.scratch.len() {
                return Ok(());
            }
        }
    }

    /// Decompress `input` into the scratch buffer and hash the output.
    fn run_scratch(&mut self, input: &[u8]) -> io::Result<(usize, usize, usize)> {
        let mut inb = InBuffer::around(input);
        let mut outb = OutBuffer::around(&mut self.scratch[..]);
        let res = self.dec.run(&mut inb, &mut outb);
        let (read, wrote) = (inb.pos(), outb.pos());
        let hint = res.map_err(|e| self.corrupt(format!("zstd: {e}")))?;
        self.hasher.update(&self.scratch[..wrote]);
        Ok((hint, read, wrote))
    }

    /// After the frame: nothing may follow it.
    fn expect_end(&mut self) -> io::Result<()> {
        if self.in_pos < self.input.len() {
            return Err(self.corrupt("trailing data after the zstd frame"));
        }
        if !self.file_eof {
            let mut probe = [0u8; 1];
            if (&self.file).read(&mut probe)? != 0 {
                return Err(self.corrupt("trailing data after the zstd frame"));
            }
            self.file_eof = true;
        }
        Ok(())
    }

    fn finish(&mut self) -> io::Result<()> {
        let got = Digest(mem::take(&mut self.hasher).finalize().into());
        if got != self.digest {
            return Err(self.corrupt(format_args!("content hashes to {got}")));
        }
        Ok(())
    }
}

enum State {
    Reading,
    Verified,
    Failed(io::ErrorKind, String),
}

/// Releases chunk N only once chunk N+1 exists, and the last chunk only
/// after verification.
struct HoldBack {
    src: Check,
    raw: bool,
    front: Vec<u8>,
    front_pos: usize,
    back: Vec<u8>,
    spare: Vec<u8>,
    state: State,
}

impl HoldBack {
    fn new(src: Check, raw: bool) -> HoldBack {
        HoldBack {
            src,
            raw,
            front: Vec::new(),
            front_pos: 0,
            back: Vec::new(),
            spare: Vec::new(),
            state: State::Reading,
        }
    }

    fn fail(&mut self, e: io::Error) -> io::Error {
        self.state = State::Failed(e.kind(), e.to_string());
        self.front.clear();
        self.back.clear();
        e
    }
}

impl Read for HoldBack {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.front_pos < self.front.len() {
                let n = buf.len().min(self.front.len() - self.front_pos);
                buf[..n].copy_from_slice(&self.front[self.front_pos..self.front_pos + n]);
                self.front_pos += n;
                return Ok(n);
            }
            match &self.state {
                State::Failed(kind, msg) => return Err(io::Error::new(*kind, msg.clone())),
                State::Verified => {
                    if self.back.is_empty() {
                        return Ok(0);
                    }
                    mem::swap(&mut self.front, &mut self.back);
                    self.back.clear();
                    self.front_pos = 0;
                }
                State::Reading => {
                    self.spare.clear();
                    let mut spare = mem::take(&mut self.spare);
                    let res = if self.raw {
                        self.src.fill_raw(&mut spare)
                    } else {
                        self.src.fill_decoded(&mut spare)
                    };
                    if let Err(e) = res {
                        return Err(self.fail(e));
                    }
                    if spare.is_empty() {
                        self.spare = spare;
                        match self.src.finish() {
                            Ok(()) => self.state = State::Verified,
                            Err(e) => return Err(self.fail(e)),
                        }
                    } else {
                        // front (consumed) <- back <- new chunk
                        let old_front = mem::replace(&mut self.front, mem::take(&mut self.back));
                        self.back = spare;
                        self.spare = old_front;
                        self.front_pos = 0;
                    }
                }
            }
        }
    }
}
