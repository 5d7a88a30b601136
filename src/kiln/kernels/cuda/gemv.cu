// Quantized GEMV for decode: out[n] = sum_k W[n, k] * x[k], W in a GGUF format (quant.cuh), x f32.
// Constants: FMT, MODE, NORM (fuse the preceding RMSNorm), BK (kernel shape), R (rows per unit of work), and
//   BK 0 (warp kernel, small K): U (chunks in flight per lane). A warp owns R rows; each lane walks the row in
//        16-byte chunks, 32 lanes apart, loading U chunks of all R rows before using them, and reuses each chunk's
//        activations across the R rows.
//   BK 1 (block kernel, large K): NT threads, CPT chunks per thread. The block's threads span the whole row, so
//        each thread loads its slice of x into registers once and keeps it for every row the block computes;
//        the block walks groups of R rows (loading the next group while it reduces the current one), and the
//        R partial sums of each thread are reduced across the block: a transposed butterfly in each warp (one
//        row per lane group, log2(R) + 5 - log2(R) shuffles instead of 5 R), then shared memory.
//   BK 2 (pipelined block kernel, the default where the format allows): BK 1's shape, but a grid of resident blocks
//        that each keep S groups in a cp.async pipeline in shared memory instead of one group in registers.
//   XQ: Q8_0 in the block kernels dots integer digit planes of x with __dp4a (quant.cuh).
// Up to three weight segments (e.g. Wq, Wk, Wv) of the same format and K run in one launch.
// MODE 0: plain, rows are segment 0, then 1, then 2; out_s[row] = acc + bias_s[row].
// MODE 1: residual, one segment: out0[row] = acc; resid[row] += acc (matmul + add in one pass).
// MODE 2: SwiGLU, segments gate and up: row i of both; out0[i] = silu(g) * u, out1[i] = u.
// MODE 3: QKV, segments q, k, v: the two rows one RoPE pair rotates (NeoX or adjacent) go together; q and k are
//         written rotated by position pos[0] (out0, out1), and k, v also into the f16 KV cache pools at row slot[0].
//         The rotation's cos and sin come from rtab [capacity, hd / 2, 2], made on the host in float64 as the
//         reference does (a float64 pow, cos and sin here were a long dependent chain in the finishing threads: 7B's
//         QKV GEMV ran at 1.4 TB/s).
// NORM: x is the un-normalised residual: each lane also sums x^2 over its chunks, multiplies x by the norm weight,
//       and the result is scaled by 1/sqrt(mean(x^2) + eps) at the end.

#define MODE_PLAIN 0
#define MODE_RES 1
#define MODE_GLU 2
#define MODE_QKV 3
#define NWARPS 4
#define PAIRS (MODE == MODE_GLU || MODE == MODE_QKV)

// Pick segment i's pointer with selects: indexing a local array of pointers at run time would put it in memory.
#define PICK(i, a, b, c) ((i) == 0 ? (a) : ((i) == 1 ? (b) : (c)))

#define GEMV_PARAMS                                                                                                 \
    const float *__restrict__ x, const float *__restrict__ nw, float eps, int K, const u8 *q0, const u8 *s0,        \
        const u32 *h0, const float *b0, float *o0, int n0, const u8 *q1, const u8 *s1, const u32 *h1,             \
        const float *b1, float *o1, int n1, const u8 *q2, const u8 *s2, const u32 *h2, const float *b2, float *o2, \
        int n2, float *resid, const int *__restrict__ pos, const int *__restrict__ slot, const float *__restrict__ rtab, \
        int hd, int neox, u16 *kc, u16 *vc, int n_slots

