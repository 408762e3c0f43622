//! Reading `.deb` files: the outer `ar` archive, the `control.tar{,.gz,.xz,.zst}`
//! member and the `control` paragraph inside it.
//!
//! Owns: [`Control`] (an ordered, validated list of control fields), [`read_control`]
//! (control paragraph only) and [`inspect`] (control paragraph + size + SHA-256 of the
//! whole file in one streaming pass), plus [`inspect_many`] for parallel scans.
//!
//! What must stay true:
//! - Nothing here touches the file system: tar entries are matched by their raw path
//!   bytes and read into memory, never unpacked.
//! - Every size read from the archive is bounded ([`MAX_CONTROL_TAR`], [`MAX_CONTROL_FILE`])
//!   so a hostile upload cannot make us allocate or decompress without limit.
//! - A [`Control`] always has valid `Package`, `Version` and `Architecture` fields, field
//!   names without `:`/whitespace, and values without blank lines, so rendering it into a
//!   `Packages` file can never inject a stanza or a field.
//!
//! The ar reader is hand-written rather than the `ar` crate: a `.deb` uses only the
//! plain common ar format (deb(5)), and the crate's GNU name-table path indexes a slice
//! with an archive-supplied offset (a panic on hostile input) and allocates an
//! archive-supplied size up front.

use std::io::{self, Read};

use sha2::{Digest, Sha256};

/// Upper bound on the decompressed bytes read from `control.tar*` before `control` is
/// found. Real control tarballs are KiBs (md5sums of huge packages: a few MiB).
pub const MAX_CONTROL_TAR: u64 = 256 << 20;
/// Upper bound on the `control` file itself (Debian's largest are well under 1 MiB).
pub const MAX_CONTROL_FILE: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum DebError {
    #[error("not a .deb: the file does not start with the ar magic \"!<arch>\\n\"")]
    NotAr,
    #[error("truncated .deb: unexpected end of file in {0}")]
    Truncated(String),
    #[error("malformed ar member header ({0})")]
    BadMemberHeader(String),
    #[error("first ar member is {0:?}, expected \"debian-binary\"")]
    NoDebianBinary(String),
    #[error("unsupported .deb format version {0:?} (expected 2.x)")]
    UnsupportedFormat(String),
    #[error("no control.tar member after debian-binary (found {0:?})")]
    NoControlMember(String),
    #[error("no data.tar member after the control member (found {0:?})")]
    NoDataMember(String),
    #[error("unsupported control member compression {0:?}")]
    UnsupportedCompression(String),
    #[error("cannot read {member}: {source}")]
    ControlTar {
        member: String,
        #[source]
        source: io::Error,
    },
    #[error("{0} has no ./control file")]
    NoControlFile(String),
    #[error("{what} is larger than {limit} bytes")]
    TooLarge { what: &'static str, limit: u64 },
    #[error("control file is not UTF-8")]
    NotUtf8,
    #[error("control file line {line}: {msg}")]
    Syntax { line: usize, msg: String },
    #[error("control file has no {0} field")]
    MissingField(&'static str),
    #[error("control field {field} has an invalid value {value:?}: {reason}")]
    InvalidField {
        field: String,
        value: String,
        reason: &'static str,
    },
    #[error("reading the .deb: {0}")]
    Io(#[from] io::Error),
}

/// A binary package's control paragraph, in file order.
///
/// Values keep their exact text after `Field:` minus the leading blanks of the first
/// line and trailing blanks of the first line; continuation lines are kept verbatim
/// (including their leading space) and joined with `\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Control {
    fields: Vec<(String, String)>,
}

impl Control {
    /// Parses a single deb822 paragraph (the `control` file of a `.deb`).
    pub fn parse(text: &str) -> Result<Control, DebError> {
        let c = Control {
            fields: parse_paragraph(text, false)?,
        };
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<(), DebError> {
        let package = self
            .get("Package")
            .ok_or(DebError::MissingField("Package"))?;
        let version = self
            .get("Version")
            .ok_or(DebError::MissingField("Version"))?;
        let arch = self
            .get("Architecture")
            .ok_or(DebError::MissingField("Architecture"))?;
        let bad = |field: &str, value: &str, reason| DebError::InvalidField {
            field: field.into(),
            value: value.into(),
            reason,
        };
        if !valid_package_name(package) {
            return Err(bad(
                "Package",
                package,
                "must be [a-z0-9][a-z0-9+.-]+ (Debian policy 5.6.1)",
            ));
        }
        if !valid_version(version) {
            return Err(bad(
                "Version",
                version,
                "must be [epoch:]upstream[-revision] with [A-Za-z0-9.+~:-] and a digit first",
            ));
        }
        if !valid_arch(arch) {
            return Err(bad("Architecture", arch, "must be one word of [a-z0-9-]"));
        }
        Ok(())
    }

    /// All fields in file order.
    pub fn fields(&self) -> &[(String, String)] {
        &self.fields
    }

    /// A field's value, matching the name case-insensitively as dpkg does.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn package(&self) -> &str {
        self.get("Package").expect("validated at construction")
    }

    pub fn version(&self) -> &str {
        self.get("Version").expect("validated at construction")
    }

    pub fn architecture(&self) -> &str {
        self.get("Architecture").expect("validated at construction")
    }

    /// The source package name: `Source` without its optional `(version)`, else `Package`.
    pub fn source(&self) -> &str {
        self.get("Source")
            .and_then(|s| s.split_whitespace().next())
            .filter(|s| valid_package_name(s))
            .unwrap_or_else(|| self.package())
    }

    /// The paragraph as deb822 text, byte-identical to the `control` file for files that
    /// use `Field: value` spacing and LF line ends (what `dpkg-deb --build` writes).
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        for (name, value) in &self.fields {
            write_field(&mut s, name, value);
        }
        s
    }
}

/// Appends `Name: value\n` (no space after the colon when the first line is empty).
pub(crate) fn write_field(out: &mut String, name: &str, value: &str) {
    out.push_str(name);
    out.push(':');
    if !value.starts_with('\n') {
        out.push(' ');
    }
    out.push_str(value);
    out.push('\n');
}

fn valid_field_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(['#', '-'])
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

pub(crate) fn valid_package_name(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 2
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"+.-".contains(&c))
}

