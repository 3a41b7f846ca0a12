# Drives the virtio-fs device at 0xd0000000 (its queues served by a
# virtiofsd, not the VMM) as a FUSE client on the request queue (1):
# FUSE_INIT 7.31, then FUSE_MKDIR "payload-dir" in the root (node 1).
# Prints "fs init=<error> major=<major> mkdir=<error> len=<used len>\n"
# (errors as 8 hex digits, 0 for success) and resets.
        .code64
        .globl _start
        .set    IN1,  0x304000
        .set    OUT1, 0x305000
        .set    IN2,  0x306000
        .set    OUT2, 0x307000
_start:
        mov     $0xd0000000, %ebx
        mov     $26, %edi
        call    virtio_init
        test    %eax, %eax
        jz      1f
        mov     %al, fail+9(%rip)
        lea     fail(%rip), %rsi
        call    puts
        jmp     reset
1:      mov     $1, %ebp                # the request queue
        movl    $56, IN1                # fuse_in_header.len
        movl    $26, IN1+4              # FUSE_INIT
        movq    $1, IN1+8               # unique
        movq    $0, IN1+16              # nodeid
        movl    $7, IN1+40              # fuse_init_in: major 7
        movl    $31, IN1+44             #   minor 31
        xor     %ecx, %ecx              # desc 0: the request
        mov     $IN1, %r8
        mov     $56, %r9d
        mov     $1, %r10w               # NEXT
        mov     $1, %r11w
        call    desc
        mov     $1, %ecx                # desc 1: room for the answer
        mov     $OUT1, %r8
        mov     $80, %r9d
        mov     $2, %r10w               # WRITE
        xor     %r11w, %r11w
        call    desc
        xor     %ecx, %ecx
        call    submit
        movl    $60, IN2                # fuse_in_header.len
        movl    $9, IN2+4               # FUSE_MKDIR
        movq    $2, IN2+8               # unique
        movq    $1, IN2+16              # nodeid: the root
        movl    $0755, IN2+40           # fuse_mkdir_in: mode
        movl    $0, IN2+44              #   umask
        lea     name(%rip), %rsi
        mov     $IN2+48, %rdi
        mov     $12, %ecx
        rep movsb
        mov     $2, %ecx                # desc 2: the request
        mov     $IN2, %r8
        mov     $60, %r9d
        mov     $1, %r10w
        mov     $3, %r11w
        call    desc
        mov     $3, %ecx                # desc 3: room for the answer
        mov     $OUT2, %r8
        mov     $144, %r9d
        mov     $2, %r10w
        xor     %r11w, %r11w
        call    desc
        mov     $2, %ecx
        call    submit
        mov     %eax, %r12d
        lea     s_init(%rip), %rsi
        call    puts
        mov     OUT1+4, %ebx
        mov     $8, %ecx
        call    hex
        lea     s_major(%rip), %rsi
        call    puts
        mov     OUT1+16, %ebx
        mov     $2, %ecx
        call    hex
        lea     s_mkdir(%rip), %rsi
        call    puts
        mov     OUT2+4, %ebx
        mov     $8, %ecx
        call    hex
        lea     s_len(%rip), %rsi
        call    puts
        mov     %r12, %rbx
        mov     $2, %ecx
        call    hex
        lea     s_nl(%rip), %rsi
        call    puts
        jmp     reset
fail:    .asciz  "fs fail  \n"
name:    .asciz  "payload-dir"
s_init:  .asciz  "fs init="
s_major: .asciz  " major="
s_mkdir: .asciz  " mkdir="
s_len:   .asciz  " len="
s_nl:    .asciz  "\n"
        .include "common.inc"
        .include "virtio.inc"
