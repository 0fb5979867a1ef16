//! Long-lived connections (WebSockets) to the old slot at the end of a deploy, against the fakes:
//! they stay open until the drain deadline, then the switch closes them gracefully and the run
//! says how many.

use std::time::Duration;

use bluegreen_core::testkit::Fakes;
use bluegreen_core::*;

fn policy(drain: Duration) -> Policy {
    Policy::default()
        .with_poll(Duration::from_millis(1), Duration::from_millis(5))
        .with_readiness_timeout(Duration::from_millis(300))
        .with_observation(Duration::ZERO, Duration::from_millis(5))
        .with_verify_timeout(Duration::from_millis(300))
        .with_drain_timeout(drain)
}

async fn with_v1(policy: Policy) -> (Fakes, Deployer) {
    let fakes = Fakes::new();
    let deployer = fakes.deployer_builder().policy(policy).build().unwrap();
    deployer
        .deploy(Release::new("v1", "app").unwrap())
        .await
        .unwrap();
    (fakes, deployer)
}

fn closes(fakes: &Fakes) -> Vec<String> {
    fakes
        .calls()
        .into_iter()
        .filter(|c| c.starts_with("switch.close_long_lived"))
        .collect()
}

#[tokio::test]
async fn connections_still_open_at_the_drain_deadline_are_closed_and_counted() {
    let (fakes, deployer) = with_v1(policy(Duration::from_millis(150))).await;
    fakes.set_long_lived(Slot::Blue, 3);
    let mut events = deployer.subscribe();
    let r = deployer
        .deploy(Release::new("v2", "app").unwrap())
        .await
        .unwrap();
    assert_eq!(r.outcome, RunOutcome::Live);
    assert_eq!(closes(&fakes), vec!["switch.close_long_lived Blue"]);
    assert_eq!(fakes.long_lived_closed(Slot::Blue), 3);
    let mut seen = None;
    while let Ok(ev) = events.try_recv() {
        if let DeployEvent::LongLivedClosed { slot, count, .. } = ev {
            seen = Some((slot, count));
        }
    }
    assert_eq!(seen, Some((Slot::Blue, 3)));
}

#[tokio::test]
async fn connections_that_end_before_the_deadline_are_left_alone() {
    let (fakes, deployer) = with_v1(policy(Duration::from_secs(5))).await;
    fakes.set_long_lived(Slot::Blue, 2);
    let closer = {
        let fakes = fakes.clone();
        tokio::spawn(async move {
            // The clients leave by themselves shortly after the switch.
            for _ in 0..1000 {
                if fakes.live() == Some(Slot::Green) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
            fakes.set_long_lived(Slot::Blue, 0);
        })
    };
    deployer
        .deploy(Release::new("v2", "app").unwrap())
        .await
        .unwrap();
    closer.await.unwrap();
    assert!(closes(&fakes).is_empty(), "{:?}", fakes.calls());
    assert_eq!(fakes.long_lived_closed(Slot::Blue), 0);
}

#[tokio::test]
async fn a_switch_without_the_capability_is_not_asked() {
    let (fakes, deployer) = with_v1(policy(Duration::from_millis(50))).await;
    fakes.set_capabilities(Capabilities::basic().with_weights(true).with_drain(true));
    fakes.set_long_lived(Slot::Blue, 3);
    deployer
        .deploy(Release::new("v2", "app").unwrap())
        .await
        .unwrap();
    assert!(closes(&fakes).is_empty());
}
