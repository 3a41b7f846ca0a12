# The network card against moat's user-space stack: transmits an ARP
# request from 10.0.2.100 for the gateway 10.0.2.2 on queue 1 of the
# virtio-net device at 0xd0000000, posts a 2 KiB receive buffer on queue 0,
# and says whether what came back is the gateway's ARP reply. Then resets.
        .code64
        .globl _start
        .set    RXBUF, 0x320000
_start:
        mov     $0xd0000000, %ebx
        mov     $1, %edi
        call    virtio_init
        test    %eax, %eax
        jnz     9f
        mov     $1, %ebp                # queue 1: transmit the request
        xor     %ecx, %ecx
        lea     request(%rip), %r8
        mov     $54, %r9d               # virtio-net header + 42
        xor     %r10w, %r10w
        xor     %r11w, %r11w
        call    desc
        xor     %ecx, %ecx
        call    submit
        xor     %ebp, %ebp              # queue 0: receive the answer
        xor     %ecx, %ecx
        mov     $RXBUF, %r8
        mov     $2048, %r9d
        mov     $2, %r10w               # WRITE
        xor     %r11w, %r11w
        call    desc
        xor     %ecx, %ecx
        call    submit
        cmp     $54, %eax               # header + an ARP packet at least
        jb      9f
        cmp     $-1, %eax
        je      9f
        cmpw    $0x0608, RXBUF+12+12    # EtherType ARP
        jne     9f
        cmpw    $0x0200, RXBUF+12+20    # opcode 2: a reply
        jne     9f
        cmpl    $0x0202000a, RXBUF+12+28 # sender: 10.0.2.2
        jne     9f
        lea     ok(%rip), %rsi
        call    puts
        jmp     reset
9:      lea     fail(%rip), %rsi
        call    puts
        jmp     reset
request:
        .fill   12, 1, 0                # virtio-net header
        .fill   6, 1, 0xff              # to: broadcast
        .byte   0x02, 0x6d, 0x6f, 0x61, 0x74, 0x64
        .byte   0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1
        .byte   0x02, 0x6d, 0x6f, 0x61, 0x74, 0x64
        .byte   10, 0, 2, 100
        .fill   6, 1, 0
        .byte   10, 0, 2, 2
ok:     .asciz  "arp reply from the gateway\n"
fail:   .asciz  "arp fail\n"
        .include "common.inc"
        .include "virtio.inc"
