// Shared by attn_decode2 and attn_decode3, after a split has written its partial: the last split of (t, KV head) to
// finish merges all of them (the kernel's own `merge`). Uses the kernel's `ticket` binding and `is_last` variable.
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
