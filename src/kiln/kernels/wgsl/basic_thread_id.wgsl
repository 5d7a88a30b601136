// Conformance basic case: every invocation writes its own global id. Proves dispatch size, the id
// builtins and the bounds check on a grid that overshoots n.
override WG: u32 = 64u;

struct Params { n: u32 }

@group(0) @binding(0) var<storage, read_write> out: array<u32>;
@group(0) @binding(1) var<uniform> p: Params;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
        @builtin(global_invocation_id) gid: vec3<u32>) {
    let i = wid.x * WG + lid.x;  // must equal gid.x: checks both builtins at once
    if (i < p.n) {
        out[i] = select(0xFFFFFFFFu, gid.x, gid.x == i);
    }
}
