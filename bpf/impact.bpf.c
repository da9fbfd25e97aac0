// SPDX-License-Identifier: GPL-2.0
/*
 * impact.bpf.c: page faults and downtime of the VMs a vmbeam migration
 * touches, from kernel events rather than from what userspace says.
 *
 * - vmbeam:transfer_start/transfer_done/revoke/fault (the module's
 *   tracepoints) mark the move and the faults on region mappings;
 * - kvm:kvm_exit/kvm_entry/kvm_page_fault time each vCPU's stage-2 faults
 *   and give the last guest exit before the move and the first guest entry
 *   after it (an L2's downtime, when the front end knows its two vCPU
 *   threads);
 * - exceptions:page_fault_user counts user faults.
 *
 * Tracepoints only, no kprobe or fentry: patching the entry of a function
 * as hot as handle_mm_fault() while other CPUs fault in it crashed the TCG
 * test kernel (an int3 nobody claimed, a jump to 0).
 *
 * Raw tracepoints: their arguments are the TP_PROTO arguments, so nothing
 * here depends on a trace event's record layout.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "impact.h"

char LICENSE[] SEC("license") = "GPL";

/* Only the processes in `tgids` are traced (set before load). */
const volatile bool filter_tgids = false;

/* Written by the front end while tracing (mmapped .bss). */
volatile __u32 phase = IMPACT_BEFORE;
/* The first vmbeam:transfer_start, and the first successful transfer_done
 * after it: what "before the move" and "after the move" mean. */
__u64 move_start_ns = 0;
__u64 move_done_ns = 0;

/* Instances so that the skeleton carries these types for the front end. */
struct impact_hist_key _hist_key = {};
struct impact_hist _hist = {};
struct impact_thread _thread = {};
struct impact_region _region = {};
struct impact_event _event = {};
/* ... and these enums, so that Rust takes their values from here too. */
enum impact_phase _phase = IMPACT_BEFORE;
enum impact_kind _kind = IMPACT_REGION_FAULT;
enum impact_event_kind _event_kind = IMPACT_EV_TRANSFER_START;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u8);
} tgids SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, __u32);
	__type(value, struct impact_thread);
} threads SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct impact_hist_key);
	__type(value, struct impact_hist);
} hists SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct impact_region);
} regions SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

static __always_inline bool traced(__u32 tgid)
{
	return !filter_tgids || bpf_map_lookup_elem(&tgids, &tgid);
}

/* The entry for @key, created from @init if absent (bcc's
 * bpf_map_lookup_or_try_init); NULL only if the map is full. */
static __always_inline void *lookup_or_init(void *map, const void *key, const void *init)
{
	void *v = bpf_map_lookup_elem(map, key);

	if (v)
		return v;
	bpf_map_update_elem(map, key, init, BPF_NOEXIST);
	return bpf_map_lookup_elem(map, key);
}

static __always_inline __u32 log2_u64(__u64 v)
{
	__u32 r = 0;

	/* Bounded for the verifier: 64 halvings at most. */
	for (int i = 0; i < 64 && v > 1; i++) {
		v >>= 1;
		r++;
	}
	return r;
}

/* Counts one event of `kind` for the current thread, `delta_ns` long
 * (with `timed` false: only counted). */
static __always_inline void record(__u32 kind, bool timed, __u64 delta_ns)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct impact_hist_key key = { .tid = (__u32)id, .tgid = id >> 32, .kind = kind, .phase = phase };
	static const struct impact_hist zero;
	struct impact_hist *h;
	__u32 slot;

	if (key.phase >= IMPACT_PHASES)
		key.phase = IMPACT_AFTER;
	h = lookup_or_init(&hists, &key, &zero);
	if (!h)
		return;
	__sync_fetch_and_add(&h->count, 1);
	if (!timed)
		return;
	slot = log2_u64(delta_ns / 1000);
	if (slot >= IMPACT_SLOTS)
		slot = IMPACT_SLOTS - 1;
	__sync_fetch_and_add(&h->total_ns, delta_ns);
	__sync_fetch_and_add(&h->slots[slot], 1);
}

static __always_inline void emit(__u32 kind, __u64 a, __u64 b, __u64 c)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct impact_event *e;

	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e)
		return;
	e->ts_ns = bpf_ktime_get_ns();
	e->kind = kind;
	e->tid = (__u32)id;
	e->tgid = id >> 32;
	e->pad = 0;
	e->a = a;
	e->b = b;
	e->c = c;
	bpf_ringbuf_submit(e, 0);
}

