use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use tar::{EntryType, Header};
use tempfile::TempDir;

use super::*;

fn store() -> (TempDir, Cas) {
    let dir = TempDir::new().unwrap();
    let cas = Cas::open(&dir.path().join("store")).unwrap();
    (dir, cas)
}

/// Every regular file under `sha256/`.
fn blob_files(cas: &Cas) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let root = cas.root().join("sha256");
    for fan in fs::read_dir(&root).unwrap() {
        for f in fs::read_dir(fan.unwrap().path()).unwrap() {
            out.push(f.unwrap().path());
        }
    }
    out.sort();
    out
}

fn blob_file(cas: &Cas, d: &Digest) -> PathBuf {
    let hex = d.to_string();
    cas.root().join("sha256").join(&hex[..2]).join(&hex)
}

/// Deterministic, moderately compressible data.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    let words: [&[u8]; 6] = [
        b"kiln ",
        b"build ",
        b"artifact ",
        b"sandbox ",
        b"\x00\x01",
        b"zstd ",
    ];
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x.is_multiple_of(3) {
            out.extend_from_slice(&x.to_le_bytes());
        } else {
            out.extend_from_slice(words[(x % 6) as usize]);
        }
    }
    out.truncate(len);
    out
}

fn zstd_cli_decompress(path: &Path) -> Vec<u8> {
    let out = Command::new("zstd")
        .args(["-d", "-c", "-q"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "zstd -d failed: {:?}", out);
    out.stdout
}

fn frame_content_size(path: &Path) -> Option<u64> {
    let bytes = fs::read(path).unwrap();
    zstd::zstd_safe::get_frame_content_size(&bytes[..18.min(bytes.len())]).unwrap()
}

/// Read until error or EOF; returns (bytes received, error if any).
fn drain(mut r: impl Read) -> (Vec<u8>, Option<std::io::Error>) {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 7000];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return (got, None),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, Some(e)),
        }
    }
}

#[test]
fn digest_text_forms() {
    let d = Digest::of(b"hello");
    let hex = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
    assert_eq!(d.to_string(), hex);
    assert_eq!(hex.parse::<Digest>().unwrap(), d);
    assert_eq!(serde_json::to_string(&d).unwrap(), format!("\"{hex}\""));
    assert_eq!(
        serde_json::from_str::<Digest>(&format!("\"{hex}\"")).unwrap(),
        d
    );
    for bad in [
        &hex.to_uppercase()[..],
        &hex[1..],
        "",
        &format!("{hex}0"),
        &hex.replace('c', "g"),
    ] {
        let err = bad.parse::<Digest>().unwrap_err();
        assert!(
            matches!(err, CasError::InvalidDigest { .. }),
            "{bad}: {err}"
        );
    }
    assert!(serde_json::from_str::<Digest>("\"abc\"").is_err());
}

#[test]
fn small_round_trip_is_one_zstd_frame() {
    let (_t, cas) = store();
    let content = b"hello kiln\n".to_vec();
    let d = cas.put_bytes(&content).unwrap();
    assert_eq!(d, Digest::of(&content));
    assert!(cas.contains(&d));
    assert_eq!(cas.get_bytes(&d).unwrap(), content);
    let path = blob_file(&cas, &d);
    assert_eq!(zstd_cli_decompress(&path), content);
    assert_eq!(frame_content_size(&path), Some(content.len() as u64));
    assert_eq!(
        cas.stored_size(&d).unwrap(),
        fs::metadata(&path).unwrap().len()
    );

    let empty = cas.put_bytes(b"").unwrap();
    assert_eq!(cas.get_bytes(&empty).unwrap(), b"");
    assert_eq!(zstd_cli_decompress(&blob_file(&cas, &empty)), b"");
}

