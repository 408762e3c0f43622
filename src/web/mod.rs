//! The web UI: server-rendered pages (maud) for everything a person asks
//! of a build service — what is building, why mine waits, what failed and
//! why, where the result is, which machines are healthy — plus the forms
//! that steer it, accounts, and the embedded assets. Pages need no
//! JavaScript except the live log viewer. See docs/web.md.
//!
//! What must stay true: everything user-supplied reaches HTML through
//! maud's escaping (and the log viewer's JavaScript only ever sets
//! `textContent`); every form post checks its session's CSRF token before
//! it changes anything; every route that changes something is listed by
//! [`route_table`], which the security tests walk.

mod account;
mod actions;
mod assets;
pub mod log;
mod pages;

use std::sync::Arc;

use axum::extract::{FromRequestParts, Request, State};
use axum::handler::Handler;
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::MethodRouter;
use maud::{DOCTYPE, Markup, html};

pub use log::stream_build_log;

use crate::accounts::{Principal, SESSION_COOKIE};
use crate::hub::Hub;
use crate::model::BuildState;
use crate::server::ApiError;

/// A router that remembers which method and path each route has, so the
/// security tests can enumerate every mutating route.
pub(crate) struct Routes {
    router: axum::Router<Arc<Hub>>,
    table: Vec<(Method, &'static str)>,
}

impl Routes {
    pub(crate) fn new() -> Routes {
        Routes {
            router: axum::Router::new(),
            table: Vec::new(),
        }
    }

    /// Adds `path` with `methods` (the methods it answers, for the table).
    pub(crate) fn route(
        mut self,
        path: &'static str,
        methods: &[Method],
        handler: MethodRouter<Arc<Hub>>,
    ) -> Routes {
        self.table.extend(methods.iter().map(|m| (m.clone(), path)));
        self.router = self.router.route(path, handler);
        self
    }

    pub(crate) fn get<H: Handler<T, Arc<Hub>>, T: 'static>(
        self,
        path: &'static str,
        h: H,
    ) -> Routes {
        self.route(path, &[Method::GET], axum::routing::get(h))
    }

    pub(crate) fn post<H: Handler<T, Arc<Hub>>, T: 'static>(
        self,
        path: &'static str,
        h: H,
    ) -> Routes {
        self.route(path, &[Method::POST], axum::routing::post(h))
    }

    pub(crate) fn delete<H: Handler<T, Arc<Hub>>, T: 'static>(
        self,
        path: &'static str,
        h: H,
    ) -> Routes {
        self.route(path, &[Method::DELETE], axum::routing::delete(h))
    }

    pub(crate) fn put<H: Handler<T, Arc<Hub>>, T: 'static>(
        self,
        path: &'static str,
        h: H,
    ) -> Routes {
        self.route(path, &[Method::PUT], axum::routing::put(h))
    }

    pub(crate) fn merge(mut self, other: Routes) -> Routes {
        self.table.extend(other.table);
        self.router = self.router.merge(other.router);
        self
    }

    pub(crate) fn into_parts(self) -> (axum::Router<Arc<Hub>>, Vec<(Method, &'static str)>) {
        (self.router, self.table)
    }
}

/// Every route of the hub (API, worker protocol, pages, forms) with its
/// method: what the security tests check.
pub fn route_table() -> Vec<(Method, &'static str)> {
    crate::server::routes(1 << 20).into_parts().1
}

