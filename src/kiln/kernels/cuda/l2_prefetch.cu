// Pull up to 8 byte ranges (the first rows of the weights the next GEMV reads) into L2. Tensor parallelism runs it on
// a branch of the decode graph beside each NCCL all-reduce (tp.py), when HBM would otherwise idle for the all-reduce's
// microseconds. A hint only: nothing waits for the data, and a range that is evicted again costs nothing but time.
// Ranges are 16-byte aligned with sizes a multiple of 16; each thread takes PF_CHUNK-byte pieces, grid-strided.
// LINES 1: one prefetch.global.L2 per 128-byte line instead of one bulk (TMA) request per piece.
#define PF_CHUNK 4096

__device__ __forceinline__ void prefetch_l2(const char* p, unsigned n) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !LINES
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(n) : "memory");  // one TMA request
#else
    for (unsigned o = 0; o < n; o += 128) asm volatile("prefetch.global.L2 [%0];" ::"l"(p + o));
#endif
}

extern "C" __global__ void l2_prefetch(const char* p0, long long n0, const char* p1, long long n1, const char* p2,
                                       long long n2, const char* p3, long long n3, const char* p4, long long n4,
                                       const char* p5, long long n5, const char* p6, long long n6, const char* p7,
                                       long long n7) {
    const char* ptrs[8] = {p0, p1, p2, p3, p4, p5, p6, p7};
    const long long sizes[8] = {n0, n1, n2, n3, n4, n5, n6, n7};
    const long long stride = (long long)gridDim.x * blockDim.x, first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
#pragma unroll
    for (int r = 0; r < 8; r++) {
        for (long long c = first; c * PF_CHUNK < sizes[r]; c += stride) {
            long long left = sizes[r] - c * PF_CHUNK;
            prefetch_l2(ptrs[r] + c * PF_CHUNK, (unsigned)(left < PF_CHUNK ? left : PF_CHUNK));
        }
    }
}
