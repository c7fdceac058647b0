/* The native engine of mlx_flash's reader: a whole request planned, read and delivered in C
 * with the GIL released.
 *
 * A request arrives as its sorted neuron ids (int64), where each id's row goes in the outputs
 * (None: row k to row k), the output arrays, and the layer's `Layout` (made once per layer:
 * per segment the file, where its rows start, their size, and which bytes of a row become
 * which output, as which dtype). `plan_batch` turns it into reads exactly as the Python planner
 * `plan.plan_chunks` does (each row widened to whole `align` blocks, neighbours at most
 * `coalesce_gap` apart merged, a read stops growing past `max_read`; the tests compare the two
 * on random cases), and each read's iovecs: straight into the output rows when the outputs are
 * aligned and the segment's parts are float32 of whole blocks (each part of each row one
 * iovec, the gaps between wanted rows into a junk buffer), else into the request's span of a
 * scratch buffer (reused from request to request), whose rows the thread that read them
 * converts into the outputs (float16 and bfloat16 to float32, exactly; other bytes copied).
 *
 * Backends:
 *   io_uring  (Linux, where the kernel and the container allow io_uring_setup): one C thread
 *             keeps up to `depth` IORING_OP_READV requests in flight, through the raw system
 *             calls (no liburing), and collects their completions (the ring set up as fio
 *             sets up its own: completions run only when that thread asks for them);
 *   pthreads  (everywhere else, macOS included): `depth` C threads, one blocking preadv each.
 *             On macOS the reader opens its files with F_NOCACHE set and F_RDAHEAD off
 *             (files.py), so the preads bypass the cache there too.
 *
 * Python side (native.py): Engine(depth, backend, faults); .submit(layout, ids, dest, outs)
 * plans and queues a request and returns its `Batch`. A finished batch is handed to exactly
 * one taker: the caller blocked in `Batch.wait()` (the thread that wants the result delivers it
 * itself: no other thread is woken), else `Engine.wait()` (the delivery thread: batches nobody
 * was waiting for, and None once closed and drained). `Batch.error()` names the first failed
 * read, `Batch.stats()` gives the request's counts, summed here (bytes, system calls, where
 * the reads landed, a latency histogram). `Engine.close()` stops: reads not yet issued are
 * cancelled (status ECANCELED), reads in flight finish first.
 *
 * A read is complete when `need` bytes arrived: short reads are continued, EINTR retried; a
 * read that returns 0 bytes before that is a short read (status -1), an error its errno. The
 * first failed read of a batch cancels the batch's reads not yet issued.
 *
 * Faults (tests): [(n, kind)] makes the engine's n-th low-level read (1-based, retries and
 * continuations included) answer EIO (1), 0 bytes (2), at most 512 bytes (3) or EINTR (4). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

#if defined(__linux__) && defined(__has_include)
#if __has_include(<linux/io_uring.h>)
#include <linux/io_uring.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#define HAVE_URING 1
#ifndef __NR_io_uring_setup
#define __NR_io_uring_setup 425 /* the same number on every architecture but alpha */
#endif
#ifndef __NR_io_uring_enter
#define __NR_io_uring_enter 426
#endif
#ifndef __NR_io_uring_register
#define __NR_io_uring_register 427
#endif
/* Setup flags of newer kernels than some headers know (each refused with EINVAL where the
 * kernel is older: ring_setup falls back). */
#ifndef IORING_SETUP_R_DISABLED
#define IORING_SETUP_R_DISABLED (1U << 6) /* 5.10 */
#endif
#ifndef IORING_SETUP_COOP_TASKRUN
#define IORING_SETUP_COOP_TASKRUN (1U << 8) /* 5.19 */
#endif
#ifndef IORING_SETUP_SINGLE_ISSUER
#define IORING_SETUP_SINGLE_ISSUER (1U << 12) /* 6.0 */
#endif
#ifndef IORING_SETUP_DEFER_TASKRUN
#define IORING_SETUP_DEFER_TASKRUN (1U << 13) /* 6.1 */
#endif
#ifndef IORING_REGISTER_ENABLE_RINGS
#define IORING_REGISTER_ENABLE_RINGS 12
#endif
#endif
#endif

enum { ST_OK = 0, ST_SHORT = -1 };
enum { F_NONE = 0, F_EIO = 1, F_SHORT = 2, F_PARTIAL = 3, F_EINTR = 4 };
#define PARTIAL_BYTES 512
enum { BACKEND_PTHREADS = 0, BACKEND_URING = 1 };
enum { CONV_COPY = 0, CONV_F16 = 1, CONV_BF16 = 2 }; /* a column's bytes into its output */
enum { B_FLIGHT = 0, B_DONE = 1, B_TAKEN = 2 };      /* a batch's life */
#define NATIVE_API 2 /* native.py refuses a build of another version (a stale in-place build) */
#define SCRATCH_ALIGN 4096
#define KEEP_SCRATCH 4
/* The latency histogram of stats.LatencyHistogram: bucket k holds [2**(k/4), 2**((k+1)/4)) us. */
#define HIST_PER_DOUBLING 4
#define HIST_BUCKETS (26 * HIST_PER_DOUBLING)

/* -- a layer's layout ------------------------------------------------------------------- */

typedef struct {
    int out;        /* output index */
    int64_t c0, c1; /* bytes [c0, c1) of a row */
    int conv;
} Col;

typedef struct {
    int64_t fd, data_offset, row_bytes;
    int vectored; /* float32 parts of whole blocks tiling the row: may go straight into the outputs */
    int ncols;
    Col *cols;
} Seg;

typedef struct {
    PyObject_HEAD
    int nseg, nouts;
    Seg *segs;
    int64_t *out_row_bytes;
    int64_t align, gap, max_read;
} Layout;

/* One read of a request. */
typedef struct {
    int64_t fd, offset, need, length; /* bytes [offset, offset + length), of which need must arrive */
    int64_t seg, first, stop;         /* the request's sorted ids [first, stop) of segment seg */
    int64_t iov_first, iov_count;
    int64_t scratch_at;               /* its place in the scratch buffer; -1: straight into the outputs */
    int64_t status, got, calls, nanos;
} ReadDesc;
#define READ_FIELDS 14

struct Engine;

typedef struct Batch {
    PyObject_HEAD
    struct Batch *next_pending; /* in the list of batches with reads left to issue */
    struct Batch *next_done;    /* in the list of finished batches nobody waits for */
    int pending, queued, state, waiters;
    pthread_cond_t cv; /* signalled when the batch finishes and someone waits in Batch.wait() */
    struct Engine *engine;
    Layout *layout;
    Py_buffer ids_buf, dest_buf;
    Py_buffer *out_bufs;
    int nouts, has_dest;
    const int64_t *ids, *dest;
    Py_ssize_t nids;
    char **out_base;
    ReadDesc *reads;
    struct iovec *iovs;
    Py_ssize_t nreads, niovs;
    char *scratch;
    size_t scratch_size;
    Py_ssize_t next_read; /* the next read to issue */
    Py_ssize_t remaining; /* reads not finished */
    int failed;
    int64_t t_submit, t_done;
    /* counts (written with the engine's lock held) */
    int64_t bytes_read, bytes_used, calls, into_outputs, via_scratch, lat_total, lat_max;
    int64_t hist[HIST_BUCKETS];
} Batch;

/* One read being executed: where it is, how far it got. */
typedef struct {
    Batch *batch;
    Py_ssize_t index;
    int64_t got, calls, t0;
    struct iovec *iov; /* what is left to fill (points into `copy` once advanced) */
    int niov;
    struct iovec *copy;
    int fault; /* the fault of the system call in flight (io_uring) */
} Flight;

