//! `linux.resources` to the files and values each cgroup version wants.
//! Pure: the managers decide where the files are and write them.
use oci_spec::runtime::{LinuxBlockIo, LinuxCpu, LinuxMemory, LinuxResources, LinuxThrottleDevice};

use super::CgroupError;

/// One write into the container's cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Setting {
    /// Controller owning the file ("" for cgroup core files).
    pub controller: String,
    pub file: String,
    pub value: String,
    /// Written instead when `file` does not exist (BFQ's weight files).
    pub alt: Option<(String, String)>,
    /// Skipped when the file does not exist (implied, not requested, values).
    pub optional: bool,
}

fn set(controller: &str, file: impl Into<String>, value: impl ToString) -> Setting {
    Setting {
        controller: controller.into(),
        file: file.into(),
        value: value.to_string(),
        alt: None,
        optional: false,
    }
}

fn invalid(setting: &str, reason: impl Into<String>) -> CgroupError {
    CgroupError::InvalidValue {
        setting: setting.into(),
        reason: reason.into(),
    }
}

/// cgroup v1 `cpu.shares` (2..=262144) to v2 `cpu.weight` (1..=10000), the
/// same linear map runc and crun use. Out-of-range shares are clamped.
pub(crate) fn shares_to_weight(shares: u64) -> u64 {
    let s = shares.clamp(2, 262_144);
    1 + ((s - 2) * 9999) / 262_142
}

/// blkio weight (10..=1000) to `io.weight` (1..=10000).
pub(crate) fn blkio_to_io_weight(weight: u16) -> u64 {
    let w = u64::from(weight.clamp(10, 1000));
    1 + ((w - 10) * 9999) / 990
}

/// `cpu.max` from quota and period: "max" unless quota > 0, period appended
/// when given. None when neither is set.
pub(crate) fn cpu_max(quota: Option<i64>, period: Option<u64>) -> Option<String> {
    let quota = quota.filter(|&q| q != 0);
    let period = period.filter(|&p| p != 0);
    if quota.is_none() && period.is_none() {
        return None;
    }
    let mut s = match quota {
        Some(q) if q > 0 => q.to_string(),
        _ => "max".to_owned(),
    };
    if let Some(p) = period {
        s.push_str(&format!(" {p}"));
    }
    Some(s)
}

/// `memory.swap.max` from OCI's memory+swap total: swap - limit; -1 => "max";
/// 0 or unset => leave alone.
pub(crate) fn swap_v2(
    limit: Option<i64>,
    swap: Option<i64>,
) -> Result<Option<String>, CgroupError> {
    let swap = match swap {
        None | Some(0) => return Ok(None),
        Some(-1) => return Ok(Some("max".into())),
        Some(s) if s < 0 => return Err(invalid("memory.swap", format!("{s} is negative"))),
        Some(s) => s,
    };
    match limit {
        None | Some(0) => Err(invalid("memory.swap", "a swap limit needs a memory limit")),
        Some(l) if l < 0 => Err(invalid(
            "memory.swap",
            "a swap limit needs a finite memory limit",
        )),
        Some(l) if swap < l => Err(invalid(
            "memory.swap",
            format!("memory+swap {swap} is below the memory limit {l}"),
        )),
        Some(l) => Ok(Some((swap - l).to_string())),
    }
}

fn dev(setting: &str, major: i64, minor: i64) -> Result<String, CgroupError> {
    if major < 0 || minor < 0 || major > u32::MAX.into() || minor > u32::MAX.into() {
        return Err(invalid(
            setting,
            format!("device {major}:{minor} is out of range"),
        ));
    }
    Ok(format!("{major}:{minor}"))
}

/// `hugetlb.<size>.<suffix>` after checking the page size looks like "2MB".
fn hugetlb_file(page_size: &str, suffix: &str) -> Result<String, CgroupError> {
    let digits = page_size.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &page_size[digits.len()..];
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || !["KB", "MB", "GB"].contains(&unit)
    {
        return Err(invalid(
            "hugepageLimits",
            format!("page size {page_size:?} is not like \"2MB\""),
        ));
    }
    Ok(format!("hugetlb.{page_size}.{suffix}"))
}

