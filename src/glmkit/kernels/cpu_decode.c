/* The small operations of a CPU decode step around the products, one call each, on bf16 rows
   (glmkit/kernels/cpu_decode.py is the only caller; glmkit/models/layers.py uses them through it).

   On a CPU a decode step's products are a few large calls, but the rest is about 45 PyTorch operations a layer
   (RMSNorm alone is eight, attention over the cache a dozen, most of them bf16 <-> fp32 copies), each costing
   several microseconds however small its tensor: on a 2-core AVX2 EPYC an RMSNorm of 896 values took 65 us and
   one sequence's attention over 200 cached tokens 270 us. Here each is one loop over the data, with the same
   arithmetic as the PyTorch code it replaces (fp32, rounded to bf16 where that code rounds):

     add_rms_norm       residual = bf16(x + residual); out = bf16(residual * rsqrt(mean(residual^2) + eps) * w)
     silu_mul           out = bf16(bf16(silu(gate)) * up), from the fused [gate | up] rows
     decode_attention   one new token per sequence over its cached K/V, gathered by slot: scores in fp32, scaled
                        by 1/sqrt(head_dim), softmax, the weighted sum of V, then rounded to bf16
     rope_and_cache     rotary on the q and k heads in place (bf16 products and sum, as layers.rotate), then k and v
                        into their cache slots

   Sums run in another order than PyTorch's (partial sums here, blocked ones there) and e^x is a polynomial of
   about one fp32 unit in the last place (as PyTorch's vectorized exp), so a result can differ from the PyTorch
   path's in its last bf16 bit, about once in a thousand values (rotary: bit for bit). The loops are written to
   vectorize, compiled twice (AVX2 and plain x86-64, picked at load) where gcc can. Work is split over rows or
   (sequence, kv head) pairs with OpenMP, in the thread pool PyTorch has already loaded (libgomp, as the int8
   kernel). Built when the package is installed; where it is not, the PyTorch path runs. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(_M_X64))
#define CLONES __attribute__((target_clones("avx2", "default"))) /* 256-bit vectors where the CPU has them */
#else
#define CLONES
#endif

#define INLINE static inline __attribute__((always_inline)) /* into each clone: the loops around them vectorize */

