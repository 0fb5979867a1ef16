//! `bluegreen-demo`: the demo web app, configured by environment variables (see the library docs).

use std::process::ExitCode;

use bluegreen_demo::{serve, DemoConfig};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--stop-after-init") {
        // Stands in for `odoo -u <modules> --stop-after-init`: a migration run in the target.
        let modules = args
            .iter()
            .position(|a| a == "-u")
            .and_then(|i| args.get(i + 1))
            .map(String::as_str)
            .unwrap_or("base");
        let version = std::env::var("BLUEGREEN_VERSION").unwrap_or_else(|_| "dev".into());
        println!("bluegreen-demo version={version}: updated modules {modules} (stop after init)");
        return ExitCode::SUCCESS;
    }
    if let Some(unknown) = args.first() {
        eprintln!(
            "bluegreen-demo: unknown argument {unknown:?} (settings come from the environment)"
        );
        return ExitCode::from(2);
    }
    let config = match DemoConfig::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bluegreen-demo: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(code) = config.exit_code {
        eprintln!(
            "bluegreen-demo version={} slot={}: exiting with code {code} (DEMO_EXIT_CODE)",
            config.version, config.slot
        );
        std::process::exit(code);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bluegreen-demo: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(config))
}

async fn run(config: DemoConfig) -> ExitCode {
    let who = format!(
        "bluegreen-demo version={} slot={}",
        config.version, config.slot
    );
    // Signals are caught from the start, so a SIGTERM during the start delay is a clean exit too.
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("{who}: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let ignore_sigterm = config.ignore_sigterm;
    let who_ignoring = who.clone();
    let stop = async move {
        loop {
            tokio::select! {
                _ = term.recv() => {
                    if !ignore_sigterm {
                        return "SIGTERM";
                    }
                    println!("{who_ignoring} ignoring SIGTERM (DEMO_IGNORE_SIGTERM)");
                }
                _ = int.recv() => return "SIGINT",
            }
        }
    };
    let mut stop = std::pin::pin!(stop);

    if !config.start_delay.is_zero() {
        tokio::select! {
            () = tokio::time::sleep(config.start_delay) => {}
            sig = &mut stop => {
                println!("{who} stopped ({sig} during start delay)");
                return ExitCode::SUCCESS;
            }
        }
    }

    let listener = match TcpListener::bind((config.host.as_str(), config.port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "{who}: cannot listen on {}:{}: {e}",
                config.host, config.port
            );
            return ExitCode::FAILURE;
        }
    };
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| format!("{}:{}", config.host, config.port));
    println!("{who} listening on {addr} (pid {})", std::process::id());

    let (tx, rx) = tokio::sync::oneshot::channel();
    let shutdown = async move {
        let sig = stop.await;
        let _ = tx.send(sig);
    };
    match serve(listener, config, shutdown).await {
        Ok(()) => {
            let sig = rx.await.unwrap_or("shutdown");
            println!("{who} stopped ({sig})");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{who}: {e}");
            ExitCode::FAILURE
        }
    }
}
