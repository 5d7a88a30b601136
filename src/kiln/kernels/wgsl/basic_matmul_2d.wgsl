// Conformance basic case: C[M, N] = A[M, K] @ B[K, N] (row-major f32) on a 2-D grid of TILE x TILE
// workgroups, staging tiles in workgroup memory; M, N, K need not be multiples of TILE.
override TILE: u32 = 16u;

struct Params { m: u32, n: u32, k: u32 }

@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> c: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

var<workgroup> ta: array<f32, TILE * TILE>;
var<workgroup> tb: array<f32, TILE * TILE>;

@compute @workgroup_size(TILE, TILE)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let col = gid.x;
    let row = gid.y;
    var acc = 0.0;
    for (var k0 = 0u; k0 < p.k; k0 = k0 + TILE) {
        let ka = k0 + lid.x;
        let kb = k0 + lid.y;
        ta[lid.y * TILE + lid.x] = select(0.0, a[min(row, p.m - 1u) * p.k + min(ka, p.k - 1u)], row < p.m && ka < p.k);
        tb[lid.y * TILE + lid.x] = select(0.0, b[min(kb, p.k - 1u) * p.n + min(col, p.n - 1u)], kb < p.k && col < p.n);
        workgroupBarrier();
        for (var t = 0u; t < TILE; t = t + 1u) {
            acc = acc + ta[lid.y * TILE + t] * tb[t * TILE + lid.x];
        }
        workgroupBarrier();
    }
    if (row < p.m && col < p.n) {
        c[row * p.n + col] = acc;
    }
}
