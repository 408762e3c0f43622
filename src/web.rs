//! Server-rendered pages (maud): the recent builds at `/` and a build page
//! with its tasks, log and artifacts; the embedded assets; and log streaming,
//! shared by the page and the API. Everything user-supplied is escaped by
//! maud; nothing here needs JavaScript.

use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use maud::{DOCTYPE, Markup, html};
use tokio::sync::mpsc;

use crate::hub::Hub;
use crate::model::{Build, BuildState, Task};
use crate::server::{ApiError, Reader};

const CSS: &str = include_str!("../assets/kiln.css");
/// Most of a log a page shows inline; the full log is one link away.
const PAGE_LOG_BYTES: u64 = 512 * 1024;

pub fn routes() -> axum::Router<Arc<Hub>> {
    axum::Router::new()
        .route("/", get(index))
        .route("/builds/{id}", get(build_page))
        .route("/assets/kiln.css", get(css))
}

async fn css() -> Response {
    let mut r = CSS.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/css"));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    r
}

fn fmt_time(ms: i64) -> String {
    format!("{} UTC", crate::model::format_ms(ms))
}

fn fmt_duration(start: Option<i64>, end: Option<i64>) -> String {
    match (start, end) {
        (Some(s), Some(e)) => format!("{:.1} s", (e - s) as f64 / 1000.0),
        (Some(s), None) => format!(
            "{:.0} s so far",
            (crate::model::now_ms() - s) as f64 / 1000.0
        ),
        _ => String::new(),
    }
}

fn page(title: &str, refresh: bool, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if refresh { meta http-equiv="refresh" content="2"; }
                title { (title) " · kiln" }
                link rel="stylesheet" href="/assets/kiln.css";
            }
            body {
                header { a.brand href="/" { "kiln" } }
                main { (body) }
            }
        }
    }
}

fn state_badge(s: BuildState) -> Markup {
    html! { span class={ "state " (s.as_str()) } { (s.as_str()) } }
}

async fn index(_: Reader, State(hub): State<Arc<Hub>>) -> Result<Markup, ApiError> {
    let builds = hub.db.list_builds(None, 50)?;
    let active = builds.iter().any(|b| !b.state.is_finished());
    Ok(page(
        "builds",
        active,
        html! {
            h1 { "Recent builds" }
            @if builds.is_empty() {
                p.empty { "No builds yet. Submit one with " code { "kiln build submit DIR" } "." }
            } @else {
                table {
                    thead { tr { th { "#" } th { "project" } th { "package" } th { "state" } th { "submitted" } th { "took" } } }
                    tbody {
                        @for b in &builds {
                            tr {
                                td { a href={ "/builds/" (b.id) } { (b.id) } }
                                td { (b.project) }
                                td { (b.package) }
                                td { (state_badge(b.state)) }
                                td { (fmt_time(b.created)) }
                                td { (fmt_duration(b.started, b.finished)) }
                            }
                        }
                    }
                }
            }
        },
    ))
}

