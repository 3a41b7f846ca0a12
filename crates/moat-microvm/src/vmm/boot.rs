//! Getting a guest to its agent's hello: a cold boot, or a restore from
//! the cached snapshot ([`crate::snapshot`]), and saving a cold-booted
//! guest as the snapshot through QEMU's monitor (QMP).
//!
//! Restore: QEMU starts with `-incoming fd:N` (the snapshot, opened
//! read-only by the runtime), the same machine and devices as the saved
//! guest, and this run's disks in the disk slots; the guest resumes inside
//! its agent's loop, which answers our `Ping` with a hello. A QEMU that
//! fails to load the stream, or a guest that does not answer within
//! [`RESTORE_TIMEOUT`], is killed and the guest booted cold.
//!
//! Save: right after a cold-booted guest's hello (before any of the
//! container reaches it), `migrate` to the runtime's file (handed to QEMU
//! over the monitor socket with `getfd`), wait for `completed`, `cont`. The monitor is a socketpair QEMU inherits; QEMU opens nothing.
//!
//! Share ports (`VmmPlan::share_port`): the guest's RAM is a file the
//! migration leaves out (`x-ignore-shared`), appended to the snapshot by
//! this process and loaded back before a restoring QEMU starts (which
//! then gets its stream over the monitor), and the read-write volumes are
//! hot-added once the guest said hello, however it started.
use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::{qemu, Backend, VmChild, VmmError, VmmPlan};
use crate::proto::{self, Decoder, Kind};
use moat_sys::process::OneThread;

/// How long a restored guest may take to answer before it is booted cold.
pub const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long saving a snapshot may take.
const SAVE_TIMEOUT: Duration = Duration::from_secs(120);
/// How much of the guest console is kept for error messages.
pub const CONSOLE_TAIL: usize = 8192;

/// A VM whose agent said hello.
pub struct Booted {
    pub vm: VmChild,
    pub agent: File,
    pub console: File,
    pub console_tail: VecDeque<u8>,
    /// Where to ask for the save, when this boot may be saved: QEMU's
    /// monitor (QMP), or the control socket of moat's own VMM; QEMU's
    /// monitor too when volumes are hot-added (`VmmPlan::share_port`).
    saver: Option<UnixStream>,
    /// QEMU's monitor once a save negotiated it, for the hot-add after.
    qmp: Option<Qmp>,
}

impl Booted {
    /// A VM just started (its agent yet to say hello).
    fn new(vm: VmChild, agent: File, console: File, saver: Option<UnixStream>) -> Booted {
        Booted {
            vm,
            agent,
            console,
            console_tail: VecDeque::new(),
            saver,
            qmp: None,
        }
    }
}

/// The socket pairs the VMM may need, made before the jail (whose filter
/// has no `socketpair`): an agent channel per attempt (a restore or a
/// save may fail and a cold boot follow) and, for a save, QEMU's monitor
/// or moat's own VMM's control socket (with a share port, QEMU's monitor
/// for every attempt).
pub struct Channels {
    agent: Vec<(UnixStream, UnixStream)>,
    saver: Vec<(UnixStream, UnixStream)>,
    /// The VMM process's own descriptors (the setup channel, the control
    /// socket, the events record), which the child running moat's own VMM
    /// closes first.
    pub relay_fds: Vec<RawFd>,
}

impl Channels {
    pub fn new(plan: &VmmPlan) -> Result<Channels, VmmError> {
        let io = |source| VmmError::Io {
            step: "create the agent channel".into(),
            source,
        };
        let tries = match plan.snapshot {
            super::SnapshotPlan::Off(_) => 1,
            _ => 2,
        };
        let agent = (0..tries)
            .map(|_| UnixStream::pair().map_err(io))
            .collect::<Result<Vec<_>, _>>()?;
        let monitors = match plan.snapshot {
            _ if plan.share_port => tries,
            super::SnapshotPlan::Save(_) => 1,
            _ => 0,
        };
        let saver = (0..monitors)
            .map(|_| UnixStream::pair().map_err(io))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Channels {
            agent,
            saver,
            relay_fds: Vec::new(),
        })
    }

    /// Every descriptor, for the jail to keep.
    pub fn fds(&self) -> Vec<RawFd> {
        self.agent
            .iter()
            .chain(self.saver.iter())
            .flat_map(|(a, b)| [a.as_raw_fd(), b.as_raw_fd()])
            .collect()
    }
}

