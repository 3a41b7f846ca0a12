//! The agent protocol: what the host (the VMM process) and the guest agent
//! say to each other over a virtio serial port (under QEMU, the port named
//! [`AGENT_PORT`]; under moat's own VMM, its console port `/dev/hvc0`), a
//! unix socket on the host. Sans-IO: [`encode`] makes the bytes of one
//! frame, [`Decoder`] takes bytes as they arrive and gives back whole frames.
//!
//! A frame is a 9-byte header — payload length (u32, little-endian), kind
//! (u8), channel (u32, little-endian) — then the payload. The channel names
//! a process: 0 is the container's own process, each `exec` gets the next
//! number. Data frames (stdin, stdout, stderr) carry raw bytes, at most
//! [`MAX_DATA`] each (an empty stdin frame is end of file); every other kind
//! carries one JSON object. The guest is untrusted: a frame longer than
//! [`MAX_FRAME`], an unknown kind or JSON that does not parse ends the
//! session, and nothing the guest sends can make the host buffer more than
//! one frame.
use serde::{Deserialize, Serialize};

/// Bytes before the payload.
pub const HEADER: usize = 9;
/// Largest payload the host accepts from the guest (which is untrusted).
pub const MAX_FRAME: usize = 1 << 20;
/// Largest payload the agent accepts from the host: a `Run` carries the
/// config, whose environment may be what `execve` takes (2 MiB with the
/// default 8 MiB stack), and the copies of the file binds (up to 1 MiB
/// each); an `Exec` its process. The host checks it before it sends.
pub const MAX_REQUEST: usize = 16 << 20;
/// Largest data payload a sender writes.
pub const MAX_DATA: usize = 32 * 1024;
/// The name of the agent's virtio serial port under QEMU. Not a console
/// port: QEMU drops what a console port's guest writes when the host side
/// cannot take it at once (a workload writing megabytes lost bytes, and
/// the stream its framing), where a plain port holds the guest back.
pub const AGENT_PORT: &str = "moat.agent";
/// The protocol version both sides must speak (2: stdin under credits).
pub const VERSION: u32 = 2;
/// How many bytes of stdin the host may send on a channel before the
/// agent has credited them back ([`Kind::Credit`]): what may wait in the
/// guest for a process that does not read. Bounded per channel, so the
/// agent never stops reading the channel, and a signal, an exec or a
/// resize always gets through, however much stdin a process left unread.
pub const STDIN_WINDOW: usize = 1 << 20;

/// Credited bytes are given back once this much has gathered
/// ([`credit_due`]).
pub const CREDIT_BATCH: u64 = (STDIN_WINDOW / 8) as u64;

