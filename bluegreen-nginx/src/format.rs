//! The text form of a routing (split + endpoints) that both modes write and read back: the body of
//! the Dynamic control listener and the header of the Reload include.
//!
//! ```text
//! bluegreen-split 1
//! weights 90 10
//! sticky -
//! blue 127.0.0.1:8080 127.0.0.1:8081
//! green 127.0.0.1:9090
//! ```
//!
//! The grammar is strict on both sides (Rust and the Lua control location): exactly these five
//! lines, single spaces, nothing else.

use bluegreen_core::{Endpoint, Endpoints, Error, Slot, TrafficSplit};

/// The first line, with the format version.
pub(crate) const MAGIC: &str = "bluegreen-split 1";

/// Most peers per slot (bounds the control body and the include).
pub const MAX_PEERS_PER_SLOT: usize = 32;

/// A split with the endpoints it routes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routing {
    /// Weights (and sticky option).
    pub split: TrafficSplit,
    /// The peers of each slot.
    pub endpoints: Endpoints,
}

/// Validates a sticky cookie name: 1 to 64 of `[A-Za-z0-9_-]`, starting alphanumeric.
pub(crate) fn validate_cookie(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "sticky cookie name",
            name,
            "expected 1 to 64 of letters, digits, `_`, `-`, starting with a letter or digit",
        ))
    }
}

/// Validates the endpoints a switch is about to route to (beyond core's `Endpoint::validate`).
pub(crate) fn validate_endpoints(
    endpoints: &Endpoints,
    ipv4_only: bool,
    mode: &str,
) -> Result<(), Error> {
    for slot in Slot::ALL {
        let list = endpoints.get(slot);
        if list.len() > MAX_PEERS_PER_SLOT {
            return Err(Error::invalid(
                "endpoints",
                format!("{} endpoints for {slot}", list.len()),
                format!("at most {MAX_PEERS_PER_SLOT} per slot"),
            ));
        }
        for e in list {
            e.validate()?;
            if e.scheme != "http" {
                return Err(Error::invalid(
                    "endpoint scheme",
                    e.to_string(),
                    "the scheme toward the upstream is set by the proxy_pass in your nginx location; give http endpoints",
                ));
            }
            if ipv4_only && e.host.parse::<std::net::Ipv4Addr>().is_err() {
                return Err(Error::invalid(
                    "endpoint host",
                    &e.host,
                    format!("the {mode} mode's Lua balancer takes IPv4 addresses only: resolve the name first"),
                ));
            }
        }
    }
    Ok(())
}

/// The five lines, each ending with `\n`.
pub(crate) fn render(split: &TrafficSplit, endpoints: &Endpoints) -> String {
    let mut out = String::new();
    out.push_str(MAGIC);
    out.push('\n');
    out.push_str(&format!(
        "weights {} {}\n",
        split.weight(Slot::Blue),
        split.weight(Slot::Green)
    ));
    match &split.sticky {
        Some(s) => out.push_str(&format!("sticky {}\n", s.cookie)),
        None => out.push_str("sticky -\n"),
    }
    for slot in Slot::ALL {
        out.push_str(slot.as_str());
        for e in endpoints.get(slot) {
            out.push(' ');
            out.push_str(&e.authority());
        }
        out.push('\n');
    }
    out
}

fn bad(reason: impl Into<String>) -> String {
    reason.into()
}

