//! The guest's page cache goes back to the host
//! (`RunRequest::reclaim_interval_ms`).
//!
//! Free page reporting (the balloon) gives the host the pages the guest
//! frees; page cache is not free, and a guest keeps what it once read or
//! wrote (its root's files, a file it wrote) until its memory runs short,
//! which in a guest sized for its workload may be never. The host holds
//! the same bytes in its own page cache (the image files, shared by every
//! VM), so the guest's copy of a file it no longer reads is memory held
//! twice.
//!
//! The agent therefore evicts file pages periodically, with the guest
//! kernel's multi-gen LRU (`lru_gen`, which the agent turns on at boot) and
//! its debugfs interface: every half interval it ages each memory
//! cgroup's LRU (a new youngest generation; mapped pages found accessed
//! since the last aging move into it), and every interval it evicts the
//! file pages of the generations at least three quarters of an interval
//! old. What that takes: a file mapping (a program's text, a library) the
//! workload has not touched for about an interval, and the page cache it
//! read or wrote through descriptors and has not read since — the kernel
//! files new page cache in the oldest generation, whatever its age. So a
//! pass may take a file the workload still reads: when the guest reads
//! from its disks more than one page in eight of what a pass evicted
//! before the next tick, passes come half as often (down to one in 8
//! intervals), and twice as often again after a pass followed by fewer
//! reads. A workload that keeps reading new files backs passes off too
//! (the reads cannot be told from those of evicted pages), hence the low
//! cap: what it read is back at most 8 intervals after it stopped, and a
//! file read all the time costs one read from the disk per 8 intervals.
//! A page read back comes from the disk: the host's page cache of the
//! image or layer, under the VMM.
//!
//! Only file pages (swappiness 0): without swap, anonymous memory and
//! tmpfs cannot leave, and dirty pages are written back first. The pages
//! evicted are free pages, which the balloon reports to the host.
//!
//! Nothing here is a security boundary: the interface is the agent's
//! alone (debugfs is mounted, the file opened and the mount detached at
//! once, so no path of the guest shows it), and a failure costs only the
//! memory it would have given back (traced with `debug`).
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::time::{Duration, Instant};

/// The multi-gen LRU's switch.
const LRU_GEN_ENABLED: &str = "/sys/kernel/mm/lru_gen/enabled";
/// Where debugfs is mounted for the moment it takes to open `lru_gen`.
const DEBUGFS_AT: &str = "/run/vm-debugfs";

/// Turns the guest kernel's multi-gen LRU on (Debian's cloud kernel has it
/// built, off by default): at boot, before the agent's hello, so a
/// snapshot's guest has it on. A kernel without it keeps its classic LRU,
/// and [`Reclaimer::open`] then finds no interface.
pub fn enable_lru_gen() {
    if let Err(e) = std::fs::write(LRU_GEN_ENABLED, "y") {
        super::trace(&format!("no multi-gen LRU: {e}"));
    }
}

/// One generation of one LRU, as `lru_gen` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gen {
    pub seq: u64,
    pub age_ms: u64,
    pub file_pages: u64,
}

/// One memory cgroup's LRU on one NUMA node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lruvec {
    pub memcg: u64,
    pub node: u64,
    /// Oldest first.
    pub gens: Vec<Gen>,
}

