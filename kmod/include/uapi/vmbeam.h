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

/* Bumped on any incompatible change of this file. */
#define VMBEAM_API_VERSION 1

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
 * @flags:    in: must be 0.
 * @pad:      in: must be 0.
 * @reserved: in: must be 0.
 *
 * Returns a new region fd (O_CLOEXEC). The region has no owner until
 * VMBEAM_REGION_BIND; it is freed when its last fd and mapping go.
 * -EINVAL: size 0 or not page aligned; -ENOMEM: more than the machine has,
 * or the allocation failed; -EINTR: a fatal signal during allocation.
 */
struct vmbeam_region_create {
	__u64 size;
	__u32 flags;
	__u32 pad;
	__u64 reserved[2];
};

/**
 * struct vmbeam_region_bind - VMBEAM_REGION_BIND (on a region fd).
 * @vm_fd:    in: a KVM VM fd created by the calling process.
 * @flags:    in: must be 0.
 * @reserved: in: must be 0.
 *
 * Makes the VM the region's owner: then only the VM's creator process may
 * mmap the region (MAP_SHARED) and its faults map the region's own pages.
 * -EINVAL: not a KVM VM fd; -EPERM: the caller did not create that VM;
 * -EBUSY: the region has a live owner (use VMBEAM_TRANSFER). A region whose
 * owner's process has exited is ownerless again and may be bound.
 */
struct vmbeam_region_bind {
	__s32 vm_fd;
	__u32 flags;
	__u64 reserved[2];
};

/* struct vmbeam_region_info flags (out). */
#define VMBEAM_REGION_OWNED	(1U << 0) /* bound to a VM whose process runs */
#define VMBEAM_REGION_MOVING	(1U << 1) /* a transfer is between its phases */
#define VMBEAM_REGION_MINE	(1U << 2) /* owned by a VM of the calling process */

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
 * All or nothing: every entry is checked and every region marked moving
 * before any is revoked; then one revoke phase, one grant phase. If any
 * entry fails the check, no region changes owner or loses a mapping.
 * -EBADF: a fd is not open; -EINVAL: not a region / not a KVM VM fd /
 * from == to; -EPERM: from_vm_fd is not the region's owner; -EBUSY: a
 * region is already moving (another transfer, or twice in this batch).
 */
struct vmbeam_transfer_batch {
	__u64 transfers;
	__u32 count;
	__u32 flags;
	__u64 reserved[2];
};

/* Most page offsets in one VMBEAM_GATHER. */
#define VMBEAM_GATHER_MAX (1U << 20)

/**
 * struct vmbeam_gather - VMBEAM_GATHER (on /dev/vmbeam).
 * @offsets:  in: user pointer to @count __u64 byte offsets into the source,
 *            each page aligned, all distinct.
 * @count:    in: 1 .. VMBEAM_GATHER_MAX.
 * @src_fd:   in: the source region fd.
 * @flags:    in: must be 0.
 * @reserved: in: must be 0.
 *
 * Returns a new, ownerless region fd whose page i is the source's page at
 * offsets[i]: the pages move, their bytes do not. The source loses exactly
 * those pages (its mappings of them are zapped; touching them again gets
 * SIGBUS); the rest of the source is untouched.
 * -EINVAL: bad offsets (unaligned, out of range, repeated, already gone);
 * -EBUSY: the source is moving.
 */
struct vmbeam_gather {
	__u64 offsets;
	__u64 count;
	__s32 src_fd;
	__u32 flags;
	__u64 reserved[2];
};

#define VMBEAM_GET_VERSION     _IOWR(VMBEAM_IOC_MAGIC, 0x00, struct vmbeam_version)
#define VMBEAM_GET_STATS       _IOWR(VMBEAM_IOC_MAGIC, 0x01, struct vmbeam_stats)
#define VMBEAM_CREATE_REGION   _IOW(VMBEAM_IOC_MAGIC, 0x02, struct vmbeam_region_create)
#define VMBEAM_TRANSFER        _IOW(VMBEAM_IOC_MAGIC, 0x03, struct vmbeam_transfer)
#define VMBEAM_TRANSFER_BATCH  _IOW(VMBEAM_IOC_MAGIC, 0x04, struct vmbeam_transfer_batch)
#define VMBEAM_GATHER          _IOW(VMBEAM_IOC_MAGIC, 0x05, struct vmbeam_gather)

/* On a region fd. */
#define VMBEAM_REGION_BIND     _IOW(VMBEAM_IOC_MAGIC, 0x10, struct vmbeam_region_bind)
#define VMBEAM_REGION_INFO     _IOWR(VMBEAM_IOC_MAGIC, 0x11, struct vmbeam_region_info)

#endif /* _UAPI_LINUX_VMBEAM_H */
