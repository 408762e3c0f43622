//! Accounts: who is asking and what they may do. Users log in with a
//! password (argon2id) and get a session cookie; API tokens act as the
//! admin, as a service, or as the user who made them. Roles: admin
//! (everything), a project's owner (its builds and its members), a
//! project's member (its builds), anyone logged in (may create a project by
//! submitting to a new name, and owns it), anonymous (reads, when
//! `server.public_reads` allows). Failed logins are rate-limited per
//! address. See docs/web.md.
//!
//! What must stay true: secrets (session cookies, tokens) are stored only
//! hashed; a session's CSRF token is compared in constant time; a form
//! post without it changes nothing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

use crate::db::DbError;
use crate::hub::{Hub, new_secret, token_hash};
use crate::lock;
use crate::model::{ProjectRole, Session, Token, User, now_ms};

/// Sessions last this long.
pub const SESSION_MS: i64 = 14 * 24 * 3600 * 1000;
/// The session cookie.
pub const SESSION_COOKIE: &str = "kiln_session";
/// Failed logins allowed per address per window.
const MAX_FAILURES: u32 = 5;
const FAILURE_WINDOW_MS: i64 = 5 * 60 * 1000;
const MIN_PASSWORD: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("{0}")]
    Invalid(String),
    #[error("wrong user name or password")]
    BadLogin,
    #[error("too many failed logins from this address; try again in {0} s")]
    RateLimited(i64),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("password hashing: {0}")]
    Hash(String),
}

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Anonymous,
    /// A logged-in user (session or their own API token).
    User(User),
    /// An API token not tied to a user (`kiln token create`): admin or not.
    Token(Token),
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        match self {
            Principal::User(u) => u.admin,
            Principal::Token(t) => t.admin,
            Principal::Anonymous => false,
        }
    }

    /// What the audit log and `submitted_by` say.
    pub fn label(&self) -> String {
        match self {
            Principal::User(u) => format!("user {}", u.name),
            Principal::Token(t) => format!("token {}", t.name),
            Principal::Anonymous => "anonymous".into(),
        }
    }

    /// The name recorded as a build's submitter.
    pub fn name(&self) -> String {
        match self {
            Principal::User(u) => u.name.clone(),
            Principal::Token(t) => t.name.clone(),
            Principal::Anonymous => "anonymous".into(),
        }
    }

    pub fn user(&self) -> Option<&User> {
        match self {
            Principal::User(u) => Some(u),
            _ => None,
        }
    }

    /// Whether this principal may submit, rebuild, cancel and re-queue in
    /// `project`: admins and service tokens anywhere, users where they are
    /// members, or anywhere new (a project that does not exist yet).
    pub fn can_build(&self, hub: &Hub, project: &str) -> Result<bool, DbError> {
        Ok(match self {
            Principal::Anonymous => false,
            Principal::Token(_) => true,
            Principal::User(u) if u.admin => true,
            Principal::User(u) => {
                hub.db.member_role(project, &u.name)?.is_some()
                    || hub.db.project(project)?.is_none()
            }
        })
    }

    /// Whether this principal manages `project`'s members.
    pub fn owns(&self, hub: &Hub, project: &str) -> Result<bool, DbError> {
        Ok(match self {
            Principal::User(u) if !u.admin => {
                hub.db.member_role(project, &u.name)? == Some(ProjectRole::Owner)
            }
            p => p.is_admin(),
        })
    }
}

/// The principal behind a bearer token: a service/admin token or a user's.
pub fn principal_of_token(hub: &Hub, secret: &str) -> Result<Option<Principal>, DbError> {
    let hash = token_hash(secret);
    if let Some(t) = hub.db.token(&hash)? {
        return Ok(Some(Principal::Token(t)));
    }
    if let Some(ut) = hub.db.user_token(&hash)?
        && let Some(u) = hub.db.user(&ut.user)?
    {
        return Ok(Some(Principal::User(u)));
    }
    Ok(None)
}

/// The session behind a cookie value, with its user.
pub fn session_of(hub: &Hub, secret: &str) -> Result<Option<(Session, User)>, DbError> {
    let Some(s) = hub.db.session(&token_hash(secret))? else {
        return Ok(None);
    };
    Ok(hub.db.user(&s.user)?.map(|u| (s, u)))
}

/// Checks a user name: the same rules as every kiln name.
pub fn check_user_name(name: &str) -> Result<(), AccountError> {
    crate::kinds::validate_name(name).map_err(|m| AccountError::Invalid(format!("user {m}")))
}

