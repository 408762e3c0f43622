//! What each CLI command does. `main.rs` parses arguments and calls these;
//! errors surface as one line and a non-zero exit.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use futures_util::StreamExt;

use crate::client::Client;
use crate::config::Config;
use crate::hub::{ADMIN_TOKEN_FILE, Hub};
use crate::model::{Build, BuildState};

/// Exit code of `build watch` / `build DIR` for a build that did not succeed.
pub const EXIT_BUILD_FAILED: i32 = 1;

/// Where the CLI finds its token: the flag/env value, else the admin token
/// the hub left in its data dir (`--data`/`KILN_DATA`, default ./kiln-data).
pub fn find_token(explicit: Option<String>, data: Option<&Path>) -> Option<String> {
    if explicit.is_some() {
        return explicit;
    }
    let dir = data
        .map(Path::to_path_buf)
        .unwrap_or_else(|| Config::default().server.data);
    std::fs::read_to_string(dir.join(ADMIN_TOKEN_FILE))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// `kiln serve`: run the hub until SIGINT or SIGTERM.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    // Handlers first: a signal that arrives once the address is printed must
    // already mean a clean shutdown.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let exe = std::env::current_exe().context("locating the kiln binary")?;
    let running = crate::start(config, exe).await?;
    eprintln!("kiln: listening on {}", running.url());
    if let (Some(url), Some(fp)) = (running.tls_url(), &running.hub.tls_fingerprint) {
        eprintln!("kiln: HTTPS on {url}, certificate fingerprint (SHA-256) {fp}");
    }
    eprintln!(
        "kiln: data in {}, admin token in {}",
        running.hub.data_dir().display(),
        running.hub.data_dir().join(ADMIN_TOKEN_FILE).display()
    );
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    eprintln!("kiln: shutting down");
    running.shutdown().await;
    Ok(())
}

/// What `kiln worker` runs with.
pub struct WorkerOptions {
    pub hub: String,
    /// A join token (`kwj1.…`) or an admin API token.
    pub token: String,
    pub data: PathBuf,
    pub slots: Option<usize>,
    pub name: Option<String>,
    pub features: Vec<String>,
    pub self_update: bool,
}

/// The client a worker talks to its hub with: a join token's secret, and
/// its certificate fingerprint pinned for an `https://` hub.
pub fn worker_client(hub: &str, token: &str) -> anyhow::Result<Client> {
    let join = crate::workers::JoinToken::parse(token).map_err(|m| anyhow::anyhow!(m))?;
    Ok(match join {
        // A pin on a plain-http URL is refused by `pinned`: the token came
        // from a hub serving HTTPS, so the worker must use its https URL.
        Some(j) => Client::pinned(hub, Some(j.secret), j.fingerprint.as_deref())?,
        None => Client::new(hub, Some(token.to_string())),
    })
}

