// attn_decode3's entry point without subgroups: rows are summed through workgroup memory.

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    attend(lid, wid, false);
}

fn row_sum_sg(x: ptr<function, array<vec4<f32>, P4>>) {}  // never called (attend: use_sg is false)
