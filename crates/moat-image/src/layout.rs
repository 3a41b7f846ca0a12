//! The JSON documents of an OCI image layout (index.json, manifests, image
//! configs: oci-spec's types) and of a `docker save` archive (manifest.json,
//! which no crate models): pure parsers over bytes, so they can be fuzzed.
use oci_spec::image::{Arch, ImageConfiguration, MediaType, Os};
pub use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use thiserror::Error;

/// Largest JSON document read from an image (index, manifest, config).
pub const MAX_JSON: u64 = 8 << 20;

pub const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// The annotation naming a manifest's tag in index.json.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("{what} is not valid JSON: {msg}")]
    Json { what: &'static str, msg: String },
    #[error("bad digest {0:?} (expected sha256:<64 hex digits>)")]
    Digest(String),
    #[error("no manifest tagged {0:?} in index.json")]
    NoTag(String),
    #[error("index.json lists {0} manifests: name one with oci:PATH:TAG")]
    Ambiguous(usize),
    #[error("index.json lists no manifest")]
    Empty,
    #[error("no linux/amd64 manifest in a nested index")]
    NoPlatform,
    #[error("manifest.json lists {0} images (exactly one is supported)")]
    DockerCount(usize),
    #[error("the config has {diff_ids} diff_ids for {layers} layers")]
    DiffIds { diff_ids: usize, layers: usize },
}

/// A `sha256:<hex>` digest, checked: 64 lowercase hex digits, so it is
/// safe as a file name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Sha256Digest(String);

impl Sha256Digest {
    pub fn parse(s: &str) -> Result<Sha256Digest, LayoutError> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| LayoutError::Digest(s.to_string()))?;
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(LayoutError::Digest(s.to_string()));
        }
        Ok(Sha256Digest(hex.to_string()))
    }

    pub fn of(bytes: &[u8]) -> Sha256Digest {
        Sha256Digest(hex(&Sha256::digest(bytes)))
    }

    pub fn from_hasher(h: Sha256) -> Sha256Digest {
        Sha256Digest(hex(&h.finalize()))
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", self.0)
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What moat uses of an image config (`config` of the OCI image config,
/// Docker's names).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunConfig {
    #[serde(
        rename = "Env",
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub env: Vec<String>,
    #[serde(
        rename = "Entrypoint",
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub entrypoint: Vec<String>,
    #[serde(
        rename = "Cmd",
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub cmd: Vec<String>,
    #[serde(
        rename = "WorkingDir",
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub working_dir: String,
    #[serde(
        rename = "User",
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub user: String,
}

/// What moat reads of an image config: how to run it, and its layers'
/// diff IDs.
#[derive(Debug, Default)]
pub struct ImageConfig {
    pub config: RunConfig,
    pub diff_ids: Vec<String>,
}

/// Docker's `Env: null`, `Cmd: null`: the same as absent.
fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// One image of a `docker save` manifest.json.
#[derive(Debug, Deserialize)]
pub struct DockerImage {
    #[serde(rename = "Config")]
    pub config: String,
    #[serde(rename = "RepoTags", default, deserialize_with = "null_default")]
    pub repo_tags: Vec<String>,
    #[serde(rename = "Layers", default)]
    pub layers: Vec<String>,
}

fn json<'a, T: Deserialize<'a>>(what: &'static str, b: &'a [u8]) -> Result<T, LayoutError> {
    serde_json::from_slice(b).map_err(|e| LayoutError::Json {
        what,
        msg: e.to_string(),
    })
}

pub fn parse_index(b: &[u8]) -> Result<ImageIndex, LayoutError> {
    json("index.json", b)
}

pub fn parse_manifest(b: &[u8]) -> Result<ImageManifest, LayoutError> {
    json("the manifest", b)
}

pub fn parse_config(b: &[u8]) -> Result<ImageConfig, LayoutError> {
    let c: ImageConfiguration = json("the image config", b)?;
    let run = c.config().as_ref();
    let list = |v: Option<&Vec<String>>| v.cloned().unwrap_or_default();
    let text = |v: Option<&String>| v.cloned().unwrap_or_default();
    Ok(ImageConfig {
        config: RunConfig {
            env: list(run.and_then(|r| r.env().as_ref())),
            entrypoint: list(run.and_then(|r| r.entrypoint().as_ref())),
            cmd: list(run.and_then(|r| r.cmd().as_ref())),
            working_dir: text(run.and_then(|r| r.working_dir().as_ref())),
            user: text(run.and_then(|r| r.user().as_ref())),
        },
        diff_ids: c.rootfs().diff_ids().clone(),
    })
}

/// The single image of a docker-save manifest.json.
pub fn parse_docker_manifest(b: &[u8]) -> Result<DockerImage, LayoutError> {
    let mut v: Vec<DockerImage> = json("manifest.json", b)?;
    if v.len() != 1 {
        return Err(LayoutError::DockerCount(v.len()));
    }
    Ok(v.remove(0))
}

/// Whether a descriptor points to another index (a multi-platform image).
pub fn is_index(d: &Descriptor) -> bool {
    match d.media_type() {
        MediaType::ImageIndex => true,
        other => other.to_string() == MT_DOCKER_LIST,
    }
}

/// The manifest `tag` names in an index, or its only manifest when no tag
/// is given.
pub fn select<'a>(index: &'a ImageIndex, tag: Option<&str>) -> Result<&'a Descriptor, LayoutError> {
    match tag {
        Some(t) => index
            .manifests()
            .iter()
            .find(|d| {
                d.annotations()
                    .as_ref()
                    .and_then(|a| a.get(REF_NAME))
                    .is_some_and(|n| n == t || n.rsplit(':').next() == Some(t))
            })
            .ok_or_else(|| LayoutError::NoTag(t.to_string())),
        None => match index.manifests().as_slice() {
            [one] => Ok(one),
            [] => Err(LayoutError::Empty),
            many => Err(LayoutError::Ambiguous(many.len())),
        },
    }
}

