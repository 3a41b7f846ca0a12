# Drives the virtio-rng device at 0xd0000000 through queue 0: one good
# request for 32 bytes, then two a hostile driver would send: a descriptor
# that chains to itself, and one whose buffer lies outside guest RAM. Prints
# "rng len=<hex> nonzero=<0|1> loop=<len> outside=<len>\n" and resets.
        .code64
        .globl _start
_start:
        mov     $0xd0000000, %ebx
        mov     $4, %edi
        xor     %ebp, %ebp              # queue 0
        call    virtio_init
        test    %eax, %eax
        jz      1f
        mov     %al, fail+9(%rip)
        lea     fail(%rip), %rsi
        call    puts
        jmp     reset
1:      xor     %ecx, %ecx              # desc 0: 32 writable bytes at 0x303000
        mov     $0x303000, %r8
        mov     $32, %r9d
        mov     $2, %r10w               # WRITE
        xor     %r11w, %r11w
        call    desc
        xor     %ecx, %ecx
        call    submit
        mov     %eax, %r12d
        mov     0x303000, %rax
        or      0x303008, %rax
        or      0x303010, %rax
        or      0x303018, %rax
        setnz   %r13b
        mov     $1, %ecx                # desc 1: NEXT | WRITE, next = 1 (itself)
        mov     $0x304000, %r8
        mov     $16, %r9d
        mov     $3, %r10w
        mov     $1, %r11w
        call    desc
        mov     $1, %ecx
        call    submit
        mov     %eax, %r14d
        mov     $2, %ecx                # desc 2: 4 KiB at 64 GiB (no RAM there)
        mov     $0x1000000000, %r8
        mov     $4096, %r9d
        mov     $2, %r10w
        xor     %r11w, %r11w
        call    desc
        mov     $2, %ecx
        call    submit
        mov     %eax, %r15d
        lea     s_len(%rip), %rsi
        call    puts
        mov     %r12, %rbx
        mov     $2, %ecx
        call    hex
        lea     s_nz(%rip), %rsi
        call    puts
        movzbl  %r13b, %ebx
        mov     $1, %ecx
        call    hex
        lea     s_loop(%rip), %rsi
        call    puts
        mov     %r14, %rbx
        mov     $2, %ecx
        call    hex
        lea     s_out(%rip), %rsi
        call    puts
        mov     %r15, %rbx
        mov     $2, %ecx
        call    hex
        lea     s_nl(%rip), %rsi
        call    puts
        jmp     reset
fail:   .asciz  "rng fail  \n"
s_len:  .asciz  "rng len="
s_nz:   .asciz  " nonzero="
s_loop: .asciz  " loop="
s_out:  .asciz  " outside="
s_nl:   .asciz  "\n"
        .include "common.inc"
        .include "virtio.inc"
