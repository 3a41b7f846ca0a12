//! The host's `setcap` and `getcap` for a test's busybox root (busybox has
//! neither): a workload that sets a file capability.
use std::path::Path;

/// What `setcap`/`getcap` run on, with the libraries they load.
const FILES: [&str; 5] = [
    "/usr/sbin/setcap",
    "/usr/sbin/getcap",
    "/lib/x86_64-linux-gnu/libcap.so.2",
    "/lib/x86_64-linux-gnu/libc.so.6",
    "/lib64/ld-linux-x86-64.so.2",
];

/// Copies the tools into `root` at their host paths.
pub fn copy_libcap_tools(root: &Path) {
    for from in FILES {
        let to = root.join(from.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, &to).unwrap_or_else(|e| panic!("copy {from}: {e}"));
    }
}
