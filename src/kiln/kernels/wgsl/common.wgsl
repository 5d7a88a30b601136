// Helpers prepended to every kiln kernel (after the generated alias/const header).

// Dispatches larger than 65535 workgroups use a 2-D grid; kernels see one linear workgroup index.
fn linear_group(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

// One f16 of a word holding two (little-endian: element 0 in the low half).
fn half_at(w: u32, odd: u32) -> f32 {
    let v = unpack2x16float(w);
    return select(v.x, v.y, odd == 1u);
}

// Four bit fields (one per byte, starting at bit `shift` of each byte, `mask` wide), as integers and as floats.
fn fields4(w: u32, shift: u32, mask: u32) -> vec4<u32> {
    return (vec4<u32>(w) >> (vec4<u32>(0u, 8u, 16u, 24u) + shift)) & vec4<u32>(mask);
}

fn field4(w: u32, shift: u32, mask: u32) -> vec4<f32> {
    return vec4<f32>(fields4(w, shift, mask));
}

// Bits first..first+3 of w as integers 0/1.
fn bits4(w: u32, first: u32) -> vec4<u32> {
    return (vec4<u32>(w) >> (vec4<u32>(0u, 1u, 2u, 3u) + first)) & vec4<u32>(1u);
}

// 4-bit fields lo with their high bits hi above them (Q5 and Q6 formats) as floats: joined as integers, so one
// conversion and no multiply-add per value.
fn join4(lo: vec4<u32>, hi: vec4<u32>) -> vec4<f32> {
    return vec4<f32>(lo | (hi << vec4<u32>(4u)));
}

// Four signed bytes as floats.
fn i8x4(w: u32) -> vec4<f32> {
    let s = bitcast<vec4<i32>>(vec4<u32>(w << 24u, w << 16u, w << 8u, w));
    return vec4<f32>(s >> vec4<u32>(24u));
}

fn byte_of(w: u32, i: u32) -> u32 {
    return (w >> (8u * (i & 3u))) & 255u;
}

fn m8(a: vec4<f32>, b: vec4<f32>) -> mat2x4<f32> {
    return mat2x4<f32>(a, b);
}

// dot(field4(q.x, shift, mask) + off, x0) + ... for the four words of q: 16 packed fields against 16 x values.
fn fields_dot(q: vec4<u32>, shift: u32, mask: u32, off: f32, x0: vec4<f32>, x1: vec4<f32>, x2: vec4<f32>,
              x3: vec4<f32>) -> f32 {
    return dot(field4(q.x, shift, mask) + off, x0) + dot(field4(q.y, shift, mask) + off, x1)
         + dot(field4(q.z, shift, mask) + off, x2) + dot(field4(q.w, shift, mask) + off, x3);
}

// 16 5-bit values (nibbles of q from bit `shift`, fifth bits from qh bits first..first+15) + off, dotted with x.
fn fields5_dot(q: vec4<u32>, shift: u32, qh: u32, first: u32, off: f32, x0: vec4<f32>, x1: vec4<f32>,
               x2: vec4<f32>, x3: vec4<f32>) -> f32 {
    return dot(join4(fields4(q.x, shift, 15u), bits4(qh, first)) + off, x0)
         + dot(join4(fields4(q.y, shift, 15u), bits4(qh, first + 4u)) + off, x1)
         + dot(join4(fields4(q.z, shift, 15u), bits4(qh, first + 8u)) + off, x2)
         + dot(join4(fields4(q.w, shift, 15u), bits4(qh, first + 12u)) + off, x3);
}

fn xsum(x0: vec4<f32>, x1: vec4<f32>, x2: vec4<f32>, x3: vec4<f32>) -> f32 {
    return dot(x0 + x1 + x2 + x3, vec4<f32>(1.0));
}
