//! Turning submissions into queued work, and handing queued tasks to
//! workers under leases. Local slots and (later) remote workers take tasks
//! through the same `lease` call.

use std::sync::Arc;

use crate::cas::{CasError, PendingTree};
use crate::db::{DbError, Leased};
use crate::hub::{Hub, HubError};
use crate::kinds::{Recipe, RecipeError, validate_name};
use crate::model::{Build, HOST_TARGET, PackageKind};
use crate::workers::{AdminState, Needs};

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    #[error("{0}")]
    BadName(String),
    #[error(transparent)]
    Cas(#[from] CasError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Git(#[from] crate::gitsrc::GitError),
}

/// What a submitter names; the recipe may name the package itself.
pub struct Submission {
    pub project: String,
    /// Used when kiln.toml has no `[package] name`.
    pub package: Option<String>,
    pub submitted_by: String,
    /// Targets to build for; none: `host` (script builds).
    pub targets: Vec<String>,
    /// The git URL, ref and commit the tree came from, if any.
    pub origin: Option<crate::gitsrc::GitOrigin>,
}

/// An `rpm` build needs a target whose arch RPM knows and whose buildroot
/// has rpmbuild.
fn check_rpm_target(hub: &Hub, t: &crate::model::Target) -> Result<(), SubmitError> {
    if crate::kinds::rpm_arch(&t.arch).is_none() {
        return Err(SubmitError::BadName(format!(
            "target {} has arch {:?}, which RPM has no name for (kiln knows amd64, arm64, i386, ppc64el, s390x, armhf, riscv64)",
            t.name, t.arch
        )));
    }
    if t.buildroot == HOST_TARGET {
        return Err(SubmitError::BadName(format!(
            "target {} builds on the host; an RPM builds in a buildroot (kiln buildroot create … --include rpm, or --bootstrap rpm)",
            t.name
        )));
    }
    if let Some(br) = hub
        .db
        .buildroot(&t.buildroot)?
        .filter(|b| b.ready.is_some())
        && !crate::buildroot::root_path(hub, &br)
            .join("usr/bin/rpmbuild")
            .exists()
    {
        return Err(SubmitError::BadName(format!(
            "target {}: buildroot {} has no rpmbuild (make it with --include rpm, or --bootstrap rpm)",
            t.name, t.buildroot
        )));
    }
    Ok(())
}

/// Validates the recipe of an ingested (not yet committed) tree, commits its
/// blobs, and records the build with its queued task in one transaction.
/// Blobs are durable before the database refers to them; a rejected
/// submission commits nothing.
pub fn submit(hub: &Hub, sub: Submission, pending: PendingTree) -> Result<Build, SubmitError> {
    validate_name(&sub.project).map_err(|m| SubmitError::BadName(format!("project {m}")))?;
    let recipe = Recipe::of_tree(&pending.tree, |p| {
        pending
            .read_file(p)
            .map_err(|e| RecipeError::Read(e.to_string()))
    })?;
    let package = match (&recipe.package.name, &sub.package) {
        (Some(n), _) => n.clone(),
        (None, Some(n)) => {
            validate_name(n).map_err(|m| SubmitError::BadName(format!("package {m}")))?;
            n.clone()
        }
        (None, None) => {
            return Err(SubmitError::BadName(
                "package name missing: give one, or set [package] name in kiln.toml".into(),
            ));
        }
    };
    let mut targets = sub.targets.clone();
    if targets.is_empty() {
        if matches!(recipe.kind(), PackageKind::Deb | PackageKind::Rpm) {
            // A deb or an rpm builds on every buildroot target of its project.
            targets = hub
                .db
                .targets(&sub.project)?
                .into_iter()
                .filter(|t| t.buildroot != HOST_TARGET)
                .map(|t| t.name)
                .collect();
            if targets.is_empty() {
                return Err(SubmitError::BadName(format!(
                    "project {} has no target with a buildroot to build a {} package on (kiln target add)",
                    sub.project,
                    if recipe.kind() == PackageKind::Rpm {
                        "RPM"
                    } else {
                        "Debian"
                    }
                )));
            }
        } else {
            targets.push(HOST_TARGET.to_string());
        }
    }
    targets.sort();
    targets.dedup();
    for t in &targets {
        if t == HOST_TARGET {
            continue;
        }
        let Some(target) = hub.db.target(&sub.project, t)? else {
            return Err(SubmitError::BadName(format!(
                "project {} has no target {t:?} (kiln target list {})",
                sub.project, sub.project
            )));
        };
        if recipe.kind() == PackageKind::Rpm {
            check_rpm_target(hub, &target)?;
        }
    }
    let sde = pending.max_mtime.max(0);
    let source = pending.commit()?;
    let build = hub.db.create_build(
        &sub.project,
        &package,
        recipe.kind(),
        source,
        sde,
        &sub.submitted_by,
        &targets.iter().map(String::as_str).collect::<Vec<_>>(),
        sub.origin.as_ref(),
    )?;
    hub.queued.notify_waiters();
    hub.changed();
    Ok(build)
}

