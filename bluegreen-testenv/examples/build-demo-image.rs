//! Builds the `bluegreen-demo` web app into a `FROM scratch` image on the local Docker Engine
//! (`DOCKER_HOST` or the default socket), without a registry:
//!
//! ```sh
//! cargo run -p bluegreen-testenv --features docker --example build-demo-image -- bluegreen-demo:latest
//! docker run --rm -p 127.0.0.1:8080:8080 -e BLUEGREEN_VERSION=v1 bluegreen-demo:latest
//! ```

use bluegreen_docker::bollard::Docker;
use bluegreen_testenv::docker::ScratchImage;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tag = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "bluegreen-demo:latest".to_string());
    let binary = bluegreen_demo::binary_path();
    let docker = Docker::connect_with_defaults()?.negotiate_version().await?;
    let id = ScratchImage::demo(&tag, &binary)?.build(&docker).await?;
    println!("built {tag} ({id}) from {}", binary.display());
    Ok(())
}
