// SPDX-License-Identifier: GPL-2.0
/*
 * The C half of vmbeam.ko: only what Rust on 6.12 cannot express (misc
 * device and file_operations registration, vm_operations, static inlines,
 * fields of struct kvm/file/vma). Everything it receives goes straight to
 * the Rust side, which validates and decides. Pages (allocation, the
 * 1 GiB pool, inserting them into mappings) are in glue_pages.c.
 */
#include <linux/anon_inodes.h>
#include <linux/capability.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/kvm_host.h>
#include <linux/miscdevice.h>
#include <linux/mman.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/pfn_t.h>
#include <linux/pid.h>
#include <linux/sched/mm.h>
#include <linux/sched/task.h>
#include <linux/sched/signal.h>

#include "glue.h"
#include "uapi/vmbeam.h"

#define CREATE_TRACE_POINTS
#include "vmbeam_trace.h"

/* ---- tracepoints (static inlines: Rust calls these) ---- */

void vmbeam_trace_transfer_start(unsigned int regions)
{
	trace_transfer_start(regions);
}

void vmbeam_trace_transfer_done(unsigned int regions, unsigned long pages, int ret)
{
	trace_transfer_done(regions, pages, ret);
}


/* ---- /dev/vmbeam ---- */

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

/* ---- region files ---- */

static vm_fault_t vmbeam_region_fault(struct vm_fault *vmf)
{
	struct vm_area_struct *vma = vmf->vma;
	u64 start = trace_fault_enabled() ? ktime_get_ns() : 0;
	/*
	 * Fault-around: the 2 MiB-aligned window of the mapping around the
	 * fault (inside the VMA) is mapped in one go, so a new owner touching
	 * (or populating, or KVM faulting in) its memory takes one fault per
	 * 2 MiB instead of one per page.
	 */
	unsigned long win = ALIGN_DOWN(vmf->address, PMD_SIZE);
	unsigned long first = max(win, vma->vm_start);
	unsigned long end = min(win + PMD_SIZE, vma->vm_end);
	int ret = vmbeam_rs_region_fault(vma->vm_file->private_data, vma, vma->vm_mm,
					 vmf->pgoff, vmf->address, first,
					 vmf->pgoff - ((vmf->address - first) >> PAGE_SHIFT),
					 (end - first) >> PAGE_SHIFT);

	trace_fault(file_inode(vma->vm_file)->i_ino, vmf->pgoff, ret,
		    start ? ktime_get_ns() - start : 0);
	switch (ret) {
	case 0:
		return VM_FAULT_NOPAGE;
	case -ENOMEM:
		return VM_FAULT_OOM;
	default:
		return VM_FAULT_SIGBUS;
	}
}

/*
 * A PUD- or PMD-sized fault in a huge region's mapping: one PUD (PMD) for
 * the whole 1 GiB (2 MiB) block when the block is whole in the VMA and in
 * the region; otherwise the next size down answers (PMD, then the 4 KiB
 * path's fault-around).
 */
static vm_fault_t vmbeam_region_huge_fault(struct vm_fault *vmf, unsigned int order)
{
	struct vm_area_struct *vma = vmf->vma;
	unsigned long size = PAGE_SIZE << order;
	unsigned long addr = ALIGN_DOWN(vmf->address, size);
	unsigned long pgoff = vma->vm_pgoff + ((addr - vma->vm_start) >> PAGE_SHIFT);
	u64 start = trace_fault_enabled() ? ktime_get_ns() : 0;
	int ret;

	/* A CPU without 1 GiB pages (or booted with nogbpages) gets PMDs. */
	if ((order != PMD_ORDER && (order != PUD_ORDER || !boot_cpu_has(X86_FEATURE_GBPAGES))) ||
	    !(vma->vm_flags & VM_PFNMAP) || addr < vma->vm_start || addr + size > vma->vm_end)
		return VM_FAULT_FALLBACK;
	ret = vmbeam_rs_region_huge_fault(vma->vm_file->private_data, vmf, vma->vm_mm, pgoff,
					  order);
	if (ret > 0)
		return VM_FAULT_FALLBACK;
	trace_fault(file_inode(vma->vm_file)->i_ino, pgoff, ret, start ? ktime_get_ns() - start : 0);
	if (ret == -ENOMEM)
		return VM_FAULT_OOM;
	return ret ? VM_FAULT_SIGBUS : VM_FAULT_NOPAGE;
}

static const struct vm_operations_struct vmbeam_region_vm_ops = {
	.fault = vmbeam_region_fault,
	.huge_fault = vmbeam_region_huge_fault,
};

