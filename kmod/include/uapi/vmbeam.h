/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * vmbeam: zero-copy ownership transfer of KVM guest memory.
 *
 * The one definition of the userspace ABI of /dev/vmbeam. The module and the
 * userspace crates both take their types and ioctl numbers from this file
 * (through bindgen); nothing retypes it.
 *
 * Every ioctl argument is a struct with a `flags` word and `reserved` words:
 * unknown flags or nonzero reserved words get -EINVAL, so later versions can
 * give them meaning. A command whose _IOC_SIZE differs from the struct below
 * gets -EINVAL; an unknown command gets -ENOTTY.
 */
#ifndef _UAPI_LINUX_VMBEAM_H
#define _UAPI_LINUX_VMBEAM_H

#include <linux/ioctl.h>
#include <linux/types.h>

/* Free in Documentation/userspace-api/ioctl/ioctl-number.rst (6.12). */
#define VMBEAM_IOC_MAGIC 0xBE

/*
 * Bumped on any change of this file. 2: region fds reopen through
 * /proc/PID/fd/N, VMBEAM_BIND, empty regions, VMBEAM_GATHER_INTO.
 * 3: a refused transfer is invisible to faults and mmaps; a fault or mmap
 * that meets a move waits for its outcome (see struct vmbeam_transfer).
 * 4: VMBEAM_CREATE_HUGE. 5: VMBEAM_BIND_PROCESS (a region owned by a
 * process), VMBEAM_GATHER_REPLACE. 6: VMBEAM_GATHER_SCATTER; a gather may
 * zap the source's mappings of pages that stay (see struct vmbeam_gather).
 * 7: VMBEAM_REGION_HUGE in VMBEAM_REGION_INFO, VMBEAM_REGION_FRAMES,
 * VMBEAM_GATHER_RUNS. 8: VMBEAM_CREATE_HUGE_1G, VMBEAM_REGION_HUGE_1G,
 * VMBEAM_FRAME_HUGE_1G.
 */
#define VMBEAM_API_VERSION 8

/**
 * struct vmbeam_version - VMBEAM_GET_VERSION
 * @api_version: out: VMBEAM_API_VERSION of the running module.
 * @flags:       in: must be 0.
 * @reserved:    in: must be 0.
 */
struct vmbeam_version {
	__u32 api_version;
	__u32 flags;
	__u64 reserved[3];
};

/**
 * struct vmbeam_stats - VMBEAM_GET_STATS: module-wide counters.
 * @flags:             in: must be 0.
 * @pad:               in: must be 0.
 * @regions:           out: regions alive now.
 * @pages_owned:       out: pages held by those regions.
 * @transfers:         out: ownership transfers done (one per region moved).
 * @pages_transferred: out: pages whose owner changed through a transfer.
 * @revocations:       out: times an old owner's mappings were torn down.
 * @bytes_copied:      out: guest bytes the module copied. Every vmbeam path
 *                     is zero-copy, so this stays 0; it is here to prove it.
 * @reserved:          in: must be 0.
 */
struct vmbeam_stats {
	__u32 flags;
	__u32 pad;
	__u64 regions;
	__u64 pages_owned;
	__u64 transfers;
	__u64 pages_transferred;
	__u64 revocations;
	__u64 bytes_copied;
	__u64 reserved[4];
};

