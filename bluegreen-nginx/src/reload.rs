//! `Reload` mode (stock nginx): one managed upstream include, changed by candidate → `nginx -t` →
//! rename → SIGHUP → verification, and restored on any failure.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bluegreen_core::{
    Capabilities, Endpoints, Error, Name, Result, Slot, TrafficSplit, TrafficSwitch,
    TrafficSwitchExt,
};
use rustix::process::Pid;
use serde::{Deserialize, Serialize};

use crate::error::{NginxError, Restored, Step};
use crate::format::{self, Routing};
use crate::http;
use crate::master::{self, NginxCommand};

const HEADER: &str = "# bluegreen-nginx Reload include: generated, do not edit (bluegreen refuses to read a hand-edited file).";

/// The response header the rendered include adds: the address of the upstream server that
/// answered (`$upstream_addr`), sent only to requests carrying [`PROBE_HEADER`]. The default
/// verification marker: it needs nothing from the application.
pub const UPSTREAM_HEADER: &str = "x-bluegreen-upstream";

/// The request header the verification probe sends; only requests carrying it get
/// [`UPSTREAM_HEADER`] (clients never see upstream addresses).
pub const PROBE_HEADER: &str = "x-bluegreen-probe";

/// How the verification probe tells which slot answered. In files:
/// `{ upstream-addr-header = "x-bluegreen-upstream" }` (the default) or
/// `{ header = "x-bluegreen-slot" }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum SlotMarker {
    /// A response header whose value is `blue` or `green`, sent by the application itself (the
    /// demo app's `x-bluegreen-slot`).
    Header(String),
    /// A response header carrying the upstream address, mapped to a slot through the endpoints.
    /// Works with any application. The default is [`UPSTREAM_HEADER`], which the rendered
    /// include adds itself; a header of your own works too (e.g.
    /// `add_header x-upstream $upstream_addr always;` in your location).
    UpstreamAddrHeader(String),
}

/// A request sent through nginx after a reload to check that new requests reach the target.
/// In files only `addr` is required.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
#[non_exhaustive]
pub struct VerifyProbe {
    /// nginx's listener to probe.
    pub addr: SocketAddr,
    /// The path to request (`/` by default).
    #[serde(default = "root_path")]
    pub path: String,
    /// How to tell the slot ([`UPSTREAM_HEADER`], added by the include, by default).
    #[serde(default = "default_marker")]
    pub marker: SlotMarker,
    /// Consecutive answers from the target needed (3 by default).
    #[serde(default = "three")]
    pub consecutive: u32,
}

bluegreen_core::validated_serde!(VerifyProbe);

fn root_path() -> String {
    "/".into()
}

fn default_marker() -> SlotMarker {
    SlotMarker::UpstreamAddrHeader(UPSTREAM_HEADER.into())
}

fn three() -> u32 {
    3
}

fn check_verify_path(path: &str) -> Result<()> {
    let ok = path.starts_with('/')
        && path.len() <= 1024
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-~?=&%".contains(&b));
    if !ok {
        return Err(Error::invalid(
            "verify path",
            path,
            "expected a /-rooted path of letters, digits and /._-~?=&%",
        ));
    }
    Ok(())
}

fn check_marker(marker: &SlotMarker) -> Result<()> {
    let (SlotMarker::Header(h) | SlotMarker::UpstreamAddrHeader(h)) = marker;
    if h.is_empty() || !h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(Error::invalid(
            "verify header",
            h,
            "expected letters, digits and `-`",
        ));
    }
    Ok(())
}

impl VerifyProbe {
    /// Probes `GET /` on `addr`, telling the slot by the upstream address in [`UPSTREAM_HEADER`]
    /// (which the rendered include adds: any application works).
    pub fn new(addr: SocketAddr) -> Self {
        VerifyProbe {
            addr,
            path: root_path(),
            marker: default_marker(),
            consecutive: three(),
        }
    }

    /// Checks the path and the marker's header name; run when deserializing.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a bad path or header name.
    pub fn validate(&self) -> Result<()> {
        check_verify_path(&self.path)?;
        check_marker(&self.marker)
    }

    /// With another path (`/`-rooted; letters, digits and `/._-~?=&%` only).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for anything else.
    pub fn with_path(mut self, path: &str) -> Result<Self> {
        check_verify_path(path)?;
        self.path = path.to_string();
        Ok(self)
    }

    /// With another way to tell the slot; the header name must be letters, digits and `-`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a bad header name.
    pub fn with_marker(mut self, marker: SlotMarker) -> Result<Self> {
        check_marker(&marker)?;
        self.marker = marker;
        Ok(self)
    }
}

