//! moat's own VMM under the whole jailer (`builtin::jail_plan`, then
//! `builtin::run`): payload guests still read, write and flush their disk
//! (a descriptor opened outside), take entropy, talk over the agent console,
//! get an ARP answer from moat's user-space stack through the network
//! card and have a real virtiofsd serve their virtio-fs device (guest RAM a
//! memfd it maps: the set-up filter's calls for that), from a process
//! that is an unprivileged host user with no capabilities, in a root that
//! holds only the disk image and /dev/kvm, under the process filter and
//! each thread's.
//!
//! The jail changes the whole process (its root, its user), so the test
//! runs it in a child: this same test binary, re-run for this one test with
//! `MOAT_JAILED_VMM` set, in new mount, IPC, UTS and network namespaces
//! (as the tier clones its VMM process). The child reports on stdout;
//! the parent checks the report, the disk image and the agent socket.
//! Needs root and /dev/kvm.
#[path = "../../moat-vmm/tests/common/payload_vm.rs"]
#[allow(dead_code)]
mod payload_vm;
#[path = "../../moat-vmm/tests/common/virtiofsd.rs"]
mod virtiofsd;

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use moat_microvm::builtin;
use moat_vmm::{BlockConfig, Kernel, VmConfig};

const CHILD: &str = "MOAT_JAILED_VMM";
/// Set for the rootless variant's child: the jail as an unprivileged
/// runtime's VMM builds it (`JailPlan::rootless`).
const ROOTLESS: &str = "MOAT_JAILED_VMM_ROOTLESS";
/// The host user the jailed VMM becomes (unused by anything else here).
const UID: u32 = 3_999_900_000;
/// The agent socket's end the child gets, at this descriptor.
const AGENT_FD: i32 = 3;
/// The network card's frame socket, at this one.
const NET_FD: i32 = 4;
/// The virtio-fs device's vhost-user socket (to virtiofsd), at this one.
const FS_FD: i32 = 5;

fn payload(name: &str) -> Kernel {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../moat-vmm/tests/payloads")
        .join(format!("{name}.bin"));
    Kernel::Payload(std::fs::read(p).unwrap())
}

/// What the child does: jail itself, probe the jail, run a guest per
/// device one after the other (disk, entropy, agent console, network
/// card), report.
fn child(dir: &Path) -> ! {
    let disk = dir.join("disk.img");
    let serial = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join("serial.txt"))
        .unwrap();
    // The disk is a descriptor opened out here: the jail's root does not
    // hold it.
    let image = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .unwrap();
    let mut config = VmConfig::new(payload("blk"), 1, 16);
    config.block.push(BlockConfig {
        path: disk.clone(),
        read_only: false,
        file: Some(std::sync::Arc::new(image)),
    });
    config.serial_out = Some(serial);
    // SAFETY: the parent put the agent socket at AGENT_FD (pre_exec's
    // dup2) and nothing else in this process owns that descriptor.
    let agent = unsafe { UnixStream::from(OwnedFd::from_raw_fd(AGENT_FD)) };
    let mut console = VmConfig::new(payload("console"), 1, 16);
    console.agent = Some(agent);
    let mut rng = VmConfig::new(payload("rng"), 1, 16);
    rng.rng = true;
    // SAFETY: as for AGENT_FD, with NET_FD.
    let frames = unsafe { UnixStream::from(OwnedFd::from_raw_fd(NET_FD)) };
    let mut arp = VmConfig::new(payload("arp"), 1, 16);
    arp.net = Some(moat_vmm::NetConfig {
        backend: moat_vmm::NetBackend::Stream(frames),
        mac: [0x02, 0x6d, 0x6f, 0x61, 0x74, 0x64],
        mtu: 65520,
    });
    // SAFETY: as for AGENT_FD, with FS_FD.
    let fs_socket = unsafe { UnixStream::from(OwnedFd::from_raw_fd(FS_FD)) };
    let mut fs = VmConfig::new(payload("fs"), 1, 16);
    fs.fs.push(moat_vmm::FsConfig {
        tag: "payload".into(),
        socket: fs_socket,
    });
    for c in [&mut rng, &mut console, &mut arp, &mut fs] {
        c.serial_out = Some(config.serial_out.as_ref().unwrap().try_clone().unwrap());
    }
    let root = dir.join("jail");
    // Rootless, the host user UID is the namespace's root (see the test).
    let rootless = std::env::var_os(ROOTLESS).is_some();
    let id = if rootless { 0 } else { UID };
    let mut plan = builtin::jail_plan(&config, &root, id, id).unwrap();
    for c in [&rng, &console, &arp, &fs] {
        plan.keep_fds
            .extend(builtin::jail_plan(c, &root, id, id).unwrap().keep_fds);
    }
    // A root-only file in the jail: the jailed process may not read it.
    plan.files.push(dir.join("secret"));
    plan.rootless = rootless;
    plan.enter().unwrap();

    // Probes, from inside (reported once the VMs ran: afterwards this
    // thread may only write and exit).
    let errno = |r: std::io::Result<()>| match r {
        Ok(()) => "ok".to_string(),
        Err(e) => format!("{}", e.raw_os_error().unwrap_or(0)),
    };
    let secret = std::fs::File::open(dir.join("secret")).map(drop);
    let image = std::fs::File::open(&disk).map(drop);
    let groups = std::fs::read_to_string("/proc/self/status").map(drop);
    let passwd = std::fs::File::open("/etc/passwd").map(drop);
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").map(drop);
    let spawn = Command::new("/bin/true").status().map(drop);
    // SAFETY: the filter should refuse it; should it not, the child only
    // calls _exit (async-signal-safe) and the probe reports "ok".
    let fork = match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        // SAFETY: _exit ends the forked child at once.
        0 => unsafe { libc::_exit(0) },
        _ => Ok(()),
    };
    let probes = format!(
        "secret={} image={} proc={} passwd={} socket={} spawn={} fork={}",
        errno(secret),
        errno(image),
        errno(groups),
        errno(passwd),
        errno(sock),
        errno(spawn),
        errno(fork)
    );
    let mut ran = Vec::new();
    for (name, c) in [
        ("blk", config),
        ("rng", rng),
        ("console", console),
        ("arp", arp),
        ("fs", fs),
    ] {
        let r = std::thread::spawn(move || builtin::run(c).map_err(|e| moat_core::error_chain(&e)))
            .join()
            .unwrap();
        ran.push(format!("{name}={r:?}"));
    }
    println!("JAIL {probes}");
    println!("VM {}", ran.join(" "));
    std::process::exit(0)
}

