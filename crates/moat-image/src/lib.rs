//! Images as the root of `moat run`: a rootfs directory or OCI bundle, a
//! rootfs tarball (.tar, gzip, zstd), an OCI image layout (`oci:PATH[:TAG]`)
//! or a `docker save` archive. Archives are unpacked safely ([`unpack`])
//! into a content-addressed cache under the state root, built in
//! `<root>/.images/tmp/` and renamed into place; later runs reuse it.
//!
//! Run by root, the cache holds layers shared between images: each layer
//! once in `<root>/.images/layers/sha256/<diff_id>/{diff,size}`, its
//! whiteouts in overlayfs' form; an image is
//! `<root>/.images/sha256/<hex>/{image.json,last-used,top/}` (keyed by the
//! image config's digest, or the tarball's sha256), listing its layers;
//! `top/` holds the mount points it lacks. Its files keep the archive's
//! owners and are reachable by root alone (`.images` is 0700): containers
//! see an image only through the idmapped overlay [`view`] that `moat run`
//! mounts in its bundle. Unpacked by another user (rootless), an image is
//! one flattened `rootfs/` in its entry (whiteouts applied), its files
//! belong to that user, and the container's init reaches it directly
//! (`.images` is 0711). Entries of an earlier moat (a flattened `rootfs/`
//! without layers) are used as they are.
#![forbid(unsafe_code)]
pub mod layout;
pub mod unpack;
pub mod view;

use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::AsFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rustix::fs::{Mode, OFlags};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use thiserror::Error;

pub use layout::{LayoutError, RunConfig, Sha256Digest};
pub use unpack::UnpackError;

/// Image IDs below this keep their owner in the cache and map to the
/// container's block at run time; others become 65534 (`nobody`).
pub const ID_RANGE: u32 = 65536;

/// Mount points every image root gets (created by moat on the host, since
/// the container's root user cannot write to the root-owned image).
pub const MOUNT_POINTS: &[&str] = &["proc", "dev", "sys", "tmp"];

#[derive(Debug, Error)]
pub enum ImageError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}")]
    Layout {
        path: PathBuf,
        #[source]
        source: LayoutError,
    },
    #[error("{path}: digest mismatch (expected {expected}, got {actual})")]
    DigestMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{path}: larger than {max} bytes")]
    TooLarge { path: PathBuf, max: u64 },
    #[error("cannot unpack {path}")]
    Unpack {
        path: PathBuf,
        #[source]
        source: UnpackError,
    },
    #[error("{0}: not a directory, tarball, OCI layout or docker archive")]
    Unknown(PathBuf),
    #[error("cannot remove the image cache: container {0} exists")]
    InUse(String),
    #[error("no cached image matches {0:?}")]
    NoSuchImage(String),
    #[error("{image} has {count} layers (at most {max} are supported)")]
    TooManyLayers {
        image: String,
        count: usize,
        max: usize,
    },
    #[error("{prefix:?} matches {count} cached images: give more of the digest")]
    Ambiguous { prefix: String, count: usize },
    #[error("invalid {ENV_MAX_BYTES}={0:?} (a number of bytes, with k, m or g)")]
    BadLimit(String),
    #[error("cannot read {member:?} in the archive {archive}")]
    Member {
        archive: PathBuf,
        member: String,
        #[source]
        source: io::Error,
    },
}

fn rerr(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| ImageError::Read {
        path: path.to_path_buf(),
        source,
    }
}

fn werr(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| ImageError::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A rootfs directory, or an OCI bundle (config.json + rootfs/).
    Dir(PathBuf),
    /// A tarball (plain, gzip or zstd): a rootfs, or a `docker save`
    /// archive, told apart when it is prepared (and only when the cache
    /// does not already know the file: see [`Store::prepare`]).
    Tarball(PathBuf),
    /// `oci:PATH[:TAG]`.
    OciLayout { path: PathBuf, tag: Option<String> },
    /// `docker-archive:PATH`, or a tarball with manifest.json at the top.
    DockerArchive(PathBuf),
}

const GZIP: &[u8] = &[0x1f, 0x8b];
const ZSTD: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

impl Source {
    /// The image `arg` names, or `None` when it names no image (then it is
    /// a command): `oci:`/`docker-archive:` prefixes, an existing directory,
    /// or an existing file that is a tar archive (plain, gzip, zstd).
    pub fn detect(arg: &str) -> Option<Source> {
        if let Some(rest) = arg.strip_prefix("oci:") {
            // PATH:TAG only when PATH exists without the tag.
            if let Some((p, t)) = rest.rsplit_once(':') {
                if Path::new(p).is_dir() && !Path::new(rest).exists() {
                    return Some(Source::OciLayout {
                        path: p.into(),
                        tag: Some(t.to_string()),
                    });
                }
            }
            return Some(Source::OciLayout {
                path: rest.into(),
                tag: None,
            });
        }
        if let Some(rest) = arg.strip_prefix("docker-archive:") {
            return Some(Source::DockerArchive(rest.into()));
        }
        let p = Path::new(arg);
        let md = fs::metadata(p).ok()?;
        if md.is_dir() {
            return Some(Source::Dir(p.into()));
        }
        if md.is_file() && is_archive(p) {
            return Some(Source::Tarball(p.into()));
        }
        None
    }

    pub fn describe(&self) -> String {
        match self {
            Source::Dir(p) | Source::Tarball(p) => p.display().to_string(),
            Source::OciLayout { path, tag: None } => format!("oci:{}", path.display()),
            Source::OciLayout { path, tag: Some(t) } => format!("oci:{}:{t}", path.display()),
            Source::DockerArchive(p) => format!("docker-archive:{}", p.display()),
        }
    }
}

/// A tar, gzip or zstd file (by its first bytes; `ustar` at offset 257).
fn is_archive(p: &Path) -> bool {
    let mut head = [0u8; 512];
    let Ok(mut f) = fs::File::open(p) else {
        return false;
    };
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    let head = &head[..n];
    head.starts_with(GZIP) || head.starts_with(ZSTD) || (n >= 262 && &head[257..262] == b"ustar")
}

