// F16 weights as u32 pairs in vec4s (core WGSL, no shader-f16 needed): element e is half e % 2 of word e / 2.
@group(0) @binding(8) var<storage, read> wq: array<vec4<u32>>;

const UNIT: u32 = 32u;

fn w_at(e: u32) -> f32 {
    return half_at(wq[e / 8u][(e / 2u) % 4u], e & 1u);
}

fn load8(row: u32, k: u32, K: u32) -> mat2x4<f32> {
    let i = row * K + k;
    if (i % 8u == 0u && k + 8u <= K) {
        let w = wq[i / 8u];
        return m8(vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y)),
                  vec4<f32>(unpack2x16float(w.z), unpack2x16float(w.w)));
    }
    return load8_each(i, k, K);
}

fn unit_dot(row: u32, u: u32, K: u32, xv: array<vec4<f32>, 8>) -> f32 {
    return unit_dot_by8(row, u * UNIT, K, xv);
}