__device__ __forceinline__ void load_x(const float* __restrict__ x, const float* __restrict__ nw, int off, int n,
                                       float* v, float& sum, float& ss) {
#pragma unroll
    for (int i = 0; i < n; i += 4) {
        float4 a = __ldg((const float4*)(x + off + i));
        v[i] = a.x, v[i + 1] = a.y, v[i + 2] = a.z, v[i + 3] = a.w;
    }
#if NORM
#pragma unroll
    for (int i = 0; i < n; i++) ss += v[i] * v[i];
#pragma unroll
    for (int i = 0; i < n; i += 4) {
        float4 w = __ldg((const float4*)(nw + off + i));
        v[i] *= w.x, v[i + 1] *= w.y, v[i + 2] *= w.z, v[i + 3] *= w.w;
    }
#endif
    sum = 0.0f;
#if FMT == F_Q4_1 || FMT == F_Q5_1 || FMT == F_Q4_K || FMT == F_Q5_K
#pragma unroll
    for (int i = 0; i < n; i++) sum += v[i];
#endif
}


// Row g of the rows of all segments, as (segment, row in it); false past the end.
__device__ __forceinline__ bool locate_row(long g, int n0, int n1, int n2, int& seg, long& row) {
    seg = 0;
    if (g >= n0) g -= n0, seg = 1;
    if (seg == 1 && g >= n1) g -= n1, seg = 2;
    row = g;
    return seg < 2 || g < n2;
}

// RoPE pair p of the q, k, v rows (v is paired the same way, unrotated): segment, its two rows, pair index in head.
// 32-bit division: every thread of the block kernel locates every row of each group, and a 64-bit one is a long
// software routine (it held 7B's QKV GEMV to 1.5 TB/s).
__device__ __forceinline__ bool locate_pair(long p, int n0, int n1, int n2, int hd, int neox, int& seg, long& ra,
                                            long& rb, int& rot) {
    int q = (int)p;
    seg = 0;
    if (q >= n0 / 2) q -= n0 / 2, seg = 1;
    if (seg == 1 && q >= n1 / 2) q -= n1 / 2, seg = 2;
    int half = hd / 2;
    rot = q % half;
    ra = (long)(q / half) * hd + (neox ? rot : 2 * rot);
    rb = ra + (neox ? half : 1);
    return seg < 2 || q < n2 / 2;
}

// The row (or pair) of unit `u` and slot r: what each mode's rows are.
__device__ __forceinline__ bool locate(long u, int r, int n0, int n1, int n2, int hd, int neox, int& seg, long& row) {
#if MODE == MODE_GLU
    seg = r, row = u;
    return u < n0;
#elif MODE == MODE_QKV
    long ra, rb;
    int rot;
    bool ok = locate_pair(u, n0, n1, n2, hd, neox, seg, ra, rb, rot);
    row = r ? rb : ra;
    return ok;
#else
    return locate_row(u, n0, n1, n2, seg, row);
#endif
}

// PLAIN and RES: the finished dot of one row.
__device__ __forceinline__ void finish_row(GEMV_PARAMS, int seg, long row, float acc) {
    const float* bias = PICK(seg, b0, b1, b2);
    float v = acc + (bias ? bias[row] : 0.0f);
    PICK(seg, o0, o1, o2)[row] = v;
#if MODE == MODE_RES
    resid[row] += v;
#endif
}

// GLU and QKV: the finished dots of a pair of rows (gate and up; or the two rows one RoPE rotation mixes).
__device__ __forceinline__ void finish_pair(GEMV_PARAMS, long u, float a, float b) {
#if MODE == MODE_GLU
    o0[u] = a / (1.0f + expf(-a)) * b;
    o1[u] = b;
#elif MODE == MODE_QKV
    int seg, rot;
    long ra, rb;
    locate_pair(u, n0, n1, n2, hd, neox, seg, ra, rb, rot);
    const float* bias = PICK(seg, b0, b1, b2);
    float* out = PICK(seg, o0, o1, o2);
    a += bias ? bias[ra] : 0.0f;
    b += bias ? bias[rb] : 0.0f;
    int p = pos[0];
    if (seg < 2) {  // rotate q and k exactly as numpy does (rtab holds its float32 cos and sin)
        float cs = rtab[((long)p * (hd / 2) + rot) * 2], sn = rtab[((long)p * (hd / 2) + rot) * 2 + 1];
        float a2 = __fsub_rn(__fmul_rn(a, cs), __fmul_rn(b, sn)), b2 = __fadd_rn(__fmul_rn(a, sn), __fmul_rn(b, cs));
        a = a2, b = b2;
    }
    out[ra] = a;
    out[rb] = b;
    if (seg > 0) {
        u16* cache = seg == 1 ? kc : vc;
        long h = ra / hd;
        long row = (h * n_slots + slot[0]) * hd;
        cache[row + ra % hd] = f2h(a);
        cache[row + rb % hd] = f2h(b);
    }
#endif
}

