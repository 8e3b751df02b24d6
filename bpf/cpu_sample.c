// CPU stack sampling: runs on every software cpu-clock perf event (one per online CPU).
// Counts samples in the kernel by (process, thread, cgroup, user stack, kernel stack), so the
// collector only drains aggregates; unprofiled work costs one filter lookup.
//
// The collector compiles this with BCC and sets, with -D: COUNTS_MAX, STACKS_MAX, FILTER_MAX,
// KNOWN_PIDS_MAX, NEW_PIDS_MAX, and DWARF_UNWIND (0 or 1) with, when 1, UNWIND_ROWS_MAX,
// UNWIND_MAPPINGS_MAX, UNWIND_PROCESSES_MAX, UNWOUND_STACKS_MAX and ROW_CACHE_SLOTS.
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
// Processes whose /proc the collector has read (or tried to: see RETRY_UNREADABLE_AFTER in
// services/collector/service.py). A sampled process missing from it is put in new_pids, which
// the collector empties as soon as new_pid_events wakes it, although it drains the counts
// only every few seconds on small hosts: a new process has its maps read (and its unwind
// tables loaded) within milliseconds of its first sample, while it still lives. LRU: a process
// evicted here is only announced once more, and the collector knows it already.
BPF_TABLE("lru_hash", u32, u8, known_pids, KNOWN_PIDS_MAX);
BPF_HASH(new_pids, u32, u32, NEW_PIDS_MAX);  // pid -> its samples since it was listed
// A wake-up, not a channel: a record (the pid) each time new_pids gains a process. The
// collector polls this map's fd and, when it is readable, marks every record read without
// looking at them and takes new_pids; so it sleeps while no process is new and wakes within
// milliseconds when one is. A record lost to a full buffer only delays that pid to the next
// drain, which takes new_pids too.
BPF_RINGBUF_OUTPUT(new_pid_events, 1);

static __always_inline void note(u32 kind) {
    u64 *n = problems.lookup(&kind);
    if (n)
        (*n)++;  // per-CPU slot: no other CPU writes it
}

static __always_inline void note_stack_error(int err, u32 collision, u32 fault) {
    if (err == -EEXIST)
        note(collision);
    else if (err == -EFAULT)
        note(fault);
    else
        note(STACK_OTHER_ERROR);
}

static __always_inline void note_new_process(u32 tgid) {
    if (known_pids.lookup(&tgid))
        return;
    // Its samples so far: the collector loads the busiest new processes' unwind tables first.
    u32 *seen = new_pids.lookup(&tgid);
    if (seen) {
        __sync_fetch_and_add(seen, 1);  // threads of one process sample on several CPUs
        return;
    }
    u32 one = 1;
    // BPF_NOEXIST: another CPU listed it just now. When new_pids is full the pid simply waits
    // for the next count drain, which reads every process it does not know either.
    if (new_pids.insert(&tgid, &one) == 0)
        new_pid_events.ringbuf_output(&tgid, sizeof(tgid), 0);
}

// Adds one to the sample's count.
static __always_inline void count_sample(struct sample_key *key) {
    if (key->kernel_stack_id < 0)
        note_stack_error(key->kernel_stack_id, KERNEL_STACK_COLLISION, KERNEL_STACK_FAULT);
    u64 *count = counts.lookup(key);
    if (count) {
        (*count)++;
    } else {
        u64 one = 1;
        if (counts.update(key, &one) != 0)
            note(COUNT_MAP_FULL);
    }
}

// The frame-pointer walk of the user stack (the kernel's), then the count.
static __always_inline void count_with_frame_pointers(struct bpf_perf_event_data *ctx,
                                                      struct sample_key *key) {
    key->user_stack_hash = 0;
    key->user_stack_id = stack_traces.get_stackid(&ctx->regs, BPF_F_USER_STACK);
    if (key->user_stack_id < 0)
        note_stack_error(key->user_stack_id, USER_STACK_COLLISION, USER_STACK_FAULT);
    count_sample(key);
}