/// Limits the managers cannot apply, to report as warnings.
pub fn ignored_settings(res: &LinuxResources, v2: bool) -> Vec<String> {
    let mut notes = Vec::new();
    if let Some(m) = res.memory() {
        #[allow(deprecated)]
        let kernel = m.kernel();
        if kernel.is_some() {
            notes.push(
                "memory.kernel is ignored (kernel memory limits are obsolete: the kernel no longer enforces them)"
                    .into(),
            );
        }
        if v2 && m.kernel_tcp().is_some() {
            notes.push(
                "memory.kernelTCP is ignored: cgroup v2 has no equivalent (TCP buffer memory counts towards memory.max)"
                    .into(),
            );
        }
        if v2 && m.swappiness().is_some() {
            notes.push("memory.swappiness is ignored on cgroup v2".into());
        }
        if v2 && m.disable_oom_killer() == Some(true) {
            notes.push("memory.disableOOMKiller is ignored on cgroup v2".into());
        }
    }
    if let Some(b) = res.block_io() {
        let per_dev = b
            .weight_device()
            .iter()
            .flatten()
            .any(|d| d.leaf_weight().is_some());
        if b.leaf_weight().is_some() || per_dev {
            notes.push("blockIO leafWeight is ignored (removed from the kernel)".into());
        }
    }
    if res.rdma().as_ref().is_some_and(|r| !r.is_empty()) {
        notes.push("rdma limits are ignored".into());
    }
    notes
}

/// The v1 writes for `res` (devices excluded). `hugetlb_v2`: the hugetlb
/// controller lives in the hybrid host's v2 hierarchy, so use its file names.
pub(crate) fn plan_v1(res: &LinuxResources, hugetlb_v2: bool) -> Result<Vec<Setting>, CgroupError> {
    if res.unified().as_ref().is_some_and(|u| !u.is_empty()) {
        return Err(CgroupError::UnifiedOnV1);
    }
    let mut out = Vec::new();
    if let Some(m) = res.memory() {
        memory_v1(m, &mut out)?;
    }
    if let Some(c) = res.cpu() {
        cpu_v1(c, &mut out);
        cpuset(c, &mut out);
    }
    pids(res, &mut out);
    if let Some(b) = res.block_io() {
        blkio_v1(b, &mut out)?;
    }
    hugetlb(res, hugetlb_v2, &mut out)?;
    if let Some(n) = res.network() {
        if let Some(id) = n.class_id() {
            out.push(set("net_cls", "net_cls.classid", id));
        }
        for p in n.priorities().iter().flatten() {
            if p.name().is_empty() || p.name().contains(char::is_whitespace) {
                return Err(invalid(
                    "network.priorities",
                    format!("interface name {:?}", p.name()),
                ));
            }
            out.push(set(
                "net_prio",
                "net_prio.ifpriomap",
                format!("{} {}", p.name(), p.priority()),
            ));
        }
    }
    Ok(out)
}

fn memory_v1(m: &LinuxMemory, out: &mut Vec<Setting>) -> Result<(), CgroupError> {
    let limit = m.limit().filter(|&l| l != 0);
    let swap = m.swap().filter(|&s| s != 0);
    if let Some(l) = limit {
        out.push(set("memory", "memory.limit_in_bytes", l));
    }
    match (limit, swap) {
        (_, Some(s)) => out.push(set("memory", "memory.memsw.limit_in_bytes", s)),
        // An unlimited memory limit lifts memory+swap too, where swap is accounted.
        (Some(-1), None) => {
            out.push(Setting {
                optional: true,
                ..set("memory", "memory.memsw.limit_in_bytes", -1)
            });
        }
        _ => {}
    }
    if let Some(r) = m.reservation().filter(|&r| r != 0) {
        out.push(set("memory", "memory.soft_limit_in_bytes", r));
    }
    if let Some(s) = m.swappiness() {
        if s > 100 {
            return Err(invalid("memory.swappiness", format!("{s} is above 100")));
        }
        out.push(set("memory", "memory.swappiness", s));
    }
    if m.disable_oom_killer() == Some(true) {
        out.push(set("memory", "memory.oom_control", 1));
    }
    // Skipped where the kernel lacks the file (the manager warns then).
    if let Some(t) = m.kernel_tcp() {
        out.push(Setting {
            optional: true,
            ..set("memory", KERNEL_TCP_V1, t)
        });
    }
    Ok(())
}