#define GEMV_ARGS                                                                                                  \
    x, nw, eps, K, q0, s0, h0, b0, o0, n0, q1, s1, h1, b1, o1, n1, q2, s2, h2, b2, o2, n2, resid, pos, slot, rtab, \
        hd, neox, kc, vc, n_slots

// Where row `row` of segment `seg` starts in q, s and h (rows past the end read row 0 and are not written).
#define ROW_PTRS(seg, row, qr, sr, hr)                  \
    {                                                   \
        long rr_ = (row) < 0 ? 0 : (row);               \
        qr = PICK(seg, q0, q1, q2) + rr_ * qrb;         \
        sr = PICK(seg, s0, s1, s2) + rr_ * srb;         \
        hr = PICK(seg, h0, h1, h2) + rr_ * hrw;         \
    }

#if !BK
extern "C" __global__ void __launch_bounds__(NWARPS * 32) gemv(GEMV_PARAMS) {
    const int lane = threadIdx.x & 31;
    const long warp = (long)blockIdx.x * NWARPS + (threadIdx.x >> 5);
    const long qrb = q_row_bytes(K), srb = s_row_bytes(K), hrw = h_row_words(K);

    // Which rows this warp computes: in the pair modes (R == 2) the two rows of pair `warp`, else rows warp R + r.
    int seg[R];
    long row[R];
    bool any = false;
#pragma unroll
    for (int r = 0; r < R; r++) {
        bool ok = PAIRS ? locate(warp, r, n0, n1, n2, hd, neox, seg[r], row[r])
                        : locate(warp * R + r, 0, n0, n1, n2, hd, neox, seg[r], row[r]);
        any |= ok;
        if (!ok) seg[r] = 0, row[r] = -1;
    }
    if (!any) return;

    const u8* qr[R];
    const u8* sr[R];
    const u32* hr[R];
#pragma unroll
    for (int r = 0; r < R; r++) ROW_PTRS(seg[r], row[r], qr[r], sr[r], hr[r]);

    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.0f;
    float ss = 0.0f;
    const int nch = n_chunks(K);
    // The first batch of weights is loaded before waiting for the previous kernel (PDL): weights never depend on it.
    Raw raw[U][R];
    int c0 = lane;
#pragma unroll
    for (int u = 0; u < U; u++) {
        int c = c0 + 32 * u;
        if (c < nch) {
#pragma unroll
            for (int r = 0; r < R; r++) raw[u][r] = load_chunk(qr[r], sr[r], hr[r], c);
        }
    }
    pdl_wait();
    pdl_trigger();
    while (c0 < nch) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            int c = c0 + 32 * u;
            if (c < nch) {
                float xa[NA], xb[NB > 0 ? NB : 1], sa, sb = 0.0f;
                int off = x_off_a(c);
                load_x(x, nw, off, NA, xa, sa, ss);
#if NB > 0
                load_x(x, nw, off + X_OFF_B, NB, xb, sb, ss);
#endif
#pragma unroll
                for (int r = 0; r < R; r++) acc[r] += dot_chunk(raw[u][r], c, xa, xb, sa, sb);
            }
        }
        c0 += 32 * U;