/// Settings of a [`NginxReloadSwitch`].
///
/// ```
/// use bluegreen_nginx::NginxReloadConfig;
///
/// let c: NginxReloadConfig = serde_json::from_str(
///     r#"{
///         "nginx": { "main_config": "/etc/nginx/nginx.conf" },
///         "include": "/etc/nginx/conf.d/shop-upstream.conf",
///         "upstream": "shop",
///         "verify": { "addr": "127.0.0.1:80" },
///         "reload_timeout": "20s"
///     }"#,
/// )
/// .unwrap();
/// assert_eq!(c.keepalive, 32);
/// assert_eq!(c.pid_file, None); // found from the configuration at each switch
/// assert!(serde_json::from_str::<NginxReloadConfig>(
///     r#"{ "nginx": { "main_config": "n.conf" }, "include": "/", "upstream": "shop" }"#,
/// )
/// .is_err());
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
#[non_exhaustive]
pub struct NginxReloadConfig {
    /// How to run `nginx -t` against the real main configuration.
    pub nginx: NginxCommand,
    /// The include this switch owns (your `nginx.conf` includes it at http level).
    pub include: PathBuf,
    /// The upstream's name (what your `proxy_pass` names).
    pub upstream: Name,
    /// The master's pid file. `None` (the default): the one the configuration names, found at
    /// each switch with [`NginxCommand::pid_file`] (`nginx -T`).
    #[serde(default)]
    pub pid_file: Option<PathBuf>,
    /// Probe through nginx after each reload (strongly advised).
    #[serde(default)]
    pub verify: Option<VerifyProbe>,
    /// `keepalive` connections per worker toward the upstreams (0: none). Default 32.
    #[serde(default = "default_keepalive")]
    pub keepalive: u32,
    /// Bound on `nginx -t`. Default 30 s.
    #[serde(default = "thirty_seconds", with = "bluegreen_core::config::duration")]
    pub test_timeout: Duration,
    /// Bound on the master starting new workers after SIGHUP. Default 15 s.
    #[serde(default = "fifteen_seconds", with = "bluegreen_core::config::duration")]
    pub reload_timeout: Duration,
    /// Bound on verification through nginx. Default 15 s.
    #[serde(default = "fifteen_seconds", with = "bluegreen_core::config::duration")]
    pub verify_timeout: Duration,
    /// How long to wait for old workers to finish their requests before reporting them.
    /// Default 5 s.
    #[serde(default = "five_seconds", with = "bluegreen_core::config::duration")]
    pub drain_wait: Duration,
}

bluegreen_core::validated_serde!(NginxReloadConfig);

fn default_keepalive() -> u32 {
    32
}

fn five_seconds() -> Duration {
    Duration::from_secs(5)
}

fn fifteen_seconds() -> Duration {
    Duration::from_secs(15)
}

fn thirty_seconds() -> Duration {
    Duration::from_secs(30)
}

impl NginxReloadConfig {
    /// A builder for nginx run as `nginx`'s command line says (`-c`, `-p`, binary); `include`
    /// and `upstream` are required, everything else has a default.
    ///
    /// ```
    /// use bluegreen_nginx::{NginxCommand, NginxReloadConfig, VerifyProbe};
    ///
    /// let config = NginxReloadConfig::builder(NginxCommand::new("/etc/nginx/nginx.conf"))
    ///     .include("/etc/nginx/conf.d/shop-upstream.conf")
    ///     .upstream("shop")
    ///     .verify(VerifyProbe::new("127.0.0.1:80".parse().unwrap()))
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(config.upstream.as_str(), "shop");
    /// assert_eq!(config.pid_file, None); // the one nginx.conf names
    /// let missing = NginxReloadConfig::builder(NginxCommand::new("/etc/nginx/nginx.conf"))
    ///     .upstream("shop")
    ///     .build()
    ///     .unwrap_err();
    /// assert!(missing.to_string().contains("include"));
    /// ```
    pub fn builder(nginx: NginxCommand) -> NginxReloadConfigBuilder {
        NginxReloadConfigBuilder {
            nginx,
            include: None,
            upstream: None,
            pid_file: None,
            verify: None,
        }
    }

