//! mount_setattr(2) and friends. (rootfs helper fills this in.)
