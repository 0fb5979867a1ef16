//! What can go wrong with the Docker Engine; converted into [`bluegreen_core::Error`] at the
//! boundary, where retryability is decided.

use bluegreen_core::{Error, Slot};

/// The address the default connection uses, for error messages.
pub(crate) fn docker_host_for_messages() -> String {
    std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".to_string())
}

/// A failure of the Docker environment.
///
/// It reaches callers as the source of an [`Error::Backend`] (backend `docker`); downcast the
/// source to match on it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DockerError {
    /// The Docker Engine could not be reached (or did not answer the version handshake).
    #[error(
        "cannot reach the Docker Engine at {host}: {}; is the daemon running, and is \
         DOCKER_HOST (or the socket path) right? (for TLS: do the CA and the client \
         certificate match the engine's?)",
        with_causes(.source)
    )]
    Unreachable {
        /// The address tried (`DOCKER_HOST`, or the default socket).
        host: String,
        /// The client's error.
        #[source]
        source: bollard::errors::Error,
    },

    /// A TLS file of a fleet host cannot be read.
    #[error(
        "host {host}: cannot read the {what} {path} for the engine's TLS connection: {source}; \
         check the host's tls settings"
    )]
    TlsFile {
        /// The host's name.
        host: String,
        /// `CA certificate`, `client certificate` or `client key`.
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// Why it cannot be read.
        #[source]
        source: std::io::Error,
    },

    /// The Engine answered a call with an error.
    #[error("Docker Engine call `{call}` failed: {source}")]
    Engine {
        /// What was asked (`create container app-blue`, `start container app-blue`, …).
        call: String,
        /// The client's error (for an Engine answer: its status code and message).
        #[source]
        source: bollard::errors::Error,
    },

    /// The release's image is not on the engine, and the pull policy forbids pulling it (or the
    /// pull failed).
    #[error(
        "image `{image}` is not on the Docker Engine (pull policy {policy}){detail}; build or \
         load it there (`docker build -t {image} …` / `docker load`), or allow pulling from a \
         registry that has it"
    )]
    ImageMissing {
        /// The image reference (the release's artifact).
        image: String,
        /// The pull policy in force.
        policy: &'static str,
        /// What the pull said, formatted for the message (may be empty).
        detail: String,
    },

    /// Pull policy `always`: the pull failed, and a local copy is not used in its place.
    #[error(
        "pulling image `{image}` failed (pull policy always{local}): {message}; check the \
         registry and its credentials, or use pull policy if-missing to run the local copy"
    )]
    PullFailed {
        /// The image reference.
        image: String,
        /// `, a local copy exists` when the engine has one (formatted for the message).
        local: String,
        /// What the engine said.
        message: String,
    },

    /// A container (or network) we did not create holds the name we need.
    #[error(
        "a container named `{name}` exists but was not created by bluegreen for project \
         `{project}` slot {slot} (its labels say {found}); it was left untouched: rename or \
         remove it yourself, or choose another project name"
    )]
    NameClash {
        /// The contested name.
        name: String,
        /// Our project.
        project: String,
        /// The slot that needs the name.
        slot: Slot,
        /// What its labels say about its owner.
        found: String,
    },

    /// The network we need exists with a driver we cannot use.
    #[error(
        "network `{name}` exists with driver `{driver}`; bluegreen needs a bridge network: {hint}"
    )]
    NetworkUnusable {
        /// The network.
        name: String,
        /// Its driver.
        driver: String,
        /// What to do.
        hint: &'static str,
    },

    /// The container stopped right after it started.
    #[error(
        "container `{name}` (image `{image}`) in slot {slot} exited right after it started \
         ({how}); last log lines:\n{log_tail}"
    )]
    ExitedAtStart {
        /// The container.
        name: String,
        /// The image.
        image: String,
        /// The slot.
        slot: Slot,
        /// How it ended (`exit code 3`, `restarting after exit code 3`).
        how: String,
        /// The last lines of its log.
        log_tail: String,
    },

    /// The container runs but its port is not published as expected.
    #[error(
        "container `{name}` runs but port {port}/tcp is not published on the host; the image or \
         another tool changed its port bindings"
    )]
    NoPublishedPort {
        /// The container.
        name: String,
        /// The container port.
        port: u16,
    },

    /// `exec` on a slot without a running container.
    #[error(
        "slot {slot} has no running container; deploy a release before running commands in it"
    )]
    NotRunning {
        /// The slot.
        slot: Slot,
    },

    /// The engine a [`SwarmEnvironment`](crate::SwarmEnvironment) talks to is not a manager of a
    /// swarm.
    #[error(
        "the Docker Engine at {host} is not a swarm manager (swarm state: {state}); connect to a \
         manager node (`docker node ls` works there), or create a swarm with `docker swarm init`"
    )]
    NotSwarmManager {
        /// The engine's address.
        host: String,
        /// Its swarm state (`inactive`, `active` for a worker, …).
        state: String,
    },

    /// A task of a slot's service failed, or was rejected by its node.
    #[error("service `{service}`: the task on node {node} {state}: {message}; {hint}")]
    TaskFailed {
        /// The service.
        service: String,
        /// The node, named as `name (address)`.
        node: String,
        /// What happened (`was rejected`, `failed`, `exited`).
        state: String,
        /// Docker's message (the task's error).
        message: String,
        /// What to do.
        hint: String,
    },

    /// The swarm has fewer usable nodes than the slot needs replicas (one per node).
    #[error(
        "service `{service}` needs {replicas} replicas, one per node, but the swarm has {nodes} \
         ready and active node(s); add nodes, make them active (`docker node update \
         --availability active`), or lower replicas"
    )]
    TooFewNodes {
        /// The service.
        service: String,
        /// Replicas wanted.
        replicas: u32,
        /// Nodes ready and active.
        nodes: usize,
    },

    /// The service's tasks did not all run (and pass their health check) in time.
    #[error(
        "service `{service}`: {running} of {replicas} tasks running and healthy after {after:?} \
         ({detail}); raise ready_timeout if the release starts slowly, or see `docker service ps \
         {service} --no-trunc`"
    )]
    NotConverged {
        /// The service.
        service: String,
        /// Tasks running.
        running: usize,
        /// Replicas wanted.
        replicas: u32,
        /// The bound.
        after: std::time::Duration,
        /// Each node's task state.
        detail: String,
    },

    /// A deploy failed, and removing the service it created failed too.
    #[error(
        "{failure}; removing the service `{service}` this deploy created failed too: {cleanup}; \
         remove it with `docker service rm {service}`"
    )]
    ServiceLeft {
        /// The service left behind.
        service: String,
        /// Why the deploy failed.
        failure: Box<DockerError>,
        /// Why the removal failed.
        cleanup: Box<DockerError>,
    },

    /// A service's tasks did not go away in time after it was removed or scaled down.
    #[error("service `{service}`: {left} task(s) still {what} after {after:?}")]
    TasksRemain {
        /// The service.
        service: String,
        /// How many.
        left: usize,
        /// `running` or `present`.
        what: &'static str,
        /// The bound.
        after: std::time::Duration,
    },

    /// `exec` did not finish in time (the command may still run inside the container).
    #[error("`{program}` in slot {slot} did not finish within {after:?}")]
    ExecTimeout {
        /// The command's program.
        program: String,
        /// The slot.
        slot: Slot,
        /// The bound.
        after: std::time::Duration,
    },
}

