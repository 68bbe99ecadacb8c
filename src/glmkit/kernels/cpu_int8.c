/* int8 x int8 products for x86 CPUs with AVX2 (glmkit/models/cpu_int8.py is the only caller).

   y[m, n] = sum_k x[m, k] * w[n, k], with w[n, k] = q[n, k] * scale[n] (int8 q, one scale per row) and each row
   of x quantized here, per call, to 8 bits centred on its own range: x[m, k] ~= mid[m] + step[m] * a[m, k],
   a in [-127, 127], mid = (min + max) / 2, step = (max - min) / 254. So

       y[m, n] = step[m] * scale[n] * sum_k a[m, k] * q[n, k]  +  mid[m] * row_sum[n]

   with row_sum[n] = sum_k w[n, k] (computed once, by the caller). The integer sum runs on `vpmaddubsw`, which
   multiplies unsigned by signed bytes and adds pairs into int16: |q| as the unsigned side and a with q's sign as
   the signed side (`vpsignb`) keep every pair within 2 * 127 * 127 = 32,258, so nothing saturates, with 8-bit
   activations on every AVX2 CPU (fbgemm's u8 x s8 product must drop to 7 bits there). Then `vpmaddwd` with ones
   widens the pairs into int32 sums.

   A row is quantized the same way alone or beside any other rows, and every batch size runs the same integer
   sums: an answer does not depend on what ran beside it.

   Layout: weights [n_pad, k_pad] int8 with n_pad a multiple of 4 and k_pad of 32, zero-padded (the caller packs
   them once), so no loop has a tail. Work is split over weight rows with OpenMP; linked against libgomp.so.1,
   which is the runtime PyTorch has already loaded in the process (same soname), so both share one thread pool.
   Built when the package is installed; where it is not (no compiler, not x86-64), the PyTorch path runs. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GLMKIT_X86 1
#define AVX2 __attribute__((target("avx2")))
#else
#define GLMKIT_X86 0
#endif

#define ROWS 4          /* weight rows per tile */
#define X_BLOCK 64      /* input rows per pass over the weights (a block of them stays in L2) */

#if GLMKIT_X86

