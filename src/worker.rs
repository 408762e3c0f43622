//! The agent loop that runs leased tasks: check out the source, run the
//! recipe in the sandbox, stream the log, collect outputs, report the end.
//! The hub's local slots run it in-process; remote workers will run the same
//! loop over HTTP.
//!
//! What must stay true: a task's end is reported once, with the fence of its
//! lease; when the hub shuts down mid-task nothing is reported (the task is
//! re-queued at the next start); every blob is in the store before the end
//! that names it is recorded.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use crate::cas::Cas;
use crate::db::{DbError, Leased, TaskEnd};
use crate::hub::Hub;
use crate::kinds::Recipe;
use crate::lock;
use crate::logs::LogWriter;
use crate::model::{Artifact, Build, HOST_TARGET, Outcome, RepoDeb};
use crate::sandbox::{self, IdMap, RootSpec, Spec};

/// PATH inside the sandbox.
pub const SANDBOX_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Where the source is inside the sandbox, and the build's working directory.
pub const BUILD_DIR: &str = "/build";
/// `$KILN_OUT` inside the sandbox.
pub const OUT_DIR: &str = "/out";

/// The complete environment of a build; nothing else is inherited.
pub fn build_env(build: &Build) -> Vec<(String, String)> {
    [
        ("PATH", SANDBOX_PATH.to_string()),
        ("HOME", "/tmp".to_string()),
        ("TZ", "UTC".to_string()),
        ("LANG", "C.UTF-8".to_string()),
        ("SOURCE_DATE_EPOCH", build.source_date_epoch.to_string()),
        ("KILN_OUT", OUT_DIR.to_string()),
        ("KILN_BUILD_ID", build.id.to_string()),
        ("KILN_PACKAGE", build.package.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Removes a directory tree a build wrote, even where the build left
/// directories without write or search permission.
pub fn remove_tree(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            make_writable(path);
            std::fs::remove_dir_all(path)
        }
    }
}

fn make_writable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    if meta.is_dir() {
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700));
        if let Ok(rd) = std::fs::read_dir(path) {
            for e in rd.flatten() {
                make_writable(&e.path());
            }
        }
    }
}