/// Starts the VMM: QEMU (a cold boot, or a restore from `incoming`; with
/// a monitor when it may save into `save_to`), or moat's own
/// ([`spawn_builtin`], the same way, its control socket in place of the
/// monitor).
fn spawn(
    plan: &VmmPlan,
    ch: &mut Channels,
    incoming: Option<&File>,
    save_to: Option<&File>,
    one: &OneThread,
) -> Result<Booted, VmmError> {
    let monitor = save_to.is_some() || plan.share_port;
    let io = |step: &str| {
        let step = step.to_string();
        move |source| VmmError::Io { step, source }
    };
    let (ours, theirs) = ch.agent.pop().ok_or_else(|| VmmError::Io {
        step: "start QEMU".into(),
        source: std::io::Error::other("no agent channel left"),
    })?;
    let (binary, accel) = match &plan.backend {
        Backend::Qemu { binary, accel } => (binary, accel),
        Backend::Builtin => {
            let control = if monitor { ch.saver.pop() } else { None };
            let (control_ours, control_theirs) = control.unzip();
            let start = BuiltinStart {
                incoming,
                control: control_theirs.zip(save_to),
            };
            let mut close = vec![ours.as_raw_fd()];
            close.extend(control_ours.as_ref().map(|c| c.as_raw_fd()));
            let (vm, console) = spawn_builtin(plan, theirs, start, &close, &ch.relay_fds, one)?;
            return Ok(Booted::new(
                vm,
                File::from(OwnedFd::from(ours)),
                console,
                control_ours,
            ));
        }
    };
    let qmp = if monitor { ch.saver.pop() } else { None };
    let args = qemu::QemuArgs {
        accel: *accel,
        kernel: plan.kernel.clone(),
        initrd: plan.initrd.clone(),
        cmdline: plan.cmdline.clone(),
        vcpus: plan.vcpus,
        mem_mib: plan.mem_mib,
        agent_fd: theirs.as_raw_fd(),
        disk_fds: plan.disks.iter().map(|d| d.as_raw_fd()).collect(),
        scratch_fd: plan.scratch.as_ref().map(|f| f.as_raw_fd()),
        incoming_fd: incoming.map(|f| f.as_raw_fd()),
        qmp_fd: qmp.as_ref().map(|(_, q)| q.as_raw_fd()),
        disk_slots: plan.disk_slots,
        spare_fd: plan.spare.as_raw_fd(),
        net: plan.net.as_ref().map(|n| match n {
            super::GuestLink::Stream(fd) => qemu::NetFd::Stream(fd.as_raw_fd()),
            super::GuestLink::Tap(fd) => qemu::NetFd::Tap(fd.as_raw_fd()),
        }),
        volume_fds: plan.volumes.iter().map(|v| v.as_raw_fd()).collect(),
        // Hot-added ones are inherited for the monitor to name.
        more_tap_fds: if plan.hot_net {
            Vec::new()
        } else {
            plan.more_net.iter().map(|t| t.as_raw_fd()).collect()
        },
        share_port: plan.share_port,
    };
    // QEMU inherits exactly these (everything else is close-on-exec).
    let mut inherit: Vec<RawFd> = std::iter::once(theirs.as_raw_fd())
        .chain(plan.disks.iter().map(|d| d.as_raw_fd()))
        .chain(plan.scratch.iter().map(|d| d.as_raw_fd()))
        .chain(std::iter::once(plan.spare.as_raw_fd()))
        .collect();
    inherit.extend(incoming.map(|f| f.as_raw_fd()));
    inherit.extend(plan.net.as_ref().map(|n| n.fd().as_raw_fd()));
    inherit.extend(plan.more_net.iter().map(|t| t.as_raw_fd()));
    inherit.extend(plan.volumes.iter().map(|v| v.as_raw_fd()));
    inherit.extend(qmp.as_ref().map(|(_, q)| q.as_raw_fd()));
    for fd in &inherit {
        moat_sys::fd::set_cloexec(*fd, false).map_err(io("pass a descriptor to QEMU"))?;
    }
    let (serial_r, serial_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| VmmError::Sys {
            step: "create the console pipe".into(),
            source: e,
        })?;
    let child = Command::new(binary)
        .args(args.build())
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::from(
            serial_w
                .try_clone()
                .map_err(io("duplicate the console pipe"))?,
        ))
        .stderr(Stdio::from(serial_w))
        .spawn();
    for fd in &inherit {
        let _ = moat_sys::fd::set_cloexec(*fd, true);
    }
    let child = child.map_err(io(&format!("start {}", binary.display())))?;
    drop(theirs);
    let qmp = qmp.map(|(ours, theirs)| {
        drop(theirs);
        ours
    });
    // Reaped by its PID from here on (std's handle would wait on drop
    // for nothing: it holds no pipes).
    let vm = VmChild::new(child.id() as i32);
    drop(child);
    Ok(Booted::new(
        vm,
        File::from(OwnedFd::from(ours)),
        File::from(serial_r),
        qmp,
    ))
}

