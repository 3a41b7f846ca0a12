//! Spec mount options (`"ro"`, `"rbind"`, `"rro"`, `"size=64k"`, ...) turned
//! into what the kernel takes: `MS_*` flags, propagation changes, recursive
//! `MOUNT_ATTR_*` changes, and the filesystem data string. Pure logic.
use nix::mount::MsFlags;

/// `MS_NOSYMFOLLOW` (Linux 5.10), absent from nix's flag set.
pub const MS_NOSYMFOLLOW: MsFlags = MsFlags::from_bits_retain(256);

/// The atime-related `MS_*` flags.
pub const ATIME_FLAGS: MsFlags = MsFlags::MS_NOATIME
    .union(MsFlags::MS_NODIRATIME)
    .union(MsFlags::MS_RELATIME)
    .union(MsFlags::MS_STRICTATIME);

/// Whether an idmapped mount is asked for, and on how much of the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idmap {
    /// `idmap`: the top mount only.
    Top,
    /// `ridmap`: every mount of the tree.
    Recursive,
}

/// The parsed options of one spec mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// Flags for mount(2), without propagation flags.
    pub flags: MsFlags,
    /// Flags an option explicitly asked to be off ("suid", "rw", "dev"...).
    pub cleared: MsFlags,
    /// Propagation changes in the order given (`MS_SHARED | MS_REC`, ...).
    pub propagation: Vec<MsFlags>,
    /// `MOUNT_ATTR_*` bits to set recursively ("rro", "rnosuid", ...).
    pub rec_set: u64,
    /// `MOUNT_ATTR_*` bits to clear recursively ("rrw", "rsuid", ...).
    pub rec_clear: u64,
    /// "idmap" or "ridmap".
    pub idmap: Option<Idmap>,
    /// "tmpcopyup" (runc extension): copy what the tmpfs hides into it.
    pub tmpcopyup: bool,
    /// Options the kernel's filesystem gets as its data string.
    pub data: Vec<String>,
}

impl MountOptions {
    /// True with "bind" or "rbind".
    pub fn is_bind(&self) -> bool {
        self.flags.contains(MsFlags::MS_BIND)
    }

    /// True with "rbind".
    pub fn is_recursive_bind(&self) -> bool {
        self.flags.contains(MsFlags::MS_BIND | MsFlags::MS_REC)
    }

    /// The data string: the unknown options joined by commas.
    pub fn data_string(&self) -> String {
        self.data.join(",")
    }

    /// True when recursive mount attributes were asked for.
    pub fn has_recursive_attrs(&self) -> bool {
        self.rec_set != 0 || self.rec_clear != 0
    }
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            flags: MsFlags::empty(),
            cleared: MsFlags::empty(),
            propagation: Vec::new(),
            rec_set: 0,
            rec_clear: 0,
            idmap: None,
            tmpcopyup: false,
            data: Vec::new(),
        }
    }
}

/// Plain `MS_*` options: (name, clears the flag instead of setting it, flag).
const FLAG_OPTIONS: &[(&str, bool, MsFlags)] = &[
    ("defaults", false, MsFlags::empty()),
    ("ro", false, MsFlags::MS_RDONLY),
    ("rw", true, MsFlags::MS_RDONLY),
    ("nosuid", false, MsFlags::MS_NOSUID),
    ("suid", true, MsFlags::MS_NOSUID),
    ("nodev", false, MsFlags::MS_NODEV),
    ("dev", true, MsFlags::MS_NODEV),
    ("noexec", false, MsFlags::MS_NOEXEC),
    ("exec", true, MsFlags::MS_NOEXEC),
    ("sync", false, MsFlags::MS_SYNCHRONOUS),
    ("async", true, MsFlags::MS_SYNCHRONOUS),
    ("dirsync", false, MsFlags::MS_DIRSYNC),
    ("remount", false, MsFlags::MS_REMOUNT),
    ("mand", false, MsFlags::MS_MANDLOCK),
    ("nomand", true, MsFlags::MS_MANDLOCK),
    ("noatime", false, MsFlags::MS_NOATIME),
    ("atime", true, MsFlags::MS_NOATIME),
    ("nodiratime", false, MsFlags::MS_NODIRATIME),
    ("diratime", true, MsFlags::MS_NODIRATIME),
    ("relatime", false, MsFlags::MS_RELATIME),
    ("norelatime", true, MsFlags::MS_RELATIME),
    ("strictatime", false, MsFlags::MS_STRICTATIME),
    ("nostrictatime", true, MsFlags::MS_STRICTATIME),
    ("lazytime", false, MsFlags::MS_LAZYTIME),
    ("nolazytime", true, MsFlags::MS_LAZYTIME),
    ("iversion", false, MsFlags::MS_I_VERSION),
    ("noiversion", true, MsFlags::MS_I_VERSION),
    ("acl", false, MsFlags::MS_POSIXACL),
    ("noacl", true, MsFlags::MS_POSIXACL),
    ("silent", false, MsFlags::MS_SILENT),
    ("loud", true, MsFlags::MS_SILENT),
    ("nosymfollow", false, MS_NOSYMFOLLOW),
    ("symfollow", true, MS_NOSYMFOLLOW),
    ("bind", false, MsFlags::MS_BIND),
    ("rbind", false, MsFlags::MS_BIND.union(MsFlags::MS_REC)),
];

