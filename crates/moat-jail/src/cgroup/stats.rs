//! Resource usage read from a cgroup, into [`moat_core::stats`]'s shape
//! (runc's `events --stats` "data" object).
use std::collections::BTreeMap;
use std::path::Path;

pub use moat_core::stats::*;

use super::{read_opt, CgroupError};

/// A number file; "max" reads as u64::MAX (as runc reports it). Missing => 0.
fn num(dir: &Path, file: &str) -> Result<u64, CgroupError> {
    Ok(read_opt(&dir.join(file))?.map_or(0, |s| parse_num(s.trim())))
}

fn parse_num(s: &str) -> u64 {
    if s == "max" {
        u64::MAX
    } else {
        s.parse().unwrap_or(0)
    }
}

/// "key value" lines (memory.stat, cpu.stat, cpuacct.stat, memory.events).
pub(crate) fn flat_keyed(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_owned(), parse_num(v.trim())))
        .collect()
}

fn keyed(dir: &Path, file: &str) -> Result<BTreeMap<String, u64>, CgroupError> {
    Ok(read_opt(&dir.join(file))?
        .map(|t| flat_keyed(&t))
        .unwrap_or_default())
}

fn list(dir: &Path, file: &str) -> Result<Vec<u64>, CgroupError> {
    Ok(read_opt(&dir.join(file))?
        .map(|t| t.split_whitespace().map(parse_num).collect())
        .unwrap_or_default())
}

/// v1 blkio recursive files: "MAJ:MIN Op value" lines (plus "Total N").
pub(crate) fn parse_blkio_v1(text: &str) -> Vec<BlkioEntry> {
    let mut out = Vec::new();
    for l in text.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        let [dev, op, value] = f[..] else { continue };
        let Some((maj, min)) = dev.split_once(':') else {
            continue;
        };
        let (Ok(major), Ok(minor), Ok(value)) = (maj.parse(), min.parse(), value.parse()) else {
            continue;
        };
        out.push(BlkioEntry {
            major,
            minor,
            op: op.to_owned(),
            value,
        });
    }
    out
}

/// v2 io.stat: "MAJ:MIN rbytes=.. wbytes=.. rios=.. wios=.." to (bytes, ios).
pub(crate) fn parse_io_stat(text: &str) -> (Vec<BlkioEntry>, Vec<BlkioEntry>) {
    let (mut bytes, mut ios) = (Vec::new(), Vec::new());
    for l in text.lines() {
        let mut f = l.split_whitespace();
        let Some((maj, min)) = f.next().and_then(|d| d.split_once(':')) else {
            continue;
        };
        let (Ok(major), Ok(minor)) = (maj.parse(), min.parse()) else {
            continue;
        };
        for kv in f {
            let Some((k, v)) = kv.split_once('=') else {
                continue;
            };
            let Ok(value) = v.parse() else { continue };
            let (list, op) = match k {
                "rbytes" => (&mut bytes, "Read"),
                "wbytes" => (&mut bytes, "Write"),
                "rios" => (&mut ios, "Read"),
                "wios" => (&mut ios, "Write"),
                _ => continue,
            };
            list.push(BlkioEntry {
                major,
                minor,
                op: op.into(),
                value,
            });
        }
    }
    (bytes, ios)
}

/// Hugepage sizes the cgroup has files for ("2MB", "1GB"), from file names
/// `hugetlb.<size>.<suffix>`.
fn hugetlb_sizes(dir: &Path, suffix: &str) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| {
            Some(
                n.strip_prefix("hugetlb.")?
                    .strip_suffix(suffix)?
                    .strip_suffix('.')?
                    .to_owned(),
            )
        })
        .filter(|s| !s.contains('.'))
        .collect();
    v.sort();
    v
}

/// Directories holding each v1 controller's files for the container.
pub(crate) struct V1Dirs<'a> {
    pub cpu: Option<&'a Path>,
    pub cpuacct: Option<&'a Path>,
    pub memory: Option<&'a Path>,
    pub pids: Option<&'a Path>,
    pub blkio: Option<&'a Path>,
    /// (dir, whether it is a v2 directory)
    pub hugetlb: Option<(&'a Path, bool)>,
}

