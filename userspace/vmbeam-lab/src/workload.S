# The lab L2 workload, run by a lab L1's vCPU over one L2 window.
# Assembled bytes live in workload.rs; its unit test reassembles this file
# with llvm-mc and compares.
#
# Window layout (esi = window GPA): a header page, then `dwords` dwords of
# data. Header: +0 magic, +4 seed, +8 pass, +12 dwords, +16 checksum,
# +20 errors, +24 bad address, +28 bad value.
#
# Pass p verifies that dword i holds B(p-1) + i*K and rewrites it as
# B(p) + i*K, where B(p) = seed + p*M: any byte lost, changed or moved
# is found by the next pass. The pass count lives in the window, so the
# workload continues wherever its memory and registers go.
.intel_syntax noprefix
.code32
init:
  mov ebx, [esi+4]
  lea edi, [esi+4096]
  mov ecx, [esi+12]
fill:
  mov [edi], ebx
  add ebx, 0x9E3779B9
  add edi, 4
  dec ecx
  jnz fill
  mov dword ptr [esi+8], 1
  xor eax, eax
  out 0x10, eax
pass:
  mov ebx, [esi+8]
  dec ebx
  imul ebx, ebx, 0x01000193
  add ebx, [esi+4]
  lea edx, [ebx+0x01000193]
  lea edi, [esi+4096]
  mov ecx, [esi+12]
  xor ebp, ebp
check:
  mov eax, [edi]
  cmp eax, ebx
  jne bad
  add ebp, eax
  mov [edi], edx
  add ebx, 0x9E3779B9
  add edx, 0x9E3779B9
  add edi, 4
  dec ecx
  jnz check
  mov [esi+16], ebp
  mov eax, [esi+8]
  inc dword ptr [esi+8]
  out 0x10, eax
  jmp pass
bad:
  inc dword ptr [esi+20]
  mov [esi+24], edi
  mov [esi+28], eax
  mov eax, edi
  out 0x11, eax
  hlt
  jmp bad
resume:
  out 0x12, al
  hlt
probe:
  mov eax, [edi]
  out 0x13, eax
  hlt