#if DWARF_UNWIND
// ---- User stacks without frame pointers (DWARF_UNWIND) --------------------------------------
// A walk over unwind tables built from .eh_frame (services/collector/unwind/,
// docs/unwinding.md). In this file, not a header: BCC only rewrites and loads the main file.
//
// Per frame: find the mapping of the pc in the process's mapping list (the previous frame's
// mapping first), find the row covering the pc (in row_cache, else by a binary search of the
// mapping's rows, a slice of one shared row array), compute the CFA
// from rsp or rbp, read the return address at CFA-8 and the caller's rbp where the row says it
// was saved. The walk runs FRAMES_PER_PROGRAM frames per program and goes on in a tail call to
// itself, so the verifier checks a few frames, not MAX_DEPTH (BCC 0.26 cannot build bpf_loop
// callbacks). x86_64 only: the return address at CFA-8 and the pt_regs fields are that ABI's.

#define MAPPING_SEARCH_STEPS 16  // 2^16 >= UNWIND_MAPPINGS_MAX
#define ROW_SEARCH_STEPS 22      // 2^22 rows >= UNWIND_ROWS_MAX
#define FRAMES_PER_PROGRAM 8
#define UNWIND_PROGRAM 0         // index of unwind_user_stack in unwind_programs

// enum in services/collector/unwind/eh_frame.py
#define CFA_NONE 0
#define CFA_RSP 1
#define CFA_RBP 2
#define CFA_PLT 3
#define CFA_STACK_END 4
#define CFA_UNSUPPORTED 5
#define RBP_LOST (-128)

struct unwind_row {
    u32 pc;           // ELF virtual address where these rules start
    u16 cfa_offset;   // CFA = (rsp or rbp) + cfa_offset; for CFA_PLT the pc & 15 threshold
    u8 cfa_type;
    u8 rbp_offset8;   // as s8: the caller's rbp is saved at CFA + 8 * this; 0: unchanged
                      // (u8 here: BCC's Python side has no ctype for signed char)
};

struct unwind_mapping {
    u64 start;        // [start, end) in the process's address space
    u64 end;
    u64 bias;         // runtime address - bias = the ELF virtual address of the table's rows
    u32 first_row;    // the table: rows [first_row, first_row + rows) of unwind_rows
    u32 rows;         // 0: no table (vdso, a file without CFI): one frame-pointer step
    u32 table_id;     // this placement of the table; never reused, so row_cache needs no flush
};

struct unwind_process {
    u32 first_mapping;  // its mappings: [first_mapping, + count) of unwind_mappings, by start
    u32 count;
};

struct unwound_stack {
    u64 len;
    u64 addrs[MAX_DEPTH];  // innermost first: the sample's pc, then return addresses
};

struct unwind_state {
    u64 ip, sp, bp;
    u64 hash;
    u32 stop;          // enum unwind_stat of the reason the walk ended, 0 while it runs
    u32 tail_calls;
    u32 first_mapping; // the process's mappings, copied from unwind_processes at the start
    u32 mappings;
    u32 last_mapping;  // index of the previous frame's mapping: most callers are in the same file
    u32 cache_hits;    // rows found in row_cache, and by search: added to unwind_stats at the end
    u32 searches;
    struct sample_key key;
    struct unwound_stack stack;
};

// Indexes into unwind_stats; bpf_program.py reads them by the same names.
enum unwind_stat {
    UNWIND_RUNNING = 0,
    UNWIND_STACKS = 1,          // user stacks walked with tables
    UNWIND_END_OUTERMOST = 2,   // ended at the outermost frame (undefined return address, 0)
    UNWIND_END_NO_MAPPING = 3,  // a pc outside every known mapping (JIT, or maps changed)
    UNWIND_END_NOT_COVERED = 4, // a pc in a mapping whose table does not cover it
    UNWIND_END_UNSUPPORTED = 5, // a row the table could not express (CFA in another register)
    UNWIND_END_READ_FAULT = 6,  // the stack could not be read where the rules point
    UNWIND_END_TRUNCATED = 7,   // MAX_DEPTH frames and still not at the end
    UNWIND_FP_STEPS = 8,        // frames crossed with frame pointers (mappings without tables)
    UNWIND_KERNEL_MODE = 9,     // samples in kernel mode: walked from the task's saved user regs
    UNWIND_NO_REGS = 10,        // ... whose user registers could not be read (FP walk instead)
    UNWIND_STACK_MAP_FULL = 11, // unwound_stacks had no room: the FP walk was used instead
    UNWIND_ROW_CACHE_HITS = 12, // frames whose row came from row_cache
    UNWIND_ROW_SEARCHES = 13,   // ... whose row took a binary search (then cached)
    UNWIND_STAT_KINDS = 14,
};

