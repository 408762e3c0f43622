//! The web UI over HTTP against a real hub: logging in, roles, CSRF, the
//! audit log, paging, escaping — and every mutating route the router has,
//! enumerated from it, refusing anonymous callers, callers without the
//! role, and form posts without the session's CSRF token.

use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};

use kiln::model::BuildState;

use crate::harness::*;

/// A plain HTTP client that does not follow redirects (tests look at them).
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// The value of cookie `name` among a response's Set-Cookie headers.
fn set_cookie(resp: &reqwest::Response, name: &str) -> Option<(String, String)> {
    resp.headers().get_all(SET_COOKIE).iter().find_map(|v| {
        let v = v.to_str().ok()?;
        let (kv, attrs) = v.split_once(';').unwrap_or((v, ""));
        let (k, val) = kv.split_once('=')?;
        (k == name).then(|| (val.to_string(), attrs.to_string()))
    })
}

/// The first hidden `csrf` field of a page.
fn csrf_of(html: &str) -> Option<String> {
    let at = html.find("name=\"csrf\" value=\"")? + "name=\"csrf\" value=\"".len();
    Some(html[at..].split('"').next()?.to_string())
}

pub fn form(pairs: &[(&str, &str)]) -> String {
    let mut s = String::new();
    for (k, v) in pairs {
        if !s.is_empty() {
            s.push('&');
        }
        s.push_str(k);
        s.push('=');
        s.push_str(
            &v.replace('%', "%25")
                .replace('&', "%26")
                .replace('+', "%2B")
                .replace(' ', "+"),
        );
    }
    s
}

/// A logged-in browser session: its cookie and CSRF token.
pub struct Session {
    pub base: String,
    pub cookie: String,
    pub csrf: String,
    pub http: reqwest::Client,
}

