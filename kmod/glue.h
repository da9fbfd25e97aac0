/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The contract between vmbeam's C helper (glue.c) and its Rust crate.
 * C owns registration and struct fields; Rust owns every decision.
 */
#ifndef VMBEAM_GLUE_H
#define VMBEAM_GLUE_H

/* C, called from Rust. */
int vmbeam_misc_register(void);
void vmbeam_misc_deregister(void);

/* Rust (device.rs), called from C. Returns >= 0 or a negative errno. */
long vmbeam_rs_ioctl(unsigned int cmd, unsigned long arg);

#endif /* VMBEAM_GLUE_H */
