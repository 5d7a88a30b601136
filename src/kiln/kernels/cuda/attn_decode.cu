// Decode attention (one query token per sequence, T sequences per launch) over the paged f16 KV cache pools with GQA:
// online softmax, f32 accumulation. Token t attends positions 0..pos[t] of the sequence in row seq[t] of the block
// table [S, W]; position j is pool row table[seq[t] * W + j / B] * B + j % B.
// Constants: HD (head dim, a multiple of 8), GQ (query heads per KV head), G (query heads per block, a divisor of
// GQ), CH (keys per tile), DT.
//
// grid = (NS, Hkv, GQ / G * T), THREADS threads. Block (s, h, t GQ / G + z) serves query heads z G .. z G + G - 1 of
// KV head h for token t: fewer
// heads per block spread one KV head's work over more SMs (decode attention is latency, not bandwidth: the K/V tile
// is re-read from L2 by each of the GQ / G blocks). The n_kv = pos[t] + 1 keys
// form tiles of CH; block s takes tiles [s tpb, (s + 1) tpb) with tpb = ceil(tiles / NS), so at short contexts a
// block holds one tile and, while n_kv <= CH, block 0 alone writes the output: no partials, no merge. The key count
// is read on the device (as are the positions and tables), so a captured graph serves every step of its batch size;
// NS comes from the table's capacity, so it too is the same for every step.
// Latency, not bandwidth, is what a decode step's attention costs, so the first tile's cache rows are fetched
// (cp.async) *before* waiting for the previous kernel (PDL): positions below pos[t] were written by earlier steps,
// and pos, seq and the table are written by the host before the graph runs. Only q and position pos[t] come from the
// kernel just before.
// Several active blocks: each publishes (unnormalised output, max, sum) per head and the last block of its heads to
// finish (atomic ticket) merges them.

#define THREADS 128
#define KSTR (HD + 8)      // row stride in halves: rows 16-byte aligned, and the 8 rows of one 128-bit access phase
                           // start in 8 different 4-bank groups (no bank conflicts)
#define UNITS (G * HD / 8)  // value phase: (head, 8 dims) units
#define UPT ((UNITS + THREADS - 1) / THREADS)                 // units per thread
#define KSPLIT (UPT == 1 ? THREADS / UNITS : 1)               // threads sharing one unit, over every KSPLIT-th key

__device__ __forceinline__ void unpack8(uint4 w, float* f) {
    const u32 a[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int e = 0; e < 4; e++) f[2 * e] = h2f((u16)(a[e] & 0xFFFF)), f[2 * e + 1] = h2f((u16)(a[e] >> 16));
}

