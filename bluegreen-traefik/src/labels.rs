//! Docker-provider labels: the label equivalent of the file configuration, for containers run by
//! `bluegreen-docker` (or compose) behind Traefik's Docker provider.
//!
//! Labels cannot express a weighted service (weighted round robin exists only in the file, HTTP
//! and Kubernetes CRD providers), and a container's labels are fixed when it is created. So labels
//! can only do what the runbook this project started from does: the live slot's container carries
//! the router, the idle slot's container is disabled (`traefik.enable=false`) or carries only a
//! preview router; switching means re-creating containers with new labels, which is not atomic.
//! [`DockerLabels::for_split`] therefore refuses canary splits.
//!
//! The atomic alternative for Docker users: give each slot's container only its service
//! ([`DockerLabels::service_only`], `<name>-<slot>` under the Docker provider) and let
//! [`TraefikSwitch`](crate::TraefikSwitch) weight them through the file provider.

use std::collections::BTreeMap;

use bluegreen_core::{Error, PerSlot, Result, Slot, TrafficSplit};

use crate::config::{
    validate_rule, validate_token, PreviewMatch, RouteName, TraefikConfig, TraefikVersion,
};

/// Builds Traefik Docker-provider labels for the two slots' containers.
///
/// ```
/// use bluegreen_core::{Slot, TrafficSplit};
/// use bluegreen_traefik::DockerLabels;
/// let labels = DockerLabels::new("shop", "Host(`shop.example.com`)", 8069)
///     .unwrap()
///     .with_entry_points(["websecure"])
///     .with_cert_resolver("le");
/// let per_slot = labels.for_split(&TrafficSplit::all(Slot::Green), None).unwrap();
/// assert_eq!(per_slot.green["traefik.enable"], "true");
/// assert_eq!(per_slot.green["traefik.http.routers.shop-green.rule"], "Host(`shop.example.com`)");
/// assert_eq!(per_slot.green["traefik.http.services.shop-green.loadbalancer.server.port"], "8069");
/// assert_eq!(per_slot.blue["traefik.enable"], "false");
/// // Labels cannot weight two containers:
/// assert!(labels.for_split(&TrafficSplit::canary(Slot::Green, 10).unwrap(), None).is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerLabels {
    name: RouteName,
    rule: String,
    port: u16,
    entry_points: Vec<String>,
    cert_resolver: Option<String>,
    network: Option<String>,
    version: TraefikVersion,
    preview_match: PreviewMatch,
}

impl DockerLabels {
    /// Labels for router `name` with `rule`, the application listening on `port` in the container.
    pub fn new(name: impl Into<String>, rule: impl Into<String>, port: u16) -> Result<Self> {
        let rule = rule.into();
        validate_rule(&rule)?;
        if port == 0 {
            return Err(Error::invalid(
                "container port",
                "0",
                "port 0 is not reachable",
            ));
        }
        Ok(DockerLabels {
            name: RouteName::new(name)?,
            rule,
            port,
            entry_points: Vec::new(),
            cert_resolver: None,
            network: None,
            version: TraefikVersion::default(),
            preview_match: PreviewMatch::default(),
        })
    }

    /// The same router name, rule, entry points, version and preview match as a file-provider
    /// configuration.
    pub fn from_config(config: &TraefikConfig, port: u16) -> Result<Self> {
        config.validate()?;
        let mut labels = DockerLabels::new(config.name.as_str(), config.rule.clone(), port)?;
        labels.entry_points = config.entry_points.clone();
        labels.version = config.version;
        labels.preview_match = config.preview_match.clone();
        Ok(labels)
    }

    /// With these entry points (validated when rendering).
    pub fn with_entry_points<I, S>(mut self, entry_points: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.entry_points = entry_points.into_iter().map(Into::into).collect();
        self
    }

    /// With a TLS certificate resolver (`tls.certresolver`, validated when rendering).
    pub fn with_cert_resolver(mut self, resolver: impl Into<String>) -> Self {
        self.cert_resolver = Some(resolver.into());
        self
    }