/// `kiln worker`: checks the hub answers and who the token speaks for,
/// opens the worker's own store and runs `slots` lease loops until
/// SIGINT/SIGTERM.
pub async fn worker(o: WorkerOptions) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let client = worker_client(&o.hub, &o.token)?;
    let who = client.worker_whoami().await?;
    let name = match (o.name, who.worker) {
        (Some(n), _) => n,
        (None, Some(n)) => n,
        (None, None) => nix::unistd::gethostname()?.to_string_lossy().into_owned(),
    };
    crate::kinds::validate_name(&name).map_err(|m| anyhow::anyhow!("worker name {m}"))?;
    for f in &o.features {
        crate::kinds::validate_name(f).map_err(|m| anyhow::anyhow!("feature {m}"))?;
    }
    let mut config = Config::default();
    config.server.data = o.data.clone();
    config.build.slots = 0;
    let slots = o
        .slots
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let exe = std::env::current_exe().context("locating the kiln binary")?;
    let local = crate::hub::Hub::open(config, exe.clone())?;
    let info = std::sync::Arc::new(crate::workers::WorkerInfo::probe(
        &o.data,
        slots as u32,
        &o.features,
        true,
    ));
    eprintln!(
        "kiln: worker {name} ({}, {} cores) with {slots} slot(s) on hub {} (hub kiln {}, this kiln {})",
        info.arch,
        info.cores,
        client.base_url(),
        who.hub_version,
        info.version,
    );
    let restart = tokio_util::sync::CancellationToken::new();
    let loops: Vec<_> = (0..slots)
        .map(|s| {
            tokio::spawn(crate::worker::run_remote_slot(
                client.clone(),
                local.clone(),
                s as u32,
                name.clone(),
                info.clone(),
                restart.clone(),
            ))
        })
        .collect();
    let updater = o.self_update.then(|| {
        tokio::spawn(crate::worker::watch_for_update(
            client.clone(),
            exe.clone(),
            std::time::Duration::from_secs(60),
            restart.clone(),
        ))
    });
    let refused = tokio::select! {
        _ = int.recv() => false,
        _ = term.recv() => false,
        _ = local.shutdown.cancelled() => true,
        _ = restart.cancelled() => {
            // Self-update: every slot finishes its task, then the new
            // binary takes this process over (same pid, same arguments).
            for l in loops {
                let _ = l.await;
            }
            if let Some(u) = updater
                && let Ok(Some(staged)) = u.await
            {
                std::fs::rename(&staged, &exe)
                    .with_context(|| format!("replacing {}", exe.display()))?;
                eprintln!("kiln: worker {name} restarting into the hub's kiln {}", who.hub_version);
                use std::os::unix::process::CommandExt;
                let err = std::process::Command::new(&exe)
                    .args(std::env::args_os().skip(1))
                    .exec();
                bail!("cannot restart into {}: {err}", exe.display());
            }
            bail!("self-update stopped the slots but staged no binary");
        }
    };
    eprintln!("kiln: worker stopping");
    local.shutdown.cancel();
    for l in loops {
        let _ = l.await;
    }
    if refused {
        bail!("worker {name} stopped: the hub refused its token");
    }
    Ok(())
}

/// `kiln worker list`: one line per worker.
pub async fn worker_list(client: &Client) -> anyhow::Result<()> {
    println!(
        "{:<16} {:<9} {:>4} {:<7} {:>5} {:>6} {:>6} {:>5}  LAST SEEN",
        "NAME", "STATE", "RUN", "ARCH", "CORES", "OK", "INFRA", "QOS"
    );
    for w in client.workers().await? {
        let (arch, cores) = w
            .info
            .as_ref()
            .map_or(("?".to_string(), 0), |i| (i.arch.clone(), i.cores));
        println!(
            "{:<16} {:<9} {:>4} {:<7} {:>5} {:>6} {:>6} {:>5.1}  {}",
            w.name,
            w.state.to_string(),
            w.running,
            arch,
            cores,
            w.stats.succeeded,
            w.stats.infra,
            w.qos.rating,
            crate::model::format_ms(w.last_seen)
        );
    }
    Ok(())
}

/// `kiln worker show NAME`: everything the directory knows, as JSON.
pub async fn worker_show(client: &Client, name: &str) -> anyhow::Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(&client.worker(name).await?)?
    );
    Ok(())
}

/// `kiln worker drain|enable|disable NAME`.
pub async fn worker_set(client: &Client, name: &str, action: &str) -> anyhow::Result<()> {
    let w = client.set_worker(name, action).await?;
    println!("worker {}: {} ({} running)", w.name, w.state, w.running);
    Ok(())
}

/// `kiln worker token list`.
pub async fn worker_tokens(client: &Client) -> anyhow::Result<()> {
    for t in client.worker_tokens().await? {
        let state = match t.revoked {
            Some(r) => format!("revoked {}", crate::model::format_ms(r)),
            None => "live".to_string(),
        };
        println!(
            "{}\tcreated {}\t{state}",
            t.name,
            crate::model::format_ms(t.created)
        );
    }
    Ok(())
}

pub fn check_config(config: &Config) {
    print!("{}", config.to_toml());
}

/// What `kiln build submit` builds.
pub enum Source<'a> {
    /// A directory, a `.dsc` or a `.src.rpm`.
    Path(&'a Path),
    /// A git URL and ref the hub fetches.
    Git(&'a str, Option<&'a str>),
}