/**
 * struct vmbeam_region_create - VMBEAM_CREATE_REGION (on /dev/vmbeam).
 * @size:     in: bytes, a nonzero multiple of the page size. The module
 *            allocates and zeroes the pages, charged to the caller's memcg.
 * @flags:    in: 0, or VMBEAM_CREATE_EMPTY and/or VMBEAM_CREATE_HUGE or
 *            VMBEAM_CREATE_HUGE_1G.
 * @pad:      in: must be 0.
 * @reserved: in: must be 0.
 *
 * Returns a new region fd (O_CLOEXEC). The region has no owner until
 * VMBEAM_REGION_BIND or VMBEAM_BIND; it is freed when its last fd and
 * mapping go.
 *
 * VMBEAM_CREATE_EMPTY: no page is allocated; every page is missing until
 * VMBEAM_GATHER_INTO moves one in. The owner may map the region at once
 * (a VMM plugs it in ahead of time, out of a migration's downtime), but
 * touching a missing page gets SIGBUS (KVM_RUN: -EFAULT): its VMM must not
 * touch a page before it arrives.
 *
 * VMBEAM_CREATE_HUGE (since version 4): the pages come in naturally
 * aligned 2 MiB blocks where the allocator has them (4 KiB pages for the
 * rest), and mappings of the region map a whole block with one PMD where
 * the mapping is 2 MiB-aligned (mmap picks such an address for 2 MiB and
 * more), so KVM maps it with one 2 MiB stage-2 entry and a revocation zaps
 * one entry per 2 MiB. The mappings are PFNMAP: the pages are not
 * reachable by GUP (O_DIRECT into them, vhost, process_vm_readv,
 * /proc/PID/mem fail with -EFAULT/-EIO); KVM and the VMM's own loads and
 * stores are not affected. Without the flag, mappings are 4 KiB and GUP
 * works.
 *
 * VMBEAM_CREATE_HUGE_1G (since version 8): as
 * VMBEAM_CREATE_HUGE, and each whole 1 GiB of the region is first tried
 * as one naturally aligned 1 GiB of physical memory: from the module's
 * pool (the gigantic_pool=N module parameter takes N GiBs at load, while
 * memory is least fragmented; a region gives back each GiB it still holds
 * whole), else sought with alloc_contig_range() (movable pages in the way
 * are migrated out); where none can be had, 2 MiB blocks, then 4 KiB
 * pages.
 * Mappings that are 1 GiB-aligned (mmap picks such an address for 1 GiB
 * and more) map such a block with one PUD, and KVM with one 1 GiB stage-2
 * entry, so a revocation zaps one entry per GiB (a revocation of part of
 * a GiB, as a gather's, zaps the whole GiB's mappings; the owner faults
 * the rest back in). Such blocks are not charged to the caller's memcg,
 * as hugetlb's gigantic pages are not (only holders of /dev/vmbeam,
 * CAP_SYS_ADMIN at open, create regions); allocation takes longer than
 * from the free lists (migration, and zeroing a GiB at a time).
 *
 * Every open file of a region is the region: opening /proc/PID/fd/N of a
 * region fd (as QEMU's memory-backend-file mem-path= does) gives another
 * fd of the same region, with the same owner rule for mmap. The region
 * lives while any of them, or a mapping, does.
 * -EINVAL: size 0 or not page aligned; -ENOMEM: more than the machine has,
 * or the allocation failed; -EINTR: a fatal signal during allocation.
 */
#define VMBEAM_CREATE_EMPTY (1U << 0)
#define VMBEAM_CREATE_HUGE (1U << 1)
#define VMBEAM_CREATE_HUGE_1G (1U << 2)

struct vmbeam_region_create {
	__u64 size;
	__u32 flags;
	__u32 pad;
	__u64 reserved[2];
};

/* struct vmbeam_region_bind flags. */
#define VMBEAM_BIND_PROCESS (1U << 0) /* owner: the calling process (since 5) */

