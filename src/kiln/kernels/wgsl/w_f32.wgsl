// F32 weights: plain row-major floats, any row length (element e is component e % 4 of vector e / 4).
@group(0) @binding(8) var<storage, read> wq: array<vec4<f32>>;

const UNIT: u32 = 32u;

fn w_at(e: u32) -> f32 {
    return wq[e / 4u][e % 4u];
}

fn load8(row: u32, k: u32, K: u32) -> mat2x4<f32> {
    return load8_each(row * K + k, k, K);
}

fn unit_dot(row: u32, u: u32, K: u32, xv: array<vec4<f32>, 8>) -> f32 {
    let k = u * UNIT;
    let i = row * K + k;
    if (i % 4u == 0u && k + UNIT <= K) {
        let w = i / 4u;
        return dot(wq[w], xv[0]) + dot(wq[w + 1u], xv[1]) + dot(wq[w + 2u], xv[2]) + dot(wq[w + 3u], xv[3])
             + dot(wq[w + 4u], xv[4]) + dot(wq[w + 5u], xv[5]) + dot(wq[w + 6u], xv[6]) + dot(wq[w + 7u], xv[7]);
    }
    return unit_dot_by8(row, k, K, xv);
}
