// GEMV row reduction with subgroups (NR rows: RPW, plus a fused norm's sum of squares): when one subgroup spans
// the whole workgroup (a CPU adapter's 8 lanes, a GPU warp of 32), one subgroupAdd per row and no barrier tree;
// otherwise the workgroup-memory tree. Leaves row r's total in partial[r * TPR]. No assumption about how
// invocations map to subgroup lanes.
var<workgroup> sg_width: u32;

fn reduce_rows(lid: u32, acc: array<f32, NR>) {
    let width = subgroupAdd(1u);  // active lanes of this invocation's subgroup
    if (lid == 0u) {
        sg_width = width;
    }
    if (workgroupUniformLoad(&sg_width) >= TPR) {
        for (var r = 0u; r < NR; r++) {
            let total = subgroupAdd(acc[r]);
            if (lid == 0u) {
                partial[r * TPR] = total;
            }
        }
        workgroupBarrier();
        return;
    }
    reduce_tree(lid, acc);
}
