// Conformance basic case: every thread writes its own global id. Proves grid/block sizes, the index
// builtins and the bounds check on a grid that overshoots n.
extern "C" __global__ void basic_thread_id(unsigned int* out, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = i;
}
