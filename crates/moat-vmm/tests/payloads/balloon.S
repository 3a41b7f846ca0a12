# Drives the virtio-balloon at 0xd0000000 as Linux's free page reporting
# does, on queue 2 (the reporting queue when neither statistics nor free
# page hints are offered): fills 2 MiB at 4 MiB and the page after with a
# pattern, reports the 2 MiB block free, then reports a block outside guest
# RAM. Prints "balloon used=<len> zero=<0|1> kept=<0|1> outside=<len>\n"
# (zero: the block's first and last words read 0 after the report; kept:
# the page after still holds the pattern) and resets.
        .code64
        .globl _start
_start:
        mov     $0xd0000000, %ebx
        mov     $5, %edi
        mov     $2, %ebp                # queue 2
        call    virtio_init
        test    %eax, %eax
        jz      1f
        mov     %al, fail+13(%rip)
        lea     fail(%rip), %rsi
        call    puts
        jmp     reset
1:      mov     $0x400000, %edi         # 2 MiB and a page of the pattern
        mov     $(0x201000 / 8), %ecx
        mov     $0x5a5a5a5a5a5a5a5a, %rax
        rep stosq
        xor     %ecx, %ecx              # desc 0: the 2 MiB block, WRITE
        mov     $0x400000, %r8
        mov     $0x200000, %r9d
        mov     $2, %r10w
        xor     %r11w, %r11w
        call    desc
        xor     %ecx, %ecx
        call    submit
        mov     %eax, %r12d
        mov     0x400000, %rax
        or      0x5ffff8, %rax
        setz    %r13b
        mov     $0x5a5a5a5a5a5a5a5a, %rax
        cmp     %rax, 0x600000
        sete    %r14b
        mov     $1, %ecx                # desc 1: 2 MiB at 64 GiB (no RAM there)
        mov     $0x1000000000, %r8
        mov     $0x200000, %r9d
        mov     $2, %r10w
        xor     %r11w, %r11w
        call    desc
        mov     $1, %ecx
        call    submit
        mov     %eax, %r15d
        lea     s_used(%rip), %rsi
        call    puts
        mov     %r12, %rbx
        mov     $2, %ecx
        call    hex
        lea     s_zero(%rip), %rsi
        call    puts
        movzbl  %r13b, %ebx
        mov     $1, %ecx
        call    hex
        lea     s_kept(%rip), %rsi
        call    puts
        movzbl  %r14b, %ebx
        mov     $1, %ecx
        call    hex
        lea     s_out(%rip), %rsi
        call    puts
        mov     %r15, %rbx
        mov     $2, %ecx
        call    hex
        lea     s_nl(%rip), %rsi
        call    puts
        jmp     reset
fail:   .asciz  "balloon fail  \n"
s_used: .asciz  "balloon used="
s_zero: .asciz  " zero="
s_kept: .asciz  " kept="
s_out:  .asciz  " outside="
s_nl:   .asciz  "\n"
        .include "common.inc"
        .include "virtio.inc"
