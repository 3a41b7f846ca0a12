//! Host ID ranges for user namespaces: each container gets a block of host
//! UIDs/GIDs of its own, so no two live containers (and no host user) share
//! an identity.
//!
//! The pool is `base + block * n` for `n` in `0..count`. A block is skipped
//! when it overlaps any UID/GID named in the host's /etc/passwd or
//! /etc/group, or any range in /etc/subuid or /etc/subgid. Allocations are
//! files `<dir>/slot-<n>` holding the owner's PID and start time, created
//! under an exclusive `flock` on `<dir>/lock`; an allocation whose owner has
//! died is reclaimed by the next allocation.
use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Where the pool lies in the host's ID space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdPool {
    /// First host ID of block 0.
    pub base: u32,
    /// IDs per block (the size of each container's map).
    pub block: u32,
    /// Number of blocks.
    pub count: u32,
}

pub const DEFAULT_POOL: IdPool = IdPool {
    base: 2_000_000_000,
    block: 65536,
    count: 4096,
};

/// Environment variables that override [`DEFAULT_POOL`].
pub const ENV_BASE: &str = "MOAT_IDPOOL_BASE";
pub const ENV_COUNT: &str = "MOAT_IDPOOL_SIZE";

/// Where the host's allocations live: one directory for the whole host,
/// whatever state root a run uses, so that runs under different roots
/// never get the same block. `MOAT_IDALLOC_DIR` overrides it (every moat
/// on a host must then use the same one, and the same pool).
pub const DEFAULT_DIR: &str = "/run/moat-ids";
pub const ENV_DIR: &str = "MOAT_IDALLOC_DIR";

/// The allocator directory: [`ENV_DIR`] or [`DEFAULT_DIR`].
pub fn allocator_dir() -> PathBuf {
    std::env::var_os(ENV_DIR)
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_DIR), PathBuf::from)
}

#[derive(Debug, thiserror::Error)]
pub enum IdAllocError {
    #[error("invalid ID pool (base {base}, {count} blocks of {block}): it must fit below 2^32-1")]
    BadPool { base: u32, block: u32, count: u32 },
    #[error("invalid {var}={value:?}")]
    BadEnv { var: &'static str, value: String },
    #[error("cannot create {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot lock {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no free host ID range: all {0} blocks of the pool are in use or overlap host IDs")]
    Exhausted(u32),
}

impl IdPool {
    /// [`DEFAULT_POOL`] with the environment's overrides, validated.
    pub fn from_env() -> Result<IdPool, IdAllocError> {
        let mut p = DEFAULT_POOL;
        let get = |var: &'static str| -> Result<Option<u32>, IdAllocError> {
            match std::env::var(var) {
                Ok(v) => v
                    .trim()
                    .replace('_', "")
                    .parse()
                    .map(Some)
                    .map_err(|_| IdAllocError::BadEnv { var, value: v }),
                Err(_) => Ok(None),
            }
        };
        if let Some(b) = get(ENV_BASE)? {
            p.base = b;
        }
        if let Some(c) = get(ENV_COUNT)? {
            p.count = c;
        }
        p.validate()?;
        Ok(p)
    }

    pub fn validate(&self) -> Result<(), IdAllocError> {
        let end = u64::from(self.base) + u64::from(self.block) * u64::from(self.count);
        if self.block == 0 || self.count == 0 || end >= u64::from(u32::MAX) {
            return Err(IdAllocError::BadPool {
                base: self.base,
                block: self.block,
                count: self.count,
            });
        }
        Ok(())
    }

    /// Host IDs of block `n`.
    pub fn range(&self, n: u32) -> Range<u64> {
        let start = u64::from(self.base) + u64::from(self.block) * u64::from(n);
        start..start + u64::from(self.block)
    }
}

/// The first block not taken and overlapping no reserved range.
pub fn pick_slot(pool: &IdPool, reserved: &[Range<u64>], taken: &BTreeSet<u32>) -> Option<u32> {
    (0..pool.count).find(|n| {
        let r = pool.range(*n);
        !taken.contains(n) && !reserved.iter().any(|x| x.start < r.end && r.start < x.end)
    })
}

