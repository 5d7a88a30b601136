// Q5_0, repacked: wq[b] = 16 bytes of low nibbles (as Q4_0), wd = f16 scales (two per word), wh[b] = qh (bit e is
// element e's fifth bit). value = (q - 16) * d.
@group(0) @binding(8) var<storage, read> wq: array<vec4<u32>>;
@group(0) @binding(9) var<storage, read> wd: array<u32>;
@group(0) @binding(10) var<storage, read> wh: array<u32>;

const UNIT: u32 = 32u;

fn load8(row: u32, k: u32, K: u32) -> mat2x4<f32> {
    let b = row * (K / 32u) + k / 32u;
    let d = half_at(wd[b >> 1u], b & 1u);
    let q = wq[b];
    let qh = wh[b];
    let j = k % 32u;
    let w = (j % 16u) / 4u;
    let shift = (j / 16u) * 4u;
    let q0 = join4(fields4(q[w], shift, 15u), bits4(qh, j));
    let q1 = join4(fields4(q[w + 1u], shift, 15u), bits4(qh, j + 4u));
    return m8((q0 - 16.0) * d, (q1 - 16.0) * d);
}

fn unit_dot(row: u32, u: u32, K: u32, xv: array<vec4<f32>, 8>) -> f32 {
    let b = row * (K / 32u) + u;
    let d = half_at(wd[b >> 1u], b & 1u);
    let q = wq[b];
    let qh = wh[b];
    return d * (fields5_dot(q, 0u, qh, 0u, -16.0, xv[0], xv[1], xv[2], xv[3])
              + fields5_dot(q, 4u, qh, 16u, -16.0, xv[4], xv[5], xv[6], xv[7]));
}
