//! The `kiln` command: parses arguments, sets up logging, picks a role.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use kiln::client::Client;
use kiln::config::Config;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "A package build service in one binary"
)]
struct Cli {
    /// The hub's URL.
    #[arg(
        long,
        global = true,
        env = "KILN_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    hub: String,
    /// API token (default: the admin token in the data dir).
    #[arg(long, global = true, env = "KILN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Config file (TOML); see docs/config.md.
    #[arg(long, global = true, env = "KILN_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the hub: API, web pages and local build slots.
    Serve(ServeArgs),
    /// Run a remote worker: lease tasks from the hub (--hub, --token) and
    /// run them in local sandboxes.
    Worker(WorkerArgs),
    /// Submit, follow and inspect builds; `kiln build DIR` builds locally without a hub.
    Build(BuildArgs),
    /// List and download a build's artifacts.
    #[command(subcommand)]
    Artifact(ArtifactCmd),
    /// Manage API tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Web accounts: `kiln user add --admin NAME` makes the first admin.
    #[command(subcommand)]
    User(UserCmd),
    /// Stop or re-run single tasks (admin).
    #[command(subcommand)]
    Task(TaskCmd),
    /// Print the effective configuration (file, environment, defaults).
    CheckConfig(ServeArgs),
    /// Root filesystems builds run in: bootstrap, import, list, show, delete, refresh.
    #[command(subcommand)]
    Buildroot(BuildrootCmd),
    /// A project's targets: buildroot + arch + the repo results publish into.
    #[command(subcommand)]
    Target(TargetCmd),
    /// A project's signed apt repositories.
    #[command(subcommand)]
    Repo(RepoCmd),
}

#[derive(Subcommand)]
enum BuildrootCmd {
    /// Bootstrap a root and follow its progress: `debian` (mmdebstrap,
    /// buildd variant; --suite, --mirror) or `rpm` (dnf --installroot;
    /// --release, --repo).
    Create {
        name: String,
        #[arg(long, default_value = "debian")]
        bootstrap: String,
        /// Debian suite (bookworm, trixie, ...).
        #[arg(long, default_value = "")]
        suite: String,
        /// Default http://deb.debian.org/debian.
        #[arg(long)]
        mirror: Option<String>,
        /// Extra packages, comma-separated (`--include rpm` gives a Debian
        /// root rpmbuild); for rpm, the packages to install (default
        /// rpm-build bash coreutils findutils gcc make).
        #[arg(long, value_delimiter = ',')]
        include: Vec<String>,
        /// rpm: the distribution's release (dnf's $releasever).
        #[arg(long)]
        release: Option<String>,
        /// rpm: a repository base URL (repeat for several).
        #[arg(long = "repo")]
        repos: Vec<String>,
        /// rpm: the URL of the key packages must be signed with (checked
        /// by dnf; without it they are not signature-checked).
        #[arg(long)]
        gpgkey: Option<String>,
    },
    /// Import a root filesystem tarball (.tar, .tar.zst, .tar.gz, .tar.xz).
    Import {
        name: String,
        tarball: PathBuf,
    },
    List,
    Show {
        name: String,
    },
    Delete {
        name: String,
    },
    /// Bootstrap a new generation and switch to it (the current one serves meanwhile).
    Refresh {
        name: String,
    },
}

#[derive(Subcommand)]
enum TargetCmd {
    /// Add a target (its repo and the project's signing key come with it).
    Add {
        project: String,
        name: String,
        #[arg(long)]
        buildroot: String,
        #[arg(long, default_value = "amd64")]
        arch: String,
        /// Default: the target's name.
        #[arg(long)]
        repo: Option<String>,
        /// A feature workers must have to run this target's tasks (repeatable), e.g. kvm.
        #[arg(long = "feature")]
        features: Vec<String>,
        /// Least memory a worker must have, e.g. 16G.
        #[arg(long, value_parser = kiln::workers::parse_size)]
        min_memory: Option<u64>,
        #[arg(long)]
        min_cores: Option<u64>,
        /// Least free disk a worker must have, e.g. 50G.
        #[arg(long, value_parser = kiln::workers::parse_size)]
        min_disk: Option<u64>,
    },
    List {
        project: String,
    },
}

