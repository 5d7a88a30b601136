// Causal GQA attention over the f16 KV cache for prefill (T > 1; decode is attn_decode.cu), flash style: online
// softmax over key tiles, f32 accumulation.
// Constants: HD (head dim), G (query heads per KV head), QT (query tokens per block), TILE (keys per tile), DT.
//
// One launch per run of a batch: T consecutive tokens of one sequence (q, pos, out start at the run's first token),
// whose positions are cache rows trow[j / B] * B + j % B (trow: the sequence's row of the block table).
// grid = (Hkv, ceil(T / QT)), 128 threads. A block serves KV head h for QT consecutive tokens and all G query heads
// that share h, so each K/V tile is read once for G * QT query rows. The key range and the table are read on the
// device (n_kv = pos[last token] + 1), so a captured CUDA graph stays valid at every position.

#define ROWS (G * QT)
#define THREADS 128
#define NPER ((ROWS * (HD / 2) + THREADS - 1) / THREADS)

extern "C" __global__ void __launch_bounds__(THREADS)
attention(const act_t* __restrict__ q, const u16* __restrict__ kc, const u16* __restrict__ vc,
          const int* __restrict__ pos, const int* __restrict__ trow, int B, act_t* __restrict__ out, int T, int Hq,
          int n_slots, float scale) {
    __shared__ float qs[ROWS][HD];
    __shared__ float ks[TILE][HD + 1];  // +1: lanes reading one column of consecutive keys hit distinct banks
    __shared__ float vs[TILE][HD];
    __shared__ float ps[ROWS][TILE];
    __shared__ float m_s[ROWS], l_s[ROWS], c_s[ROWS];
    __shared__ int pos_s[QT];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int h = blockIdx.x, t0 = blockIdx.y * QT;
    const int q_stride = Hq * HD;
    pdl_wait();
    pdl_trigger();

    for (int i = tid; i < QT; i += THREADS) pos_s[i] = t0 + i < T ? pos[t0 + i] : -1;
    for (int i = tid; i < ROWS * HD; i += THREADS) {
        int r = i / HD, d = i % HD, t = t0 + r / G;
        qs[r][d] = t < T ? ld_act(q, (long)t * q_stride + (h * G + r % G) * HD + d) : 0.0f;
    }
    for (int r = tid; r < ROWS; r += THREADS) m_s[r] = NEG_INF, l_s[r] = 0.0f;
    __syncthreads();

    const int n_kv = pos_s[min(QT, T - t0) - 1] + 1;
    const u16* kbase = kc + (long)h * n_slots * HD;
    const u16* vbase = vc + (long)h * n_slots * HD;

    float acc[NPER][2];
#pragma unroll
    for (int k = 0; k < NPER; k++) acc[k][0] = acc[k][1] = 0.0f;

    for (int j0 = 0; j0 < n_kv; j0 += TILE) {
        const int n = min(TILE, n_kv - j0);
        // K and V tile to shared memory as f32: 16-byte loads, 8 halves each.
        for (int i = tid; i < n * (HD / 8); i += THREADS) {
            int j = i / (HD / 8), c = 8 * (i % (HD / 8)), pj = j0 + j;
            long row = (long)trow[pj / B] * B + pj % B;
            uint4 kw = __ldg((const uint4*)(kbase + row * HD + c));
            uint4 vw = __ldg((const uint4*)(vbase + row * HD + c));
            const u32 kk[4] = {kw.x, kw.y, kw.z, kw.w}, vv[4] = {vw.x, vw.y, vw.z, vw.w};
#pragma unroll
            for (int e = 0; e < 4; e++) {
                ks[j][c + 2 * e] = h2f((u16)(kk[e] & 0xFFFF));
                ks[j][c + 2 * e + 1] = h2f((u16)(kk[e] >> 16));
                vs[j][c + 2 * e] = h2f((u16)(vv[e] & 0xFFFF));
                vs[j][c + 2 * e + 1] = h2f((u16)(vv[e] >> 16));
            }
        }
        __syncthreads();
        // Scores, causal mask per query token.
        for (int i = tid; i < ROWS * TILE; i += THREADS) {
            int r = i / TILE, j = i % TILE, p = pos_s[r / G];
            float sc = NEG_INF;
            if (j < n && j0 + j <= p) {
                float dot = 0.0f;
#pragma unroll 16
                for (int d = 0; d < HD; d++) dot += qs[r][d] * ks[j][d];
                sc = dot * scale;
            }
            ps[r][j] = sc;
        }
        __syncthreads();
        // Online softmax, one warp per row: rescale what came before by exp(m_old - m_new).
        for (int r = warp; r < ROWS; r += THREADS / 32) softmax_row_update(ps[r], TILE, m_s[r], l_s[r], c_s[r], lane);
        __syncthreads();
        // acc[r][d] = acc * c + sum_j p[r][j] * v[j][d]; each thread owns fixed (row, dim pair) entries.
#pragma unroll
        for (int k = 0; k < NPER; k++) {
            int e = tid + k * THREADS;
            if (e < ROWS * (HD / 2)) {
                int r = e / (HD / 2), d = 2 * (e % (HD / 2));
                float c = c_s[r], a0 = acc[k][0] * c, a1 = acc[k][1] * c;
                for (int j = 0; j < n; j++) {
                    float p = ps[r][j];
                    float2 v = *(const float2*)&vs[j][d];
                    a0 += p * v.x;
                    a1 += p * v.y;
                }
                acc[k][0] = a0, acc[k][1] = a1;
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int k = 0; k < NPER; k++) {
        int e = tid + k * THREADS;
        if (e >= ROWS * (HD / 2)) continue;
        int r = e / (HD / 2), d = 2 * (e % (HD / 2)), t = t0 + r / G;
        if (t >= T) continue;
        float inv = 1.0f / l_s[r];
        long o = (long)t * q_stride + (h * G + r % G) * HD + d;
        st_act(out, o, acc[k][0] * inv);
        st_act(out, o + 1, acc[k][1] * inv);
    }
}
