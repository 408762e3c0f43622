//! Package kinds: what a source tree declares in `kiln.toml` (or, for a
//! Debian source tree without one, its `debian/control`) and how a task of
//! that kind is run: `script` and `deb` (docs/kiln-toml.md).

use globset::{GlobSet, GlobSetBuilder};
use serde::Deserialize;

use crate::cas::{EntryKind, Tree, TreeEntry};
use crate::model::PackageKind;

/// The recipe file at the top of every source tree.
pub const RECIPE_FILE: &str = "kiln.toml";
/// What makes a tree without kiln.toml a `deb` source.
pub const DEB_CONTROL: &str = "debian/control";

/// Both phases of a `deb` task begin here: the project's repo (a flat
/// index the hub wrote from its own records, when the repo has packages for
/// this arch) becomes an apt source, read offline; then `$src` names what
/// `apt-get build-dep` reads: the tree (`./`) or the uploaded `.dsc`.
macro_rules! deb_prelude {
    () => {
        "if [ -e /var/lib/kiln-project/Packages ]; then
  echo 'deb [trusted=yes] file:/var/lib/kiln-project ./' > /etc/apt/sources.list.d/kiln-project.list
  apt-get update -qq -o Debug::NoLocking=1 -o Dir::Etc::SourceList=/etc/apt/sources.list.d/kiln-project.list \
    -o Dir::Etc::SourceParts=/nonexistent -o APT::Get::List-Cleanup=0
fi
src=./
[ -e debian/control ] || for f in ./*.dsc; do src=$f; done
"
    };
}

/// Phase 1 of a `deb` task, offline in the buildroot: the .debs its
/// Build-Depends need, as apt's `'URI' file size SHA256:hex` lines.
pub const DEB_RESOLVE_SCRIPT: &str = concat!(
    deb_prelude!(),
    "apt-get build-dep --print-uris -qq -o Debug::NoLocking=1 -o Acquire::ForceHash=SHA256 \"$src\" > /out/.kiln-deps"
);
/// Where phase 2 finds the fetched .debs (read-only).
pub const DEB_CACHE_DIR: &str = "/var/cache/kiln-debs";
/// Phase 2, offline: install Build-Depends from the fetched .debs, unpack a
/// .dsc, build the binary packages, keep them with their .buildinfo and
/// .changes.
pub const DEB_BUILD_SCRIPT: &str = concat!(
    deb_prelude!(),
    "apt-get build-dep -y -q --no-download -o Debug::NoLocking=1 \
  -o Dir::Cache::Archives=/var/cache/kiln-debs/ \"$src\"
if [ \"$src\" != ./ ]; then dpkg-source -x \"$src\" .kiln-src; cd .kiln-src; fi
dpkg-buildpackage -b -us -uc
cp ../*.deb ../*.buildinfo ../*.changes \"$KILN_OUT\"/
for f in ../*.udeb ../*.ddeb; do [ ! -e \"$f\" ] || cp \"$f\" \"$KILN_OUT\"/; done"
);

/// Where phase 2 of an `rpm` task finds the source RPM phase 1 made
/// (read-only), and the project's RPMs its BuildRequires need.
pub const RPM_SRPM_DIR: &str = "/var/cache/kiln-srpm";
pub const RPM_DEPS_DIR: &str = "/var/cache/kiln-rpms";

/// Phase 1 of an `rpm` task from a spec, offline: the source RPM, from the
/// one `.spec` at the top of the tree and its Source/Patch files beside it.
/// (rpmbuild parses the spec here: a spec that does not parse or a missing
/// Source file fails this step with rpmbuild's own message.)
pub const RPM_SRPM_SCRIPT: &str = "for f in ./*.spec; do spec=$f; done
rpmbuild -bs --nodeps --define \"_topdir /tmp/kiln-rpmbuild\" --define \"_sourcedir $PWD\" \
  --define \"_srcrpmdir $KILN_OUT\" \"$spec\"";

/// Phase 2, offline: install the project's packages the BuildRequires
/// name, then rebuild the source RPM for the target's arch (%prep, %build,
/// %check, %install) and keep the binary RPMs and the source RPM. A root
/// whose rpmdb is empty (a Debian base with Debian's rpm) cannot answer for
/// the BuildRequires its base provides, so there rpm checks no dependencies.
pub const RPM_BUILD_SCRIPT: &str = "srpm=
for f in /var/cache/kiln-srpm/*.src.rpm ./*.src.rpm; do [ ! -e \"$f\" ] || srpm=$f; done
nodeps=
if [ -z \"$(rpm -qa 2>/dev/null | head -n 1)\" ]; then
  nodeps=--nodeps
  echo \"kiln: this buildroot's rpmdb is empty (a Debian base): BuildRequires that the project's repo does not provide come from the base, unchecked\"
fi
set -- /var/cache/kiln-rpms/*.rpm
if [ -e \"$1\" ]; then
  echo \"kiln: installing $# package(s) from the project's repo for BuildRequires\"
  rpm -Uvh --nosignature $nodeps \"$@\"
fi
rpmbuild --rebuild $nodeps --define \"_topdir /tmp/kiln-rpmbuild\" --target \"$KILN_RPM_ARCH\" \"$srpm\"
cp /tmp/kiln-rpmbuild/RPMS/*/*.rpm \"$srpm\" \"$KILN_OUT\"/";

/// The RPM architecture of a target's (Debian-named) architecture.
pub fn rpm_arch(debian_arch: &str) -> Option<&'static str> {
    Some(match debian_arch {
        "amd64" | "x86_64" => "x86_64",
        "arm64" | "aarch64" => "aarch64",
        "i386" | "i686" => "i686",
        "ppc64el" | "ppc64le" => "ppc64le",
        "s390x" => "s390x",
        "armhf" => "armv7hl",
        "riscv64" => "riscv64",
        "all" | "noarch" => "noarch",
        _ => return None,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("no kiln.toml, debian/control, .spec, .src.rpm or .dsc at the top of the source tree")]
    Missing,
    #[error("{0}")]
    Dsc(String),
    #[error("kiln.toml is not UTF-8")]
    NotUtf8,
    #[error("kiln.toml {0}")]
    Invalid(String),
    #[error("reading the source tree: {0}")]
    Read(String),
    #[error("debian/control: {0}")]
    Control(String),
    #[error("{0}")]
    Rpm(String),
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    #[serde(default)]
    pub package: PackageSection,
    pub build: BuildSection,
    #[serde(default)]
    pub outputs: OutputsSection,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PackageSection {
    /// Package name; defaults to the name the submitter gives (the CLI uses
    /// the directory's name).
    pub name: Option<String>,
    /// `script` (default).
    pub kind: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BuildSection {
    /// Run as `/bin/sh -e -c SCRIPT` in /build.
    pub script: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutputsSection {
    /// Globs relative to $KILN_OUT naming the files kept as artifacts.
    /// `*` stays within one directory, `**` crosses directories.
    pub files: Vec<String>,
}

impl Default for OutputsSection {
    fn default() -> Self {
        OutputsSection {
            files: vec!["**".to_string()],
        }
    }
}

/// Turns a toml error into "line N: message" naming the field, from the
/// span toml reports.
pub fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim().to_string();
    let Some(span) = e.span() else {
        return msg;
    };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    // Name the field: the key on that line, qualified by its table header.
    let line = text.lines().nth(line_no - 1).unwrap_or("");
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"').to_string())
        .filter(|k| !k.is_empty() && !k.starts_with('['));
    let table = text
        .lines()
        .take(line_no)
        .filter_map(|l| {
            let l = l.trim();
            (l.starts_with('[') && l.ends_with(']')).then(|| l.trim_matches(['[', ']']).trim())
        })
        .last();
    match (table, key) {
        (Some(t), Some(k)) => format!("line {line_no}: {t}.{k}: {msg}"),
        (None, Some(k)) => format!("line {line_no}: {k}: {msg}"),
        _ => format!("line {line_no}: {msg}"),
    }
}

impl Recipe {
    pub fn parse(bytes: &[u8]) -> Result<Recipe, RecipeError> {
        let text = std::str::from_utf8(bytes).map_err(|_| RecipeError::NotUtf8)?;
        let r: Recipe = toml::from_str(text)
            .map_err(|e| RecipeError::Invalid(describe_toml_error(text, &e)))?;
        // "line N: " of the key `key`, for errors toml itself cannot see.
        let at = |key: &str| {
            text.lines()
                .position(|l| {
                    l.trim_start()
                        .strip_prefix(key)
                        .is_some_and(|rest| rest.trim_start().starts_with('='))
                })
                .map(|i| format!("line {}: ", i + 1))
                .unwrap_or_default()
        };
        if r.build.script.trim().is_empty() {
            return Err(RecipeError::Invalid(format!(
                "{}build.script is empty",
                at("script")
            )));
        }
        if let Some(k) = &r.package.kind
            && k != "script"
        {
            return Err(RecipeError::Invalid(format!(
                "{}package.kind {k:?} is not supported in kiln.toml (supported: \"script\"; a Debian source tree without kiln.toml builds as \"deb\")",
                at("kind")
            )));
        }
        if let Some(n) = &r.package.name {
            validate_name(n)
                .map_err(|m| RecipeError::Invalid(format!("{}package.name {m}", at("name"))))?;
        }
        r.output_globs()?;
        Ok(r)
    }

    /// The recipe of a Debian source tree without kiln.toml: its package
    /// is the `Source:` of debian/control.
    pub fn deb(control: &[u8]) -> Result<Recipe, RecipeError> {
        let bad = RecipeError::Control;
        let fields = first_paragraph(control).map_err(bad)?;
        let source = field(&fields, "Source")
            .ok_or_else(|| bad("no Source: field in its first paragraph".into()))?;
        validate_name(source).map_err(|m| bad(format!("Source {m}")))?;
        Ok(Recipe::deb_named(source.to_string()))
    }

    fn deb_named(source: String) -> Recipe {
        Recipe {
            package: PackageSection {
                name: Some(source),
                kind: Some("deb".into()),
            },
            build: BuildSection {
                script: DEB_BUILD_SCRIPT.into(),
            },
            outputs: OutputsSection {
                files: ["*.deb", "*.udeb", "*.ddeb", "*.buildinfo", "*.changes"]
                    .map(String::from)
                    .to_vec(),
            },
        }
    }

    /// The recipe of an uploaded Debian source package: one `.dsc` at the
    /// top of the tree with every file its `Checksums-Sha256` names, each
    /// of that size and SHA256 (checked against the tree's own digests).
    pub fn dsc(name: &str, dsc: &[u8], tree: &Tree) -> Result<Recipe, RecipeError> {
        let bad = |m: String| RecipeError::Dsc(format!("{name}: {m}"));
        let fields = first_paragraph(dsc).map_err(bad)?;
        let source = field(&fields, "Source").ok_or_else(|| bad("no Source: field".into()))?;
        validate_name(source).map_err(|m| bad(format!("Source {m}")))?;
        let sums = field(&fields, "Checksums-Sha256")
            .ok_or_else(|| bad("no Checksums-Sha256: field".into()))?;
        let mut n = 0;
        for line in sums.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let mut it = line.split_whitespace();
            let (Some(hex), Some(size), Some(file), None) =
                (it.next(), it.next(), it.next(), it.next())
            else {
                return Err(bad(format!(
                    "Checksums-Sha256 line {line:?} is not \"sha256 size name\""
                )));
            };
            if file.contains('/') || file.starts_with('.') {
                return Err(bad(format!("names a file outside its directory: {file:?}")));
            }
            let entry = match tree.get(file) {
                Some(TreeEntry {
                    kind: EntryKind::File { digest, size },
                    ..
                }) => (digest, size),
                _ => return Err(bad(format!("{file} is missing from the upload"))),
            };
            if size.parse::<u64>().ok() != Some(*entry.1) {
                return Err(bad(format!(
                    "{file} is {} bytes, the .dsc says {size}",
                    entry.1
                )));
            }
            if !entry.0.to_string().eq_ignore_ascii_case(hex) {
                return Err(bad(format!(
                    "{file}: SHA256 {} does not match the .dsc's {hex}",
                    entry.0
                )));
            }
            n += 1;
        }
        if n == 0 {
            return Err(bad("Checksums-Sha256 lists no files".into()));
        }
        Ok(Recipe::deb_named(source.to_string()))
    }

    fn rpm_named(name: String) -> Recipe {
        Recipe {
            package: PackageSection {
                name: Some(name),
                kind: Some("rpm".into()),
            },
            build: BuildSection {
                script: RPM_BUILD_SCRIPT.into(),
            },
            outputs: OutputsSection {
                files: vec!["*.rpm".into()],
            },
        }
    }

    /// The recipe of a tree with one `.spec` at its top: the package is the
    /// spec's `Name:` (its `%global`/`%define`s expanded), else the file's
    /// stem. rpmbuild itself judges the rest of the spec in the build.
    pub fn spec(file: &str, spec: &[u8]) -> Result<Recipe, RecipeError> {
        let bad = |m: String| RecipeError::Rpm(format!("{file}: {m}"));
        let text = std::str::from_utf8(spec).map_err(|_| bad("not UTF-8".into()))?;
        let name = spec_name(text).unwrap_or_else(|| file.trim_end_matches(".spec").to_string());
        validate_name(&name).map_err(|m| bad(format!("Name {m}")))?;
        Ok(Recipe::rpm_named(name))
    }

    /// The recipe of an uploaded source RPM: its header must read as a
    /// source package's.
    pub fn srpm(file: &str, bytes: &[u8]) -> Result<Recipe, RecipeError> {
        let bad = |m: String| RecipeError::Rpm(format!("{file}: not a usable source RPM: {m}"));
        let info = crate::publish::rpm::inspect(bytes).map_err(|e| bad(e.to_string()))?;
        if info.arch != "src" {
            return Err(bad(format!(
                "its header says it is a binary package (arch {})",
                info.arch
            )));
        }
        validate_name(&info.name).map_err(|m| bad(format!("Name {m}")))?;
        Ok(Recipe::rpm_named(info.name))
    }

    /// The recipe of a checked-out or pending tree: kiln.toml, else
    /// debian/control, else one `.spec`, `.src.rpm` or `.dsc` at the top.
    pub fn of_tree(
        tree: &Tree,
        read: impl Fn(&str) -> Result<Option<Vec<u8>>, RecipeError>,
    ) -> Result<Recipe, RecipeError> {
        if let Some(b) = read(RECIPE_FILE)? {
            return Recipe::parse(&b);
        }
        if let Some(c) = read(DEB_CONTROL)? {
            return Recipe::deb(&c);
        }
        let top = |ext: &str| -> Vec<&str> {
            tree.entries
                .iter()
                .filter(|e| !e.path.contains('/') && e.path.ends_with(ext))
                .map(|e| e.path.as_str())
                .collect()
        };
        let (specs, srpms, dscs) = (top(".spec"), top(".src.rpm"), top(".dsc"));
        let found: Vec<&str> = specs.iter().chain(&srpms).chain(&dscs).copied().collect();
        let [one] = found[..] else {
            if found.is_empty() {
                return Err(RecipeError::Missing);
            }
            return Err(RecipeError::Read(format!(
                "more than one package source at the top of the tree: {} (keep one .spec, .src.rpm or .dsc)",
                found.join(", ")
            )));
        };
        let b = read(one)?.ok_or_else(|| RecipeError::Read(format!("{one} is not a file")))?;
        if one.ends_with(".spec") {
            Recipe::spec(one, &b)
        } else if one.ends_with(".src.rpm") {
            Recipe::srpm(one, &b)
        } else {
            Recipe::dsc(one, &b, tree)
        }
    }

    pub fn kind(&self) -> PackageKind {
        match self.package.kind.as_deref() {
            Some("deb") => PackageKind::Deb,
            Some("rpm") => PackageKind::Rpm,
            _ => PackageKind::Script,
        }
    }

    pub fn output_globs(&self) -> Result<GlobSet, RecipeError> {
        let mut b = GlobSetBuilder::new();
        for g in &self.outputs.files {
            let glob = globset::GlobBuilder::new(g)
                .literal_separator(true)
                .build()
                .map_err(|e| RecipeError::Invalid(format!("outputs.files: bad glob {g:?}: {e}")))?;
            b.add(glob);
        }
        b.build()
            .map_err(|e| RecipeError::Invalid(format!("outputs.files: {e}")))
    }

    /// The command line of the build process.
    pub fn argv(&self) -> Vec<String> {
        vec![
            "/bin/sh".into(),
            "-e".into(),
            "-c".into(),
            self.build.script.clone(),
        ]
    }
}

/// A spec's `Name:`, with `%global`/`%define` macros it uses expanded;
/// None when it has none or it still names a macro kiln cannot expand.
fn spec_name(text: &str) -> Option<String> {
    let mut macros: Vec<(String, String)> = Vec::new();
    let mut name = None;
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line
            .strip_prefix("%global")
            .or_else(|| line.strip_prefix("%define"))
        {
            let mut it = rest.split_whitespace();
            if let (Some(k), Some(v)) = (it.next(), it.next()) {
                macros.push((k.to_string(), v.to_string()));
            }
        } else if let Some((tag, value)) = line.split_once(':')
            && tag.trim().eq_ignore_ascii_case("name")
            && name.is_none()
        {
            name = Some(value.trim().to_string());
        }
    }
    let mut name = name?;
    for (k, v) in &macros {
        name = name
            .replace(&format!("%{{{k}}}"), v)
            .replace(&format!("%{k}"), v);
    }
    (!name.contains('%') && !name.is_empty()).then_some(name)
}

/// The file names a `.dsc` lists in `Checksums-Sha256` (or `Files`).
pub fn dsc_files(dsc: &[u8]) -> Result<Vec<String>, String> {
    let fields = first_paragraph(dsc)?;
    let list = field(&fields, "Checksums-Sha256")
        .or_else(|| field(&fields, "Files"))
        .ok_or("no Checksums-Sha256: or Files: field")?;
    let names: Vec<String> = list
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .map(String::from)
        .collect();
    match names.iter().find(|n| n.contains('/') || n.starts_with('.')) {
        Some(n) => Err(format!("names a file outside its directory: {n:?}")),
        None => Ok(names),
    }
}

/// The text inside an OpenPGP clear-signed message (or all of it).
fn strip_clearsign(text: &str) -> String {
    if !text.starts_with("-----BEGIN PGP SIGNED MESSAGE-----") {
        return text.to_string();
    }
    text.lines()
        .skip_while(|l| !l.trim().is_empty())
        .skip(1)
        .take_while(|l| !l.starts_with("-----BEGIN PGP SIGNATURE-----"))
        .map(|l| l.strip_prefix("- ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first deb822 paragraph of `bytes` (a `debian/control`, or a
/// `.dsc`, clear-signed or not), by the parser `.deb` control files use.
fn first_paragraph(bytes: &[u8]) -> Result<Vec<(String, String)>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
    crate::publish::deb::parse_paragraph(&strip_clearsign(text), true).map_err(|e| e.to_string())
}

/// A field's value, by name as dpkg matches it (case-insensitively).
fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Project and package names: 1–64 of `[A-Za-z0-9._+-]`, not starting with
/// `.` or `-` (they appear in URLs and paths).
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid name (1-64 of A-Z a-z 0-9 . _ + -, not starting with . or -)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses() {
        let r = Recipe::parse(
            b"[build]\nscript = \"make && make install DESTDIR=$KILN_OUT\"\n[outputs]\nfiles = [\"usr/bin/*\"]\n",
        )
        .unwrap();
        let g = r.output_globs().unwrap();
        assert!(g.is_match("usr/bin/hello"));
        assert!(!g.is_match("usr/bin/sub/hello"));
        assert!(!g.is_match("usr/lib/x"));
    }

    #[test]
    fn errors_name_line_and_field() {
        let e = Recipe::parse(b"[build]\nscrpt = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("scrpt"), "{e}");
        let e = Recipe::parse(b"[outputs]\nfiles = [\"a\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("build"), "{e}");
        let e = Recipe::parse(b"[build]\nscript = 5\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2"), "{e}");
        let e = Recipe::parse(b"[build]\nscript = \"  \"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("build.script"), "{e}");
        let e = Recipe::parse(b"[package]\nname = \"../x\"\n[build]\nscript = \"true\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("package.name"), "{e}");
    }

    fn tree_of(files: &[(&str, &str)]) -> (Tree, std::collections::HashMap<String, Vec<u8>>) {
        let entries = files
            .iter()
            .map(|(p, c)| TreeEntry {
                path: p.to_string(),
                mode: 0o644,
                kind: EntryKind::File {
                    digest: crate::cas::Digest::of(c.as_bytes()),
                    size: c.len() as u64,
                },
            })
            .collect();
        let bytes = files
            .iter()
            .map(|(p, c)| (p.to_string(), c.as_bytes().to_vec()))
            .collect();
        (Tree { entries }, bytes)
    }

    fn recipe_of(files: &[(&str, &str)]) -> Result<Recipe, RecipeError> {
        let (tree, bytes) = tree_of(files);
        Recipe::of_tree(&tree, |p| Ok(bytes.get(p).cloned()))
    }

    #[test]
    fn a_spec_at_the_top_is_an_rpm_named_by_its_name_tag() {
        let r = recipe_of(&[
            (
                "x.spec",
                "%global base kiln\nName:   %{base}-tool\nVersion: 1\n",
            ),
            ("x.c", ""),
        ])
        .unwrap();
        assert_eq!(r.kind(), PackageKind::Rpm);
        assert_eq!(r.package.name.as_deref(), Some("kiln-tool"));
        assert!(r.output_globs().unwrap().is_match("kiln-tool-1-1.src.rpm"));
        // A Name kiln cannot expand: the file's stem.
        let r = recipe_of(&[("fancy.spec", "Name: %(echo x)\n")]).unwrap();
        assert_eq!(r.package.name.as_deref(), Some("fancy"));
        // Ambiguous sources are refused, naming them.
        let e = recipe_of(&[("a.spec", "Name: a\n"), ("b.spec", "Name: b\n")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("a.spec, b.spec"), "{e}");
        // A spec in a subdirectory is not at the top.
        let e = recipe_of(&[("sub/a.spec", "Name: a\n")]).unwrap_err();
        assert!(matches!(e, RecipeError::Missing), "{e}");
    }

    #[test]
    fn a_source_rpm_that_does_not_read_is_refused_by_name() {
        let e = recipe_of(&[("x-1-1.src.rpm", "not an rpm at all, just text")])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("x-1-1.src.rpm: not a usable source RPM: "),
            "{e}"
        );
    }

    #[test]
    fn rpm_arches_map_from_debian_names() {
        assert_eq!(rpm_arch("amd64"), Some("x86_64"));
        assert_eq!(rpm_arch("arm64"), Some("aarch64"));
        assert_eq!(rpm_arch("ppc64el"), Some("ppc64le"));
        assert_eq!(rpm_arch("mips64el"), None);
    }
}
