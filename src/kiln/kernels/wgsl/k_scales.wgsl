// Shared by Q4_K and Q5_K (appended after the format's snippet): the packed 6-bit scales and mins of a super-block
// header vector (d | dmin << 16, then 12 bytes).

// Sub-block j's (d * scale, dmin * min). Scales/mins j < 4: low 6 bits of bytes j / j + 4; j >= 4: low/high
// nibble of byte j + 4 plus the top 2 bits of bytes j - 4 / j.
fn k_scale_min(hdr: vec4<u32>, j: u32) -> vec2<f32> {
    let lo = vec2<u32>(byte_of(hdr.y, j) & 63u, byte_of(hdr.z, j) & 63u);
    let mix = byte_of(hdr.w, j);
    let hi = vec2<u32>((mix & 15u) | ((byte_of(hdr.y, j) >> 6u) << 4u), (mix >> 4u) | ((byte_of(hdr.z, j) >> 6u) << 4u));
    return unpack2x16float(hdr.x) * vec2<f32>(select(hi, lo, j < 4u));
}