pub(crate) fn routes() -> Routes {
    Routes::new()
        .get("/", pages::dashboard)
        .post("/submit", actions::submit)
        .get("/search", pages::search)
        .get("/builds", pages::builds)
        .get("/builds/{id}", pages::build)
        .post("/builds/{id}/cancel", actions::cancel)
        .post("/builds/{id}/rebuild", actions::rebuild)
        .post("/builds/{id}/requeue", actions::requeue)
        .get("/builds/{id}/log", log::viewer)
        .get("/builds/{id}/log/events", log::events)
        .get("/builds/{id}/log/search", log::search)
        .get("/projects", pages::projects)
        .get("/projects/{project}", pages::project)
        .post("/projects/{project}/submit", actions::submit_to)
        .post("/projects/{project}/members", actions::members)
        .get("/packages/{project}/{package}", pages::package)
        .get("/workers", pages::workers)
        .get("/workers/{name}", pages::worker)
        .post("/workers/{name}/{action}", actions::worker)
        .get("/repos", pages::repos)
        .get("/repos/{project}/{repo}", pages::repo)
        .get("/buildroots", pages::buildroots)
        .get("/login", account::login_page)
        .post("/login", account::login)
        .post("/logout", account::logout)
        .get("/account", account::page)
        .post("/account/tokens", account::create_token)
        .post("/account/tokens/{label}/revoke", account::revoke_token)
        .get("/admin/users", account::users)
        .post("/admin/users", account::add_user)
        .get("/admin/audit", account::audit)
        .get("/assets/{file}", assets::serve)
}

/// Who is looking at a page: a session's user (with the session's CSRF
/// token), a bearer token's principal, or anonymous.
pub struct Viewer {
    pub who: Principal,
    /// The session's CSRF token; None without a session.
    pub csrf: Option<String>,
}

/// A cookie's value from the request's headers.
pub(crate) fn cookie<'a>(headers: &'a axum::http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

impl FromRequestParts<Arc<Hub>> for Viewer {
    type Rejection = WebError;
    async fn from_request_parts(parts: &mut Parts, hub: &Arc<Hub>) -> Result<Self, WebError> {
        if let Some(secret) = cookie(&parts.headers, SESSION_COOKIE)
            && let Some((s, u)) = crate::accounts::session_of(hub, secret)?
        {
            return Ok(Viewer {
                who: Principal::User(u),
                csrf: Some(s.csrf),
            });
        }
        if let Some(secret) = crate::server::bearer(parts) {
            let who =
                crate::accounts::principal_of_token(hub, secret)?.ok_or(ApiError::Unauthorized)?;
            return Ok(Viewer { who, csrf: None });
        }
        Ok(Viewer {
            who: Principal::Anonymous,
            csrf: None,
        })
    }
}

impl Viewer {
    /// Pages: anyone may read unless `public_reads` is off.
    pub fn read(&self, hub: &Hub, here: &str) -> Result<(), WebError> {
        if self.who == Principal::Anonymous && !hub.config.server.public_reads {
            return Err(WebError::Login(here.to_string()));
        }
        Ok(())
    }

    /// A form post: someone logged in, and — for a browser session — the
    /// session's CSRF token in the form. Bearer-token clients have no
    /// cookie a third-party page could ride on.
    pub fn post(&self, form_csrf: Option<&str>) -> Result<(), WebError> {
        if self.who == Principal::Anonymous {
            return Err(ApiError::Unauthorized.into());
        }
        match &self.csrf {
            Some(want) if !form_csrf.is_some_and(|got| crate::accounts::same_secret(want, got)) => {
                Err(ApiError::Forbidden(
                    "the form's security token (CSRF) is missing or stale: reload the page and try again"
                        .into(),
                )
                .into())
            }
            _ => Ok(()),
        }
    }

    pub fn admin(&self, what: &str) -> Result<(), WebError> {
        crate::server::require_admin(&self.who, what).map_err(WebError::from)
    }
}

/// An error a page shows: the API's, as an HTML page with its status, or
/// "log in first" (a redirect to the login page).
#[derive(Debug)]
pub enum WebError {
    Api(ApiError),
    Login(String),
}

impl<E: Into<ApiError>> From<E> for WebError {
    fn from(e: E) -> Self {
        WebError::Api(e.into())
    }
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        match self {
            WebError::Login(next) => {
                let q = form_urlencoded::Serializer::new(String::new())
                    .append_pair("next", &next)
                    .finish();
                Redirect::to(&format!("/login?{q}")).into_response()
            }
            WebError::Api(e) => {
                let status = e.status();
                let body = layout(
                    None,
                    status.canonical_reason().unwrap_or("error"),
                    false,
                    html! {
                        h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) }
                        p.error { (e.to_string()) }
                        @if status == StatusCode::UNAUTHORIZED {
                            p { a href="/login" { "Log in" } }
                        }
                    },
                );
                (status, body).into_response()
            }
        }
    }
}

