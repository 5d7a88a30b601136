// Flash-decoding, pass 1: workgroup (split s, query head h, token t) attends q over cache rows
// [c * CHUNK, (c + 1) * CHUNK) for chunks c = s, s + n_splits, ... below pos[t] + 1, keeping a running max,
// softmax denominator and weighted sum of values (online softmax, f32), and writes them as one partial
// (acc[HD], max, sum) for attn_combine. The number of splits is fixed per context size, so the dispatch does
// not depend on the KV length, which is read from `pos` on the device.
// Header: HD (head dim), CHUNK (keys per chunk), NDT (= ceil(HD / WG), dims per thread).

struct Params {
    T: u32,
    n_heads: u32,
    n_kv_heads: u32,
    n_ctx: u32,
    n_splits: u32,
    scale: f32,
}

const WG: u32 = 64u;
const NEG: f32 = -1.0e30;  // finite "minus infinity": exp(NEG - m) is 0 without inf - inf = NaN

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> q: array<act>;
@group(0) @binding(2) var<storage, read_write> k_cache: array<kv>;
@group(0) @binding(3) var<storage, read_write> v_cache: array<kv>;
@group(0) @binding(4) var<storage, read_write> pos: array<i32>;
@group(0) @binding(5) var<storage, read_write> partial: array<f32>;

var<workgroup> qs: array<f32, HD>;
var<workgroup> sc: array<f32, CHUNK>;
var<workgroup> red: array<f32, WG>;
var<workgroup> n_keys: u32;

fn reduce_max(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] = max(red[lid], red[lid + s]);
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

fn reduce_sum(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let split = wid.x;
    let h = wid.y;
    let t = wid.z;
    let kvh = h / (p.n_heads / p.n_kv_heads);
    if (lid == 0u) {
        n_keys = min(u32(pos[t]) + 1u, p.n_ctx);
    }
    let L = workgroupUniformLoad(&n_keys);
    let q_base = (t * p.n_heads + h) * HD;
    for (var d = lid; d < HD; d += WG) {
        qs[d] = f32(q[q_base + d]);
    }
    workgroupBarrier();

    let cache_base = kvh * p.n_ctx * HD;
    var m = NEG;
    var l = 0.0;
    var acc: array<f32, NDT>;
    for (var c = split; c * CHUNK < L; c += p.n_splits) {
        let start = c * CHUNK;
        let end = min(start + CHUNK, L);
        var local_max = NEG;
        for (var j = start + lid; j < end; j += WG) {
            let row = cache_base + j * HD;
            var s = 0.0;
            for (var d = 0u; d < HD; d++) {
                s += qs[d] * f32(k_cache[row + d]);
            }
            s *= p.scale;
            sc[j - start] = s;
            local_max = max(local_max, s);
        }
        let m_new = max(m, reduce_max(lid, local_max));
        var local_sum = 0.0;
        for (var j = start + lid; j < end; j += WG) {
            let e = exp(sc[j - start] - m_new);
            sc[j - start] = e;
            local_sum += e;
        }
        let chunk_sum = reduce_sum(lid, local_sum);  // its barriers also publish sc
        let corr = exp(m - m_new);
        l = l * corr + chunk_sum;
        m = m_new;
        for (var i = 0u; i < NDT; i++) {
            let d = lid + i * WG;
            if (d < HD) {
                var a = acc[i] * corr;
                for (var j = start; j < end; j++) {
                    a += sc[j - start] * f32(v_cache[cache_base + j * HD + d]);
                }
                acc[i] = a;
            }
        }
        workgroupBarrier();  // sc is rewritten by the next chunk
    }
    let out = ((t * p.n_heads + h) * p.n_splits + split) * (HD + 2u);
    for (var i = 0u; i < NDT; i++) {
        let d = lid + i * WG;
        if (d < HD) {
            partial[out + d] = acc[i];
        }
    }
    if (lid == 0u) {
        partial[out + HD] = m;
        partial[out + HD + 1u] = l;
    }
}
