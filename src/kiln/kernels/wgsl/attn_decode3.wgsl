// Decode attention in one dispatch, barrier-free key loop (KILN_WGPU_ATTN_KERNEL=v3). Workgroup (split s, KV head,
// token t) serves the GQ query heads sharing the KV head. Its WG threads form R = WG / LPK rows of LPK lanes; row r
// owns keys r * U .. r * U + U - 1 of each tile of TILE = R * U keys, lane c the vec4 columns c, c + LPK, ... (NC of
// them) of those keys and of each head's q and output. Tiles are dealt to the splits round-robin (tile i to split
// i % NS), so n_act = min(NS, tiles) splits hold keys and a context of one tile uses split 0 alone.
//
// Per tile, with no barrier: each thread loads its U keys' K and V columns straight into registers (a row's lanes
// read consecutive vec4s of one cache row: coalesced), takes its part of the U x GQ dot products, and the row sums
// them with a shuffle-xor butterfly (log2 LPK steps; every lane gets the scores). Each row then keeps its own online
// softmax (max, sum and p * V accumulators per head, identical in all its lanes): rows are merged once per split,
// not per tile. Without usable subgroups (no feature, a subgroup narrower than LPK, or invocations not laid out
// linearly over subgroups) the row sums go through workgroup memory instead, one barrier per FB vec4s of scores.
//
// End of a split: rows publish (max, sum) and accumulators to workgroup memory (one barrier; NP passes of HB heads
// when it does not fit at once), each output vec4 is merged over the rows. The only split normalises and writes the
// output; otherwise the splits write partials (atomics: device-coherent) and the last to take a ticket merges them,
// each thread over every KG-th split, its loads issued MB splits at a time.
// Header: HD, NV = HD / 4, GQ, WG, LPK (lanes per key, a power of two <= WG), NC = ceil(NV / LPK), R = WG / LPK,
// U (keys per row per tile), TILE = R * U, NS, P4 = ceil(U * GQ / 4), FB (fallback vec4s per barrier), HB (heads
// per merge pass), NP = ceil(GQ / HB), EB = HB * NV, PEB = ceil(EB / WG), E = GQ * NV, PE = ceil(E / WG),
// EW = min(E, WG), KG = max(1, WG / E) (merge thread groups), NW (workgroup vec4s).
// The entry point (attn_decode3_sg.wgsl or attn_decode3_wg.wgsl) calls attend() and supplies row_sum_sg().

// Inputs and NEG: attn_decode_inputs.wgsl; outputs and is_last: attn_last_split.wgsl (shared with attn_decode2).

const MB: u32 = 4u;        // splits per batch of merge loads

var<workgroup> wsh: array<vec4<f32>, NW>;  // fallback row sums; then the row merge; then the split merge
var<workgroup> rm: array<f32, R * GQ>;     // each row's max and sum per head
var<workgroup> rl: array<f32, R * GQ>;
var<workgroup> sg_bad: atomic<u32>;
var<workgroup> info: u32;                  // key count | (subgroups unusable) << 31

// Sum of x over the LPK lanes of row `row` through workgroup memory (all threads call it; FB vec4s per barrier).
// Two buffers alternate (*par): a buffer is rewritten only after the next call's barrier, when all have read it.
fn row_sum_wg(lid: u32, row: u32, x: ptr<function, array<vec4<f32>, P4>>, par: ptr<function, u32>) {
    for (var i0 = 0u; i0 < P4; i0 += FB) {
        let buf = *par * FB * WG;
        for (var f = 0u; f < FB; f++) {
            wsh[buf + f * WG + lid] = (*x)[min(i0 + f, P4 - 1u)];
        }
        workgroupBarrier();
        for (var f = 0u; f < FB; f++) {
            var s = vec4<f32>();
            for (var l = 0u; l < LPK; l++) {
                s += wsh[buf + f * WG + row * LPK + l];
            }
            if (i0 + f < P4) {
                (*x)[i0 + f] = s;
            }
        }
        *par ^= 1u;
    }
}

fn score(x: ptr<function, array<vec4<f32>, P4>>, i: u32) -> f32 {
    return (*x)[i / 4u][i % 4u];
}

fn write_out(o: u32, v: vec4<f32>) {
    for (var i = 0u; i < 4u; i++) {
        y[o + i] = act(v[i]);
    }
}

// Index of a split's (max, sum) pair for head g, after all splits' accumulators.
fn ml_index(tk: u32, s: u32, g: u32) -> u32 {
    return p.T * p.n_kv_heads * NS * E * 4u + ((tk * NS + s) * GQ + g) * 2u;
}