/// Starts moat's own VMM in a child of this process (it executes nothing:
/// the jail's root holds nothing to run). The child closes the VMM
/// process's own descriptors and `ours` (the relay's end of the agent
/// channel), takes the console pipe as its stdout and stderr, narrows its
/// filter to the VMM's ([`crate::seccomp::builtin_setup_profile`]), builds
/// the VM and runs it, each thread under its role's filter. Its end closes
/// the agent channel, as QEMU's does.
fn spawn_builtin(
    plan: &VmmPlan,
    agent: UnixStream,
    start: BuiltinStart<'_>,
    ours: &[RawFd],
    relay_fds: &[RawFd],
    one: &OneThread,
) -> Result<(VmChild, File), VmmError> {
    let (serial_r, serial_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| VmmError::Sys {
            step: "create the console pipe".into(),
            source: e,
        })?;
    let mut agent = Some(agent);
    let mut start = Some(start);
    let reader = serial_r.as_raw_fd();
    let pid = one
        .fork(0, |_| {
            // This copy of the process never returns or unwinds into the
            // relay (it `_exit`s), so these descriptors are closed once.
            for fd in relay_fds.iter().chain(ours).chain([&reader]) {
                let _ = nix::unistd::close(*fd);
            }
            let (Some(agent), Some(start)) = (agent.take(), start.take()) else {
                return 255;
            };
            match builtin_child(plan, agent, start, &serial_w) {
                Ok(reason) => match reason {
                    moat_vmm::ExitReason::Reset
                    | moat_vmm::ExitReason::PowerOff
                    | moat_vmm::ExitReason::Stopped => 0,
                    other => {
                        eprintln!("moat: microvm: the VM stopped: {other:?}");
                        1
                    }
                },
                Err(e) => {
                    eprintln!("moat: microvm: moat's own VMM: {e}");
                    1
                }
            }
        })
        .map_err(|e| VmmError::Io {
            step: "start moat's own VMM".into(),
            source: e,
        })?;
    drop(agent);
    drop(start);
    drop(serial_w);
    Ok((VmChild::new(pid), File::from(serial_r)))
}

/// How moat's own VMM starts: from a snapshot or cold, and whether it
/// serves the relay's requests to save one (its end of the control
/// socket, and the file).
struct BuiltinStart<'a> {
    incoming: Option<&'a File>,
    control: Option<(UnixStream, &'a File)>,
}

