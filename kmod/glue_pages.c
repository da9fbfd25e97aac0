// SPDX-License-Identifier: GPL-2.0
/*
 * vmbeam.ko's C for pages: allocating them (4 KiB, 2 MiB blocks, 1 GiB
 * blocks and their pool), freeing them, and inserting them into a region's
 * mappings (PTE, PMD, PUD). As glue.c: what Rust on 6.12 cannot reach
 * (module parameters, static inlines, the page allocator's flags); the
 * Rust side (pages.rs, region.rs) decides.
 */
#include <linux/highmem.h>
#include <linux/memcontrol.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/pfn_t.h>
#include <linux/sched/signal.h>

#include "glue.h"

struct page *vmbeam_page_alloc(void)
{
	/* Charged to the caller's memcg; zeroed; no warning on failure
	 * (userspace asked for too much: -ENOMEM, not a splat). */
	return alloc_page(GFP_KERNEL_ACCOUNT | __GFP_ZERO | __GFP_NOWARN);
}

/*
 * A naturally aligned 2 MiB block of 512 zeroed pages, split into order-0
 * pages (each with its own count, as KVM's PFNMAP path needs: it takes a
 * reference on the page behind a pfn), or -ENOMEM. No reclaim or retry:
 * the caller falls back to 4 KiB pages.
 */
int vmbeam_page_alloc_block(struct page **pages)
{
	struct page *page = alloc_pages(GFP_KERNEL_ACCOUNT | __GFP_ZERO | __GFP_NOWARN |
					__GFP_NORETRY, PMD_ORDER);
	int i;

	if (!page)
		return -ENOMEM;
	split_page(page, PMD_ORDER);
	for (i = 0; i < (1 << PMD_ORDER); i++)
		pages[i] = page + i;
	return 0;
}

/* Whether [@pfn, @pfn + @nr) may be had from @zone (alloc_contig_range()
 * checks again): online, in the zone, nothing reserved or hugetlb. */
static bool vmbeam_contig_candidate(struct zone *zone, unsigned long pfn, unsigned long nr)
{
	unsigned long end = pfn + nr;

	for (; pfn < end; pfn++) {
		struct page *page = pfn_to_online_page(pfn);

		if (!page || page_zone(page) != zone || PageReserved(page) || PageHuge(page))
			return false;
	}
	return true;
}

/*
 * The first naturally aligned 1 GiB of any zone that alloc_contig_range()
 * can empty (migrating movable pages out), as order-0 pages (as a split
 * block's), zeroed if @gfp says so: its first pfn, or 0 (none; also on a
 * fatal signal). alloc_contig_pages(), which searches so, is not exported;
 * this is its search. Not charged to a memcg (see VMBEAM_CREATE_HUGE_1G).
 */
static unsigned long vmbeam_contig_gib(gfp_t gfp)
{
	const unsigned long nr = 1UL << PUD_ORDER;
	int nid;

	for_each_online_node(nid) {
		struct zone *zone;

		for (zone = NODE_DATA(nid)->node_zones;
		     zone < NODE_DATA(nid)->node_zones + MAX_NR_ZONES; zone++) {
			unsigned long pfn;

			if (!populated_zone(zone))
				continue;
			for (pfn = ALIGN(zone->zone_start_pfn, nr); zone_spans_pfn(zone, pfn + nr - 1);
			     pfn += nr) {
				if (vmbeam_should_stop())
					return 0;
				if (vmbeam_contig_candidate(zone, pfn, nr) &&
				    !alloc_contig_range(pfn, pfn + nr, MIGRATE_MOVABLE, gfp | __GFP_NOWARN))
					return pfn;
			}
		}
	}
	return 0;
}

/*
 * The 1 GiB pool: gigantic_pool=N at load takes N aligned GiBs while
 * memory is least fragmented (as hugepages= does for hugetlb); a
 * VMBEAM_CREATE_HUGE_1G region takes from it first and gives back each
 * GiB it still holds whole when freed, up to N. A GiB broken up (a gather
 * took pages out of it) goes back to the page allocator page by page, and
 * the pool stays that much smaller.
 */
#define VMBEAM_POOL_MAX 64
static unsigned int gigantic_pool;
module_param(gigantic_pool, uint, 0444);
MODULE_PARM_DESC(gigantic_pool, "1 GiB blocks to reserve at load for VMBEAM_CREATE_HUGE_1G regions (0-64; default 0: none, each is sought when a region asks)");
static DEFINE_MUTEX(vmbeam_pool_lock);
static unsigned long vmbeam_pool[VMBEAM_POOL_MAX]; /* first pfns */
static unsigned int vmbeam_pool_len;

