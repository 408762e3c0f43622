//! dnf/yum repositories: reading RPMs, signing them, and building signed `repodata/`,
//! without external tools.
//!
//! Owns: [`inspect`] (RPM header → [`RpmInfo`] with the package's three XML
//! [`Fragments`], rendered once per RPM as createrepo_c 0.17 writes them), [`sign`]
//! (adds a v4 header-only OpenPGP signature made with the project's [`RepoKey`]) and
//! [`build_repodata`] with its [`RepodataCache`] of compressed chunks.
//!
//! Incremental design (what makes "add one package to 10,000" cheap), as in
//! [`super::apt`]: packages are sorted by location and cut into chunks at
//! content-defined points (after a package whose location hash hits
//! [`CHUNK_PACKAGES`]), so adding a package changes only the chunk it lands in. Each
//! `*.xml.gz` is the concatenation of one gzip member for the XML header, one per
//! chunk, and one for the footer (RFC 1952 §2.2); zlib's `gzread`, which libsolv and
//! librepo use, reads all members (checked with dnf in this module's tests).
//!
//! What must stay true:
//! - The XML is what createrepo_c writes (element order, namespaces, dependency
//!   filtering, changelog selection), escaped so any header text stays well-formed.
//! - A fragment is a pure function of the RPM's bytes, so a chunk's cache key (the
//!   digests of its fragments) identifies its compressed bytes; output is
//!   deterministic for a set of fragments, a revision and a timestamp.
//! - [`sign`] never rewrites the main header or the payload: it signs the header
//!   bytes exactly as they are in the file and replaces only the signature header.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::Arc;

use rpm::{Header, HeaderEntry, IndexData, IndexSignatureTag, IndexTag, PackageMetadata};
use sha2::{Digest, Sha256};

use super::apt::RepoFile;
use super::sign::{RepoKey, SignError};

/// Expected number of packages per compressed chunk: ~64 packages of 1-3 KiB XML is
/// 64-200 KiB per chunk; adding one package to 10,000 recompresses one of ~160.
pub const CHUNK_PACKAGES: u64 = 64;
/// createrepo_c's default `--changelog-limit`: other.xml keeps the newest entries.
pub const CHANGELOG_LIMIT: usize = 10;

const LEAD_MAGIC: [u8; 4] = [0xed, 0xab, 0xee, 0xdb];
const LEAD_SIZE: usize = 96;
const HEADER_MAGIC: [u8; 4] = [0x8e, 0xad, 0xe8, 0x01];
/// rpm's own limits on a header (lib/header.c: hdrchkTags/hdrchkData).
const MAX_TAGS: usize = 0xffff;
const MAX_DATA: usize = 256 << 20;

// rpmsense flags (rpm/rpmds.h).
const SENSE_LESS: u32 = 1 << 1;
const SENSE_GREATER: u32 = 1 << 2;
const SENSE_EQUAL: u32 = 1 << 3;
const SENSE_PREREQ: u32 = 1 << 6;
const SENSE_SCRIPT_PRE: u32 = 1 << 9;
const SENSE_SCRIPT_POST: u32 = 1 << 10;
/// rpmfileAttrs (rpm/rpmfiles.h).
const FILE_GHOST: u32 = 1 << 6;
const MODE_TYPE: u16 = 0o170000;
const MODE_DIR: u16 = 0o040000;

#[derive(Debug, thiserror::Error)]
pub enum RpmError {
    #[error("not an RPM: {0}")]
    NotRpm(&'static str),
    #[error("truncated RPM: {0}")]
    Truncated(String),
    #[error("corrupt header: {0}")]
    CorruptHeader(String),
    #[error("the RPM header has no {0}")]
    Missing(&'static str),
    #[error("invalid {field} {value:?} in the RPM header: {reason}")]
    BadField {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("signing: {0}")]
    Sign(#[from] SignError),
    #[error("not fragments made by publish::rpm::inspect: {0}")]
    BadFragments(&'static str),
    #[error("two different packages at {location} (pkgid {first} and {second})")]
    Duplicate {
        location: String,
        first: String,
        second: String,
    },
    #[error("compressing repodata: {0}")]
    Compress(#[from] std::io::Error),
}

fn corrupt(e: rpm::Error) -> RpmError {
    RpmError::CorruptHeader(e.to_string())
}

/// The three XML fragments of one package, each one complete `<package …>…</package>`
/// element (ending with a newline) as createrepo_c writes it for primary.xml,
/// filelists.xml and other.xml.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Fragments {
    pub primary: String,
    pub filelists: String,
    pub other: String,
}

#[derive(Clone, Debug)]
pub struct RpmInfo {
    pub name: String,
    pub epoch: u32,
    pub version: String,
    pub release: String,
    /// RPM arch (`x86_64`, `noarch`, …); `src` for a source RPM.
    pub arch: String,
    /// Where the repo serves it:
    /// `Packages/<first char of name, lowercased>/<name>-<version>-<release>.<arch>.rpm`
    pub location: String,
    /// Of the bytes given (the pkgid in the XML).
    pub sha256: [u8; 32],
    pub size: u64,
    /// Capability names it provides (its own name included) and requires (rpmlib(…)
    /// left out), names only, each once, in header order.
    pub provides: Vec<String>,
    pub requires: Vec<String>,
    pub fragments: Fragments,
}

/// Where the parts of an RPM file are (byte offsets), checked against its length.
struct Layout {
    /// Start of the main header (= end of the padded signature header).
    header_start: usize,
    /// End of the main header = start of the payload.
    header_end: usize,
}

/// End of the header structure starting at `at` (not padded).
fn header_end(bytes: &[u8], at: usize, what: &str) -> Result<usize, RpmError> {
    let intro = bytes.get(at..at + 16).ok_or_else(|| {
        RpmError::Truncated(format!(
            "{what} cut off at byte {} of the file",
            bytes.len()
        ))
    })?;
    if intro[..4] != HEADER_MAGIC {
        return Err(RpmError::CorruptHeader(format!("{what}: bad magic")));
    }
    let word = |i: usize| u32::from_be_bytes(intro[i..i + 4].try_into().expect("4 bytes")) as usize;
    let (tags, data) = (word(8), word(12));
    if tags == 0 || tags > MAX_TAGS || data > MAX_DATA {
        return Err(RpmError::CorruptHeader(format!(
            "{what}: implausible size ({tags} tags, {data} data bytes)"
        )));
    }
    let end = at + 16 + 16 * tags + data;
    if end > bytes.len() {
        return Err(RpmError::Truncated(format!(
            "{what} needs {end} bytes, the file has {}",
            bytes.len()
        )));
    }
    check_entries(&bytes[at + 16..end], tags, what)?;
    Ok(end)
}

/// Checks that every index entry's data lies inside the data store (what rpm's
/// headerVerify does): rpm-rs indexes the store without bounds checks and would
/// panic on a corrupt offset.
fn check_entries(index_and_data: &[u8], tags: usize, what: &str) -> Result<(), RpmError> {
    let (index, store) = index_and_data.split_at(16 * tags);
    for (i, e) in index.chunks_exact(16).enumerate() {
        let word = |j: usize| u32::from_be_bytes(e[j..j + 4].try_into().expect("4 bytes"));
        let (tag, ty, offset, count) = (word(0), word(4), word(8) as usize, word(12) as usize);
        let bad = |why: &str| {
            Err(RpmError::CorruptHeader(format!(
                "{what}: entry {i} (tag {tag}) {why}"
            )))
        };
        let width = match ty {
            0 => continue,
            1 | 2 | 7 => 1,
            3 => 2,
            4 => 4,
            5 => 8,
            6 | 8 | 9 => 0,
            _ => return bad("has an unknown data type"),
        };
        if count == 0 || offset > store.len() {
            return bad("points outside the data store");
        }
        if width > 0 {
            if count
                .checked_mul(width)
                .is_none_or(|n| offset + n > store.len())
            {
                return bad("points outside the data store");
            }
        } else {
            // `count` NUL-terminated strings (a STRING has one).
            let count = if ty == 6 { 1 } else { count };
            let nuls = memchr_count(&store[offset..], count);
            if nuls < count {
                return bad("has an unterminated string");
            }
        }
    }
    Ok(())
}

/// How many NULs `s` has, counting up to `max`.
fn memchr_count(s: &[u8], max: usize) -> usize {
    s.iter().filter(|&&b| b == 0).take(max).count()
}

fn layout(bytes: &[u8]) -> Result<Layout, RpmError> {
    if bytes.len() < 4 || bytes[..4] != LEAD_MAGIC {
        return Err(RpmError::NotRpm("bad lead magic"));
    }
    if bytes.len() < LEAD_SIZE {
        return Err(RpmError::Truncated(format!(
            "the lead is {LEAD_SIZE} bytes, the file has {}",
            bytes.len()
        )));
    }
    let sig_end = header_end(bytes, LEAD_SIZE, "signature header")?;
    // The signature header is padded to a multiple of 8 bytes.
    let header_start = sig_end + (8 - (sig_end - LEAD_SIZE) % 8) % 8;
    let header_end = header_end(bytes, header_start, "main header")?;
    Ok(Layout {
        header_start,
        header_end,
    })
}

fn parse_metadata(bytes: &[u8]) -> Result<(Layout, PackageMetadata), RpmError> {
    let l = layout(bytes)?;
    let md = PackageMetadata::parse(&mut &bytes[..l.header_end]).map_err(corrupt)?;
    Ok((l, md))
}

/// A tag's value, `None` when absent; any other problem is a corrupt header.
fn opt<T>(r: Result<T, rpm::Error>) -> Result<Option<T>, RpmError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(rpm::Error::TagNotFound(_)) => Ok(None),
        Err(e) => Err(corrupt(e)),
    }
}

/// An optional string tag: absent is empty.
fn or_empty(r: Result<&str, rpm::Error>) -> Result<&str, RpmError> {
    opt(r).map(Option::unwrap_or_default)
}

/// Dependencies as they are in the header (all but requires are kept as they are).
fn plain(v: &[rpm::Dependency]) -> Vec<Dep<'_>> {
    v.iter()
        .map(|d| Dep {
            name: &d.name,
            flags: d.flags.bits(),
            version: &d.version,
            pre: false,
        })
        .collect()
}

/// Name, version, release and arch end up in a file name: one path segment of
/// printable characters.
fn check_segment(field: &'static str, v: &str) -> Result<(), RpmError> {
    let reason = if v.is_empty() {
        "empty"
    } else if v.starts_with('.') {
        "starts with '.'"
    } else if v
        .chars()
        .any(|c| c == '/' || c.is_whitespace() || c.is_control())
    {
        "contains '/', white space or a control character"
    } else {
        return Ok(());
    };
    Err(RpmError::BadField {
        field,
        value: v.to_string(),
        reason,
    })
}

/// One dependency as createrepo_c keeps it.
struct Dep<'a> {
    name: &'a str,
    flags: u32,
    version: &'a str,
    pre: bool,
}

