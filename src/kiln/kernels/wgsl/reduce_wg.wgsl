// GEMV row reduction without subgroups: the workgroup-memory tree (reduce_tree.wgsl).
fn reduce_rows(lid: u32, acc: array<f32, NR>) {
    reduce_tree(lid, acc);
}
