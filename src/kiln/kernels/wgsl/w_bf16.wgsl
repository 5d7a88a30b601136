// BF16 weights read as u32 pairs: a bf16 is the top half of an f32.
@group(0) @binding(8) var<storage, read> wq: array<u32>;

fn bf16_at(w: u32, odd: u32) -> f32 {
    return bitcast<f32>(select(w << 16u, w & 0xffff0000u, odd == 1u));
}

fn load8(row: u32, k: u32, K: u32) -> mat2x4<f32> {
    let i = row * K + k;
    var v: array<f32, 8>;
    for (var j = 0u; j < 8u; j++) {
        let e = i + j;
        v[j] = select(0.0, bf16_at(wq[e >> 1u], e & 1u), k + j < K);
    }
    return mat2x4<f32>(vec4<f32>(v[0], v[1], v[2], v[3]), vec4<f32>(v[4], v[5], v[6], v[7]));
}
