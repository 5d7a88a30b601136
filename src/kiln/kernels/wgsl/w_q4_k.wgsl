// Q4_K in its GGUF layout (144-byte super-blocks of 256 = 36 words): d | dmin << 16, 12 bytes of 6-bit
// scales/mins, 128 bytes of nibbles (each 32-byte run: sub-block 2r in the low nibbles, 2r+1 in the high).
// value = (d * sc) * q - dmin * m.
@group(0) @binding(8) var<storage, read> wq: array<u32>;

// Sub-block j's 6-bit scale and min: j < 4 in the low 6 bits of bytes j / j+4; j >= 4 split between
// byte j+4 (low 4 bits) and the top 2 bits of bytes j-4 / j.
fn k_scale_min(base: u32, j: u32) -> vec2<f32> {
    let s0 = wq[base + 1u];
    let s1 = wq[base + 2u];
    let s2 = wq[base + 3u];
    let lo = vec2<u32>(byte_of(s0, j) & 63u, byte_of(s1, j) & 63u);
    let mix = byte_of(s2, j);
    let hi = vec2<u32>((mix & 15u) | ((byte_of(s0, j) >> 6u) << 4u), (mix >> 4u) | ((byte_of(s1, j) >> 6u) << 4u));
    return vec2<f32>(select(hi, lo, j < 4u));
}

fn load8(row: u32, k: u32, K: u32) -> mat2x4<f32> {
    let base = (row * (K / 256u) + k / 256u) * 36u;
    let dm = unpack2x16float(wq[base]);
    let e = k % 256u;
    let j = e / 32u;
    let sm = k_scale_min(base, j);
    let d = dm.x * sm.x;
    let m = dm.y * sm.y;
    let w = base + 4u + ((j / 2u) * 32u + e % 32u) / 4u;
    let shift = (j % 2u) * 4u;
    return mat2x4<f32>(field4(wq[w], shift, 15u) * d - m, field4(wq[w + 1u], shift, 15u) * d - m);
}
