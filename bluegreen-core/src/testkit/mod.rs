//! Conformance suites every backend runs, and in-memory fakes with fault injection.
//!
//! Enabled by the `testkit` feature. Backends call the suites from one test each against their real
//! service; users put the fakes in their own tests:
//!
//! - [`switch_suite`], [`environment_suite`], [`database_suite`], [`state_store_suite`];
//! - [`Fakes`]: a shared in-memory world behind [`FakeEnvironment`], [`FakeSwitch`],
//!   [`FakeHealthCheck`], [`FakeDatabase`], [`FakeHook`] and [`MemoryStateStore`], with scripted
//!   faults on a typed operation ([`Op`]: `fail_next(Op::SwitchApply, …)`, `fail_on_call`,
//!   `delay_next`, `hang_next`), call counts per operation (`call_count(Op::EnvironmentDeploy)`)
//!   and a timeline of every split the switch held, so a test can prove live traffic never pointed
//!   at a slot that was not running.

mod fakes;
mod suites;

pub use fakes::*;
pub use suites::*;
