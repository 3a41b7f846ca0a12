//! The fuzz targets. Each takes arbitrary bytes; see the crate docs.
use std::path::Path;
use std::sync::Once;
use std::time::{Duration, Instant};

use moat_image::unpack::{self, Limits, Owners, Whiteouts};

/// Small unpack limits: an input may be a bomb, and a fuzz run must not
/// fill the disk (the limits themselves are what is under test).
const LIMITS: Limits = Limits {
    max_depth: 64,
    max_entries: 4096,
    max_bytes: 16 << 20,
    max_name_bytes: 1 << 20,
};

/// config.json as `moat create` and `moat run --config` read it: parse
/// (unknown properties listed), validate, then everything a valid config
/// feeds: warnings, the tier annotation, the Landlock policy, the microVM's
/// sizing.
pub fn config(data: &[u8]) {
    let path = Path::new("config.json");
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = moat_core::spec::unknown_properties(&v);
        let _ = moat_microvm::guestspec::guest_memory_mib(&v);
        // Hosts of one CPU, of this machine's two, and of more than the
        // guest's most.
        for host_cpus in [1, 2, 64] {
            let vcpus = moat_microvm::guestspec::guest_vcpus(&v, host_cpus);
            assert!(vcpus >= 1 && usize::from(vcpus) <= host_cpus.max(1));
        }
    }
    let Ok(parsed) = moat_core::spec::parse(data, path) else {
        return;
    };
    crate::reached();
    let _ = moat_core::spec::warnings(&parsed.spec);
    let valid = moat_core::spec::validate(&parsed.spec).is_ok();
    let _ = moat_core::landlock::LandlockPolicy::from_spec(&parsed.spec);
    if valid {
        // The in-memory path: validation again, root.path checks.
        if let Ok(c) = moat_core::runtime::Config::from_memory(data.to_vec()) {
            let _ = c.tier_annotation();
            // A config moat accepted serialises and reads back.
            let bytes = serde_json::to_vec(&c.spec).expect("an accepted spec serialises");
            moat_core::spec::parse(bytes.as_slice(), path).expect("an accepted spec reads back");
        }
    }
}

/// One setup-channel message, as the runtime receives it from the
/// container side over a real seqpacket socket (the container side runs
/// after the workload's namespaces exist; its bytes are not trusted). The
/// input is split into messages at 0xff 0xfe markers.
pub fn setup_channel(data: &[u8]) {
    use moat_jail::sync::{self, Msg};
    let Ok((a, b)) = sync::pair() else { return };
    for msg in split(data, &[0xff, 0xfe]).take(16) {
        // Oversized messages fail to send (EMSGSIZE); that is the kernel's
        // bound, not the parser's.
        if rustix::net::send(&a, msg, rustix::net::SendFlags::DONTWAIT).is_err() {
            continue;
        }
        let got = b.recv();
        if got.is_ok() {
            crate::reached();
        }
        if let Ok(Msg::Error(e)) = got {
            // The chain the user sees: every level, rendered.
            let mut level: Option<&dyn std::error::Error> = Some(&e);
            let mut depth = 0;
            while let Some(l) = level {
                let _ = l.to_string();
                level = l.source();
                depth += 1;
                assert!(depth <= 200, "an error chain without end");
            }
        }
    }
}

