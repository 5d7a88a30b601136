// GEMV without a fused RMSNorm: x is used as loaded.
fn sumsq(xv: array<vec4<f32>, 8>) -> f32 {
    return 0.0;
}

fn normed(xv: array<vec4<f32>, 8>, k: u32, K: u32) -> array<vec4<f32>, 8> {
    return xv;
}
