//! cgroups v1 and v2 behind one manager.
//!
//! CONTRACT (called by the container lifecycle; implement, keep the signatures):
//! ```ignore
//! pub enum CgroupManager { V1(v1::Manager), V2(v2::Manager) }
//! impl CgroupManager {
//!     /// Detect the host layout (v1, hybrid, unified) and resolve the container's cgroup from
//!     /// `cgroupsPath` (None => "/<id>" like runc). `systemd` => clear error if no systemd.
//!     pub fn new(cgroups_path: Option<&Path>, id: &str, systemd: bool, rootless: bool) -> Result<Self, CgroupError>;
//!     /// Rebuild from what `to_saved()` returned (stored in state.json).
//!     pub fn from_saved(v: &serde_json::Value) -> Result<Self, CgroupError>;
//!     pub fn to_saved(&self) -> serde_json::Value;
//!     /// mkdir the cgroup(s) and apply `resources`; then `add_pid`.
//!     pub fn create(&self, resources: Option<&LinuxResources>) -> Result<(), CgroupError>;
//!     pub fn add_pid(&self, pid: i32) -> Result<(), CgroupError>;
//!     pub fn update(&self, resources: &LinuxResources) -> Result<(), CgroupError>;
//!     pub fn freeze(&self) -> Result<(), CgroupError>;  pub fn thaw(&self) -> Result<(), CgroupError>;
//!     pub fn pids(&self) -> Result<Vec<i32>, CgroupError>;
//!     pub fn stats(&self) -> Result<Stats, CgroupError>;   // serializes as runc's events "stats" data
//!     /// Kill remaining members (SIGKILL), wait for them to leave, rmdir. Idempotent.
//!     pub fn destroy(&self) -> Result<(), CgroupError>;
//!     /// (controller or "" for v2, host path) for the container's cgroup mount without cgroupns.
//!     pub fn mount_sources(&self) -> Vec<(String, PathBuf)>;
//!     pub fn is_v2(&self) -> bool;
//! }
//! ```
