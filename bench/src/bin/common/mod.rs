//! Shared by the switch benchmarks (`nginx_switch`, `haproxy_switch`): command-line options and
//! the slot each switch goes to. Servers, demo backends and load come from `bluegreen-testenv`.

use std::time::Duration;

use bluegreen_core::{Endpoints, Slot, TrafficSplit, TrafficSwitch};

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

/// Switches `o.switches` times (green, blue, …), `o.pause` apart; the latency of each `apply`.
pub(crate) async fn switch_repeatedly(
    switch: &dyn TrafficSwitch,
    endpoints: &Endpoints,
    o: Options,
) -> Result<Vec<Duration>> {
    let mut latencies = Vec::new();
    for i in 0..o.switches {
        let t = std::time::Instant::now();
        switch
            .apply(&TrafficSplit::all(target(i)), endpoints)
            .await?;
        latencies.push(t.elapsed());
        tokio::time::sleep(o.pause).await;
    }
    Ok(latencies)
}