impl DockerError {
    /// An Engine call failure; an unreachable engine is reported as such.
    #[cfg(test)]
    pub(crate) fn engine(call: impl Into<String>, source: bollard::errors::Error) -> Self {
        Self::engine_at(&docker_host_for_messages(), call, source)
    }

    /// An Engine call failure, naming `host` when the engine cannot be reached.
    pub(crate) fn engine_at(
        host: &str,
        call: impl Into<String>,
        source: bollard::errors::Error,
    ) -> Self {
        if is_connection_error(&source) {
            return DockerError::Unreachable {
                host: host.to_string(),
                source,
            };
        }
        DockerError::Engine {
            call: call.into(),
            source,
        }
    }

    /// Whether the same call may succeed if tried again: an unreachable engine, a 5xx answer or
    /// a timeout, a registry that did not answer; not a missing image or a name clash.
    pub fn is_retryable(&self) -> bool {
        match self {
            DockerError::Unreachable { .. } | DockerError::ExecTimeout { .. } => true,
            DockerError::Engine { source, .. } => match source {
                bollard::errors::Error::DockerResponseServerError { status_code, .. } => {
                    *status_code >= 500
                }
                bollard::errors::Error::RequestTimeoutError => true,
                e => is_connection_error(e),
            },
            // A registry that does not answer may answer later.
            DockerError::PullFailed { .. } => true,
            DockerError::ImageMissing { .. }
            | DockerError::TlsFile { .. }
            | DockerError::NameClash { .. }
            | DockerError::NetworkUnusable { .. }
            | DockerError::ExitedAtStart { .. }
            | DockerError::NoPublishedPort { .. }
            | DockerError::NotRunning { .. }
            | DockerError::NotSwarmManager { .. }
            | DockerError::TaskFailed { .. }
            | DockerError::TooFewNodes { .. }
            | DockerError::NotConverged { .. } => false,
            DockerError::TasksRemain { .. } => true,
            DockerError::ServiceLeft { failure, .. } => failure.is_retryable(),
        }
    }