#ifdef HAVE_URING
typedef struct {
    int fd;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    void *sq_ptr, *cq_ptr;
    size_t sq_size, cq_size, sqes_size;
    unsigned pending; /* SQEs written and not yet taken by the kernel */
    unsigned flags;   /* the setup flags the kernel took */
} Ring;
#endif

/* A list of batches linked through one of their `next_*` fields (at byte offset `next`). */
typedef struct {
    Batch *head, *tail;
} BatchList;

typedef struct Engine {
    PyObject_HEAD
    pthread_mutex_t mu;
    pthread_cond_t work_cv, done_cv;
    BatchList pend, done; /* batches with reads to issue; finished batches nobody waits for */
    Py_ssize_t outstanding; /* batches submitted and not yet taken */
    int stop, closed, depth, backend, nthreads, started;
    pthread_t *threads;
    int64_t *fault_at;
    int *fault_kind;
    int nfaults;
    int64_t calls; /* low-level reads so far (for the faults) */
    /* buffers, touched with the GIL held: scratch kept for reuse; the gaps' junk buffers
     * (grown, the old ones kept while batches may still write into them) */
    char *free_scratch[KEEP_SCRATCH];
    size_t free_size[KEEP_SCRATCH];
    char **junk;
    size_t *junk_size;
    int njunk;
#ifdef HAVE_URING
    Ring ring;
#endif
} Engine;

static PyTypeObject EngineType, BatchType, LayoutType;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int hist_bucket(int64_t ns) {
    double us = (double)ns / 1000.0;
    if (us < 1.0) us = 1.0;
    int k = (int)(log2(us) * HIST_PER_DOUBLING);
    return k < HIST_BUCKETS ? k : HIST_BUCKETS - 1;
}

/* The fault of the engine's next low-level read (counts it). Called with mu held or not: the
 * counter is atomic. */
static int next_fault(Engine *e) {
    if (!e->nfaults) return F_NONE;
    int64_t n = __atomic_add_fetch(&e->calls, 1, __ATOMIC_RELAXED);
    for (int i = 0; i < e->nfaults; i++)
        if (e->fault_at[i] == n) return e->fault_kind[i];
    return F_NONE;
}

/* A system call's result as the fault makes it look: bytes (>= 0) or -errno. */
static int64_t apply_fault(int fault, int64_t res) {
    switch (fault) {
    case F_EIO: return -EIO;
    case F_SHORT: return 0;
    case F_EINTR: return -EINTR;
    case F_PARTIAL: return res > PARTIAL_BYTES ? PARTIAL_BYTES : res;
    default: return res;
    }
}

/* -- planning (the C twin of plan.plan_chunks and Request.spans) -------------------------- */

static inline int64_t floor_to(int64_t x, int64_t a) { return x / a * a; }
static inline int64_t ceil_to(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

typedef struct {
    ReadDesc *reads; /* NULL: only count */
    Py_ssize_t nreads, niovs;
    int64_t scratch_bytes, max_gap;
} Plan;

/* One read of segment si: sorted ids [first, stop), bytes [offset, offset + length) of which
 * need must arrive. Vectored (straight into the outputs) when the outputs are aligned, the
 * segment allows it and its iovecs (a part per row, a gap before a row) fit IOV_MAX, as
 * Request.vectored decides; its iovecs are counted, else its place in scratch is taken. */
static void emit_read(const Seg *s, int si, const int64_t *ids, int vec_seg, int64_t first, int64_t stop,
                      int64_t offset, int64_t length, int64_t need, Plan *p) {
    Py_ssize_t count;
    int64_t at = -1;
    if (vec_seg && (stop - first) * (s->ncols + 1) <= IOV_MAX) {
        count = (Py_ssize_t)((stop - first) * s->ncols);
        int64_t pos = offset;
        for (int64_t k = first; k < stop; k++) {
            int64_t st = s->data_offset + ids[k] * s->row_bytes;
            if (st > pos) {
                count++;
                if (st - pos > p->max_gap) p->max_gap = st - pos;
            }
            pos = st + s->row_bytes;
        }
    } else {
        count = 1;
        at = p->scratch_bytes;
        p->scratch_bytes += length;
    }
    if (p->reads) {
        ReadDesc *d = &p->reads[p->nreads];
        memset(d, 0, sizeof *d);
        d->fd = s->fd;
        d->offset = offset;
        d->length = length;
        d->need = need;
        d->seg = si;
        d->first = first;
        d->stop = stop;
        d->iov_first = p->niovs;
        d->iov_count = count;
        d->scratch_at = at;
    }
    p->niovs += count;
    p->nreads++;
}

/* Pass 1: the reads of every segment, in order; the grouping of plan.plan_chunks: each row
 * widened to whole `align` blocks; a new read where the gap between the aligned ranges exceeds
 * the coalescing gap, or where a row's end crosses into the next `max_read` window counted
 * from its group's start. */
static void plan_reads(const Layout *L, const int64_t *ids, Py_ssize_t n, int aligned, Plan *p) {
    p->nreads = p->niovs = 0;
    p->scratch_bytes = p->max_gap = 0;
    int64_t align = L->align, mr = L->max_read > 0 ? L->max_read : 1;
    for (int si = 0; si < L->nseg; si++) {
        const Seg *s = &L->segs[si];
        int vec = aligned && s->vectored;
        int64_t gstart = 0, prev_a1 = 0, prev_w = 0, first = 0, off = 0, prev_end = 0;
        for (Py_ssize_t k = 0; k < n; k++) {
            int64_t st = s->data_offset + ids[k] * s->row_bytes, end = st + s->row_bytes;
            int64_t a0 = floor_to(st, align), a1 = ceil_to(end, align);
            int brk = k == 0 || a0 - prev_a1 > L->gap;
            if (brk) gstart = a0;
            int64_t w = (a1 - 1 - gstart) / mr;
            if (k == 0 || brk || w != prev_w) {
                if (k > 0) emit_read(s, si, ids, vec, first, k, off, prev_a1 - off, prev_end - off, p);
                first = k;
                off = a0;
            }
            prev_w = w;
            prev_a1 = a1;
            prev_end = end;
        }
        if (n > 0) emit_read(s, si, ids, vec, first, n, off, prev_a1 - off, prev_end - off, p);
    }
}

/* Pass 2: the iovecs of every read (gaps into `junk`, scratch reads at `scratch` + their place). */
static void plan_iovecs(const Layout *L, const int64_t *ids, const int64_t *dest, char *const *out_base,
                        const Plan *p, struct iovec *iovs, char *junk, char *scratch) {
    for (Py_ssize_t r = 0; r < p->nreads; r++) {
        const ReadDesc *d = &p->reads[r];
        struct iovec *v = &iovs[d->iov_first];
        if (d->scratch_at >= 0) {
            v->iov_base = scratch + d->scratch_at;
            v->iov_len = (size_t)d->length;
            continue;
        }
        const Seg *s = &L->segs[d->seg];
        int64_t pos = d->offset;
        for (int64_t k = d->first; k < d->stop; k++) {
            int64_t st = s->data_offset + ids[k] * s->row_bytes;
            if (st > pos) {
                v->iov_base = junk;
                v->iov_len = (size_t)(st - pos);
                v++;
            }
            int64_t row = dest ? dest[k] : k;
            for (int c = 0; c < s->ncols; c++) {
                const Col *col = &s->cols[c];
                int64_t nb = col->c1 - col->c0;
                v->iov_base = out_base[col->out] + row * nb;
                v->iov_len = (size_t)nb;
                v++;
            }
            pos = st + s->row_bytes;
        }
    }
}

/* -- delivery of a read that landed in scratch -------------------------------------------- */

/* A float16's bits as a float32's, exactly (numpy's npy_halfbits_to_floatbits). */
static inline uint32_t half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f) return sign | 0x7f800000u | (m << 13);
    if (e == 0) {
        if (m == 0) return sign;
        int shift = 0;
        do {
            shift++;
            m <<= 1;
        } while (!(m & 0x400u));
        return sign | ((uint32_t)(113 - shift) << 23) | ((m & 0x3ffu) << 13);
    }
    return sign | ((e + 112) << 23) | (m << 13);
}