    /// With the Docker network Traefik reaches the container on (`traefik.docker.network`).
    pub fn with_network(mut self, network: impl Into<String>) -> Self {
        self.network = Some(network.into());
        self
    }

    /// With this Traefik version (matcher names of the preview rule).
    pub fn with_version(mut self, version: TraefikVersion) -> Self {
        self.version = version;
        self
    }

    /// Preview requests carry header `name: value`.
    pub fn with_preview_header(
        mut self,
        name: impl Into<String>,
        value: impl Into<String>,
    ) -> Self {
        self.preview_match = PreviewMatch::Header {
            name: name.into(),
            value: value.into(),
        };
        self
    }

    fn validate(&self) -> Result<()> {
        for ep in &self.entry_points {
            validate_token("entry point", ep, 63)?;
        }
        if let Some(r) = &self.cert_resolver {
            validate_token("cert resolver", r, 63)?;
        }
        if let Some(n) = &self.network {
            validate_token("docker network", n, 63)?;
        }
        self.preview_match.validate()
    }

    fn base(&self, slot: Slot) -> BTreeMap<String, String> {
        let service = self.name.slot_service(slot);
        let mut l = BTreeMap::new();
        l.insert("traefik.enable".into(), "true".into());
        l.insert(
            format!("traefik.http.services.{service}.loadbalancer.server.port"),
            self.port.to_string(),
        );
        if let Some(n) = &self.network {
            l.insert("traefik.docker.network".into(), n.clone());
        }
        l
    }

    fn router(&self, l: &mut BTreeMap<String, String>, router: &str, rule: String, slot: Slot) {
        let prefix = format!("traefik.http.routers.{router}");
        l.insert(format!("{prefix}.rule"), rule);
        l.insert(format!("{prefix}.service"), self.name.slot_service(slot));
        if !self.entry_points.is_empty() {
            l.insert(format!("{prefix}.entrypoints"), self.entry_points.join(","));
        }
        if let Some(r) = &self.cert_resolver {
            l.insert(format!("{prefix}.tls.certresolver"), r.clone());
        }
    }

    /// Labels of the live slot's container: router `<name>-<slot>` with the rule, its service.
    pub fn live(&self, slot: Slot) -> Result<BTreeMap<String, String>> {
        self.validate()?;
        let mut l = self.base(slot);
        self.router(
            &mut l,
            &self.name.slot_service(slot),
            self.rule.clone(),
            slot,
        );
        Ok(l)
    }

    /// Labels of the idle slot's container: disabled, or — with `preview` — only a preview router
    /// `<name>-<slot>-preview` (the main rule plus the preview match).
    pub fn idle(&self, slot: Slot, preview: bool) -> Result<BTreeMap<String, String>> {
        self.validate()?;
        if !preview {
            let mut l = BTreeMap::new();
            l.insert("traefik.enable".into(), "false".into());
            return Ok(l);
        }
        let mut l = self.base(slot);
        let rule = format!(
            "({}) && {}",
            self.rule,
            self.preview_match.matcher(self.version)
        );
        let router = format!("{}-preview", self.name.slot_service(slot));
        self.router(&mut l, &router, rule, slot);
        Ok(l)
    }

    /// Only the slot's service (`<name>-<slot>` under the Docker provider, i.e.
    /// `<name>-<slot>@docker`), no router: for weighting both containers from the file provider.
    pub fn service_only(&self, slot: Slot) -> Result<BTreeMap<String, String>> {
        self.validate()?;
        Ok(self.base(slot))
    }