impl Session {
    /// Logs in through the login form, as a browser does.
    pub async fn login(base: &str, user: &str, password: &str) -> Session {
        let http = http();
        let page = http.get(format!("{base}/login")).send().await.unwrap();
        let (login_cookie, _) = set_cookie(&page, "kiln_login").expect("login cookie");
        let token = csrf_of(&page.text().await.unwrap()).expect("login form token");
        let resp = http
            .post(format!("{base}/login"))
            .header(COOKIE, format!("kiln_login={login_cookie}"))
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(form(&[
                ("csrf", &token),
                ("next", "/account"),
                ("user", user),
                ("password", password),
            ]))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::SEE_OTHER, "login as {user}");
        let (cookie, attrs) = set_cookie(&resp, "kiln_session").expect("session cookie");
        assert!(
            attrs.contains("HttpOnly") && attrs.contains("SameSite=Strict"),
            "{attrs}"
        );
        let account = http
            .get(format!("{base}/account"))
            .header(COOKIE, format!("kiln_session={cookie}"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let csrf = csrf_of(&account).expect("a form on the account page");
        Session {
            base: base.to_string(),
            cookie,
            csrf,
            http,
        }
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .header(COOKIE, format!("kiln_session={}", self.cookie))
            .send()
            .await
            .unwrap()
    }

    /// Posts a form; `with_csrf` adds the session's token.
    pub async fn post(
        &self,
        path: &str,
        pairs: &[(&str, &str)],
        with_csrf: bool,
    ) -> reqwest::Response {
        let mut all: Vec<(&str, &str)> = pairs.to_vec();
        if with_csrf {
            all.push(("csrf", &self.csrf));
        }
        self.http
            .post(format!("{}{path}", self.base))
            .header(COOKIE, format!("kiln_session={}", self.cookie))
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(form(&all))
            .send()
            .await
            .unwrap()
    }
}

/// Makes a user through the API (as `kiln user add` does).
pub async fn add_user(h: &TestHub, name: &str, admin: bool) {
    h.client
        .add_user(name, &format!("{name}-password"), admin)
        .await
        .unwrap();
}

/// Every field any form or JSON body of a mutating route needs, so that a
/// refusal can only come from who is asking.
const FIELDS: &[(&str, &str)] = &[
    ("task", "1"),
    ("user", "bob"),
    ("role", "member"),
    ("label", "t1"),
    ("name", "carol"),
    ("password", "carol-password"),
    ("project", "p"),
    ("git", "http://127.0.0.1:9/none.git"),
    ("next", "/"),
];

fn fill(path: &str) -> String {
    path.replace("{id}", "1")
        .replace("{project}", "p")
        .replace("{package}", "hello")
        .replace("{repo}", "r")
        .replace("{name}", "w1")
        .replace("{action}", "drain")
        .replace("{label}", "t1")
        .replace("{hex}", &"0".repeat(64))
        .replace("{*path}", "x")
        .replace("{file}", "kiln.css")
}

fn multipart(pairs: &[(&str, &str)]) -> (String, String) {
    let b = "kilnboundary7";
    let mut body = String::new();
    for (k, v) in pairs {
        body.push_str(&format!(
            "--{b}\r\ncontent-disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n"
        ));
    }
    body.push_str(&format!("--{b}--\r\n"));
    (format!("multipart/form-data; boundary={b}"), body)
}

/// Sends `method path` the way its kind of route expects a body: JSON for
/// the API, multipart for the submit forms, a urlencoded form otherwise.
async fn send(
    http: &reqwest::Client,
    base: &str,
    method: &reqwest::Method,
    path: &str,
    cookie: Option<&str>,
    bearer: Option<&str>,
    csrf: Option<&str>,
) -> StatusCode {
    let mut url = format!("{base}{}", fill(path));
    if path == "/api/v1/builds" {
        // An existing project: a new name is anyone's to create.
        url.push_str("?project=p");
    }
    let mut rb = http.request(method.clone(), &url);
    if let Some(c) = cookie {
        rb = rb.header(COOKIE, format!("kiln_session={c}"));
    }
    if let Some(t) = bearer {
        rb = rb.bearer_auth(t);
    }
    let mut fields: Vec<(&str, &str)> = FIELDS.to_vec();
    if let Some(c) = csrf {
        fields.push(("csrf", c));
    }
    rb = if path.starts_with("/api/") || path.starts_with("/cas/") {
        rb.header(CONTENT_TYPE, "application/json").body("{}")
    } else if path.ends_with("/submit") {
        let (ct, body) = multipart(&fields);
        rb.header(CONTENT_TYPE, ct).body(body)
    } else {
        rb.header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(form(&fields))
    };
    rb.send().await.unwrap().status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mutating_route_refuses_anonymous_wrong_role_and_missing_csrf() {
    let mut h = hub(0).await;
    let base = h.url();
    // Something for the routes to act on: project p with build 1 (task 1).
    let src = script_tree("hello", "true", &[]);
    h.client
        .submit_dir(src.path(), Some("p"), None)
        .await
        .unwrap();
    add_user(&h, "alice", true).await;
    add_user(&h, "bob", false).await;
    let alice = Session::login(&base, "alice", "alice-password").await;
    let bob = Session::login(&base, "bob", "bob-password").await;
    // bob's own API token, made on his account page.
    let made = bob.post("/account/tokens", &[("label", "api")], true).await;
    assert_eq!(made.status(), StatusCode::OK);
    let page = made.text().await.unwrap();
    let bob_token = page
        .split("<pre class=\"copy token\">")
        .nth(1)
        .and_then(|s| s.split('<').next())
        .expect("the new token on the page")
        .to_string();

    let http = http();
    let mutating: Vec<_> = kiln::web::route_table()
        .into_iter()
        .filter(|(m, _)| *m != reqwest::Method::GET && *m != reqwest::Method::HEAD)
        .collect();
    assert!(mutating.len() >= 30, "{mutating:?}");
    // Routes anyone logged in may use (their own session and tokens), and
    // the login form itself.
    let anyone = [
        "/login",
        "/logout",
        "/account/tokens",
        "/account/tokens/{label}/revoke",
    ];
    let mut checked = Vec::new();
    for (method, path) in &mutating {
        let web = !path.starts_with("/api/");
        // Anonymous: refused (the login form, which anyone may post, still
        // needs its own form token).
        let s = send(&http, &base, method, path, None, None, None).await;
        assert!(
            s == StatusCode::UNAUTHORIZED || s == StatusCode::FORBIDDEN,
            "anonymous {method} {path}: {s}"
        );
        if anyone.contains(path) {
            checked.push(format!("{method} {path}"));
            continue;
        }
        // A logged-in user without the role: refused, by session (with a
        // valid CSRF token) and by their own API token.
        if web {
            let s = send(
                &http,
                &base,
                method,
                path,
                Some(&bob.cookie),
                None,
                Some(&bob.csrf),
            )
            .await;
            assert!(
                s == StatusCode::FORBIDDEN || s == StatusCode::UNAUTHORIZED,
                "bob's session {method} {path}: {s}"
            );
        }
        let s = send(&http, &base, method, path, None, Some(&bob_token), None).await;
        assert!(
            s == StatusCode::FORBIDDEN || s == StatusCode::UNAUTHORIZED,
            "bob's token {method} {path}: {s}"
        );
        checked.push(format!("{method} {path}"));
    }
    // Without the CSRF token even an admin's session changes nothing.
    for (method, path) in mutating
        .iter()
        .filter(|(_, p)| !p.starts_with("/api/") && *p != "/login")
    {
        let s = send(&http, &base, method, path, Some(&alice.cookie), None, None).await;
        assert_eq!(
            s,
            StatusCode::FORBIDDEN,
            "admin without CSRF {method} {path}"
        );
    }
    assert_eq!(checked.len(), mutating.len());
    // Nothing of it happened: build 1 is still queued, no user carol, no
    // member bob.
    let b = h.client.build(1).await.unwrap();
    assert_eq!(b.detail.build.state, BuildState::Queued);
    assert_eq!(h.client.users().await.unwrap().len(), 2);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_sessions_roles_and_the_audit_log() {
    let mut h = hub(0).await;
    let base = h.url();
    add_user(&h, "alice", true).await;
    add_user(&h, "bob", false).await;
    add_user(&h, "dave", false).await;
    let http = http();

    // A wrong password is refused with the form again; five in a row from
    // one address, and even the right one waits.
    let login_once = |pw: &'static str| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let page = http.get(format!("{base}/login")).send().await.unwrap();
            let (c, _) = set_cookie(&page, "kiln_login").unwrap();
            let t = csrf_of(&page.text().await.unwrap()).unwrap();
            http.post(format!("{base}/login"))
                .header(COOKIE, format!("kiln_login={c}"))
                .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(form(&[("csrf", &t), ("user", "dave"), ("password", pw)]))
                .send()
                .await
                .unwrap()
        }
    };
    let r = login_once("wrong-password").await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("wrong user name or password")
    );

