// Whole-group dequantization (quant.cuh deq32), one thread per 32 values: token embedding rows (f32 or f16
// out, DT) and full matrices to f16 for the cuBLAS prefill GEMM. Constants: FMT, DT.

// Ids are checked on the host where they enter (generate, server); the clamp to [0, V) keeps a bad id that got
// past them (or a device-side argmax gone wrong) from reading outside the weights.
__device__ __forceinline__ long embed_row(const int* ids, int t, int V) { return min(max(ids[t], 0), V - 1); }

extern "C" __global__ void embed(const u8* __restrict__ q, const u8* __restrict__ s, const u32* __restrict__ h,
                                 const int* __restrict__ ids, act_t* __restrict__ out, int T, int K, int V) {
    pdl_wait();
    pdl_trigger();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
#if FMT <= F_BF16  // float formats: any K, one element per thread
    if (i >= (long)T * K) return;
    long src = embed_row(ids, (int)(i / K), V) * K + i % K;
#if FMT == F_F32
    st_act(out, i, ((const float*)q)[src]);
#elif FMT == F_F16
    st_act(out, i, h2f(((const u16*)q)[src]));
#else
    st_act(out, i, bf2f(((const u16*)q)[src]));
#endif
#else
    int groups = K / 32;
    if (i >= (long)T * groups) return;
    int t = (int)(i / groups), g = (int)(i % groups);
    long row = embed_row(ids, t, V);
    float v[32];
    deq32(q + row * q_row_bytes(K), s + row * s_row_bytes(K), h + row * h_row_words(K), g, v);
    act_t* o = out + (long)t * K + 32 * g;
#pragma unroll
    for (int j = 0; j < 32; j++) st_act(o, j, v[j]);
#endif
}

// BF16 weights widened to f32 for an fp32 GEMM (bf16's range does not fit f16). Any K.
extern "C" __global__ void bf16_to_f32(const u16* __restrict__ in, float* __restrict__ out, int n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = bf2f(in[i]);
}

// out: f16 [N, K] (16-byte aligned), written as four 16-byte stores per thread.
extern "C" __global__ void dequant_f16(const u8* __restrict__ q, const u8* __restrict__ s,
                                       const u32* __restrict__ h, uint4* __restrict__ out, int N, int K) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    int groups = K / 32;
    if (i >= (long)N * groups) return;
    long row = i / groups;
    int g = (int)(i % groups);
    float v[32];
    deq32(q + row * q_row_bytes(K), s + row * s_row_bytes(K), h + row * h_row_words(K), g, v);
    u32 w[16];
#pragma unroll
    for (int j = 0; j < 16; j++) w[j] = (u32)f2h(v[2 * j]) | ((u32)f2h(v[2 * j + 1]) << 16);
    uint4* o = out + i * 4;
#pragma unroll
    for (int j = 0; j < 4; j++) o[j] = make_uint4(w[4 * j], w[4 * j + 1], w[4 * j + 2], w[4 * j + 3]);
}

#if FMT <= F_BF16
// Fallback for float weights whose K is not a multiple of the vector width: one warp per (token, row).
extern "C" __global__ void matvec_float(const act_t* __restrict__ x, const u8* __restrict__ w,
                                        const float* __restrict__ bias, act_t* __restrict__ out, int T, int N, int K) {
    long warp = ((long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (warp >= (long)T * N) return;
    long t = warp / N, n = warp % N;
    float acc = 0.0f;
    for (int k = lane; k < K; k += 32) {
#if FMT == F_F32
        float v = ((const float*)w)[n * K + k];
#elif FMT == F_F16
        float v = h2f(((const u16*)w)[n * K + k]);
#else
        float v = bf2f(((const u16*)w)[n * K + k]);
#endif
        acc += ld_act(x, t * K + k) * v;
    }
    acc = warp_sum(acc);
    if (lane == 0) st_act(out, t * N + n, acc + (bias ? bias[n] : 0.0f));
}
#endif
