//! The one dispatch point between the CLI and the tiers: which tiers this
//! moat has, whether this host can run each (answered here and nowhere
//! else), and which tier a command goes to. The OCI commands, `moat run`
//! and the engines' paths all come through here; nothing else in the CLI
//! names a tier's crate.
use std::path::{Path, PathBuf};

use moat_container::ContainerTier;
use moat_core::runtime::{
    CreateRequest, Current, ExecOptions, Launched, Lifecycle, RuntimeError, Unavailable,
};
use moat_core::state::StateDir;
use moat_core::stats::{LimitEvents, Stats};
use moat_core::Tier;
use moat_microvm::MicrovmTier;
use moat_sandbox::SandboxTier;
use oci_spec::runtime::{LinuxResources, Process, Spec};

/// A tier's implementation of the seam.
pub enum Engine {
    Container(ContainerTier),
    Sandbox(SandboxTier),
    Microvm(MicrovmTier),
}

impl Engine {
    /// This engine in the sandbox tier's learning mode (`moat policy
    /// learn`): the policy its container needed is written to `out`.
    pub fn learning(self, out: PathBuf) -> Result<Engine, RuntimeError> {
        match self {
            Engine::Sandbox(t) => Ok(Engine::Sandbox(t.learning(out))),
            _ => Err(RuntimeError::Invalid(
                "only the sandbox tier learns a policy".into(),
            )),
        }
    }
}

/// Whether this host can run `tier`, and if not, what it lacks.
pub fn check(tier: Tier) -> Result<(), Unavailable> {
    match tier {
        Tier::Container => Ok(()),
        Tier::Sandbox => moat_sandbox::check_host(),
        Tier::Microvm => moat_microvm::check_host().map(|_| ()),
    }
}

/// What runs a tier here, when that is worth saying (`moat info`): for
/// microvm, the VMM and why, e.g. "QEMU/TCG (no vmx/svm: software-assisted
/// KVM (kvm_pvm))".
pub fn note(tier: Tier) -> Option<String> {
    match tier {
        Tier::Microvm => moat_microvm::check_host().ok().map(|h| h.why),
        _ => None,
    }
}

/// The tiers this host can run, weakest first.
pub fn available() -> Vec<Tier> {
    Tier::ALL
        .into_iter()
        .filter(|t| check(*t).is_ok())
        .collect()
}

/// Every tier with whether this host can run it (for `moat info`).
pub fn readiness() -> Vec<(Tier, Result<(), Unavailable>)> {
    Tier::ALL.into_iter().map(|t| (t, check(t))).collect()
}

/// The tiers, bound to a state root.
pub struct Tiers {
    root: PathBuf,
    systemd_cgroup: bool,
}

impl Tiers {
    pub fn new(root: &Path, systemd_cgroup: bool) -> Tiers {
        Tiers {
            root: root.to_owned(),
            systemd_cgroup,
        }
    }

    pub fn state_dir(&self) -> StateDir {
        StateDir::new(&self.root)
    }

    /// The engine for a new container of `tier`, if this host can run it.
    pub fn engine(&self, tier: Tier) -> Result<Engine, RuntimeError> {
        check(tier)?;
        Ok(self.build(tier)?)
    }

    /// The tier's engine, without asking whether the host can run it (a
    /// container that exists is handled by its tier whatever changed since).
    fn build(&self, tier: Tier) -> Result<Engine, Unavailable> {
        match tier {
            Tier::Container => Ok(Engine::Container(ContainerTier::new(
                &self.root,
                self.systemd_cgroup,
            ))),
            Tier::Sandbox => Ok(Engine::Sandbox(SandboxTier::new(
                &self.root,
                self.systemd_cgroup,
            ))),
            Tier::Microvm => Ok(Engine::Microvm(MicrovmTier::new(
                &self.root,
                self.systemd_cgroup,
            ))),
        }
    }

    /// The engine of an existing container: the tier its state records. A
    /// state that cannot be read goes to the default tier, whose commands
    /// report it (and whose `delete --force` removes what is left).
    pub fn of(&self, id: &str) -> Result<Engine, RuntimeError> {
        let tier = self
            .state_dir()
            .load(id)
            .map(|st| st.tier)
            .unwrap_or_default();
        Ok(self.build(tier)?)
    }