/// Reads an RPM (binary or source) and renders its metadata. The header must parse;
/// the payload is not checked.
pub fn inspect(bytes: &[u8]) -> Result<RpmInfo, RpmError> {
    let (l, md) = parse_metadata(bytes)?;
    let h = &md.header;
    let name = md.get_name().map_err(|_| RpmError::Missing("Name"))?;
    let version = md.get_version().map_err(|_| RpmError::Missing("Version"))?;
    let release = md.get_release().map_err(|_| RpmError::Missing("Release"))?;
    let epoch = opt(md.get_epoch())?.unwrap_or(0);
    let arch = if md.is_source_package() {
        "src"
    } else {
        md.get_arch().map_err(|_| RpmError::Missing("Arch"))?
    };
    check_segment("name", name)?;
    check_segment("version", version)?;
    check_segment("release", release)?;
    check_segment("arch", arch)?;
    let first: String = name.chars().take(1).flat_map(char::to_lowercase).collect();
    let location = format!("Packages/{first}/{name}-{version}-{release}.{arch}.rpm");
    let sha256: [u8; 32] = Sha256::digest(bytes).into();
    let pkgid = hex::encode(sha256);

    let s = or_empty;
    let summary = s(md.get_summary())?;
    let description = s(md.get_description())?;
    let build_time = opt(md.get_build_time())?.unwrap_or(0);
    let installed = match opt(h.get_entry_data_as_u64(IndexTag::RPMTAG_LONGSIZE))? {
        Some(v) => v,
        None => opt(h.get_entry_data_as_u32(IndexTag::RPMTAG_SIZE))?.unwrap_or(0) as u64,
    };
    // rpm keeps the payload size in the signature header (librpm merges it into the
    // header as RPMTAG_ARCHIVESIZE, which is what createrepo_c reads).
    let sig = &md.signature;
    let archive = if let Some(v) =
        opt(sig.get_entry_data_as_u64(IndexSignatureTag::RPMSIGTAG_LONGARCHIVESIZE))?
    {
        v
    } else if let Some(v) =
        opt(sig.get_entry_data_as_u32(IndexSignatureTag::RPMSIGTAG_PAYLOADSIZE))?
    {
        v as u64
    } else if let Some(v) = opt(h.get_entry_data_as_u64(IndexTag::RPMTAG_LONGARCHIVESIZE))? {
        v
    } else {
        opt(h.get_entry_data_as_u32(IndexTag::RPMTAG_ARCHIVESIZE))?.unwrap_or(0) as u64
    };

    // Files: (path, "dir" | "ghost" | "").
    let split = md.get_file_paths_split().map_err(corrupt)?;
    let modes = opt(h.get_entry_data_as_u16_array(IndexTag::RPMTAG_FILEMODES))?.unwrap_or_default();
    let fflags =
        opt(h.get_entry_data_as_u32_array(IndexTag::RPMTAG_FILEFLAGS))?.unwrap_or_default();
    if modes.len() != split.len() || fflags.len() != split.len() {
        return Err(RpmError::CorruptHeader(
            "file names, modes and flags differ in number".into(),
        ));
    }
    let files: Vec<(String, &str)> = split
        .iter()
        .zip(modes.iter().zip(&fflags))
        .map(|((dir, base), (&mode, &flags))| {
            let kind = if mode & MODE_TYPE == MODE_DIR {
                "dir"
            } else if flags & FILE_GHOST != 0 {
                "ghost"
            } else {
                ""
            };
            (format!("{dir}{base}"), kind)
        })
        .collect();
    let file_set: HashSet<&str> = files.iter().map(|(p, _)| p.as_str()).collect();

    // Dependencies, filtered like createrepo_c (parsehdr.c).
    let dep_list =
        |r: Result<Vec<rpm::Dependency>, rpm::Error>| opt(r).map(Option::unwrap_or_default);
    let provides_raw = dep_list(md.get_provides())?;
    let requires_raw = dep_list(md.get_requires())?;
    let conflicts_raw = dep_list(md.get_conflicts())?;
    let obsoletes_raw = dep_list(md.get_obsoletes())?;
    let suggests_raw = dep_list(md.get_suggests())?;
    let enhances_raw = dep_list(md.get_enhances())?;
    let recommends_raw = dep_list(md.get_recommends())?;
    let supplements_raw = dep_list(md.get_supplements())?;
    let provides = plain(&provides_raw);
    let provided: HashSet<&str> = provides.iter().map(|d| d.name).collect();
    let mut requires: Vec<Dep> = Vec::new();
    let mut seen: HashMap<&str, (u32, &str, bool)> = HashMap::new();
    for d in &requires_raw {
        let flags = d.flags.bits();
        if d.name.starts_with("rpmlib(")
            || (file_set.contains(d.name.as_str()) && is_primary(&d.name))
            || provided.contains(d.name.as_str())
        {
            continue;
        }
        let pre = flags & (SENSE_PREREQ | SENSE_SCRIPT_PRE | SENSE_SCRIPT_POST) != 0;
        // Skip a repeat of the previous requirement on the same name.
        if seen.get(d.name.as_str()) == Some(&(flags & 0xf, d.version.as_str(), pre)) {
            continue;
        }
        seen.insert(&d.name, (flags & 0xf, &d.version, pre));
        requires.push(Dep {
            name: &d.name,
            flags,
            version: &d.version,
            pre,
        });
    }

    let mut provide_names: Vec<String> = Vec::new();
    if !provided.contains(name) {
        provide_names.push(name.to_string());
    }
    let mut once = HashSet::new();
    provide_names.extend(
        provides
            .iter()
            .filter(|d| once.insert(d.name))
            .map(|d| d.name.to_string()),
    );
    let mut once = HashSet::new();
    let require_names = requires_raw
        .iter()
        .filter(|d| !d.name.starts_with("rpmlib(") && once.insert(d.name.as_str()))
        .map(|d| d.name.clone())
        .collect();

    let mut changelogs: Vec<(String, u64, String)> = Vec::new();
    let mut last_time = 0;
    let entries = opt(md
        .get_changelog_entries()
        .map(|v| v.into_iter().take(CHANGELOG_LIMIT)))?;
    for e in entries.into_iter().flatten() {
        let author = e.name.trim_end_matches(' ').to_string();
        let t = e.timestamp;
        changelogs.push((author, t, e.description));
        // createrepo_c makes equal times distinct by bumping the earlier-listed
        // (newer) entries; dnf shows them in this order.
        if last_time == t {
            for (tmp, prev) in (t..).zip(changelogs.iter_mut().rev().skip(1)) {
                if prev.1 != tmp {
                    break;
                }
                prev.1 += 1;
            }
        } else {
            last_time = t;
        }
    }
    changelogs.reverse();

    // --- primary ---
    let mut p = String::with_capacity(2048);
    let evr = format!(
        "<version epoch=\"{epoch}\" ver=\"{}\" rel=\"{}\"/>",
        Attr(version),
        Attr(release)
    );
    p.push_str("<package type=\"rpm\">\n");
    let _ = writeln!(p, "  <name>{}</name>", Text(name));
    let _ = writeln!(p, "  <arch>{}</arch>", Text(arch));
    let _ = writeln!(p, "  {evr}");
    let _ = writeln!(
        p,
        "  <checksum type=\"sha256\" pkgid=\"YES\">{pkgid}</checksum>"
    );
    let _ = writeln!(p, "  <summary>{}</summary>", Text(summary));
    let _ = writeln!(p, "  <description>{}</description>", Text(description));
    let _ = writeln!(p, "  <packager>{}</packager>", Text(s(md.get_packager())?));
    let _ = writeln!(p, "  <url>{}</url>", Text(s(md.get_url())?));
    // createrepo_c puts the file's mtime in `file`; the build time keeps the
    // fragment a function of the RPM's bytes.
    let _ = writeln!(p, "  <time file=\"{build_time}\" build=\"{build_time}\"/>");
    let _ = writeln!(
        p,
        "  <size package=\"{}\" installed=\"{installed}\" archive=\"{archive}\"/>",
        bytes.len()
    );
    let _ = writeln!(p, "  <location href=\"{}\"/>", Attr(&location));
    p.push_str("  <format>\n");
    let _ = writeln!(
        p,
        "    <rpm:license>{}</rpm:license>",
        Text(s(md.get_license())?)
    );
    let _ = writeln!(
        p,
        "    <rpm:vendor>{}</rpm:vendor>",
        Text(s(md.get_vendor())?)
    );
    let _ = writeln!(p, "    <rpm:group>{}</rpm:group>", Text(s(md.get_group())?));
    let _ = writeln!(
        p,
        "    <rpm:buildhost>{}</rpm:buildhost>",
        Text(s(md.get_build_host())?)
    );
    let _ = writeln!(
        p,
        "    <rpm:sourcerpm>{}</rpm:sourcerpm>",
        Text(s(md.get_source_rpm())?)
    );
    let _ = writeln!(
        p,
        "    <rpm:header-range start=\"{}\" end=\"{}\"/>",
        l.header_start, l.header_end
    );
    for (tag, deps) in [
        ("provides", provides),
        ("requires", requires),
        ("conflicts", plain(&conflicts_raw)),
        ("obsoletes", plain(&obsoletes_raw)),
        ("suggests", plain(&suggests_raw)),
        ("enhances", plain(&enhances_raw)),
        ("recommends", plain(&recommends_raw)),
        ("supplements", plain(&supplements_raw)),
    ] {
        write_deps(&mut p, tag, &deps);
    }
    for (path, kind) in &files {
        if is_primary(path) {
            write_file(&mut p, "    ", path, kind);
        }
    }
    p.push_str("  </format>\n</package>\n");

    // --- filelists and other ---
    let open = format!(
        "<package pkgid=\"{pkgid}\" name=\"{}\" arch=\"{}\">\n  {evr}\n",
        Attr(name),
        Attr(arch)
    );
    let mut f = open.clone();
    for (path, kind) in &files {
        write_file(&mut f, "  ", path, kind);
    }
    f.push_str("</package>\n");
    let mut o = open;
    for (author, date, text) in &changelogs {
        let _ = writeln!(
            o,
            "  <changelog author=\"{}\" date=\"{date}\">{}</changelog>",
            Attr(author),
            Text(text)
        );
    }
    o.push_str("</package>\n");

    Ok(RpmInfo {
        name: name.to_string(),
        epoch,
        version: version.to_string(),
        release: release.to_string(),
        arch: arch.to_string(),
        location,
        sha256,
        size: bytes.len() as u64,
        provides: provide_names,
        requires: require_names,
        fragments: Fragments {
            primary: p,
            filelists: f,
            other: o,
        },
    })
}