#[test]
fn large_round_trips_through_every_entry_point() {
    let (t, cas) = store();
    let content = data(9 << 20, 1);
    let d = Digest::of(&content);

    assert_eq!(cas.put_bytes(&content).unwrap(), d);
    let path = blob_file(&cas, &d);
    assert_eq!(zstd_cli_decompress(&path), content);
    assert_eq!(frame_content_size(&path), Some(content.len() as u64));
    assert!(fs::metadata(&path).unwrap().len() < content.len() as u64);
    assert_eq!(cas.get_bytes(&d).unwrap(), content);
    assert!(cas.remove(&d).unwrap());
    assert!(!cas.contains(&d));

    // Unknown length: no content size in the frame, still one valid frame.
    assert_eq!(
        cas.put_reader(&content[..]).unwrap(),
        (d, content.len() as u64)
    );
    assert_eq!(frame_content_size(&path), None);
    assert_eq!(zstd_cli_decompress(&path), content);
    assert!(cas.remove(&d).unwrap());

    let file = t.path().join("input");
    fs::write(&file, &content).unwrap();
    assert_eq!(cas.put_file(&file).unwrap(), (d, content.len() as u64));
    assert_eq!(frame_content_size(&path), Some(content.len() as u64));
    assert_eq!(cas.get_bytes(&d).unwrap(), content);
    cas.verify(&d).unwrap();

    let r = cas.open_blob(&d).unwrap();
    assert_eq!(r.len_hint(), Some(content.len() as u64));
    let (got, err) = drain(r);
    assert!(err.is_none());
    assert_eq!(got, content);

    let r = cas.open_raw(&d).unwrap();
    assert_eq!(r.len(), fs::metadata(&path).unwrap().len());
    let (got, err) = drain(r);
    assert!(err.is_none());
    assert_eq!(got, fs::read(&path).unwrap());

    // Exactly at the small/large boundary and a sized reader that lies.
    let edge = data(1 << 20, 2);
    assert_eq!(cas.put_reader(&edge[..]).unwrap().0, Digest::of(&edge));
    assert_eq!(cas.get_bytes(&Digest::of(&edge)).unwrap(), edge);
    assert!(cas.put_reader_sized(&edge[..], 5).is_err());
    assert!(
        cas.put_reader_sized(&content[..], content.len() as u64 + 1)
            .is_err()
    );
    assert!(cas.put_reader_sized(&b"abc"[..], 4).is_err());
}

#[test]
fn same_content_is_stored_once() {
    let (t, cas) = store();
    let small = b"same".to_vec();
    let big = data(3 << 20, 3);
    let file = t.path().join("f");
    fs::write(&file, &big).unwrap();
    let a = cas.put_bytes(&small).unwrap();
    assert_eq!(cas.put_bytes(&small).unwrap(), a);
    let b = cas.put_bytes(&big).unwrap();
    assert_eq!(cas.put_file(&file).unwrap().0, b);
    assert_eq!(cas.put_reader(&big[..]).unwrap().0, b);
    let mut batch = cas.batch();
    batch.put_bytes(b"x").unwrap();
    batch.put_bytes(b"x").unwrap();
    batch.put_reader(&data(2 << 20, 9)[..]).unwrap();
    batch.put_reader(&data(2 << 20, 9)[..]).unwrap();
    assert_eq!(batch.len(), 2);
    batch.commit().unwrap();
    assert_eq!(blob_files(&cas).len(), 4);
    assert_eq!(cas.list().unwrap().len(), 4);
    // Nothing left in staging.
    assert_eq!(fs::read_dir(&cas.inner.tmp).unwrap().count(), 0);
}

/// Corruptions that must make every reader fail before releasing all the data.
fn assert_rejected(cas: &Cas, d: &Digest, full_content: &[u8], original_len: usize) {
    let err = cas.get_bytes(d).unwrap_err();
    assert!(
        matches!(err, CasError::Corrupt { digest, .. } if digest == *d),
        "{err}"
    );
    assert!(err.to_string().contains(&d.to_string()));
    assert!(matches!(cas.verify(d), Err(CasError::Corrupt { .. })));

    let (got, err) = drain(cas.open_blob(d).unwrap());
    let err = err.expect("BlobReader must fail");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert!(err.to_string().contains(&d.to_string()), "{err}");
    assert!(
        got.len() < original_len,
        "got all {} original bytes",
        got.len()
    );
    assert!(got.len() < full_content.len(), "got all replacement bytes");
    // Failure is sticky.
    let (got, err) = drain(cas.open_blob(d).unwrap());
    assert!(err.is_some() && got.len() < full_content.len());

    let raw = fs::read(blob_file(cas, d)).unwrap();
    let (got, err) = drain(cas.open_raw(d).unwrap());
    let err = err.expect("RawReader must fail");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert!(got.len() < raw.len(), "RawReader released the whole file");
}