/// Whether an uncompressed tar has `manifest.json` at its top.
fn has_docker_manifest(p: &Path) -> bool {
    let Ok(f) = fs::File::open(p) else {
        return false;
    };
    // Seeks over the members' data: only the headers are read.
    let mut a = tar::Archive::new(f);
    let Ok(entries) = a.entries_with_seek() else {
        return false;
    };
    for e in entries {
        let Ok(e) = e else { return false };
        let path = e.path_bytes();
        if matches!(&path[..], b"manifest.json" | b"./manifest.json") {
            return true;
        }
    }
    false
}

/// A reader over `r` decompressed according to its first bytes.
pub fn decompressed<'a, R: Read + 'a>(r: R) -> io::Result<Box<dyn Read + 'a>> {
    let mut r = BufReader::new(r);
    let head = r.fill_buf()?;
    if head.starts_with(GZIP) {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(r)))
    } else if head.starts_with(ZSTD) {
        let d = ruzstd::decoding::StreamingDecoder::new(r)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        Ok(Box::new(d))
    } else {
        Ok(Box::new(r))
    }
}

/// Reports bytes read to a progress callback, and hashes them.
struct Tracked<'p, R> {
    inner: R,
    hash: Sha256,
    progress: &'p mut dyn FnMut(u64),
}

impl<R: Read> Read for Tracked<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        (self.progress)(n as u64);
        Ok(n)
    }
}

/// Hashes what passes through (the uncompressed layer, for a diff_id).
struct Hashing<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// The most layers an image may have: overlayfs stacks at most 500 lower
/// layers, and a cached image may add one of its own (mount points).
pub const MAX_LAYERS: usize = 499;

/// One layer of a cached image: its diff_id (`sha256:<hex>`, the digest of
/// the uncompressed tar) and the bytes of regular files in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRef {
    pub digest: String,
    pub size: u64,
}

/// What `image.json` in a cache entry records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub source: String,
    pub config: RunConfig,
    /// Bytes of regular files unpacked (of all its layers).
    pub size: u64,
    /// Its layers in `<cache>/layers/sha256/`, bottom first (the order of
    /// the manifest). Empty for a flattened entry, whose root is the
    /// entry's own `rootfs/` (rootless caches, and entries written by an
    /// earlier moat).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<LayerRef>,
}

/// An image ready to run.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The directories stacked into its root, top first: one for a
    /// directory image, a flattened entry or a one-layer image, else the
    /// lower layers of an overlay ([`view`]).
    pub layers: Vec<PathBuf>,
    pub config: RunConfig,
    /// The cache key, for cached images.
    pub digest: Option<Sha256Digest>,
}

impl Prepared {
    /// The root as one directory, when it is one (no overlay needed).
    pub fn rootfs(&self) -> Option<&Path> {
        match self.layers.as_slice() {
            [one] => Some(one),
            _ => None,
        }
    }
}

/// The image cache under a state root.
pub struct Store {
    dir: PathBuf,
    owners: unpack::Owners,
    limits: unpack::Limits,
}

/// The environment variable that sets how many bytes one image may unpack
/// to (a number, with k, m or g), instead of [`unpack::Limits`]' default.
pub const ENV_MAX_BYTES: &str = "MOAT_IMAGE_MAX_BYTES";
/// Space an unpack leaves free on the cache's filesystem.
pub const FREE_RESERVE: u64 = 1 << 30;

/// The bound on what one image may unpack to: [`ENV_MAX_BYTES`] or the
/// default.
fn limits_from_env() -> Result<unpack::Limits, ImageError> {
    let mut l = unpack::Limits::default();
    if let Ok(v) = std::env::var(ENV_MAX_BYTES) {
        let t = v.trim().to_ascii_lowercase();
        let (num, mult) = match t.chars().last() {
            Some('k') => (&t[..t.len() - 1], 1u64 << 10),
            Some('m') => (&t[..t.len() - 1], 1 << 20),
            Some('g') => (&t[..t.len() - 1], 1 << 30),
            _ => (&t[..], 1),
        };
        l.max_bytes = num
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(mult))
            .ok_or_else(|| ImageError::BadLimit(v.clone()))?;
    }
    Ok(l)
}

/// A cache entry, as `moat images` lists it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub digest: String,
    pub meta: Meta,
    pub last_used: Option<SystemTime>,
}

/// A layer to unpack: a (maybe compressed) tar file and the digests it
/// must have.
struct LayerSrc {
    path: PathBuf,
    file: fs::File,
    len: u64,
    /// The sha256 of the file (an OCI blob).
    blob: Option<Sha256Digest>,
    /// The sha256 of the uncompressed tar (the config's diff_id).
    diff_id: Option<Sha256Digest>,
}

impl LayerSrc {
    fn open(
        path: &Path,
        blob: Option<Sha256Digest>,
        diff_id: Option<Sha256Digest>,
    ) -> Result<LayerSrc, ImageError> {
        let file = fs::File::open(path).map_err(rerr(path))?;
        LayerSrc::with(path, file, blob, diff_id)
    }

    fn with(
        path: &Path,
        file: fs::File,
        blob: Option<Sha256Digest>,
        diff_id: Option<Sha256Digest>,
    ) -> Result<LayerSrc, ImageError> {
        let len = file.metadata().map_err(rerr(path))?.len();
        Ok(LayerSrc {
            path: path.to_path_buf(),
            file,
            len,
            blob,
            diff_id,
        })
    }
}

impl Store {
    pub fn new(state_root: &Path) -> Store {
        let owners = if rustix::process::geteuid().is_root() {
            unpack::Owners::Archive
        } else {
            unpack::Owners::Unpacker
        };
        Store {
            dir: state_root.join(".images"),
            owners,
            limits: unpack::Limits::default(),
        }
    }

    /// [`Store::new`] with the bound [`ENV_MAX_BYTES`] sets.
    pub fn from_env(state_root: &Path) -> Result<Store, ImageError> {
        Ok(Store {
            limits: limits_from_env()?,
            ..Store::new(state_root)
        })
    }

