// Small row-wise and element-wise ops. Constant DT: activation dtype (0 f32, 1 f16); weights are f32.

extern "C" __global__ void rms_norm(const act_t* x, const float* __restrict__ w, act_t* out, int d, float eps) {
    pdl_wait();
    pdl_trigger();
    __shared__ float scratch[32];
    const act_t* xr = x + (long)blockIdx.x * d;
    act_t* orow = out + (long)blockIdx.x * d;  // may alias x: each element is read, then written, by one thread
    float ss = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = ld_act(xr, i);
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    float scale = 1.0f / sqrtf(ss / (float)d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) st_act(orow, i, __fmul_rn(__fmul_rn(ld_act(xr, i), scale), w[i]));
}

// Rotate pairs in place: NeoX pairs (i, i + hd/2), else (2i, 2i + 1). Angles and the cos/sin scale (yarn's
// mscale) in float64 as the numpy reference, from its inverse frequency per pair (scaling included).
extern "C" __global__ void rope(act_t* x, const int* __restrict__ pos, int T, int n_heads, int hd,
                                const double* __restrict__ inv_freq, double mscale, int neox) {
    pdl_wait();
    pdl_trigger();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    int half = hd / 2;
    if (i >= (long)T * n_heads * half) return;
    int j = (int)(i % half);
    long th = i / half;  // token * n_heads + head
    long t = th / n_heads;
    act_t* base = x + th * hd;
    int ia = neox ? j : 2 * j, ib = neox ? j + half : 2 * j + 1;
    double ang = (double)pos[t] * inv_freq[j];
    float cs = (float)(cos(ang) * mscale), sn = (float)(sin(ang) * mscale);
    float a = ld_act(base, ia), b = ld_act(base, ib);
    st_act(base, ia, __fsub_rn(__fmul_rn(a, cs), __fmul_rn(b, sn)));
    st_act(base, ib, __fadd_rn(__fmul_rn(a, sn), __fmul_rn(b, cs)));
}

extern "C" __global__ void swiglu(const act_t* gate, const act_t* up, act_t* out, int n) {
    pdl_wait();
    pdl_trigger();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = ld_act(gate, i);
    st_act(out, i, __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), ld_act(up, i)));
}

extern "C" __global__ void add(const act_t* a, const act_t* b, act_t* out, int n) {
    pdl_wait();
    pdl_trigger();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) st_act(out, i, __fadd_rn(ld_act(a, i), ld_act(b, i)));
}

extern "C" __global__ void to_f16(const act_t* __restrict__ x, u16* __restrict__ out, int n) {
    pdl_wait();
    pdl_trigger();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = f2h(ld_act(x, i));
}

extern "C" __global__ void from_f32(const float* __restrict__ x, act_t* __restrict__ out, int n) {
    pdl_wait();
    pdl_trigger();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) st_act(out, i, x[i]);
}

// Rows k[t], v[t] (already rotated) into the f16 cache pools [Hkv, n_slots, hd] at row slot[t].
extern "C" __global__ void kv_write(const act_t* __restrict__ k, const act_t* __restrict__ v,
                                    const int* __restrict__ slot, u16* kc, u16* vc, int T, int kv_dim, int hd,
                                    int n_slots) {
    pdl_wait();
    pdl_trigger();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)T * kv_dim) return;
    long t = i / kv_dim;
    int c = (int)(i % kv_dim), h = c / hd, d = c % hd;
    long dst = ((long)h * n_slots + slot[t]) * hd + d;
    kc[dst] = f2h(ld_act(k, i));
    vc[dst] = f2h(ld_act(v, i));
}

// out[r] = x[rows[r]] for rows of `words` 2-byte words (any dtype: a plain copy).
extern "C" __global__ void gather_rows(const u16* __restrict__ x, const int* __restrict__ rows, u16* __restrict__ out,
                                       int R, int words) {
    pdl_wait();
    pdl_trigger();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)R * words) return;
    long r = i / words;
    out[i] = x[(long)rows[r] * words + i % words];
}

// Row r's argmax (the first index on ties, as numpy) into ids[r]: one block per row, grid = R.
extern "C" __global__ void argmax_rows(const act_t* __restrict__ x, int n, int* __restrict__ ids) {
    pdl_wait();
    pdl_trigger();
    __shared__ float sv[32];
    __shared__ int si[32];
    const act_t* row = x + (long)blockIdx.x * n;
    float best = NEG_INF;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = ld_act(row, i);
        if (v > best) best = v, bi = i;  // i grows: a tie keeps the earlier index
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int round = 0; round < 2; round++) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, best, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > best || (ov == best && oi < bi)) best = ov, bi = oi;
        }
        if (round == 1) break;
        if (lane == 0) sv[warp] = best, si[warp] = bi;
        __syncthreads();
        best = lane < (blockDim.x >> 5) ? sv[lane] : NEG_INF;
        bi = lane < (blockDim.x >> 5) ? si[lane] : 0x7fffffff;
    }
    if (threadIdx.x == 0) ids[blockIdx.x] = bi == 0x7fffffff ? 0 : bi;
}
