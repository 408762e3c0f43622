//! Buildroots: named root filesystems that tasks run in, each task on a
//! fresh copy-on-write view (an overlay, see `sandbox::RootSpec::Overlay`).
//! Made by bootstrapping Debian (`mmdebstrap`, run in kiln's sandbox with the
//! host's network for that step only) or by importing a root tarball
//! (unpacked by `tar` inside the sandbox, so no path in it reaches outside).
//!
//! What must stay true:
//! - A buildroot's files live in `buildroots/<name>.<generation>/` and are
//!   never written after it became ready; a refresh makes a new generation
//!   and switches to it. Running tasks keep the view they started with.
//! - A failed create leaves no files; its record says why (and may be
//!   replaced by a new create).
//! - The files are owned by kiln's first id range (slot 0's, see
//!   `sandbox::IdMap`): tasks on a buildroot map that range whatever their
//!   slot, so every slot sees root-owned files as root's.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::db::DbError;
use crate::hub::Hub;
use crate::model::{Buildroot, BuildrootSource, BuildrootState, now_ms};
use crate::sandbox::{self, Hardening, IdMap, Network, RootSpec, Spec};

/// Bootstraps and imports may take this long.
const JOB_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum BuildrootError {
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BuildrootError {
    let what = what.into();
    move |source| BuildrootError::Io { what, source }
}

/// Where buildroots live in the data dir.
pub fn dir(hub: &Hub) -> PathBuf {
    hub.data_dir().join("buildroots")
}

/// The files of `br`'s current generation.
pub fn root_path(hub: &Hub, br: &Buildroot) -> PathBuf {
    dir(hub).join(format!("{}.{}", br.name, br.generation))
}

/// The log of `br`'s last create, import or refresh.
pub fn log_path(hub: &Hub, name: &str) -> PathBuf {
    dir(hub).join(format!("{name}.log"))
}

/// The id range every buildroot's files and tasks use.
pub fn ids() -> IdMap {
    IdMap::for_slot(0)
}

/// What a create request asks for.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct CreateRequest {
    pub name: String,
    /// `debian` (mmdebstrap) or `rpm` (dnf --installroot).
    pub bootstrap: String,
    /// Debian: the suite.
    #[serde(default)]
    pub suite: String,
    /// Debian: the mirror (default deb.debian.org).
    pub mirror: Option<String>,
    #[serde(default)]
    pub include: Vec<String>,
    /// rpm: the distribution release (`$releasever`, e.g. `40`).
    #[serde(default)]
    pub release: Option<String>,
    /// rpm: the repositories' base URLs.
    #[serde(default)]
    pub repos: Vec<String>,
    /// rpm: the URL of the key the packages must be signed with.
    #[serde(default)]
    pub gpgkey: Option<String>,
}

pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

fn check_word(what: &str, v: &str) -> Result<(), BuildrootError> {
    crate::kinds::validate_name(v).map_err(|m| BuildrootError::BadRequest(format!("{what} {m}")))
}

fn check_url(what: &str, url: &str) -> Result<(), BuildrootError> {
    if !(url.starts_with("http://") || url.starts_with("https://") || url.starts_with("file:/"))
        || url.contains(char::is_whitespace)
        || url.contains(',')
    {
        return Err(BuildrootError::BadRequest(format!(
            "{what} {url:?} is not an http(s):// or file:/ URL"
        )));
    }
    Ok(())
}

