//! Published repositories checked by the real clients: `gpgv` on `InRelease` and
//! `Release.gpg`, and `apt-get update` / `apt-get download` over loopback HTTP.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::apt::{Apt, Server, build_deb, control, dearmored_public, text, write_repo};
use kiln::publish::{IndexCache, PoolEntry, RepoFile, RepoKey, Stanza, SuiteConfig, apt, deb};
use time::OffsetDateTime;

fn cfg() -> SuiteConfig {
    SuiteConfig {
        origin: "kiln".into(),
        label: "kiln test project".into(),
        suite: "stable".into(),
        codename: "stable".into(),
        component: "main".into(),
        architectures: vec!["amd64".into()],
        description: Some("kiln test repository".into()),
    }
}

/// A repo on disk plus the pieces tests poke at.
struct Repo {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    key: RepoKey,
    key_asc: PathBuf,
    files: Vec<RepoFile>,
}

/// Inspects `debs`, copies them into the pool and publishes a signed suite.
fn make_repo(debs: &[PathBuf]) -> Repo {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("repo");
    let key = RepoKey::generate("kiln test <kiln@localhost>").unwrap();
    let mut stanzas = Vec::new();
    for (d, info) in debs
        .iter()
        .zip(deb::inspect_many(debs, |p| std::fs::File::open(p)))
    {
        let info = info.unwrap();
        let filename = apt::pool_filename("main", &info.control).unwrap();
        let dest = root.join(&filename);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(d, &dest).unwrap();
        stanzas.push(
            Stanza::new(&PoolEntry {
                control: info.control,
                filename,
                size: info.size,
                sha256: info.sha256,
            })
            .unwrap(),
        );
    }
    let files = kiln::publish::publish(
        &cfg(),
        &stanzas,
        OffsetDateTime::now_utc(),
        &key,
        &mut IndexCache::new(),
    )
    .unwrap();
    write_repo(&root, &files);
    let key_asc = tmp.path().join("key.asc");
    std::fs::write(&key_asc, key.public_key_armored().unwrap()).unwrap();
    Repo {
        _tmp: tmp,
        root,
        key,
        key_asc,
        files,
    }
}

fn debs(dir: &Path) -> Vec<PathBuf> {
    vec![
        build_deb(
            dir,
            "hello-kiln",
            &control("hello-kiln", "2.10-3", "amd64"),
            "xz",
        ),
        build_deb(
            dir,
            "hello-kiln2",
            &control("hello-kiln", "2.10-4", "amd64"),
            "zstd",
        ),
        build_deb(
            dir,
            "libkiln1",
            &control("libkiln1", "1:0.1~rc1", "all"),
            "gzip",
        ),
    ]
}

fn apt_for(repo: &Repo, server: &Server, extra: &str) -> (tempfile::TempDir, Apt) {
    let tmp = tempfile::tempdir().unwrap();
    let source = format!(
        "deb [signed-by={}] {} stable main",
        repo.key_asc.display(),
        server.url()
    );
    let apt = Apt::new(tmp.path(), &source, extra);
    (tmp, apt)
}

fn gpgv(keyring: &Path, args: &[&Path]) -> std::process::Output {
    Command::new("gpgv")
        .arg("--keyring")
        .arg(keyring)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn gpgv_accepts_inrelease_and_release_gpg() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = make_repo(&debs(tmp.path()));
    let keyring = tmp.path().join("key.gpg");
    dearmored_public(&repo.key, &keyring);
    let dists = repo.root.join("dists/stable");

    let o = gpgv(&keyring, &[&dists.join("InRelease")]);
    assert!(o.status.success(), "{}", text(&o));
    let o = gpgv(
        &keyring,
        &[&dists.join("Release.gpg"), &dists.join("Release")],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("Good signature"));

    // The key round-trips through its stored form and still signs verifiably.
    let again = RepoKey::from_armored_secret(&repo.key.to_armored_secret().unwrap()).unwrap();
    assert_eq!(again.fingerprint(), repo.key.fingerprint());
    let p = tmp.path().join("again.txt");
    std::fs::write(&p, again.clearsign("hello\n- dashed\n").unwrap()).unwrap();
    let o = gpgv(&keyring, &[&p]);
    assert!(o.status.success(), "{}", text(&o));

    // A different key's signature is refused.
    let other = RepoKey::generate("other <o@localhost>").unwrap();
    std::fs::write(&p, other.clearsign("hello\n").unwrap()).unwrap();
    let o = gpgv(&keyring, &[&p]);
    assert!(!o.status.success(), "{}", text(&o));
}

