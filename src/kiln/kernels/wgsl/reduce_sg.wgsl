// GEMV row reduction with subgroups (NR rows: RPW, plus a fused norm's sum of squares): when one subgroup spans
// the whole workgroup (a CPU adapter's 8 lanes, a GPU warp of 32), one subgroupAdd per row and no barrier tree;
// otherwise each subgroup's sum goes to workgroup memory and every subgroup adds those up (three barriers instead
// of a tree's log2(TPR) + 1). Leaves row r's total in partial[r * TPR]. No assumption about how invocations map to
// subgroup lanes: a lane's index is its rank among the active lanes.
var<workgroup> sg_width: u32;

fn reduce_rows(lid: u32, acc: array<f32, NR>) {
    let width = subgroupAdd(1u);  // active lanes of this invocation's subgroup
    let lane = subgroupExclusiveAdd(1u);
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
    for (var r = 0u; r < NR; r++) {  // each subgroup's sum in its first lane's slot, zeros in the others
        let total = subgroupAdd(acc[r]);
        partial[r * TPR + lid] = select(0.0, total, lane == 0u);
    }
    workgroupBarrier();
    var totals: array<f32, NR>;
    for (var r = 0u; r < NR; r++) {
        var s = 0.0;
        for (var j = lane; j < TPR; j += width) {
            s += partial[r * TPR + j];
        }
        totals[r] = subgroupAdd(s);
    }
    workgroupBarrier();  // every slot read before thread 0 overwrites the first
    if (lid == 0u) {
        for (var r = 0u; r < NR; r++) {
            partial[r * TPR] = totals[r];
        }
    }
    workgroupBarrier();
}
