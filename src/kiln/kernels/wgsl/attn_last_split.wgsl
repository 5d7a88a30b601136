// Shared by the one-dispatch decode attention kernels, attn_decode2 and attn_decode3: their output bindings (the
// inputs: attn_decode_inputs.wgsl), and the end of a split. After a split has written its partial, the last split of
// (t, KV head) to finish merges all of them (the kernel's own `merge`).
@group(0) @binding(5) var<storage, read_write> y: array<act>;
@group(0) @binding(6) var<storage, read_write> part: array<atomic<u32>>;   // f32 bits: acc, then (max, sum) pairs
@group(0) @binding(7) var<storage, read_write> ticket: array<atomic<u32>>; // per (t, KV head); left at 0

var<workgroup> is_last: u32;

fn merge_if_last(lid: u32, tk: u32, n_act: u32, q_base: u32) {
    storageBarrier();  // release: this workgroup's partial before its ticket
    if (lid == 0u) {
        is_last = u32(atomicAdd(&ticket[tk], 1u) == n_act - 1u);
    }
    if (workgroupUniformLoad(&is_last) == 0u) {
        return;
    }
    storageBarrier();  // acquire: the other splits' partials after their tickets
    merge(lid, tk, n_act, q_base);
}