pub(crate) fn collect_v1(d: &V1Dirs<'_>) -> Result<Stats, CgroupError> {
    let mut s = Stats::default();
    if let Some(dir) = d.cpuacct {
        let u = &mut s.cpu.usage;
        u.total = num(dir, "cpuacct.usage")?;
        u.percpu = list(dir, "cpuacct.usage_percpu")?;
        u.percpu_kernel = list(dir, "cpuacct.usage_percpu_sys")?;
        u.percpu_user = list(dir, "cpuacct.usage_percpu_user")?;
        if dir.join("cpuacct.usage_user").exists() {
            u.user = num(dir, "cpuacct.usage_user")?;
            u.kernel = num(dir, "cpuacct.usage_sys")?;
        } else {
            // cpuacct.stat is in USER_HZ ticks, which Linux fixes at 100/s.
            let st = keyed(dir, "cpuacct.stat")?;
            u.user = st
                .get("user")
                .copied()
                .unwrap_or(0)
                .saturating_mul(10_000_000);
            u.kernel = st
                .get("system")
                .copied()
                .unwrap_or(0)
                .saturating_mul(10_000_000);
        }
    }
    if let Some(dir) = d.cpu {
        let st = keyed(dir, "cpu.stat")?;
        let t = &mut s.cpu.throttling;
        t.periods = st.get("nr_periods").copied().unwrap_or(0);
        t.throttled_periods = st.get("nr_throttled").copied().unwrap_or(0);
        t.throttled_time = st.get("throttled_time").copied().unwrap_or(0);
    }
    if let Some(dir) = d.memory {
        let m = &mut s.memory;
        let entry = |prefix: &str| -> Result<MemoryEntry, CgroupError> {
            Ok(MemoryEntry {
                limit: num(dir, &format!("{prefix}limit_in_bytes"))?,
                usage: num(dir, &format!("{prefix}usage_in_bytes"))?,
                max: num(dir, &format!("{prefix}max_usage_in_bytes"))?,
                failcnt: num(dir, &format!("{prefix}failcnt"))?,
            })
        };
        m.usage = entry("memory.")?;
        m.swap = entry("memory.memsw.")?;
        m.kernel = entry("memory.kmem.")?;
        m.kernel_tcp = entry("memory.kmem.tcp.")?;
        m.raw = keyed(dir, "memory.stat")?;
        m.cache = m.raw.get("cache").copied().unwrap_or(0);
    }
    if let Some(dir) = d.pids {
        s.pids = pids(dir)?;
    }
    if let Some(dir) = d.blkio {
        let pick = |names: &[&str]| -> Result<Vec<BlkioEntry>, CgroupError> {
            for n in names {
                if let Some(t) = read_opt(&dir.join(n))? {
                    let e = parse_blkio_v1(&t);
                    if !e.is_empty() {
                        return Ok(e);
                    }
                }
            }
            Ok(Vec::new())
        };
        s.blkio.io_service_bytes_recursive = pick(&[
            "blkio.io_service_bytes_recursive",
            "blkio.bfq.io_service_bytes_recursive",
            "blkio.throttle.io_service_bytes_recursive",
        ])?;
        s.blkio.io_serviced_recursive = pick(&[
            "blkio.io_serviced_recursive",
            "blkio.bfq.io_serviced_recursive",
            "blkio.throttle.io_serviced_recursive",
        ])?;
    }
    match d.hugetlb {
        Some((dir, true)) => s.hugetlb = hugetlb_v2(dir)?,
        Some((dir, false)) => {
            for size in hugetlb_sizes(dir, "limit_in_bytes") {
                let h = Hugetlb {
                    usage: num(dir, &format!("hugetlb.{size}.usage_in_bytes"))?,
                    max: num(dir, &format!("hugetlb.{size}.max_usage_in_bytes"))?,
                    failcnt: num(dir, &format!("hugetlb.{size}.failcnt"))?,
                };
                s.hugetlb.insert(size, h);
            }
        }
        None => {}
    }
    Ok(s)
}

fn pids(dir: &Path) -> Result<Pids, CgroupError> {
    let limit = num(dir, "pids.max")?;
    Ok(Pids {
        current: num(dir, "pids.current")?,
        limit: if limit == u64::MAX { 0 } else { limit },
    })
}

/// v2 hugetlb usage and refusals. `max` is the peak usage (v1's
/// `max_usage_in_bytes`); cgroup v2 keeps no hugetlb peak, so it stays 0 as
/// in runc (`hugetlb.<size>.max` is the limit, not a usage).
fn hugetlb_v2(dir: &Path) -> Result<BTreeMap<String, Hugetlb>, CgroupError> {
    let mut out = BTreeMap::new();
    for size in hugetlb_sizes(dir, "max") {
        let events = keyed(dir, &format!("hugetlb.{size}.events"))?;
        let h = Hugetlb {
            usage: num(dir, &format!("hugetlb.{size}.current"))?,
            max: 0,
            failcnt: events.get("max").copied().unwrap_or(0),
        };
        out.insert(size, h);
    }
    Ok(out)
}

