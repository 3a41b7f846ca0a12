# For a virtio-fs device shown after the start (a slot that is a
# placeholder, device ID 0, until the host fills it): prints the slot's
# device ID as "slot=<8 hex> ready\n", spins until the host sets the byte
# at GO (a restored guest carries on in this loop), prints the ID again as
# "then=<8 hex> ", then runs the FUSE client of fs.S on the slot
# (fs_client.inc), which fails at the device ID ("fs fail d") if it is
# still a placeholder.
        .code64
        .globl _start
        .set    SLOT, 0xd0000000
        .set    GO, 0x380000
_start:
        lea     s_slot(%rip), %rsi
        call    puts
        mov     $SLOT, %edx
        mov     8(%rdx), %ebx
        mov     $8, %ecx
        call    hex
        lea     s_ready(%rip), %rsi
        call    puts
1:      pause
        cmpb    $0, GO
        je      1b
        lea     s_then(%rip), %rsi
        call    puts
        mov     $SLOT, %edx
        mov     8(%rdx), %ebx
        mov     $8, %ecx
        call    hex
        lea     s_sp(%rip), %rsi
        call    puts
        jmp     fs_client
s_slot:  .asciz  "slot="
s_ready: .asciz  " ready\n"
s_then:  .asciz  "then="
s_sp:    .asciz  " "
        .include "fs_client.inc"
        .include "common.inc"
        .include "virtio.inc"