// Both arrays are shared by every process and file; the collector allocates their slices.
// Lookups by key, not pointer arithmetic inside one large value: the verifier then prunes the
// paths of a binary search (a value pointer with a variable offset made one frame cost 400,000
// verified instructions).
BPF_ARRAY(unwind_rows, struct unwind_row, UNWIND_ROWS_MAX);
BPF_ARRAY(unwind_mappings, struct unwind_mapping, UNWIND_MAPPINGS_MAX);
BPF_HASH(unwind_processes, u32, struct unwind_process, UNWIND_PROCESSES_MAX);
BPF_F_TABLE("hash", u64, struct unwound_stack, unwound_stacks, UNWOUND_STACKS_MAX, BPF_F_NO_PREALLOC);
BPF_PERCPU_ARRAY(unwind_scratch, struct unwind_state, 1);
// Rows found lately, by (table placement, ELF address of the pc). A binary search touches up
// to ~20 rows far apart in an 8 MB array, each a likely cache and TLB miss when the program
// runs from a timer interrupt on a CPU busy with the workload; a profiled program's stacks
// repeat the same return addresses, and its hot loops the same few pcs, found here in one
// lookup. Measured on this VM (docs/unwinding.md): ~20 -> ~15 us a sample.
// Direct-mapped and per CPU: the lookup is an array access (inlined by the verifier on recent
// kernels, 6.18 here; a hash map's is a helper call and a hash), nothing is shared between
// CPUs (no torn or reused entries), and a collision just replaces the entry. Table ids start
// at 1, so an empty entry matches nothing.
struct row_cache_entry {
    u32 table_id;
    u32 vaddr;
    struct unwind_row row;
};
BPF_PERCPU_ARRAY(row_cache, struct row_cache_entry, ROW_CACHE_SLOTS);

static __always_inline u32 row_cache_slot(u32 table_id, u32 vaddr) {
    u32 h = (table_id * 0x9E3779B1u) ^ vaddr;
    h *= 0x85EBCA6Bu;
    return (h >> 16) & (ROW_CACHE_SLOTS - 1);
}
BPF_PERCPU_ARRAY(unwind_stats, u64, UNWIND_STAT_KINDS);
BPF_PROG_ARRAY(unwind_programs, 1);

static __always_inline void unwind_add(u32 kind, u64 count) {
    u64 *n = unwind_stats.lookup(&kind);
    if (n)
        *n += count;
}

static __always_inline void unwind_note(u32 kind) {
    unwind_add(kind, 1);
}

// x ^ seed ^ seed: the same value, but the verifier loses its bounds. The binary searches below
// use it so that paths through different halvings look alike to the verifier and are pruned;
// without it every path is explored and a few frames exceed the verifier's budget. (Parca Agent
// does the same, see its "opaquify".)
static __always_inline u32 opaque32(u32 x) {
    u32 seed = 0xffffffff;
    asm volatile("%0 ^= %1\n%0 ^= %1\n" : "+&r"(x) : "r"(seed));
    return x;
}

// The mapping holding pc, or NULL; remembered in st->last_mapping for the next frame.
static __always_inline struct unwind_mapping *find_mapping(struct unwind_state *st, u64 pc) {
    u32 index = st->last_mapping;
    struct unwind_mapping *m = unwind_mappings.lookup(&index);
    if (m && m->start <= pc && pc < m->end)
        return m;
    u32 first = st->first_mapping, left = 0, right = st->mappings;
    for (int i = 0; i < MAPPING_SEARCH_STEPS + 1; i++) {
        if (left >= right)
            break;
        u32 mid = opaque32((left + right) / 2);
        left = opaque32(left);
        right = opaque32(right);
        index = first + mid;
        m = unwind_mappings.lookup(&index);
        if (!m)
            return NULL;
        if (m->start <= pc)
            left = mid + 1;
        else
            right = mid;
    }
    if (left == 0)
        return NULL;
    index = first + left - 1;
    m = unwind_mappings.lookup(&index);
    if (!m || pc >= m->end)
        return NULL;
    st->last_mapping = index;
    return m;
}

