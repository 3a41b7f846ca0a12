# Drives the virtio-fs device at 0xd0000000 as a FUSE client at once
# (fs_client.inc), and resets.
        .code64
        .globl _start
_start:
        jmp     fs_client
        .include "fs_client.inc"
        .include "common.inc"
        .include "virtio.inc"