static void convert_cols(const Seg *s, const char *src_row, char *const *out_base, const int64_t *out_row_bytes,
                         int64_t row) {
    for (int c = 0; c < s->ncols; c++) {
        const Col *col = &s->cols[c];
        const char *src = src_row + col->c0;
        char *dst = out_base[col->out] + row * out_row_bytes[col->out];
        int64_t nb = col->c1 - col->c0;
        if (col->conv == CONV_COPY) {
            memcpy(dst, src, (size_t)nb);
        } else {
            uint32_t *d32 = (uint32_t *)dst;
            int64_t n = nb / 2;
            if (col->conv == CONV_F16)
                for (int64_t i = 0; i < n; i++) {
                    uint16_t h;
                    memcpy(&h, src + 2 * i, 2);
                    d32[i] = half_to_float(h);
                }
            else
                for (int64_t i = 0; i < n; i++) {
                    uint16_t h;
                    memcpy(&h, src + 2 * i, 2);
                    d32[i] = (uint32_t)h << 16;
                }
        }
    }
}

/* The rows of read d, in scratch, into the outputs (the reading thread, no lock held). */
static void convert_read(const Batch *b, const ReadDesc *d) {
    const Layout *L = b->layout;
    const Seg *s = &L->segs[d->seg];
    const char *base = b->scratch + d->scratch_at;
    for (int64_t k = d->first; k < d->stop; k++) {
        int64_t pos = s->data_offset + b->ids[k] * s->row_bytes - d->offset;
        convert_cols(s, base + pos, b->out_base, L->out_row_bytes, b->has_dest ? b->dest[k] : k);
    }
}

/* -- the batch lists (mu held) ------------------------------------------------------------ */

#define NEXT(b, next) (*(Batch **)((char *)(b) + (next)))

static void list_unlink(BatchList *l, Batch *b, size_t next) {
    Batch *prev = NULL;
    for (Batch *c = l->head; c; prev = c, c = NEXT(c, next))
        if (c == b) {
            if (prev) NEXT(prev, next) = NEXT(c, next);
            else l->head = NEXT(c, next);
            if (l->tail == c) l->tail = prev;
            break;
        }
}

static void list_push(BatchList *l, Batch *b, size_t next) {
    NEXT(b, next) = NULL;
    if (l->tail) NEXT(l->tail, next) = b;
    else l->head = b;
    l->tail = b;
}

#define PEND offsetof(Batch, next_pending)
#define DONE offsetof(Batch, next_done)

static void unlink_pending(Engine *e, Batch *b) {
    list_unlink(&e->pend, b, PEND);
    b->pending = 0;
}

static void unlink_done(Engine *e, Batch *b) {
    list_unlink(&e->done, b, DONE);
    b->queued = 0;
}

/* The batch's last read stopped: hand it to whoever waits for it, else to the delivery thread. */
static void complete(Engine *e, Batch *b) {
    if (b->pending) unlink_pending(e, b); /* never handed back while still pending */
    b->t_done = now_ns();
    b->state = B_DONE;
    if (b->waiters) {
        pthread_cond_broadcast(&b->cv);
        return;
    }
    b->queued = 1;
    list_push(&e->done, b, DONE);
    pthread_cond_signal(&e->done_cv);
}

/* Cancel the reads of `b` not yet issued (status ECANCELED). */
static void cancel_rest(Engine *e, Batch *b) {
    if (b->next_read < b->nreads) b->failed = 1;
    for (Py_ssize_t i = b->next_read; i < b->nreads; i++) {
        b->reads[i].status = ECANCELED;
        b->reads[i].got = b->reads[i].nanos = b->reads[i].calls = 0;
    }
    b->remaining -= b->nreads - b->next_read;
    b->next_read = b->nreads;
    if (b->pending) unlink_pending(e, b);
    if (b->remaining == 0) complete(e, b);
}

/* Cancel every read not yet issued (closing). */
static void cancel_pending(Engine *e) {
    while (e->pend.head) cancel_rest(e, e->pend.head);
}

/* Take the next read to issue: 1 and (b, i), or 0 when none is pending. A batch leaves the
 * pending list when its last read is issued. */
static int take(Engine *e, Batch **b, Py_ssize_t *i) {
    Batch *h = e->pend.head;
    if (!h) return 0;
    *b = h;
    *i = h->next_read++;
    if (h->next_read >= h->nreads) unlink_pending(e, h);
    return 1;
}

/* Record a finished read and count it into its batch. */
static void finish(Engine *e, Flight *f, int64_t status) {
    Batch *b = f->batch;
    ReadDesc *d = &b->reads[f->index];
    int64_t ns = now_ns() - f->t0;
    d->status = status;
    d->got = f->got;
    d->nanos = ns;
    d->calls = f->calls;
    free(f->copy);
    f->copy = NULL;
    b->calls += f->calls;
    b->lat_total += ns;
    if (ns > b->lat_max) b->lat_max = ns;
    b->hist[hist_bucket(ns)]++;
    if (status == ST_OK) {
        b->bytes_read += f->got;
        b->bytes_used += (d->stop - d->first) * b->layout->segs[d->seg].row_bytes;
        if (d->scratch_at >= 0) b->via_scratch++;
        else b->into_outputs++;
    }
    b->remaining--;
    if (status != ST_OK && !b->failed) {
        b->failed = 1;
        if (b->next_read < b->nreads) {
            cancel_rest(e, b); /* completes the batch when nothing of it is in flight */
            return;
        }
    }
    if (b->remaining == 0) complete(e, b);
}

static void begin(Flight *f, Batch *b, Py_ssize_t i) {
    const ReadDesc *d = &b->reads[i];
    f->batch = b;
    f->index = i;
    f->got = f->calls = 0;
    f->t0 = now_ns();
    f->iov = &b->iovs[d->iov_first];
    f->niov = (int)d->iov_count;
    f->copy = NULL;
    f->fault = F_NONE;
}

/* After a system call delivered `res` bytes (or -errno) for flight f: -2 when it must go on
 * (a retry or a continuation, f advanced), else the final status. */
static int64_t progress(Flight *f, int64_t res) {
    const ReadDesc *d = &f->batch->reads[f->index];
    f->calls++;
    if (res == -EINTR || res == -EAGAIN) return -2;
    if (res < 0) return -res;
    f->got += res;
    if (f->got >= d->need) return ST_OK;
    if (res == 0) return ST_SHORT;
    if (!f->copy) { /* advance a private copy of the iovecs */
        f->copy = malloc(sizeof(struct iovec) * (size_t)f->niov);
        if (!f->copy) return ENOMEM;
        memcpy(f->copy, f->iov, sizeof(struct iovec) * (size_t)f->niov);
        f->iov = f->copy;
    }
    while (res > 0 && f->niov > 0) {
        if ((size_t)res >= f->iov->iov_len) {
            res -= (int64_t)f->iov->iov_len;
            f->iov++;
            f->niov--;
        } else {
            f->iov->iov_base = (char *)f->iov->iov_base + res;
            f->iov->iov_len -= (size_t)res;
            res = 0;
        }
    }
    return f->niov > 0 ? -2 : ST_SHORT;
}