/* The current thread's record, created on first sight if it is traced. */
static __always_inline struct impact_thread *this_thread(void)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)id, tgid = id >> 32;
	struct impact_thread *t;

	if (!traced(tgid))
		return NULL;
	t = bpf_map_lookup_elem(&threads, &tid);
	if (t)
		return t;
	struct impact_thread fresh = { .tgid = tgid };

	bpf_get_current_comm(fresh.comm, sizeof(fresh.comm));
	bpf_map_update_elem(&threads, &tid, &fresh, BPF_NOEXIST);
	return bpf_map_lookup_elem(&threads, &tid);
}

/* ---- the move: vmbeam's tracepoints ---- */

SEC("raw_tp/transfer_start")
int BPF_PROG(vmbeam_transfer_start, unsigned int nr_regions)
{
	__sync_val_compare_and_swap(&move_start_ns, 0, bpf_ktime_get_ns());
	emit(IMPACT_EV_TRANSFER_START, nr_regions, 0, 0);
	return 0;
}

SEC("raw_tp/transfer_done")
int BPF_PROG(vmbeam_transfer_done, unsigned int nr_regions, unsigned long pages, int ret)
{
	if (ret == 0 && move_start_ns)
		__sync_val_compare_and_swap(&move_done_ns, 0, bpf_ktime_get_ns());
	emit(IMPACT_EV_TRANSFER_DONE, nr_regions, pages, (__u64)(__s64)ret);
	return 0;
}

SEC("raw_tp/revoke")
int BPF_PROG(vmbeam_revoke, unsigned long region, unsigned long first, unsigned long count)
{
	static const struct impact_region fresh;
	__u64 key = region;
	struct impact_region *r = lookup_or_init(&regions, &key, &fresh);

	if (!r)
		return 0;
	__sync_val_compare_and_swap(&r->revoked_ns, 0, bpf_ktime_get_ns());
	__sync_fetch_and_add(&r->revoked_pages, count);
	emit(IMPACT_EV_REVOKE, region, first, count);
	return 0;
}

SEC("raw_tp/fault")
int BPF_PROG(vmbeam_fault, unsigned long region, unsigned long pgoff, int ret, __u64 ns)
{
	__u64 id = bpf_get_current_pid_tgid(), now = bpf_ktime_get_ns(), key = region;
	static const struct impact_region fresh;
	struct impact_region *r;

	if (!traced(id >> 32))
		return 0;
	record(ret == 0 ? IMPACT_REGION_FAULT : IMPACT_REGION_DENIED, true, ns);

	r = lookup_or_init(&regions, &key, &fresh);
	if (!r)
		return 0;
	__sync_fetch_and_add(&r->faults, 1);
	if (ret == 0 && r->revoked_ns && !r->first_fault_after_ns &&
	    __sync_val_compare_and_swap(&r->first_fault_after_ns, 0, now) == 0)
		emit(IMPACT_EV_FIRST_FAULT, region, pgoff, now - r->revoked_ns);
	return 0;
}

/* ---- user page faults ---- */

SEC("raw_tp/page_fault_user")
int BPF_PROG(page_fault_user, unsigned long address, struct pt_regs *regs, unsigned long error_code)
{
	if (traced(bpf_get_current_pid_tgid() >> 32))
		record(IMPACT_USER_FAULT, false, 0);
	return 0;
}

/* ---- vCPUs: guest exits, stage-2 faults, guest entries ---- */

SEC("raw_tp/kvm_exit")
int BPF_PROG(kvm_exit, struct kvm_vcpu *vcpu, __u32 isa)
{
	struct impact_thread *t = this_thread();
	__u64 now = bpf_ktime_get_ns();

	if (!t)
		return 0;
	t->exits++;
	t->last_exit_ns = now;
	t->pending_fault = 0;
	if (!move_start_ns)
		t->last_exit_before_move_ns = now;
	return 0;
}

SEC("raw_tp/kvm_page_fault")
int BPF_PROG(kvm_page_fault, struct kvm_vcpu *vcpu, __u64 fault_address, __u64 error_code)
{
	struct impact_thread *t = this_thread();

	if (t)
		t->pending_fault = 1;
	return 0;
}

SEC("raw_tp/kvm_entry")
int BPF_PROG(kvm_entry, struct kvm_vcpu *vcpu, bool force_immediate_exit)
{
	struct impact_thread *t = this_thread();
	__u64 now = bpf_ktime_get_ns(), done = move_done_ns;

	if (!t)
		return 0;
	t->entries++;
	if (t->pending_fault && t->last_exit_ns) {
		record(IMPACT_KVM_FAULT, true, now - t->last_exit_ns);
		t->pending_fault = 0;
	}
	if (done && now > done && !t->first_entry_after_move_ns) {
		t->first_entry_after_move_ns = now;
		emit(IMPACT_EV_FIRST_ENTRY, now - done, 0, 0);
	}
	return 0;
}
