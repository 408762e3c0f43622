//! The records behind people and browsing: users, sessions, project
//! members, users' API tokens, the audit log, and the indexed lists pages
//! page through (projects, packages, a project's or package's builds,
//! newest first, by key range — never a scan of all builds).

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};

use super::{
    AUDIT, BUILDS, Db, DbError, MEMBERS, META, PACKAGE_BUILDS, PACKAGES, PROJECT_BUILDS, PROJECTS,
    QUEUE, RUNNING, Result, SESSIONS, TASKS, USER_TOKEN_LABELS, USER_TOKENS, USERS, all_recs, bump,
    dec, enc, get_rec,
};
use crate::model::{
    AuditEntry, Build, BuildId, Package, Project, ProjectRole, Session, Task, User, UserToken,
    now_ms,
};

const K_NEXT_AUDIT: &str = "next_audit";

/// One page of a newest-first list: the items, and the key to pass as
/// `before` for the next page (None on the last).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<u64>,
}

impl Db {
    // ---- users ----

    /// Adds a user; refuses a name that exists.
    pub fn add_user(&self, user: &User) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(USERS)?;
            if t.get(user.name.as_str())?.is_some() {
                return Err(DbError::Exists(format!("user {:?}", user.name)));
            }
            t.insert(user.name.as_str(), enc(user).as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Replaces a user's record (password, admin flag).
    pub fn put_user(&self, user: &User) -> Result<()> {
        let tx = self.db.begin_write()?;
        tx.open_table(USERS)?
            .insert(user.name.as_str(), enc(user).as_slice())?;
        tx.commit()?;
        Ok(())
    }

    pub fn user(&self, name: &str) -> Result<Option<User>> {
        let tx = self.db.begin_read()?;
        get_rec(&tx.open_table(USERS)?, name)
    }

    pub fn users(&self) -> Result<Vec<User>> {
        let tx = self.db.begin_read()?;
        all_recs(&tx.open_table(USERS)?)
    }

    pub fn user_count(&self) -> Result<u64> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(USERS)?.len()?)
    }

    // ---- sessions ----

    pub fn put_session(&self, hash: &[u8; 32], s: &Session) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(SESSIONS)?;
            // Expired sessions go when new ones come.
            let now = now_ms();
            t.retain(|_, v| dec::<Session>(v).map(|s| s.expires > now).unwrap_or(false))?;
            t.insert(hash.as_slice(), enc(s).as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    /// A live session by its cookie's hash.
    pub fn session(&self, hash: &[u8; 32]) -> Result<Option<Session>> {
        let tx = self.db.begin_read()?;
        let s: Option<Session> = get_rec(&tx.open_table(SESSIONS)?, hash.as_slice())?;
        Ok(s.filter(|s| s.expires > now_ms()))
    }

    pub fn delete_session(&self, hash: &[u8; 32]) -> Result<()> {
        let tx = self.db.begin_write()?;
        tx.open_table(SESSIONS)?.remove(hash.as_slice())?;
        tx.commit()?;
        Ok(())
    }

    // ---- members ----

    /// Sets (or with None removes) `user`'s role in `project`.
    pub fn set_member(&self, project: &str, user: &str, role: Option<ProjectRole>) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(MEMBERS)?;
            match role {
                Some(r) => {
                    t.insert((project, user), enc(&r).as_slice())?;
                }
                None => {
                    t.remove((project, user))?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub fn member_role(&self, project: &str, user: &str) -> Result<Option<ProjectRole>> {
        let tx = self.db.begin_read()?;
        get_rec(&tx.open_table(MEMBERS)?, (project, user))
    }

    /// A project's members, by name.
    pub fn members(&self, project: &str) -> Result<Vec<(String, ProjectRole)>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(MEMBERS)?;
        let mut out = Vec::new();
        for row in t.range((project, "")..)? {
            let (k, v) = row?;
            let (p, u) = k.value();
            if p != project {
                break;
            }
            out.push((u.to_string(), dec(v.value())?));
        }
        Ok(out)
    }

    // ---- users' API tokens ----

    pub fn add_user_token(&self, hash: &[u8; 32], t: &UserToken) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut labels = tx.open_table(USER_TOKEN_LABELS)?;
            let key = (t.user.as_str(), t.label.as_str());
            if labels.get(key)?.is_some() {
                return Err(DbError::Exists(format!(
                    "token {:?} of {}",
                    t.label, t.user
                )));
            }
            labels.insert(key, hash.as_slice())?;
            tx.open_table(USER_TOKENS)?
                .insert(hash.as_slice(), enc(t).as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn user_token(&self, hash: &[u8; 32]) -> Result<Option<UserToken>> {
        let tx = self.db.begin_read()?;
        get_rec(&tx.open_table(USER_TOKENS)?, hash.as_slice())
    }

    pub fn user_tokens(&self, user: &str) -> Result<Vec<UserToken>> {
        let tx = self.db.begin_read()?;
        let labels = tx.open_table(USER_TOKEN_LABELS)?;
        let tokens = tx.open_table(USER_TOKENS)?;
        let mut out = Vec::new();
        for row in labels.range((user, "")..)? {
            let (k, h) = row?;
            if k.value().0 != user {
                break;
            }
            if let Some(t) = get_rec(&tokens, h.value())? {
                out.push(t);
            }
        }
        Ok(out)
    }

    /// Revokes `user`'s token `label`.
    pub fn delete_user_token(&self, user: &str, label: &str) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut labels = tx.open_table(USER_TOKEN_LABELS)?;
            let hash = labels
                .remove((user, label))?
                .ok_or_else(|| DbError::NotFound(format!("token {label:?} of {user}")))?
                .value()
                .to_vec();
            tx.open_table(USER_TOKENS)?.remove(hash.as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    // ---- audit ----

    pub fn audit(&self, who: &str, action: &str, status: u16) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let seq = bump(&mut tx.open_table(META)?, K_NEXT_AUDIT, 1)?;
            let e = AuditEntry {
                seq,
                at: now_ms(),
                who: who.to_string(),
                action: action.to_string(),
                status,
            };
            tx.open_table(AUDIT)?.insert(seq, enc(&e).as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The audit log, newest first.
    pub fn audit_page(&self, before: Option<u64>, limit: usize) -> Result<Page<AuditEntry>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(AUDIT)?;
        let mut items = Vec::new();
        let mut next = None;
        for row in t.range(..before.unwrap_or(u64::MAX))?.rev() {
            let (k, v) = row?;
            if items.len() == limit {
                next = Some(k.value() + 1);
                break;
            }
            items.push(dec(v.value())?);
        }
        Ok(Page { items, next })
    }

    // ---- browsing ----

    /// Running tasks (at most `limit`), by id.
    pub fn running_tasks(&self, limit: usize) -> Result<Vec<Task>> {
        let tx = self.db.begin_read()?;
        let tasks = tx.open_table(TASKS)?;
        let mut out = Vec::new();
        for row in tx.open_table(RUNNING)?.iter()?.take(limit) {
            if let Some(t) = get_rec(&tasks, row?.0.value())? {
                out.push(t);
            }
        }
        Ok(out)
    }

    /// The first `limit` queued tasks in submission order.
    pub fn queued_tasks(&self, limit: usize) -> Result<Vec<Task>> {
        let tx = self.db.begin_read()?;
        let tasks = tx.open_table(TASKS)?;
        let mut out = Vec::new();
        for row in tx.open_table(QUEUE)?.iter()?.take(limit) {
            if let Some(t) = get_rec(&tasks, row?.1.value())? {
                out.push(t);
            }
        }
        Ok(out)
    }

    pub fn projects(&self) -> Result<Vec<Project>> {
        let tx = self.db.begin_read()?;
        all_recs(&tx.open_table(PROJECTS)?)
    }

    pub fn packages(&self, project: &str) -> Result<Vec<Package>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(PACKAGES)?;
        let mut out = Vec::new();
        for row in t.range((project, "")..)? {
            let (k, v) = row?;
            if k.value().0 != project {
                break;
            }
            out.push(dec(v.value())?);
        }
        Ok(out)
    }

    /// Packages whose name contains `needle` (case-insensitive), at most
    /// `limit`. Scans packages, never builds.
    pub fn search_packages(&self, needle: &str, limit: usize) -> Result<Vec<Package>> {
        let needle = needle.to_lowercase();
        let tx = self.db.begin_read()?;
        let mut out = Vec::new();
        for row in tx.open_table(PACKAGES)?.iter()? {
            let (k, v) = row?;
            if k.value().1.to_lowercase().contains(&needle) {
                out.push(dec(v.value())?);
                if out.len() == limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// A project's builds, newest first, before build `before`.
    pub fn project_builds(
        &self,
        project: &str,
        before: Option<BuildId>,
        limit: usize,
    ) -> Result<Page<Build>> {
        let tx = self.db.begin_read()?;
        let (index, builds) = (tx.open_table(PROJECT_BUILDS)?, tx.open_table(BUILDS)?);
        let range = index.range((project, 0)..(project, before.unwrap_or(u64::MAX)))?;
        page_of(
            range.rev().map(|r| r.map(|(k, _)| k.value().1)),
            &builds,
            limit,
        )
    }

    /// A package's builds, newest first, before build `before`.
    pub fn package_builds(
        &self,
        project: &str,
        package: &str,
        before: Option<BuildId>,
        limit: usize,
    ) -> Result<Page<Build>> {
        let tx = self.db.begin_read()?;
        let (index, builds) = (tx.open_table(PACKAGE_BUILDS)?, tx.open_table(BUILDS)?);
        let range =
            index.range((project, package, 0)..(project, package, before.unwrap_or(u64::MAX)))?;
        page_of(
            range.rev().map(|r| r.map(|(k, _)| k.value().2)),
            &builds,
            limit,
        )
    }

    /// All builds, newest first, before build `before`.
    pub fn builds_page(&self, before: Option<BuildId>, limit: usize) -> Result<Page<Build>> {
        let tx = self.db.begin_read()?;
        let builds = tx.open_table(BUILDS)?;
        let ids = builds
            .range(..before.unwrap_or(u64::MAX))?
            .rev()
            .map(|r| r.map(|(k, _)| k.value()));
        page_of(ids, &builds, limit)
    }
}

/// Reads up to `limit` builds of `ids` (newest first); `next` is the id
/// to continue before.
fn page_of(
    ids: impl Iterator<Item = std::result::Result<u64, redb::StorageError>>,
    builds: &impl ReadableTable<u64, &'static [u8]>,
    limit: usize,
) -> Result<Page<Build>> {
    let mut items: Vec<Build> = Vec::new();
    let mut next = None;
    for id in ids {
        let id = id?;
        if items.len() == limit {
            next = items.last().map(|b| b.id);
            break;
        }
        if let Some(b) = get_rec(builds, id)? {
            items.push(b);
        }
    }
    Ok(Page { items, next })
}
