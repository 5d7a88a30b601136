// F32 weights: plain row-major floats. Rows may have any length, so the tail of a row is bounds-checked.
@group(0) @binding(8) var<storage, read> wq: array<f32>;

fn load8(row: u32, k: u32, K: u32) -> mat2x4<f32> {
    let i = row * K + k;
    if (k + 8u <= K) {
        return mat2x4<f32>(vec4<f32>(wq[i], wq[i + 1u], wq[i + 2u], wq[i + 3u]),
                           vec4<f32>(wq[i + 4u], wq[i + 5u], wq[i + 6u], wq[i + 7u]));
    }
    var v: array<f32, 8>;
    for (var j = 0u; j < 8u; j++) {
        v[j] = select(0.0, wq[i + j], k + j < K);
    }
    return mat2x4<f32>(vec4<f32>(v[0], v[1], v[2], v[3]), vec4<f32>(v[4], v[5], v[6], v[7]));
}
