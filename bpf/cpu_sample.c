// CPU stack sampling: runs on every software cpu-clock perf event (one per online CPU).
// Counts samples in the kernel by (process, thread, cgroup, user stack, kernel stack), so the
// collector only drains aggregates; unprofiled work costs one filter lookup.
//
// The collector compiles this with BCC and sets, with -D: COUNTS_MAX, STACKS_MAX, FILTER_MAX,
// and DWARF_UNWIND (0 or 1) with, when 1, UNWIND_ROWS_MAX and UNWIND_PROCESSES_MAX.
#include <uapi/linux/ptrace.h>
#include <uapi/linux/bpf_perf_event.h>

#define MAX_DEPTH 127  // PERF_MAX_STACK_DEPTH's default: what bpf_get_stackid records too

struct sample_key {
    u32 pid;             // tgid: the process
    u32 tid;             // the thread; also why updates need no atomics: a thread runs on one CPU
    u64 cgroup_id;       // cgroup v2 id: inode of the cgroup's directory
    s32 user_stack_id;   // >= 0, or a negative errno from bpf_get_stackid
    s32 kernel_stack_id;
    u64 user_stack_hash; // not 0: the user stack is in unwound_stacks under this key (.eh_frame)
};

// Indexes into `problems`; the collector reads them with the same names (bpf_program.py).
enum problem {
    SAMPLES_SEEN = 0,
    SAMPLES_FILTERED = 1,
    USER_STACK_COLLISION = 2,    // -EEXIST: the stack map bucket holds another stack
    KERNEL_STACK_COLLISION = 3,
    USER_STACK_FAULT = 4,        // -EFAULT: no user stack (kernel threads) or unreadable
    KERNEL_STACK_FAULT = 5,      // -EFAULT: the sample hit user mode, so no kernel stack
    COUNT_MAP_FULL = 6,          // the sample was lost: counts had no room until the next drain
    STACK_OTHER_ERROR = 7,
    PROBLEM_KINDS = 8,
};

BPF_HASH(counts, struct sample_key, u64, COUNTS_MAX);
BPF_STACK_TRACE(stack_traces, STACKS_MAX);
// Filled from discovery's targets. Empty and disabled means: profile everything.
BPF_HASH(filter_cgroups, u64, u8, FILTER_MAX);
BPF_HASH(filter_pids, u32, u8, FILTER_MAX);
BPF_ARRAY(filter_enabled, u32, 1);
BPF_PERCPU_ARRAY(problems, u64, PROBLEM_KINDS);

static __always_inline void note(u32 kind) {
    u64 *n = problems.lookup(&kind);
    if (n)
        (*n)++;  // per-CPU slot: no other CPU writes it
}

#if DWARF_UNWIND
#include "unwind.h"
#endif

static __always_inline void note_stack_error(int err, u32 collision, u32 fault) {
    if (err == -EEXIST)
        note(collision);
    else if (err == -EFAULT)
        note(fault);
    else
        note(STACK_OTHER_ERROR);
}

int on_cpu_sample(struct bpf_perf_event_data *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    u32 tid = (u32)id;
    if (tid == 0)
        return 0;  // the idle task: not work anyone can act on
    note(SAMPLES_SEEN);

    u64 cgroup_id = bpf_get_current_cgroup_id();
    u32 zero = 0;
    u32 *enabled = filter_enabled.lookup(&zero);
    if (enabled && *enabled) {
        if (!filter_cgroups.lookup(&cgroup_id) && !filter_pids.lookup(&tgid)) {
            note(SAMPLES_FILTERED);
            return 0;
        }
    }

    struct sample_key key = {};
    key.pid = tgid;
    key.tid = tid;
    key.cgroup_id = cgroup_id;
    key.user_stack_id = -ENOENT;
#if DWARF_UNWIND
    // Processes with unwind tables get their user stack from the tables; the rest, and any
    // sample whose walk cannot start, keep the kernel's frame-pointer walk.
    key.user_stack_hash = unwind_user_stack(ctx, tgid);
#endif
    if (!key.user_stack_hash)
        key.user_stack_id = stack_traces.get_stackid(&ctx->regs, BPF_F_USER_STACK);
    key.kernel_stack_id = stack_traces.get_stackid(&ctx->regs, 0);
    if (!key.user_stack_hash && key.user_stack_id < 0)
        note_stack_error(key.user_stack_id, USER_STACK_COLLISION, USER_STACK_FAULT);
    if (key.kernel_stack_id < 0)
        note_stack_error(key.kernel_stack_id, KERNEL_STACK_COLLISION, KERNEL_STACK_FAULT);

    u64 *count = counts.lookup(&key);
    if (count) {
        (*count)++;
    } else {
        u64 one = 1;
        if (counts.update(&key, &one) != 0)
            note(COUNT_MAP_FULL);
    }
    return 0;
}
