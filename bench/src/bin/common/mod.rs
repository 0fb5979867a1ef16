//! Shared by the switch benchmarks (`nginx_switch`, `haproxy_switch`): command-line options and
//! the slot each switch goes to. Servers, demo backends and load come from `bluegreen-testenv`.

use std::time::Duration;

use bluegreen_core::Slot;

/// Result of the benchmarks' `main`.
pub(crate) type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Load and switching settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Options {
    /// Concurrent keep-alive clients.
    pub(crate) clients: usize,
    /// Switches per scenario.
    pub(crate) switches: usize,
    /// Pause between two switches.
    pub(crate) pause: Duration,
}

/// Parses `[--clients N] [--switches K] [--pause-ms MS]` for the benchmark `bin`.
pub(crate) fn parse_args(bin: &str) -> Result<Options> {
    let mut o = Options {
        clients: 16,
        switches: 50,
        pause: Duration::from_millis(150),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| -> Result<u64> {
            let v = args.next().ok_or(format!("{name} needs a value"))?;
            Ok(v.parse::<u64>().map_err(|e| format!("{name} {v}: {e}"))?)
        };
        match a.as_str() {
            "--clients" => o.clients = value("--clients")?.max(1) as usize,
            "--switches" => o.switches = value("--switches")?.max(1) as usize,
            "--pause-ms" => o.pause = Duration::from_millis(value("--pause-ms")?),
            "-h" | "--help" => {
                println!("usage: {bin} [--clients N] [--switches K] [--pause-ms MS]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(o)
}

/// The slot switch number `i` goes to: green, blue, green, …
pub(crate) fn target(i: usize) -> Slot {
    if i.is_multiple_of(2) {
        Slot::Green
    } else {
        Slot::Blue
    }
}
