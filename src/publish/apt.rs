//! apt repository metadata: `Packages` stanzas, `Packages{,.gz,.xz}` per architecture,
//! their `by-hash` copies, and the (unsigned) `Release` text.
//!
//! Owns: [`PoolEntry`] → [`Stanza`] rendering, Debian version ordering
//! ([`compare_versions`]), pool paths ([`pool_filename`]), and [`build_index`] with its
//! [`IndexCache`] of compressed chunks.
//!
//! Incremental design (what makes "add one package to 10,000" cheap):
//! - A [`Stanza`] is rendered once per `.deb` and can be cached by the caller, e.g. keyed
//!   by the `.deb`'s SHA-256 (or persisted with [`Stanza::text`] / [`Stanza::from_cached`]).
//! - Each `Packages` file is cut into chunks at content-defined points (after a
//!   package-name group whose name hash hits [`CHUNK_PACKAGES`]), so inserting a package
//!   changes only the chunk it lands in. Each chunk is compressed on its own:
//!   `Packages.gz` is the concatenation of one gzip member per chunk (RFC 1952 §2.2;
//!   apt reads all members), `Packages.xz` is ONE xz stream made of one block per chunk
//!   with a freshly written index (the layout of `xz -T`). Concatenating whole xz
//!   streams is NOT an option: apt 2.6 silently stops after the first stream and then
//!   reports a size mismatch (seen in this crate's tests).
//!   [`IndexCache`] keeps each chunk's compressed forms keyed by a digest of its stanzas.
//!
//! What must stay true:
//! - `Release` lists the uncompressed `Packages` too (apt ignores indexes whose
//!   uncompressed hash is missing) and only SHA256 (MD5/SHA1 are "weak" to apt).
//! - Only validated text reaches the output: control values carry no blank lines
//!   (guaranteed by [`Control`]), pool file names and suite fields are checked here.
//! - Output is deterministic for a given set of stanzas and date.

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::deb::{Control, DebError, valid_arch};

/// Expected number of package names per compressed chunk. Smaller chunks make an
/// incremental republish cheaper; larger ones compress better (xz cannot reference
/// across streams). 32 names of typical stanzas (~0.5-1 KiB) is ~16-32 KiB per chunk:
/// adding one package to 10,000 recompresses one of ~300 chunks.
pub const CHUNK_PACKAGES: u64 = 32;
/// xz preset for the chunks (the `xz` default). The dictionary is shrunk to the chunk's
/// size, which gives the same output as the preset for inputs smaller than the
/// dictionary while avoiding preset 6's ~90 MiB encoder set-up per chunk.
pub const XZ_PRESET: u32 = 6;

