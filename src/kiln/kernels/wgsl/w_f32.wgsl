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

fn unit_dot(row: u32, u: u32, K: u32, xv: array<vec4<f32>, UNIT / 4u>) -> f32 {
    let k = u * UNIT;
    let i = row * K + k;
    var s = 0.0;
    if (i % 4u == 0u && k + UNIT <= K) {
        for (var j = 0u; j < 8u; j++) {
            s += dot(wq[i / 4u + j], xv[j]);
        }
        return s;
    }
    for (var j = 0u; j < 8u; j++) {
        let w = load8(row, k + 4u * (j & 6u), K);
        s += dot(w[j & 1u], xv[j]);
    }
    return s;
}