    /// The limits of the next image's unpack: bytes bounded by the setting
    /// and by the free space of the cache's filesystem (less a reserve).
    fn image_limits(&self) -> unpack::Limits {
        let mut l = self.limits;
        if let Ok(st) = rustix::fs::statvfs(&self.dir) {
            let free = st.f_bavail.saturating_mul(st.f_frsize);
            l.max_bytes = l.max_bytes.min(free.saturating_sub(FREE_RESERVE));
        }
        l
    }

    /// Creates the cache directory, or fixes its mode: 0700 when entries
    /// keep the archive's owners (only root may reach them), else 0711 (the
    /// container's host user walks to its rootfs).
    fn make_dir(&self) -> Result<(), ImageError> {
        use std::os::unix::fs::PermissionsExt;
        let mode = match self.owners {
            unpack::Owners::Archive => 0o700,
            unpack::Owners::Unpacker => 0o711,
        };
        Self::mkdir(&self.dir, mode)?;
        let md = fs::metadata(&self.dir).map_err(rerr(&self.dir))?;
        if md.permissions().mode() & 0o7777 != mode {
            fs::set_permissions(&self.dir, fs::Permissions::from_mode(mode))
                .map_err(werr(&self.dir))?;
        }
        Self::mkdir(&self.dir.join("tmp"), 0o700)
    }

    fn entry_dir(&self, d: &Sha256Digest) -> PathBuf {
        self.dir.join("sha256").join(d.hex())
    }

    fn layers_dir(&self) -> PathBuf {
        self.dir.join("layers").join("sha256")
    }

    /// The root of the layer `d` (its files, lower layer of an overlay).
    fn layer_dir(&self, d: &Sha256Digest) -> PathBuf {
        self.layers_dir().join(d.hex()).join("diff")
    }

    /// The size of the cached layer `d`, or None when it is not cached
    /// (a layer directory is complete once it is in `layers/sha256/`).
    fn layer_size(&self, d: &Sha256Digest) -> Option<u64> {
        let p = self.layers_dir().join(d.hex()).join("size");
        fs::read_to_string(p).ok()?.trim().parse().ok()
    }

