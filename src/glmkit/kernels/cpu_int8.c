/* int8 x int8 products for x86 CPUs with AVX2 (glmkit/models/cpu_int8.py is the only caller).

   y[m, n] = sum_k x[m, k] * w[n, k], with w[n, k] = q[n, k] * scale[n] (int8 q, one scale per row) and each row
   of x quantized here, per call, to 8 bits centred on its own range: x[m, k] ~= mid[m] + step[m] * a[m, k],
   a in [-127, 127], mid = (min + max) / 2, step = (max - min) / 254. So

       y[m, n] = step[m] * scale[n] * sum_k a[m, k] * q[n, k]  +  mid[m] * row_sum[n]

   with row_sum[n] = sum_k w[n, k] (computed once, by the caller). The integer sums run on the widest of three
   instruction sets the CPU has, all exact, so all give the same answer:
   - AVX2: `vpmaddubsw` multiplies unsigned by signed bytes and adds pairs into int16. |q| as the unsigned side and
     a with q's sign as the signed side (`vpsignb`) keep every pair within 2 * 127 * 127 = 32,258, so nothing
     saturates, with 8-bit activations (fbgemm's u8 x s8 product must drop to 7 bits there). Then `vpmaddwd`
     with ones widens the pairs into int32 sums.
   - AVX-VNNI (256 bits) and AVX512-VNNI (512 bits): `vpdpbusd` adds four u8 x s8 products straight into int32,
     one instruction for those four. The activations go in as a + 128 (unsigned), and 128 * sum_k q[n, k]
     (qsums, from the caller) comes off each sum.

   A row is quantized the same way alone or beside any other rows, and every batch size runs the same integer
   sums: an answer does not depend on what ran beside it.

   Layout: weights [n_pad, k_pad] int8 with n_pad a multiple of 4 and k_pad of 64, zero-padded (the caller packs
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
#define AVX_VNNI __attribute__((target("avx2,avxvnni")))
#define AVX512_VNNI __attribute__((target("avx2,avx512f,avx512bw,avx512vnni")))
#else
#define GLMKIT_X86 0
#endif

#define ROWS 4          /* weight rows per tile */
#define MAX_MULTI 4     /* at most this many input rows per pass over a tile (MULTI below) */
#define X_BLOCK 64      /* input rows per pass over the weights (a block of them stays in L2) */
#define K_STEP 64       /* k_pad's multiple: a 512-bit step */

/* The instruction sets, by index (linear's `isa`); isas() lists those this CPU runs */
static const char *const ISA_NAMES[3] = {"avx2", "avx-vnni", "avx512-vnni"};

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

_Static_assert(ROWS == 4, "a tile's sums are gathered four at a time (hsum4)");

/* The sums of four vectors' lanes, as the four lanes of one: three `vphaddd` and one add, rather than a
   shuffle-and-add tree per vector (a tile's last step; a decode step's products 2-3% faster) */
AVX2 static inline __m128i hsum4(__m256i a, __m256i b, __m256i c, __m256i d) {
    __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
    return _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}

AVX512_VNNI static inline __m256i half_sum(__m512i v) {
    return _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
}

/* The integer sums of ROWS weight rows against `count` input rows, into sums[count][ROWS]. Inlined with a constant
   count, so the accumulators stay in registers (a run-time count spilled them to the stack). The next tile's bytes
   are fetched as this tile's are read, as many per step as the step reads: without it a decode step's products read
   11.5 GB/s of weights on a 2-core AVX2 EPYC, with it 27.7 (the hardware prefetchers alone do not keep four rows'
   streams fed). */

/* The walk of the 256-bit tiles (AVX2, AVX-VNNI) over k, two cache lines of the next tile fetched per step;
   PRODUCT is acc[r][j] plus weight row j's 32 bytes q times input row r's xr. */