/// The cgroup v1 file of `memory.kernelTCP`.
pub(crate) const KERNEL_TCP_V1: &str = "memory.kmem.tcp.limit_in_bytes";

fn cpu_v1(c: &LinuxCpu, out: &mut Vec<Setting>) {
    if let Some(s) = c.shares().filter(|&s| s != 0) {
        out.push(set("cpu", "cpu.shares", s));
    }
    if let Some(p) = c.period().filter(|&p| p != 0) {
        out.push(set("cpu", "cpu.cfs_period_us", p));
    }
    if let Some(q) = c.quota().filter(|&q| q != 0) {
        out.push(set("cpu", "cpu.cfs_quota_us", q));
    }
    if let Some(b) = c.burst() {
        out.push(set("cpu", "cpu.cfs_burst_us", b));
    }
    if let Some(p) = c.realtime_period().filter(|&p| p != 0) {
        out.push(set("cpu", "cpu.rt_period_us", p));
    }
    if let Some(r) = c.realtime_runtime().filter(|&r| r != 0) {
        out.push(set("cpu", "cpu.rt_runtime_us", r));
    }
    if let Some(i) = c.idle() {
        out.push(set("cpu", "cpu.idle", i));
    }
}

fn cpuset(c: &LinuxCpu, out: &mut Vec<Setting>) {
    if let Some(cpus) = c.cpus().as_deref().filter(|s| !s.is_empty()) {
        out.push(set("cpuset", "cpuset.cpus", cpus));
    }
    if let Some(mems) = c.mems().as_deref().filter(|s| !s.is_empty()) {
        out.push(set("cpuset", "cpuset.mems", mems));
    }
}

fn pids(res: &LinuxResources, out: &mut Vec<Setting>) {
    if let Some(p) = res.pids() {
        let v = if p.limit() > 0 {
            p.limit().to_string()
        } else {
            "max".into()
        };
        out.push(set("pids", "pids.max", v));
    }
}

type Throttle<'a> = (
    &'static str,
    &'static str,
    &'static str,
    &'a Option<Vec<LinuxThrottleDevice>>,
);

/// (v1 file, io.max key, OCI field name, devices) for each throttle list.
fn throttles(b: &LinuxBlockIo) -> [Throttle<'_>; 4] {
    [
        (
            "blkio.throttle.read_bps_device",
            "rbps",
            "throttleReadBpsDevice",
            b.throttle_read_bps_device(),
        ),
        (
            "blkio.throttle.write_bps_device",
            "wbps",
            "throttleWriteBpsDevice",
            b.throttle_write_bps_device(),
        ),
        (
            "blkio.throttle.read_iops_device",
            "riops",
            "throttleReadIOPSDevice",
            b.throttle_read_iops_device(),
        ),
        (
            "blkio.throttle.write_iops_device",
            "wiops",
            "throttleWriteIOPSDevice",
            b.throttle_write_iops_device(),
        ),
    ]
}

fn blkio_v1(b: &LinuxBlockIo, out: &mut Vec<Setting>) -> Result<(), CgroupError> {
    if let Some(w) = b.weight().filter(|&w| w != 0) {
        out.push(Setting {
            alt: Some(("blkio.bfq.weight".into(), w.to_string())),
            ..set("blkio", "blkio.weight", w)
        });
    }
    for d in b.weight_device().iter().flatten() {
        let Some(w) = d.weight() else { continue };
        let line = format!("{} {w}", dev("blockIO.weightDevice", d.major(), d.minor())?);
        out.push(Setting {
            alt: Some(("blkio.bfq.weight_device".into(), line.clone())),
            ..set("blkio", "blkio.weight_device", line)
        });
    }
    for (file, _, name, list) in throttles(b) {
        for t in list.iter().flatten() {
            out.push(set(
                "blkio",
                file,
                format!("{} {}", dev(name, t.major(), t.minor())?, t.rate()),
            ));
        }
    }
    Ok(())
}

fn hugetlb(
    res: &LinuxResources,
    v2_names: bool,
    out: &mut Vec<Setting>,
) -> Result<(), CgroupError> {
    for h in res.hugepage_limits().iter().flatten() {
        let (suffix, value) = match (v2_names, h.limit()) {
            (true, l) if l < 0 => ("max", "max".to_owned()),
            (true, l) => ("max", l.to_string()),
            (false, l) => ("limit_in_bytes", l.to_string()),
        };
        out.push(set("hugetlb", hugetlb_file(h.page_size(), suffix)?, value));
    }
    Ok(())
}