    /// Checks the upstream name, the include path and the probe; run by
    /// [`build`](NginxReloadConfigBuilder::build) and when deserializing.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for an upstream name outside letters, digits, `_`, `-`, an
    /// include path without a file name, or a bad probe.
    pub fn validate(&self) -> Result<()> {
        let upstream = &self.upstream;
        if upstream.as_str().contains(['.', '+']) {
            return Err(Error::invalid(
                "nginx upstream name",
                upstream.as_str(),
                "use letters, digits, `_` and `-` only",
            ));
        }
        let include = &self.include;
        if include.file_name().is_none() {
            return Err(Error::invalid(
                "include path",
                include.display().to_string(),
                "must name a file",
            ));
        }
        if let Some(probe) = &self.verify {
            probe.validate()?;
        }
        Ok(())
    }
    /// With a verification probe.
    pub fn with_verify(mut self, probe: VerifyProbe) -> Self {
        self.verify = Some(probe);
        self
    }

    /// With `keepalive` idle connections per worker toward the upstreams (0 turns it off).
    pub fn with_keepalive(mut self, keepalive: u32) -> Self {
        self.keepalive = keepalive;
        self
    }

    /// With the bound on new workers appearing after SIGHUP.
    pub fn with_reload_timeout(mut self, t: Duration) -> Self {
        self.reload_timeout = t;
        self
    }

    /// With the bound on verification through nginx.
    pub fn with_verify_timeout(mut self, t: Duration) -> Self {
        self.verify_timeout = t;
        self
    }

    /// With the wait for old workers.
    pub fn with_drain_wait(mut self, t: Duration) -> Self {
        self.drain_wait = t;
        self
    }

    /// Directives for the `location` that serves your application: `proxy_pass` to the upstream,
    /// HTTP/1.1 keep-alive toward it, and the verification marker's `add_header` (needed only
    /// where the location or its server has `add_header`s of its own, which stop the include's
    /// from being inherited; harmless elsewhere).
    pub fn render_location(&self) -> String {
        let up = self.upstream.as_str();
        format!(
            "proxy_pass http://{up};\n\
             proxy_http_version 1.1;\n\
             proxy_set_header Connection \"\";\n\
             add_header {UPSTREAM_HEADER} ${var} always;\n",
            var = marker_variable(up),
        )
    }

    fn tmp_path(&self) -> PathBuf {
        let name = self
            .include
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // A leading dot and a suffix no include glob (`*.conf`) matches.
        self.include
            .with_file_name(format!(".{name}.bluegreen-tmp"))
    }
}

/// Builds a [`NginxReloadConfig`]; from [`NginxReloadConfig::builder`].
#[derive(Debug, Clone)]
#[must_use = "call `build()` to get the configuration"]
pub struct NginxReloadConfigBuilder {
    nginx: NginxCommand,
    include: Option<PathBuf>,
    upstream: Option<String>,
    pid_file: Option<PathBuf>,
    verify: Option<VerifyProbe>,
}

impl NginxReloadConfigBuilder {
    /// The include this switch owns (required): your `nginx.conf` includes it at http level.
    pub fn include(mut self, path: impl Into<PathBuf>) -> Self {
        self.include = Some(path.into());
        self
    }

    /// The upstream's name (required): what your `proxy_pass` names. Letters, digits, `_`, `-`.
    pub fn upstream(mut self, name: impl Into<String>) -> Self {
        self.upstream = Some(name.into());
        self
    }

    /// The master's pid file, when it is not the one the configuration names (by default it is
    /// found with `nginx -T` at each switch).
    pub fn pid_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.pid_file = Some(path.into());
        self
    }

    /// Probe through nginx after each reload (strongly advised).
    pub fn verify(mut self, probe: VerifyProbe) -> Self {
        self.verify = Some(probe);
        self
    }

    /// The configuration, validated. Tune the rest with the config's `with_*` methods.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming a missing `include` or `upstream`, an upstream name outside
    /// letters, digits, `_`, `-`, an include path without a file name, or a bad probe.
    pub fn build(self) -> Result<NginxReloadConfig> {
        let include = self.include.ok_or_else(|| {
            Error::invalid("include", "", "required: the include file this switch owns")
        })?;
        let upstream = self.upstream.ok_or_else(|| {
            Error::invalid(
                "nginx upstream name",
                "",
                "required: the upstream your proxy_pass names",
            )
        })?;
        let config = NginxReloadConfig {
            nginx: self.nginx,
            include,
            upstream: Name::new(&upstream)?,
            pid_file: self.pid_file,
            verify: self.verify,
            keepalive: default_keepalive(),
            test_timeout: thirty_seconds(),
            reload_timeout: fifteen_seconds(),
            verify_timeout: fifteen_seconds(),
            drain_wait: five_seconds(),
        };
        config.validate()?;
        Ok(config)
    }
}

