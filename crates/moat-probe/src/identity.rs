//! Who the process is, inside and as seen from the parent user namespace.
use super::{check, Check, Outcome, Status};

const PRACTICE_USER: &str = "non-root user inside; a user namespace mapping to a dedicated unprivileged host range (PRODUCT: dedicated user per container; PSS runAsNonRoot; CIS 5.31)";

/// One line of a uid_map/gid_map: inside, outside, count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapRange {
    pub inside: u64,
    pub outside: u64,
    pub count: u64,
}

pub fn parse_map(text: &str) -> Vec<MapRange> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace().map(|f| f.parse::<u64>().ok());
            Some(MapRange {
                inside: it.next()??,
                outside: it.next()??,
                count: it.next()??,
            })
        })
        .collect()
}

/// The identity map of the initial user namespace.
pub fn is_initial_map(map: &[MapRange]) -> bool {
    map == [MapRange {
        inside: 0,
        outside: 0,
        count: 4_294_967_295,
    }]
}

/// What `id` maps to in the parent user namespace.
pub fn outside_id(map: &[MapRange], id: u64) -> Option<u64> {
    map.iter()
        .find(|r| id >= r.inside && id - r.inside < r.count)
        .map(|r| r.outside + (id - r.inside))
}

fn ids(st: &Status, key: &str) -> Vec<u64> {
    st.get(key)
        .unwrap_or("")
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect()
}

pub fn checks(st: &Status) -> Vec<Check> {
    let uids = ids(st, "Uid");
    let gids = ids(st, "Gid");
    let euid = uids.get(1).copied();
    let egid = gids.get(1).copied();
    let groups = ids(st, "Groups");
    let uid_map_text = std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
    let gid_map_text = std::fs::read_to_string("/proc/self/gid_map").unwrap_or_default();
    let uid_map = parse_map(&uid_map_text);
    let gid_map = parse_map(&gid_map_text);
    let mut out = Vec::new();

    out.push(match euid {
        Some(0) => check(
            "identity.uid",
            Outcome::Allowed,
            format!("runs as uid 0 (Uid: {})", st.get("Uid").unwrap_or("")),
            PRACTICE_USER,
        ),
        Some(u) => check(
            "identity.uid",
            Outcome::Blocked,
            format!(
                "runs as uid {u}, gid {}",
                egid.map_or("?".into(), |g| g.to_string())
            ),
            PRACTICE_USER,
        ),
        None => check(
            "identity.uid",
            Outcome::NotApplicable,
            "no Uid line in /proc/self/status",
            PRACTICE_USER,
        ),
    });

    let root_groups = egid == Some(0) || groups.contains(&0);
    out.push(check(
        "identity.groups",
        if root_groups {
            Outcome::Allowed
        } else {
            Outcome::Blocked
        },
        format!(
            "gid {}, supplementary groups [{}]",
            egid.map_or("?".into(), |g| g.to_string()),
            st.get("Groups").unwrap_or("")
        ),
        "no root group (gid 0) primary or supplementary (Trivy KSV-0116)",
    ));

    out.push(if uid_map.is_empty() {
        check(
            "identity.userns",
            Outcome::NotApplicable,
            "/proc/self/uid_map unreadable",
            PRACTICE_USER,
        )
    } else if is_initial_map(&uid_map) {
        check(
            "identity.userns",
            Outcome::Allowed,
            "initial user namespace (uid_map is the identity 0 0 4294967295)",
            PRACTICE_USER,
        )
    } else {
        check(
            "identity.userns",
            Outcome::Blocked,
            format!(
                "in a user namespace: uid_map [{}] gid_map [{}]",
                one_line(&uid_map_text),
                one_line(&gid_map_text)
            ),
            PRACTICE_USER,
        )
    });

    out.push(host_id_check("identity.host-uid", "uid", euid, &uid_map));
    out.push(host_id_check("identity.host-gid", "gid", egid, &gid_map));
    out
}

fn host_id_check(id: &'static str, what: &str, inside: Option<u64>, map: &[MapRange]) -> Check {
    let Some(inside) = inside else {
        return check(
            id,
            Outcome::NotApplicable,
            format!("effective {what} unknown"),
            PRACTICE_USER,
        );
    };
    match outside_id(map, inside) {
        Some(0) => check(
            id,
            Outcome::Allowed,
            format!("{what} {inside} is {what} 0 in the parent user namespace"),
            PRACTICE_USER,
        ),
        Some(o) => check(
            id,
            Outcome::Blocked,
            format!("{what} {inside} is {what} {o} in the parent user namespace"),
            PRACTICE_USER,
        ),
        None => check(
            id,
            Outcome::NotApplicable,
            format!("{what} {inside} is unmapped"),
            PRACTICE_USER,
        ),
    }
}

fn one_line(s: &str) -> String {
    s.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps() {
        let m = parse_map("         0     100000      65536\n");
        assert_eq!(outside_id(&m, 0), Some(100000));
        assert_eq!(outside_id(&m, 65535), Some(165535));
        assert_eq!(outside_id(&m, 65536), None);
        assert!(!is_initial_map(&m));
        assert!(is_initial_map(&parse_map("0 0 4294967295\n")));
    }
}