/// The v2 writes for `res` (devices excluded), `unified` last so it wins.
pub(crate) fn plan_v2(res: &LinuxResources) -> Result<Vec<Setting>, CgroupError> {
    let mut out = Vec::new();
    if let Some(m) = res.memory() {
        memory_v2(m, &mut out)?;
    }
    if let Some(c) = res.cpu() {
        cpu_v2(c, &mut out)?;
        cpuset(c, &mut out);
    }
    pids(res, &mut out);
    if let Some(b) = res.block_io() {
        io_v2(b, &mut out)?;
    }
    hugetlb(res, true, &mut out)?;
    if let Some(n) = res.network() {
        if n.class_id().is_some() || n.priorities().as_ref().is_some_and(|p| !p.is_empty()) {
            return Err(CgroupError::Unsupported {
                setting: "network (net_cls/net_prio)",
                version: 2,
            });
        }
    }
    for (key, value) in res.unified().iter().flatten() {
        out.push(set(&unified_controller(key)?, key.as_str(), value));
    }
    Ok(out)
}

/// The controller a `unified` key belongs to, after refusing keys that are
/// not a plain file name of the form "controller.knob".
pub(crate) fn unified_controller(key: &str) -> Result<String, CgroupError> {
    let bad = |reason| CgroupError::BadUnifiedKey {
        key: key.to_owned(),
        reason,
    };
    if key.contains('/') {
        return Err(bad("contains '/'"));
    }
    if key.contains("..") {
        return Err(bad("contains \"..\""));
    }
    let Some((ctrl, knob)) = key.split_once('.') else {
        return Err(bad("is not controller.knob"));
    };
    if ctrl.is_empty() || knob.is_empty() {
        return Err(bad("is not controller.knob"));
    }
    Ok(if ctrl == "cgroup" {
        String::new()
    } else {
        ctrl.to_owned()
    })
}

fn memory_v2(m: &LinuxMemory, out: &mut Vec<Setting>) -> Result<(), CgroupError> {
    let limit = m.limit().filter(|&l| l != 0);
    if let Some(l) = limit {
        out.push(set(
            "memory",
            "memory.max",
            if l < 0 {
                "max".to_owned()
            } else {
                l.to_string()
            },
        ));
    }
    if let Some(s) = swap_v2(limit, m.swap())? {
        out.push(set("memory", "memory.swap.max", s));
    }
    if let Some(r) = m.reservation().filter(|&r| r != 0) {
        out.push(set(
            "memory",
            "memory.low",
            if r < 0 {
                "max".to_owned()
            } else {
                r.to_string()
            },
        ));
    }
    Ok(())
}

fn cpu_v2(c: &LinuxCpu, out: &mut Vec<Setting>) -> Result<(), CgroupError> {
    if c.realtime_period().is_some_and(|p| p != 0) || c.realtime_runtime().is_some_and(|r| r != 0) {
        return Err(CgroupError::Unsupported {
            setting: "cpu.realtimePeriod/realtimeRuntime",
            version: 2,
        });
    }
    if let Some(s) = c.shares().filter(|&s| s != 0) {
        out.push(set("cpu", "cpu.weight", shares_to_weight(s)));
    }
    if let Some(v) = cpu_max(c.quota(), c.period()) {
        out.push(set("cpu", "cpu.max", v));
    }
    if let Some(b) = c.burst() {
        out.push(set("cpu", "cpu.max.burst", b));
    }
    if let Some(i) = c.idle() {
        out.push(set("cpu", "cpu.idle", i));
    }
    Ok(())
}