pub fn hash_password(password: &str) -> Result<String, AccountError> {
    if password.chars().count() < MIN_PASSWORD {
        return Err(AccountError::Invalid(format!(
            "a password needs at least {MIN_PASSWORD} characters"
        )));
    }
    let salt = SaltString::generate(&mut rand_core::OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AccountError::Hash(e.to_string()))
}

fn verify_password(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// Makes a user (the first admin comes from `kiln user add --admin`).
pub fn add_user(hub: &Hub, name: &str, password: &str, admin: bool) -> Result<User, AccountError> {
    check_user_name(name)?;
    let user = User {
        name: name.to_string(),
        password: hash_password(password)?,
        admin,
        created: now_ms(),
    };
    hub.db.add_user(&user)?;
    Ok(user)
}

/// Failed logins per address, in memory (a restart forgets them).
#[derive(Default)]
pub struct LoginLimiter {
    failures: Mutex<HashMap<IpAddr, (i64, u32)>>,
}

impl LoginLimiter {
    /// Refuses while `ip` has used up its failures in the window.
    fn check(&self, ip: IpAddr, now: i64) -> Result<(), AccountError> {
        let mut f = lock(&self.failures);
        f.retain(|_, (since, _)| now - *since < FAILURE_WINDOW_MS);
        match f.get(&ip) {
            Some((since, n)) if *n >= MAX_FAILURES => Err(AccountError::RateLimited(
                (since + FAILURE_WINDOW_MS - now).max(1000) / 1000,
            )),
            _ => Ok(()),
        }
    }

    fn failed(&self, ip: IpAddr, now: i64) {
        let mut f = lock(&self.failures);
        let e = f.entry(ip).or_insert((now, 0));
        e.1 += 1;
    }
}

/// Checks a login and opens a session; returns the cookie's secret and
/// the session. Every attempt costs an argon2 verification, known user or
/// not, so timing does not tell which names exist.
pub fn login(
    hub: &Hub,
    ip: IpAddr,
    name: &str,
    password: &str,
) -> Result<(String, Session), AccountError> {
    let now = now_ms();
    hub.logins.check(ip, now)?;
    let user = hub.db.user(name)?;
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let ok = match &user {
        Some(u) => verify_password(&u.password, password),
        None => {
            let dummy = DUMMY.get_or_init(|| hash_password("no user has this").unwrap_or_default());
            let _ = verify_password(dummy, password);
            false
        }
    };
    let Some(user) = user.filter(|_| ok) else {
        hub.logins.failed(ip, now);
        return Err(AccountError::BadLogin);
    };
    let secret = new_secret();
    let session = Session {
        user: user.name.clone(),
        csrf: new_secret(),
        created: now,
        expires: now + SESSION_MS,
    };
    hub.db.put_session(&token_hash(&secret), &session)?;
    Ok((secret, session))
}

/// Ends the session behind a cookie value.
pub fn logout(hub: &Hub, secret: &str) -> Result<(), DbError> {
    hub.db.delete_session(&token_hash(secret))
}

/// Constant-time equality of two secrets.
pub fn same_secret(a: &str, b: &str) -> bool {
    use sha2::Digest as _;
    // Comparing digests keeps the time independent of where they differ.
    let (x, y) = (sha2::Sha256::digest(a), sha2::Sha256::digest(b));
    x.iter()
        .zip(y.iter())
        .fold(0u8, |acc, (p, q)| acc | (p ^ q))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hash_with_argon2id_and_verify() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify_password(&h, "correct horse"));
        assert!(!verify_password(&h, "correct horsf"));
        assert!(!verify_password("garbage", "correct horse"));
        assert!(matches!(
            hash_password("short"),
            Err(AccountError::Invalid(_))
        ));
    }

    #[test]
    fn the_limiter_refuses_after_five_failures_and_forgets_after_the_window() {
        let l = LoginLimiter::default();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..MAX_FAILURES {
            l.check(ip, 1_000).unwrap();
            l.failed(ip, 1_000);
        }
        assert!(matches!(
            l.check(ip, 2_000),
            Err(AccountError::RateLimited(_))
        ));
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        l.check(other, 2_000).unwrap();
        l.check(ip, 1_000 + FAILURE_WINDOW_MS).unwrap();
    }

    #[test]
    fn secrets_compare_equal_only_when_equal() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", ""));
    }
}
