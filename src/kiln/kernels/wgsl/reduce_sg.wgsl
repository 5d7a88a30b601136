// GEMV row reduction with subgroups: each subgroup adds its lanes' values of every row (subgroupAdd) and one of its
// lanes stores the sums at partial[r * TPR + subgroup_id]; row_sum(r) then adds the row's num_subgroups entries.
// One barrier whatever the workgroup size (a tree over TPR threads takes log2(TPR) + 1). No assumption about how
// invocations map to subgroups.
struct Lanes {
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(num_subgroups) n_sg: u32,
}

var<workgroup> n_sums: u32;

fn reduce_rows(l: Lanes, acc: array<f32, NR>) {
    for (var r = 0u; r < NR; r++) {
        let total = subgroupAdd(acc[r]);
        if (subgroupBroadcastFirst(l.lid) == l.lid) {  // one lane per subgroup
            partial[r * TPR + l.sg] = total;
        }
    }
    if (l.lid == 0u) {
        n_sums = l.n_sg;
    }
    workgroupBarrier();
}

fn row_sum(r: u32) -> f32 {
    var s = partial[r * TPR];
    for (var k = 1u; k < n_sums; k++) {
        s += partial[r * TPR + k];
    }
    return s;
}
