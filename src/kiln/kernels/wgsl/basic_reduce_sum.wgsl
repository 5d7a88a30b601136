// Conformance basic case: sum of n u32 values. Each workgroup reduces WG values in workgroup memory (a
// missing barrier shows up as a wrong total), then one invocation adds the partial sum atomically.
override WG: u32 = 256u;  // a power of two

struct Params { n: u32 }

@group(0) @binding(0) var<storage, read> x: array<u32>;
@group(0) @binding(1) var<storage, read_write> total: array<atomic<u32>>;
@group(0) @binding(2) var<uniform> p: Params;

var<workgroup> partial: array<u32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    partial[lid] = select(0u, x[min(gid.x, p.n - 1u)], gid.x < p.n);
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            partial[lid] = partial[lid] + partial[lid + stride];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        atomicAdd(&total[0], partial[0]);
    }
}