/// Validates a create request and records the buildroot as `creating`.
pub fn begin_create(hub: &Hub, req: &CreateRequest) -> Result<Buildroot, BuildrootError> {
    check_word("buildroot", &req.name)?;
    if req.name == crate::model::HOST_TARGET {
        return Err(BuildrootError::BadRequest(
            "buildroot \"host\" is built in (the host's system dirs)".into(),
        ));
    }
    for p in &req.include {
        check_word("package", p)?;
    }
    if req.bootstrap == "rpm" {
        let release = req.release.clone().unwrap_or_default();
        check_word("release", &release)?;
        if req.repos.is_empty() {
            return Err(BuildrootError::BadRequest(
                "an rpm bootstrap needs at least one --repo URL (the distribution's repository)"
                    .into(),
            ));
        }
        for r in &req.repos {
            check_url("repo", r)?;
        }
        if let Some(k) = &req.gpgkey {
            check_url("gpgkey", k)?;
        }
        return begin(
            hub,
            &req.name,
            BuildrootSource::Rpm {
                release,
                repos: req.repos.clone(),
                include: req.include.clone(),
                gpgkey: req.gpgkey.clone(),
            },
        );
    }
    if req.bootstrap != "debian" {
        return Err(BuildrootError::BadRequest(format!(
            "bootstrap {:?} is not known; kiln bootstraps \"debian\" (mmdebstrap) and \"rpm\" (dnf --installroot)",
            req.bootstrap
        )));
    }
    check_word("suite", &req.suite)?;
    let mirror = req.mirror.clone().unwrap_or_else(|| DEFAULT_MIRROR.into());
    check_url("mirror", &mirror)?;
    begin(
        hub,
        &req.name,
        BuildrootSource::Debian {
            suite: req.suite.clone(),
            mirror,
            include: req.include.clone(),
        },
    )
}

/// Records an import about to run.
pub fn begin_import(hub: &Hub, name: &str) -> Result<Buildroot, BuildrootError> {
    check_word("buildroot", name)?;
    begin(hub, name, BuildrootSource::Imported)
}

fn begin(hub: &Hub, name: &str, source: BuildrootSource) -> Result<Buildroot, BuildrootError> {
    let br = Buildroot {
        name: name.to_string(),
        source,
        state: BuildrootState::Creating,
        generation: 0,
        created: now_ms(),
        ready: None,
        size: 0,
    };
    Ok(hub.db.begin_buildroot(&br)?)
}

/// Marks a ready buildroot `creating` again for a refresh (a new
/// bootstrap into the next generation; the current one serves meanwhile).
pub fn begin_refresh(hub: &Hub, name: &str) -> Result<Buildroot, BuildrootError> {
    let br = hub
        .db
        .buildroot(name)?
        .ok_or_else(|| DbError::NotFound(format!("buildroot {name}")))?;
    if br.source == BuildrootSource::Imported {
        return Err(BuildrootError::BadRequest(format!(
            "buildroot {name} was imported; import it again instead"
        )));
    }
    if br.state == BuildrootState::Creating {
        return Err(BuildrootError::BadRequest(format!(
            "buildroot {name} is being made already"
        )));
    }
    Ok(br)
}

/// Runs a bootstrap (or, with `tarball`, an import) to its end in the
/// background of the hub, then records `ready` or `failed`.
pub async fn run_job(hub: Arc<Hub>, br: Buildroot, tarball: Option<PathBuf>) {
    let name = br.name.clone();
    let next = Buildroot {
        generation: br.generation + 1,
        ..br.clone()
    };
    let target = root_path(&hub, &next);
    let result = job(&hub, &next, &target, tarball.as_deref()).await;
    let mut rec = hub.db.buildroot(&name).ok().flatten().unwrap_or(br.clone());
    match result {
        Ok(size) => {
            // A refresh replaces a generation that was ready.
            let old = (rec.ready.is_some() && rec.generation > 0)
                .then(|| (root_path(&hub, &rec), export_note(&hub, &rec)));
            rec.generation = next.generation;
            rec.state = BuildrootState::Ready;
            rec.ready = Some(now_ms());
            rec.size = size;
            if let Err(e) = hub.db.put_buildroot(&rec) {
                tracing::error!(buildroot = %name, error = %e, "cannot record buildroot");
            }
            // Tasks still on the old generation keep their (open) view of it.
            // (Its export's blob stays in the store, like every blob.)
            if let Some((old, note)) = old {
                let _ = std::fs::remove_file(note);
                let _ = tokio::task::spawn_blocking(move || crate::worker::remove_tree(&old)).await;
            }
            tracing::info!(buildroot = %name, size, "buildroot ready");
        }
        Err(why) => {
            let t = target.clone();
            let _ = tokio::task::spawn_blocking(move || crate::worker::remove_tree(&t)).await;
            append_log(&hub, &name, &format!("kiln: failed: {why}\n"));
            // A refresh that failed leaves the working generation in place.
            if rec.ready.is_some() && rec.generation > 0 {
                rec.state = BuildrootState::Ready;
            } else {
                rec.state = BuildrootState::Failed(why.clone());
            }
            let _ = hub.db.put_buildroot(&rec);
            tracing::warn!(buildroot = %name, %why, "buildroot failed");
        }
    }
    if let Some(t) = tarball {
        let _ = std::fs::remove_file(t);
    }
    hub.changed();
}

