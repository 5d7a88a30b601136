// Q6_K, repacked (210-byte super-blocks are not word aligned): wq = 52 words per super-block (ql: 128 bytes,
// qh: 64 bytes, 16 int8 scales), wd = the f16 d, two per word. Each 128-element half has four 32-element
// quarters s: low 4 bits from ql part s % 2 (nibble s / 2), top 2 bits from bits 2s of qh.
// value = (d * sc) * (q - 32), one scale per 16 elements.
@group(0) @binding(8) var<storage, read> wq: array<u32>;
@group(0) @binding(9) var<storage, read> wd: array<u32>;

fn load8(row: u32, k: u32, K: u32) -> mat2x4<f32> {
    let b = row * (K / 256u) + k / 256u;
    let d = half_at(wd[b >> 1u], b & 1u);
    let base = b * 52u;
    let e = k % 256u;
    let half = e / 128u;
    let s = (e % 128u) / 32u;
    let l = e % 32u;
    let ql = base + (half * 64u + (s % 2u) * 32u + l) / 4u;
    let qh = base + 32u + (half * 32u + l) / 4u;
    let sc = bitcast<i32>(byte_of(wq[base + 48u + e / 64u], e / 16u) << 24u) >> 24u;
    let dl = d * f32(sc);
    let q0 = field4(wq[ql], (s / 2u) * 4u, 15u) + field4(wq[qh], 2u * s, 3u) * 16.0 - 32.0;
    let q1 = field4(wq[ql + 1u], (s / 2u) * 4u, 15u) + field4(wq[qh + 1u], 2u * s, 3u) * 16.0 - 32.0;
    return mat2x4<f32>(q0 * dl, q1 * dl);
}