/// Bytes from a hostile guest agent into the host's frame decoder, in
/// chunks whose sizes come from the input, and every whole frame's payload
/// through the message type its kind names.
pub fn agent_proto(data: &[u8]) {
    use moat_microvm::proto::{self, Decoder, Kind};
    let Some((&chunk, data)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut d = Decoder::new();
    for piece in data.chunks(chunk) {
        d.push(piece);
        loop {
            match d.next_frame() {
                Ok(Some(f)) => {
                    crate::reached();
                    assert!(f.payload.len() <= proto::MAX_FRAME);
                    match f.kind {
                        Kind::Hello => drop(f.json::<proto::Hello>()),
                        Kind::Run => drop(f.json::<proto::RunRequest>()),
                        Kind::Exec => drop(f.json::<proto::ExecRequest>()),
                        Kind::Signal => drop(f.json::<proto::SignalMsg>()),
                        Kind::Resize => drop(f.json::<proto::Resize>()),
                        Kind::Started => drop(f.json::<proto::Started>()),
                        Kind::Exit => drop(f.json::<proto::Exit>()),
                        Kind::Error => drop(f.json::<proto::ErrorMsg>()),
                        Kind::Prime => drop(f.json::<proto::PrimeRequest>()),
                        Kind::Credit => drop(f.json::<proto::CreditMsg>()),
                        Kind::Update => drop(f.json::<proto::UpdateRequest>()),
                        Kind::Closed => drop(f.json::<proto::ClosedMsg>()),
                        Kind::Forward => drop(f.json::<proto::ForwardRequest>()),
                        Kind::Join => drop(f.json::<proto::JoinRequest>()),
                        Kind::Stdin
                        | Kind::Stdout
                        | Kind::Stderr
                        | Kind::Shutdown
                        | Kind::Ping
                        | Kind::Mirror
                        | Kind::Updated => {}
                    }
                }
                Ok(None) => break,
                // Final: the session ends.
                Err(_) => return,
            }
        }
        // Nothing the guest sends makes the host hold more than one frame.
        assert!(d.pending() <= proto::HEADER + proto::MAX_FRAME + chunk);
    }
}

/// `moat audit` over one document, under each of the names it is given
/// as, rendered in every output format (the SARIF is valid JSON).
pub fn audit(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for name in ["config.json", "pod.yaml"] {
        if let Ok(findings) = moat_audit::audit_text(text, name) {
            crate::reached();
            for format in [
                moat_audit::Format::Text,
                moat_audit::Format::Json,
                moat_audit::Format::Sarif,
            ] {
                let out = moat_audit::render(&findings, format);
                if !matches!(format, moat_audit::Format::Text) {
                    serde_json::from_str::<serde_json::Value>(&out)
                        .expect("audit's JSON output parses");
                }
            }
        }
    }
}

/// An OCI `linux.seccomp` object translated to libseccomp rules and
/// exported as the BPF program moat loads (nothing is loaded).
pub fn seccomp(data: &[u8]) {
    let Ok(s) = serde_json::from_slice::<oci_spec::runtime::LinuxSeccomp>(data) else {
        return;
    };
    if let Ok(filter) = moat_jail::seccomp::compile(&s) {
        crate::reached();
        let _ = filter.rule_count();
        if let Ok(Some(p)) = filter.program() {
            assert!(!p.is_empty(), "an exported filter has instructions");
        }
    }
}

/// A sandbox path policy, as a file or annotation: parse, decide a few
/// paths, and the document form reads back as the same policy.
pub fn sandbox_policy(data: &[u8]) {
    use moat_sandbox::policy::{Policy, Want};
    let p = match std::str::from_utf8(data) {
        Ok(s) => Policy::from_annotation(s),
        Err(_) => Policy::parse(data),
    };
    let Ok(p) = p else { return };
    crate::reached();
    for path in [
        &b"/"[..],
        b"/etc/passwd",
        b"/tmp/../etc/./x",
        b"//a//b/",
        data,
    ] {
        for want in [Want::LOOKUP, Want::READ] {
            let _ = p.check(path, want);
        }
    }
    let again = Policy::parse(p.to_json().as_bytes()).expect("a policy's document reads back");
    assert_eq!(again, p, "a policy's document is the same policy");
}

/// The sandbox supervisor's decoding of the workload's syscall arguments:
/// the first byte picks the decoder, the rest is what the workload wrote
/// in its memory.
pub fn sandbox_args(data: &[u8]) {
    crate::sandbox_args::run(data)
}

/// The JSON readers of OCI layouts and docker archives: index selection,
/// manifests, image configs, manifest.json.
pub fn oci_layout(data: &[u8]) {
    use moat_image::layout;
    if let Ok(i) = layout::parse_index(data) {
        crate::reached();
        let _ = layout::select(&i, None);
        let _ = layout::select(&i, Some("latest"));
        let _ = layout::select_platform(&i);
        for d in i.manifests() {
            let _ = layout::Sha256Digest::parse(d.digest().as_ref());
            let _ = layout::is_index(d);
        }
    }
    if let Ok(m) = layout::parse_manifest(data) {
        crate::reached();
        let _ = layout::Sha256Digest::parse(m.config().digest().as_ref());
    }
    let _ = layout::parse_config(data);
    let _ = layout::parse_docker_manifest(data);
}

/// A whole image archive into a fresh image cache, as `moat run IMAGE`
/// prepares it: the first byte picks a `docker save` archive, a rootfs
/// tarball, or (the rest being a tar of the layout) an OCI layout. Nothing
/// may be written outside the cache.
pub fn image_archive(data: &[u8]) {
    use moat_image::{Source, Store};
    static LIMIT: Once = Once::new();
    // Bounds what one image may unpack to (read by Store::from_env).
    LIMIT.call_once(|| std::env::set_var(moat_image::ENV_MAX_BYTES, "16m"));
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let Ok(dir) = tempfile::tempdir() else { return };
    let state = dir.path().join("state");
    let input = dir.path().join("input");
    if std::fs::create_dir(&state).is_err() {
        return;
    }
    let src = match mode % 3 {
        0 => {
            if std::fs::write(&input, data).is_err() {
                return;
            }
            Source::DockerArchive(input)
        }
        1 => {
            if std::fs::write(&input, data).is_err() {
                return;
            }
            Source::Tarball(input)
        }
        _ => {
            // The layout's files from a tar, unpacked with moat's own
            // (bounded, root-confined) unpacker.
            if std::fs::create_dir(&input).is_err() {
                return;
            }
            let Ok(r) = moat_image::decompressed(data) else {
                return;
            };
            if unpack::unpack_limited(r, &input, Owners::Unpacker, Whiteouts::Apply, &LIMITS)
                .is_err()
            {
                return;
            }
            Source::OciLayout {
                path: input,
                tag: (mode & 4 != 0).then(|| "latest".to_owned()),
            }
        }
    };
    if let Ok(store) = Store::from_env(&state) {
        match store.prepare(&src, &mut |_, _| {}) {
            Ok(_) => crate::reached(),
            Err(e) => debug(&e),
        }
        let _ = store.list();
    }
    only_child(dir.path(), &["input", "state"]);
}

/// Unpacks arbitrary bytes (maybe gzip/zstd) as a layer into a fresh
/// directory, whiteouts applied or (first byte odd) made overlayfs
/// whiteouts: nothing is written outside it.
pub fn tar_unpack(data: &[u8]) {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let whiteouts = if mode & 1 == 1 {
        Whiteouts::Overlay
    } else {
        Whiteouts::Apply
    };
    let Ok(dir) = tempfile::tempdir() else { return };
    let root = dir.path().join("rootfs");
    if std::fs::create_dir(&root).is_err() {
        return;
    }
    if let Ok(r) = moat_image::decompressed(data) {
        if unpack::unpack_limited(r, &root, Owners::Unpacker, whiteouts, &LIMITS).is_ok() {
            crate::reached();
        }
    }
    only_child(dir.path(), &["rootfs"]);
}

/// A microVM's mirror stream from a hostile guest applied onto a scratch
/// root (moat-microvm `mirror::apply`): nothing lands outside the root (the
/// sibling `outside` stays empty) and no temporary is left behind. The
/// input's length picks the options, so both ways of each are fuzzed.
pub fn mirror_stream(data: &[u8]) {
    use moat_microvm::mirror::{self, ApplyOptions};
    use std::os::fd::AsFd;
    let Some(base) = mirror_scratch() else { return };
    let (root, outside) = (base.join("root"), base.join("outside"));
    if !empty_dir(&root) || !empty_dir(&outside) {
        return;
    }
    let Ok(fd) = std::fs::File::open(&root) else {
        return;
    };
    let opts = ApplyOptions {
        owners: data.len() & 1 == 0,
        keep_setid: data.len() & 2 != 0,
    };
    match mirror::apply(&mut &data[..], fd.as_fd(), opts) {
        Ok(a) if a.started_ns == 0 && a.entries == 0 => {} // the header was cut
        Err(mirror::MirrorError::Magic) => {}
        _ => crate::reached(),
    }
    only_child(&base, &["root", "outside"]);
    let left: Vec<_> = std::fs::read_dir(&outside)
        .map(|r| r.flatten().collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "written outside the root: {left:?}");
    assert_eq!(temporaries(&root), Vec::<std::path::PathBuf>::new());
}

/// This process's scratch directory for [`mirror_stream`], made once under
/// the temporary directory (those of dead processes removed then).
fn mirror_scratch() -> Option<std::path::PathBuf> {
    static SCRATCH: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    SCRATCH
        .get_or_init(|| {
            let tmp = std::env::temp_dir();
            for e in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix("moat-fuzz-mirror-") {
                    if !Path::new("/proc").join(pid).exists() {
                        make_removable(&e.path());
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
            let base = tmp.join(format!("moat-fuzz-mirror-{}", std::process::id()));
            std::fs::create_dir_all(&base).ok()?;
            Some(base)
        })
        .clone()
}

/// Makes `dir` an empty directory (false when it cannot).
fn empty_dir(dir: &Path) -> bool {
    if std::fs::symlink_metadata(dir).is_ok() {
        make_removable(dir);
        if std::fs::remove_dir_all(dir).is_err() {
            return false;
        }
    }
    std::fs::create_dir(dir).is_ok()
}

/// Gives every directory under `dir` (symlinks not followed) its owner's
/// full access, which an input may have taken away.
fn make_removable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(m) = std::fs::symlink_metadata(dir) else {
        return;
    };
    if m.is_dir() {
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            make_removable(&e.path());
        }
    }
}

/// Everything under `dir` (symlinks not followed) named like the mirror's
/// temporaries.
fn temporaries(dir: &Path) -> Vec<std::path::PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_name()
            .as_bytes()
            .starts_with(moat_microvm::mirror::TEMP_PREFIX)
        {
            found.push(e.path());
        }
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            found.extend(temporaries(&e.path()));
        }
    }
    found
}

