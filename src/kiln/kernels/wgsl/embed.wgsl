// Row gather: out[t] = W[ids[t]] dequantized, 8 elements per thread. Big tables are split into parts by
// rows; each part's dispatch writes only the tokens whose id falls in its rows.

struct Params {
    K: u32,      // row length
    rows: u32,   // rows in this part
    row0: u32,   // first row of this part
    T: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> ids: array<i32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let chunks = (p.K + 7u) / 8u;
    let g = gid.x + gid.y * nwg.x * 64u;
    if (g >= p.T * chunks) {
        return;
    }
    let t = g / chunks;
    let k = (g % chunks) * 8u;
    let id = u32(ids[t]);
    if (id < p.row0 || id >= p.row0 + p.rows) {
        return;
    }
    let w = load8(id - p.row0, k, p.K);
    for (var j = 0u; j < 8u; j++) {
        if (k + j < p.K) {
            y[t * p.K + k + j] = w[j / 4u][j % 4u];
        }
    }
}
