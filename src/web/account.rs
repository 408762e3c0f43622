//! Logging in and out, a user's own page (their API tokens), and the admin
//! pages: users and the audit log.
//!
//! The login form has no session yet, so its CSRF token is a double
//! submit: a random value in a SameSite=Strict cookie and in the form,
//! which must match. The session cookie is HttpOnly, SameSite=Strict,
//! Path=/, and Secure when the request came over HTTPS (or the hub's
//! public URL is https).

use std::sync::Arc;

use axum::Form;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};
use maud::html;
use serde::Deserialize;

use super::{Viewer, WebError, WebResult, csrf_field, fmt_time, layout, no_store};
use crate::accounts::{AccountError, SESSION_COOKIE, SESSION_MS};
use crate::hub::{Hub, new_secret, token_hash};
use crate::server::ApiError;

const LOGIN_COOKIE: &str = "kiln_login";

impl From<AccountError> for ApiError {
    fn from(e: AccountError) -> Self {
        match e {
            AccountError::Invalid(m) => ApiError::BadRequest(m),
            AccountError::BadLogin => ApiError::Unauthorized,
            AccountError::RateLimited(_) => ApiError::TooMany(e.to_string()),
            AccountError::Db(d) => d.into(),
            AccountError::Hash(m) => ApiError::Internal(m),
        }
    }
}

/// Whether cookies must be `Secure`: the request came over HTTPS.
fn secure(hub: &Hub, headers: &HeaderMap) -> bool {
    hub.config
        .server
        .public_url
        .as_deref()
        .is_some_and(|u| u.starts_with("https://"))
        || headers
            .get("x-forwarded-proto")
            .is_some_and(|v| v.as_bytes() == b"https")
        || hub.tls_fingerprint.is_some()
            && headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .zip(hub.config.server.tls_listen)
                .is_some_and(|(h, a)| h.ends_with(&format!(":{}", a.port())))
}

fn set_cookie(r: &mut Response, name: &str, value: &str, max_age_s: i64, secure: bool) {
    let v = format!(
        "{name}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_s}{}",
        if secure { "; Secure" } else { "" }
    );
    if let Ok(v) = HeaderValue::from_str(&v) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
}

#[derive(Deserialize, Default)]
pub struct Next {
    pub next: Option<String>,
}

/// Only local paths are followed after logging in (no open redirect).
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n.into(),
        _ => "/".into(),
    }
}

fn login_form(token: &str, next: &str, error: Option<&str>) -> maud::Markup {
    layout(
        None,
        "log in",
        false,
        html! {
            h1 { "Log in" }
            @if let Some(e) = error { p.error { (e) } }
            form.login method="post" action="/login" {
                input type="hidden" name="csrf" value=(token);
                input type="hidden" name="next" value=(next);
                label { "User " input name="user" autocomplete="username" required autofocus; }
                label { "Password " input name="password" type="password" autocomplete="current-password" required; }
                button type="submit" { "Log in" }
            }
        },
    )
}

pub async fn login_page(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    Query(q): Query<Next>,
) -> Response {
    let token = new_secret();
    let mut r = login_form(&token, &safe_next(q.next.as_deref()), None).into_response();
    set_cookie(&mut r, LOGIN_COOKIE, &token, 3600, secure(&hub, &headers));
    no_store(r)
}

#[derive(Deserialize)]
pub struct LoginForm {
    pub csrf: Option<String>,
    pub next: Option<String>,
    pub user: String,
    pub password: String,
}

