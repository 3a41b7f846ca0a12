//! moat's Linux primitives and the `container` tier built from them. One
//! module per kernel facility; `container` is the checklist that drives them.
#![forbid(unsafe_code)]

pub mod attrs;
pub mod cache;
pub mod caps;
pub mod cgroup;
pub mod console;
pub mod container;
pub mod exec;
pub mod hooks;
pub mod idalloc;
pub mod idmap;
pub mod image;
pub mod init;
pub mod landlock;
pub mod mountinfo;
pub mod net;
pub mod ns;
pub mod process;
pub mod rlimit;
pub mod rootfs;
pub mod seccomp;
pub mod selfexe;
pub mod sync;
pub mod time;

/// An error and its causes as one line: "a: b: c".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !t.is_empty() && !s.ends_with(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}
