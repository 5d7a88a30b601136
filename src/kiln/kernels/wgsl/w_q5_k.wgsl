// Q5_K in its GGUF layout (176-byte super-blocks = 11 vectors): vector 0 = d | dmin << 16 and scales/mins (as
// Q4_K), vectors 1-2 = qh (bit j of byte l: sub-block j, element l), vectors 3-10 = nibbles (as Q4_K).
// value = (d * sc) * q - dmin * m.
@group(0) @binding(8) var<storage, read> wq: array<vec4<u32>>;

const UNIT: u32 = 32u;  // one sub-block

fn load8(row: u32, k: u32, K: u32) -> mat2x4<f32> {
    let base = (row * (K / 256u) + k / 256u) * 11u;
    let e = k % 256u;
    let j = e / 32u;
    let l = e % 32u;
    let sm = k_scale_min(wq[base], j);
    let w = (j / 2u) * 8u + l / 4u;
    let q = wq[base + 3u + w / 4u];
    let h = wq[base + 1u + l / 16u];
    let hw = (l % 16u) / 4u;
    let shift = (j % 2u) * 4u;
    let q0 = join4(fields4(q[w % 4u], shift, 15u), fields4(h[hw], j, 1u));
    let q1 = join4(fields4(q[w % 4u + 1u], shift, 15u), fields4(h[hw + 1u], j, 1u));
    return m8(q0 * sm.x - sm.y, q1 * sm.x - sm.y);
}

fn unit_dot(row: u32, u: u32, K: u32, xv: array<vec4<f32>, 8>) -> f32 {
    let base = (row * (K / 256u) + u / 8u) * 11u;
    let j = u % 8u;
    let sm = k_scale_min(wq[base], j);
    let shift = (j % 2u) * 4u;
    let ha = wq[base + 1u];
    let hb = wq[base + 2u];
    let qa = wq[base + 3u + (j / 2u) * 2u];
    let qb = wq[base + 4u + (j / 2u) * 2u];
    let s = dot(join4(fields4(qa.x, shift, 15u), fields4(ha.x, j, 1u)), xv[0])
          + dot(join4(fields4(qa.y, shift, 15u), fields4(ha.y, j, 1u)), xv[1])
          + dot(join4(fields4(qa.z, shift, 15u), fields4(ha.z, j, 1u)), xv[2])
          + dot(join4(fields4(qa.w, shift, 15u), fields4(ha.w, j, 1u)), xv[3])
          + dot(join4(fields4(qb.x, shift, 15u), fields4(hb.x, j, 1u)), xv[4])
          + dot(join4(fields4(qb.y, shift, 15u), fields4(hb.y, j, 1u)), xv[5])
          + dot(join4(fields4(qb.z, shift, 15u), fields4(hb.z, j, 1u)), xv[6])
          + dot(join4(fields4(qb.w, shift, 15u), fields4(hb.w, j, 1u)), xv[7]);
    return sm.x * s - sm.y * (xsum(xv[0], xv[1], xv[2], xv[3]) + xsum(xv[4], xv[5], xv[6], xv[7]));
}