/// Parses `/sys/kernel/debug/lru_gen`:
///
/// ```text
/// memcg  ID  PATH
///  node  NID
///   SEQ  AGE_MS  ANON_PAGES  FILE_PAGES
/// ```
///
/// A count is `-0` where the generation is older than that type's oldest.
/// Lines that do not parse are skipped (a later kernel's extra columns are
/// ignored).
pub fn parse(listing: &str) -> Vec<Lruvec> {
    let mut out: Vec<Lruvec> = Vec::new();
    let mut memcg: Option<u64> = None;
    for line in listing.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["memcg", id, ..] => memcg = id.parse().ok(),
            ["node", nid, ..] => {
                if let (Some(m), Ok(n)) = (memcg, nid.parse()) {
                    out.push(Lruvec {
                        memcg: m,
                        node: n,
                        gens: Vec::new(),
                    });
                }
            }
            [seq, age, _anon, file, ..] => {
                let (Some(v), Ok(seq), Ok(age_ms)) = (out.last_mut(), seq.parse(), age.parse())
                else {
                    continue;
                };
                // "-0": none of this type left in the generation.
                let file_pages = file.parse().unwrap_or(0);
                v.gens.push(Gen {
                    seq,
                    age_ms,
                    file_pages,
                });
            }
            _ => {}
        }
    }
    out
}

/// The command that ages `v`: a new youngest generation, into which the
/// pages found accessed since the last aging move.
pub fn aging(v: &Lruvec) -> Option<String> {
    let max = v.gens.iter().map(|g| g.seq).max()?;
    Some(format!("+ {} {} {}", v.memcg, v.node, max))
}

/// File pages evicted by one command: 32 MiB, ~35 ms of a TCG guest (a
/// pass of 650 MiB in one command held the agent's loop for 700 ms).
pub const CHUNK_PAGES: u64 = 8192;

/// What a pass evicts from one LRU: the file pages of its generations up
/// to `upto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evict {
    pub memcg: u64,
    pub node: u64,
    pub upto: u64,
}

impl Evict {
    /// The command that evicts the next chunk (swappiness 0: file pages
    /// only).
    pub fn command(&self) -> String {
        format!(
            "- {} {} {} 0 {CHUNK_PAGES}",
            self.memcg, self.node, self.upto
        )
    }

    /// The file pages left in its generations, as `lruvecs` lists them.
    pub fn left(&self, lruvecs: &[Lruvec]) -> u64 {
        lruvecs
            .iter()
            .filter(|v| v.memcg == self.memcg && v.node == self.node)
            .flat_map(|v| &v.gens)
            .filter(|g| g.seq <= self.upto)
            .map(|g| g.file_pages)
            .sum()
    }
}

/// What a pass evicts from `v`, after [`aging`]: the file pages of every
/// generation at least `min_age_ms` old (up to and including the youngest
/// such generation; the kernel keeps the two youngest, counted after the
/// aging), if any of them holds file pages.
pub fn eviction(v: &Lruvec, min_age_ms: u64) -> Option<Evict> {
    let max = v.gens.iter().map(|g| g.seq).max()?;
    let old: Vec<&Gen> = v
        .gens
        .iter()
        .filter(|g| g.age_ms >= min_age_ms && g.seq + 2 <= max + 1)
        .collect();
    let upto = old.iter().map(|g| g.seq).max()?;
    old.iter().any(|g| g.file_pages > 0).then_some(Evict {
        memcg: v.memcg,
        node: v.node,
        upto,
    })
}

/// A pass under way: one chunk per turn of the agent's loop, so that the
/// loop relays stdio and signals between chunks.
struct Pass {
    /// Each LRU's eviction, the file pages it may still take (what its
    /// generations held at the pass's start, less a chunk per command: new
    /// page cache lands in the oldest generation, and a workload reading
    /// all the while must not keep a pass going), and the file pages left
    /// in them at the last listing.
    queue: std::collections::VecDeque<(Evict, u64, u64)>,
    /// File pages in all LRUs at the start.
    before: u64,
    started: Instant,
}

/// The most an eviction pass backs off: one pass in 2^3 intervals.
pub const MAX_BACKOFF: u32 = 3;

/// The backoff after a pass that evicted `evicted` file pages, of which
/// the guest read `refaulted` pages from its disks before the next tick: a
/// pass followed by reads of more than one page in eight of it most
/// likely took pages still in use, and the next waits twice as long; a
/// pass followed by fewer halves the wait.
pub fn next_backoff(backoff: u32, evicted: u64, refaulted: u64) -> u32 {
    if evicted == 0 {
        backoff
    } else if refaulted.saturating_mul(8) > evicted {
        (backoff + 1).min(MAX_BACKOFF)
    } else {
        backoff.saturating_sub(1)
    }
}

