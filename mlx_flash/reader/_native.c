/* The native engine of mlx_flash's reader: a whole batch of reads, each (fd, offset, bytes
 * needed, iovecs), executed in C with the GIL released.
 *
 * Backends:
 *   io_uring  (Linux, where the kernel and the container allow io_uring_setup): one C thread
 *             keeps up to `depth` IORING_OP_READV requests in flight, through the raw system
 *             calls (no liburing), and collects their completions;
 *   pthreads  (everywhere else, macOS included): `depth` C threads, one blocking preadv each.
 *             On macOS the reader opens its files with F_NOCACHE set and F_RDAHEAD off
 *             (files.py), so the preads bypass the cache there too.
 *
 * Python side (native.py): Engine(depth, backend, faults) -> .submit(id, reads, iovs, results)
 * queues a batch (three buffers the caller keeps alive: reads int64[n][5] = fd, offset, need,
 * first iovec, iovec count; iovs uint64[m][2] = address, length; results int64[n][4] = status,
 * bytes, nanoseconds, system calls, written here); .wait() blocks (GIL released) until batches
 * are done and returns their ids, None once closed and drained; .close() stops: reads not yet
 * issued are cancelled (status ECANCELED), reads in flight finish first.
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
#endif
#endif

enum { ST_OK = 0, ST_SHORT = -1 };
enum { F_NONE = 0, F_EIO = 1, F_SHORT = 2, F_PARTIAL = 3, F_EINTR = 4 };
#define PARTIAL_BYTES 512
enum { BACKEND_PTHREADS = 0, BACKEND_URING = 1 };

typedef struct {
    int64_t fd, offset, need, iov_first, iov_count;
} ReadDesc;

typedef struct {
    int64_t status, got, nanos, calls;
} ReadResult;

typedef struct Batch {
    struct Batch *next_pending; /* in the list of batches with reads left to issue */
    struct Batch *next_done;    /* in the list of finished batches */
    int pending;                /* on the pending list */
    long long id;
    Py_buffer reads_buf, iovs_buf, results_buf;
    const ReadDesc *reads;
    const struct iovec *iovs;
    ReadResult *results;
    Py_ssize_t nreads, niovs;
    Py_ssize_t next_read; /* the next read to issue */
    Py_ssize_t remaining; /* reads not finished */
    int failed;
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
} Ring;
#endif

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu;
    pthread_cond_t work_cv, done_cv;
    Batch *pend_head, *pend_tail, *done_head, *done_tail;
    Py_ssize_t outstanding; /* batches submitted and not yet returned by wait() */
    int stop, closed, depth, backend, nthreads, started;
    pthread_t *threads;
    int64_t *fault_at;
    int *fault_kind;
    int nfaults;
    int64_t calls; /* low-level reads so far (for the faults) */
#ifdef HAVE_URING
    Ring ring;
#endif
} Engine;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
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

/* -- the batch lists (mu held) ------------------------------------------------------------ */

static void unlink_pending(Engine *e, Batch *b) {
    Batch *prev = NULL;
    for (Batch *c = e->pend_head; c; prev = c, c = c->next_pending)
        if (c == b) {
            if (prev) prev->next_pending = c->next_pending;
            else e->pend_head = c->next_pending;
            if (e->pend_tail == c) e->pend_tail = prev;
            break;
        }
    b->pending = 0;
}

static void push_done(Engine *e, Batch *b) {
    if (b->pending) unlink_pending(e, b); /* never handed back while still pending */
    b->next_done = NULL;
    if (e->done_tail) e->done_tail->next_done = b;
    else e->done_head = b;
    e->done_tail = b;
    pthread_cond_broadcast(&e->done_cv);
}

/* Cancel the reads of `b` not yet issued (status ECANCELED). */
static void cancel_rest(Engine *e, Batch *b) {
    for (Py_ssize_t i = b->next_read; i < b->nreads; i++) {
        b->results[i].status = ECANCELED;
        b->results[i].got = b->results[i].nanos = b->results[i].calls = 0;
    }
    b->remaining -= b->nreads - b->next_read;
    b->next_read = b->nreads;
    if (b->pending) unlink_pending(e, b);
    if (b->remaining == 0) push_done(e, b);
}

/* Cancel every read not yet issued (closing). */
static void cancel_pending(Engine *e) {
    while (e->pend_head) cancel_rest(e, e->pend_head);
}