fn append_log(hub: &Hub, name: &str, line: &str) {
    use std::io::Write as _;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(log_path(hub, name))
    {
        let _ = f.write_all(line.as_bytes());
    }
}

/// Makes `target`; returns its size in bytes, or why it failed.
async fn job(
    hub: &Arc<Hub>,
    br: &Buildroot,
    target: &Path,
    tarball: Option<&Path>,
) -> Result<u64, String> {
    std::fs::create_dir_all(dir(hub)).map_err(|e| format!("creating the buildroots dir: {e}"))?;
    let log = std::fs::File::create(log_path(hub, &br.name))
        .map_err(|e| format!("creating the log: {e}"))?;
    let job = match (&br.source, tarball) {
        (
            BuildrootSource::Debian {
                suite,
                mirror,
                include,
            },
            _,
        ) => {
            let mut argv: Vec<String> = [
                "/usr/bin/mmdebstrap",
                "--mode=root",
                "--variant=buildd",
                // Tasks resolve Build-Depends offline from these lists.
                "--skip=cleanup/apt/lists",
                "--skip=output/dev",
            ]
            .map(String::from)
            .to_vec();
            if !include.is_empty() {
                argv.push(format!("--include={}", include.join(",")));
            }
            argv.extend([suite.clone(), "/out".into(), mirror.clone()]);
            RootJob {
                argv,
                network: Network::Host,
                hardening: Hardening::Bootstrap,
                binds: vec![],
            }
        }
        (
            BuildrootSource::Rpm {
                release,
                repos,
                include,
                gpgkey,
            },
            _,
        ) => RootJob {
            argv: dnf_bootstrap_argv(release, repos, include, gpgkey.as_deref()),
            network: Network::Host,
            hardening: Hardening::Bootstrap,
            binds: vec![],
        },
        (BuildrootSource::Imported, Some(tar)) => RootJob::unpack(tar),
        (BuildrootSource::Imported, None) => return Err("no tarball to import".into()),
    };
    let work = dir(hub).join(format!("{}.job", br.name));
    job.run(&hub.kiln_exe, &work, target, log).await
}

/// What an rpm bootstrap installs unless `include` names the packages: the
/// build tools, as mock's minimal buildroot has them.
pub const RPM_BASE: &[&str] = &["rpm-build", "bash", "coreutils", "findutils", "gcc", "make"];

/// `dnf --installroot` into `/out` from the given repos only (the host's
/// repo files are not read), for `$releasever` `release`. Packages are
/// signature-checked against `gpgkey` when one is given.
fn dnf_bootstrap_argv(
    release: &str,
    repos: &[String],
    include: &[String],
    gpgkey: Option<&str>,
) -> Vec<String> {
    let mut argv: Vec<String> = [
        "/usr/bin/dnf",
        "--installroot=/out",
        "--setopt=reposdir=/nonexistent",
        "--setopt=cachedir=/build/dnf-cache",
        "--setopt=install_weak_deps=False",
        "--setopt=keepcache=False",
        "--nodocs",
        "-y",
    ]
    .map(String::from)
    .to_vec();
    argv.push(format!("--releasever={release}"));
    for (i, url) in repos.iter().enumerate() {
        argv.push(format!("--repofrompath=kiln-{i},{url}"));
        match gpgkey {
            Some(k) => argv.extend([
                format!("--setopt=kiln-{i}.gpgcheck=1"),
                format!("--setopt=kiln-{i}.gpgkey={k}"),
            ]),
            None => argv.push(format!("--setopt=kiln-{i}.gpgcheck=0")),
        }
    }
    argv.push("install".into());
    match include.is_empty() {
        true => argv.extend(RPM_BASE.iter().map(|s| s.to_string())),
        false => argv.extend(include.iter().cloned()),
    }
    argv
}