#[test]
fn apt_updates_and_downloads_over_http_by_hash() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = make_repo(&debs(tmp.path()));
    let server = Server::start(repo.root.clone());
    let (_t, apt) = apt_for(&repo, &server, "");

    let o = apt.run("apt-get", &["update"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    assert!(!out.contains("W:") && !out.contains("E:"), "{out}");

    // apt took the signed InRelease and then only by-hash objects.
    let reqs = server.requests();
    assert!(
        reqs.iter().any(|r| r == "/dists/stable/InRelease"),
        "{reqs:?}"
    );
    let packages: Vec<&String> = reqs.iter().filter(|r| r.contains("binary-amd64")).collect();
    assert!(!packages.is_empty(), "{reqs:?}");
    assert!(
        packages.iter().all(|r| r.contains("/by-hash/SHA256/")),
        "{reqs:?}"
    );

    // Newest version wins; arch "all" packages show up for amd64.
    let o = apt.run("apt-cache", &["policy", "hello-kiln", "libkiln1"]);
    let out = text(&o);
    assert!(out.contains("Candidate: 2.10-4"), "{out}");
    assert!(out.contains("Candidate: 1:0.1~rc1"), "{out}");
    let o = apt.run("apt-cache", &["show", "hello-kiln=2.10-3"]);
    let out = text(&o);
    assert!(
        out.contains("Description: test package hello-kiln"),
        "{out}"
    );

    let o = apt.run("apt-get", &["download", "hello-kiln", "libkiln1"]);
    assert!(o.status.success(), "{}", text(&o));
    let got = std::fs::read(apt.dir.join("hello-kiln_2.10-4_amd64.deb")).unwrap();
    let want = std::fs::read(tmp.path().join("hello-kiln2.deb")).unwrap();
    assert_eq!(got, want);
    assert!(apt.dir.join("libkiln1_1%3a0.1~rc1_all.deb").exists());

    // Also through --download-only install with dependency resolution.
    let o = apt.run(
        "apt-get",
        &["install", "--download-only", "-y", "hello-kiln=2.10-3"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        apt.dir
            .join("cache/archives/hello-kiln_2.10-3_amd64.deb")
            .exists()
    );
}

/// Each compressed form is a concatenation of per-chunk streams: make apt decompress
/// each one (and the uncompressed file) and check it against the Release sizes.
#[test]
fn apt_accepts_every_index_compression() {
    let tmp = tempfile::tempdir().unwrap();
    // Enough packages for several chunks, i.e. several concatenated gz/xz streams.
    let mut list = Vec::new();
    let root_ctl = tmp.path().join("many");
    std::fs::create_dir_all(&root_ctl).unwrap();
    for i in 0..300 {
        let name = format!("many{i:03}");
        list.push(build_deb(
            &root_ctl,
            &name,
            &control(&name, "1.0", "amd64"),
            "gzip",
        ));
    }
    let repo = make_repo(&list);
    let xz = repo
        .files
        .iter()
        .find(|f| f.path.ends_with("Packages.xz"))
        .unwrap();
    // One stream with several blocks, as `xz` itself reports.
    let p = tmp.path().join("Packages.xz");
    std::fs::write(&p, &xz.data).unwrap();
    let o = Command::new("xz")
        .args(["--robot", "--list"])
        .arg(&p)
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&o.stdout).to_string();
    let file_line: Vec<&str> = list
        .lines()
        .find(|l| l.starts_with("file\t"))
        .unwrap()
        .split('\t')
        .collect();
    assert_eq!(file_line[1], "1", "streams: {list}");
    assert!(file_line[2].parse::<u32>().unwrap() > 2, "blocks: {list}");

    let server = Server::start(repo.root.clone());
    for comp in ["xz", "gz", "uncompressed"] {
        let extra = format!("Acquire::CompressionTypes::Order {{ \"{comp}\"; }};");
        let extra = if comp == "uncompressed" {
            // apt cannot be told to prefer "uncompressed" by order alone: disable the others.
            "Acquire::CompressionTypes::xz \"false\"; Acquire::CompressionTypes::gz \"false\"; \
             Acquire::CompressionTypes::lz4 \"false\"; Acquire::CompressionTypes::zst \"false\"; \
             Acquire::CompressionTypes::bz2 \"false\"; Acquire::CompressionTypes::lzma \"false\";"
                .to_string()
        } else {
            extra
        };
        let (_t, apt) = apt_for(&repo, &server, &extra);
        let before = server.requests().len();
        let o = apt.run("apt-get", &["update"]);
        assert!(o.status.success(), "{comp}: {}", text(&o));
        assert!(!text(&o).contains("W:"), "{comp}: {}", text(&o));
        let fetched: Vec<String> = server.requests()[before..]
            .iter()
            .filter(|r| r.contains("by-hash"))
            .cloned()
            .collect();
        let want = repo
            .files
            .iter()
            .find(|f| {
                f.path.ends_with(match comp {
                    "xz" => "binary-amd64/Packages.xz",
                    "gz" => "binary-amd64/Packages.gz",
                    _ => "binary-amd64/Packages",
                })
            })
            .unwrap();
        assert_eq!(
            fetched,
            vec![format!(
                "/dists/stable/main/binary-amd64/by-hash/SHA256/{}",
                hex::encode(want.sha256)
            )],
            "{comp}"
        );
        let o = apt.run("apt-cache", &["policy", "many299"]);
        assert!(text(&o).contains("Candidate: 1.0"), "{comp}: {}", text(&o));
    }
}

#[test]
fn tampered_packages_is_a_hash_mismatch() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = make_repo(&debs(tmp.path()));
    // Flip one byte in every copy of Packages.xz (plain and by-hash).
    let xz = repo
        .files
        .iter()
        .find(|f| f.path.ends_with("binary-amd64/Packages.xz"))
        .unwrap();
    for f in repo.files.iter().filter(|f| f.sha256 == xz.sha256) {
        let p = repo.root.join(&f.path);
        let mut b = std::fs::read(&p).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 0x01;
        std::fs::write(&p, b).unwrap();
    }
    let server = Server::start(repo.root.clone());
    let (_t, apt) = apt_for(&repo, &server, "");
    let o = apt.run("apt-get", &["update"]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(100), "{out}");
    assert!(out.contains("Hash Sum mismatch"), "{out}");
}