#[derive(Debug, thiserror::Error)]
pub enum AptError {
    #[error("invalid pool file name {0:?}: must be a relative path under pool/ without '..'")]
    BadFilename(String),
    #[error("invalid {field} {value:?}: {reason}")]
    BadConfig {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("no architectures: configure at least one or publish a non-\"all\" package")]
    NoArchitectures,
    #[error("two different files for {package} {version} {architecture}: {first} and {second}")]
    Duplicate {
        package: String,
        version: String,
        architecture: String,
        first: String,
        second: String,
    },
    #[error("cached stanza is not valid: {0}")]
    BadCachedStanza(String),
    #[error("cached stanza: {0}")]
    CachedControl(#[from] DebError),
    #[error("compressing an index: {0}")]
    Compress(#[from] std::io::Error),
    #[error("xz encoder: {0}")]
    Xz(#[from] liblzma::stream::Error),
}

/// A `.deb` as it sits in the pool.
#[derive(Debug, Clone)]
pub struct PoolEntry {
    pub control: Control,
    /// Path relative to the repository root, e.g. `pool/main/h/hello/hello_2.10-3_amd64.deb`.
    pub filename: String,
    pub size: u64,
    pub sha256: [u8; 32],
}

/// Fields we generate ourselves: a control file carrying them would produce duplicate
/// or conflicting entries in the stanza, so they are dropped.
const GENERATED: &[&str] = &["Filename", "Size", "MD5sum", "SHA1", "SHA256", "SHA512"];

/// One rendered `Packages` paragraph, ending with its blank separator line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stanza {
    package: String,
    version: String,
    architecture: String,
    deb_sha256: [u8; 32],
    /// SHA-256 of `text`: the chunk cache key is derived from these.
    digest: [u8; 32],
    text: String,
}

impl Stanza {
    /// Renders `Package`, the other control fields in file order, then `Filename`,
    /// `Size` and `SHA256`.
    pub fn new(entry: &PoolEntry) -> Result<Stanza, AptError> {
        check_pool_filename(&entry.filename)?;
        let c = &entry.control;
        let mut text = String::with_capacity(
            256 + c
                .fields()
                .iter()
                .map(|(n, v)| n.len() + v.len() + 3)
                .sum::<usize>(),
        );
        super::deb::write_field(&mut text, "Package", c.package());
        for (name, value) in c.fields() {
            if name.eq_ignore_ascii_case("Package")
                || GENERATED.iter().any(|g| g.eq_ignore_ascii_case(name))
            {
                continue;
            }
            super::deb::write_field(&mut text, name, value);
        }
        super::deb::write_field(&mut text, "Filename", &entry.filename);
        super::deb::write_field(&mut text, "Size", &entry.size.to_string());
        super::deb::write_field(&mut text, "SHA256", &hex::encode(entry.sha256));
        text.push('\n');
        Ok(Stanza {
            package: c.package().to_string(),
            version: c.version().to_string(),
            architecture: c.architecture().to_string(),
            deb_sha256: entry.sha256,
            digest: Sha256::digest(text.as_bytes()).into(),
            text,
        })
    }

    /// Rebuilds a stanza from [`Stanza::text`] stored earlier, re-validating it.
    pub fn from_cached(text: String) -> Result<Stanza, AptError> {
        let body = text
            .strip_suffix("\n\n")
            .ok_or_else(|| AptError::BadCachedStanza("does not end with a blank line".into()))?;
        let control = Control::parse(body)?;
        let filename = control
            .get("Filename")
            .ok_or_else(|| AptError::BadCachedStanza("no Filename".into()))?;
        check_pool_filename(filename)?;
        control
            .get("Size")
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| AptError::BadCachedStanza("no valid Size".into()))?;
        let sha = control
            .get("SHA256")
            .and_then(|s| hex::decode(s).ok())
            .and_then(|v| <[u8; 32]>::try_from(v).ok())
            .ok_or_else(|| AptError::BadCachedStanza("no valid SHA256".into()))?;
        Ok(Stanza {
            package: control.package().to_string(),
            version: control.version().to_string(),
            architecture: control.architecture().to_string(),
            deb_sha256: sha,
            digest: Sha256::digest(text.as_bytes()).into(),
            text,
        })
    }

    pub fn text(&self) -> &str {
        &self.text
    }
    pub fn package(&self) -> &str {
        &self.package
    }
    pub fn version(&self) -> &str {
        &self.version
    }
    pub fn architecture(&self) -> &str {
        &self.architecture
    }
    /// SHA-256 of the `.deb` this stanza describes.
    pub fn deb_sha256(&self) -> &[u8; 32] {
        &self.deb_sha256
    }

    fn cmp_key(&self, other: &Stanza) -> Ordering {
        self.package
            .cmp(&other.package)
            .then_with(|| compare_versions(&self.version, &other.version))
            .then_with(|| self.architecture.cmp(&other.architecture))
    }
}

fn check_pool_filename(f: &str) -> Result<(), AptError> {
    let ok = f.starts_with("pool/")
        && !f.ends_with('/')
        && f.split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
        && f.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(AptError::BadFilename(f.into()))
    }
}

/// The conventional pool path: `pool/<component>/<prefix>/<source>/<pkg>_<ver>_<arch>.deb`
/// with the epoch dropped from the version and `lib?` prefixes for `lib*` sources.
/// Safe to use as a path: every part is validated by [`Control`] and `component` here.
pub fn pool_filename(component: &str, control: &Control) -> Result<String, AptError> {
    check_word("component", component)?;
    let source = control.source();
    let prefix = if source.starts_with("lib") && source.len() > 3 {
        &source[..4]
    } else {
        &source[..1]
    };
    let version = control
        .version()
        .split_once(':')
        .map_or(control.version(), |(_, v)| v);
    Ok(format!(
        "pool/{component}/{prefix}/{source}/{}_{}_{}.deb",
        control.package(),
        version,
        control.architecture()
    ))
}

/// Orders two Debian versions as `dpkg --compare-versions` does (epoch, upstream
/// version, revision; `~` sorts before everything, letters before other symbols).
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    fn split(v: &str) -> (u64, &str, &str) {
        let (epoch, rest) = match v.split_once(':') {
            Some((e, r)) => (e.parse().unwrap_or(0), r),
            None => (0, v),
        };
        match rest.rsplit_once('-') {
            Some((u, r)) => (epoch, u, r),
            None => (epoch, rest, ""),
        }
    }
    let (ea, ua, ra) = split(a);
    let (eb, ub, rb) = split(b);
    ea.cmp(&eb)
        .then_with(|| verrevcmp(ua.as_bytes(), ub.as_bytes()))
        .then_with(|| verrevcmp(ra.as_bytes(), rb.as_bytes()))
}