/// Files createrepo_c lists in primary.xml as well (what dependency solvers need
/// without filelists.xml).
fn is_primary(path: &str) -> bool {
    path.starts_with("/etc/") || path == "/usr/lib/sendmail" || path.contains("bin/")
}

fn write_file(out: &mut String, indent: &str, path: &str, kind: &str) {
    if kind.is_empty() {
        let _ = writeln!(out, "{indent}<file>{}</file>", Text(path));
    } else {
        let _ = writeln!(out, "{indent}<file type=\"{kind}\">{}</file>", Text(path));
    }
}

fn write_deps(out: &mut String, tag: &str, deps: &[Dep]) {
    if deps.is_empty() {
        return;
    }
    let _ = writeln!(out, "    <rpm:{tag}>");
    for d in deps {
        let _ = write!(out, "      <rpm:entry name=\"{}\"", Attr(d.name));
        let flags = match d.flags & (SENSE_LESS | SENSE_GREATER | SENSE_EQUAL) {
            SENSE_LESS => "LT",
            SENSE_GREATER => "GT",
            SENSE_EQUAL => "EQ",
            x if x == SENSE_LESS | SENSE_EQUAL => "LE",
            x if x == SENSE_GREATER | SENSE_EQUAL => "GE",
            _ => "",
        };
        if !flags.is_empty() {
            let _ = write!(out, " flags=\"{flags}\"");
            if !d.version.is_empty() {
                // `[epoch:]version[-release]`, epoch 0 when not given.
                let (epoch, rest) = match d.version.split_once(':') {
                    Some((e, rest)) if e.bytes().all(|b| b.is_ascii_digit()) => (e, rest),
                    _ => ("0", d.version),
                };
                let (ver, rel) = match rest.rsplit_once('-') {
                    Some((v, r)) => (v, Some(r)),
                    None => (rest, None),
                };
                let epoch = if epoch.is_empty() { "0" } else { epoch };
                let _ = write!(out, " epoch=\"{}\" ver=\"{}\"", Attr(epoch), Attr(ver));
                if let Some(rel) = rel {
                    let _ = write!(out, " rel=\"{}\"", Attr(rel));
                }
            }
        }
        if d.pre {
            out.push_str(" pre=\"1\"");
        }
        out.push_str("/>\n");
    }
    let _ = writeln!(out, "    </rpm:{tag}>");
}