/// Whether the receiver of a credited stream should credit back the
/// `taken` bytes now: once [`CREDIT_BATCH`] has gathered, or at once when
/// nothing of it waits any more (`drained`: an interactive stream then
/// never waits on a credit). Both sides use it (the agent for stdin, the
/// host for a forwarded connection's bytes).
pub fn credit_due(taken: u64, drained: bool) -> bool {
    taken >= CREDIT_BATCH || (taken > 0 && drained)
}

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// guest → host: the agent is up and waits for work ([`Hello`]).
    Hello = 1,
    /// host → guest: run the container's process ([`RunRequest`]).
    Run = 2,
    /// host → guest: bytes for a process's stdin; empty is end of file.
    Stdin = 3,
    /// guest → host: bytes the process wrote to stdout (or its terminal).
    Stdout = 4,
    /// guest → host: bytes the process wrote to stderr.
    Stderr = 5,
    /// host → guest: deliver a signal ([`SignalMsg`]).
    Signal = 6,
    /// host → guest: the terminal's new size ([`Resize`]).
    Resize = 7,
    /// guest → host: the process runs ([`Started`]).
    Started = 8,
    /// guest → host: the process ended ([`Exit`]).
    Exit = 9,
    /// guest → host: the request failed ([`ErrorMsg`]).
    Error = 10,
    /// host → guest: run another process in the container ([`ExecRequest`]).
    Exec = 11,
    /// host → guest: power off now (the host kills the VM after `Exit`
    /// instead; the agent still honours it).
    Shutdown = 12,
    /// host → guest: say hello again (a guest restored from a snapshot
    /// said its first hello before the snapshot was taken).
    Ping = 13,
    /// host → guest: mount the run's disks now, before the snapshot is
    /// saved ([`PrimeRequest`]); answered with a hello, or an error.
    Prime = 14,
    /// guest → host: the process took (or the agent dropped) this many
    /// more bytes of the channel's stdin ([`CreditMsg`]): the host may send
    /// that many more ([`STDIN_WINDOW`]).
    Credit = 15,
    /// host → guest: new resource limits for the container's cgroup in
    /// the guest ([`UpdateRequest`]), on a channel of their own; answered
    /// with `Updated` or `Error` there.
    Update = 16,
    /// guest → host: the update on this channel is applied.
    Updated = 17,
    /// host → guest: the host end of this channel's stdout or stderr
    /// ([`ClosedMsg`]) is gone (a pipe whose reader ended): the agent
    /// closes the process's, whose next write then fails (`SIGPIPE`) as a
    /// container's would.
    Closed = 18,
    /// host → guest: connect to this address inside the container's
    /// network namespace ([`ForwardRequest`]): a connection made to the
    /// pod's `localhost` on the host ([`crate::portfwd`]). Answered with
    /// `Started` (connected) or `Error`; then `Stdin` frames carry what the
    /// host's end sent and `Stdout` frames what the guest's did, each way
    /// under credit (the host credits `Stdout` bytes as its end takes
    /// them, with `Credit` frames of its own), an empty one each way its
    /// end of file; `Closed` (stdout) drops the connection; `Exit` when the
    /// guest's side is done.
    Forward = 19,
    /// host → guest: run another container of the pod in this guest
    /// ([`JoinRequest`]), on a channel of its own: a Kubernetes pod's
    /// container joining its pod's microVM (`crate::pod`). Answered with
    /// `Started` or `Error`, then relayed as an exec's process is, `Exit`
    /// (with its OOM kills) when it ends.
    Join = 20,
    /// guest → host: the next bytes of the mirror of the container's root
    /// (`crate::mirror`), raw, on channel 0: what the container changed in
    /// its kept writable layer (`RunRequest::mirror_since`), sent after its
    /// process exited and before that `Exit`. The VMM process appends
    /// them to the layer's stream file; the host applies that file to the
    /// container's root directory once the guest is gone
    /// (`crate::layer::settle`).
    Mirror = 21,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        use Kind::*;
        Some(match b {
            1 => Hello,
            2 => Run,
            3 => Stdin,
            4 => Stdout,
            5 => Stderr,
            6 => Signal,
            7 => Resize,
            8 => Started,
            9 => Exit,
            10 => Error,
            11 => Exec,
            12 => Shutdown,
            13 => Ping,
            14 => Prime,
            15 => Credit,
            16 => Update,
            17 => Updated,
            18 => Closed,
            19 => Forward,
            20 => Join,
            21 => Mirror,
            _ => return None,
        })
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub chan: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The payload as the JSON message `T`.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, ProtoError> {
        serde_json::from_slice(&self.payload).map_err(|e| ProtoError::Json {
            kind: self.kind,
            message: e.to_string(),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("frame of {0} bytes is over the limit")]
    TooLong(usize),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("bad {kind:?} message: {message}")]
    Json { kind: Kind, message: String },
}

/// The bytes of one frame. A payload longer than [`MAX_REQUEST`] is the
/// caller's bug (senders chunk data by [`MAX_DATA`], the host checks its
/// requests' size); it is cut there.
pub fn encode(kind: Kind, chan: u32, payload: &[u8]) -> Vec<u8> {
    let payload = &payload[..payload.len().min(MAX_REQUEST)];
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&header(kind, chan, payload.len()));
    out.extend_from_slice(payload);
    out
}

/// The header of a frame whose payload, `len` bytes (at most
/// [`MAX_REQUEST`]), is sent after it.
pub fn header(kind: Kind, chan: u32, len: usize) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..4].copy_from_slice(&(len.min(MAX_REQUEST) as u32).to_le_bytes());
    h[4] = kind as u8;
    h[5..].copy_from_slice(&chan.to_le_bytes());
    h
}