/// Arbitrary Ethernet frames from a hostile workload into moat-net's core,
/// with the shell's answers faked: queues stay bounded. The input is a
/// sequence of frames, each a 16-bit little-endian length and its bytes;
/// the same bytes also go through the DNS, egress-rule and published-port
/// parsers.
pub fn net_frames(data: &[u8]) {
    use moat_net::{Egress, Limits, NetConfig, Policy, Request, Stack};
    let now = Instant::now();
    let policy = Policy::parse("0.0.0.0/0,::/0,*.test").expect("fixed policy");
    let egress = Egress::new(policy, [], 64);
    let limits = Limits {
        max_tcp_flows: 8,
        tcp_buffer: 4096,
        ..Limits::default()
    };
    if let Ok(mut stack) = Stack::new(NetConfig::default(), egress, limits, now, 1) {
        let mut t = now;
        let mut rest = data;
        while let [lo, hi, tail @ ..] = rest {
            let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(tail.len());
            let (frame, next) = tail.split_at(len);
            rest = next;
            stack.receive_frame(t, frame);
            stack.poll(t);
            while let Some(r) = stack.next_request() {
                match r {
                    Request::TcpConnect { flow, .. } => {
                        if frame.len() % 2 == 0 {
                            stack.tcp_connected(t, flow)
                        } else {
                            stack.tcp_connect_failed(t, flow)
                        }
                    }
                    Request::Resolve { query, .. } => stack.resolved(
                        t,
                        query,
                        Ok(vec!["192.0.2.1".parse().expect("fixed address")]),
                    ),
                    Request::UdpSend { flow, payload, .. } => stack.udp_received(t, flow, &payload),
                    _ => {}
                }
            }
            let mut answered = false;
            while let Some(f) = stack.pop_frame() {
                answered = true;
                stack.recycle(f);
            }
            if answered {
                crate::reached();
            }
            t += Duration::from_millis(100);
        }
    }
    let _ = moat_net::dns::parse_query(data);
    stream_framing(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = Policy::parse(s);
        let _ = s.parse::<moat_net::Publish>();
    }
}