/// dpkg's `verrevcmp` (lib/dpkg/version.c).
fn verrevcmp(a: &[u8], b: &[u8]) -> Ordering {
    fn order(c: u8) -> i32 {
        match c {
            0 | b'0'..=b'9' => 0,
            c if c.is_ascii_alphabetic() => c as i32,
            b'~' => -1,
            c => c as i32 + 256,
        }
    }
    let at = |s: &[u8], i: usize| s.get(i).copied().unwrap_or(0);
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        let mut first_diff = 0i32;
        while (i < a.len() && !a[i].is_ascii_digit()) || (j < b.len() && !b[j].is_ascii_digit()) {
            let (ac, bc) = (order(at(a, i)), order(at(b, j)));
            if ac != bc {
                return ac.cmp(&bc);
            }
            i += 1;
            j += 1;
        }
        while at(a, i) == b'0' {
            i += 1;
        }
        while at(b, j) == b'0' {
            j += 1;
        }
        while at(a, i).is_ascii_digit() && at(b, j).is_ascii_digit() {
            if first_diff == 0 {
                first_diff = at(a, i) as i32 - at(b, j) as i32;
            }
            i += 1;
            j += 1;
        }
        if at(a, i).is_ascii_digit() {
            return Ordering::Greater;
        }
        if at(b, j).is_ascii_digit() {
            return Ordering::Less;
        }
        if first_diff != 0 {
            return first_diff.cmp(&0);
        }
    }
    Ordering::Equal
}

/// The fields of a suite's `Release` file.
#[derive(Debug, Clone)]
pub struct SuiteConfig {
    pub origin: String,
    pub label: String,
    /// Also the directory name: files go under `dists/<suite>/`.
    pub suite: String,
    pub codename: String,
    /// The single component this suite publishes (usually `main`).
    pub component: String,
    /// Architectures always published (even when empty). Architectures of published
    /// packages are added; `all` packages go into every architecture's index.
    pub architectures: Vec<String>,
    pub description: Option<String>,
}

impl SuiteConfig {
    fn validate(&self) -> Result<(), AptError> {
        check_word("suite", &self.suite)?;
        check_word("codename", &self.codename)?;
        check_word("component", &self.component)?;
        check_line("origin", &self.origin)?;
        check_line("label", &self.label)?;
        if let Some(d) = &self.description {
            check_line("description", d)?;
        }
        for a in &self.architectures {
            if !valid_arch(a) || a == "all" {
                return Err(AptError::BadConfig {
                    field: "architecture",
                    value: a.clone(),
                    reason: "must be a concrete architecture like amd64",
                });
            }
        }
        Ok(())
    }
}

/// A path-safe single word: `[A-Za-z0-9._+-]`, not `.`/`..`.
fn check_word(field: &'static str, v: &str) -> Result<(), AptError> {
    let ok = !v.is_empty()
        && v != "."
        && v != ".."
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(AptError::BadConfig {
            field,
            value: v.into(),
            reason: "must be one word of [A-Za-z0-9._+-]",
        })
    }
}

fn check_line(field: &'static str, v: &str) -> Result<(), AptError> {
    if v.trim().is_empty() || v.contains(['\n', '\r']) {
        return Err(AptError::BadConfig {
            field,
            value: v.into(),
            reason: "must be one non-empty line",
        });
    }
    Ok(())
}

/// A file to publish, with its path relative to the repository root.
#[derive(Debug, Clone)]
pub struct RepoFile {
    /// e.g. `dists/stable/main/binary-amd64/Packages.xz`
    pub path: String,
    /// Shared, cheap to clone; made from a `Vec` without copying.
    pub data: bytes::Bytes,
    pub sha256: [u8; 32],
}

impl RepoFile {
    pub(crate) fn new(path: String, data: bytes::Bytes) -> RepoFile {
        let sha256 = Sha256::digest(&data).into();
        RepoFile { path, data, sha256 }
    }
}

/// The indexes of one suite and the `Release` text that covers them.
#[derive(Debug, Clone)]
pub struct Index {
    /// All `Packages*` files, `by-hash` copies first: written in this order, a client
    /// never sees a `Release` naming a file that is not there yet.
    pub files: Vec<RepoFile>,
    /// Unsigned `Release`; sign it and write `Release`, `Release.gpg`, `InRelease` last.
    pub release: String,
}

#[derive(Debug)]
struct CompressedChunk {
    /// A complete gzip member.
    gz: Vec<u8>,
    /// One xz block (with its padding), ready to be placed in a multi-block stream.
    xz: XzBlock,
}

/// Compressed chunks of previous builds, keyed by a digest of the stanzas they hold.
/// Keep one per suite between publishes; [`build_index`] drops chunks it did not use.
/// Cloning is cheap (chunks are shared), e.g. to try a publish and keep the old state.
#[derive(Debug, Default, Clone)]
pub struct IndexCache {
    chunks: HashMap<[u8; 32], Arc<CompressedChunk>>,
}

