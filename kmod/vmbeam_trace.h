/* SPDX-License-Identifier: GPL-2.0 */
/*
 * vmbeam tracepoints: vmbeam:transfer_start, transfer_done, revoke, fault.
 * Defined here (CREATE_TRACE_POINTS in glue.c), called from Rust through
 * the thin wrappers in glue.c and kmod/trace.rs.
 */
#undef TRACE_SYSTEM
#define TRACE_SYSTEM vmbeam

#if !defined(_VMBEAM_TRACE_H) || defined(TRACE_HEADER_MULTI_READ)
#define _VMBEAM_TRACE_H

#include <linux/tracepoint.h>

TRACE_EVENT(transfer_start,
	TP_PROTO(unsigned int regions),
	TP_ARGS(regions),
	TP_STRUCT__entry(__field(unsigned int, regions)),
	TP_fast_assign(__entry->regions = regions;),
	TP_printk("regions=%u", __entry->regions)
);

TRACE_EVENT(transfer_done,
	TP_PROTO(unsigned int regions, unsigned long pages, int ret),
	TP_ARGS(regions, pages, ret),
	TP_STRUCT__entry(
		__field(unsigned int, regions)
		__field(unsigned long, pages)
		__field(int, ret)
	),
	TP_fast_assign(
		__entry->regions = regions;
		__entry->pages = pages;
		__entry->ret = ret;
	),
	TP_printk("regions=%u pages=%lu ret=%d", __entry->regions, __entry->pages, __entry->ret)
);

TRACE_EVENT(revoke,
	TP_PROTO(unsigned long region, unsigned long first, unsigned long count),
	TP_ARGS(region, first, count),
	TP_STRUCT__entry(
		__field(unsigned long, region)
		__field(unsigned long, first)
		__field(unsigned long, count)
	),
	TP_fast_assign(
		__entry->region = region;
		__entry->first = first;
		__entry->count = count;
	),
	TP_printk("region=%lu first=%lu count=%lu", __entry->region, __entry->first, __entry->count)
);

/* ns: how long vmbeam's fault handler took (a wait for a move included). */
TRACE_EVENT(fault,
	TP_PROTO(unsigned long region, unsigned long pgoff, int ret, u64 ns),
	TP_ARGS(region, pgoff, ret, ns),
	TP_STRUCT__entry(
		__field(unsigned long, region)
		__field(unsigned long, pgoff)
		__field(int, ret)
		__field(u64, ns)
	),
	TP_fast_assign(
		__entry->region = region;
		__entry->pgoff = pgoff;
		__entry->ret = ret;
		__entry->ns = ns;
	),
	TP_printk("region=%lu pgoff=%lu ret=%d ns=%llu", __entry->region, __entry->pgoff, __entry->ret,
		  __entry->ns)
);

#endif /* _VMBEAM_TRACE_H */

#undef TRACE_INCLUDE_PATH
#define TRACE_INCLUDE_PATH .
#undef TRACE_INCLUDE_FILE
#define TRACE_INCLUDE_FILE vmbeam_trace
#include <trace/define_trace.h>