/* A read that ended well and landed in scratch: its rows into the outputs (no lock held). */
static void deliver_read(Flight *f, int64_t status) {
    const ReadDesc *d = &f->batch->reads[f->index];
    if (status == ST_OK && d->scratch_at >= 0) convert_read(f->batch, d);
}

/* -- pthreads backend --------------------------------------------------------------------- */

static ssize_t do_preadv(int fd, const struct iovec *iov, int n, off_t off) {
#if defined(__APPLE__)
    if (__builtin_available(macOS 11.0, *)) return preadv(fd, iov, n, off);
    ssize_t total = 0; /* older macOS: one pread per buffer */
    for (int i = 0; i < n; i++) {
        ssize_t k = pread(fd, iov[i].iov_base, iov[i].iov_len, off + total);
        if (k < 0) return total ? total : -1;
        total += k;
        if ((size_t)k < iov[i].iov_len) break;
    }
    return total;
#else
    return preadv(fd, iov, n, off);
#endif
}


static void *pthread_worker(void *arg) {
    Engine *e = arg;
    Flight f;
    pthread_mutex_lock(&e->mu);
    for (;;) {
        Batch *b;
        Py_ssize_t i;
        while (!take(e, &b, &i)) {
            if (e->stop) {
                pthread_mutex_unlock(&e->mu);
                return NULL;
            }
            pthread_cond_wait(&e->work_cv, &e->mu);
        }
        begin(&f, b, i);
        pthread_mutex_unlock(&e->mu);
        const ReadDesc *d = &b->reads[i];
        int64_t status;
        do {
            int fault = next_fault(e);
            ssize_t k = do_preadv((int)d->fd, f.iov, f.niov, (off_t)(d->offset + f.got));
            status = progress(&f, apply_fault(fault, k < 0 ? -(int64_t)errno : (int64_t)k));
        } while (status == -2);
        deliver_read(&f, status);
        pthread_mutex_lock(&e->mu);
        finish(e, &f, status);
    }
}

/* -- io_uring backend --------------------------------------------------------------------- */

#ifdef HAVE_URING
/* The ring's setup flags, best first (as fio sets them): completions run only when the ring's
 * one thread asks for them in io_uring_enter (no task-work interrupt of that thread, no IPI);
 * SINGLE_ISSUER and DEFER_TASKRUN need the ring's submitter to be that thread, so the ring is
 * created disabled and the worker enables it (ring_enable). Older kernels refuse a flag with
 * EINVAL: the next set is tried. */
static const unsigned RING_FLAGS[] = {
    IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN |
        IORING_SETUP_R_DISABLED,
    IORING_SETUP_COOP_TASKRUN,
    0,
};

static int ring_setup(Ring *r, unsigned entries) {
    struct io_uring_params p;
    memset(r, 0, sizeof *r);
    for (size_t k = 0; k < sizeof RING_FLAGS / sizeof RING_FLAGS[0]; k++) {
        memset(&p, 0, sizeof p);
        p.flags = RING_FLAGS[k];
        r->fd = (int)syscall(__NR_io_uring_setup, entries, &p);
        if (r->fd >= 0 || errno != EINVAL) break;
    }
    if (r->fd < 0) return -errno;
    r->flags = p.flags;
    r->sq_size = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    r->cq_size = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    int single = (p.features & IORING_FEAT_SINGLE_MMAP) != 0;
    if (single) r->sq_size = r->cq_size = r->sq_size > r->cq_size ? r->sq_size : r->cq_size;
    r->sq_ptr = mmap(NULL, r->sq_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd,
                     IORING_OFF_SQ_RING);
    if (r->sq_ptr == MAP_FAILED) goto fail;
    r->cq_ptr = single ? r->sq_ptr
                       : mmap(NULL, r->cq_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                              r->fd, IORING_OFF_CQ_RING);
    if (r->cq_ptr == MAP_FAILED) goto fail;
    r->sqes_size = p.sq_entries * sizeof(struct io_uring_sqe);
    r->sqes = mmap(NULL, r->sqes_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd,
                   IORING_OFF_SQES);
    if (r->sqes == MAP_FAILED) goto fail;
    char *sq = r->sq_ptr, *cq = r->cq_ptr;
    r->sq_head = (unsigned *)(sq + p.sq_off.head);
    r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)(sq + p.sq_off.array);
    r->cq_head = (unsigned *)(cq + p.cq_off.head);
    r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    return 0;
fail:;
    int err = errno;
    if (r->sq_ptr && r->sq_ptr != MAP_FAILED) munmap(r->sq_ptr, r->sq_size);
    if (!single && r->cq_ptr && r->cq_ptr != MAP_FAILED) munmap(r->cq_ptr, r->cq_size);
    close(r->fd);
    r->fd = -1;
    return -err;
}

static void ring_free(Ring *r) {
    if (r->fd < 0) return;
    munmap(r->sqes, r->sqes_size);
    if (r->cq_ptr != r->sq_ptr) munmap(r->cq_ptr, r->cq_size);
    munmap(r->sq_ptr, r->sq_size);
    close(r->fd);
    r->fd = -1;
}

/* In the ring's worker, before its first submission: a ring created disabled is enabled, which
 * makes this thread its single issuer. 0 or -errno. */
static int ring_enable(Ring *r) {
    if (!(r->flags & IORING_SETUP_R_DISABLED)) return 0;
    return syscall(__NR_io_uring_register, r->fd, IORING_REGISTER_ENABLE_RINGS, NULL, 0) < 0 ? -errno : 0;
}

/* Queue one READV for flight `slot` (the ring has room: at most depth are in flight). */
static void ring_push(Ring *r, Flight *f, int slot) {
    const ReadDesc *d = &f->batch->reads[f->index];
    unsigned tail = *r->sq_tail, idx = tail & *r->sq_mask;
    struct io_uring_sqe *sqe = &r->sqes[idx];
    memset(sqe, 0, sizeof *sqe);
    sqe->opcode = IORING_OP_READV;
    sqe->fd = (int)d->fd;
    sqe->off = (uint64_t)(d->offset + f->got);
    sqe->addr = (uint64_t)(uintptr_t)f->iov;
    sqe->len = (unsigned)f->niov;
    sqe->user_data = (uint64_t)slot;
    r->sq_array[idx] = idx;
    __atomic_store_n(r->sq_tail, tail + 1, __ATOMIC_RELEASE);
    r->pending++;
}