    fn mkdir(p: &Path, mode: u32) -> Result<(), ImageError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(p)
            .map_err(werr(p))
    }

    /// The image `src`, unpacked into the cache unless it is a directory or
    /// already there. `progress(done, total)` is called as the archive is
    /// read (total 0 when unknown).
    pub fn prepare(
        &self,
        src: &Source,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Prepared, ImageError> {
        match src {
            Source::Dir(p) => prepare_dir(p),
            Source::Tarball(p) => {
                if let Some(found) = self.known_file(p)? {
                    return Ok(found);
                }
                // Only now, for a file the cache does not know: finding
                // manifest.json reads every member header of the tar.
                if has_docker_manifest(p) {
                    return self.prepare_docker(p, &Source::DockerArchive(p.clone()), progress);
                }
                let key = file_digest(p)?;
                if let Some(found) = self.load(&key)? {
                    self.remember_file(p, &key);
                    return Ok(found);
                }
                let layer = LayerSrc::open(p, None, None)?;
                let total = layer.len;
                let mut done = 0;
                let mut cb = |n: u64| {
                    done += n;
                    progress(done, total)
                };
                let built = self.build(&key, src, RunConfig::default(), vec![layer], &mut cb)?;
                self.remember_file(p, &key);
                Ok(built)
            }
            Source::OciLayout { path, tag } => {
                self.prepare_oci(path, tag.as_deref(), src, progress)
            }
            Source::DockerArchive(p) => {
                if let Some(found) = self.known_file(p)? {
                    return Ok(found);
                }
                self.prepare_docker(p, src, progress)
            }
        }
    }

    /// Where the entry key of an archive file is remembered: by the sha256
    /// of its absolute path.
    fn file_record(&self, p: &Path) -> Option<PathBuf> {
        let abs = std::path::absolute(p).ok()?;
        let name = Sha256Digest::of(abs.as_os_str().as_encoded_bytes());
        Some(self.dir.join("by-file").join(name.hex()))
    }

    /// The cached image of archive `p` when `p` is the very file seen when
    /// it was unpacked: same device, inode, size, mtime and ctime (a change
    /// of content changes ctime, which no user can set). Saves hashing (a
    /// tarball) or unpacking (a docker archive) the whole file on each run.
    fn known_file(&self, p: &Path) -> Result<Option<Prepared>, ImageError> {
        let Some(rec) = self.file_record(p) else {
            return Ok(None);
        };
        let Ok(text) = fs::read_to_string(&rec) else {
            return Ok(None);
        };
        let md = fs::metadata(p).map_err(rerr(p))?;
        let Some((stamp, key)) = text.trim().rsplit_once(' ') else {
            return Ok(None);
        };
        if stamp != file_stamp(&md) {
            return Ok(None);
        }
        match Sha256Digest::parse(key) {
            Ok(k) => self.load(&k),
            Err(_) => Ok(None),
        }
    }

    /// Records `key` as the entry of archive `p` (best effort: without the
    /// record the next run hashes the file again).
    fn remember_file(&self, p: &Path, key: &Sha256Digest) {
        let (Some(rec), Ok(md)) = (self.file_record(p), fs::metadata(p)) else {
            return;
        };
        // A file changed within the last seconds could change again within
        // the timestamp granularity without a new ctime: not recorded (as
        // git treats racily clean index entries).
        use std::os::unix::fs::MetadataExt;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        if now - md.ctime() < 2 {
            return;
        }
        let dir = self.dir.join("by-file");
        if Self::mkdir(&dir, 0o700).is_err() {
            return;
        }
        let tmp = dir.join(format!(".tmp-{}", std::process::id()));
        let text = format!("{} sha256:{}\n", file_stamp(&md), key.hex());
        if fs::write(&tmp, text).is_err() || fs::rename(&tmp, &rec).is_err() {
            let _ = fs::remove_file(&tmp);
        }
    }

    /// Builds the entry `key` from `layers` (bottom first) in a temporary
    /// directory, renamed into place: as root, each layer unpacked once
    /// into `layers/sha256/<diff_id>/` (or found there) with overlayfs
    /// whiteouts, plus the entry's own `top/` with the missing mount
    /// points; rootless, all layers flattened into the entry's `rootfs/`.
    fn build(
        &self,
        key: &Sha256Digest,
        src: &Source,
        config: RunConfig,
        layers: Vec<LayerSrc>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Prepared, ImageError> {
        if layers.len() > MAX_LAYERS {
            return Err(ImageError::TooManyLayers {
                image: src.describe(),
                count: layers.len(),
                max: MAX_LAYERS,
            });
        }
        self.make_dir()?;
        Self::mkdir(&self.dir.join("sha256"), 0o711)?;
        let tmp = TempDir::new(&self.dir.join("tmp"))?;
        // One budget for the whole image, spent layer by layer.
        let mut limits = self.image_limits();
        let meta = match self.owners {
            unpack::Owners::Archive => {
                let mut refs = Vec::new();
                let mut dirs = Vec::new();
                for l in layers {
                    let (d, r) = self.add_layer(l, progress, &mut limits)?;
                    dirs.insert(0, self.layer_dir(&d));
                    refs.push(r);
                }
                make_top(&tmp.path.join("top"), &dirs)?;
                Meta {
                    source: src.describe(),
                    config,
                    size: refs.iter().map(|r| r.size).sum(),
                    layers: refs,
                }
            }
            unpack::Owners::Unpacker => {
                let rootfs = tmp.path.join("rootfs");
                Self::mkdir(&rootfs, 0o755)?;
                let mut size = 0;
                for l in layers {
                    let (_, n) = unpack_layer(
                        l,
                        &rootfs,
                        progress,
                        self.owners,
                        unpack::Whiteouts::Apply,
                        &mut limits,
                    )?;
                    size += n;
                }
                make_mount_points(&rootfs)?;
                Meta {
                    source: src.describe(),
                    config,
                    size,
                    layers: Vec::new(),
                }
            }
        };
        let mp = tmp.path.join("image.json");
        let text = serde_json::to_vec_pretty(&meta).map_err(|e| ImageError::Write {
            path: mp.clone(),
            source: e.into(),
        })?;
        fs::write(&mp, text).map_err(werr(&mp))?;
        set_mode(&tmp.path, 0o711)?;
        let dir = self.entry_dir(key);
        match fs::rename(&tmp.path, &dir) {
            Ok(()) => tmp.keep(),
            // Another moat got there first: use its copy.
            Err(e) if dir.join("image.json").exists() => drop(e),
            Err(e) => return Err(werr(&dir)(e)),
        }
        self.load(key)?.ok_or_else(|| ImageError::Read {
            path: dir.clone(),
            source: io::ErrorKind::NotFound.into(),
        })
    }

    /// The cached layer of `src`, unpacked now unless its diff_id is
    /// already in the cache. A layer is unpacked in `tmp/` and renamed
    /// into `layers/sha256/<diff_id>/`; its diff_id is checked (when
    /// known) while it is read.
    fn add_layer(
        &self,
        src: LayerSrc,
        progress: &mut dyn FnMut(u64),
        limits: &mut unpack::Limits,
    ) -> Result<(Sha256Digest, LayerRef), ImageError> {
        if let Some(d) = &src.diff_id {
            if let Some(size) = self.layer_size(d) {
                progress(src.len);
                let r = LayerRef {
                    digest: d.to_string(),
                    size,
                };
                return Ok((d.clone(), r));
            }
        }
        Self::mkdir(&self.layers_dir(), 0o711)?;
        let tmp = TempDir::new(&self.dir.join("tmp"))?;
        let diff = tmp.path.join("diff");
        Self::mkdir(&diff, 0o755)?;
        let (d, size) = unpack_layer(
            src,
            &diff,
            progress,
            self.owners,
            unpack::Whiteouts::Overlay,
            limits,
        )?;
        let sp = tmp.path.join("size");
        fs::write(&sp, size.to_string()).map_err(werr(&sp))?;
        set_mode(&tmp.path, 0o711)?;
        let dst = self.layers_dir().join(d.hex());
        match fs::rename(&tmp.path, &dst) {
            Ok(()) => tmp.keep(),
            // Already there (another image, or another moat): the same
            // content, by its digest.
            Err(e) if self.layer_size(&d).is_some() => drop(e),
            Err(e) => return Err(werr(&dst)(e)),
        }
        let r = LayerRef {
            digest: d.to_string(),
            size,
        };
        Ok((d, r))
    }

    /// The entry `key`, if cached and whole (its last use updated). An
    /// entry one of whose layers is missing is removed: it is rebuilt.
    fn load(&self, key: &Sha256Digest) -> Result<Option<Prepared>, ImageError> {
        let dir = self.entry_dir(key);
        let mp = dir.join("image.json");
        let text = match fs::read(&mp) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(rerr(&mp)(e)),
        };
        let meta: Meta = serde_json::from_slice(&text).map_err(|e| ImageError::Read {
            path: mp.clone(),
            source: e.into(),
        })?;
        let layers = if meta.layers.is_empty() {
            vec![dir.join("rootfs")]
        } else {
            let mut v = Vec::new();
            let top = dir.join("top");
            if top.is_dir() {
                v.push(top);
            }
            for r in meta.layers.iter().rev() {
                let d = Sha256Digest::parse(&r.digest).map_err(|source| ImageError::Layout {
                    path: mp.clone(),
                    source,
                })?;
                let p = self.layer_dir(&d);
                // A layer listed twice: its upper copy already holds all
                // that the lower one would show.
                if !v.contains(&p) {
                    v.push(p);
                }
            }
            if v.iter().any(|p| !p.is_dir()) {
                self.discard(&dir)?;
                return Ok(None);
            }
            v
        };
        let used = dir.join("last-used");
        fs::write(&used, b"").map_err(werr(&used))?;
        Ok(Some(Prepared {
            layers,
            config: meta.config,
            digest: Some(key.clone()),
        }))
    }

    fn prepare_oci(
        &self,
        layout_dir: &Path,
        tag: Option<&str>,
        src: &Source,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Prepared, ImageError> {
        let lerr = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ImageError::Layout { path, source }
        };
        let index_path = layout_dir.join("index.json");
        let index = layout::parse_index(&read_small(&index_path)?).map_err(lerr(&index_path))?;
        let mut desc = layout::select(&index, tag)
            .map_err(lerr(&index_path))?
            .clone();
        if layout::is_index(&desc) {
            let (p, b) = read_blob(layout_dir, desc.digest().as_ref())?;
            let nested = layout::parse_index(&b).map_err(lerr(&p))?;
            desc = layout::select_platform(&nested).map_err(lerr(&p))?.clone();
        }
        let (mpath, mbytes) = read_blob(layout_dir, desc.digest().as_ref())?;
        let manifest = layout::parse_manifest(&mbytes).map_err(lerr(&mpath))?;
        let (cpath, cbytes) = read_blob(layout_dir, manifest.config().digest().as_ref())?;
        let config = layout::parse_config(&cbytes).map_err(lerr(&cpath))?;
        let key = Sha256Digest::of(&cbytes);
        if let Some(found) = self.load(&key)? {
            return Ok(found);
        }
        let diff_ids = &config.diff_ids;
        if diff_ids.len() != manifest.layers().len() {
            return Err(lerr(&cpath)(LayoutError::DiffIds {
                diff_ids: diff_ids.len(),
                layers: manifest.layers().len(),
            }));
        }
        let mut layers = Vec::new();
        for (l, id) in manifest.layers().iter().zip(diff_ids) {
            let d = Sha256Digest::parse(l.digest().as_ref()).map_err(lerr(&mpath))?;
            let want = Sha256Digest::parse(id).map_err(lerr(&cpath))?;
            let p = layout_dir.join("blobs/sha256").join(d.hex());
            layers.push(LayerSrc::open(&p, Some(d), Some(want))?);
        }
        let total = layers.iter().map(|l| l.len).sum();
        let mut done = 0;
        let mut cb = |n: u64| {
            done += n;
            progress(done, total)
        };
        self.build(&key, src, config.config, layers, &mut cb)
    }

    fn prepare_docker(
        &self,
        archive: &Path,
        src: &Source,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Prepared, ImageError> {
        // The archive's members are read by name, in the manifest's order:
        // it is unpacked (safely) into a scratch directory first.
        // The cache directory first, with its own mode (a recursive mkdir
        // of tmp/ alone would make it 0700).
        self.make_dir()?;
        let scratch = TempDir::new(&self.dir.join("tmp"))?;
        let total = fs::metadata(archive).map_err(rerr(archive))?.len();
        let mut done = 0;
        let mut cb = |n: u64| {
            done += n;
            progress(done.min(total * 2), total * 2)
        };
        unpack_layer(
            LayerSrc::open(archive, None, None)?,
            &scratch.path,
            &mut cb,
            unpack::Owners::Unpacker,
            unpack::Whiteouts::Apply,
            &mut self.image_limits(),
        )?;
        let lerr = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ImageError::Layout { path, source }
        };
        let mpath = member_path(archive, "manifest.json");
        let mbytes = read_member(&scratch.path, archive, "manifest.json")?;
        let m = layout::parse_docker_manifest(&mbytes).map_err(lerr(&mpath))?;
        let cpath = member_path(archive, &m.config);
        let cbytes = read_member(&scratch.path, archive, &m.config)?;
        let config = layout::parse_config(&cbytes).map_err(lerr(&cpath))?;
        let diff_ids = &config.diff_ids;
        if diff_ids.len() != m.layers.len() {
            return Err(lerr(&cpath)(LayoutError::DiffIds {
                diff_ids: diff_ids.len(),
                layers: m.layers.len(),
            }));
        }
        let key = Sha256Digest::of(&cbytes);
        if let Some(found) = self.load(&key)? {
            self.remember_file(archive, &key);
            return Ok(found);
        }
        let mut layers = Vec::new();
        for (l, id) in m.layers.iter().zip(diff_ids) {
            let want = Sha256Digest::parse(id).map_err(lerr(&cpath))?;
            let f = open_member(&scratch.path, archive, l)?;
            layers.push(LayerSrc::with(
                &member_path(archive, l),
                f,
                None,
                Some(want),
            )?);
        }
        let built = self.build(&key, src, config.config, layers, &mut cb)?;
        self.remember_file(archive, &key);
        Ok(built)
    }

    /// The cached images.
    pub fn list(&self) -> Result<Vec<Entry>, ImageError> {
        let dir = self.dir.join("sha256");
        let rd = match fs::read_dir(&dir) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(rerr(&dir)(e)),
        };
        let mut out = Vec::new();
        for e in rd {
            let e = e.map_err(rerr(&dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(text) = fs::read(e.path().join("image.json")) else {
                continue;
            };
            let Ok(meta) = serde_json::from_slice::<Meta>(&text) else {
                continue;
            };
            let last_used = fs::metadata(e.path().join("last-used"))
                .and_then(|m| m.modified())
                .ok();
            out.push(Entry {
                digest: format!("sha256:{name}"),
                meta,
                last_used,
            });
        }
        out.sort_by_key(|e| std::cmp::Reverse(e.last_used));
        Ok(out)
    }

    /// The digest (`sha256:<hex>`) of the one entry that `prefix` names:
    /// a digest or the start of one, with or without `sha256:`.
    pub fn resolve(&self, prefix: &str) -> Result<String, ImageError> {
        let hex = prefix.strip_prefix("sha256:").unwrap_or(prefix);
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ImageError::NoSuchImage(prefix.to_string()));
        }
        let hex = hex.to_ascii_lowercase();
        let found: Vec<String> = self
            .list()?
            .into_iter()
            .map(|e| e.digest)
            .filter(|d| d["sha256:".len()..].starts_with(&hex))
            .collect();
        match found.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(ImageError::NoSuchImage(prefix.to_string())),
            many => Err(ImageError::Ambiguous {
                prefix: prefix.to_string(),
                count: many.len(),
            }),
        }
    }

    /// Removes the entry `digest` (as [`Store::list`] gives it); its layers
    /// stay until [`Store::remove_unused_layers`].
    pub fn remove(&self, digest: &str) -> Result<(), ImageError> {
        let d = Sha256Digest::parse(digest).map_err(|source| ImageError::Layout {
            path: self.dir.clone(),
            source,
        })?;
        self.discard(&self.entry_dir(&d))
    }

    /// Removes `dir` (an entry or a layer): renamed into `tmp/` first, so
    /// it disappears at once, then deleted.
    fn discard(&self, dir: &Path) -> Result<(), ImageError> {
        Self::mkdir(&self.dir.join("tmp"), 0o700)?;
        let doomed = TempDir::new(&self.dir.join("tmp"))?;
        let target = doomed.path.join("entry");
        fs::rename(dir, &target).map_err(werr(dir))?;
        fs::remove_dir_all(&doomed.path).map_err(werr(&doomed.path))?;
        doomed.keep();
        Ok(())
    }

    /// Removes every cached layer that no entry in `sha256/` lists; returns
    /// how many. Removes none when an entry's `image.json` cannot be read
    /// (its layers are unknown).
    pub fn remove_unused_layers(&self) -> Result<usize, ImageError> {
        let mut keep = std::collections::HashSet::new();
        let entries = self.dir.join("sha256");
        match fs::read_dir(&entries) {
            Ok(rd) => {
                for e in rd {
                    let e = e.map_err(rerr(&entries))?;
                    let Ok(text) = fs::read(e.path().join("image.json")) else {
                        return Ok(0);
                    };
                    let Ok(meta) = serde_json::from_slice::<Meta>(&text) else {
                        return Ok(0);
                    };
                    for l in meta.layers {
                        keep.insert(l.digest);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(rerr(&entries)(e)),
        }
        let dir = self.layers_dir();
        let rd = match fs::read_dir(&dir) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(rerr(&dir)(e)),
        };
        let mut n = 0;
        for e in rd {
            let e = e.map_err(rerr(&dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !keep.contains(&format!("sha256:{name}")) {
                self.discard(&e.path())?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Removes the whole cache; refused while `containers` (the IDs in the
    /// state root) is not empty, as one of them may run on a cached image.
    pub fn prune(&self, containers: &[String]) -> Result<usize, ImageError> {
        if let Some(c) = containers.first() {
            return Err(ImageError::InUse(c.clone()));
        }
        let n = self.list()?.len();
        match fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(werr(&self.dir)(e)),
        }
    }
}

fn set_mode(p: &Path, mode: u32) -> Result<(), ImageError> {
    fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(mode)).map_err(werr(p))
}

/// The image's own top layer at `top`: the mount points of
/// [`MOUNT_POINTS`] that none of `layers` (top first) has, each an empty
/// directory (0755, host root's). Not created when nothing is missing.
fn make_top(top: &Path, layers: &[PathBuf]) -> Result<(), ImageError> {
    let mut missing = Vec::new();
    for m in MOUNT_POINTS {
        if !in_layers(layers, m)? {
            missing.push(*m);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    Store::mkdir(top, 0o755)?;
    for m in missing {
        Store::mkdir(&top.join(m), 0o755)?;
    }
    Ok(())
}

/// Whether the top-level `name` shows in the overlay of `layers` (top
/// first): the first layer that has it decides, and a whiteout hides it.
fn in_layers(layers: &[PathBuf], name: &str) -> Result<bool, ImageError> {
    for l in layers {
        let p = l.join(name);
        match rustix::fs::statat(rustix::fs::CWD, &p, rustix::fs::AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => return Ok(!unpack::is_overlay_whiteout(&st)),
            Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(rerr(&p)(e.into())),
        }
    }
    Ok(false)
}

/// A directory image: `DIR/rootfs` with the process of `DIR/config.json`
/// for an OCI bundle, else `DIR` itself.
fn prepare_dir(p: &Path) -> Result<Prepared, ImageError> {
    let cfg = p.join("config.json");
    if cfg.is_file() && p.join("rootfs").is_dir() {
        let text = read_small(&cfg)?;
        let v: serde_json::Value = serde_json::from_slice(&text).map_err(|e| ImageError::Read {
            path: cfg.clone(),
            source: e.into(),
        })?;
        let strings = |v: &serde_json::Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        let proc = &v["process"];
        let user = match (proc["user"]["uid"].as_u64(), proc["user"]["gid"].as_u64()) {
            (Some(u), Some(g)) => format!("{u}:{g}"),
            _ => String::new(),
        };
        let rootfs = fs::canonicalize(p.join("rootfs")).map_err(rerr(p))?;
        make_mount_points(&rootfs)?;
        return Ok(Prepared {
            layers: vec![rootfs],
            config: RunConfig {
                env: strings(&proc["env"]),
                cmd: strings(&proc["args"]),
                working_dir: proc["cwd"].as_str().unwrap_or("").to_string(),
                user,
                entrypoint: Vec::new(),
            },
            digest: None,
        });
    }
    let rootfs = fs::canonicalize(p).map_err(rerr(p))?;
    make_mount_points(&rootfs)?;
    Ok(Prepared {
        layers: vec![rootfs],
        config: RunConfig::default(),
        digest: None,
    })
}

/// Creates the mount points of [`MOUNT_POINTS`] inside `rootfs`, resolved
/// inside it (a symlink in the image cannot lead out).
pub fn make_mount_points(rootfs: &Path) -> Result<(), ImageError> {
    let fd = rustix::fs::open(
        rootfs,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| rerr(rootfs)(e.into()))?;
    for m in MOUNT_POINTS {
        moat_jail::rootfs::resolve::mkdir_all(fd.as_fd(), Path::new(m))
            .map_err(werr(&rootfs.join(m)))?;
    }
    Ok(())
}

/// Creates `dst` (a directory, or an empty file when `file`) inside
/// `rootfs` for a volume, resolved inside it.
pub fn make_volume_point(rootfs: &Path, dst: &Path, file: bool) -> Result<(), ImageError> {
    use moat_jail::rootfs::resolve::{open_or_create, Kind};
    let fd = rustix::fs::open(
        rootfs,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| rerr(rootfs)(e.into()))?;
    let kind = if file { Kind::File } else { Kind::Dir };
    open_or_create(fd.as_fd(), dst, kind, false).map_err(werr(dst))?;
    Ok(())
}

/// A file's identity and version: device, inode, size, mtime and ctime.
fn file_stamp(md: &fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!(
        "{}:{}:{}:{}.{}:{}.{}",
        md.dev(),
        md.ino(),
        md.size(),
        md.mtime(),
        md.mtime_nsec(),
        md.ctime(),
        md.ctime_nsec()
    )
}

/// The sha256 of a whole file.
pub fn file_digest(p: &Path) -> Result<Sha256Digest, ImageError> {
    let mut f = fs::File::open(p).map_err(rerr(p))?;
    let mut h = Sha256::new();
    io::copy(&mut f, &mut h).map_err(rerr(p))?;
    Ok(Sha256Digest::from_hasher(h))
}

/// Unpacks the layer `src` into `dest`, checking its digests (the file's
/// and the uncompressed tar's, when known). Returns the uncompressed tar's
/// digest (its diff_id) and the bytes of files written.
/// Unpacks one layer within `limits`, whose byte budget it spends.
fn unpack_layer(
    src: LayerSrc,
    dest: &Path,
    progress: &mut dyn FnMut(u64),
    owners: unpack::Owners,
    whiteouts: unpack::Whiteouts,
    limits: &mut unpack::Limits,
) -> Result<(Sha256Digest, u64), ImageError> {
    let p = src.path;
    let mut tracked = Tracked {
        inner: src.file,
        hash: Sha256::new(),
        progress,
    };
    let (diff_id, stats) = {
        let mut h = Hashing {
            inner: decompressed(&mut tracked).map_err(rerr(&p))?,
            hash: Sha256::new(),
        };
        let stats =
            unpack::unpack_limited(&mut h, dest, owners, whiteouts, limits).map_err(|source| {
                ImageError::Unpack {
                    path: p.clone(),
                    source,
                }
            })?;
        limits.max_bytes -= stats.bytes.min(limits.max_bytes);
        (Sha256Digest::from_hasher(h.hash), stats)
    };
    // Whatever follows the compressed stream is part of the blob too.
    io::copy(&mut tracked, &mut io::sink()).map_err(rerr(&p))?;
    let blob = Sha256Digest::from_hasher(tracked.hash);
    for (want, got) in [(src.blob, blob), (src.diff_id, diff_id.clone())] {
        if let Some(want) = want {
            if want != got {
                return Err(ImageError::DigestMismatch {
                    path: p,
                    expected: want.to_string(),
                    actual: got.to_string(),
                });
            }
        }
    }
    Ok((diff_id, stats.bytes))
}

fn read_small(p: &Path) -> Result<Vec<u8>, ImageError> {
    let f = fs::File::open(p).map_err(rerr(p))?;
    read_bounded(f, p)
}

fn read_bounded(f: impl Read, p: &Path) -> Result<Vec<u8>, ImageError> {
    let mut b = Vec::new();
    f.take(layout::MAX_JSON + 1)
        .read_to_end(&mut b)
        .map_err(rerr(p))?;
    if b.len() as u64 > layout::MAX_JSON {
        return Err(ImageError::TooLarge {
            path: p.to_path_buf(),
            max: layout::MAX_JSON,
        });
    }
    Ok(b)
}

/// A small blob of an OCI layout, its sha256 checked.
fn read_blob(layout_dir: &Path, digest: &str) -> Result<(PathBuf, Vec<u8>), ImageError> {
    let d = Sha256Digest::parse(digest).map_err(|source| ImageError::Layout {
        path: layout_dir.to_path_buf(),
        source,
    })?;
    let p = layout_dir.join("blobs/sha256").join(d.hex());
    let b = read_small(&p)?;
    let got = Sha256Digest::of(&b);
    if got != d {
        return Err(ImageError::DigestMismatch {
            path: p,
            expected: d.to_string(),
            actual: got.to_string(),
        });
    }
    Ok((p, b))
}

/// Opens `name` inside `dir`, symlinks resolved inside it.
fn open_in(dir: &Path, name: &str) -> Result<fs::File, ImageError> {
    let p = dir.join(name);
    let root = rustix::fs::open(
        dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| rerr(dir)(e.into()))?;
    let fd = moat_jail::rootfs::resolve::in_root(root.as_fd(), Path::new(name), OFlags::RDONLY)
        .map_err(rerr(&p))?;
    Ok(fs::File::from(fd))
}

/// How errors name the member `name` of `archive` (never as a host path:
/// "/etc/shadow" in an archive is not the host's).
fn member_path(archive: &Path, name: &str) -> PathBuf {
    PathBuf::from(format!("{} (archive member {name:?})", archive.display()))
}

/// The member `name` of `archive`, unpacked in `dir`.
fn open_member(dir: &Path, archive: &Path, name: &str) -> Result<fs::File, ImageError> {
    let member_err = |source| ImageError::Member {
        archive: archive.to_path_buf(),
        member: name.to_string(),
        source,
    };
    let root = rustix::fs::open(
        dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| rerr(dir)(e.into()))?;
    let fd = moat_jail::rootfs::resolve::in_root(root.as_fd(), Path::new(name), OFlags::RDONLY)
        .map_err(member_err)?;
    Ok(fs::File::from(fd))
}

fn read_member(dir: &Path, archive: &Path, name: &str) -> Result<Vec<u8>, ImageError> {
    read_bounded(
        open_member(dir, archive, name)?,
        &member_path(archive, name),
    )
}

fn read_in(dir: &Path, name: &str) -> Result<(PathBuf, Vec<u8>), ImageError> {
    let p = dir.join(name);
    let b = read_bounded(open_in(dir, name)?, &p)?;
    Ok((p, b))
}

/// A scratch directory, removed on drop unless kept.
struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    fn new(parent: &Path) -> Result<TempDir, ImageError> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = parent.join(format!(
            "{}-{nanos:x}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(werr(&path))?;
        Ok(TempDir { path, keep: false })
    }

    fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            // Unpacked content never holds mounts: a plain recursive removal
            // (remove_dir_all does not follow symlinks).
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// `USER[:GROUP]` of an image config as numeric IDs: numbers, or names
/// looked up in the image's own /etc/passwd and /etc/group (read inside
/// the root). Empty is root.
pub fn resolve_user(rootfs: &Path, spec: &str) -> Option<(u32, u32)> {
    if spec.is_empty() {
        return Some((0, 0));
    }
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd = read_in(rootfs, "etc/passwd").ok().map(|(_, b)| b);
    let group = read_in(rootfs, "etc/group").ok().map(|(_, b)| b);
    let (uid, primary) = match u.parse::<u32>() {
        Ok(n) => (
            n,
            lookup(passwd.as_deref(), |f| f[2] == u).and_then(|f| f[3].parse().ok()),
        ),
        Err(_) => {
            let f = lookup(passwd.as_deref(), |f| f[0] == u)?;
            (f[2].parse().ok()?, f[3].parse().ok())
        }
    };
    let gid = match g {
        None => primary.unwrap_or(uid),
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => lookup(group.as_deref(), |f| f[0] == g)?[2].parse().ok()?,
        },
    };
    Some((uid, gid))
}

fn lookup(file: Option<&[u8]>, pred: impl Fn(&[&str]) -> bool) -> Option<Vec<String>> {
    let text = String::from_utf8_lossy(file?).into_owned();
    text.lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 4 && pred(f))
        .map(|f| f.iter().map(|s| s.to_string()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detect_sources() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().to_str().unwrap();
        assert_eq!(Source::detect(dir), Some(Source::Dir(dir.into())));
        assert_eq!(
            Source::detect(&format!("oci:{dir}:v1")),
            Some(Source::OciLayout {
                path: dir.into(),
                tag: Some("v1".into())
            })
        );
        assert_eq!(
            Source::detect(&format!("oci:{dir}")),
            Some(Source::OciLayout {
                path: dir.into(),
                tag: None
            })
        );
        // Programs and missing paths are commands, not images.
        assert_eq!(Source::detect("/bin/sh"), None);
        assert_eq!(Source::detect("sh"), None);
        let tar = t.path().join("r.tar");
        let mut b = tar::Builder::new(fs::File::create(&tar).unwrap());
        b.append_data(&mut tar::Header::new_gnu(), "x", &b""[..])
            .unwrap();
        b.finish().unwrap();
        drop(b);
        assert_eq!(
            Source::detect(tar.to_str().unwrap()),
            Some(Source::Tarball(tar.clone()))
        );
    }

    #[test]
    fn users_from_the_image() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir(t.path().join("etc")).unwrap();
        fs::write(
            t.path().join("etc/passwd"),
            "root:x:0:0::/:/bin/sh\napp:x:1000:1001::/:/bin/sh\n",
        )
        .unwrap();
        fs::write(t.path().join("etc/group"), "staff:x:50:\n").unwrap();
        assert_eq!(resolve_user(t.path(), ""), Some((0, 0)));
        assert_eq!(resolve_user(t.path(), "app"), Some((1000, 1001)));
        assert_eq!(resolve_user(t.path(), "1000"), Some((1000, 1001)));
        assert_eq!(resolve_user(t.path(), "7"), Some((7, 7)));
        assert_eq!(resolve_user(t.path(), "app:staff"), Some((1000, 50)));
        assert_eq!(resolve_user(t.path(), "nope"), None);
    }

    /// A tar of `files` (name, contents), as a file in `dir`.
    fn tar_file(dir: &Path, name: &str, files: &[(&str, &[u8])]) -> PathBuf {
        let p = dir.join(name);
        let mut b = tar::Builder::new(fs::File::create(&p).unwrap());
        for (n, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, n, *data).unwrap();
        }
        b.finish().unwrap();
        p
    }

    #[test]
    fn layers_are_shared_and_removed_when_unused() {
        if moat_core::testing::needs_root("layers_are_shared_and_removed_when_unused") {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let store = Store::new(&t.path().join("state"));
        let a = tar_file(t.path(), "a.tar", &[("etc/x", b"x")]);
        let b = tar_file(t.path(), "b.tar", &[("etc/y", b"yy")]);
        // The same layer compressed: another image, the same layer.
        let gz = t.path().join("a.tar.gz");
        let mut enc = flate2::write::GzEncoder::new(
            fs::File::create(&gz).unwrap(),
            flate2::Compression::fast(),
        );
        io::copy(&mut fs::File::open(&a).unwrap(), &mut enc).unwrap();
        enc.finish().unwrap();
        let mut none = |_: u64, _: u64| {};
        let pa = store.prepare(&Source::Tarball(a), &mut none).unwrap();
        let pg = store.prepare(&Source::Tarball(gz), &mut none).unwrap();
        let pb = store.prepare(&Source::Tarball(b), &mut none).unwrap();
        // One layer each, below a top layer with the mount points.
        assert_eq!(pa.layers.len(), 2);
        assert!(pa.layers[0].join("proc").is_dir());
        assert_eq!(pa.layers[1], pg.layers[1]);
        assert_ne!(pa.layers[1], pb.layers[1]);
        assert_eq!(fs::read(pa.layers[1].join("etc/x")).unwrap(), b"x");
        let layers = store.layers_dir();
        let count = || fs::read_dir(&layers).unwrap().count();
        assert_eq!(count(), 2);
        assert_eq!(store.list().unwrap().len(), 3);
        // Gone from the entry that uses it: the entry is rebuilt.
        fs::remove_dir_all(pb.layers[1].parent().unwrap()).unwrap();
        let again = store.prepare(&Source::Tarball(t.path().join("b.tar")), &mut none);
        assert!(again.unwrap().layers[1].join("etc/y").is_file());
        store.remove(&pa.digest.unwrap().to_string()).unwrap();
        assert_eq!(store.remove_unused_layers().unwrap(), 0);
        store.remove(&pg.digest.unwrap().to_string()).unwrap();
        assert_eq!(store.remove_unused_layers().unwrap(), 1);
        assert_eq!(count(), 1);
        assert_eq!(store.list().unwrap().len(), 1);
    }
}