fn kvm_and_root(test: &str) -> bool {
    if !payload_vm::kvm_available() {
        return false;
    }
    !moat_core::testing::needs_root(test)
}

#[test]
fn the_builtin_vmm_runs_in_its_jail() {
    jailed_vmm("the_builtin_vmm_runs_in_its_jail", false);
}

/// The same, as an unprivileged runtime's VMM: the child is an
/// unprivileged user of its own (with /dev/kvm's group, as a user who may
/// use KVM), unshares a user namespace that maps only itself along with
/// the others (as the tier clones its VMM process rootless), and builds
/// the jail with the capabilities it holds there, dropping them all: the
/// bound /dev/kvm opens and every device works as above. (The tier maps
/// the user as itself and never executes between the clone and the jail;
/// this child must execute this test binary after the unshare, and an
/// execve by a non-zero ID would drop those capabilities first, so here
/// the user is the namespace's root, and the jail's ID 0.)
#[test]
fn the_builtin_vmm_runs_in_its_rootless_jail() {
    jailed_vmm("the_builtin_vmm_runs_in_its_rootless_jail", true);
}

fn jailed_vmm(test: &str, rootless: bool) {
    if let Some(dir) = std::env::var_os(CHILD) {
        child(Path::new(&dir));
    }
    if !kvm_and_root(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Reachable by the jailed user: the image is its to write, the
    // directories on the way searchable.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let disk = dir.path().join("disk.img");
    let mut image = vec![0u8; 8 * 512];
    image[512..528].copy_from_slice(b"MOAT-BLOCK-SECT1");
    std::fs::write(&disk, image).unwrap();
    std::os::unix::fs::chown(&disk, Some(UID), Some(UID)).unwrap();
    std::fs::write(dir.path().join("serial.txt"), b"").unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, b"root only").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    std::fs::create_dir(dir.path().join("jail")).unwrap();
    if rootless {
        // The user's own, as its runtime's state directory would be.
        for f in ["serial.txt", "jail"] {
            std::os::unix::fs::chown(dir.path().join(f), Some(UID), Some(UID)).unwrap();
        }
    }
    let (mut host, guest) = UnixStream::pair().unwrap();
    host.write_all(b"ping").unwrap();
    let guest_fd = OwnedFd::from(guest);
    // The network card's other end: moat's user-space stack, here.
    let (frames, stack) = payload_vm::stack_link();
    let frames_fd = OwnedFd::from(frames);
    // The virtio-fs device's back-end: a real virtiofsd, out here.
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let be = virtiofsd::backend(&share, &dir.path().join("fs.sock"));
    let fs_fd = OwnedFd::from(be.socket.try_clone().unwrap());

    let exe: PathBuf = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD, dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if rootless {
        cmd.env(ROOTLESS, "1");
    }
    let raw = std::os::fd::AsRawFd::as_raw_fd(&guest_fd);
    let raw_frames = std::os::fd::AsRawFd::as_raw_fd(&frames_fd);
    let raw_fs = std::os::fd::AsRawFd::as_raw_fd(&fs_fd);
    // Rootless: what the child writes to its own maps, made out here (no
    // allocation after the fork).
    let kvm_gid = std::os::unix::fs::MetadataExt::gid(&std::fs::metadata("/dev/kvm").unwrap());
    let map: &'static [u8] = format!("0 {UID} 1\n").leak().as_bytes();
    let files = [
        (c"/proc/self/uid_map", map),
        (c"/proc/self/setgroups", b"deny".as_slice()),
        (c"/proc/self/gid_map", map),
    ];
    // SAFETY: the closure runs in the forked child before exec and calls
    // only async-signal-safe system calls (dup2, setgroups, setresgid,
    // setresuid, prctl, unshare, open, write, close) on data made before
    // the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fail = || Err(std::io::Error::last_os_error());
            // The agent socket at a known descriptor, and the namespaces
            // the tier gives its VMM process.
            if libc::dup2(raw, AGENT_FD) < 0
                || libc::dup2(raw_frames, NET_FD) < 0
                || libc::dup2(raw_fs, FS_FD) < 0
            {
                return fail();
            }
            let mut flags =
                libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWNET;
            if rootless {
                // An unprivileged user who may use KVM, as dumpable as a
                // user's own runtime (the switch made it not).
                let groups = [kvm_gid];
                if libc::setgroups(1, groups.as_ptr()) != 0
                    || libc::setresgid(UID, UID, UID) != 0
                    || libc::setresuid(UID, UID, UID) != 0
                    || libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) != 0
                {
                    return fail();
                }
                flags |= libc::CLONE_NEWUSER;
            }
            if libc::unshare(flags) != 0 {
                return fail();
            }
            if rootless {
                for (path, text) in files {
                    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return fail();
                    }
                    let n = libc::write(fd, text.as_ptr().cast(), text.len());
                    libc::close(fd);
                    if n != text.len() as isize {
                        return fail();
                    }
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(guest_fd);
    drop(frames_fd);
    drop(fs_fd);
    // A bound against a hung child, not a timing assertion.
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the jailed VMM did not finish");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "child: {status}\n{out}\n{err}");

    let eperm = libc::EPERM;
    let enoent = libc::ENOENT;
    // (libtest prints the test's name just before, on the same line.)
    let line = |tag: &str| {
        out.lines()
            .find_map(|l| l.find(tag).map(|i| l[i..].to_string()))
            .unwrap_or_else(|| panic!("no {tag:?} in\n{out}\n{err}"))
    };
    let jail = line("JAIL ");
    let eacces = libc::EACCES;
    // An unprivileged host user without capabilities (a root-only file in
    // its root stays closed to it); the disk image not in its root; no
    // /proc, no /etc (the root holds only what the VM needs); no sockets,
    // no programs, no processes.
    assert_eq!(
        jail,
        format!(
            "JAIL secret={eacces} image={enoent} proc={enoent} passwd={enoent} socket={eperm} spawn={eperm} fork={eperm}"
        ),
        "{out}\n{err}"
    );
    let vm = line("VM ");
    assert_eq!(
        vm, "VM blk=Ok(Reset) rng=Ok(Reset) console=Ok(Reset) arp=Ok(Reset) fs=Ok(Reset)",
        "{out}\n{err}"
    );
    let serial = std::fs::read_to_string(dir.path().join("serial.txt")).unwrap();
    assert_eq!(
        serial,
        "blk read=0 MOAT-BLOCK-SECT1 write=0 past=1\n\
         rng len=20 nonzero=1 loop=00 outside=00\n\
         console done\n\
         arp reply from the gateway\n\
         fs init=00000000 major=07 mkdir=00000000 len=90\n"
    );
    assert!(share.join("payload-dir").is_dir());
    drop(be);
    // The stack ends when the card's socket closes (the child exited).
    assert!(stack.join().unwrap().is_ok());
    assert_eq!(
        &std::fs::read(&disk).unwrap()[1024..1040],
        b"written by guest"
    );
    let mut got = String::new();
    host.read_to_string(&mut got).unwrap();
    assert_eq!(got, "guest got: ping");
}