// sg_ok: this invocation's subgroup can run the butterfly (see the entry point); false without subgroups.
fn attend(lid: u32, wid: vec3<u32>, sg_ok: bool) {
    let split = wid.x;
    let kvh = wid.y;
    let t = p.t0 + wid.z;
    let tk = t * p.n_kv_heads + kvh;
    let lane = lid % LPK;
    let row = lid / LPK;
    var p0 = 0;
    if (lid == 0u) {
        p0 = pos[t];
        atomicStore(&sg_bad, 0u);
    }
    // This thread's q columns for each head (0 past NV), scaled; loaded while the key count is fetched.
    let q_base = (t * p.n_heads + kvh * GQ) * HD;  // the GQ heads of this KV head are consecutive
    var qv: array<vec4<f32>, GQ * NC>;
    for (var g = 0u; g < GQ; g++) {
        for (var cc = 0u; cc < NC; cc++) {
            let col = lane + cc * LPK;
            let i = q_base + g * HD + 4u * min(col, NV - 1u);
            let v = vec4<f32>(f32(q[i]), f32(q[i + 1u]), f32(q[i + 2u]), f32(q[i + 3u])) * p.scale;
            qv[g * NC + cc] = select(vec4<f32>(), v, col < NV);
        }
    }
    workgroupBarrier();  // sg_bad cleared
    if (!sg_ok) {
        atomicOr(&sg_bad, 1u);
    }
    workgroupBarrier();
    if (lid == 0u) {
        info = min(u32(p0) + 1u, p.n_ctx) | (atomicLoad(&sg_bad) << 31u);
    }
    let w = workgroupUniformLoad(&info);
    let L = w & 0x7fffffffu;
    let use_sg = (w >> 31u) == 0u;
    let n_tiles = (L + TILE - 1u) / TILE;
    let n_act = min(NS, n_tiles);
    if (split >= n_act) {
        return;  // a split past the keys (uniform per workgroup): no partial, no ticket
    }
    let base = kvh * p.n_ctx * NV;
    let sr = u32(seq[t]);  // the token's block-table row
    var m: array<f32, GQ>;
    var l: array<f32, GQ>;
    var acc: array<vec4<f32>, GQ * NC>;
    for (var g = 0u; g < GQ; g++) {
        m[g] = NEG;
    }
    var par = 0u;
    for (var tile = split; tile < n_tiles; tile += NS) {
        let j0 = tile * TILE + row * U;  // this row's first key
        // K and V columns of the row's U keys; keys past L read row L - 1 (finite, weighted 0).
        var kr: array<vec4<kv>, U * NC>;
        var vr: array<vec4<kv>, U * NC>;
        for (var u = 0u; u < U; u++) {
            let src = base + kv_row(sr, min(j0 + u, L - 1u)) * NV;
            for (var cc = 0u; cc < NC; cc++) {
                let c = src + min(lane + cc * LPK, NV - 1u);
                kr[u * NC + cc] = k_cache[c];
                vr[u * NC + cc] = v_cache[c];
            }
        }
        // This lane's part of score (u, g) in component (u * GQ + g) % 4 of sc[(u * GQ + g) / 4].
        var sc: array<vec4<f32>, P4>;
        for (var u = 0u; u < U; u++) {
            for (var g = 0u; g < GQ; g++) {
                var d = 0.0;
                for (var cc = 0u; cc < NC; cc++) {
                    d += dot(qv[g * NC + cc], vec4<f32>(kr[u * NC + cc]));
                }
                let i = u * GQ + g;
                sc[i / 4u][i % 4u] = d;
            }
        }
        if (use_sg) {
            row_sum_sg(&sc);
        } else {
            row_sum_wg(lid, row, &sc, &par);
        }
        // Online softmax of this row: what came before is rescaled by e^(m_old - m_new).
        for (var g = 0u; g < GQ; g++) {
            var mx = NEG;
            for (var u = 0u; u < U; u++) {
                mx = max(mx, select(NEG, score(&sc, u * GQ + g), j0 + u < L));
            }
            let m_new = max(m[g], mx);
            let corr = exp(m[g] - m_new);
            var sum = 0.0;
            for (var cc = 0u; cc < NC; cc++) {
                acc[g * NC + cc] *= corr;
            }
            for (var u = 0u; u < U; u++) {
                let pr = select(0.0, exp(score(&sc, u * GQ + g) - m_new), j0 + u < L);
                sum += pr;
                for (var cc = 0u; cc < NC; cc++) {
                    acc[g * NC + cc] += pr * vec4<f32>(vr[u * NC + cc]);
                }
            }
            l[g] = l[g] * corr + sum;
            m[g] = m_new;
        }
    }
    // Merge the rows: output vec4 e (head e / NV, column e % NV) = sum_r e^(m_r - M) acc_r / sum_r e^(m_r - M) l_r.
    // Rows without keys have m = NEG, l = 0, acc = 0.
    if (!use_sg) {
        workgroupBarrier();  // the row sums' buffers become the merge's
    }
    if (lane == 0u) {
        for (var g = 0u; g < GQ; g++) {
            rm[row * GQ + g] = m[g];
            rl[row * GQ + g] = l[g];
        }
    }
    for (var b = 0u; b < NP; b++) {
        for (var gg = 0u; gg < HB; gg++) {
            let g = b * HB + gg;
            for (var cc = 0u; cc < NC; cc++) {
                let col = lane + cc * LPK;
                if (g < GQ && col < NV) {
                    wsh[row * EB + gg * NV + col] = acc[g * NC + cc];
                }
            }
        }
        workgroupBarrier();
        for (var k = 0u; k < PEB; k++) {
            let i = lid + k * WG;
            let e = b * EB + i;
            if (i < EB && e < E) {
                let g = e / NV;
                var M = NEG;
                for (var r = 0u; r < R; r++) {
                    M = max(M, rm[r * GQ + g]);
                }
                var den = 0.0;
                var o = vec4<f32>();
                for (var r = 0u; r < R; r++) {
                    let wr = exp(rm[r * GQ + g] - M);
                    den += rl[r * GQ + g] * wr;
                    o += wr * wsh[r * EB + i];
                }
                if (n_act == 1u) {
                    write_out(q_base + 4u * e, o / den);
                } else {
                    let oi = ((tk * NS + split) * E + e) * 4u;
                    for (var c = 0u; c < 4u; c++) {
                        atomicStore(&part[oi + c], bitcast<u32>(o[c]));
                    }
                    if (e % NV == 0u) {
                        let mi = ml_index(tk, split, g);
                        atomicStore(&part[mi], bitcast<u32>(M));
                        atomicStore(&part[mi + 1u], bitcast<u32>(den));
                    }
                }
            }
        }
        if (NP > 1u) {
            workgroupBarrier();  // the next pass rewrites wsh
        }
    }
    if (n_act == 1u) {
        return;
    }
    merge_if_last(lid, tk, n_act, q_base);
}