fn io_v2(b: &LinuxBlockIo, out: &mut Vec<Setting>) -> Result<(), CgroupError> {
    // BFQ takes blkio-scale weights; io.weight (iocost) its own scale.
    if let Some(w) = b.weight().filter(|&w| w != 0) {
        out.push(Setting {
            alt: Some((
                "io.weight".into(),
                format!("default {}", blkio_to_io_weight(w)),
            )),
            ..set("io", "io.bfq.weight", w)
        });
    }
    for d in b.weight_device().iter().flatten() {
        let Some(w) = d.weight() else { continue };
        let dv = dev("blockIO.weightDevice", d.major(), d.minor())?;
        out.push(Setting {
            alt: Some((
                "io.weight".into(),
                format!("{dv} {}", blkio_to_io_weight(w)),
            )),
            ..set("io", "io.bfq.weight", format!("{dv} {w}"))
        });
    }
    for (_, key, name, list) in throttles(b) {
        for t in list.iter().flatten() {
            out.push(set(
                "io",
                "io.max",
                format!("{} {key}={}", dev(name, t.major(), t.minor())?, t.rate()),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(json: &str) -> LinuxResources {
        serde_json::from_str(json).expect("test resources parse")
    }

    fn pairs(s: &[Setting]) -> Vec<(&str, &str)> {
        s.iter()
            .map(|s| (s.file.as_str(), s.value.as_str()))
            .collect()
    }

    #[test]
    fn shares_to_weight_matches_runc_formula() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(1), 1);
        assert_eq!(shares_to_weight(u64::MAX), 10_000);
    }

    #[test]
    fn blkio_weight_scale() {
        assert_eq!(blkio_to_io_weight(10), 1);
        assert_eq!(blkio_to_io_weight(1000), 10_000);
        assert_eq!(blkio_to_io_weight(500), 1 + 490 * 9999 / 990);
    }

    #[test]
    fn cpu_max_strings() {
        assert_eq!(cpu_max(None, None), None);
        assert_eq!(
            cpu_max(Some(50_000), Some(100_000)).as_deref(),
            Some("50000 100000")
        );
        assert_eq!(
            cpu_max(Some(-1), Some(100_000)).as_deref(),
            Some("max 100000")
        );
        assert_eq!(cpu_max(Some(20_000), None).as_deref(), Some("20000"));
        assert_eq!(cpu_max(None, Some(250_000)).as_deref(), Some("max 250000"));
    }

    #[test]
    fn swap_arithmetic_v2() {
        assert_eq!(
            swap_v2(Some(100), Some(300)).unwrap().as_deref(),
            Some("200")
        );
        assert_eq!(swap_v2(Some(100), Some(100)).unwrap().as_deref(), Some("0"));
        assert_eq!(
            swap_v2(Some(100), Some(-1)).unwrap().as_deref(),
            Some("max")
        );
        assert_eq!(swap_v2(Some(100), None).unwrap(), None);
        assert!(swap_v2(Some(100), Some(50)).is_err());
        assert!(swap_v2(None, Some(50)).is_err());
        assert!(swap_v2(Some(-1), Some(50)).is_err());
    }

    #[test]
    fn v1_memory_swap_is_memsw_total() {
        let p = plan_v1(&res(r#"{"memory":{"limit":1048576,"swap":2097152,"reservation":524288,"swappiness":10,"disableOOMKiller":true}}"#), false).unwrap();
        assert_eq!(
            pairs(&p),
            [
                ("memory.limit_in_bytes", "1048576"),
                ("memory.memsw.limit_in_bytes", "2097152"),
                ("memory.soft_limit_in_bytes", "524288"),
                ("memory.swappiness", "10"),
                ("memory.oom_control", "1"),
            ]
        );
        let p = plan_v1(&res(r#"{"memory":{"limit":-1}}"#), false).unwrap();
        assert!(p[1].optional && p[1].value == "-1");
        assert!(plan_v1(&res(r#"{"memory":{"swappiness":101}}"#), false).is_err());
    }

    #[test]
    fn v2_memory_and_cpu() {
        let p = plan_v2(&res(
            r#"{"memory":{"limit":1000,"swap":3000,"reservation":500},"cpu":{"shares":1024,"quota":50000,"period":100000,"cpus":"0","mems":"0"},"pids":{"limit":0}}"#,
        ))
        .unwrap();
        assert_eq!(
            pairs(&p),
            [
                ("memory.max", "1000"),
                ("memory.swap.max", "2000"),
                ("memory.low", "500"),
                ("cpu.weight", "39"),
                ("cpu.max", "50000 100000"),
                ("cpuset.cpus", "0"),
                ("cpuset.mems", "0"),
                ("pids.max", "max"),
            ]
        );
        assert!(plan_v2(&res(r#"{"cpu":{"realtimeRuntime":1000}}"#)).is_err());
    }

    #[test]
    fn blkio_device_lines() {
        let r = res(
            r#"{"blockIO":{"weight":300,"weightDevice":[{"major":8,"minor":0,"weight":500}],
            "throttleReadBpsDevice":[{"major":8,"minor":0,"rate":1048576}],
            "throttleWriteIOPSDevice":[{"major":8,"minor":16,"rate":100}]}}"#,
        );
        let p1 = plan_v1(&r, false).unwrap();
        assert_eq!(
            pairs(&p1),
            [
                ("blkio.weight", "300"),
                ("blkio.weight_device", "8:0 500"),
                ("blkio.throttle.read_bps_device", "8:0 1048576"),
                ("blkio.throttle.write_iops_device", "8:16 100"),
            ]
        );
        assert_eq!(p1[0].alt, Some(("blkio.bfq.weight".into(), "300".into())));
        let p2 = plan_v2(&r).unwrap();
        assert_eq!(
            pairs(&p2),
            [
                ("io.bfq.weight", "300"),
                ("io.bfq.weight", "8:0 500"),
                ("io.max", "8:0 rbps=1048576"),
                ("io.max", "8:16 wiops=100")
            ]
        );
        assert_eq!(
            p2[1].alt,
            Some((
                "io.weight".into(),
                format!("8:0 {}", blkio_to_io_weight(500))
            ))
        );
        assert!(plan_v1(
            &res(r#"{"blockIO":{"throttleReadBpsDevice":[{"major":-8,"minor":0,"rate":1}]}}"#),
            false
        )
        .is_err());
    }

    #[test]
    fn hugetlb_names() {
        let r = res(r#"{"hugepageLimits":[{"pageSize":"2MB","limit":4194304}]}"#);
        assert_eq!(
            pairs(&plan_v1(&r, false).unwrap()),
            [("hugetlb.2MB.limit_in_bytes", "4194304")]
        );
        assert_eq!(
            pairs(&plan_v1(&r, true).unwrap()),
            [("hugetlb.2MB.max", "4194304")]
        );
        assert!(plan_v2(&res(
            r#"{"hugepageLimits":[{"pageSize":"2MB/../x","limit":1}]}"#
        ))
        .is_err());
    }

    #[test]
    fn network_v1_only() {
        let r =
            res(r#"{"network":{"classID":1048577,"priorities":[{"name":"eth0","priority":5}]}}"#);
        assert_eq!(
            pairs(&plan_v1(&r, false).unwrap()),
            [
                ("net_cls.classid", "1048577"),
                ("net_prio.ifpriomap", "eth0 5")
            ]
        );
        assert!(matches!(plan_v2(&r), Err(CgroupError::Unsupported { .. })));
    }

    #[test]
    fn unified_keys() {
        let p = plan_v2(&res(r#"{"unified":{"memory.high":"1000"}}"#)).unwrap();
        assert_eq!(p[0].controller, "memory");
        assert_eq!(unified_controller("cgroup.max.depth").unwrap(), "");
        for bad in ["../memory.max", "a/b.c", "memory..max", "nodot", ".x"] {
            assert!(
                matches!(
                    unified_controller(bad),
                    Err(CgroupError::BadUnifiedKey { .. })
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            plan_v1(&res(r#"{"unified":{"memory.high":"1"}}"#), false),
            Err(CgroupError::UnifiedOnV1)
        ));
    }

    #[test]
    fn notes_for_ignored_settings() {
        let r = res(r#"{"memory":{"kernel":1,"swappiness":5},"rdma":{"mlx":{"hcaHandles":1}}}"#);
        assert_eq!(ignored_settings(&r, false).len(), 2);
        assert_eq!(ignored_settings(&r, true).len(), 3);
        // kernelTCP: a v1 file; v2 has none, and the note says so.
        let r = res(r#"{"memory":{"kernelTCP":1048576}}"#);
        assert!(ignored_settings(&r, false).is_empty());
        let v2 = ignored_settings(&r, true);
        assert!(
            v2.len() == 1 && v2[0].contains("kernelTCP") && v2[0].contains("no equivalent"),
            "{v2:?}"
        );
        assert_eq!(
            pairs(&plan_v1(&r, false).unwrap()),
            [(KERNEL_TCP_V1, "1048576")]
        );
        assert!(plan_v2(&r).unwrap().is_empty());
        assert!(ignored_settings(&LinuxResources::default(), true).is_empty());
    }
}