static void *ring_worker(void *arg) {
    Engine *e = arg;
    Ring *r = &e->ring;
    int depth = e->depth, inflight = 0, nfree = depth;
    Flight *flights = calloc((size_t)depth, sizeof(Flight));
    int *free_slots = malloc(sizeof(int) * (size_t)depth);
    int *done_slots = malloc(sizeof(int) * (size_t)depth);
    int64_t *done_status = malloc(sizeof(int64_t) * (size_t)depth);
    if (!flights || !free_slots || !done_slots || !done_status) abort(); /* a few KiB */
    for (int s = 0; s < depth; s++) free_slots[s] = s;
    /* (should it fail, which needs a kernel bug, the first io_uring_enter fails with EBADFD and
     * the loop below fails the reads with that error) */
    ring_enable(r);
    pthread_mutex_lock(&e->mu);
    for (;;) {
        Batch *b;
        Py_ssize_t i;
        while (nfree && take(e, &b, &i)) { /* fill the free slots */
            int s = free_slots[--nfree];
            begin(&flights[s], b, i);
            flights[s].fault = next_fault(e);
            ring_push(r, &flights[s], s);
            inflight++;
        }
        if (!inflight) {
            if (e->stop) break;
            pthread_cond_wait(&e->work_cv, &e->mu);
            continue;
        }
        pthread_mutex_unlock(&e->mu);
        long ret = syscall(__NR_io_uring_enter, r->fd, r->pending, 1, IORING_ENTER_GETEVENTS, NULL, 0);
        if (ret >= 0) r->pending -= (unsigned)ret > r->pending ? r->pending : (unsigned)ret;
        else if (errno != EINTR && errno != EAGAIN && errno != EBUSY) {
            /* the ring is unusable: fail what it holds (never seen; would need a kernel bug) */
            int err = errno;
            pthread_mutex_lock(&e->mu);
            for (int s = 0; s < depth; s++)
                if (flights[s].batch) {
                    finish(e, &flights[s], err);
                    flights[s].batch = NULL;
                }
            inflight = 0;
            e->stop = 1;
            cancel_pending(e);
            pthread_cond_broadcast(&e->done_cv);
            break;
        }
        int ndone = 0;
        unsigned head = *r->cq_head, tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
        for (; head != tail; head++) {
            struct io_uring_cqe *cqe = &r->cqes[head & *r->cq_mask];
            int s = (int)cqe->user_data;
            Flight *f = &flights[s];
            int64_t status = progress(f, apply_fault(f->fault, cqe->res));
            if (status == -2) { /* retry or continue: resubmit (the slot stays in flight) */
                f->fault = next_fault(e);
                ring_push(r, f, s);
                continue;
            }
            deliver_read(f, status);
            done_slots[ndone] = s;
            done_status[ndone++] = status;
        }
        __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
        pthread_mutex_lock(&e->mu);
        for (int k = 0; k < ndone; k++) {
            int s = done_slots[k];
            finish(e, &flights[s], done_status[k]);
            flights[s].batch = NULL;
            free_slots[nfree++] = s;
            inflight--;
        }
    }
    pthread_mutex_unlock(&e->mu);
    free(flights);
    free(free_slots);
    free(done_slots);
    free(done_status);
    return NULL;
}
#endif


/* -- Layout ------------------------------------------------------------------------------- */

static void Layout_dealloc(Layout *L) {
    if (L->segs)
        for (int i = 0; i < L->nseg; i++) PyMem_Free(L->segs[i].cols);
    PyMem_Free(L->segs);
    PyMem_Free(L->out_row_bytes);
    Py_TYPE(L)->tp_free((PyObject *)L);
}

/* Layout(segments, out_row_bytes, align, coalesce_gap, max_read): segments a sequence of
 * (fd, data_offset, row_bytes, vectored, columns), columns of (output, c0, c1, conversion). */
static int Layout_init(Layout *L, PyObject *args, PyObject *kw) {
    static char *names[] = {"segments", "out_row_bytes", "align", "coalesce_gap", "max_read", NULL};
    PyObject *segs, *orb;
    long long align, gap, max_read;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOLLL", names, &segs, &orb, &align, &gap, &max_read)) return -1;
    if (L->segs) {
        PyErr_SetString(PyExc_RuntimeError, "Layout already initialized");
        return -1;
    }
    if (align < 1) {
        PyErr_SetString(PyExc_ValueError, "align must be >= 1");
        return -1;
    }
    L->align = align;
    L->gap = gap;
    L->max_read = max_read;
    PyObject *o = PySequence_Fast(orb, "out_row_bytes must be a sequence");
    if (!o) return -1;
    L->nouts = (int)PySequence_Fast_GET_SIZE(o);
    L->out_row_bytes = PyMem_Calloc((size_t)L->nouts + 1, sizeof(int64_t));
    for (int i = 0; i < L->nouts; i++) L->out_row_bytes[i] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(o, i));
    Py_DECREF(o);
    if (PyErr_Occurred()) return -1;
    PyObject *s = PySequence_Fast(segs, "segments must be a sequence");
    if (!s) return -1;
    L->nseg = (int)PySequence_Fast_GET_SIZE(s);
    L->segs = PyMem_Calloc((size_t)L->nseg + 1, sizeof(Seg));
    for (int i = 0; i < L->nseg; i++) {
        Seg *g = &L->segs[i];
        long long fd, off, rb;
        int vec;
        PyObject *cols;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(s, i), "LLLpO", &fd, &off, &rb, &vec, &cols)) goto fail;
        g->fd = fd;
        g->data_offset = off;
        g->row_bytes = rb;
        PyObject *c = PySequence_Fast(cols, "columns must be a sequence");
        if (!c) goto fail;
        g->ncols = (int)PySequence_Fast_GET_SIZE(c);
        g->cols = PyMem_Calloc((size_t)g->ncols + 1, sizeof(Col));
        int64_t pos = 0;
        int tiles = 1;
        for (int k = 0; k < g->ncols; k++) {
            Col *col = &g->cols[k];
            long long c0, c1;
            if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(c, k), "iLLi", &col->out, &c0, &c1, &col->conv)) {
                Py_DECREF(c);
                goto fail;
            }
            col->c0 = c0;
            col->c1 = c1;
            int64_t want = col->conv == CONV_COPY ? c1 - c0 : 2 * (c1 - c0);
            if (col->out < 0 || col->out >= L->nouts || c0 < 0 || c1 <= c0 || c1 > rb || col->conv < 0
                || col->conv > CONV_BF16 || L->out_row_bytes[col->out] != want) {
                Py_DECREF(c);
                PyErr_Format(PyExc_ValueError, "segment %d column %d: bad output, byte range or conversion", i, k);
                goto fail;
            }
            tiles = tiles && c0 == pos && col->conv == CONV_COPY && (c1 - c0) % align == 0;
            pos = c1;
        }
        Py_DECREF(c);
        g->vectored = vec && tiles && pos == rb; /* each part of a row one iovec needs parts tiling the row */
        if (fd < 0 || off < 0 || rb < 1) {
            PyErr_Format(PyExc_ValueError, "segment %d: bad file, offset or row size", i);
            goto fail;
        }
    }
    Py_DECREF(s);
    return 0;
fail:
    Py_DECREF(s);
    return -1;
}

static PyTypeObject LayoutType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "mlx_flash.reader._native.Layout",
    .tp_basicsize = sizeof(Layout),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A layer's segments as the native engine reads them (see _native.c).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Layout_init,
    .tp_dealloc = (destructor)Layout_dealloc,
};

/* -- buffers -------------------------------------------------------------------------------- */

static char *take_scratch(Engine *e, size_t n, size_t *size) {
    int best = -1;
    for (int i = 0; i < KEEP_SCRATCH; i++)
        if (e->free_scratch[i] && e->free_size[i] >= n && (best < 0 || e->free_size[i] < e->free_size[best]))
            best = i;
    if (best >= 0) {
        char *p = e->free_scratch[best];
        *size = e->free_size[best];
        e->free_scratch[best] = NULL;
        return p;
    }
    void *p = NULL;
    size_t want = (n + SCRATCH_ALIGN - 1) / SCRATCH_ALIGN * SCRATCH_ALIGN;
    if (posix_memalign(&p, SCRATCH_ALIGN, want)) return NULL;
    *size = want;
    return p;
}

