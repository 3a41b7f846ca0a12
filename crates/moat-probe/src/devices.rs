//! Device nodes: what /dev holds, which host devices open, and whether new
//! nodes can be made and opened (CAP_MKNOD and the device cgroup).
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use super::{check, errno_name, open_read_close, Check, Outcome};

const DEVICES: &str = "a minimal /dev, no host devices (PRODUCT; CIS 5.18; device cgroup deny-all)";

/// Nodes every runtime's minimal /dev has.
const STANDARD: [&str; 17] = [
    "null",
    "zero",
    "full",
    "random",
    "urandom",
    "tty",
    "console",
    "ptmx",
    "pts",
    "shm",
    "mqueue",
    "fd",
    "stdin",
    "stdout",
    "stderr",
    "core",
    "termination-log",
];

/// Device nodes in /dev and one level below, with whether each is a block device.
fn dev_nodes() -> Vec<(PathBuf, bool)> {
    let mut v = Vec::new();
    let mut dirs = vec![PathBuf::from("/dev")];
    let mut depth = 0;
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_char_device() || ft.is_block_device() {
                v.push((e.path(), ft.is_block_device()));
            } else if ft.is_dir() && depth == 0 && e.file_name() != "pts" {
                dirs.push(e.path());
            }
        }
        depth += 1;
    }
    v.sort();
    v
}

pub fn checks(scratch: Option<&Path>) -> Vec<Check> {
    let nodes = dev_nodes();
    let mut out = Vec::new();
    let extra: Vec<String> = nodes
        .iter()
        .filter(|(p, _)| {
            p.parent() != Some(Path::new("/dev"))
                || !STANDARD
                    .iter()
                    .any(|s| p.file_name().is_some_and(|n| n == *s))
        })
        .map(|(p, _)| p.display().to_string())
        .collect();
    out.push(if extra.is_empty() {
        check(
            "dev.nodes",
            Outcome::Blocked,
            format!("{} standard nodes only", nodes.len()),
            DEVICES,
        )
    } else {
        let shown: Vec<&str> = extra.iter().take(12).map(String::as_str).collect();
        check(
            "dev.nodes",
            Outcome::Allowed,
            format!(
                "{} non-standard nodes: {}{}",
                extra.len(),
                shown.join(" "),
                if extra.len() > 12 { " …" } else { "" }
            ),
            DEVICES,
        )
    });
    let blocks: Vec<&PathBuf> = nodes.iter().filter(|(_, b)| *b).map(|(p, _)| p).collect();
    out.push(open_any(
        "dev.block",
        &blocks
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>(),
        "block devices",
    ));
    out.push(open_any(
        "dev.mem",
        &["/dev/mem".into(), "/dev/kmem".into(), "/dev/port".into()],
        "physical memory/ports",
    ));
    out.push(open_any(
        "dev.kmsg",
        &["/dev/kmsg".into()],
        "the kernel log device",
    ));
    out.push(open_any("dev.kvm", &["/dev/kvm".into()], "KVM"));
    out.push(open_any("dev.fuse", &["/dev/fuse".into()], "FUSE"));
    out.extend(mknod(scratch));
    out
}

/// Opens each path read-only (never reading) and reports the first that opens.
fn open_any(id: &'static str, paths: &[String], what: &str) -> Check {
    let mut refused = Vec::new();
    for p in paths {
        match open_read_close(p) {
            Ok(()) => {
                return check(
                    id,
                    Outcome::Allowed,
                    format!("{p} opens (closed unread)"),
                    DEVICES,
                )
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => refused.push(format!(
                "{p}: {}",
                errno_name(e.raw_os_error().unwrap_or(0))
            )),
        }
    }
    if refused.is_empty() {
        check(id, Outcome::Blocked, format!("no {what} present"), DEVICES)
    } else {
        check(id, Outcome::Blocked, refused.join(", "), DEVICES)
    }
}

/// mknod of /dev/null's and /dev/mem's numbers in a scratch directory; the
/// /dev/mem node is then opened read-only (never read) to see whether the
/// device cgroup lets it through. Both nodes are removed (and the scratch
/// directory with anything left when the probe ends).
fn mknod(scratch: Option<&Path>) -> Vec<Check> {
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    const P: &str =
        "no CAP_MKNOD; device cgroup denies host devices (CIS 5.18; runc/Docker device rules)";
    let Some(dir) = scratch else {
        return vec![
            check(
                "escape.mknod",
                Outcome::NotApplicable,
                "no writable directory to try in",
                P,
            ),
            check(
                "dev.cgroup-open",
                Outcome::NotApplicable,
                "no writable directory to try in",
                P,
            ),
        ];
    };
    let null = dir.join("null");
    let mem = dir.join("mem");
    let r1 = mknod(
        &null,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o600),
        makedev(1, 3),
    );
    let mut out = vec![match r1 {
        Ok(()) => check(
            "escape.mknod",
            Outcome::Allowed,
            format!("made a character device in {}", dir.display()),
            P,
        ),
        Err(e) => check(
            "escape.mknod",
            Outcome::Blocked,
            format!("mknod in {}: {}", dir.display(), errno_name(e as i32)),
            P,
        ),
    }];
    out.push(
        match mknod(
            &mem,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o600),
            makedev(1, 1),
        ) {
            Err(e) => check(
                "dev.cgroup-open",
                Outcome::NotApplicable,
                format!("cannot make a node to test: {}", errno_name(e as i32)),
                P,
            ),
            Ok(()) => match open_read_close(&mem.to_string_lossy()) {
                Ok(()) => check(
                    "dev.cgroup-open",
                    Outcome::Allowed,
                    "a fresh /dev/mem node (1:1) opens: the device cgroup allows it",
                    P,
                ),
                Err(e) if e.raw_os_error() == Some(libc::EACCES) => check(
                    "dev.cgroup-open",
                    Outcome::NotApplicable,
                    format!("{} is on a nodev mount (EACCES)", dir.display()),
                    P,
                ),
                Err(e) => check(
                    "dev.cgroup-open",
                    Outcome::Blocked,
                    format!(
                        "a fresh 1:1 node does not open: {}",
                        errno_name(e.raw_os_error().unwrap_or(0))
                    ),
                    P,
                ),
            },
        },
    );
    for p in [&null, &mem] {
        if p.exists() {
            if let Err(e) = std::fs::remove_file(p) {
                out.push(check(
                    "probe.cleanup",
                    Outcome::NotApplicable,
                    format!("could not remove {}: {e}", p.display()),
                    P,
                ));
            }
        }
    }
    out
}