/**
 * struct vmbeam_region_bind - VMBEAM_REGION_BIND (on a region fd).
 * @vm_fd:    in: a KVM VM fd created by the calling process; with
 *            VMBEAM_BIND_PROCESS, must be -1.
 * @flags:    in: 0 or VMBEAM_BIND_PROCESS.
 * @reserved: in: must be 0.
 *
 * Makes the VM the region's owner: then only the VM's creator process may
 * mmap the region (MAP_SHARED) and its faults map the region's own pages.
 * -EINVAL: not a KVM VM fd; -EPERM: the caller did not create that VM
 * (VMBEAM_BIND on /dev/vmbeam binds to any VM); -EBUSY: the region has a
 * live owner (use VMBEAM_TRANSFER) or is moving. A region whose owner's
 * process has exited is ownerless again and may be bound.
 *
 * VMBEAM_BIND_PROCESS (since version 5): the owner is the calling process
 * itself (its thread group, by its pid), not a VM. This is for a VMM that
 * maps its whole RAM at start-up, before it has a VM to name: a launcher
 * binds the region (its fd not O_CLOEXEC), then execve()s the VMM, which
 * opens /proc/self/fd/N and maps it. The owner survives execve (same
 * pid). Only a task of that process, through the process's current
 * address space, may mmap the region or fault its pages in (so KVM maps
 * it for that process's VMs); anyone else gets -EACCES on mmap and SIGBUS
 * on a fault, as for a VM owner. The owner lives while a task of the
 * process has not exited (a zombie has exited); then the region is
 * ownerless and may be bound again, to a VM or a process.
 * VMBEAM_REGION_INFO says OWNED while it lives, MINE to that process.
 * A process-owned region cannot be transferred (VMBEAM_TRANSFER names
 * its owner VM: -EPERM); it is a source of VMBEAM_GATHER. Binding it to a
 * VM the owner process created (VMBEAM_BIND, or VMBEAM_REGION_BIND from
 * that process; the VM's mm is the process's current mm) is allowed while
 * the process lives and makes that VM the owner (its mappings stay: the
 * same address space); any other bind gets -EBUSY.
 * -EINVAL: vm_fd is not -1, or an unknown flag.
 */
struct vmbeam_region_bind {
	__s32 vm_fd;
	__u32 flags;
	__u64 reserved[2];
};

/**
 * struct vmbeam_bind - VMBEAM_BIND (on /dev/vmbeam).
 * @region_fd: in: the region.
 * @vm_fd:     in: a KVM VM fd of any process (vmbeamctl takes QEMU's with
 *             pidfd_getfd(2)): QEMU creates its VM itself.
 * @flags:     in: must be 0.
 * @pad:       in: must be 0.
 * @reserved:  in: must be 0.
 *
 * VMBEAM_REGION_BIND without the creator check, for the holder of
 * /dev/vmbeam (CAP_SYS_ADMIN): the VM's creator process may then mmap the
 * region. -EBADF, -EINVAL (not a region / not a KVM VM fd), -EBUSY as for
 * VMBEAM_REGION_BIND. A region owned by a live process (VMBEAM_BIND_PROCESS)
 * binds to a VM that process created (since version 5): -EBUSY for any
 * other VM.
 */
struct vmbeam_bind {
	__s32 region_fd;
	__s32 vm_fd;
	__u32 flags;
	__u32 pad;
	__u64 reserved[2];
};

/* struct vmbeam_region_info flags (out). */
#define VMBEAM_REGION_OWNED	(1U << 0) /* bound to a VM whose process runs, or to a running process */
#define VMBEAM_REGION_MOVING	(1U << 1) /* a transfer is between its phases */
#define VMBEAM_REGION_MINE	(1U << 2) /* owned by a VM of the calling process, or by it */
#define VMBEAM_REGION_HUGE	(1U << 3) /* made with VMBEAM_CREATE_HUGE: PFNMAP mappings (since 7) */
#define VMBEAM_REGION_HUGE_1G	(1U << 4) /* made with VMBEAM_CREATE_HUGE_1G (also HUGE; since 8) */

/**
 * struct vmbeam_region_info - VMBEAM_REGION_INFO (on a region fd).
 * @flags:   in: must be 0.
 * @state:   out: VMBEAM_REGION_* flags.
 * @size:    out: bytes.
 * @pages_present: out: pages the region holds (size / page size less the
 *           pages gathered away into other regions).
 * @reserved: in: must be 0.
 */
struct vmbeam_region_info {
	__u32 flags;
	__u32 state;
	__u64 size;
	__u64 pages_present;
	__u64 reserved[3];
};

/**
 * struct vmbeam_transfer - one ownership transfer.
 * @region_fd:  in: the region.
 * @from_vm_fd: in: a fd of the region's current owner VM (the proof that
 *              the caller may take the region from it).
 * @to_vm_fd:   in: a fd of the new owner VM (any process's: VM fds and
 *              region fds travel over SCM_RIGHTS).
 * @flags:      in: must be 0.
 * @reserved:   in: must be 0.
 *
 * The old owner's mappings are zapped (its VMM then gets SIGBUS, its
 * KVM_RUN -EFAULT, its mmap -EACCES); the new owner's creator process mmaps
 * the region and faults in the same pages. Nothing is copied.
 *
 * The rule for faults and mmaps: a transfer that is refused is invisible
 * (no fault fails and no mmap is refused because of it, whatever entry of
 * the batch was bad). A fault or mmap that meets a region in the middle
 * of a transfer that goes through waits for it, then behaves as after it:
 * the new owner maps, the old owner gets SIGBUS / -EFAULT / -EACCES.
 */