/// The agent's end of `lru_gen`: ages every half interval, evicts old
/// generations' file pages every interval (less often after passes whose
/// pages came back: [`next_backoff`]).
pub struct Reclaimer {
    /// `lru_gen`, opened at the first tick (not on the container's start).
    file: Option<File>,
    interval_ms: u64,
    period: Duration,
    next: Instant,
    /// Ticks until the next eviction pass.
    wait: u32,
    backoff: u32,
    /// The last pass: file pages evicted, and the pages read from the
    /// guest's disks right after it (judged at the next tick).
    last_pass: Option<(u64, u64)>,
    pass: Option<Pass>,
}

impl Reclaimer {
    /// A reclaimer whose first tick is half an interval from now; `None`
    /// where `interval_ms` is 0 (reclaim off).
    pub fn new(interval_ms: u64) -> Option<Reclaimer> {
        if interval_ms == 0 {
            return None;
        }
        let period = Duration::from_millis((interval_ms / 2).max(500));
        Some(Reclaimer {
            file: None,
            interval_ms,
            period,
            next: Instant::now() + period,
            // The first pass one interval after the start.
            wait: 1,
            backoff: 0,
            last_pass: None,
            pass: None,
        })
    }

    /// How long until the next tick or chunk (zero when it is due).
    pub fn due_in(&self) -> Duration {
        if self.pass.is_some() {
            return Duration::ZERO;
        }
        self.next.saturating_duration_since(Instant::now())
    }

    /// Runs a tick if one is due: ages every LRU; on a pass's tick, starts
    /// evicting the file pages of generations at least three quarters of
    /// an interval old — in steady state those born two agings ago. While
    /// a pass is under way, evicts its next chunk instead. The first tick
    /// opens `lru_gen` through a debugfs mount that is detached at once;
    /// false (and a trace) where the kernel has no such interface: the
    /// reclaimer is done.
    pub fn tick_if_due(&mut self) -> bool {
        if self.pass.is_some() {
            self.evict_chunk();
            return true;
        }
        if Instant::now() < self.next {
            return true;
        }
        self.next = Instant::now() + self.period;
        if self.file.is_none() {
            match open_lru_gen() {
                Ok(f) => self.file = Some(f),
                Err(e) => {
                    super::trace(&format!("no page cache reclaim: {e}"));
                    return false;
                }
            }
        }
        if let Some((evicted, read)) = self.last_pass.take() {
            let back = read_pages().saturating_sub(read);
            self.backoff = next_backoff(self.backoff, evicted, back);
            // The next pass 2^backoff intervals after this one.
            self.wait = (1u32 << (self.backoff + 1)) - 1;
            super::trace(&format!(
                "reclaim: {back} of {evicted} pages came back, backoff {}",
                self.backoff
            ));
        }
        let Some(lruvecs) = self.listing() else {
            return true;
        };
        for v in &lruvecs {
            if let Some(cmd) = aging(v) {
                self.command(&cmd);
            }
        }
        if self.wait > 0 {
            self.wait -= 1;
            return true;
        }
        // The next tick judges this pass and sets the wait after it.
        let min_age = self.interval_ms.saturating_mul(3) / 4;
        self.pass = Some(Pass {
            queue: lruvecs
                .iter()
                .filter_map(|v| eviction(v, min_age))
                .map(|e| (e, e.left(&lruvecs), e.left(&lruvecs)))
                .collect(),
            before: file_pages(&lruvecs),
            started: Instant::now(),
        });
        self.evict_chunk();
        true
    }

