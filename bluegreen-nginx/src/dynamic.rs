//! `Dynamic` mode: a Lua balancer reads the split from a `lua_shared_dict`; a token-protected
//! control location on a loopback listener updates it. No reload, no dropped connection.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bluegreen_core::{
    Capabilities, Endpoints, Error, Name, Result, Secret, TrafficSplit, TrafficSwitch,
    TrafficSwitchExt,
};
use serde::{Deserialize, Serialize};

use crate::error::NginxError;
use crate::format::{self, Routing};
use crate::http;

fn five_seconds() -> Duration {
    Duration::from_secs(5)
}

fn default_keepalive() -> u32 {
    32
}

/// An absolute path of letters, digits and `/._-` (it is written into the Lua code).
fn check_state_file(path: &Path) -> Result<()> {
    let text = path.to_string_lossy();
    let ok = path.is_absolute()
        && text.len() <= 1024
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b))
        && path.file_name().is_some();
    if !ok {
        return Err(Error::invalid(
            "state file",
            text.into_owned(),
            "expected an absolute path of letters, digits and /._-",
        ));
    }
    Ok(())
}

/// The control location's path on the control listener.
pub const CONTROL_PATH: &str = "/bluegreen/split";

/// The header carrying the control token.
pub const TOKEN_HEADER: &str = "x-bluegreen-token";

/// The first line of a rendered snippet, before the quoted name.
const SNIPPET_HEADER: &str = "# bluegreen-nginx Dynamic switch ";

/// The control location's token check in the snippet: the token sits between these two, which is
/// where [`NginxDynamicConfig::token_from_snippet`] reads it back.
const TOKEN_CHECK_PREFIX: &str = "if type(tok) ~= \"string\" or tok ~= \"";
const TOKEN_CHECK_SUFFIX: &str = "\" then";

/// 16 to 128 of letters, digits, `_`, `-` (also what keeps it inert inside the Lua string).
fn check_token(token: &Secret) -> Result<()> {
    let t = token.expose();
    if t.len() < 16
        || t.len() > 128
        || !t
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(Error::invalid(
            "control token",
            "<redacted>",
            "expected 16 to 128 of letters, digits, `_`, `-`",
        ));
    }
    Ok(())
}

/// Settings of a [`NginxDynamicSwitch`] and of the nginx snippet it talks to.
///
/// `Debug` hides the token, and serializing leaves it out (deserializing reads it from `token`).
///
/// ```
/// use bluegreen_nginx::NginxDynamicConfig;
///
/// let c: NginxDynamicConfig = serde_json::from_str(
///     r#"{ "name": "shop", "control": "127.0.0.1:9000", "token": "0123456789abcdef0123" }"#,
/// )
/// .unwrap();
/// assert_eq!(c.keepalive, 32);
/// assert!(!serde_json::to_string(&c).unwrap().contains("0123456789abcdef0123"));
/// // Validated like `new`: the control listener must be on loopback.
/// assert!(serde_json::from_str::<NginxDynamicConfig>(
///     r#"{ "name": "shop", "control": "10.0.0.1:9000", "token": "0123456789abcdef0123" }"#,
/// )
/// .is_err());
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
#[non_exhaustive]
pub struct NginxDynamicConfig {
    /// Base name: the upstream is `bluegreen_<name>`, the shared dict too.
    pub name: Name,
    /// The loopback address of the control listener.
    pub control: SocketAddr,
    /// The control token (sent in `x-bluegreen-token`). Never serialized.
    #[serde(skip_serializing)]
    pub token: Secret,
    /// Bound on one control request. Default 5 s.
    #[serde(default = "five_seconds", with = "bluegreen_core::config::duration")]
    pub timeout: Duration,
    /// `keepalive` connections per worker toward the upstreams (0: none). Default 32.
    #[serde(default = "default_keepalive")]
    pub keepalive: u32,
    /// Where the last applied split is kept so that nginx resumes it after a restart.
    #[serde(default)]
    pub state_file: Option<PathBuf>,
}

bluegreen_core::validated_serde!(NginxDynamicConfig);