#[test]
fn corrupt_blobs_are_never_served_whole() {
    let (_t, cas) = store();
    for (len, seed) in [(40usize, 10u64), (100_000, 11), (3 << 20, 12)] {
        let content = data(len, seed);
        let d = cas.put_bytes(&content).unwrap();
        let path = blob_file(&cas, &d);
        let good = fs::read(&path).unwrap();
        let mut perms = fs::metadata(&path).unwrap().permissions();
        perms.set_mode(0o644);
        fs::set_permissions(&path, perms).unwrap();

        // 1. a flipped byte in the compressed stream
        let mut bad = good.clone();
        let at = bad.len() / 2;
        bad[at] ^= 0x40;
        fs::write(&path, &bad).unwrap();
        assert_rejected(&cas, &d, &content, len);

        // 2. a valid frame of different content (same length)
        let other = data(len, seed + 100);
        fs::write(&path, zstd::encode_all(&other[..], 3).unwrap()).unwrap();
        assert_rejected(&cas, &d, &other, len);

        // 3. truncated frame
        fs::write(&path, &good[..good.len() - 3]).unwrap();
        assert_rejected(&cas, &d, &content, len);

        // 4. trailing bytes after the frame (a second frame)
        let mut two = good.clone();
        two.extend_from_slice(&zstd::encode_all(&b"more"[..], 3).unwrap());
        fs::write(&path, &two).unwrap();
        let err = cas.get_bytes(&d).unwrap_err();
        assert!(matches!(err, CasError::Corrupt { .. }), "{err}");
        let (got, err) = drain(cas.open_raw(&d).unwrap());
        assert!(err.is_some() && got.len() < two.len());

        // restored: fine again
        fs::write(&path, &good).unwrap();
        assert_eq!(cas.get_bytes(&d).unwrap(), content);
    }
}

#[test]
fn missing_blob_is_not_found() {
    let (_t, cas) = store();
    let d = Digest::of(b"nope");
    assert!(!cas.contains(&d));
    assert!(matches!(cas.get_bytes(&d), Err(CasError::NotFound(x)) if x == d));
    assert!(matches!(cas.open_blob(&d), Err(CasError::NotFound(_))));
    assert!(matches!(cas.open_raw(&d), Err(CasError::NotFound(_))));
    assert!(matches!(cas.stored_size(&d), Err(CasError::NotFound(_))));
    assert!(!cas.remove(&d).unwrap());
}

#[test]
fn open_cleans_stale_staging_but_not_live_handles() {
    let t = TempDir::new().unwrap();
    let root = t.path().join("store");
    let tmp_entries = || fs::read_dir(root.join("tmp")).unwrap().count();
    let live = Cas::open(&root).unwrap();
    assert_eq!(tmp_entries(), 0, "an idle store has an empty tmp/");
    let mut batch = live.batch();
    let d = batch.put_bytes(b"staged by a live handle").unwrap();

    // Leftovers of a crashed process.
    fs::write(root.join("tmp/999-dead-7"), b"half a blob").unwrap();
    fs::create_dir(root.join("tmp/old-dir")).unwrap();
    fs::write(root.join("tmp/old-dir/x"), b"junk").unwrap();

    // While a handle lives, a second open leaves tmp/ alone.
    let second = Cas::open(&root).unwrap();
    assert_eq!(tmp_entries(), 3);
    batch.commit().unwrap();
    assert!(second.contains(&d));
    drop(live);
    drop(second);

    // The next open that is alone cleans up.
    let third = Cas::open(&root).unwrap();
    assert_eq!(tmp_entries(), 0);
    assert!(third.contains(&d));
}

