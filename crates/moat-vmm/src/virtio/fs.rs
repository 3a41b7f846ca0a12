//! virtio-fs (virtio spec 5.11) through a vhost-user back-end: a
//! virtiofsd, another process, serves the device's queues straight from
//! guest RAM, which it maps from the memfd the VM's RAM lives in
//! ([`crate::memory::create_shared`]). The VMM keeps only the transport
//! and the configuration space (the tag, one request queue); once the
//! driver sets DRIVER_OK it hands the back-end, over the vhost-user socket
//! (the `vhost` crate's frontend), the features the driver took, the
//! memory table and each queue's size, addresses, kick and call eventfds.
//!
//! Notifications never pass through the VMM: each queue's kick eventfd is
//! a KVM ioeventfd on the transport's QueueNotify register (matched on
//! the queue's index), and the call eventfd the back-end signals is the
//! device's own irqfd. So the transport cannot know why the line rose:
//! its InterruptStatus reads "used buffer" while the device runs (the
//! driver then looks at every queue, which costs it nothing when there is
//! nothing new), as for any vhost-user device on virtio-mmio.

use std::os::unix::net::UnixStream;

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{DeviceError, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::memory::GuestMem;

/// The virtio-fs device id.
pub const DEVICE_ID_FS: u32 = 26;
/// The tag's field in the configuration space (NUL-padded, not terminated).
pub const TAG_LEN: usize = 36;
/// Request queues: one (queue 1; queue 0 is the high-priority queue).
const REQUEST_QUEUES: u32 = 1;
/// The device's queues: high priority and the request queue.
pub const QUEUES: usize = 1 + REQUEST_QUEUES as usize;
/// VHOST_USER_F_PROTOCOL_FEATURES: a vhost-user bit, never the driver's.
const PROTOCOL_FEATURES: u64 = 1 << 30;
/// VIRTIO_RING_F_INDIRECT_DESC.
const INDIRECT_DESC: u64 = 1 << 28;
/// VIRTIO_RING_F_EVENT_IDX.
const EVENT_IDX: u64 = 1 << 29;
/// What the driver may get of the back-end's features: the ring's, which
/// the back-end implements, and nothing the transport would have to know
/// about (no packed rings, no IOMMU, no notification data).
const PASSED_FEATURES: u64 = VIRTIO_F_VERSION_1 | INDIRECT_DESC | EVENT_IDX;

/// A virtio-fs device served by a vhost-user back-end.
pub struct Fs {
    frontend: Frontend,
    config: [u8; TAG_LEN + 4],
    /// The back-end's features the driver is offered.
    offered: u64,
    /// Whether VHOST_USER_F_PROTOCOL_FEATURES was negotiated (queues then
    /// start disabled and are enabled one by one).
    protocol: bool,
    regions: Vec<VhostUserMemoryRegionInfo>,
    call: EventFd,
    kicks: Vec<EventFd>,
    /// Queues handed to the back-end, by index.
    running: Vec<usize>,
}

impl Fs {
    /// Opens the vhost-user session on `socket` (connected to the
    /// back-end): takes ownership of it, reads its features and settles
    /// the protocol's. `call` is the device's interrupt eventfd (its
    /// irqfd); `mem` must be shared guest RAM.
    pub fn new(
        socket: UnixStream,
        tag: &str,
        mem: &GuestMem,
        call: EventFd,
    ) -> Result<Fs, DeviceError> {
        if tag.is_empty() || tag.len() > TAG_LEN || tag.bytes().any(|b| b == 0) {
            return Err(DeviceError::Fs(format!(
                "tag {tag:?}: must be 1 to {TAG_LEN} bytes, without NUL"
            )));
        }
        let mut config = [0u8; TAG_LEN + 4];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&REQUEST_QUEUES.to_le_bytes());
        // A region mapped privately (a snapshot's file, copy-on-write)
        // has a file too: the back-end would map that file shared, see
        // none of the guest's writes, and write into the file.
        if mem.iter().any(|r| r.flags() & libc::MAP_SHARED == 0) {
            return Err(DeviceError::Fs(
                "guest memory is not shared (mapped privately)".into(),
            ));
        }
        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| DeviceError::Fs("guest memory is not shared (no memfd)".into()))?;
        let user = |step: &'static str| move |source| DeviceError::VhostUser { step, source };
        let mut frontend = Frontend::from_stream(socket, QUEUES as u64);
        frontend.set_owner().map_err(user("set the owner"))?;
        let features = frontend.get_features().map_err(user("get the features"))?;
        if features & VIRTIO_F_VERSION_1 == 0 {
            return Err(DeviceError::Fs(
                "the back-end does not offer VIRTIO_F_VERSION_1".into(),
            ));
        }
        let protocol = features & PROTOCOL_FEATURES != 0;
        if protocol {
            let offered = frontend
                .get_protocol_features()
                .map_err(user("get the protocol features"))?;
            // Only acknowledgements: each request's failure is then seen.
            let wanted = offered & VhostUserProtocolFeatures::REPLY_ACK;
            frontend
                .set_protocol_features(wanted)
                .map_err(user("set the protocol features"))?;
            if wanted.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        let kicks = (0..QUEUES)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(DeviceError::Eventfd)?;
        Ok(Fs {
            frontend,
            config,
            offered: features & PASSED_FEATURES,
            protocol,
            regions,
            call,
            kicks,
            running: Vec::new(),
        })
    }

    /// Queue `index`'s kick eventfd, to be registered as the ioeventfd of
    /// the transport's QueueNotify register with the index as its value.
    pub fn kick(&self, index: usize) -> Option<&EventFd> {
        self.kicks.get(index)
    }

    /// Hands one queue to the back-end.
    fn start_queue(&self, index: usize, q: &Queue, mem: &GuestMem) -> Result<(), String> {
        let host = |what: &str, addr: u64| {
            mem.get_host_address(GuestAddress(addr))
                .map(|p| p as u64)
                .map_err(|e| format!("queue {index}'s {what} at {addr:#x}: {e}"))
        };
        let ring = VringConfigData {
            queue_max_size: q.max_size(),
            queue_size: q.size(),
            flags: 0,
            desc_table_addr: host("descriptor table", q.desc_table())?,
            used_ring_addr: host("used ring", q.used_ring())?,
            avail_ring_addr: host("available ring", q.avail_ring())?,
            log_addr: None,
        };
        let step = |what: &str| {
            let what = what.to_string();
            move |e: vhost::Error| format!("queue {index}: {what}: {e}")
        };
        let kick = self
            .kicks
            .get(index)
            .ok_or_else(|| format!("no queue {index}"))?;
        self.frontend
            .set_vring_num(index, q.size())
            .map_err(step("size"))?;
        self.frontend
            .set_vring_addr(index, &ring)
            .map_err(step("addresses"))?;
        self.frontend
            .set_vring_base(index, q.next_avail())
            .map_err(step("base"))?;
        self.frontend
            .set_vring_call(index, &self.call)
            .map_err(step("call eventfd"))?;
        self.frontend
            .set_vring_kick(index, kick)
            .map_err(step("kick eventfd"))?;
        Ok(())
    }
}

