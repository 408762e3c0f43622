//! A small headless-Chromium driver for the web UI tests, over the Chrome
//! DevTools Protocol (the `chromiumoxide` crate speaks CDP; this file
//! launches Debian's `chromium` itself and wraps what the page tests need),
//! and the browser tests of today's pages.
//!
//! Chromium runs as PID 1 of its own PID namespace (`unshare --pid --fork`):
//! the browser does not wait for its zygotes when it exits, so without that
//! its helpers would be left to an init that may never reap them (a
//! container's PID 1 often doesn't). When the namespace's first process
//! ends, the kernel kills and reaps everything else in it. Everything
//! Chromium left is gone once a [`Browser`] is dropped. (Where no PID
//! namespace can be made, Chromium starts directly and only its zombies may
//! be left, for the init to reap.)
//!
//! Screenshots go to `target/test-screenshots/NAME.png` (under
//! `CARGO_TARGET_DIR` when that is set) for a person to look at.

#![allow(dead_code)] // The page tests use the rest of the driver.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use chromiumoxide::cdp::browser_protocol::browser::BrowserContextId;
use chromiumoxide::cdp::browser_protocol::dom::SetFileInputFilesParams;
use chromiumoxide::cdp::browser_protocol::emulation::{
    SetDeviceMetricsOverrideParams, SetTouchEmulationEnabledParams,
};
use chromiumoxide::cdp::browser_protocol::network::{EventResponseReceived, ResourceType};
use chromiumoxide::cdp::browser_protocol::page::{
    CaptureScreenshotFormat, CaptureScreenshotParams, EventJavascriptDialogOpening,
    HandleJavaScriptDialogParams, Viewport,
};
use chromiumoxide::cdp::browser_protocol::target::{
    CreateBrowserContextParams, CreateTargetParams,
};
use chromiumoxide::cdp::js_protocol::runtime::{
    EvaluateParams, EventConsoleApiCalled, EventExceptionThrown, RemoteObjectId,
};
use chromiumoxide::error::CdpError;
use chromiumoxide::handler::HandlerConfig;
use chromiumoxide::layout::Point;
use chromiumoxide::listeners::EventStream;
use futures_util::{FutureExt, StreamExt};
use kiln::model::BuildState;
use serde_json::Value;

pub use chromiumoxide::cdp::browser_protocol::network::{Cookie, CookieSameSite};

use crate::harness::{hub, run_script, script_tree};

/// How long a navigation, a wait for a selector, or Chromium's start may take.
pub const TIMEOUT: Duration = Duration::from_secs(15);
pub const DESKTOP: (u32, u32) = (1280, 800);
pub const PHONE: (u32, u32) = (390, 844);

/// A headless Chromium and the DevTools connection to it; killed (with
/// every process it started) on drop.
pub struct Browser {
    cdp: chromiumoxide::Browser,
    handler: tokio::task::JoinHandle<()>,
    process: Chromium,
}

/// The launched process tree.
struct Chromium {
    child: Child,
    /// Whether `child` is `unshare`, with Chromium as its only child.
    in_pid_ns: bool,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    /// The profile; removed after the process is gone.
    profile: Option<tempfile::TempDir>,
}

/// One tab. Records JS dialogs (dismissing them), console messages and
/// uncaught exceptions from the moment it was opened.
pub struct Page {
    cdp: chromiumoxide::Page,
    log: Arc<Mutex<PageLog>>,
    net: Mutex<Documents>,
    listeners: Vec<tokio::task::JoinHandle<()>>,
}

/// Responses seen, for the status of the document loaded last.
struct Documents {
    responses: EventStream<EventResponseReceived>,
    status: u16,
}

#[derive(Default)]
struct PageLog {
    dialogs: Vec<String>,
    console: Vec<String>,
    errors: Vec<String>,
}

/// The Chromium to drive: `KILN_CHROMIUM`, else Debian's, else one on PATH.
fn chromium_exe() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_CHROMIUM") {
        return p.into();
    }
    // Debian's /usr/bin/chromium is a shell wrapper adding flags from
    // /etc/chromium.d; the binary itself behaves the same everywhere.
    let debian = Path::new("/usr/lib/chromium/chromium");
    if debian.exists() {
        return debian.to_owned();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in [
        "chromium",
        "chromium-browser",
        "google-chrome-stable",
        "google-chrome",
    ] {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "no Chromium found: the browser tests need Debian's `chromium` package \
         (`apt-get install chromium`; `sh tests/run test` installs it), or \
         KILN_CHROMIUM=/path/to/chrome"
    );
}

fn chromium_args(profile: &Path) -> Vec<String> {
    [
        // The new headless mode is the real browser without a window.
        "--headless=new",
        // Chromium's own sandbox refuses to run as root.
        "--no-sandbox",
        "--disable-gpu",
        // Containers often have a tiny /dev/shm.
        "--disable-dev-shm-usage",
        "--remote-debugging-port=0",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-default-apps",
        "--disable-extensions",
        "--disable-sync",
        "--password-store=basic",
        "--use-mock-keychain",
        "--mute-audio",
        "--hide-scrollbars",
        "--force-color-profile=srgb",
        "--lang=en-US",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("--user-data-dir={}", profile.display())])
    .collect()
}

