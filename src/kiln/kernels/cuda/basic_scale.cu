// Conformance basic case: out = x * s with the scalar s passed as a kernel argument after the buffers
// (a float before an unsigned int: checks the order and types of params).
extern "C" __global__ void basic_scale(const float* x, float* out, float s, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = x[i] * s;
}