INLINE float bf(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

INLINE uint16_t to_bf(float f) { /* round to nearest even, as torch's .to(torch.bfloat16); NaN stays NaN */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16, nan = (bits >> 16) | 0x40u;
    return (uint16_t)((bits & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

#define PTR(type, p) ((type *)(uintptr_t)(p))

CLONES static void norm_row(uint16_t *x, uint16_t *res, const uint16_t *w, uint16_t *out, int64_t n, float eps) {
    double squares = 0.0; /* in double: close to PyTorch's cascaded fp32 mean, whatever n */
    if (res) {
        for (int64_t i = 0; i < n; i++) {
            const uint16_t h = to_bf(bf(x[i]) + bf(res[i]));
            res[i] = h;
            squares += (double)bf(h) * bf(h);
        }
        x = res;
    } else {
        for (int64_t i = 0; i < n; i++) squares += (double)bf(x[i]) * bf(x[i]);
    }
    const float inv = 1.0f / sqrtf((float)(squares / (double)n) + eps);
    for (int64_t i = 0; i < n; i++) out[i] = to_bf(bf(x[i]) * inv * bf(w[i]));
}

/* add_rms_norm(x, residual or 0, weight, out, rows, n, eps, threads): bf16, rows of n contiguous values. With a
   residual the sum is written into it (as the CUDA kernel does) and normalized. */
static PyObject *add_rms_norm(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long px, pr, pw, po;
    Py_ssize_t rows, n;
    float eps;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKKnnfi", &px, &pr, &pw, &po, &rows, &n, &eps, &threads)) return NULL;
    if (rows < 0 || n <= 0 || threads < 1) {
        PyErr_Format(PyExc_ValueError, "add_rms_norm: bad shape rows=%zd n=%zd threads=%d", rows, n, threads);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    #pragma omp parallel for num_threads(threads) schedule(static) if (rows >= 4)
    for (Py_ssize_t r = 0; r < rows; r++)
        norm_row(PTR(uint16_t, px) + r * n, pr ? PTR(uint16_t, pr) + r * n : NULL, PTR(const uint16_t, pw),
                 PTR(uint16_t, po) + r * n, n, eps);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* e^x in fp32 within about one unit in the last place (Cephes' expf: x = n ln 2 + r, a degree-6 polynomial in r),
   written so that loops over it vectorize; below e^-87.3 it gives that instead of going to zero. */
INLINE float exp_approx(float x) {
    x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t e = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &e, 4);
    return p * two_n;
}

CLONES static void silu_row(const uint16_t *gate, const uint16_t *up, uint16_t *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const float g = bf(gate[i]);
        out[i] = to_bf(bf(to_bf(g / (1.0f + exp_approx(-g)))) * bf(up[i]));
    }
}

/* silu_mul(x, out, rows, n, threads): x [rows, 2n] = [gate | up] bf16, out [rows, n]. */
static PyObject *silu_mul(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long px, po;
    Py_ssize_t rows, n;
    int threads;
    if (!PyArg_ParseTuple(args, "KKnni", &px, &po, &rows, &n, &threads)) return NULL;
    if (rows < 0 || n <= 0 || threads < 1) {
        PyErr_Format(PyExc_ValueError, "silu_mul: bad shape rows=%zd n=%zd threads=%d", rows, n, threads);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    if (rows == 1) { /* one decode row: split over the threads */
        const int64_t part = (n + threads - 1) / threads;
        #pragma omp parallel for num_threads(threads) schedule(static) if (n >= 4096)
        for (int t = 0; t < threads; t++) {
            const int64_t i0 = t * part, i1 = i0 + part < n ? i0 + part : n;
            if (i0 < i1) silu_row(PTR(uint16_t, px) + i0, PTR(uint16_t, px) + n + i0, PTR(uint16_t, po) + i0, i1 - i0);
        }
    } else {
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (Py_ssize_t r = 0; r < rows; r++)
            silu_row(PTR(uint16_t, px) + r * 2 * n, PTR(uint16_t, px) + r * 2 * n + n, PTR(uint16_t, po) + r * n, n);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

#define MAX_DIM 256   /* head_dim at most */
#define MAX_GROUP 64  /* query heads per kv head at most */

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define X86 1
/* scores[h * len + s] = scale * q_h . k_s over d (a multiple of 8), eight products at a time, then summed across */
__attribute__((target("avx2"))) static void scores_avx2(const float *qf, int64_t group, const float *kf, int64_t len,
                                                      int64_t d, float scale, float *scores) {
    for (int64_t s = 0; s < len; s++) {
        const float *k = kf + s * d;
        for (int64_t h = 0; h < group; h++) {
            const float *q = qf + h * d;
            __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(k));
            for (int64_t i = 8; i < d; i += 8)
                acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(k + i)));
            __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
            v = _mm_add_ps(v, _mm_movehl_ps(v, v));
            v = _mm_add_ss(v, _mm_shuffle_ps(v, v, 1));
            scores[h * len + s] = _mm_cvtss_f32(v) * scale;
        }
    }
}
#else
#define X86 0
#endif

static void scores_plain(const float *qf, int64_t group, const float *kf, int64_t len, int64_t d, float scale,
                         float *scores) {
    for (int64_t s = 0; s < len; s++)
        for (int64_t h = 0; h < group; h++) {
            float total = 0.0f;
            for (int64_t i = 0; i < d; i++) total += qf[h * d + i] * kf[s * d + i];
            scores[h * len + s] = total * scale;
        }
}

/* One sequence's query heads of one kv head (`group` rows of q, d apart) over the cache rows at slots[0..len);
   scratch holds group * (len + d) + 2 * len * d floats; out rows d apart. The group's K and V rows are widened
   to fp32 once, for all its heads. */
CLONES static void attend_group(const uint16_t *q, int64_t group, const uint16_t *k_cache, const uint16_t *v_cache,
                                int64_t slot_stride, const int64_t *slots, int64_t len, int64_t d, float scale,
                                float *scratch, int avx2, uint16_t *out) {
    float *scores = scratch, *acc = scores + group * len, *kf = acc + group * d, *vf = kf + len * d;
    float qf[MAX_GROUP * MAX_DIM];
    for (int64_t i = 0; i < group * d; i++) qf[i] = bf(q[i]);
    for (int64_t s = 0; s < len; s++) {
        const uint16_t *k = k_cache + slots[s] * slot_stride, *v = v_cache + slots[s] * slot_stride;
        for (int64_t i = 0; i < d; i++) kf[s * d + i] = bf(k[i]);
        for (int64_t i = 0; i < d; i++) vf[s * d + i] = bf(v[i]);
    }
#if X86
    if (avx2) scores_avx2(qf, group, kf, len, d, scale, scores);
    else
#endif
        scores_plain(qf, group, kf, len, d, scale, scores);
    (void)avx2;
    for (int64_t h = 0; h < group; h++) { /* softmax, then the weighted sum of V */
        float *p = scores + h * len, top = -INFINITY, sum = 0.0f, *a = acc + h * d;
        for (int64_t s = 0; s < len; s++) top = p[s] > top ? p[s] : top;
        for (int64_t s = 0; s < len; s++) {
            p[s] = exp_approx(p[s] - top);
            sum += p[s];
        }
        const float inv = 1.0f / sum;
        for (int64_t i = 0; i < d; i++) a[i] = 0.0f;
        for (int64_t s = 0; s < len; s++) {
            const float w = p[s] * inv;
            for (int64_t i = 0; i < d; i++) a[i] += w * vf[s * d + i];
        }
        for (int64_t i = 0; i < d; i++) out[h * d + i] = to_bf(a[i]);
    }
}

/* decode_attention(q, q_stride, k_cache, v_cache, slots, lens, out, seqs, heads, kv_heads, head_dim, width,
   threads): q bf16 [seqs, heads, head_dim] with rows q_stride values apart (a view of the qkv rows); k_cache and
   v_cache bf16 [slots, kv_heads, head_dim] contiguous; slots int64 [seqs, width], sequence b's first lens[b]
   entries (int64) are its context; out bf16 [seqs, heads * head_dim]. Head h reads kv head h / (heads /
   kv_heads), as ChatGLM groups them; work is split over (sequence, kv head). A sequence with no context gets
   zeros. */
static PyObject *decode_attention(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long pq, pk, pv, ps, pl, po;
    Py_ssize_t q_stride, seqs, heads, kv_heads, d, width;
    int threads;
    if (!PyArg_ParseTuple(args, "KnKKKKKnnnnni", &pq, &q_stride, &pk, &pv, &ps, &pl, &po, &seqs, &heads, &kv_heads,
                          &d, &width, &threads))
        return NULL;
    if (seqs < 0 || heads <= 0 || kv_heads <= 0 || heads % kv_heads || heads / kv_heads > MAX_GROUP || d <= 0
        || d > MAX_DIM || width < 0 || threads < 1) {
        PyErr_Format(PyExc_ValueError, "decode_attention: bad shape seqs=%zd heads=%zd kv_heads=%zd (at most %d heads "
                     "a kv head) head_dim=%zd (at most %d) width=%zd threads=%d", seqs, heads, kv_heads, MAX_GROUP, d,
                     MAX_DIM, width, threads);
        return NULL;
    }
    const int64_t group = heads / kv_heads, slot_stride = kv_heads * d, pairs = seqs * kv_heads;
    const float scale = 1.0f / sqrtf((float)d);
    const int64_t *lens = PTR(const int64_t, pl);
#if X86
    const int avx2 = d % 8 == 0 && __builtin_cpu_supports("avx2");
#else
    const int avx2 = 0;
#endif
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    #pragma omp parallel num_threads(threads) if (pairs >= 2)
    {
        float *scratch = (float *)malloc(sizeof(float) * (size_t)(group * (width + d) + 2 * width * d + 1));
        if (!scratch) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < pairs; i++) {
            if (!scratch) continue;
            const int64_t b = i / kv_heads, g = i % kv_heads, len = lens[b] < width ? lens[b] : width;
            uint16_t *out = PTR(uint16_t, po) + (b * heads + g * group) * d;
            if (len <= 0) {
                memset(out, 0, sizeof(uint16_t) * (size_t)(group * d));
                continue;
            }
            attend_group(PTR(const uint16_t, pq) + b * q_stride + g * group * d, group, PTR(const uint16_t, pk) + g * d,
                         PTR(const uint16_t, pv) + g * d, slot_stride, PTR(const int64_t, ps) + b * width, len, d,
                         scale, scratch, avx2, out);
        }
        free(scratch);
    }
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* Rotary on the first dim values of one head, in place: out[i] = bf16(bf16(x[i] * cos[i]) + bf16(x[j] * sin[i])),
   j = i's partner (its pair's other value, interleaved, or the other half), as layers.rotate computes it in bf16
   from Rotary's full-width tables (sin negated where the pair's first value takes it). */
CLONES static void rope_head(uint16_t *x, const uint16_t *cos, const uint16_t *sin, int64_t dim, int interleaved) {
    uint16_t was[MAX_DIM];
    memcpy(was, x, sizeof(uint16_t) * (size_t)dim);
    const int64_t half = dim / 2;
    for (int64_t i = 0; i < dim; i++) {
        const int64_t j = interleaved ? (i ^ 1) : (i < half ? i + half : i - half);
        x[i] = to_bf(bf(to_bf(bf(was[i]) * bf(cos[i]))) + bf(to_bf(bf(was[j]) * bf(sin[i]))));
    }
}

/* rope_and_cache(qkv, tokens, heads, kv_heads, head_dim, dim, interleaved, cos, sin, table_rows, positions, slots,
   k_cache, v_cache, threads): qkv bf16 [tokens, heads + 2 kv_heads, head_dim] contiguous, its q and k heads
   rotated in place on their first dim values; cos, sin bf16 [table_rows, dim] (Rotary's cos_full, sin_signed);
   positions and slots int64 [tokens]; token t's k and v heads are then copied to row slots[t] of k_cache /
   v_cache, bf16 [slots, kv_heads, head_dim] contiguous. A position past the tables is refused, nothing written. */
static PyObject *rope_and_cache(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long px, pc, psin, pp, pslots, pk, pv;
    Py_ssize_t tokens, heads, kv_heads, d, dim, table_rows;
    int interleaved, threads;
    if (!PyArg_ParseTuple(args, "KnnnnnpKKnKKKKi", &px, &tokens, &heads, &kv_heads, &d, &dim, &interleaved, &pc, &psin,
                          &table_rows, &pp, &pslots, &pk, &pv, &threads))
        return NULL;
    if (tokens < 0 || heads <= 0 || kv_heads <= 0 || d <= 0 || d > MAX_DIM || dim < 0 || dim > d || dim % 2
        || threads < 1) {
        PyErr_Format(PyExc_ValueError, "rope_and_cache: bad shape tokens=%zd heads=%zd kv_heads=%zd head_dim=%zd "
                     "(at most %d) rotary dim=%zd (even) threads=%d", tokens, heads, kv_heads, d, MAX_DIM, dim,
                     threads);
        return NULL;
    }
    const int64_t rows = heads + 2 * kv_heads, rotated = heads + kv_heads;
    uint16_t *qkv = PTR(uint16_t, px), *k_cache = PTR(uint16_t, pk), *v_cache = PTR(uint16_t, pv);
    const int64_t *positions = PTR(const int64_t, pp), *slots = PTR(const int64_t, pslots);
    for (Py_ssize_t t = 0; t < tokens; t++)
        if (positions[t] < 0 || positions[t] >= table_rows) {
            PyErr_Format(PyExc_ValueError, "rope_and_cache: position %lld is outside the rotary tables' %zd rows",
                         (long long)positions[t], table_rows);
            return NULL;
        }
    Py_BEGIN_ALLOW_THREADS
    #pragma omp parallel for num_threads(threads) schedule(static) if (tokens >= 4)
    for (Py_ssize_t t = 0; t < tokens; t++) {
        uint16_t *token = qkv + t * rows * d;
        const uint16_t *cos = PTR(const uint16_t, pc) + positions[t] * dim;
        const uint16_t *sin = PTR(const uint16_t, psin) + positions[t] * dim;
        for (int64_t r = 0; r < rotated; r++) rope_head(token + r * d, cos, sin, dim, interleaved);
        memcpy(k_cache + slots[t] * kv_heads * d, token + heads * d, sizeof(uint16_t) * (size_t)(kv_heads * d));
        memcpy(v_cache + slots[t] * kv_heads * d, token + rotated * d, sizeof(uint16_t) * (size_t)(kv_heads * d));
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"add_rms_norm", add_rms_norm, METH_VARARGS, "residual += x; out = rms_norm(residual) * w, bf16 (see the source)."},
    {"silu_mul", silu_mul, METH_VARARGS, "out = silu(gate) * up from [gate | up] rows, bf16 (see the source)."},
    {"decode_attention", decode_attention, METH_VARARGS, "One new token per sequence over its cached K/V, bf16."},
    {"rope_and_cache", rope_and_cache, METH_VARARGS, "Rotary on q and k in place, k and v into their cache slots."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_decode", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__cpu_decode(void) { return PyModule_Create(&module); }
