# The agent channel: posts a 64-byte receive buffer on queue 0 of the
# virtio console at 0xd0000000, waits for the host's bytes, and sends back
# "guest got: " followed by them on queue 1. Then resets.
        .code64
        .globl _start
        .set    RXBUF, 0x320000
        .set    TXBUF, 0x321000
_start:
        mov     $0xd0000000, %ebx
        mov     $3, %edi
        call    virtio_init
        test    %eax, %eax
        jz      1f
        mov     %al, fail+13(%rip)
        lea     fail(%rip), %rsi
        call    puts
        jmp     reset
1:      xor     %ebp, %ebp              # queue 0: receive
        xor     %ecx, %ecx
        mov     $RXBUF, %r8
        mov     $64, %r9d
        mov     $2, %r10w               # WRITE
        xor     %r11w, %r11w
        call    desc
        xor     %ecx, %ecx
        call    submit                  # returns when the host has sent
        mov     %eax, %r12d             # bytes received
        cmp     $64, %eax
        ja      reset                   # -1: nothing came
        lea     prefix(%rip), %rsi      # TXBUF = prefix + received bytes
        mov     $TXBUF, %rdi
        mov     $11, %ecx
        rep movsb
        mov     $RXBUF, %rsi
        mov     %r12d, %ecx
        rep movsb
        mov     $1, %ebp                # queue 1: transmit
        xor     %ecx, %ecx
        mov     $TXBUF, %r8
        lea     11(%r12), %r9d
        xor     %r10w, %r10w            # device-readable
        xor     %r11w, %r11w
        call    desc
        xor     %ecx, %ecx
        call    submit
        lea     done(%rip), %rsi
        call    puts
        jmp     reset
fail:   .asciz  "console fail  \n"
prefix: .ascii  "guest got: "
done:   .asciz  "console done\n"
        .include "common.inc"
        .include "virtio.inc"
