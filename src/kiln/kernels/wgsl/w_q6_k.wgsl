// Q6_K, repacked (210-byte super-blocks are not word aligned): wq = 13 vectors per super-block (ql: vectors 0-7,
// qh: 8-11, the 16 int8 scales: 12), wd = the f16 d, two per word. Each 128-element half h has four 32-element
// quarters s: low 4 bits from ql bytes h*64 + (s % 2)*32 (nibble s / 2), top 2 bits from bits 2s of qh bytes
// h*32. value = (d * sc) * (q - 32), one scale per 16 elements.
@group(0) @binding(8) var<storage, read> wq: array<vec4<u32>>;
@group(0) @binding(9) var<storage, read> wd: array<u32>;

const UNIT: u32 = 32u;  // one quarter of a half

fn i8_of(w: u32, i: u32) -> f32 {
    return f32(bitcast<i32>(byte_of(w, i) << 24u) >> 24u);
}

fn load8(row: u32, k: u32, K: u32) -> mat2x4<f32> {
    let b = row * (K / 256u) + k / 256u;
    let d = half_at(wd[b >> 1u], b & 1u);
    let base = b * 13u;
    let e = k % 256u;
    let h = e / 128u;
    let s = (e % 128u) / 32u;
    let l = e % 32u;
    let qlw = h * 16u + (s % 2u) * 8u + l / 4u;  // word of ql
    let qhw = 32u + h * 8u + l / 4u;              // word of qh
    let ql = wq[base + qlw / 4u];
    let qh = wq[base + qhw / 4u];
    let dl = d * i8_of(wq[base + 12u][e / 64u], e / 16u);
    let q0 = join4(fields4(ql[qlw % 4u], (s / 2u) * 4u, 15u), fields4(qh[qhw % 4u], 2u * s, 3u)) - 32.0;
    let q1 = join4(fields4(ql[qlw % 4u + 1u], (s / 2u) * 4u, 15u), fields4(qh[qhw % 4u + 1u], 2u * s, 3u)) - 32.0;
    return m8(q0 * dl, q1 * dl);
}

// 16 6-bit values (low 4 bits: nibbles of l from bit ls; top 2: bits hs of h) - 32, dotted with x.
fn q6_dot(l: vec4<u32>, ls: u32, h: vec4<u32>, hs: u32, x0: vec4<f32>, x1: vec4<f32>, x2: vec4<f32>,
          x3: vec4<f32>) -> f32 {
    return dot(join4(fields4(l.x, ls, 15u), fields4(h.x, hs, 3u)) - 32.0, x0)
         + dot(join4(fields4(l.y, ls, 15u), fields4(h.y, hs, 3u)) - 32.0, x1)
         + dot(join4(fields4(l.z, ls, 15u), fields4(h.z, hs, 3u)) - 32.0, x2)
         + dot(join4(fields4(l.w, ls, 15u), fields4(h.w, hs, 3u)) - 32.0, x3);
}

fn unit_dot(row: u32, u: u32, K: u32, xv: array<vec4<f32>, 8>) -> f32 {
    let b = row * (K / 256u) + u / 8u;
    let d = half_at(wd[b >> 1u], b & 1u);
    let base = b * 13u;
    let quarter = u % 8u;
    let h = quarter / 4u;
    let s = quarter % 4u;
    let la = wq[base + h * 4u + (s % 2u) * 2u];
    let lb = wq[base + h * 4u + (s % 2u) * 2u + 1u];
    let scw = wq[base + 12u][quarter / 2u];
    let s0 = q6_dot(la, (s / 2u) * 4u, wq[base + 8u + h * 2u], 2u * s, xv[0], xv[1], xv[2], xv[3]);
    let s1 = q6_dot(lb, (s / 2u) * 4u, wq[base + 9u + h * 2u], 2u * s, xv[4], xv[5], xv[6], xv[7]);
    return d * (i8_of(scw, 2u * quarter) * s0 + i8_of(scw, 2u * quarter + 1u) * s1);
}