    // bob makes project bp by submitting to it, and owns it.
    let bob = Session::login(&base, "bob", "bob-password").await;
    let src = script_tree("hello", "echo hi", &[]);
    let tar = tempfile::NamedTempFile::new().unwrap();
    {
        let f = std::fs::File::create(tar.path()).unwrap();
        let mut t = tar::Builder::new(f);
        t.append_dir_all(".", src.path()).unwrap();
        t.finish().unwrap();
    }
    let b = "kilnboundary9";
    let mut body = format!(
        "--{b}\r\ncontent-disposition: form-data; name=\"csrf\"\r\n\r\n{}\r\n--{b}\r\ncontent-disposition: form-data; name=\"project\"\r\n\r\nbp\r\n--{b}\r\ncontent-disposition: form-data; name=\"package\"\r\n\r\nhello\r\n--{b}\r\ncontent-disposition: form-data; name=\"tarball\"; filename=\"src.tar\"\r\ncontent-type: application/x-tar\r\n\r\n",
        bob.csrf
    )
    .into_bytes();
    body.extend(std::fs::read(tar.path()).unwrap());
    body.extend(format!("\r\n--{b}--\r\n").into_bytes());
    let r = bob
        .http
        .post(format!("{base}/submit"))
        .header(COOKIE, format!("kiln_session={}", bob.cookie))
        .header(CONTENT_TYPE, format!("multipart/form-data; boundary={b}"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let to = r.headers()[LOCATION].to_str().unwrap().to_string();
    assert!(to.starts_with("/builds/"), "{to}");
    let id: u64 = to.trim_start_matches("/builds/").parse().unwrap();
    let v = h.client.build(id).await.unwrap();
    assert_eq!(v.detail.build.project, "bp");
    assert_eq!(v.detail.build.submitted_by, "bob");
    let project = bob.get("/projects/bp").await.text().await.unwrap();
    assert!(
        project.contains("bob") && project.contains("owner"),
        "{project}"
    );

    // dave may not cancel bob's build; bob may; then bob adds dave.
    let dave = Session::login(&base, "dave", "dave-password").await;
    let r = dave.post(&format!("/builds/{id}/cancel"), &[], true).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = bob.post(&format!("/builds/{id}/cancel"), &[], true).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        h.client.build(id).await.unwrap().detail.build.state,
        BuildState::Cancelled
    );
    let r = bob
        .post(
            "/projects/bp/members",
            &[("user", "dave"), ("role", "member")],
            true,
        )
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let r = dave.post(&format!("/builds/{id}/rebuild"), &[], true).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER, "a member rebuilds");
    // A member does not manage members.
    let r = dave
        .post(
            "/projects/bp/members",
            &[("user", "alice"), ("role", "owner")],
            true,
        )
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    // Logging out ends the session: the cookie no longer works.
    let r = dave.post("/logout", &[], true).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(dave.get("/account").await.status(), StatusCode::SEE_OTHER);