pub(crate) fn valid_version(s: &str) -> bool {
    let (epoch, rest) = match s.split_once(':') {
        Some((e, r)) => (Some(e), r),
        None => (None, s),
    };
    if let Some(e) = epoch
        && (e.is_empty() || !e.bytes().all(|c| c.is_ascii_digit()))
    {
        return false;
    }
    rest.as_bytes().first().is_some_and(u8::is_ascii_digit)
        && rest
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b".+~:-".contains(&c))
        && !rest.ends_with('-')
}

pub(crate) fn valid_arch(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
}

/// What [`inspect`] learns about a `.deb` in one pass.
#[derive(Debug, Clone)]
pub struct DebInfo {
    pub control: Control,
    /// Size of the whole file in bytes.
    pub size: u64,
    /// SHA-256 of the whole file.
    pub sha256: [u8; 32],
}

/// The fields of a deb822 paragraph, in file order (see [`Control`] for how
/// values are kept). With `only_first`, what follows the first paragraph is
/// ignored (a `debian/control`, a `.dsc`); without, it must be blank.
pub fn parse_paragraph(text: &str, only_first: bool) -> Result<Vec<(String, String)>, DebError> {
    let mut fields: Vec<(String, String)> = Vec::new();
    let mut ended_at = None;
    for (i, raw) in text.split('\n').enumerate() {
        let line_no = i + 1;
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if let Some(end) = ended_at {
            if only_first {
                break;
            }
            if !line.trim().is_empty() {
                return Err(DebError::Syntax {
                    line: line_no,
                    msg: format!("more than one paragraph (first ended at line {end})"),
                });
            }
            continue;
        }
        if line.is_empty() {
            if !fields.is_empty() {
                ended_at = Some(line_no);
            }
            continue;
        }
        if line.starts_with([' ', '\t']) {
            // A whitespace-only continuation line is treated by some deb822 parsers
            // as a paragraph break: refuse it rather than guess.
            if line.trim().is_empty() {
                return Err(DebError::Syntax {
                    line: line_no,
                    msg: "whitespace-only line".into(),
                });
            }
            let Some((_, value)) = fields.last_mut() else {
                return Err(DebError::Syntax {
                    line: line_no,
                    msg: "continuation line before any field".into(),
                });
            };
            value.push('\n');
            value.push_str(line.trim_end());
            continue;
        }
        if line.starts_with('#') {
            continue; // comment (dpkg accepts these in control files)
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(DebError::Syntax {
                line: line_no,
                msg: "expected \"Field: value\"".into(),
            });
        };
        if !valid_field_name(name) {
            return Err(DebError::Syntax {
                line: line_no,
                msg: format!("invalid field name {name:?}"),
            });
        }
        if fields.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)) {
            return Err(DebError::Syntax {
                line: line_no,
                msg: format!("duplicate field {name}"),
            });
        }
        fields.push((name.to_string(), value.trim().to_string()));
    }
    Ok(fields)
}

/// Reads only as far as the `control` file and returns its paragraph.
pub fn read_control<R: Read>(reader: R) -> Result<Control, DebError> {
    let mut ar = ArReader::new(reader)?;
    control_from_ar(&mut ar)
}

