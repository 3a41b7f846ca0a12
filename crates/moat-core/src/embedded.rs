//! The embedded default root of `moat run` (no image): which host files it
//! shows, read-only. `moat audit` knows them too, to rate such mounts.

/// Top-level host directories shared read-only (those that exist).
pub const HOST_DIRS: &[&str] = &["usr", "bin", "sbin", "lib", "lib64", "lib32"];

/// Host /etc entries programs need: the dynamic linker's cache, name
/// resolution, TLS roots, Debian's alternatives (targets of /usr/bin links).
pub const HOST_ETC: &[&str] = &[
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "hosts",
    "resolv.conf",
    "nsswitch.conf",
    "host.conf",
    "localtime",
    "ssl",
    "ca-certificates",
    "alternatives",
];
