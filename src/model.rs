//! The domain types kiln stores and serves: projects, packages, builds,
//! tasks, leases and artifacts.
//!
//! Values are postcard-encoded in redb and JSON on the API, so every type here
//! derives serde. postcard is not self-describing: changing a stored type means
//! bumping `db::SCHEMA_VERSION` and writing an upgrade. Times are Unix
//! milliseconds (UTC).

use serde::{Deserialize, Serialize};

use crate::cas::Digest;

pub type BuildId = u64;
pub type TaskId = u64;

/// The default project builds land in when the submitter names none.
pub const DEFAULT_PROJECT: &str = "default";
/// The target every `script` build runs on until buildroots exist: the host's
/// system directories, read-only.
pub const HOST_TARGET: &str = "host";

/// `YYYY-MM-DD hh:mm:ss` (UTC) of a time in Unix milliseconds.
pub fn format_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms / 1000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        .format(time::macros::format_description!(
            "[year]-[month]-[day] [hour]:[minute]:[second]"
        ))
        .unwrap_or_default()
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PackageKind {
    Script,
    /// A Debian source package (debian/ at the top), built with dpkg-buildpackage.
    Deb,
    /// An RPM spec file with its sources, or a source RPM, built with rpmbuild.
    Rpm,
}

impl std::fmt::Display for PackageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PackageKind::Script => "script",
            PackageKind::Deb => "deb",
            PackageKind::Rpm => "rpm",
        })
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Project {
    pub name: String,
    pub created: i64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Package {
    pub project: String,
    pub name: String,
    pub kind: PackageKind,
    pub created: i64,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BuildState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl BuildState {
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            BuildState::Succeeded | BuildState::Failed | BuildState::Cancelled
        )
    }
    pub fn as_str(self) -> &'static str {
        match self {
            BuildState::Queued => "queued",
            BuildState::Running => "running",
            BuildState::Succeeded => "succeeded",
            BuildState::Failed => "failed",
            BuildState::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for BuildState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A task shares the build's states; a build's state is derived from its tasks.
pub type TaskState = BuildState;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Build {
    pub id: BuildId,
    pub project: String,
    pub package: String,
    pub kind: PackageKind,
    /// Manifest digest of the source tree as submitted.
    pub source: Digest,
    /// SOURCE_DATE_EPOCH handed to the build (seconds): the newest mtime in
    /// the submitted tree.
    pub source_date_epoch: i64,
    /// Name of the token that submitted the build.
    pub submitted_by: String,
    pub state: BuildState,
    pub created: i64,
    pub started: Option<i64>,
    pub finished: Option<i64>,
    pub tasks: Vec<TaskId>,
}

/// Why a task ended. `Succeeded` only for exit code 0.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Succeeded,
    ExitCode(i32),
    Signal(i32),
    Cancelled,
    /// The build succeeded but its outputs could not be kept (e.g. a fifo
    /// matched an output glob).
    Outputs(String),
    /// Something outside the build went wrong (sandbox set-up, the store, a
    /// lost worker). Such tasks are retried up to `build.max_attempts`.
    Infrastructure(String),
    /// Ran past its wall-clock limit (seconds); the whole sandbox was killed.
    /// (New variants go last: postcard stores the variant's index.)
    Timeout(u64),
    /// The kernel's OOM killer killed a process of the build.
    OutOfMemory,
    /// The build hit its pid limit (a fork failed).
    PidLimit,
    /// The build failed with its writable space (bytes) full.
    DiskLimit(u64),
    /// The build wrote more output than this many bytes and was killed.
    LogLimit(u64),
}

impl Outcome {
    pub fn succeeded(&self) -> bool {
        matches!(self, Outcome::Succeeded)
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Succeeded => f.write_str("succeeded"),
            Outcome::ExitCode(c) => write!(f, "exit code {c}"),
            Outcome::Signal(s) => write!(f, "killed by signal {s}"),
            Outcome::Cancelled => f.write_str("cancelled"),
            Outcome::Outputs(m) => write!(f, "outputs rejected: {m}"),
            Outcome::Infrastructure(m) => write!(f, "infrastructure error: {m}"),
            Outcome::Timeout(s) => write!(f, "timed out after {s} s"),
            Outcome::OutOfMemory => f.write_str("out of memory"),
            Outcome::PidLimit => f.write_str("pid limit reached"),
            Outcome::DiskLimit(b) => write!(f, "disk limit of {b} bytes reached"),
            Outcome::LogLimit(b) => write!(f, "log limit: killed after {b} bytes of output"),
        }
    }
}

/// The right to run a task, held by one worker until `expires`. `fence`
/// grows with every lease ever handed out: a result carrying an older fence
/// than the task's current lease is refused.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub worker: String,
    pub fence: u64,
    pub expires: i64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Task {
    pub id: TaskId,
    pub build: BuildId,
    pub target: String,
    pub state: TaskState,
    /// 1 for the first run; grows each time the task is re-queued.
    pub attempt: u32,
    pub lease: Option<Lease>,
    pub worker: Option<String>,
    pub outcome: Option<Outcome>,
    /// The complete log, in the store, once the task has ended.
    pub log: Option<Digest>,
    /// Manifest of the outputs, once the task has ended.
    pub outputs: Option<Digest>,
    pub created: i64,
    pub started: Option<i64>,
    pub finished: Option<i64>,
}

/// A file a task produced, named by its path relative to `$KILN_OUT`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Artifact {
    pub build: BuildId,
    pub task: TaskId,
    pub path: String,
    pub digest: Digest,
    pub size: u64,
    pub mode: u32,
}

/// An API credential. Only the sha256 of the secret is stored.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Token {
    pub name: String,
    pub admin: bool,
    pub created: i64,
}

