//! Conformance suites every backend runs, and in-memory fakes with fault injection.
//!
//! Enabled by the `testkit` feature. Backends call the suites from one test each against their real
//! service; users put the fakes in their own tests:
//!
//! - [`switch_suite`], [`environment_suite`], [`database_suite`], [`state_store_suite`];
//! - [`Fakes`]: a shared in-memory world behind [`FakeEnvironment`], [`FakeSwitch`],
//!   [`FakeHealthCheck`], [`FakeDatabase`], [`FakeHook`] and [`MemoryStateStore`], with scripted
//!   faults (`fail_next`, `fail_on_call`, `delay_next`, `hang_next`) and a timeline of every split the
//!   switch held, so a test can prove live traffic never pointed at a slot that was not running.

mod fakes;
mod suites;

pub use fakes::*;
pub use suites::*;
