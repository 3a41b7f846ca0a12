# For the snapshot tests, on every vCPU at once: each takes a stack of its
# own and a register value of its own (r13 = 0x11223344556677<APIC id>),
# counts itself in and spins until the host sets the byte at GO; vCPU 0
# says "ready" once all have counted in. After GO they report in APIC-id
# order, "cpu<id> r13=<16 hex> spun=<0|1>\n", and vCPU 0 resets once all
# have; the others halt.
        .code64
        .globl _start
        .set    GO, 0x300000
        .set    READY, 0x310000
        .set    TURN, 0x310040
_start:
        mov     $1, %eax
        cpuid
        mov     %ebx, %r14d
        shr     $24, %r14d              # APIC id
        shr     $16, %ebx
        and     $0xff, %ebx
        mov     %ebx, %r15d             # vCPU count
        mov     %r14, %rax
        shl     $12, %rax
        add     $0x401000, %rax         # a stack per vCPU
        mov     %rax, %rsp
        mov     $0x1122334455667700, %r13
        or      %r14, %r13
        lock incl READY
        test    %r14d, %r14d
        jnz     2f
1:      pause
        cmp     READY, %r15d
        jne     1b
        lea     s_ready(%rip), %rsi
        call    puts
2:      xor     %r12, %r12
3:      inc     %r12
        pause
        cmpb    $0, GO
        je      3b
4:      pause
        cmp     TURN, %r14d
        jne     4b
        lea     s_cpu(%rip), %rsi
        call    puts
        mov     %r14, %rbx
        mov     $1, %ecx
        call    hex
        lea     s_r13(%rip), %rsi
        call    puts
        mov     %r13, %rbx
        mov     $16, %ecx
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
        lock incl TURN
        test    %r14d, %r14d
        jnz     park
5:      pause
        cmp     TURN, %r15d
        jne     5b
        jmp     reset
park:   cli
6:      hlt
        jmp     6b
s_ready: .asciz "ready\n"
s_cpu:  .asciz  "cpu"
s_r13:  .asciz  " r13="
s_spun: .asciz  " spun="
s_nl:   .asciz  "\n"
        .include "common.inc"
