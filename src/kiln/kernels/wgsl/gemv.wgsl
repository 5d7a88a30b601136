// Quantized GEMV for one token: y[row0 + r] = dot(W[r, :], x) (+ bias). The header defines TPR (threads per
// row, a power of two) and RPW (rows per workgroup); each thread walks its row in chunks of 8 weights
// (load8, from the weight format snippet), then the row's threads reduce through workgroup memory.

struct Params {
    K: u32,         // row length
    rows: u32,      // rows in this weight part
    row0: u32,      // first output column of this part
    has_bias: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;

var<workgroup> partial: array<f32, TPR * RPW>;

fn x8(k: u32, K: u32) -> mat2x4<f32> {
    var v: array<f32, 8>;
    for (var j = 0u; j < 8u; j++) {
        v[j] = select(0.0, x[k + j], k + j < K);
    }
    return mat2x4<f32>(vec4<f32>(v[0], v[1], v[2], v[3]), vec4<f32>(v[4], v[5], v[6], v[7]));
}

@compute @workgroup_size(TPR * RPW)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let lane = lid % TPR;
    let row = linear_group(wid, nwg) * RPW + lid / TPR;
    var acc = 0.0;
    if (row < p.rows) {
        for (var k = lane * 8u; k < p.K; k += TPR * 8u) {
            let w = load8(row, k, p.K);
            let v = x8(k, p.K);
            acc += dot(w[0], v[0]) + dot(w[1], v[1]);
        }
    }
    partial[lid] = acc;
    workgroupBarrier();
    for (var s = TPR / 2u; s > 0u; s >>= 1u) {
        if (lane < s) {
            partial[lid] += partial[lid + s];
        }
        workgroupBarrier();
    }
    if (lane == 0u && row < p.rows) {
        var r = partial[lid];
        if (p.has_bias != 0u) {
            r += bias[p.row0 + row];
        }
        y[p.row0 + row] = r;
    }
}
