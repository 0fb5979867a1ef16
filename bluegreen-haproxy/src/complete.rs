//! A complete haproxy.cfg for users starting from nothing: `global` (the admin socket and the
//! server-state file), `defaults`, a `frontend` and the backend this switch drives. Built from
//! [`HaproxyConfig::render_global`] and [`HaproxyConfig::render_backend`], so it holds exactly
//! what those render for an existing configuration.

use std::net::SocketAddr;
use std::path::Path;

use bluegreen_core::Result;

use crate::config::HaproxyConfig;

impl HaproxyConfig {
    /// A complete, working haproxy.cfg: HTTP mode, the frontend listening on `bind` and sending
    /// every request to the backend, the backend with both servers in maintenance until the
    /// first `apply`, the admin stats socket the switch talks to, and `state_file` for reloads.
    ///
    /// Start HAProxy on it (`haproxy -f haproxy.cfg`), then `apply` a split: the first start
    /// logs "Can't open global server state file" because no state was saved yet; that warning
    /// is expected and harmless. Timeouts are 5 s to connect and 30 s for clients, servers and
    /// idle keep-alive connections; edit the file afterwards to add TLS, logging or limits.
    ///
    /// ```
    /// use bluegreen_haproxy::HaproxyConfig;
    ///
    /// let cfg = HaproxyConfig::new("/run/haproxy/admin.sock")
    ///     .unwrap()
    ///     .render_complete("0.0.0.0:80".parse().unwrap(), "/var/lib/haproxy/server-state".as_ref())
    ///     .unwrap();
    /// assert!(cfg.starts_with("# haproxy.cfg for bluegreen"));
    /// assert!(cfg.contains("\nglobal\n    stats socket /run/haproxy/admin.sock mode 600 level admin\n"));
    /// assert!(cfg.contains("\nfrontend app_frontend\n    bind 0.0.0.0:80\n    default_backend app\n"));
    /// assert!(cfg.contains("\nbackend app\n"));
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidInput`](bluegreen_core::Error::InvalidInput) for the names and paths
    /// [`render_global`](Self::render_global) and [`render_backend`](Self::render_backend) refuse.
    pub fn render_complete(&self, bind: SocketAddr, state_file: &Path) -> Result<String> {
        let global = self.render_global(state_file)?;
        let backend = self.render_backend()?;
        let name = self.backend();
        Ok(format!(
            "# haproxy.cfg for bluegreen (backend {name}): rendered by bluegreen-haproxy.\n\
             # The servers' addresses, weights and states are set at run time through the stats\n\
             # socket; the first start warns that the server-state file cannot be opened (none\n\
             # saved yet): expected.\n\
             global\n{global}\n\
             defaults\n\
             \x20   mode http\n\
             \x20   option http-keep-alive\n\
             \x20   timeout connect 5s\n\
             \x20   timeout client 30s\n\
             \x20   timeout server 30s\n\
             \x20   timeout http-keep-alive 30s\n\
             \n\
             frontend {name}_frontend\n\
             \x20   bind {bind}\n\
             \x20   default_backend {name}\n\
             \n\
             {backend}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_complete_config_holds_every_section_once_and_refuses_bad_names() {
        let c = HaproxyConfig::new("127.0.0.1:9999").unwrap();
        let text = c
            .render_complete("[::1]:8080".parse().unwrap(), "/tmp/state".as_ref())
            .unwrap();
        for section in [
            "global\n",
            "defaults\n",
            "frontend app_frontend\n",
            "backend app\n",
        ] {
            assert_eq!(
                text.lines().filter(|l| format!("{l}\n") == section).count(),
                1,
                "{section:?} in:\n{text}"
            );
        }
        assert!(text.contains("    bind [::1]:8080\n"), "{text}");
        assert!(text.contains(&c.render_backend().unwrap()), "{text}");
        let bad = c.clone().with_backend("app;shutdown sessions");
        assert!(bad
            .render_complete("127.0.0.1:80".parse().unwrap(), "/tmp/state".as_ref())
            .is_err());
        assert!(c
            .render_complete("127.0.0.1:80".parse().unwrap(), "/tmp/a state".as_ref())
            .is_err());
    }
}