impl IndexCache {
    pub fn new() -> IndexCache {
        IndexCache::default()
    }
    /// Number of cached chunks (for metrics and tests).
    pub fn len(&self) -> usize {
        self.chunks.len()
    }
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }
}

/// Builds every architecture's `Packages{,.gz,.xz}` and the `Release` text.
///
/// `stanzas` may be in any order (e.g. `map.values()` of a cache keyed by .deb hash); an identical stanza given twice is published once,
/// while two different files with the same package, version and architecture are an
/// error (apt could not tell them apart).
pub fn build_index<'a>(
    cfg: &SuiteConfig,
    stanzas: impl IntoIterator<Item = &'a Stanza>,
    date: OffsetDateTime,
    cache: &mut IndexCache,
) -> Result<Index, AptError> {
    cfg.validate()?;
    let mut sorted: Vec<&Stanza> = stanzas.into_iter().collect();
    sorted.sort_unstable_by(|a, b| a.cmp_key(b).then_with(|| a.digest.cmp(&b.digest)));
    sorted.dedup_by(|b, a| a.digest == b.digest);
    for w in sorted.windows(2) {
        if w[0].cmp_key(w[1]) == Ordering::Equal {
            return Err(AptError::Duplicate {
                package: w[0].package.clone(),
                version: w[0].version.clone(),
                architecture: w[0].architecture.clone(),
                first: hex::encode(w[0].deb_sha256),
                second: hex::encode(w[1].deb_sha256),
            });
        }
    }

    let mut arches: BTreeSet<&str> = cfg.architectures.iter().map(String::as_str).collect();
    arches.extend(
        sorted
            .iter()
            .map(|s| s.architecture.as_str())
            .filter(|a| *a != "all"),
    );
    if arches.is_empty() {
        return Err(AptError::NoArchitectures);
    }

    // Chunk every architecture's list, then compress all cache misses in parallel.
    let per_arch: Vec<(&str, Vec<Vec<&Stanza>>)> = arches
        .iter()
        .map(|&arch| {
            let list: Vec<&Stanza> = sorted
                .iter()
                .copied()
                .filter(|s| s.architecture == arch || s.architecture == "all")
                .collect();
            (arch, chunk(&list))
        })
        .collect();
    let mut keys: Vec<[u8; 32]> = Vec::new();
    let mut missing: Vec<([u8; 32], &[&Stanza])> = Vec::new();
    for (_, chunks) in &per_arch {
        for c in chunks {
            let key = chunk_key(c);
            if !cache.chunks.contains_key(&key) && !missing.iter().any(|(k, _)| *k == key) {
                missing.push((key, c));
            }
            keys.push(key);
        }
    }
    // The uncompressed indexes (text and SHA256) do not need the compressed
    // chunks: build them on another core while the cache misses compress and
    // the compressed indexes are assembled.
    let (texts, compressed) = std::thread::scope(|scope| {
        let texts = scope.spawn(|| {
            per_arch
                .iter()
                .map(|(arch, chunks)| {
                    let len = chunks.iter().flatten().map(|s| s.text.len()).sum();
                    let mut text = Vec::with_capacity(len);
                    for s in chunks.iter().flatten() {
                        text.extend_from_slice(s.text.as_bytes());
                    }
                    let rel = format!("{}/binary-{arch}/Packages", cfg.component);
                    RepoFile::new(format!("dists/{}/{rel}", cfg.suite), text.into())
                })
                .collect::<Vec<RepoFile>>()
        });
        let compressed = compress_indexes(&per_arch, &keys, &missing, cache);
        (texts.join().expect("index text thread"), compressed)
    });

    let mut by_hash = Vec::new();
    let mut plain = Vec::new();
    let mut sums: Vec<(String, [u8; 32], usize)> = Vec::new();
    for (((arch, _), text), (gz, xz)) in per_arch.iter().zip(texts).zip(compressed?) {
        let dir = format!("{}/binary-{arch}", cfg.component);
        let files = [("Packages", text), ("Packages.gz", gz), ("Packages.xz", xz)];
        for (name, f) in files {
            let rel = format!("{dir}/{name}");
            let f = RepoFile {
                path: format!("dists/{}/{rel}", cfg.suite),
                ..f
            };
            by_hash.push(RepoFile {
                path: format!(
                    "dists/{}/{dir}/by-hash/SHA256/{}",
                    cfg.suite,
                    hex::encode(f.sha256)
                ),
                data: f.data.clone(),
                sha256: f.sha256,
            });
            sums.push((rel, f.sha256, f.data.len()));
            plain.push(f);
        }
    }

    let mut release = String::new();
    let mut field = |n: &str, v: &str| super::deb::write_field(&mut release, n, v);
    field("Origin", &cfg.origin);
    field("Label", &cfg.label);
    field("Suite", &cfg.suite);
    field("Codename", &cfg.codename);
    field("Date", &rfc2822(date));
    field(
        "Architectures",
        &arches.iter().copied().collect::<Vec<_>>().join(" "),
    );
    field("Components", &cfg.component);
    if let Some(d) = &cfg.description {
        field("Description", d);
    }
    field("Acquire-By-Hash", "yes");
    release.push_str("SHA256:\n");
    for (path, sha, size) in &sums {
        release.push_str(&format!(" {} {size:>16} {path}\n", hex::encode(sha)));
    }

    by_hash.extend(plain);
    Ok(Index {
        files: by_hash,
        release,
    })
}

