// GEMV with the preceding RMSNorm fused (see gemv.wgsl): x^2 summed, x multiplied by the norm weight nw.
@group(0) @binding(4) var<storage, read> nw: array<vec4<f32>>;

fn sumsq(xv: array<vec4<f32>, 8>) -> f32 {
    return dot(xv[0], xv[0]) + dot(xv[1], xv[1]) + dot(xv[2], xv[2]) + dot(xv[3], xv[3])
         + dot(xv[4], xv[4]) + dot(xv[5], xv[5]) + dot(xv[6], xv[6]) + dot(xv[7], xv[7]);
}

fn normed(xv: array<vec4<f32>, 8>, k: u32, K: u32) -> array<vec4<f32>, 8> {
    if (K % 4u == 0u && k + 32u <= K) {
        let b = k / 4u;
        return array<vec4<f32>, 8>(xv[0] * nw[b], xv[1] * nw[b + 1u], xv[2] * nw[b + 2u], xv[3] * nw[b + 3u],
                                   xv[4] * nw[b + 4u], xv[5] * nw[b + 5u], xv[6] * nw[b + 6u], xv[7] * nw[b + 7u]);
    }
    var v = xv;
    for (var i = 0u; i < 8u; i++) {
        for (var c = 0u; c < 4u; c++) {
            let e = k + 4u * i + c;
            v[i][c] *= select(0.0, nw[e / 4u][e % 4u], e < K);
        }
    }
    return v;
}
