//! What this crate's namespace tests share: a fresh network namespace
//! held by its fd, entered by threads with setns.
#![allow(dead_code)]
use std::os::fd::{AsFd, OwnedFd};
use std::thread::JoinHandle;

use nix::sched::{setns, unshare, CloneFlags};

/// A network namespace, alive as long as this fd.
pub struct Netns(pub OwnedFd);

impl Netns {
    pub fn new() -> Netns {
        std::thread::spawn(|| {
            unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
            Netns(OwnedFd::from(
                std::fs::File::open("/proc/thread-self/ns/net").expect("open ns/net"),
            ))
        })
        .join()
        .expect("netns thread")
    }

    pub fn enter(&self) {
        setns(self.0.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns");
    }

    /// Runs `f` on a thread inside this namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter();
                f()
            })
            .join()
            .expect("thread in netns panicked")
        })
    }

    /// Starts `f` on a thread inside this namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let fd = self.0.try_clone().expect("dup netns fd");
        std::thread::spawn(move || {
            setns(fd.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns");
            drop(fd);
            f()
        })
    }
}
