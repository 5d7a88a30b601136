// Conformance basic case: C[M, N] = A[M, K] @ B[K, N] (row-major f32) on a 2-D grid of TILE x TILE
// blocks, staging tiles in shared memory; M, N, K need not be multiples of TILE.
#ifndef TILE
#define TILE 16  // equal to blockDim.x and blockDim.y
#endif

extern "C" __global__ void basic_matmul_2d(const float* a, const float* b, float* c, unsigned int m, unsigned int n,
                                           unsigned int k) {
    __shared__ float ta[TILE][TILE];
    __shared__ float tb[TILE][TILE];
    unsigned int col = blockIdx.x * TILE + threadIdx.x;
    unsigned int row = blockIdx.y * TILE + threadIdx.y;
    float acc = 0.0f;
    for (unsigned int k0 = 0; k0 < k; k0 += TILE) {
        unsigned int ka = k0 + threadIdx.x, kb = k0 + threadIdx.y;
        ta[threadIdx.y][threadIdx.x] = (row < m && ka < k) ? a[row * k + ka] : 0.0f;
        tb[threadIdx.y][threadIdx.x] = (kb < k && col < n) ? b[kb * n + col] : 0.0f;
        __syncthreads();
        for (unsigned int t = 0; t < TILE; ++t) acc += ta[threadIdx.y][t] * tb[t][threadIdx.x];
        __syncthreads();
    }
    if (row < m && col < n) c[row * n + col] = acc;
}
