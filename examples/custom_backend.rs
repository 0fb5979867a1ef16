//! Writing your own backend: a `TrafficSwitch` for a proxy that reads its routing from a JSON file
//! (many do: Envoy's file-based xDS, Caddy's JSON config, a sidecar watching a file), in well under
//! 100 lines, proven by the same conformance suite every bundled switch passes.
//!
//! ```text
//! cargo run --example custom_backend
//! ```

use std::path::PathBuf;

use async_trait::async_trait;
use bluegreen::{
    Capabilities, Endpoint, Endpoints, Error, Result, TrafficSplit, TrafficSwitch, TrafficSwitchExt,
};

// --- the backend: about 50 lines-------------------------------------------------------------

/// Routes by writing `{"split": …, "endpoints": …}` to a file the proxy watches.
#[derive(Debug, Clone)]
struct FileSwitch {
    path: PathBuf,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Routing {
    split: TrafficSplit,
    endpoints: Endpoints,
}

#[async_trait]
impl TrafficSwitch for FileSwitch {
    fn name(&self) -> &str {
        "file-switch"
    }

    fn capabilities(&self) -> Capabilities {
        // Weights yes; sticky sessions, preview, pause, drain and metrics are not offered, so
        // the engine refuses plans that need them and the default methods answer Unsupported.
        Capabilities::basic().with_weights(true)
    }

    async fn apply(&self, split: &TrafficSplit, endpoints: &Endpoints) -> Result<()> {
        // Validate first (capabilities, endpoints, hostile host names): nothing changes on error.
        self.check_split(split, endpoints)?;
        let body = serde_json::to_vec_pretty(&Routing {
            split: split.clone(),
            endpoints: endpoints.clone(),
        })
        .map_err(|e| Error::backend(self.name(), "apply", false, e))?;
        // Atomic from the proxy's point of view: write a temporary file, then rename over.
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, body)
            .and_then(|_| std::fs::rename(&tmp, &self.path))
            .map_err(|e| Error::io(format!("writing {}", self.path.display()), e))
    }

    async fn current(&self) -> Result<Option<TrafficSplit>> {
        // Read the proxy's configuration back, never a remembered value.
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice::<Routing>(&bytes)
                .map(|r| Some(r.split))
                .map_err(|e| Error::backend(self.name(), "current", false, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", self.path.display()), e)),
        }
    }
}

// --- proving it -----------------------------------------------------------------------------

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let dir = std::env::temp_dir().join(format!("bluegreen-custom-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let switch = FileSwitch {
        path: dir.join("routing.json"),
    };
    let endpoints = Endpoints::new(
        vec![Endpoint::new("127.0.0.1", 9001)],
        vec![Endpoint::new("127.0.0.1", 9002)],
    );
    let mut suite = bluegreen_core::testkit::SwitchSuite::new(endpoints);
    // A fresh handle on the same file proves `current` reads the proxy's config back.
    let path = switch.path.clone();
    suite.reopen = Some(std::sync::Arc::new(move || {
        let fresh: Box<dyn TrafficSwitch> = Box::new(FileSwitch { path: path.clone() });
        Box::pin(async move { fresh })
    }));
    // Slots of several endpoints (replicas): the suite routes 3 blue and 2 green, shrinks and
    // grows a slot, and reads the split back each time.
    let at = |port| Endpoint::new("127.0.0.1", port);
    suite.several = Some(Endpoints::new(
        vec![at(9001), at(9003), at(9005)],
        vec![at(9002), at(9004)],
    ));
    // A file routes no requests: the suite has no `served_by` / `answered_by`, and says so for
    // its data-path checks (on stderr and in the report).
    let report = bluegreen_core::testkit::switch_suite(&switch, &suite).await;
    assert!(report.has_run("switch_routes_a_slot_to_several_endpoints"));
    println!("FileSwitch passes the switch conformance suite: {report}");
    println!(
        "current routing: {}",
        std::fs::read_to_string(&switch.path).expect("routing file")
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
}
