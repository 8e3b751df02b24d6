/* The bench's C workload: main -> outer -> middle -> leaf, a known call chain, counting the
 * outer() calls it finishes so that a profiler's cost shows as lost throughput.
 *
 * argv[1]: seconds to run (0: until SIGTERM or SIGINT); argv[2]: busy share in percent
 * (default 100: it sleeps the rest of every 10 ms slice). At exit it prints one line,
 * "iterations=N seconds=S cpu=C" (C: its own CPU seconds, interrupt-time work charged to it
 * included), and the bench divides them. The tests build it too
 * (tests/helpers/workload.py): one workload for both.
 *
 * Every function keeps a volatile local array: gcc drops the frame pointer of frameless leaf
 * functions even with -fno-omit-frame-pointer (FACTS.md), and then a frame-pointer walk from
 * the leaf would skip its caller.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stopping;

static void on_signal(int signum) {
    (void)signum;
    stopping = 1;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) unsigned long leaf(unsigned long n) {
    volatile unsigned long frame[4];
    frame[0] = n;
    for (unsigned long i = 0; i < 200000; i++) frame[0] = frame[0] * 6364136223846793005UL + i;
    return frame[0];
}

__attribute__((noinline)) unsigned long middle(unsigned long n) {
    volatile unsigned long frame[4];
    frame[1] = leaf(n) + leaf(n + 1) + leaf(n + 2);
    return frame[1];
}

__attribute__((noinline)) unsigned long outer(unsigned long n) {
    volatile unsigned long frame[4];
    frame[2] = middle(n) ^ middle(n * 3);
    return frame[2];
}

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 0;
    int busy = argc > 2 ? atoi(argv[2]) : 100;
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    double start = now(), elapsed = 0;
    unsigned long iterations = 0;
    volatile unsigned long sink = 0;
    /* One outer() call is about a millisecond: reading the clock after each costs nothing. */
    double slice = start;
    while (!stopping) {
        sink += outer(sink);
        iterations++;
        double t = now();
        elapsed = t - start;
        if (seconds > 0 && elapsed >= seconds) break;
        if (busy < 100 && t - slice >= 0.01 * busy / 100.0) {
            usleep((useconds_t)(10000 * (100 - busy) / 100));
            slice = now();
        }
    }
    struct timespec cpu;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &cpu);
    printf("iterations=%lu seconds=%.6f cpu=%.6f\n", iterations, now() - start,
           cpu.tv_sec + cpu.tv_nsec / 1e9);
    return (int)(sink & 0);
}