/// A buildroot job's sandbox: the host's system dirs, the buildroot id
/// range, a minimal environment.
fn job_spec(
    build_dir: PathBuf,
    out_dir: PathBuf,
    argv: Vec<String>,
    network: Network,
    hardening: Hardening,
    binds: Vec<sandbox::Bind>,
) -> Spec {
    Spec {
        root: RootSpec::Host,
        build_dir,
        out_dir,
        argv,
        env: vec![
            ("PATH".into(), crate::worker::SANDBOX_PATH.into()),
            ("HOME".into(), "/".into()),
            ("LANG".into(), "C.UTF-8".into()),
            ("TZ".into(), "UTC".into()),
        ],
        cwd: "/build".into(),
        hostname: "kiln".into(),
        ids: ids(),
        limits: Default::default(),
        cgroup_name: String::new(),
        disk_bytes: None,
        network,
        setup: None,
        binds,
        hardening,
    }
}

/// A command that fills a new root dir (`/out` in its sandbox).
struct RootJob {
    argv: Vec<String>,
    network: Network,
    hardening: Hardening,
    binds: Vec<sandbox::Bind>,
}

impl RootJob {
    /// Unpacks a root tarball with `tar` inside the sandbox, owners kept
    /// (numeric, in the buildroot id range), so no member reaches outside.
    fn unpack(tar: &Path) -> RootJob {
        let argv = [
            "/bin/tar",
            "-x",
            "-p",
            "--numeric-owner",
            "--auto-compress",
            "-f",
            "/build/rootfs.tar",
            "-C",
            "/out",
            "--exclude=./dev/*",
            "--exclude=dev/*",
        ]
        .map(String::from)
        .to_vec();
        let bind = sandbox::Bind {
            host: tar.to_owned(),
            path: "/build/rootfs.tar".into(),
            writable: false,
        };
        RootJob {
            argv,
            network: Network::Loopback,
            hardening: Hardening::Build,
            binds: vec![bind],
        }
    }

    /// Runs in the buildroot id range with `target` (made empty, 0755) as
    /// `/out` and `work` as scratch; returns the root's size in bytes, or
    /// why it failed.
    async fn run(
        self,
        kiln_exe: &Path,
        work: &Path,
        target: &Path,
        log: std::fs::File,
    ) -> Result<u64, String> {
        let _ = crate::worker::remove_tree(work);
        let build = work.join("build");
        let setup = || -> std::io::Result<()> {
            std::fs::create_dir_all(&build)?;
            if target.exists() {
                crate::worker::remove_tree(target)?;
            }
            std::fs::create_dir_all(target)?;
            // The root dir itself, like any root: 0755.
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(target, std::fs::Permissions::from_mode(0o755))
        };
        setup().map_err(|e| format!("preparing {}: {e}", target.display()))?;
        let spec = job_spec(
            build.clone(),
            target.to_owned(),
            self.argv,
            self.network,
            self.hardening,
            self.binds,
        );
        let cancel = CancellationToken::new();
        let timer = {
            let c = cancel.clone();
            tokio::spawn(async move {
                tokio::time::sleep(JOB_TIMEOUT).await;
                c.cancel();
            })
        };
        let ran = sandbox::run(kiln_exe, &spec, work, log.into(), cancel).await;
        timer.abort();
        let _ = crate::worker::remove_tree(work);
        match ran {
            Ok(o) if o.success() => {}
            Ok(o) => return Err(format!("{} ended with {o}", spec.argv[0])),
            Err(e) => return Err(e.to_string()),
        }
        let t = target.to_owned();
        let size = tokio::task::spawn_blocking(move || tree_size(&t))
            .await
            .map_err(|e| e.to_string())?;
        if !target.join("usr").is_dir() {
            return Err("the result has no /usr: not a root filesystem".into());
        }
        Ok(size)
    }
}

fn tree_size(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let mut n = meta.size();
    if meta.is_dir()
        && let Ok(rd) = std::fs::read_dir(path)
    {
        for e in rd.flatten() {
            n += tree_size(&e.path());
        }
    }
    n
}