// Positions [j0, j0 + n) of one sequence (trow: its block-table row) and KV head into the K and V tiles, except
// position `skip`.
__device__ __forceinline__ void fetch_rows(u16* ks, u16* vs, const u16* kb, const u16* vb, const int* trow, int B,
                                           int j0, int n, int skip) {
    for (int i = threadIdx.x; i < n * (HD / 8); i += THREADS) {
        int j = i / (HD / 8), c = 8 * (i % (HD / 8)), pj = j0 + j;
        if (pj == skip) continue;
        long row = (long)trow[pj / B] * B + pj % B;
        cp_async16(ks + j * KSTR + c, kb + row * HD + c);
        cp_async16(vs + j * KSTR + c, vb + row * HD + c);
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
attn_decode(const act_t* __restrict__ q, const u16* __restrict__ kc, const u16* __restrict__ vc,
            const int* __restrict__ pos, const int* __restrict__ seq, const int* __restrict__ table, int W, int B,
            act_t* __restrict__ out, float* part, float* ml, int* ticket, int Hq, int n_slots, float scale) {
    __shared__ __align__(16) u16 kv_s[2 * CH * KSTR];  // K tile, V tile; after the last tile red, then the merge
    __shared__ __align__(16) float qs[G][HD];
    __shared__ float ps[G][CH];
    __shared__ float m_s[G], l_s[G], c_s[G];
    __shared__ bool last;
    u16 *ks = kv_s, *vs = kv_s + CH * KSTR;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int h = blockIdx.y, s = blockIdx.x, NS = gridDim.x;
    const int t = blockIdx.z / (GQ / G), T = gridDim.z / (GQ / G);
    const int hb = h * GQ + (blockIdx.z % (GQ / G)) * G;  // this block's first query head
    int* tk = ticket + t * (Hq / G) + hb / G;
    const int p = pos[t], n_kv = p + 1;
    const int* trow = table + (long)seq[t] * W;
    q += (long)t * Hq * HD;
    out += (long)t * Hq * HD;
    const int tiles = (n_kv + CH - 1) / CH, tpb = (tiles + NS - 1) / NS, active = (tiles + tpb - 1) / tpb;
    const int lo = s * tpb * CH, hi = min(lo + tpb * CH, n_kv);
    if (lo >= n_kv) return;  // exiting counts as the PDL trigger
    const u16* kb = kc + (long)h * n_slots * HD;
    const u16* vb = vc + (long)h * n_slots * HD;
    fetch_rows(ks, vs, kb, vb, trow, B, lo, min(CH, hi - lo), p);  // in flight while the previous kernel finishes
    pdl_wait();
    pdl_trigger();

    for (int i = tid; i < G * HD; i += THREADS) qs[i / HD][i % HD] = ld_act(q, (long)hb * HD + i);
    for (int g = tid; g < G; g += THREADS) m_s[g] = NEG_INF, l_s[g] = 0.0f;
    float acc[UPT][8];
#pragma unroll
    for (int k = 0; k < UPT; k++)
#pragma unroll
        for (int e = 0; e < 8; e++) acc[k][e] = 0.0f;

    for (int j0 = lo; j0 < hi; j0 += CH) {
        const int n = min(CH, hi - j0);
        if (j0 == lo) {
            if (p < j0 + n) fetch_rows(ks + (p - j0) * KSTR, vs + (p - j0) * KSTR, kb, vb, trow, B, p, 1, -1);
        } else {
            fetch_rows(ks, vs, kb, vb, trow, B, j0, n, -1);
        }
        cp_async_wait();
        __syncthreads();
        // Scores: a thread per key, all G heads (q is read by every lane at once: a shared-memory broadcast).
        for (int j = tid; j < n; j += THREADS) {
            float sc[G];
#pragma unroll
            for (int g = 0; g < G; g++) sc[g] = 0.0f;
#pragma unroll 2  // not fully: q would be hoisted into (and spill out of) registers
            for (int c = 0; c < HD; c += 8) {
                float k8[8];
                unpack8(*(const uint4*)(ks + j * KSTR + c), k8);
#pragma unroll
                for (int g = 0; g < G; g++) {
                    float4 a = *(const float4*)&qs[g][c], b = *(const float4*)&qs[g][c + 4];
                    sc[g] += a.x * k8[0] + a.y * k8[1] + a.z * k8[2] + a.w * k8[3] + b.x * k8[4] + b.y * k8[5] +
                             b.z * k8[6] + b.w * k8[7];
                }
            }
#pragma unroll
            for (int g = 0; g < G; g++) ps[g][j] = sc[g] * scale;
        }
        __syncthreads();
        // Online softmax, a warp per head: what came before is rescaled by exp(m_old - m_new).
        for (int g = warp; g < G; g += THREADS / 32) softmax_row_update(ps[g], n, m_s[g], l_s[g], c_s[g], lane);
        __syncthreads();
        // Values: unit (head g, dims c..c+7) of this thread, over keys part, part + KSPLIT, ...
#pragma unroll
        for (int k = 0; k < UPT; k++) {
            int e = tid + k * THREADS, u = e % UNITS, prt = e / UNITS;
            if (prt >= KSPLIT) continue;
            int g = u / (HD / 8), c = 8 * (u % (HD / 8));
            float cg = c_s[g];
#pragma unroll
            for (int i = 0; i < 8; i++) acc[k][i] *= cg;
            for (int j = prt; j < n; j += KSPLIT) {
                float pj = ps[g][j], v8[8];
                unpack8(*(const uint4*)(vs + j * KSTR + c), v8);
#pragma unroll
                for (int i = 0; i < 8; i++) acc[k][i] += pj * v8[i];
            }
        }
        __syncthreads();  // the tiles and ps are rewritten by the next tile
    }
    // Sum the KSPLIT partial values: red[prt][g HD + d].
    float* red = (float*)kv_s;
#pragma unroll
    for (int k = 0; k < UPT; k++) {
        int e = tid + k * THREADS, u = e % UNITS, prt = e / UNITS;
        if (prt >= KSPLIT) continue;
#pragma unroll
        for (int i = 0; i < 8; i++) red[prt * G * HD + 8 * u + i] = acc[k][i];
    }
    __syncthreads();
    for (int o = tid; o < G * HD; o += THREADS) {
        float v = 0.0f;
#pragma unroll
        for (int prt = 0; prt < KSPLIT; prt++) v += red[prt * G * HD + o];
        if (active == 1)
            st_act(out, (long)hb * HD + o, v / l_s[o / HD]);
        else
            part[((long)(s * T + t) * Hq + hb) * HD + o] = v;
    }
    if (active == 1) return;

    for (int g = tid; g < G; g += THREADS) {
        ml[((long)(s * T + t) * Hq + hb + g) * 2] = m_s[g];
        ml[((long)(s * T + t) * Hq + hb + g) * 2 + 1] = l_s[g];
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) last = atomicAdd(tk, 1) == active - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    // Merge: slice weights exp(m_s - M) / L, staged in the tile memory ([NS][G] maxima, then [NS][G] sums).
    float* wm = (float*)kv_s;
    float* wl = wm + NS * G;
    for (int i = tid; i < active * G; i += THREADS) {
        const float* src = ml + ((long)(i / G * T + t) * Hq + hb + i % G) * 2;
        wm[i] = __ldcg(src);
        wl[i] = __ldcg(src + 1);
    }
    __syncthreads();
    for (int g = warp; g < G; g += THREADS / 32) {
        float M = NEG_INF;
        for (int s2 = lane; s2 < active; s2 += 32) M = fmaxf(M, wm[s2 * G + g]);
        M = warp_max(M);
        float L = 0.0f;
        for (int s2 = lane; s2 < active; s2 += 32) {
            float w = expf(wm[s2 * G + g] - M);  // every active slice holds keys: its max is finite
            wm[s2 * G + g] = w;
            L += wl[s2 * G + g] * w;
        }
        L = warp_sum(L);
        if (lane == 0) l_s[g] = 1.0f / L;
    }
    __syncthreads();
    for (int o = tid; o < G * HD; o += THREADS) {
        int g = o / HD;
        float O = 0.0f;
        for (int s2 = 0; s2 < active; s2++)
            O += wm[s2 * G + g] * __ldcg(part + ((long)(s2 * T + t) * Hq + hb) * HD + o);
        st_act(out, (long)hb * HD + o, O * l_s[g]);
    }
    if (tid == 0) *tk = 0;
}