#[test]
fn batch_is_invisible_until_commit_and_dropped_batch_leaves_nothing() {
    let (t, cas) = store();
    let file = t.path().join("f");
    fs::write(&file, data(2 << 20, 4)).unwrap();
    let mut batch = cas.batch();
    let a = batch.put_bytes(b"alpha").unwrap();
    let (b, _) = batch.put_file(&file).unwrap();
    let (c, _) = batch.put_reader(&data(5000, 5)[..]).unwrap();
    for d in [a, b, c] {
        assert!(!cas.contains(&d));
    }
    assert!(blob_files(&cas).is_empty());
    drop(batch);
    assert!(blob_files(&cas).is_empty());
    assert_eq!(fs::read_dir(&cas.inner.tmp).unwrap().count(), 0);

    let mut batch = cas.batch();
    batch.put_bytes(b"alpha").unwrap();
    batch.put_file(&file).unwrap();
    assert!(!cas.contains(&a));
    batch.commit().unwrap();
    assert!(cas.contains(&a) && cas.contains(&b));

    // A big batch (syncfs path).
    let mut batch = cas.batch();
    let ds: Vec<_> = (0..40)
        .map(|i| batch.put_bytes(&data(100, i)).unwrap())
        .collect();
    batch.commit().unwrap();
    assert!(ds.iter().all(|d| cas.contains(d)));
    assert_eq!(cas.list().unwrap().len(), 42);
}

// ---- tar helpers ----

#[derive(Clone, Copy)]
struct RawEntry<'a> {
    name: &'a [u8],
    kind: EntryType,
    link: &'a [u8],
    data: &'a [u8],
    mode: u32,
}

fn entry<'a>(name: &'a str, kind: EntryType) -> RawEntry<'a> {
    RawEntry {
        name: name.as_bytes(),
        kind,
        link: b"",
        data: b"",
        mode: if kind == EntryType::Directory {
            0o755
        } else {
            0o644
        },
    }
}

fn file<'a>(name: &'a str, data: &'a [u8]) -> RawEntry<'a> {
    RawEntry {
        data,
        ..entry(name, EntryType::Regular)
    }
}

fn link<'a>(name: &'a str, kind: EntryType, target: &'a str) -> RawEntry<'a> {
    RawEntry {
        link: target.as_bytes(),
        mode: 0o777,
        ..entry(name, kind)
    }
}

/// Write headers by hand: tar::Builder would refuse the unsafe names.
fn raw_tar(entries: &[RawEntry<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = Header::new_gnu();
        {
            let old = h.as_old_mut();
            old.name[..e.name.len()].copy_from_slice(e.name);
            old.linkname[..e.link.len()].copy_from_slice(e.link);
        }
        h.set_entry_type(e.kind);
        h.set_size(e.data.len() as u64);
        h.set_mode(e.mode);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append(&h, e.data).unwrap();
    }
    b.into_inner().unwrap()
}

