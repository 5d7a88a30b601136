// F16 weights read as u32 pairs (core WGSL, no shader-f16 needed). Element i is half i & 1 of word i >> 1.
@group(0) @binding(8) var<storage, read> wq: array<u32>;

fn load8(row: u32, k: u32, K: u32) -> mat2x4<f32> {
    let i = row * K + k;
    if (k + 8u <= K && (i & 1u) == 0u) {
        let w = i >> 1u;
        let a = unpack2x16float(wq[w]);
        let b = unpack2x16float(wq[w + 1u]);
        let c = unpack2x16float(wq[w + 2u]);
        let d = unpack2x16float(wq[w + 3u]);
        return mat2x4<f32>(vec4<f32>(a, b), vec4<f32>(c, d));
    }
    var v: array<f32, 8>;
    for (var j = 0u; j < 8u; j++) {
        let e = i + j;
        v[j] = select(0.0, half_at(wq[e >> 1u], e & 1u), k + j < K);
    }
    return mat2x4<f32>(vec4<f32>(v[0], v[1], v[2], v[3]), vec4<f32>(v[4], v[5], v[6], v[7]));
}