/// Reads the whole `.deb` once: parses its control paragraph, checks the ar framing up
/// to and including the `data.tar*` member, and hashes every byte.
pub fn inspect<R: Read>(reader: R) -> Result<DebInfo, DebError> {
    let hashing = HashingReader {
        inner: reader,
        hasher: Sha256::new(),
        count: 0,
    };
    let mut ar = ArReader::new(hashing)?;
    let control = control_from_ar(&mut ar)?;
    let data = ar
        .next_member()?
        .ok_or_else(|| DebError::NoDataMember("end of archive".into()))?;
    if !data.name.starts_with("data.tar") {
        return Err(DebError::NoDataMember(data.name));
    }
    ar.skip_member(&data)?;
    // Anything after data.tar is ignored by dpkg, but it is part of the file we serve.
    let mut hashing = ar.inner;
    io::copy(&mut hashing, &mut io::sink())?;
    Ok(DebInfo {
        control,
        size: hashing.count,
        sha256: hashing.hasher.finalize().into(),
    })
}

/// [`inspect`]s many `.deb`s on all cores; results keep the order of `items`.
/// `open` turns an item into a reader (a file path, a blob from a store...).
pub fn inspect_many<T, R, F>(items: &[T], open: F) -> Vec<Result<DebInfo, DebError>>
where
    T: Sync,
    R: Read,
    F: Fn(&T) -> io::Result<R> + Sync,
{
    super::par_map(items, |item| {
        open(item)
            .map_err(DebError::Io)
            .and_then(|r| inspect(io::BufReader::with_capacity(64 << 10, r)))
    })
}

fn control_from_ar<R: Read>(ar: &mut ArReader<R>) -> Result<Control, DebError> {
    let first = ar
        .next_member()?
        .ok_or_else(|| DebError::NoDebianBinary("end of archive".into()))?;
    if first.name != "debian-binary" {
        return Err(DebError::NoDebianBinary(first.name));
    }
    if first.size > 64 {
        return Err(DebError::UnsupportedFormat(format!(
            "<{} bytes>",
            first.size
        )));
    }
    let mut version = Vec::new();
    ar.member_reader(&first).read_to_end(&mut version)?;
    ar.finish_member(&first, version.len() as u64)?;
    let version = String::from_utf8_lossy(&version);
    if !version.starts_with("2.") || !version.ends_with('\n') {
        return Err(DebError::UnsupportedFormat(version.trim_end().into()));
    }
    // deb(5): members starting with '_' may sit between debian-binary and control.tar.
    let member = loop {
        let m = ar
            .next_member()?
            .ok_or_else(|| DebError::NoControlMember("end of archive".into()))?;
        if m.name.starts_with('_') {
            ar.skip_member(&m)?;
            continue;
        }
        break m;
    };
    let compression = match member.name.as_str() {
        "control.tar" => Compression::None,
        "control.tar.gz" => Compression::Gzip,
        "control.tar.xz" => Compression::Xz,
        "control.tar.zst" => Compression::Zstd,
        n if n.starts_with("control.tar") => {
            return Err(DebError::UnsupportedCompression(n.into()));
        }
        n => return Err(DebError::NoControlMember(n.into())),
    };
    let name = member.name.clone();
    let text = { find_control_file(ar.member_reader(&member), compression, &name)? };
    // Drain the rest of the member so a following next_member() is aligned; this also
    // catches truncation inside the control member.
    ar.skip_rest(&member)?;
    let text = String::from_utf8(text).map_err(|_| DebError::NotUtf8)?;
    Control::parse(&text)
}

#[derive(Clone, Copy)]
enum Compression {
    None,
    Gzip,
    Xz,
    Zstd,
}

fn find_control_file<R: Read>(
    raw: R,
    compression: Compression,
    member: &str,
) -> Result<Vec<u8>, DebError> {
    let tar_err = |source: io::Error| DebError::ControlTar {
        member: member.to_string(),
        source,
    };
    let decoded: Box<dyn Read + '_> = match compression {
        Compression::None => Box::new(raw),
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(raw)),
        Compression::Xz => Box::new(liblzma::read::XzDecoder::new(raw)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(raw).map_err(tar_err)?),
    };
    let limited = LimitReader {
        inner: decoded,
        left: MAX_CONTROL_TAR,
        what: "decompressed control member",
    };
    let mut archive = tar::Archive::new(limited);
    for entry in archive.entries().map_err(tar_err)? {
        let mut entry = entry.map_err(|e| limit_or(e, tar_err))?;
        let path = entry.path_bytes();
        let is_control = matches!(&path[..], b"./control" | b"control");
        if !is_control || !entry.header().entry_type().is_file() {
            continue;
        }
        if entry.size() > MAX_CONTROL_FILE {
            return Err(DebError::TooLarge {
                what: "control file",
                limit: MAX_CONTROL_FILE,
            });
        }
        let mut buf = Vec::with_capacity(entry.size() as usize);
        entry
            .read_to_end(&mut buf)
            .map_err(|e| limit_or(e, tar_err))?;
        return Ok(buf);
    }
    Err(DebError::NoControlFile(member.into()))
}

