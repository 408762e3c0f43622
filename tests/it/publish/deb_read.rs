//! `deb.rs` against real `dpkg-deb`-built packages and against broken input.

use std::process::Command;

use crate::apt::{build_deb, control};
use kiln::publish::deb::{self, DebError};
use sha2::{Digest, Sha256};

fn dpkg_field(deb: &std::path::Path, fields: &[&str]) -> String {
    let o = Command::new("dpkg-deb")
        .arg("-f")
        .arg(deb)
        .args(fields)
        .output()
        .unwrap();
    assert!(o.status.success());
    String::from_utf8(o.stdout).unwrap()
}

/// Multi-line values, an empty-first-line value, odd spacing and relation fields must
/// come back exactly as dpkg-deb prints the whole control file.
const RICH: &str = "Package: hello-kiln\nSource: hello (2.10-3)\nVersion: 1:2.10-3~bpo12+1\n\
Architecture: amd64\nMaintainer: Santiago Vila <sanvila@debian.org>\nInstalled-Size: 280\n\
Depends: libc6 (>= 2.34),\n  libfoo | libbar\nConflicts: hello-traditional\n\
Section: devel\nPriority: optional\nHomepage: https://www.gnu.org/software/hello/\n\
X-Custom-Field:\n first\n second\n\
Description: example package based on GNU hello\n The GNU hello program produces a familiar, friendly greeting.\n .\n   Indented text.\n";

#[test]
fn reads_like_dpkg_deb_for_every_compression() {
    let tmp = tempfile::tempdir().unwrap();
    // xz is dpkg-deb's default; gzip, zstd and none are the other formats apt meets.
    for comp in ["xz", "gzip", "zstd", "none"] {
        let path = build_deb(tmp.path(), &format!("rich-{comp}"), RICH, comp);
        let members = Command::new("ar").arg("t").arg(&path).output().unwrap();
        let members = String::from_utf8(members.stdout).unwrap();
        let expected_member = match comp {
            "xz" => "control.tar.xz",
            "gzip" => "control.tar.gz",
            "zstd" => "control.tar.zst",
            _ => "control.tar\n",
        };
        assert!(members.contains(expected_member), "{comp}: {members}");

        let bytes = std::fs::read(&path).unwrap();
        let c = deb::read_control(&bytes[..]).unwrap();
        // Whole paragraph, byte for byte.
        assert_eq!(c.to_text(), dpkg_field(&path, &[]), "{comp}");
        assert_eq!(c.to_text(), RICH);
        // Single fields as dpkg-deb prints them (it does not reformat these).
        for f in [
            "Package",
            "Version",
            "Architecture",
            "Description",
            "X-Custom-Field",
        ] {
            let want = dpkg_field(&path, &[f]);
            assert_eq!(format!("{}\n", c.get(f).unwrap()), want, "{comp} {f}");
        }
        assert_eq!(c.package(), "hello-kiln");
        assert_eq!(c.version(), "1:2.10-3~bpo12+1");
        assert_eq!(c.architecture(), "amd64");
        assert_eq!(c.source(), "hello");
        let names: Vec<&str> = c.fields().iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names[..3], ["Package", "Source", "Version"]);

        // inspect: same control, plus size and hash of the whole file.
        let info = deb::inspect(std::fs::File::open(&path).unwrap()).unwrap();
        assert_eq!(info.control, c);
        assert_eq!(info.size, bytes.len() as u64);
        assert_eq!(info.sha256, <[u8; 32]>::from(Sha256::digest(&bytes)));
    }
}

#[test]
fn inspect_many_keeps_order_and_reports_each_error() {
    let tmp = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for i in 0..5 {
        let name = format!("pkg{i}");
        paths.push(build_deb(
            tmp.path(),
            &name,
            &control(&name, "1.0", "all"),
            "gzip",
        ));
    }
    let junk = tmp.path().join("junk.deb");
    std::fs::write(&junk, b"not a deb at all").unwrap();
    paths.insert(2, junk);
    let results = deb::inspect_many(&paths, |p| std::fs::File::open(p));
    assert_eq!(results.len(), 6);
    assert!(matches!(results[2], Err(DebError::NotAr)));
    let names: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|i| i.control.package().to_string())
        .collect();
    assert_eq!(names, ["pkg0", "pkg1", "pkg2", "pkg3", "pkg4"]);
}

#[test]
fn truncated_deb_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let path = build_deb(tmp.path(), "trunc", &control("trunc", "1.0", "amd64"), "xz");
    let bytes = std::fs::read(&path).unwrap();
    // Cut in the middle of every region: magic, first header, control member, data.
    for cut in [4, 30, 100, bytes.len() / 2, bytes.len() - 10] {
        let err = deb::inspect(&bytes[..cut]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("truncated") || matches!(err, DebError::Truncated(_)),
            "cut at {cut}: {msg}"
        );
    }
    // read_control stops after control.tar, so only cuts before its end matter.
    let err = deb::read_control(&bytes[..100]).unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");
}

#[test]
fn non_deb_inputs_are_named() {
    assert!(matches!(deb::read_control(&b""[..]), Err(DebError::NotAr)));
    assert!(matches!(
        deb::read_control(&b"PK\x03\x04 a zip file"[..]),
        Err(DebError::NotAr)
    ));
    assert_eq!(
        deb::read_control(&b"hello"[..]).unwrap_err().to_string(),
        "not a .deb: the file does not start with the ar magic \"!<arch>\\n\""
    );

    // A valid ar archive that is not a .deb.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("a.txt"), "x").unwrap();
    let st = Command::new("ar")
        .current_dir(tmp.path())
        .args(["rc", "x.a", "a.txt"])
        .status()
        .unwrap();
    assert!(st.success());
    let bytes = std::fs::read(tmp.path().join("x.a")).unwrap();
    let err = deb::read_control(&bytes[..]).unwrap_err();
    assert!(
        matches!(&err, DebError::NoDebianBinary(n) if n == "a.txt"),
        "{err}"
    );
}

