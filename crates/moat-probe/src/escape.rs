//! Safe escape attempts: each class of call attackers use, made so that it
//! cannot change anything (see the module docs of `probe` and
//! `moat_sys::probe`), plus leaked descriptors and credentials.
use std::os::fd::AsFd;
use std::time::Duration;

use nix::sched::{unshare, CloneFlags};
use nix::unistd::Pid;

use super::{check, child_verdict, in_child, judge, nix_errno, read_trim, Check, Outcome};

const SECCOMP: &str = "a seccomp allow-list tighter than Docker's: no io_uring, userfaultfd, bpf, keyctl, perf_event_open, kexec, module loading (PRODUCT)";
const NS: &str = "no namespace creation inside the container: unshare/setns and namespace clone flags blocked (PRODUCT)";
const MOUNT: &str = "no mount inside the container (PRODUCT seccomp; no CAP_SYS_ADMIN)";

pub fn checks() -> Vec<Check> {
    let mut out = Vec::new();
    out.extend(unshares());
    out.extend(mounts());
    out.extend(ptrace());
    out.extend(syscalls());
    out.extend(children());
    out.push(leaked_fds());
    out.push(sa_token());
    out.extend(rlimits());
    out
}

fn unshares() -> Vec<Check> {
    [
        ("escape.unshare-user", CloneFlags::CLONE_NEWUSER, "user"),
        ("escape.unshare-mnt", CloneFlags::CLONE_NEWNS, "mount"),
        ("escape.unshare-pid", CloneFlags::CLONE_NEWPID, "pid"),
        ("escape.unshare-net", CloneFlags::CLONE_NEWNET, "network"),
        ("escape.unshare-ipc", CloneFlags::CLONE_NEWIPC, "ipc"),
        ("escape.unshare-uts", CloneFlags::CLONE_NEWUTS, "uts"),
        (
            "escape.unshare-cgroup",
            CloneFlags::CLONE_NEWCGROUP,
            "cgroup",
        ),
        (
            "escape.unshare-time",
            CloneFlags::from_bits_retain(libc::CLONE_NEWTIME),
            "time",
        ),
    ]
    .into_iter()
    .map(|(id, flag, what)| {
        let (r, d) = child_verdict(in_child(|| nix_errno(unshare(flag))), &[]);
        check(
            id,
            r,
            format!("unshare of a {what} namespace in a child: {d}"),
            NS,
        )
    })
    .collect()
}

const STEP_UNSHARE: i32 = 250;
const STEP_PRIVATE: i32 = 251;

/// In a child: unshare `flags`, make every mount private (so nothing can
/// propagate back), then mount a 4 KiB tmpfs. The namespace dies with the child.
fn tmpfs_in_new_ns(flags: CloneFlags) -> i32 {
    use nix::mount::{mount, MsFlags};
    if unshare(flags).is_err() {
        return STEP_UNSHARE;
    }
    if mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .is_err()
    {
        return STEP_PRIVATE;
    }
    let target = ["/tmp", "/mnt", "/dev", "/"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_dir())
        .unwrap_or("/");
    nix_errno(mount(
        Some("tmpfs"),
        target,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("size=4k"),
    ))
}

fn step_verdict(r: Result<i32, String>, what: &str) -> (Outcome, String) {
    match r {
        Ok(STEP_UNSHARE) => (Outcome::Blocked, format!("unshare({what}) refused")),
        Ok(STEP_PRIVATE) => (
            Outcome::Blocked,
            "making mounts private refused; nothing mounted".into(),
        ),
        other => {
            let (o, d) = child_verdict(other, &[]);
            (o, format!("tmpfs mount after unshare({what}): {d}"))
        }
    }
}