/// Maps a propagation name ("rshared", "private", ...) to its flags.
pub fn propagation_flags(name: &str) -> Option<MsFlags> {
    let rec = MsFlags::MS_REC;
    Some(match name {
        "shared" => MsFlags::MS_SHARED,
        "rshared" => MsFlags::MS_SHARED | rec,
        "slave" => MsFlags::MS_SLAVE,
        "rslave" => MsFlags::MS_SLAVE | rec,
        "private" => MsFlags::MS_PRIVATE,
        "rprivate" => MsFlags::MS_PRIVATE | rec,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        "runbindable" => MsFlags::MS_UNBINDABLE | rec,
        _ => return None,
    })
}

/// How a recursive option changes the mount attributes.
enum RecAttr {
    Set(u64),
    Clear(u64),
    /// Select one atime mode (they share the `MOUNT_ATTR__ATIME` field).
    Atime(u64),
}

fn recursive_attr(name: &str) -> Option<RecAttr> {
    use RecAttr::*;
    Some(match name {
        "rro" => Set(libc::MOUNT_ATTR_RDONLY),
        "rrw" => Clear(libc::MOUNT_ATTR_RDONLY),
        "rnosuid" => Set(libc::MOUNT_ATTR_NOSUID),
        "rsuid" => Clear(libc::MOUNT_ATTR_NOSUID),
        "rnodev" => Set(libc::MOUNT_ATTR_NODEV),
        "rdev" => Clear(libc::MOUNT_ATTR_NODEV),
        "rnoexec" => Set(libc::MOUNT_ATTR_NOEXEC),
        "rexec" => Clear(libc::MOUNT_ATTR_NOEXEC),
        "rnodiratime" => Set(libc::MOUNT_ATTR_NODIRATIME),
        "rdiratime" => Clear(libc::MOUNT_ATTR_NODIRATIME),
        "rnosymfollow" => Set(libc::MOUNT_ATTR_NOSYMFOLLOW),
        "rsymfollow" => Clear(libc::MOUNT_ATTR_NOSYMFOLLOW),
        "rnoatime" => Atime(libc::MOUNT_ATTR_NOATIME),
        "rstrictatime" => Atime(libc::MOUNT_ATTR_STRICTATIME),
        // Turning noatime/strictatime off means the kernel default, relatime.
        "rrelatime" | "ratime" | "rnostrictatime" => Atime(libc::MOUNT_ATTR_RELATIME),
        "rnorelatime" => Atime(libc::MOUNT_ATTR_STRICTATIME),
        _ => return None,
    })
}

