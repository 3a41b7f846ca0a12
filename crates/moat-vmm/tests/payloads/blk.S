# Drives the virtio-blk device at 0xd0000000: reads sector 1 and prints its
# first 16 bytes, then writes "written by guest" to sector 2, then asks to
# read sector <capacity> (one past the end). Prints
# "blk read=<status> <16 chars> write=<status> past=<status>\n" and resets.
        .code64
        .globl _start
        .set    HDR,    0x304000
        .set    DATA,   0x305000
        .set    STATUS, 0x306000
        .set    SAVE,   0x307000
_start:
        mov     $0xd0000000, %ebx
        mov     $2, %edi
        xor     %ebp, %ebp              # queue 0
        call    virtio_init
        test    %eax, %eax
        jz      1f
        mov     %al, fail+9(%rip)
        lea     fail(%rip), %rsi
        call    puts
        jmp     reset
1:      movl    $0, HDR                 # VIRTIO_BLK_T_IN
        movq    $1, HDR+8               # sector 1
        call    request3
        mov     %eax, %r12d             # status of the read
        mov     DATA, %rax              # keep what was read
        mov     %rax, SAVE
        mov     DATA+8, %rax
        mov     %rax, SAVE+8
        movb    $0, SAVE+16
        movl    $1, HDR                 # VIRTIO_BLK_T_OUT
        movq    $2, HDR+8
        lea     msg(%rip), %rsi
        mov     $DATA, %rdi
        mov     $16, %ecx
        rep movsb
        call    request_out
        mov     %eax, %r13d
        movl    $0, HDR
        mov     0x100(%rbx), %rax       # config: capacity in sectors
        mov     %rax, HDR+8
        call    request3
        mov     %eax, %r14d
        lea     s_read(%rip), %rsi
        call    puts
        mov     %r12, %rbx
        mov     $1, %ecx
        call    hex
        mov     $0x3f8, %dx             # 16 bytes of sector 1, as read
        mov     $SAVE, %rsi
        mov     $' ', %al
        out     %al, %dx
        call    puts
        lea     s_write(%rip), %rsi
        call    puts
        mov     %r13, %rbx
        mov     $1, %ecx
        call    hex
        lea     s_past(%rip), %rsi
        call    puts
        mov     %r14, %rbx
        mov     $1, %ecx
        call    hex
        lea     s_nl(%rip), %rsi
        call    puts
        jmp     reset

# request3: header, 512-byte writable data, status. Returns the status byte.
request3:
        movb    $0xff, STATUS
        xor     %ecx, %ecx
        mov     $HDR, %r8
        mov     $16, %r9d
        mov     $1, %r10w               # NEXT
        mov     $1, %r11w
        call    desc
        mov     $1, %ecx
        mov     $DATA, %r8
        mov     $512, %r9d
        mov     $3, %r10w               # NEXT | WRITE
        mov     $2, %r11w
        call    desc
        jmp     status_desc

# request_out: header, 512 readable data bytes, status.
request_out:
        movb    $0xff, STATUS
        xor     %ecx, %ecx
        mov     $HDR, %r8
        mov     $16, %r9d
        mov     $1, %r10w
        mov     $1, %r11w
        call    desc
        mov     $1, %ecx
        mov     $DATA, %r8
        mov     $512, %r9d
        mov     $1, %r10w               # NEXT, device-readable
        mov     $2, %r11w
        call    desc
status_desc:
        mov     $2, %ecx
        mov     $STATUS, %r8
        mov     $1, %r9d
        mov     $2, %r10w               # WRITE
        xor     %r11w, %r11w
        call    desc
        xor     %ecx, %ecx
        push    %rbx
        call    submit
        pop     %rbx
        movzbl  STATUS, %eax
        ret

fail:   .asciz  "blk fail  \n"
msg:    .ascii  "written by guest"
s_read: .asciz  "blk read="
s_write: .asciz " write="
s_past: .asciz  " past="
s_nl:   .asciz  "\n"
        .include "common.inc"
        .include "virtio.inc"