#[test]
fn tar_ingest_accepts_a_normal_tree() {
    let (_t, cas) = store();
    let big = data(3 << 20, 6);
    let mut exe = file("./src/run.sh", b"#!/bin/sh\necho hi\n");
    exe.mode = 0o4755; // setuid is dropped
    let tar = raw_tar(&[
        entry("./", EntryType::Directory),
        entry("./src/", EntryType::Directory),
        file("./src/main.c", b"int main(){}\n"),
        exe,
        file("src/big.bin", &big),
        file("docs/deep/readme", b"implicit parents\n"),
        link("src/link", EntryType::Symlink, "main.c"),
        link("src/up", EntryType::Symlink, "../docs/deep/readme"),
        link("hard", EntryType::Link, "./src/main.c"),
        entry("./src/", EntryType::Directory),
        file("./src/main.c", b"int main(){}\n"),
    ]);
    let pending = cas.ingest_tar(&tar[..], 1 << 30).unwrap();
    assert_eq!(pending.max_mtime, 1_700_000_000);
    assert!(
        blob_files(&cas).is_empty(),
        "staged blobs must not be visible"
    );
    let tree = &pending.tree;
    let paths: Vec<&str> = tree.entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "docs",
            "docs/deep",
            "docs/deep/readme",
            "hard",
            "src",
            "src/big.bin",
            "src/link",
            "src/main.c",
            "src/run.sh",
            "src/up"
        ]
    );
    let main = tree.get("src/main.c").unwrap();
    assert_eq!(tree.get("hard").unwrap().kind, main.kind);
    assert_eq!(tree.get("src/run.sh").unwrap().mode, 0o755);
    assert_eq!(
        tree.get("src/link").unwrap().kind,
        EntryKind::Symlink {
            target: "main.c".into()
        }
    );
    assert_eq!(tree.files().count(), 5);
    assert_eq!(tree.total_size(), big.len() as u64 + 13 + 13 + 18 + 17);
    // Files are readable (verified) before commit, still without being visible.
    assert_eq!(
        pending.read_file("src/main.c").unwrap().unwrap(),
        b"int main(){}\n"
    );
    assert_eq!(
        pending.read_file("hard").unwrap().unwrap(),
        b"int main(){}\n"
    );
    assert_eq!(pending.read_file("src/big.bin").unwrap().unwrap(), big);
    assert_eq!(pending.read_file("src").unwrap(), None);
    assert_eq!(pending.read_file("src/link").unwrap(), None);
    assert_eq!(pending.read_file("nope").unwrap(), None);
    assert!(blob_files(&cas).is_empty());
    let tree = tree.clone();
    let d = pending.commit().unwrap();
    assert_eq!(cas.get_tree(&d).unwrap(), tree);
    let (_, bd, _) = tree.files().find(|f| f.0 == "src/big.bin").unwrap();
    assert_eq!(cas.get_bytes(bd).unwrap(), big);

    // Content already in the store is not staged again but still readable.
    let again = raw_tar(&[file("copy.c", b"int main(){}\n"), file("new", b"new")]);
    let pending = cas.ingest_tar(&again[..], 1 << 20).unwrap();
    assert_eq!(
        pending.read_file("copy.c").unwrap().unwrap(),
        b"int main(){}\n"
    );
    assert_eq!(pending.read_file("new").unwrap().unwrap(), b"new");
}

fn assert_unsafe(cas: &Cas, entries: &[RawEntry<'_>], want_path: &str, reason_has: &str) {
    // A legit file first, so something was staged before the rejection.
    let mut all = vec![file("ok.txt", b"fine"), file("big", &BIG)];
    all.extend(entries.iter().copied());
    let tar = raw_tar(&all);
    match cas.ingest_tar(&tar[..], 1 << 30) {
        Err(CasError::UnsafePath { path, reason }) => {
            assert_eq!(path, want_path, "reason: {reason}");
            assert!(reason.contains(reason_has), "{path}: {reason}");
            let msg = CasError::UnsafePath { path, reason }.to_string();
            assert!(msg.contains(want_path));
        }
        Err(e) => panic!("expected UnsafePath for {want_path}, got {e}"),
        Ok(p) => panic!("accepted unsafe archive: {:?}", p.tree),
    }
    assert!(
        blob_files(cas).is_empty(),
        "rejected upload left blobs behind"
    );
    assert_eq!(fs::read_dir(&cas.inner.tmp).unwrap().count(), 0);
}

static BIG: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| data(2 << 20, 7));

#[test]
fn tar_ingest_rejects_unsafe_entries() {
    let (_t, cas) = store();
    let cases: Vec<(Vec<RawEntry<'_>>, &str, &str)> = vec![
        (
            vec![file("../etc/passwd", b"x")],
            "../etc/passwd",
            "contains a '..' component",
        ),
        (vec![file("a/../../x", b"x")], "a/../../x", "'..'"),
        (vec![entry("../", EntryType::Directory)], "../", "'..'"),
        (vec![file("/etc/passwd", b"x")], "/etc/passwd", "absolute"),
        (
            vec![link("evil", EntryType::Symlink, "../outside")],
            "evil",
            "escapes",
        ),
        (
            vec![link("d/evil", EntryType::Symlink, "../../x")],
            "d/evil",
            "escapes",
        ),
        (
            vec![link("abs", EntryType::Symlink, "/etc/passwd")],
            "abs",
            "absolute",
        ),
        (
            vec![
                link("a/s", EntryType::Symlink, ".."),
                link("a/t", EntryType::Symlink, "s/../.."),
            ],
            "a/t",
            "through other symlinks",
        ),
        (
            vec![link("h", EntryType::Link, "missing")],
            "h",
            "not an earlier file",
        ),
        (
            vec![link("h", EntryType::Link, "later"), file("later", b"x")],
            "h",
            "not an earlier file",
        ),
        (
            vec![link("h", EntryType::Link, "../ok.txt")],
            "h",
            "hard link target",
        ),
        (
            vec![entry("dev/null", EntryType::Char)],
            "dev/null",
            "device",
        ),
        (
            vec![entry("dev/sda", EntryType::Block)],
            "dev/sda",
            "device",
        ),
        (vec![entry("pipe", EntryType::Fifo)], "pipe", "fifo"),
        (
            vec![link("s", EntryType::Symlink, "d"), file("s/x", b"x")],
            "s/x",
            "not a directory",
        ),
        (vec![file("ok.txt", b"different")], "ok.txt", "conflicts"),
        (
            vec![entry("ok.txt", EntryType::Directory)],
            "ok.txt",
            "conflicts",
        ),
        (vec![file("./", b"")], "./", "normalizes to an empty path"),
    ];
    for (entries, path, reason) in &cases {
        assert_unsafe(&cas, entries, path, reason);
    }
}

