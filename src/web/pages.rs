//! The read-only pages: dashboard, builds, a build, projects, a project, a
//! package, workers, a worker, repos, a repo, buildroots, search. Lists
//! page newest-first through index tables (`?before=ID`), never scanning
//! every build.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use serde::Deserialize;

use super::{Viewer, WebResult, csrf_field, fmt_duration, fmt_size, fmt_time, layout, state_badge};
use crate::db::Page;
use crate::hub::Hub;
use crate::model::{Build, BuildState, Task};
use crate::workers::WorkerState;

/// Rows per list page.
const PAGE: usize = 50;
/// Queued tasks the dashboard explains (the queue's head; the count shows the rest).
const QUEUED_SHOWN: usize = 10;

#[derive(Deserialize, Default)]
pub struct Paging {
    pub before: Option<u64>,
}

fn builds_table(builds: &[Build]) -> Markup {
    html! {
        @if builds.is_empty() {
            p.empty { "No builds yet." }
        } @else {
            table {
                thead { tr { th { "#" } th { "project" } th { "package" } th { "state" } th { "submitted" } th { "by" } th { "took" } } }
                tbody {
                    @for b in builds {
                        tr {
                            td { a href={ "/builds/" (b.id) } { (b.id) } }
                            td { a href={ "/projects/" (b.project) } { (b.project) } }
                            td { a href={ "/packages/" (b.project) "/" (b.package) } { (b.package) } }
                            td { (state_badge(b.state)) }
                            td { (fmt_time(b.created)) }
                            td { (b.submitted_by) }
                            td { (fmt_duration(b.started, b.finished)) }
                        }
                    }
                }
            }
        }
    }
}

fn next_link(base: &str, page: &Page<Build>) -> Markup {
    html! {
        @if let Some(n) = page.next {
            p.pager { a rel="next" href={ (base) "?before=" (n) } { "Older builds →" } }
        }
    }
}

/// The submit form: a git URL and ref, or a tarball upload.
pub(crate) fn submit_form(viewer: &Viewer, action: &str, project: Option<&str>) -> Markup {
    html! {
        details.submit {
            summary { "Submit a build" }
            form method="post" action=(action) enctype="multipart/form-data" {
                (csrf_field(Some(viewer)))
                @if project.is_none() {
                    label { "Project " input name="project" required pattern="[A-Za-z0-9][A-Za-z0-9._+-]*" placeholder="default"; }
                }
                label { "Git URL " input name="git" type="url" placeholder="https://…/repo.git"; }
                label { "Ref " input name="ref" placeholder="HEAD"; }
                label { "or a source tarball (.tar, .tar.gz) " input name="tarball" type="file"; }
                label { "Package name " input name="package" placeholder="from the source"; }
                button type="submit" { "Submit" }
            }
        }
    }
}