fn digits(s: &str, max_len: usize) -> Option<u32> {
    if s.is_empty() || s.len() > max_len || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn parse_peers(rest: &str, slot: Slot) -> Result<Vec<Endpoint>, String> {
    let mut out = Vec::new();
    if rest.is_empty() {
        return Ok(out);
    }
    let Some(rest) = rest.strip_prefix(' ') else {
        return Err(bad(format!("line `{slot}` must list peers after a space")));
    };
    for peer in rest.split(' ') {
        let (host, port) = peer
            .rsplit_once(':')
            .ok_or_else(|| bad(format!("peer {peer:?} is not host:port")))?;
        let port = digits(port, 5)
            .filter(|p| (1..=65535).contains(p))
            .ok_or_else(|| bad(format!("peer {peer:?} has an invalid port")))?;
        let host = match host.strip_prefix('[') {
            Some(h) => h
                .strip_suffix(']')
                .ok_or_else(|| bad(format!("peer {peer:?} has an unclosed `[`")))?,
            None => host,
        };
        let e = Endpoint::new(host, port as u16);
        e.validate().map_err(|err| bad(err.to_string()))?;
        if e.authority() != peer {
            return Err(bad(format!("peer {peer:?} is not written canonically")));
        }
        out.push(e);
    }
    if out.len() > MAX_PEERS_PER_SLOT {
        return Err(bad(format!(
            "more than {MAX_PEERS_PER_SLOT} peers for {slot}"
        )));
    }
    Ok(out)
}

/// Parses the five lines back. The error is a reason for [`crate::NginxError::Unparseable`].
pub(crate) fn parse(text: &str) -> Result<Routing, String> {
    if !text.ends_with('\n') {
        return Err(bad("it does not end with a newline"));
    }
    let lines: Vec<&str> = text[..text.len() - 1].split('\n').collect();
    if lines.len() != 5 {
        return Err(bad(format!("expected 5 lines, found {}", lines.len())));
    }
    if lines[0] != MAGIC {
        return Err(bad(format!("line 1 must be {MAGIC:?}")));
    }
    let (b, g) = lines[1]
        .strip_prefix("weights ")
        .and_then(|r| r.split_once(' '))
        .ok_or_else(|| bad("line 2 must be `weights <blue> <green>`"))?;
    let (b, g) = match (digits(b, 3), digits(g, 3)) {
        (Some(b), Some(g)) if b <= 100 && g <= 100 => (b as u8, g as u8),
        _ => return Err(bad("weights must be numbers from 0 to 100")),
    };
    let mut split = TrafficSplit::new(b, g).map_err(|e| e.to_string())?;
    let sticky = lines[2]
        .strip_prefix("sticky ")
        .ok_or_else(|| bad("line 3 must be `sticky -` or `sticky <cookie>`"))?;
    if sticky != "-" {
        validate_cookie(sticky).map_err(|e| e.to_string())?;
        split = split.with_sticky(sticky);
    }
    let blue = lines[3]
        .strip_prefix("blue")
        .ok_or_else(|| bad("line 4 must start with `blue`"))?;
    let green = lines[4]
        .strip_prefix("green")
        .ok_or_else(|| bad("line 5 must start with `green`"))?;
    let endpoints = Endpoints::new(
        parse_peers(blue, Slot::Blue)?,
        parse_peers(green, Slot::Green)?,
    );
    for slot in Slot::ALL {
        if split.weight(slot) > 0 && endpoints.get(slot).is_empty() {
            return Err(bad(format!("slot {slot} has weight but no peers")));
        }
    }
    Ok(Routing { split, endpoints })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps() -> Endpoints {
        Endpoints::new(
            vec![
                Endpoint::new("127.0.0.1", 8080),
                Endpoint::new("127.0.0.1", 8081),
            ],
            vec![Endpoint::new("::1", 9090)],
        )
    }

    #[test]
    fn render_then_parse_round_trips() {
        let split = TrafficSplit::canary(Slot::Green, 10)
            .unwrap()
            .with_sticky("bg_slot");
        let text = render(&split, &eps());
        assert_eq!(
            text,
            "bluegreen-split 1\nweights 90 10\nsticky bg_slot\nblue 127.0.0.1:8080 127.0.0.1:8081\ngreen [::1]:9090\n"
        );
        let back = parse(&text).unwrap();
        assert_eq!(back.split, split);
        assert_eq!(back.endpoints, eps());
    }

    #[test]
    fn parse_refuses_anything_not_written_by_render() {
        let good = render(&TrafficSplit::all(Slot::Blue), &eps());
        assert!(parse(&good).is_ok());
        for bad in [
            good.replace("weights 100 0", "weights 100 1"),
            good.replace("weights 100 0", "weights +100 0"),
            good.replace("weights 100 0", "weights  100 0"),
            good.replace("sticky -", "sticky a;b"),
            good.replace("blue 127", "blue  127"),
            good.replace("127.0.0.1:8080", "127.0.0.1:0"),
            good.replace("127.0.0.1:8080", "evil;host:80"),
            good.replace("127.0.0.1:8080", "127.0.0.1"),
            good.replace("bluegreen-split 1", "bluegreen-split 2"),
            good.trim_end().to_string(),
            format!("{good}extra\n"),
            "weights 0 100\nblue\ngreen\n".to_string(),
            good.replace("blue 127.0.0.1:8080 127.0.0.1:8081", "blue"),
        ] {
            assert!(parse(&bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn cookie_names_are_strict() {
        assert!(validate_cookie("bg_slot").is_ok());
        for bad in ["", "a b", "a;b", "a=b", "_a", &"x".repeat(65)] {
            assert!(validate_cookie(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn endpoint_validation_per_mode() {
        assert!(validate_endpoints(&eps(), false, "Reload").is_ok());
        let err = validate_endpoints(&eps(), true, "Dynamic").unwrap_err();
        assert!(err.to_string().contains("IPv4"), "{err}");
        let mut https = eps();
        https.blue[0].scheme = "https".into();
        assert!(validate_endpoints(&https, false, "Reload").is_err());
    }
}