// The last row of [first, first + count) whose pc <= pc, or NULL.
static __always_inline struct unwind_row *find_row(u32 first, u32 count, u32 pc) {
    u32 left = 0, right = count;
    for (int i = 0; i < ROW_SEARCH_STEPS + 1; i++) {
        if (left >= right)
            break;
        u32 mid = opaque32((left + right) / 2);
        left = opaque32(left);
        right = opaque32(right);
        u32 index = first + mid;
        struct unwind_row *row = unwind_rows.lookup(&index);
        if (!row)
            return NULL;
        if (row->pc <= pc)
            left = mid + 1;
        else
            right = mid;
    }
    if (left == 0)
        return NULL;
    u32 index = first + left - 1;
    return unwind_rows.lookup(&index);
}

static __always_inline int unwind_stop(struct unwind_state *st, u32 reason) {
    st->stop = reason;
    return 1;
}

// One frame: record the current pc, then find the caller's registers. 1: the walk ended.
static __always_inline int unwind_frame(struct unwind_state *st) {
    u64 n = st->stack.len;
    if (n >= MAX_DEPTH)
        return unwind_stop(st, UNWIND_END_TRUNCATED);
    st->stack.addrs[n] = st->ip;
    st->stack.len = n + 1;
    st->hash = (st->hash ^ st->ip) * 0x9E3779B97F4A7C15ULL;
    st->hash ^= st->hash >> 29;

    // A return address points after the call: look up the call itself.
    u64 pc = n == 0 ? st->ip : st->ip - 1;
    struct unwind_mapping *m = find_mapping(st, pc);
    if (!m)
        return unwind_stop(st, UNWIND_END_NO_MAPPING);
    u64 cfa, ra = 0, bp = st->bp;
    if (m->rows == 0) {
        // No table for this file (the vdso): trust the frame pointer for one frame.
        u64 frame[2];
        if (st->bp == 0 || bpf_probe_read_user(frame, sizeof(frame), (void *)st->bp) != 0)
            return unwind_stop(st, UNWIND_END_READ_FAULT);
        unwind_note(UNWIND_FP_STEPS);
        st->sp = st->bp + 16;
        st->bp = frame[0];
        st->ip = frame[1];
        return st->ip == 0 ? unwind_stop(st, UNWIND_END_OUTERMOST) : 0;
    }
    u64 vaddr = pc - m->bias;
    if (vaddr > 0xffffffffULL)
        return unwind_stop(st, UNWIND_END_NOT_COVERED);
    u32 slot = row_cache_slot(m->table_id, (u32)vaddr);
    struct row_cache_entry *cached = row_cache.lookup(&slot);
    struct unwind_row rules;
    if (cached && cached->table_id == m->table_id && cached->vaddr == (u32)vaddr) {
        rules = cached->row;
        st->cache_hits++;
    } else {
        struct unwind_row *row = find_row(m->first_row, m->rows, (u32)vaddr);
        if (!row)
            return unwind_stop(st, UNWIND_END_NOT_COVERED);
        rules = *row;
        st->searches++;
        if (cached) {
            cached->table_id = m->table_id;
            cached->vaddr = (u32)vaddr;
            cached->row = rules;
        }
    }
    u8 cfa_type = rules.cfa_type;
    u64 cfa_offset = rules.cfa_offset;
    s64 rbp_offset8 = (s8)rules.rbp_offset8;
    if (cfa_type == CFA_RSP)
        cfa = st->sp + cfa_offset;
    else if (cfa_type == CFA_RBP)
        cfa = st->bp + cfa_offset;
    else if (cfa_type == CFA_PLT)
        cfa = st->sp + 8 + (((pc & 15) >= cfa_offset) ? 8 : 0);
    else if (cfa_type == CFA_STACK_END)
        return unwind_stop(st, UNWIND_END_OUTERMOST);
    else if (cfa_type == CFA_NONE)
        return unwind_stop(st, UNWIND_END_NOT_COVERED);
    else
        return unwind_stop(st, UNWIND_END_UNSUPPORTED);
    if (bpf_probe_read_user(&ra, sizeof(ra), (void *)(cfa - 8)) != 0)
        return unwind_stop(st, UNWIND_END_READ_FAULT);
    if (rbp_offset8 == RBP_LOST) {
        bp = 0;
    } else if (rbp_offset8 != 0) {
        if (bpf_probe_read_user(&bp, sizeof(bp), (void *)(cfa + rbp_offset8 * 8)) != 0)
            return unwind_stop(st, UNWIND_END_READ_FAULT);
    }
    if (ra == 0)
        return unwind_stop(st, UNWIND_END_OUTERMOST);
    st->ip = ra;
    st->sp = cfa;
    st->bp = bp;
    return 0;
}