/// The same bytes as the stream a VMM writes (4-byte big-endian length,
/// frame), read in pieces whose sizes the first byte picks: every frame
/// that comes out fits the bound, together they are no more than the
/// input, and the decoder's buffer never grows.
fn stream_framing(data: &[u8]) {
    use moat_net::stream::Decoder;
    const MAX: usize = 1514;
    let chunk = usize::from(data.first().copied().unwrap_or(1)).max(1);
    let mut d = Decoder::new(MAX);
    let mut out = 0usize;
    let mut rest = data;
    while !rest.is_empty() {
        let space = d.space();
        assert!(!space.is_empty() && space.len() <= MAX + 4);
        let n = chunk.min(space.len()).min(rest.len());
        space[..n].copy_from_slice(&rest[..n]);
        rest = &rest[n..];
        d.filled(n, |f| {
            assert!(!f.is_empty() && f.len() <= MAX);
            out += f.len() + 4;
        });
    }
    assert!(out <= data.len());
}

/// A hostile virtio driver against moat-vmm's devices: the input is the
/// guest memory holding the rings and buffers, plus a stream of MMIO
/// register reads, writes and queue notifications.
pub fn virtio_queue(data: &[u8]) {
    crate::virtio::run(data)
}

/// With MOAT_FUZZ_DEBUG set, prints why an input was refused (to see
/// whether seeds get as far as they should).
fn debug(e: &dyn std::error::Error) {
    if std::env::var_os("MOAT_FUZZ_DEBUG").is_some() {
        let mut s = e.to_string();
        let mut src = e.source();
        while let Some(c) = src {
            s += &format!(": {c}");
            src = c.source();
        }
        eprintln!("refused: {s}");
    }
}

/// Splits at every occurrence of `sep` (empty pieces dropped).
fn split<'a>(data: &'a [u8], sep: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
    let mut rest = Some(data);
    std::iter::from_fn(move || loop {
        let r = rest?;
        let (piece, next) = match r.windows(sep.len()).position(|w| w == sep) {
            Some(i) => (&r[..i], Some(&r[i + sep.len()..])),
            None => (r, None),
        };
        rest = next;
        if !piece.is_empty() {
            return Some(piece);
        }
    })
}

/// Asserts that `dir` holds only `names` (nothing was written beside them).
fn only_child(dir: &Path, names: &[&str]) {
    let mut found: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    let mut want: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    want.sort();
    assert!(
        found.iter().all(|f| want.contains(f)),
        "written outside: {found:?}"
    );
}

/// A moat-vmm snapshot's state from a hostile file ([`crate::virtio::snapshot_state`]).
pub fn vm_snapshot(data: &[u8]) {
    crate::virtio::snapshot_state(data)
}
