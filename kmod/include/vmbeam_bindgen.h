/* SPDX-License-Identifier: GPL-2.0 */
/*
 * bindgen input for the module and for userspace: the uAPI header, plus its
 * ioctl numbers as enumerators. bindgen cannot expand function-like macros
 * such as _IOWR(), but clang evaluates enumerator initializers, so the
 * numbers below come from the header's own macros and are never retyped.
 */
#include "uapi/vmbeam.h"

enum vmbeam_ioctl {
	VMBEAM_IOCTL_GET_VERSION = VMBEAM_GET_VERSION,
	VMBEAM_IOCTL_GET_STATS = VMBEAM_GET_STATS,
	VMBEAM_IOCTL_CREATE_REGION = VMBEAM_CREATE_REGION,
	VMBEAM_IOCTL_TRANSFER = VMBEAM_TRANSFER,
	VMBEAM_IOCTL_TRANSFER_BATCH = VMBEAM_TRANSFER_BATCH,
	VMBEAM_IOCTL_GATHER = VMBEAM_GATHER,
	VMBEAM_IOCTL_BIND = VMBEAM_BIND,
	VMBEAM_IOCTL_REGION_BIND = VMBEAM_REGION_BIND,
	VMBEAM_IOCTL_REGION_INFO = VMBEAM_REGION_INFO,
	VMBEAM_IOCTL_REGION_FRAMES = VMBEAM_REGION_FRAMES,
};
