# The L2 test guest: a multiboot v1 kernel (loaded by QEMU -kernel at 1 MiB)
# that runs the lab's checksum workload over all of its RAM, so that what
# happens to an L2's memory across a save/restore (or a vmbeam transfer of
# the window that is its RAM) shows in a header any level can read.
#
# Header at guest-physical 0x200000, little-endian dwords:
#   +0 magic "VML2"   +4 seed       +8 pass (in progress; passes before it
#   are complete)     +12 dwords    +16 checksum (sum of the dwords the last
#   complete pass verified)          +20 errors    +24 bad address
#   +28 bad value     +32 heartbeat (+1 every 64Ki dwords, fill or pass)
# Data: dwords from 0x201000 to the end of RAM (1 MiB + mem_upper KiB from
# the multiboot info, at most 0xA0000000).
#
# The algorithm is the lab's (userspace/vmbeam-lab/src/workload.S): dword i
# of pass p holds B(p) + i*K, B(p) = seed + p*M; pass 0 only fills, pass p
# verifies B(p-1)... and rewrites B(p)...; any byte lost, changed or moved
# is found by the next pass. The pass state lives in registers and in the
# header, so the workload goes on wherever its RAM and vCPU state go.
#
# A first boot (magic absent) writes the header and fills pass 0. A boot
# that finds the magic is a reboot over a live window (the L2 was started
# afresh instead of being restored): counted as an error with bad address
# 0xFFFFFFFF and bad value = the pass found, then halt. A changed dword:
# errors++, its address and value recorded, halt. No port I/O, no
# interrupts (every exit is expensive nested), no stack, no IDT.
.intel_syntax noprefix
.code32

.set HDR,        0x200000
.set DATA,       0x201000
.set RAM_LIMIT,  0xA0000000
.set MAGIC,      0x324c4d56          # "VML2"
.set K,          0x9E3779B9
.set M,          0x01000193
.set SEED_MIX,   0x5eed1e55
.set MB_MAGIC,   0x1BADB002
.set MB_FLAGS,   0x00000002          # bit 1: give mem_lower/mem_upper
.set MB_BOOTED,  0x2BADB002

.section .multiboot, "a"
.p2align 2
  .long MB_MAGIC
  .long MB_FLAGS
  .long -(MB_MAGIC + MB_FLAGS)

.text
.globl _start
_start:
  cli
  cld
  mov esi, HDR
  # End of RAM from the multiboot info (ebx), if it is there.
  mov edx, 16 << 20                  # fallback: 16 MiB
  cmp eax, MB_BOOTED
  jne 1f
  test dword ptr [ebx], 1            # flags bit 0: mem_* valid
  jz 1f
  mov edx, [ebx+8]                   # mem_upper, KiB above 1 MiB
  cmp edx, (RAM_LIMIT - 0x100000) >> 10
  jbe 2f
  mov edx, (RAM_LIMIT - 0x100000) >> 10
2:
  shl edx, 10
  add edx, 0x100000
1:
  sub edx, DATA
  shr edx, 2                         # edx = dwords
  cmp dword ptr [esi], MAGIC
  je rebooted

  # First boot: header, then pass 0 (fill).
  mov ecx, edx
  rdtsc                              # (clobbers edx)
  xor eax, SEED_MIX
  mov [esi+4], eax
  mov dword ptr [esi+8], 0
  mov [esi+12], ecx
  xor eax, eax
  mov [esi+16], eax
  mov [esi+20], eax
  mov [esi+24], eax
  mov [esi+28], eax
  mov [esi+32], eax
  mov dword ptr [esi], MAGIC
  mov ebx, [esi+4]
  mov edi, DATA
fill:
  mov [edi], ebx
  add ebx, K
  add edi, 4
  dec ecx
  jz filled
  test ecx, 0xFFFF
  jnz fill
  inc dword ptr [esi+32]
  jmp fill
filled:
  mov dword ptr [esi+8], 1

pass:
  mov ebx, [esi+8]
  dec ebx
  imul ebx, ebx, M
  add ebx, [esi+4]                   # ebx = B(p-1): what is there
  lea edx, [ebx+M]                   # edx = B(p): what goes there
  mov edi, DATA
  mov ecx, [esi+12]
  xor ebp, ebp
check:
  mov eax, [edi]
  cmp eax, ebx
  jne bad
  add ebp, eax
  mov [edi], edx
  add ebx, K
  add edx, K
  add edi, 4
  dec ecx
  jz passed
  test ecx, 0xFFFF
  jnz check
  inc dword ptr [esi+32]
  jmp check
passed:
  mov [esi+16], ebp
  inc dword ptr [esi+8]
  jmp pass

bad:
  inc dword ptr [esi+20]
  mov [esi+24], edi
  mov [esi+28], eax
  jmp halt

rebooted:
  inc dword ptr [esi+20]
  mov dword ptr [esi+24], 0xFFFFFFFF
  mov eax, [esi+8]
  mov [esi+28], eax
halt:
  hlt
  jmp halt
