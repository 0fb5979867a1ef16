//! The routing table and how a request picks its slot and endpoint.
//!
//! The table is immutable: a change builds a new one and swaps it in (`ArcSwap`), so the request
//! path only loads a pointer, and a request keeps the table (and slot) it started with.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bluegreen_core::{Endpoint, Endpoints, Error, PerSlot, Result, Slot, TrafficSplit};
use hyper::header::{HeaderMap, HeaderValue, COOKIE};
use hyper::http::uri::{Authority, Scheme};

use crate::pool::{HostPool, Pools};

/// One upstream address, pre-parsed for building request URIs, with its connection pool.
#[derive(Debug, Clone)]
pub(crate) struct Upstream {
    pub(crate) endpoint: Endpoint,
    pub(crate) scheme: Scheme,
    pub(crate) authority: Authority,
    /// The endpoint's idle keep-alive connections (shared by every table naming it once
    /// installed through [`Table::attach_pools`]).
    pub(crate) pool: Arc<HostPool>,
}

/// Two upstreams are the same address; their pools do not matter.
impl PartialEq for Upstream {
    fn eq(&self, other: &Self) -> bool {
        self.endpoint == other.endpoint
    }
}

impl Eq for Upstream {}

impl Upstream {
    fn new(endpoint: &Endpoint) -> Result<Self> {
        endpoint.validate()?;
        if endpoint.scheme != "http" {
            return Err(Error::unsupported("https upstreams", crate::NAME));
        }
        let authority = endpoint
            .authority()
            .parse::<Authority>()
            .map_err(|e| Error::invalid("endpoint", endpoint.to_string(), e.to_string()))?;
        Ok(Upstream {
            endpoint: endpoint.clone(),
            scheme: Scheme::HTTP,
            authority,
            pool: HostPool::new(&endpoint.host, endpoint.port),
        })
    }

    pub(crate) fn all(endpoints: &[Endpoint]) -> Result<Vec<Upstream>> {
        endpoints.iter().map(Upstream::new).collect()
    }
}

/// Where preview traffic goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Preview {
    pub(crate) slot: Slot,
    pub(crate) upstreams: Vec<Upstream>,
}

/// The complete routing state, replaced as a whole on every change.
#[derive(Debug, Clone, Default)]
pub(crate) struct Table {
    /// `None` until the first `apply`.
    pub(crate) split: Option<TrafficSplit>,
    pub(crate) upstreams: PerSlot<Vec<Upstream>>,
    pub(crate) endpoints: Endpoints,
    pub(crate) preview: Option<Preview>,
}

/// What a request was routed to.
pub(crate) struct Route<'t> {
    pub(crate) slot: Slot,
    pub(crate) upstreams: &'t [Upstream],
    /// A sticky cookie to set on the response (`name=slot`), when the pick was new.
    pub(crate) set_cookie: Option<HeaderValue>,
}

/// The per-request knobs that come from the proxy config.
pub(crate) struct Names<'a> {
    pub(crate) preview_header: &'a str,
    pub(crate) preview_cookie: &'a str,
    pub(crate) sticky_cookie: &'a str,
}

impl Table {
    /// Gives every upstream of this table the pool that the endpoint already has, if a table
    /// in use holds one, so warm connections survive a change of the table.
    pub(crate) fn attach_pools(&mut self, pools: &Pools) {
        let preview = self.preview.iter_mut().flat_map(|p| p.upstreams.iter_mut());
        for up in self
            .upstreams
            .blue
            .iter_mut()
            .chain(self.upstreams.green.iter_mut())
            .chain(preview)
        {
            up.pool = pools.attach(&up.pool);
        }
    }

    /// Picks the slot for a request with these headers; `None` when nothing is routable.
    pub(crate) fn route<'t>(&'t self, headers: &HeaderMap, names: &Names<'_>) -> Option<Route<'t>> {
        if let Some(p) = &self.preview {
            if wants_preview(headers, names) {
                return Some(Route {
                    slot: p.slot,
                    upstreams: &p.upstreams,
                    set_cookie: None,
                });
            }
        }
        let split = self.split.as_ref()?;
        let routable = |slot: Slot| split.weight(slot) > 0 && !self.upstreams.get(slot).is_empty();
        let mut set_cookie = None;
        let slot = match &split.sticky {
            Some(sticky) => {
                let name = if sticky.cookie.is_empty() {
                    names.sticky_cookie
                } else {
                    sticky.cookie.as_str()
                };
                match cookie(headers, name).and_then(|v| v.parse::<Slot>().ok()) {
                    Some(slot) if routable(slot) => slot,
                    _ => {
                        let slot = weighted_pick(split);
                        set_cookie = sticky_cookie(name, slot);
                        slot
                    }
                }
            }
            None => weighted_pick(split),
        };
        if !routable(slot) {
            return None;
        }
        Some(Route {
            slot,
            upstreams: self.upstreams.get(slot),
            set_cookie,
        })
    }
}

