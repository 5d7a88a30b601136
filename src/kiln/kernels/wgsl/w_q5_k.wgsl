// Q5_K in its GGUF layout (176-byte super-blocks = 44 words): d | dmin << 16, 12 bytes of scales/mins (as
// Q4_K), 32 bytes qh (bit j of byte l: sub-block j, element l), 128 bytes of nibbles (as Q4_K).
// value = (d * sc) * q - dmin * m.
@group(0) @binding(8) var<storage, read> wq: array<u32>;

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
    let base = (row * (K / 256u) + k / 256u) * 44u;
    let dm = unpack2x16float(wq[base]);
    let e = k % 256u;
    let j = e / 32u;
    let l = e % 32u;
    let sm = k_scale_min(base, j);
    let d = dm.x * sm.x;
    let m = dm.y * sm.y;
    let w = base + 12u + ((j / 2u) * 32u + l) / 4u;
    let h = base + 4u + l / 4u;
    let shift = (j % 2u) * 4u;
    let q0 = field4(wq[w], shift, 15u) + field4(wq[h], j, 1u) * 16.0;
    let q1 = field4(wq[w + 1u], shift, 15u) + field4(wq[h + 1u], j, 1u) * 16.0;
    return mat2x4<f32>(q0 * d - m, q1 * d - m);
}