/// IDs in the third field of passwd/group-style lines (`name:x:ID:...`).
pub fn parse_id_file(text: &str) -> Vec<Range<u64>> {
    text.lines()
        .filter_map(|l| l.split(':').nth(2)?.trim().parse::<u64>().ok())
        .map(|id| id..id + 1)
        .collect()
}

/// Ranges of /etc/subuid-style lines (`name:start:count`).
pub fn parse_sub_file(text: &str) -> Vec<Range<u64>> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':').skip(1);
            let start: u64 = f.next()?.trim().parse().ok()?;
            let count: u64 = f.next()?.trim().parse().ok()?;
            Some(start..start.saturating_add(count))
        })
        .collect()
}

/// Host files whose IDs the pool must avoid.
pub const HOST_ID_FILES: &[(&str, bool)] = &[
    ("/etc/passwd", false),
    ("/etc/group", false),
    ("/etc/subuid", true),
    ("/etc/subgid", true),
];

/// Reserved ranges from the host's files (missing files reserve nothing).
pub fn host_reserved() -> Result<Vec<Range<u64>>, IdAllocError> {
    let mut out = Vec::new();
    for (path, sub) in HOST_ID_FILES {
        let text = match fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(IdAllocError::Read {
                    path: PathBuf::from(path),
                    source,
                })
            }
        };
        out.extend(if *sub {
            parse_sub_file(&text)
        } else {
            parse_id_file(&text)
        });
    }
    Ok(out)
}

/// The owner recorded in an allocation file: PID and start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub pid: i32,
    pub start_time: u64,
}

impl Owner {
    pub fn current() -> Owner {
        let pid = std::process::id() as i32;
        Owner {
            pid,
            start_time: crate::procfs::pid_start_time(pid).unwrap_or(0),
        }
    }

    /// `PID START_TIME`, as allocation files and the run-owner annotation
    /// record an owner.
    pub fn record(&self) -> String {
        format!("{} {}", self.pid, self.start_time)
    }

    /// The inverse of [`Owner::record`].
    pub fn parse(s: &str) -> Option<Owner> {
        let mut f = s.split_whitespace();
        Some(Owner {
            pid: f.next()?.parse().ok()?,
            start_time: f.next()?.parse().ok()?,
        })
    }

    /// Whether this process still runs (same PID, same start time).
    pub fn alive(&self) -> bool {
        self.pid > 0 && crate::procfs::pid_start_time(self.pid) == Some(self.start_time)
    }
}

/// One allocated block; released (its file removed) on drop.
#[derive(Debug)]
pub struct IdAllocation {
    pub slot: u32,
    /// First host ID; container IDs `0..size` map to `host_start..`.
    pub host_start: u32,
    pub size: u32,
    path: PathBuf,
}

impl IdAllocation {
    /// Releases the block now, reporting a failure to remove its file.
    pub fn release(mut self) -> Result<(), IdAllocError> {
        let path = std::mem::take(&mut self.path);
        fs::remove_file(&path).map_err(|source| IdAllocError::Write { path, source })
    }
}

impl Drop for IdAllocation {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            // Best effort on error paths; a file left behind is reclaimed
            // once its owner is dead.
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// The allocator, rooted at a directory (e.g. `<state root>/.idalloc`).
#[derive(Debug, Clone)]
pub struct IdAllocator {
    pub dir: PathBuf,
    pub pool: IdPool,
}

const SLOT_PREFIX: &str = "slot-";

impl IdAllocator {
    pub fn new(dir: impl Into<PathBuf>, pool: IdPool) -> IdAllocator {
        IdAllocator {
            dir: dir.into(),
            pool,
        }
    }