pub(crate) fn collect_v2(dir: &Path) -> Result<Stats, CgroupError> {
    let mut s = Stats::default();
    let cpu = keyed(dir, "cpu.stat")?;
    let g = |k: &str| cpu.get(k).copied().unwrap_or(0);
    s.cpu.usage.total = g("usage_usec").saturating_mul(1000);
    s.cpu.usage.user = g("user_usec").saturating_mul(1000);
    s.cpu.usage.kernel = g("system_usec").saturating_mul(1000);
    s.cpu.throttling = Throttling {
        periods: g("nr_periods"),
        throttled_periods: g("nr_throttled"),
        throttled_time: g("throttled_usec").saturating_mul(1000),
    };
    let m = &mut s.memory;
    m.raw = keyed(dir, "memory.stat")?;
    m.cache = m.raw.get("file").copied().unwrap_or(0);
    let events = keyed(dir, "memory.events")?;
    m.usage = MemoryEntry {
        limit: num(dir, "memory.max")?,
        usage: num(dir, "memory.current")?,
        max: num(dir, "memory.peak")?,
        failcnt: events.get("max").copied().unwrap_or(0),
    };
    // Like v1's memsw: memory plus swap.
    if dir.join("memory.swap.current").exists() {
        m.swap = MemoryEntry {
            limit: num(dir, "memory.swap.max")?.saturating_add(m.usage.limit),
            usage: num(dir, "memory.swap.current")?.saturating_add(m.usage.usage),
            max: 0,
            failcnt: 0,
        };
    }
    s.pids = pids(dir)?;
    if let Some(t) = read_opt(&dir.join("io.stat"))? {
        let (b, i) = parse_io_stat(&t);
        s.blkio.io_service_bytes_recursive = b;
        s.blkio.io_serviced_recursive = i;
    }
    s.hugetlb = hugetlb_v2(dir)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape_matches_runc() {
        let mut s = Stats::default();
        s.cpu.usage.total = 5;
        s.memory.usage.limit = 10;
        s.pids.current = 3;
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["cpu"]["usage"]["total"], 5);
        assert_eq!(
            v["cpu"]["usage"]["kernel"], 0,
            "kernel/user are always present"
        );
        assert!(
            v["cpu"]["usage"].get("percpu").is_none(),
            "empty percpu omitted"
        );
        assert!(v["cpu"]["throttling"].as_object().unwrap().is_empty());
        assert_eq!(v["memory"]["usage"]["limit"], 10);
        assert_eq!(v["memory"]["usage"]["failcnt"], 0);
        assert!(v["memory"]["usage"].get("usage").is_none());
        assert!(v["memory"].get("kernelTCP").is_some());
        assert!(v["memory"].get("raw").is_none());
        assert_eq!(v["pids"]["current"], 3);
        assert!(v["pids"].get("limit").is_none());
        assert!(v["hugetlb"].as_object().unwrap().is_empty());
        assert!(v["network_interfaces"].is_null());
        assert!(v["blkio"].as_object().unwrap().is_empty());
    }

    #[test]
    fn parses_blkio_and_io_stat() {
        let e = parse_blkio_v1("8:0 Read 4096\n8:0 Write 0\nTotal 4096\n");
        assert_eq!(e.len(), 2);
        assert_eq!(
            (e[0].major, e[0].minor, e[0].op.as_str(), e[0].value),
            (8, 0, "Read", 4096)
        );
        let (b, i) = parse_io_stat("259:0 rbytes=100 wbytes=200 rios=1 wios=2 dbytes=0 dios=0\n");
        assert_eq!(b.iter().map(|e| e.value).collect::<Vec<_>>(), [100, 200]);
        assert_eq!(i[1].op, "Write");
    }

    #[test]
    fn hugetlb_v2_max_is_no_limit() {
        let d = tempfile::tempdir().unwrap();
        for (f, v) in [
            ("hugetlb.2MB.max", "4194304\n"),
            ("hugetlb.2MB.current", "2097152\n"),
            ("hugetlb.2MB.events", "max 3\n"),
            ("hugetlb.1GB.max", "max\n"),
        ] {
            std::fs::write(d.path().join(f), v).unwrap();
        }
        let h = hugetlb_v2(d.path()).unwrap();
        let two = &h["2MB"];
        assert_eq!((two.usage, two.max, two.failcnt), (2097152, 0, 3));
        assert_eq!(
            h["1GB"].max, 0,
            "an unlimited size is not a peak of u64::MAX"
        );
    }

    #[test]
    fn flat_keyed_reads_max() {
        let m = flat_keyed("a 1\nb max\n");
        assert_eq!(m["a"], 1);
        assert_eq!(m["b"], u64::MAX);
    }
}
