// Conformance basic case: sum of n u32 values. Each block reduces WG values in shared memory (a missing
// __syncthreads shows up as a wrong total), then one thread adds the partial sum atomically.
#ifndef WG
#define WG 256  // a power of two, equal to blockDim.x
#endif

extern "C" __global__ void basic_reduce_sum(const unsigned int* x, unsigned int* total, unsigned int n) {
    __shared__ unsigned int partial[WG];
    unsigned int lid = threadIdx.x;
    unsigned int i = blockIdx.x * WG + lid;
    partial[lid] = i < n ? x[i] : 0u;
    __syncthreads();
    for (unsigned int stride = WG / 2; stride > 0; stride /= 2) {
        if (lid < stride) partial[lid] += partial[lid + stride];
        __syncthreads();
    }
    if (lid == 0) atomicAdd(total, partial[0]);
}