static inline float bf16_to_float(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest even, as torch's .to(torch.bfloat16) */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40); /* NaN stays NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* Eight values of x from index i, as fp32. */
AVX2 static inline __m256 load8(const void *x, int bf16, int64_t i) {
    if (!bf16) return _mm256_loadu_ps((const float *)x + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float load1(const void *x, int bf16, int64_t i) {
    return bf16 ? bf16_to_float(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

/* (x - mid) * inv rounded half to even and clamped to [-127, 127], eight at a time, as int32 */
AVX2 static inline __m256i round8(__m256 v, __m256 mid, __m256 inv) {
    const __m256 lim = _mm256_set1_ps(127.0f);
    v = _mm256_mul_ps(_mm256_sub_ps(v, mid), inv);
    v = _mm256_min_ps(_mm256_max_ps(v, _mm256_sub_ps(_mm256_setzero_ps(), lim)), lim);
    return _mm256_cvtps_epi32(v); /* the default rounding mode: to nearest, ties to even */
}

/* One row of x (fp32 or bf16, k values) to a[k_pad] bytes; returns (step, mid). */
AVX2 static void quantize_row(const void *x, int bf16, int64_t k, int64_t k_pad, int8_t *a, float *step,
                              float *mid) {
    int64_t i = 0;
    float lo = load1(x, bf16, 0), hi = lo;
    if (k >= 8) {
        __m256 vlo = load8(x, bf16, 0), vhi = vlo;
        for (i = 8; i + 8 <= k; i += 8) {
            __m256 v = load8(x, bf16, i);
            vlo = _mm256_min_ps(vlo, v);
            vhi = _mm256_max_ps(vhi, v);
        }
        float l[8], h[8];
        _mm256_storeu_ps(l, vlo);
        _mm256_storeu_ps(h, vhi);
        for (int j = 0; j < 8; j++) {
            lo = l[j] < lo ? l[j] : lo;
            hi = h[j] > hi ? h[j] : hi;
        }
    }
    for (; i < k; i++) {
        float v = load1(x, bf16, i);
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
    }
    float m = (lo + hi) * 0.5f, half = (hi - lo) * 0.5f;
    if (!(half > 0.0f)) { /* a constant row: every a is 0 and the row is its mid */
        memset(a, 0, (size_t)k_pad);
        *step = 0.0f;
        *mid = m;
        return;
    }
    float inv = 127.0f / half;
    const __m256 vm = _mm256_set1_ps(m), vi = _mm256_set1_ps(inv);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (i = 0; i + 32 <= k; i += 32) {
        __m256i q0 = round8(load8(x, bf16, i), vm, vi), q1 = round8(load8(x, bf16, i + 8), vm, vi);
        __m256i q2 = round8(load8(x, bf16, i + 16), vm, vi), q3 = round8(load8(x, bf16, i + 24), vm, vi);
        __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
        _mm256_storeu_si256((__m256i *)(a + i), _mm256_permutevar8x32_epi32(packed, order));
    }
    for (; i < k; i++) {
        float v = (load1(x, bf16, i) - m) * inv;
        v = v < -127.0f ? -127.0f : v > 127.0f ? 127.0f : v;
        a[i] = (int8_t)__builtin_nearbyintf(v); /* ties to even, as above */
    }
    memset(a + k, 0, (size_t)(k_pad - k));
    *step = half / 127.0f;
    *mid = m;
}

AVX2 static inline int32_t hsum(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* sum_k a * q for one 32-byte step: |q| unsigned times a with q's sign, pairs into int16, then into int32. */
#define DOT(acc, absq, q, x) \
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(absq, _mm256_sign_epi8(x, q)), ones))

/* The integer sums of ROWS weight rows against two input rows (or one: x1 == NULL). */
AVX2 static void tile(const int8_t *w, int64_t k_pad, const int8_t *x0, const int8_t *x1, int32_t out0[ROWS],
                      int32_t out1[ROWS]) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i c00 = _mm256_setzero_si256(), c01 = c00, c02 = c00, c03 = c00;
    __m256i c10 = c00, c11 = c00, c12 = c00, c13 = c00;
    const int8_t *w0 = w, *w1 = w + k_pad, *w2 = w + 2 * k_pad, *w3 = w + 3 * k_pad;
    /* The next tile's bytes are fetched as this tile's are read, two lines per step. Without it a decode step's
       products read 11.5 GB/s of weights on a 2-core AVX2 EPYC, with it 27.7 (the hardware prefetchers alone
       do not keep four rows' streams fed). */
    const char *ahead = (const char *)w + ROWS * k_pad;
    for (int64_t i = 0; i < k_pad; i += 32) {
        _mm_prefetch(ahead + ROWS * i, _MM_HINT_T0);
        _mm_prefetch(ahead + ROWS * i + 64, _MM_HINT_T0);
        __m256i q0 = _mm256_loadu_si256((const __m256i *)(w0 + i)), q1 = _mm256_loadu_si256((const __m256i *)(w1 + i));
        __m256i q2 = _mm256_loadu_si256((const __m256i *)(w2 + i)), q3 = _mm256_loadu_si256((const __m256i *)(w3 + i));
        __m256i a0 = _mm256_sign_epi8(q0, q0), a1 = _mm256_sign_epi8(q1, q1);
        __m256i a2 = _mm256_sign_epi8(q2, q2), a3 = _mm256_sign_epi8(q3, q3);
        __m256i x = _mm256_loadu_si256((const __m256i *)(x0 + i));
        DOT(c00, a0, q0, x); DOT(c01, a1, q1, x); DOT(c02, a2, q2, x); DOT(c03, a3, q3, x);
        if (x1) {
            x = _mm256_loadu_si256((const __m256i *)(x1 + i));
            DOT(c10, a0, q0, x); DOT(c11, a1, q1, x); DOT(c12, a2, q2, x); DOT(c13, a3, q3, x);
        }
    }
    out0[0] = hsum(c00); out0[1] = hsum(c01); out0[2] = hsum(c02); out0[3] = hsum(c03);
    if (x1) { out1[0] = hsum(c10); out1[1] = hsum(c11); out1[2] = hsum(c12); out1[3] = hsum(c13); }
}

static inline void store(void *y, int bf16, int64_t index, float v) {
    if (bf16) ((uint16_t *)y)[index] = float_to_bf16(v);
    else ((float *)y)[index] = v;
}

static int cpu_ok(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2");
}

/* linear(x, x_bf16, m, k, w, k_pad, n, scales, row_sums, y, y_bf16, threads): all pointers as ints
   (tensor.data_ptr()); x [m, k] contiguous, w [n rounded up to 4, k_pad], scales and row_sums fp32 [n],
   y [m, n] contiguous. */
static PyObject *linear(PyObject *self, PyObject *args) {
    unsigned long long px, pw, ps, pr, py;
    int x_bf16, y_bf16, threads;
    Py_ssize_t m, k, k_pad, n;
    if (!PyArg_ParseTuple(args, "Kpnn" "Kn" "nKK" "Kpi", &px, &x_bf16, &m, &k, &pw, &k_pad, &n, &ps, &pr, &py,
                          &y_bf16, &threads))
        return NULL;
    if (m < 0 || k <= 0 || n <= 0 || k_pad < k || k_pad % 32 || threads < 1) {
        PyErr_Format(PyExc_ValueError, "linear: bad shape m=%zd k=%zd k_pad=%zd n=%zd threads=%d", m, k, k_pad, n,
                     threads);
        return NULL;
    }
    if (m == 0) Py_RETURN_NONE;
    const int8_t *w = (const int8_t *)(uintptr_t)pw;
    const float *scales = (const float *)(uintptr_t)ps, *row_sums = (const float *)(uintptr_t)pr;
    int8_t *a = (int8_t *)aligned_alloc(64, (size_t)(m * k_pad));
    float *step = (float *)malloc(sizeof(float) * (size_t)m), *mid = (float *)malloc(sizeof(float) * (size_t)m);
    if (!a || !step || !mid) {
        free(a); free(step); free(mid);
        return PyErr_NoMemory();
    }
    const size_t x_row = (size_t)k * (x_bf16 ? 2 : 4);
    const int64_t tiles = (n + ROWS - 1) / ROWS;
    Py_BEGIN_ALLOW_THREADS
    #pragma omp parallel for num_threads(threads) schedule(static) if (m >= 8)
    for (int64_t r = 0; r < m; r++)
        quantize_row((const char *)(uintptr_t)px + r * x_row, x_bf16, k, k_pad, a + r * k_pad, step + r, mid + r);
    for (int64_t r0 = 0; r0 < m; r0 += X_BLOCK) {
        const int64_t r1 = r0 + X_BLOCK < m ? r0 + X_BLOCK : m;
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            int32_t s0[ROWS], s1[ROWS];
            const int64_t n0 = t * ROWS;
            for (int64_t r = r0; r < r1; r += 2) {
                const int two = r + 1 < r1;
                tile(w + n0 * k_pad, k_pad, a + r * k_pad, two ? a + (r + 1) * k_pad : NULL, s0, s1);
                for (int j = 0; j < ROWS && n0 + j < n; j++) {
                    store((void *)(uintptr_t)py, y_bf16, r * n + n0 + j,
                          (float)s0[j] * (step[r] * scales[n0 + j]) + mid[r] * row_sums[n0 + j]);
                    if (two)
                        store((void *)(uintptr_t)py, y_bf16, (r + 1) * n + n0 + j,
                              (float)s1[j] * (step[r + 1] * scales[n0 + j]) + mid[r + 1] * row_sums[n0 + j]);
                }
            }
        }
    }
    Py_END_ALLOW_THREADS
    free(a); free(step); free(mid);
    Py_RETURN_NONE;
}

#else
static int cpu_ok(void) { return 0; }
static PyObject *linear(PyObject *self, PyObject *args) {
    PyErr_SetString(PyExc_RuntimeError, "glmkit's int8 kernel needs an x86-64 CPU");
    return NULL;
}
#endif

static PyObject *supported(PyObject *self, PyObject *unused) { return PyBool_FromLong(cpu_ok()); }

static PyMethodDef methods[] = {
    {"linear", linear, METH_VARARGS, "y = x @ W.T with 8-bit activations quantized per row (see the source)."},
    {"supported", supported, METH_NOARGS, "Whether this CPU runs the kernel (AVX2)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_int8", NULL, -1, methods};

PyMODINIT_FUNC PyInit__cpu_int8(void) { return PyModule_Create(&module); }
