// Uniform parameters shared by the attention kernels (attn_decode, attn_combine, attn_prefill). T counts every token
// of the batch (buffers are indexed by the global token); a dispatch covers tokens t0 .. t0 + its grid (decode) or
// the run t0 .. t0 + n_run (prefill). The caches are pools of n_ctx rows; position j of table row r is cache row
// table[r * width + j / block] * block + j % block.

struct Params {
    T: u32,
    n_heads: u32,
    n_kv_heads: u32,
    n_ctx: u32,
    n_splits: u32,
    scale: f32,
    t0: u32,
    n_run: u32,
    block: u32,
    width: u32,
}
