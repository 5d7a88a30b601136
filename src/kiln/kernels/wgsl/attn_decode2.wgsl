// Decode attention in one dispatch (KILN_WGPU_ATTN_KERNEL=v2): workgroup (split s, KV head, token t) serves the GQ
// query heads that share the KV head over keys [s * chunk, (s + 1) * chunk), chunk = ceil(n_kv / NS) rounded up to
// TILE, so a short context uses split 0 alone (it writes the output itself) and a long one spreads over all NS.
// Splits that hold keys write a partial (unnormalised acc, max, sum); the last of them to finish (atomic ticket)
// merges them, so no combine dispatch. n_kv comes from pos on the device: the dispatch does not depend on it.
//
// Per tile of TILE keys: (1) K and V rows are copied to workgroup memory with coalesced vec4 loads (consecutive
// threads read consecutive vec4s of contiguous rows), all issued at once; (2) one thread per (key, head slot)
// scores its key for GQ / HS heads from that copy (K rows padded by a vec4: conflict-free banks); (3) one thread
// per head updates the online softmax over the tile; (4) each thread accumulates p * V for its (head, vec4 column)
// entries over 1 / KG of the keys. Four barriers per tile, constant trip counts throughout.
// Partials and tickets are atomics (device-coherent, no stale cache lines across workgroups); storageBarrier() orders
// them around the ticket (a device-scope acquire/release barrier in Naga's SPIR-V/MSL/HLSL output).
// Header: HD, NV = HD / 4, GQ, TILE (divides WG), WG, NS (splits = grid x), HS = WG / TILE, SPT = ceil(GQ / HS),
// E = GQ * NV (output vec4s per workgroup), PE = ceil(E / WG), KG = max(1, WG / E), LT = ceil(TILE * NV / WG).

// Inputs and NEG: attn_decode_inputs.wgsl; outputs and is_last: attn_last_split.wgsl (shared with attn_decode3).

const KS: u32 = NV + 1u;   // padded K row (vec4s)
const PS: u32 = TILE + 1u; // padded score row

var<workgroup> qs: array<vec4<f32>, E>;
var<workgroup> ks: array<vec4<kv>, TILE * KS>;
var<workgroup> vs: array<vec4<kv>, TILE * NV>;
var<workgroup> ps: array<f32, GQ * PS>;
var<workgroup> m_s: array<f32, GQ>;
var<workgroup> l_s: array<f32, GQ>;
var<workgroup> c_s: array<f32, GQ>;
var<workgroup> red: array<vec4<f32>, WG>;
var<workgroup> w_m: array<f32, NS * GQ>;
var<workgroup> w_l: array<f32, NS * GQ>;
var<workgroup> n_keys: u32;

// K and V rows j0.. of the tile into workgroup memory; rows past `hi` repeat row hi - 1 (finite, weighted 0).
fn load_tile(lid: u32, base: u32, sr: u32, j0: u32, hi: u32) {
    for (var i = 0u; i < LT; i++) {
        let e = lid + i * WG;
        if (e < TILE * NV) {
            let j = e / NV;
            let c = e % NV;
            let src = base + kv_row(sr, min(j0 + j, hi - 1u)) * NV + c;
            ks[j * KS + c] = k_cache[src];
            vs[e] = v_cache[src];
        }
    }
}

// Scores of key lid % TILE for heads lid / TILE + u * HS; keys at or past `hi` get NEG.
fn score_tile(lid: u32, j0: u32, hi: u32) {
    let j = lid % TILE;
    let g0 = lid / TILE;
    var s = array<f32, SPT>();
    for (var c = 0u; c < NV; c++) {
        let k4 = vec4<f32>(ks[j * KS + c]);
        for (var u = 0u; u < SPT; u++) {
            s[u] += dot(qs[min(g0 + u * HS, GQ - 1u) * NV + c], k4);
        }
    }
    for (var u = 0u; u < SPT; u++) {
        let g = g0 + u * HS;
        if (g < GQ) {
            ps[g * PS + j] = select(NEG, s[u], j0 + j < hi);
        }
    }
}

// Online softmax of head `lid` over the tile: scores become weights e^(s - m), c_s the factor for older sums.
fn softmax_tile(lid: u32) {
    if (lid < GQ) {
        let row = lid * PS;
        var mx = NEG;
        for (var j = 0u; j < TILE; j++) {
            mx = max(mx, ps[row + j]);
        }
        let m_new = max(m_s[lid], mx);
        var sum = 0.0;
        for (var j = 0u; j < TILE; j++) {
            let e = exp(ps[row + j] - m_new);
            ps[row + j] = e;
            sum += e;
        }
        let corr = exp(m_s[lid] - m_new);
        l_s[lid] = l_s[lid] * corr + sum;
        m_s[lid] = m_new;
        c_s[lid] = corr;
    }
}

// acc[k] (entry lid % E + k * WG: head e / NV, vec4 column e % NV) += sum over this thread's keys of p * V.
fn accumulate_tile(lid: u32, acc: ptr<function, array<vec4<f32>, PE>>) {
    let kg = lid / E;
    if (kg >= KG) {
        return;
    }
    for (var k = 0u; k < PE; k++) {
        let e = min(lid % E + k * WG, E - 1u);  // entries past E (only when PE > 1) are computed and never stored
        let g = e / NV;
        let c = e % NV;
        var a = (*acc)[k] * c_s[g];
        for (var jj = 0u; jj < (TILE + KG - 1u) / KG; jj++) {
            let j = min(kg + jj * KG, TILE - 1u);
            a += select(0.0, ps[g * PS + j], kg + jj * KG < TILE) * vec4<f32>(vs[j * NV + c]);
        }
        (*acc)[k] = a;
    }
}

