// Conformance basic case: out = x * s with the scalar s passed through params (a float before a u32:
// checks the packing order of the uniform struct).
override WG: u32 = 64u;

struct Params { s: f32, n: u32 }

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<uniform> p: Params;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (gid.x < p.n) {
        out[gid.x] = x[gid.x] * p.s;
    }
}