/// XML character data: `&`, `<`, `>` escaped as libxml2 does; characters XML 1.0
/// cannot carry (C0 controls other than tab/newline, U+FFFE/U+FFFF) become `?`.
struct Text<'a>(&'a str);
/// An attribute value: also `"` and the white space that attribute normalisation
/// would otherwise fold.
struct Attr<'a>(&'a str);

fn escape(f: &mut std::fmt::Formatter<'_>, s: &str, attr: bool) -> std::fmt::Result {
    let mut rest = s;
    while let Some(i) = rest.find(|c: char| {
        matches!(c, '&' | '<' | '>' | '\r' | '\u{FFFE}' | '\u{FFFF}')
            || (c < ' ' && c != '\t' && c != '\n')
            || (attr && matches!(c, '"' | '\t' | '\n'))
    }) {
        f.write_str(&rest[..i])?;
        let c = rest[i..].chars().next().expect("found a char");
        f.write_str(match c {
            '&' => "&amp;",
            '<' => "&lt;",
            '>' => "&gt;",
            '"' => "&quot;",
            '\r' => "&#13;",
            '\n' => "&#10;",
            '\t' => "&#9;",
            _ => "?",
        })?;
        rest = &rest[i + c.len_utf8()..];
    }
    f.write_str(rest)
}

impl std::fmt::Display for Text<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        escape(f, self.0, false)
    }
}
impl std::fmt::Display for Attr<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        escape(f, self.0, true)
    }
}

/// Returns the RPM with a v4 header-only OpenPGP signature by `key` added, replacing
/// any header or header+payload signature it had (rpm 4.18 keeps one header
/// signature per package). The main header and the payload are copied unchanged.
pub fn sign(bytes: &[u8], key: &RepoKey) -> Result<Vec<u8>, RpmError> {
    let (l, md) = parse_metadata(bytes)?;
    let header = &bytes[l.header_start..l.header_end];
    if let Some(d) = opt(md
        .signature
        .get_entry_data_as_string(IndexSignatureTag::RPMSIGTAG_SHA256))?
        && d != hex::encode(Sha256::digest(header))
    {
        return Err(RpmError::CorruptHeader(
            "the main header does not match its SHA-256 digest".into(),
        ));
    }
    let signature = key.detached_sign_binary(header)?;

    let drop: [u32; 6] = [
        IndexSignatureTag::HEADER_SIGNATURES as u32,
        IndexSignatureTag::RPMSIGTAG_DSA as u32,
        IndexSignatureTag::RPMSIGTAG_RSA as u32,
        IndexSignatureTag::RPMSIGTAG_PGP as u32,
        IndexSignatureTag::RPMSIGTAG_GPG as u32,
        IndexSignatureTag::RPMSIGTAG_OPENPGP as u32,
    ];
    let reserved_tag = IndexSignatureTag::RPMSIGTAG_RESERVEDSPACE as u32;
    let mut entries: Vec<(u32, IndexData)> = md
        .signature
        .get_all_entries()
        .map_err(corrupt)?
        .into_iter()
        .filter(|(tag, _)| !drop.contains(tag))
        .collect();
    // EdDSA (and DSA/ECDSA) header signatures live in RPMSIGTAG_DSA.
    entries.push((
        IndexSignatureTag::RPMSIGTAG_DSA as u32,
        IndexData::Bin(signature),
    ));

    let write = |entries: &[(u32, IndexData)]| -> Result<Vec<u8>, RpmError> {
        let sig = Header::<IndexSignatureTag>::from_entries(
            entries.iter().map(|(t, d)| HeaderEntry::new(*t, d.clone())),
            IndexSignatureTag::HEADER_SIGNATURES,
        );
        // Only the signature header is taken from this: an empty main header keeps
        // rpm-rs from re-serialising the real one.
        let md = PackageMetadata {
            lead: md.lead.clone(),
            signature: sig,
            header: Header::<IndexTag>::from_entries([], IndexTag::RPMTAG_HEADERIMMUTABLE),
        };
        let end = md.get_package_segment_offsets().header as usize;
        let mut out = Vec::with_capacity(end);
        md.write(&mut out).map_err(corrupt)?;
        out.truncate(end);
        Ok(out)
    };
    let mut head = write(&entries)?;
    // Like rpmsign, take the signature's room out of the reserved space so the
    // signature header keeps its size (then the file could be re-signed in place).
    let old_len = l.header_start;
    if head.len() > old_len
        && let Some((_, IndexData::Bin(space))) =
            entries.iter_mut().find(|(t, _)| *t == reserved_tag)
        && space.len() > head.len() - old_len
    {
        let shrink = head.len() - old_len;
        space.truncate(space.len() - shrink);
        head = write(&entries)?;
    }
    let mut out = Vec::with_capacity(head.len() + bytes.len() - l.header_start);
    out.extend_from_slice(&bytes[..LEAD_SIZE]);
    out.extend_from_slice(&head[LEAD_SIZE..]);
    out.extend_from_slice(&bytes[l.header_start..]);
    Ok(out)
}

