// Q4_0, repacked: wq = 16 bytes of nibbles per block (4 words), wd = f16 scales, two per word.
// Elements 0-15 are the low nibbles of bytes 0-15, elements 16-31 the high nibbles. value = (q - 8) * d.
@group(0) @binding(8) var<storage, read> wq: array<u32>;
@group(0) @binding(9) var<storage, read> wd: array<u32>;

fn load8(row: u32, k: u32, K: u32) -> mat2x4<f32> {
    let b = row * (K / 32u) + k / 32u;
    let d = half_at(wd[b >> 1u], b & 1u);
    let j = k % 32u;
    let w = b * 4u + (j % 16u) / 4u;
    let shift = (j / 16u) * 4u;
    return mat2x4<f32>((field4(wq[w], shift, 15u) - 8.0) * d, (field4(wq[w + 1u], shift, 15u) - 8.0) * d);
}
