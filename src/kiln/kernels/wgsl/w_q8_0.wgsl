// Q8_0, repacked at upload: wq = the 32 int8 quants of block b in vectors 2b, 2b + 1; wd = the f16 scales, two
// per word. value = q * d.
@group(0) @binding(8) var<storage, read> wq: array<vec4<u32>>;
@group(0) @binding(9) var<storage, read> wd: array<u32>;

const UNIT: u32 = 32u;

fn load8(row: u32, k: u32, K: u32) -> mat2x4<f32> {
    let b = row * (K / 32u) + k / 32u;
    let d = half_at(wd[b >> 1u], b & 1u);
    let q = wq[2u * b + (k % 32u) / 16u];
    let h = (k % 16u) / 4u;  // 0 or 2: which word pair
    return m8(i8x4(q[h]) * d, i8x4(q[h + 1u]) * d);
}

fn unit_dot(row: u32, u: u32, K: u32, xv: array<vec4<f32>, 8>) -> f32 {
    let b = row * (K / 32u) + u;
    let d = half_at(wd[b >> 1u], b & 1u);
    let q0 = wq[2u * b];
    let q1 = wq[2u * b + 1u];
    let s = dot(i8x4(q0.x), xv[0]) + dot(i8x4(q0.y), xv[1]) + dot(i8x4(q0.z), xv[2]) + dot(i8x4(q0.w), xv[3])
          + dot(i8x4(q1.x), xv[4]) + dot(i8x4(q1.y), xv[5]) + dot(i8x4(q1.z), xv[6]) + dot(i8x4(q1.w), xv[7]);
    return s * d;
}
