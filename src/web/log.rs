//! Logs in the browser: the tail a build page shows, the live viewer
//! (`/builds/ID/log`: follows over server-sent events, renders ANSI
//! colours, searches, jumps to the first error) and the streaming shared
//! with the API. Logs of hundreds of MB are never loaded whole: the viewer
//! starts from the tail, and search streams through the log server-side.

use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use maud::html;
use serde::Deserialize;
use tokio::sync::mpsc;

use super::{Viewer, WebResult, layout, state_badge};
use crate::hub::Hub;
use crate::model::{Build, BuildState, Task};

/// Most of a log a page shows inline; the full log is one link away.
const PAGE_LOG_BYTES: u64 = 64 * 1024;
/// Where the viewer starts: this far before the end of what exists.
const VIEWER_TAIL_BYTES: u64 = 256 * 1024;
/// Search answers at most this many lines.
const SEARCH_MAX_HITS: usize = 500;

/// `GET /builds/ID/log`: the viewer. Without JavaScript it still shows the
/// tail (and links the plain text).
pub async fn viewer(
    viewer: Viewer,
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
) -> WebResult {
    let id = crate::server::parse_id(&id)?;
    viewer.read(&hub, &format!("/builds/{id}/log"))?;
    let b = hub.db.build(id)?;
    Ok(layout(
        Some(&viewer),
        &format!("log of build {id}"),
        false,
        html! {
            h1 { "Log of " a href={ "/builds/" (id) } { "build " (id) } " " (state_badge(b.state)) }
            div.logbar {
                form #log-search role="search" {
                    input #log-q type="search" placeholder="search the whole log" aria-label="Search the log";
                    button type="submit" { "Search" }
                }
                button #log-first-error type="button" { "First error" }
                label { input #log-follow type="checkbox" checked; " follow" }
                a href={ "/api/v1/builds/" (id) "/log" } { "plain text" }
            }
            div #log-hits hidden {}
            p #log-status.muted { "loading…" }
            pre #log.log data-build=(id) data-tail=(VIEWER_TAIL_BYTES) {}
            script src=(super::assets::url("kiln.js")) defer {}
        },
    ))
}

#[derive(Deserialize)]
pub struct EventsQuery {
    /// Skip this many bytes of the build's log; negative: start this many
    /// bytes before the end of what exists now.
    pub from: Option<i64>,
}

/// The length of the build's log so far (ended tasks' stored logs plus
/// running tasks' live files).
fn log_len(hub: &Hub, build: &Build) -> u64 {
    let mut n = 0;
    for tid in &build.tasks {
        let Ok(t) = hub.db.task(*tid) else { continue };
        n += match (t.state.is_finished(), t.log) {
            (true, Some(d)) => hub
                .cas
                .open_blob(&d)
                .ok()
                .and_then(|r| r.len_hint())
                .unwrap_or(0),
            _ => hub
                .logs
                .get(t.id)
                .and_then(|l| std::fs::metadata(&l.path).ok())
                .map(|m| m.len())
                .unwrap_or(0),
        };
    }
    n
}

