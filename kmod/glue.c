// SPDX-License-Identifier: GPL-2.0
/*
 * The C half of vmbeam.ko: only what Rust on 6.12 cannot express (misc
 * device and file_operations registration). Everything it receives goes
 * straight to the Rust side, which validates and decides.
 */
#include <linux/capability.h>
#include <linux/fs.h>
#include <linux/miscdevice.h>
#include <linux/module.h>

#include "glue.h"

static int vmbeam_open(struct inode *inode, struct file *file)
{
	/* Moving guest memory between VMs is the host administrator's job. */
	if (!capable(CAP_SYS_ADMIN))
		return -EPERM;
	return 0;
}

static long vmbeam_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	return vmbeam_rs_ioctl(cmd, arg);
}

static const struct file_operations vmbeam_fops = {
	.owner = THIS_MODULE, /* an open fd pins the module: rmmod gets EBUSY */
	.open = vmbeam_open,
	.unlocked_ioctl = vmbeam_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.llseek = noop_llseek,
};

static struct miscdevice vmbeam_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "vmbeam",
	.fops = &vmbeam_fops,
	.mode = 0600,
};

int vmbeam_misc_register(void)
{
	return misc_register(&vmbeam_misc);
}

void vmbeam_misc_deregister(void)
{
	misc_deregister(&vmbeam_misc);
}