/// What a [`NginxReloadSwitch::switch_to`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReloadReport {
    /// False when the include already held this routing (nothing done).
    pub changed: bool,
    /// From the start of the switch to verification done.
    pub latency: Duration,
    /// Whether the probe confirmed the target.
    pub verified: bool,
    /// Old workers still finishing requests after `drain_wait` (they exit on their own, at the
    /// latest after nginx's `worker_shutdown_timeout`).
    pub old_workers_draining: usize,
}

/// The nginx variable holding the upstream address for probes of `upstream` (`-` is not allowed
/// in variable names).
fn marker_variable(upstream: &str) -> String {
    format!("bluegreen_upstream_{}", upstream.replace('-', "_"))
}

/// The marker lines of the include: [`UPSTREAM_HEADER`] carries the answering upstream server's
/// address, but only for requests with [`PROBE_HEADER`] (an empty value is not sent). At http
/// level it reaches every `server` and `location` that has no `add_header` of its own; one that
/// has, adds [`NginxReloadConfig::render_location`]'s line.
fn render_marker(upstream: &str) -> String {
    let var = marker_variable(upstream);
    format!(
        "map $http_{probe} ${var} {{\n    default $upstream_addr;\n    \"\" \"\";\n}}\n\
         add_header {UPSTREAM_HEADER} ${var} always;\n",
        probe = PROBE_HEADER.replace('-', "_"),
    )
}

/// Renders the include for `routing` (no sticky: stock nginx has no sticky cookie): the upstream
/// block, then the verification marker.
pub(crate) fn render_include(upstream: &str, keepalive: u32, routing: &Routing) -> String {
    let mut out = render_upstream(upstream, keepalive, routing);
    out.push_str(&render_marker(upstream));
    out
}

/// The upstream block with its header lines (all an include held before the marker was added).
fn render_upstream(upstream: &str, keepalive: u32, routing: &Routing) -> String {
    let mut out = String::new();
    out.push_str(HEADER);
    out.push('\n');
    out.push_str(&format!("# upstream {upstream} keepalive {keepalive}\n"));
    for line in format::render(&routing.split, &routing.endpoints).lines() {
        out.push_str("# ");
        out.push_str(line);
        out.push('\n');
    }
    let n = |s: Slot| routing.endpoints.get(s).len().max(1) as u32;
    let mut weights = [
        u32::from(routing.split.weight(Slot::Blue)) * n(Slot::Green),
        u32::from(routing.split.weight(Slot::Green)) * n(Slot::Blue),
    ];
    let g = gcd(weights[0], weights[1]);
    if g > 0 {
        weights.iter_mut().for_each(|w| *w /= g);
    }
    out.push_str(&format!("upstream {upstream} {{\n"));
    for (i, slot) in Slot::ALL.into_iter().enumerate() {
        // weight=0 is a config error in nginx: a slot without weight is left out.
        if weights[i] == 0 {
            continue;
        }
        for e in routing.endpoints.get(slot) {
            out.push_str(&format!(
                "    server {} weight={}; # {slot}\n",
                e.authority(),
                weights[i]
            ));
        }
    }
    if keepalive > 0 {
        out.push_str(&format!("    keepalive {keepalive};\n"));
    }
    out.push_str("}\n");
    out
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Parses an include written by [`render_include`]; anything else is an error.
pub(crate) fn parse_include(text: &str) -> std::result::Result<Routing, String> {
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err("the first line is not bluegreen-nginx's header".into());
    }
    let meta = lines
        .next()
        .and_then(|l| l.strip_prefix("# upstream "))
        .ok_or("line 2 must be `# upstream <name> keepalive <n>`")?;
    let (upstream, keepalive) = meta
        .split_once(" keepalive ")
        .ok_or("line 2 must be `# upstream <name> keepalive <n>`")?;
    let keepalive: u32 = keepalive
        .parse()
        .map_err(|_| "line 2 has an invalid keepalive")?;
    Name::new(upstream).map_err(|e| e.to_string())?;
    let mut split_text = String::new();
    for _ in 0..5 {
        let l = lines
            .next()
            .and_then(|l| l.strip_prefix("# "))
            .ok_or("expected the 5 `# ` split lines")?;
        split_text.push_str(l);
        split_text.push('\n');
    }
    let routing = format::parse(&split_text)?;
    if routing.split.sticky.is_some() {
        return Err("a Reload include never has a sticky cookie".into());
    }
    // An include written before the marker was added is read too; the next switch adds it.
    if render_include(upstream, keepalive, &routing) != text
        && render_upstream(upstream, keepalive, &routing) != text
    {
        return Err("the upstream block differs from what its header describes".into());
    }
    Ok(routing)
}

