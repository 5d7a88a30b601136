// Rotary embedding in place, one thread per rotated pair. The angle pos * inv_freq is computed in turns
// from a host table that splits inv_freq / 2pi into four f32 pieces (the first three with 6 significant
// bits, so pos * piece is exact): the fractional turn stays accurate to ~1e-7 at any context length,
// where a plain f32 product would be off by ~1e-3 rad at position 10^4. Row head_dim / 2 of the table holds
// the cos/sin scale (yarn's mscale; 1 otherwise) in x.

struct Params {
    T: u32,
    n_heads: u32,
    head_dim: u32,
    neox: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<act>;
@group(0) @binding(2) var<storage, read_write> pos: array<i32>;
@group(0) @binding(3) var<storage, read> turns: array<vec4<f32>>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let half = p.head_dim / 2u;
    let g = gid.x + gid.y * nwg.x * 64u;
    if (g >= p.T * p.n_heads * half) {
        return;
    }
    let i = g % half;
    let th = g / half;            // t * n_heads + head
    let t = th / p.n_heads;
    let pp = f32(pos[t]);
    let f = turns[i];
    var r = fract(pp * f.x) + fract(pp * f.y) + fract(pp * f.z) + pp * f.w;
    r = r - round(r);
    let angle = r * 6.283185307179586;
    let ms = turns[half].x;
    let c = cos(angle) * ms;
    let s = sin(angle) * ms;
    let base = th * p.head_dim;
    var ia = base + 2u * i;
    var ib = ia + 1u;
    if (p.neox != 0u) {
        ia = base + i;
        ib = ia + half;
    }
    let a = f32(x[ia]);
    let b = f32(x[ib]);
    x[ia] = act(a * c - b * s);
    x[ib] = act(a * s + b * c);
}
