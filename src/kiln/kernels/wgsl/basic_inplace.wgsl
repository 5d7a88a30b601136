// Conformance basic case: x = 2x + 1 in place, launched twice in one batch: the second launch must see
// the first one's writes (launches are ordered).
override WG: u32 = 64u;

struct Params { n: u32 }

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<uniform> p: Params;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (gid.x < p.n) {
        x[gid.x] = x[gid.x] * 2.0 + 1.0;
    }
}
