// GEMV epilogue, SwiGLU (gate and up matmuls + swiglu), one token: logical row 2i is gate row i (segment 0),
// 2i + 1 up row i (segment 1); y[i] = silu(gate) * up, up_out[i] = up.
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<storage, read_write> up_out: array<f32>;

fn wrow(seg: u32, l: u32, n: u32) -> vec2<u32> {
    let lc = min(l, n - 1u);
    return vec2<u32>(lc % 2u, lc / 2u);
}

fn store(lid: u32, t: u32, seg: u32, first: u32, n: u32, scale: f32) {
    let pairs = min(RPW, n - min(first, n)) / 2u;
    for (var i = lid; i < pairs; i += TPR) {
        let g = row_sum(2u * i) * scale;
        let u = row_sum(2u * i + 1u) * scale;
        let row = first / 2u + i;
        y[row] = g / (1.0 + exp(-g)) * u;
        up_out[row] = u;
    }
}
