// BF16 weights as u32 pairs in vec4s: a bf16 is the top half of an f32.
@group(0) @binding(8) var<storage, read> wq: array<vec4<u32>>;

const UNIT: u32 = 32u;

fn bf16_pair(w: u32) -> vec2<f32> {
    return vec2<f32>(bitcast<f32>(w << 16u), bitcast<f32>(w & 0xffff0000u));
}

fn w_at(e: u32) -> f32 {
    return bf16_pair(wq[e / 8u][(e / 2u) % 4u])[e & 1u];
}

fn load8(row: u32, k: u32, K: u32) -> mat2x4<f32> {
    let i = row * K + k;
    if (i % 8u == 0u && k + 8u <= K) {
        let w = wq[i / 8u];
        return m8(vec4<f32>(bf16_pair(w.x), bf16_pair(w.y)), vec4<f32>(bf16_pair(w.z), bf16_pair(w.w)));
    }
    var v: array<f32, 8>;
    for (var j = 0u; j < 8u; j++) {
        v[j] = select(0.0, w_at(i + j), k + j < K);
    }
    return m8(vec4<f32>(v[0], v[1], v[2], v[3]), vec4<f32>(v[4], v[5], v[6], v[7]));
}

fn unit_dot(row: u32, u: u32, K: u32, xv: array<vec4<f32>, 8>) -> f32 {
    let k = u * UNIT;
    let a = load8(row, k, K);
    let b = load8(row, k + 8u, K);
    let c = load8(row, k + 16u, K);
    let e = load8(row, k + 24u, K);
    return dot(a[0], xv[0]) + dot(a[1], xv[1]) + dot(b[0], xv[2]) + dot(b[1], xv[3])
         + dot(c[0], xv[4]) + dot(c[1], xv[5]) + dot(e[0], xv[6]) + dot(e[1], xv[7]);
}
