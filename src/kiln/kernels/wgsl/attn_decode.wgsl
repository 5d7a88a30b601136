// Flash-decoding, pass 1: workgroup (split s, KV head, token t) attends the GQ query heads that share the KV
// head over positions [c * CHUNK, (c + 1) * CHUNK) for chunks c = s, s + n_splits, ... below pos[t] + 1 of token
// t's sequence (read through its block table),
// keeping per query head a running max, softmax denominator and weighted sum of values (online softmax, f32).
// It writes one partial (acc[HD], max, sum) per query head for attn_combine. The number of splits is fixed per
// context size, so the dispatch does not depend on the KV length, which is read from `pos` on the device.
// Each K/V row is loaded once for all GQ heads, as vec4s: a thread scores a whole key row; for the values the
// threads form G groups of NV (one vec4 column each) that take every G-th key, summed at the end.
// Header: HD (head dim, a multiple of 4, at most 4 * WG), NV = HD / 4, G = WG / NV, GQ (query heads per KV
// head), CHUNK (keys per chunk), DIRECT (1: a single split writes the normalised output itself, no attn_combine).

const WG: u32 = 64u;

// Bindings 0-4 and NEG: attn_decode_inputs.wgsl.
@group(0) @binding(5) var<storage, read_write> partial: array<f32>;

var<workgroup> qs: array<vec4<f32>, GQ * NV>;
var<workgroup> sc: array<f32, GQ * CHUNK>;
var<workgroup> red: array<f32, GQ * WG>;
var<workgroup> acc_groups: array<vec4<f32>, WG>;
var<workgroup> n_keys: u32;

// Reduce each head's WG values of red (max or sum) in one tree; returns every head's result.
fn reduce_heads(lid: u32, is_max: bool) -> array<f32, GQ> {
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            for (var g = 0u; g < GQ; g++) {
                let a = red[g * WG + lid];
                let b = red[g * WG + lid + s];
                red[g * WG + lid] = select(a + b, max(a, b), is_max);
            }
        }
        workgroupBarrier();
    }
    var r: array<f32, GQ>;
    for (var g = 0u; g < GQ; g++) {
        r[g] = red[g * WG];
    }
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let split = wid.x;
    let kvh = wid.y;
    let t = p.t0 + wid.z;
    let sr = u32(seq[t]);
    if (lid == 0u) {
        n_keys = min(u32(pos[t]) + 1u, p.n_ctx);
    }
    let L = workgroupUniformLoad(&n_keys);
    let q_base = (t * p.n_heads + kvh * GQ) * HD;  // the GQ heads of this KV head are consecutive
    for (var c = lid; c < GQ * NV; c += WG) {
        let i = q_base + 4u * c;
        qs[c] = vec4<f32>(f32(q[i]), f32(q[i + 1u]), f32(q[i + 2u]), f32(q[i + 3u]));
    }
    workgroupBarrier();

    let cache_base = kvh * p.n_ctx * NV;  // in vectors
    let grp = lid / NV;                   // value phase: key group (grp < G is active) and vec4 column
    let col = lid % NV;
    var m: array<f32, GQ>;
    var l: array<f32, GQ>;
    var acc: array<vec4<f32>, GQ>;
    for (var g = 0u; g < GQ; g++) {
        m[g] = NEG;
    }
    for (var c = split; c * CHUNK < L; c += p.n_splits) {
        let start = c * CHUNK;
        let end = min(start + CHUNK, L);
        var local_max = array<f32, GQ>();
        for (var g = 0u; g < GQ; g++) {
            local_max[g] = NEG;
        }
        for (var j = start + lid; j < end; j += WG) {
            let row = cache_base + kv_row(sr, j) * NV;
            var s = array<f32, GQ>();  // explicit: Naga zeroes uninitialized loop locals only once
            for (var i = 0u; i < NV; i++) {
                let kv4 = vec4<f32>(k_cache[row + i]);
                for (var g = 0u; g < GQ; g++) {
                    s[g] += dot(qs[g * NV + i], kv4);
                }
            }
            for (var g = 0u; g < GQ; g++) {
                sc[g * CHUNK + j - start] = s[g] * p.scale;
                local_max[g] = max(local_max[g], s[g] * p.scale);
            }
        }
        for (var g = 0u; g < GQ; g++) {
            red[g * WG + lid] = local_max[g];
        }
        let chunk_max = reduce_heads(lid, true);
        var m_new = array<f32, GQ>();
        var local_sum = array<f32, GQ>();
        for (var g = 0u; g < GQ; g++) {
            m_new[g] = max(m[g], chunk_max[g]);
        }
        for (var j = start + lid; j < end; j += WG) {
            for (var g = 0u; g < GQ; g++) {
                let e = exp(sc[g * CHUNK + j - start] - m_new[g]);
                sc[g * CHUNK + j - start] = e;
                local_sum[g] += e;
            }
        }
        for (var g = 0u; g < GQ; g++) {
            red[g * WG + lid] = local_sum[g];
        }
        let chunk_sum = reduce_heads(lid, false);  // its barriers also publish sc
        for (var g = 0u; g < GQ; g++) {
            let corr = exp(m[g] - m_new[g]);
            l[g] = l[g] * corr + chunk_sum[g];
            m[g] = m_new[g];
            acc[g] *= corr;
        }
        if (grp < G) {
            // A constant trip count (rows past the end clamped and weighted 0) lets the compiler unroll the loop
            // and issue every row's load at once instead of one memory round trip per row.
            for (var jj = 0u; jj < (CHUNK + G - 1u) / G; jj++) {
                let j = start + grp + jj * G;
                let jc = min(j, end - 1u);
                let v4 = vec4<f32>(v_cache[cache_base + kv_row(sr, jc) * NV + col]);
                for (var g = 0u; g < GQ; g++) {
                    acc[g] += select(0.0, sc[g * CHUNK + jc - start], j < end) * v4;
                }
            }
        }
        workgroupBarrier();  // sc is rewritten by the next chunk
    }
    for (var g = 0u; g < GQ; g++) {
        acc_groups[lid] = acc[g];
        workgroupBarrier();
        let out = ((t * p.n_heads + kvh * GQ + g) * p.n_splits + split) * (HD + 2u);
        if (grp == 0u) {
            var total = acc[g];
            for (var k = 1u; k < G; k++) {
                total += acc_groups[k * NV + col];
            }
            if (DIRECT == 1u) {  // one split: the result itself (partial is the f32 output [T, n_heads * HD])
                total /= l[g];
                let o = (t * p.n_heads + kvh * GQ + g) * HD + 4u * col;
                for (var i = 0u; i < 4u; i++) {
                    partial[o + i] = total[i];
                }
            } else {
                for (var i = 0u; i < 4u; i++) {
                    partial[out + 4u * col + i] = total[i];
                }
            }
        }
        if (DIRECT == 0u && lid == 0u) {
            partial[out + HD] = m[g];
            partial[out + HD + 1u] = l[g];
        }
        workgroupBarrier();
    }
}