#[derive(Subcommand)]
enum RepoCmd {
    /// A repo's packages and the lines that make apt use it.
    Show { project: String, repo: String },
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Also serve HTTPS on this address (see docs/config.md, tls_*).
    #[arg(long)]
    tls_listen: Option<std::net::SocketAddr>,
    /// Data directory.
    #[arg(long, env = "KILN_DATA")]
    data: Option<PathBuf>,
    /// Local build slots (default: the number of cores; 0 = remote workers only).
    #[arg(long)]
    slots: Option<usize>,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct BuildArgs {
    #[command(subcommand)]
    cmd: Option<BuildCmd>,
    /// Build DIR locally, without a hub.
    dir: Option<PathBuf>,
    /// Where `kiln build DIR` writes the outputs.
    #[arg(short, long, default_value = "kiln-out")]
    out: PathBuf,
    /// Store of local builds (default ~/.local/share/kiln).
    #[arg(long)]
    data: Option<PathBuf>,
}

#[derive(Subcommand)]
enum BuildCmd {
    /// Upload a source tree (a directory, a Debian `.dsc` with the files
    /// it names, or a `.src.rpm`), or have the hub fetch a git ref, and
    /// queue a build; prints the build id.
    Submit {
        /// A directory, a `.dsc` or a `.src.rpm` file.
        #[arg(required_unless_present = "git", conflicts_with = "git")]
        dir: Option<PathBuf>,
        /// A git URL (https, http, git) the hub fetches instead.
        #[arg(long)]
        git: Option<String>,
        /// The branch, tag or commit of --git (default: the remote's HEAD);
        /// pinned to its commit at submission.
        #[arg(long = "ref", requires = "git")]
        git_ref: Option<String>,
        #[arg(long)]
        project: Option<String>,
        /// Package name (default: kiln.toml's [package] name, else the directory's name).
        #[arg(long)]
        package: Option<String>,
        /// Targets of the project to build for, comma-separated (default:
        /// `host` for kiln.toml trees, every buildroot target for Debian trees).
        #[arg(long, value_delimiter = ',')]
        target: Vec<String>,
        /// Follow the log after submitting.
        #[arg(long)]
        watch: bool,
    },
    /// Follow a build's log until it ends; exit code 0 if it succeeded, 1 if not.
    Watch { id: u64 },
    /// Recent builds.
    List {
        #[arg(long, default_value_t = 30)]
        limit: usize,
    },
    /// A build's state and tasks.
    Show { id: u64 },
    /// Cancel every task of the build that has not ended (admin).
    Cancel { id: u64 },
    /// Set a build's priority, -100..=100 (admin): higher runs first, ahead of fair share.
    Priority {
        id: u64,
        #[arg(allow_hyphen_values = true)]
        priority: i64,
    },
    /// A build's log so far.
    Log { id: u64 },
}

#[derive(Subcommand)]
enum ArtifactCmd {
    List {
        id: u64,
    },
    /// Download an artifact by its listed path (or its file name if unique).
    Get {
        id: u64,
        path: String,
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct WorkerArgs {
    #[command(subcommand)]
    cmd: Option<WorkerCmd>,
    /// The worker's own store (blob cache, logs, work dirs).
    #[arg(long, default_value = "kiln-worker-data")]
    data: PathBuf,
    /// Tasks run at once (default: the number of cores).
    #[arg(long)]
    slots: Option<usize>,
    /// The name the hub shows (default: the join token's worker, else the host name).
    #[arg(long)]
    name: Option<String>,
    /// A feature this worker offers to targets that require it (repeatable); kvm is detected.
    #[arg(long = "feature")]
    features: Vec<String>,
    /// When the hub runs another kiln build, fetch its binary (digest-checked) and restart into it when idle.
    #[arg(long)]
    self_update: bool,
}

#[derive(Subcommand)]
enum WorkerCmd {
    /// Join tokens that enrol workers (admin).
    #[command(subcommand)]
    Token(WorkerTokenCmd),
    /// The worker directory: state, configuration, QoS.
    List,
    /// One worker in full.
    Show { name: String },
    /// Take no new tasks; running ones finish (admin).
    Drain { name: String },
    /// Take tasks again (admin).
    Enable { name: String },
    /// Take no new tasks; running ones are re-queued elsewhere (admin).
    Disable { name: String },
}

#[derive(Subcommand)]
enum WorkerTokenCmd {
    /// Print a join token for one worker (shown once).
    Create {
        /// The worker it enrols.
        #[arg(long)]
        name: String,
    },
    /// Join tokens by worker, never their secrets.
    List,
    /// Revoke a worker's join token: its next request is refused.
    Revoke { name: String },
}

#[derive(Subcommand)]
enum TaskCmd {
    /// Cancel a queued or running task (a running sandbox is killed).
    Cancel { id: u64 },
    /// Queue a task again as a new attempt (a running one is stopped first).
    Requeue { id: u64 },
}

#[derive(Subcommand)]
enum UserCmd {
    /// Add a user who logs in to the web UI; the password is read from
    /// standard input (asked for, without echo, on a terminal).
    Add {
        name: String,
        /// May do everything: workers, buildroots, users, the audit log.
        #[arg(long)]
        admin: bool,
    },
    /// List users.
    List,
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a token and print it (shown once).
    Create {
        #[arg(long, default_value = "cli")]
        name: String,
        #[arg(long)]
        admin: bool,
    },
}

fn main() -> ExitCode {
    // The sandbox init role first, before any thread exists (it must be
    // single-threaded) and without building clap's command tree: it is on
    // the path of every task's start.
    let mut args = std::env::args_os().skip(1);
    if args.next().is_some_and(|a| a == kiln::sandbox::INIT_ROLE) {
        let (Some(result), None) = (args.next(), args.next()) else {
            eprintln!(
                "usage: kiln {} RESULT (spec on stdin)",
                kiln::sandbox::INIT_ROLE
            );
            return ExitCode::from(2);
        };
        let code = kiln::sandbox::init_main(std::path::Path::new(&result));
        return ExitCode::from(code.clamp(0, 255) as u8);
    }
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(dispatch(cli)) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("kiln: error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::from(2)
        }
    }
}

fn load_config(file: Option<&PathBuf>, a: &ServeArgs) -> anyhow::Result<Config> {
    let mut c = Config::load(file.map(|p| p.as_path()))?;
    if let Some(l) = a.listen {
        c.server.listen = l;
    }
    if let Some(l) = a.tls_listen {
        c.server.tls_listen = Some(l);
    }
    if let Some(d) = &a.data {
        c.server.data = d.clone();
    }
    if let Some(s) = a.slots {
        c.build.slots = s;
    }
    Ok(c)
}

async fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    let data_env = std::env::var_os("KILN_DATA").map(PathBuf::from);
    let client = || {
        Client::new(
            &cli.hub,
            kiln::cli::find_token(cli.token.clone(), data_env.as_deref()),
        )
    };
    match &cli.cmd {
        Cmd::Serve(a) => kiln::cli::serve(load_config(cli.config.as_ref(), a)?).await?,
        Cmd::Worker(WorkerArgs { cmd: Some(cmd), .. }) => {
            let c = client();
            match cmd {
                WorkerCmd::Token(WorkerTokenCmd::Create { name }) => {
                    println!("{}", c.create_worker_token(name).await?.token)
                }
                WorkerCmd::Token(WorkerTokenCmd::List) => kiln::cli::worker_tokens(&c).await?,
                WorkerCmd::Token(WorkerTokenCmd::Revoke { name }) => {
                    c.revoke_worker_token(name).await?;
                    println!("revoked the join token of worker {name}");
                }
                WorkerCmd::List => kiln::cli::worker_list(&c).await?,
                WorkerCmd::Show { name } => kiln::cli::worker_show(&c, name).await?,
                WorkerCmd::Drain { name } => kiln::cli::worker_set(&c, name, "drain").await?,
                WorkerCmd::Enable { name } => kiln::cli::worker_set(&c, name, "enable").await?,
                WorkerCmd::Disable { name } => kiln::cli::worker_set(&c, name, "disable").await?,
            }
        }
        Cmd::Worker(a) => {
            let token = cli
                .token
                .clone()
                .ok_or_else(|| anyhow::anyhow!("a worker needs --token (or KILN_TOKEN)"))?;
            kiln::cli::worker(kiln::cli::WorkerOptions {
                hub: cli.hub.clone(),
                token,
                data: a.data.clone(),
                slots: a.slots,
                name: a.name.clone(),
                features: a.features.clone(),
                self_update: a.self_update,
            })
            .await?
        }
        Cmd::CheckConfig(a) => kiln::cli::check_config(&load_config(cli.config.as_ref(), a)?),
        Cmd::Build(b) => match (&b.cmd, &b.dir) {
            (None, Some(dir)) => return kiln::cli::build_local(dir, &b.out, b.data.clone()).await,
            (None, None) => {
                anyhow::bail!("give a directory to build, or a subcommand (see kiln build --help)")
            }
            (Some(cmd), _) => match cmd {
                BuildCmd::Submit {
                    dir,
                    git,
                    git_ref,
                    project,
                    package,
                    target,
                    watch,
                } => {
                    let c = client();
                    let source = match (dir, git) {
                        (Some(d), _) => kiln::cli::Source::Path(d),
                        (None, Some(url)) => kiln::cli::Source::Git(url, git_ref.as_deref()),
                        (None, None) => {
                            anyhow::bail!("give a directory, a .dsc, a .src.rpm or --git URL")
                        }
                    };
                    let b = kiln::cli::submit(
                        &c,
                        source,
                        project.as_deref(),
                        package.as_deref(),
                        target,
                    )
                    .await?;
                    println!("{}", b.id);
                    if *watch {
                        return kiln::cli::watch(&c, b.id).await;
                    }
                }
                BuildCmd::Watch { id } => return kiln::cli::watch(&client(), *id).await,
                BuildCmd::List { limit } => kiln::cli::list(&client(), *limit).await?,
                BuildCmd::Show { id } => kiln::cli::show(&client(), *id).await?,
                BuildCmd::Cancel { id } => {
                    let b = client().cancel_build(*id).await?;
                    println!("build {} {}", b.id, b.state);
                }
                BuildCmd::Priority { id, priority } => {
                    client().set_priority(*id, *priority).await?;
                    println!("build {id}: priority {priority}");
                }
                BuildCmd::Log { id } => kiln::cli::log(&client(), *id).await?,
            },
        },
        Cmd::Artifact(ArtifactCmd::List { id }) => kiln::cli::artifact_list(&client(), *id).await?,
        Cmd::Artifact(ArtifactCmd::Get { id, path, output }) => {
            kiln::cli::artifact_get(&client(), *id, path, output.as_deref()).await?
        }
        Cmd::Task(cmd) => {
            let (id, b) = match cmd {
                TaskCmd::Cancel { id } => (id, client().cancel_task(*id).await?),
                TaskCmd::Requeue { id } => (id, client().requeue_task(*id).await?),
            };
            println!("task {id}: build {} {}", b.id, b.state);
        }
        Cmd::User(UserCmd::Add { name, admin }) => {
            let password = kiln::cli::read_password(&format!("password for {name}: "))?;
            let u = client().add_user(name, &password, *admin).await?;
            println!(
                "added user {}{}",
                u.name,
                if u.admin { " (admin)" } else { "" }
            );
        }
        Cmd::User(UserCmd::List) => {
            for u in client().users().await? {
                println!("{}\t{}", u.name, if u.admin { "admin" } else { "" });
            }
        }
        Cmd::Token(TokenCmd::Create { name, admin }) => {
            kiln::cli::token_create(&client(), name, *admin).await?
        }
        Cmd::Buildroot(b) => {
            let c = client();
            match b {
                BuildrootCmd::Create {
                    name,
                    bootstrap,
                    suite,
                    mirror,
                    include,
                    release,
                    repos,
                    gpgkey,
                } => {
                    let req = kiln::buildroot::CreateRequest {
                        name: name.clone(),
                        bootstrap: bootstrap.clone(),
                        suite: suite.clone(),
                        mirror: mirror.clone(),
                        include: include.clone(),
                        release: release.clone(),
                        repos: repos.clone(),
                        gpgkey: gpgkey.clone(),
                    };
                    c.create_buildroot(&req).await?;
                    return kiln::cli::follow_buildroot(&c, name).await;
                }
                BuildrootCmd::Import { name, tarball } => {
                    c.import_buildroot(name, tarball).await?;
                    return kiln::cli::follow_buildroot(&c, name).await;
                }
                BuildrootCmd::Refresh { name } => {
                    c.refresh_buildroot(name).await?;
                    return kiln::cli::follow_buildroot(&c, name).await;
                }
                BuildrootCmd::List => kiln::cli::buildroot_list(&c).await?,
                BuildrootCmd::Show { name } => kiln::cli::buildroot_show(&c, name).await?,
                BuildrootCmd::Delete { name } => {
                    c.delete_buildroot(name).await?;
                    println!("deleted buildroot {name}");
                }
            }
        }
        Cmd::Target(TargetCmd::Add {
            project,
            name,
            buildroot,
            arch,
            repo,
            features,
            min_memory,
            min_cores,
            min_disk,
        }) => {
            let req = kiln::server::TargetRequest {
                name: name.clone(),
                buildroot: buildroot.clone(),
                arch: arch.clone(),
                repo: repo.clone(),
                features: features.clone(),
                min_memory_bytes: min_memory.unwrap_or(0),
                min_cores: min_cores.unwrap_or(0),
                min_disk_bytes: min_disk.unwrap_or(0),
            };
            let t = client().add_target(project, &req).await?;
            println!(
                "target {}/{}: buildroot {}, arch {}, repo {}",
                t.project, t.name, t.buildroot, t.arch, t.repo
            );
        }
        Cmd::Target(TargetCmd::List { project }) => {
            for t in client().targets(project).await? {
                println!("{}	{}	{}	{}", t.name, t.buildroot, t.arch, t.repo);
            }
        }
        Cmd::Repo(RepoCmd::Show { project, repo }) => {
            kiln::cli::repo_show(&client(), project, repo).await?
        }
    }
    Ok(0)
}