/// A frame carrying the JSON of `msg`.
pub fn encode_json<T: Serialize>(kind: Kind, chan: u32, msg: &T) -> Vec<u8> {
    // Serialising these plain structs cannot fail.
    let body = serde_json::to_vec(msg).unwrap_or_default();
    encode(kind, chan, &body)
}

/// Reassembles frames from a byte stream.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    /// The longest payload taken.
    limit: usize,
}

impl Default for Decoder {
    fn default() -> Decoder {
        Decoder::new()
    }
}

impl Decoder {
    /// The host's: frames from the guest, at most [`MAX_FRAME`].
    pub fn new() -> Decoder {
        Decoder {
            buf: Vec::new(),
            limit: MAX_FRAME,
        }
    }

    /// The agent's: requests from the host, at most [`MAX_REQUEST`].
    pub fn for_requests() -> Decoder {
        Decoder {
            buf: Vec::new(),
            limit: MAX_REQUEST,
        }
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, if one has arrived. An error is final: the
    /// stream is out of step or hostile.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtoError> {
        if self.buf.len() < HEADER {
            return Ok(None);
        }
        let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > self.limit {
            return Err(ProtoError::TooLong(len));
        }
        let kind = Kind::from_u8(self.buf[4]).ok_or(ProtoError::UnknownKind(self.buf[4]))?;
        if self.buf.len() < HEADER + len {
            return Ok(None);
        }
        let chan = u32::from_le_bytes([self.buf[5], self.buf[6], self.buf[7], self.buf[8]]);
        let payload = self.buf[HEADER..HEADER + len].to_vec();
        self.buf.drain(..HEADER + len);
        Ok(Some(Frame {
            kind,
            chan,
            payload,
        }))
    }

    /// Bytes held for a frame not yet complete.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// guest → host, once the agent is ready.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hello {
    pub version: u32,
    /// The guest kernel's release.
    pub kernel: String,
}

/// A disk the guest mounts read-only, found by its filesystem UUID.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuestDisk {
    /// The ext4 UUID, as 32 hex digits.
    pub uuid: String,
    /// Where the agent mounts it.
    pub mount: String,
}

/// A read-write volume the guest mounts through virtio-fs, by its tag.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuestVolume {
    /// The virtio-fs device's tag.
    pub tag: String,
    /// Where the agent mounts it.
    pub mount: String,
}

/// The disks a guest mounts before its snapshot is saved: a snapshot of a
/// guest with these disks mounted serves only runs with exactly these
/// disks (the cached images of the embedded default or of an image), and
/// such a run skips loading `virtio_blk`, probing and mounting.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PrimeRequest {
    pub disks: Vec<GuestDisk>,
    /// The run's writable root, mounted now too: (lower layer, root).
    #[serde(default)]
    pub overlay: Option<(String, String)>,
    /// The container the agent creates before the snapshot and holds
    /// until a run starts it with its own process (the agent's `Held`;
    /// a run whose config differs otherwise cancels it, and if it cannot
    /// be held it is created and deleted, which still warms the guest's
    /// caches): the run's config with its process's arguments, environment
    /// and working directory and its annotations other than moat's own
    /// taken out, and its per-run files' mounts kept with empty files (a
    /// snapshot is shared by every later run: nothing of this run's may be
    /// in it).
    #[serde(default)]
    pub warm: Option<WarmUp>,
}

/// See [`PrimeRequest::warm`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WarmUp {
    pub config: serde_json::Value,
    /// The writable root's lower layer, as in [`RunRequest::overlay_root`].
    pub overlay_root: Option<String>,
}

impl WarmUp {
    /// The warm-up for `run`: its config without its process's arguments,
    /// environment and working directory (placeholders instead), a
    /// terminal, or annotations but moat's own. The mounts of per-run
    /// files stay (the agent binds empty files and writes them for the
    /// run).
    pub fn of(run: &RunRequest) -> WarmUp {
        let mut config = run.config.clone();
        if let Some(p) = config.get_mut("process").and_then(|p| p.as_object_mut()) {
            p.insert("args".into(), serde_json::json!(["true"]));
            p.insert("env".into(), serde_json::json!(["PATH=/usr/bin:/bin"]));
            p.insert("cwd".into(), serde_json::json!("/"));
            p.insert("terminal".into(), serde_json::json!(false));
        }
        moat_annotations_only(&mut config);
        WarmUp {
            config,
            overlay_root: run.overlay_root.clone(),
        }
    }
}

