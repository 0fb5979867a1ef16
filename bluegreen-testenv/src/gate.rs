//! The skip-outside-CI / fail-in-CI gate: a test that needs a real service (PostgreSQL, HAProxy,
//! nginx, the Docker Engine) skips with a printed reason on a developer machine that lacks it,
//! and fails loudly in CI (`CI` set), where a silent skip would hide a broken suite.

/// True when the `CI` environment variable is set (to anything).
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some()
}

/// The service `what` is missing: an error in CI; elsewhere prints `SKIPPED: <what> is not
/// available` on stderr and returns `Ok(())`, so the caller returns early.
///
/// For callers that report errors (examples, benchmarks); tests use [`require`].
///
/// # Errors
/// In CI, a message naming `what`.
pub fn missing(what: &str) -> Result<(), String> {
    if in_ci() {
        return Err(format!("{what} is required in CI but is not available"));
    }
    eprintln!("SKIPPED: {what} is not available");
    Ok(())
}

/// `true` when `available`; otherwise panics in CI, or prints `SKIPPED: …` and returns `false`
/// (the test returns early).
///
/// ```
/// if !bluegreen_testenv::require(true, "a service") {
///     return;
/// }
/// ```
pub fn require(available: bool, what: &str) -> bool {
    if available {
        return true;
    }
    if let Err(e) = missing(what) {
        panic!("{e}");
    }
    false
}

/// [`require`] for a service that is reached, not just installed: `Some(value)`, or `None`
/// after the skip (panics in CI with the reason).
pub fn require_ok<T, E: std::fmt::Display>(res: Result<T, E>, what: &str) -> Option<T> {
    match res {
        Ok(v) => Some(v),
        Err(e) => {
            require(false, &format!("{what} ({e})"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test changes `CI`: nothing else in this binary reads it concurrently.
    #[test]
    fn skips_outside_ci_and_fails_in_ci() {
        let saved = std::env::var_os("CI");
        std::env::remove_var("CI");
        assert!(require(true, "x"));
        assert!(!require(false, "x"));
        assert!(missing("x").is_ok());
        assert_eq!(require_ok(Err::<(), _>("down"), "x"), None);
        std::env::set_var("CI", "true");
        assert!(require(true, "x"));
        let err = missing("the thing").unwrap_err();
        assert!(err.contains("the thing"), "{err}");
        let panicked = std::panic::catch_unwind(|| require(false, "x")).is_err();
        match saved {
            Some(v) => std::env::set_var("CI", v),
            None => std::env::remove_var("CI"),
        }
        assert!(panicked, "a missing service must fail in CI");
    }
}
