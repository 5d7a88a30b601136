// Conformance basic case: c = a + b over n elements (exact in f32).
extern "C" __global__ void basic_vector_add(const float* a, const float* b, float* c, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) c[i] = a[i] + b[i];
}
