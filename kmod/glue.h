/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The contract between vmbeam's C helper (glue.c) and its Rust crate.
 * C owns registration, static inlines and struct fields; Rust owns every
 * decision. Pointers cross as opaque handles.
 */
#ifndef VMBEAM_GLUE_H
#define VMBEAM_GLUE_H

struct file;
struct kvm;
struct mm_struct;
struct page;
struct pid;
struct vm_area_struct;

/* --- C, called from Rust --- */
int vmbeam_misc_register(void);
void vmbeam_misc_deregister(void);

/* Region files: one anon inode each, so revoking reaches only its views. */
struct file *vmbeam_region_file(void *region, loff_t size);
int vmbeam_fd_reserve(void);
void vmbeam_fd_unreserve(int fd);
void vmbeam_fd_install(int fd, struct file *file);
void *vmbeam_region_fget(int fd, struct file **filep);
void vmbeam_fput(struct file *file);
void vmbeam_revoke(struct file *file, unsigned long first, unsigned long count);
void vmbeam_gather_lock(void);
void vmbeam_gather_unlock(void);

/* KVM VMs: a counted reference from a VM fd, and the VM's creator. */
int vmbeam_kvm_get(int fd, struct kvm **kvmp);
void vmbeam_kvm_put(struct kvm *kvm);
struct mm_struct *vmbeam_kvm_mm(struct kvm *kvm);
int vmbeam_kvm_creator_alive(struct kvm *kvm);
struct mm_struct *vmbeam_current_mm(void);

/* Processes (VMBEAM_BIND_PROCESS): a counted thread group pid. */
struct pid *vmbeam_pid_get_current(void);
void vmbeam_pid_put(struct pid *pid);
int vmbeam_pid_alive(struct pid *pid);
int vmbeam_pid_mm_is(struct pid *pid, struct mm_struct *mm);
int vmbeam_pid_is_current(struct pid *pid);

/* The owner's page tables (VMBEAM_REGION_FRAMES). */
int vmbeam_capable_sys_admin(void);
struct mm_struct *vmbeam_kvm_mmget(struct kvm *kvm);
struct mm_struct *vmbeam_pid_mmget(struct pid *pid);
void vmbeam_mmput(struct mm_struct *mm);
int vmbeam_mapped_pfns(struct mm_struct *mm, const void *region, unsigned long first,
		       unsigned long count, u64 *pfns);

/* Tracepoints (vmbeam:revoke and vmbeam:fault fire inside glue.c). */
void vmbeam_trace_transfer_start(unsigned int regions);
void vmbeam_trace_transfer_done(unsigned int regions, unsigned long pages, int ret);

/* Pages. */
struct page *vmbeam_page_alloc(void);
void vmbeam_page_free(struct page *page);
unsigned long vmbeam_page_to_pfn(struct page *page);
unsigned long vmbeam_totalram_pages(void);
int vmbeam_should_stop(void);
int vmbeam_vma_insert_page(struct vm_area_struct *vma, unsigned long addr, struct page *page);
int vmbeam_vmf_insert_huge(struct vm_fault *vmf, unsigned long pfn, unsigned int order);
int vmbeam_page_alloc_block(struct page **pages);
int vmbeam_page_alloc_gigantic(struct page **pages);
void vmbeam_page_free_gigantic(struct page *first);
unsigned int vmbeam_pool_fill(void);
void vmbeam_pool_drain(void);

/* --- Rust, called from C. Return 0 or a negative errno unless noted. --- */
long vmbeam_rs_ioctl(unsigned int cmd, unsigned long arg);
long vmbeam_rs_region_ioctl(void *region, unsigned int cmd, unsigned long arg);
int vmbeam_rs_region_mmap(void *region, struct mm_struct *mm, unsigned long pgoff, unsigned long npages);
int vmbeam_rs_region_fault(void *region, struct vm_area_struct *vma, struct mm_struct *mm,
			   unsigned long pgoff, unsigned long addr, unsigned long around_addr,
			   unsigned long around_pgoff, unsigned long around_pages);
/* The order of the largest entry the region's mappings may use: 0 (4 KiB,
 * MIXEDMAP), PMD_ORDER (VMBEAM_CREATE_HUGE) or PUD_ORDER (_HUGE_1G);
 * PFNMAP mappings if not 0. */
unsigned int vmbeam_rs_region_max_order(void *region);
/* 0: a PMD (PUD) was inserted; 1: use the next size down; or a negative errno. */
int vmbeam_rs_region_huge_fault(void *region, struct vm_fault *vmf, struct mm_struct *mm,
				unsigned long pgoff, unsigned int order);
void vmbeam_rs_region_release(void *region);
/* Called under the region inode's i_lock: must not sleep. */
void vmbeam_rs_region_file_get(void *region);
int vmbeam_rs_region_file_put(void *region); /* 1 if that was the last file */

#endif /* VMBEAM_GLUE_H */