impl VirtioDevice for Fs {
    fn device_id(&self) -> u32 {
        DEVICE_ID_FS
    }

    fn features(&self) -> u64 {
        self.offered
    }

    fn queue_count(&self) -> usize {
        QUEUES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    /// A notification that reached the VMM (the ioeventfd takes the
    /// others) is passed on to the back-end.
    fn process(&mut self, index: usize, _queue: &mut Queue, _mem: &GuestMem) -> bool {
        if let Some(kick) = self.kicks.get(index) {
            // A lost kick stalls only this guest's driver.
            let _ = kick.write(1);
        }
        false
    }

    fn activate(&mut self, queues: &[Queue], mem: &GuestMem, features: u64) -> Result<(), String> {
        let protocol = if self.protocol { PROTOCOL_FEATURES } else { 0 };
        self.frontend
            .set_features((features & self.offered) | protocol)
            .map_err(|e| format!("set the features: {e}"))?;
        self.frontend
            .set_mem_table(&self.regions)
            .map_err(|e| format!("set the memory table: {e}"))?;
        for (index, q) in queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            self.start_queue(index, q, mem)?;
            self.running.push(index);
            if self.protocol {
                self.frontend
                    .set_vring_enable(index, true)
                    .map_err(|e| format!("queue {index}: enable: {e}"))?;
            }
        }
        Ok(())
    }