    /// Evicts the next chunk of the pass under way; once its LRUs are
    /// done (nothing left in their old generations, a chunk that took
    /// nothing, their budget spent, a refused command), ends the pass.
    fn evict_chunk(&mut self) {
        let Some(mut pass) = self.pass.take() else {
            return;
        };
        let mut lruvecs = None;
        if let Some((e, budget, was)) = pass.queue.pop_front() {
            let taken = self.command(&e.command());
            let listed = self.listing();
            let now = listed.as_deref().map_or(0, |l| e.left(l));
            let budget = budget.saturating_sub(CHUNK_PAGES);
            if taken && now > 0 && now < was && budget > 0 {
                pass.queue.push_front((e, budget, now));
            }
            lruvecs = listed;
        }
        if !pass.queue.is_empty() {
            self.pass = Some(pass);
            return;
        }
        let after = lruvecs
            .or_else(|| self.listing())
            .map_or(pass.before, |l| file_pages(&l));
        let evicted = pass.before.saturating_sub(after);
        super::trace(&format!(
            "reclaim: evicted {evicted} file pages in {} ms",
            pass.started.elapsed().as_millis()
        ));
        self.last_pass = Some((evicted, read_pages()));
    }

    /// One command per write: the kernel parses a write whole. A refused
    /// command (the memory cgroup went away, its generations moved on) is
    /// for the next tick to redo. Whether it was taken.
    fn command(&mut self, cmd: &str) -> bool {
        let Some(file) = self.file.as_mut() else {
            return false;
        };
        match file.write_all(cmd.as_bytes()) {
            Ok(()) => true,
            Err(e) => {
                super::trace(&format!("lru_gen {cmd:?}: {e}"));
                false
            }
        }
    }

    fn listing(&mut self) -> Option<Vec<Lruvec>> {
        let file = self.file.as_mut()?;
        let mut s = String::new();
        match file.rewind().and_then(|()| file.read_to_string(&mut s)) {
            Ok(_) => Some(parse(&s)),
            Err(e) => {
                super::trace(&format!("lru_gen: {e}"));
                None
            }
        }
    }
}

fn file_pages(lruvecs: &[Lruvec]) -> u64 {
    lruvecs
        .iter()
        .flat_map(|v| &v.gens)
        .map(|g| g.file_pages)
        .sum()
}

/// Pages the guest has read from its virtio disks so far (the kernel's
/// sectors read, in 4 KiB pages). What a pass evicted and the workload
/// reads again shows here; the kernel's own refault count
/// (`workingset_refault_file`) does not: it counts a refault only while
/// the generation the page left is still the oldest, and a pass evicts
/// whole generations.
fn read_pages() -> u64 {
    let Ok(dir) = std::fs::read_dir("/sys/block") else {
        return 0;
    };
    dir.flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("vd"))
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|s| sectors_read(&s))
        .sum::<u64>()
        / 8
}

/// The sectors read (third field) of a block device's `stat`.
fn sectors_read(stat: &str) -> Option<u64> {
    stat.split_whitespace().nth(2)?.parse().ok()
}

fn open_lru_gen() -> std::io::Result<File> {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    std::fs::create_dir_all(DEBUGFS_AT)?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        Some("debugfs"),
        DEBUGFS_AT,
        Some("debugfs"),
        flags,
        None::<&str>,
    )
    .map_err(std::io::Error::from)?;
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("{DEBUGFS_AT}/lru_gen"));
    // Detached whatever the open did: the descriptor keeps the file.
    let detached = umount2(DEBUGFS_AT, MntFlags::MNT_DETACH).map_err(std::io::Error::from);
    let _ = std::fs::remove_dir(DEBUGFS_AT);
    let file = opened?;
    detached?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The listing of Debian's 6.1 cloud kernel in a moat guest (two memory
    // cgroups: the root and the container's).
    const LISTING: &str = "memcg     1 /
 node     0
          4      30811          0         55 
          5      20117        120          0 
          6      10034         -0        310 
          7         12         88       4100 
