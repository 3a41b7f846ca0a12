//! The virtio-mmio transport, version 2 (virtio spec 4.2.2): the register
//! window of one device. Sans-IO: it is driven by the vCPU's MMIO exits and
//! raises its interrupt through a [`Trigger`].

use virtio_queue::{Queue, QueueT};
use vm_superio::Trigger;

use super::{VirtioDevice, QUEUE_SIZE, VIRTIO_F_VERSION_1};
use crate::memory::GuestMem;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4d4f_4154; // "MOAT"

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
/// The QueueNotify register (a vhost-user device's ioeventfd).
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
/// Shared memory regions (virtio 1.2): length and base of the selected
/// one, which reads all ones when there is none (moat's devices have none).
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_BASE_HIGH: u64 = 0x0bc;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;
/// VIRTIO_RING_F_EVENT_IDX (not offered by moat's devices).
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Device status bits.
pub const STATUS_ACKNOWLEDGE: u32 = 1;
/// The driver knows how to drive the device.
pub const STATUS_DRIVER: u32 = 2;
/// The driver is ready.
pub const STATUS_DRIVER_OK: u32 = 4;
/// Feature negotiation is complete.
pub const STATUS_FEATURES_OK: u32 = 8;
/// The device hit an error it cannot recover from without a reset.
pub const STATUS_NEEDS_RESET: u32 = 0x40;
/// The driver gave up on the device.
pub const STATUS_FAILED: u32 = 0x80;
/// InterruptStatus bit: a used buffer was returned.
pub const INT_USED_BUFFER: u32 = 1;

/// A device behind its MMIO register window.
pub struct MmioTransport<D, T> {
    device: D,
    irq: T,
    mem: GuestMem,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
}

impl<D: VirtioDevice, T: Trigger> MmioTransport<D, T> {
    /// Puts `device` behind a transport raising `irq`.
    pub fn new(device: D, irq: T, mem: GuestMem) -> Self {
        let queues = (0..device.queue_count())
            .filter_map(|_| Queue::new(QUEUE_SIZE).ok())
            .collect();
        MmioTransport {
            device,
            irq,
            mem,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
        }
    }

    /// The device model.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device model, to change it (a slot's device shown: its ID
    /// and registers read from the device on every access).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The transport's registers and queues, for a snapshot.
    pub fn state(&self) -> crate::snapshot::TransportState {
        crate::snapshot::TransportState {
            device_id: self.device.device_id(),
            queues: self
                .queues
                .iter()
                .map(|q| {
                    let s = q.state();
                    crate::snapshot::QueueRegs {
                        max_size: s.max_size,
                        next_avail: s.next_avail,
                        next_used: s.next_used,
                        event_idx_enabled: s.event_idx_enabled,
                        size: s.size,
                        ready: s.ready,
                        desc_table: s.desc_table,
                        avail_ring: s.avail_ring,
                        used_ring: s.used_ring,
                    }
                })
                .collect(),
            queue_sel: self.queue_sel,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            status: self.status,
            interrupt_status: self.interrupt_status,
        }
    }

    /// Takes the registers and queues of a saved transport of the same
    /// device kind (refused otherwise, as are queues virtio-queue finds
    /// invalid: a snapshot file is input like any other).
    pub fn set_state(&mut self, s: &crate::snapshot::TransportState) -> Result<(), String> {
        if s.device_id != self.device.device_id() || s.queues.len() != self.queues.len() {
            return Err(format!(
                "device {} with {} queues saved, {} with {} here",
                s.device_id,
                s.queues.len(),
                self.device.device_id(),
                self.queues.len()
            ));
        }
        let offered = self.device.features();
        if s.driver_features & !offered != 0 {
            return Err(format!(
                "features {:#x} saved, not offered by this device",
                s.driver_features & !offered
            ));
        }
        let mut queues = Vec::with_capacity(s.queues.len());
        for q in &s.queues {
            if q.event_idx_enabled && offered & VIRTIO_RING_F_EVENT_IDX == 0 {
                return Err("a queue with event indices saved; this device offers none".into());
            }
            let state = virtio_queue::QueueState {
                max_size: q.max_size,
                next_avail: q.next_avail,
                next_used: q.next_used,
                event_idx_enabled: q.event_idx_enabled,
                size: q.size,
                ready: q.ready,
                desc_table: q.desc_table,
                avail_ring: q.avail_ring,
                used_ring: q.used_ring,
            };
            if q.max_size != QUEUE_SIZE {
                return Err(format!("a queue of {} entries at most saved", q.max_size));
            }
            queues.push(Queue::try_from(state).map_err(|e| format!("a saved queue: {e:?}"))?);
        }
        self.queues = queues;
        self.queue_sel = s.queue_sel;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.status = s.status;
        self.interrupt_status = s.interrupt_status;
        // A device the saved driver had started starts again here, with
        // what that driver accepted (a TAP's offloads).
        if self.active() {
            self.device
                .activate(&self.queues, &self.mem, self.driver_features)
                .map_err(|e| format!("start the restored device: {e}"))?;
        }
        Ok(())
    }

