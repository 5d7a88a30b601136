// Quantized GEMV for decode: out[n] = sum_k W[n, k] * x[k], W in a GGUF format (quant.cuh), x f32.
// Constants: FMT, MODE, R (rows per warp), U (chunks in flight per lane), NORM (fuse the preceding RMSNorm).
//
// A warp owns R rows; each lane walks the row in 16-byte chunks, 32 lanes apart, loading U chunks of all R rows
// before using them (memory-level parallelism), and reuses each chunk's activations across the R rows.
// Up to three weight segments (e.g. Wq, Wk, Wv) of the same format and K run in one launch.
// MODE 0: plain, rows are segment 0, then 1, then 2; out_s[row] = acc + bias_s[row].
// MODE 1: residual, one segment: out0[row] = acc; resid[row] += acc (matmul + add in one pass).
// MODE 2: SwiGLU, segments gate and up: warp i computes row i of both; out0[i] = silu(g) * u, out1[i] = u.
// MODE 3: QKV, segments q, k, v: each warp computes the two rows one RoPE pair rotates (NeoX or adjacent) and
//         writes q and k rotated (out0, out1) and k, v into the f16 KV caches at row pos[0].
// NORM: x is the un-normalised residual: each lane also sums x^2 over its chunks (the warp sees every column),
//       multiplies x by the norm weight, and the result is scaled by 1/sqrt(mean(x^2) + eps) at the end.

#define MODE_PLAIN 0
#define MODE_RES 1
#define MODE_GLU 2
#define MODE_QKV 3
#define NWARPS 4

// Pick segment i's pointer with selects: indexing a local array of pointers at run time would put it in memory.
#define PICK(i, a, b, c) ((i) == 0 ? (a) : ((i) == 1 ? (b) : (c)))

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

extern "C" __global__ void __launch_bounds__(NWARPS * 32)
gemv(const float* __restrict__ x, const float* __restrict__ nw, float eps, int K,
     const u8* q0, const u8* s0, const u32* h0, const float* b0, float* o0, int n0,
     const u8* q1, const u8* s1, const u32* h1, const float* b1, float* o1, int n1,
     const u8* q2, const u8* s2, const u32* h2, const float* b2, float* o2, int n2,
     float* resid, const int* __restrict__ pos, float theta, int hd, int neox, u16* kc, u16* vc, int n_ctx) {
    const int lane = threadIdx.x & 31;
    const long warp = (long)blockIdx.x * NWARPS + (threadIdx.x >> 5);
    const long qrb = q_row_bytes(K), srb = s_row_bytes(K), hrw = h_row_words(K);

    // Which rows this warp computes: segment and row within it.
    int seg[R];
    long row[R];
    bool any = false;
#if MODE == MODE_GLU
    seg[0] = 0, seg[1] = 1, row[0] = row[1] = warp;
    any = warp < n0;
#elif MODE == MODE_QKV
    int half = hd / 2, rot_i = 0;
    {
        long p = warp, sg = 0;
        if (p >= n0 / 2) { p -= n0 / 2, sg = 1; }
        if (sg == 1 && p >= n1 / 2) { p -= n1 / 2, sg = 2; }
        any = sg < 2 || p < n2 / 2;
        long head = p / half;
        rot_i = (int)(p % half);
        seg[0] = seg[1] = (int)sg;
        row[0] = head * hd + (neox ? rot_i : 2 * rot_i);
        row[1] = row[0] + (neox ? half : 1);
    }
#else
#pragma unroll
    for (int r = 0; r < R; r++) {
        long g = warp * R + r;
        int sg = 0;
        if (g >= n0) { g -= n0, sg = 1; }
        if (sg == 1 && g >= n1) { g -= n1, sg = 2; }
        bool ok = sg < 2 ? true : g < n2;
        any |= ok;
        seg[r] = ok ? sg : 0;
        row[r] = ok ? g : -1;
    }
#endif
    if (!any) return;

    const u8* qr[R];
    const u8* sr[R];
    const u32* hr[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        long rr = row[r] < 0 ? 0 : row[r];  // rows past the end read row 0 and are not written
        qr[r] = PICK(seg[r], q0, q1, q2) + rr * qrb;
        sr[r] = PICK(seg[r], s0, s1, s2) + rr * srb;
        hr[r] = PICK(seg[r], h0, h1, h2) + rr * hrw;
    }

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

#if MODE == MODE_PLAIN
#pragma unroll
    for (int r = 0; r < R; r++) {
        if (row[r] < 0) continue;
        const float* bias = PICK(seg[r], b0, b1, b2);
        PICK(seg[r], o0, o1, o2)[row[r]] = acc[r] + (bias ? bias[row[r]] : 0.0f);
    }
#elif MODE == MODE_RES
#pragma unroll
    for (int r = 0; r < R; r++) {
        if (row[r] < 0) continue;
        float v = acc[r] + (b0 ? b0[row[r]] : 0.0f);
        o0[row[r]] = v;
        resid[row[r]] += v;
    }
#elif MODE == MODE_GLU
    float g = acc[0], u = acc[1];
    o0[row[0]] = g / (1.0f + expf(-g)) * u;
    o1[row[0]] = u;
#elif MODE == MODE_QKV
    const float* bias = PICK(seg[0], b0, b1, b2);
    float* out = PICK(seg[0], o0, o1, o2);
    float a = acc[0] + (bias ? bias[row[0]] : 0.0f);
    float b = acc[1] + (bias ? bias[row[1]] : 0.0f);
    int p = pos[0];
    if (seg[0] < 2) {  // rotate q and k exactly as numpy does: angle in float64, cos/sin rounded to float32
        double ang = (double)p * pow((double)theta, -2.0 * rot_i / hd);
        float cs = (float)cos(ang), sn = (float)sin(ang);
        float a2 = __fsub_rn(__fmul_rn(a, cs), __fmul_rn(b, sn)), b2 = __fadd_rn(__fmul_rn(a, sn), __fmul_rn(b, cs));
        a = a2, b = b2;
    }
    out[row[0]] = a;
    out[row[1]] = b;
    if (seg[0] > 0) {
        u16* cache = seg[0] == 1 ? kc : vc;
        long h = row[0] / hd;
        cache[(h * n_ctx + p) * hd + row[0] % hd] = f2h(a);
        cache[(h * n_ctx + p) * hd + row[1] % hd] = f2h(b);
    }
#endif
}
