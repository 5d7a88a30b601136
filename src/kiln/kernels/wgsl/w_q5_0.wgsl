// Q5_0, repacked: wq = 5 words per block (qh: bit e is element e's fifth bit, then 4 words of nibbles as
// Q4_0), wd = f16 scales, two per word. value = (q - 16) * d.
@group(0) @binding(8) var<storage, read> wq: array<u32>;
@group(0) @binding(9) var<storage, read> wd: array<u32>;

fn load8(row: u32, k: u32, K: u32) -> mat2x4<f32> {
    let b = row * (K / 32u) + k / 32u;
    let d = half_at(wd[b >> 1u], b & 1u);
    let base = b * 5u;
    let qh = wq[base];
    let j = k % 32u;
    let w = base + 1u + (j % 16u) / 4u;
    let shift = (j / 16u) * 4u;
    let hi = vec4<u32>(0u, 1u, 2u, 3u) + j;
    let q0 = field4(wq[w], shift, 15u) + vec4<f32>((vec4<u32>(qh) >> hi) & vec4<u32>(1u)) * 16.0;
    let q1 = field4(wq[w + 1u], shift, 15u) + vec4<f32>((vec4<u32>(qh) >> (hi + 4u)) & vec4<u32>(1u)) * 16.0;
    return mat2x4<f32>((q0 - 16.0) * d, (q1 - 16.0) * d);
}
