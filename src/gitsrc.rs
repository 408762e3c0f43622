//! Sources given as a git URL and ref: the hub fetches the ref (shallow),
//! pins it to the commit it names at that moment, and turns the commit's
//! tree into a tar that goes through the same ingest as an upload, so the
//! source is kept in the store like any other.
//!
//! What must stay true: only network transports (`https`, `http`, `git`)
//! are allowed, so a submitter cannot make the hub read its own disk
//! (`file://`, local paths) or run commands (`ext::`); git never prompts,
//! never reads the host's git config, and is killed after a time limit.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How long one fetch may take.
const TIMEOUT: Duration = Duration::from_secs(600);

/// Where a build's source came from, when it was not an upload.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct GitOrigin {
    pub url: String,
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// The commit `ref` named at submission (hex).
    pub commit: String,
}

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("git URL {0:?}: only https://, http:// and git:// URLs can be fetched")]
    BadUrl(String),
    #[error("git ref {0:?} is not a valid ref name")]
    BadRef(String),
    #[error("git ref {git_ref:?} does not exist at {url}")]
    NoSuchRef { url: String, git_ref: String },
    #[error("fetching {url}: {why}")]
    Fetch { url: String, why: String },
    #[error("running git: {0}")]
    Io(#[from] std::io::Error),
}

/// A fetched commit's tree as a tar file, removed on drop.
pub struct Fetched {
    pub origin: GitOrigin,
    pub tar: PathBuf,
    dir: PathBuf,
}

impl Drop for Fetched {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Checks the URL and ref before anything runs.
pub fn validate(url: &str, git_ref: &str) -> Result<(), GitError> {
    let scheme_ok = ["https://", "http://", "git://"]
        .iter()
        .any(|s| url.starts_with(s) && url.len() > s.len());
    if !scheme_ok || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(GitError::BadUrl(url.to_string()));
    }
    let ref_ok = !git_ref.is_empty()
        && git_ref.len() <= 255
        && !git_ref.starts_with(['-', '/', '.'])
        && !git_ref.contains("..")
        && !git_ref.ends_with(['/', '.'])
        && git_ref
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._/-+".contains(&b));
    if !ref_ok {
        return Err(GitError::BadRef(git_ref.to_string()));
    }
    Ok(())
}

/// Fetches `git_ref` of `url` into a scratch repo under `work` and writes
/// its tree as a tar.
pub async fn fetch(url: &str, git_ref: &str, work: &Path) -> Result<Fetched, GitError> {
    validate(url, git_ref)?;
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = work.join(format!(
        "git-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)?;
    let mut fetched = Fetched {
        origin: GitOrigin {
            url: url.to_string(),
            git_ref: git_ref.to_string(),
            commit: String::new(),
        },
        tar: dir.join("source.tar"),
        dir: dir.clone(),
    };
    let repo = dir.join("repo.git");
    git(&dir, &["init", "-q", "--bare", "repo.git"], None)
        .await
        .map_err(|why| GitError::Io(std::io::Error::other(why)))?;
    let fetch = git(
        &repo,
        &[
            "fetch",
            "-q",
            "--depth",
            "1",
            "--no-tags",
            "--",
            url,
            git_ref,
        ],
        None,
    )
    .await;
    if let Err(why) = fetch {
        let missing = [
            "couldn't find remote ref",
            "not our ref",
            "no such remote ref",
        ]
        .iter()
        .any(|m| why.contains(m));
        return Err(if missing {
            GitError::NoSuchRef {
                url: url.to_string(),
                git_ref: git_ref.to_string(),
            }
        } else {
            GitError::Fetch {
                url: url.to_string(),
                why,
            }
        });
    }
    let fail = |why: String| GitError::Fetch {
        url: url.to_string(),
        why,
    };
    let commit = git(
        &repo,
        &["rev-parse", "--verify", "FETCH_HEAD^{commit}"],
        None,
    )
    .await
    .map_err(fail)?;
    let commit = commit.trim().to_string();
    let tar = std::fs::File::create(&fetched.tar)?;
    git(&repo, &["archive", "--format=tar", &commit], Some(tar))
        .await
        .map_err(fail)?;
    fetched.origin.commit = commit;
    Ok(fetched)
}

/// Runs git in `cwd` with a clean environment; stdout to `out` or
/// returned; an error carries git's last line of stderr.
async fn git(cwd: &Path, args: &[&str], out: Option<std::fs::File>) -> Result<String, String> {
    let mut cmd = tokio::process::Command::new("git");
    cmd.args([
        "-c",
        "protocol.allow=never",
        "-c",
        "protocol.https.allow=always",
        "-c",
        "protocol.http.allow=always",
        "-c",
        "protocol.git.allow=always",
        "-c",
        "core.hooksPath=/dev/null",
    ])
    .args(args)
    .current_dir(cwd)
    .env_clear()
    .env("PATH", "/usr/local/bin:/usr/bin:/bin")
    .env("HOME", cwd)
    .env("GIT_TERMINAL_PROMPT", "0")
    .env("GIT_CONFIG_NOSYSTEM", "1")
    .env("GIT_ASKPASS", "/bin/false")
    .env("LC_ALL", "C")
    .stdin(Stdio::null())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    match out {
        Some(f) => cmd.stdout(f),
        None => cmd.stdout(Stdio::piped()),
    };
    let child = cmd.spawn().map_err(|e| format!("cannot run git: {e}"))?;
    let o = match tokio::time::timeout(TIMEOUT, child.wait_with_output()).await {
        Ok(o) => o.map_err(|e| format!("git: {e}"))?,
        Err(_) => return Err(format!("git {} took over {} s", args[0], TIMEOUT.as_secs())),
    };
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    } else {
        let err = String::from_utf8_lossy(&o.stderr);
        Err(err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("git failed")
            .trim()
            .to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_network_urls_and_plain_refs() {
        assert!(validate("https://example.org/x.git", "main").is_ok());
        assert!(validate("git://127.0.0.1:9418/x", "v1.0").is_ok());
        for url in [
            "file:///etc",
            "/srv/repo",
            "ext::sh -c id",
            "ssh://h/x",
            "https://",
        ] {
            assert!(
                matches!(validate(url, "main"), Err(GitError::BadUrl(_))),
                "{url}"
            );
        }
        for r in [
            "-upload-pack=x",
            "a..b",
            "",
            "refs/heads/",
            "x y",
            ".hidden",
        ] {
            assert!(
                matches!(validate("https://h/x", r), Err(GitError::BadRef(_))),
                "{r}"
            );
        }
    }
}
