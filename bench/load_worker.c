/* A process of the load run: argv[1] busy threads spinning in a small call chain, and a main
 * thread that wakes every 50 ms for a moment of work, so that even "idle" processes show up in
 * samples now and then. Runs until killed. */
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

__attribute__((noinline)) unsigned long spin(unsigned long n) {
    volatile unsigned long x = n;
    for (unsigned long i = 0; i < n; i++) x = x * 6364136223846793005UL + i;
    return x;
}

__attribute__((noinline)) unsigned long step(unsigned long n) { return spin(n) ^ spin(n + 1); }

static void *busy(void *arg) {
    (void)arg;
    volatile unsigned long sink = 0;
    for (;;) sink += step(100000);
    return NULL;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 0;
    for (int i = 0; i < threads; i++) {
        pthread_t t;
        pthread_create(&t, NULL, busy, NULL);
    }
    volatile unsigned long sink = 0;
    for (;;) {
        sink += step(20000);
        usleep(50000);
    }
}
