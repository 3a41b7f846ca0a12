//! virtio-balloon with free page reporting only
//! (`VIRTIO_BALLOON_F_REPORTING`): the guest's driver hands the device
//! ranges of RAM it has freed (Linux reports free blocks of 2 MiB and up,
//! a couple of seconds after they are freed), and the device gives their
//! pages back to the host ([`crate::ram_discard`]), so that a guest that
//! used memory once does not keep the host's (and its cgroup's) pages for
//! good. The host never asks for memory: the target stays 0, so the
//! inflate and deflate queues carry nothing the device acts on, and there
//! are no statistics.
//!
//! A report names guest RAM only (the chain's validation) and can only
//! take pages from the guest itself: a hostile driver reporting memory it
//! still uses reads zeros back.

use virtio_queue::{Queue, QueueT};

use super::chain;
use super::{read_config_bytes, VirtioDevice, DEVICE_ID_BALLOON, QUEUE_SIZE, VIRTIO_F_VERSION_1};
use crate::memory::GuestMem;

/// `VIRTIO_BALLOON_F_REPORTING` (the spec's `F_PAGE_REPORTING`, bit 5).
pub const F_REPORTING: u64 = 1 << 5;

/// The queues: inflate and deflate (the spec's first two, which every
/// balloon has), then the reporting queue (the stats and free page hint
/// queues are not offered, so it is the third).
pub const QUEUES: usize = 3;
/// The reporting queue's index.
pub const REPORTING_QUEUE: usize = 2;

/// The free page reporting balloon.
#[derive(Debug, Default)]
pub struct Balloon {
    /// Bytes given back to the host.
    pub returned: u64,
    /// Chains refused as malformed, and ranges the host would not take back.
    pub refused: u64,
}

impl Balloon {
    /// Gives back each device-writable buffer of a report (the driver's
    /// scatter list of free blocks).
    fn report(&mut self, chain: &chain::Chain, mem: &GuestMem) {
        for b in &chain.writable {
            match crate::ram_discard::discard(mem, b.addr, u64::from(b.len)) {
                Ok(n) => self.returned += n,
                Err(_) => self.refused += 1,
            }
        }
    }
}

impl VirtioDevice for Balloon {
    fn device_id(&self) -> u32 {
        DEVICE_ID_BALLOON
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | F_REPORTING
    }
    fn queue_count(&self) -> usize {
        QUEUES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // num_pages (the target: none) and actual, both 0. The driver's
        // writes of `actual` are dropped by the transport.
        read_config_bytes(&[0; 8], offset, data);
    }
    fn process(&mut self, index: usize, queue: &mut Queue, mem: &GuestMem) -> bool {
        let mut used = false;
        while let Some(raw) = queue.pop_descriptor_chain(mem) {
            let head = raw.head_index();
            match chain::parse(raw, mem, usize::from(QUEUE_SIZE), u64::MAX) {
                Ok(c) if index == REPORTING_QUEUE => self.report(&c, mem),
                // Pages inflated without being asked: handed back as they
                // are (the guest keeps them).
                Ok(_) => {}
                Err(_) => self.refused += 1,
            }
            used |= queue.add_used(mem, head, 0).is_ok();
        }
        used
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::chain::tests::Driver;
    use vm_memory::{Bytes, GuestAddress};

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    /// Where the tests' "free" pages are: past the queue's rings.
    const FREE: u64 = 0x40000;

    fn resident(mem: &GuestMem, at: u64, pages: usize) -> usize {
        // Whether each page reads back the pattern written to it.
        (0..pages)
            .filter(|p| {
                let v: u64 = mem.read_obj(GuestAddress(at + (*p as u64) * 4096)).unwrap();
                v == 0x5a5a_5a5a_5a5a_5a5a
            })
            .count()
    }

    fn fill(mem: &GuestMem, at: u64, pages: usize) {
        for p in 0..pages as u64 {
            mem.write_obj(0x5a5a_5a5a_5a5a_5a5au64, GuestAddress(at + p * 4096))
                .unwrap();
        }
    }

    #[test]
    fn a_report_gives_its_whole_pages_back_and_no_more() {
        let mut d = Driver::new();
        let mut dev = Balloon::default();
        fill(&d.mem, FREE, 16);
        // Four whole pages, then a range that starts mid-page and ends
        // mid-page: only its one whole page goes; the pages around stay.
        d.desc(0, FREE + 4096, 4 * 4096, F_NEXT | F_WRITE, 1);
        d.desc(1, FREE + 8 * 4096 + 100, 2 * 4096, F_WRITE, 0);
        d.offer(0);
        assert!(dev.process(REPORTING_QUEUE, &mut d.queue, &d.mem));
        assert_eq!(d.used_idx(), 1);
        assert_eq!(d.used(0), (0, 0));
        assert_eq!(dev.returned, 5 * 4096);
        assert_eq!(dev.refused, 0);
        // Pages 1..=4 and 9 read zeros now; 0, 5..=8 and 10.. kept theirs.
        assert_eq!(resident(&d.mem, FREE, 1), 1);
        assert_eq!(resident(&d.mem, FREE + 4096, 4), 0);
        assert_eq!(resident(&d.mem, FREE + 5 * 4096, 4), 4);
        assert_eq!(resident(&d.mem, FREE + 9 * 4096, 1), 0);
        assert_eq!(resident(&d.mem, FREE + 10 * 4096, 6), 6);
    }

    #[test]
    fn other_queues_and_bad_chains_take_nothing() {
        let mut d = Driver::new();
        let mut dev = Balloon::default();
        fill(&d.mem, FREE, 4);
        // Inflated without being asked: the guest keeps its pages.
        d.desc(0, FREE, 4 * 4096, F_WRITE, 0);
        d.offer(0);
        assert!(dev.process(0, &mut d.queue, &d.mem));
        assert_eq!(resident(&d.mem, FREE, 4), 4);
        // A report past guest memory is refused, and still comes back.
        d.desc(1, (1 << 20) - 4096, 2 * 4096, F_WRITE, 0);
        d.offer(1);
        assert!(dev.process(REPORTING_QUEUE, &mut d.queue, &d.mem));
        assert_eq!((dev.returned, dev.refused), (0, 1));
        assert_eq!(d.used_idx(), 2);
        assert_eq!(resident(&d.mem, FREE, 4), 4);
    }

    #[test]
    fn a_shared_memfds_reported_pages_leave_the_file() {
        // Guest RAM as a VM with a vhost-user device has it: one memfd
        // mapped shared. Reported pages are freed from the file itself
        // (a hole there now), not just from this mapping.
        let (mem, file) = crate::memory::shared_for_tests(4);
        let mut d = Driver::with_memory(mem);
        let mut dev = Balloon::default();
        fill(&d.mem, FREE, 66);
        let end = FREE + 66 * 4096;
        let data = |f: &std::fs::File| crate::memory::data_extents(f, FREE, end).unwrap();
        assert_eq!(data(&file), vec![(FREE, end)]);
        d.desc(0, FREE + 4096, 64 * 4096, F_WRITE, 0);
        d.offer(0);
        assert!(dev.process(REPORTING_QUEUE, &mut d.queue, &d.mem));
        assert_eq!(dev.returned, 64 * 4096);
        // Checked before the pages are read again (a read of a memfd's
        // hole allocates a page): the two pages around keep their data.
        assert_eq!(
            data(&file),
            vec![(FREE, FREE + 4096), (end - 4096, end)],
            "the memfd's pages were freed"
        );
        assert_eq!(resident(&d.mem, FREE + 4096, 64), 0);
        assert_eq!(resident(&d.mem, FREE, 1), 1);
    }
}