/// Runs local slot `slot` until the hub shuts down.
pub async fn run_slot(hub: Arc<Hub>, slot: u32) {
    let name = crate::workers::LOCAL_WORKER.to_string();
    loop {
        let notified = hub.queued.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if hub.shutdown.is_cancelled() {
            return;
        }
        let h = hub.clone();
        let n = name.clone();
        let leased = tokio::task::spawn_blocking(move || crate::scheduler::lease(&h, &n))
            .await
            .expect("lease task panicked");
        match leased {
            Ok(Some(leased)) => run_leased(&hub, slot, &name, leased).await,
            Ok(None) => {
                tokio::select! {
                    _ = &mut notified => {}
                    _ = hub.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
            Err(e) => {
                tracing::error!(slot = %name, error = %e, "cannot lease a task");
                tokio::select! {
                    _ = hub.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

/// A task's project target (buildroot, arch, repo); None for `host`, the
/// implicit target of script builds.
pub fn task_target(
    hub: &Hub,
    build: &Build,
    target: &str,
) -> Result<Option<crate::model::Target>, ExecError> {
    match target {
        HOST_TARGET => Ok(None),
        name => Ok(Some(
            hub.db
                .target(&build.project, name)
                .map_err(prep("reading the target"))?
                .ok_or_else(|| {
                    ExecError::Prepare(format!("target {}/{name} is gone", build.project))
                })?,
        )),
    }
}

/// Runs one leased task to its end and records it.
pub async fn run_leased(hub: &Arc<Hub>, slot: u32, worker: &str, leased: Leased) {
    let task_id = leased.task.id;
    let fence = leased.fence;
    let cancel = hub.shutdown.child_token();
    lock(&hub.running).insert(task_id, cancel.clone());
    let heartbeat = spawn_heartbeat(hub.clone(), task_id, fence, cancel.clone());
    let limits = hub.config.limits(&leased.task.target);
    let result = match task_target(hub, &leased.build, &leased.task.target) {
        Ok(target) => {
            let setting = Setting {
                target,
                limits,
                inputs: Inputs::Hub,
            };
            execute(hub, slot, worker, &leased, setting, cancel.clone()).await
        }
        Err(e) => Err(e),
    };
    heartbeat.abort();
    lock(&hub.running).remove(&task_id);
    if hub.shutdown.is_cancelled() {
        // Leave the task running in the database: the next start re-queues it.
        return;
    }
    let (end, log) = match result {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(task = task_id, error = %e, "task failed outside the build");
            let end = TaskEnd::infrastructure(e.to_string());
            (end, None)
        }
    };
    let h = hub.clone();
    let max = hub.config.build.max_attempts;
    let outcome = end.outcome.clone();
    let publish_to = publish_target(&end);
    let res = tokio::task::spawn_blocking(move || h.db.finish_task(task_id, fence, end, max)).await;
    match res {
        Ok(Ok(build)) => {
            tracing::info!(task = task_id, build = build.id, %outcome, state = %build.state, "task ended")
        }
        Ok(Err(DbError::StaleLease { .. })) => {
            tracing::warn!(
                task = task_id,
                "lease lost before the end was recorded; result dropped"
            )
        }
        Ok(Err(e)) => tracing::error!(task = task_id, error = %e, "cannot record task end"),
        Err(e) => tracing::error!(task = task_id, error = %e, "recording task end panicked"),
    }
    if let Some(log) = log {
        log.close();
    }
    if let Some((project, repo)) = publish_to {
        spawn_publish(hub, project, repo);
    }
    // A re-queued task is new work for the other slots and workers.
    if matches!(outcome, Outcome::Infrastructure(_)) {
        hub.queued.notify_waiters();
    }
    hub.changed();
}

/// The repo a recorded end makes due: a success with packages for one.
pub(crate) fn publish_target(end: &TaskEnd) -> Option<(String, String)> {
    match (&end.outcome, &end.publish) {
        (Outcome::Succeeded, Some(add)) => Some((add.project.clone(), add.repo.clone())),
        _ => None,
    }
}

/// Publishes a repo in the background (after the end that changed it is
/// committed).
pub(crate) fn spawn_publish(hub: &Arc<Hub>, project: String, repo: String) {
    let hub = hub.clone();
    tokio::spawn(async move {
        if let Err(e) = crate::repos::publish(&hub, &project, &repo).await {
            tracing::error!(repo = %format!("{project}/{repo}"), error = %e, "publish failed");
        }
    });
}

/// An artifact's name: its path in the outputs, under the target's name
/// when the build has several targets.
pub(crate) fn artifact_path(build: &Build, target: &str, path: &str) -> String {
    match build.tasks.len() {
        1 => path.to_string(),
        _ => format!("{target}/{path}"),
    }
}

/// Cancels (or re-queues) a task: the database first, then the sandbox of
/// a local slot running it, at once.
pub fn stop_task(hub: &Hub, task: crate::model::TaskId, requeue: bool) -> Result<Build, DbError> {
    let build = if requeue {
        hub.db.requeue_task(task)?
    } else {
        hub.db.cancel_task(task)?
    };
    if let Some(token) = lock(&hub.running).get(&task) {
        token.cancel();
    }
    hub.queued.notify_waiters();
    hub.changed();
    Ok(build)
}

fn spawn_heartbeat(
    hub: Arc<Hub>,
    task: u64,
    fence: u64,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let lease_ms = hub.config.build.lease_ms();
    let every = Duration::from_millis((lease_ms / 3).max(100) as u64);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let h = hub.clone();
            let r =
                tokio::task::spawn_blocking(move || h.db.heartbeat(task, fence, lease_ms)).await;
            if let Ok(Err(DbError::StaleLease { .. })) = r {
                tracing::warn!(task, "lease lost; stopping the task");
                cancel.cancel();
                return;
            }
        }
    })
}

/// Where a task's buildroot, project repo and Build-Depends come from.
#[derive(Clone, Copy)]
pub enum Inputs<'a> {
    /// The hub's own records, store and mirrors: a local slot.
    Hub,
    /// The hub behind a remote worker's client, for task `task` under
    /// lease `fence`.
    Remote {
        client: &'a crate::client::Client,
        task: crate::model::TaskId,
        fence: u64,
    },
}

/// What a leased task runs under: its target (None for `host`), limits,
/// and where its inputs come from.
pub struct Setting<'a> {
    pub target: Option<crate::model::Target>,
    pub limits: crate::config::TaskLimits,
    pub inputs: Inputs<'a>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("preparing the task: {0}")]
    Prepare(String),
    #[error("store: {0}")]
    Cas(#[from] crate::cas::CasError),
    #[error("log: {0}")]
    Log(#[from] std::io::Error),
    #[error("sandbox: {0}")]
    Sandbox(#[from] sandbox::SandboxError),
}

fn prep<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> ExecError + '_ {
    move |e| ExecError::Prepare(format!("{what}: {e}"))
}

/// Everything between lease and end. Returns the end to record and the live
/// log (closed by the caller once the end is committed).
async fn execute(
    hub: &Arc<Hub>,
    slot: u32,
    worker: &str,
    leased: &Leased,
    setting: Setting<'_>,
    cancel: CancellationToken,
) -> Result<(TaskEnd, Option<LogWriter>), ExecError> {
    let Setting {
        target,
        limits,
        inputs,
    } = setting;
    let task = &leased.task;
    let build = &leased.build;
    let work = hub
        .work_dir()
        .join(format!("task-{}-{}", task.id, leased.fence));
    let build_dir = work.join("build");
    let out_dir = work.join("out");
    let mut log = hub.logs.create(task.id, limits.log_limit_bytes)?;
    log.note(&format!(
        "build {} ({}/{}), task {} attempt {} on {worker}",
        build.id, build.project, build.package, task.id, task.attempt
    ))?;
    log.note(&format!("target {}: limits: {limits}", task.target))?;

    // Check out the source tree.
    let cas = hub.cas.clone();
    let source = build.source;
    let sde = build.source_date_epoch;
    let (bd, od) = (build_dir.clone(), out_dir.clone());
    let recipe = tokio::task::spawn_blocking(move || -> Result<Recipe, ExecError> {
        std::fs::create_dir_all(&od).map_err(prep("creating the output dir"))?;
        let tree = cas.get_tree(&source)?;
        cas.checkout(&tree, &bd, Some(sde))?;
        Recipe::of_tree(&tree, |p| match std::fs::read(bd.join(p)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(crate::kinds::RecipeError::Read(format!("{p}: {e}"))),
        })
        .map_err(prep("recipe"))
    })
    .await
    .map_err(prep("checkout"))??;

    // A buildroot target runs on a copy-on-write view of the buildroot, in
    // the buildroot's id range; `host` on the host's system dirs.
    let (root, ids) = match target.as_ref().map(|t| t.buildroot.as_str()) {
        None | Some(HOST_TARGET) => (RootSpec::Host, IdMap::for_slot(slot)),
        Some(name) => {
            let lower = match inputs {
                Inputs::Hub => {
                    let br = hub
                        .db
                        .buildroot(name)
                        .map_err(prep("reading the buildroot"))?
                        .filter(|b| b.ready.is_some())
                        .ok_or_else(|| {
                            ExecError::Prepare(format!("buildroot {name} is not ready"))
                        })?;
                    log.note(&format!("buildroot {name} (generation {})", br.generation))?;
                    crate::buildroot::root_path(hub, &br)
                }
                Inputs::Remote { client, .. } => {
                    let started = std::time::Instant::now();
                    let (path, ex, fetched) = crate::buildroot::remote_copy(client, hub, name)
                        .await
                        .map_err(prep("the hub's buildroot"))?;
                    let how = match fetched {
                        true => format!(
                            "downloaded from the hub ({} MB) and unpacked in {:.1} s",
                            ex.size >> 20,
                            started.elapsed().as_secs_f64()
                        ),
                        false => "this worker's copy".to_string(),
                    };
                    log.note(&format!(
                        "buildroot {name} (generation {}): {how}",
                        ex.generation
                    ))?;
                    path
                }
            };
            (RootSpec::Overlay { lower }, crate::buildroot::ids())
        }
    };
    let spec = Spec {
        root,
        build_dir: build_dir.clone(),
        out_dir: out_dir.clone(),
        argv: recipe.argv(),
        env: build_env(build),
        cwd: BUILD_DIR.to_string(),
        hostname: "kiln".to_string(),
        ids,
        limits: sandbox::cgroup::Limits {
            memory_bytes: limits.memory_limit_bytes,
            pids: limits.pids_limit,
            cpus: limits.cpus,
        },
        disk_bytes: limits.disk_limit_bytes,
        network: Default::default(),
        setup: None,
        binds: vec![],
        hardening: Default::default(),
        cgroup_name: work
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };

    // One pipe carries stdout and stderr interleaved.
    // Close-on-exec: no other child the hub spawns may hold the write end,
    // or the pump would never see end-of-file.
    let (rx, tx) = std::io::pipe().map_err(prep("pipe"))?;
    let (rx, tx) = (
        std::os::fd::OwnedFd::from(rx),
        std::os::fd::OwnedFd::from(tx),
    );
    let reader = tokio::net::unix::pipe::Receiver::from_owned_fd(rx).map_err(prep("pipe"))?;
    // The wall clock and the output limit cancel the sandbox like any other
    // cancel; the outcome says which fired.
    let run_cancel = cancel.child_token();
    let pump = tokio::spawn(pump_log(
        reader,
        log,
        limits.output_limit_bytes,
        run_cancel.clone(),
    ));
    let timer = {
        let (c, secs) = (run_cancel.clone(), limits.timeout_secs);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(secs)).await;
            c.cancel();
        })
    };
    let ran = match recipe.kind() {
        crate::model::PackageKind::Deb => {
            run_deb(
                hub,
                &spec,
                &work,
                target.as_ref(),
                inputs,
                tx,
                run_cancel.clone(),
            )
            .await
        }
        crate::model::PackageKind::Rpm => {
            run_rpm(
                hub,
                &spec,
                &work,
                target.as_ref(),
                inputs,
                tx,
                run_cancel.clone(),
            )
            .await
        }
        crate::model::PackageKind::Script => {
            sandbox::run(&hub.kiln_exe, &spec, &work, tx, run_cancel.clone()).await
        }
    };
    let timed_out = timer.is_finished() && !cancel.is_cancelled();
    timer.abort();
    let (mut log, flooded) = pump.await.map_err(prep("log pump"))??;
    let outcome = match ran {
        Ok(sandbox::Outcome::Cancelled) if flooded => Outcome::LogLimit(limits.output_limit_bytes),
        Ok(sandbox::Outcome::Cancelled) if timed_out => Outcome::Timeout(limits.timeout_secs),
        Ok(o) => map_outcome(o, &limits),
        Err(e) => Outcome::Infrastructure(e.to_string()),
    };

    // Collect outputs of a successful build.
    let mut end = TaskEnd {
        outcome,
        log: None,
        outputs: None,
        artifacts: vec![],
        publish: None,
    };
    if end.outcome.succeeded() {
        let cas = hub.cas.clone();
        let globs = recipe.output_globs().map_err(prep("outputs"))?;
        let od = out_dir.clone();
        let collected = tokio::task::spawn_blocking(move || {
            let tree = cas.ingest_dir(&od, |p| globs.is_match(p))?;
            let digest = cas.put_tree(&tree)?;
            Ok::<_, crate::cas::CasError>((tree, digest))
        })
        .await
        .map_err(prep("collecting outputs"))?;
        match collected {
            Ok((tree, digest)) => {
                end.outputs = Some(digest);
                for e in &tree.entries {
                    if let crate::cas::EntryKind::File { digest, size } = &e.kind {
                        end.artifacts.push(Artifact {
                            build: build.id,
                            task: task.id,
                            path: artifact_path(build, &task.target, &e.path),
                            digest: *digest,
                            size: *size,
                            mode: e.mode,
                        });
                    }
                }
                log.note(&format!("kept {} output file(s)", end.artifacts.len()))?;
                if let Some(t) = &target {
                    let sign = matches!(inputs, Inputs::Hub);
                    match crate::repos::packages_for_repo(hub, &end.artifacts, build.id, t, sign)
                        .await
                    {
                        Ok(add) => {
                            log.note(&format!(
                                "{} package(s) go into repo {}/{}",
                                add.debs.len() + add.rpms.len(),
                                t.project,
                                t.repo
                            ))?;
                            end.publish = Some(add);
                        }
                        Err(e) => {
                            log.note(&format!("outputs rejected: {e}"))?;
                            end.outcome = Outcome::Outputs(e.to_string());
                        }
                    }
                }
            }
            Err(e) => {
                log.note(&format!("collecting outputs failed: {e}"))?;
                end.outcome = Outcome::Outputs(e.to_string());
            }
        }
    }
    log.note(&format!("task ended: {}", end.outcome))?;
    let cas = hub.cas.clone();
    let (log, digest) = tokio::task::spawn_blocking(move || {
        let d = log.store(&cas);
        (log, d)
    })
    .await
    .map_err(prep("storing the log"))?;
    end.log = Some(digest?);
    let w = work.clone();
    let _ = tokio::task::spawn_blocking(move || remove_tree(&w)).await;
    Ok((end, Some(log)))
}

