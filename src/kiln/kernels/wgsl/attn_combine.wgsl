// Flash-decoding, pass 2: merge the splits' partials of one (token, head): out = sum_s acc_s e^(m_s - M) /
// sum_s l_s e^(m_s - M) with M the largest split max (split 0 always holds key 0, so M is finite). NS (the number
// of splits) is a header constant: the loops over splits unroll and their loads go out together.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> partial: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<act>;

@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let th = (p.t0 + wid.y) * p.n_heads + wid.x;   // t * n_heads + h
    let base = th * NS * (HD + 2u);
    var m: array<f32, NS>;
    var M = -1.0e30;
    for (var s = 0u; s < NS; s++) {
        m[s] = partial[base + s * (HD + 2u) + HD];
        M = max(M, m[s]);
    }
    var den = 0.0;
    for (var s = 0u; s < NS; s++) {
        m[s] = exp(m[s] - M);
        den += partial[base + s * (HD + 2u) + HD + 1u] * m[s];
    }
    for (var d = lid; d < HD; d += 64u) {
        var num = 0.0;
        for (var s = 0u; s < NS; s++) {
            num += partial[base + s * (HD + 2u) + d] * m[s];
        }
        y[th * HD + d] = act(num / den);
    }
}
