// What the decode attention kernels (attn_decode, attn_decode2, attn_decode3) read: the query rows, the KV caches as
// vec4s, the positions, each token's table row and the block tables; and NEG, their finite "minus infinity".
const NEG: f32 = -1.0e30;  // exp(NEG - m) is 0 without inf - inf = NaN

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> q: array<act>;
@group(0) @binding(2) var<storage, read_write> k_cache: array<vec4<kv>>;
@group(0) @binding(3) var<storage, read_write> v_cache: array<vec4<kv>>;
@group(0) @binding(4) var<storage, read_write> pos: array<i32>;
@group(0) @binding(8) var<storage, read_write> seq: array<i32>;
@group(0) @binding(9) var<storage, read_write> table: array<i32>;

// The cache row of position j of table row r (attn_params.wgsl).
fn kv_row(r: u32, j: u32) -> u32 {
    return u32(table[r * p.width + j / p.block]) * p.block + j % p.block;
}