/// A `deb` task in two offline sandbox runs on fresh views of its buildroot:
/// resolve the Build-Depends to .deb URLs, gather them (the hub downloads
/// what its cache lacks, verifying each file's SHA256, and takes the
/// project's own packages from the store), then install them and build.
/// Both runs see the target repo's packages as an apt source, so a package
/// can build-depend on another the project built earlier.
async fn run_deb(
    hub: &Arc<Hub>,
    spec: &Spec,
    work: &Path,
    target: Option<&crate::model::Target>,
    inputs: Inputs<'_>,
    log: std::os::fd::OwnedFd,
    cancel: CancellationToken,
) -> Result<sandbox::Outcome, sandbox::SandboxError> {
    use std::io::Write as _;
    let mut note = std::fs::File::from(
        log.try_clone()
            .map_err(step_err("duplicating the log fd"))?,
    );
    let mut spec = spec.clone();
    let project = match target {
        Some(t) => project_repo(hub, t, inputs, &work.join("project-repo"))
            .await
            .map_err(step_err("writing the project repo's index"))?,
        None => Default::default(),
    };
    if !project.is_empty() {
        let t = target.expect("a project repo comes from a target");
        let _ = writeln!(
            note,
            "kiln: repo {}/{} offers {} package(s) to Build-Depends",
            t.project,
            t.repo,
            project.len()
        );
        spec.binds.push(sandbox::Bind {
            host: work.join("project-repo"),
            path: crate::deps::PROJECT_REPO_DIR.into(),
            writable: false,
        });
    }
    let deps_out = work.join("deps");
    let o = first_step(
        hub,
        &spec,
        "resolving Build-Depends",
        crate::kinds::DEB_RESOLVE_SCRIPT,
        &deps_out,
        &log,
        &cancel,
    )
    .await?;
    if !o.success() {
        return Ok(o);
    }
    let list = std::fs::read_to_string(deps_out.join(".kiln-deps")).unwrap_or_default();
    let debs = work.join("debs");
    let cache = crate::deps::cache_dir(hub.data_dir());
    let source = match inputs {
        Inputs::Hub => crate::deps::Source::Mirrors,
        Inputs::Remote { client, .. } => crate::deps::Source::Hub(client),
    };
    match crate::deps::fetch(&cache, &debs, &list, &hub.cas, &project, source).await {
        Ok(s) => {
            let _ = writeln!(note, "kiln: Build-Depends: {s}");
        }
        Err(e) => {
            let _ = writeln!(note, "kiln: gathering Build-Depends failed: {e}");
            return Ok(sandbox::Outcome::Infra(format!(
                "gathering Build-Depends: {e}"
            )));
        }
    }
    spec.binds.push(sandbox::Bind {
        host: debs,
        path: crate::kinds::DEB_CACHE_DIR.into(),
        writable: false,
    });
    drop(note);
    sandbox::run(&hub.kiln_exe, &spec, work, log, cancel).await
}