pub async fn submit(
    client: &Client,
    source: Source<'_>,
    project: Option<&str>,
    package: Option<&str>,
    targets: &[String],
) -> anyhow::Result<Build> {
    let targets: Vec<&str> = targets.iter().map(String::as_str).collect();
    Ok(match source {
        Source::Path(dir) => {
            client
                .submit_dir_to(dir, project, package, &targets)
                .await?
        }
        Source::Git(url, git_ref) => {
            client
                .submit_git(url, git_ref, project, package, &targets)
                .await?
        }
    })
}

/// Prints a buildroot job's log as it grows until the buildroot is ready
/// (exit 0) or failed (exit 1).
pub async fn follow_buildroot(client: &Client, name: &str) -> anyhow::Result<i32> {
    use std::io::Write as _;
    let mut shown = 0usize;
    loop {
        let b = client.buildroot(name).await?;
        let log = client.buildroot_log(name).await.unwrap_or_default();
        if log.len() > shown {
            print!("{}", &log[shown..]);
            let _ = std::io::stdout().flush();
            shown = log.len();
        }
        match &b.buildroot.state {
            crate::model::BuildrootState::Creating => {}
            crate::model::BuildrootState::Ready => {
                eprintln!(
                    "kiln: buildroot {name} ready (generation {}, {} MB)",
                    b.buildroot.generation,
                    b.buildroot.size >> 20
                );
                return Ok(0);
            }
            crate::model::BuildrootState::Failed(why) => {
                eprintln!("kiln: buildroot {name} failed: {why}");
                return Ok(1);
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

fn buildroot_state(b: &crate::model::Buildroot) -> String {
    match &b.state {
        crate::model::BuildrootState::Creating => "creating".into(),
        crate::model::BuildrootState::Ready => "ready".into(),
        crate::model::BuildrootState::Failed(why) => format!("failed: {why}"),
    }
}

pub async fn buildroot_list(client: &Client) -> anyhow::Result<()> {
    for b in client.buildroots().await? {
        let b = b.buildroot;
        println!(
            "{}\t{}\tgeneration {}\t{} MB",
            b.name,
            buildroot_state(&b),
            b.generation,
            b.size >> 20
        );
    }
    Ok(())
}

pub async fn buildroot_show(client: &Client, name: &str) -> anyhow::Result<()> {
    let v = client.buildroot(name).await?;
    let b = &v.buildroot;
    println!("buildroot {}: {}", b.name, buildroot_state(b));
    match &b.source {
        crate::model::BuildrootSource::Debian {
            suite,
            mirror,
            include,
        } => println!(
            "source: debian {suite} from {mirror} (+{})",
            include.join(",")
        ),
        crate::model::BuildrootSource::Rpm {
            release,
            repos,
            include,
            ..
        } => println!(
            "source: rpm release {release} from {} (+{})",
            repos.join(" "),
            include.join(",")
        ),
        crate::model::BuildrootSource::Imported => println!("source: imported tarball"),
    }
    println!(
        "generation {}, {} MB, at {}",
        b.generation,
        b.size >> 20,
        v.path.display()
    );
    if let Some(r) = b.ready {
        println!("ready since {}", crate::model::format_ms(r));
    }
    Ok(())
}

pub async fn repo_show(client: &Client, project: &str, repo: &str) -> anyhow::Result<()> {
    let v = client.repo(project, repo).await?;
    println!(
        "repo {project}/{repo}: {} package(s), architectures {}",
        v.packages.len(),
        v.repo.architectures.join(" ")
    );
    for p in &v.packages {
        println!(
            "  {} {} {} (build {})",
            p.package, p.version, p.arch, p.build
        );
    }
    println!("\nkey:  {}", v.sources.key_install);
    println!("list: {}", v.sources.list_line);
    println!("deb822:\n{}", v.sources.deb822);
    Ok(())
}

/// Follows a build's log to stdout until it ends; returns the exit code.
pub async fn watch(client: &Client, id: u64) -> anyhow::Result<i32> {
    let mut log = Box::pin(client.log(id, true).await?);
    let mut out = std::io::stdout().lock();
    while let Some(chunk) = log.next().await {
        out.write_all(&chunk?)?;
        out.flush()?;
    }
    drop(out);
    let b = client.build(id).await?;
    let state = b.detail.build.state;
    eprintln!("kiln: build {id} {state}");
    Ok(exit_code(state))
}

pub fn exit_code(state: BuildState) -> i32 {
    if state == BuildState::Succeeded {
        0
    } else {
        EXIT_BUILD_FAILED
    }
}

fn fmt_ms(ms: Option<i64>) -> String {
    ms.map(crate::model::format_ms)
        .unwrap_or_else(|| "-".into())
}

pub async fn list(client: &Client, limit: usize) -> anyhow::Result<()> {
    let builds = client.list_builds(None, limit).await?;
    println!(
        "{:>6}  {:<10} {:<16} {:<20} created",
        "id", "state", "project", "package"
    );
    for b in builds {
        println!(
            "{:>6}  {:<10} {:<16} {:<20} {}",
            b.id,
            b.state.as_str(),
            b.project,
            b.package,
            fmt_ms(Some(b.created))
        );
    }
    Ok(())
}

pub async fn show(client: &Client, id: u64) -> anyhow::Result<()> {
    let v = client.build(id).await?;
    let b = &v.detail.build;
    println!("build      {}", b.id);
    println!("state      {}", b.state);
    println!("project    {}", b.project);
    println!("package    {} ({})", b.package, b.kind);
    println!("source     {}", b.source);
    println!(
        "submitted  {} by {}",
        fmt_ms(Some(b.created)),
        b.submitted_by
    );
    println!("started    {}", fmt_ms(b.started));
    println!("finished   {}", fmt_ms(b.finished));
    if let Some(w) = &v.waiting {
        println!("waiting    {w}");
    }
    for t in &v.detail.task_list {
        println!(
            "task {:<5} {:<8} {:<10} attempt {} {} {}",
            t.id,
            t.target,
            t.state.as_str(),
            t.attempt,
            t.worker.as_deref().unwrap_or("-"),
            t.outcome
                .as_ref()
                .map(|o| o.to_string())
                .unwrap_or_default()
        );
    }
    Ok(())
}

pub async fn log(client: &Client, id: u64) -> anyhow::Result<()> {
    let mut log = Box::pin(client.log(id, false).await?);
    let mut out = std::io::stdout().lock();
    while let Some(chunk) = log.next().await {
        out.write_all(&chunk?)?;
    }
    Ok(())
}

pub async fn artifact_list(client: &Client, id: u64) -> anyhow::Result<()> {
    for a in client.artifacts(id).await? {
        println!("{:<40} {:>10}  {:o}  {}", a.path, a.size, a.mode, a.digest);
    }
    Ok(())
}

/// `artifact get ID PATH [-o FILE]`: PATH as listed, or a file name that
/// names exactly one artifact.
pub async fn artifact_get(
    client: &Client,
    id: u64,
    path: &str,
    out: Option<&Path>,
) -> anyhow::Result<()> {
    let arts = client.artifacts(id).await?;
    let a = match arts.iter().find(|a| a.path == path) {
        Some(a) => a.clone(),
        None => {
            let by_name: Vec<_> = arts
                .iter()
                .filter(|a| a.path.rsplit('/').next() == Some(path))
                .collect();
            match by_name.as_slice() {
                [one] => (*one).clone(),
                [] => bail!("build {id} has no artifact {path:?} (see `kiln artifact list {id}`)"),
                _ => bail!("{path:?} names several artifacts of build {id}; give the full path"),
            }
        }
    };
    let dest = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(a.path.rsplit('/').next().unwrap_or(&a.path)));
    let mut resp = client.artifact(id, &a.path).await?;
    let tmp = dest.with_extension("kiln-partial");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    while let Some(chunk) = resp.chunk().await.context("downloading")? {
        f.write_all(&chunk)?;
    }
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(a.mode & 0o777))?;
    }
    std::fs::rename(&tmp, &dest)?;
    eprintln!("kiln: wrote {} ({} bytes)", dest.display(), a.size);
    Ok(())
}

/// A password from standard input: asked for without echo on a terminal,
/// else the first line.
pub fn read_password(prompt: &str) -> anyhow::Result<String> {
    use nix::sys::termios::{LocalFlags, SetArg, tcgetattr, tcsetattr};
    use std::io::{BufRead, IsTerminal, Write};
    let stdin = std::io::stdin();
    let tty = stdin.is_terminal();
    let saved = if tty {
        eprint!("{prompt}");
        let _ = std::io::stderr().flush();
        let saved = tcgetattr(&stdin)?;
        let mut quiet = saved.clone();
        quiet.local_flags.remove(LocalFlags::ECHO);
        tcsetattr(&stdin, SetArg::TCSANOW, &quiet)?;
        Some(saved)
    } else {
        None
    };
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    if let Some(saved) = saved {
        let _ = tcsetattr(&stdin, SetArg::TCSANOW, &saved);
        eprintln!();
    }
    read?;
    let pw = line.trim_end_matches(['\n', '\r']).to_string();
    if pw.is_empty() {
        bail!("no password given on standard input");
    }
    Ok(pw)
}

pub async fn token_create(client: &Client, name: &str, admin: bool) -> anyhow::Result<()> {
    let t = client.create_token(name, admin).await?;
    println!("{}", t.token);
    Ok(())
}

/// `kiln build DIR`: a one-shot local build with no server — the same
/// ingest, sandbox and store, under `data` (default ~/.local/share/kiln).
/// Outputs are written under `out`. Returns the exit code.
pub async fn build_local(dir: &Path, out: &Path, data: Option<PathBuf>) -> anyhow::Result<i32> {
    let mut config = Config::default();
    config.server.data = data.unwrap_or_else(crate::worker::local_data_dir);
    config.build.slots = 1;
    let exe = std::env::current_exe().context("locating the kiln binary")?;
    let cfg = config.clone();
    let hub = tokio::task::spawn_blocking(move || Hub::open(cfg, exe)).await??;
    let package = std::fs::canonicalize(dir)
        .with_context(|| format!("{}", dir.display()))?
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    let (h, d) = (hub.clone(), dir.to_owned());
    let build = tokio::task::spawn_blocking(move || -> anyhow::Result<Build> {
        let (mut r, mut w) = std::io::pipe()?;
        let writer = std::thread::spawn(move || crate::cas::tar_dir(&d, &mut w));
        let pending = h.cas.ingest_tar(&mut r, u64::MAX);
        drop(r);
        writer
            .join()
            .map_err(|_| anyhow::anyhow!("tar thread panicked"))??;
        let sub = crate::scheduler::Submission {
            project: crate::model::DEFAULT_PROJECT.into(),
            package,
            submitted_by: "local".into(),
            origin: None,
            targets: vec![],
        };
        Ok(crate::scheduler::submit(&h, sub, pending?)?)
    })
    .await??;
    eprintln!(
        "kiln: local build {} in {}",
        build.id,
        hub.data_dir().display()
    );
    let slot = tokio::spawn(crate::worker::run_slot(hub.clone(), 0));
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(crate::web::stream_build_log(
        hub.clone(),
        build.clone(),
        true,
        tx,
    ));
    {
        let mut stdout = std::io::stdout();
        while let Some(chunk) = rx.recv().await {
            stdout.write_all(&chunk?)?;
            stdout.flush()?;
        }
    }
    let done = wait_finished(&hub, build.id).await?;
    hub.shutdown.cancel();
    let _ = slot.await;
    let arts = hub.db.artifacts(build.id)?;
    let dest = out.to_path_buf();
    let cas = hub.cas.clone();
    let arts2 = arts.clone();
    tokio::task::spawn_blocking(move || crate::worker::export_artifacts(&cas, &arts2, &dest))
        .await??;
    for a in &arts {
        eprintln!("kiln: {}", out.join(&a.path).display());
    }
    eprintln!("kiln: build {} {}", done.id, done.state);
    Ok(exit_code(done.state))
}

async fn wait_finished(hub: &Arc<Hub>, id: u64) -> anyhow::Result<Build> {
    loop {
        let mut changes = hub.changes.subscribe();
        let b = hub.db.build(id)?;
        if b.state.is_finished() {
            return Ok(b);
        }
        tokio::select! {
            _ = changes.changed() => {}
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
        }
    }
}