fn mounts() -> Vec<Check> {
    use nix::mount::{mount, MsFlags};
    // No filesystem type: the kernel answers EINVAL right after may_mount().
    let plain = nix_errno(mount(
        Some("none"),
        "/",
        None::<&str>,
        MsFlags::empty(),
        None::<&str>,
    ));
    let (r, d) = super::judge_errno(plain, &[libc::EINVAL]);
    let mut out = vec![check(
        "escape.mount-syscall",
        r,
        format!("mount(2) in the current namespace with no fs type: {d}"),
        MOUNT,
    )];
    let (r, d) = step_verdict(
        in_child(|| tmpfs_in_new_ns(CloneFlags::CLONE_NEWNS)),
        "CLONE_NEWNS",
    );
    out.push(check("escape.mount-newns", r, d, MOUNT));
    let (r, d) = step_verdict(
        in_child(|| tmpfs_in_new_ns(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS)),
        "CLONE_NEWUSER|CLONE_NEWNS",
    );
    out.push(check(
        "escape.userns-mount",
        r,
        d,
        "no unprivileged user namespaces inside (CVE-2022-0492 precondition; PRODUCT seccomp)",
    ));
    out
}

static MARKER: u64 = 0x6d6f_6174_7072_6f62;

/// PTRACE_ATTACH and process_vm_readv from one child against a sibling.
fn ptrace() -> Vec<Check> {
    const P: &str = "no ptrace of other processes (PRODUCT seccomp; no CAP_SYS_PTRACE; Yama)";
    let scope = read_trim("/proc/sys/kernel/yama/ptrace_scope")
        .map(|s| format!(" (yama ptrace_scope {s})"))
        .unwrap_or_default();
    let sleeper = match moat_sys::probe::Sleeper::spawn(Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => {
            let d = format!("cannot fork a target: {e}");
            return vec![
                check(
                    "escape.ptrace-sibling",
                    Outcome::NotApplicable,
                    d.clone(),
                    P,
                ),
                check("escape.process-vm-readv", Outcome::NotApplicable, d, P),
            ];
        }
    };
    let pid = Pid::from_raw(sleeper.pid());
    let (r, d) = child_verdict(in_child(|| nix_errno(nix::sys::ptrace::attach(pid))), &[]);
    let mut out = vec![check(
        "escape.ptrace-sibling",
        r,
        format!("PTRACE_ATTACH to a sibling: {d}{scope}"),
        P,
    )];
    let (r, d) = child_verdict(
        in_child(|| {
            let mut buf = [0u8; 8];
            let remote = [nix::sys::uio::RemoteIoVec {
                base: std::ptr::addr_of!(MARKER) as usize,
                len: 8,
            }];
            match nix::sys::uio::process_vm_readv(
                pid,
                &mut [std::io::IoSliceMut::new(&mut buf)],
                &remote,
            ) {
                Ok(8) if u64::from_ne_bytes(buf) == MARKER => 0,
                Ok(_) => libc::EIO,
                Err(e) => e as i32,
            }
        }),
        &[],
    );
    out.push(check(
        "escape.process-vm-readv",
        r,
        format!("reading a sibling's memory: {d}"),
        P,
    ));
    drop(sleeper);
    out
}