/// Compresses the chunks the cache lacks (on all cores), drops the ones no
/// longer used, and assembles each architecture's `Packages.gz` and
/// `Packages.xz` (paths are filled in by the caller).
#[allow(clippy::type_complexity)]
fn compress_indexes(
    per_arch: &[(&str, Vec<Vec<&Stanza>>)],
    keys: &[[u8; 32]],
    missing: &[([u8; 32], &[&Stanza])],
    cache: &mut IndexCache,
) -> Result<Vec<(RepoFile, RepoFile)>, AptError> {
    let compressed = super::par_map(missing, |(_, c)| {
        let mut text = Vec::with_capacity(c.iter().map(|s| s.text.len()).sum());
        for s in c.iter() {
            text.extend_from_slice(s.text.as_bytes());
        }
        compress(&text)
    });
    for ((key, _), c) in missing.iter().zip(compressed) {
        cache.chunks.insert(*key, Arc::new(c?));
    }
    let used: std::collections::HashSet<[u8; 32]> = keys.iter().copied().collect();
    cache.chunks.retain(|k, _| used.contains(k));
    // `keys` holds every chunk's key in this same order.
    let mut key = keys.iter();
    let mut out = Vec::new();
    for (_, chunks) in per_arch {
        let mut gz = Vec::new();
        let mut blocks = Vec::new();
        for _ in chunks {
            let k = key.next().expect("a key per chunk");
            let cc = cache.chunks[k].clone();
            gz.extend_from_slice(&cc.gz);
            blocks.push(cc);
        }
        if chunks.is_empty() {
            // An empty file is not a valid .gz: publish a compressed empty member.
            gz = gzip(b"")?;
        }
        let xz = xz_stream(blocks.iter().map(|c| &c.xz));
        out.push((
            RepoFile::new(String::new(), gz.into()),
            RepoFile::new(String::new(), xz.into()),
        ));
    }
    Ok(out)
}

/// `Sat, 01 Jan 2000 00:00:00 UTC`, the form Debian's archive uses.
fn rfc2822(date: OffsetDateTime) -> String {
    let fmt = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] UTC"
    );
    date.to_offset(time::UtcOffset::UTC)
        .format(&fmt)
        .expect("static format on a valid date")
}