impl NginxDynamicConfig {
    /// Validates the name (letters, digits, `_`, `-`), that `control` is a loopback address, and the
    /// token (16 to 128 of letters, digits, `_`, `-`; see [`NginxDynamicConfig::generate_token`]).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the bad value (the token itself is never printed).
    pub fn new(name: &str, control: SocketAddr, token: Secret) -> Result<Self> {
        let config = NginxDynamicConfig {
            name: Name::new(name)?,
            control,
            token,
            timeout: five_seconds(),
            keepalive: default_keepalive(),
            state_file: None,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks what [`new`](Self::new) and [`with_state_file`](Self::with_state_file) check; run
    /// when deserializing.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the bad value (the token itself is never printed).
    pub fn validate(&self) -> Result<()> {
        let name = &self.name;
        let control = self.control;
        let token = &self.token;
        if name.as_str().contains(['.', '+']) {
            return Err(Error::invalid(
                "nginx upstream name",
                name.as_str(),
                "use letters, digits, `_` and `-` only",
            ));
        }
        if !control.ip().is_loopback() {
            return Err(Error::invalid(
                "control listener",
                control.to_string(),
                "the control listener must be on a loopback address (127.0.0.1 or ::1)",
            ));
        }
        if control.port() == 0 {
            return Err(Error::invalid(
                "control listener",
                control.to_string(),
                "port 0 is not reachable",
            ));
        }
        check_token(token)?;
        if let Some(path) = &self.state_file {
            check_state_file(path)?;
        }
        Ok(())
    }

    /// The control token kept in a snippet written from [`render_snippet`](Self::render_snippet):
    /// a process that did not generate the token (a later run, another tool) loads it back from
    /// the file nginx includes, instead of keeping a second copy.
    ///
    /// ```no_run
    /// use bluegreen_nginx::NginxDynamicConfig;
    ///
    /// # fn run() -> bluegreen_core::Result<()> {
    /// let token = NginxDynamicConfig::token_from_snippet("/etc/nginx/conf.d/shop-bluegreen.conf")?;
    /// let config = NginxDynamicConfig::new("shop", "127.0.0.1:9180".parse().unwrap(), token)?;
    /// # let _ = config;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::Io`] naming the file when it cannot be read; [`Error::InvalidInput`] when it is
    /// not a Dynamic snippet of this crate or holds no valid token (the token is never printed).
    pub fn token_from_snippet(path: impl AsRef<Path>) -> Result<Secret> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading the nginx snippet {}", path.display()), e))?;
        let not_ours = |why: &str| Error::invalid("nginx snippet", path.display().to_string(), why);
        if !text.starts_with(SNIPPET_HEADER) {
            return Err(not_ours(
                "is not a bluegreen-nginx Dynamic snippet (its first line is not render_snippet's)",
            ));
        }
        let token = text
            .lines()
            .find_map(|l| {
                l.trim_start()
                    .strip_prefix(TOKEN_CHECK_PREFIX)
                    .and_then(|rest| rest.strip_suffix(TOKEN_CHECK_SUFFIX))
            })
            .ok_or_else(|| not_ours("holds no control token check (edited by hand?)"))?;
        let token = Secret::new(token.to_string());
        check_token(&token)?;
        Ok(token)
    }

    /// A random 48-character token from the OS's random source (`/dev/urandom`).
    ///
    /// # Errors
    /// The random source cannot be read.
    pub fn generate_token() -> Result<Secret> {
        use std::io::Read;
        let mut buf = [0u8; 24];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut buf))
            .map_err(|e| Error::io("reading /dev/urandom for a control token", e))?;
        Ok(Secret::new(
            buf.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        ))
    }

    /// With a bound on one control request.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// With `keepalive` idle connections per worker toward the upstreams (0 turns it off).
    pub fn with_keepalive(mut self, keepalive: u32) -> Self {
        self.keepalive = keepalive;
        self
    }

    /// With a state file: `apply` writes the split there (atomically, mode 0644, before sending it)
    /// and the Lua code loads it when the shared dict is empty, so a restarted nginx resumes the
    /// last split instead of failing requests until the next `apply`. nginx's workers must be able
    /// to read it. It holds no secret.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] unless the path is absolute and made of letters, digits and
    /// `/._-` (it is written into the Lua code).
    pub fn with_state_file(mut self, path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        check_state_file(&path)?;
        self.state_file = Some(path);
        Ok(self)
    }

    /// The upstream to `proxy_pass` to: `bluegreen_<name>`.
    pub fn upstream_name(&self) -> String {
        format!("bluegreen_{}", self.name)
    }

    fn lua_module(&self) -> String {
        let state = self
            .state_file
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        LUA_MODULE
            .replace("@KEY@", &format!("bluegreen.{}", self.name))
            .replace("@STATE@", &state)
    }

    /// The http-level snippet to `include`: the shared dict, the upstream with the Lua balancer,
    /// and the control server on the loopback listener. It contains the token: keep the file
    /// readable by root / nginx's master only.
    pub fn render_snippet(&self) -> String {
        let dict = self.upstream_name();
        let balancer = LUA_BALANCER
            .replace("@MODULE@", &self.lua_module())
            .replace("@DICT@", &dict)
            .replace("@NAME@", self.name.as_str());
        let control_lua = LUA_CONTROL
            .replace("@MODULE@", &self.lua_module())
            .replace("@DICT@", &dict)
            .replace(
                "@TOKEN_CHECK@",
                &format!(
                    "{TOKEN_CHECK_PREFIX}{}{TOKEN_CHECK_SUFFIX}",
                    self.token.expose()
                ),
            );
        let keepalive = if self.keepalive > 0 {
            format!("    keepalive {};\n", self.keepalive)
        } else {
            String::new()
        };
        format!(
            "{SNIPPET_HEADER}{name:?}: generated, include at http level.\n\
             # Needs ndk_http_module and ngx_http_lua_module (load_module). Contains the control token.\n\
             lua_shared_dict {dict} 1m;\n\
             upstream {dict} {{\n\
             \x20   server 0.0.0.1:1; # placeholder: the Lua balancer picks every peer\n\
             \x20   balancer_by_lua_block {{\n{balancer}    }}\n\
             {keepalive}}}\n\
             server {{\n\
             \x20   listen {listen};\n\
             \x20   access_log off;\n\
             \x20   client_max_body_size 4k;\n\
             \x20   client_body_buffer_size 4k;\n\
             \x20   location = {CONTROL_PATH} {{\n\
             \x20       content_by_lua_block {{\n{control_lua}        }}\n\
             \x20   }}\n\
             \x20   location / {{ return 404; }}\n\
             }}\n",
            name = self.name.as_str(),
            listen = self.control,
        )
    }

    /// Directives for the `location` that serves your application: `proxy_pass` to the upstream,
    /// HTTP/1.1 keep-alive toward it, and the header filter that sets the sticky cookie when the
    /// split asks for one.
    pub fn render_location(&self) -> String {
        format!(
            "proxy_pass http://{up};\n\
             proxy_http_version 1.1;\n\
             proxy_set_header Connection \"\";\n\
             header_filter_by_lua_block {{\n{STICKY_FILTER}}}\n",
            up = self.upstream_name()
        )
    }
}

