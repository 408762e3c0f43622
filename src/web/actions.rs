//! The forms: submit (git URL or tarball upload), rebuild, cancel,
//! re-queue, project members, worker drain/enable/disable. Each posts to
//! its page's address plus the action, checks the role and the session's
//! CSRF token before it changes anything, and answers with a redirect to
//! the page that shows the result.

use std::sync::Arc;

use axum::Form;
use axum::extract::{Multipart, Path, State};
use axum::response::Redirect;
use serde::Deserialize;

use super::{Viewer, WebError, WebResult};
use crate::hub::Hub;
use crate::model::ProjectRole;
use crate::server::{ApiError, SourceIn, require_steer, submit_source};

/// A form with nothing but its CSRF token.
#[derive(Deserialize)]
pub struct Plain {
    pub csrf: Option<String>,
}

/// `POST /submit` (project in the form) and `POST /projects/P/submit`.
pub async fn submit(
    viewer: Viewer,
    State(hub): State<Arc<Hub>>,
    form: Multipart,
) -> WebResult<Redirect> {
    submit_form(viewer, hub, None, form).await
}

pub async fn submit_to(
    viewer: Viewer,
    State(hub): State<Arc<Hub>>,
    Path(project): Path<String>,
    form: Multipart,
) -> WebResult<Redirect> {
    submit_form(viewer, hub, Some(project), form).await
}

async fn submit_form(
    viewer: Viewer,
    hub: Arc<Hub>,
    project: Option<String>,
    mut form: Multipart,
) -> WebResult<Redirect> {
    // Nothing is decided before the CSRF token is checked; an upload only
    // lands in a temp file until then.
    if viewer.who == crate::accounts::Principal::Anonymous {
        return Err(ApiError::Unauthorized.into());
    }
    let bad = |e: axum::extract::multipart::MultipartError| {
        WebError::from(ApiError::BadRequest(format!("the form: {e}")))
    };
    let max = hub.config.server.max_upload_bytes;
    let tmp = tempfile::NamedTempFile::new_in(hub.work_dir())
        .map_err(|e| ApiError::Internal(format!("temp file: {e}")))?;
    let (mut csrf, mut fields, mut uploaded) = (None, std::collections::HashMap::new(), 0u64);
    while let Some(mut field) = form.next_field().await.map_err(bad)? {
        let name = field.name().unwrap_or_default().to_string();
        if name == "tarball" {
            use std::io::Write as _;
            let mut f = tmp.as_file();
            while let Some(chunk) = field.chunk().await.map_err(bad)? {
                uploaded += chunk.len() as u64;
                if uploaded > max {
                    return Err(ApiError::TooLarge(format!(
                        "the upload is larger than {max} bytes"
                    ))
                    .into());
                }
                f.write_all(&chunk)
                    .map_err(|e| ApiError::Internal(format!("temp file: {e}")))?;
            }
        } else {
            let v = field.text().await.map_err(bad)?;
            if name == "csrf" {
                csrf = Some(v);
            } else {
                fields.insert(name, v.trim().to_string());
            }
        }
    }
    viewer.post(csrf.as_deref())?;
    let field = |k: &str| fields.get(k).filter(|v| !v.is_empty()).cloned();
    let project = project
        .or_else(|| field("project"))
        .unwrap_or_else(|| crate::model::DEFAULT_PROJECT.to_string());
    let source = match (field("git"), uploaded) {
        (Some(url), 0) => SourceIn::Git {
            url,
            git_ref: field("ref"),
        },
        (None, n) if n > 0 => {
            let file = tokio::fs::File::open(tmp.path())
                .await
                .map_err(|e| ApiError::Internal(format!("temp file: {e}")))?;
            SourceIn::Tar(Box::new(file))
        }
        (Some(_), _) => {
            return Err(
                ApiError::BadRequest("give a git URL or a tarball, not both".into()).into(),
            );
        }
        (None, _) => {
            return Err(
                ApiError::BadRequest("give a git URL or a source tarball to build".into()).into(),
            );
        }
    };
    let build = submit_source(&hub, &viewer.who, project, field("package"), vec![], source).await?;
    Ok(Redirect::to(&format!("/builds/{}", build.id)))
}