/// A build with its tasks, as the API returns it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct BuildDetail {
    #[serde(flatten)]
    pub build: Build,
    pub task_list: Vec<Task>,
    /// Where the source came from, when it was fetched from git.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<crate::gitsrc::GitOrigin>,
}

/// Where a project's builds run and what their results publish into:
/// buildroot + architecture + repo (Koji's target, Copr's chroot).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub project: String,
    pub name: String,
    /// A buildroot's name, or `host` for the host's system dirs.
    pub buildroot: String,
    /// Debian architecture name of the builds (`amd64`, `arm64`, ...).
    pub arch: String,
    /// The project's repo successful builds publish into.
    pub repo: String,
    pub created: i64,
}

/// A project's signed apt repository, served at `/repos/<project>/<name>/`
/// with suite and codename `<name>`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Repo {
    pub project: String,
    pub name: String,
    /// Architectures always listed in Release (from the targets).
    pub architectures: Vec<String>,
    pub created: i64,
    /// Grows with every change of the repo's packages.
    pub revision: u64,
    /// The revision the served files show; below `revision` = a publish is due.
    pub published_revision: u64,
    /// When the served files were last switched.
    pub published: Option<i64>,
}

/// A `.deb` in a repo: the newest build of each package and architecture.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RepoDeb {
    pub package: String,
    pub version: String,
    pub arch: String,
    /// Path in the repo, `pool/main/<p>/<source>/<file>.deb`.
    pub pool_path: String,
    pub digest: Digest,
    pub size: u64,
    /// The rendered `Packages` paragraph.
    pub stanza: String,
    pub build: BuildId,
}

/// An RPM in a repo (binary or source), signed with the project's key:
/// the newest build of each name and arch.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RepoRpm {
    pub name: String,
    pub epoch: u32,
    pub version: String,
    pub release: String,
    /// RPM arch: `x86_64`, `noarch`, `src`, ...
    pub arch: String,
    /// Path in the repo, `Packages/<c>/<name>-<version>-<release>.<arch>.rpm`.
    pub location: String,
    /// The signed file's blob.
    pub digest: Digest,
    pub size: u64,
    /// Capability names it provides and requires (for BuildRequires).
    pub provides: Vec<String>,
    pub requires: Vec<String>,
    /// Its primary/filelists/other XML, rendered once.
    pub fragments: crate::publish::rpm::Fragments,
    pub build: BuildId,
}

impl RepoRpm {
    /// `[epoch:]version-release`.
    pub fn evr(&self) -> String {
        match self.epoch {
            0 => format!("{}-{}", self.version, self.release),
            e => format!("{e}:{}-{}", self.version, self.release),
        }
    }

    /// `name-[epoch:]version-release`.
    pub fn nevr(&self) -> String {
        format!("{}-{}", self.name, self.evr())
    }
}

/// What a successful task adds to its target's repo.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct RepoAdd {
    pub project: String,
    pub repo: String,
    pub debs: Vec<RepoDeb>,
    pub rpms: Vec<RepoRpm>,
}

/// A file a repo serves: its blob.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct RepoFileRef {
    pub digest: Digest,
    pub size: u64,
}

/// A named root filesystem tasks run in (each task on a copy-on-write view).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Buildroot {
    pub name: String,
    pub source: BuildrootSource,
    pub state: BuildrootState,
    /// Bumped by every successful create/refresh/import: the dir in use is
    /// `buildroots/<name>.<generation>`.
    pub generation: u64,
    pub created: i64,
    /// When the current generation became ready.
    pub ready: Option<i64>,
    /// Bytes of the current generation's files.
    pub size: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
// Externally tagged: postcard cannot read internally tagged enums.
#[serde(rename_all = "snake_case")]
pub enum BuildrootSource {
    /// `mmdebstrap --variant=buildd SUITE DIR MIRROR` (plus `include`).
    Debian {
        suite: String,
        mirror: String,
        include: Vec<String>,
    },
    /// An uploaded root filesystem tarball.
    Imported,
    /// `dnf --installroot DIR --releasever RELEASE` from `repos` only,
    /// installing `include` (default: the build tools, as mock's minimal
    /// buildroot), packages checked against `gpgkey` when given.
    Rpm {
        release: String,
        repos: Vec<String>,
        include: Vec<String>,
        gpgkey: Option<String>,
    },
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BuildrootState {
    /// Being made; its log shows the progress.
    Creating,
    Ready,
    /// The last create/import failed (nothing of it is left on disk).
    Failed(String),
}

/// A person who logs in to the web UI; may hold API tokens of their own.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    /// argon2id, PHC string format (never shown).
    pub password: String,
    /// May do everything (workers, buildroots, users, the audit log).
    pub admin: bool,
    pub created: i64,
}

/// What a user may do in one project (admins may do everything anywhere).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum ProjectRole {
    /// Submit, rebuild, cancel and re-queue the project's builds.
    Member,
    /// A member who also manages the project's members.
    Owner,
}

impl ProjectRole {
    pub fn as_str(self) -> &'static str {
        match self {
            ProjectRole::Member => "member",
            ProjectRole::Owner => "owner",
        }
    }
}

/// A logged-in browser: the cookie's secret is stored only hashed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub user: String,
    /// What every form of this session must send back (CSRF).
    pub csrf: String,
    pub created: i64,
    pub expires: i64,
}

/// An API token a user made for themself; it acts as that user.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct UserToken {
    pub user: String,
    pub label: String,
    pub created: i64,
}

/// One mutating request, as the audit log keeps it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct AuditEntry {
    pub seq: u64,
    pub at: i64,
    /// `user NAME`, `token NAME` or `anonymous`.
    pub who: String,
    /// `POST /builds/12/cancel`.
    pub action: String,
    /// The HTTP status it got.
    pub status: u16,
}