/// `POST /login`: checks the form token, the rate limit and the password;
/// on success sets the session cookie and goes to `next`. Each attempt is
/// in the audit log.
pub async fn login(
    State(hub): State<Arc<Hub>>,
    ConnectInfo(peer): ConnectInfo<crate::server::Peer>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> WebResult<Response> {
    let cookie = super::cookie(&headers, LOGIN_COOKIE);
    let form_ok = matches!((cookie, f.csrf.as_deref()), (Some(c), Some(t)) if crate::accounts::same_secret(c, t));
    if !form_ok {
        return Err(ApiError::Forbidden(
            "the login form's security token (CSRF) is missing or stale: reload the page".into(),
        )
        .into());
    }
    let next = safe_next(f.next.as_deref());
    let (h, user, pw) = (hub.clone(), f.user.clone(), f.password.clone());
    let ip = peer.0.ip();
    let res =
        tokio::task::spawn_blocking(move || crate::accounts::login(&h, ip, &user, &pw)).await?;
    let audit = |what: String, status: u16| {
        let h = hub.clone();
        async move {
            let _ =
                tokio::task::spawn_blocking(move || h.db.audit(&format!("{ip}"), &what, status))
                    .await;
        }
    };
    match res {
        Ok((secret, _)) => {
            audit(format!("POST /login as {}", f.user), 303).await;
            let mut r = Redirect::to(&next).into_response();
            let sec = secure(&hub, &headers);
            set_cookie(&mut r, SESSION_COOKIE, &secret, SESSION_MS / 1000, sec);
            set_cookie(&mut r, LOGIN_COOKIE, "", 0, sec);
            Ok(r)
        }
        Err(e) => {
            let msg = e.to_string();
            let code = ApiError::from(e).status();
            audit(
                format!("POST /login as {} (refused)", f.user),
                code.as_u16(),
            )
            .await;
            let token = cookie.unwrap_or_default().to_string();
            let page = login_form(&token, &next, Some(&msg));
            Ok(no_store((code, page).into_response()))
        }
    }
}

/// `POST /logout`.
pub async fn logout(
    viewer: Viewer,
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    Form(f): Form<super::actions::Plain>,
) -> WebResult<Response> {
    viewer.post(f.csrf.as_deref())?;
    if let Some(secret) = super::cookie(&headers, SESSION_COOKIE) {
        crate::accounts::logout(&hub, secret)?;
    }
    let mut r = Redirect::to("/").into_response();
    set_cookie(&mut r, SESSION_COOKIE, "", 0, secure(&hub, &headers));
    Ok(r)
}

fn logged_in(viewer: &Viewer) -> Result<&crate::model::User, WebError> {
    viewer
        .who
        .user()
        .ok_or_else(|| WebError::Login("/account".into()))
}

/// `GET /account`: who I am, my projects, my API tokens.
pub async fn page(viewer: Viewer, State(hub): State<Arc<Hub>>) -> WebResult<Response> {
    let user = logged_in(&viewer)?;
    let tokens = hub.db.user_tokens(&user.name)?;
    let mut mine = Vec::new();
    for p in hub.db.projects()? {
        if let Some(r) = hub.db.member_role(&p.name, &user.name)? {
            mine.push((p.name, r));
        }
    }
    Ok(no_store(
        layout(
            Some(&viewer),
            "account",
            false,
            html! {
                h1 { (user.name) @if user.admin { " " span.state.running { "admin" } } }
                h2 { "Projects" }
                @if mine.is_empty() { p.empty { "none — submitting to a new project name makes you its owner" } }
                ul.plain { @for (p, r) in &mine { li { a href={ "/projects/" (p) } { (p) } " " span.muted { (r.as_str()) } } } }
                h2 { "API tokens" }
                p.muted { "A token acts as you: " code { "kiln --token TOKEN …" } " or " code { "Authorization: Bearer TOKEN" } "." }
                @if tokens.is_empty() { p.empty { "none" } }
                table { tbody { @for t in &tokens { tr {
                    td { (t.label) }
                    td { "made " (fmt_time(t.created)) }
                    td { form.inline method="post" action={ "/account/tokens/" (t.label) "/revoke" } {
                        (csrf_field(Some(&viewer)))
                        button.link type="submit" { "revoke" }
                    } }
                } } } }
                form method="post" action="/account/tokens" {
                    (csrf_field(Some(&viewer)))
                    label { "New token named " input name="label" required pattern="[A-Za-z0-9][A-Za-z0-9._+-]*"; }
                    button type="submit" { "Create" }
                }
            },
        )
        .into_response(),
    ))
}

#[derive(Deserialize)]
pub struct TokenForm {
    pub csrf: Option<String>,
    pub label: String,
}

/// `POST /account/tokens`: shows the new token once.
pub async fn create_token(
    viewer: Viewer,
    State(hub): State<Arc<Hub>>,
    Form(f): Form<TokenForm>,
) -> WebResult<Response> {
    viewer.post(f.csrf.as_deref())?;
    let user = logged_in(&viewer)?;
    crate::kinds::validate_name(&f.label)
        .map_err(|m| ApiError::BadRequest(format!("token name {m}")))?;
    let secret = new_secret();
    hub.db.add_user_token(
        &token_hash(&secret),
        &crate::model::UserToken {
            user: user.name.clone(),
            label: f.label.clone(),
            created: crate::model::now_ms(),
        },
    )?;
    Ok(no_store(
        layout(
            Some(&viewer),
            "new token",
            false,
            html! {
                h1 { "Token " (f.label) }
                p { "Copy it now; it is not shown again:" }
                pre.copy.token { (secret) }
                p { a href="/account" { "Back to your account" } }
            },
        )
        .into_response(),
    ))
}

pub async fn revoke_token(
    viewer: Viewer,
    State(hub): State<Arc<Hub>>,
    Path(label): Path<String>,
    Form(f): Form<super::actions::Plain>,
) -> WebResult<Redirect> {
    viewer.post(f.csrf.as_deref())?;
    let user = logged_in(&viewer)?;
    hub.db.delete_user_token(&user.name, &label)?;
    Ok(Redirect::to("/account"))
}

/// `GET /admin/users` (admin).
pub async fn users(viewer: Viewer, State(hub): State<Arc<Hub>>) -> WebResult {
    viewer.admin("see users")?;
    let users = hub.db.users()?;
    Ok(layout(
        Some(&viewer),
        "users",
        false,
        html! {
            h1 { "Users" }
            table { tbody { @for u in &users { tr {
                td { (u.name) } td { @if u.admin { "admin" } } td { "since " (fmt_time(u.created)) }
            } } } }
            h2 { "Add a user" }
            form method="post" action="/admin/users" {
                (csrf_field(Some(&viewer)))
                label { "Name " input name="name" required; }
                label { "Password " input name="password" type="password" required minlength="8" autocomplete="new-password"; }
                label { input name="admin" type="checkbox" value="1"; " admin" }
                button type="submit" { "Add" }
            }
        },
    ))
}

#[derive(Deserialize)]
pub struct UserForm {
    pub csrf: Option<String>,
    pub name: String,
    pub password: String,
    pub admin: Option<String>,
}

pub async fn add_user(
    viewer: Viewer,
    State(hub): State<Arc<Hub>>,
    Form(f): Form<UserForm>,
) -> WebResult<Redirect> {
    viewer.post(f.csrf.as_deref())?;
    viewer.admin("add users")?;
    let h = hub.clone();
    let admin = f.admin.is_some();
    tokio::task::spawn_blocking(move || crate::accounts::add_user(&h, &f.name, &f.password, admin))
        .await?
        .map_err(ApiError::from)?;
    Ok(Redirect::to("/admin/users"))
}

/// `GET /admin/audit` (admin): every mutating request, newest first.
pub async fn audit(
    viewer: Viewer,
    State(hub): State<Arc<Hub>>,
    Query(p): Query<super::pages::Paging>,
) -> WebResult {
    viewer.admin("read the audit log")?;
    let page = hub.db.audit_page(p.before, 100)?;
    Ok(layout(
        Some(&viewer),
        "audit log",
        false,
        html! {
            h1 { "Audit log" }
            table {
                thead { tr { th { "when" } th { "who" } th { "what" } th { "status" } } }
                tbody { @for e in &page.items { tr {
                    td { (fmt_time(e.at)) } td { (e.who) } td { code { (e.action) } } td.num { (e.status) }
                } } }
            }
            @if let Some(n) = page.next { p.pager { a rel="next" href={ "/admin/audit?before=" (n) } { "Older →" } } }
        },
    ))
}
