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

fn unit_dot(row: u32, u: u32, K: u32, xv: array<vec4<f32>, UNIT / 4u>) -> f32 {
    let b = row * (K / 32u) + u;
    let d = half_at(wd[b >> 1u], b & 1u);
    let q = wq[b];
    var s = 0.0;
    for (var i = 0u; i < 4u; i++) {
        s += dot(field4(q[i], 0u, 15u) - 8.0, xv[i]) + dot(field4(q[i], 4u, 15u) - 8.0, xv[i + 4u]);
    }
    return s * d;
}