fn syscalls() -> Vec<Check> {
    use moat_sys::probe as sys;
    let mut out = Vec::new();
    let mut add = |id: &'static str,
                   what: &str,
                   r: std::io::Result<()>,
                   past: &[i32],
                   practice: &'static str| {
        let (o, d) = judge(&r, past);
        out.push(check(id, o, format!("{what}: {d}"), practice));
    };
    add(
        "escape.keyctl",
        "keyctl(GET_KEYRING_ID, session)",
        sys::keyctl_session_keyring_id().map(drop),
        &[libc::ENOKEY],
        SECCOMP,
    );
    add(
        "escape.add-key",
        "add_key into an absent keyring",
        sys::add_key_to_absent_keyring(),
        &[libc::ENOKEY],
        SECCOMP,
    );
    add(
        "escape.bpf-map",
        "bpf(BPF_MAP_CREATE) array map",
        sys::bpf_map_create(),
        &[],
        SECCOMP,
    );
    add(
        "escape.bpf-prog",
        "bpf(BPF_PROG_LOAD) socket filter",
        sys::bpf_prog_load_socket_filter(),
        &[],
        SECCOMP,
    );
    add(
        "escape.perf-event-open",
        "perf_event_open (self, user-only)",
        sys::perf_event_open_self(),
        &[],
        SECCOMP,
    );
    add(
        "escape.userfaultfd",
        "userfaultfd",
        sys::userfaultfd(),
        &[],
        SECCOMP,
    );
    add(
        "escape.io-uring",
        "io_uring_setup(0 entries)",
        sys::io_uring_setup_zero(),
        &[libc::EINVAL],
        SECCOMP,
    );
    const MODULE: &str =
        "no kernel module loading (PRODUCT seccomp; no CAP_SYS_MODULE; Trivy KSV-0120)";
    add(
        "escape.init-module",
        "init_module(empty image)",
        sys::init_module_empty(),
        &[libc::ENOEXEC, libc::EINVAL, libc::EFAULT],
        MODULE,
    );
    add(
        "escape.finit-module",
        "finit_module(-1)",
        sys::finit_module_bad_fd(),
        &[libc::EBADF],
        MODULE,
    );
    add(
        "escape.delete-module",
        "delete_module(absent)",
        sys::delete_module_absent(),
        &[libc::ENOENT],
        MODULE,
    );
    const BOOT: &str = "no kexec or reboot (PRODUCT seccomp; no CAP_SYS_BOOT)";
    add(
        "escape.kexec-load",
        "kexec_load(too many segments)",
        sys::kexec_load_invalid(),
        &[libc::EINVAL],
        BOOT,
    );
    add(
        "escape.reboot",
        "reboot(bad magic)",
        sys::reboot_bad_magic(),
        &[libc::EINVAL],
        BOOT,
    );
    let root = std::fs::File::open("/");
    match root {
        Ok(f) => add(
            "escape.open-by-handle",
            "open_by_handle_at(bogus handle)",
            sys::open_by_handle_at_bogus(f.as_fd()),
            &[libc::ESTALE],
            "no CAP_DAC_READ_SEARCH: no host file access by handle (shocker; CDK cap-dac-read-search)",
        ),
        Err(e) => out.push(check("escape.open-by-handle", Outcome::NotApplicable, format!("cannot open /: {e}"), "no CAP_DAC_READ_SEARCH")),
    }
    let mut add = |id: &'static str,
                   what: &str,
                   r: std::io::Result<()>,
                   past: &[i32],
                   practice: &'static str| {
        let (o, d) = judge(&r, past);
        out.push(check(id, o, format!("{what}: {d}"), practice));
    };
    add(
        "escape.settime",
        "adjtimex(ADJ_TICK, invalid)",
        sys::adjtimex_invalid_tick(),
        &[libc::EINVAL],
        "no CAP_SYS_TIME: the host clock is not namespaced",
    );
    add(
        "escape.swapon",
        "swapon(absent path)",
        sys::swapon_absent(),
        &[libc::ENOENT],
        SECCOMP,
    );
    add(
        "escape.fanotify",
        "fanotify_init",
        sys::fanotify_init_notif(),
        &[],
        "no CAP_SYS_ADMIN: no filesystem-wide monitoring",
    );
    out
}

