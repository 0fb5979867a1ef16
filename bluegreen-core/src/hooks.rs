//! Ready-made hooks.

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::traits::{Hook, HookContext};

/// Runs `argv` in the target slot through [`Environment::exec`](crate::Environment::exec), e.g. a
/// migration such as Odoo's `-u modules --stop-after-init`. A non-zero exit fails the hook with the
/// last lines of its standard error. No shell is involved.
///
/// ```
/// use bluegreen_core::hooks::ExecHook;
/// let migrate = ExecHook::new("migrate", vec!["./manage".into(), "migrate".into()]).unwrap();
/// # let _ = migrate;
/// ```
#[derive(Debug, Clone)]
pub struct ExecHook {
    name: String,
    argv: Vec<String>,
}

impl ExecHook {
    /// A hook named `name` running `argv`.
    pub fn new(name: impl Into<String>, argv: Vec<String>) -> Result<Self> {
        if argv.first().map(|p| p.is_empty()).unwrap_or(true) {
            return Err(Error::invalid("exec hook", "", "argv must name a program"));
        }
        Ok(ExecHook {
            name: name.into(),
            argv,
        })
    }
}

#[async_trait]
impl Hook for ExecHook {
    fn name(&self) -> &str {
        &self.name
    }

    async fn run(&self, ctx: &HookContext) -> Result<()> {
        let out = ctx.environment.exec(ctx.target, &self.argv).await?;
        if out.success() {
            return Ok(());
        }
        let tail: Vec<&str> = out.stderr.lines().rev().take(10).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Err(Error::Hook {
            hook: self.name.clone(),
            reason: format!(
                "{:?} exited with {} in slot {}: {}",
                self.argv,
                out.code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "a signal".into()),
                ctx.target,
                tail.join("\n")
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{Fakes, Op};
    use crate::{Environment, HookPoint, Release, Slot};
    use std::sync::Arc;

    #[tokio::test]
    async fn exec_hook_runs_in_the_target_slot() {
        let fakes = Fakes::new();
        let env = fakes.environment();
        let r = Release::new("v1", "app").unwrap();
        env.deploy(Slot::Green, &r).await.unwrap();
        let ctx = HookContext {
            point: HookPoint::AfterDeploy,
            deployment: 1,
            release: r,
            target: Slot::Green,
            previous: None,
            endpoints: vec![],
            environment: Arc::new(env),
        };
        let hook = ExecHook::new("migrate", vec!["migrate".into(), "--all".into()]).unwrap();
        hook.run(&ctx).await.unwrap();
        assert!(fakes
            .calls()
            .contains(&"environment.exec green migrate --all".to_string()));
        fakes.fail_next(Op::EnvironmentExec, "no such container");
        let err = hook.run(&ctx).await.unwrap_err();
        assert!(err.to_string().contains("no such container"), "{err}");
        assert!(ExecHook::new("x", vec![]).is_err());
    }
}
