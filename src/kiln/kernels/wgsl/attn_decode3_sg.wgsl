// attn_decode3's entry point with subgroups. The butterfly pairs thread lid with lid ^ o (o < LPK), so it needs each
// subgroup to be LPK or more whole, linearly laid out invocations: lanes lid - lid % sz .. + sz - 1 with
// subgroup_invocation_id = lid % sz (true of GPU warps and waves in practice, not promised by WebGPU). Where some
// subgroup is not, the workgroup sums rows through workgroup memory (attend's sg_ok).

@compute @workgroup_size(WG)
fn main(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(subgroup_invocation_id) sl: u32,
    @builtin(subgroup_size) sz: u32,
) {
    let first = subgroupBroadcastFirst(lid / sz);
    let ok = sz >= LPK && lid % sz == sl && first == lid / sz && subgroupAdd(1u) == sz;
    attend(lid, wid, ok);
}

// Sum of x over the LPK lanes of this thread's row: every lane gets the total.
fn row_sum_sg(x: ptr<function, array<vec4<f32>, P4>>) {
    for (var o = LPK / 2u; o > 0u; o >>= 1u) {
        for (var i = 0u; i < P4; i++) {
            (*x)[i] += subgroupShuffleXor((*x)[i], o);
        }
    }
}
