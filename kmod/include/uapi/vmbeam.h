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

#define VMBEAM_GET_VERSION _IOWR(VMBEAM_IOC_MAGIC, 0x00, struct vmbeam_version)
#define VMBEAM_GET_STATS   _IOWR(VMBEAM_IOC_MAGIC, 0x01, struct vmbeam_stats)

#endif /* _UAPI_LINUX_VMBEAM_H */
