// Index of the largest of n values of row r (workgroup r) into result[r] (the first one on ties, as numpy), in one workgroup of WG threads (header: up
// to 1024). Each thread scans its values four at a time (four loads in flight, compared in index order).

struct Params {
    n: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<act>;
@group(0) @binding(2) var<storage, read_write> result: array<u32>;

var<workgroup> best_v: array<f32, WG>;
var<workgroup> best_i: array<u32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let x0 = wid.x * p.n;
    var bv = -3.4028235e38;
    var bi = 0xffffffffu;
    var i = lid;
    for (; i + 3u * WG < p.n; i += 4u * WG) {
        let v = array<f32, 4>(f32(x[x0 + i]), f32(x[x0 + i + WG]), f32(x[x0 + i + 2u * WG]), f32(x[x0 + i + 3u * WG]));
        for (var j = 0u; j < 4u; j++) {
            if (v[j] > bv || bi == 0xffffffffu) {
                bv = v[j];
                bi = i + j * WG;
            }
        }
    }
    for (; i < p.n; i += WG) {
        let v = f32(x[x0 + i]);
        if (v > bv || bi == 0xffffffffu) {
            bv = v;
            bi = i;
        }
    }
    best_v[lid] = bv;
    best_i[lid] = bi;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            let ov = best_v[lid + s];
            let oi = best_i[lid + s];
            if (oi != 0xffffffffu && (ov > best_v[lid] || (ov == best_v[lid] && oi < best_i[lid]) || best_i[lid] == 0xffffffffu)) {
                best_v[lid] = ov;
                best_i[lid] = oi;
            }
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        result[wid.x] = best_i[0];
    }
}