/// Deletes a buildroot no target uses, record and files.
pub async fn delete(hub: &Arc<Hub>, name: &str) -> Result<Buildroot, BuildrootError> {
    let br = hub.db.buildroot(name)?;
    if br
        .as_ref()
        .is_some_and(|b| b.state == BuildrootState::Creating)
    {
        return Err(BuildrootError::BadRequest(format!(
            "buildroot {name} is being made; delete it when that ends"
        )));
    }
    let br = hub.db.delete_buildroot(name)?;
    let (root, log, note) = (
        root_path(hub, &br),
        log_path(hub, name),
        export_note(hub, &br),
    );
    tokio::task::spawn_blocking(move || {
        let _ = crate::worker::remove_tree(&root);
        let _ = std::fs::remove_file(log);
        let _ = std::fs::remove_file(note);
    })
    .await
    .map_err(|e| io("removing files")(std::io::Error::other(e)))?;
    hub.changed();
    Ok(br)
}

/// A buildroot generation as remote workers get it: one blob, a tar of its
/// files with the owners tasks see (numeric), made once per generation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Export {
    pub name: String,
    pub generation: u64,
    /// The tar's blob.
    pub digest: crate::cas::Digest,
    /// The tar's size in bytes.
    pub size: u64,
}

/// Where the hub notes the export of `br`'s current generation
/// (`<digest> <size>`), written once its blob is in the store.
fn export_note(hub: &Hub, br: &Buildroot) -> PathBuf {
    dir(hub).join(format!("{}.{}.export", br.name, br.generation))
}

/// The export of buildroot `name`'s current generation, made on first
/// request: `tar -c` runs in the sandbox (in the buildroot id range, so it
/// records the owners tasks see) over a read-only view of the root, and
/// the tar goes into the store. One export or unpack at a time: workers
/// asking together wait for the first instead of each making one.
pub async fn export(hub: &Arc<Hub>, name: &str) -> Result<Export, BuildrootError> {
    let _one = hub.root_jobs.lock().await;
    let br = hub
        .db
        .buildroot(name)?
        .ok_or_else(|| DbError::NotFound(format!("buildroot {name}")))?;
    if br.ready.is_none() {
        return Err(BuildrootError::BadRequest(format!(
            "buildroot {name} is not ready"
        )));
    }
    let note = export_note(hub, &br);
    let known = std::fs::read_to_string(&note).ok().and_then(|s| {
        let (d, n) = s.trim().split_once(' ')?;
        Some((
            d.parse::<crate::cas::Digest>().ok()?,
            n.parse::<u64>().ok()?,
        ))
    });
    let export = |(digest, size)| Export {
        name: name.to_string(),
        generation: br.generation,
        digest,
        size,
    };
    if let Some((d, n)) = known
        && hub.cas.contains(&d)
    {
        return Ok(export((d, n)));
    }
    let work = dir(hub).join(format!("{name}.export-job"));
    let _ = crate::worker::remove_tree(&work);
    let (build, out) = (work.join("build"), work.join("out"));
    for d in [&build, &out] {
        std::fs::create_dir_all(d).map_err(io(format!("creating {}", d.display())))?;
    }
    let argv = [
        "/bin/tar",
        "-c",
        "--numeric-owner",
        "-f",
        "/out/root.tar",
        "-C",
        "/build/root",
        ".",
    ];
    let root = sandbox::Bind {
        host: root_path(hub, &br),
        path: "/build/root".into(),
        writable: false,
    };
    let spec = job_spec(
        build,
        out.clone(),
        argv.map(String::from).to_vec(),
        Network::Loopback,
        Hardening::Build,
        vec![root],
    );
    let log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(log_path(hub, name))
        .map_err(io("opening the buildroot log"))?;
    let ran = sandbox::run(
        &hub.kiln_exe,
        &spec,
        &work.join("run"),
        log.into(),
        hub.shutdown.child_token(),
    )
    .await;
    let failed = |why: String| {
        let _ = crate::worker::remove_tree(&work);
        BuildrootError::Io {
            what: format!("exporting buildroot {name}"),
            source: std::io::Error::other(why),
        }
    };
    match ran {
        Ok(o) if o.success() => {}
        Ok(o) => return Err(failed(format!("tar ended with {o}"))),
        Err(e) => return Err(failed(e.to_string())),
    }
    let (cas, tar) = (hub.cas.clone(), out.join("root.tar"));
    let stored = tokio::task::spawn_blocking(move || cas.put_file(&tar))
        .await
        .map_err(|e| failed(e.to_string()))?
        .map_err(|e| failed(e.to_string()))?;
    let _ = crate::worker::remove_tree(&work);
    let text = format!("{} {}\n", stored.0, stored.1);
    crate::durable::write(&note, text.as_bytes(), 0o644)
        .map_err(io(format!("writing {}", note.display())))?;
    append_log(
        hub,
        name,
        &format!(
            "kiln: generation {} exported for workers ({} MB)\n",
            br.generation,
            stored.1 >> 20
        ),
    );
    Ok(export(stored))
}