/// In a nested (multi-platform) index, the linux/amd64 manifest.
pub fn select_platform(index: &ImageIndex) -> Result<&Descriptor, LayoutError> {
    index
        .manifests()
        .iter()
        .find(|d| {
            d.platform()
                .as_ref()
                .is_some_and(|p| *p.os() == Os::Linux && *p.architecture() == Arch::Amd64)
        })
        .ok_or(LayoutError::NoPlatform)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn digests() {
        let d = Sha256Digest::parse(D).unwrap();
        assert_eq!(d, Sha256Digest::of(b""));
        assert_eq!(d.to_string(), D);
        for bad in [
            "sha256:../../etc/passwd",
            "sha512:e3b0",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "",
        ] {
            assert!(Sha256Digest::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn index_selection() {
        let i = parse_index(
            format!(
                r#"{{"schemaVersion":2,"manifests":[
                {{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{D}","size":1,
                  "annotations":{{"{REF_NAME}":"latest"}}}},
                {{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{D}","size":1,
                  "annotations":{{"{REF_NAME}":"docker.io/x:v2"}}}}]}}"#
            )
            .as_bytes(),
        )
        .unwrap();
        assert!(select(&i, Some("latest")).is_ok());
        assert!(select(&i, Some("v2")).is_ok());
        assert_eq!(
            select(&i, Some("nope")).unwrap_err(),
            LayoutError::NoTag("nope".into())
        );
        assert_eq!(select(&i, None).unwrap_err(), LayoutError::Ambiguous(2));
        assert!(parse_index(b"[").is_err());
    }

    #[test]
    fn configs_with_nulls() {
        let c = parse_config(
            br#"{"architecture":"amd64","os":"linux",
                 "config":{"Env":["A=1"],"Cmd":null,"Entrypoint":["/bin/sh"],"WorkingDir":"/w"},
                 "rootfs":{"type":"layers","diff_ids":[]}}"#,
        )
        .unwrap();
        assert_eq!(c.config.env, vec!["A=1"]);
        assert!(c.config.cmd.is_empty());
        assert_eq!(c.config.working_dir, "/w");
        assert_eq!(
            parse_config(
                br#"{"architecture":"amd64","os":"linux","config":null,
                     "rootfs":{"type":"layers","diff_ids":[]}}"#
            )
            .unwrap()
            .config,
            RunConfig::default()
        );
        // A config without the fields the image spec requires is refused.
        assert!(parse_config(br#"{"config":null}"#).is_err());
        let m = parse_docker_manifest(
            br#"[{"Config":"c.json","RepoTags":null,"Layers":["l/layer.tar"]}]"#,
        )
        .unwrap();
        assert_eq!(m.layers, vec!["l/layer.tar"]);
        assert_eq!(
            parse_docker_manifest(b"[]").unwrap_err(),
            LayoutError::DockerCount(0)
        );
    }
}
