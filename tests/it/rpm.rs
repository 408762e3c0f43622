//! RPM end to end, with real parts: a bookworm buildroot with Debian's
//! `rpm` (rpmbuild) bootstrapped through the hub, a small C program built
//! from a spec (with a %check) into a source RPM and a binary RPM, signed
//! and published as a dnf repository, installed by real `dnf --installroot`
//! with `gpgcheck=1` and `repo_gpgcheck=1`, its signature checked by real
//! `rpmkeys -K`; a second package build-requires the first from the
//! project's repo; a tampered repomd.xml is refused; bad sources fail
//! clearly and publish nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use kiln::model::BuildState;
use kiln::server::TargetRequest;

use crate::apt::{counting_proxy, tampering_proxy, text};
use crate::debian::{bookworm, wait_ready};
use crate::harness::*;

const MIRROR: &str = "http://deb.debian.org";
const PROJECT: &str = "rpm";
const REPO: &str = "el";

pub(crate) const HELLO_C: &str =
    "#include <stdio.h>\nint main(void) { puts(\"hello from kiln\"); return 0; }\n";

/// `kiln-hello`: a C program, checked in %check. Its Summary needs escaping.
pub(crate) const HELLO_SPEC: &str = "Name: kiln-hello
Version: 1.0
Release: 1
Summary: Says hello <from> kiln & friends
License: MIT
Source0: hello.c
BuildRequires: gcc

%description
A small C program kiln's tests build.

%prep
cp %{SOURCE0} .

%build
# Static: the test's installroot has no C library to satisfy libc.so.6.
gcc -O2 -static -o kiln-hello hello.c

%check
./kiln-hello | grep -q 'hello from kiln'
echo kiln-test: check passed

%install
install -D -m755 kiln-hello %{buildroot}/usr/bin/kiln-hello

%files
/usr/bin/kiln-hello

%changelog
* Tue Dec 01 2026 Kiln Tests <t@kiln.invalid> - 1.0-1
- First build.
";

/// `kiln-greeter`: runs kiln-hello at build time, so it can only build
/// with kiln-hello installed from the project's repo.
pub(crate) const GREETER_SPEC: &str = "Name: kiln-greeter
Version: 2.0
Release: 3
Summary: A greeting made by kiln-hello
License: MIT
BuildArch: noarch
BuildRequires: kiln-hello
Requires: kiln-hello

%description
Ships what kiln-hello said when it was built.

%build
kiln-hello > greeting

%install
install -D -m644 greeting %{buildroot}/usr/share/kiln-greeter/greeting

%files
/usr/share/kiln-greeter/greeting
";

pub(crate) fn spec_tree(
    dir: &Path,
    spec_name: &str,
    spec: &str,
    files: &[(&str, &str)],
) -> PathBuf {
    let mut tree = vec![(spec_name, spec, 0o644)];
    tree.extend(files.iter().map(|(p, c)| (*p, *c, 0o644)));
    write_tree(dir, &tree);
    dir.to_owned()
}

/// Real dnf with its own installroot and repo files, nothing of the host's.
struct Dnf {
    root: PathBuf,
    repos: PathBuf,
}