/// Cuts a sorted list after package-name groups whose name hash hits the target, so a
/// boundary depends only on the names around it, not on positions.
fn chunk<'a>(list: &[&'a Stanza]) -> Vec<Vec<&'a Stanza>> {
    let mut out = Vec::new();
    let mut cur: Vec<&Stanza> = Vec::new();
    for (i, s) in list.iter().enumerate() {
        cur.push(s);
        let group_ends = list.get(i + 1).is_none_or(|n| n.package != s.package);
        if group_ends && fnv1a(s.package.as_bytes()).is_multiple_of(CHUNK_PACKAGES) {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// FNV-1a: a fixed, dependency-free hash; boundaries must not change between runs.
fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &c| {
        (h ^ c as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

fn chunk_key(c: &[&Stanza]) -> [u8; 32] {
    let mut h = Sha256::new();
    // Versioned so a change of compression settings never reuses stale chunks.
    h.update(format!("kiln-chunk-v1 xz{XZ_PRESET} gz6\n"));
    for s in c {
        h.update(s.digest);
    }
    h.finalize().into()
}

fn gzip(text: &[u8]) -> Result<Vec<u8>, AptError> {
    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(text.len() / 4),
        flate2::Compression::new(6),
    );
    gz.write_all(text)?;
    Ok(gz.finish()?)
}

fn compress(text: &[u8]) -> Result<CompressedChunk, AptError> {
    let gz = gzip(text)?;

    let mut opts = liblzma::stream::LzmaOptions::new_preset(XZ_PRESET)?;
    let dict = (text.len() as u32).clamp(4096, 8 << 20).next_power_of_two();
    opts.dict_size(dict);
    let mut filters = liblzma::stream::Filters::new();
    filters.lzma2(&opts);
    let stream = liblzma::stream::Stream::new_stream_encoder(&filters, XZ_CHECK)?;
    let mut xz = liblzma::write::XzEncoder::new_stream(Vec::with_capacity(text.len() / 5), stream);
    xz.write_all(text)?;
    let xz = XzBlock::from_single_block_stream(xz.finish()?)?;
    Ok(CompressedChunk { gz, xz })
}

/// The integrity check of every block; the stream header and footer must name the same.
const XZ_CHECK: liblzma::stream::Check = liblzma::stream::Check::Crc64;
/// Stream flags for CRC64 (.xz spec §2.1.1.2: 0x00, check id 0x04).
const XZ_STREAM_FLAGS: [u8; 2] = [0x00, 0x04];
const XZ_MAGIC: &[u8; 6] = b"\xfd7zXZ\0";

/// One xz block and the two numbers the stream index needs about it.
///
/// apt (2.6) decodes only the first stream of a multi-stream `.xz`, so chunks cannot
/// simply be concatenated as whole streams like gzip members. Instead each chunk keeps
/// the single block liblzma produced, and [`xz_stream`] assembles the blocks into one
/// stream with a fresh index, exactly the layout `xz -T` writes.
#[derive(Debug)]
struct XzBlock {
    /// Block header + compressed data + check + padding to a multiple of four.
    bytes: Vec<u8>,
    /// Size without the padding, as recorded in the index.
    unpadded: u64,
    uncompressed: u64,
}

impl XzBlock {
    /// Cuts the block out of a complete one-block stream made with [`XZ_CHECK`].
    fn from_single_block_stream(s: Vec<u8>) -> Result<XzBlock, AptError> {
        let bad = |what: &str| {
            AptError::Compress(std::io::Error::other(format!(
                "unexpected xz encoder output: {what}"
            )))
        };
        if s.len() < 24 || &s[..6] != XZ_MAGIC || s[6..8] != XZ_STREAM_FLAGS {
            return Err(bad("stream header"));
        }
        let footer = &s[s.len() - 12..];
        if &footer[10..12] != b"YZ" {
            return Err(bad("stream footer"));
        }
        let backward = u32::from_le_bytes(footer[4..8].try_into().expect("4 bytes"));
        let index_len = (backward as usize + 1) * 4;
        let index_start = (s.len() - 12)
            .checked_sub(index_len)
            .filter(|&i| i >= 12)
            .ok_or_else(|| bad("index size"))?;
        let mut index = &s[index_start..s.len() - 12];
        let mut varint = || -> Option<u64> {
            let mut v = 0u64;
            for shift in (0..63).step_by(7) {
                let (&b, rest) = index.split_first()?;
                index = rest;
                v |= u64::from(b & 0x7f) << shift;
                if b & 0x80 == 0 {
                    return Some(v);
                }
            }
            None
        };
        let indicator = varint();
        let records = varint();
        if indicator != Some(0) || records != Some(1) {
            return Err(bad("expected exactly one block"));
        }
        let unpadded = varint().ok_or_else(|| bad("index record"))?;
        let uncompressed = varint().ok_or_else(|| bad("index record"))?;
        let bytes = s[12..index_start].to_vec();
        if unpadded.div_ceil(4) * 4 != bytes.len() as u64 {
            return Err(bad("block size does not match the index"));
        }
        Ok(XzBlock {
            bytes,
            unpadded,
            uncompressed,
        })
    }
}

/// Writes one .xz stream holding `blocks` in order (.xz spec §2.1 and §4).
fn xz_stream<'a>(blocks: impl Iterator<Item = &'a XzBlock> + Clone) -> Vec<u8> {
    fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    let mut out = Vec::with_capacity(blocks.clone().map(|b| b.bytes.len()).sum::<usize>() + 64);
    out.extend_from_slice(XZ_MAGIC);
    out.extend_from_slice(&XZ_STREAM_FLAGS);
    out.extend_from_slice(&crc32fast::hash(&XZ_STREAM_FLAGS).to_le_bytes());
    let mut index = vec![0x00];
    varint(&mut index, blocks.clone().count() as u64);
    for b in blocks {
        out.extend_from_slice(&b.bytes);
        varint(&mut index, b.unpadded);
        varint(&mut index, b.uncompressed);
    }
    while index.len() % 4 != 0 {
        index.push(0);
    }
    index.extend_from_slice(&crc32fast::hash(&index).to_le_bytes());
    let backward = (index.len() / 4 - 1) as u32;
    out.extend_from_slice(&index);
    let mut tail = backward.to_le_bytes().to_vec();
    tail.extend_from_slice(&XZ_STREAM_FLAGS);
    out.extend_from_slice(&crc32fast::hash(&tail).to_le_bytes());
    out.extend_from_slice(&tail);
    out.extend_from_slice(b"YZ");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stanza(package: &str, version: &str, arch: &str) -> Stanza {
        let text = format!(
            "Package: {package}\nVersion: {version}\nArchitecture: {arch}\n\
             Description: test {package}\n with a longer description line for realism.\n"
        );
        let control = Control::parse(&text).unwrap();
        let filename = pool_filename("main", &control).unwrap();
        let sha256 = Sha256::digest(format!("{package} {version} {arch}")).into();
        Stanza::new(&PoolEntry {
            control,
            filename,
            size: 1234,
            sha256,
        })
        .unwrap()
    }

    fn cfg() -> SuiteConfig {
        SuiteConfig {
            origin: "o".into(),
            label: "l".into(),
            suite: "stable".into(),
            codename: "stable".into(),
            component: "main".into(),
            architectures: vec!["amd64".into()],
            description: None,
        }
    }

    fn date() -> OffsetDateTime {
        time::macros::datetime!(2024-03-01 12:34:56 UTC)
    }

    #[test]
    fn versions_order_like_dpkg() {
        let versions = [
            "1.0",
            "1.0-1",
            "1.0-1ubuntu1",
            "1.0~rc1",
            "1.0~~",
            "1.0+b1",
            "1:0.9",
            "0:1.0",
            "1.0a",
            "1.0.1",
            "1.00",
            "2",
            "10",
            "1.0-1~bpo1",
            "1.0-10",
            "1.0-9",
            "1.a",
            "1.+",
        ];
        for a in versions {
            for b in versions {
                let ours = compare_versions(a, b);
                let dpkg = |op: &str| {
                    std::process::Command::new("dpkg")
                        .args(["--compare-versions", a, op, b])
                        .status()
                        .unwrap()
                        .success()
                };
                let theirs = if dpkg("lt") {
                    Ordering::Less
                } else if dpkg("gt") {
                    Ordering::Greater
                } else {
                    Ordering::Equal
                };
                assert_eq!(ours, theirs, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn stanza_layout_and_cache_round_trip() {
        let s = stanza("libfoo1", "1:2.0-1", "amd64");
        assert_eq!(
            s.text(),
            format!(
                "Package: libfoo1\nVersion: 1:2.0-1\nArchitecture: amd64\n\
                 Description: test libfoo1\n with a longer description line for realism.\n\
                 Filename: pool/main/libf/libfoo1/libfoo1_2.0-1_amd64.deb\nSize: 1234\n\
                 SHA256: {}\n\n",
                hex::encode(s.deb_sha256())
            )
        );
        let back = Stanza::from_cached(s.text().to_string()).unwrap();
        assert_eq!(back, s);
        assert!(Stanza::from_cached("Package: a\n\n".into()).is_err());
    }

    #[test]
    fn generated_fields_in_control_are_dropped() {
        let control = Control::parse(
            "Package: ab\nVersion: 1\nArchitecture: all\nSHA256: 00\nFilename: /etc/passwd\nSize: 1\n",
        )
        .unwrap();
        let s = Stanza::new(&PoolEntry {
            control,
            filename: "pool/main/a/ab/ab_1_all.deb".into(),
            size: 9,
            sha256: [7; 32],
        })
        .unwrap();
        assert_eq!(s.text().matches("SHA256:").count(), 1);
        assert!(!s.text().contains("/etc/passwd"));
        assert!(s.text().contains("Size: 9\n"));
    }

    #[test]
    fn bad_names_are_refused() {
        let control = Control::parse("Package: ab\nVersion: 1\nArchitecture: all\n").unwrap();
        for f in [
            "/etc/x.deb",
            "pool/../x.deb",
            "pool/a b.deb",
            "pool/x\n.deb",
            "dists/x",
        ] {
            let e = Stanza::new(&PoolEntry {
                control: control.clone(),
                filename: f.into(),
                size: 1,
                sha256: [0; 32],
            });
            assert!(matches!(e, Err(AptError::BadFilename(_))), "{f}");
        }
        let mut c = cfg();
        c.suite = "../x".into();
        assert!(build_index(&c, &[], date(), &mut IndexCache::new()).is_err());
        let mut c = cfg();
        c.label = "a\nSHA256:".into();
        assert!(build_index(&c, &[], date(), &mut IndexCache::new()).is_err());
    }

    #[test]
    fn duplicates() {
        let a = stanza("aa", "1", "amd64");
        // The same stanza twice is published once.
        let idx = build_index(
            &cfg(),
            &[a.clone(), a.clone()],
            date(),
            &mut IndexCache::new(),
        )
        .unwrap();
        let packages = &idx
            .files
            .iter()
            .find(|f| f.path.ends_with("/Packages"))
            .unwrap();
        assert_eq!(packages.data.len(), a.text().len());
        // A different file with the same name/version/arch is an error.
        let mut b = a.clone();
        b.deb_sha256 = [1; 32];
        b.digest = [1; 32];
        let e = build_index(&cfg(), &[a, b], date(), &mut IndexCache::new()).unwrap_err();
        assert!(matches!(e, AptError::Duplicate { .. }), "{e}");
    }

    #[test]
    fn release_text() {
        let idx = build_index(
            &cfg(),
            &[stanza("aa", "1", "arm64")],
            date(),
            &mut IndexCache::new(),
        )
        .unwrap();
        let head = "Origin: o\nLabel: l\nSuite: stable\nCodename: stable\n\
                    Date: Fri, 01 Mar 2024 12:34:56 UTC\nArchitectures: amd64 arm64\n\
                    Components: main\nAcquire-By-Hash: yes\nSHA256:\n";
        assert!(idx.release.starts_with(head), "{}", idx.release);
        // 2 architectures x 3 forms, each listed once and published twice (by-hash).
        assert_eq!(idx.release.lines().count(), head.lines().count() + 6);
        assert_eq!(idx.files.len(), 12);
        for f in &idx.files {
            if f.path.contains("/by-hash/") {
                assert!(f.path.ends_with(&hex::encode(f.sha256)));
            } else {
                let rel = f.path.strip_prefix("dists/stable/").unwrap();
                let line = format!(" {} {:>16} {rel}\n", hex::encode(f.sha256), f.data.len());
                assert!(idx.release.contains(&line), "{line}");
            }
        }
        // by-hash objects come first.
        let first_plain = idx
            .files
            .iter()
            .position(|f| !f.path.contains("by-hash"))
            .unwrap();
        assert!(
            idx.files[first_plain..]
                .iter()
                .all(|f| !f.path.contains("by-hash"))
        );
    }

    /// Decompresses with the real tools: gzip reads all members, xz the one stream.
    fn decompress(tool: &str, data: &[u8]) -> Vec<u8> {
        use std::process::{Command, Stdio};
        let mut child = Command::new(tool)
            .arg("-dc")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let data = data.to_vec();
        let w = std::thread::spawn(move || stdin.write_all(&data).unwrap());
        let out = child.wait_with_output().unwrap();
        w.join().unwrap();
        assert!(out.status.success(), "{tool} -dc failed");
        out.stdout
    }

    #[test]
    fn incremental_build_equals_fresh_build_and_reuses_chunks() {
        let mut all: Vec<Stanza> = (0..2000)
            .map(|i| {
                stanza(
                    &format!("pkg{i:05}"),
                    "1.0",
                    if i % 7 == 0 { "all" } else { "amd64" },
                )
            })
            .collect();
        let mut cache = IndexCache::new();
        let first = build_index(&cfg(), &all, date(), &mut cache).unwrap();
        let chunks = cache.len();
        assert!(chunks > 10, "{chunks}");

        all.push(stanza("pkg01000a", "2.0", "amd64"));
        let incremental = build_index(&cfg(), &all, date(), &mut cache).unwrap();
        let fresh = build_index(&cfg(), &all, date(), &mut IndexCache::new()).unwrap();
        // Same bytes whether or not the cache was used.
        assert_eq!(incremental.release, fresh.release);
        for (a, b) in incremental.files.iter().zip(&fresh.files) {
            assert_eq!((&a.path, &a.data), (&b.path, &b.data));
        }
        // Only the touched chunk was replaced.
        assert_eq!(cache.len(), chunks);
        assert_ne!(first.release, incremental.release);

        let get = |n: &str| {
            &incremental
                .files
                .iter()
                .find(|f| f.path.ends_with(n))
                .unwrap()
                .data
        };
        let plain = get("binary-amd64/Packages");
        assert_eq!(
            &decompress("gzip", get("binary-amd64/Packages.gz"))[..],
            &plain[..]
        );
        assert_eq!(
            &decompress("xz", get("binary-amd64/Packages.xz"))[..],
            &plain[..]
        );
        assert!(
            std::str::from_utf8(plain)
                .unwrap()
                .contains("Package: pkg01000a\n")
        );
    }

    #[test]
    fn empty_indexes_are_valid_compressed_files() {
        let idx = build_index(&cfg(), &[], date(), &mut IndexCache::new()).unwrap();
        let get = |n: &str| &idx.files.iter().find(|f| f.path.ends_with(n)).unwrap().data;
        assert!(get("binary-amd64/Packages").is_empty());
        assert!(decompress("gzip", get("binary-amd64/Packages.gz")).is_empty());
        assert!(decompress("xz", get("binary-amd64/Packages.xz")).is_empty());
    }
}