memcg     5 /w0
 node     0
          2      12000         -0      61000 
          3       5000          3          7 
          4          9          0          1 
";

    #[test]
    fn the_listing_parses() {
        let v = parse(LISTING);
        assert_eq!(v.len(), 2);
        assert_eq!((v[0].memcg, v[0].node), (1, 0));
        assert_eq!(v[0].gens.len(), 4);
        assert_eq!(
            v[0].gens[2],
            Gen {
                seq: 6,
                age_ms: 10034,
                file_pages: 310
            }
        );
        assert_eq!(v[1].memcg, 5);
        assert_eq!(v[1].gens[0].file_pages, 61000);
        assert!(parse("garbage\n 1 2\n").is_empty());
    }

    #[test]
    fn a_tick_ages_and_evicts_only_old_generations() {
        let v = parse(LISTING);
        assert_eq!(aging(&v[0]).as_deref(), Some("+ 1 0 7"));
        assert_eq!(aging(&v[1]).as_deref(), Some("+ 5 0 4"));
        let cmd = |v: &Lruvec, age| eviction(v, age).map(|e| e.command());
        // 15 s or more: generations 4 and 5, a chunk at a time.
        assert_eq!(cmd(&v[0], 15_000).as_deref(), Some("- 1 0 5 0 8192"));
        // 7.5 s or more: 6 too, the oldest the kernel lets go once the
        // aging made 8 (it keeps two).
        assert_eq!(cmd(&v[0], 7_500).as_deref(), Some("- 1 0 6 0 8192"));
        assert_eq!(cmd(&v[0], 0).as_deref(), Some("- 1 0 6 0 8192"));
        assert_eq!(eviction(&v[0], 45_000), None);
        assert_eq!(cmd(&v[1], 12_000).as_deref(), Some("- 5 0 2 0 8192"));
        // What is left to evict: the file pages up to the generation, of
        // that LRU only.
        let e = eviction(&v[0], 15_000).unwrap();
        assert_eq!(e.left(&v), 55);
        assert_eq!(eviction(&v[0], 0).unwrap().left(&v), 55 + 310);
        assert_eq!(eviction(&v[1], 12_000).unwrap().left(&v), 61_000);
        // Old generations without file pages: nothing to evict.
        let gen = |seq, age_ms, file_pages| Gen {
            seq,
            age_ms,
            file_pages,
        };
        let anon_only = Lruvec {
            memcg: 9,
            node: 0,
            gens: vec![gen(1, 90_000, 0), gen(2, 10, 5), gen(3, 1, 5)],
        };
        assert_eq!(eviction(&anon_only, 1_000), None);
        let empty = Lruvec {
            memcg: 1,
            node: 0,
            gens: Vec::new(),
        };
        assert_eq!(aging(&empty), None);
        assert_eq!(eviction(&empty, 0), None);
    }

    #[test]
    fn passes_whose_pages_come_back_back_off() {
        // More than one in eight back: twice as long, up to the cap.
        assert_eq!(next_backoff(0, 800, 101), 1);
        assert_eq!(next_backoff(MAX_BACKOFF, 800, 800), MAX_BACKOFF);
        // Few back: half as long again.
        assert_eq!(next_backoff(3, 800, 100), 2);
        assert_eq!(next_backoff(0, 800, 0), 0);
        // Nothing evicted: nothing learnt.
        assert_eq!(next_backoff(2, 0, 50), 2);
    }

    #[test]
    fn sectors_read_come_from_a_block_devices_stat() {
        let stat = "    1180        0    94712      436        0        0        0        0        0      612      436        0        0        0        0        0        0\n";
        assert_eq!(sectors_read(stat), Some(94712));
        assert_eq!(sectors_read("12 0"), None);
        // This machine's own disks have the same file.
        let own = std::fs::read_dir("/sys/block")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
            .next()
            .expect("a block device");
        assert!(sectors_read(&own).is_some(), "{own}");
    }
}