// The last split merges the n_act partials: out = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M). Thread group
// kg = lid / EW takes splits kg, kg + KG, ... (online, MB splits' loads at a time); the KG groups combine through
// workgroup memory.
fn merge(lid: u32, tk: u32, n_act: u32, q_base: u32) {
    let kg = lid / EW;
    for (var k = 0u; k < PE; k++) {
        let e = min(lid % EW + k * WG, E - 1u);  // entries past E (only when PE > 1) are computed, never stored
        let g = e / NV;
        var M = NEG;
        var den = 0.0;
        var o = vec4<f32>();
        if (kg < KG) {
            for (var s0 = kg; s0 < n_act; s0 += KG * MB) {
                var ms: array<f32, MB>;
                var ls: array<f32, MB>;
                var av: array<vec4<f32>, MB>;
                for (var u = 0u; u < MB; u++) {
                    let s = min(s0 + u * KG, n_act - 1u);
                    let mi = ml_index(tk, s, g);
                    ms[u] = bitcast<f32>(atomicLoad(&part[mi]));
                    ls[u] = bitcast<f32>(atomicLoad(&part[mi + 1u]));
                    let oi = ((tk * NS + s) * E + e) * 4u;
                    av[u] = vec4<f32>(
                        bitcast<f32>(atomicLoad(&part[oi])),
                        bitcast<f32>(atomicLoad(&part[oi + 1u])),
                        bitcast<f32>(atomicLoad(&part[oi + 2u])),
                        bitcast<f32>(atomicLoad(&part[oi + 3u])),
                    );
                }
                for (var u = 0u; u < MB; u++) {
                    let ok = s0 + u * KG < n_act;
                    let mu = select(NEG, ms[u], ok);
                    let M2 = max(M, mu);
                    let c = exp(M - M2);
                    let wu = select(0.0, exp(mu - M2), ok);
                    den = den * c + ls[u] * wu;
                    o = o * c + av[u] * wu;
                    M = M2;
                }
            }
        }
        if (KG > 1u) {  // E < WG: PE == 1, entry e's KG groups are threads e, e + E, ...
            wsh[lid] = o;
            wsh[WG + lid] = vec4<f32>(M, den, 0.0, 0.0);
            workgroupBarrier();
            if (lid < E) {
                var Mt = NEG;
                for (var j = 0u; j < KG; j++) {
                    Mt = max(Mt, wsh[WG + j * E + lid].x);
                }
                den = 0.0;
                o = vec4<f32>();
                for (var j = 0u; j < KG; j++) {
                    let wj = exp(wsh[WG + j * E + lid].x - Mt);
                    den += wsh[WG + j * E + lid].y * wj;
                    o += wsh[j * E + lid] * wj;
                }
            }
        }
        if (lid < EW && lid % EW + k * WG < E) {
            write_out(q_base + 4u * e, o / den);
        }
    }
    if (lid == 0u) {
        atomicStore(&ticket[tk], 0u);  // ready for the next dispatch
    }
}