#[test]
fn tar_ingest_limits_and_malformed_input() {
    let (_t, cas) = store();
    let tar = raw_tar(&[file("a", b"small"), file("big", &BIG)]);
    match cas.ingest_tar(&tar[..], 1 << 20) {
        Err(CasError::TooLarge { limit }) => assert_eq!(limit, 1 << 20),
        Err(e) => panic!("expected TooLarge, got {e}"),
        Ok(_) => panic!("accepted an oversized archive"),
    }
    assert!(blob_files(&cas).is_empty());
    // Exactly at the limit is fine.
    assert!(cas.ingest_tar(&tar[..], tar.len() as u64).is_ok());
    assert!(matches!(
        cas.ingest_tar(&tar[..], tar.len() as u64 - 1),
        Err(CasError::TooLarge { .. })
    ));

    let garbage = vec![0x5au8; 4096];
    assert!(matches!(
        cas.ingest_tar(&garbage[..], 1 << 20),
        Err(CasError::BadArchive(_))
    ));
    let truncated = &tar[..tar.len() / 2];
    match cas.ingest_tar(truncated, 1 << 30) {
        Err(CasError::BadArchive(msg)) => assert!(msg.contains("big"), "{msg}"),
        Err(e) => panic!("expected BadArchive, got {e}"),
        Ok(_) => panic!("accepted a truncated archive"),
    }
    assert!(blob_files(&cas).is_empty());
    assert_eq!(fs::read_dir(&cas.inner.tmp).unwrap().count(), 0);

    let empty = cas.ingest_tar(&[][..], 10).unwrap();
    assert!(empty.tree.entries.is_empty());
}

/// A source dir with modes, nesting, an empty dir and symlinks.
fn sample_dir(root: &Path) {
    sample_dir_inner(root);
    symlink("/etc/passwd", root.join("passwd")).unwrap();
}

/// `sample_dir` without the absolute symlink (which uploads refuse).
fn sample_dir_inner(root: &Path) {
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::create_dir_all(root.join("share/doc")).unwrap();
    fs::create_dir_all(root.join("empty")).unwrap();
    fs::create_dir_all(root.join("ro")).unwrap();
    fs::write(root.join("bin/tool"), b"#!/bin/sh\nexit 0\n").unwrap();
    fs::write(root.join("share/doc/README"), b"read me\n").unwrap();
    fs::write(root.join("share/secret"), b"private\n").unwrap();
    fs::write(root.join("ro/file"), data(1 << 20 | 17, 8)).unwrap();
    fs::write(root.join("big.dat"), data(3 << 20, 9)).unwrap();
    symlink("doc/README", root.join("share/readme-link")).unwrap();
    let chmod =
        |p: &str, m: u32| fs::set_permissions(root.join(p), fs::Permissions::from_mode(m)).unwrap();
    chmod("bin/tool", 0o755);
    chmod("share/secret", 0o600);
    chmod("ro/file", 0o444);
    chmod("ro", 0o555);
    chmod("share", 0o750);
}