    /// Labels of both containers for a whole split (all traffic to one slot), with the other slot
    /// disabled or serving preview requests. Canary splits and sticky sessions between slots are
    /// refused with [`Error::Unsupported`]: labels cannot weight two containers.
    pub fn for_split(
        &self,
        split: &TrafficSplit,
        preview: Option<Slot>,
    ) -> Result<PerSlot<BTreeMap<String, String>>> {
        if !split.is_whole() {
            return Err(Error::unsupported(
                "weighted split with Docker labels (use the file provider)",
                crate::NAME,
            ));
        }
        if split.sticky.is_some() {
            return Err(Error::unsupported(
                "sticky sessions between slots with Docker labels (use the file provider)",
                crate::NAME,
            ));
        }
        let live = split.primary();
        let idle = live.other();
        if preview == Some(live) {
            return Err(Error::invalid(
                "preview slot",
                live.as_str(),
                "preview goes to the idle slot; the live slot already gets all traffic",
            ));
        }
        let mut out = PerSlot::new(BTreeMap::new(), BTreeMap::new());
        out.set(live, self.live(live)?);
        out.set(idle, self.idle(idle, preview == Some(idle))?);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> DockerLabels {
        DockerLabels::new("odoo", "Host(`production.example.com`)", 8069)
            .unwrap()
            .with_entry_points(["websecure"])
            .with_cert_resolver("le")
    }

    #[test]
    fn the_live_slot_carries_the_seeds_router_and_the_idle_slot_is_disabled() {
        let per_slot = labels()
            .for_split(&TrafficSplit::all(Slot::Green), None)
            .unwrap();
        let want: BTreeMap<String, String> = [
            ("traefik.enable", "true"),
            (
                "traefik.http.routers.odoo-green.rule",
                "Host(`production.example.com`)",
            ),
            ("traefik.http.routers.odoo-green.entrypoints", "websecure"),
            ("traefik.http.routers.odoo-green.tls.certresolver", "le"),
            ("traefik.http.routers.odoo-green.service", "odoo-green"),
            (
                "traefik.http.services.odoo-green.loadbalancer.server.port",
                "8069",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(per_slot.green, want);
        assert_eq!(
            per_slot.blue,
            BTreeMap::from([("traefik.enable".to_string(), "false".to_string())])
        );
    }

    #[test]
    fn the_idle_slot_can_serve_only_preview_requests() {
        let per_slot = labels()
            .with_version(TraefikVersion::V2)
            .for_split(&TrafficSplit::all(Slot::Blue), Some(Slot::Green))
            .unwrap();
        assert_eq!(
            per_slot.green["traefik.http.routers.odoo-green-preview.rule"],
            "(Host(`production.example.com`)) && Headers(`X-Bluegreen-Preview`, `1`)"
        );
        assert_eq!(
            per_slot.green["traefik.http.routers.odoo-green-preview.service"],
            "odoo-green"
        );
        assert!(!per_slot
            .green
            .contains_key("traefik.http.routers.odoo-green.rule"));
        assert!(per_slot
            .blue
            .contains_key("traefik.http.routers.odoo-blue.rule"));
        assert!(labels()
            .for_split(&TrafficSplit::all(Slot::Blue), Some(Slot::Blue))
            .is_err());
    }

    #[test]
    fn weights_and_sticky_are_refused_and_names_validated() {
        let l = labels();
        for split in [
            TrafficSplit::canary(Slot::Green, 10).unwrap(),
            TrafficSplit::all(Slot::Green).with_sticky("c"),
        ] {
            assert!(matches!(
                l.for_split(&split, None),
                Err(Error::Unsupported { .. })
            ));
        }
        assert!(DockerLabels::new("a.b", "Host(`x`)", 80).is_err());
        assert!(DockerLabels::new("a", "Host(`{{x}}`)", 80).is_err());
        assert!(DockerLabels::new("a", "Host(`x`)", 0).is_err());
        assert!(l
            .clone()
            .with_entry_points(["a,b"])
            .live(Slot::Blue)
            .is_err());
        assert!(l.clone().with_network("net work").live(Slot::Blue).is_err());
        assert_eq!(
            l.service_only(Slot::Blue)
                .unwrap()
                .keys()
                .collect::<Vec<_>>(),
            vec![
                "traefik.enable",
                "traefik.http.services.odoo-blue.loadbalancer.server.port"
            ]
        );
    }
}