    /// Converts into core's [`Error::Backend`] for backend [`NAME`](crate::NAME) and `operation`,
    /// keeping this error as the source and its retryability.
    pub fn into_core(self, operation: &str) -> Error {
        let retryable = self.is_retryable();
        Error::backend(crate::NAME, operation, retryable, self)
    }
}

/// An error with its causes (`a: b: c`): the client's top-level message alone ("client error
/// (Connect)") does not say that a certificate was refused.
pub(crate) fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = c.source();
    }
    out
}

/// True for a 404 from the Engine.
pub(crate) fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// True for a 304 (already started / already stopped).
pub(crate) fn is_not_modified(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 304,
            ..
        }
    )
}

/// True when the client never got an answer from the Engine.
pub(crate) fn is_connection_error(e: &bollard::errors::Error) -> bool {
    use bollard::errors::Error as B;
    matches!(
        e,
        B::SocketNotFoundError(_) | B::HyperLegacyError { .. } | B::IOError { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(status_code: u16) -> bollard::errors::Error {
        bollard::errors::Error::DockerResponseServerError {
            status_code,
            message: "m".into(),
        }
    }

    #[test]
    fn retryability_is_decided_at_the_boundary() {
        let e = DockerError::engine("start container a-blue", server(500)).into_core("deploy");
        assert!(e.is_retryable());
        let e = DockerError::engine("create container a-blue", server(409)).into_core("deploy");
        assert!(!e.is_retryable());
        let e = DockerError::engine(
            "inspect container a-blue",
            bollard::errors::Error::SocketNotFoundError("/x.sock".into()),
        );
        assert!(matches!(e, DockerError::Unreachable { .. }), "{e}");
        assert!(e.into_core("status").is_retryable());
        let e = DockerError::NameClash {
            name: "a-blue".into(),
            project: "a".into(),
            slot: Slot::Blue,
            found: "bluegreen.project=(none) bluegreen.slot=(none)".into(),
        }
        .into_core("deploy");
        assert!(!e.is_retryable());
        assert!(e.to_string().starts_with("docker: deploy failed: "), "{e}");
    }
}