static int vmbeam_region_mmap(struct file *file, struct vm_area_struct *vma)
{
	int ret;

	if (!(vma->vm_flags & VM_SHARED))
		return -EINVAL; /* a private COW copy would escape revocation */
	ret = vmbeam_rs_region_mmap(file->private_data, vma->vm_mm, vma->vm_pgoff,
				    vma_pages(vma));
	if (ret)
		return ret;
	/*
	 * 4 KiB regions: normal refcounted pages (GUP, and so KVM, can map
	 * them) inserted by the fault handler under the region lock. Huge
	 * regions: PFNMAP, so that a 2 MiB block maps with one PMD (and KVM
	 * then with one 2 MiB stage-2 entry); GUP cannot reach those pages.
	 * Neither is copied on fork or grows.
	 */
	if (vmbeam_rs_region_max_order(file->private_data))
		vm_flags_set(vma, VM_PFNMAP | VM_HUGEPAGE | VM_DONTEXPAND | VM_DONTCOPY | VM_DONTDUMP);
	else
		vm_flags_set(vma, VM_MIXEDMAP | VM_DONTEXPAND | VM_DONTCOPY | VM_DONTDUMP);
	vma->vm_ops = &vmbeam_region_vm_ops;
	return 0;
}

/*
 * Opening /proc/PID/fd/N of a region fd (QEMU's memory-backend-file opens
 * its mem-path itself) lands here with a new file on the region's inode.
 * inode->i_private names the region while any file of it is open; it is
 * read and cleared under i_lock, together with the region's count of open
 * files, so an open racing with the last close finds either a live region
 * (and takes a reference) or none (-ENXIO).
 */
static int vmbeam_region_open(struct inode *inode, struct file *file)
{
	void *region;

	spin_lock(&inode->i_lock);
	region = inode->i_private;
	if (region)
		vmbeam_rs_region_file_get(region);
	spin_unlock(&inode->i_lock);
	if (!region)
		return -ENXIO;
	file->private_data = region;
	return 0;
}

static int vmbeam_region_release(struct inode *inode, struct file *file)
{
	spin_lock(&inode->i_lock);
	if (vmbeam_rs_region_file_put(file->private_data))
		inode->i_private = NULL;
	spin_unlock(&inode->i_lock);
	vmbeam_rs_region_release(file->private_data);
	return 0;
}

static long vmbeam_region_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	return vmbeam_rs_region_ioctl(file->private_data, cmd, arg);
}

/* SEEK_END finds the region's size, as on a memfd: VMMs probe it so. */
static loff_t vmbeam_region_llseek(struct file *file, loff_t offset, int whence)
{
	return fixed_size_llseek(file, offset, whence, i_size_read(file_inode(file)));
}

/*
 * 2 MiB-aligned addresses for mappings of 2 MiB and more, so huge regions
 * can map (and KVM can map them) by PMD; in a VMBEAM_CREATE_HUGE_1G
 * region, 1 GiB-aligned ones (to the file offset) for 1 GiB and more, for
 * PUDs. Over-ask and align, as thp_get_unmapped_area() does for PMDs.
 */
static unsigned long vmbeam_region_get_unmapped_area(struct file *file, unsigned long addr,
						     unsigned long len, unsigned long pgoff,
						     unsigned long flags)
{
	unsigned long off = pgoff << PAGE_SHIFT, ret;

	if (addr || (flags & MAP_FIXED) || len < PUD_SIZE || len + PUD_SIZE < len ||
	    vmbeam_rs_region_max_order(file->private_data) != PUD_ORDER)
		return thp_get_unmapped_area(file, addr, len, pgoff, flags);
	ret = mm_get_unmapped_area(current->mm, file, 0, len + PUD_SIZE, 0, flags);
	if (IS_ERR_VALUE(ret))
		return thp_get_unmapped_area(file, addr, len, pgoff, flags);
	return ret + ((off - ret) & (PUD_SIZE - 1));
}

static const struct file_operations vmbeam_region_fops = {
	.owner = THIS_MODULE, /* a region pins the module */
	.open = vmbeam_region_open,
	.mmap = vmbeam_region_mmap,
	.release = vmbeam_region_release,
	.unlocked_ioctl = vmbeam_region_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.llseek = vmbeam_region_llseek,
	.get_unmapped_area = vmbeam_region_get_unmapped_area,
};

/*
 * The first file of @region, owning one reference to it (the caller
 * counted it as an open file), or ERR_PTR (then the caller still owns it).
 */
struct file *vmbeam_region_file(void *region, loff_t size)
{
	struct file *file;
	struct inode *inode;

	/* An inode of its own, as guest_memfd does: unmap_mapping_range() on
	 * the shared anon inode would reach every anon-inode file. */
	file = anon_inode_create_getfile("[vmbeam-region]", &vmbeam_region_fops, region,
					 O_RDWR, NULL);
	if (IS_ERR(file))
		return file;
	inode = file_inode(file);
	/* fstat() reports the region's size: VMMs (vm-memory, QEMU's
	 * memory-backend-file) check a file is as large as what they map. */
	i_size_write(inode, size);
	/* Reopenable through /proc/PID/fd/N: an anon inode has no_open_fops.
	 * Nobody else sees the inode yet, so no lock is needed here. */
	inode->i_fop = &vmbeam_region_fops;
	inode->i_private = region;
	return file;
}

