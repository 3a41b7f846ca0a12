//! The isolation tiers. Only `container` exists so far.
use std::fmt;
use std::str::FromStr;

/// Annotation that selects the tier from config.json.
pub const TIER_ANNOTATION: &str = "dev.moat.isolation";

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

    pub fn is_available(self) -> bool {
        matches!(self, Tier::Container)
    }
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
}
