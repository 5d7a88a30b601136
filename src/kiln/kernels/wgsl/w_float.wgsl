// Shared by the float weight formats (F32, F16, BF16; appended after the format's own snippet, which defines
// w_at and load8): element-by-element loads for unaligned or ragged spans, and a unit's dot product from load8.

fn load8_each(i: u32, k: u32, K: u32) -> mat2x4<f32> {
    var v: array<f32, 8>;
    for (var j = 0u; j < 8u; j++) {
        v[j] = select(0.0, w_at(i + j), k + j < K);
    }
    return m8(vec4<f32>(v[0], v[1], v[2], v[3]), vec4<f32>(v[4], v[5], v[6], v[7]));
}

fn unit_dot_by8(row: u32, k: u32, K: u32, xv: array<vec4<f32>, 8>) -> f32 {
    let a = load8(row, k, K);
    let b = load8(row, k + 8u, K);
    let c = load8(row, k + 16u, K);
    let e = load8(row, k + 24u, K);
    return dot(a[0], xv[0]) + dot(a[1], xv[1]) + dot(b[0], xv[2]) + dot(b[1], xv[3])
         + dot(c[0], xv[4]) + dot(c[1], xv[5]) + dot(e[0], xv[6]) + dot(e[1], xv[7]);
}