/// Where a remote worker keeps its unpacked copy of an export.
fn copy_path(local: &Hub, ex: &Export) -> PathBuf {
    // '@' is not allowed in names, so `<name>@` prefixes only this name's copies.
    dir(local).join(format!("{}@{}", ex.name, ex.digest))
}

/// A remote worker's copy of the hub's buildroot `name`, current
/// generation: reused while the hub's export is the same blob, else
/// downloaded (compressed, verified against its digest while it streams)
/// and unpacked as `import` does, into a temp dir renamed into place.
/// The previous copy stays (a running task may use it); older ones go.
pub async fn remote_copy(
    client: &crate::client::Client,
    local: &Arc<Hub>,
    name: &str,
) -> Result<(PathBuf, Export, bool), BuildrootError> {
    let _one = local.root_jobs.lock().await;
    let remote = |what: &str| {
        let what = format!("{what} buildroot {name} from the hub");
        move |e: crate::client::ClientError| BuildrootError::Io {
            what,
            source: std::io::Error::other(e.to_string()),
        }
    };
    let ex = client
        .worker_buildroot(name)
        .await
        .map_err(remote("exporting"))?;
    let dest = copy_path(local, &ex);
    if dest.is_dir() {
        return Ok((dest, ex, false));
    }
    let base = dir(local);
    std::fs::create_dir_all(&base).map_err(io(format!("creating {}", base.display())))?;
    let tar = base.join(format!("{name}@partial.tar"));
    client
        .worker_download(&ex.digest, &tar)
        .await
        .map_err(remote("downloading"))?;
    let partial = base.join(format!("{name}@partial"));
    let log = std::fs::File::create(base.join(format!("{name}.log")))
        .map_err(io("creating the unpack log"))?;
    let unpacked = RootJob::unpack(&tar)
        .run(
            &local.kiln_exe,
            &base.join(format!("{name}@job")),
            &partial,
            log,
        )
        .await;
    let _ = std::fs::remove_file(&tar);
    if let Err(why) = unpacked {
        let _ = crate::worker::remove_tree(&partial);
        return Err(BuildrootError::Io {
            what: format!("unpacking buildroot {name}"),
            source: std::io::Error::other(why),
        });
    }
    std::fs::rename(&partial, &dest).map_err(io(format!("renaming to {}", dest.display())))?;
    // Newest first when pruning, whatever mtime the tar gave the root.
    let _ = std::fs::File::open(&dest).and_then(|d| d.set_modified(std::time::SystemTime::now()));
    crate::durable::sync_dir(&base).map_err(io("syncing the buildroots dir"))?;
    prune_copies(&base, name, &dest);
    Ok((dest, ex, true))
}

/// Removes copies of `name` but `current` and the newest other one.
fn prune_copies(base: &Path, name: &str, current: &Path) {
    let prefix = format!("{name}@");
    let mut others: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(base)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_prefix(&prefix)
                .is_some_and(|d| d.parse::<crate::cas::Digest>().is_ok())
        })
        .map(|e| e.path())
        .filter(|p| p != current)
        .map(|p| {
            let t = std::fs::metadata(&p)
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            (t, p)
        })
        .collect();
    others.sort();
    others.pop();
    for (_, p) in others {
        let _ = crate::worker::remove_tree(&p);
    }
}