fn sticky_cookie(name: &str, slot: Slot) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!("{name}={slot}; Path=/; HttpOnly; SameSite=Lax")).ok()
}

fn truthy(v: &str) -> bool {
    !matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "" | "0" | "false" | "no" | "off"
    )
}

fn wants_preview(headers: &HeaderMap, names: &Names<'_>) -> bool {
    if let Some(v) = headers.get(names.preview_header) {
        return v.to_str().map(truthy).unwrap_or(true);
    }
    cookie(headers, names.preview_cookie).is_some_and(truthy)
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub(crate) fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim().trim_matches('"'))
}

/// A slot drawn at random by the split's weights.
fn weighted_pick(split: &TrafficSplit) -> Slot {
    let blue = split.weight(Slot::Blue);
    if blue >= 100 {
        return Slot::Blue;
    }
    if blue == 0 {
        return Slot::Green;
    }
    if random() % 100 < u64::from(blue) {
        Slot::Blue
    } else {
        Slot::Green
    }
}

/// A fast lock-free pseudo-random number (splitmix64 over a shared Weyl sequence). Good enough
/// to spread requests by weight; not for anything secret.
fn random() -> u64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    static SEEDED: AtomicUsize = AtomicUsize::new(0);
    if SEEDED.load(Ordering::Relaxed) == 0 && SEEDED.swap(1, Ordering::Relaxed) == 0 {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x853c_49e6_748f_ea9b);
        STATE.fetch_add(seed, Ordering::Relaxed);
    }
    let mut z = STATE
        .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
        .wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Round-robin positions, one per slot.
#[derive(Default)]
pub(crate) struct RoundRobin {
    blue: AtomicUsize,
    green: AtomicUsize,
}

impl RoundRobin {
    /// The index of the next endpoint of `slot` among `len`.
    pub(crate) fn next(&self, slot: Slot, len: usize) -> usize {
        let c = match slot {
            Slot::Blue => &self.blue,
            Slot::Green => &self.green,
        };
        c.fetch_add(1, Ordering::Relaxed) % len.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bluegreen_core::Sticky;

    const NAMES: Names<'static> = Names {
        preview_header: "x-bluegreen-preview",
        preview_cookie: "bluegreen_preview",
        sticky_cookie: "bluegreen_slot",
    };

    fn table(split: TrafficSplit) -> Table {
        let e = PerSlot::new(
            vec![Endpoint::new("127.0.0.1", 1)],
            vec![Endpoint::new("127.0.0.1", 2)],
        );
        Table {
            split: Some(split),
            upstreams: PerSlot::new(
                Upstream::all(&e.blue).unwrap(),
                Upstream::all(&e.green).unwrap(),
            ),
            endpoints: e,
            preview: None,
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn cookies_are_found_among_several_headers() {
        let h = headers(&[("cookie", "a=1; b=2"), ("cookie", "bluegreen_slot=green")]);
        assert_eq!(cookie(&h, "b"), Some("2"));
        assert_eq!(cookie(&h, "bluegreen_slot"), Some("green"));
        assert_eq!(cookie(&h, "c"), None);
    }

    #[test]
    fn sticky_cookie_is_kept_only_for_a_slot_with_weight() {
        let mut split = TrafficSplit::new(50, 50).unwrap();
        split.sticky = Some(Sticky {
            cookie: String::new(),
        });
        let t = table(split.clone());
        let h = headers(&[("cookie", "bluegreen_slot=green")]);
        for _ in 0..50 {
            let r = t.route(&h, &NAMES).unwrap();
            assert_eq!(r.slot, Slot::Green);
            assert!(r.set_cookie.is_none());
        }
        let mut all_blue = TrafficSplit::all(Slot::Blue);
        all_blue.sticky = split.sticky.clone();
        let t = table(all_blue);
        let r = t.route(&h, &NAMES).unwrap();
        assert_eq!(r.slot, Slot::Blue);
        let c = r.set_cookie.unwrap();
        assert!(c.to_str().unwrap().starts_with("bluegreen_slot=blue;"));
    }

    #[test]
    fn preview_header_values_can_turn_it_off() {
        let h = headers(&[("x-bluegreen-preview", "1")]);
        assert!(wants_preview(&h, &NAMES));
        let h = headers(&[("x-bluegreen-preview", "false")]);
        assert!(!wants_preview(&h, &NAMES));
        let h = headers(&[("cookie", "bluegreen_preview=yes")]);
        assert!(wants_preview(&h, &NAMES));
        assert!(!wants_preview(&HeaderMap::new(), &NAMES));
    }

    #[test]
    fn weights_are_followed_roughly() {
        let split = TrafficSplit::canary(Slot::Green, 25).unwrap();
        let green = (0..10_000)
            .filter(|_| weighted_pick(&split) == Slot::Green)
            .count();
        assert!((2_000..3_000).contains(&green), "{green}");
    }
}