    /// Every container under the root, as its tier sees it now.
    pub fn list(&self) -> Result<Vec<Current>, RuntimeError> {
        let sd = self.state_dir();
        let mut out = Vec::new();
        for id in sd.list()? {
            // A container whose state cannot be read (being created, or
            // left half-written) is not listed, as before.
            let Ok(st) = sd.load(&id) else { continue };
            let Ok(engine) = self.build(st.tier) else {
                continue;
            };
            if let Ok(c) = engine.state(&id) {
                out.push(c);
            }
        }
        Ok(out)
    }
}

/// Calls the same method on whichever tier `$engine` is.
macro_rules! on_tier {
    ($engine:expr, $t:ident => $call:expr) => {
        match $engine {
            Engine::Container($t) => $call,
            Engine::Sandbox($t) => $call,
            Engine::Microvm($t) => $call,
        }
    };
}

impl Lifecycle for Engine {
    fn tier(&self) -> Tier {
        on_tier!(self, t => t.tier())
    }
    fn create(&self, req: &CreateRequest) -> Result<(), RuntimeError> {
        on_tier!(self, t => t.create(req))
    }
    fn launch(&self, req: &CreateRequest) -> Result<Launched, RuntimeError> {
        on_tier!(self, t => t.launch(req))
    }
    fn start(&self, id: &str) -> Result<(), RuntimeError> {
        on_tier!(self, t => Lifecycle::start(t, id))
    }
    fn state(&self, id: &str) -> Result<Current, RuntimeError> {
        on_tier!(self, t => t.state(id))
    }
    fn kill(&self, id: &str, signal: i32, all: bool) -> Result<(), RuntimeError> {
        on_tier!(self, t => Lifecycle::kill(t, id, signal, all))
    }
    fn delete(&self, id: &str, force: bool) -> Result<(), RuntimeError> {
        on_tier!(self, t => Lifecycle::delete(t, id, force))
    }
    fn exec(&self, id: &str, process: &Process, opts: &ExecOptions) -> Result<i32, RuntimeError> {
        on_tier!(self, t => Lifecycle::exec(t, id, process, opts))
    }
    fn ps(&self, id: &str) -> Result<Vec<i32>, RuntimeError> {
        on_tier!(self, t => t.ps(id))
    }
    fn pause(&self, id: &str) -> Result<(), RuntimeError> {
        on_tier!(self, t => Lifecycle::pause(t, id))
    }
    fn resume(&self, id: &str) -> Result<(), RuntimeError> {
        on_tier!(self, t => Lifecycle::resume(t, id))
    }
    fn update(&self, id: &str, resources: &LinuxResources) -> Result<(), RuntimeError> {
        on_tier!(self, t => Lifecycle::update(t, id, resources))
    }
    fn stats(&self, id: &str) -> Result<Stats, RuntimeError> {
        on_tier!(self, t => Lifecycle::stats(t, id))
    }
    fn events(&self, id: &str) -> Result<LimitEvents, RuntimeError> {
        on_tier!(self, t => t.events(id))
    }
    fn config(&self, id: &str) -> Result<Spec, RuntimeError> {
        on_tier!(self, t => t.config(id))
    }
    fn features(&self) -> serde_json::Value {
        on_tier!(self, t => t.features())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_tiers_say_why_in_one_line() {
        assert!(check(Tier::Container).is_ok());
        // This host has seccomp user notification and Landlock.
        assert!(check(Tier::Sandbox).is_ok(), "{:?}", check(Tier::Sandbox));
        // The microvm tier runs here when the test runs as root with QEMU
        // and the cloud kernel; otherwise it says what is missing, in one
        // line.
        match check(Tier::Microvm) {
            Ok(()) => {
                let n = note(Tier::Microvm).unwrap();
                assert!(n.starts_with("QEMU/"), "{n}");
                assert!(available().contains(&Tier::Microvm));
            }
            Err(u) => {
                let msg = u.to_string();
                assert!(
                    msg.starts_with("isolation tier microvm is not available on this host: "),
                    "{msg}"
                );
                assert!(!msg.contains('\n'));
                assert!(!available().contains(&Tier::Microvm));
            }
        }
    }
}
