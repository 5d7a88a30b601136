// Store this step's keys and values at cache rows slot[t]. Caches are [n_kv_heads, n_ctx, head_dim] pools of type kv.

struct Params {
    T: u32,
    n_kv_heads: u32,
    head_dim: u32,
    n_ctx: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> k: array<act>;
@group(0) @binding(2) var<storage, read_write> v: array<act>;
@group(0) @binding(3) var<storage, read_write> k_cache: array<kv>;
@group(0) @binding(4) var<storage, read_write> v_cache: array<kv>;
@group(0) @binding(5) var<storage, read_write> slot: array<i32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let width = p.n_kv_heads * p.head_dim;
    let g = gid.x + gid.y * nwg.x * 64u;
    if (g >= p.T * width) {
        return;
    }
    let t = g / width;
    let c = g % width;
    let row = u32(slot[t]);
    if (row >= p.n_ctx) {
        return;
    }
    let dst = ((c / p.head_dim) * p.n_ctx + row) * p.head_dim + c % p.head_dim;
    k_cache[dst] = kv(f32(k[g]));
    v_cache[dst] = kv(f32(v[g]));
}