static void give_scratch(Engine *e, char *p, size_t size) {
    int slot = -1;
    for (int i = 0; i < KEEP_SCRATCH; i++)
        if (!e->free_scratch[i]) {
            slot = i;
            break;
        }
    if (slot < 0) { /* keep the largest few */
        slot = 0;
        for (int i = 1; i < KEEP_SCRATCH; i++)
            if (e->free_size[i] < e->free_size[slot]) slot = i;
        if (e->free_size[slot] >= size) {
            free(p);
            return;
        }
        free(e->free_scratch[slot]);
    }
    e->free_scratch[slot] = p;
    e->free_size[slot] = size;
}

/* A junk buffer of at least n bytes for the gaps of vectored reads (they are never read back,
 * so batches share it; a larger one is made when needed, the old kept until the engine goes). */
static char *junk_of(Engine *e, int64_t n) {
    if (e->njunk && (int64_t)e->junk_size[e->njunk - 1] >= n) return e->junk[e->njunk - 1];
    size_t want = (size_t)(n < SCRATCH_ALIGN ? SCRATCH_ALIGN : (n + SCRATCH_ALIGN - 1) / SCRATCH_ALIGN * SCRATCH_ALIGN);
    void *p = NULL;
    if (posix_memalign(&p, SCRATCH_ALIGN, want)) return NULL;
    char **j = PyMem_Realloc(e->junk, sizeof(char *) * (size_t)(e->njunk + 1));
    size_t *js = PyMem_Realloc(e->junk_size, sizeof(size_t) * (size_t)(e->njunk + 1));
    if (j) e->junk = j;
    if (js) e->junk_size = js;
    if (!j || !js) {
        free(p);
        return NULL;
    }
    e->junk[e->njunk] = p;
    e->junk_size[e->njunk++] = want;
    return p;
}

/* -- Batch ---------------------------------------------------------------------------------- */

static void Batch_dealloc(Batch *b) {
    /* only once no C thread holds it: the engine keeps a reference until the batch is taken */
    PyBuffer_Release(&b->ids_buf);
    if (b->has_dest) PyBuffer_Release(&b->dest_buf);
    for (int i = 0; i < b->nouts; i++) PyBuffer_Release(&b->out_bufs[i]);
    PyMem_Free(b->out_bufs);
    PyMem_Free(b->out_base);
    PyMem_Free(b->reads);
    PyMem_Free(b->iovs);
    if (b->scratch) {
        if (b->engine) give_scratch(b->engine, b->scratch, b->scratch_size);
        else free(b->scratch);
    }
    pthread_cond_destroy(&b->cv);
    Py_XDECREF((PyObject *)b->layout);
    Py_XDECREF((PyObject *)b->engine);
    Py_TYPE(b)->tp_free((PyObject *)b);
}

/* The engine's reference to a batch it hands over (mu held by nobody, GIL held). */
static void hand_over(Engine *e, Batch *b) {
    (void)e;
    Py_DECREF((PyObject *)b);
}

/* wait(): block until the batch finished; True when this caller took it (deliver it now),
 * False when the delivery thread took it first (its future resolves there). */
static PyObject *Batch_wait(Batch *b, PyObject *Py_UNUSED(ignored)) {
    Engine *e = b->engine;
    int took = 0;
    if (!e) Py_RETURN_FALSE;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&e->mu);
    if (b->state == B_FLIGHT) {
        b->waiters++;
        while (b->state == B_FLIGHT) pthread_cond_wait(&b->cv, &e->mu);
        b->waiters--;
    }
    if (b->state == B_DONE) {
        if (b->queued) unlink_done(e, b);
        b->state = B_TAKEN;
        e->outstanding--;
        if (e->stop && e->outstanding == 0) pthread_cond_broadcast(&e->done_cv);
        took = 1;
    }
    pthread_mutex_unlock(&e->mu);
    Py_END_ALLOW_THREADS
    if (!took) Py_RETURN_FALSE;
    hand_over(e, b);
    Py_RETURN_TRUE;
}

/* done(): whether the batch finished (taken or not). */
static PyObject *Batch_done(Batch *b, PyObject *Py_UNUSED(ignored)) {
    return PyBool_FromLong(__atomic_load_n(&b->state, __ATOMIC_ACQUIRE) != B_FLIGHT);
}

/* error(): None, or the first failed read: (status, got, segment, first, stop, offset, length, need). */
static PyObject *Batch_error(Batch *b, PyObject *Py_UNUSED(ignored)) {
    if (!b->failed) Py_RETURN_NONE;
    for (Py_ssize_t i = 0; i < b->nreads; i++) {
        const ReadDesc *d = &b->reads[i];
        if (d->status != ST_OK)
            return Py_BuildValue("(LLLLLLLL)", (long long)d->status, (long long)d->got, (long long)d->seg,
                                 (long long)d->first, (long long)d->stop, (long long)d->offset,
                                 (long long)d->length, (long long)d->need);
    }
    Py_RETURN_NONE;
}

/* stats(): (bytes read, bytes used, system calls, reads into the outputs, reads via scratch,
 * reads timed, total and max read nanoseconds, request nanoseconds, histogram bytes int64[]). */
static PyObject *Batch_stats(Batch *b, PyObject *Py_UNUSED(ignored)) {
    int64_t timed = 0;
    for (int k = 0; k < HIST_BUCKETS; k++) timed += b->hist[k];
    return Py_BuildValue("(LLLLLLLLLy#)", (long long)b->bytes_read, (long long)b->bytes_used, (long long)b->calls,
                         (long long)b->into_outputs, (long long)b->via_scratch, (long long)timed,
                         (long long)b->lat_total, (long long)b->lat_max, (long long)(b->t_done - b->t_submit),
                         (const char *)b->hist, (Py_ssize_t)sizeof b->hist);
}