#[test]
fn tampered_pool_file_fails_download() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = make_repo(&debs(tmp.path()));
    let deb = repo
        .root
        .join("pool/main/h/hello-kiln/hello-kiln_2.10-4_amd64.deb");
    let mut b = std::fs::read(&deb).unwrap();
    let last = b.len() - 1;
    b[last] ^= 0x01;
    std::fs::write(&deb, b).unwrap();
    let server = Server::start(repo.root.clone());
    let (_t, apt) = apt_for(&repo, &server, "");
    assert!(apt.run("apt-get", &["update"]).status.success());
    let o = apt.run("apt-get", &["download", "hello-kiln"]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(100), "{out}");
    assert!(out.contains("Hash Sum mismatch"), "{out}");
}

#[test]
fn tampered_release_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = make_repo(&debs(tmp.path()));
    let dists = repo.root.join("dists/stable");
    // Change one byte of the signed text in both signed forms.
    for name in ["InRelease", "Release"] {
        let p = dists.join(name);
        let t = std::fs::read_to_string(&p).unwrap();
        assert!(t.contains("Label: kiln test project"));
        std::fs::write(
            &p,
            t.replace("Label: kiln test project", "Label: kiln test projecT"),
        )
        .unwrap();
    }
    let server = Server::start(repo.root.clone());
    let (_t, apt) = apt_for(&repo, &server, "");
    let o = apt.run("apt-get", &["update"]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(100), "{out}");
    assert!(out.contains("BADSIG"), "{out}");
    assert!(out.contains("is not signed"), "{out}");
    // Nothing from the repository was accepted.
    let o = apt.run("apt-cache", &["policy", "hello-kiln"]);
    assert!(!text(&o).contains("Candidate: 2.10"), "{}", text(&o));
}

#[test]
fn unsigned_or_wrongly_keyed_repo_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = make_repo(&debs(tmp.path()));
    // Signed with a key the client does not trust.
    let other = RepoKey::generate("other <o@localhost>").unwrap();
    std::fs::write(&repo.key_asc, other.public_key_armored().unwrap()).unwrap();
    let server = Server::start(repo.root.clone());
    let (_t, apt) = apt_for(&repo, &server, "");
    let o = apt.run("apt-get", &["update"]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(100), "{out}");
    assert!(out.contains("NO_PUBKEY"), "{out}");
}

#[test]
fn empty_repo_is_accepted() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = make_repo(&[]);
    let keyring = tmp.path().join("key.gpg");
    dearmored_public(&repo.key, &keyring);
    let o = gpgv(&keyring, &[&repo.root.join("dists/stable/InRelease")]);
    assert!(o.status.success(), "{}", text(&o));
    let server = Server::start(repo.root.clone());
    for extra in ["", "Acquire::CompressionTypes::Order { \"gz\"; };"] {
        let (_t, apt) = apt_for(&repo, &server, extra);
        let o = apt.run("apt-get", &["update"]);
        let out = text(&o);
        assert!(o.status.success(), "{out}");
        assert!(!out.contains("W:") && !out.contains("E:"), "{out}");
    }
}