pub async fn dashboard(viewer: Viewer, State(hub): State<Arc<Hub>>) -> WebResult {
    viewer.read(&hub, "/")?;
    let h = hub.clone();
    let (running, queued, recent, workers, repos) = tokio::task::spawn_blocking(move || {
        let running = h.db.running_tasks(50)?;
        let candidates = h.candidate_workers()?;
        let queued: Vec<(Task, Option<String>)> =
            h.db.queued_tasks(QUEUED_SHOWN)?
                .into_iter()
                .map(|t| {
                    let why = crate::scheduler::why_waiting_among(&h, t.id, &candidates)
                        .ok()
                        .flatten();
                    (t, why)
                })
                .collect();
        let recent = h.db.builds_page(None, 15)?;
        let workers = h.directory()?;
        let repos = h.db.all_repos()?;
        Ok::<_, super::WebError>((running, queued, recent, workers, repos))
    })
    .await??;
    let queue_len = hub.db.queue_len()?;
    let active = !running.is_empty() || queue_len > 0;
    let count = |s: WorkerState| workers.iter().filter(|w| w.state == s).count();
    Ok(layout(
        Some(&viewer),
        "dashboard",
        active,
        html! {
            h1 { "Dashboard" }
            @if viewer.who != crate::accounts::Principal::Anonymous {
                (submit_form(&viewer, "/submit", None))
            }
            section {
                h2 { "Running (" (running.len()) ")" }
                @if running.is_empty() { p.empty { "Nothing is running." } } @else {
                    table {
                        thead { tr { th { "build" } th { "task" } th { "target" } th { "worker" } th { "running for" } } }
                        tbody { @for t in &running { tr {
                            td { a href={ "/builds/" (t.build) } { (t.build) } }
                            td { (t.id) }
                            td { (t.target) }
                            td { @if let Some(w) = &t.worker { a href={ "/workers/" (w) } { (w) } } }
                            td { (fmt_duration(t.started, None)) }
                        } } }
                    }
                }
            }
            section {
                h2 { "Queued (" (queue_len) ")" }
                @if queued.is_empty() { p.empty { "The queue is empty." } } @else {
                    table {
                        thead { tr { th { "build" } th { "task" } th { "target" } th { "why it waits" } } }
                        tbody { @for (t, why) in &queued { tr {
                            td { a href={ "/builds/" (t.build) } { (t.build) } }
                            td { (t.id) }
                            td { (t.target) }
                            td.why { (why.as_deref().unwrap_or("next in line")) }
                        } } }
                    }
                }
            }
            section {
                h2 { "Recent builds" }
                (builds_table(&recent.items))
                p { a href="/builds" { "All builds →" } }
            }
            section.cols {
                div {
                    h2 { "Workers" }
                    p {
                        (count(WorkerState::Busy)) " busy · " (count(WorkerState::Idle)) " idle · "
                        (count(WorkerState::Offline)) " offline · "
                        (count(WorkerState::Draining) + count(WorkerState::Disabled)) " drained or disabled"
                    }
                    ul.plain { @for w in &workers { li {
                        a href={ "/workers/" (w.name) } { (w.name) } " "
                        span class={ "wstate " (w.state) } { (w.state) }
                        " rating " (format!("{:.0}", w.qos.rating))
                    } } }
                }
                div {
                    h2 { "Repos" }
                    @if repos.is_empty() { p.empty { "No repos yet." } }
                    ul.plain { @for r in &repos { li {
                        a href={ "/repos/" (r.project) "/" (r.name) } { (r.project) "/" (r.name) } " "
                        @if r.published_revision < r.revision {
                            span.state.running { "publishing" }
                        } @else {
                            span.state.succeeded { "published" }
                            @if let Some(t) = r.published { " " (fmt_time(t)) }
                        }
                    } } }
                }
            }
        },
    ))
}

pub async fn builds(
    viewer: Viewer,
    State(hub): State<Arc<Hub>>,
    Query(p): Query<Paging>,
) -> WebResult {
    viewer.read(&hub, "/builds")?;
    let page = hub.db.builds_page(p.before, PAGE)?;
    Ok(layout(
        Some(&viewer),
        "builds",
        false,
        html! {
            h1 { "Builds" }
            (builds_table(&page.items))
            (next_link("/builds", &page))
        },
    ))
}