/// Takes out of `config` every annotation but moat's own (`dev.moat.…`,
/// which the guest's container tier reads: a Landlock policy), and the
/// annotations object if none is left. Others (an engine's names and IDs)
/// are one run's, and nothing in the guest reads them.
pub fn moat_annotations_only(config: &mut serde_json::Value) {
    let Some(o) = config.as_object_mut() else {
        return;
    };
    if let Some(a) = o.get_mut("annotations").and_then(|a| a.as_object_mut()) {
        a.retain(|k, _| k.starts_with("dev.moat."));
        if !a.is_empty() {
            return;
        }
    }
    o.remove("annotations");
}

/// A file the agent writes before the container starts (a bind-mounted
/// host file's contents, e.g. /etc/hosts from an engine).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuestFile {
    pub path: String,
    pub data: Vec<u8>,
    pub mode: u32,
}

/// host → guest: run the container.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunRequest {
    /// The container's config.json as the guest runs it ([`crate::guestspec`]).
    pub config: serde_json::Value,
    pub disks: Vec<GuestDisk>,
    pub files: Vec<GuestFile>,
    /// Mount an overlay over the root (a writable root whose writes stay
    /// in guest memory) at `config.root.path`, with this disk's mount as
    /// the lower layer.
    pub overlay_root: Option<String>,
    /// The terminal's size, with `process.terminal`.
    pub rows: u16,
    pub cols: u16,
    /// Fresh bytes from the host's `getrandom`: the agent mixes them into
    /// the guest kernel's pool and reseeds its generator before anything
    /// runs, so guests restored from one snapshot never repeat each
    /// other's random bytes.
    #[serde(default)]
    pub entropy: Vec<u8>,
    /// The host's wall clock (nanoseconds since the epoch) when the
    /// request was sent: a restored guest's clock is the snapshot's.
    #[serde(default)]
    pub clock_ns: u64,
    /// The guest's network, when the container asked for the user-space
    /// stack (`--net egress=…`, `-p`) or joins a namespace whose interface
    /// the guest takes over: the agent brings up eth0 with it.
    #[serde(default)]
    pub net: Option<GuestNet>,
    /// The container's seccomp filter as the host compiled it (natively;
    /// the guest's compile under emulation took ~35 ms): the agent keeps
    /// it in the guest runtime's cache for the config's profile.
    #[serde(default)]
    pub seccomp: Option<SeccompProgram>,
    /// Read-write volumes, served by virtiofsd on the host
    /// ([`crate::volumes`]).
    #[serde(default)]
    pub volumes: Vec<GuestVolume>,
    /// The ext4 UUID of the container's writable layer, a disk of its own
    /// ([`crate::disk::scratch`]): the overlay's upper layer goes there
    /// rather than in guest memory. Not with a primed snapshot, whose
    /// overlay was mounted before the save.
    #[serde(default)]
    pub scratch: Option<String>,
    /// The writable layer outlives this VM (`crate::layer`): the agent
    /// syncs it before it reports the container's exit (the host ends the
    /// VM on that report).
    #[serde(default)]
    pub keep_layer: bool,
    /// With `keep_layer`: mirror what changed in the layer since this time
    /// (the guest's clock, nanoseconds since the epoch; 0: all of it) to
    /// the host before the container's exit is reported ([`Kind::Mirror`]),
    /// so that the engine sees the container's writes as under runc.
    #[serde(default)]
    pub mirror_since: Option<i64>,
    /// With `mirror_since`: mirror only when the container is paused
    /// (`UpdateRequest::mirror`), not at its exit: its engine removes its
    /// root once it ends (Podman's `--rm`), so the exit's mirror would
    /// only delay the exit report and write into a directory about to go.
    #[serde(default)]
    pub mirror_at_pause_only: bool,
    /// Evict the guest's old page cache every this many milliseconds (0:
    /// never), so the balloon gives its pages back to the host
    /// ([`crate::agent`]'s `reclaim`).
    #[serde(default)]
    pub reclaim_interval_ms: u64,
}