    // The audit log names who did what, for admins only.
    let alice = Session::login(&base, "alice", "alice-password").await;
    assert_eq!(
        bob.get("/admin/audit").await.status(),
        StatusCode::FORBIDDEN
    );
    let audit = alice.get("/admin/audit").await.text().await.unwrap();
    for line in [
        format!("POST /builds/{id}/cancel"),
        "POST /projects/bp/members".to_string(),
        "POST /submit".to_string(),
        "POST /login as dave (refused)".to_string(),
    ] {
        assert!(
            audit.contains(&line),
            "{line} missing from the audit log:\n{audit}"
        );
    }
    assert!(
        audit.contains("user bob") && audit.contains("user dave"),
        "{audit}"
    );

    // Rate limit: the fifth failure from one address blocks the next try.
    for _ in 0..4 {
        login_once("wrong-password").await;
    }
    let r = login_once("dave-password").await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.text().await.unwrap().contains("too many failed logins"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_escape_what_users_wrote_and_page_through_builds() {
    let mut h = hub(1).await;
    let base = h.url();
    let src = script_tree(
        "xss",
        "echo '<script>window.__pwned=1</script>'; printf '\\033[31mred\\033[0m\\n'; echo 'error: the first error'; echo fine",
        &[],
    );
    let b = h
        .client
        .submit_dir(src.path(), Some("evil"), None)
        .await
        .unwrap();
    let v = h.client.wait(b.id, BUILD_TIMEOUT).await.unwrap();
    assert_eq!(v.detail.build.state, BuildState::Succeeded);
    let page = get_text(&h, &format!("/builds/{}", b.id)).await;
    assert!(
        page.contains("&lt;script&gt;window.__pwned=1&lt;/script&gt;"),
        "{page}"
    );
    assert!(!page.contains("<script>window.__pwned"), "{page}");
    // Search streams through the log; the first error is found by line.
    let hits: serde_json::Value = serde_json::from_str(
        &get_text(&h, &format!("/builds/{}/log/search?kind=first-error", b.id)).await,
    )
    .unwrap();
    assert_eq!(hits[0]["text"], "error: the first error", "{hits}");
    let hits: serde_json::Value =
        serde_json::from_str(&get_text(&h, &format!("/builds/{}/log/search?q=FINE", b.id)).await)
            .unwrap();
    assert_eq!(hits.as_array().unwrap().len(), 1, "{hits}");

    // 120 more builds (left queued): the lists page by 50, newest first.
    h.client.set_worker("local", "drain").await.unwrap();
    let mut many = Vec::new();
    for _ in 0..120 {
        many.push(
            h.client
                .submit_dir(src.path(), Some("evil"), None)
                .await
                .unwrap()
                .id,
        );
    }
    let first = get_text(&h, "/builds").await;
    let newest = many.iter().max().unwrap();
    assert!(
        first.contains(&format!("/builds/{newest}\"")),
        "newest on page 1"
    );
    let next = first
        .split("rel=\"next\" href=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("a next link")
        .to_string();
    let second = get_text(&h, &next).await;
    assert!(!second.contains(&format!("/builds/{newest}\"")));
    let project = get_text(&h, "/projects/evil").await;
    assert!(
        project.contains("rel=\"next\""),
        "the project's builds page too"
    );
    // Assets: hashed URL, cached for a year, gzip when asked.
    let css = http()
        .get(format!("{base}/assets/kiln.css"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(css.headers()["content-encoding"], "gzip");
    assert!(
        css.headers()["cache-control"]
            .to_str()
            .unwrap()
            .contains("immutable")
    );
    h.stop().await;
}
