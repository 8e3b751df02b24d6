/* A short-lived process for the churn run: a few milliseconds of work, then exit. Built many
 * times with a different -DSEED so that every copy is a distinct binary (its own build id),
 * which is what fills the agent's caches of processes, mappings and symbol tables. */
#ifndef SEED
#define SEED 1
#endif

__attribute__((noinline)) unsigned long work(unsigned long n) {
    volatile unsigned long x = SEED;
    for (unsigned long i = 0; i < n; i++) x = x * 6364136223846793005UL + i + SEED;
    return x;
}

int main(void) {
    return (int)(work(3000000) & 0);
}
