//! The routing file: what the proxy last applied, kept across restarts.
//!
//! A restarted proxy must serve as it did before, not as some other record says: slot records
//! lag behind a deployment in flight (they get the target's endpoints only when it completes), so
//! the proxy keeps its own. The file is written before a new table takes effect; a reader never
//! sees a partial file (see [`bluegreen_core::store::write_atomic`]).

use std::path::Path;

use bluegreen_core::store::{read_optional, write_atomic};
use bluegreen_core::{Endpoint, Endpoints, Error, PerSlot, Result, Slot, TrafficSplit};
use serde::{Deserialize, Serialize};

use crate::routing::{Preview, Table, Upstream};

/// The file's format version; a newer one is refused.
const FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Routing {
    format: u32,
    split: Option<TrafficSplit>,
    endpoints: Endpoints,
    #[serde(default)]
    preview: Option<PreviewRouting>,
}

#[derive(Serialize, Deserialize)]
struct PreviewRouting {
    slot: Slot,
    endpoints: Vec<Endpoint>,
}

/// Writes `table` to `path`.
pub(crate) fn save(path: &Path, table: &Table) -> Result<()> {
    let routing = Routing {
        format: FORMAT,
        split: table.split.clone(),
        endpoints: table.endpoints.clone(),
        preview: table.preview.as_ref().map(|p| PreviewRouting {
            slot: p.slot,
            endpoints: p.upstreams.iter().map(|u| u.endpoint.clone()).collect(),
        }),
    };
    let bytes = serde_json::to_vec_pretty(&routing).expect("serializable");
    write_atomic(path, &bytes)
}

/// The table kept in `path`, `None` when there is no file.
///
/// # Errors
/// [`Error::CorruptState`] for a file that does not parse, has a newer format or names invalid
/// endpoints: it is left alone, for a person to look at.
pub(crate) fn load(path: &Path) -> Result<Option<Table>> {
    let Some(bytes) = read_optional(path)? else {
        return Ok(None);
    };
    let corrupt = |reason: String| Error::CorruptState {
        location: path.display().to_string(),
        reason,
    };
    let r: Routing = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
    if r.format > FORMAT {
        return Err(corrupt(format!(
            "format {} is newer than this proxy's {FORMAT}",
            r.format
        )));
    }
    let upstreams = |eps: &[Endpoint]| Upstream::all(eps).map_err(|e| corrupt(e.to_string()));
    let preview = match &r.preview {
        Some(p) => Some(Preview {
            slot: p.slot,
            upstreams: upstreams(&p.endpoints)?,
        }),
        None => None,
    };
    Ok(Some(Table {
        split: r.split,
        upstreams: PerSlot::new(
            upstreams(&r.endpoints.blue)?,
            upstreams(&r.endpoints.green)?,
        ),
        endpoints: r.endpoints,
        preview,
    }))
}
