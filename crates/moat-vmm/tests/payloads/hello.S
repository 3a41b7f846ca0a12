# Writes a line to COM1, then resets the machine through the i8042.
        .code64
        .globl _start
_start:
        mov     $0x3f8, %dx
        lea     msg(%rip), %rsi
1:      lodsb
        test    %al, %al
        jz      2f
        out     %al, %dx
        jmp     1b
2:      mov     $0xfe, %al
        out     %al, $0x64
        cli
3:      hlt
        jmp     3b
msg:    .asciz  "hello from the guest\n"
