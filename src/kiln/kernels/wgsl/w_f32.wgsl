// F32 weights: plain row-major floats, any row length (element e is component e % 4 of vector e / 4).
@group(0) @binding(8) var<storage, read> wq: array<vec4<f32>>;

const UNIT: u32 = 32u;

fn w_at(e: u32) -> f32 {
    return wq[e / 4u][e % 4u];
}

fn load8(row: u32, k: u32, K: u32) -> mat2x4<f32> {
    let i = row * K + k;
    var v: array<f32, 8>;
    for (var j = 0u; j < 8u; j++) {
        v[j] = select(0.0, w_at(i + j), k + j < K);
    }
    return m8(vec4<f32>(v[0], v[1], v[2], v[3]), vec4<f32>(v[4], v[5], v[6], v[7]));
}

fn unit_dot(row: u32, u: u32, K: u32, xv: array<vec4<f32>, 8>) -> f32 {
    let k = u * UNIT;
    let i = row * K + k;
    if (i % 4u == 0u && k + UNIT <= K) {
        let w = i / 4u;
        return dot(wq[w], xv[0]) + dot(wq[w + 1u], xv[1]) + dot(wq[w + 2u], xv[2]) + dot(wq[w + 3u], xv[3])
             + dot(wq[w + 4u], xv[4]) + dot(wq[w + 5u], xv[5]) + dot(wq[w + 6u], xv[6]) + dot(wq[w + 7u], xv[7]);
    }
    let a = load8(row, k, K);
    let b = load8(row, k + 8u, K);
    let c = load8(row, k + 16u, K);
    let e = load8(row, k + 24u, K);
    return dot(a[0], xv[0]) + dot(a[1], xv[1]) + dot(b[0], xv[2]) + dot(b[1], xv[3])
         + dot(c[0], xv[4]) + dot(c[1], xv[5]) + dot(e[0], xv[6]) + dot(e[1], xv[7]);
}