// Index of a split's (max, sum) pair for head g, after all splits' accumulators.
fn ml_index(tk: u32, s: u32, g: u32) -> u32 {
    return p.T * p.n_kv_heads * NS * E * 4u + ((tk * NS + s) * GQ + g) * 2u;
}

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let split = wid.x;
    let kvh = wid.y;
    let t = p.t0 + wid.z;
    let tk = t * p.n_kv_heads + kvh;
    if (lid == 0u) {
        n_keys = min(u32(pos[t]) + 1u, p.n_ctx);
    }
    let q_base = (t * p.n_heads + kvh * GQ) * HD;  // the GQ heads of this KV head are consecutive
    for (var e = lid; e < E; e += WG) {
        let i = q_base + 4u * e;
        qs[e] = vec4<f32>(f32(q[i]), f32(q[i + 1u]), f32(q[i + 2u]), f32(q[i + 3u])) * p.scale;
    }
    if (lid < GQ) {
        m_s[lid] = NEG;
        l_s[lid] = 0.0;
    }
    let L = workgroupUniformLoad(&n_keys);  // also publishes qs, m_s, l_s
    let chunk = (L + NS * TILE - 1u) / (NS * TILE) * TILE;
    let n_act = (L + chunk - 1u) / chunk;
    let lo = split * chunk;
    if (lo >= L) {
        return;  // a split past the keys (uniform per workgroup): no partial, no ticket
    }
    let hi = min(lo + chunk, L);
    let base = kvh * p.n_ctx * NV;
    let sr = u32(seq[t]);  // the token's block-table row
    var acc: array<vec4<f32>, PE>;
    for (var j0 = lo; j0 < hi; j0 += TILE) {
        load_tile(lid, base, sr, j0, hi);
        workgroupBarrier();
        score_tile(lid, j0, hi);
        workgroupBarrier();
        softmax_tile(lid);
        workgroupBarrier();
        accumulate_tile(lid, &acc);
        workgroupBarrier();
    }
    if (KG > 1u) {  // sum the key groups' accumulators (E < WG: one entry per thread)
        red[lid] = acc[0];
        workgroupBarrier();
        for (var k = 1u; k < KG; k++) {
            acc[0] += red[k * E + lid % E];
        }
    }
    let own = lid < E || PE > 1u;  // threads holding finished entries
    if (n_act == 1u) {  // the only split: normalise and write the output
        for (var k = 0u; k < PE; k++) {
            let e = lid + k * WG;
            if (own && e < E) {
                write_out(q_base + 4u * e, acc[k] / l_s[e / NV]);
            }
        }
        return;
    }
    for (var k = 0u; k < PE; k++) {
        let e = lid + k * WG;
        if (own && e < E) {
            let o = ((tk * NS + split) * E + e) * 4u;
            for (var i = 0u; i < 4u; i++) {
                atomicStore(&part[o + i], bitcast<u32>(acc[k][i]));
            }
        }
    }
    if (lid < GQ) {
        let o = ml_index(tk, split, lid);
        atomicStore(&part[o], bitcast<u32>(m_s[lid]));
        atomicStore(&part[o + 1u], bitcast<u32>(l_s[lid]));
    }
    merge_if_last(lid, tk, n_act, q_base);
}

fn write_out(o: u32, v: vec4<f32>) {
    for (var i = 0u; i < 4u; i++) {
        y[o + i] = act(v[i]);
    }
}

// The last split merges the `n_act` partials: out = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M).
fn merge(lid: u32, tk: u32, n_act: u32, q_base: u32) {
    for (var i = lid; i < NS * GQ; i += WG) {
        let s = i / GQ;
        let o = ml_index(tk, s, i % GQ);
        w_m[i] = select(NEG, bitcast<f32>(atomicLoad(&part[o])), s < n_act);
        w_l[i] = select(0.0, bitcast<f32>(atomicLoad(&part[o + 1u])), s < n_act);
    }
    workgroupBarrier();
    if (lid < GQ) {
        var M = NEG;
        for (var s = 0u; s < NS; s++) {
            M = max(M, w_m[s * GQ + lid]);
        }
        var den = 0.0;
        for (var s = 0u; s < NS; s++) {
            let w = exp(w_m[s * GQ + lid] - M);
            w_m[s * GQ + lid] = w;
            den += w_l[s * GQ + lid] * w;
        }
        for (var s = 0u; s < NS; s++) {
            w_m[s * GQ + lid] /= den;
        }
    }
    workgroupBarrier();
    for (var e = lid; e < E; e += WG) {
        let g = e / NV;
        var out = vec4<f32>();
        // Four splits per step (constant inner count: their loads go out together); past `n_act` the last split
        // is read again with weight 0.
        for (var s0 = 0u; s0 < n_act; s0 += 4u) {
            for (var u = 0u; u < 4u; u++) {
                let s = min(s0 + u, n_act - 1u);
                let o = ((tk * NS + s) * E + e) * 4u;
                let v = vec4<f32>(
                    bitcast<f32>(atomicLoad(&part[o])),
                    bitcast<f32>(atomicLoad(&part[o + 1u])),
                    bitcast<f32>(atomicLoad(&part[o + 2u])),
                    bitcast<f32>(atomicLoad(&part[o + 3u])),
                );
                out += select(0.0, w_m[s * GQ + g], s0 + u < n_act) * v;
            }
        }
        write_out(q_base + 4u * e, out);
    }
    if (lid == 0u) {
        atomicStore(&ticket[tk], 0u);  // ready for the next dispatch
    }
}