impl Dnf {
    fn new(dir: &Path, repo_file: &str) -> Dnf {
        let (root, repos) = (dir.join("root"), dir.join("repos.d"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&repos).unwrap();
        std::fs::write(repos.join("kiln.repo"), repo_file).unwrap();
        Dnf { root, repos }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("dnf")
            .arg(format!("--installroot={}", self.root.display()))
            .arg(format!("--setopt=reposdir={}", self.repos.display()))
            .args([
                "--releasever=1",
                "--setopt=install_weak_deps=False",
                "--nodocs",
                "-y",
            ])
            .args(args)
            .env("GNUPGHOME", self.root.parent().unwrap().join("gnupg"))
            .output()
            .unwrap()
    }
}

async fn wait_build(h: &TestHub, id: u64) -> (kiln::server::BuildView, String) {
    let v = h.client.wait(id, Duration::from_secs(900)).await.unwrap();
    let log = h.client.log_text(id).await.unwrap();
    (v, log)
}

/// Waits until repo rpm/el serves `name`, published.
pub(crate) async fn wait_published(h: &TestHub, name: &str) -> kiln::server::RepoView {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = h.client.repo(PROJECT, REPO).await.unwrap();
        if r.rpms.iter().any(|p| p.name == name) && r.repo.published_revision == r.repo.revision {
            return r;
        }
        assert!(Instant::now() < deadline, "{name} never published: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn get_bytes(url: &str) -> (u16, Vec<u8>) {
    let r = reqwest::get(url).await.unwrap();
    (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpms_build_publish_signed_and_install_with_real_dnf() {
    let (mirror, _requests) = counting_proxy(MIRROR).await;
    let mut h = hub(1).await;
    let tmp = tempfile::tempdir().unwrap();

    // A Debian base that carries rpmbuild (Debian's rpm package).
    let mut req = bookworm(&mirror);
    req.name = "rpmroot".into();
    req.include = vec!["rpm".into()];
    h.client.create_buildroot(&req).await.unwrap();
    let br = wait_ready(&h, "rpmroot").await;
    assert!(br.path.join("usr/bin/rpmbuild").exists());
    h.client
        .add_target(
            PROJECT,
            &TargetRequest {
                name: "bookworm-x86_64".into(),
                buildroot: "rpmroot".into(),
                arch: "amd64".into(),
                repo: Some(REPO.into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();

    // kiln-hello from a spec and its source: SRPM, then the binary RPM.
    let hello = spec_tree(
        &tmp.path().join("hello"),
        "kiln-hello.spec",
        HELLO_SPEC,
        &[("hello.c", HELLO_C)],
    );
    let b = h
        .client
        .submit_dir(&hello, Some(PROJECT), None)
        .await
        .unwrap();
    let (v, log) = wait_build(&h, b.id).await;
    assert_eq!(v.detail.build.state, BuildState::Succeeded, "{log}");
    assert_eq!(v.detail.build.package, "kiln-hello");
    assert!(log.contains("making the source RPM from the spec"), "{log}");
    assert!(log.contains("kiln-test: check passed"), "{log}");
    let arts = h.client.artifacts(b.id).await.unwrap();
    for name in ["kiln-hello-1.0-1.src.rpm", "kiln-hello-1.0-1.x86_64.rpm"] {
        assert!(
            arts.iter().any(|a| a.path.ends_with(name)),
            "no {name}: {arts:?}"
        );
    }

    // Published: the binary and the source RPM, a .repo file for users.
    let r = wait_published(&h, "kiln-hello").await;
    let mut have: Vec<String> = r
        .rpms
        .iter()
        .map(|p| format!("{}-{}-{}.{}", p.name, p.version, p.release, p.arch))
        .collect();
    have.sort();
    assert_eq!(have, ["kiln-hello-1.0-1.src", "kiln-hello-1.0-1.x86_64"]);
    let repo_file = get_text(&h, &format!("/repos/{PROJECT}/{REPO}.repo")).await;
    assert!(repo_file.contains("gpgcheck=1"), "{repo_file}");
    assert!(repo_file.contains("repo_gpgcheck=1"), "{repo_file}");
    assert!(
        repo_file.contains(&format!("baseurl={}/repos/{PROJECT}/{REPO}/", h.url())),
        "{repo_file}"
    );
    assert_eq!(r.sources.dnf_repo, repo_file);

    // The RPM the repo serves carries the project's signature: real rpmkeys.
    let hello_rpm = r
        .rpms
        .iter()
        .find(|p| p.arch == "x86_64")
        .unwrap()
        .location
        .clone();
    let (status, bytes) =
        get_bytes(&format!("{}/repos/{PROJECT}/{REPO}/{hello_rpm}", h.url())).await;
    assert_eq!(status, 200);
    let rpm_file = tmp.path().join("kiln-hello.rpm");
    std::fs::write(&rpm_file, &bytes).unwrap();
    let keydb = tmp.path().join("rpmkeys");
    let k = |args: &[&str]| {
        Command::new("rpmkeys")
            .arg("--dbpath")
            .arg(&keydb)
            .args(args)
            .output()
            .unwrap()
    };
    // Without the key imported, the signature cannot be checked.
    let o = k(&["-K", rpm_file.to_str().unwrap()]);
    assert!(!o.status.success(), "{}", text(&o));
    let key = get_text(&h, &format!("/repos/{PROJECT}/key.asc")).await;
    std::fs::write(tmp.path().join("key.asc"), &key).unwrap();
    let o = k(&["--import", tmp.path().join("key.asc").to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let o = k(&["-K", rpm_file.to_str().unwrap()]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("signatures OK"), "{out}");
    // The build's own artifact is the unsigned file; the repo's is signed.
    let built = arts
        .iter()
        .find(|a| a.path.ends_with("kiln-hello-1.0-1.x86_64.rpm"))
        .unwrap();
    let published = r.rpms.iter().find(|p| p.arch == "x86_64").unwrap();
    assert_ne!(built.digest, published.digest);

    // Real dnf, gpgcheck=1 and repo_gpgcheck=1, installs it.
    let dnf = Dnf::new(&tmp.path().join("dnf1"), &repo_file);
    let o = dnf.run(&["install", "kiln-hello"]);
    assert!(o.status.success(), "{}", text(&o));
    let installed = dnf.root.join("usr/bin/kiln-hello");
    let o = Command::new(&installed).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hello from kiln\n");

    // kiln-greeter build-requires kiln-hello, which only the project's repo has.
    let greeter = spec_tree(
        &tmp.path().join("greeter"),
        "kiln-greeter.spec",
        GREETER_SPEC,
        &[],
    );
    let b = h
        .client
        .submit_dir(&greeter, Some(PROJECT), None)
        .await
        .unwrap();
    let (v, log) = wait_build(&h, b.id).await;
    assert_eq!(v.detail.build.state, BuildState::Succeeded, "{log}");
    assert!(
        log.contains(&format!(
            "BuildRequires: kiln-hello-1.0-1.x86_64 from repo {PROJECT}/{REPO}"
        )),
        "{log}"
    );
    wait_published(&h, "kiln-greeter").await;
    // (--refresh: the metadata dnf cached a moment ago has not expired.)
    let o = dnf.run(&["--refresh", "install", "kiln-greeter"]);
    assert!(o.status.success(), "{}", text(&o));
    let greeting =
        std::fs::read_to_string(dnf.root.join("usr/share/kiln-greeter/greeting")).unwrap();
    assert_eq!(greeting, "hello from kiln\n");

    // A source RPM uploaded as it is builds too (here, the repo's own).
    let srpm_file = tmp.path().join("up/kiln-greeter-2.0-3.src.rpm");
    std::fs::create_dir_all(srpm_file.parent().unwrap()).unwrap();
    let r = h.client.repo(PROJECT, REPO).await.unwrap();
    let src = r
        .rpms
        .iter()
        .find(|p| p.name == "kiln-greeter" && p.arch == "src")
        .unwrap();
    let (_, bytes) = get_bytes(&format!(
        "{}/repos/{PROJECT}/{REPO}/{}",
        h.url(),
        src.location
    ))
    .await;
    std::fs::write(&srpm_file, &bytes).unwrap();
    let b = h
        .client
        .submit_dir(&srpm_file, Some(PROJECT), None)
        .await
        .unwrap();
    let (v, log) = wait_build(&h, b.id).await;
    assert_eq!(v.detail.build.state, BuildState::Succeeded, "{log}");
    assert_eq!(v.detail.build.package, "kiln-greeter");
    assert!(log.contains("building the uploaded source RPM"), "{log}");
    wait_published(&h, "kiln-greeter").await;

    // A tampered repomd.xml (signature kept) makes dnf refuse the repo.
    let proxy = tampering_proxy(h.url(), "repomd.xml", None).await;
    let tampered = repo_file.replace(&h.url(), &proxy);
    let dnf2 = Dnf::new(&tmp.path().join("dnf2"), &tampered);
    let o = dnf2.run(&["install", "kiln-hello"]);
    let out = text(&o);
    assert!(!o.status.success(), "tampered repomd.xml accepted:\n{out}");
    assert!(!dnf2.root.join("usr/bin/kiln-hello").exists(), "{out}");
    // The same client through an honest path installs (the refusal was the tampering).
    let dnf3 = Dnf::new(&tmp.path().join("dnf3"), &repo_file);
    let o = dnf3.run(&["install", "kiln-hello"]);
    assert!(o.status.success(), "{}", text(&o));

    rpm_bootstrap_installs_from_a_signed_repo(&h).await;
    bad_rpm_sources_fail_clearly_and_publish_nothing(&h, tmp.path()).await;
    h.stop().await;
}

/// `--bootstrap rpm`: `dnf --installroot` from an RPM repository (the only
/// one these machines reach is kiln's own, so it bootstraps from that):
/// with the repo's key the packages install; with another key dnf refuses.
async fn rpm_bootstrap_installs_from_a_signed_repo(h: &TestHub) {
    use kiln::model::BuildrootState;
    let create = |name: &str, key_project: &str| kiln::buildroot::CreateRequest {
        name: name.into(),
        bootstrap: "rpm".into(),
        release: Some("1".into()),
        repos: vec![format!("{}/repos/{PROJECT}/{REPO}/", h.url())],
        include: vec!["kiln-greeter".into()],
        gpgkey: Some(format!("{}/repos/{key_project}/key.asc", h.url())),
        ..Default::default()
    };
    h.client
        .create_buildroot(&create("fromkiln", PROJECT))
        .await
        .unwrap();
    let b = crate::buildroots::wait_done(h, "fromkiln").await;
    let log = h.client.buildroot_log("fromkiln").await.unwrap();
    assert_eq!(b.buildroot.state, BuildrootState::Ready, "{log}");
    // kiln-greeter and what it requires, kiln-hello, both from the repo.
    assert_eq!(
        std::fs::read_to_string(b.path.join("usr/share/kiln-greeter/greeting")).unwrap(),
        "hello from kiln\n"
    );
    assert!(b.path.join("usr/bin/kiln-hello").exists(), "{log}");

    // Another project's key: the same packages are refused.
    h.client
        .add_target(
            "stranger",
            &TargetRequest {
                name: "t".into(),
                buildroot: "rpmroot".into(),
                arch: "amd64".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    h.client
        .create_buildroot(&create("wrongkey", "stranger"))
        .await
        .unwrap();
    let b = crate::buildroots::wait_done(h, "wrongkey").await;
    let log = h.client.buildroot_log("wrongkey").await.unwrap();
    assert!(
        matches!(b.buildroot.state, BuildrootState::Failed(_)),
        "{log}"
    );
    let left: Vec<_> = std::fs::read_dir(h.data().join("buildroots"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("wrongkey") && !n.ends_with(".log"))
        .collect();
    assert!(left.is_empty(), "a failed bootstrap left {left:?}");

    // A bootstrap without repos is refused before anything runs.
    let mut bad = create("norepo", PROJECT);
    bad.repos.clear();
    let err = h
        .client
        .create_buildroot(&bad)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("--repo"), "{err}");
}

/// Bad input on the same hub (its buildroot is made once): each is a clear
/// error, and the repo stays as it was.
async fn bad_rpm_sources_fail_clearly_and_publish_nothing(h: &TestHub, tmp: &Path) {
    let before = h.client.repo(PROJECT, REPO).await.unwrap();
    let listed = |r: &kiln::server::RepoView| {
        let mut v: Vec<_> = r
            .rpms
            .iter()
            .map(|p| (p.location.clone(), p.digest))
            .collect();
        v.sort();
        v
    };

    // A spec that does not parse, a missing Source, an arch the target lacks:
    // the build fails with rpmbuild's own words in the log.
    // (dir, spec, files beside it, what the log must say)
    type Case<'a> = (&'a str, String, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 3] = [
        (
            "broken",
            "Name: kiln-broken\nVersion: 1\nRelease: 1\nSummary: x\nLicense: MIT\nBogusTag: 1\n%description\nx\n%files\n"
                .to_string(),
            &[],
            "BogusTag",
        ),
        (
            "nosource",
            HELLO_SPEC.replace("kiln-hello", "kiln-nosource").replace(
                "Source0: hello.c",
                "Source0: hello.c\nSource1: missing-1.0.tar.gz",
            ),
            &[("hello.c", HELLO_C)],
            "missing-1.0.tar.gz",
        ),
        (
            "s390only",
            HELLO_SPEC
                .replace("kiln-hello", "kiln-s390only")
                .replace("BuildRequires: gcc", "BuildRequires: gcc\nExclusiveArch: s390x"),
            &[("hello.c", HELLO_C)],
            "Architecture is not included: x86_64",
        ),
    ];
    for (dir, spec, files, expect) in cases {
        let src = spec_tree(&tmp.join(dir), &format!("{dir}.spec"), &spec, files);
        let b = h
            .client
            .submit_dir(&src, Some(PROJECT), None)
            .await
            .unwrap();
        let (v, log) = wait_build(h, b.id).await;
        assert_eq!(v.detail.build.state, BuildState::Failed, "{dir}: {log}");
        assert!(log.contains(expect), "{dir}: want {expect:?} in\n{log}");
    }

    // A .src.rpm whose header is corrupt: refused at submission, nothing queued.
    let good = before
        .rpms
        .iter()
        .find(|p| p.arch == "src")
        .unwrap()
        .location
        .clone();
    let (_, mut bytes) = get_bytes(&format!("{}/repos/{PROJECT}/{REPO}/{good}", h.url())).await;
    // Inside the main header's index (past the 96-byte lead and the
    // signature header's intro): the tag table no longer adds up.
    for b in &mut bytes[96 + 16..96 + 64] {
        *b = 0xff;
    }
    let corrupt = tmp.join("corrupt/kiln-corrupt-1-1.src.rpm");
    std::fs::create_dir_all(corrupt.parent().unwrap()).unwrap();
    std::fs::write(&corrupt, &bytes).unwrap();
    let builds_before = h.client.list_builds(None, 1000).await.unwrap().len();
    let err = h
        .client
        .submit_dir(&corrupt, Some(PROJECT), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("400"), "{err}");
    assert!(
        err.contains("kiln-corrupt-1-1.src.rpm: not a usable source RPM"),
        "{err}"
    );
    assert_eq!(
        h.client.list_builds(None, 1000).await.unwrap().len(),
        builds_before
    );

    // A target whose arch RPM has no name for: refused at submission.
    h.client
        .add_target(
            PROJECT,
            &TargetRequest {
                name: "odd".into(),
                buildroot: "rpmroot".into(),
                arch: "mips64el".into(),
                repo: Some("odd".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let hello = tmp.join("hello");
    let err = h
        .client
        .submit_dir_to(&hello, Some(PROJECT), None, &["odd"])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("mips64el") && err.contains("RPM has no name for"),
        "{err}"
    );

    // Nothing of the failures reached the repo.
    let after = h.client.repo(PROJECT, REPO).await.unwrap();
    assert_eq!(listed(&after), listed(&before));
    assert_eq!(after.repo.revision, before.repo.revision);
}