/// A compiled seccomp filter: `struct sock_filter` instructions (native
/// byte order) and the `SECCOMP_FILTER_FLAG_*` bits to load it with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeccompProgram {
    pub instructions: Vec<u8>,
    pub flags: u64,
}

/// eth0 in the guest: its hardware address (when it must be another
/// interface's), addresses, MTU, routes, and the resolv.conf to give the
/// container. Two sources: moat's user-space stack at the other end of
/// the VMM's network device ([`GuestNet::of`]), or an interface of the
/// network namespace the container joins (a pod's `eth0`), redirected to
/// the VMM's TAP device, whose addresses and routes the guest takes over.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuestNet {
    /// Set on eth0 before it comes up; `None` keeps the device's.
    #[serde(default)]
    pub mac: Option<[u8; 6]>,
    pub addresses: Vec<GuestAddr>,
    pub mtu: u32,
    /// In order: on-link routes before the routes through gateways.
    pub routes: Vec<GuestRoute>,
    /// `None`: the container keeps its own /etc/resolv.conf (a pod's,
    /// which the engine mounts).
    #[serde(default)]
    pub resolv_conf: Option<String>,
    /// The namespace's other interfaces the guest took over too (a pod's
    /// `net1`… that a CNI meta-plugin such as Multus adds), each a
    /// network device of the guest's more.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra: Vec<GuestInterface>,
}

/// One more interface of the guest's ([`GuestNet::extra`]): the device
/// whose hardware address is [`extra_device_mac`]`(k)` for the `k`-th,
/// renamed `name` (the pod's interface's), with that interface's address,
/// addresses, MTU and routes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuestInterface {
    pub name: String,
    pub mac: [u8; 6],
    pub addresses: Vec<GuestAddr>,
    pub mtu: u32,
    pub routes: Vec<GuestRoute>,
}

/// Most interfaces of a namespace beside the first a guest takes over.
pub const MAX_EXTRA_INTERFACES: usize = 4;

/// The hardware address the VMM gives the guest's `k`-th extra network
/// device (by which the agent finds it, before setting the interface's).
pub fn extra_device_mac(k: usize) -> [u8; 6] {
    [0x02, 0x6d, 0x6f, 0x61, 0x75, k.min(0xff) as u8]
}

/// `mac` as written for QEMU and in messages: `02:6d:…`.
pub fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// An address of eth0 with its prefix length.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuestAddr {
    pub ip: std::net::IpAddr,
    pub prefix: u8,
}

/// A route through eth0: to `dst` (`None`: the default route), through
/// `gateway` (`None`: on the link); `onlink` for a gateway outside every
/// prefix of the link (Calico's 169.254.1.1).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuestRoute {
    pub dst: Option<(std::net::IpAddr, u8)>,
    pub gateway: Option<std::net::IpAddr>,
    #[serde(default)]
    pub onlink: bool,
}

impl GuestNet {
    /// The workload's side of `net`.
    pub fn of(net: &moat_net::NetConfig) -> GuestNet {
        use std::net::IpAddr;
        GuestNet {
            mac: None,
            addresses: vec![
                GuestAddr {
                    ip: IpAddr::V4(net.workload_v4),
                    prefix: net.prefix_v4,
                },
                GuestAddr {
                    ip: IpAddr::V6(net.workload_v6),
                    prefix: net.prefix_v6,
                },
            ],
            mtu: u32::try_from(net.mtu).unwrap_or(1500),
            routes: [IpAddr::V4(net.gateway_v4), IpAddr::V6(net.gateway_v6)]
                .into_iter()
                .map(|gw| GuestRoute {
                    dst: None,
                    gateway: Some(gw),
                    onlink: false,
                })
                .collect(),
            resolv_conf: Some(net.resolv_conf()),
            extra: Vec::new(),
        }
    }
}