/// One compressed chunk: a gzip member per XML file.
#[derive(Debug)]
struct Chunk {
    primary: Vec<u8>,
    filelists: Vec<u8>,
    other: Vec<u8>,
}

/// Compressed chunks of previous repodata builds, keyed by a digest of the fragments
/// they hold. Keep one per repository between publishes; [`build_repodata`] drops
/// chunks it did not use. Cloning is cheap (chunks are shared).
#[derive(Debug, Default, Clone)]
pub struct RepodataCache {
    chunks: HashMap<[u8; 32], Arc<Chunk>>,
    reused: usize,
    compressed: usize,
}

impl RepodataCache {
    pub fn new() -> RepodataCache {
        RepodataCache::default()
    }
    /// Number of cached chunks.
    pub fn len(&self) -> usize {
        self.chunks.len()
    }
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }
    /// Chunks the last [`build_repodata`] took from the cache.
    pub fn reused(&self) -> usize {
        self.reused
    }
    /// Chunks the last [`build_repodata`] had to compress.
    pub fn compressed(&self) -> usize {
        self.compressed
    }
}

/// A package in a build: its fragments, where it is served, and their identity.
struct Entry<'a> {
    f: &'a Fragments,
    location: &'a str,
    digest: [u8; 32],
}

impl<'a> Entry<'a> {
    fn new(f: &'a Fragments) -> Result<Entry<'a>, RpmError> {
        const HREF: &str = "\n  <location href=\"";
        let start = f
            .primary
            .find(HREF)
            .ok_or(RpmError::BadFragments("primary has no <location href>"))?
            + HREF.len();
        let len = f.primary[start..]
            .find('"')
            .ok_or(RpmError::BadFragments("unterminated <location href>"))?;
        let well_formed = |s: &str, open: &str| s.starts_with(open) && s.ends_with("</package>\n");
        if !well_formed(&f.primary, "<package type=\"rpm\">\n")
            || !well_formed(&f.filelists, "<package pkgid=\"")
            || !well_formed(&f.other, "<package pkgid=\"")
        {
            return Err(RpmError::BadFragments("not a <package> element"));
        }
        let pkgid = f
            .filelists
            .get(16..80)
            .filter(|id| id.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or(RpmError::BadFragments("filelists has no pkgid"))?;
        // The identity of the fragments, without a second cryptographic pass over
        // every byte (the open-checksums already make one): the pkgid is the RPM's
        // SHA-256 and fragments are a function of the RPM, so colliding keys would
        // need the same RPM; lengths and CRC32s catch fragments of one RPM rendered
        // differently (another kiln version, edited by hand).
        let mut h = Sha256::new();
        h.update(pkgid);
        for part in [&f.primary, &f.filelists, &f.other] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(crc32fast::hash(part.as_bytes()).to_le_bytes());
        }
        Ok(Entry {
            f,
            location: &f.primary[start..start + len],
            digest: h.finalize().into(),
        })
    }
}

/// The three XML files: type, root element opening (before `packages="N">`), closing.
const KINDS: [(&str, &str, &str); 3] = [
    (
        "primary",
        "<metadata xmlns=\"http://linux.duke.edu/metadata/common\" xmlns:rpm=\"http://linux.duke.edu/metadata/rpm\"",
        "</metadata>\n",
    ),
    (
        "filelists",
        "<filelists xmlns=\"http://linux.duke.edu/metadata/filelists\"",
        "</filelists>\n",
    ),
    (
        "other",
        "<otherdata xmlns=\"http://linux.duke.edu/metadata/other\"",
        "</otherdata>\n",
    ),
];

fn part(f: &Fragments, kind: usize) -> &str {
    match kind {
        0 => &f.primary,
        1 => &f.filelists,
        _ => &f.other,
    }
}

/// Builds `repodata/`: `<sha256>-primary.xml.gz`, `<sha256>-filelists.xml.gz`,
/// `<sha256>-other.xml.gz` (createrepo_c's unique-md-filenames form), then
/// `repodata/repomd.xml.asc` (armored detached signature by `key`) and
/// `repodata/repomd.xml`, in that (safe) write order.
///
/// `revision` goes into repomd's `<revision>`, `timestamp` (unix seconds) into each
/// `<timestamp>`. Packages may come in any order (output is sorted by location); the
/// same fragments given twice are published once, two different packages at one
/// location are an error.
pub fn build_repodata<'a>(
    packages: impl IntoIterator<Item = &'a Fragments>,
    revision: u64,
    timestamp: i64,
    key: &RepoKey,
    cache: &mut RepodataCache,
) -> Result<Vec<RepoFile>, RpmError> {
    let frags: Vec<&Fragments> = packages.into_iter().collect();
    let mut list = super::par_map(&frags, |f| Entry::new(f))
        .into_iter()
        .collect::<Result<Vec<Entry>, RpmError>>()?;
    list.sort_unstable_by(|a, b| a.location.cmp(b.location).then(a.digest.cmp(&b.digest)));
    list.dedup_by(|b, a| a.digest == b.digest);
    for w in list.windows(2) {
        if w[0].location == w[1].location {
            let pkgid = |e: &Entry| {
                let i = e.f.filelists.find("pkgid=\"").map_or(0, |i| i + 7);
                e.f.filelists.get(i..i + 64).unwrap_or("?").to_string()
            };
            return Err(RpmError::Duplicate {
                location: w[0].location.to_string(),
                first: pkgid(&w[0]),
                second: pkgid(&w[1]),
            });
        }
    }

    // Content-defined chunks: a boundary after each package whose location hashes
    // to a multiple of CHUNK_PACKAGES, so boundaries do not move when others are
    // added or removed.
    let mut chunks: Vec<&[Entry]> = Vec::new();
    let mut start = 0;
    for (i, e) in list.iter().enumerate() {
        if fnv1a(e.location.as_bytes()).is_multiple_of(CHUNK_PACKAGES) || i + 1 == list.len() {
            chunks.push(&list[start..=i]);
            start = i + 1;
        }
    }
    let keys: Vec<[u8; 32]> = chunks
        .iter()
        .map(|c| {
            let mut h = Sha256::new();
            // Versioned so a change of format or compression never reuses stale chunks.
            h.update(b"kiln-repodata-chunk-v1 gz6\n");
            for e in c.iter() {
                h.update(e.digest);
            }
            h.finalize().into()
        })
        .collect();
    let mut missing: Vec<([u8; 32], &[Entry])> = Vec::new();
    for (k, c) in keys.iter().zip(&chunks) {
        if !cache.chunks.contains_key(k) && !missing.iter().any(|(m, _)| m == k) {
            missing.push((*k, c));
        }
    }

    let n = list.len();
    let heads: Vec<String> = KINDS
        .iter()
        .map(|(_, open, _)| {
            format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n{open} packages=\"{n}\">\n")
        })
        .collect();
    // The open-checksums need every byte of the XML (primary is most of it): hash
    // primary on another core while the cache misses compress, then the others.
    let open_checksum = |k: usize| {
        let mut h = Sha256::new();
        let mut size = heads[k].len() + KINDS[k].2.len();
        h.update(&heads[k]);
        for e in &list {
            let s = part(e.f, k);
            size += s.len();
            h.update(s);
        }
        h.update(KINDS[k].2);
        (<[u8; 32]>::from(h.finalize()), size)
    };
    let (opens, compressed) = std::thread::scope(|scope| {
        let primary = scope.spawn(|| open_checksum(0));
        let compressed = super::par_map(&missing, |(_, c)| compress_chunk(c));
        let rest = [open_checksum(1), open_checksum(2)];
        let primary = primary.join().expect("open-checksum thread");
        ([primary, rest[0], rest[1]], compressed)
    });
    for ((k, _), c) in missing.iter().zip(compressed) {
        cache.chunks.insert(*k, Arc::new(c?));
    }
    let used: HashSet<&[u8; 32]> = keys.iter().collect();
    cache.chunks.retain(|k, _| used.contains(k));
    cache.compressed = missing.len();
    cache.reused = keys.len() - missing.len();

    let mut files = Vec::new();
    let mut repomd = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<repomd xmlns=\"http://linux.duke.edu/metadata/repo\" xmlns:rpm=\"http://linux.duke.edu/metadata/rpm\">\n",
    );
    let _ = writeln!(repomd, "  <revision>{revision}</revision>");
    for (k, (kind, _, close)) in KINDS.iter().enumerate() {
        let mut gz = gzip(heads[k].as_bytes())?;
        for key in &keys {
            let c = &cache.chunks[key];
            gz.extend_from_slice(match k {
                0 => &c.primary,
                1 => &c.filelists,
                _ => &c.other,
            });
        }
        gz.extend_from_slice(&gzip(close.as_bytes())?);
        let len = gz.len();
        let sha256: [u8; 32] = Sha256::digest(&gz).into();
        let sha = hex::encode(sha256);
        let href = format!("repodata/{sha}-{kind}.xml.gz");
        let (open_sha, open_size) = &opens[k];
        let _ = write!(
            repomd,
            "  <data type=\"{kind}\">\n    <checksum type=\"sha256\">{sha}</checksum>\n    <open-checksum type=\"sha256\">{}</open-checksum>\n    <location href=\"{href}\"/>\n    <timestamp>{timestamp}</timestamp>\n    <size>{len}</size>\n    <open-size>{open_size}</open-size>\n  </data>\n",
            hex::encode(open_sha)
        );
        // (Hashed once: the name carries the same digest RepoFile keeps.)
        files.push(RepoFile {
            path: href,
            data: gz.into(),
            sha256,
        });
    }
    repomd.push_str("</repomd>\n");
    let asc = key.detached_sign(repomd.as_bytes())?;
    files.push(RepoFile::new(
        "repodata/repomd.xml.asc".into(),
        asc.into_bytes().into(),
    ));
    files.push(RepoFile::new(
        "repodata/repomd.xml".into(),
        repomd.into_bytes().into(),
    ));
    Ok(files)
}

