// Conformance basic case: x = 2x + 1 in place, launched twice in one batch: the second launch must see
// the first one's writes (launches are ordered on the stream).
extern "C" __global__ void basic_inplace(float* x, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = x[i] * 2.0f + 1.0f;
}
