// Tiled GEMM for a batch of tokens: out[t, row0 + n] = dot(W[n, :], x[t, :]) (+ bias). A workgroup of 256
// threads computes a 32-token x 64-row tile; per 32-wide K step it dequantizes the weight tile once into
// workgroup memory (one load8 per thread) next to the x tile, then each thread accumulates 2 x 4 outputs.

struct Params {
    K: u32,
    rows: u32,      // rows in this weight part
    row0: u32,      // first output column of this part
    has_bias: u32,
    T: u32,         // tokens
    N: u32,         // output row stride (all parts' rows)
}

const BM: u32 = 32u;   // tokens per tile
const BN: u32 = 64u;   // weight rows per tile
const BK: u32 = 32u;
const LD: u32 = 33u;   // padded stride: threads reading a column hit different banks

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;

var<workgroup> xs: array<f32, BM * LD>;
var<workgroup> ws: array<f32, BN * LD>;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let n_base = wid.x * BN;
    let t_base = wid.y * BM;
    let tx = lid % 16u;   // rows tx + 16j
    let ty = lid / 16u;   // tokens ty + 16i
    var acc: array<array<f32, 4>, 2>;
    for (var k0 = 0u; k0 < p.K; k0 += BK) {
        for (var i = 0u; i < 4u; i++) {
            let e = lid + i * 256u;
            let t = t_base + e / BK;
            let k = k0 + e % BK;
            xs[(e / BK) * LD + e % BK] = select(0.0, x[t * p.K + k], t < p.T && k < p.K);
        }
        let wn = lid / 4u;
        let wc = (lid % 4u) * 8u;
        var w = mat2x4<f32>();
        if (n_base + wn < p.rows) {
            w = load8(n_base + wn, k0 + wc, p.K);
        }
        for (var j = 0u; j < 4u; j++) {
            ws[wn * LD + wc + j] = w[0][j];
            ws[wn * LD + wc + 4u + j] = w[1][j];
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            let a0 = xs[ty * LD + kk];
            let a1 = xs[(ty + 16u) * LD + kk];
            for (var j = 0u; j < 4u; j++) {
                let b = ws[(tx + 16u * j) * LD + kk];
                acc[0][j] += a0 * b;
                acc[1][j] += a1 * b;
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 2u; i++) {
        let t = t_base + ty + 16u * i;
        for (var j = 0u; j < 4u; j++) {
            let n = n_base + tx + 16u * j;
            if (t < p.T && n < p.rows) {
                var r = acc[i][j];
                if (p.has_bias != 0u) {
                    r += bias[p.row0 + n];
                }
                y[t * p.N + p.row0 + n] = r;
            }
        }
    }
}