#define WALK_256(PRODUCT)                                                                                     \
    __m256i acc[MAX_MULTI][ROWS];                                                                             \
    for (int r = 0; r < count; r++)                                                                           \
        for (int j = 0; j < ROWS; j++) acc[r][j] = _mm256_setzero_si256();                                   \
    const char *ahead = (const char *)w + ROWS * k_pad;                                                       \
    for (int64_t i = 0; i < k_pad; i += 32) {                                                                 \
        _mm_prefetch(ahead + ROWS * i, _MM_HINT_T0);                                                          \
        _mm_prefetch(ahead + ROWS * i + 64, _MM_HINT_T0);                                                     \
        for (int j = 0; j < ROWS; j++) {                                                                      \
            const __m256i q = _mm256_loadu_si256((const __m256i *)(w + j * k_pad + i));                      \
            for (int r = 0; r < count; r++) {                                                                 \
                const __m256i xr = _mm256_loadu_si256((const __m256i *)(x[r] + i));                          \
                acc[r][j] = PRODUCT;                                                                          \
            }                                                                                                 \
        }                                                                                                     \
    }

/* AVX2: |q| unsigned times a with q's sign (`vpmaddubsw`), pairs into int16, then into int32 (`vpmaddwd`). */
AVX2 static inline __attribute__((always_inline)) void tile_avx2(const int8_t *w, int64_t k_pad,
                                                                const int8_t *const *x, const int count,
                                                                const int32_t *qsum, int32_t *sums) {
    (void)qsum;
    const __m256i ones = _mm256_set1_epi16(1);
    WALK_256(_mm256_add_epi32(acc[r][j], _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(q, q),
                                                                                 _mm256_sign_epi8(xr, q)), ones)))
    for (int r = 0; r < count; r++)
        _mm_storeu_si128((__m128i *)(sums + r * ROWS), hsum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
}

/* AVX-VNNI (`vpdpbusd` on 256 bits): four u8 x s8 products straight into int32, nothing to saturate. The input
   rows come as a + 128 (unsigned), so each sum is less 128 * (the weight row's sum of q). */
AVX_VNNI static inline __attribute__((always_inline)) void tile_avx_vnni(const int8_t *w, int64_t k_pad,
                                                                        const int8_t *const *x, const int count,
                                                                        const int32_t *qsum, int32_t *sums) {
    WALK_256(_mm256_dpbusd_avx_epi32(acc[r][j], xr, q))
    const __m128i offset = _mm_slli_epi32(_mm_loadu_si128((const __m128i *)qsum), 7);
    for (int r = 0; r < count; r++)
        _mm_storeu_si128((__m128i *)(sums + r * ROWS),
                         _mm_sub_epi32(hsum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]), offset));
}

/* AVX512-VNNI: the same on 512 bits. */
AVX512_VNNI static inline __attribute__((always_inline)) void tile_avx512_vnni(const int8_t *w, int64_t k_pad,
                                                                              const int8_t *const *x,
                                                                              const int count,
                                                                              const int32_t *qsum,
                                                                              int32_t *sums) {
    __m512i acc[MAX_MULTI][ROWS];
    for (int r = 0; r < count; r++)
        for (int j = 0; j < ROWS; j++) acc[r][j] = _mm512_setzero_si512();
    const char *ahead = (const char *)w + ROWS * k_pad;
    for (int64_t i = 0; i < k_pad; i += 64) {
        for (int p = 0; p < 4; p++) _mm_prefetch(ahead + ROWS * i + 64 * p, _MM_HINT_T0);
        for (int j = 0; j < ROWS; j++) {
            __m512i q = _mm512_loadu_si512((const void *)(w + j * k_pad + i));
            for (int r = 0; r < count; r++)
                acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], _mm512_loadu_si512((const void *)(x[r] + i)), q);
        }
    }
    const __m128i offset = _mm_slli_epi32(_mm_loadu_si128((const __m128i *)qsum), 7);
    for (int r = 0; r < count; r++)
        _mm_storeu_si128((__m128i *)(sums + r * ROWS),
                         _mm_sub_epi32(hsum4(half_sum(acc[r][0]), half_sum(acc[r][1]), half_sum(acc[r][2]),
                                             half_sum(acc[r][3])), offset));
}

typedef void (*tile_fn)(const int8_t *, int64_t, const int8_t *const *, const int32_t *, int32_t *);