#pragma unroll
        for (int u = 0; u < U; u++) {
            int c = c0 + 32 * u;
            if (c < nch) {
#pragma unroll
                for (int r = 0; r < R; r++) raw[u][r] = load_chunk(qr[r], sr[r], hr[r], c);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = warp_sum(acc[r]);
#if NORM
    ss = warp_sum(ss);
    float scale = 1.0f / sqrtf(ss / (float)K + eps);
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] *= scale;
#endif
    if (lane != 0) return;
#if PAIRS
    finish_pair(GEMV_ARGS, warp, acc[0], acc[1]);
#else
#pragma unroll
    for (int r = 0; r < R; r++)
        if (row[r] >= 0) finish_row(GEMV_ARGS, seg[r], row[r], acc[r]);
#endif
}

#else  // BK: the block kernels

#define LOG2R (R == 2 ? 1 : R == 4 ? 2 : R == 8 ? 3 : R == 16 ? 4 : 5)
#define UPG (PAIRS ? R / 2 : R)  // units (rows, or pairs of rows) per group of R rows

__device__ __forceinline__ long n_units(int n0, int n1, int n2) {
#if MODE == MODE_GLU
    return n0;
#elif MODE == MODE_QKV
    return ((long)n0 + n1 + n2) / 2;
#else
    return (long)n0 + n1 + n2;
#endif
}

// In a group, slot r < UPG is row (or first row of pair) g UPG + r; in the pair modes slot UPG + i is the second row
// of pair g UPG + i.
#define SLOT_UNIT(g, r) ((g) * UPG + (PAIRS ? (r) % UPG : (r)))
#define SLOT_HALF(r) (PAIRS ? (r) / UPG : 0)

// Where slot r of group gg reads its weights (rows past the end read row 0 and are not written).
#define SLOT_PTRS(gg, r, qr, sr, hr)                                                                              \
    {                                                                                                             \
        int seg_;                                                                                                 \
        long row_;                                                                                                \
        if (!locate(SLOT_UNIT(gg, r), SLOT_HALF(r), n0, n1, n2, hd, neox, seg_, row_)) seg_ = 0, row_ = -1;      \
        ROW_PTRS(seg_, row_, qr, sr, hr);                                                                         \
    }

// BODY for every chunk this thread loads of group gg: R rows x CPT chunks, with r, i, c (the chunk) and the row's
// qr, sr, hr in scope. Needs t, nch, qrb, srb, hrw.
#define FOR_GROUP_CHUNKS(gg, BODY)                \
    _Pragma("unroll") for (int r = 0; r < R; r++) { \
        const u8 *qr, *sr;                        \
        const u32* hr;                            \
        SLOT_PTRS(gg, r, qr, sr, hr);             \
        _Pragma("unroll") for (int i = 0; i < CPT; i++) { \
            const int c = t + NT * i;             \
            if (c < nch) { BODY; }                \
        }                                         \
    }

// Each warp's R partial sums reduced over its 32 lanes, transposed: every lane ends with the warp total of one row,
// row lane >> (5 - LOG2R), in acc[0]. Halving the row set at each exchange costs R - 1 + 5 - LOG2R shuffles.
__device__ __forceinline__ void warp_sum_rows(float* acc, int lane) {
#pragma unroll
    for (int s = 0; s < LOG2R; s++) {
        const int h = R >> (s + 1), off = 16 >> s;
        const bool up = lane & off;
#pragma unroll
        for (int i = 0; i < h; i++) {
            float send = up ? acc[i] : acc[i + h], keep = up ? acc[i + h] : acc[i];
            acc[i] = keep + __shfl_xor_sync(0xffffffffu, send, off);
        }
    }
#pragma unroll
    for (int off = 16 >> LOG2R; off > 0; off >>= 1) acc[0] += __shfl_xor_sync(0xffffffffu, acc[0], off);
}

