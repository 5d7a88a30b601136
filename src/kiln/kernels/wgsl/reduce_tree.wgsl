// GEMV row reduction through workgroup memory: leaves row r's total in partial[r * TPR], visible to all threads.
// Used directly without subgroups, and by reduce_sg.wgsl when a subgroup is narrower than the workgroup.
fn reduce_tree(lid: u32, acc: array<f32, NR>) {
    for (var r = 0u; r < NR; r++) {
        partial[r * TPR + lid] = acc[r];
    }
    workgroupBarrier();
    for (var s = TPR / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            for (var r = 0u; r < NR; r++) {
                partial[r * TPR + lid] += partial[r * TPR + lid + s];
            }
        }
        workgroupBarrier();
    }
}
