/* Thread fan-out shared by the C kernels (the sources under kernels/ include it; kernels.c_build hashes it with them). */
#ifndef MMREC_KERNELS_PARALLEL_H
#define MMREC_KERNELS_PARALLEL_H

#include <pthread.h>
#include <stddef.h>

#define MAX_THREADS 64

/* Run fn on each of the n jobs (an array of `size`-byte records), one POSIX thread per job, the
   caller's thread taking the first. A job whose thread cannot be started runs on the caller's
   thread afterwards, so every job runs exactly once. n <= MAX_THREADS. */
static void run_jobs(void *jobs, size_t size, int n, void *(*fn)(void *)) {
    pthread_t ids[MAX_THREADS];
    char *base = jobs;
    int started = 1;
    for (int i = 1; i < n; i++, started++)
        if (pthread_create(&ids[i], NULL, fn, base + (size_t)i * size) != 0) break;
    fn(base);
    for (int i = 1; i < started; i++) pthread_join(ids[i], NULL);
    for (int i = started; i < n; i++) fn(base + (size_t)i * size);
}

#endif