/// The child of [`spawn_builtin`]: the VM's configuration from the plan,
/// then the VM run to its end.
fn builtin_child(
    plan: &VmmPlan,
    agent: UnixStream,
    start: BuiltinStart<'_>,
    console: &OwnedFd,
) -> Result<moat_vmm::ExitReason, String> {
    use std::sync::Arc;
    let dup = |fd: &OwnedFd| {
        fd.try_clone()
            .map_err(|e| format!("duplicate a descriptor: {e}"))
    };
    // Stdio: nothing in, the console out (where its errors are read).
    let null = File::open("/dev/null").map_err(|e| format!("open /dev/null: {e}"))?;
    nix::unistd::dup2_stdin(&null).map_err(|e| format!("stdin: {e}"))?;
    nix::unistd::dup2_stdout(console).map_err(|e| format!("stdout: {e}"))?;
    nix::unistd::dup2_stderr(console).map_err(|e| format!("stderr: {e}"))?;
    drop(null);
    let disks = plan.disks.len() + usize::from(plan.scratch.is_some());
    let spares = plan.disk_slots.saturating_sub(disks);
    // The writable layer after the images: the one disk the guest writes.
    let block = plan
        .disks
        .iter()
        .map(|f| (f, true))
        .chain(plan.scratch.iter().map(|f| (f, false)))
        .chain(std::iter::repeat_n((&plan.spare, true), spares))
        .enumerate()
        .map(|(i, (f, read_only))| {
            Ok(moat_vmm::BlockConfig {
                path: format!("disk {i}").into(),
                read_only,
                file: Some(Arc::new(
                    f.try_clone()
                        .map_err(|e| format!("duplicate disk {i}: {e}"))?,
                )),
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let mtu = u16::try_from(moat_net::NetConfig::default().mtu)
        .map_err(|_| "the stack's MTU does not fit the card".to_string())?;
    let net = match &plan.net {
        Some(link) => Some(moat_vmm::NetConfig {
            backend: match link {
                super::GuestLink::Stream(fd) => {
                    moat_vmm::NetBackend::Stream(UnixStream::from(dup(fd)?))
                }
                // moat's TAPs carry the header (`podnet::make_tap`).
                super::GuestLink::Tap(fd) => moat_vmm::NetBackend::Tap {
                    file: File::from(dup(fd)?),
                    vnet_hdr: true,
                },
            },
            mac: qemu::GUEST_MAC_BYTES,
            mtu,
        }),
        None => None,
    };
    let more_net = plan
        .more_net
        .iter()
        .enumerate()
        .map(|(k, t)| {
            Ok(moat_vmm::NetConfig {
                backend: moat_vmm::NetBackend::Tap {
                    file: File::from(dup(t)?),
                    vnet_hdr: true,
                },
                mac: proto::extra_device_mac(k),
                mtu,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let fs = plan
        .volumes
        .iter()
        .enumerate()
        .map(|(i, v)| {
            Ok(moat_vmm::FsConfig {
                tag: crate::guestspec::volume_tag(i),
                socket: UnixStream::from(dup(v)?),
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let serial = File::from(dup(console)?);
    let control = match start.control {
        Some((socket, out)) => Some((
            socket,
            out.try_clone()
                .map_err(|e| format!("duplicate the snapshot file: {e}"))?,
        )),
        None => None,
    };
    // From here on, the VMM's own filter (its threads inherit it and
    // narrow it to their roles').
    let profile = crate::seccomp::builtin_setup_profile().map_err(|e| e.to_string())?;
    crate::seccomp::load(&profile).map_err(|e| moat_core::error_chain(&e))?;
    let mut config = moat_vmm::VmConfig::new(
        moat_vmm::Kernel::Linux(plan.kernel.clone()),
        plan.vcpus,
        plan.mem_mib,
    );
    config.initrd = Some(plan.initrd.clone());
    config.cmdline = plan.cmdline.clone();
    config.serial_out = Some(serial);
    config.block = block;
    config.rng = true;
    config.balloon = true;
    config.agent = Some(agent);
    config.net = net;
    config.more_net = more_net;
    // Saved now: the volumes' slots are placeholders until the save is
    // written (`show_builtin`); restored: filled at the restore.
    config.fs_later = control.is_some() && !fs.is_empty();
    config.fs = fs;
    config.fs_slots = plan.fs_slots;
    crate::builtin::run_from(config, start.incoming, control)
        .map_err(|e| moat_core::error_chain(&e))
}

/// Boots cold, or restores; returns the booted VM and how it started.
/// With a share port, its volumes and more network devices are then
/// hot-added (whichever way it started); the guest's agent mounts each
/// volume as its device appears, and finds each network device by its
/// address.
pub fn boot(
    plan: &mut VmmPlan,
    ch: &mut Channels,
    one: &OneThread,
) -> Result<(Booted, crate::control::StartKind), VmmError> {
    let (mut b, kind) = start_guest(plan, ch, one)?;
    if plan.share_port {
        let taps: Vec<RawFd> = if plan.hot_net {
            plan.more_net.iter().map(|t| t.as_raw_fd()).collect()
        } else {
            Vec::new()
        };
        if let Err(e) = hot_add(&mut b, plan.volumes.len(), &taps) {
            b.vm.kill();
            b.vm.wait();
            return Err(e);
        }
    }
    Ok((b, kind))
}

/// Makes the guest's RAM file empty, of the guest's size (with a share
/// port: `qemu::RAM_FILE`, in the jail's RAM tmpfs), and fills it from
/// the snapshot `from` when restoring.
fn fresh_ram(plan: &VmmPlan, from: Option<&File>) -> Result<(), VmmError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |step: &str| {
        let step = step.to_string();
        move |source| VmmError::Io { step, source }
    };
    let ram = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(qemu::RAM_FILE)
        .map_err(io("create the guest's RAM file"))?;
    let len = plan.mem_mib << 20;
    ram.set_len(len).map_err(io("size the guest's RAM file"))?;
    if let Some(snap) = from {
        crate::snapshot::load_ram(snap, &ram, len).map_err(io("load the guest's RAM"))?;
    }
    Ok(())
}

/// QEMU's migration leaves the guest's (shared, file-backed) RAM out:
/// the VMM process saves and loads it itself.
fn ignore_shared(q: &mut Qmp) -> Result<(), VmmError> {
    q.call(
        &serde_json::json!({"execute": "migrate-set-capabilities", "arguments": {
            "capabilities": [{"capability": "x-ignore-shared", "state": true}]}}),
        None,
    )
    .map(drop)
}

/// With a share port, a restoring QEMU waits (`-incoming defer`) for the
/// monitor: `x-ignore-shared`, then the stream on `snap` (the descriptor
/// QEMU inherited, under the same number). The monitor is kept for the
/// hot-add.
fn incoming_by_monitor(b: &mut Booted, plan: &VmmPlan, snap: &File) -> Result<(), VmmError> {
    if !plan.share_port {
        return Ok(());
    }
    let mut q = Qmp::open(
        b.saver
            .take()
            .ok_or_else(|| monitor_error("no monitor for the restore"))?,
    )?;
    ignore_shared(&mut q)?;
    q.call(
        &serde_json::json!({"execute": "migrate-incoming",
            "arguments": {"uri": format!("fd:{}", snap.as_raw_fd())}}),
        None,
    )?;
    b.qmp = Some(q);
    Ok(())
}

/// Hot-adds `volumes` volumes, each on its share port, then a network
/// device on each TAP of `taps` (QEMU's descriptors) on the ports after
/// theirs, through QEMU's monitor; then closes the monitor (QEMU runs on
/// without one).
fn hot_add(b: &mut Booted, volumes: usize, taps: &[RawFd]) -> Result<(), VmmError> {
    let mut q = match b.qmp.take() {
        Some(q) => q,
        None => Qmp::open(
            b.saver
                .take()
                .ok_or_else(|| monitor_error("no monitor to hot-add the devices"))?,
        )?,
    };
    for i in 0..volumes {
        q.call(&qemu::hot_add_volume(i), None)?;
    }
    for (k, fd) in taps.iter().enumerate() {
        for c in qemu::hot_add_nic(k, volumes + k, *fd) {
            q.call(&c, None)?;
        }
    }
    Ok(())
}

fn start_guest(
    plan: &mut VmmPlan,
    ch: &mut Channels,
    one: &OneThread,
) -> Result<(Booted, crate::control::StartKind), VmmError> {
    use crate::control::StartKind;
    let (why, restore_failed) =
        match std::mem::replace(&mut plan.snapshot, super::SnapshotPlan::Off(String::new())) {
            super::SnapshotPlan::Restore(snap) => {
                let failed = |e: &VmmError| {
                    let why = format!(
                        "the snapshot did not restore ({})",
                        moat_core::error_chain(e)
                    );
                    (why, true)
                };
                // With a share port the guest's RAM comes from the
                // snapshot's own image, before QEMU maps it.
                let ram = if plan.share_port {
                    fresh_ram(plan, Some(&snap))
                } else {
                    Ok(())
                };
                match ram {
                    Err(e) => failed(&e),
                    Ok(()) => {
                        let mut b = spawn(plan, ch, Some(&snap), None, one)?;
                        let ping = proto::encode(Kind::Ping, 0, &[]);
                        let r = incoming_by_monitor(&mut b, plan, &snap)
                            .and_then(|()| {
                                b.agent.write_all(&ping).map_err(|e| VmmError::Io {
                                    step: "write to the guest".into(),
                                    source: e,
                                })
                            })
                            .and_then(|()| await_hello(&mut b, RESTORE_TIMEOUT, plan.console));
                        drop(snap);
                        match r {
                            Ok(()) => return Ok((b, StartKind::Restored)),
                            Err(e) => {
                                b.vm.kill();
                                b.vm.wait();
                                failed(&e)
                            }
                        }
                    }
                }
            }
            super::SnapshotPlan::Save(out) => {
                if plan.share_port {
                    fresh_ram(plan, None)?;
                }
                let mut b = spawn(plan, ch, None, Some(&out), one)?;
                await_hello(&mut b, plan.boot_timeout, plan.console)?;
                let primed = if plan.prime {
                    prime(&mut b, plan)
                } else {
                    Ok(())
                };
                let saved = match (primed, b.saver.take()) {
                    (Err(e), _) => Err(e),
                    (Ok(()), Some(mut q)) => match plan.backend {
                        Backend::Qemu { .. } => Qmp::open(q).and_then(|mut m| {
                            let ram = if plan.share_port {
                                ignore_shared(&mut m)?;
                                Some(plan.mem_mib << 20)
                            } else {
                                None
                            };
                            save(&mut m, &out, ram)?;
                            b.qmp = Some(m);
                            Ok(())
                        }),
                        Backend::Builtin => save_builtin(&mut q).and_then(|()| {
                            // The volumes' slots were placeholders for the
                            // save: the guest finds them from now on.
                            if plan.volumes.is_empty() {
                                Ok(())
                            } else {
                                show_builtin(&mut q, plan.volumes.len())
                            }
                        }),
                    },
                    (Ok(()), None) => Err(save_error("no monitor")),
                };
                return match saved {
                    Ok(()) => Ok((b, StartKind::Saved)),
                    Err(e) => {
                        // The guest may be stopped half-way: start over cold.
                        b.vm.kill();
                        b.vm.wait();
                        let b = cold(plan, ch, one)?;
                        Ok((
                            b,
                            StartKind::Cold {
                                why: format!(
                                    "saving the snapshot failed ({})",
                                    moat_core::error_chain(&e)
                                ),
                                restore_failed: false,
                            },
                        ))
                    }
                };
            }
            super::SnapshotPlan::Off(w) => (w, false),
        };
    let b = cold(plan, ch, one)?;
    Ok((
        b,
        StartKind::Cold {
            why,
            restore_failed,
        },
    ))
}

fn cold(plan: &VmmPlan, ch: &mut Channels, one: &OneThread) -> Result<Booted, VmmError> {
    if plan.share_port {
        fresh_ram(plan, None)?;
    }
    let mut b = spawn(plan, ch, None, None, one)?;
    await_hello(&mut b, plan.boot_timeout, plan.console)?;
    Ok(b)
}

/// Waits for the agent's hello (keeping the console's tail for errors).
fn await_hello(b: &mut Booted, timeout: Duration, echo: bool) -> Result<(), VmmError> {
    let until = Instant::now() + timeout;
    let mut dec = Decoder::new();
    let mut buf = vec![0u8; proto::MAX_DATA];
    let mut console_open = true;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(VmmError::BootTimeout {
                secs: timeout.as_secs(),
                console: tail_text(&b.console_tail),
            });
        }
        let mut fds = vec![PollFd::new(b.agent.as_fd(), PollFlags::POLLIN)];
        if console_open {
            fds.push(PollFd::new(b.console.as_fd(), PollFlags::POLLIN));
        }
        let ms = PollTimeout::try_from(left.as_millis().min(60_000) as i32 + 1)
            .unwrap_or(PollTimeout::NONE);
        match poll(&mut fds, ms) {
            Ok(_) | Err(nix::Error::EINTR) => {}
            Err(e) => {
                return Err(VmmError::Sys {
                    step: "poll".into(),
                    source: e,
                })
            }
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        if console_open && ready[1] {
            let n = b.console.read(&mut buf).unwrap_or(0);
            if n == 0 {
                console_open = false;
            } else {
                if echo {
                    let _ = std::io::stderr().write_all(&buf[..n]);
                }
                push_tail(&mut b.console_tail, &buf[..n]);
            }
        }
        if ready[0] {
            let n = b.agent.read(&mut buf).unwrap_or(0);
            if n == 0 {
                b.vm.wait();
                let mut rest = Vec::new();
                let _ = b.console.read_to_end(&mut rest);
                push_tail(&mut b.console_tail, &rest);
                return Err(VmmError::VmEnded {
                    console: tail_text(&b.console_tail),
                });
            }
            dec.push(&buf[..n]);
            while let Some(f) = dec.next_frame()? {
                if f.kind == Kind::Error {
                    let e: proto::ErrorMsg = f.json()?;
                    return Err(VmmError::Refused(e.message));
                }
                if f.kind == Kind::Hello {
                    let h: proto::Hello = f.json()?;
                    if h.version != proto::VERSION {
                        return Err(VmmError::Version { theirs: h.version });
                    }
                    if echo {
                        let took =
                            timeout.saturating_sub(until.saturating_duration_since(Instant::now()));
                        eprintln!("moat: microvm: Hello after {} ms", took.as_millis());
                    }
                    return Ok(());
                }
            }
        }
    }
}

pub fn push_tail(tail: &mut VecDeque<u8>, bytes: &[u8]) {
    tail.extend(bytes);
    while tail.len() > CONSOLE_TAIL {
        tail.pop_front();
    }
}

pub fn tail_text(tail: &VecDeque<u8>) -> String {
    let (a, b) = tail.as_slices();
    let mut v = a.to_vec();
    v.extend_from_slice(b);
    String::from_utf8_lossy(&v).into_owned()
}

/// Has the guest mount this run's disks before it is saved (the snapshot
/// is then keyed by them: [`crate::snapshot::Identity`]), and waits for
/// its hello.
fn prime(b: &mut Booted, plan: &VmmPlan) -> Result<(), VmmError> {
    let req = proto::PrimeRequest {
        disks: plan.run.disks.clone(),
        overlay: plan.run.overlay_root.clone().and_then(|lower| {
            let root = plan.run.config["root"]["path"].as_str()?;
            Some((lower, root.to_string()))
        }),
        warm: Some(proto::WarmUp::of(&plan.run)),
    };
    b.agent
        .write_all(&proto::encode_json(Kind::Prime, 0, &req))
        .map_err(|e| VmmError::Io {
            step: "write to the guest".into(),
            source: e,
        })?;
    await_hello(b, plan.boot_timeout, plan.console)
}

fn save_error(m: impl Into<String>) -> VmmError {
    VmmError::Io {
        step: "save the snapshot".into(),
        source: std::io::Error::other(m.into()),
    }
}

/// One QMP exchange: sends `cmd` (with `fd` as SCM_RIGHTS when given) and
/// returns the `return` value, skipping events.
fn qmp_call(
    w: &UnixStream,
    r: &mut BufReader<UnixStream>,
    cmd: &serde_json::Value,
    fd: Option<RawFd>,
) -> Result<serde_json::Value, VmmError> {
    let mut line = serde_json::to_vec(cmd).unwrap_or_default();
    line.push(b'\n');
    let fds: Vec<RawFd> = fd.into_iter().collect();
    let cmsg: Vec<nix::sys::socket::ControlMessage> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![nix::sys::socket::ControlMessage::ScmRights(&fds)]
    };
    nix::sys::socket::sendmsg::<()>(
        w.as_raw_fd(),
        &[std::io::IoSlice::new(&line)],
        &cmsg,
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .map_err(|e| VmmError::Sys {
        step: format!("send {} to QEMU", cmd["execute"]),
        source: e,
    })?;
    loop {
        let v = qmp_read(r)?;
        if let Some(ret) = v.get("return") {
            return Ok(ret.clone());
        }
        if let Some(err) = v.get("error") {
            return Err(monitor_error(format!(
                "{}: {}",
                cmd["execute"].as_str().unwrap_or("?"),
                err["desc"].as_str().unwrap_or("failed")
            )));
        }
    }
}

fn qmp_read(r: &mut BufReader<UnixStream>) -> Result<serde_json::Value, VmmError> {
    let mut line = String::new();
    // A line of QEMU's is short; bound what a confused monitor can make us
    // hold.
    let n = r
        .by_ref()
        .take(64 * 1024)
        .read_line(&mut line)
        .map_err(|e| VmmError::Io {
            step: "read QEMU's monitor".into(),
            source: e,
        })?;
    if n == 0 {
        return Err(monitor_error("QEMU closed its monitor"));
    }
    serde_json::from_str(&line).map_err(|e| monitor_error(format!("monitor: {e}")))
}

fn monitor_error(m: impl Into<String>) -> VmmError {
    VmmError::Io {
        step: "talk to QEMU's monitor".into(),
        source: std::io::Error::other(m.into()),
    }
}

/// QEMU's monitor (QMP), its greeting read and its commands enabled.
struct Qmp {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Qmp {
    fn open(s: UnixStream) -> Result<Qmp, VmmError> {
        // Every command of ours is answered at once but a migration's,
        // which is polled.
        s.set_read_timeout(Some(SAVE_TIMEOUT))
            .map_err(|e| VmmError::Io {
                step: "bound the monitor's replies".into(),
                source: e,
            })?;
        let r = BufReader::new(s.try_clone().map_err(|e| VmmError::Io {
            step: "duplicate the monitor".into(),
            source: e,
        })?);
        let mut q = Qmp { w: s, r };
        let greeting = qmp_read(&mut q.r)?;
        if greeting.get("QMP").is_none() {
            return Err(monitor_error("no QMP greeting"));
        }
        q.call(&serde_json::json!({"execute": "qmp_capabilities"}), None)?;
        Ok(q)
    }

    fn call(
        &mut self,
        cmd: &serde_json::Value,
        fd: Option<RawFd>,
    ) -> Result<serde_json::Value, VmmError> {
        qmp_call(&self.w, &mut self.r, cmd, fd)
    }
}

/// Has moat's own VMM save the running guest into the file it was given
/// (`builtin::run_from`), which lets it run on.
fn save_builtin(control: &mut UnixStream) -> Result<(), VmmError> {
    match builtin_call(control, crate::builtin::SAVE)?.as_str() {
        crate::builtin::SAVED => Ok(()),
        "" => Err(save_error("the VMM closed its control socket")),
        other => Err(save_error(other)),
    }
}

/// Has moat's own VMM show the `volumes` virtio-fs devices it kept hidden
/// for the save (`moat_vmm::FsHandle`).
fn show_builtin(control: &mut UnixStream, volumes: usize) -> Result<(), VmmError> {
    let answer = builtin_call(control, crate::builtin::SHOW)?;
    if answer == crate::builtin::shown(volumes) {
        Ok(())
    } else {
        Err(VmmError::Io {
            step: "show the read-write volumes' devices".into(),
            source: std::io::Error::other(format!(
                "the VMM answered {answer:?}, not {:?}",
                crate::builtin::shown(volumes)
            )),
        })
    }
}

/// Sends moat's own VMM one request line over its control socket;
/// returns its one-line answer, empty if it closed the socket.
fn builtin_call(control: &mut UnixStream, request: &str) -> Result<String, VmmError> {
    writeln!(control, "{request}").map_err(|e| VmmError::Io {
        step: format!("ask the VMM to {request}"),
        source: e,
    })?;
    // Bounded by a poll (the relay's filter has no setsockopt for a
    // receive timeout); the answer is one short line, written at once.
    let mut fds = [PollFd::new(control.as_fd(), PollFlags::POLLIN)];
    let ms = i32::try_from(SAVE_TIMEOUT.as_millis()).unwrap_or(i32::MAX);
    let timeout = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
    loop {
        match poll(&mut fds, timeout) {
            Ok(0) => return Err(save_error("the VMM did not answer")),
            Ok(_) => break,
            Err(nix::Error::EINTR) => continue,
            Err(e) => {
                return Err(VmmError::Sys {
                    step: "wait for the VMM's answer".into(),
                    source: e,
                })
            }
        }
    }
    let mut line = String::new();
    BufReader::new(Read::by_ref(control).take(64 * 1024))
        .read_line(&mut line)
        .map_err(|e| VmmError::Io {
            step: "read the VMM's answer".into(),
            source: e,
        })?;
    Ok(line.trim_end().to_string())
}

/// Saves the running guest into `out`, then lets it run on. With `ram`
/// (its length: a share port's guest, whose RAM QEMU leaves out), the
/// RAM file follows QEMU's stream, copied while the guest is stopped.
fn save(q: &mut Qmp, out: &File, ram: Option<u64>) -> Result<(), VmmError> {
    use serde_json::json;
    // The guest is not stopped first: a restored guest keeps the run
    // state it was saved in, and one saved running starts at once. It
    // sits idle in its agent's loop, so one pass over its memory, as fast
    // as the file takes it (the default bandwidth cap is for live
    // migration over a network), and the final stop-and-copy end it.
    q.call(
        &json!({"execute": "migrate-set-parameters",
                "arguments": {"max-bandwidth": 1u64 << 40, "downtime-limit": 2_000_000}}),
        None,
    )?;
    q.call(
        &json!({"execute": "getfd", "arguments": {"fdname": "snapshot"}}),
        Some(out.as_raw_fd()),
    )?;
    q.call(
        &json!({"execute": "migrate", "arguments": {"uri": "fd:snapshot"}}),
        None,
    )?;
    let until = Instant::now() + SAVE_TIMEOUT;
    loop {
        let st = q.call(&json!({"execute": "query-migrate"}), None)?;
        match st["status"].as_str().unwrap_or("") {
            "completed" => break,
            "failed" | "cancelled" => {
                return Err(save_error(format!(
                    "migration {}: {}",
                    st["status"].as_str().unwrap_or(""),
                    st["error-desc"].as_str().unwrap_or("no reason given")
                )))
            }
            _ => {}
        }
        if Instant::now() >= until {
            return Err(save_error("migration did not complete"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // QEMU reports the migration completed before its migration thread
    // leaves the `finish-migrate` run state, and refuses `cont` until then
    // ("Migration is not finalized yet": a CI run met it once).
    loop {
        let st = q.call(&json!({"execute": "query-status"}), None)?;
        if st["status"].as_str() != Some("finish-migrate") {
            break;
        }
        if Instant::now() >= until {
            return Err(save_error("the migration did not finish"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    if let Some(len) = ram {
        let io = |step: &'static str| {
            move |source| VmmError::Io {
                step: step.into(),
                source,
            }
        };
        let f = File::open(qemu::RAM_FILE).map_err(io("open the guest's RAM file"))?;
        crate::snapshot::append_ram(out, &f, len).map_err(io("save the guest's RAM"))?;
    }
    q.call(&json!({"execute": "cont"}), None)?;
    Ok(())
}
