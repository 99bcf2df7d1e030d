/* Work sharing for unihal's native CPU kernels: parallel_for(fn, ctx, nitems, nthreads).
 *
 * Included by each kernel file (static functions: each translation unit has its own copy, and
 * without OpenMP its own pool). Needs <pthread.h>, <sched.h> and <time.h> from the includer, and
 * _POSIX_C_SOURCE >= 200809L for clock_gettime.
 */
#ifndef HAL_NATIVE_PARALLEL_H
#define HAL_NATIVE_PARALLEL_H

/* a spin-wait hint */
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

typedef void (*item_fn)(void *ctx, long item, int tid);

#ifdef _OPENMP
/* OpenMP. In a process that imported torch, libgomp.so.1 is torch's own (its wheel ships it under
 * that soname), so these parallel regions run on torch's intra-op threads: no second pool competes
 * with them for the cores (their idle threads spin for a while after each torch operator). */
#include <omp.h>

/* Run fn(ctx, item, tid) for item in [0, nitems), items taken dynamically by up to nthreads threads. */
static void parallel_for(item_fn fn, void *ctx, long nitems, int nthreads) {
    if (nthreads > nitems) nthreads = (int)nitems;
    if (nthreads <= 1) {
        for (long i = 0; i < nitems; i++) fn(ctx, i, 0);
        return;
    }
    long next = 0;
#pragma omp parallel num_threads(nthreads)
    {
        int tid = omp_get_thread_num();
        long i;
        while ((i = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED)) < nitems) fn(ctx, i, tid);
    }
}

#else
/* ------------------------------------------------------------------------------------------ */
/* without OpenMP: a persistent pthread pool, the caller is worker 0                          */

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_mutex_t call_mu; /* one job at a time; a concurrent caller runs inline */
    int nworkers;            /* threads created (tids 1..nworkers) */
    unsigned long gen;       /* job generation (atomic) */
    int active;              /* workers that have not finished the current job (atomic) */
    long next;               /* next item (atomic) */
    item_fn fn;
    void *ctx;
    long nitems;
    int nthreads;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, 0, 0, 0, 0, 0, 0, 0, 0};

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void pool_after_fork_child(void) {
    /* The workers do not exist in a forked child: start afresh (created again on demand). */
    pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t c = PTHREAD_COND_INITIALIZER;
    pool.mu = m;
    pool.call_mu = m;
    pool.cv = c;
    pool.nworkers = 0;
    pool.gen = 0;
    pool.active = 0;
}

static void atfork_init(void) { pthread_atfork(NULL, NULL, pool_after_fork_child); }

static void run_items(item_fn fn, void *ctx, long nitems, int tid) {
    long i;
    while ((i = __atomic_fetch_add(&pool.next, 1, __ATOMIC_RELAXED)) < nitems) fn(ctx, i, tid);
}

#ifndef SPIN_NS
#define SPIN_NS 50000L /* how long a worker waits for the next job before sleeping (a GEMM's grouped calls come back to back) */
#endif

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

#define MAX_THREADS 256
static unsigned long birth_gen[MAX_THREADS]; /* the generation current when each worker was created */

static void *worker_main(void *arg) {
    int tid = (int)(long)arg;
    unsigned long seen = birth_gen[tid]; /* jobs published before its birth are not its own */
    for (;;) {
        unsigned long g;
        long spins = 0, deadline = 0;
        while ((g = __atomic_load_n(&pool.gen, __ATOMIC_ACQUIRE)) == seen) {
            CPU_RELAX();
            if (++spins % 64) continue;
            long t = now_ns();
            if (!deadline) deadline = t + SPIN_NS;
            if (t < deadline) continue;
            pthread_mutex_lock(&pool.mu);
            while (__atomic_load_n(&pool.gen, __ATOMIC_ACQUIRE) == seen) pthread_cond_wait(&pool.cv, &pool.mu);
            pthread_mutex_unlock(&pool.mu);
        }
        seen = g;
        if (tid < pool.nthreads) run_items(pool.fn, pool.ctx, pool.nitems, tid);
        __atomic_fetch_sub(&pool.active, 1, __ATOMIC_RELEASE);
    }
    return NULL;
}

/* Run fn(ctx, item, tid) for item in [0, nitems) on up to nthreads threads; tid < nthreads. */
static void parallel_for(item_fn fn, void *ctx, long nitems, int nthreads) {
    if (nthreads > nitems) nthreads = (int)nitems;
    if (nthreads <= 1 || pthread_mutex_trylock(&pool.call_mu) != 0) {
        for (long i = 0; i < nitems; i++) fn(ctx, i, 0);
        return;
    }
    pthread_once(&atfork_once, atfork_init);
    pthread_mutex_lock(&pool.mu);
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    while (pool.nworkers < nthreads - 1) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        birth_gen[pool.nworkers + 1] = pool.gen; /* the job published below is its first */
        int ok = pthread_create(&t, &attr, worker_main, (void *)(long)(pool.nworkers + 1)) == 0;
        pthread_attr_destroy(&attr);
        if (!ok) break;
        pool.nworkers++;
    }
    if (nthreads > pool.nworkers + 1) nthreads = pool.nworkers + 1;
    pool.fn = fn;
    pool.ctx = ctx;
    pool.nitems = nitems;
    pool.nthreads = nthreads;
    __atomic_store_n(&pool.next, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&pool.active, pool.nworkers, __ATOMIC_RELAXED);
    __atomic_add_fetch(&pool.gen, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&pool.cv);
    pthread_mutex_unlock(&pool.mu);
    run_items(fn, ctx, nitems, 0);
    for (long spins = 0; __atomic_load_n(&pool.active, __ATOMIC_ACQUIRE) > 0; spins++) {
        if (spins < 200000)
            CPU_RELAX();
        else
            sched_yield();
    }
    pthread_mutex_unlock(&pool.call_mu);
}

#endif /* _OPENMP */

#endif /* HAL_NATIVE_PARALLEL_H */