/// Why a step of a two-step task could not be set up.
fn step_err(what: &str) -> impl FnOnce(std::io::Error) -> sandbox::SandboxError {
    let what = what.to_string();
    move |source| sandbox::SandboxError::Prepare { what, source }
}

/// The first step of a two-step task (`deb`, `rpm`): `script` in `sh -e`
/// on a fresh view of the task's root, writing into `out` (made here) as
/// `$KILN_OUT` (its sandbox's scratch beside it, `out` + `-run`), its
/// output into the task's log, which notes `what` it does and whether that
/// failed.
async fn first_step(
    hub: &Arc<Hub>,
    spec: &Spec,
    what: &str,
    script: &str,
    out: &Path,
    log: &std::os::fd::OwnedFd,
    cancel: &CancellationToken,
) -> Result<sandbox::Outcome, sandbox::SandboxError> {
    use std::io::Write as _;
    std::fs::create_dir_all(out).map_err(step_err("creating the step's output dir"))?;
    let step = Spec {
        out_dir: out.to_owned(),
        argv: ["/bin/sh", "-e", "-c", script].map(String::from).to_vec(),
        ..spec.clone()
    };
    let run = out.with_file_name(format!(
        "{}-run",
        out.file_name().unwrap_or_default().to_string_lossy()
    ));
    let dup = || log.try_clone().map_err(step_err("duplicating the log fd"));
    let mut note = std::fs::File::from(dup()?);
    let _ = writeln!(note, "kiln: {what}");
    let o = sandbox::run(&hub.kiln_exe, &step, &run, dup()?, cancel.clone()).await?;
    if !o.success() {
        let _ = writeln!(note, "kiln: {what} failed");
    }
    Ok(o)
}