pub async fn build(
    viewer: Viewer,
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> WebResult {
    let id = crate::server::parse_id(&id)?;
    viewer.read(&hub, &format!("/builds/{id}"))?;
    let detail = hub.db.build_detail(id)?;
    let artifacts = hub.db.artifacts(id)?;
    let b = &detail.build;
    let mut waiting = Vec::new();
    for t in &detail.task_list {
        if t.state == BuildState::Queued
            && let Some(w) = crate::scheduler::why_waiting(&hub, t.id)?
        {
            waiting.push((t.target.clone(), w));
        }
    }
    let mut repos: Vec<crate::repos::RepoSources> = Vec::new();
    for t in &detail.task_list {
        if let Some(target) = hub.db.target(&b.project, &t.target)? {
            let s = crate::repos::sources(
                &crate::server::base_url(&hub, &headers),
                &b.project,
                &target.repo,
            );
            if !repos.contains(&s) {
                repos.push(s);
            }
        }
    }
    let steer = crate::server::require_steer(&hub, &viewer.who, &b.project, "").is_ok();
    let may_build = viewer.who.can_build(&hub, &b.project)?;
    let h = hub.clone();
    let tasks = detail.task_list.clone();
    let (log, truncated) =
        tokio::task::spawn_blocking(move || super::log::page_log(&h, &tasks)).await?;
    let first_failed = detail.task_list.iter().find_map(|t| match &t.outcome {
        Some(o) if !o.succeeded() => Some((t.target.clone(), o.to_string())),
        _ => None,
    });
    Ok(layout(
        Some(&viewer),
        &format!("build {}", b.id),
        !b.state.is_finished(),
        html! {
            h1 { "Build " (b.id) " " (state_badge(b.state)) }
            @if let Some((target, why)) = &first_failed {
                p.failure { "Failed on " (target) ": " (why) " — " a href={ "/builds/" (b.id) "/log#first-error" } { "jump to the first error" } }
            }
            dl {
                dt { "project" } dd { a href={ "/projects/" (b.project) } { (b.project) } }
                dt { "package" } dd { a href={ "/packages/" (b.project) "/" (b.package) } { (b.package) } " (" (b.kind) ")" }
                dt { "source" } dd {
                    @if let Some(o) = &detail.origin {
                        (o.url) " " (o.git_ref) " → commit " code { (o.commit) } br;
                    }
                    code.digest { (b.source) }
                }
                dt { "submitted" } dd { (fmt_time(b.created)) " by " (b.submitted_by) }
                @for (target, why) in &waiting { dt { "waiting" } dd.why { (target) ": " (why) } }
            }
            div.actions {
                @if steer && !b.state.is_finished() {
                    form method="post" action={ "/builds/" (b.id) "/cancel" } {
                        (csrf_field(Some(&viewer)))
                        button.danger type="submit" { "Cancel build" }
                    }
                }
                @if may_build {
                    form method="post" action={ "/builds/" (b.id) "/rebuild" } {
                        (csrf_field(Some(&viewer)))
                        button type="submit" { "Rebuild" }
                    }
                }
            }
            h2 { "Tasks" }
            table {
                thead { tr { th { "task" } th { "target" } th { "state" } th { "attempt" } th { "worker" } th { "result" } th { "took" } @if steer { th {} } } }
                tbody {
                    @for t in &detail.task_list {
                        tr {
                            td { (t.id) }
                            td { (t.target) }
                            td { (state_badge(t.state)) }
                            td { (t.attempt) }
                            td { @if let Some(w) = &t.worker { a href={ "/workers/" (w) } { (w) } } }
                            td { @if let Some(o) = &t.outcome { (o) } }
                            td { (fmt_duration(t.started, t.finished)) }
                            @if steer { td {
                                @if t.state != BuildState::Queued {
                                    form.inline method="post" action={ "/builds/" (b.id) "/requeue" } {
                                        (csrf_field(Some(&viewer)))
                                        input type="hidden" name="task" value=(t.id);
                                        button.link type="submit" { "re-queue" }
                                    }
                                }
                            } }
                        }
                    }
                }
            }
            h2 { "Artifacts" }
            @if artifacts.is_empty() {
                p.empty { "none" }
            } @else {
                table {
                    thead { tr { th { "path" } th { "size" } th { "sha256" } } }
                    tbody {
                        @for a in &artifacts {
                            tr {
                                td { a href={ "/api/v1/builds/" (b.id) "/artifacts/" (a.path) } { (a.path) } }
                                td.num { (fmt_size(a.size)) }
                                td { code.digest { (a.digest) } }
                            }
                        }
                    }
                }
            }
            @if !repos.is_empty() {
                h2 { "Install from its repository" }
                @for s in &repos {
                    @if b.kind == crate::model::PackageKind::Rpm { (dnf_lines(s)) } @else { (apt_lines(s)) }
                }
            }
            h2 { "Log" }
            p {
                a href={ "/builds/" (b.id) "/log" } { "Log viewer (live, search, first error)" } " · "
                a href={ "/api/v1/builds/" (b.id) "/log" } { "plain text" }
            }
            @if truncated { p.empty { "… earlier output cut here; the viewer and the plain-text log have all of it" } }
            pre.log { (log) }
        },
    ))
}

/// How to use a repo with dnf: its `.repo` file, which names the key.
fn dnf_lines(s: &crate::repos::RepoSources) -> Markup {
    html! {
        p { "Fetch " a href=(s.dnf_repo_url) { (s.dnf_repo_url) } " into " code { "/etc/yum.repos.d/" } ":" }
        pre.copy { "curl -fsSL " (s.dnf_repo_url) " -o /etc/yum.repos.d/" (s.dnf_repo_url.rsplit('/').next().unwrap_or("kiln.repo")) }
        p { "It says:" }
        pre.copy { (s.dnf_repo) }
    }
}

/// How to use an apt repo: the key, then the sources line or paragraph.
fn apt_lines(s: &crate::repos::RepoSources) -> Markup {
    html! {
        p { "Key: " a href=(s.key_url) { (s.key_url) } }
        pre.copy { (s.key_install) }
        p { "Then, in " code { "/etc/apt/sources.list.d/*.list" } ":" }
        pre.copy { (s.list_line) }
        p { "or, in " code { "/etc/apt/sources.list.d/*.sources" } ":" }
        pre.copy { (s.deb822) }
    }
}

pub async fn projects(viewer: Viewer, State(hub): State<Arc<Hub>>) -> WebResult {
    viewer.read(&hub, "/projects")?;
    let projects = hub.db.projects()?;
    Ok(layout(
        Some(&viewer),
        "projects",
        false,
        html! {
            h1 { "Projects" }
            @if projects.is_empty() { p.empty { "No projects yet: the first build makes one." } }
            ul.plain { @for p in &projects { li {
                a href={ "/projects/" (p.name) } { (p.name) } " " span.muted { "since " (fmt_time(p.created)) }
            } } }
        },
    ))
}

pub async fn project(
    viewer: Viewer,
    State(hub): State<Arc<Hub>>,
    Path(name): Path<String>,
    Query(p): Query<Paging>,
) -> WebResult {
    viewer.read(&hub, &format!("/projects/{name}"))?;
    let project = hub
        .db
        .project(&name)?
        .ok_or_else(|| crate::db::DbError::ProjectNotFound(name.clone()))?;
    let packages = hub.db.packages(&name)?;
    let targets = hub.db.targets(&name)?;
    let members = hub.db.members(&name)?;
    let repos: Vec<_> = hub
        .db
        .all_repos()?
        .into_iter()
        .filter(|r| r.project == name)
        .collect();
    let page = hub.db.project_builds(&name, p.before, PAGE)?;
    let owns = viewer.who.owns(&hub, &name)?;
    let may_build = viewer.who.can_build(&hub, &name)?;
    Ok(layout(
        Some(&viewer),
        &format!("project {name}"),
        false,
        html! {
            h1 { "Project " (project.name) }
            @if may_build { (submit_form(&viewer, &format!("/projects/{name}/submit"), Some(&name))) }
            section.cols {
                div {
                    h2 { "Packages" }
                    @if packages.is_empty() { p.empty { "none" } }
                    ul.plain { @for pk in &packages { li {
                        a href={ "/packages/" (name) "/" (pk.name) } { (pk.name) } " " span.muted { (pk.kind) }
                    } } }
                }
                div {
                    h2 { "Targets" }
                    @if targets.is_empty() { p.empty { "only " code { "host" } " (script builds)" } }
                    ul.plain { @for t in &targets { li {
                        (t.name) ": buildroot " (t.buildroot) ", " (t.arch) " → repo "
                        a href={ "/repos/" (name) "/" (t.repo) } { (t.repo) }
                    } } }
                    h2 { "Repos" }
                    ul.plain { @for r in &repos { li { a href={ "/repos/" (name) "/" (r.name) } { (r.name) } } } }
                }
                div {
                    h2 { "Members" }
                    @if members.is_empty() { p.empty { "none (admins only)" } }
                    ul.plain { @for (u, role) in &members { li { (u) " " span.muted { (role.as_str()) } } } }
                    @if owns {
                        form method="post" action={ "/projects/" (name) "/members" } {
                            (csrf_field(Some(&viewer)))
                            label { "User " input name="user" required; }
                            select name="role" aria-label="Role" {
                                option value="member" { "member" }
                                option value="owner" { "owner" }
                                option value="none" { "remove" }
                            }
                            button type="submit" { "Set" }
                        }
                    }
                }
            }
            h2 { "Builds" }
            (builds_table(&page.items))
            (next_link(&format!("/projects/{name}"), &page))
        },
    ))
}

/// How far back the package page looks for each target's last good build.
const LAST_GOOD_SCAN: usize = 500;

pub async fn package(
    viewer: Viewer,
    State(hub): State<Arc<Hub>>,
    Path((project, name)): Path<(String, String)>,
    Query(p): Query<Paging>,
) -> WebResult {
    viewer.read(&hub, &format!("/packages/{project}/{name}"))?;
    let pkg = hub
        .db
        .package(&project, &name)?
        .ok_or_else(|| crate::db::DbError::NotFound(format!("package {project}/{name}")))?;
    let page = hub.db.package_builds(&project, &name, p.before, PAGE)?;
    // The last build that succeeded on each target, newest first.
    let h = hub.clone();
    let (pj, nm) = (project.clone(), name.clone());
    let last_good = tokio::task::spawn_blocking(move || {
        let mut good: Vec<(String, Build, i64)> = Vec::new();
        let recent = h.db.package_builds(&pj, &nm, None, LAST_GOOD_SCAN)?;
        // The targets the package builds for now (its newest build's):
        // the scan stops once each has its good build.
        let mut wanted = match recent.items.first() {
            Some(b) => h.db.build_detail(b.id)?.task_list.len(),
            None => 0,
        };
        for b in recent.items {
            if wanted == 0 {
                break;
            }
            for tid in &b.tasks {
                let t = h.db.task(*tid)?;
                if t.state == BuildState::Succeeded && !good.iter().any(|(g, _, _)| *g == t.target)
                {
                    good.push((t.target.clone(), b.clone(), t.finished.unwrap_or(b.created)));
                    wanted = wanted.saturating_sub(1);
                }
            }
        }
        Ok::<_, crate::db::DbError>(good)
    })
    .await??;
    Ok(layout(
        Some(&viewer),
        &format!("package {name}"),
        false,
        html! {
            h1 { "Package " (pkg.name) " " span.muted { "in " a href={ "/projects/" (project) } { (project) } " · " (pkg.kind) } }
            h2 { "Last good build per target" }
            @if last_good.is_empty() { p.empty { "none yet" } }
            ul.plain { @for (target, b, at) in &last_good { li {
                (target) ": " a href={ "/builds/" (b.id) } { "build " (b.id) } " " span.muted { (fmt_time(*at)) }
            } } }
            h2 { "History" }
            (builds_table(&page.items))
            (next_link(&format!("/packages/{project}/{name}"), &page))
        },
    ))
}

pub async fn workers(viewer: Viewer, State(hub): State<Arc<Hub>>) -> WebResult {
    viewer.read(&hub, "/workers")?;
    let h = hub.clone();
    let workers = tokio::task::spawn_blocking(move || h.directory()).await??;
    Ok(layout(
        Some(&viewer),
        "workers",
        false,
        html! {
            h1 { "Workers" }
            @if workers.is_empty() { p.empty { "No worker has been seen yet." } }
            table {
                thead { tr { th { "name" } th { "state" } th { "arch" } th { "cores" } th { "memory" } th { "running" } th { "success" } th { "infra failures" } th { "rating" } th { "last seen" } } }
                tbody { @for w in &workers { tr {
                    td { a href={ "/workers/" (w.name) } { (w.name) } }
                    td { span class={ "wstate " (w.state) } { (w.state) } }
                    td { @if let Some(i) = &w.info { (i.arch) } }
                    td.num { @if let Some(i) = &w.info { (i.cores) } }
                    td.num { @if let Some(i) = &w.info { (fmt_size(i.memory_bytes)) } }
                    td.num { (w.running) }
                    td.num { @if let Some(r) = w.qos.success_rate { (format!("{:.0} %", r * 100.0)) } }
                    td.num { (w.qos.infra_failures) }
                    td.num { (format!("{:.0}", w.qos.rating)) }
                    td { (fmt_time(w.last_seen)) }
                } } }
            }
        },
    ))
}

pub async fn worker(
    viewer: Viewer,
    State(hub): State<Arc<Hub>>,
    Path(name): Path<String>,
) -> WebResult {
    viewer.read(&hub, &format!("/workers/{name}"))?;
    let h = hub.clone();
    let all = tokio::task::spawn_blocking(move || h.directory()).await??;
    let w = all
        .into_iter()
        .find(|w| w.name == name)
        .ok_or_else(|| crate::db::DbError::NotFound(format!("worker {name:?}")))?;
    let running = hub.db.running_on(&name)?;
    let admin = viewer.who.is_admin();
    Ok(layout(
        Some(&viewer),
        &format!("worker {name}"),
        false,
        html! {
            h1 { "Worker " (w.name) " " span class={ "wstate " (w.state) } { (w.state) } }
            @if admin {
                div.actions {
                    @for action in ["drain", "enable", "disable"] {
                        form method="post" action={ "/workers/" (w.name) "/" (action) } {
                            (csrf_field(Some(&viewer)))
                            button type="submit" { (action) }
                        }
                    }
                }
            }
            section.cols {
                div {
                    h2 { "Configuration" }
                    @if let Some(i) = &w.info {
                        dl {
                            dt { "arch" } dd { (i.arch) }
                            dt { "OS" } dd { (i.os) }
                            dt { "kernel" } dd { (i.kernel) }
                            dt { "cores" } dd { (i.cores) }
                            dt { "memory" } dd { (fmt_size(i.memory_bytes)) }
                            dt { "free disk" } dd { (fmt_size(i.disk_free_bytes)) }
                            dt { "slots" } dd { (i.slots) }
                            dt { "kiln" } dd { code { (i.version) } }
                            dt { "features" } dd { (i.features.join(", ")) }
                            dt { "buildroot tasks" } dd { (if i.buildroots { "yes" } else { "no" }) }
                        }
                    } @else { p.empty { "not reported yet" } }
                    p.muted { "first seen " (fmt_time(w.first_seen)) ", last seen " (fmt_time(w.last_seen)) }
                }
                div {
                    h2 { "Quality of service" }
                    dl {
                        dt { "rating" } dd { (format!("{:.0}", w.qos.rating)) " / 100" }
                        dt { "success rate" } dd { @if let Some(r) = w.qos.success_rate { (format!("{:.1} %", r * 100.0)) } @else { "—" } }
                        dt { "speed factor" } dd { @if let Some(s) = w.qos.speed_factor { (format!("{s:.2}")) } @else { "—" } }
                        dt { "uptime" } dd { (format!("{:.1} %", w.qos.uptime * 100.0)) }
                        dt { "MTBF" } dd { @if let Some(m) = w.qos.mtbf_secs { (format!("{:.0} s", m)) } @else { "no failures" } }
                    }
                    h2 { "History" }
                    dl {
                        dt { "succeeded" } dd { (w.stats.succeeded) }
                        dt { "failed" } dd { (w.stats.failed) }
                        dt { "infrastructure" } dd { (w.stats.infra) }
                        dt { "cancelled" } dd { (w.stats.cancelled) }
                    }
                }
            }
            h2 { "Running now" }
            @if running.is_empty() { p.empty { "nothing" } }
            ul.plain { @for t in &running { li { "task " (t) } } }
        },
    ))
}

pub async fn repos(viewer: Viewer, State(hub): State<Arc<Hub>>) -> WebResult {
    viewer.read(&hub, "/repos")?;
    let repos = hub.db.all_repos()?;
    Ok(layout(
        Some(&viewer),
        "repos",
        false,
        html! {
            h1 { "Repositories" }
            @if repos.is_empty() { p.empty { "No repos: a target names one (kiln target add)." } }
            table {
                thead { tr { th { "repo" } th { "architectures" } th { "revision" } th { "published" } } }
                tbody { @for r in &repos { tr {
                    td { a href={ "/repos/" (r.project) "/" (r.name) } { (r.project) "/" (r.name) } }
                    td { (r.architectures.join(", ")) }
                    td.num { (r.revision) }
                    td { @if r.published_revision < r.revision { "publishing…" } @else if let Some(t) = r.published { (fmt_time(t)) } }
                } } }
            }
        },
    ))
}

pub async fn repo(
    viewer: Viewer,
    State(hub): State<Arc<Hub>>,
    Path((project, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> WebResult<axum::response::Response> {
    if let Some(file) = crate::server::dnf_repo_file(&hub, &project, &name, &headers)? {
        return Ok(file);
    }
    viewer.read(&hub, &format!("/repos/{project}/{name}"))?;
    let repo = hub
        .db
        .repo(&project, &name)?
        .ok_or_else(|| crate::db::DbError::NotFound(format!("repo {project}/{name}")))?;
    let debs = hub.db.repo_debs(&project, &name)?;
    let rpms = hub.db.repo_rpms(&project, &name)?;
    let s = crate::repos::sources(&crate::server::base_url(&hub, &headers), &project, &name);
    Ok(layout(
        Some(&viewer),
        &format!("repo {project}/{name}"),
        false,
        html! {
            h1 { "Repository " (project) "/" (name) }
            p {
                "Revision " (repo.revision) ", "
                @if repo.published_revision < repo.revision { "publishing…" }
                @else if let Some(t) = repo.published { "published " (fmt_time(t)) }
                @else { "not published yet" }
            }
            @if !rpms.is_empty() {
                h2 { "Use it with dnf" }
                (dnf_lines(&s))
            }
            @if !debs.is_empty() || rpms.is_empty() {
                h2 { "Use it with apt" }
                (apt_lines(&s))
            }
            h2 { "Packages (" (debs.len() + rpms.len()) ")" }
            table {
                thead { tr { th { "package" } th { "version" } th { "arch" } th { "size" } th { "build" } } }
                tbody {
                    @for d in &debs { tr {
                        td { (d.package) }
                        td { (d.version) }
                        td { (d.arch) }
                        td.num { (fmt_size(d.size)) }
                        td { a href={ "/builds/" (d.build) } { (d.build) } }
                    } }
                    @for p in &rpms { tr {
                        td { (p.name) }
                        td { (p.evr()) }
                        td { (p.arch) }
                        td.num { (fmt_size(p.size)) }
                        td { a href={ "/builds/" (p.build) } { (p.build) } }
                    } }
                }
            }
        },
    )
    .into_response())
}

pub async fn buildroots(viewer: Viewer, State(hub): State<Arc<Hub>>) -> WebResult {
    viewer.read(&hub, "/buildroots")?;
    let all = hub.db.buildroots()?;
    Ok(layout(
        Some(&viewer),
        "buildroots",
        false,
        html! {
            h1 { "Buildroots" }
            @if all.is_empty() { p.empty { "None: " code { "kiln buildroot create NAME --suite bookworm" } } }
            table {
                thead { tr { th { "name" } th { "source" } th { "state" } th { "generation" } th { "size" } th { "ready since" } } }
                tbody { @for b in &all { tr {
                    td { (b.name) }
                    td { @match &b.source {
                        crate::model::BuildrootSource::Debian { suite, mirror, .. } => { "Debian " (suite) " from " (mirror) }
                        crate::model::BuildrootSource::Rpm { release, repos, .. } => { "RPM release " (release) " from " (repos.join(" ")) }
                        crate::model::BuildrootSource::Imported => { "imported tarball" }
                    } }
                    td { (format!("{:?}", b.state).split('(').next().unwrap_or("").to_lowercase()) }
                    td.num { (b.generation) }
                    td.num { (fmt_size(b.size)) }
                    td { @if let Some(t) = b.ready { (fmt_time(t)) } }
                } } }
            }
        },
    ))
}

#[derive(Deserialize)]
pub struct SearchQuery {
    #[serde(default)]
    pub q: String,
}

pub async fn search(
    viewer: Viewer,
    State(hub): State<Arc<Hub>>,
    Query(sq): Query<SearchQuery>,
) -> WebResult<Response> {
    viewer.read(&hub, "/search")?;
    let q = sq.q.trim().trim_start_matches('#');
    if let Ok(id) = q.parse::<u64>()
        && hub.db.build(id).is_ok()
    {
        return Ok(Redirect::to(&format!("/builds/{id}")).into_response());
    }
    let found = if q.is_empty() {
        vec![]
    } else {
        hub.db.search_packages(q, 100)?
    };
    Ok(layout(
        Some(&viewer),
        "search",
        false,
        html! {
            h1 { "Search: " (q) }
            @if found.is_empty() { p.empty { "No package or build matches." } }
            ul.plain { @for p in &found { li {
                a href={ "/packages/" (p.project) "/" (p.name) } { (p.project) "/" (p.name) }
            } } }
        },
    )
    .into_response())
}