/* One function per (instruction set, count): count is a constant inside each. */
#define TILES(name, attr)                                                                                     \
    attr static void name##_1(const int8_t *w, int64_t k, const int8_t *const *x, const int32_t *q, int32_t *s) { \
        name(w, k, x, 1, q, s);                                                                               \
    }                                                                                                         \
    attr static void name##_2(const int8_t *w, int64_t k, const int8_t *const *x, const int32_t *q, int32_t *s) { \
        name(w, k, x, 2, q, s);                                                                               \
    }                                                                                                         \
    attr static void name##_3(const int8_t *w, int64_t k, const int8_t *const *x, const int32_t *q, int32_t *s) { \
        name(w, k, x, 3, q, s);                                                                               \
    }                                                                                                         \
    attr static void name##_4(const int8_t *w, int64_t k, const int8_t *const *x, const int32_t *q, int32_t *s) { \
        name(w, k, x, 4, q, s);                                                                               \
    }
TILES(tile_avx2, AVX2)
TILES(tile_avx_vnni, AVX_VNNI)
TILES(tile_avx512_vnni, AVX512_VNNI)

/* By instruction set (ISA_NAMES' order), then by count - 1. */
static const tile_fn TILE_FNS[3][MAX_MULTI] = {
    {tile_avx2_1, tile_avx2_2, tile_avx2_3, tile_avx2_4},
    {tile_avx_vnni_1, tile_avx_vnni_2, tile_avx_vnni_3, tile_avx_vnni_4},
    {tile_avx512_vnni_1, tile_avx512_vnni_2, tile_avx512_vnni_3, tile_avx512_vnni_4},
};
/* Input rows per pass over a tile, by instruction set. Measured on 2 cores over a decode step's products: AVX2 2
   (3 and 4 within 5%); AVX512-VNNI 4 (an AVX512 EPYC, 64 rows: 126 ms against 152 with 2, 8 rows: the same) */
static const int MULTI[3] = {2, 4, 4};

/* The bytes of a (a in [-127, 127]) as a + 128, the unsigned side of `vpdpbusd`; n a multiple of 32. */
AVX2 static void to_unsigned(int8_t *a, int64_t n) {
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    for (int64_t i = 0; i < n; i += 32)
        _mm256_storeu_si256((__m256i *)(a + i), _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(a + i)), flip));
}

static inline void store(void *y, int bf16, int64_t index, float v) {
    if (bf16) ((uint16_t *)y)[index] = float_to_bf16(v);
    else ((float *)y)[index] = v;
}

/* Whether this CPU runs ISA_NAMES[isa] (and the OS saves its registers: __builtin_cpu_supports checks both) */
static int cpu_runs(int isa) {
    __builtin_cpu_init();
    switch (isa) {
    case 0: return __builtin_cpu_supports("avx2");
    case 1: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("avxvnni");
    case 2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("avx512f")
                   && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
    default: return 0;
    }
}

/* Four outputs as bf16, rounded to nearest even as float_to_bf16 (NaN stays NaN), into y[0..3] */
AVX2 static inline void store4_bf16(uint16_t *y, __m128 v) {
    const __m128i bits = _mm_castps_si128(v);
    const __m128i odd = _mm_and_si128(_mm_srli_epi32(bits, 16), _mm_set1_epi32(1));
    __m128i rounded = _mm_srli_epi32(_mm_add_epi32(bits, _mm_add_epi32(_mm_set1_epi32(0x7fff), odd)), 16);
    const __m128i nan = _mm_castps_si128(_mm_cmpunord_ps(v, v));
    rounded = _mm_blendv_epi8(rounded, _mm_or_si128(_mm_srli_epi32(bits, 16), _mm_set1_epi32(0x40)), nan);
    _mm_storel_epi64((__m128i *)y, _mm_packus_epi32(rounded, rounded));
}

/* A tile's integer sums ([count][ROWS], input rows step[0..count), `used` weight rows) to outputs: y[out + i / per
   * n + j] = sum * (step * scale) (+ the refined row's second half) + mid * row_sum, four weight rows at a time
   (the same operations, in the same order, as one at a time: no fused multiply-adds) */