#[test]
fn checkout_round_trip_keeps_modes_and_symlinks() {
    let (t, cas) = store();
    let src = t.path().join("src");
    sample_dir(&src);
    let tree = cas.ingest_dir(&src, |_| true).unwrap();
    assert_eq!(
        tree.get("passwd").unwrap().kind,
        EntryKind::Symlink {
            target: "/etc/passwd".into()
        }
    );
    assert!(tree.get("empty").is_some());
    let d = cas.put_tree(&tree).unwrap();
    let loaded = cas.get_tree(&d).unwrap();
    assert_eq!(loaded, tree);

    let dest = t.path().join("out/checkout");
    cas.checkout(&loaded, &dest, Some(1_234_567)).unwrap();
    for e in &tree.entries {
        let p = dest.join(&e.path);
        let meta = fs::symlink_metadata(&p).unwrap();
        match &e.kind {
            EntryKind::File { digest, .. } => {
                assert!(meta.is_file());
                assert_eq!(fs::read(&p).unwrap(), cas.get_bytes(digest).unwrap());
                assert_eq!(meta.mode() & 0o7777, e.mode, "{}", e.path);
                assert_eq!(fs::read(&p).unwrap(), fs::read(src.join(&e.path)).unwrap());
            }
            EntryKind::Dir => {
                assert!(meta.is_dir());
                assert_eq!(meta.mode() & 0o7777, e.mode, "{}", e.path);
            }
            EntryKind::Symlink { target } => {
                assert!(meta.file_type().is_symlink(), "{}", e.path);
                assert_eq!(fs::read_link(&p).unwrap(), Path::new(target));
            }
        }
        assert_eq!(meta.mtime(), 1_234_567, "{}", e.path);
    }
    assert_eq!(
        fs::symlink_metadata(dest.join("bin/tool")).unwrap().mode() & 0o777,
        0o755
    );
    // The checkout ingests back to the same tree and digest.
    let again = cas.ingest_dir(&dest, |_| true).unwrap();
    assert_eq!(cas.put_tree(&again).unwrap(), d);

    // Non-empty destination is refused.
    assert!(matches!(
        cas.checkout(&tree, &dest, None),
        Err(CasError::DestNotEmpty(_))
    ));
    let empty_dest = t.path().join("empty-dest");
    fs::create_dir(&empty_dest).unwrap();
    cas.checkout(&tree, &empty_dest, None).unwrap();
}

#[test]
fn tree_digest_is_stable() {
    let (t, cas) = store();
    let src = t.path().join("src");
    sample_dir_inner(&src);
    let a = cas
        .put_tree(&cas.ingest_dir(&src, |_| true).unwrap())
        .unwrap();
    let b = cas
        .put_tree(&cas.ingest_dir(&src, |_| true).unwrap())
        .unwrap();
    assert_eq!(a, b);

    // tar_dir → ingest_tar gives the same tree as ingest_dir, twice.
    let mut tar = Vec::new();
    tar_dir(&src, &mut tar).unwrap();
    let mut tar2 = Vec::new();
    tar_dir(&src, &mut tar2).unwrap();
    assert_eq!(tar, tar2, "tar_dir is deterministic");
    let p1 = cas.ingest_tar(&tar[..], 1 << 30).unwrap();
    assert!(p1.max_mtime > 0);
    let c1 = p1.commit().unwrap();
    let c2 = cas.ingest_tar(&tar[..], 1 << 30).unwrap().commit().unwrap();
    assert_eq!(c1, c2);
    assert_eq!(c1, a);

    // Entry order in a hand-built tree does not matter.
    let mut tree = cas.get_tree(&a).unwrap();
    tree.entries.reverse();
    assert_eq!(cas.put_tree(&tree).unwrap(), a);
}