/// Rebuilds a .deb's members with `ar` to make structurally wrong packages.
fn ar_of(dir: &std::path::Path, members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut names = Vec::new();
    for (n, data) in members {
        std::fs::write(dir.join(n), data).unwrap();
        names.push(*n);
    }
    let out = dir.join("out.deb");
    let _ = std::fs::remove_file(&out);
    let st = Command::new("ar")
        .current_dir(dir)
        .arg("rc")
        .arg(&out)
        .args(&names)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::read(out).unwrap()
}

fn control_tar_gz(dir: &std::path::Path, files: &[(&str, &str)]) -> Vec<u8> {
    let cdir = dir.join("ctl");
    let _ = std::fs::remove_dir_all(&cdir);
    std::fs::create_dir_all(&cdir).unwrap();
    let mut names = Vec::new();
    for (n, t) in files {
        std::fs::write(cdir.join(n), t).unwrap();
        names.push(format!("./{n}"));
    }
    let out = dir.join("c.tar.gz");
    let st = Command::new("tar")
        .current_dir(&cdir)
        .arg("czf")
        .arg(&out)
        .args(&names)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::read(out).unwrap()
}

#[test]
fn structural_errors_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let good_ctl = control_tar_gz(d, &[("control", &control("ok", "1.0", "amd64"))]);

    let only_version = ar_of(d, &[("debian-binary", b"2.0\n")]);
    let e = deb::read_control(&only_version[..]).unwrap_err();
    assert!(matches!(e, DebError::NoControlMember(_)), "{e}");

    let bad_format = ar_of(d, &[("debian-binary", b"3.0\n")]);
    let e = deb::read_control(&bad_format[..]).unwrap_err();
    assert!(matches!(e, DebError::UnsupportedFormat(_)), "{e}");

    let bzip = ar_of(
        d,
        &[("debian-binary", b"2.0\n"), ("control.tar.bz2", b"xx")],
    );
    let e = deb::read_control(&bzip[..]).unwrap_err();
    assert!(matches!(e, DebError::UnsupportedCompression(_)), "{e}");

    let no_control = control_tar_gz(d, &[("md5sums", "")]);
    let deb = ar_of(
        d,
        &[("debian-binary", b"2.0\n"), ("control.tar.gz", &no_control)],
    );
    let e = deb::read_control(&deb[..]).unwrap_err();
    assert_eq!(e.to_string(), "control.tar.gz has no ./control file");

    let no_package = control_tar_gz(d, &[("control", "Version: 1\nArchitecture: all\n")]);
    let deb = ar_of(
        d,
        &[("debian-binary", b"2.0\n"), ("control.tar.gz", &no_package)],
    );
    let e = deb::read_control(&deb[..]).unwrap_err();
    assert_eq!(e.to_string(), "control file has no Package field");

    let evil = control_tar_gz(
        d,
        &[(
            "control",
            "Package: ../../etc\nVersion: 1\nArchitecture: all\n",
        )],
    );
    let deb = ar_of(d, &[("debian-binary", b"2.0\n"), ("control.tar.gz", &evil)]);
    let e = deb::read_control(&deb[..]).unwrap_err();
    assert!(
        matches!(e, DebError::InvalidField { ref field, .. } if field == "Package"),
        "{e}"
    );

    let corrupt = ar_of(
        d,
        &[
            ("debian-binary", b"2.0\n"),
            ("control.tar.gz", b"\x1f\x8bnot gzip"),
        ],
    );
    let e = deb::read_control(&corrupt[..]).unwrap_err();
    assert!(
        e.to_string().starts_with("cannot read control.tar.gz"),
        "{e}"
    );

    // Control is fine but there is no data member: read_control is happy, inspect not.
    let no_data = ar_of(
        d,
        &[("debian-binary", b"2.0\n"), ("control.tar.gz", &good_ctl)],
    );
    assert_eq!(deb::read_control(&no_data[..]).unwrap().package(), "ok");
    let e = deb::inspect(&no_data[..]).unwrap_err();
    assert!(matches!(e, DebError::NoDataMember(_)), "{e}");
}

#[test]
fn control_parser_refuses_ambiguous_text() {
    use kiln::publish::Control;
    let base = "Package: a1\nVersion: 1\nArchitecture: all\n";
    assert!(Control::parse(base).is_ok());
    for (bad, why) in [
        (format!("{base}\nPackage: b\n"), "more than one paragraph"),
        (
            format!("{base}Description: x\n \n y\n"),
            "whitespace-only line",
        ),
        (
            format!(" cont\n{base}"),
            "continuation line before any field",
        ),
        (format!("{base}Version: 2\n"), "duplicate field"),
        (format!("{base}no colon here\n"), "expected"),
        (format!("{base}Bad Name: x\n"), "invalid field name"),
    ] {
        let e = Control::parse(&bad).unwrap_err().to_string();
        assert!(e.contains(why), "{bad:?}: {e}");
    }
    for (field, value) in [
        ("Version", "abc"),
        ("Version", "1:"),
        ("Architecture", "amd 64"),
    ] {
        let text = base.replace(
            &format!("{field}: {}", if field == "Version" { "1" } else { "all" }),
            &format!("{field}: {value}"),
        );
        let e = Control::parse(&text).unwrap_err();
        assert!(matches!(e, DebError::InvalidField { .. }), "{text:?}: {e}");
    }
}
