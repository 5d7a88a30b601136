// Q4_0, repacked: wq[b] = block b's 16 bytes of nibbles (elements 0-15: low nibbles of bytes 0-15; 16-31: high
// nibbles); wd = f16 scales, two per word. value = (q - 8) * d.
@group(0) @binding(8) var<storage, read> wq: array<vec4<u32>>;
@group(0) @binding(9) var<storage, read> wd: array<u32>;

const UNIT: u32 = 32u;

fn load8(row: u32, k: u32, K: u32) -> mat2x4<f32> {
    let b = row * (K / 32u) + k / 32u;
    let d = half_at(wd[b >> 1u], b & 1u);
    let q = wq[b];
    let j = k % 32u;
    let w = (j % 16u) / 4u;
    let shift = (j / 16u) * 4u;
    return m8((field4(q[w], shift, 15u) - 8.0) * d, (field4(q[w + 1u], shift, 15u) - 8.0) * d);
}

fn unit_dot(row: u32, u: u32, K: u32, xv: array<vec4<f32>, 8>) -> f32 {
    let b = row * (K / 32u) + u;
    let d = half_at(wd[b >> 1u], b & 1u);
    let q = wq[b];
    return d * (fields_dot(q, 0u, 15u, -8.0, xv[0], xv[1], xv[2], xv[3])
              + fields_dot(q, 4u, 15u, -8.0, xv[4], xv[5], xv[6], xv[7]));
}
