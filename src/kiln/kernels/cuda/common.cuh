// Shared device helpers for kiln's CUDA kernels. Header-free on purpose (NVRTC has no system headers): f16 and
// bf16 are handled as raw 16-bit values with PTX conversions. The Python side prepends `#define NAME value` lines
// for the compile-time constants of each kernel (cuda_backend.py caches one module per set of constants).

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef signed char i8;

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float bf2f(u16 h) { return __int_as_float(((u32)h) << 16); }

// Unsigned byte k (0..3) of w as an exact float: 2^23 + b built in the mantissa, then 2^23 subtracted. Much
// cheaper than I2F, which runs at a quarter of the FP32 rate and would bound the quantized GEMVs.
#define BYTE_F(w, k) (__int_as_float(__byte_perm((w), 0x4B000000u, 0x7540u | (k))) - 8388608.0f)

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum for blockDim.x <= 1024; `scratch` holds 32 floats. Every thread gets the total.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

// Activation element access for dtype DT (0 = f32, 1 = f16); kernels that take activations define DT.
#ifdef DT
#if DT == 0
typedef float act_t;
__device__ __forceinline__ float ld_act(const act_t* p, long i) { return p[i]; }
__device__ __forceinline__ void st_act(act_t* p, long i, float v) { p[i] = v; }
#else
typedef u16 act_t;
__device__ __forceinline__ float ld_act(const act_t* p, long i) { return h2f(p[i]); }
__device__ __forceinline__ void st_act(act_t* p, long i, float v) { p[i] = f2h(v); }
#endif
#endif

#define NEG_INF __int_as_float(0xff800000u)

// One row of an online softmax, by one warp: p[0..n) becomes exp(p - m_new) in place; lane 0 updates the row's
// running max m and sum l and sets c = exp(m_old - m_new), the factor that rescales what came before (0 at the start).
__device__ __forceinline__ void softmax_row_update(float* p, int n, float& m, float& l, float& c, int lane) {
    float mx = NEG_INF;
    for (int j = lane; j < n; j += 32) mx = fmaxf(mx, p[j]);
    mx = warp_max(mx);
    float m_old = m, m_new = fmaxf(m_old, mx), sum = 0.0f;
    for (int j = lane; j < n; j += 32) {
        float e = m_new == NEG_INF ? 0.0f : expf(p[j] - m_new);
        p[j] = e;
        sum += e;
    }
    sum = warp_sum(sum);
    if (lane == 0) {
        float cc = m_old == NEG_INF ? 0.0f : expf(m_old - m_new);
        l = l * cc + sum;
        m = m_new;
        c = cc;
    }
}

// Programmatic dependent launch (Hopper+): a kernel launched with the PDL attribute may start while the previous
// kernel in the stream is still running; everything before pdl_wait() must not read that kernel's output (weights
// only). pdl_trigger() lets the next kernel launch once every block of this one has started. Without the launch
// attribute, or below sm_90, both are no-ops.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Asynchronous global -> shared copies (sm_80+; plain copies below that), for kernels that keep loads in flight
// without holding them in registers. A thread's copies are complete for that thread after cp_async_wait_*.
__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 s;
    asm volatile("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(s) : "l"(p));
    return s;
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(smem)), "l"(gmem) : "memory");
#else
    *(uint4*)smem = *(const uint4*)gmem;
#endif
}

__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(smem_addr(smem)), "l"(gmem) : "memory");
#else
    *(u32*)smem = *(const u32*)gmem;
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

// Wait until at most N of this thread's committed copy groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait_group() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

__device__ __forceinline__ void cp_async_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}