#[test]
fn ingest_dir_filter_and_special_files() {
    let (t, cas) = store();
    let src = t.path().join("src");
    sample_dir(&src);
    let tree = cas
        .ingest_dir(&src, |p| p.ends_with("README") || p == "empty")
        .unwrap();
    let paths: Vec<&str> = tree.entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["empty", "share", "share/doc", "share/doc/README"]);
    assert_eq!(tree.get("share").unwrap().mode, 0o750);

    nix::unistd::mkfifo(
        &src.join("share/fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    match cas.ingest_dir(&src, |_| true) {
        Err(CasError::UnsupportedFileType { path, kind }) => {
            assert_eq!(path, src.join("share/fifo"));
            assert_eq!(kind, "fifo");
        }
        other => panic!("expected UnsupportedFileType, got {:?}", other.map(|_| ())),
    }
    // Filtered-out special files are ignored.
    assert!(cas.ingest_dir(&src, |p| !p.ends_with("fifo")).is_ok());
}

#[test]
fn hand_crafted_trees_cannot_escape() {
    let (t, cas) = store();
    let fd = cas.put_bytes(b"payload").unwrap();
    let file = |path: &str| TreeEntry {
        path: path.into(),
        mode: 0o644,
        kind: EntryKind::File {
            digest: fd,
            size: 7,
        },
    };
    let dest = t.path().join("dest");

    // A manifest written by hand, bypassing put_tree.
    for bad in ["../evil", "/abs", "a//b", "./x", "a/./b", ""] {
        let json = serde_json::json!({"kiln_tree": 1, "entries": [
            {"path": bad, "mode": 0o644, "kind": {"file": {"digest": fd, "size": 7}}}
        ]});
        let d = cas.put_bytes(json.to_string().as_bytes()).unwrap();
        assert!(
            matches!(cas.get_tree(&d), Err(CasError::UnsafePath { .. })),
            "{bad:?} accepted"
        );
        let tree = Tree {
            entries: vec![file(bad)],
        };
        assert!(cas.put_tree(&tree).is_err());
        assert!(cas.checkout(&tree, &dest, None).is_err());
    }
    // A file below a symlink would be written through it.
    let tree = Tree {
        entries: vec![
            TreeEntry {
                path: "s".into(),
                mode: 0o777,
                kind: EntryKind::Symlink {
                    target: t.path().display().to_string(),
                },
            },
            file("s/x"),
        ],
    };
    assert!(matches!(
        cas.checkout(&tree, &dest, None),
        Err(CasError::InvalidTree(_))
    ));
    assert!(!t.path().join("x").exists());
    // Missing parent dirs are refused by put_tree, added by from_entries.
    let tree = Tree {
        entries: vec![file("a/b")],
    };
    assert!(matches!(cas.put_tree(&tree), Err(CasError::InvalidTree(_))));
    let fixed = Tree::from_entries(tree.entries).unwrap();
    assert_eq!(fixed.entries.len(), 2);
    cas.checkout(&fixed, &dest, None).unwrap();
    assert_eq!(fs::read(dest.join("a/b")).unwrap(), b"payload");
    // Not a manifest at all.
    let junk = cas.put_bytes(b"{\"entries\": []}").unwrap();
    assert!(matches!(cas.get_tree(&junk), Err(CasError::InvalidTree(_))));
}

#[test]
fn readers_hold_back_the_last_chunk() {
    let (_t, cas) = store();
    let content = data(600_000, 13);
    let d = cas.put_bytes(&content).unwrap();
    let path = blob_file(&cas, &d);
    let mut perms = fs::metadata(&path).unwrap().permissions();
    perms.set_mode(0o644);
    fs::set_permissions(&path, perms).unwrap();
    // Valid frame, content differing only in the very last byte.
    let mut other = content.clone();
    *other.last_mut().unwrap() ^= 1;
    fs::write(&path, zstd::encode_all(&other[..], 3).unwrap()).unwrap();
    let mut r = cas.open_blob(&d).unwrap();
    let mut got = Vec::new();
    let err = r.read_to_end(&mut got).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert!(
        got.len() < other.len() && !got.is_empty(),
        "got {}",
        got.len()
    );
    let mut sink = Vec::new();
    assert!(cas.open_raw(&d).unwrap().read_to_end(&mut sink).is_err());
}

#[test]
fn handles_can_cross_threads() {
    fn send<T: Send>() {}
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Cas>();
    send_sync::<Tree>();
    send::<Batch>();
    send::<PendingTree>();
    send::<BlobReader>();
    send::<RawReader>();
}
