/* An LD_PRELOAD library for fio, built by benchmarks/bench_io.py for `--buffers huge_pages`:
 * a malloc of FIO_HUGE_PAGES_MIN to FIO_HUGE_PAGES_MAX bytes (fio 3.x allocates each job's I/O
 * buffer as bs x iodepth plus two page masks) returns 2 MiB-aligned anonymous memory with
 * MADV_HUGEPAGE (untouched, as glibc's fresh blocks are: the first read faults its pages in,
 * in the 1-read set-up run that bench_io subtracts too), so that fio reads into transparent
 * huge pages as the reader's grid then does (on the project's virtio disk a read into huge
 * pages is up to 2x faster than into small ones, for fio as for the reader). Such blocks are
 * never freed (fio keeps its buffers for its life); other allocations go to glibc as usual.
 * Linux with glibc only. */
#define _GNU_SOURCE
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

extern void *__libc_malloc(size_t);
extern void __libc_free(void *);
extern void *__libc_realloc(void *, size_t);

#include <stdlib.h>

#define HUGE_PAGE (2u << 20)
#define MAX_BLOCKS 256 /* at most 512 MiB: fio's jobs' buffers (64 jobs in bench_io's grid) */
static void *blocks[MAX_BLOCKS];
static size_t sizes[MAX_BLOCKS];
static int nblocks;
static size_t lo = 1, hi; /* the sizes to serve (read once; lo > hi: none) */

static int wanted(size_t n) {
    if (lo == 1) { /* getenv and strtoull allocate nothing */
        const char *a = getenv("FIO_HUGE_PAGES_MIN"), *b = getenv("FIO_HUGE_PAGES_MAX");
        hi = b ? (size_t)strtoull(b, NULL, 10) : 0;
        lo = a ? (size_t)strtoull(a, NULL, 10) : 2;
    }
    return n >= lo && n <= hi;
}

void *malloc(size_t n) {
    if (!wanted(n) || __atomic_load_n(&nblocks, __ATOMIC_ACQUIRE) >= MAX_BLOCKS) return __libc_malloc(n);
    size_t len = (n + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE;
    char *m = mmap(NULL, len + HUGE_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return NULL;
    char *p = (char *)(((uintptr_t)m + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE);
    madvise(p, len, MADV_HUGEPAGE);
    int i = __atomic_fetch_add(&nblocks, 1, __ATOMIC_ACQ_REL);
    if (i >= MAX_BLOCKS) return p; /* (lost track of it: never freed, which is what we do anyway) */
    sizes[i] = len;
    __atomic_store_n(&blocks[i], p, __ATOMIC_RELEASE);
    return p;
}

static size_t size_of_ours(const void *p) {
    int n = __atomic_load_n(&nblocks, __ATOMIC_ACQUIRE);
    for (int i = 0; i < n && i < MAX_BLOCKS; i++)
        if (__atomic_load_n(&blocks[i], __ATOMIC_ACQUIRE) == p) return sizes[i];
    return 0;
}

void free(void *p) {
    if (p && size_of_ours(p)) return;
    __libc_free(p);
}

void *realloc(void *p, size_t n) {
    size_t had = p ? size_of_ours(p) : 0;
    if (!had) return __libc_realloc(p, n);
    if (n <= had) return p;
    void *q = malloc(n);
    if (q) memcpy(q, p, had);
    return q;
}