    /// Allocates a block for `owner`, avoiding `reserved` host IDs.
    pub fn allocate(
        &self,
        owner: Owner,
        reserved: &[Range<u64>],
    ) -> Result<IdAllocation, IdAllocError> {
        self.pool.validate()?;
        let _lock = self.lock()?;
        let taken = self.live_slots(|o| o.alive())?;
        let slot = pick_slot(&self.pool, reserved, &taken)
            .ok_or(IdAllocError::Exhausted(self.pool.count))?;
        let path = self.dir.join(format!("{SLOT_PREFIX}{slot}"));
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            writeln!(f, "{}", owner.record())
        };
        write().map_err(|source| IdAllocError::Write {
            path: path.clone(),
            source,
        })?;
        Ok(IdAllocation {
            slot,
            host_start: self.pool.range(slot).start as u32,
            size: self.pool.block,
            path,
        })
    }

    /// Removes the files of blocks whose owner is dead (and which no
    /// process uses), as an allocation does first.
    pub fn reclaim(&self) -> Result<(), IdAllocError> {
        let _lock = self.lock()?;
        self.live_slots(|o| o.alive()).map(drop)
    }

    /// Slots held by live owners; files of dead owners (or unreadable
    /// content) are removed. Call with the lock held. An allocation is
    /// released without the lock (its owner removes its file), so a file
    /// listed here may be gone when read or removed: then it is free. An
    /// entry that is not a regular file was not made by an allocator: its
    /// block is taken (never used, never removed).
    fn live_slots(&self, alive: impl Fn(&Owner) -> bool) -> Result<BTreeSet<u32>, IdAllocError> {
        let rd = fs::read_dir(&self.dir).map_err(|source| IdAllocError::Read {
            path: self.dir.clone(),
            source,
        })?;
        let mut taken = BTreeSet::new();
        let mut uids = None;
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(n) = name
                .to_str()
                .and_then(|s| s.strip_prefix(SLOT_PREFIX))
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if self.slot_taken(&e.path(), n, &alive, &mut uids)? {
                taken.insert(n);
            }
        }
        Ok(taken)
    }

    /// Whether the slot file `path` (of block `n`) holds its block; a dead
    /// owner's file is removed.
    fn slot_taken(
        &self,
        path: &Path,
        n: u32,
        alive: &impl Fn(&Owner) -> bool,
        uids: &mut Option<Vec<u32>>,
    ) -> Result<bool, IdAllocError> {
        match fs::symlink_metadata(path) {
            Ok(md) if md.is_file() => {}
            Ok(_) => return Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(source) => {
                return Err(IdAllocError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        }
        let owner = match fs::read_to_string(path) {
            Ok(text) => Owner::parse(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(_) => None,
        };
        if owner.as_ref().is_some_and(alive) {
            return Ok(true);
        }
        if self.block_in_use(n, uids) {
            // The owner is gone but processes of its container still
            // run with IDs of the block (moat was killed and the
            // workload outlived it): the block stays theirs.
            return Ok(true);
        }
        match fs::remove_file(path) {
            Ok(()) => Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(IdAllocError::Write {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Whether a process runs with a user ID of block `slot`. `uids`
    /// caches one scan of /proc for the call.
    fn block_in_use(&self, slot: u32, uids: &mut Option<Vec<u32>>) -> bool {
        let range = self.pool.range(slot);
        uids.get_or_insert_with(process_uids)
            .iter()
            .any(|u| range.contains(&u64::from(*u)))
    }

    fn lock(&self) -> Result<File, IdAllocError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|source| IdAllocError::Dir {
                path: self.dir.clone(),
                source,
            })?;
        let path = self.dir.join("lock");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|source| IdAllocError::Lock {
                path: path.clone(),
                source,
            })?;
        rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive).map_err(|e| {
            IdAllocError::Lock {
                path,
                source: e.into(),
            }
        })?;
        Ok(f)
    }

    /// Slots currently recorded (live or not), for tests and diagnostics.
    pub fn recorded(&self) -> Vec<u32> {
        let mut v: Vec<u32> = fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix(SLOT_PREFIX)?
                    .parse()
                    .ok()
            })
            .collect();
        v.sort();
        v
    }
}

