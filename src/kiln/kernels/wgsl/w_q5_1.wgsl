// Q5_1 in its GGUF layout (24-byte blocks = 6 words): d | m << 16, qh, then 4 words of nibbles.
// value = d * q + m.
@group(0) @binding(8) var<storage, read> wq: array<u32>;

fn load8(row: u32, k: u32, K: u32) -> mat2x4<f32> {
    let base = (row * (K / 32u) + k / 32u) * 6u;
    let dm = unpack2x16float(wq[base]);
    let qh = wq[base + 1u];
    let j = k % 32u;
    let w = base + 2u + (j % 16u) / 4u;
    let shift = (j / 16u) * 4u;
    let hi = vec4<u32>(0u, 1u, 2u, 3u) + j;
    let q0 = field4(wq[w], shift, 15u) + vec4<f32>((vec4<u32>(qh) >> hi) & vec4<u32>(1u)) * 16.0;
    let q1 = field4(wq[w + 1u], shift, 15u) + vec4<f32>((vec4<u32>(qh) >> (hi + 4u)) & vec4<u32>(1u)) * 16.0;
    return mat2x4<f32>(q0 * dm.x + dm.y, q1 * dm.x + dm.y);
}
