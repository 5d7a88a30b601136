// Causal attention for one run of a batch (tokens t0 .. t0 + n_run of one sequence, read through its block table):
// workgroup (query tile, head) gives one thread per query; the tile's keys are staged BK rows at a time in workgroup memory (up to the tile's largest position, which is
// the same for all threads), and each thread runs an online softmax over the keys at or before its own
// position, in f32. Header: HD (head dim).

const BQ: u32 = 64u;
const BK: u32 = 16u;
const NEG: f32 = -1.0e30;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> q: array<act>;
@group(0) @binding(2) var<storage, read_write> k_cache: array<kv>;
@group(0) @binding(3) var<storage, read_write> v_cache: array<kv>;
@group(0) @binding(4) var<storage, read_write> pos: array<i32>;
@group(0) @binding(5) var<storage, read_write> y: array<act>;
@group(0) @binding(8) var<storage, read_write> seq: array<i32>;
@group(0) @binding(9) var<storage, read_write> table: array<i32>;

fn kv_row(r: u32, j: u32) -> u32 {
    return u32(table[r * p.width + j / p.block]) * p.block + j % p.block;
}

var<workgroup> ks: array<f32, BK * HD>;
var<workgroup> vs: array<f32, BK * HD>;
var<workgroup> tile_pos: array<u32, BQ>;
var<workgroup> n_keys: u32;

@compute @workgroup_size(BQ)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let h = wid.y;
    let kvh = h / (p.n_heads / p.n_kv_heads);
    let t = p.t0 + wid.x * BQ + lid;
    let valid = wid.x * BQ + lid < p.n_run;
    let sr = u32(seq[p.t0]);
    var my_pos = 0u;
    if (valid) {
        my_pos = min(u32(pos[t]), p.n_ctx - 1u);
    }
    tile_pos[lid] = my_pos;
    workgroupBarrier();
    if (lid == 0u) {
        var mx = 0u;
        for (var i = 0u; i < BQ; i++) {
            mx = max(mx, tile_pos[i]);
        }
        n_keys = mx + 1u;
    }
    let L = workgroupUniformLoad(&n_keys);

    var qv: array<f32, HD>;
    var acc: array<f32, HD>;
    if (valid) {
        let qb = (t * p.n_heads + h) * HD;
        for (var d = 0u; d < HD; d++) {
            qv[d] = f32(q[qb + d]) ;
        }
    }
    var m = NEG;
    var l = 0.0;
    let cache_base = kvh * p.n_ctx * HD;
    for (var j0 = 0u; j0 < L; j0 += BK) {
        for (var e = lid; e < BK * HD; e += BQ) {
            let j = j0 + e / HD;
            var kk = 0.0;
            var vv = 0.0;
            if (j < L) {
                let row = cache_base + kv_row(sr, j) * HD + e % HD;
                kk = f32(k_cache[row]);
                vv = f32(v_cache[row]);
            }
            ks[e] = kk;
            vs[e] = vv;
        }
        workgroupBarrier();
        if (valid && j0 <= my_pos) {
            var s: array<f32, BK>;
            var m_new = m;
            for (var jj = 0u; jj < BK; jj++) {
                var dot = 0.0;
                for (var d = 0u; d < HD; d++) {
                    dot += qv[d] * ks[jj * HD + d];
                }
                s[jj] = select(NEG, dot * p.scale, j0 + jj <= my_pos);
                m_new = max(m_new, s[jj]);
            }
            let corr = exp(m - m_new);
            l *= corr;
            for (var d = 0u; d < HD; d++) {
                acc[d] *= corr;
            }
            for (var jj = 0u; jj < BK; jj++) {
                if (j0 + jj <= my_pos) {
                    let e = exp(s[jj] - m_new);
                    l += e;
                    for (var d = 0u; d < HD; d++) {
                        acc[d] += e * vs[jj * HD + d];
                    }
                }
            }
            m = m_new;
        }
        workgroupBarrier();
    }
    if (valid) {
        let ob = (t * p.n_heads + h) * HD;
        for (var d = 0u; d < HD; d++) {
            y[ob + d] = act(acc[d] / l);
        }
    }
}
