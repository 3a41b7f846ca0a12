# The network card: posts a 2 KiB receive buffer on queue 0 of the
# virtio-net device at 0xd0000000, waits for the host's frame, and
# transmits on queue 1 one frame: a zero virtio-net header, then
# "guest got: " and the header and frame it received. Then resets.
        .code64
        .globl _start
        .set    RXBUF, 0x320000
        .set    TXBUF, 0x321000
_start:
        mov     $0xd0000000, %ebx
        mov     $1, %edi
        call    virtio_init
        test    %eax, %eax
        jz      1f
        mov     %al, fail+9(%rip)
        lea     fail(%rip), %rsi
        call    puts
        jmp     reset
1:      xor     %ebp, %ebp              # queue 0: receive
        xor     %ecx, %ecx
        mov     $RXBUF, %r8
        mov     $2048, %r9d
        mov     $2, %r10w               # WRITE
        xor     %r11w, %r11w
        call    desc
        xor     %ecx, %ecx
        call    submit                  # returns when a frame came
        mov     %eax, %r12d             # header + frame
        cmp     $2048, %eax
        ja      reset                   # -1: nothing came
        mov     $TXBUF, %rdi            # TXBUF = zero header + prefix +
        xor     %eax, %eax              #   what came
        mov     $12, %ecx
        rep stosb
        lea     prefix(%rip), %rsi
        mov     $11, %ecx
        rep movsb
        mov     $RXBUF, %rsi
        mov     %r12d, %ecx
        rep movsb
        mov     $1, %ebp                # queue 1: transmit
        xor     %ecx, %ecx
        mov     $TXBUF, %r8
        lea     23(%r12), %r9d
        xor     %r10w, %r10w            # device-readable
        xor     %r11w, %r11w
        call    desc
        xor     %ecx, %ecx
        call    submit
        lea     done(%rip), %rsi
        call    puts
        jmp     reset
fail:   .asciz  "net fail  \n"
prefix: .ascii  "guest got: "
done:   .asciz  "net done\n"
        .include "common.inc"
        .include "virtio.inc"
