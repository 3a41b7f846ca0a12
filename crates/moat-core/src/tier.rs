//! The isolation tiers, and how a container's tier is chosen: resolved
//! once, from the runtime's flag or program name and the config's
//! annotation (see [`select`]).
use std::fmt;
use std::str::FromStr;

/// Annotation that selects the tier from config.json.
pub const TIER_ANNOTATION: &str = "dev.moat.isolation";

/// The sandbox tier's policy (its JSON document; docs/sandbox.md), for
/// the OCI path; `moat run --policy FILE` writes it.
pub const SANDBOX_POLICY_ANNOTATION: &str = "dev.moat.sandbox.policy";

/// Ordered from weakest to strongest isolation.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    #[default]
    Container,
    Sandbox,
    Microvm,
}

impl Tier {
    /// The tier implied by the name the binary was invoked as (`moat-sandbox`, `moat-microvm`).
    pub fn from_argv0(argv0: &str) -> Option<Tier> {
        let base = argv0.rsplit('/').next().unwrap_or(argv0);
        match base {
            "moat-sandbox" => Some(Tier::Sandbox),
            "moat-microvm" => Some(Tier::Microvm),
            "moat-container" => Some(Tier::Container),
            _ => None,
        }
    }

    pub const ALL: [Tier; 3] = [Tier::Container, Tier::Sandbox, Tier::Microvm];
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Container => "container",
            Tier::Sandbox => "sandbox",
            Tier::Microvm => "microvm",
        })
    }
}

impl FromStr for Tier {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "container" => Ok(Tier::Container),
            "sandbox" => Ok(Tier::Sandbox),
            "microvm" => Ok(Tier::Microvm),
            other => Err(format!(
                "unknown isolation tier {other:?} (expected container, sandbox or microvm)"
            )),
        }
    }
}

/// What the runtime was told: `--isolation`, else the name it was invoked
/// by (`moat-sandbox`, …), else nothing.
pub fn chosen(flag: Option<&str>, argv0: &str) -> Result<Option<Tier>, String> {
    match flag {
        Some(f) => f.parse().map(Some),
        None => Ok(Tier::from_argv0(argv0)),
    }
}

/// containerd's CRI annotations: which kind of container this is
/// (`sandbox` for a pod's pause container, `container` for the others) and
/// the pod sandbox's ID.
pub const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// See [`CRI_CONTAINER_TYPE`].
pub const CRI_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// The container's ID as the runtime's caller knows it, where moat runs
/// the container on another runtime's behalf (the microvm tier's guest
/// runs it as its own `w0`): the state the container tier hands its
/// startContainer hooks carries it.
pub const STATE_ID_ANNOTATION: &str = "dev.moat.state-id";

/// Whether container `id`, with these annotations, is a Kubernetes pod's
/// sandbox (pause) container as containerd's CRI plugin creates it: typed
/// `sandbox` and its own sandbox. containerd writes both annotations
/// itself, over whatever the pod spec asked for.
pub fn is_pod_sandbox(
    annotations: Option<&std::collections::HashMap<String, String>>,
    id: &str,
) -> bool {
    let get = |k: &str| annotations.and_then(|a| a.get(k)).map(String::as_str);
    get(CRI_CONTAINER_TYPE) == Some("sandbox") && get(CRI_SANDBOX_ID) == Some(id)
}

/// The tier a container gets when both the config's annotation (written by
/// whoever wrote the pod or container spec) and the runtime's flag or
/// program name (chosen by whoever installed the runtime, e.g. a
/// RuntimeClass) may ask for one: the stronger. A workload may ask for more
/// isolation, never less.
pub fn select(chosen: Option<Tier>, annotation: Option<Tier>) -> Tier {
    annotation.max(chosen).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv0_selects_tier() {
        assert_eq!(
            Tier::from_argv0("/usr/local/bin/moat-sandbox"),
            Some(Tier::Sandbox)
        );
        assert_eq!(Tier::from_argv0("moat-microvm"), Some(Tier::Microvm));
        assert_eq!(Tier::from_argv0("/usr/bin/moat"), None);
        assert!("vm".parse::<Tier>().is_err());
    }

    #[test]
    fn the_stronger_tier_wins() {
        use Tier::*;
        assert_eq!(select(None, None), Container);
        assert_eq!(select(Some(Sandbox), Some(Container)), Sandbox);
        assert_eq!(select(Some(Container), Some(Microvm)), Microvm);
        assert_eq!(select(Some(Sandbox), None), Sandbox);
        assert_eq!(chosen(None, "/usr/bin/moat-microvm"), Ok(Some(Microvm)));
        assert_eq!(chosen(Some("sandbox"), "moat-microvm"), Ok(Some(Sandbox)));
        assert!(chosen(Some("kvm"), "moat").is_err());
    }

    #[test]
    fn a_pods_pause_container_is_told_from_the_pods_others() {
        let ann = |t: &str, sid: &str| {
            std::collections::HashMap::from([
                (CRI_CONTAINER_TYPE.to_string(), t.to_string()),
                (CRI_SANDBOX_ID.to_string(), sid.to_string()),
            ])
        };
        let pause = ann("sandbox", "p1");
        assert!(is_pod_sandbox(Some(&pause), "p1"));
        // Another container of the pod, or a sandbox-typed one that is not
        // its own sandbox, is not.
        assert!(!is_pod_sandbox(Some(&ann("container", "p1")), "c1"));
        assert!(!is_pod_sandbox(Some(&pause), "c1"));
        assert!(!is_pod_sandbox(None, "p1"));
    }
}