/// Attempts that change the calling process, so they run in children.
fn children() -> Vec<Check> {
    let mut out = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        let (r, d) = child_verdict(
            in_child(|| super::errno_of(&moat_sys::probe::ioperm_port80())),
            &[],
        );
        out.push(check(
            "escape.ioperm",
            r,
            format!("ioperm(0x80) in a child: {d}"),
            "no CAP_SYS_RAWIO: no I/O port access",
        ));
    }
    let (r, d) = child_verdict(in_child(|| nix_errno(nix::unistd::chroot("/"))), &[]);
    out.push(check(
        "escape.chroot",
        r,
        format!("chroot(/) in a child: {d}"),
        "least privilege: CAP_SYS_CHROOT only if needed (chroot escapes)",
    ));
    let long = "x".repeat(65);
    let (r, d) = child_verdict(
        in_child(|| nix_errno(nix::unistd::sethostname(&long))),
        &[libc::EINVAL],
    );
    out.push(check(
        "escape.sethostname",
        r,
        format!("sethostname(65 bytes) in a child: {d}"),
        "no CAP_SYS_ADMIN; own UTS namespace (CIS 5.21)",
    ));
    out
}

/// Descriptors other than 0, 1, 2 (CVE-2024-21626 leaked a host directory fd).
fn leaked_fds() -> Check {
    const P: &str = "no host file descriptors leaked into the container (CVE-2024-21626)";
    let me = format!("/proc/{}/fd", std::process::id());
    let mut leaked = Vec::new();
    let entries: Vec<String> = match std::fs::read_dir("/proc/self/fd") {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) => {
            return check(
                "escape.leaked-fds",
                Outcome::NotApplicable,
                format!("/proc/self/fd: {e}"),
                P,
            )
        }
    };
    for name in entries {
        let Ok(n) = name.parse::<u32>() else { continue };
        if n <= 2 {
            continue;
        }
        let target = std::fs::read_link(format!("/proc/self/fd/{n}"))
            .map(|t| t.display().to_string())
            .unwrap_or_default();
        if target.is_empty() || target == me {
            continue;
        }
        leaked.push(format!("{n}->{target}"));
    }
    if leaked.is_empty() {
        check(
            "escape.leaked-fds",
            Outcome::Blocked,
            "only stdin, stdout, stderr open",
            P,
        )
    } else {
        check(
            "escape.leaked-fds",
            Outcome::Allowed,
            format!("extra descriptors: {}", leaked.join(" ")),
            P,
        )
    }
}

fn sa_token() -> Check {
    const T: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
    const P: &str = "no service account token unless needed (automountServiceAccountToken: false; Trivy KSV-0036)";
    if std::path::Path::new(T).exists() {
        check(
            "k8s.service-account-token",
            Outcome::Allowed,
            format!("{T} present"),
            P,
        )
    } else {
        check(
            "k8s.service-account-token",
            Outcome::Blocked,
            "no Kubernetes service account token mounted",
            P,
        )
    }
}

fn rlimits() -> Vec<Check> {
    use rustix::process::{getrlimit, Resource};
    const P: &str =
        "kernel limits: no core dumps, bounded processes and open files (PRODUCT; CIS 5.19)";
    let show = |v: Option<u64>| v.map_or("unlimited".to_string(), |n| n.to_string());
    let core = getrlimit(Resource::Core);
    let nproc = getrlimit(Resource::Nproc);
    let nofile = getrlimit(Resource::Nofile);
    vec![
        check(
            "limits.core",
            if core.current == Some(0) {
                Outcome::Blocked
            } else {
                Outcome::Allowed
            },
            format!("RLIMIT_CORE {}/{}", show(core.current), show(core.maximum)),
            P,
        ),
        check(
            "limits.nproc",
            if nproc.maximum.is_some() {
                Outcome::Blocked
            } else {
                Outcome::Allowed
            },
            format!(
                "RLIMIT_NPROC {}/{}",
                show(nproc.current),
                show(nproc.maximum)
            ),
            P,
        ),
        check(
            "limits.nofile",
            if nofile.maximum.is_some_and(|m| m <= 65536) {
                Outcome::Blocked
            } else {
                Outcome::Allowed
            },
            format!(
                "RLIMIT_NOFILE {}/{}",
                show(nofile.current),
                show(nofile.maximum)
            ),
            P,
        ),
    ]
}
