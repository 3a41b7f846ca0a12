#!/bin/sh
# Regenerates the *.bin guest payloads from their *.S sources (GNU as, 64-bit,
# flat binary loaded at 0x100000). The .bin files are committed so the tests
# need no assembler; run this after editing a .S file.
set -eu
cd "$(dirname "$0")"
for s in *.S; do
    b=${s%.S}
    as --64 -o "/tmp/$b.o" "$s"
    ld -Ttext=0x100000 --oformat=binary -o "$b.bin" "/tmp/$b.o"
    rm -f "/tmp/$b.o"
done