// Continues the walk of the sample in unwind_scratch; counts the sample when it ends.
int unwind_user_stack(struct bpf_perf_event_data *ctx) {
    u32 zero = 0;
    struct unwind_state *st = unwind_scratch.lookup(&zero);
    if (!st)
        return 0;
    for (int i = 0; i < FRAMES_PER_PROGRAM; i++) {
        if (unwind_frame(st))
            goto done;
    }
    st->tail_calls++;
    unwind_programs.call(ctx, UNWIND_PROGRAM);
    // The tail call limit (33) or a missing program: end here.
    unwind_stop(st, UNWIND_END_TRUNCATED);
done:
    unwind_note(UNWIND_STACKS);
    unwind_note(st->stop);
    unwind_add(UNWIND_ROW_CACHE_HITS, st->cache_hits);
    unwind_add(UNWIND_ROW_SEARCHES, st->searches);
    u64 hash = st->hash | 1;  // never 0: 0 means "no unwound stack"
    // Most samples repeat a stack the map holds since the last drain: a lookup, not an update
    // that allocates and copies 1 KB. Keys are content hashes, so the entry is this stack.
    if (!unwound_stacks.lookup(&hash) && unwound_stacks.insert(&hash, &st->stack) != 0
        && !unwound_stacks.lookup(&hash)) {  // another CPU may have inserted it just now
        unwind_note(UNWIND_STACK_MAP_FULL);
        count_with_frame_pointers(ctx, &st->key);
        return 0;
    }
    st->key.user_stack_hash = hash;
    st->key.user_stack_id = -ENOENT;
    count_sample(&st->key);
    return 0;
}

// Starts the table walk when the process has tables: 1 when the walk took the sample over.
static __always_inline int start_unwinding(struct bpf_perf_event_data *ctx,
                                           struct sample_key *key) {
    struct unwind_process *proc = unwind_processes.lookup(&key->pid);
    if (!proc)
        return 0;
    u32 zero = 0;
    struct unwind_state *st = unwind_scratch.lookup(&zero);
    if (!st)
        return 0;
    st->first_mapping = proc->first_mapping;
    st->mappings = proc->count;
    st->last_mapping = 0xffffffff;  // none yet: no such index
    st->cache_hits = 0;
    st->searches = 0;
    u64 ip = PT_REGS_IP(&ctx->regs);
    if (ip >> 63) {
        // Kernel mode: the user registers were saved at the top of the task's kernel stack.
        unwind_note(UNWIND_KERNEL_MODE);
        struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
        struct pt_regs user = {};
        if (!regs || bpf_probe_read_kernel(&user, sizeof(user), regs) != 0 || user.ip >> 63
            || user.ip == 0) {
            unwind_note(UNWIND_NO_REGS);
            return 0;
        }
        st->ip = user.ip;
        st->sp = user.sp;
        st->bp = user.bp;
    } else {
        st->ip = ip;
        st->sp = PT_REGS_SP(&ctx->regs);
        st->bp = PT_REGS_FP(&ctx->regs);
    }
    st->key = *key;
    st->stop = UNWIND_RUNNING;
    st->tail_calls = 0;
    st->hash = 0xcbf29ce484222325ULL;
    st->stack.len = 0;
    unwind_programs.call(ctx, UNWIND_PROGRAM);
    return 0;  // the tail call failed (not loaded yet): frame pointers
}
#endif

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

    note_new_process(tgid);

    struct sample_key key = {};
    key.pid = tgid;
    key.tid = tid;
    key.cgroup_id = cgroup_id;
    key.user_stack_id = -ENOENT;
    // A pc in the lower half is user code: no kernel stack. The helper would say -EFAULT too,
    // after work that costs 1-2 us a sample on this VM (most samples of busy programs).
    if (PT_REGS_IP(&ctx->regs) >> 63)
        key.kernel_stack_id = stack_traces.get_stackid(&ctx->regs, 0);
    else
        key.kernel_stack_id = -EFAULT;
#if DWARF_UNWIND
    // Processes with unwind tables get their user stack from the tables (the walk continues in
    // unwind_user_stack, which counts the sample); the rest, and any sample whose walk cannot
    // start, keep the kernel's frame-pointer walk.
    if (start_unwinding(ctx, &key))
        return 0;
#endif
    count_with_frame_pointers(ctx, &key);
    return 0;
}
