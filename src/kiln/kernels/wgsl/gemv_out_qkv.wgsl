// GEMV epilogue, attention input (Q, K, V matmuls + RoPE + KV-cache write), one token. Segments q, k, v; logical
// rows 2i, 2i + 1 are the two weight rows that RoPE pair i rotates (NeoX: j and j + hd/2 of a head, else 2j and
// 2j + 1), so one thread finishes a pair: adds the biases, rotates q and k exactly as rope.wgsl does, writes
// q, k, v and stores k, v at cache row slot[0] (caches [n_kv_heads, n_ctx, hd] of type kv).
@group(0) @binding(2) var<storage, read_write> yq: array<f32>;
@group(0) @binding(3) var<storage, read> bq: array<f32>;
@group(0) @binding(5) var<storage, read_write> yk: array<f32>;
@group(0) @binding(6) var<storage, read_write> yv: array<f32>;
@group(0) @binding(7) var<storage, read> bk: array<f32>;
@group(0) @binding(17) var<storage, read> bv: array<f32>;
@group(0) @binding(18) var<storage, read_write> pos: array<i32>;
@group(0) @binding(19) var<storage, read_write> k_cache: array<kv>;
@group(0) @binding(20) var<storage, read_write> v_cache: array<kv>;
@group(0) @binding(21) var<storage, read> turns: array<vec4<f32>>;
@group(0) @binding(22) var<storage, read_write> slot: array<i32>;

// Weight row of logical row l: pair l / 2 is (head, j); its two rows as above.
fn pair_row(l: u32) -> u32 {
    let half = p.hd / 2u;
    let pair = l / 2u;
    let j = pair % half;
    let base = (pair / half) * p.hd;
    return select(base + 2u * j + l % 2u, base + j + (l % 2u) * half, p.neox != 0u);
}

fn wrow(seg: u32, l: u32, n: u32) -> vec2<u32> {
    return vec2<u32>(seg, pair_row(min(l, n - 1u)));
}

fn bias_at(seg: u32, row: u32) -> f32 {
    if ((p.bias & (1u << seg)) == 0u) {
        return 0.0;
    }
    if (seg == 0u) {
        return bq[row];
    }
    if (seg == 1u) {
        return bk[row];
    }
    return bv[row];
}

fn store(lid: u32, t: u32, seg: u32, first: u32, n: u32, scale: f32) {
    let pairs = min(RPW, n - min(first, n)) / 2u;
    let pp = pos[0];  // rotates by the position, writes the cache at the slot
    let ss = u32(slot[0]);
    for (var i = lid; i < pairs; i += TPR) {
        let ra = pair_row(first + 2u * i);
        let rb = pair_row(first + 2u * i + 1u);
        var a = row_sum(2u * i) * scale + bias_at(seg, ra);
        var b = row_sum(2u * i + 1u) * scale + bias_at(seg, rb);
        if (seg < 2u) {
            let fp = f32(pp);
            let f = turns[((first / 2u) + i) % (p.hd / 2u)];
            var r = fract(fp * f.x) + fract(fp * f.y) + fract(fp * f.z) + fp * f.w;
            r = r - round(r);
            let angle = r * 6.283185307179586;
            let ms = turns[p.hd / 2u].x;  // the cos/sin scale (yarn's mscale), after the pairs
            let c = cos(angle) * ms;
            let s = sin(angle) * ms;
            let a2 = a * c - b * s;
            b = a * s + b * c;
            a = a2;
        }
        if (seg == 0u) {
            yq[ra] = a;
            yq[rb] = b;
        } else {
            let dst = ((ra / p.hd) * p.n_ctx + ss) * p.hd;
            let ok = ss < p.n_ctx;
            if (seg == 1u) {
                yk[ra] = a;
                yk[rb] = b;
                if (ok) {
                    k_cache[dst + ra % p.hd] = kv(a);
                    k_cache[dst + rb % p.hd] = kv(b);
                }
            } else {
                yv[ra] = a;
                yv[rb] = b;
                if (ok) {
                    v_cache[dst + ra % p.hd] = kv(a);
                    v_cache[dst + rb % p.hd] = kv(b);
                }
            }
        }
    }
}