impl Chromium {
    /// Starts Chromium and returns it with its DevTools websocket URL.
    async fn start(exe: &Path, in_pid_ns: bool) -> Result<(Chromium, String), String> {
        let profile = tempfile::Builder::new()
            .prefix("kiln-chromium-")
            .tempdir()
            .map_err(|e| format!("profile dir: {e}"))?;
        let mut cmd = if in_pid_ns {
            let mut c = Command::new("unshare");
            // Not root: a user namespace gives the rights for the others.
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                c.arg("--user").arg("--map-root-user");
            }
            // --kill-child: Chromium dies with unshare; --mount-proc: its
            // own /proc, so that the PIDs it reads there are its own.
            c.args(["--pid", "--fork", "--kill-child", "--mount-proc", "--"]);
            c.arg(exe);
            c
        } else {
            Command::new(exe)
        };
        cmd.args(chromium_args(profile.path()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own process group: a last-resort kill reaches everything.
            .process_group(0);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting {}: {e}", exe.display()))?;
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let stderr = child.stderr.take().unwrap();
            let tail = stderr_tail.clone();
            // Reads stderr to its end, so Chromium never blocks on it.
            std::thread::spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Some(url) = line.strip_prefix("DevTools listening on ") {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(url.trim().to_string());
                        }
                        continue;
                    }
                    // No D-Bus in a test box: Chromium complains at length.
                    if line.contains("dbus") {
                        continue;
                    }
                    let mut t = tail.lock().unwrap();
                    if t.len() == 40 {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            });
        }
        let mut process = Chromium {
            child,
            in_pid_ns,
            stderr_tail,
            profile: Some(profile),
        };
        match tokio::time::timeout(TIMEOUT, rx).await {
            Ok(Ok(url)) => Ok((process, url)),
            Ok(Err(_)) => {
                // stderr ended: the process is gone.
                let status = process.child.wait().ok();
                Err(format!(
                    "{} exited ({status:?}) without a DevTools URL:\n{}",
                    exe.display(),
                    process.stderr()
                ))
            }
            Err(_) => Err(format!(
                "{} printed no DevTools URL in {TIMEOUT:?}:\n{}",
                exe.display(),
                process.stderr()
            )),
        }
    }

    fn stderr(&self) -> String {
        let t = self.stderr_tail.lock().unwrap();
        t.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// The PID of Chromium's first process.
    fn browser_pid(&self) -> Option<i32> {
        let pid = self.child.id();
        if !self.in_pid_ns {
            return Some(pid as i32);
        }
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// Whether `child` has ended (and is reaped), within `within`.
    fn exited_within(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Ends Chromium: SIGTERM to its first process (a clean shutdown), then
    /// SIGKILL, then SIGKILL to the whole process group; reaps `child`.
    /// In a PID namespace the kernel ends and reaps the rest when the first
    /// process exits, and unshare exits once that one is gone.
    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        for sig in [libc::SIGTERM, libc::SIGKILL] {
            if let Some(pid) = self.browser_pid() {
                // SAFETY: plain kill(2) on a process we started.
                unsafe { libc::kill(pid, sig) };
                if self.exited_within(Duration::from_secs(5)) {
                    return;
                }
            }
        }
        let pgid = self.child.id() as i32;
        // SAFETY: as above, to the process group we made.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        self.stop();
        drop(self.profile.take());
    }
}

impl Browser {
    /// Starts a headless Chromium and connects to it. Panics, saying what
    /// is missing, when there is no Chromium: the tests run as root in CI
    /// where `sh tests/run test` installs it.
    pub async fn launch() -> Browser {
        let exe = chromium_exe();
        assert!(
            exe.is_file(),
            "{} does not exist: the browser tests need Debian's `chromium` package",
            exe.display()
        );
        let (process, ws) = match Chromium::start(&exe, true).await {
            Ok(started) => started,
            // No rights for a PID namespace (a locked-down container):
            // Chromium directly, whose helpers its init then has to reap.
            Err(e) => {
                eprintln!("chromium in a PID namespace failed ({e}); starting it directly");
                Chromium::start(&exe, false)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"))
            }
        };
        let config = HandlerConfig {
            // Each page sets its own viewport (desktop by default).
            viewport: None,
            request_timeout: Duration::from_secs(30),
            ..Default::default()
        };
        let (cdp, mut handler) = chromiumoxide::Browser::connect_with_config(ws.clone(), config)
            .await
            .unwrap_or_else(|e| panic!("connecting to Chromium at {ws}: {e}"));
        let handler = tokio::spawn(async move {
            while let Some(r) = handler.next().await {
                if let Err(e) = r {
                    eprintln!("chromium DevTools connection: {e}");
                    break;
                }
            }
        });
        Browser {
            cdp,
            handler,
            process,
        }
    }

    /// A new tab at about:blank, desktop-sized.
    pub async fn new_page(&self) -> Page {
        self.open(CreateTargetParams::new("about:blank")).await
    }

    /// A new tab in a fresh browser context: its own cookies and storage,
    /// like a private window (a second user, or a logged-out visitor).
    pub async fn new_private_page(&self) -> Page {
        let ctx: BrowserContextId = self
            .cdp
            .create_browser_context(CreateBrowserContextParams::default())
            .await
            .expect("Target.createBrowserContext");
        let mut params = CreateTargetParams::new("about:blank");
        params.browser_context_id = Some(ctx);
        self.open(params).await
    }

    async fn open(&self, params: CreateTargetParams) -> Page {
        let cdp = self
            .cdp
            .new_page(params)
            .await
            .expect("Target.createTarget");
        let log = Arc::new(Mutex::new(PageLog::default()));
        let mut listeners = Vec::new();

        let mut dialogs = cdp
            .event_listener::<EventJavascriptDialogOpening>()
            .await
            .expect("dialog events");
        let (l, p) = (log.clone(), cdp.clone());
        listeners.push(tokio::spawn(async move {
            while let Some(ev) = dialogs.next().await {
                l.lock()
                    .unwrap()
                    .dialogs
                    .push(format!("{:?}: {}", ev.r#type, ev.message));
                // A dialog left open blocks the page's scripts.
                let _ = p.execute(HandleJavaScriptDialogParams::new(false)).await;
            }
        }));

        let mut console = cdp
            .event_listener::<EventConsoleApiCalled>()
            .await
            .expect("console events");
        let l = log.clone();
        listeners.push(tokio::spawn(async move {
            while let Some(ev) = console.next().await {
                let args: Vec<String> = ev
                    .args
                    .iter()
                    .map(|a| match &a.value {
                        Some(Value::String(s)) => s.clone(),
                        Some(v) => v.to_string(),
                        None => a.description.clone().unwrap_or_default(),
                    })
                    .collect();
                l.lock()
                    .unwrap()
                    .console
                    .push(format!("{:?}: {}", ev.r#type, args.join(" ")));
            }
        }));

        let mut errors = cdp
            .event_listener::<EventExceptionThrown>()
            .await
            .expect("exception events");
        let l = log.clone();
        listeners.push(tokio::spawn(async move {
            while let Some(ev) = errors.next().await {
                let d = &ev.exception_details;
                let what = d
                    .exception
                    .as_ref()
                    .and_then(|e| e.description.clone())
                    .unwrap_or_else(|| d.text.clone());
                l.lock().unwrap().errors.push(what);
            }
        }));

        let responses = cdp
            .event_listener::<EventResponseReceived>()
            .await
            .expect("response events");
        let page = Page {
            cdp,
            log,
            net: Mutex::new(Documents {
                responses,
                status: 0,
            }),
            listeners,
        };
        page.set_viewport(DESKTOP.0, DESKTOP.1).await;
        page
    }

    /// Closes the browser the polite way (Browser.close), then makes sure
    /// the process tree is gone. Dropping does the latter alone.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.cdp.close()).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.process.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The process group Chromium and all its helpers run in.
    pub fn process_group(&self) -> i32 {
        self.process.child.id() as i32
    }

    /// Whether Chromium runs in its own PID namespace, so that nothing of
    /// it, not even a zombie, outlives the Browser.
    pub fn contained(&self) -> bool {
        self.process.in_pid_ns
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.handler.abort();
        // `process` drops next: it ends the processes.
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        for l in &self.listeners {
            l.abort();
        }
    }
}

/// `s` as a JavaScript string literal.
fn js_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// Where screenshots go: `$CARGO_TARGET_DIR/test-screenshots`, else
/// `target/test-screenshots` in the crate.
pub fn screenshot_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) => manifest.join(t),
        None => manifest.join("target"),
    };
    target.join("test-screenshots")
}

impl Page {
    /// The underlying chromiumoxide page, for anything not wrapped here.
    pub fn cdp(&self) -> &chromiumoxide::Page {
        &self.cdp
    }

    /// Opens `url` and waits for its load event; the HTTP status.
    pub async fn goto(&self, url: &str) -> u16 {
        match tokio::time::timeout(TIMEOUT, self.cdp.goto(url)).await {
            Err(_) => panic!("loading {url} took over {TIMEOUT:?}"),
            Ok(Ok(_)) => {}
            // An error status with an empty body: Chromium shows its own
            // error page, which is loaded all the same.
            Ok(Err(CdpError::ChromeMessage(m))) if m == "net::ERR_HTTP_RESPONSE_CODE_FAILURE" => {}
            Ok(Err(e)) => panic!("loading {url}: {e}"),
        }
        self.status().await
    }

    /// The HTTP status of the last document loaded into the tab (by
    /// `goto`, a click or a form), 0 before any.
    pub async fn status(&self) -> u16 {
        let main = self.cdp.mainframe().await.ok().flatten();
        let mut net = self.net.lock().unwrap();
        // The handler queued every response event that came before the
        // load that ended the navigation: they are all here to take now.
        while let Some(Some(ev)) = net.responses.next().now_or_never() {
            if ev.r#type == ResourceType::Document && ev.frame_id.is_some() && ev.frame_id == main {
                net.status = ev.response.status as u16;
            }
        }
        net.status
    }

    pub async fn url(&self) -> String {
        self.eval("location.href")
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    pub async fn title(&self) -> String {
        self.eval("document.title")
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Evaluates `js` in the page (promises awaited); its value as JSON
    /// (`null` for undefined). Panics on a thrown exception.
    pub async fn eval(&self, js: &str) -> Value {
        self.try_eval(js)
            .await
            .unwrap_or_else(|e| panic!("evaluating {js}: {e}"))
    }

    /// `eval` that returns errors (say, during a navigation).
    pub async fn try_eval(&self, js: &str) -> Result<Value, String> {
        let r = self.evaluate(js, true).await?;
        Ok(r.value.unwrap_or(Value::Null))
    }

    async fn evaluate(
        &self,
        js: &str,
        by_value: bool,
    ) -> Result<chromiumoxide::cdp::js_protocol::runtime::RemoteObject, String> {
        // No context id: the main world of the top frame, whatever
        // document it holds now.
        let params = EvaluateParams::builder()
            .expression(js)
            .return_by_value(by_value)
            .await_promise(true)
            .build()
            .unwrap();
        let r = self
            .cdp
            .execute(params)
            .await
            .map_err(|e| e.to_string())?
            .result;
        if let Some(ex) = r.exception_details {
            let what = ex
                .exception
                .as_ref()
                .and_then(|e| e.description.clone())
                .unwrap_or(ex.text);
            return Err(what);
        }
        Ok(r.result)
    }

    /// Whether an element matches `selector`.
    pub async fn exists(&self, selector: &str) -> bool {
        self.eval(&format!("!!document.querySelector({})", js_str(selector)))
            .await
            .as_bool()
            .unwrap_or(false)
    }

    /// Waits until an element matches `selector`.
    pub async fn wait_for(&self, selector: &str, timeout: Duration) {
        let js = format!("!!document.querySelector({})", js_str(selector));
        let deadline = Instant::now() + timeout;
        while self.try_eval(&js).await != Ok(Value::Bool(true)) {
            if Instant::now() >= deadline {
                self.fail(&format!("no {selector:?} within {timeout:?}"))
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The rendered text (innerText) of the first match of `selector`.
    pub async fn text(&self, selector: &str) -> String {
        match self.eval(&self.text_js(selector)).await {
            Value::String(s) => s,
            _ => panic!("no element matches {selector:?} on {}", self.url().await),
        }
    }

    /// The rendered texts of every match of `selector`.
    pub async fn texts(&self, selector: &str) -> Vec<String> {
        let js = format!(
            "Array.from(document.querySelectorAll({}), e => e.innerText)",
            js_str(selector)
        );
        serde_json::from_value(self.eval(&js).await).unwrap()
    }

    fn text_js(&self, selector: &str) -> String {
        format!(
            "document.querySelector({})?.innerText ?? null",
            js_str(selector)
        )
    }

    /// The document's HTML as the DOM holds it now.
    pub async fn html(&self) -> String {
        self.eval("document.documentElement.outerHTML")
            .await
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Polls until the text of `selector` contains `needle` (the page may
    /// reload meanwhile); returns that text.
    pub async fn wait_for_text(&self, selector: &str, needle: &str, timeout: Duration) -> String {
        let js = self.text_js(selector);
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            match self.try_eval(&js).await {
                Ok(Value::String(s)) if s.contains(needle) => return s,
                Ok(v) => last = Some(v),
                Err(_) => {} // navigating
            }
            if Instant::now() >= deadline {
                self.fail(&format!(
                    "{needle:?} not in {selector:?} within {timeout:?}; it held {last:?}"
                ))
                .await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sets the value of the input, textarea or select matching `selector`
    /// as if typed (focus, then `input` and `change` events).
    pub async fn fill(&self, selector: &str, text: &str) {
        let js = format!(
            "(function(sel, text) {{
                const el = document.querySelector(sel);
                if (!el) return false;
                el.focus();
                el.value = text;
                el.dispatchEvent(new Event('input', {{bubbles: true}}));
                el.dispatchEvent(new Event('change', {{bubbles: true}}));
                return true;
            }})({}, {})",
            js_str(selector),
            js_str(text)
        );
        if self.eval(&js).await != Value::Bool(true) {
            self.fail(&format!("fill: no element matches {selector:?}"))
                .await;
        }
    }

    /// Clicks the middle of the element matching `selector` with real mouse
    /// events, after scrolling it into view. Panics if another element
    /// covers that spot.
    pub async fn click(&self, selector: &str) {
        let js = format!(
            "(function(sel) {{
                const el = document.querySelector(sel);
                if (!el) return 'no element matches';
                el.scrollIntoView({{block: 'center', inline: 'center'}});
                const r = el.getBoundingClientRect();
                if (r.width === 0 || r.height === 0) return 'not visible';
                const x = r.left + r.width / 2, y = r.top + r.height / 2;
                const top = document.elementFromPoint(x, y);
                if (top !== el && !el.contains(top)) return 'covered by ' + (top ? top.outerHTML.slice(0, 120) : 'nothing');
                return [x, y];
            }})({})",
            js_str(selector)
        );
        match self.eval(&js).await {
            Value::Array(xy) => {
                let point = Point {
                    x: xy[0].as_f64().unwrap(),
                    y: xy[1].as_f64().unwrap(),
                };
                self.cdp
                    .click(point)
                    .await
                    .unwrap_or_else(|e| panic!("click {selector:?}: {e}"));
            }
            why => {
                self.fail(&format!(
                    "click {selector:?}: {}",
                    why.as_str().unwrap_or("?")
                ))
                .await
            }
        }
    }

    /// Marks the current document, so that `wait_for_new_document` can
    /// tell when another one has replaced it.
    async fn mark_document(&self) {
        self.eval("window.__kiln_old_document = true").await;
    }

    /// Waits until the marked document is gone and its successor loaded.
    async fn wait_for_new_document(&self, what: &str) {
        let deadline = Instant::now() + TIMEOUT;
        let js = "window.__kiln_old_document === undefined && document.readyState === 'complete'";
        while self.try_eval(js).await != Ok(Value::Bool(true)) {
            if Instant::now() >= deadline {
                self.fail(&format!("{what}: no new page loaded within {TIMEOUT:?}"))
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Clicks `selector` (a link, a submit button) and waits for the page it
    /// leads to to load.
    pub async fn click_and_wait(&self, selector: &str) {
        self.mark_document().await;
        self.click(selector).await;
        self.wait_for_new_document(&format!("click {selector:?}"))
            .await;
    }

    /// Submits the form matching `selector` as its submit button would
    /// (validation, submit event) and waits for the response page to load.
    pub async fn submit(&self, selector: &str) {
        self.mark_document().await;
        let js = format!(
            "(function(sel) {{
                const f = document.querySelector(sel);
                if (!(f instanceof HTMLFormElement)) return false;
                f.requestSubmit();
                return true;
            }})({})",
            js_str(selector)
        );
        if self.eval(&js).await != Value::Bool(true) {
            self.fail(&format!("submit: no form matches {selector:?}"))
                .await;
        }
        self.wait_for_new_document(&format!("submit {selector:?}"))
            .await;
    }

    /// Chooses `files` in the `<input type=file>` matching `selector`
    /// (DOM.setFileInputFiles), as a person picking them would.
    pub async fn set_file_input(&self, selector: &str, files: &[&Path]) {
        let obj = self
            .evaluate(
                &format!("document.querySelector({})", js_str(selector)),
                false,
            )
            .await
            .unwrap_or_else(|e| panic!("set_file_input {selector:?}: {e}"));
        let Some(id): Option<RemoteObjectId> = obj.object_id else {
            panic!("set_file_input: no element matches {selector:?}");
        };
        let files = files
            .iter()
            .map(|f| {
                std::path::absolute(f)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        let params = SetFileInputFilesParams {
            files,
            node_id: None,
            backend_node_id: None,
            object_id: Some(id),
        };
        self.cdp
            .execute(params)
            .await
            .unwrap_or_else(|e| panic!("set_file_input {selector:?}: {e}"));
    }

    /// Resizes the viewport; widths under 600 emulate a phone (mobile
    /// layout honouring `<meta name=viewport>`, touch).
    pub async fn set_viewport(&self, width: u32, height: u32) {
        let mobile = width < 600;
        self.cdp
            .execute(SetDeviceMetricsOverrideParams::new(
                width as i64,
                height as i64,
                1.0,
                mobile,
            ))
            .await
            .expect("Emulation.setDeviceMetricsOverride");
        self.cdp
            .execute(SetTouchEmulationEnabledParams::new(mobile))
            .await
            .expect("Emulation.setTouchEmulationEnabled");
    }

    pub async fn desktop(&self) {
        self.set_viewport(DESKTOP.0, DESKTOP.1).await;
    }

    pub async fn phone(&self) {
        self.set_viewport(PHONE.0, PHONE.1).await;
    }

    /// A full-page PNG of what the page shows now, written to
    /// `screenshot_dir()/NAME.png`; its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let size = self
            .eval(
                "[Math.max(document.documentElement.scrollWidth, innerWidth),
                  Math.max(document.documentElement.scrollHeight, innerHeight)]",
            )
            .await;
        let (w, h) = (size[0].as_f64().unwrap(), size[1].as_f64().unwrap());
        let params = CaptureScreenshotParams {
            format: Some(CaptureScreenshotFormat::Png),
            clip: Some(Viewport {
                x: 0.0,
                y: 0.0,
                width: w,
                height: h,
                scale: 1.0,
            }),
            capture_beyond_viewport: Some(true),
            from_surface: Some(true),
            ..Default::default()
        };
        let data = self
            .cdp
            .execute(params)
            .await
            .unwrap_or_else(|e| panic!("screenshot {name}: {e}"))
            .result
            .data;
        let png = base64::engine::general_purpose::STANDARD
            .decode(String::from(data))
            .expect("screenshot base64");
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }

    /// Screenshots at desktop and at phone width: NAME-desktop.png and
    /// NAME-phone.png. Leaves the page desktop-sized.
    pub async fn screenshots(&self, name: &str) -> [PathBuf; 2] {
        self.desktop().await;
        let d = self.screenshot(&format!("{name}-desktop")).await;
        self.phone().await;
        let p = self.screenshot(&format!("{name}-phone")).await;
        self.desktop().await;
        [d, p]
    }

    /// The cookies the browser would send to the page's URL.
    pub async fn cookies(&self) -> Vec<Cookie> {
        self.cdp.get_cookies().await.expect("Network.getCookies")
    }

    /// JS dialogs (alert, confirm, prompt) the page opened: "Type: message".
    pub fn dialogs(&self) -> Vec<String> {
        self.log.lock().unwrap().dialogs.clone()
    }

    /// Console messages: "Type: args".
    pub fn console(&self) -> Vec<String> {
        self.log.lock().unwrap().console.clone()
    }

    /// Uncaught exceptions.
    pub fn errors(&self) -> Vec<String> {
        self.log.lock().unwrap().errors.clone()
    }

    /// Asserts that no script from page content ran: `window.__pwned`
    /// (which every test payload sets) is unset, and no dialog opened.
    pub async fn assert_no_injected_script(&self) {
        let pwned = self.eval("typeof window.__pwned").await;
        assert_eq!(
            pwned,
            Value::from("undefined"),
            "an injected script ran on {}: window.__pwned = {}",
            self.url().await,
            self.eval("String(window.__pwned)").await
        );
        assert!(
            self.dialogs().is_empty(),
            "dialogs opened: {:?}",
            self.dialogs()
        );
    }

    /// Panics with `msg`, the URL, and where a screenshot of the moment is.
    async fn fail(&self, msg: &str) -> ! {
        let url = self.try_eval("location.href").await.unwrap_or_default();
        let shot = format!(
            "failed-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis()
        );
        let path = self.screenshot(&shot).await;
        panic!("{msg} (at {url}; screenshot {})", path.display());
    }
}

/// Asserts that nothing Chromium started is left in `group`: no process at
/// all when it was `contained` in a PID namespace, else no live one (its
/// helpers' zombies wait for an init to reap them).
pub fn assert_chromium_gone(group: i32, contained: bool) {
    let left: Vec<String> = processes_in_group(group)
        .into_iter()
        .filter(|p| contained || !p.ends_with(" Z"))
        .collect();
    assert_eq!(left, Vec::<String>::new(), "chromium processes left");
}

/// Processes (zombies included) in process group `pgid`: "PID COMM STATE".
pub fn processes_in_group(pgid: i32) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // PID (COMM) STATE PPID PGRP ...; COMM may hold spaces and parens.
        let Some((head, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.get(2).and_then(|g| g.parse().ok()) == Some(pgid) {
            found.push(format!("{} {}", head.replacen(" (", " ", 1), fields[0]));
        }
    }
    found
}

/// Printed by a build and named in its artifacts: markup that runs script
/// if a page ever stops escaping it.
const PAYLOAD: &str =
    r#"<script>window.__pwned=1;alert(1)</script><img src=x onerror="window.__pwned=2;alert(2)">"#;
const FILE_PAYLOAD: &str = "<img src=x onerror=window.__pwned=3>";

/// Today's pages (the build list and a build's page) in a real Chromium: a
/// build whose log and artifact names carry markup shows it as text, and
/// none of it runs; screenshots of both pages at desktop and phone width.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_show_build_output_as_text_in_chromium() {
    let t0 = Instant::now();
    let mut h = hub(1).await;
    let script = format!(
        "printf '%s\\n' 'before the payload' '{PAYLOAD}' 'after the payload'\n\
         touch \"$KILN_OUT/{FILE_PAYLOAD}\""
    );
    // The browser starts while the build runs.
    let (b, browser) = tokio::join!(run_script(&h, "markup", &script, &["*"]), Browser::launch());
    let b = b.detail.build;
    assert_eq!(b.state, BuildState::Succeeded, "{b:?}");
    let page = browser.new_page().await;

    // The build list, then a click to the build's page.
    assert_eq!(page.goto(&format!("{}/", h.url())).await, 200);
    let row = page.wait_for_text("tbody", "markup", TIMEOUT).await;
    assert!(row.contains("succeeded"), "{row}");
    page.assert_no_injected_script().await;
    page.screenshots("index").await;
    page.click_and_wait(&format!("a[href='/builds/{}']", b.id))
        .await;
    assert_eq!(page.url().await, format!("{}/builds/{}", h.url(), b.id));
    assert_eq!(page.status().await, 200);

    // The payload is text on the page, literally, and escaped in the HTML.
    let log = page
        .wait_for_text("pre.log", "after the payload", TIMEOUT)
        .await;
    assert!(log.contains(PAYLOAD), "log as shown: {log}");
    let artifacts = page.text("main").await;
    assert!(artifacts.contains(FILE_PAYLOAD), "page text: {artifacts}");
    let html = page.html().await;
    assert!(
        html.contains("&lt;script&gt;window.__pwned=1;alert(1)&lt;/script&gt;"),
        "{html}"
    );
    // None of it became elements, and none of it ran.
    assert_eq!(
        page.eval("document.querySelectorAll('main script, main img').length")
            .await,
        Value::from(0)
    );
    page.assert_no_injected_script().await;
    assert!(page.errors().is_empty(), "{:?}", page.errors());
    page.screenshots("build").await;

    for name in [
        "index-desktop",
        "index-phone",
        "build-desktop",
        "build-phone",
    ] {
        let png = std::fs::read(screenshot_dir().join(format!("{name}.png"))).unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "{name}.png");
    }
    let (group, contained) = (browser.process_group(), browser.contained());
    assert!(processes_in_group(group).len() > 2, "chromium runs");
    browser.close().await;
    assert_chromium_gone(group, contained);
    h.stop().await;
    eprintln!("browser test took {:?}", t0.elapsed());
}

/// The driver's own parts the pages do not use yet, on a form put into a
/// hub page: fill, file inputs, submit and the navigation it causes,
/// cookies and private pages, dialogs and console; and dropping a Browser
/// ends every process it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_forms_files_cookies_and_cleanup() {
    let mut h = hub(1).await;
    let browser = Browser::launch().await;
    let page = browser.new_page().await;
    assert_eq!(page.goto(&format!("{}/", h.url())).await, 200);
    assert!(page.text("main").await.contains("No builds yet"));
    assert_eq!(page.goto(&format!("{}/no/such/page", h.url())).await, 404);
    page.goto(&format!("{}/", h.url())).await;

    page.eval(
        "document.querySelector('main').insertAdjacentHTML('beforeend', `
            <form id=f action=/builds/0 method=get>
              <input name=q id=q><textarea name=t id=t></textarea>
              <input type=file id=file name=file>
              <button id=go>go</button>
            </form>`)",
    )
    .await;
    page.fill("#q", "a <b> & \"c\"").await;
    page.fill("#t", "two\nlines").await;
    assert_eq!(
        page.eval("document.querySelector('#q').value").await,
        Value::from("a <b> & \"c\"")
    );
    let upload = tempfile::tempdir().unwrap();
    let file = upload.path().join("hello.tar");
    std::fs::write(&file, b"twelve bytes").unwrap();
    page.set_file_input("#file", &[&file]).await;
    assert_eq!(
        page.eval("[...document.querySelector('#file').files].map(f => f.name + ':' + f.size)")
            .await,
        serde_json::json!(["hello.tar:12"])
    );

    // Script-set cookies (HttpOnly ones come from the server).
    page.eval("document.cookie = 'probe=1; SameSite=Strict; path=/'")
        .await;
    let cookies = page.cookies().await;
    let probe = cookies.iter().find(|c| c.name == "probe").expect("cookie");
    assert_eq!(probe.same_site, Some(CookieSameSite::Strict));
    assert!(!probe.http_only);
    let private = browser.new_private_page().await;
    private.goto(&format!("{}/", h.url())).await;
    assert!(
        private.cookies().await.is_empty(),
        "private pages share no cookies"
    );

    // Dialogs are recorded and dismissed; console messages recorded.
    page.eval("console.log('hello', 42); setTimeout(() => alert('hi'), 0)")
        .await;
    let deadline = Instant::now() + TIMEOUT;
    while page.dialogs().is_empty() || page.console().is_empty() {
        assert!(Instant::now() < deadline, "no dialog/console event");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(page.dialogs(), ["Alert: hi"]);
    assert_eq!(page.console(), ["Log: hello 42"]);

    // Submitting navigates; the wait ends on the new page.
    page.submit("#f").await;
    assert!(
        page.url()
            .await
            .ends_with("/builds/0?q=a+%3Cb%3E+%26+%22c%22&t=two%0D%0Alines&file=hello.tar")
    );
    assert_eq!(page.status().await, 404);
    page.goto(&format!("{}/", h.url())).await;
    page.eval("document.querySelector('main').insertAdjacentHTML('beforeend', '<a id=l href=/builds/7>x</a>')")
        .await;
    page.click_and_wait("#l").await;
    assert_eq!(page.url().await, format!("{}/builds/7", h.url()));

    let (group, contained) = (browser.process_group(), browser.contained());
    drop((page, private, browser));
    assert_chromium_gone(group, contained);
    h.stop().await;
}

/// A source tarball of `dir` (what a person uploads in the submit form).
fn tarball(dir: &Path, to: &Path) {
    let mut t = tar::Builder::new(std::fs::File::create(to).unwrap());
    t.append_dir_all(".", dir).unwrap();
    t.finish().unwrap();
}

/// The whole story in a real browser: log in, submit a build by uploading
/// its source, watch its log stream live (colours, the first error), cancel
/// another, see why a task waits, open the repo page; screenshots of every
/// main page at desktop and phone width.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_logs_in_submits_follows_cancels_and_reads_why_in_chromium() {
    let mut h = hub(1).await;
    let base = h.url();
    h.client
        .add_user("alice", "alice-password", true)
        .await
        .unwrap();
    // Project p: a target for an arch no worker has, whose repo exists.
    h.client
        .add_target(
            "p",
            &kiln::server::TargetRequest {
                name: "zarch".into(),
                buildroot: "host".into(),
                arch: "s390x".into(),
                repo: Some("main".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let waits = script_tree("waiting", "true", &[]);
    let stuck = h
        .client
        .submit_dir_to(waits.path(), Some("p"), None, &["zarch"])
        .await
        .unwrap();
    let browser = Browser::launch().await;
    let page = browser.new_page().await;

    // Logging in: the form, then the session cookie's flags.
    assert_eq!(page.goto(&format!("{base}/login?next=/")).await, 200);
    page.screenshots("login").await;
    page.fill("input[name=user]", "alice").await;
    page.fill("input[name=password]", "alice-password").await;
    page.submit("form.login").await;
    assert_eq!(page.url().await, format!("{base}/"));
    let session = page
        .cookies()
        .await
        .into_iter()
        .find(|c| c.name == "kiln_session")
        .expect("session cookie");
    assert!(session.http_only, "{session:?}");
    assert_eq!(session.same_site, Some(CookieSameSite::Strict));
    assert!(page.text("header").await.contains("alice"));

    // Why the s390x task waits, on the dashboard and its build page.
    let queued = page
        .wait_for_text("main", "no enabled worker with arch s390x", TIMEOUT)
        .await;
    assert!(queued.contains("Queued"), "{queued}");
    page.screenshots("dashboard").await;

    // Submit by uploading a tarball: a build that writes slowly, in colour,
    // with an error line.
    let dir = tempfile::tempdir().unwrap();
    let slow = script_tree(
        "slow",
        "printf '\\033[31mred words\\033[0m\\n'; for i in $(seq 1 40); do echo \"line $i\"; sleep 0.1; done; echo 'error: something broke'; echo done",
        &[],
    );
    let tar = dir.path().join("slow.tar");
    tarball(slow.path(), &tar);
    page.click("details.submit summary").await;
    page.fill("details.submit input[name=project]", "web").await;
    page.fill("details.submit input[name=package]", "slow")
        .await;
    page.set_file_input("details.submit input[name=tarball]", &[&tar])
        .await;
    page.submit("details.submit form").await;
    let url = page.url().await;
    let id: u64 = url
        .rsplit('/')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("landed on {url}"));
    assert!(
        page.text("main").await.contains("alice"),
        "submitted by alice"
    );

    // The live log: lines arrive while the build runs; colours render.
    page.click_and_wait("a[href$='/log']").await;
    page.wait_for_text("#log", "line 3", TIMEOUT).await;
    let running = h.client.build(id).await.unwrap().detail.build.state;
    assert_eq!(running, BuildState::Running, "the log streamed live");
    page.wait_for_text("#log", "done", Duration::from_secs(60))
        .await;
    page.wait_for_text("#log-status", "has ended", TIMEOUT)
        .await;
    assert_eq!(
        page.eval("document.querySelector('#log .a-fg1').textContent")
            .await,
        Value::from("red words")
    );
    assert_eq!(
        page.eval("document.querySelectorAll('#log script').length")
            .await,
        Value::from(0)
    );
    page.screenshots("log-viewer").await;
    // Search the whole log, and jump to the first error.
    page.fill("#log-q", "line 37").await;
    page.click("#log-search button").await;
    // Two notes and the red line come first: "line 37" is the log's 40th.
    let hits = page.wait_for_text("#log-hits", "1 line(s)", TIMEOUT).await;
    assert!(
        hits.contains("line 40") && hits.contains("line 37"),
        "{hits}"
    );
    page.click("#log-first-error").await;
    let mark = page
        .wait_for_text("#first-error", "first error", TIMEOUT)
        .await;
    assert!(mark.contains("line"), "{mark}");
    let after = page
        .eval("document.getElementById('first-error').nextSibling.textContent")
        .await;
    assert!(
        after
            .as_str()
            .unwrap_or("")
            .starts_with("error: something broke"),
        "{after}"
    );

    // Cancel a running build from its page.
    let long = script_tree("long", "sleep 120", &[]);
    let victim = h
        .client
        .submit_dir(long.path(), Some("web"), None)
        .await
        .unwrap();
    page.goto(&format!("{base}/builds/{}", victim.id)).await;
    page.click_and_wait("form[action$='/cancel'] button").await;
    page.wait_for_text("h1", "cancelled", TIMEOUT).await;
    assert_eq!(
        h.client.build(victim.id).await.unwrap().detail.build.state,
        BuildState::Cancelled
    );
    page.screenshots("build-cancelled").await;

    // The waiting build says why; the repo page gives the apt lines.
    page.goto(&format!("{base}/builds/{}", stuck.id)).await;
    page.wait_for_text("dd.why", "no enabled worker with arch s390x", TIMEOUT)
        .await;
    page.goto(&format!("{base}/repos/p/main")).await;
    let repo = page.wait_for_text("main", "signed-by=", TIMEOUT).await;
    assert!(repo.contains(&format!("{base}/repos/p/main")), "{repo}");
    page.screenshots("repo").await;
    for (path, name) in [
        ("/projects/web", "project"),
        ("/packages/web/slow", "package"),
        ("/workers", "workers"),
        ("/workers/local", "worker"),
        ("/admin/audit", "audit"),
    ] {
        assert_eq!(page.goto(&format!("{base}{path}")).await, 200, "{path}");
        page.screenshots(name).await;
    }
    assert!(
        page.text("main").await.contains("POST /builds/"),
        "the cancel is audited"
    );
    page.assert_no_injected_script().await;
    assert!(page.errors().is_empty(), "{:?}", page.errors());
    browser.close().await;
    h.stop().await;
}