/// host → guest: run a process in the container.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExecRequest {
    /// The OCI process (as `runc exec --process` reads it).
    pub process: serde_json::Value,
    pub rows: u16,
    pub cols: u16,
    /// The container of the guest to run it in: a pod's container that
    /// joined the guest ([`JoinRequest::id`]); `None` is the guest's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

/// A container of a Kubernetes pod that joins its pod's microVM: its
/// config as the guest runs it, its directories as ext4 images in regions
/// of the pod's disk (`crate::pod`), its small files; the agent mounts
/// them under [`pod_dir`] and runs it with the guest's container tier in
/// the namespaces of the guest's own container (`pod_namespaces`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JoinRequest {
    /// The container's ID in the guest (the host's: the runtime checked
    /// it as an OCI ID; the agent checks it again, as a path part).
    pub id: String,
    pub config: serde_json::Value,
    pub disks: Vec<PodRegion>,
    pub files: Vec<GuestFile>,
    /// As [`RunRequest::overlay_root`].
    pub overlay_root: Option<String>,
    /// The namespace types (OCI's names) the container shares with the
    /// pod: the agent points them at the guest's own container's.
    pub pod_namespaces: Vec<String>,
    #[serde(default)]
    pub seccomp: Option<SeccompProgram>,
    /// Directories of the pod's guest the container binds (its emptyDir
    /// volumes, under `guestspec::POD_VOLUMES`): made if new.
    #[serde(default)]
    pub pod_volumes: Vec<String>,
    /// Of `pod_namespaces`, those that are another joined container's
    /// rather than the guest's own container's (namespace type → that
    /// container's ID): `kubectl debug --target`'s PID namespace.
    #[serde(default)]
    pub namespace_of: std::collections::BTreeMap<String, String>,
}

/// An ext4 image at `offset` of the pod's disk, `size` bytes long, and
/// where the agent mounts it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PodRegion {
    pub offset: u64,
    pub size: u64,
    pub mount: String,
}

/// Where a joined container's files live in the guest: every guest path
/// of its config (root, disks, files) is under it.
pub fn pod_dir(id: &str) -> String {
    format!("/run/vm/pod/{id}")
}

/// The first bytes of a pod's disk: how the agent tells it from the
/// container's own disks.
pub const POD_DISK_MAGIC: &[u8; 8] = b"MOATPOD1";

/// See [`Kind::Closed`]: which stream, 1 (stdout) or 2 (stderr).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClosedMsg {
    pub stream: u8,
}

/// See [`Kind::Forward`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ForwardRequest {
    pub addr: std::net::SocketAddr,
}

/// See [`Kind::Credit`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct CreditMsg {
    pub bytes: u64,
}