int vmbeam_fd_reserve(void)
{
	return get_unused_fd_flags(O_CLOEXEC);
}

void vmbeam_fd_unreserve(int fd)
{
	put_unused_fd(fd);
}

void vmbeam_fd_install(int fd, struct file *file)
{
	fd_install(fd, file);
}

/* The region behind @fd with a file reference in *@filep, or ERR_PTR. */
void *vmbeam_region_fget(int fd, struct file **filep)
{
	struct file *file = fget(fd);

	if (!file)
		return ERR_PTR(-EBADF);
	if (file->f_op != &vmbeam_region_fops) {
		fput(file);
		return ERR_PTR(-EINVAL);
	}
	*filep = file;
	return file->private_data;
}

void vmbeam_fput(struct file *file)
{
	fput(file);
}

/* Serialises every gather: pages leave one region and enter another under
 * the two region locks taken one after the other, never nested. */
static DEFINE_MUTEX(vmbeam_gather_mutex);

void vmbeam_gather_lock(void)
{
	mutex_lock(&vmbeam_gather_mutex);
}

void vmbeam_gather_unlock(void)
{
	mutex_unlock(&vmbeam_gather_mutex);
}

/*
 * Zaps every user mapping of pages [first, first + count) of the region: the
 * MMU notifiers then drop KVM's stage-2 entries for them. In a region that
 * maps by PUD, whole GiBs: zapping part of a PUD splits it, which wants the
 * mmap lock that unmap_mapping_range() does not take; the owner faults the
 * rest back in.
 */
void vmbeam_revoke(struct file *file, unsigned long first, unsigned long count)
{
	unsigned long end = first + count;

	if (vmbeam_rs_region_max_order(file->private_data) == PUD_ORDER) {
		first = ALIGN_DOWN(first, 1UL << PUD_ORDER);
		end = ALIGN(end, 1UL << PUD_ORDER);
	}
	trace_revoke(file_inode(file)->i_ino, first, end - first);
	unmap_mapping_range(file->f_mapping, (loff_t)first << PAGE_SHIFT,
			    (loff_t)(end - first) << PAGE_SHIFT, 1);
}

/* ---- KVM VMs ---- */

int vmbeam_kvm_get(int fd, struct kvm **kvmp)
{
	struct file *file = fget(fd);
	int ret = 0;

	if (!file)
		return -EBADF;
	if (!file_is_kvm(file))
		ret = -EINVAL;
	else if (!kvm_get_kvm_safe(file->private_data))
		ret = -ESRCH; /* being destroyed */
	else
		*kvmp = file->private_data;
	fput(file);
	return ret;
}

void vmbeam_kvm_put(struct kvm *kvm)
{
	kvm_put_kvm(kvm);
}

struct mm_struct *vmbeam_kvm_mm(struct kvm *kvm)
{
	return kvm->mm;
}

/* Whether the process that created @kvm still runs (its mm has users). */
int vmbeam_kvm_creator_alive(struct kvm *kvm)
{
	return atomic_read(&kvm->mm->mm_users) > 0;
}

struct mm_struct *vmbeam_current_mm(void)
{
	return current->mm;
}

/* ---- processes (VMBEAM_BIND_PROCESS) ---- */

/*
 * The calling process's thread group, counted. A struct pid, not a task
 * or an mm: execve keeps the thread group's pid (de_thread moves it to the
 * exec'ing thread) and replaces the mm, and the owner must survive that.
 */
struct pid *vmbeam_pid_get_current(void)
{
	return get_pid(task_tgid(current));
}

void vmbeam_pid_put(struct pid *pid)
{
	put_pid(pid);
}

/*
 * Whether @pid's thread group still has a task with an address space and,
 * if @mm is not NULL, whether that address space is @mm. The threads share
 * one mm, but the group leader may have exited (mm NULL) before the
 * others, so each thread is asked in turn, under its task_lock (the lock
 * exec_mmap and exit_mm change ->mm under), until one has an mm: what
 * find_lock_task_mm() does, which modules cannot call. @mm is compared,
 * never dereferenced; a zombie group has no mm left, so it is not alive.
 */
static bool vmbeam_pid_mm_matches(struct pid *pid, struct mm_struct *mm)
{
	struct task_struct *leader, *t;
	bool ret = false;

	rcu_read_lock();
	leader = pid_task(pid, PIDTYPE_TGID);
	if (leader) {
		for_each_thread(leader, t) {
			bool has_mm;

			task_lock(t);
			has_mm = t->mm;
			if (has_mm)
				ret = !mm || t->mm == mm;
			task_unlock(t);
			if (has_mm)
				break;
		}
	}
	rcu_read_unlock();
	return ret;
}