static PyMethodDef Batch_methods[] = {
    {"wait", (PyCFunction)Batch_wait, METH_NOARGS, "wait() -> True when this caller took the finished batch"},
    {"done", (PyCFunction)Batch_done, METH_NOARGS, "done() -> whether the batch finished"},
    {"error", (PyCFunction)Batch_error, METH_NOARGS, "error() -> None or the first failed read"},
    {"stats", (PyCFunction)Batch_stats, METH_NOARGS, "stats() -> the batch's counts"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject BatchType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "mlx_flash.reader._native.Batch",
    .tp_basicsize = sizeof(Batch),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One submitted request of the native engine (see _native.c).",
    .tp_dealloc = (destructor)Batch_dealloc,
    .tp_methods = Batch_methods,
};

/* The request's buffers and plan: a new Batch, not yet queued (GIL held). engine NULL: plan
 * only (no scratch or junk: their bases are 0). */
static Batch *make_batch(Engine *e, PyObject *args) {
    Layout *L;
    PyObject *ids, *dest, *outs;
    if (!PyArg_ParseTuple(args, "O!OOO", &LayoutType, &L, &ids, &dest, &outs)) return NULL;
    Batch *b = PyObject_New(Batch, &BatchType);
    if (!b) return NULL;
    memset((char *)b + sizeof(PyObject), 0, sizeof(Batch) - sizeof(PyObject));
    pthread_cond_init(&b->cv, NULL);
    Py_INCREF(L);
    b->layout = L;
    if (PyObject_GetBuffer(ids, &b->ids_buf, PyBUF_C_CONTIGUOUS) < 0) {
        b->ids_buf.obj = NULL;
        goto fail;
    }
    if (b->ids_buf.itemsize != 8 || b->ids_buf.len == 0) {
        PyErr_SetString(PyExc_ValueError, "ids must be a non-empty int64 array");
        goto fail;
    }
    b->ids = b->ids_buf.buf;
    b->nids = b->ids_buf.len / 8;
    for (Py_ssize_t k = 0; k < b->nids; k++)
        if (b->ids[k] < 0 || (k && b->ids[k] <= b->ids[k - 1])) {
            PyErr_SetString(PyExc_ValueError, "ids must be sorted, distinct and >= 0");
            goto fail;
        }
    PyObject *o = PySequence_Fast(outs, "outs must be a sequence of arrays");
    if (!o) goto fail;
    if (PySequence_Fast_GET_SIZE(o) != L->nouts) {
        Py_DECREF(o);
        PyErr_SetString(PyExc_ValueError, "outs must hold one array per output of the layout");
        goto fail;
    }
    b->out_bufs = PyMem_Calloc((size_t)L->nouts + 1, sizeof(Py_buffer));
    b->out_base = PyMem_Calloc((size_t)L->nouts + 1, sizeof(char *));
    int aligned = 1;
    Py_ssize_t rows = -1; /* rows of every output */
    for (int i = 0; i < L->nouts; i++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(o, i), &b->out_bufs[i], PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE)
            < 0) {
            Py_DECREF(o);
            goto fail;
        }
        b->nouts = i + 1;
        Py_ssize_t len = b->out_bufs[i].len, rb = (Py_ssize_t)L->out_row_bytes[i];
        if (len % rb || (rows >= 0 && len / rb != rows)) {
            Py_DECREF(o);
            PyErr_Format(PyExc_ValueError, "output %d: %zd bytes, not rows of %zd bytes as many as the others'", i,
                         len, rb);
            goto fail;
        }
        rows = len / rb;
        b->out_base[i] = b->out_bufs[i].buf;
        aligned = aligned && (uintptr_t)b->out_base[i] % (uintptr_t)L->align == 0;
    }
    Py_DECREF(o);
    if (dest != Py_None) {
        if (PyObject_GetBuffer(dest, &b->dest_buf, PyBUF_C_CONTIGUOUS) < 0) goto fail;
        b->has_dest = 1;
        if (b->dest_buf.itemsize != 8 || b->dest_buf.len != b->ids_buf.len) {
            PyErr_SetString(PyExc_ValueError, "dest must be an int64 array as long as ids");
            goto fail;
        }
        b->dest = b->dest_buf.buf;
        for (Py_ssize_t k = 0; k < b->nids; k++)
            if (b->dest[k] < 0 || b->dest[k] >= rows) {
                PyErr_SetString(PyExc_ValueError, "dest: a row outside the outputs");
                goto fail;
            }
    } else if (rows < b->nids) {
        PyErr_SetString(PyExc_ValueError, "outputs with fewer rows than ids");
        goto fail;
    }
    Plan p = {0};
    int big = b->nids > 4096; /* plan a large request with the GIL released */
    PyThreadState *ts = big ? PyEval_SaveThread() : NULL;
    plan_reads(L, b->ids, b->nids, aligned, &p);
    if (ts) PyEval_RestoreThread(ts);
    b->reads = PyMem_Malloc(sizeof(ReadDesc) * (size_t)p.nreads);
    b->iovs = PyMem_Malloc(sizeof(struct iovec) * (size_t)p.niovs);
    if (!b->reads || !b->iovs) {
        PyErr_NoMemory();
        goto fail;
    }
    p.reads = b->reads;
    ts = big ? PyEval_SaveThread() : NULL;
    plan_reads(L, b->ids, b->nids, aligned, &p);
    if (ts) PyEval_RestoreThread(ts);
    char *junk = NULL;
    if (e) {
        if (p.max_gap && !(junk = junk_of(e, p.max_gap))) {
            PyErr_NoMemory();
            goto fail;
        }
        if (p.scratch_bytes && !(b->scratch = take_scratch(e, (size_t)p.scratch_bytes, &b->scratch_size))) {
            PyErr_NoMemory();
            goto fail;
        }
    }
    ts = big ? PyEval_SaveThread() : NULL;
    plan_iovecs(L, b->ids, b->dest, b->out_base, &p, b->iovs, junk, b->scratch);
    if (ts) PyEval_RestoreThread(ts);
    b->nreads = p.nreads;
    b->niovs = p.niovs;
    b->remaining = b->nreads;
    return b;
fail:
    Py_DECREF(b);
    return NULL;
}

/* plan(layout, ids, dest, outs) -> (reads, iovecs): the plan submit would make, as bytes
 * (int64[n][14] as ReadDesc; [m] pairs of address, length, with the gaps' and scratch's bases
 * 0), for the tests that compare it with the Python planner. */
static PyObject *native_plan(PyObject *Py_UNUSED(m), PyObject *args) {
    Batch *b = make_batch(NULL, args);
    if (!b) return NULL;
    PyObject *r = Py_BuildValue("(y#y#)", (const char *)b->reads, (Py_ssize_t)(sizeof(ReadDesc) * (size_t)b->nreads),
                                (const char *)b->iovs, (Py_ssize_t)(sizeof(struct iovec) * (size_t)b->niovs));
    Py_DECREF(b);
    return r;
}

/* -- Engine --------------------------------------------------------------------------------- */

static void stop_engine(Engine *e) {
    /* GIL released by the caller */
    pthread_mutex_lock(&e->mu);
    e->stop = 1;
    cancel_pending(e);
    pthread_cond_broadcast(&e->work_cv);
    pthread_cond_broadcast(&e->done_cv);
    pthread_mutex_unlock(&e->mu);
}

static void join_engine(Engine *e) {
    for (int t = 0; t < e->started; t++) pthread_join(e->threads[t], NULL);
    e->started = 0;
#ifdef HAVE_URING
    if (e->backend == BACKEND_URING) ring_free(&e->ring);
#endif
}

static int Engine_init(Engine *e, PyObject *args, PyObject *kw) {
    static char *names[] = {"depth", "backend", "faults", NULL};
    int depth;
    const char *backend = "auto";
    PyObject *faults = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "i|sO", names, &depth, &backend, &faults)) return -1;
    if (e->threads) {
        PyErr_SetString(PyExc_RuntimeError, "Engine already initialized");
        return -1;
    }
    if (depth < 1 || depth > 4096) {
        PyErr_SetString(PyExc_ValueError, "depth must be in 1..4096");
        return -1;
    }
    int want_uring = strcmp(backend, "io_uring") == 0, auto_ = strcmp(backend, "auto") == 0;
    if (!want_uring && !auto_ && strcmp(backend, "pthreads") != 0) {
        PyErr_SetString(PyExc_ValueError, "backend must be 'auto', 'io_uring' or 'pthreads'");
        return -1;
    }
    if (faults && faults != Py_None) {
        PyObject *seq = PySequence_Fast(faults, "faults must be a sequence of (at, kind)");
        if (!seq) return -1;
        Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
        e->fault_at = PyMem_Calloc((size_t)n + 1, sizeof(int64_t));
        e->fault_kind = PyMem_Calloc((size_t)n + 1, sizeof(int));
        for (Py_ssize_t k = 0; k < n; k++) {
            long long at;
            int kind;
            if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, k), "Li", &at, &kind)) {
                Py_DECREF(seq);
                return -1;
            }
            e->fault_at[k] = at;
            e->fault_kind[k] = kind;
        }
        e->nfaults = (int)n;
        Py_DECREF(seq);
    }
    e->depth = depth;
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->work_cv, NULL);
    pthread_cond_init(&e->done_cv, NULL);
    e->backend = BACKEND_PTHREADS;
