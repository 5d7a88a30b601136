// Quantized GEMV: y[t, row0 + r] = dot(W[r, :], x[t, :]) (+ bias), token t = grid y (decode: one token; CPU
// adapters also use it for prompts, see WgpuDevice.matmul). A workgroup of TPR threads owns RPW rows. Each thread takes units of 32 weights (unit_dot, from the weight format snippet: whole blocks read as
// vec4 loads) and loads its x unit once for all RPW rows; then the threads reduce the RPW partial sums (with
// subgroup operations where the device has them). Header: TPR (a power of two), RPW.

struct Params {
    K: u32,         // row length
    rows: u32,      // rows in this weight part
    row0: u32,      // first output column of this part
    has_bias: u32,
    N: u32,         // output row stride (all parts' rows)
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;

var<workgroup> partial: array<f32, TPR * RPW>;

// x[t, k .. k + 32), zero past K. The common case is written out with constant indices: a private array indexed
// by a loop counter is spilled to local memory wherever the driver does not unroll the loop.
fn x_unit(t: u32, k: u32, K: u32) -> array<vec4<f32>, 8> {
    let base = t * K + k;
    if (K % 4u == 0u && k + 32u <= K) {
        let b = base / 4u;
        return array<vec4<f32>, 8>(x[b], x[b + 1u], x[b + 2u], x[b + 3u], x[b + 4u], x[b + 5u], x[b + 6u], x[b + 7u]);
    }
    var v: array<vec4<f32>, 8>;
    for (var i = 0u; i < 8u; i++) {
        for (var c = 0u; c < 4u; c++) {
            let e = base + 4u * i + c;
            v[i][c] = select(0.0, x[e / 4u][e % 4u], k + 4u * i + c < K);
        }
    }
    return v;
}

@compute @workgroup_size(TPR)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = (wid.x + wid.z * nwg.x) * RPW;
    let t = wid.y;
    let out = t * p.N + p.row0 + first;
    let n = min(RPW, p.rows - min(first, p.rows));  // rows of this workgroup that exist
    let units = (p.K + UNIT - 1u) / UNIT;
    var acc: array<f32, RPW>;  // constant trip counts below keep it in registers (no indexed private memory)
    for (var u = lid; u < units; u += TPR) {
        let xv = x_unit(t, u * UNIT, p.K);
        for (var r = 0u; r < RPW; r++) {
            acc[r] += unit_dot(min(first + r, p.rows - 1u), u, p.K, xv);  // rows past the end: computed, unused
        }
    }
    reduce_rows(lid, acc);  // reduce_sg.wgsl or reduce_wg.wgsl
    for (var r = lid; r < n; r += TPR) {
        var v = partial[r * TPR];
        if (p.has_bias != 0u) {
            v += bias[p.row0 + first + r];
        }
        y[out + r] = v;
    }
}