struct vmbeam_transfer {
	__s32 region_fd;
	__s32 from_vm_fd;
	__s32 to_vm_fd;
	__u32 flags;
	__u64 reserved[2];
};

/* Most entries in one VMBEAM_TRANSFER_BATCH. */
#define VMBEAM_TRANSFER_BATCH_MAX 4096

/**
 * struct vmbeam_transfer_batch - VMBEAM_TRANSFER_BATCH (on /dev/vmbeam).
 * @transfers: in: user pointer to @count struct vmbeam_transfer.
 * @count:     in: 1 .. VMBEAM_TRANSFER_BATCH_MAX.
 * @flags:     in: must be 0.
 * @reserved:  in: must be 0.
 *
 * All or nothing: every entry is checked before any region is touched,
 * then every region is marked moving, then one revoke phase, one grant
 * phase. If any entry fails, no region changes owner or loses a mapping,
 * and no fault or mmap of any region in the batch fails meanwhile.
 * -EBADF: a fd is not open; -EINVAL: not a region / not a KVM VM fd /
 * from == to; -EPERM: from_vm_fd is not the region's owner (nor is any VM
 * the owner of a region owned by a process: VMBEAM_BIND_PROCESS); -EBUSY:
 * a region is already moving (another transfer, or twice in this batch).
 */
struct vmbeam_transfer_batch {
	__u64 transfers;
	__u32 count;
	__u32 flags;
	__u64 reserved[2];
};

/* Most page offsets in one VMBEAM_GATHER. */
#define VMBEAM_GATHER_MAX (1U << 20)

/* struct vmbeam_gather flags. */
#define VMBEAM_GATHER_INTO (1U << 0) /* into @dst_fd's missing pages */
#define VMBEAM_GATHER_REPLACE (1U << 1) /* fresh zeroed pages fill the source's holes (since 5) */
#define VMBEAM_GATHER_SCATTER (1U << 2) /* with _INTO: @offsets name destination slots (since 6) */
#define VMBEAM_GATHER_RUNS (1U << 3) /* @offsets holds {offset, pages} runs (since 7) */