/// Whether `p` is the allocator's lock file (the only file a released
/// allocator directory keeps).
/// The real, effective, saved and filesystem user IDs of every process
/// (as the host sees them) but zombies: a zombie runs nothing (its parent
/// may be slow to reap it, as a killed run's workload reparented to a PID 1
/// that seldom reaps), so it does not keep a block.
pub fn process_uids() -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        if !e
            .file_name()
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        {
            continue;
        }
        let Ok(status) = fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let state = status.lines().find_map(|l| l.strip_prefix("State:"));
        if state.is_some_and(|s| matches!(s.trim_start().chars().next(), Some('Z' | 'X'))) {
            continue;
        }
        if let Some(line) = status.lines().find_map(|l| l.strip_prefix("Uid:")) {
            out.extend(
                line.split_whitespace()
                    .filter_map(|u| u.parse::<u32>().ok()),
            );
        }
    }
    out
}

pub fn is_lock_file(p: &Path) -> bool {
    p.file_name().is_some_and(|n| n == "lock")
}

#[cfg(test)]
mod tests {
    use super::*;

    const POOL: IdPool = IdPool {
        base: 1000,
        block: 100,
        count: 5,
    };

    #[test]
    fn picks_first_free_block_avoiding_host_ids() {
        let none = BTreeSet::new();
        assert_eq!(pick_slot(&POOL, &[], &none), Some(0));
        // uid 1050 sits in block 0; a subuid range covers blocks 1 and 2.
        let reserved = vec![1050..1051, 1150..1250];
        assert_eq!(pick_slot(&POOL, &reserved, &none), Some(3));
        let taken: BTreeSet<u32> = [3].into();
        assert_eq!(pick_slot(&POOL, &reserved, &taken), Some(4));
        let taken: BTreeSet<u32> = [3, 4].into();
        assert_eq!(pick_slot(&POOL, &reserved, &taken), None);
        // Touching the end of a block is not an overlap.
        let below: Vec<Range<u64>> = std::iter::once(900..1000).collect();
        assert_eq!(pick_slot(&POOL, &below, &none), Some(0));
    }

    #[test]
    fn parses_host_id_files() {
        let passwd =
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\nbad line\n";
        assert_eq!(parse_id_file(passwd), vec![0..1, 65534..65535]);
        let sub = "moatuser:100000:65536\n# c\nx:1:y\n";
        assert_eq!(parse_sub_file(sub), vec![100000..165536]);
    }

    #[test]
    fn pool_must_fit_in_u32() {
        assert!(DEFAULT_POOL.validate().is_ok());
        let p = IdPool {
            base: u32::MAX - 10,
            block: 65536,
            count: 1,
        };
        assert!(p.validate().is_err());
    }

    #[test]
    fn distinct_blocks_released_and_stale_reclaimed() {
        let tmp = tempfile::tempdir().unwrap();
        let a = IdAllocator::new(tmp.path().join("ids"), POOL);
        let me = Owner::current();
        let x = a.allocate(me, &[]).unwrap();
        let y = a.allocate(me, &[]).unwrap();
        assert_ne!(x.slot, y.slot);
        assert_eq!(x.host_start, 1000);
        assert_eq!(y.host_start, 1100);
        assert_eq!(a.recorded(), vec![0, 1]);
        x.release().unwrap();
        assert_eq!(a.recorded(), vec![1]);
        drop(y);
        assert!(a.recorded().is_empty());
        // A dead owner's slot (pid 0 is never alive; a wrong start time is a
        // reused pid) is reclaimed by the next allocation.
        fs::write(a.dir.join("slot-0"), "0 0\n").unwrap();
        fs::write(
            a.dir.join("slot-1"),
            format!("{} {}\n", me.pid, me.start_time + 1),
        )
        .unwrap();
        fs::write(a.dir.join("slot-2"), "garbage").unwrap();
        let z = a.allocate(me, &[]).unwrap();
        assert_eq!(z.slot, 0);
        assert_eq!(a.recorded(), vec![0]);
        // A live owner's slot is kept.
        let w = a.allocate(me, &[]).unwrap();
        assert_eq!(w.slot, 1);
    }