/// Maps the limit reader's marker error back to [`DebError::TooLarge`].
fn limit_or(e: io::Error, other: impl FnOnce(io::Error) -> DebError) -> DebError {
    if e.kind() == io::ErrorKind::FileTooLarge {
        DebError::TooLarge {
            what: "decompressed control member",
            limit: MAX_CONTROL_TAR,
        }
    } else {
        other(e)
    }
}

struct LimitReader<R> {
    inner: R,
    left: u64,
    what: &'static str,
}

impl<R: Read> Read for LimitReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            // Only an error if there is really more data.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(io::Error::new(io::ErrorKind::FileTooLarge, self.what)),
            };
        }
        let max = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..max])?;
        self.left -= n as u64;
        Ok(n)
    }
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// One member header of the common ar format.
#[derive(Debug, Clone)]
struct Member {
    name: String,
    size: u64,
}

struct ArReader<R> {
    inner: R,
    /// Bytes of the current member already consumed through `member_reader`.
    consumed: u64,
}

impl<R: Read> ArReader<R> {
    fn new(mut inner: R) -> Result<Self, DebError> {
        let mut magic = [0u8; 8];
        let n = read_full(&mut inner, &mut magic)?;
        if magic[..n] != b"!<arch>\n"[..n] || n == 0 {
            return Err(DebError::NotAr);
        }
        if n < 8 {
            return Err(DebError::Truncated("the ar magic".into()));
        }
        Ok(ArReader { inner, consumed: 0 })
    }

    /// The next member header, or `None` at a clean end of archive.
    fn next_member(&mut self) -> Result<Option<Member>, DebError> {
        let mut h = [0u8; 60];
        let n = read_full(&mut self.inner, &mut h)?;
        if n == 0 {
            return Ok(None);
        }
        if n < 60 {
            return Err(DebError::Truncated("an ar member header".into()));
        }
        if &h[58..60] != b"`\n" {
            return Err(DebError::BadMemberHeader("bad header terminator".into()));
        }
        let name = std::str::from_utf8(&h[0..16])
            .map_err(|_| DebError::BadMemberHeader("member name is not ASCII".into()))?
            .trim_end_matches(' ');
        // GNU ar ends names with '/', which dpkg accepts too.
        let name = name.strip_suffix('/').unwrap_or(name).to_string();
        let size = std::str::from_utf8(&h[48..58])
            .ok()
            .map(str::trim)
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| DebError::BadMemberHeader(format!("bad size in member {name:?}")))?;
        self.consumed = 0;
        Ok(Some(Member { name, size }))
    }

    fn member_reader<'a>(&'a mut self, m: &Member) -> MemberReader<'a, R> {
        MemberReader {
            ar: self,
            left: m.size,
        }
    }

    fn skip_member(&mut self, m: &Member) -> Result<(), DebError> {
        self.consumed = 0;
        self.skip_rest(m)
    }

    /// Skips what is left of member `m` plus its padding byte, failing on truncation.
    fn skip_rest(&mut self, m: &Member) -> Result<(), DebError> {
        let left = m.size - self.consumed;
        let skipped = io::copy(&mut (&mut self.inner).take(left), &mut io::sink())?;
        self.finish_member(m, self.consumed + skipped)
    }

    fn finish_member(&mut self, m: &Member, read: u64) -> Result<(), DebError> {
        if read < m.size {
            return Err(DebError::Truncated(format!("member {:?}", m.name)));
        }
        if m.size % 2 == 1 {
            let mut pad = [0u8; 1];
            // A missing final pad byte at EOF is tolerated (as dpkg does).
            read_full(&mut self.inner, &mut pad)?;
        }
        self.consumed = 0;
        Ok(())
    }
}

struct MemberReader<'a, R> {
    ar: &'a mut ArReader<R>,
    left: u64,
}

impl<R: Read> Read for MemberReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let max = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.ar.inner.read(&mut buf[..max])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "ar member is truncated",
            ));
        }
        self.left -= n as u64;
        self.ar.consumed += n as u64;
        Ok(n)
    }
}

/// Reads until `buf` is full or EOF; returns the count.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