fn compress_chunk(c: &[Entry]) -> Result<Chunk, RpmError> {
    let member = |k: usize| {
        let mut text = Vec::with_capacity(c.iter().map(|e| part(e.f, k).len()).sum());
        for e in c {
            text.extend_from_slice(part(e.f, k).as_bytes());
        }
        gzip(&text)
    };
    Ok(Chunk {
        primary: member(0)?,
        filelists: member(1)?,
        other: member(2)?,
    })
}

/// One complete gzip member (no name, mtime 0: deterministic).
fn gzip(text: &[u8]) -> Result<Vec<u8>, RpmError> {
    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(text.len() / 4 + 64),
        flate2::Compression::new(6),
    );
    gz.write_all(text)?;
    Ok(gz.finish()?)
}

/// FNV-1a: a fixed, dependency-free hash; chunk boundaries must not change between
/// runs or versions.
fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &c| {
        (h ^ c as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::{Command, Output};

    const SPEC: &str = r#"Name: kilnhello
Version: 1.2
Release: 3
Epoch: 1
Summary: Says <hello> & goodbye
License: MIT
URL: https://example.org/kilnhello
Group: Applications/Misc
BuildArch: noarch
Provides: hello-cap = 1.2
Conflicts: oldhello < 1.0
Obsoletes: kilnhello-old < 1.0
Recommends: kilnhello-docs
%{?plain:AutoReq: no}
%if 0%{!?plain:1}
Requires(post): /bin/sh
Requires: bash >= 4.0
Requires: /usr/bin/kilnhello
%endif

%description
A test package for kiln: <b>bold</b> & "quoted".

%prep
%build
%install
mkdir -p %{buildroot}/usr/bin %{buildroot}/usr/share/kilnhello %{buildroot}/etc
printf '#!/bin/sh\necho hello\n' > %{buildroot}/usr/bin/kilnhello
chmod 755 %{buildroot}/usr/bin/kilnhello
echo data > %{buildroot}/usr/share/kilnhello/data.txt
echo conf > %{buildroot}/etc/kilnhello.conf

%check
test -x %{buildroot}/usr/bin/kilnhello

%if 0%{!?plain:1}
%post
true
%endif

%files
/usr/bin/kilnhello
%dir /usr/share/kilnhello
/usr/share/kilnhello/data.txt
%config(noreplace) /etc/kilnhello.conf
%ghost /var/log/kilnhello.log

%changelog
* Tue Jan 02 2024 Kiln Dev <dev@example.org> - 1:1.2-3
- Second <entry> & fix
* Mon Jan 01 2024 Kiln Dev <dev@example.org> - 1:1.2-1
- First entry
"#;

    fn run(cmd: &mut Command) -> Output {
        cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
    }

    fn ok(cmd: &mut Command) -> String {
        let out = run(cmd);
        assert!(
            out.status.success(),
            "{cmd:?}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Builds kilnhello with the real rpmbuild; `plain` leaves out the requirements
    /// an empty dnf installroot cannot satisfy.
    fn rpmbuild(dir: &Path, plain: bool) -> Vec<u8> {
        let top = dir.join("top");
        std::fs::create_dir_all(&top).unwrap();
        let spec = dir.join("kilnhello.spec");
        std::fs::write(&spec, SPEC).unwrap();
        let mut cmd = Command::new("rpmbuild");
        cmd.arg("--define")
            .arg(format!("_topdir {}", top.display()))
            .arg("--dbpath")
            .arg(dir.join("db"))
            .args(["--nodeps", "--quiet", "-bb"]);
        if plain {
            cmd.args(["--define", "plain 1"]);
        }
        ok(cmd.arg(&spec));
        std::fs::read(top.join("RPMS/noarch/kilnhello-1.2-3.noarch.rpm")).unwrap()
    }

    /// The `<package …>…</package>` elements of an XML file.
    fn packages(xml: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = xml;
        while let Some(i) = rest.find("<package ") {
            let end = rest[i..].find("</package>\n").unwrap() + i + "</package>\n".len();
            out.push(rest[i..end].to_string());
            rest = &rest[end..];
        }
        out
    }

    fn gunzip(b: &[u8]) -> String {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut flate2::read::MultiGzDecoder::new(b), &mut s).unwrap();
        s
    }

    fn write_repo(root: &Path, files: &[RepoFile]) {
        for f in files {
            let p = root.join(&f.path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, &f.data).unwrap();
        }
    }

    #[test]
    fn inspect_matches_createrepo_c() {
        let tmp = tempfile::tempdir().unwrap();
        let bytes = rpmbuild(tmp.path(), false);
        let info = inspect(&bytes).unwrap();
        assert_eq!(info.name, "kilnhello");
        assert_eq!(
            (info.epoch, &*info.version, &*info.release),
            (1, "1.2", "3")
        );
        assert_eq!(info.arch, "noarch");
        assert_eq!(info.location, "Packages/k/kilnhello-1.2-3.noarch.rpm");
        assert_eq!(info.size, bytes.len() as u64);
        assert_eq!(info.sha256, <[u8; 32]>::from(Sha256::digest(&bytes)));
        assert!(info.provides.contains(&"kilnhello".to_string()));
        assert!(info.provides.contains(&"hello-cap".to_string()));
        assert!(info.requires.contains(&"bash".to_string()));
        assert!(!info.requires.iter().any(|r| r.starts_with("rpmlib(")));
        let f = &info.fragments;
        assert!(
            f.primary
                .contains("<summary>Says &lt;hello&gt; &amp; goodbye</summary>")
        );
        assert!(f.other.contains("Second &lt;entry&gt; &amp; fix"));

        // createrepo_c on the same file at the same location gives the same XML,
        // except the file time (createrepo_c: the file's mtime; kiln: the build time).
        let repo = tmp.path().join("repo");
        let at = repo.join(&info.location);
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        std::fs::write(&at, &bytes).unwrap();
        ok(Command::new("createrepo_c")
            .args(["-q", "--no-database"])
            .arg(&repo));
        let read = |kind: &str| {
            let dir = std::fs::read_dir(repo.join("repodata")).unwrap();
            let p = dir
                .map(|e| e.unwrap().path())
                .find(|p| p.to_string_lossy().ends_with(&format!("-{kind}.xml.gz")))
                .unwrap();
            packages(&gunzip(&std::fs::read(p).unwrap()))
        };
        let mut primary = read("primary").remove(0);
        let t = primary.find("<time file=\"").unwrap() + 12;
        let e = primary[t..].find('"').unwrap() + t;
        let build = format!(
            "{}",
            rpm::PackageMetadata::parse(&mut &bytes[..])
                .unwrap()
                .get_build_time()
                .unwrap()
        );
        primary.replace_range(t..e, &build);
        assert_eq!(f.primary, primary);
        assert_eq!(f.filelists, read("filelists").remove(0));
        assert_eq!(f.other, read("other").remove(0));
    }

    #[test]
    fn signatures_verify_with_rpmkeys() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        let bytes = rpmbuild(t, false);
        let key = RepoKey::generate("kiln test <k@localhost>").unwrap();
        let other = RepoKey::generate("kiln other <o@localhost>").unwrap();
        let signed = sign(&bytes, &key).unwrap();
        // Same key again: replaced, not added; the signature header keeps its size.
        let resigned = sign(&signed, &key).unwrap();
        assert_eq!(resigned.len(), signed.len());
        assert_eq!(
            signed.len(),
            bytes.len(),
            "signature taken from the reserved space"
        );
        let by_other = sign(&signed, &other).unwrap();
        let i = inspect(&signed).unwrap();
        assert_eq!(i.location, inspect(&bytes).unwrap().location);

        std::fs::write(t.join("key.asc"), key.public_key_armored().unwrap()).unwrap();
        let db = t.join("rpmdb");
        std::fs::create_dir_all(&db).unwrap();
        ok(Command::new("rpmkeys")
            .arg("--dbpath")
            .arg(&db)
            .arg("--import")
            .arg(t.join("key.asc")));
        let check = |name: &str, data: &[u8]| {
            let p = t.join(name);
            std::fs::write(&p, data).unwrap();
            let out = run(Command::new("rpmkeys")
                .arg("--dbpath")
                .arg(&db)
                .arg("-Kv")
                .arg(&p));
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            (out.status.success(), text)
        };
        for (name, data) in [("signed.rpm", &signed), ("resigned.rpm", &resigned)] {
            let (good, text) = check(name, data);
            assert!(good, "{text}");
            assert!(
                text.contains("Header V4 EdDSA/SHA256 Signature, key ID"),
                "{text}"
            );
            assert!(text.contains(": OK"), "{text}");
            assert!(
                !text.contains("NOT OK") && !text.contains("NOKEY"),
                "{text}"
            );
        }
        let (_, text) = check("unsigned.rpm", &bytes);
        assert!(!text.contains("Signature"), "{text}");
        let (good, text) = check("other.rpm", &by_other);
        assert!(!good && text.contains("NOKEY"), "{text}");
        // rpm accepts the rewritten package as a package, too.
        ok(Command::new("rpm")
            .arg("--dbpath")
            .arg(&db)
            .arg("-qpi")
            .arg(t.join("signed.rpm")));
    }

    /// Real dnf (libsolv + librepo) installs from kiln's repodata with gpgcheck and
    /// repo_gpgcheck, and refuses a repomd.xml changed after signing.
    #[test]
    fn dnf_installs_from_signed_repodata() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        let key = RepoKey::generate("kiln test <k@localhost>").unwrap();
        let rpm = sign(&rpmbuild(t, true), &key).unwrap();
        let info = inspect(&rpm).unwrap();
        // Enough packages for several chunks, so the .xml.gz files are multi-member.
        let clones: Vec<Fragments> = (0..200)
            .map(|i| {
                let fr = &info.fragments;
                let re = |s: &str| s.replace("kilnhello", &format!("filler{i:03}"));
                Fragments {
                    primary: re(&fr.primary).replace("Packages/k/filler", "Packages/f/filler"),
                    filelists: re(&fr.filelists),
                    other: re(&fr.other),
                }
            })
            .collect();
        let mut cache = RepodataCache::new();
        let files = build_repodata(
            clones.iter().chain([&info.fragments]),
            7,
            1_700_000_000,
            &key,
            &mut cache,
        )
        .unwrap();
        assert!(cache.len() > 2, "{}", cache.len());
        let names: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
        assert!(
            names[..3].iter().all(|n| n.ends_with(".xml.gz")),
            "{names:?}"
        );
        assert_eq!(
            names[3..],
            ["repodata/repomd.xml.asc", "repodata/repomd.xml"]
        );
        let primary = gunzip(&files[0].data);
        assert!(primary.contains("packages=\"201\""));
        assert_eq!(packages(&primary).len(), 201);

        let repo = t.join("repo");
        write_repo(&repo, &files);
        std::fs::create_dir_all(repo.join("Packages/k")).unwrap();
        std::fs::write(repo.join(&info.location), &rpm).unwrap();
        std::fs::write(t.join("key.asc"), key.public_key_armored().unwrap()).unwrap();

        let dnf = |name: &str| {
            let root = t.join(format!("root-{name}"));
            let reposd = t.join(format!("repos-{name}.d"));
            let gnupg = t.join(format!("gnupg-{name}"));
            for d in [&root, &reposd, &gnupg] {
                std::fs::create_dir_all(d).unwrap();
            }
            std::fs::set_permissions(&gnupg, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .unwrap();
            std::fs::write(
                reposd.join("kilntest.repo"),
                format!(
                    "[kilntest]\nname=kiln test\nbaseurl=file://{}\nenabled=1\ngpgcheck=1\nrepo_gpgcheck=1\ngpgkey=file://{}\nmetadata_expire=0\n",
                    repo.display(),
                    t.join("key.asc").display()
                ),
            )
            .unwrap();
            let conf = t.join("dnf.conf");
            std::fs::write(&conf, "[main]\ngpgcheck=1\nrepo_gpgcheck=1\n").unwrap();
            let out = run(Command::new("dnf")
                .env("GNUPGHOME", &gnupg)
                .args(["-q", "-y", "--releasever=1"])
                .arg(format!("--config={}", conf.display()))
                .arg(format!("--installroot={}", root.display()))
                .arg(format!("--setopt=reposdir={}", reposd.display()))
                .arg(format!(
                    "--setopt=cachedir={}",
                    t.join(format!("cache-{name}")).display()
                ))
                .args(["--repo", "kilntest", "install", "kilnhello"]));
            (root, out)
        };
        let (root, out) = dnf("good");
        let log = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{log}");
        assert!(root.join("usr/bin/kilnhello").is_file(), "{log}");

        // One byte of repomd.xml changed, signature kept: dnf must refuse.
        let p = repo.join("repodata/repomd.xml");
        let mut md = std::fs::read(&p).unwrap();
        let i = md.windows(11).position(|w| w == b"<revision>7").unwrap() + 10;
        md[i] = b'8';
        std::fs::write(&p, md).unwrap();
        let (root, out) = dnf("tampered");
        let log = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{log}");
        assert!(!root.join("usr/bin/kilnhello").exists(), "{log}");
    }

    fn synthetic(n: usize, base: &Fragments) -> Vec<Fragments> {
        (0..n)
            .map(|i| {
                let re = |s: &str| {
                    s.replace("Packages/k/kilnhello", &format!("Packages/p/pkg{i:05}"))
                        .replace("kilnhello", &format!("pkg{i:05}"))
                };
                Fragments {
                    primary: re(&base.primary),
                    filelists: re(&base.filelists),
                    other: re(&base.other),
                }
            })
            .collect()
    }

    #[test]
    fn incremental_build_reuses_chunks_and_matches_cold_build() {
        let tmp = tempfile::tempdir().unwrap();
        let info = inspect(&rpmbuild(tmp.path(), false)).unwrap();
        let key = RepoKey::generate("kiln test <k@localhost>").unwrap();
        let mut all = synthetic(1001, &info.fragments);
        let added = all.remove(500);

        let mut warm = RepodataCache::new();
        build_repodata(all.iter().rev(), 1, 1_700_000_000, &key, &mut warm).unwrap();
        let chunks = warm.len();
        assert!(chunks > 5, "{chunks}");
        assert_eq!((warm.reused(), warm.compressed()), (0, chunks));

        all.push(added);
        let inc = build_repodata(&all, 2, 1_700_000_100, &key, &mut warm).unwrap();
        assert_eq!(warm.compressed(), 1, "only the chunk with the new package");
        assert_eq!(warm.reused(), warm.len() - 1);

        let mut cold_cache = RepodataCache::new();
        let cold =
            build_repodata(all.iter().rev(), 2, 1_700_000_100, &key, &mut cold_cache).unwrap();
        assert_eq!(inc.len(), cold.len());
        for (a, b) in inc.iter().zip(&cold) {
            assert_eq!(a.path, b.path);
            if !a.path.ends_with(".asc") {
                assert!(a.data == b.data, "{} differs", a.path);
            }
        }
        assert!(gunzip(&inc[0].data).contains("packages=\"1001\""));

        // Duplicates: the same fragments twice are one package; different ones at
        // one location are an error.
        let again = build_repodata(
            all.iter().chain(&all[..3]),
            2,
            1_700_000_100,
            &key,
            &mut warm,
        )
        .unwrap();
        assert!(again[0].data == cold[0].data);
        let mut clash = all[0].clone();
        clash.other = clash.other.replace("First entry", "First entry!");
        let err = build_repodata(all.iter().chain([&clash]), 2, 0, &key, &mut warm).unwrap_err();
        assert!(matches!(err, RpmError::Duplicate { .. }), "{err}");
        let bad = Fragments {
            primary: "<x/>".into(),
            filelists: String::new(),
            other: String::new(),
        };
        assert!(matches!(
            build_repodata([&bad], 1, 0, &key, &mut warm),
            Err(RpmError::BadFragments(_))
        ));
    }

    #[test]
    fn bad_input_names_the_problem() {
        let tmp = tempfile::tempdir().unwrap();
        let bytes = rpmbuild(tmp.path(), false);
        let key = RepoKey::generate("kiln test <k@localhost>").unwrap();
        let msg = |b: &[u8]| inspect(b).unwrap_err().to_string();

        assert_eq!(
            msg(b"garbage bytes, not an rpm"),
            "not an RPM: bad lead magic"
        );
        assert_eq!(msg(b""), "not an RPM: bad lead magic");
        assert!(
            msg(&bytes[..50]).starts_with("truncated RPM: the lead"),
            "{}",
            msg(&bytes[..50])
        );
        assert!(
            msg(&bytes[..200]).starts_with("truncated RPM: signature header"),
            "{}",
            msg(&bytes[..200])
        );
        let l = layout(&bytes).unwrap();
        let cut = &bytes[..l.header_end - 10];
        assert!(
            msg(cut).starts_with("truncated RPM: main header"),
            "{}",
            msg(cut)
        );
        assert!(sign(cut, &key).is_err());

        let mut c = bytes.clone();
        c[l.header_start] ^= 0xff;
        assert_eq!(msg(&c), "corrupt header: main header: bad magic");
        let mut c = bytes.clone();
        c[l.header_start + 8..l.header_start + 12].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(
            msg(&c).starts_with("corrupt header: main header: implausible size"),
            "{}",
            msg(&c)
        );
        // An index entry pointing past the data (rpm-rs alone would panic).
        let mut c = bytes.clone();
        let entry = l.header_start + 16 + 16; // the second index entry
        c[entry + 8..entry + 12].copy_from_slice(&0x7fff_fff0u32.to_be_bytes());
        let m = msg(&c);
        assert!(
            m.starts_with("corrupt header: main header: entry 1 (tag"),
            "{m}"
        );
        assert!(m.ends_with("points outside the data store"), "{m}");
        // A string array claiming more strings than the store holds.
        let mut c = bytes.clone();
        let tags = u32::from_be_bytes(
            c[l.header_start + 8..l.header_start + 12]
                .try_into()
                .unwrap(),
        );
        let arr = (0..tags as usize)
            .map(|i| l.header_start + 16 + 16 * i)
            .find(|&e| c[e + 4..e + 8] == 8u32.to_be_bytes())
            .unwrap();
        c[arr + 12..arr + 16].copy_from_slice(&1_000_000u32.to_be_bytes());
        let m = msg(&c);
        assert!(m.ends_with("has an unterminated string"), "{m}");
        // A changed header byte: inspect cannot tell, but sign checks the digest.
        let mut c = bytes.clone();
        let n = c[l.header_start..l.header_end]
            .windows(9)
            .position(|w| w == b"kilnhello")
            .unwrap();
        c[l.header_start + n] = b'K';
        let e = sign(&c, &key).unwrap_err().to_string();
        assert!(e.contains("does not match its SHA-256 digest"), "{e}");
    }
}