/// `POST /builds/ID/cancel`.
pub async fn cancel(
    viewer: Viewer,
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
    Form(f): Form<Plain>,
) -> WebResult<Redirect> {
    let id = crate::server::parse_id(&id)?;
    viewer.post(f.csrf.as_deref())?;
    let detail = hub.db.build_detail(id)?;
    require_steer(&hub, &viewer.who, &detail.build.project, "cancel builds")?;
    crate::server::cancel_all(&hub, &detail)?;
    Ok(Redirect::to(&format!("/builds/{id}")))
}

/// `POST /builds/ID/rebuild`: the same source as a new build.
pub async fn rebuild(
    viewer: Viewer,
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
    Form(f): Form<Plain>,
) -> WebResult<Redirect> {
    let id = crate::server::parse_id(&id)?;
    viewer.post(f.csrf.as_deref())?;
    let b = hub.db.build(id)?;
    crate::server::require_build(&hub, &viewer.who, &b.project)?;
    let new = crate::scheduler::rebuild(&hub, id, &viewer.who.name()).map_err(ApiError::from)?;
    Ok(Redirect::to(&format!("/builds/{}", new.id)))
}

#[derive(Deserialize)]
pub struct RequeueForm {
    pub csrf: Option<String>,
    pub task: Option<String>,
}

/// `POST /builds/ID/requeue` with `task`: runs that task again.
pub async fn requeue(
    viewer: Viewer,
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
    Form(f): Form<RequeueForm>,
) -> WebResult<Redirect> {
    let id = crate::server::parse_id(&id)?;
    viewer.post(f.csrf.as_deref())?;
    let detail = hub.db.build_detail(id)?;
    require_steer(&hub, &viewer.who, &detail.build.project, "re-queue tasks")?;
    let task: u64 = f
        .task
        .as_deref()
        .and_then(|t| t.parse().ok())
        .filter(|t| detail.build.tasks.contains(t))
        .ok_or_else(|| ApiError::BadRequest(format!("name a task of build {id} to re-queue")))?;
    crate::worker::stop_task(&hub, task, true)?;
    Ok(Redirect::to(&format!("/builds/{id}")))
}

#[derive(Deserialize)]
pub struct MemberForm {
    pub csrf: Option<String>,
    pub user: String,
    /// member, owner or none.
    pub role: String,
}

/// `POST /projects/P/members`: owners and admins set a user's role.
pub async fn members(
    viewer: Viewer,
    State(hub): State<Arc<Hub>>,
    Path(project): Path<String>,
    Form(f): Form<MemberForm>,
) -> WebResult<Redirect> {
    viewer.post(f.csrf.as_deref())?;
    if !viewer.who.owns(&hub, &project)? {
        return Err(ApiError::Forbidden(format!(
            "only an owner of project {project} or an admin can change its members"
        ))
        .into());
    }
    hub.db
        .project(&project)?
        .ok_or_else(|| crate::db::DbError::ProjectNotFound(project.clone()))?;
    let user = f.user.trim();
    if hub.db.user(user)?.is_none() {
        return Err(ApiError::BadRequest(format!("there is no user {user:?}")).into());
    }
    let role = match f.role.as_str() {
        "member" => Some(ProjectRole::Member),
        "owner" => Some(ProjectRole::Owner),
        "none" => None,
        r => {
            return Err(
                ApiError::BadRequest(format!("role {r:?} is not member, owner or none")).into(),
            );
        }
    };
    hub.db.set_member(&project, user, role)?;
    Ok(Redirect::to(&format!("/projects/{project}")))
}

/// `POST /workers/NAME/drain|enable|disable` (admin).
pub async fn worker(
    viewer: Viewer,
    State(hub): State<Arc<Hub>>,
    Path((name, action)): Path<(String, String)>,
    Form(f): Form<Plain>,
) -> WebResult<Redirect> {
    viewer.post(f.csrf.as_deref())?;
    viewer.admin(&format!("{action} workers"))?;
    let state = crate::remote::admin_action(&action)?;
    let h = hub.clone();
    let n = name.clone();
    tokio::task::spawn_blocking(move || h.set_worker_admin(&n, state)).await??;
    Ok(Redirect::to(&format!("/workers/{name}")))
}
