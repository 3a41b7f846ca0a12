# Run by every vCPU at once. Each writes its initial APIC id (CPUID.1:EBX[31:24])
# as one character '0'+id to COM1 and counts itself in; vCPU 0 waits until the
# count reaches the logical-processor count CPUID reports (EBX[23:16]), writes a
# newline and resets. The others halt.
        .code64
        .globl _start
_start:
        mov     $1, %eax
        cpuid
        mov     %ebx, %edi
        shr     $24, %edi               # APIC id
        shr     $16, %ebx
        and     $0xff, %ebx             # vCPU count
        mov     %edi, %eax
        add     $'0', %al
        mov     $0x3f8, %dx
        out     %al, %dx
        lock incl count(%rip)
        test    %edi, %edi
        jnz     park
1:      pause
        cmp     count(%rip), %ebx
        jne     1b
        mov     $'\n', %al
        out     %al, %dx
        mov     $0xfe, %al
        out     %al, $0x64
park:   cli
2:      hlt
        jmp     2b
        .balign 4
count:  .long   0