int vmbeam_pid_alive(struct pid *pid)
{
	return pid_has_task(pid, PIDTYPE_TGID) && vmbeam_pid_mm_matches(pid, NULL);
}

/* Whether @mm is the current address space of @pid's (live) process. */
int vmbeam_pid_mm_is(struct pid *pid, struct mm_struct *mm)
{
	return mm && vmbeam_pid_mm_matches(pid, mm);
}

/* Whether the caller is a task of @pid's thread group. */
int vmbeam_pid_is_current(struct pid *pid)
{
	return task_tgid(current) == pid;
}

/* ---- the owner's page tables (VMBEAM_REGION_FRAMES) ---- */

int vmbeam_capable_sys_admin(void)
{
	return capable(CAP_SYS_ADMIN);
}

/* The address space of the process that created @kvm, with a user
 * reference (its page tables stay), or NULL once that process has exited. */
struct mm_struct *vmbeam_kvm_mmget(struct kvm *kvm)
{
	return mmget_not_zero(kvm->mm) ? kvm->mm : NULL;
}

/* The address space of @pid's process, with a user reference, or NULL:
 * the first thread that still has one, as in vmbeam_pid_mm_matches(). */
struct mm_struct *vmbeam_pid_mmget(struct pid *pid)
{
	struct task_struct *leader, *t;
	struct mm_struct *mm = NULL;

	rcu_read_lock();
	leader = pid_task(pid, PIDTYPE_TGID);
	if (leader) {
		for_each_thread(leader, t) {
			mm = get_task_mm(t);
			if (mm)
				break;
		}
	}
	rcu_read_unlock();
	return mm;
}

void vmbeam_mmput(struct mm_struct *mm)
{
	mmput(mm);
}

/* PUD_SIZE if a PUD leaf maps @addr in @mm, else PMD_SIZE (mmap lock held). */
static unsigned long vmbeam_leaf_size(struct mm_struct *mm, unsigned long addr)
{
	p4d_t *p4d = p4d_offset(pgd_offset(mm, addr), addr);
	pud_t pud;

	if (p4d_none(READ_ONCE(*p4d)))
		return PMD_SIZE;
	pud = READ_ONCE(*pud_offset(p4d, addr));
	return pud_present(pud) && pud_leaf(pud) ? PUD_SIZE : PMD_SIZE;
}

/*
 * The frames @mm maps for pages [@first, @first + @count) of @region, read
 * from its page tables into @pfns (left 0 where nothing is mapped; the
 * lowest mapping of a page counts; VMBEAM_FRAME_HUGE where a PMD maps it). Only PFNMAP mappings (huge regions),
 * which follow_pfnmap_start() walks under the mmap lock; a PMD leaf gives
 * the rest of its 2 MiB in one step. Copying out is the caller's, after
 * the lock is dropped: @mm may be the caller's own.
 */
int vmbeam_mapped_pfns(struct mm_struct *mm, const void *region, unsigned long first,
		       unsigned long count, u64 *pfns)
{
	unsigned long end = first + count;
	struct vm_area_struct *vma;
	VMA_ITERATOR(vmi, mm, 0);
	int ret = mmap_read_lock_killable(mm);

	if (ret)
		return ret;
	for_each_vma(vmi, vma) {
		unsigned long pgoff, last;

		if (!vma->vm_file || vma->vm_file->f_op != &vmbeam_region_fops ||
		    vma->vm_file->private_data != region || !(vma->vm_flags & VM_PFNMAP))
			continue;
		pgoff = max(first, vma->vm_pgoff);
		last = min(end, vma->vm_pgoff + vma_pages(vma));
		while (pgoff < last) {
			struct follow_pfnmap_args args = {
				.vma = vma,
				.address = vma->vm_start + ((pgoff - vma->vm_pgoff) << PAGE_SHIFT),
			};
			unsigned long i, n = 1;
			u64 huge = 0;

			if (!follow_pfnmap_start(&args)) {
				if (!args.ptep) { /* a PMD or PUD leaf */
					unsigned long size = vmbeam_leaf_size(mm, args.address);

					huge = VMBEAM_FRAME_HUGE;
					if (size == PUD_SIZE)
						huge |= VMBEAM_FRAME_HUGE_1G;
					n = min(last - pgoff,
						(size - (args.address & (size - 1))) >> PAGE_SHIFT);
				}
				for (i = 0; i < n; i++)
					if (!pfns[pgoff - first + i])
						pfns[pgoff - first + i] = (args.pfn + i) | huge;
				follow_pfnmap_end(&args);
			}
			pgoff += n;
			cond_resched();
		}
	}
	mmap_read_unlock(mm);
	return 0;
}