    #[test]
    fn a_block_with_live_processes_is_not_reclaimed() {
        if moat_core::testing::needs_root("a_block_with_live_processes_is_not_reclaimed") {
            return;
        }
        // A pool no host user is in: slot 1's owner is dead, but a process
        // runs as one of its IDs (a workload that outlived its moat).
        let pool = IdPool {
            base: 3_900_000_000,
            block: 100,
            count: 3,
        };
        let tmp = tempfile::tempdir().unwrap();
        let a = IdAllocator::new(tmp.path().join("ids"), pool);
        fs::create_dir_all(&a.dir).unwrap();
        fs::write(a.dir.join("slot-0"), "0 0\n").unwrap();
        fs::write(a.dir.join("slot-1"), "0 0\n").unwrap();
        let mut child = std::process::Command::new("setpriv")
            .args([
                "--reuid",
                "3900000150",
                "--regid",
                "3900000150",
                "--clear-groups",
            ])
            .args(["sleep", "30"])
            .spawn()
            .unwrap();
        // Until setpriv has switched, the process is still root's.
        let start = std::time::Instant::now();
        while !process_uids().contains(&3_900_000_150) {
            assert!(start.elapsed().as_secs() < 10, "setpriv never switched");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let me = Owner::current();
        let x = a.allocate(me, &[]).unwrap();
        let y = a.allocate(me, &[]).unwrap();
        assert_eq!((x.slot, y.slot), (0, 2), "slot 1 is still in use");
        child.kill().unwrap();
        child.wait().unwrap();
        drop(y);
        let z = a.allocate(me, &[]).unwrap();
        assert_eq!(z.slot, 1, "reclaimed once its processes are gone");
    }

    /// Issue 15, defect 3: an allocation released (its file removed, without
    /// the lock) between the listing and the read of its file used to fail
    /// the allocation ("cannot write …/slot-N: No such file or directory").
    #[test]
    fn a_slot_released_during_the_scan_is_free() {
        let tmp = tempfile::tempdir().unwrap();
        let a = IdAllocator::new(tmp.path().join("ids"), POOL);
        fs::create_dir_all(&a.dir).unwrap();
        let gone = a.dir.join("slot-3");
        let dead = |_: &Owner| false;
        assert!(!a.slot_taken(&gone, 3, &dead, &mut None).unwrap());
        // Read, then released before the dead owner's file is removed.
        fs::write(&gone, "0 0\n").unwrap();
        assert!(!a.slot_taken(&gone, 3, &dead, &mut None).unwrap());
        assert!(!a.slot_taken(&gone, 3, &dead, &mut None).unwrap());
    }

    /// Issue 15, defect 10: a directory named like a slot blocked every
    /// allocation on the host; now only its block is skipped.
    #[test]
    fn a_slot_that_is_not_a_file_only_takes_its_block() {
        let tmp = tempfile::tempdir().unwrap();
        let a = IdAllocator::new(tmp.path().join("ids"), POOL);
        fs::create_dir_all(a.dir.join("slot-0")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", a.dir.join("slot-1")).unwrap();
        let x = a.allocate(Owner::current(), &[]).unwrap();
        assert_eq!(x.slot, 2);
        drop(x);
        assert!(a.dir.join("slot-0").is_dir());
        assert!(fs::symlink_metadata(a.dir.join("slot-1")).is_ok());
    }

    #[test]
    fn one_allocator_for_the_host_by_default() {
        if std::env::var_os(ENV_DIR).is_none() {
            assert_eq!(allocator_dir(), PathBuf::from("/run/moat-ids"));
        }
    }

    #[test]
    fn exhausted_pool_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let a = IdAllocator::new(tmp.path(), POOL);
        let held: Vec<_> = (0..5)
            .map(|_| a.allocate(Owner::current(), &[]).unwrap())
            .collect();
        assert!(matches!(
            a.allocate(Owner::current(), &[]),
            Err(IdAllocError::Exhausted(5))
        ));
        drop(held);
    }
}