#ifdef HAVE_URING
    e->ring.fd = -1;
    if (want_uring || auto_) {
        int err = ring_setup(&e->ring, (unsigned)depth);
        if (err == 0) e->backend = BACKEND_URING;
        else if (want_uring) {
            errno = -err;
            PyErr_SetFromErrnoWithFilename(PyExc_OSError, "io_uring_setup");
            return -1;
        }
    }
#else
    if (want_uring) {
        PyErr_SetString(PyExc_OSError, "io_uring is not available on this platform");
        return -1;
    }
#endif
    e->nthreads = e->backend == BACKEND_URING ? 1 : depth;
    e->threads = PyMem_Calloc((size_t)e->nthreads, sizeof(pthread_t));
    if (!e->threads) {
        PyErr_NoMemory();
        return -1;
    }
    for (int t = 0; t < e->nthreads; t++) {
        void *(*fn)(void *) = pthread_worker;
#ifdef HAVE_URING
        if (e->backend == BACKEND_URING) fn = ring_worker;
#endif
        int err = pthread_create(&e->threads[t], NULL, fn, e);
        if (err) {
            Py_BEGIN_ALLOW_THREADS
            stop_engine(e);
            join_engine(e);
            Py_END_ALLOW_THREADS
            errno = err;
            e->closed = 1;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        e->started++;
    }
    return 0;
}

/* submit(layout, ids, dest, outs) -> Batch: plan the request and queue its reads. */
static PyObject *Engine_submit(Engine *e, PyObject *args) {
    if (e->closed || e->stop || !e->threads) {
        PyErr_SetString(PyExc_RuntimeError, "the engine is closed");
        return NULL;
    }
    Batch *b = make_batch(e, args);
    if (!b) return NULL;
    Py_INCREF(e);
    b->engine = e;
    Py_INCREF(b); /* the engine's reference, until the batch is taken */
    pthread_mutex_lock(&e->mu);
    b->t_submit = now_ns();
    b->pending = 1;
    list_push(&e->pend, b, PEND);
    e->outstanding++;
    pthread_mutex_unlock(&e->mu);
    /* wake as many workers as there are reads (one for io_uring): a broadcast would wake
     * every idle thread of the pool for a batch of one read. After unlocking: a worker woken
     * while the lock is still held would at once block on it again (two more futex calls and
     * a context switch per wake-up; safe, since a worker tests for work under the lock before
     * it waits, and the engine outlives this call) */
    Py_ssize_t wake = e->backend == BACKEND_URING ? 1 : (b->nreads < e->nthreads ? b->nreads : e->nthreads);
    if (wake >= e->nthreads && wake > 1) pthread_cond_broadcast(&e->work_cv); /* one system call */
    else
        for (Py_ssize_t w = 0; w < wake; w++) pthread_cond_signal(&e->work_cv);
    return (PyObject *)b;
}

/* wait(): the finished batches nobody waited for (taken); None once stopped with nothing left. */
static PyObject *Engine_wait(Engine *e, PyObject *Py_UNUSED(ignored)) {
    Batch *got;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&e->mu);
    while (!e->done.head && !(e->stop && e->outstanding == 0)) pthread_cond_wait(&e->done_cv, &e->mu);
    got = e->done.head;
    e->done.head = e->done.tail = NULL;
    for (Batch *b = got; b; b = b->next_done) {
        b->queued = 0;
        b->state = B_TAKEN;
        e->outstanding--;
    }
    pthread_mutex_unlock(&e->mu);
    Py_END_ALLOW_THREADS
    if (!got) Py_RETURN_NONE;
    PyObject *list = PyList_New(0);
    while (got) {
        Batch *nb = got->next_done;
        if (list && PyList_Append(list, (PyObject *)got) < 0) Py_CLEAR(list);
        hand_over(e, got);
        got = nb;
    }
    return list;
}

static PyObject *Engine_close(Engine *e, PyObject *Py_UNUSED(ignored)) {
    if (!e->closed && e->threads) {
        e->closed = 1;
        Py_BEGIN_ALLOW_THREADS
        stop_engine(e);
        join_engine(e);
        Py_END_ALLOW_THREADS
    }
    Py_RETURN_NONE;
}

static void Engine_dealloc(Engine *e) {
    /* batches hold a reference to their engine: none is left */
    if (e->threads) {
        if (!e->closed) {
            e->closed = 1;
            Py_BEGIN_ALLOW_THREADS
            stop_engine(e);
            join_engine(e);
            Py_END_ALLOW_THREADS
        }
        pthread_mutex_destroy(&e->mu);
        pthread_cond_destroy(&e->work_cv);
        pthread_cond_destroy(&e->done_cv);
        PyMem_Free(e->threads);
    }
    for (int i = 0; i < KEEP_SCRATCH; i++) free(e->free_scratch[i]);
    for (int i = 0; i < e->njunk; i++) free(e->junk[i]);
    PyMem_Free(e->junk);
    PyMem_Free(e->junk_size);
    PyMem_Free(e->fault_at);
    PyMem_Free(e->fault_kind);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static PyObject *Engine_backend(Engine *e, void *Py_UNUSED(closure)) {
    return PyUnicode_FromString(e->backend == BACKEND_URING ? "io_uring" : "pthreads");
}

static PyMethodDef Engine_methods[] = {
    {"submit", (PyCFunction)Engine_submit, METH_VARARGS, "submit(layout, ids, dest, outs) -> Batch"},
    {"wait", (PyCFunction)Engine_wait, METH_NOARGS, "wait() -> finished batches nobody waited for, None once closed"},
    {"close", (PyCFunction)Engine_close, METH_NOARGS, "stop: cancel reads not issued, wait for the rest"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Engine_getset[] = {
    {"backend", (getter)Engine_backend, NULL, "'io_uring' or 'pthreads'", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "mlx_flash.reader._native.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Executes requests of reads in C (io_uring or a pthread pool), the GIL released.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
    .tp_getset = Engine_getset,
};

static PyMethodDef module_methods[] = {
    {"plan", native_plan, METH_VARARGS, "plan(layout, ids, dest, outs) -> (reads, iovecs) as bytes"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_native",
    .m_doc = "The reader's native engine (see _native.c).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__native(void) {
    if (sizeof(struct iovec) != 16 || sizeof(ReadDesc) != 8 * READ_FIELDS || sizeof(void *) != 8) {
        PyErr_SetString(PyExc_ImportError, "the native engine needs a 64-bit platform");
        return NULL;
    }
    if (PyType_Ready(&EngineType) < 0 || PyType_Ready(&BatchType) < 0 || PyType_Ready(&LayoutType) < 0) return NULL;
    PyObject *m = PyModule_Create(&native_module);
    if (!m) return NULL;
    PyTypeObject *types[] = {&EngineType, &LayoutType, &BatchType};
    const char *tnames[] = {"Engine", "Layout", "Batch"};
    for (int i = 0; i < 3; i++) {
        Py_INCREF(types[i]);
        if (PyModule_AddObject(m, tnames[i], (PyObject *)types[i]) < 0) {
            Py_DECREF(types[i]);
            Py_DECREF(m);
            return NULL;
        }
    }
    PyModule_AddIntConstant(m, "IOV_MAX", IOV_MAX);
    PyModule_AddIntConstant(m, "API", NATIVE_API);
    PyModule_AddIntConstant(m, "READ_FIELDS", READ_FIELDS);
    PyModule_AddIntConstant(m, "HIST_BUCKETS", HIST_BUCKETS);
    return m;
}