AVX2 static void finish(const int32_t *sums, int count, int per, const float *step, const float *mid,
                        const float *scales, const float *row_sums, int64_t used, void *y, int y_bf16, int64_t out,
                        int64_t n) {
    if (used == ROWS) {
        const __m128 scale = _mm_loadu_ps(scales), row_sum = _mm_loadu_ps(row_sums);
        for (int i = 0; i < count; i += per) {
            __m128 v = _mm_mul_ps(_mm_cvtepi32_ps(_mm_loadu_si128((const __m128i *)(sums + i * ROWS))),
                                  _mm_mul_ps(_mm_set1_ps(step[i]), scale));
            if (per == 2) /* the refined row's second half */
                v = _mm_add_ps(v, _mm_add_ps(_mm_mul_ps(_mm_cvtepi32_ps(_mm_loadu_si128((const __m128i *)(sums + (i + 1) * ROWS))),
                                                        _mm_mul_ps(_mm_set1_ps(step[i + 1]), scale)),
                                             _mm_mul_ps(_mm_set1_ps(mid[i + 1]), row_sum)));
            v = _mm_add_ps(v, _mm_mul_ps(_mm_set1_ps(mid[i]), row_sum));
            const int64_t at = out + (i / per) * n;
            if (y_bf16) store4_bf16((uint16_t *)y + at, v);
            else _mm_storeu_ps((float *)y + at, v);
        }
        return;
    }
    for (int64_t j = 0; j < used; j++)
        for (int i = 0; i < count; i += per) {
            float value = (float)sums[i * ROWS + j] * (step[i] * scales[j]);
            if (per == 2)
                value += (float)sums[(i + 1) * ROWS + j] * (step[i + 1] * scales[j]) + mid[i + 1] * row_sums[j];
            store(y, y_bf16, out + (i / per) * n + j, value + mid[i] * row_sums[j]);
        }
}

/* A row quantized in two halves, each 8 bits on its own range: the rounding a (as quantize_row), then the error
   left, x - (mid + step * a), in its turn. Summed, the product's error is that of about 16-bit activations. */
AVX2 static void quantize_refined(const void *x, int bf16, int64_t k, int64_t k_pad, int8_t *a, float *step,
                                  float *mid) {
    quantize_row(x, bf16, k, k_pad, a, step, mid);
    float *rest = (float *)malloc(sizeof(float) * (size_t)k);
    if (!rest) { /* no memory for the second half: the first alone (a row's error at 8 bits) */
        memset(a + k_pad, 0, (size_t)k_pad);
        step[1] = mid[1] = 0.0f;
        return;
    }
    for (int64_t i = 0; i < k; i++) rest[i] = load1(x, bf16, i) - (mid[0] + step[0] * (float)a[i]);
    quantize_row(rest, 0, k, k_pad, a + k_pad, step + 1, mid + 1);
    free(rest);
}

/* linear(x, x_bf16, m, k, w, k_pad, n, scales, row_sums, qsums, y, y_bf16, threads, refine, isa): all pointers
   as ints (tensor.data_ptr()); x [m, k] contiguous, w [n rounded up to 4, k_pad], scales and row_sums fp32 [n],
   qsums int32 [n rounded up to 4] (each weight row's sum of q, for the VNNI sets' unsigned inputs), y [m, n]
   contiguous. refine: each row in two 8-bit halves (quantize_refined), run as two rows of one pass. isa: an index
   into ISA_NAMES that this CPU runs; every one gives the same integer sums, so the same answer. */