/// An `rpm` task in two offline sandbox runs on fresh views of its
/// buildroot, as Koji does it: make the source RPM from the spec (skipped
/// for an uploaded `.src.rpm`), then rebuild it into binary RPMs for the
/// target's arch. Between the two, the source RPM's BuildRequires that the
/// target repo's own RPMs provide are picked (with what those need from
/// the same repo) and handed to the second run to install.
async fn run_rpm(
    hub: &Arc<Hub>,
    spec: &Spec,
    work: &Path,
    target: Option<&crate::model::Target>,
    inputs: Inputs<'_>,
    log: std::os::fd::OwnedFd,
    cancel: CancellationToken,
) -> Result<sandbox::Outcome, sandbox::SandboxError> {
    use std::io::Write as _;
    let mut note = std::fs::File::from(
        log.try_clone()
            .map_err(step_err("duplicating the log fd"))?,
    );
    let Some(t) = target else {
        return Ok(sandbox::Outcome::Infra(
            "an rpm task needs a target with a buildroot".into(),
        ));
    };
    let Some(arch) = crate::kinds::rpm_arch(&t.arch) else {
        return Ok(sandbox::Outcome::Infra(format!(
            "target {} has arch {}, which RPM has no name for",
            t.name, t.arch
        )));
    };
    let mut spec = spec.clone();
    spec.env.push(("KILN_RPM_ARCH".into(), arch.into()));
    let top_srpm = |dir: &Path| -> Option<PathBuf> {
        std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().ends_with(".src.rpm"))
    };
    let srpm = match top_srpm(&spec.build_dir) {
        Some(uploaded) => {
            let _ = writeln!(note, "kiln: building the uploaded source RPM");
            uploaded
        }
        None => {
            let out = work.join("srpm");
            let o = first_step(
                hub,
                &spec,
                "making the source RPM from the spec",
                crate::kinds::RPM_SRPM_SCRIPT,
                &out,
                &log,
                &cancel,
            )
            .await?;
            if !o.success() {
                return Ok(o);
            }
            let Some(made) = top_srpm(&out) else {
                let _ = writeln!(note, "kiln: rpmbuild -bs wrote no source RPM");
                return Ok(sandbox::Outcome::Exited(1));
            };
            spec.binds.push(sandbox::Bind {
                host: out,
                path: crate::kinds::RPM_SRPM_DIR.into(),
                writable: false,
            });
            made
        }
    };
    // BuildRequires from the project's repo.
    let requires = std::fs::read(&srpm)
        .map_err(step_err("reading the source RPM"))
        .and_then(|b| {
            crate::publish::rpm::inspect(&b)
                .map(|i| i.requires)
                .map_err(|e| step_err("reading the source RPM")(std::io::Error::other(e)))
        })?;
    let repo = match inputs {
        Inputs::Hub => target_repo_rpms(hub, t)
            .map_err(|e| step_err("reading the project repo")(std::io::Error::other(e)))?,
        Inputs::Remote {
            client,
            task,
            fence,
        } => client
            .worker_repo_rpms(task, fence)
            .await
            .map_err(|e| step_err("reading the project repo")(std::io::Error::other(e)))?,
    };
    let picked = crate::repos::build_requires(&repo, &requires);
    let deps = work.join("rpms");
    std::fs::create_dir_all(&deps).map_err(step_err("creating the rpms dir"))?;
    for p in &picked {
        let dest = deps.join(p.location.rsplit('/').next().unwrap_or(&p.location));
        match inputs {
            Inputs::Hub => {
                let bytes = hub
                    .cas
                    .get_bytes(&p.digest)
                    .map_err(|e| step_err("reading a project RPM")(std::io::Error::other(e)))?;
                std::fs::write(&dest, bytes).map_err(step_err("writing a project RPM"))?;
            }
            Inputs::Remote { client, .. } => {
                client
                    .worker_download(&p.digest, &dest)
                    .await
                    .map_err(|e| step_err("downloading a project RPM")(std::io::Error::other(e)))?;
            }
        }
        let _ = writeln!(
            note,
            "kiln: BuildRequires: {}.{} from repo {}/{}",
            p.nevr(),
            p.arch,
            t.project,
            t.repo
        );
    }
    spec.binds.push(sandbox::Bind {
        host: deps,
        path: crate::kinds::RPM_DEPS_DIR.into(),
        writable: false,
    });
    drop(note);
    sandbox::run(&hub.kiln_exe, &spec, work, log, cancel).await
}