/// Shared Lua: the strict parser of the split text, defined once per worker.
const LUA_MODULE: &str = r#"        local m = package.loaded["@KEY@"]
        if not m then
            m = { rr = { blue = 0, green = 0 } }
            math.randomseed(ngx.now() * 1000 + ngx.worker.pid())
            local function peers(s)
                local out = {}
                if s == "" then return out end
                if s:sub(1, 1) ~= " " then return nil end
                for p in s:gmatch(" ([^ ]*)") do
                    local a, b, c, d, port = p:match("^(%d+)%.(%d+)%.(%d+)%.(%d+):(%d+)$")
                    if not a then return nil end
                    for _, o in ipairs({ a, b, c, d }) do
                        if #o > 3 or tonumber(o) > 255 then return nil end
                    end
                    local pn = tonumber(port)
                    if #port > 5 or pn < 1 or pn > 65535 then return nil end
                    out[#out + 1] = { a .. "." .. b .. "." .. c .. "." .. d, pn }
                    if #out > 32 then return nil end
                end
                return out
            end
            function m.parse(body)
                if type(body) ~= "string" or #body == 0 or #body > 4096 then
                    return nil, "body missing or larger than 4096 bytes"
                end
                if body:find("[^%w%.%-_: \n]") then return nil, "unexpected character" end
                local l = {}
                for line in body:gmatch("([^\n]*)\n") do l[#l + 1] = line end
                if #l ~= 5 or table.concat(l, "\n") .. "\n" ~= body then
                    return nil, "expected exactly 5 newline-terminated lines"
                end
                if l[1] ~= "bluegreen-split 1" then return nil, "line 1 must be 'bluegreen-split 1'" end
                local wb, wg = l[2]:match("^weights (%d%d?%d?) (%d%d?%d?)$")
                if not wb then return nil, "line 2 must be 'weights <blue> <green>'" end
                wb, wg = tonumber(wb), tonumber(wg)
                if wb + wg ~= 100 then return nil, "weights must sum to 100" end
                local sticky = l[3]:match("^sticky (%S+)$")
                if not sticky or not (sticky == "-" or (#sticky <= 64 and sticky:match("^%w[%w_%-]*$"))) then
                    return nil, "line 3 must be 'sticky -' or 'sticky <cookie-name>'"
                end
                if sticky == "-" then sticky = nil end
                local bl, gl = l[4]:match("^blue(.*)$"), l[5]:match("^green(.*)$")
                local pb, pg = bl and peers(bl), gl and peers(gl)
                if not pb then return nil, "line 4 must be 'blue' and up to 32 ' <ipv4>:<port>' peers" end
                if not pg then return nil, "line 5 must be 'green' and up to 32 ' <ipv4>:<port>' peers" end
                if (wb > 0 and #pb == 0) or (wg > 0 and #pg == 0) then
                    return nil, "a slot with weight has no peers"
                end
                return { w = { blue = wb, green = wg }, sticky = sticky, peers = { blue = pb, green = pg } }
            end
            -- The split in the dict; after a restart (empty dict), the one in the state file.
            function m.get(dict)
                local body = dict:get("split")
                if body or m.state == "" then return body end
                local f = io.open(m.state, "r")
                if not f then return nil end
                local text = f:read("*a")
                f:close()
                if m.parse(text) then dict:add("split", text) end
                return dict:get("split")
            end
            m.state = "@STATE@"
            package.loaded["@KEY@"] = m
        end
"#;

const LUA_BALANCER: &str = r#"@MODULE@
        local body = m.get(ngx.shared["@DICT@"])
        if not body then
            ngx.log(ngx.ERR, "bluegreen: no traffic split set for @NAME@; apply one through the control listener")
            return ngx.exit(503)
        end
        if body ~= m.body then
            local s, err = m.parse(body)
            if not s then
                ngx.log(ngx.ERR, "bluegreen: stored split is invalid: ", err)
                return ngx.exit(503)
            end
            m.split, m.body = s, body
        end
        local s = m.split
        local slot
        if s.sticky then
            local v = ngx.var["cookie_" .. s.sticky]
            if (v == "blue" or v == "green") and s.w[v] > 0 then
                slot = v
            else
                ngx.ctx.bluegreen_cookie = s.sticky
            end
        end
        if not slot then
            if math.random(100) <= s.w.blue then slot = "blue" else slot = "green" end
        end
        local list = s.peers[slot]
        local i = m.rr[slot] % #list + 1
        m.rr[slot] = i
        ngx.ctx.bluegreen_slot = slot
        local ok, err = require("ngx.balancer").set_current_peer(list[i][1], list[i][2])
        if not ok then
            ngx.log(ngx.ERR, "bluegreen: set_current_peer failed: ", err)
            return ngx.exit(502)
        end
"#;

const LUA_CONTROL: &str = r#"@MODULE@
        local dict = ngx.shared["@DICT@"]
        local function reply(status, msg)
            ngx.status = status
            ngx.header["Content-Type"] = "text/plain"
            ngx.print(msg)
            return ngx.exit(ngx.OK)
        end
        local tok = ngx.req.get_headers()["x-bluegreen-token"]
        @TOKEN_CHECK@
            return reply(401, "bad or missing x-bluegreen-token\n")
        end
        local method = ngx.req.get_method()
        if method == "GET" then
            local body = m.get(dict)
            if not body then return reply(404, "no split set\n") end
            return reply(200, body)
        elseif method == "PUT" then
            ngx.req.read_body()
            local body = ngx.req.get_body_data()
            local s, err = m.parse(body)
            if not s then return reply(400, "invalid split: " .. err .. "\n") end
            local ok, serr = dict:set("split", body)
            if not ok then return reply(500, "cannot store the split: " .. tostring(serr) .. "\n") end
            return reply(200, "ok\n")
        end
        return reply(405, "use GET or PUT\n")
"#;

const STICKY_FILTER: &str = r#"    local c, s = ngx.ctx.bluegreen_cookie, ngx.ctx.bluegreen_slot
    if c and s then
        local v = c .. "=" .. s .. "; Path=/; HttpOnly; SameSite=Lax"
        local h = ngx.header["Set-Cookie"]
        if h == nil then
            ngx.header["Set-Cookie"] = v
        elseif type(h) == "table" then
            h[#h + 1] = v
            ngx.header["Set-Cookie"] = h
        else
            ngx.header["Set-Cookie"] = { h, v }
        end
    end
"#;

/// `Dynamic` mode switch: sets and reads the split through the control listener of the snippet
/// rendered by [`NginxDynamicConfig::render_snippet`]. Nothing is reloaded.
///
/// Cheap to clone; clones share the configuration.
#[derive(Debug, Clone)]
pub struct NginxDynamicSwitch {
    config: Arc<NginxDynamicConfig>,
}

impl NginxDynamicSwitch {
    /// A switch talking to the control listener of `config`.
    pub fn new(config: NginxDynamicConfig) -> Self {
        NginxDynamicSwitch {
            config: Arc::new(config),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &NginxDynamicConfig {
        &self.config
    }

    async fn call(&self, method: &str, body: &str) -> Result<http::Answer, NginxError> {
        let c = &self.config;
        let addr = c.control.to_string();
        let answer = http::request(
            c.control,
            method,
            CONTROL_PATH,
            &[(TOKEN_HEADER, c.token.expose())],
            body,
            c.timeout,
        )
        .await
        .map_err(|source| NginxError::ControlUnreachable {
            addr: addr.clone(),
            source,
        })?;
        if answer.status == 401 {
            return Err(NginxError::Unauthorized { addr });
        }
        Ok(answer)
    }

    /// Sends a validated routing: state file first (restored if the PUT fails), then nginx.
    async fn send(&self, routing: &Routing) -> Result<(), NginxError> {
        let body = format::render(&routing.split, &routing.endpoints);
        let previous = match &self.config.state_file {
            Some(path) => {
                let previous = match std::fs::read_to_string(path) {
                    Ok(t) => Some(t),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    Err(e) => return Err(NginxError::fs("reading state file", path, e)),
                };
                write_state(path, &body)?;
                Some((path, previous))
            }
            None => None,
        };
        let res = async {
            let answer = self.call("PUT", &body).await?;
            if answer.status != 200 {
                return Err(NginxError::ControlRejected {
                    addr: self.config.control.to_string(),
                    status: answer.status,
                    body: answer.body.trim().to_string(),
                });
            }
            Ok(())
        }
        .await;
        if res.is_err() {
            if let Some((path, previous)) = previous {
                let _ = match previous {
                    Some(text) => write_state(path, &text),
                    None => std::fs::remove_file(path)
                        .map_err(|e| NginxError::fs("removing state file", path, e)),
                };
            }
        }
        res
    }

    /// Reads the split and endpoints nginx holds (`None` when nothing was set since nginx
    /// started).
    ///
    /// # Errors
    /// The control listener is unreachable, refuses the token, or answers something unparseable.
    pub async fn read(&self) -> Result<Option<Routing>, NginxError> {
        let answer = self.call("GET", "").await?;
        match answer.status {
            404 => Ok(None),
            200 => {
                format::parse(&answer.body)
                    .map(Some)
                    .map_err(|reason| NginxError::Unparseable {
                        source_desc: format!("the split held by nginx at {}", self.config.control),
                        reason,
                    })
            }
            status => Err(NginxError::ControlRejected {
                addr: self.config.control.to_string(),
                status,
                body: answer.body.trim().to_string(),
            }),
        }
    }
}

fn write_state(path: &Path, text: &str) -> Result<(), NginxError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.bluegreen-tmp"));
    let res = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(text.as_bytes())?;
            f.sync_all()
        })
        .map_err(|e| NginxError::fs("writing state file", &tmp, e))
        .and_then(|()| {
            std::fs::rename(&tmp, path).map_err(|e| NginxError::fs("renaming state file", path, e))
        });
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

#[async_trait]
impl TrafficSwitch for NginxDynamicSwitch {
    fn name(&self) -> &str {
        crate::NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::basic().with_weights(true).with_sticky(true)
    }

    async fn apply(&self, split: &TrafficSplit, endpoints: &Endpoints) -> Result<()> {
        self.check_split(split, endpoints)?;
        format::validate_endpoints(endpoints, true, "Dynamic")?;
        if let Some(s) = &split.sticky {
            format::validate_cookie(&s.cookie)?;
        }
        let routing = Routing {
            split: split.clone(),
            endpoints: endpoints.clone(),
        };
        self.send(&routing).await.map_err(|e| e.into_core("apply"))
    }

    async fn current(&self) -> Result<Option<TrafficSplit>> {
        Ok(self
            .read()
            .await
            .map_err(|e| e.into_core("current"))?
            .map(|r| r.split))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> Secret {
        Secret::new("0123456789abcdef0123")
    }

    #[test]
    fn config_refuses_bad_names_addresses_and_tokens() {
        let ctl: SocketAddr = "127.0.0.1:9000".parse().unwrap();
        assert!(NginxDynamicConfig::new("app", ctl, token()).is_ok());
        assert!(NginxDynamicConfig::new("app;x", ctl, token()).is_err());
        assert!(NginxDynamicConfig::new("a.b", ctl, token()).is_err());
        assert!(NginxDynamicConfig::new("app", "0.0.0.0:9000".parse().unwrap(), token()).is_err());
        assert!(NginxDynamicConfig::new("app", "10.1.2.3:9000".parse().unwrap(), token()).is_err());
        let err = NginxDynamicConfig::new("app", ctl, Secret::new("short\"quote")).unwrap_err();
        assert!(!err.to_string().contains("short"), "token leaked: {err}");
        let err = NginxDynamicConfig::new("app", ctl, Secret::new("x\";os.exit()--aaaaaaaaaa"));
        assert!(err.is_err());
    }

    #[test]
    fn generated_tokens_are_accepted_and_differ() {
        let a = NginxDynamicConfig::generate_token().unwrap();
        let b = NginxDynamicConfig::generate_token().unwrap();
        assert_ne!(a.expose(), b.expose());
        assert!(NginxDynamicConfig::new("app", "127.0.0.1:9000".parse().unwrap(), a).is_ok());
    }

    #[test]
    fn snippet_names_the_dict_upstream_and_listener_and_debug_hides_the_token() {
        let c = NginxDynamicConfig::new("app", "127.0.0.1:9000".parse().unwrap(), token()).unwrap();
        let s = c.render_snippet();
        assert!(s.contains("lua_shared_dict bluegreen_app 1m;"), "{s}");
        assert!(s.contains("upstream bluegreen_app {"), "{s}");
        assert!(s.contains("listen 127.0.0.1:9000;"), "{s}");
        assert!(s.contains("\"0123456789abcdef0123\""), "{s}");
        assert!(!s.contains('@'), "unreplaced placeholder in {s}");
        assert!(!format!("{c:?}").contains("0123456789abcdef0123"));
        assert!(c
            .render_location()
            .contains("proxy_pass http://bluegreen_app;"));
    }
}