/// Queues build `of` again: the same source tree, targets and origin, as
/// a new build submitted by `by`.
pub fn rebuild(hub: &Hub, of: crate::model::BuildId, by: &str) -> Result<Build, SubmitError> {
    let d = hub.db.build_detail(of)?;
    let targets: Vec<&str> = d.task_list.iter().map(|t| t.target.as_str()).collect();
    let b = &d.build;
    let build = hub.db.create_build(
        &b.project,
        &b.package,
        b.kind,
        b.source,
        b.source_date_epoch,
        by,
        &targets,
        d.origin.as_ref(),
    )?;
    hub.queued.notify_waiters();
    hub.changed();
    Ok(build)
}

/// Leases the next queued task the hub's own slots can run (`worker` is
/// `local`), unless an admin drained or disabled them.
pub fn lease(hub: &Arc<Hub>, worker: &str) -> Result<Option<Leased>, HubError> {
    if hub.worker_contact(worker, None)?.admin != AdminState::Enabled {
        return Ok(None);
    }
    let lease_ms = hub.config.build.lease_ms();
    let h = hub.clone();
    let runs: crate::db::Runs = Arc::new(move |n: &Needs| h.local_info.unmet(n).is_none());
    let leased = hub.db.lease_next_where(worker, lease_ms, Some(runs))?;
    if leased.is_some() {
        hub.changed();
    }
    Ok(leased)
}

/// Ends every task whose worker stopped heartbeating (a remote worker that
/// died or lost its link) as an infrastructure failure: it is re-queued
/// while attempts remain, and the worker's late end is refused by the
/// fence. Each round also syncs what leases and heartbeats committed
/// without a sync. Runs until the hub shuts down.
pub async fn reap_expired_leases(hub: Arc<Hub>) {
    let every = std::time::Duration::from_millis((hub.config.build.lease_secs * 250).max(100));
    loop {
        tokio::select! {
            _ = hub.shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let h = hub.clone();
        let reaped = tokio::task::spawn_blocking(move || -> Result<usize, DbError> {
            h.db.sync()?;
            let expired = h.db.expired_leases(crate::model::now_ms())?;
            let max = h.config.build.max_attempts;
            for (task, fence, worker) in &expired {
                let end = crate::db::TaskEnd::infrastructure(format!(
                    "lease expired: worker {worker} stopped answering"
                ));
                match h.db.finish_task(*task, *fence, end, max) {
                    Ok(_) | Err(DbError::StaleLease { .. }) => {}
                    Err(e) => return Err(e),
                }
                tracing::warn!(task, %worker, "lease expired; task ended as an infrastructure failure");
            }
            Ok(expired.len())
        })
        .await;
        match reaped {
            Ok(Ok(0)) => {}
            Ok(Ok(_)) => {
                hub.queued.notify_waiters();
                hub.changed();
            }
            Ok(Err(e)) => tracing::error!(error = %e, "cannot reap expired leases"),
            Err(e) => tracing::error!(error = %e, "lease reaper panicked"),
        }
    }
}

/// Why a queued task is not running yet, in words: no worker that may
/// take tasks meets its needs (the same rules routing uses), or its place
/// in its project's queue.
pub fn why_waiting(hub: &Hub, task: crate::model::TaskId) -> Result<Option<String>, HubError> {
    why_waiting_among(hub, task, &hub.candidate_workers()?)
}

/// [`why_waiting`] given the workers that could take tasks now (read once
/// for a page that explains many tasks).
pub fn why_waiting_among(
    hub: &Hub,
    task: crate::model::TaskId,
    candidates: &[crate::workers::WorkerInfo],
) -> Result<Option<String>, HubError> {
    let Some(q) = hub.db.queue_position(task)? else {
        return Ok(None);
    };
    let needs = hub.db.task_needs(task)?;
    let arch = needs.arch.as_deref().unwrap_or("any arch");
    let place = format!(
        "position {} of {} in project {}'s queue for {arch}",
        q.position, q.lane_len, q.project
    );
    if let Some(why) =
        crate::workers::why_not_runnable(&needs, &candidates.iter().collect::<Vec<_>>())
    {
        return Ok(Some(format!("{why}; {place}")));
    }
    let mut why = place;
    if q.projects > 1 {
        why.push_str(&format!(
            " ({} projects are waiting; a free slot goes to the one running the fewest tasks)",
            q.projects
        ));
    }
    let eligible: Vec<&crate::workers::WorkerInfo> = candidates
        .iter()
        .filter(|w| w.unmet(&needs).is_none())
        .collect();
    let slots: u32 = eligible.iter().map(|w| w.slots).sum();
    why.push_str(&format!(
        "; all {slots} slot(s) of the {} worker(s) that can run it are busy",
        eligible.len()
    ));
    Ok(Some(why))
}