/* Fills the pool at load; how many GiBs it holds. */
unsigned int vmbeam_pool_fill(void)
{
	gigantic_pool = min(gigantic_pool, VMBEAM_POOL_MAX);
	mutex_lock(&vmbeam_pool_lock);
	while (vmbeam_pool_len < gigantic_pool) {
		unsigned long pfn = vmbeam_contig_gib(GFP_KERNEL);

		if (!pfn)
			break;
		vmbeam_pool[vmbeam_pool_len++] = pfn;
	}
	mutex_unlock(&vmbeam_pool_lock);
	return vmbeam_pool_len;
}

/* Gives the pool back to the page allocator (unload: no region is left). */
void vmbeam_pool_drain(void)
{
	mutex_lock(&vmbeam_pool_lock);
	while (vmbeam_pool_len)
		free_contig_range(vmbeam_pool[--vmbeam_pool_len], 1UL << PUD_ORDER);
	mutex_unlock(&vmbeam_pool_lock);
}

/*
 * A naturally aligned 1 GiB of zeroed order-0 pages into @pages: from the
 * pool (zeroed here, out of the lock), else sought; -ENOMEM if there is
 * none, -EINTR on a fatal signal.
 */
int vmbeam_page_alloc_gigantic(struct page **pages)
{
	const unsigned long nr = 1UL << PUD_ORDER;
	unsigned long pfn = 0, i;

	mutex_lock(&vmbeam_pool_lock);
	if (vmbeam_pool_len)
		pfn = vmbeam_pool[--vmbeam_pool_len];
	mutex_unlock(&vmbeam_pool_lock);
	if (pfn) {
		for (i = 0; i < nr; i++) {
			clear_highpage(pfn_to_page(pfn + i));
			if (i % 512 == 511)
				cond_resched();
		}
	} else {
		pfn = vmbeam_contig_gib(GFP_KERNEL | __GFP_ZERO);
		if (!pfn)
			return fatal_signal_pending(current) ? -EINTR : -ENOMEM;
	}
	for (i = 0; i < nr; i++)
		pages[i] = pfn_to_page(pfn + i);
	return 0;
}

/*
 * Frees a whole aligned GiB of order-0 pages from @first: back to the pool
 * if it has room and nothing else holds a page of it (no memcg charge, no
 * other reference), else page by page.
 */
void vmbeam_page_free_gigantic(struct page *first)
{
	const unsigned long nr = 1UL << PUD_ORDER;
	unsigned long pfn = page_to_pfn(first), i;
	bool poolable = !PageMemcgKmem(first);

	for (i = 0; i < nr && poolable; i++)
		poolable = page_count(pfn_to_page(pfn + i)) == 1;
	if (poolable) {
		mutex_lock(&vmbeam_pool_lock);
		poolable = vmbeam_pool_len < gigantic_pool;
		if (poolable)
			vmbeam_pool[vmbeam_pool_len++] = pfn;
		mutex_unlock(&vmbeam_pool_lock);
	}
	if (!poolable)
		for (i = 0; i < nr; i++)
			__free_page(pfn_to_page(pfn + i));
}

void vmbeam_page_free(struct page *page)
{
	__free_page(page);
}

unsigned long vmbeam_page_to_pfn(struct page *page)
{
	return page_to_pfn(page);
}

unsigned long vmbeam_totalram_pages(void)
{
	return totalram_pages();
}

/* For long loops: yields the CPU, and says whether the caller is dying. */
int vmbeam_should_stop(void)
{
	cond_resched();
	return fatal_signal_pending(current);
}

/* What an insert helper's vm_fault_t means to the Rust side. */
static int vmbeam_insert_errno(vm_fault_t ret)
{
	switch (ret) {
	case VM_FAULT_NOPAGE:
		return 0;
	case VM_FAULT_OOM:
		return -ENOMEM;
	default:
		return -EFAULT;
	}
}

/*
 * Maps @page at @addr: a refcounted PTE in a 4 KiB region's VMA
 * (VM_MIXEDMAP: GUP works), a special PTE in a huge region's (VM_PFNMAP).
 */
int vmbeam_vma_insert_page(struct vm_area_struct *vma, unsigned long addr, struct page *page)
{
	if (!(vma->vm_flags & VM_PFNMAP))
		return vm_insert_page(vma, addr, page);
	return vmbeam_insert_errno(vmf_insert_pfn(vma, addr, page_to_pfn(page)));
}

/* Maps the 2 MiB (PMD_ORDER) or 1 GiB (PUD_ORDER) block from @pfn with one
 * PMD or PUD at the fault's address. */
int vmbeam_vmf_insert_huge(struct vm_fault *vmf, unsigned long pfn, unsigned int order)
{
	bool write = vmf->flags & FAULT_FLAG_WRITE;

	if (order == PUD_ORDER)
		return vmbeam_insert_errno(vmf_insert_pfn_pud(vmf, pfn_to_pfn_t(pfn), write));
	return vmbeam_insert_errno(vmf_insert_pfn_pmd(vmf, pfn_to_pfn_t(pfn), write));
}
