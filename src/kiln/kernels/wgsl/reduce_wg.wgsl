// GEMV row reduction without subgroups: the workgroup-memory tree (reduce_tree.wgsl).
struct Lanes {
    @builtin(local_invocation_index) lid: u32,
}

fn reduce_rows(l: Lanes, acc: array<f32, NR>) {
    reduce_tree(l.lid, acc);
}

fn row_sum(r: u32) -> f32 {
    return partial[r * TPR];
}
