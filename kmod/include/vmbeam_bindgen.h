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
};
