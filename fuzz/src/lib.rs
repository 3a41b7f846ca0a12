//! moat's fuzz targets: one function per parser of untrusted input, each
//! taking arbitrary bytes. Every target must return for any input without
//! panicking, hanging or touching anything outside the temporary directory
//! it makes; the assertions inside are properties that must always hold.
//!
//! Two drivers run them: `cargo fuzz run NAME` (libFuzzer, coverage-guided,
//! needs a nightly toolchain; `fuzz_targets/NAME.rs`) and the stable
//! `fuzz-ci` binary (`src/bin/fuzz-ci.rs`), which mutates the seed corpus in
//! `seeds/NAME/` for a bounded time and is what CI runs.
#![forbid(unsafe_code)]

mod sandbox_args;
pub mod targets;
mod virtio;

/// Inputs that got past a target's first parser (the target calls
/// [`reached`]): how deep a driver's inputs go, for its report.
static REACHED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Counts one input that a target's parser accepted.
pub fn reached() {
    REACHED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// The count since the last call, and zero again.
pub fn take_reached() -> u64 {
    REACHED.swap(0, std::sync::atomic::Ordering::Relaxed)
}

/// A target: its name (also its seed directory) and its function.
pub struct Target {
    pub name: &'static str,
    /// What it feeds, for the report.
    pub covers: &'static str,
    pub run: fn(&[u8]),
}

/// Every target, in the order CI runs them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "config",
        covers: "config.json: moat-core spec parsing (unknown properties), validation, warnings, \
                 the tier and Landlock annotations, the microVM's memory/vCPU sizing",
        run: targets::config,
    },
    Target {
        name: "setup_channel",
        covers: "moat-jail sync: setup-channel messages received over a real seqpacket socketpair, \
                 typed remote errors and their rendering",
        run: targets::setup_channel,
    },
    Target {
        name: "agent_proto",
        covers: "moat-microvm agent protocol: frame reassembly from a hostile guest, every message's JSON",
        run: targets::agent_proto,
    },
    Target {
        name: "mirror_stream",
        covers: "moat-microvm mirror: a hostile guest's stream of changes applied to a root \
                 directory (bounds, paths resolved in the root, cuts), nothing written outside",
        run: targets::mirror_stream,
    },
    Target {
        name: "audit",
        covers: "moat audit: OCI config.json, docker inspect and Kubernetes YAML readers, rules, \
                 text/JSON/SARIF output",
        run: targets::audit,
    },
    Target {
        name: "seccomp",
        covers: "OCI seccomp profile translation to libseccomp rules and the exported BPF program",
        run: targets::seccomp,
    },
    Target {
        name: "sandbox_policy",
        covers: "moat-sandbox path policies (policy files and the annotation), decisions, round trip",
        run: targets::sandbox_policy,
    },
    Target {
        name: "sandbox_args",
        covers: "moat-sandbox supervisor: the workload's syscall arguments as copied from its memory \
                 (paths, open_how, timestamps, socket addresses of every family, msghdr, iovec, \
                 control messages and SCM_RIGHTS), directory records, interpreters",
        run: targets::sandbox_args,
    },
    Target {
        name: "oci_layout",
        covers: "moat-image JSON readers: OCI index, manifest, image config, docker manifest.json",
        run: targets::oci_layout,
    },
    Target {
        name: "image_archive",
        covers: "moat-image: a whole image archive prepared into a fresh cache (docker save, \
                 rootfs tarball, OCI layout), with small unpack limits",
        run: targets::image_archive,
    },
    Target {
        name: "tar_unpack",
        covers: "moat-image layer unpacking (gzip/zstd/tar, whiteouts), nothing written outside",
        run: targets::tar_unpack,
    },
    Target {
        name: "net_frames",
        covers: "moat-net: Ethernet frames from the workload into the user-space stack, the same \
                 bytes as a length-prefixed frame stream, DNS queries, \
                 egress rules, published ports",
        run: targets::net_frames,
    },
    Target {
        name: "virtio_queue",
        covers: "moat-vmm virtio-mmio transport and the rng, block, console and network devices \
                 against a hostile driver",
        run: targets::virtio_queue,
    },
    Target {
        name: "vm_snapshot",
        covers: "moat-vmm snapshot files: the state's trailer and JSON, the fit check, saved \
                 virtio transports and queues and COM1's registers taken by real devices",
        run: targets::vm_snapshot,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}