async fn build_page(
    _: Reader,
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Markup, ApiError> {
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("build id {id:?} is not a number")))?;
    let detail = hub.db.build_detail(id)?;
    let artifacts = hub.db.artifacts(id)?;
    let b = &detail.build;
    let mut waiting = None;
    for t in &detail.task_list {
        if t.state == BuildState::Queued {
            waiting = crate::scheduler::why_waiting(&hub, t.id)?;
        }
    }
    // The repos this build's targets publish into, and how to use them.
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
    let h = hub.clone();
    let tasks = detail.task_list.clone();
    let (log, truncated) = tokio::task::spawn_blocking(move || page_log(&h, &tasks)).await?;
    Ok(page(
        &format!("build {}", b.id),
        !b.state.is_finished(),
        html! {
            h1 { "Build " (b.id) " " (state_badge(b.state)) }
            dl {
                dt { "project" } dd { (b.project) }
                dt { "package" } dd { (b.package) " (" (b.kind) ")" }
                dt { "source" } dd {
                    @if let Some(o) = &detail.origin {
                        (o.url) " " (o.git_ref) " → commit " code { (o.commit) } br;
                    }
                    code { (b.source) }
                }
                dt { "submitted" } dd { (fmt_time(b.created)) " by " (b.submitted_by) }
                @if let Some(w) = &waiting { dt { "waiting" } dd { (w) } }
            }
            h2 { "Tasks" }
            table {
                thead { tr { th { "task" } th { "target" } th { "state" } th { "attempt" } th { "worker" } th { "result" } th { "took" } } }
                tbody {
                    @for t in &detail.task_list {
                        tr {
                            td { (t.id) }
                            td { (t.target) }
                            td { (state_badge(t.state)) }
                            td { (t.attempt) }
                            td { (t.worker.as_deref().unwrap_or("")) }
                            td { @if let Some(o) = &t.outcome { (o) } }
                            td { (fmt_duration(t.started, t.finished)) }
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
                                td.num { (a.size) }
                                td { code.digest { (a.digest) } }
                            }
                        }
                    }
                }
            }
            @if !repos.is_empty() {
                h2 { "Install from its repository" }
                @for s in &repos {
                    p { "Key: " a href=(s.key_url) { (s.key_url) } }
                    pre { (s.key_install) }
                    p { "Then, in " code { "/etc/apt/sources.list.d/*.list" } ":" }
                    pre { (s.list_line) }
                    p { "or, in " code { "/etc/apt/sources.list.d/*.sources" } ":" }
                    pre { (s.deb822) }
                }
            }
            h2 { "Log" }
            p { a href={ "/api/v1/builds/" (b.id) "/log" } { "plain text" } }
            @if truncated { p.empty { "… earlier output cut; the plain-text log has all of it" } }
            pre.log { (log) }
        },
    ))
}

/// The tail of each task's log, for the page.
fn page_log(hub: &Hub, tasks: &[Task]) -> (String, bool) {
    let mut out = Vec::new();
    let mut truncated = false;
    for t in tasks {
        let (tail, cut) = if t.state.is_finished() {
            t.log
                .and_then(|d| hub.cas.open_blob(&d).ok())
                .and_then(|r| read_tail(r, PAGE_LOG_BYTES as usize).ok())
                .unwrap_or_default()
        } else if let Some(live) = hub.logs.get(t.id) {
            std::fs::File::open(&live.path)
                .and_then(|mut f| {
                    // A live log is a plain file: start near its end.
                    let len = f.metadata()?.len();
                    let start = len.saturating_sub(PAGE_LOG_BYTES);
                    f.seek(SeekFrom::Start(start))?;
                    let (tail, _) = read_tail(f, PAGE_LOG_BYTES as usize)?;
                    Ok((tail, start > 0))
                })
                .unwrap_or_default()
        } else {
            Default::default()
        };
        truncated |= cut;
        out.extend_from_slice(&tail);
    }
    (String::from_utf8_lossy(&out).into_owned(), truncated)
}

/// The last `keep` bytes of a stream, and whether anything came before
/// them; never holds much more than `keep` bytes at once.
fn read_tail(mut r: impl Read, keep: usize) -> std::io::Result<(Vec<u8>, bool)> {
    let mut buf = Vec::with_capacity(2 * keep);
    let mut cut = false;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 2 * keep {
            buf.drain(..buf.len() - keep);
            cut = true;
        }
    }
    if buf.len() > keep {
        buf.drain(..buf.len() - keep);
        cut = true;
    }
    Ok((buf, cut))
}

type Chunk = std::io::Result<Bytes>;

/// Sends a build's log, task after task, into `tx`; with `follow`, waits for
/// queued and running tasks and ends when the last one has ended.
pub async fn stream_build_log(hub: Arc<Hub>, build: Build, follow: bool, tx: mpsc::Sender<Chunk>) {
    for tid in &build.tasks {
        loop {
            let mut changes = hub.changes.subscribe();
            let task = match hub.db.task(*tid) {
                Ok(t) => t,
                Err(e) => {
                    let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                    return;
                }
            };
            if task.state.is_finished() {
                if let Some(d) = task.log {
                    match crate::server::blob_chunks(&hub, d, false) {
                        Ok(mut rx) => {
                            while let Some(c) = rx.recv().await {
                                if tx.send(c).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                            return;
                        }
                    }
                }
                break;
            }
            if task.state == BuildState::Running
                && let Some(live) = hub.logs.get(*tid)
                && let Ok(file) = std::fs::File::open(&live.path)
            {
                if !crate::logs::follow_live(file, live.subscribe(), follow, &tx).await {
                    return;
                }
                break;
            }
            if !follow {
                break;
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = tx.closed() => return,
            }
        }
    }
}