    fn interrupts_itself(&self) -> bool {
        true
    }

    /// Stops the back-end's queues (GET_VRING_BASE stops a ring); a
    /// back-end already gone has nothing left to stop.
    fn reset(&mut self) {
        for index in std::mem::take(&mut self.running) {
            let _ = self.frontend.get_vring_base(index);
        }
    }
}

/// A virtio-mmio slot for a virtio-fs device, present in the VM from its
/// start whether or not it holds one: a snapshot's guest has every slot,
/// and a run's read-write volumes fill them after the restore (or after a
/// cold boot's save). Empty or hidden, the slot is a virtio placeholder
/// (device ID 0, virtio spec 4.2.2: the driver ignores it; Linux's
/// virtio-mmio probe stops there, so the guest never touches its queues);
/// once shown ([`FsSlot::show`]), it is its device, which the guest binds
/// when asked to probe the slot again (the agent writes its platform
/// device to the bus's `drivers_probe`).
pub struct FsSlot {
    fs: Option<Fs>,
    shown: bool,
}

impl FsSlot {
    /// A slot with no device: a placeholder for good.
    pub fn empty() -> FsSlot {
        FsSlot {
            fs: None,
            shown: false,
        }
    }

    /// A slot holding `fs`, its session with the back-end already open,
    /// hidden until [`FsSlot::show`].
    pub fn hidden(fs: Fs) -> FsSlot {
        FsSlot {
            fs: Some(fs),
            shown: false,
        }
    }

    /// Whether the slot holds a device not yet shown.
    pub fn is_hidden(&self) -> bool {
        self.fs.is_some() && !self.shown
    }

    /// Shows the device: the slot reads as virtio-fs from now on.
    pub fn show(&mut self) {
        self.shown = self.fs.is_some();
    }

    fn live(&self) -> Option<&Fs> {
        self.fs.as_ref().filter(|_| self.shown)
    }

    fn live_mut(&mut self) -> Option<&mut Fs> {
        self.fs.as_mut().filter(|_| self.shown)
    }
}

impl VirtioDevice for FsSlot {
    fn device_id(&self) -> u32 {
        self.live().map_or(0, VirtioDevice::device_id)
    }

    fn features(&self) -> u64 {
        self.live()
            .map_or(VIRTIO_F_VERSION_1, VirtioDevice::features)
    }

    fn queue_count(&self) -> usize {
        QUEUES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        match self.live() {
            Some(fs) => fs.read_config(offset, data),
            None => data.fill(0),
        }
    }

    fn process(&mut self, index: usize, queue: &mut Queue, mem: &GuestMem) -> bool {
        self.live_mut()
            .is_some_and(|fs| fs.process(index, queue, mem))
    }

    fn activate(&mut self, queues: &[Queue], mem: &GuestMem, features: u64) -> Result<(), String> {
        match self.live_mut() {
            Some(fs) => fs.activate(queues, mem, features),
            None => Err("no device in this slot".into()),
        }
    }

    fn interrupts_itself(&self) -> bool {
        self.live().is_some()
    }

    fn reset(&mut self) {
        if let Some(fs) = self.live_mut() {
            fs.reset();
        }
    }
}
