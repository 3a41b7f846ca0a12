//! The workload thread and the supervisor on one CPU while a descriptor is
//! handed over.
//!
//! Handing over a descriptor (seccomp `ADDFD`) takes two wake-ups that the
//! notification's synchronous mode does not cover: the kernel wakes the
//! waiting workload thread to install the descriptor with a plain wake-up,
//! which puts it on an idle CPU since the supervisor holds the current
//! one, and the thread then wakes the supervisor, blocked meanwhile, on the
//! CPU it left. Waking an idle CPU is cheap on hardware and expensive in a
//! VM whose idle vCPUs halt: measured on this project's machines, a
//! brokered open+close costs 60–80 µs that way against ~7 µs with both on
//! one CPU (docs/sandbox.md). So for the hand-over the thread's affinity
//! is narrowed to the CPU the supervisor runs on (the one the thread
//! notified from: the notification's synchronous wake-up put the
//! supervisor there), the supervisor's own too, and both are restored
//! right after. Best effort: where a step fails, nothing is changed.
//!
//! A workload that sets affinities itself (`sched_setaffinity` is
//! notified for that) turns this off for the sandbox: the supervisor,
//! single-threaded, never narrows a thread while a call of the workload
//! that sets its mask is decided, and then never again, so it cannot undo
//! the workload's own setting.
use rustix::process::Pid;
use rustix::thread::{sched_getaffinity, sched_setaffinity, CpuSet};

/// A workload thread and the supervisor narrowed to one CPU; restored when
/// dropped.
pub struct Pinned {
    tid: Pid,
    old: CpuSet,
    own: CpuSet,
}

/// The supervisor's own affinity, to restore after each hand-over.
pub fn own_affinity() -> Option<CpuSet> {
    sched_getaffinity(None).ok()
}

/// Narrows thread `tid` (host TID) and the supervisor to the supervisor's
/// current CPU, if both may run there.
pub fn pin(tid: u32, own: &CpuSet) -> Option<Pinned> {
    let tid = Pid::from_raw(i32::try_from(tid).ok()?)?;
    // libc's: rustix's first call would look the vDSO up with a prctl
    // that the supervisor's filter does not allow.
    let cpu = moat_sys::process::current_cpu()?;
    let old = sched_getaffinity(Some(tid)).ok()?;
    if !old.is_set(cpu) || !own.is_set(cpu) {
        return None;
    }
    let mut one = CpuSet::new();
    one.set(cpu);
    sched_setaffinity(Some(tid), &one).ok()?;
    if sched_setaffinity(None, &one).is_err() {
        restore(tid, &old);
        return None;
    }
    Some(Pinned {
        tid,
        old,
        own: *own,
    })
}

/// Gives thread `tid` its mask back; if that is no longer possible (its
/// cpuset changed meanwhile), every CPU it may use.
fn restore(tid: Pid, old: &CpuSet) {
    match sched_setaffinity(Some(tid), old) {
        // Gone (killed meanwhile): nothing to restore.
        Ok(()) | Err(rustix::io::Errno::SRCH) => {}
        Err(_) => {
            let mut all = CpuSet::new();
            for c in 0..CpuSet::MAX_CPU {
                all.set(c);
            }
            if let Err(e) = sched_setaffinity(Some(tid), &all) {
                tracing::warn!("sandbox supervisor: cannot restore the affinity of {tid:?}: {e}");
            }
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        restore(self.tid, &self.old);
        if let Err(e) = sched_setaffinity(None, &self.own) {
            tracing::warn!("sandbox supervisor: cannot restore its own affinity: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread narrowed for a hand-over gets its own mask back, and so
    /// does the caller.
    #[test]
    fn a_pinned_thread_and_the_caller_get_their_masks_back() {
        let own = own_affinity().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            tx.send(rustix::thread::gettid()).unwrap();
            done_rx.recv().unwrap();
            sched_getaffinity(None).unwrap()
        });
        let tid = rx.recv().unwrap();
        let before = sched_getaffinity(Some(tid)).unwrap();
        {
            let p = pin(tid.as_raw_nonzero().get() as u32, &own).expect("pinned");
            assert_eq!(sched_getaffinity(Some(tid)).unwrap().count(), 1);
            assert_eq!(sched_getaffinity(None).unwrap().count(), 1);
            assert_eq!(p.old, before);
        }
        assert_eq!(sched_getaffinity(Some(tid)).unwrap(), before);
        assert_eq!(sched_getaffinity(None).unwrap(), own);
        done_tx.send(()).unwrap();
        assert_eq!(t.join().unwrap(), before);
    }
}
