// Q4_1 in its GGUF layout (20-byte blocks = 5 words): word 0 = d | m << 16, words 1-4 the nibbles
// (as Q4_0). value = d * q + m.
@group(0) @binding(8) var<storage, read> wq: array<u32>;

fn load8(row: u32, k: u32, K: u32) -> mat2x4<f32> {
    let base = (row * (K / 32u) + k / 32u) * 5u;
    let dm = unpack2x16float(wq[base]);
    let j = k % 32u;
    let w = base + 1u + (j % 16u) / 4u;
    let shift = (j / 16u) * 4u;
    return mat2x4<f32>(field4(wq[w], shift, 15u) * dm.x + dm.y, field4(wq[w + 1u], shift, 15u) * dm.x + dm.y);
}