/* Take the next read to issue: 1 and (b, i), or 0 when none is pending. A batch leaves the
 * pending list when its last read is issued. */
static int take(Engine *e, Batch **b, Py_ssize_t *i) {
    Batch *h = e->pend_head;
    if (!h) return 0;
    *b = h;
    *i = h->next_read++;
    if (h->next_read >= h->nreads) unlink_pending(e, h);
    return 1;
}

/* Record a finished read. */
static void finish(Engine *e, Flight *f, int64_t status) {
    Batch *b = f->batch;
    ReadResult *r = &b->results[f->index];
    r->status = status;
    r->got = f->got;
    r->nanos = now_ns() - f->t0;
    r->calls = f->calls;
    free(f->copy);
    f->copy = NULL;
    b->remaining--;
    if (status != ST_OK && !b->failed) {
        b->failed = 1;
        if (b->next_read < b->nreads) {
            cancel_rest(e, b); /* pushes the batch when nothing of it is in flight */
            return;
        }
    }
    if (b->remaining == 0) push_done(e, b);
}

static void begin(Flight *f, Batch *b, Py_ssize_t i) {
    const ReadDesc *d = &b->reads[i];
    f->batch = b;
    f->index = i;
    f->got = f->calls = 0;
    f->t0 = now_ns();
    f->iov = (struct iovec *)&b->iovs[d->iov_first];
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
        pthread_mutex_lock(&e->mu);
        finish(e, &f, status);
    }
}

/* -- io_uring backend --------------------------------------------------------------------- */