/// `Reload` mode switch. See the crate docs for the steps and what each failure leaves behind.
///
/// Clones share one lock: switches through clones of one handle never interleave. Two separate
/// processes switching the same include are not coordinated (the engine's deployment lock is).
#[derive(Debug, Clone)]
pub struct NginxReloadSwitch {
    config: Arc<NginxReloadConfig>,
    lock: Arc<tokio::sync::Mutex<()>>,
    last_report: Arc<std::sync::Mutex<Option<ReloadReport>>>,
}

impl NginxReloadSwitch {
    /// A switch with `config`.
    pub fn new(config: NginxReloadConfig) -> Self {
        NginxReloadSwitch {
            config: Arc::new(config),
            lock: Arc::new(tokio::sync::Mutex::new(())),
            last_report: Arc::new(std::sync::Mutex::new(None)),
        }
    }

    /// The report of the last switch that succeeded through this handle or a clone of it
    /// ([`switch_to`](Self::switch_to) or [`TrafficSwitch::apply`]): its latency, whether the
    /// probe verified it, old workers still draining. `None` before the first.
    pub fn last_report(&self) -> Option<ReloadReport> {
        self.last_report
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The configuration.
    pub fn config(&self) -> &NginxReloadConfig {
        &self.config
    }

    /// Writes the include for `split` without nginx: for the first setup, before nginx (whose
    /// configuration includes the file) first starts. Later changes go through
    /// [`TrafficSwitch::apply`].
    ///
    /// # Errors
    /// Invalid input as for `apply`; the file cannot be written.
    pub fn write_initial(&self, split: &TrafficSplit, endpoints: &Endpoints) -> Result<()> {
        self.check_split(split, endpoints)?;
        format::validate_endpoints(endpoints, false, "Reload")?;
        let routing = Routing {
            split: split.clone(),
            endpoints: endpoints.clone(),
        };
        let c = &*self.config;
        let text = render_include(c.upstream.as_str(), c.keepalive, &routing);
        let tmp = c.tmp_path();
        write_synced(&tmp, &text)
            .and_then(|()| {
                std::fs::rename(&tmp, &c.include)
                    .map_err(|e| NginxError::fs("renaming the include over", &c.include, e))
            })
            .map_err(|e| e.into_core("write_initial"))
    }

    /// Reads the include back (`None` when it does not exist yet).
    ///
    /// # Errors
    /// [`NginxError::Unparseable`] for a file this crate did not write (or one edited by hand),
    /// [`NginxError::PermissionDenied`] or I/O errors when it cannot be read.
    pub fn read(&self) -> std::result::Result<Option<Routing>, NginxError> {
        let path = &self.config.include;
        match read_optional(path)? {
            None => Ok(None),
            Some(text) => {
                parse_include(&text)
                    .map(Some)
                    .map_err(|reason| NginxError::Unparseable {
                        source_desc: format!("include {}", path.display()),
                        reason,
                    })
            }
        }
    }

    /// Switches to `routing` (already validated) and reports what happened.
    ///
    /// # Errors
    /// [`NginxError::Switch`] naming the failed step and what was restored.
    pub async fn switch_to(
        &self,
        routing: &Routing,
    ) -> std::result::Result<ReloadReport, NginxError> {
        let _guard = self.lock.lock().await;
        let c = &*self.config;
        let start = Instant::now();
        let fail = |step: Step, restored: Restored, e: NginxError| NginxError::Switch {
            step,
            restored,
            source: Box::new(e),
        };

        let pid_file = match &c.pid_file {
            Some(p) => p.clone(),
            None => c
                .nginx
                .pid_file(c.test_timeout)
                .await
                .map_err(|e| fail(Step::Preflight, Restored::NothingChanged, e))?,
        };
        let pid = master::master_pid(&pid_file)
            .map_err(|e| fail(Step::Preflight, Restored::NothingChanged, e))?;
        let previous = read_optional(&c.include)
            .map_err(|e| fail(Step::Preflight, Restored::NothingChanged, e))?;
        let candidate = render_include(c.upstream.as_str(), c.keepalive, routing);
        if previous.as_deref() == Some(candidate.as_str()) {
            return Ok(self.record(ReloadReport {
                changed: false,
                latency: start.elapsed(),
                verified: false,
                old_workers_draining: 0,
            }));
        }

        let tmp = c.tmp_path();
        write_synced(&tmp, &candidate).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            fail(Step::WriteCandidate, Restored::NothingChanged, e)
        })?;
        std::fs::rename(&tmp, &c.include).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            fail(
                Step::Install,
                Restored::NothingChanged,
                NginxError::fs("renaming the candidate over", &c.include, e),
            )
        })?;

        if let Err(e) = c.nginx.test_config(&c.include, c.test_timeout).await {
            let restored = self.restore(previous.as_deref(), None).await;
            return Err(fail(Step::ConfigTest, restored, e));
        }

        let before = master::workers(pid);
        if let Err(e) = self.reload_and_wait(pid, &before).await {
            let restored = self.restore(previous.as_deref(), Some(pid)).await;
            return Err(fail(Step::Reload, restored, e));
        }

        let verified = match &c.verify {
            None => false,
            Some(probe) => match verify(probe, routing, c.verify_timeout).await {
                Ok(()) => true,
                Err(e) => {
                    let restored = self.restore(previous.as_deref(), Some(pid)).await;
                    return Err(fail(Step::Verify, restored, e));
                }
            },
        };
        let latency = start.elapsed();

        let old_workers_draining = wait_old_workers(pid, &before, c.drain_wait).await;
        if old_workers_draining > 0 {
            tracing::warn!(
                backend = crate::NAME,
                old_workers = old_workers_draining,
                "old nginx workers still finishing requests after {:?}; they exit on their own (worker_shutdown_timeout bounds them)",
                c.drain_wait
            );
        }
        Ok(self.record(ReloadReport {
            changed: true,
            latency,
            verified,
            old_workers_draining,
        }))
    }

    fn record(&self, report: ReloadReport) -> ReloadReport {
        *self
            .last_report
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(report.clone());
        report
    }

    /// SIGHUP, then wait until the master runs a worker that was not there before and every
    /// worker from before has stopped accepting (it is shutting down or gone). The master starts
    /// the new workers first and tells the old ones to quit only about 100 ms later: until then
    /// old workers still take new connections with the old upstreams, so a reload is only
    /// applied once they are all shutting down.
    ///
    /// When the master's workers cannot be seen (another PID namespace, `/proc` mounted with
    /// `hidepid`), the wait is skipped with a warning and only the verification probe (if any)
    /// confirms the reload.
    async fn reload_and_wait(&self, pid: Pid, before: &[master::Worker]) -> Result<(), NginxError> {
        master::send_reload(pid)?;
        if before.is_empty() {
            tracing::warn!(
                backend = crate::NAME,
                "cannot see the workers of nginx master {} in /proc: not waiting for new workers; only verification confirms the reload",
                pid.as_raw_nonzero()
            );
            return Ok(());
        }
        let deadline = Instant::now() + self.config.reload_timeout;
        loop {
            let now = master::workers(pid);
            let started = now
                .iter()
                .any(|w| !w.shutting_down && !before.iter().any(|b| b.pid == w.pid));
            let old_accepting = now
                .iter()
                .any(|w| !w.shutting_down && before.iter().any(|b| b.pid == w.pid));
            if started && !old_accepting {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(NginxError::ReloadNotApplied {
                    pid: pid.as_raw_nonzero().get(),
                    after: self.config.reload_timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Puts `previous` back (removes the include if there was none) and, when nginx had been
    /// reloaded (`pid`), reloads it again.
    async fn restore(&self, previous: Option<&str>, pid: Option<Pid>) -> Restored {
        let c = &*self.config;
        let res = match previous {
            Some(text) => {
                let tmp = c.tmp_path();
                write_synced(&tmp, text).and_then(|()| {
                    std::fs::rename(&tmp, &c.include).map_err(|e| {
                        NginxError::fs("renaming the previous include over", &c.include, e)
                    })
                })
            }
            None => match std::fs::remove_file(&c.include) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(NginxError::fs("removing", &c.include, e)),
            },
        };
        if let Err(e) = res {
            return Restored::RestoreFailed {
                reason: e.to_string(),
            };
        }
        let Some(pid) = pid else {
            return Restored::Restored { reloaded: false };
        };
        let before = master::workers(pid);
        match self.reload_and_wait(pid, &before).await {
            Ok(()) => Restored::Restored { reloaded: true },
            Err(e) => Restored::RestoreFailed {
                reason: format!("the previous include is back but reloading it failed: {e}"),
            },
        }
    }
}

fn read_optional(path: &Path) -> std::result::Result<Option<String>, NginxError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(NginxError::fs("reading", path, e)),
    }
}

fn write_synced(path: &Path, text: &str) -> std::result::Result<(), NginxError> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| NginxError::fs("creating", path, e))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| NginxError::fs("writing", path, e))
}