/// `GET /builds/ID/log/events?from=N`: server-sent events. `start` says at
/// which byte the text begins; each `log` event carries the next chunk (a
/// JSON string); `end` comes when the build has ended and all is sent.
pub async fn events(
    viewer: Viewer,
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
) -> WebResult<Response> {
    let id = crate::server::parse_id(&id)?;
    viewer.read(&hub, &format!("/builds/{id}/log"))?;
    let build = hub.db.build(id)?;
    let skip = match q.from.unwrap_or(0) {
        n if n >= 0 => n as u64,
        n => {
            let h = hub.clone();
            let b = build.clone();
            let len = tokio::task::spawn_blocking(move || log_len(&h, &b)).await?;
            len.saturating_sub(n.unsigned_abs())
        }
    };
    let (tx, mut rx) = mpsc::channel::<Chunk>(16);
    tokio::spawn(stream_build_log(hub, build, true, tx));
    let stream = async_stream(
        move |out: mpsc::Sender<Result<Event, std::convert::Infallible>>| async move {
            let _ = out
                .send(Ok(Event::default().event("start").data(skip.to_string())))
                .await;
            let mut to_skip = skip;
            // Bytes of a UTF-8 character split across chunks wait for the rest.
            let mut carry: Vec<u8> = Vec::new();
            while let Some(chunk) = rx.recv().await {
                let Ok(mut bytes) = chunk.map(|b| b.to_vec()) else {
                    break;
                };
                if to_skip > 0 {
                    let n = (to_skip as usize).min(bytes.len());
                    bytes.drain(..n);
                    to_skip -= n as u64;
                    if bytes.is_empty() {
                        continue;
                    }
                }
                carry.extend_from_slice(&bytes);
                let valid = match std::str::from_utf8(&carry) {
                    Ok(_) => carry.len(),
                    Err(e) if e.error_len().is_none() => e.valid_up_to(),
                    Err(_) => carry.len(),
                };
                let text = String::from_utf8_lossy(&carry[..valid]).into_owned();
                carry.drain(..valid);
                let data = serde_json::to_string(&text).unwrap_or_default();
                if out
                    .send(Ok(Event::default().event("log").data(data)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            // (Browsers drop events without data.)
            let _ = out
                .send(Ok(Event::default().event("end").data("end")))
                .await;
        },
    );
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// A stream fed by `f` through a channel.
fn async_stream<T: Send + 'static, F, Fut>(f: F) -> tokio_stream::wrappers::ReceiverStream<T>
where
    F: FnOnce(mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[derive(Deserialize)]
pub struct SearchQuery {
    #[serde(default)]
    pub q: String,
    /// `first-error`: the first line that looks like an error.
    pub kind: Option<String>,
}

#[derive(serde::Serialize)]
pub struct Hit {
    /// 1-based line number in the build's log.
    pub line: u64,
    /// Byte offset of the line's start.
    pub offset: u64,
    pub text: String,
}

/// Whether a log line looks like the report of an error.
pub fn looks_like_error(line: &str) -> bool {
    let l = line.to_ascii_lowercase();
    [
        "error:",
        "error ",
        "fatal:",
        "failed",
        "*** ",
        "e: ",
        "traceback",
        "panicked at",
    ]
    .iter()
    .any(|p| l.contains(p))
        && !l.contains("0 error")
        && !l.contains("-werror")
}

/// `GET /builds/ID/log/search?q=TEXT` (or `?kind=first-error`): matching
/// lines with their line numbers and offsets, streamed through the log
/// without holding it (at most 500 hits, case-insensitive).
pub async fn search(
    viewer: Viewer,
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
    Query(q): Query<SearchQuery>,
) -> WebResult<axum::Json<Vec<Hit>>> {
    let id = crate::server::parse_id(&id)?;
    viewer.read(&hub, &format!("/builds/{id}/log"))?;
    let build = hub.db.build(id)?;
    let first_error = q.kind.as_deref() == Some("first-error");
    let needle = q.q.to_lowercase();
    if needle.is_empty() && !first_error {
        return Ok(axum::Json(vec![]));
    }
    let (tx, mut rx) = mpsc::channel::<Chunk>(16);
    tokio::spawn(stream_build_log(hub, build, false, tx));
    let mut hits = Vec::new();
    let (mut line_no, mut offset, mut line_start) = (0u64, 0u64, 0u64);
    let mut partial = Vec::<u8>::new();
    let check = |line: &[u8], line_no: u64, start: u64, hits: &mut Vec<Hit>| {
        let text = String::from_utf8_lossy(line);
        let hit = if first_error {
            looks_like_error(&text)
        } else {
            text.to_lowercase().contains(&needle)
        };
        if hit {
            hits.push(Hit {
                line: line_no,
                offset: start,
                text: text.chars().take(400).collect(),
            });
        }
    };
    let limit = if first_error { 1 } else { SEARCH_MAX_HITS };
    'outer: while let Some(chunk) = rx.recv().await {
        let Ok(chunk) = chunk else { break };
        for &byte in chunk.iter() {
            if byte == b'\n' {
                line_no += 1;
                check(&partial, line_no, line_start, &mut hits);
                partial.clear();
                line_start = offset + 1;
                if hits.len() >= limit {
                    break 'outer;
                }
            } else if partial.len() < 64 * 1024 {
                partial.push(byte);
            }
            offset += 1;
        }
    }
    if hits.len() < limit && !partial.is_empty() {
        check(&partial, line_no + 1, line_start, &mut hits);
    }
    Ok(axum::Json(hits))
}

/// The tail of each task's log, for the page.
pub(crate) fn page_log(hub: &Hub, tasks: &[Task]) -> (String, bool) {
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

pub(crate) type Chunk = std::io::Result<Bytes>;

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
