/* SPDX-License-Identifier: GPL-2.0 */
/*
 * impact: what a migration costs the VMs involved. Shared by impact.bpf.c
 * and its Rust front end (userspace/vmbeam-probes), which gets these types
 * from the skeleton's BTF, never by retyping them.
 */
#ifndef __IMPACT_H
#define __IMPACT_H

/* log2 buckets of microseconds, as bcc's libbpf-tools count them. */
#define IMPACT_SLOTS 27

/* Phases of a migration, set by the front end while it runs. */
enum impact_phase {
	IMPACT_BEFORE = 0,	/* before the first L2 paused (or no migration) */
	IMPACT_DURING = 1,	/* from the pause to the last resume */
	IMPACT_AFTER = 2,	/* after every L2 resumed */
	IMPACT_PHASES = 3,
};

/* What was timed. */
enum impact_kind {
	/* A mapped fault on a vmbeam region (vmbeam:fault: the VMM's own
	 * touch or KVM's GUP), timed by the module's fault handler. */
	IMPACT_REGION_FAULT = 0,
	/* A KVM stage-2 fault (kvm:kvm_page_fault), timed from the guest exit
	 * to the next guest entry of that vCPU. */
	IMPACT_KVM_FAULT = 1,
	/* A user page fault (exceptions:page_fault_user): counted, not timed
	 * (its end has no tracepoint, and a kprobe on handle_mm_fault() is
	 * what crashed the TCG test kernel: README, Probes). */
	IMPACT_USER_FAULT = 2,
	/* A fault on a region mapping that was refused (SIGBUS, or EFAULT
	 * for KVM): the old owner touching memory that moved away. */
	IMPACT_REGION_DENIED = 3,
	IMPACT_KINDS = 4,
};

struct impact_hist_key {
	__u32 tid;
	__u32 tgid;
	__u32 kind;	/* enum impact_kind */
	__u32 phase;	/* enum impact_phase */
};

struct impact_hist {
	__u64 count;
	__u64 total_ns;
	__u32 slots[IMPACT_SLOTS];
	__u32 pad;
};

/* One thread of a traced process; the vCPU fields only for vCPU threads. */
struct impact_thread {
	__u32 tgid;
	__u32 pending_fault;	/* a stage-2 fault since the last exit */
	char comm[16];
	__u64 entries;
	__u64 exits;
	__u64 last_exit_ns;
	/* The last guest exit before the first transfer began: where an L2
	 * stopped on the old owner. */
	__u64 last_exit_before_move_ns;
	/* The first guest entry after the first transfer completed: where an
	 * L2 started on the new owner. */
	__u64 first_entry_after_move_ns;
};

/* A region (by inode number) that was revoked while tracing. */
struct impact_region {
	__u64 revoked_ns;		/* first vmbeam:revoke */
	__u64 revoked_pages;
	__u64 first_fault_after_ns;	/* first mapped fault after it */
	__u64 faults;			/* every vmbeam:fault on it */
};

enum impact_event_kind {
	IMPACT_EV_TRANSFER_START = 1,	/* a: regions */
	IMPACT_EV_TRANSFER_DONE = 2,	/* a: regions, b: pages, c: ret */
	IMPACT_EV_REVOKE = 3,		/* a: region, b: first page, c: count */
	IMPACT_EV_FIRST_FAULT = 4,	/* a: region, b: page, c: ns since revoke */
	IMPACT_EV_FIRST_ENTRY = 5,	/* a: ns since the transfer completed */
};

/* Through the ring buffer, one per milestone (never per fault). */
struct impact_event {
	__u64 ts_ns;
	__u32 kind;	/* enum impact_event_kind */
	__u32 tid;
	__u32 tgid;
	__u32 pad;
	__u64 a;
	__u64 b;
	__u64 c;
};

#endif /* __IMPACT_H */
