//! A fleet host reached over TCP with TLS (`--tlsverify`): a test-host engine listening on
//! `tcp://<address>:2376` with certificates generated here (rcgen).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bluegreen_core::{Environment, Error, InstanceState, Release, Slot, SlotStatus};
use bluegreen_docker::{DockerConfig, DockerFleet, FleetTls, PullPolicy};
use bluegreen_testenv::hosts::{self, EngineTls, TestHosts, DEMO_IMAGE};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
};

/// A CA and certificates it signs.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        let cert = p.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// A certificate for a server at `ip` or for a client; returns (cert PEM, key PEM).
    fn issue(&self, server_ip: Option<IpAddr>) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        match server_ip {
            Some(ip) => {
                p.distinguished_name
                    .push(DnType::CommonName, ip.to_string());
                p.subject_alt_names = vec![SanType::IpAddress(ip)];
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            }
            None => {
                p.distinguished_name.push(DnType::CommonName, "bluegreen");
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
        }
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn write_ca(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.cert.pem()).unwrap();
        path.to_path_buf()
    }
}

/// Writes a client's material signed by `ca` into `dir` (`<prefix>-*.pem`).
fn client(ca: &Ca, dir: &Path, prefix: &str, trust: &Ca) -> FleetTls {
    let (cert, key) = ca.issue(None);
    let cert_path = dir.join(format!("{prefix}-cert.pem"));
    let key_path = dir.join(format!("{prefix}-key.pem"));
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    let ca_path = trust.write_ca(&dir.join(format!("{prefix}-ca.pem")));
    FleetTls::new(ca_path, cert_path, key_path)
}

fn fleet(hosts: &TestHosts, tls: FleetTls, project: &str) -> DockerFleet {
    DockerFleet::new(
        DockerConfig::new(project)
            .unwrap()
            .with_pull(PullPolicy::Never)
            .with_stop_timeout(Duration::from_secs(2)),
        vec![hosts.hosts()[0].fleet_host_tls(tls)],
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_engine_is_used_with_client_certificates_and_bad_material_is_named() {
    if !hosts::require_available() {
        return;
    }
    let Some(main) = bluegreen_testenv::docker::engine().await else {
        return;
    };
    let ca = Ca::new("bluegreen test CA");
    let set = TestHosts::start_with(1, |_, dir| {
        let ip = std::fs::read_to_string(dir.join("address"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let ip: IpAddr = ip.expect("the host's address is written before the callback");
        let (cert, key) = ca.issue(Some(ip));
        std::fs::write(dir.join("server-cert.pem"), cert).unwrap();
        std::fs::write(dir.join("server-key.pem"), key).unwrap();
        Ok(Some(EngineTls {
            ca: ca.write_ca(&dir.join("ca.pem")),
            cert: dir.join("server-cert.pem"),
            key: dir.join("server-key.pem"),
        }))
    })
    .await
    .expect("a TLS test host starts");
    let tag = hosts::demo_image(&main).await.unwrap();
    set.load_image(&main, &tag).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let project = format!("bgtls-{}", std::process::id());

    // The right material: connect, deploy, read, remove, over TLS.
    let good = fleet(&set, client(&ca, dir.path(), "good", &ca), &project);
    let eps = good
        .deploy(Slot::Blue, &Release::new("v1", DEMO_IMAGE).unwrap())
        .await
        .unwrap();
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].host, set.hosts()[0].address().to_string());
    let st = good.status(Slot::Blue).await.unwrap();
    assert_eq!(st.state, InstanceState::Running);
    good.remove(Slot::Blue).await.unwrap();

    let h1 = set.hosts()[0].name().to_string();
    let check = |err: Error, what: &str| {
        let text = err.to_string();
        assert!(
            text.contains(&format!("host {h1}")),
            "{what}: the error must name the host: {text}"
        );
        text
    };
    // `status` answers for a fleet with an unreachable host: the slot is unknown, and the host's
    // part carries the error (naming the host); an operation on the slot fails naming it.
    let unreachable = |st: SlotStatus, what: &str| {
        assert_eq!(st.state, InstanceState::Unknown, "{what}: {st:?}");
        let parts: Vec<_> = st.unreadable_parts().collect();
        assert_eq!(parts.len(), 1, "{what}: {st:?}");
        assert_eq!(parts[0].name, h1, "{what}");
        let text = parts[0].error.clone().unwrap();
        assert!(
            text.contains(&format!("host {h1}")),
            "{what}: the error must name the host: {text}"
        );
        text
    };

    // A CA that did not sign the engine's certificate: refused, naming the host.
    let other = Ca::new("another CA");
    let wrong_ca = fleet(&set, client(&ca, dir.path(), "wrongca", &other), &project);
    let text = unreachable(wrong_ca.status(Slot::Blue).await.unwrap(), "wrong CA");
    assert!(text.to_lowercase().contains("certificate"), "{text}");
    let text = check(wrong_ca.remove(Slot::Blue).await.unwrap_err(), "wrong CA");
    assert!(text.to_lowercase().contains("certificate"), "{text}");

    // A missing client certificate: named, with the file.
    let mut missing = client(&ca, dir.path(), "missing", &ca);
    missing.cert = dir.path().join("no-such-cert.pem");
    let text = unreachable(
        fleet(&set, missing, &project)
            .status(Slot::Blue)
            .await
            .unwrap(),
        "missing client certificate",
    );
    assert!(
        text.contains("client certificate") && text.contains("no-such-cert.pem"),
        "{text}"
    );

    // A client certificate the engine's CA did not sign: the engine refuses it.
    let stranger = Ca::new("stranger CA");
    let text = unreachable(
        fleet(
            &set,
            client(&stranger, dir.path(), "stranger", &ca),
            &project,
        )
        .status(Slot::Blue)
        .await
        .unwrap(),
        "foreign client certificate",
    );
    assert!(text.contains("cannot reach"), "{text}");
    set.stop().unwrap();
}
