// Q4_K in its GGUF layout (144-byte super-blocks of 256 = 9 vectors): vector 0 = (d | dmin << 16, then 12 bytes
// of 6-bit scales/mins), vectors 1-8 = 128 bytes of nibbles (each 32-byte run r: sub-block 2r in the low nibbles,
// 2r + 1 in the high). value = (d * sc) * q - dmin * m.
@group(0) @binding(8) var<storage, read> wq: array<vec4<u32>>;

const UNIT: u32 = 32u;  // one sub-block

fn load8(row: u32, k: u32, K: u32) -> mat2x4<f32> {
    let base = (row * (K / 256u) + k / 256u) * 9u;
    let e = k % 256u;
    let j = e / 32u;
    let sm = k_scale_min(wq[base], j);
    let w = (j / 2u) * 8u + (e % 32u) / 4u;  // word of the 128 nibble bytes
    let q = wq[base + 1u + w / 4u];
    let shift = (j % 2u) * 4u;
    return m8(field4(q[w % 4u], shift, 15u) * sm.x - sm.y, field4(q[w % 4u + 1u], shift, 15u) * sm.x - sm.y);
}

fn unit_dot(row: u32, u: u32, K: u32, xv: array<vec4<f32>, 8>) -> f32 {
    let base = (row * (K / 256u) + u / 8u) * 9u;
    let j = u % 8u;
    let sm = k_scale_min(wq[base], j);
    let shift = (j % 2u) * 4u;
    let qa = wq[base + 1u + (j / 2u) * 2u];  // elements 0-15 of the sub-block
    let qb = wq[base + 2u + (j / 2u) * 2u];  // elements 16-31
    let s = fields_dot(qa, shift, 15u, 0.0, xv[0], xv[1], xv[2], xv[3])
          + fields_dot(qb, shift, 15u, 0.0, xv[4], xv[5], xv[6], xv[7]);
    return sm.x * s - sm.y * (xsum(xv[0], xv[1], xv[2], xv[3]) + xsum(xv[4], xv[5], xv[6], xv[7]));
}