// This thread's slice of x (normalised by the norm weight if NORM), kept in registers for every row of the block:
// floats, or with XQ_ON the integer digit planes of quantize_x16.
struct XSlice {
#if XQ_ON
    u32 q[CPT][12];
    float s[CPT];
#else
    float a[CPT][NA], b[CPT][NB > 0 ? NB : 1], sa[CPT], sb[CPT];
#endif
};

__device__ __forceinline__ float dot_slice(const Raw& w, const XSlice& xs, int i, int c) {
#if XQ_ON
    return dot_chunk_xq(w, xs.q[i], xs.s[i]);
#else
    return dot_chunk(w, c, xs.a[i], xs.b[i], xs.sa[i], xs.sb[i]);
#endif
}

// Fills xs; returns the RMSNorm scale (1 without NORM).
__device__ __forceinline__ float load_x_slice(GEMV_PARAMS, XSlice& xs, float* scratch) {
    const int t = threadIdx.x, nch = n_chunks(K);
    float ss = 0.0f;
#pragma unroll
    for (int i = 0; i < CPT; i++) {
        int c = t + NT * i;
#if XQ_ON
        float v[NA], sum;
        xs.s[i] = 0.0f;
        if (c < nch) {
            load_x(x, nw, x_off_a(c), NA, v, sum, ss);
            xs.s[i] = quantize_x16(v, xs.q[i]);
        }
#else
        xs.sa[i] = xs.sb[i] = 0.0f;
        if (c < nch) {
            load_x(x, nw, x_off_a(c), NA, xs.a[i], xs.sa[i], ss);
#if NB > 0
            load_x(x, nw, x_off_a(c) + X_OFF_B, NB, xs.b[i], xs.sb[i], ss);
#endif
        }
#endif
    }
#if NORM
    return 1.0f / sqrtf(block_sum(ss, scratch) / (float)K + eps);
#else
    return 1.0f;
#endif
}

// The block's R partial sums of group g summed over its threads and written (one barrier: red[buf] is rewritten two
// groups later, after the next group's barrier).
__device__ __forceinline__ void finish_group(GEMV_PARAMS, float* acc, long g, int buf, float scale,
                                             float (*red)[NT / 32][R]) {
    const int t = threadIdx.x, lane = t & 31, wid = t >> 5;
    warp_sum_rows(acc, lane);
    if ((lane & (32 / R - 1)) == 0) red[buf][wid][lane >> (5 - LOG2R)] = acc[0];
    __syncthreads();
    if (t < UPG) {
        float a = 0.0f, b = 0.0f;
#pragma unroll
        for (int w = 0; w < NT / 32; w++) a += red[buf][w][t], b += PAIRS ? red[buf][w][t + UPG] : 0.0f;
        long u = g * UPG + t;
        int seg;
        long row;
        if (locate(u, 0, n0, n1, n2, hd, neox, seg, row)) {
#if PAIRS
            finish_pair(GEMV_ARGS, u, a * scale, b * scale);
#else
            finish_row(GEMV_ARGS, seg, row, a * scale);
#endif
        }
    }
}

#if BK == 1
// The register kernel: each thread holds its chunks of the R rows of one group in registers, the next group's loads
// issued while the current one is reduced.
extern "C" __global__ void __launch_bounds__(NT) gemv(GEMV_PARAMS) {
    __shared__ float red[2][NT / 32][R];
    __shared__ float scratch[32];
    const int t = threadIdx.x;
    const long qrb = q_row_bytes(K), srb = s_row_bytes(K), hrw = h_row_words(K);
    const int nch = n_chunks(K);
    const long groups = (n_units(n0, n1, n2) + UPG - 1) / UPG;
    long g = blockIdx.x;
    if (g >= groups) return;

    Raw raw[R][CPT];
    auto load_group = [&](long gg) { FOR_GROUP_CHUNKS(gg, raw[r][i] = load_chunk(qr, sr, hr, c)); };
    load_group(g);  // weights only: before waiting for the previous kernel (PDL)
    pdl_wait();
    pdl_trigger();

    XSlice xs;
    const float scale = load_x_slice(GEMV_ARGS, xs, scratch);

    for (int buf = 0; g < groups; g += gridDim.x, buf ^= 1) {
        float acc[R];
#pragma unroll
        for (int r = 0; r < R; r++) {
            acc[r] = 0.0f;
#pragma unroll
            for (int i = 0; i < CPT; i++)
                if (t + NT * i < nch) acc[r] += dot_slice(raw[r][i], xs, i, t + NT * i);
        }
        if (g + gridDim.x < groups) load_group(g + gridDim.x);  // in flight while this group is reduced
        finish_group(GEMV_ARGS, acc, g, buf, scale, red);
    }
}

