// Uniform parameters shared by the attention kernels (attn_decode, attn_combine, attn_prefill).

struct Params {
    T: u32,
    n_heads: u32,
    n_kv_heads: u32,
    n_ctx: u32,
    n_splits: u32,
    scale: f32,
}