/**
 * struct vmbeam_gather - VMBEAM_GATHER (on /dev/vmbeam).
 * @offsets:    in: user pointer to @count __u64 byte offsets into the
 *              source (with VMBEAM_GATHER_SCATTER: into the destination),
 *              each page aligned, all distinct.
 * @count:      in: 1 .. VMBEAM_GATHER_MAX (offsets, or runs with
 *              VMBEAM_GATHER_RUNS).
 * @src_fd:     in: the source region fd.
 * @flags:      in: 0, or VMBEAM_GATHER_INTO and/or VMBEAM_GATHER_REPLACE
 *              and/or VMBEAM_GATHER_RUNS, or VMBEAM_GATHER_INTO |
 *              VMBEAM_GATHER_SCATTER.
 * @dst_fd:     in: with VMBEAM_GATHER_INTO, the destination region fd;
 *              otherwise must be 0.
 * @pad:        in: must be 0.
 * @dst_offset: in: with VMBEAM_GATHER_INTO, the byte offset in the
 *              destination of the first page (page aligned); otherwise 0.
 *              With VMBEAM_GATHER_SCATTER, must be 0.
 *
 * Without flags: returns a new, ownerless region fd whose page i is the
 * source's page at offsets[i]. With VMBEAM_GATHER_INTO: the source's page
 * at offsets[i] becomes page dst_offset / page size + i of an existing
 * region, whose slots there must be missing (an empty region, or pages
 * gathered away before); returns 0. The destination keeps its owner and
 * its mappings: its owner faults the arrived pages in. This is how a
 * migration moves an L2's memory into a window the clean L1 plugged in
 * ahead of time, and back.
 *
 * Either way the pages move, their bytes do not. The source loses exactly
 * those pages (its mappings of them are zapped; touching them again gets
 * SIGBUS, KVM_RUN -EFAULT); the rest of the source keeps its pages and
 * bytes. Every check is made before a page moves: an error moves nothing.
 *
 * The zap (since version 6): to zap scattered pages in few calls, one call
 * may span the pages that stay between two moved ones, so those lose
 * their mappings too, and the owner's next touch faults them back in (the
 * same pages; KVM maps them again). The rule: the shortest such gaps
 * first, none longer than 2 MiB, and their pages add up to at most @count.
 * Only mappings go, never a page that stays or its bytes: a VMM must not
 * count on a page that stays being mapped after a gather, only on its
 * being there.
 *
 * VMBEAM_GATHER_SCATTER (since version 6; only with VMBEAM_GATHER_INTO,
 * @dst_offset 0): the other direction. The pages that move are the
 * source's first @count pages (its bytes 0 .. @count pages), and page i
 * goes to the destination's slot at offsets[i], which must be missing
 * there. In one call, this refills the holes a gather left with a fresh
 * region's pages, or moves a window's pages back to their scattered slots
 * in a rollback. The same guarantees as VMBEAM_GATHER_INTO: every check
 * before a page moves, the source's mappings of those pages zapped, the
 * destination keeps its owner and its mappings. Not with
 * VMBEAM_GATHER_REPLACE (the source of a scatter, a fresh region or a
 * window given back, is dropped afterwards: fresh pages there would be
 * wasted): -EINVAL.
 *
 * VMBEAM_GATHER_RUNS (since version 7; not with VMBEAM_GATHER_SCATTER):
 * @offsets points to @count pairs of __u64, {byte offset, pages}, each a
 * run of consecutive source pages (offset page aligned, pages at least 1,
 * the run inside the source); the pages that move are the runs' pages in
 * order, exactly as if each page's offset were listed, and every rule
 * above holds for them (distinct, present, the same zap). A whole window
 * is one run, an L2 backed by 2 MiB pages about one run per 2 MiB: the
 * module reads, sorts and checks runs, not pages.
 *
 * VMBEAM_GATHER_REPLACE (since version 5): each moved page's slot in the
 * source gets a fresh zeroed page instead of a hole, so the source's owner
 * may go on touching those addresses (an L1 whose L2 moved out reuses its
 * frames): it reads zeros, never the moved page. Its mappings of the
 * moved pages are still zapped first; its next fault maps the fresh page.
 * This costs @count new pages (4 KiB pages, also in a VMBEAM_CREATE_HUGE
 * source: a 2 MiB block with a fresh page in it is then mapped by 4 KiB),
 * charged to the caller's memcg and allocated before any page moves.
 *
 * -EINVAL: bad offsets (unaligned, out of range, repeated, already gone;
 * with VMBEAM_GATHER_RUNS also an empty run or one past the end),
 * destination range out of bounds, src == dst, an unknown flag;
 * VMBEAM_GATHER_SCATTER without VMBEAM_GATHER_INTO, with
 * VMBEAM_GATHER_REPLACE or VMBEAM_GATHER_RUNS or a nonzero @dst_offset,
 * @count more than the source's pages, one of its first @count pages gone already; -EEXIST: a
 * destination slot holds a page; -EBUSY: a region is moving; -EBADF: a fd
 * is not open; -ENOMEM: out of memory (with VMBEAM_GATHER_REPLACE, for the
 * fresh pages too); -EINTR: a fatal signal while allocating them.
 */
struct vmbeam_gather {
	__u64 offsets;
	__u64 count;
	__s32 src_fd;
	__u32 flags;
	__s32 dst_fd;
	__u32 pad;
	__u64 dst_offset;
};

/* Most pages in one VMBEAM_REGION_FRAMES. */
#define VMBEAM_FRAMES_MAX (1U << 20)
/* A VMBEAM_REGION_FRAMES entry: the frame number, and whether a huge (PMD
 * or PUD) entry maps it rather than a 4 KiB PTE; HUGE_1G also: a PUD. */