/// New limits for the container's cgroup in the guest: an OCI
/// `linux.resources` object (what the guest enforces of an `update`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UpdateRequest {
    pub resources: serde_json::Value,
    /// A joined container of the guest ([`JoinRequest::id`]); `None` is
    /// the guest's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// Instead of new limits: freeze (`true`) or thaw that container's
    /// cgroup in the guest (its `pause`, `resume`: a joined container's;
    /// the guest's own when it has a mirror, below).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze: Option<bool>,
    /// With `freeze: Some(true)` of the guest's own container: then sync
    /// its kept layer and mirror what changed ([`Kind::Mirror`]) before
    /// answering, so that the host's `pause` hands the engine the running
    /// container's writes (`docker commit` pauses the container it
    /// commits).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mirror: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SignalMsg {
    pub signal: i32,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Resize {
    pub rows: u16,
    pub cols: u16,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Started {
    /// The container was created before the snapshot was saved and only
    /// its process started now (the agent's held container).
    #[serde(default)]
    pub held: bool,
}

/// guest → host: how a process ended. `code` is its exit status, 128+N
/// for a signal, as a shell reports it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Exit {
    pub code: i32,
    /// OOM kills in the container's cgroup (in the guest).
    pub oom_kills: u64,
    /// Forks refused by the pids limit.
    pub pids_limit_hits: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorMsg {
    pub message: String,
    /// A shell's status when the program could not be executed (126/127).
    pub exec_status: Option<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guests_network_from_the_stack_or_a_pods_interface() {
        let stack = GuestNet::of(&moat_net::NetConfig::default());
        assert_eq!(stack.mac, None);
        assert_eq!(stack.addresses.len(), 2);
        assert!(stack.addresses[0].ip.is_ipv4() && stack.addresses[1].ip.is_ipv6());
        assert!(stack
            .routes
            .iter()
            .all(|r| r.dst.is_none() && r.gateway.is_some() && !r.onlink));
        assert!(stack
            .resolv_conf
            .as_deref()
            .is_some_and(|c| c.contains("nameserver")));
        // A pod's, as the runtime sends it: through JSON and back whole.
        let pod = GuestNet {
            mac: Some([0x42, 0, 0, 0, 0, 7]),
            addresses: vec![GuestAddr {
                ip: "10.244.1.7".parse().unwrap(),
                prefix: 32,
            }],
            mtu: 1450,
            routes: vec![
                GuestRoute {
                    dst: Some(("169.254.1.1".parse().unwrap(), 32)),
                    gateway: None,
                    onlink: false,
                },
                GuestRoute {
                    dst: None,
                    gateway: Some("169.254.1.1".parse().unwrap()),
                    onlink: true,
                },
            ],
            resolv_conf: None,
            extra: Vec::new(),
        };
        let json = serde_json::to_vec(&pod).unwrap();
        assert_eq!(serde_json::from_slice::<GuestNet>(&json).unwrap(), pod);
    }

    #[test]
    fn frames_round_trip_across_arbitrary_splits() {
        let mut bytes = encode(Kind::Stdout, 7, b"hello");
        bytes.extend(encode_json(
            Kind::Exit,
            0,
            &Exit {
                code: 3,
                ..Exit::default()
            },
        ));
        bytes.extend(encode(Kind::Stdin, 1, b""));
        for split in 0..bytes.len() {
            let mut d = Decoder::new();
            let mut got = Vec::new();
            for part in [&bytes[..split], &bytes[split..]] {
                d.push(part);
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got.len(), 3, "split at {split}");
            assert_eq!(got[0].kind, Kind::Stdout);
            assert_eq!(got[0].chan, 7);
            assert_eq!(got[0].payload, b"hello");
            assert_eq!(got[1].json::<Exit>().unwrap().code, 3);
            assert_eq!(got[2].kind, Kind::Stdin);
            assert!(got[2].payload.is_empty());
            assert_eq!(d.pending(), 0);
        }
    }

    #[test]
    fn hostile_frames_are_refused() {
        let mut d = Decoder::new();
        let mut long = ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
        long.extend([4, 0, 0, 0, 0]);
        d.push(&long);
        assert_eq!(d.next_frame(), Err(ProtoError::TooLong(MAX_FRAME + 1)));
        // The agent takes the host's larger requests, to their own limit.
        let big = encode(Kind::Run, 0, &vec![b' '; MAX_FRAME + 1]);
        let mut d = Decoder::for_requests();
        d.push(&big);
        assert_eq!(
            d.next_frame().unwrap().unwrap().payload.len(),
            MAX_FRAME + 1
        );
        let mut d = Decoder::for_requests();
        let mut long = ((MAX_REQUEST + 1) as u32).to_le_bytes().to_vec();
        long.extend([2, 0, 0, 0, 0]);
        d.push(&long);
        assert_eq!(d.next_frame(), Err(ProtoError::TooLong(MAX_REQUEST + 1)));
        let mut d = Decoder::new();
        d.push(&[0, 0, 0, 0, 99, 0, 0, 0, 0]);
        assert_eq!(d.next_frame(), Err(ProtoError::UnknownKind(99)));
        // A JSON kind whose payload is not the message.
        let f = Frame {
            kind: Kind::Exit,
            chan: 0,
            payload: b"{\"code\":\"x\"}".to_vec(),
        };
        assert!(f.json::<Exit>().is_err());
        // A header alone waits for its payload.
        let mut d = Decoder::new();
        d.push(&encode(Kind::Stdout, 0, b"abc")[..HEADER + 1]);
        assert_eq!(d.next_frame(), Ok(None));
    }
}
