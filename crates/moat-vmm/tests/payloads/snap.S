# For the snapshot tests: sets state a snapshot must keep (a general
# register, an SSE register, memory, the stack), says "ready", then spins
# until the host sets the byte at GO (a restored guest carries on in this
# loop), and reports that state:
#   "done r13=<16 hex> mem=<16 hex> xmm=<16 hex><16 hex> stack=<4 hex> spun=<0|1>\n".
        .code64
        .globl _start
        .set    MEM, 0x200000
        .set    GO, 0x300000
        .set    XMM, 0x280000
_start:
        mov     %cr0, %rax              # SSE on: no x87 emulation, monitor coprocessor
        and     $~(1 << 2), %rax
        or      $(1 << 1), %rax
        mov     %rax, %cr0
        mov     %cr4, %rax              # OSFXSR, OSXMMEXCPT
        or      $((1 << 9) | (1 << 10)), %rax
        mov     %rax, %cr4
        movdqu  pattern(%rip), %xmm0
        mov     $0x1122334455667788, %r13
        mov     $0xcafef00d12345678, %rax
        mov     %rax, MEM
        pushq   $0x5eed
        lea     s_ready(%rip), %rsi
        call    puts
        xor     %r12, %r12
1:      inc     %r12
        pause
        cmpb    $0, GO
        je      1b
        lea     s_r13(%rip), %rsi
        call    puts
        mov     %r13, %rbx
        mov     $16, %ecx
        call    hex
        lea     s_mem(%rip), %rsi
        call    puts
        mov     MEM, %rbx
        mov     $16, %ecx
        call    hex
        lea     s_xmm(%rip), %rsi
        call    puts
        movdqu  %xmm0, XMM
        mov     XMM + 8, %rbx
        mov     $16, %ecx
        call    hex
        mov     XMM, %rbx
        mov     $16, %ecx
        call    hex
        lea     s_stack(%rip), %rsi
        call    puts
        pop     %rbx
        mov     $4, %ecx
        call    hex
        lea     s_spun(%rip), %rsi
        call    puts
        xor     %ebx, %ebx
        test    %r12, %r12
        setnz   %bl
        mov     $1, %ecx
        call    hex
        lea     s_nl(%rip), %rsi
        call    puts
        jmp     reset
        .balign 16
pattern: .quad  0x0123456789abcdef, 0xfedcba9876543210
s_ready: .asciz "ready\n"
s_r13:  .asciz  "done r13="
s_mem:  .asciz  " mem="
s_xmm:  .asciz  " xmm="
s_stack: .asciz " stack="
s_spun: .asciz  " spun="
s_nl:   .asciz  "\n"
        .include "common.inc"