#define VMBEAM_FRAME_PFN_MASK ((1ULL << 52) - 1)
#define VMBEAM_FRAME_HUGE (1ULL << 63)
#define VMBEAM_FRAME_HUGE_1G (1ULL << 62) /* since 8 */

/**
 * struct vmbeam_region_frames - VMBEAM_REGION_FRAMES (on a region fd, since 7).
 * @offset:   in: byte offset of the first page in the region, page aligned.
 * @count:    in: pages, 1 .. VMBEAM_FRAMES_MAX, all inside the region.
 * @frames:   in: user pointer to @count __u64; out: for each page, the
 *            page frame number that the owner's address space maps there
 *            (VMBEAM_FRAME_PFN_MASK), with VMBEAM_FRAME_HUGE set where a
 *            2 MiB (PMD) or 1 GiB (PUD) entry maps it, and also
 *            VMBEAM_FRAME_HUGE_1G where a PUD does; 0 where nothing is
 *            mapped.
 * @flags:    in: must be 0.
 * @pad:      in: must be 0.
 * @reserved: in: must be 0.
 *
 * What /proc/PID/pagemap says for ordinary mappings, for the mappings of a
 * VMBEAM_CREATE_HUGE region, which are PFNMAP and which pagemap does not
 * walk: the frames are read from the owner's page tables (a PMD maps 512
 * frames in a row), not from the module's own bookkeeping, so a caller can
 * check that the new owner of a moved region maps the very frames the old
 * owner mapped (zero copy), and that the old owner maps none of them any
 * more. The owner is the region's owner at the time of the call (a VM's
 * creator process, or the owning process); where it maps the region more
 * than once, the lowest mapping of a page counts. Pages it has not
 * faulted in read 0. A snapshot: a fault or revocation may change the
 * mapping right after.
 *
 * -EOPNOTSUPP: not a huge region (its mappings are ordinary pages: read
 * /proc/PID/pagemap); -EPERM: the caller lacks CAP_SYS_ADMIN (frame
 * numbers are privileged, as in pagemap); -ESRCH: the region has no live
 * owner; -EINVAL: bad offset or count, an unknown flag, a nonzero
 * reserved word; -EFAULT: @frames is not writable; -ENOMEM; -EINTR: a
 * fatal signal while waiting for the owner's mmap lock.
 */
struct vmbeam_region_frames {
	__u64 offset;
	__u64 count;
	__u64 frames;
	__u32 flags;
	__u32 pad;
	__u64 reserved[2];
};

#define VMBEAM_GET_VERSION     _IOWR(VMBEAM_IOC_MAGIC, 0x00, struct vmbeam_version)
#define VMBEAM_GET_STATS       _IOWR(VMBEAM_IOC_MAGIC, 0x01, struct vmbeam_stats)
#define VMBEAM_CREATE_REGION   _IOW(VMBEAM_IOC_MAGIC, 0x02, struct vmbeam_region_create)
#define VMBEAM_TRANSFER        _IOW(VMBEAM_IOC_MAGIC, 0x03, struct vmbeam_transfer)
#define VMBEAM_TRANSFER_BATCH  _IOW(VMBEAM_IOC_MAGIC, 0x04, struct vmbeam_transfer_batch)
#define VMBEAM_GATHER          _IOW(VMBEAM_IOC_MAGIC, 0x05, struct vmbeam_gather)
#define VMBEAM_BIND            _IOW(VMBEAM_IOC_MAGIC, 0x06, struct vmbeam_bind)

/* On a region fd. */
#define VMBEAM_REGION_BIND     _IOW(VMBEAM_IOC_MAGIC, 0x10, struct vmbeam_region_bind)
#define VMBEAM_REGION_INFO     _IOWR(VMBEAM_IOC_MAGIC, 0x11, struct vmbeam_region_info)
#define VMBEAM_REGION_FRAMES   _IOW(VMBEAM_IOC_MAGIC, 0x12, struct vmbeam_region_frames)

#endif /* _UAPI_LINUX_VMBEAM_H */