pub type WebResult<T = Markup> = Result<T, WebError>;

/// The frame of every page: header with navigation, search and who is
/// logged in; `refresh` reloads the page every few seconds (while builds
/// on it run).
pub(crate) fn layout(viewer: Option<&Viewer>, title: &str, refresh: bool, body: Markup) -> Markup {
    let who = viewer.map(|v| &v.who);
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="color-scheme" content="light dark";
                @if refresh { meta http-equiv="refresh" content="3"; }
                title { (title) " · kiln" }
                link rel="stylesheet" href=(assets::url("kiln.css"));
                link rel="icon" href=(assets::url("kiln.svg")) type="image/svg+xml";
            }
            body {
                header.top {
                    a.brand href="/" { "kiln" }
                    nav {
                        a href="/builds" { "Builds" }
                        a href="/projects" { "Projects" }
                        a href="/workers" { "Workers" }
                        a href="/repos" { "Repos" }
                        a href="/buildroots" { "Buildroots" }
                        @if who.is_some_and(Principal::is_admin) {
                            a href="/admin/users" { "Users" }
                            a href="/admin/audit" { "Audit" }
                        }
                    }
                    form.search action="/search" method="get" role="search" {
                        input type="search" name="q" placeholder="package or build #" aria-label="Search";
                    }
                    span.who {
                        @match who {
                            Some(Principal::User(u)) => {
                                a href="/account" { (u.name) }
                                form.inline method="post" action="/logout" {
                                    (csrf_field(viewer))
                                    button.link type="submit" { "Log out" }
                                }
                            }
                            Some(Principal::Token(t)) => { "token " (t.name) }
                            _ => { a href="/login" { "Log in" } }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// The hidden CSRF field every form carries.
pub(crate) fn csrf_field(viewer: Option<&Viewer>) -> Markup {
    html! {
        @if let Some(t) = viewer.and_then(|v| v.csrf.as_deref()) {
            input type="hidden" name="csrf" value=(t);
        }
    }
}

pub(crate) fn state_badge(s: BuildState) -> Markup {
    html! { span class={ "state " (s.as_str()) } { (s.as_str()) } }
}

pub(crate) fn fmt_time(ms: i64) -> String {
    format!("{} UTC", crate::model::format_ms(ms))
}

pub(crate) fn fmt_duration(start: Option<i64>, end: Option<i64>) -> String {
    match (start, end) {
        (Some(s), Some(e)) => format!("{:.1} s", (e - s) as f64 / 1000.0),
        (Some(s), None) => format!(
            "{:.0} s so far",
            (crate::model::now_ms() - s) as f64 / 1000.0
        ),
        _ => String::new(),
    }
}

pub(crate) fn fmt_size(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// Records every request that may change something — any method but GET
/// and HEAD, outside the worker protocol (whose every step the task and
/// worker records keep) and the login form (which records its own
/// outcome) — in the audit log: who, what, when, and the status it got.
pub async fn audit(State(hub): State<Arc<Hub>>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    if matches!(method, Method::GET | Method::HEAD)
        || path.starts_with("/api/v1/worker/")
        || path == "/login"
    {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let mut p = parts;
    let who = match Viewer::from_request_parts(&mut p, &hub).await {
        Ok(v) => v.who.label(),
        Err(_) => "an invalid credential".to_string(),
    };
    let resp = next.run(Request::from_parts(p, body)).await;
    let status = resp.status().as_u16();
    let action = format!("{method} {path}");
    let h = hub.clone();
    let _ = tokio::task::spawn_blocking(move || h.db.audit(&who, &action, status)).await;
    resp
}

/// Marks a response as not to be cached (pages with a user's data).
pub(crate) fn no_store(mut r: Response) -> Response {
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}