/// Parses spec mount options in order; a later option overrides an earlier
/// one. Options moat does not know as flags go to the data string, as runc
/// does, so the filesystem itself accepts or refuses them.
pub fn parse(options: &[String]) -> MountOptions {
    let mut out = MountOptions::default();
    for opt in options {
        let opt = opt.as_str();
        if let Some(&(_, clear, flag)) = FLAG_OPTIONS.iter().find(|(name, _, _)| *name == opt) {
            if clear {
                out.flags.remove(flag);
                out.cleared.insert(flag);
            } else {
                out.flags.insert(flag);
                out.cleared.remove(flag);
            }
        } else if let Some(p) = propagation_flags(opt) {
            out.propagation.push(p);
        } else if let Some(attr) = recursive_attr(opt) {
            match attr {
                RecAttr::Set(bit) => {
                    out.rec_set |= bit;
                    out.rec_clear &= !bit;
                }
                RecAttr::Clear(bit) => {
                    out.rec_clear |= bit;
                    out.rec_set &= !bit;
                }
                RecAttr::Atime(mode) => {
                    out.rec_clear |= libc::MOUNT_ATTR__ATIME;
                    out.rec_set = (out.rec_set & !libc::MOUNT_ATTR__ATIME) | mode;
                }
            }
        } else if opt == "idmap" {
            out.idmap = Some(Idmap::Top);
        } else if opt == "ridmap" {
            out.idmap = Some(Idmap::Recursive);
        } else if opt == "tmpcopyup" {
            out.tmpcopyup = true;
        } else if !opt.is_empty() {
            out.data.push(opt.to_owned());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(s: &str) -> MountOptions {
        parse(&s.split(',').map(str::to_owned).collect::<Vec<_>>())
    }

    #[test]
    fn mixed_options() {
        let o = opts("ro,nosuid,rbind,rro,mode=755,size=64k");
        assert_eq!(
            o.flags,
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_BIND | MsFlags::MS_REC
        );
        assert_eq!(o.rec_set, libc::MOUNT_ATTR_RDONLY);
        assert_eq!(o.rec_clear, 0);
        assert_eq!(o.data_string(), "mode=755,size=64k");
        assert!(o.is_bind() && o.is_recursive_bind());
        assert!(o.propagation.is_empty());
        assert_eq!(o.idmap, None);
    }

    #[test]
    fn later_option_wins_and_clears_are_remembered() {
        let o = opts("ro,rw,nosuid,suid,noexec");
        assert_eq!(o.flags, MsFlags::MS_NOEXEC);
        assert_eq!(o.cleared, MsFlags::MS_RDONLY | MsFlags::MS_NOSUID);
        let o = opts("rw,ro");
        assert_eq!(o.flags, MsFlags::MS_RDONLY);
        assert!(o.cleared.is_empty());
    }

    #[test]
    fn propagation_in_order() {
        let o = opts("bind,rshared,private,runbindable");
        assert_eq!(
            o.propagation,
            vec![
                MsFlags::MS_SHARED | MsFlags::MS_REC,
                MsFlags::MS_PRIVATE,
                MsFlags::MS_UNBINDABLE | MsFlags::MS_REC
            ]
        );
        assert!(o.is_bind() && !o.is_recursive_bind());
        assert!(o.data.is_empty());
    }

    #[test]
    fn recursive_attrs() {
        let o = opts("rnosuid,rnodev,rnoexec,rrw,rnoatime");
        assert_eq!(
            o.rec_set,
            libc::MOUNT_ATTR_NOSUID
                | libc::MOUNT_ATTR_NODEV
                | libc::MOUNT_ATTR_NOEXEC
                | libc::MOUNT_ATTR_NOATIME
        );
        assert_eq!(
            o.rec_clear,
            libc::MOUNT_ATTR_RDONLY | libc::MOUNT_ATTR__ATIME
        );
        let o = opts("rro,rrw");
        assert_eq!(o.rec_set, 0);
        assert_eq!(o.rec_clear, libc::MOUNT_ATTR_RDONLY);
        let o = opts("rnoatime,rstrictatime");
        assert_eq!(o.rec_set, libc::MOUNT_ATTR_STRICTATIME);
        assert!(o.has_recursive_attrs());
    }

    #[test]
    fn atime_flags() {
        let o = opts("noatime,nodiratime,strictatime,norelatime");
        assert_eq!(
            o.flags,
            MsFlags::MS_NOATIME | MsFlags::MS_NODIRATIME | MsFlags::MS_STRICTATIME
        );
        assert_eq!(o.cleared, MsFlags::MS_RELATIME);
    }

    #[test]
    fn idmap_and_extensions() {
        assert_eq!(opts("bind,idmap").idmap, Some(Idmap::Top));
        assert_eq!(opts("rbind,ridmap").idmap, Some(Idmap::Recursive));
        assert!(opts("tmpcopyup").tmpcopyup);
        assert_eq!(
            opts("newinstance,ptmxmode=0666,mode=0620,gid=5").data_string(),
            "newinstance,ptmxmode=0666,mode=0620,gid=5"
        );
        assert_eq!(opts("").data_string(), "");
    }

    #[test]
    fn propagation_names() {
        assert_eq!(
            propagation_flags("rslave"),
            Some(MsFlags::MS_SLAVE | MsFlags::MS_REC)
        );
        assert_eq!(propagation_flags("slave"), Some(MsFlags::MS_SLAVE));
        assert_eq!(propagation_flags("bogus"), None);
    }
}