#ifdef HAVE_URING
static int ring_setup(Ring *r, unsigned entries) {
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    memset(r, 0, sizeof *r);
    r->fd = (int)syscall(__NR_io_uring_setup, entries, &p);
    if (r->fd < 0) return -errno;
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

/* -- the Python type ---------------------------------------------------------------------- */

static void release_batch(Batch *b) {
    PyBuffer_Release(&b->reads_buf);
    PyBuffer_Release(&b->iovs_buf);
    PyBuffer_Release(&b->results_buf);
    PyMem_Free(b);
}

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

static PyObject *Engine_submit(Engine *e, PyObject *args) {
    long long id;
    PyObject *reads, *iovs, *results;
    if (!PyArg_ParseTuple(args, "LOOO", &id, &reads, &iovs, &results)) return NULL;
    if (e->closed || e->stop) {
        PyErr_SetString(PyExc_RuntimeError, "the engine is closed");
        return NULL;
    }
    Batch *b = PyMem_Calloc(1, sizeof(Batch));
    if (!b) return PyErr_NoMemory();
    if (PyObject_GetBuffer(reads, &b->reads_buf, PyBUF_C_CONTIGUOUS) < 0) goto fail0;
    if (PyObject_GetBuffer(iovs, &b->iovs_buf, PyBUF_C_CONTIGUOUS) < 0) goto fail1;
    if (PyObject_GetBuffer(results, &b->results_buf, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto fail2;
    b->id = id;
    b->nreads = b->reads_buf.len / (Py_ssize_t)sizeof(ReadDesc);
    b->niovs = b->iovs_buf.len / (Py_ssize_t)sizeof(struct iovec);
    if (b->reads_buf.len % (Py_ssize_t)sizeof(ReadDesc) || b->iovs_buf.len % (Py_ssize_t)sizeof(struct iovec)
        || b->results_buf.len < b->nreads * (Py_ssize_t)sizeof(ReadResult) || b->nreads == 0) {
        PyErr_SetString(PyExc_ValueError, "reads int64[n][5], iovs uint64[m][2], results int64[n][4], n >= 1");
        goto fail3;
    }
    b->reads = b->reads_buf.buf;
    b->iovs = b->iovs_buf.buf;
    b->results = b->results_buf.buf;
    for (Py_ssize_t i = 0; i < b->nreads; i++) { /* every iovec range inside the array */
        const ReadDesc *d = &b->reads[i];
        if (d->iov_first < 0 || d->iov_count < 1 || d->iov_count > IOV_MAX || d->iov_first + d->iov_count > b->niovs
            || d->need < 0 || d->offset < 0) {
            PyErr_Format(PyExc_ValueError, "read %zd: bad iovec range or offset", i);
            goto fail3;
        }
    }
    b->remaining = b->nreads;
    pthread_mutex_lock(&e->mu);
    b->next_pending = NULL;
    b->pending = 1;
    if (e->pend_tail) e->pend_tail->next_pending = b;
    else e->pend_head = b;
    e->pend_tail = b;
    e->outstanding++;
    /* wake as many workers as there are reads (one for io_uring): a broadcast would wake
     * every idle thread of the pool for a batch of one read */
    Py_ssize_t wake = e->backend == BACKEND_URING ? 1 : (b->nreads < e->nthreads ? b->nreads : e->nthreads);
    for (Py_ssize_t w = 0; w < wake; w++) pthread_cond_signal(&e->work_cv);
    pthread_mutex_unlock(&e->mu);
    Py_RETURN_NONE;
fail3:
    PyBuffer_Release(&b->results_buf);
fail2:
    PyBuffer_Release(&b->iovs_buf);
fail1:
    PyBuffer_Release(&b->reads_buf);
fail0:
    PyMem_Free(b);
    return NULL;
}

/* Wait for finished batches: a list of their ids; None once stopped with nothing left. */
static PyObject *Engine_wait(Engine *e, PyObject *Py_UNUSED(ignored)) {
    Batch *got;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&e->mu);
    while (!e->done_head && !(e->stop && e->outstanding == 0)) pthread_cond_wait(&e->done_cv, &e->mu);
    got = e->done_head;
    e->done_head = e->done_tail = NULL;
    for (Batch *b = got; b; b = b->next_done) e->outstanding--;
    pthread_mutex_unlock(&e->mu);
    Py_END_ALLOW_THREADS
    if (!got) Py_RETURN_NONE;
    PyObject *ids = PyList_New(0);
    while (got) {
        Batch *nb = got->next_done;
        PyObject *v = PyLong_FromLongLong(got->id);
        if (ids && v) PyList_Append(ids, v);
        Py_XDECREF(v);
        release_batch(got);
        got = nb;
    }
    return ids;
}

static PyObject *Engine_close(Engine *e, PyObject *Py_UNUSED(ignored)) {
    if (!e->closed) {
        e->closed = 1;
        Py_BEGIN_ALLOW_THREADS
        stop_engine(e);
        join_engine(e);
        Py_END_ALLOW_THREADS
    }
    Py_RETURN_NONE;
}

static void Engine_dealloc(Engine *e) {
    if (e->threads) {
        if (!e->closed) {
            e->closed = 1;
            Py_BEGIN_ALLOW_THREADS
            stop_engine(e);
            join_engine(e);
            Py_END_ALLOW_THREADS
        }
        for (Batch *b = e->done_head, *nb; b; b = nb) {
            nb = b->next_done;
            release_batch(b);
        }
        pthread_mutex_destroy(&e->mu);
        pthread_cond_destroy(&e->work_cv);
        pthread_cond_destroy(&e->done_cv);
        PyMem_Free(e->threads);
    }
    PyMem_Free(e->fault_at);
    PyMem_Free(e->fault_kind);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static PyObject *Engine_backend(Engine *e, void *Py_UNUSED(closure)) {
    return PyUnicode_FromString(e->backend == BACKEND_URING ? "io_uring" : "pthreads");
}

static PyMethodDef Engine_methods[] = {
    {"submit", (PyCFunction)Engine_submit, METH_VARARGS, "submit(id, reads, iovs, results): queue a batch"},
    {"wait", (PyCFunction)Engine_wait, METH_NOARGS, "wait() -> ids of finished batches, None once closed"},
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
    .tp_doc = "Executes batches of reads in C (io_uring or a pthread pool), the GIL released.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
    .tp_getset = Engine_getset,
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_native",
    .m_doc = "The reader's native engine (see _native.c).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__native(void) {
    if (sizeof(struct iovec) != 16 || sizeof(ReadDesc) != 40 || sizeof(ReadResult) != 32) {
        PyErr_SetString(PyExc_ImportError, "the native engine needs a 64-bit platform");
        return NULL;
    }
    if (PyType_Ready(&EngineType) < 0) return NULL;
    PyObject *m = PyModule_Create(&native_module);
    if (!m) return NULL;
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0) {
        Py_DECREF(&EngineType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "IOV_MAX", IOV_MAX);
    return m;
}
