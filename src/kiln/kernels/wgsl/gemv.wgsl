// GEMV family: y = W x for one token (decode) or T tokens (token t = grid y; CPU adapters use it for prompts),
// and the fused decode ops built on it. A workgroup of TPR threads owns RPW logical rows of one segment (one of
// up to NW weights of the same format and K: Q, K, V or gate, up). Each thread takes units of 32 weights
// (unit_dot_<s>, the weight format snippet copied per segment) and loads its x unit once for all RPW rows; the
// threads then reduce the row sums (with subgroup operations where the device has them) and the epilogue snippet
// (gemv_out_<mode>.wgsl) maps logical rows to weight rows (wrow) and writes the results (store).
// NORM (gemv_norm_on.wgsl): x is the un-normalised residual; each thread also sums x^2 over the units it loads
// (the threads together see every column once), x is multiplied by the norm weight as it is loaded, and the row
// sums are scaled by 1/sqrt(mean(x^2) + eps) at the end: RMSNorm + GEMV in one pass. That sum is reduced as an
// extra row (NR = RPW + 1). Header: TPR (a power of two), RPW (even), NR, NW; rows_dot is generated per NW and mode.

struct Params {
    K: u32,      // row length
    N: u32,      // output row stride between tokens (plain)
    row0: u32,   // first output row of this weight part (plain)
    bias: u32,   // bit s: segment s has a bias
    n0: u32,     // logical rows of segment 0, 1, 2
    n1: u32,
    n2: u32,
    g1: u32,     // first workgroup of segment 1, 2
    g2: u32,
    eps: f32,    // NORM
    hd: u32,     // QKV: head dim, NeoX pairs, cache rows
    neox: u32,
    n_ctx: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<vec4<f32>>;

var<workgroup> partial: array<f32, TPR * NR>;

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
fn main(lanes: Lanes, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let lid = lanes.lid;
    let g = wid.x + wid.z * nwg.x;
    let t = wid.y;
    var seg = 0u;
    var g0 = 0u;
    var n = p.n0;
    if (g >= p.g2) {
        seg = 2u;
        g0 = p.g2;
        n = p.n2;
    } else if (g >= p.g1) {
        seg = 1u;
        g0 = p.g1;
        n = p.n1;
    }
    let first = (g - g0) * RPW;  // first logical row of this workgroup in its segment
    var rows: array<vec2<u32>, RPW>;  // (segment, weight row) of each logical row; rows past the end: a real row
    for (var r = 0u; r < RPW; r++) {
        rows[r] = wrow(seg, first + r, n);
    }
    let units = (p.K + UNIT - 1u) / UNIT;
    var acc: array<f32, NR>;  // constant trip counts below keep it in registers (no indexed private memory)
    for (var u = lid; u < units; u += TPR) {
        var xv = x_unit(t, u * UNIT, p.K);
        acc[NR - 1u] += sumsq(xv);  // 0 without NORM (then NR - 1 is a real row: adding 0 changes nothing)
        xv = normed(xv, u * UNIT, p.K);
        rows_dot(seg, rows, u, p.K, xv, &acc);
    }
    reduce_rows(lanes, acc);  // reduce_sg.wgsl or reduce_wg.wgsl (Lanes: the thread's ids they need)
    var scale = 1.0;
    if (NR > RPW) {
        scale = 1.0 / sqrt(row_sum(NR - 1u) / f32(p.K) + p.eps);
    }
    store(lid, t, seg, first, n, scale);
}
