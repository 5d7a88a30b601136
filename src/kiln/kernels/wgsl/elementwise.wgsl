// Elementwise ops. Every tensor binding is read_write so that `out` may alias an input (the model adds
// into the residual stream in place); WebGPU forbids a buffer being both read-only and writable in one
// dispatch.

struct Params {
    n: u32,     // elements (gather_rows: of all output rows)
    width: u32, // gather_rows: row length
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> a: array<act>;
@group(0) @binding(2) var<storage, read_write> b: array<act>;
@group(0) @binding(3) var<storage, read_write> y: array<act>;
@group(0) @binding(4) var<storage, read_write> rows: array<i32>;

fn index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 256u;
}

@compute @workgroup_size(256)
fn add(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i < p.n) {
        y[i] = act(f32(a[i]) + f32(b[i]));
    }
}

@compute @workgroup_size(256)
fn swiglu(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i < p.n) {
        let g = f32(a[i]);
        y[i] = act(g / (1.0 + exp(-g)) * f32(b[i]));
    }
}

// y[r, :] = a[rows[r], :] (only the tokens that need logits go through the output head).
@compute @workgroup_size(256)
fn gather_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i < p.n) {
        y[i] = a[u32(rows[i / p.width]) * p.width + i % p.width];
    }
}