    fn active(&self) -> bool {
        self.status & (STATUS_DRIVER_OK | STATUS_FAILED) == STATUS_DRIVER_OK
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Runs the device on queue `index` if the driver has set it up, and
    /// raises the interrupt if buffers were used. Device-side events (input
    /// arriving for the guest) call this too.
    pub fn process_queue(&mut self, index: usize) {
        if !self.active() {
            return;
        }
        let Some(queue) = self.queues.get_mut(index) else {
            return;
        };
        if !queue.is_valid(&self.mem) {
            return;
        }
        if self.device.process(index, queue, &self.mem) {
            let needs = queue.needs_notification(&self.mem).unwrap_or(true);
            if needs {
                self.interrupt_status |= INT_USED_BUFFER;
                // A lost interrupt stalls only this guest's driver.
                let _ = self.irq.trigger();
            }
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status = 0;
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        if value & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let offered = self.device.features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                value &= !STATUS_FEATURES_OK;
            }
        }
        if value & STATUS_DRIVER_OK != 0 && value & STATUS_FEATURES_OK == 0 {
            value &= !STATUS_DRIVER_OK;
        }
        // The driver only ever adds bits; it cannot clear one without a
        // reset, nor set the device's own.
        value &= !STATUS_NEEDS_RESET;
        let starting = value & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
        self.status |= value;
        if starting {
            if let Err(e) = self
                .device
                .activate(&self.queues, &self.mem, self.driver_features)
            {
                // The VMM's stderr is the guest's console log.
                eprintln!(
                    "moat-vmm: virtio device {} failed to start: {e}",
                    self.device.device_id()
                );
                self.status |= STATUS_NEEDS_RESET;
            }
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        let features = self.device.features();
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device.device_id(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => features as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS if self.device.interrupts_itself() && self.active() => {
                self.interrupt_status | INT_USED_BUFFER
            }
            REG_INTERRUPT_STATUS => self.interrupt_status,
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => 0,
            // Linux's virtio-fs driver takes a length that is not all ones
            // for a DAX window and fails its probe when it cannot claim it.
            REG_SHM_LEN_LOW..=REG_SHM_BASE_HIGH => u32::MAX,
            _ => 0,
        }
    }

    fn queue_config_allowed(&self) -> bool {
        self.status & STATUS_FEATURES_OK != 0
            && self.status & (STATUS_DRIVER_OK | STATUS_FAILED) == 0
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        if !self.queue_config_allowed() {
            return;
        }
        let Some(q) = self.selected_queue() else {
            return;
        };
        match offset {
            // virtio-queue refuses sizes that are not a power of two or too big.
            REG_QUEUE_NUM => q.set_size(u16::try_from(value).unwrap_or(0)),
            REG_QUEUE_READY => q.set_ready(value == 1),
            REG_QUEUE_DESC_LOW => q.set_desc_table_address(Some(value), None),
            REG_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(value)),
            REG_QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(value), None),
            REG_QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(value)),
            REG_QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(value), None),
            REG_QUEUE_DEVICE_HIGH => q.set_used_ring_address(None, Some(value)),
            _ => {}
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES => {
                if self.status & (STATUS_DRIVER | STATUS_FEATURES_OK) == STATUS_DRIVER {
                    match self.driver_features_sel {
                        0 => {
                            self.driver_features =
                                (self.driver_features & !0xffff_ffff) | u64::from(value)
                        }
                        1 => {
                            self.driver_features =
                                (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                        }
                        _ => {}
                    }
                }
            }
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NOTIFY => self.process_queue(value as usize),
            REG_INTERRUPT_ACK => self.interrupt_status &= !value,
            REG_STATUS => self.set_status(value),
            _ => self.write_queue_register(offset, value),
        }
    }

    /// A guest read of `data.len()` bytes at `offset` into the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        // Registers are 32-bit and aligned; anything else reads as zero.
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    /// A guest write of `data` at `offset` into the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        // Configuration space is read-only for these devices; registers are
        // 32-bit and aligned; anything else is ignored.
        if offset >= CONFIG_SPACE || data.len() != 4 || !offset.is_multiple_of(4) {
            return;
        }
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_register(offset, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::rng::Rng;
    use std::cell::Cell;
    use std::rc::Rc;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    #[derive(Default, Clone)]
    struct Count(Rc<Cell<u32>>);
    impl Trigger for Count {
        type E = ();
        fn trigger(&self) -> Result<(), ()> {
            self.0.set(self.0.get() + 1);
            Ok(())
        }
    }

    fn transport() -> (MmioTransport<Rng, Count>, Count) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let c = Count::default();
        (MmioTransport::new(Rng::default(), c.clone(), mem), c)
    }

    fn w(t: &mut MmioTransport<Rng, Count>, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn r(t: &mut MmioTransport<Rng, Count>, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn no_shared_memory_region_reads_all_ones() {
        let (mut t, _) = transport();
        for region in [0, 1] {
            w(&mut t, 0x0ac, region);
            for reg in [0x0b0, 0x0b4, 0x0b8, 0x0bc] {
                assert_eq!(r(&mut t, reg), u32::MAX, "{reg:#x}");
            }
        }
    }

    #[test]
    fn identity_registers() {
        let (mut t, _) = transport();
        assert_eq!(r(&mut t, REG_MAGIC), MAGIC);
        assert_eq!(r(&mut t, REG_VERSION), 2);
        assert_eq!(r(&mut t, REG_DEVICE_ID), 4);
        let mut odd = [9u8; 2];
        t.read(REG_MAGIC, &mut odd);
        assert_eq!(odd, [0, 0]);
        t.read(1, &mut [0u8; 4]);
        t.write(u64::MAX - 3, &[1, 2, 3, 4]);
        t.read(u64::MAX - 3, &mut [0u8; 4]);
    }

    #[test]
    fn features_not_offered_fail_negotiation() {
        let (mut t, _) = transport();
        w(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        w(&mut t, REG_DRIVER_FEATURES, 1 << 28); // indirect descriptors: not offered
        w(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        w(&mut t, REG_DRIVER_FEATURES, 1);
        w(&mut t, REG_STATUS, 0xb);
        assert_eq!(r(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        // Nor does DRIVER_OK stick without FEATURES_OK.
        w(&mut t, REG_STATUS, 0xf);
        assert_eq!(r(&mut t, REG_STATUS) & STATUS_DRIVER_OK, 0);
    }

    /// A driver's set-up: features negotiated, queue 0 of 8 entries at
    /// 0x1000/0x2000/0x3000, ready, DRIVER_OK.
    fn driven() -> MmioTransport<Rng, Count> {
        let (mut t, _) = transport();
        for (reg, value) in [
            (REG_STATUS, 3),
            (REG_DRIVER_FEATURES_SEL, 1),
            (REG_DRIVER_FEATURES, 1),
            (REG_STATUS, 0xb),
            (REG_QUEUE_NUM, 8),
            (REG_QUEUE_DESC_LOW, 0x1000),
            (REG_QUEUE_DRIVER_LOW, 0x2000),
            (REG_QUEUE_DEVICE_LOW, 0x3000),
            (REG_QUEUE_READY, 1),
            (REG_STATUS, 0xf),
        ] {
            w(&mut t, reg, value);
        }
        t
    }

    #[test]
    fn state_round_trips_and_a_state_that_does_not_fit_is_refused() {
        let saved = driven().state();
        let (mut u, _) = transport();
        u.set_state(&saved).unwrap();
        assert_eq!(u.state(), saved);
        assert_eq!(r(&mut u, REG_STATUS), 0xf);
        assert_eq!(u.queues[0].desc_table(), 0x1000);
        let refused = |edit: &dyn Fn(&mut crate::snapshot::TransportState)| {
            let mut s = saved.clone();
            edit(&mut s);
            let (mut v, _) = transport();
            v.set_state(&s).unwrap_err()
        };
        assert!(refused(&|s| s.device_id = 2).contains("device 2"));
        assert!(refused(&|s| s.queues.push(Default::default())).contains("queues"));
        assert!(refused(&|s| s.driver_features |= 1 << 28).contains("not offered"));
        assert!(refused(&|s| s.queues[0].event_idx_enabled = true).contains("event indices"));
        assert!(refused(&|s| s.queues[0].size = 3).contains("saved queue"));
        assert!(refused(&|s| s.queues[0].max_size = 1024).contains("entries"));
    }

    /// A device that records the features it was started with, and whose
    /// start fails when told to.
    struct Starts {
        started: std::sync::Arc<std::sync::Mutex<Option<u64>>>,
        fail: bool,
    }
    impl VirtioDevice for Starts {
        fn device_id(&self) -> u32 {
            4
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1 << 3
        }
        fn queue_count(&self) -> usize {
            1
        }
        fn read_config(&self, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn process(&mut self, _: usize, _: &mut Queue, _: &GuestMem) -> bool {
            false
        }
        fn activate(&mut self, _: &[Queue], _: &GuestMem, features: u64) -> Result<(), String> {
            *self.started.lock().unwrap() = Some(features);
            if self.fail {
                return Err("refused".into());
            }
            Ok(())
        }
    }

    #[test]
    fn a_restored_device_its_driver_had_started_starts_with_its_features() {
        let mut saved = driven().state();
        saved.driver_features |= 1 << 3;
        let restore = |state: &crate::snapshot::TransportState, fail: bool| {
            let started = std::sync::Arc::new(std::sync::Mutex::new(None));
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
            let dev = Starts {
                started: started.clone(),
                fail,
            };
            let mut t = MmioTransport::new(dev, Count::default(), mem);
            let r = t.set_state(state);
            let got = *started.lock().unwrap();
            (r, got)
        };
        let (ok, started) = restore(&saved, false);
        ok.unwrap();
        assert_eq!(started, Some(VIRTIO_F_VERSION_1 | 1 << 3));
        // A start that fails fails the restore.
        let (err, _) = restore(&saved, true);
        assert!(err.unwrap_err().contains("refused"));
        // Saved before the driver started it: not started.
        let mut before = saved.clone();
        before.status = 0xb;
        let (ok, started) = restore(&before, false);
        ok.unwrap();
        assert_eq!(started, None);
    }

    #[test]
    fn queue_setup_is_frozen_after_driver_ok_and_bad_sizes_refused() {
        let (mut t, irq) = transport();
        w(&mut t, REG_STATUS, 3);
        w(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        w(&mut t, REG_DRIVER_FEATURES, 1);
        w(&mut t, REG_STATUS, 0xb);
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_NUM, 3); // not a power of two: ignored
        w(&mut t, REG_QUEUE_NUM, 1 << 20); // too big: ignored
        assert_eq!(t.queues[0].size(), QUEUE_SIZE);
        w(&mut t, REG_QUEUE_NUM, 8);
        w(&mut t, REG_QUEUE_DESC_LOW, 0x1000);
        w(&mut t, REG_QUEUE_DRIVER_LOW, 0x2000);
        w(&mut t, REG_QUEUE_DEVICE_LOW, 0x3000);
        w(&mut t, REG_QUEUE_READY, 1);
        w(&mut t, REG_STATUS, 0xf);
        assert_eq!(r(&mut t, REG_STATUS), 0xf);
        w(&mut t, REG_QUEUE_DESC_LOW, 0xdead_0000);
        assert_eq!(t.queues[0].desc_table(), 0x1000);
        // Notifying a queue that does not exist, or one with nothing in it.
        w(&mut t, REG_QUEUE_NOTIFY, 7);
        w(&mut t, REG_QUEUE_NOTIFY, u32::MAX);
        w(&mut t, REG_QUEUE_NOTIFY, 0);
        assert_eq!(irq.0.get(), 0);
        // Selecting a queue that does not exist reads as absent.
        w(&mut t, REG_QUEUE_SEL, 5);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 0);
        // Reset clears everything.
        w(&mut t, REG_STATUS, 0);
        assert_eq!(r(&mut t, REG_STATUS), 0);
        assert!(!t.queues[0].ready());
    }
}
