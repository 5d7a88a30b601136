// GEMV epilogue, residual (matmul + add): y[r] = sum (+ bias) and resid[r] += y[r], one token.
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> b0: array<f32>;
@group(0) @binding(5) var<storage, read_write> resid: array<f32>;

fn wrow(seg: u32, l: u32, n: u32) -> vec2<u32> {
    return vec2<u32>(0u, min(l, n - 1u));
}

fn store(lid: u32, t: u32, seg: u32, first: u32, n: u32, scale: f32) {
    let cnt = min(RPW, n - min(first, n));
    for (var r = lid; r < cnt; r += TPR) {
        var v = row_sum(r) * scale;
        if ((p.bias & 1u) != 0u) {
            v += b0[first + r];
        }
        y[first + r] = v;
        resid[first + r] += v;
    }
}
