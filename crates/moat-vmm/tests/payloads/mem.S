# Reports guest RAM as the zero page's e820 map describes it, then checks
# that the last qword below that end holds what is stored there and what the
# byte just past it reads as:  "end=<16 hex digits> rw=ok past=<2 hex digits>\n".
        .code64
        .globl _start
_start:
        mov     %rsi, %r12              # zero page
        movzbl  0x1e8(%r12), %ecx       # e820_entries
        lea     0x2d0(%r12), %rdi       # e820_table, 20-byte entries
        xor     %r13, %r13              # highest RAM end
1:      test    %ecx, %ecx
        jz      3f
        cmpl    $1, 16(%rdi)
        jne     2f
        mov     (%rdi), %rax
        add     8(%rdi), %rax
        cmp     %r13, %rax
        jbe     2f
        mov     %rax, %r13
2:      add     $20, %rdi
        dec     %ecx
        jmp     1b
3:      lea     s_end(%rip), %rsi
        call    puts
        mov     %r13, %rbx
        mov     $16, %ecx
        call    hex
        mov     $0x5a5aa5a5deadbeef, %rax
        mov     %rax, -8(%r13)
        mov     -8(%r13), %rbx
        lea     s_ok(%rip), %rsi
        cmp     %rax, %rbx
        je      4f
        lea     s_bad(%rip), %rsi
4:      call    puts
        movzbl  (%r13), %ebx
        mov     $2, %ecx
        call    hex
        lea     s_nl(%rip), %rsi
        call    puts
        jmp     reset
s_end:  .asciz  "end="
s_ok:   .asciz  " rw=ok past="
s_bad:  .asciz  " rw=bad past="
s_nl:   .asciz  "\n"
        .include "common.inc"