/// The RPMs of target `t`'s repo a task on it may build-require: those
/// for its arch, and `noarch`.
pub(crate) fn target_repo_rpms(
    hub: &Hub,
    t: &crate::model::Target,
) -> Result<Vec<crate::model::RepoRpm>, DbError> {
    let arch = crate::kinds::rpm_arch(&t.arch);
    Ok(hub
        .db
        .repo_rpms(&t.project, &t.repo)?
        .into_iter()
        .filter(|p| Some(p.arch.as_str()) == arch || p.arch == "noarch")
        .collect())
}

/// Writes the flat `Packages` index of the target repo's packages for the
/// target's arch (and `all`) into `dir`; returns their pool paths and
/// blobs. Nothing is written when the repo has none.
async fn project_repo(
    hub: &Arc<Hub>,
    t: &crate::model::Target,
    inputs: Inputs<'_>,
    dir: &Path,
) -> std::io::Result<std::collections::HashMap<String, crate::cas::Digest>> {
    let debs = match inputs {
        Inputs::Hub => target_repo_debs(hub, t).map_err(std::io::Error::other)?,
        Inputs::Remote {
            client,
            task,
            fence,
        } => client
            .worker_repo(task, fence)
            .await
            .map_err(std::io::Error::other)?,
    };
    if !debs.is_empty() {
        std::fs::create_dir_all(dir)?;
        let index: String = debs.iter().map(|d| d.stanza.as_str()).collect();
        std::fs::write(dir.join("Packages"), index)?;
    }
    Ok(debs.into_iter().map(|d| (d.pool_path, d.digest)).collect())
}

/// The packages of target `t`'s repo a task on it may build-depend on:
/// those for its arch, and `all`.
pub(crate) fn target_repo_debs(
    hub: &Hub,
    t: &crate::model::Target,
) -> Result<Vec<RepoDeb>, DbError> {
    Ok(hub
        .db
        .repo_debs(&t.project, &t.repo)?
        .into_iter()
        .filter(|d| d.arch == t.arch || d.arch == "all")
        .collect())
}

/// Copies the build's output into its log until end-of-file. Past `kill_at`
/// bytes the sandbox is cancelled (the pipe is still drained, so the build
/// never blocks on it); returns whether that happened.
async fn pump_log(
    mut reader: tokio::net::unix::pipe::Receiver,
    mut log: LogWriter,
    kill_at: u64,
    cancel: CancellationToken,
) -> Result<(LogWriter, bool), ExecError> {
    let mut buf = vec![0u8; 64 * 1024];
    let (mut total, mut flooded) = (0u64, false);
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return Ok((log, flooded));
        }
        log.write(&buf[..n])?;
        total += n as u64;
        if total > kill_at && !flooded && !cancel.is_cancelled() {
            flooded = true;
            cancel.cancel();
        }
    }
}