/// Probes until `consecutive` answers in a row come from slots the routing sends traffic to
/// (for a whole split: the target slot).
async fn verify(
    probe: &VerifyProbe,
    routing: &Routing,
    bound: Duration,
) -> std::result::Result<(), NginxError> {
    let expected: Vec<Slot> = Slot::ALL
        .into_iter()
        .filter(|s| routing.split.weight(*s) > 0)
        .collect();
    let expected_desc = expected
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(" or ");
    let deadline = Instant::now() + bound;
    let mut streak = 0;
    let mut last = String::from("no answer yet");
    loop {
        match http::request(
            probe.addr,
            "GET",
            &probe.path,
            &[(PROBE_HEADER, "1")],
            "",
            bound,
        )
        .await
        {
            Ok(a) if (200..300).contains(&a.status) => {
                let slot = match &probe.marker {
                    SlotMarker::Header(h) => a.header(h).and_then(|v| v.parse::<Slot>().ok()),
                    SlotMarker::UpstreamAddrHeader(h) => a.header(h).and_then(|v| {
                        // `$upstream_addr` lists every peer tried; the last one answered.
                        let addr = v.rsplit(", ").next().unwrap_or(v);
                        Slot::ALL.into_iter().find(|s| {
                            routing
                                .endpoints
                                .get(*s)
                                .iter()
                                .any(|e| e.authority() == addr)
                        })
                    }),
                };
                match slot {
                    Some(s) if expected.contains(&s) => streak += 1,
                    other => {
                        streak = 0;
                        last = match other {
                            Some(s) => format!("an answer came from {s}"),
                            None => no_marker(&probe.marker),
                        };
                    }
                }
            }
            Ok(a) => {
                streak = 0;
                last = format!("status {}", a.status);
            }
            Err(e) => {
                streak = 0;
                last = e.to_string();
            }
        }
        if streak >= probe.consecutive {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(NginxError::Verify {
                expected: expected_desc,
                after: bound,
                detail: last,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Why an answer named no slot, and what to do about it.
fn no_marker(marker: &SlotMarker) -> String {
    match marker {
        SlotMarker::UpstreamAddrHeader(h) if h == UPSTREAM_HEADER => format!(
            "an answer had no `{h}` header naming a blue or green endpoint: the include adds it at \
             http level, which a `server` or `location` with `add_header`s of its own does not \
             inherit; add the `add_header` line of NginxReloadConfig::render_location() there"
        ),
        SlotMarker::UpstreamAddrHeader(h) => format!(
            "an answer had no `{h}` header naming a blue or green endpoint (add \
             `add_header {h} $upstream_addr always;` to the location)"
        ),
        SlotMarker::Header(h) => format!(
            "an answer had no `{h}` header saying blue or green: the application must send it \
             (or use the default marker, the upstream address nginx adds)"
        ),
    }
}

/// Waits up to `bound` for the workers in `before` to exit; returns how many are left.
async fn wait_old_workers(pid: Pid, before: &[master::Worker], bound: Duration) -> usize {
    let deadline = Instant::now() + bound;
    loop {
        let now = master::workers(pid);
        let left = before
            .iter()
            .filter(|b| now.iter().any(|w| w.pid == b.pid))
            .count();
        if left == 0 || Instant::now() >= deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[async_trait]
impl TrafficSwitch for NginxReloadSwitch {
    fn name(&self) -> &str {
        crate::NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::basic().with_weights(true)
    }

    async fn apply(&self, split: &TrafficSplit, endpoints: &Endpoints) -> Result<()> {
        self.check_split(split, endpoints)?;
        format::validate_endpoints(endpoints, false, "Reload")?;
        let routing = Routing {
            split: split.clone(),
            endpoints: endpoints.clone(),
        };
        self.switch_to(&routing)
            .await
            .map(|_| ())
            .map_err(|e| e.into_core("apply"))
    }

    async fn current(&self) -> Result<Option<TrafficSplit>> {
        Ok(self
            .read()
            .map_err(|e| e.into_core("current"))?
            .map(|r| r.split))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bluegreen_core::Endpoint;

    fn routing(b: u8, g: u8) -> Routing {
        Routing {
            split: TrafficSplit::new(b, g).unwrap(),
            endpoints: Endpoints::new(
                vec![
                    Endpoint::new("127.0.0.1", 8081),
                    Endpoint::new("127.0.0.1", 8082),
                ],
                vec![Endpoint::new("app-green.internal", 9090)],
            ),
        }
    }

    #[test]
    fn include_leaves_out_weightless_slots_and_keeps_the_ratio() {
        let text = render_include("app", 16, &routing(100, 0));
        assert!(
            text.contains("server 127.0.0.1:8081 weight=1; # blue"),
            "{text}"
        );
        assert!(!text.contains("9090 weight"), "{text}");
        assert!(text.contains("keepalive 16;"), "{text}");
        // 90/10 with two blue peers and one green: blue peers 9 each, green 2 (18:2 = 90:10).
        let text = render_include("app", 0, &routing(90, 10));
        assert!(text.contains("server 127.0.0.1:8081 weight=9;"), "{text}");
        assert!(
            text.contains("server app-green.internal:9090 weight=2;"),
            "{text}"
        );
        assert!(!text.contains("    keepalive"), "{text}");
    }

    #[test]
    fn the_include_adds_the_upstream_marker_for_probes_only() {
        let text = render_include("my-app", 32, &routing(100, 0));
        assert!(
            text.contains(
                "map $http_x_bluegreen_probe $bluegreen_upstream_my_app {\n    default $upstream_addr;\n    \"\" \"\";\n}\n"
            ),
            "{text}"
        );
        assert!(
            text.ends_with("add_header x-bluegreen-upstream $bluegreen_upstream_my_app always;\n"),
            "{text}"
        );
        let c = config("my-app").unwrap();
        assert!(c
            .render_location()
            .contains("add_header x-bluegreen-upstream $bluegreen_upstream_my_app always;"));
        assert!(c
            .render_location()
            .starts_with("proxy_pass http://my-app;\n"));
        assert_eq!(
            VerifyProbe::new("127.0.0.1:80".parse().unwrap()).marker,
            SlotMarker::UpstreamAddrHeader(UPSTREAM_HEADER.into())
        );
    }

    #[test]
    fn an_include_written_before_the_marker_still_reads() {
        let r = routing(70, 30);
        let legacy = render_upstream("app", 32, &r);
        assert!(!legacy.contains("add_header"));
        assert_eq!(parse_include(&legacy).unwrap(), r);
    }

    #[test]
    fn include_round_trips_and_hand_edits_are_refused() {
        let r = routing(70, 30);
        let text = render_include("app", 32, &r);
        assert_eq!(parse_include(&text).unwrap(), r);
        let edited = text.replace("weight=7;", "weight=8;");
        assert!(parse_include(&edited).unwrap_err().contains("differs"));
        let edited = text.replace("# weights 70 30", "# weights 30 70");
        assert!(parse_include(&edited).is_err());
        assert!(parse_include("upstream app { server 127.0.0.1:1; }\n").is_err());
        assert!(parse_include("").is_err());
    }

    fn config(upstream: &str) -> Result<NginxReloadConfig> {
        NginxReloadConfig::builder(NginxCommand::new("/etc/nginx/nginx.conf"))
            .include("/tmp/x.conf")
            .upstream(upstream)
            .pid_file("/run/nginx.pid")
            .build()
    }

    #[test]
    fn config_and_probe_validate_their_input() {
        assert!(config("app").is_ok());
        assert!(config("a;pp").is_err());
        assert!(config("a.b").is_err());
        let no_include = NginxReloadConfig::builder(NginxCommand::new("/n.conf"))
            .upstream("app")
            .build()
            .unwrap_err();
        assert!(no_include.to_string().contains("include"), "{no_include}");
        let no_upstream = NginxReloadConfig::builder(NginxCommand::new("/n.conf"))
            .include("/tmp/x.conf")
            .build()
            .unwrap_err();
        assert!(
            no_upstream.to_string().contains("upstream"),
            "{no_upstream}"
        );
        let no_file = NginxReloadConfig::builder(NginxCommand::new("/n.conf"))
            .include("/")
            .upstream("app")
            .build()
            .unwrap_err();
        assert!(no_file.to_string().contains("include"), "{no_file}");
        let p = VerifyProbe::new("127.0.0.1:80".parse().unwrap());
        assert!(p.clone().with_path("/health?x=1").is_ok());
        assert!(p.clone().with_path("/a b").is_err());
        assert!(p.clone().with_path("/a\r\nHost: x").is_err());
        assert!(p.clone().with_path("relative").is_err());
        assert!(p
            .clone()
            .with_marker(SlotMarker::Header("x-slot\r\n".into()))
            .is_err());
        assert!(p
            .with_marker(SlotMarker::UpstreamAddrHeader("x-upstream".into()))
            .is_ok());
    }
}