static PyObject *linear(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long px, pw, ps, pr, pq, py;
    int x_bf16, y_bf16, threads, refine, isa;
    Py_ssize_t m, k, k_pad, n;
    if (!PyArg_ParseTuple(args, "Kpnn" "Kn" "nKKK" "Kpipi", &px, &x_bf16, &m, &k, &pw, &k_pad, &n, &ps, &pr, &pq,
                          &py, &y_bf16, &threads, &refine, &isa))
        return NULL;
    if (m < 0 || k <= 0 || n <= 0 || k_pad < k || k_pad % K_STEP || threads < 1) {
        PyErr_Format(PyExc_ValueError, "linear: bad shape m=%zd k=%zd k_pad=%zd (a multiple of %d) n=%zd threads=%d",
                     m, k, k_pad, K_STEP, n, threads);
        return NULL;
    }
    if (isa < 0 || isa > 2 || !cpu_runs(isa)) {
        PyErr_Format(PyExc_ValueError, "linear: isa=%d: this CPU does not run it", isa);
        return NULL;
    }
    if (m == 0) Py_RETURN_NONE;
    const int per = refine ? 2 : 1;
    const int64_t rows = m * per; /* rows of quantized input; a refined row's halves are neighbours */
    /* One or two rows (a decode step of one sequence) read the weights at the memory's pace on 256 bits and 9% slower
       on 512 (an AVX512 EPYC, benchmarks/cpu_int8.py): AVX-VNNI takes the same unsigned rows, so it runs them
       where the CPU has it */
    const int tiles_isa = isa == 2 && rows <= 2 && cpu_runs(1) ? 1 : isa, multi = MULTI[tiles_isa];
    const int8_t *w = (const int8_t *)(uintptr_t)pw;
    const float *scales = (const float *)(uintptr_t)ps, *row_sums = (const float *)(uintptr_t)pr;
    const int32_t *qsums = (const int32_t *)(uintptr_t)pq;
    int8_t *a = (int8_t *)aligned_alloc(64, (size_t)(rows * k_pad));
    float *step = (float *)malloc(sizeof(float) * (size_t)rows), *mid = (float *)malloc(sizeof(float) * (size_t)rows);
    if (!a || !step || !mid) {
        free(a); free(step); free(mid);
        return PyErr_NoMemory();
    }
    const size_t x_row = (size_t)k * (x_bf16 ? 2 : 4);
    const int64_t tiles = (n + ROWS - 1) / ROWS;
    Py_BEGIN_ALLOW_THREADS
    #pragma omp parallel for num_threads(threads) schedule(static) if (m >= 8)
    for (int64_t r = 0; r < m; r++) {
        const void *row = (const char *)(uintptr_t)px + r * x_row;
        const int64_t v = r * per;
        if (refine) quantize_refined(row, x_bf16, k, k_pad, a + v * k_pad, step + v, mid + v);
        else quantize_row(row, x_bf16, k, k_pad, a + v * k_pad, step + v, mid + v);
        if (isa > 0) to_unsigned(a + v * k_pad, per * k_pad);
    }
    void *y = (void *)(uintptr_t)py;
    for (int64_t r0 = 0; r0 < rows; r0 += X_BLOCK) { /* X_BLOCK is even: a refined row's halves stay together */
        const int64_t r1 = r0 + X_BLOCK < rows ? r0 + X_BLOCK : rows;
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            const int64_t n0 = t * ROWS;
            for (int64_t r = r0; r < r1;) {
                const int count = r1 - r < multi ? (int)(r1 - r) : multi; /* even when refined: r and r1 are */
                const int8_t *x[MAX_MULTI];
                int32_t sums[MAX_MULTI * ROWS];
                for (int i = 0; i < count; i++) x[i] = a + (r + i) * k_pad;
                TILE_FNS[tiles_isa][count - 1](w + n0 * k_pad, k_pad, x, qsums + n0, sums);
                finish(sums, count, per, step + r, mid + r, scales + n0, row_sums + n0, n - n0 < ROWS ? n - n0 : ROWS,
                       y, y_bf16, (r / per) * n + n0, n);
                r += count;
            }
        }
    }
    Py_END_ALLOW_THREADS
    free(a); free(step); free(mid);
    Py_RETURN_NONE;
}

#else
static int cpu_runs(int isa) { (void)isa; return 0; }
static PyObject *linear(PyObject *self, PyObject *args) {
    (void)self, (void)args;
    PyErr_SetString(PyExc_RuntimeError, "glmkit's int8 kernel needs an x86-64 CPU");
    return NULL;
}
#endif

static PyObject *isas(PyObject *self, PyObject *unused) {
    (void)self, (void)unused;
    PyObject *names = PyList_New(0);
    for (int isa = 0; names && isa < 3; isa++)
        if (cpu_runs(isa)) {
            PyObject *name = PyUnicode_FromString(ISA_NAMES[isa]);
            if (!name || PyList_Append(names, name) < 0) Py_CLEAR(names);
            Py_XDECREF(name);
        }
    return names;
}

static PyMethodDef methods[] = {
    {"linear", linear, METH_VARARGS, "y = x @ W.T with 8-bit activations quantized per row (see the source)."},
    {"isas", isas, METH_NOARGS, "The instruction sets this CPU runs the kernel on, by linear's isa index order."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_int8", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__cpu_int8(void) { return PyModule_Create(&module); }