fn map_outcome(o: sandbox::Outcome, limits: &crate::config::TaskLimits) -> Outcome {
    match o {
        sandbox::Outcome::Exited(0) => Outcome::Succeeded,
        sandbox::Outcome::Exited(c) => Outcome::ExitCode(c),
        sandbox::Outcome::Signaled(s) => Outcome::Signal(s),
        sandbox::Outcome::Cancelled => Outcome::Cancelled,
        sandbox::Outcome::Infra(m) => Outcome::Infrastructure(m),
        sandbox::Outcome::OutOfMemory => Outcome::OutOfMemory,
        sandbox::Outcome::PidLimit => Outcome::PidLimit,
        sandbox::Outcome::DiskLimit => {
            Outcome::DiskLimit(limits.disk_limit_bytes.unwrap_or_default())
        }
    }
}

/// A remote worker's slot: leases tasks from the hub behind `client` and
/// runs them against `local`, the worker's own store (its CAS keeps blobs
/// across tasks, so a source seen before is not fetched again), then
/// uploads what the hub lacks and reports the end under the lease's fence.
/// Runs until `local` shuts down.
pub async fn run_remote_slot(
    client: crate::client::Client,
    local: Arc<Hub>,
    slot: u32,
    name: String,
    info: Arc<crate::workers::WorkerInfo>,
    restart: CancellationToken,
) {
    loop {
        let lease = tokio::select! {
            _ = local.shutdown.cancelled() => return,
            // Self-update: take no new task; the running one has finished.
            _ = restart.cancelled() => return,
            l = client.worker_lease(&name, 25, Some(&info)) => l,
        };
        match lease {
            Ok(Some(l)) => {
                let task = l.task.id;
                if let Err(e) = run_remote_task(&client, &local, slot, &name, l).await {
                    tracing::error!(task, error = %e, "remote task failed outside the build");
                }
            }
            Ok(None) => {}
            Err(e) if e.status() == Some(401) => {
                // Revoked or unknown: this worker may not run; stop it all.
                tracing::error!(error = %e, "the hub refused this worker's token; stopping");
                eprintln!("kiln: the hub refused this worker's token: {e}");
                local.shutdown.cancel();
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot lease from the hub; retrying");
                tokio::select! {
                    _ = local.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error(transparent)]
    Client(#[from] crate::client::ClientError),
    #[error(transparent)]
    Cas(#[from] crate::cas::CasError),
    #[error("blob {0} from the hub does not match its digest")]
    Corrupt(crate::cas::Digest),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

async fn run_remote_task(
    client: &crate::client::Client,
    local: &Arc<Hub>,
    slot: u32,
    name: &str,
    l: crate::remote::WorkerLease,
) -> Result<(), RemoteError> {
    let (task, fence) = (l.task.id, l.fence);
    fetch_tree(client, &local.cas, &l.build.source).await?;
    let cancel = local.shutdown.child_token();
    let heartbeat = {
        let (client, cancel) = (client.clone(), cancel.clone());
        let every = Duration::from_millis((l.lease_ms / 3).max(100) as u64);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = client.worker_heartbeat(task, fence).await
                    && e.status() == Some(409)
                {
                    tracing::warn!(task, "lease lost; stopping the task");
                    cancel.cancel();
                    return;
                }
            }
        })
    };
    let leased = Leased {
        task: l.task,
        build: l.build,
        fence,
    };
    let finished = CancellationToken::new();
    let streamer = tokio::spawn(stream_log(
        client.clone(),
        local.clone(),
        task,
        fence,
        finished.clone(),
    ));
    let setting = Setting {
        target: l.target,
        limits: l.limits,
        inputs: Inputs::Remote {
            client,
            task,
            fence,
        },
    };
    let result = execute(local, slot, name, &leased, setting, cancel).await;
    heartbeat.abort();
    let (end, log) = match result {
        Ok(v) => v,
        Err(e) => (TaskEnd::infrastructure(e.to_string()), None),
    };
    // The log is complete and stored: closing it ends the live copy (no one
    // follows it on this side), which gets everything before the end is
    // reported.
    if let Some(log) = log {
        log.close();
    }
    finished.cancel();
    if tokio::time::timeout(Duration::from_secs(10), streamer)
        .await
        .is_err()
    {
        tracing::warn!(task, "the live log stream did not finish in time");
    }
    if local.shutdown.is_cancelled() {
        // The hub re-queues the task when the lease runs out.
        return Ok(());
    }
    // Everything the end names goes up first, only what the hub lacks.
    let named: Vec<crate::cas::Digest> = end
        .log
        .iter()
        .chain(end.outputs.iter())
        .chain(end.artifacts.iter().map(|a| &a.digest))
        .copied()
        .collect();
    for d in client.worker_missing(&named).await? {
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut local.cas.open_blob(&d)?, &mut data)?;
        client.worker_upload(&d, data).await?;
    }
    let report = crate::remote::EndReport {
        fence,
        outcome: end.outcome,
        log: end.log,
        outputs: end.outputs,
        files: end
            .artifacts
            .iter()
            .map(|a| crate::remote::OutputFile {
                path: a.path.clone(),
                digest: a.digest,
                size: a.size,
                mode: a.mode,
            })
            .collect(),
    };
    client.worker_end(task, &report).await?;
    Ok(())
}

/// Self-update: while the hub's version differs from this binary's,
/// downloads the hub's binary next to `exe` (`<exe>.kiln-update`),
/// checks its sha256 against what the hub names, and fires `restart`
/// so the slots finish their tasks and the worker execs the new binary.
/// Checks at start, then every `every`. Returns the staged file.
pub async fn watch_for_update(
    client: crate::client::Client,
    exe: PathBuf,
    every: Duration,
    restart: CancellationToken,
) -> Option<PathBuf> {
    let mine = crate::workers::self_version();
    loop {
        match client.worker_whoami().await {
            Ok(who) if who.hub_version != mine => match stage_update(&client, &exe).await {
                Ok(staged) => {
                    tracing::info!(from = %mine, to = %who.hub_version, "self-update staged; restarting when idle");
                    restart.cancel();
                    return Some(staged);
                }
                Err(e) => tracing::warn!(error = %e, "self-update failed; will retry"),
            },
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "version check failed"),
        }
        tokio::select! {
            _ = restart.cancelled() => return None,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

async fn stage_update(client: &crate::client::Client, exe: &Path) -> Result<PathBuf, RemoteError> {
    use futures_util::StreamExt;
    use sha2::Digest as _;
    use std::io::Write;
    let resp = client.worker_binary().await?;
    let want: crate::cas::Digest = resp
        .headers()
        .get(crate::remote::BINARY_DIGEST_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| std::io::Error::other("the hub sent no binary digest"))?;
    let staged = exe.with_extension("kiln-update");
    let mut f = std::fs::File::create(&staged)?;
    let mut h = sha2::Sha256::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk =
            chunk.map_err(|e| std::io::Error::other(format!("downloading the binary: {e}")))?;
        h.update(&chunk);
        f.write_all(&chunk)?;
    }
    f.sync_all()?;
    if crate::cas::Digest(h.finalize().into()) != want {
        let _ = std::fs::remove_file(&staged);
        return Err(RemoteError::Corrupt(want));
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o755))?;
    Ok(staged)
}

/// Copies task `task`'s local log to the hub as it grows (one streaming
/// request) until the log is closed; `finished` stops the wait for a log
/// that never started. Best effort: the complete log is uploaded at the
/// end regardless.
async fn stream_log(
    client: crate::client::Client,
    local: Arc<Hub>,
    task: crate::model::TaskId,
    fence: u64,
    finished: CancellationToken,
) {
    // The log appears when the task starts.
    let live = loop {
        if let Some(l) = local.logs.get(task) {
            break l;
        }
        if finished.is_cancelled() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let Ok(file) = std::fs::File::open(&live.path) else {
        return;
    };
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let body = reqwest::Body::wrap_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    let send = tokio::spawn(async move { client.worker_log(task, fence, body).await });
    crate::logs::follow_live(file, live.subscribe(), true, &tx).await;
    drop(tx);
    if let Ok(Err(e)) = send.await {
        tracing::debug!(task, error = %e, "live log stream refused");
    }
}

/// Makes the tree `digest` and its files present in the local store,
/// fetching from the hub only what is missing (each blob verified).
async fn fetch_tree(
    client: &crate::client::Client,
    cas: &Cas,
    digest: &crate::cas::Digest,
) -> Result<(), RemoteError> {
    client.fetch_blob(cas, digest).await?;
    for e in cas.get_tree(digest)?.entries {
        if let crate::cas::EntryKind::File { digest, .. } = e.kind {
            client.fetch_blob(cas, &digest).await?;
        }
    }
    Ok(())
}

/// Where `kiln build DIR` keeps its store when no hub runs.
pub fn local_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(x).join("kiln");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/".into());
    home.join(".local/share/kiln")
}

/// Writes a build's artifacts into `dest` (relative paths kept).
pub fn export_artifacts(cas: &Cas, artifacts: &[Artifact], dest: &Path) -> Result<(), ExecError> {
    use std::os::unix::fs::PermissionsExt;
    for a in artifacts {
        let path = dest.join(&a.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut reader = cas.open_blob(&a.digest)?;
        let tmp = path.with_extension("kiln-partial");
        let mut f = std::fs::File::create(&tmp)?;
        std::io::copy(&mut reader, &mut f)?;
        f.set_permissions(std::fs::Permissions::from_mode(a.mode & 0o777))?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(())
}
