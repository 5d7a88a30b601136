// Q8_0, repacked at upload (34-byte blocks are not word aligned): wq = 32 int8 per block (8 words),
// wd = the f16 scales, two per word. value = q * d.
@group(0) @binding(8) var<storage, read> wq: array<u32>;
@group(0) @binding(9) var<storage, read> wd: array<u32>;

fn load8(row: u32, k: u32, K: u32) -> mat2x4<f32> {
    let b = row * (K / 32u) + k / 32u;
    let d = half_at(wd[b >> 1u], b & 1u);
    let w = b * 8u + (k % 32u) / 4u;
    return mat2x4<f32>(i8x4(wq[w]) * d, i8x4(wq[w + 1u]) * d);
}