#else  // BK 2
// The pipelined kernel (formats of ASYNC_FMT): a grid of as many blocks as fit at once walks the groups; each thread
// copies its chunks of the next S - 1 groups into its own shared-memory slots with cp.async while it computes the
// current one, so S - 1 groups per block stay in flight without holding registers. Only the thread that copied a
// slot reads it (no barrier for the data); finish_group's barrier orders the reads of a stage before its refill.
// Dynamic shared memory: S stages x R rows x CPT x NT slots of 16 + 4 ASYNC_WORDS bytes.
#define SLOTS (S * R * CPT * NT)
#define SLOT(st, r, i) ((((st) * R + (r)) * CPT + (i)) * NT + threadIdx.x)

extern "C" __global__ void __launch_bounds__(NT) gemv(GEMV_PARAMS) {
    extern __shared__ uint4 slots[];
    __shared__ float red[2][NT / 32][R];
    __shared__ float scratch[32];
    u32* words0 = (u32*)(slots + SLOTS);
    u32* words1 = words0 + (ASYNC_WORDS > 1 ? SLOTS : 0);
    const int t = threadIdx.x;
    const long qrb = q_row_bytes(K), srb = s_row_bytes(K), hrw = h_row_words(K);
    const int nch = n_chunks(K);
    const long groups = (n_units(n0, n1, n2) + UPG - 1) / UPG;
    if ((long)blockIdx.x >= groups) return;

    auto issue = [&](long gg, int st) {  // one commit group per call, empty past the end (keeps the counts aligned)
        if (gg < groups) {
            FOR_GROUP_CHUNKS(gg, load_chunk_async(qr, sr, hr, c, slots + SLOT(st, r, i), words0 + SLOT(st, r, i),
                                                  words1 + SLOT(st, r, i)));
        }
        cp_async_commit();
    };
#pragma unroll
    for (int st = 0; st < S - 1; st++) issue(blockIdx.x + (long)st * gridDim.x, st);  // weights: before PDL's wait
    pdl_wait();
    pdl_trigger();

    XSlice xs;
    const float scale = load_x_slice(GEMV_ARGS, xs, scratch);

    int st = 0, buf = 0;
    for (long g = blockIdx.x; g < groups; g += gridDim.x) {
        cp_async_wait_group<S - 2>();                                 // this group's copies have landed
        issue(g + (long)(S - 1) * gridDim.x, st == 0 ? S - 1 : st - 1);  // the stage read one group ago
        float acc[R];
#pragma unroll
        for (int r = 0; r < R; r++) {
            acc[r] = 0.0f;
#pragma unroll
            for (int i = 0; i < CPT; i++) {
                int c = t + NT * i;
                if (c < nch) {
                    Raw w = chunk_from_smem(slots + SLOT(st, r, i), words0 + SLOT(st, r, i), words1 + SLOT(st, r, i), c);
                    acc[r] += dot_slice(w, xs, i, c);
                }
            }
        }
        finish_group(GEMV_ARGS, acc, g, buf, scale, red);
        st = st == S - 1 ? 0 : st + 1;
        buf ^= 1;
    }
    cp_async_wait();  // no copy may still target shared memory when the block exits
}
#endif
#endif
