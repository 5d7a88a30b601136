// GGUF weight formats on the device, for the constant FMT (ids match cuda_backend.FORMATS).
//
// Layouts are repacked at upload so every 16-byte quant load is aligned (cuda_backend._repack):
//   F32/F16/BF16: q = values [N, K]
//   Q8_0: q = int8 [N, K]             s = f16 d [N, K/32]
//   Q4_0: q = u8 [N, K/2] (ggml order) s = f16 d [N, K/32]
//   Q4_1: q = as Q4_0                  s = f16 (d, m) [N, K/32, 2]
//   Q5_0: q = as Q4_0, h = u32 qh [N, K/32], s = f16 d;  Q5_1: same with s = (d, m)
//   Q4_K, Q5_K: q = the GGUF blocks as they are (144 and 176 bytes, multiples of 16)
//   Q6_K: q = (ql[128] qh[64]) per super-block [N, K/256*192]; s = (i8 scales[16], f16 d, pad) [N, K/256*20]
// Dequantization (deq32) reproduces quant.py bit for bit: the same float32 operations in the same order, with
// explicit _rn intrinsics so the compiler cannot contract them into FMAs.

#define F_F32 0
#define F_F16 1
#define F_BF16 2
#define F_Q8_0 3
#define F_Q4_0 4
#define F_Q4_1 5
#define F_Q5_0 6
#define F_Q5_1 7
#define F_Q4_K 8
#define F_Q5_K 9
#define F_Q6_K 10

// Bytes per row of q and s, u32 words per row of h.
__device__ __forceinline__ long q_row_bytes(int K) {
#if FMT == F_F32
    return 4L * K;
#elif FMT == F_F16 || FMT == F_BF16
    return 2L * K;
#elif FMT == F_Q8_0
    return K;
#elif FMT == F_Q4_K
    return K / 256 * 144L;
#elif FMT == F_Q5_K
    return K / 256 * 176L;
#elif FMT == F_Q6_K
    return K / 256 * 192L;
#else
    return K / 2;
#endif
}

__device__ __forceinline__ long s_row_bytes(int K) {
#if FMT == F_Q8_0 || FMT == F_Q4_0 || FMT == F_Q5_0
    return K / 32 * 2L;
#elif FMT == F_Q4_1 || FMT == F_Q5_1
    return K / 32 * 4L;
#elif FMT == F_Q6_K
    return K / 256 * 20L;
#else
    return 0;
#endif
}

__device__ __forceinline__ long h_row_words(int K) {
#if FMT == F_Q5_0 || FMT == F_Q5_1
    return K / 32;
#else
    return 0;
#endif
}

// Decode the 6-bit scale and min of sub-block `is` (0..7) from the 12-byte K-quant field (ggml get_scale_min_k4).
__device__ __forceinline__ void k_scale_min(const u8* sc, int is, int& s, int& m) {
    if (is < 4) {
        s = sc[is] & 63;
        m = sc[is + 4] & 63;
    } else {
        s = (sc[is + 4] & 0xF) | ((sc[is - 4] >> 6) << 4);
        m = (sc[is + 4] >> 4) | ((sc[is] >> 6) << 4);
    }
}

// The same from the field held in three registers (a run-time byte index into a register array would spill it).
__device__ __forceinline__ u32 kbyte(u32 a, u32 b, u32 c, int n) {
    u32 w = n < 4 ? a : (n < 8 ? b : c);
    return (w >> (8 * (n & 3))) & 0xFFu;
}

__device__ __forceinline__ void k_scale_min_w(u32 a, u32 b, u32 c, int is, int& s, int& m) {
    if (is < 4) {
        s = kbyte(a, b, c, is) & 63;
        m = kbyte(a, b, c, is + 4) & 63;
    } else {
        s = (kbyte(a, b, c, is + 4) & 0xF) | ((kbyte(a, b, c, is - 4) >> 6) << 4);
        m = (kbyte(a, b, c, is + 4) >> 4) | ((kbyte(a, b, c, is) >> 6) << 4);
    }
}

// The 32 values of group g (elements 32g..32g+31) of one row, exactly as quant.dequantize computes them.
__device__ __forceinline__ void deq32(const u8* __restrict__ qr, const u8* __restrict__ sr,
                                      const u32* __restrict__ hr, int g, float* v) {
#if FMT == F_F32
    const float* p = (const float*)qr + 32 * g;
#pragma unroll
    for (int i = 0; i < 32; i++) v[i] = p[i];
#elif FMT == F_F16
    const u16* p = (const u16*)qr + 32 * g;
#pragma unroll
    for (int i = 0; i < 32; i++) v[i] = h2f(p[i]);
#elif FMT == F_BF16
    const u16* p = (const u16*)qr + 32 * g;
#pragma unroll
    for (int i = 0; i < 32; i++) v[i] = bf2f(p[i]);
#elif FMT == F_Q8_0
    float d = h2f(((const u16*)sr)[g]);
    const i8* p = (const i8*)qr + 32 * g;
#pragma unroll
    for (int i = 0; i < 32; i++) v[i] = __fmul_rn((float)p[i], d);
#elif FMT == F_Q4_0 || FMT == F_Q4_1 || FMT == F_Q5_0 || FMT == F_Q5_1
    const u8* p = qr + 16 * g;
#if FMT == F_Q4_0 || FMT == F_Q5_0
    float d = h2f(((const u16*)sr)[g]), m = 0.0f;
#else
    float d = h2f(((const u16*)sr)[2 * g]), m = h2f(((const u16*)sr)[2 * g + 1]);
#endif
#if FMT == F_Q5_0 || FMT == F_Q5_1
    u32 qh = hr[g];
#endif
#pragma unroll
    for (int i = 0; i < 16; i++) {
        int lo = p[i] & 15, hi = p[i] >> 4;
#if FMT == F_Q5_0 || FMT == F_Q5_1
        lo |= ((qh >> i) & 1) << 4;
        hi |= ((qh >> (i + 16)) & 1) << 4;
#endif
#if FMT == F_Q4_0
        v[i] = __fmul_rn((float)(lo - 8), d);
        v[i + 16] = __fmul_rn((float)(hi - 8), d);
#elif FMT == F_Q5_0
        v[i] = __fmul_rn((float)(lo - 16), d);
        v[i + 16] = __fmul_rn((float)(hi - 16), d);
#else
        v[i] = __fadd_rn(__fmul_rn((float)lo, d), m);
        v[i + 16] = __fadd_rn(__fmul_rn((float)hi, d), m);
#endif
    }
#elif FMT == F_Q4_K || FMT == F_Q5_K
    const int bb = FMT == F_Q4_K ? 144 : 176, qoff = FMT == F_Q4_K ? 16 : 48;
    const u8* b = qr + (long)(g >> 3) * bb;
    int sb = g & 7, sc, mn;
    k_scale_min(b + 4, sb, sc, mn);
    float d = h2f(*(const u16*)b), dmin = h2f(*(const u16*)(b + 2));
    float ds = __fmul_rn(d, (float)sc), dm = __fmul_rn(dmin, (float)mn);
    const u8* qs = b + qoff + 32 * (sb >> 1);
    int shift = (sb & 1) * 4;
#pragma unroll
    for (int l = 0; l < 32; l++) {
        int q = (qs[l] >> shift) & 15;
#if FMT == F_Q5_K
        q |= ((b[16 + l] >> sb) & 1) << 4;
#endif
        v[l] = __fsub_rn(__fmul_rn((float)q, ds), dm);
    }
#elif FMT == F_Q6_K
    const u8* b = qr + (long)(g >> 3) * 192;
    const u8* sb = sr + (long)(g >> 3) * 20;
    int r = g & 7, h = r >> 2, s = r & 3;
    float d = h2f(*(const u16*)(sb + 16));
    const u8* ql = b + 64 * h + 32 * (s & 1);
    const u8* qh = b + 128 + 32 * h;
    float dl0 = __fmul_rn(d, (float)((const i8*)sb)[8 * h + 2 * s]);
    float dl1 = __fmul_rn(d, (float)((const i8*)sb)[8 * h + 2 * s + 1]);
#pragma unroll
    for (int l = 0; l < 32; l++) {
        int q = ((ql[l] >> (4 * (s >> 1))) & 15) | (((qh[l] >> (2 * s)) & 3) << 4);
        v[l] = __fmul_rn((float)(q - 32), l < 16 ? dl0 : dl1);
    }
#endif
}

// ---- GEMV chunks: each lane step reads 16 bytes of quant data (one aligned 128-bit load) ------------------------
// NA (+ NB) activations go with a chunk: run A at x_off_a(c), run B (if NB) at x_off_a(c) + X_OFF_B.
#if FMT == F_F32
#define NA 4
#define NB 0
#elif FMT == F_F16 || FMT == F_BF16
#define NA 8
#define NB 0
#elif FMT == F_Q8_0
#define NA 16
#define NB 0
#else
#define NA 16
#define NB 16
#endif

#if FMT == F_Q6_K
#define X_OFF_B 64
#elif FMT == F_Q4_K || FMT == F_Q5_K
#define X_OFF_B 32
#else
#define X_OFF_B 16
#endif

__device__ __forceinline__ int n_chunks(int K) { return K / (NA + NB); }

__device__ __forceinline__ int x_off_a(int c) {
#if FMT == F_Q4_K || FMT == F_Q5_K
    int r = c & 7;
    return 256 * (c >> 3) + 64 * (r >> 1) + 16 * (r & 1);
#elif FMT == F_Q6_K
    int r = c & 7;
    return 256 * (c >> 3) + 128 * (r >> 2) + 32 * ((r >> 1) & 1) + 16 * (r & 1);
#else
    return (NA + NB) * c;
#endif
}

// What one lane loads for one chunk of one row (unused fields are dropped by the compiler).
struct Raw {
    uint4 a, b;
    u32 w0, w1, w2, w3;
};

__device__ __forceinline__ Raw load_chunk(const u8* __restrict__ qr, const u8* __restrict__ sr,
                                          const u32* __restrict__ hr, int c) {
    Raw r;
#if FMT == F_Q4_K || FMT == F_Q5_K
    const int bb = FMT == F_Q4_K ? 144 : 176, qoff = FMT == F_Q4_K ? 16 : 48;
    const u8* b = qr + (long)(c >> 3) * bb;
    int j = (c & 7) >> 1, l0 = 16 * (c & 1);
    r.a = __ldg((const uint4*)(b + qoff + 32 * j + l0));
#if FMT == F_Q5_K
    r.b = __ldg((const uint4*)(b + 16 + l0));
#endif
    r.w0 = __ldg((const u32*)b);
    r.w1 = __ldg((const u32*)(b + 4));
    r.w2 = __ldg((const u32*)(b + 8));
    r.w3 = __ldg((const u32*)(b + 12));
#elif FMT == F_Q6_K
    const u8* b = qr + (long)(c >> 3) * 192;
    int rr = c & 7, h = rr >> 2, p = (rr >> 1) & 1, l0 = 16 * (rr & 1);
    r.a = __ldg((const uint4*)(b + 64 * h + 32 * p + l0));
    r.b = __ldg((const uint4*)(b + 128 + 32 * h + l0));
    const u8* s = sr + (long)(c >> 3) * 20;
    int si = 8 * h + 2 * p + (rr & 1);
    r.w0 = (u32)(int)((const i8*)s)[si];      // scale of the low-nibble quarter
    r.w1 = (u32)(int)((const i8*)s)[si + 4];  // scale of the high-nibble quarter (two quarters later)
    r.w2 = __ldg((const u16*)(s + 16));
#else
    r.a = __ldg((const uint4*)(qr + 16L * c));
#if FMT == F_Q8_0
    r.w0 = __ldg((const u16*)sr + (c >> 1));
#elif FMT == F_Q4_0 || FMT == F_Q5_0
    r.w0 = __ldg((const u16*)sr + c);
#elif FMT == F_Q4_1 || FMT == F_Q5_1
    r.w0 = __ldg((const u32*)sr + c);
#endif
#if FMT == F_Q5_0 || FMT == F_Q5_1
    r.w1 = __ldg(hr + c);
#endif
#endif
    return r;
}

// The pipelined GEMV (gemv.cu, BK 2) copies each chunk's fields into the loading thread's own shared-memory slots
// with cp.async instead of registers: one 16-byte quant load (a) and up to two 4-byte words (the scale word holding
// this chunk's f16 scale(s), and Q5's high bits). Formats with other fields (K-quants, Q6_K) keep the register kernels.
// A 2-byte scale is fetched as its aligned 4-byte word; the host takes this kernel only where every row of s starts
// 4-byte aligned (s_row_bytes % 4 == 0), so which half is this chunk's follows from c alone.
#define ASYNC_FMT (FMT <= F_BF16 || FMT == F_Q8_0 || FMT == F_Q4_0 || FMT == F_Q4_1 || FMT == F_Q5_0 || FMT == F_Q5_1)
#define ASYNC_WORDS (FMT == F_Q5_0 || FMT == F_Q5_1 ? 2 : FMT <= F_BF16 ? 0 : 1)

#if ASYNC_FMT
__device__ __forceinline__ void load_chunk_async(const u8* __restrict__ qr, const u8* __restrict__ sr,
                                                 const u32* __restrict__ hr, int c, uint4* a, u32* w0, u32* w1) {
    cp_async16(a, qr + 16L * c);
#if FMT == F_Q8_0
    cp_async4(w0, (const u32*)sr + (c >> 2));
#elif FMT == F_Q4_0 || FMT == F_Q5_0
    cp_async4(w0, (const u32*)sr + (c >> 1));
#elif FMT == F_Q4_1 || FMT == F_Q5_1
    cp_async4(w0, (const u32*)sr + c);
#endif
#if FMT == F_Q5_0 || FMT == F_Q5_1
    cp_async4(w1, hr + c);
#endif
}

// The Raw that load_chunk would have returned, from the slots load_chunk_async filled.
__device__ __forceinline__ Raw chunk_from_smem(const uint4* a, const u32* w0, const u32* w1, int c) {
    Raw r;
    r.a = *a;
#if FMT == F_Q8_0
    r.w0 = (*w0 >> (16 * ((c >> 1) & 1))) & 0xFFFFu;
#elif FMT == F_Q4_0 || FMT == F_Q5_0
    r.w0 = (*w0 >> (16 * (c & 1))) & 0xFFFFu;
#elif FMT == F_Q4_1 || FMT == F_Q5_1
    r.w0 = *w0;
#endif
#if FMT == F_Q5_0 || FMT == F_Q5_1
    r.w1 = *w1;
#endif
    return r;
}
#endif

// Q8_0 in the block GEMV kernels (XQ): the activations are split into integer digits so the dot runs on __dp4a
// (4 multiply-adds per instruction) instead of converting every weight byte to float (3 instructions per weight,
// which bounded these kernels at 45-70% of the read stream). Each thread's 16 activations of a chunk become
// q = rint(x / s) with s = max|x| / 2^22, written as three planes of signed base-256 digits (q = d0 + 256 d1 + 65536
// d2, every digit in [-128, 127]); the three integer dots are exact and are combined in float. x is thereby rounded
// to 23 bits relative to its chunk's largest element, about what float32 keeps, so the result stays within float32
// rounding of the reference (the tests' 1e-9 NMSE bound; measured about 1e-13). KILN_GEMV_XQ=0 (XQ 0) turns it off.
#ifndef XQ
#define XQ 0
#endif
#if XQ && FMT == F_Q8_0
#define XQ_ON 1
#else
#define XQ_ON 0
#endif

// Quantize 16 activations into p[0..3] (digit 0), p[4..7] (digit 1), p[8..11] (digit 2); returns s (NaN if any x is
// not finite, so the dot is NaN as the float path's would be).
__device__ __forceinline__ float quantize_x16(const float* v, u32* p) {
    float m = 0.0f, bad = 0.0f;
#pragma unroll
    for (int i = 0; i < 16; i++) m = fmaxf(m, fabsf(v[i])), bad += v[i] * 0.0f;
    const float inv = m > 0.0f ? 4194304.0f / m : 0.0f;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        u32 w0 = 0, w1 = 0, w2 = 0;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int q = __float2int_rn(v[4 * k + j] * inv);
            int d0 = (int)(i8)(q & 255);
            q = (q - d0) >> 8;
            int d1 = (int)(i8)(q & 255);
            int d2 = (q - d1) >> 8;
            w0 |= (u32)(d0 & 255) << (8 * j);
            w1 |= (u32)(d1 & 255) << (8 * j);
            w2 |= (u32)(d2 & 255) << (8 * j);
        }
        p[k] = w0, p[4 + k] = w1, p[8 + k] = w2;
    }
    return m * (1.0f / 4194304.0f) + bad;
}

// An int32 in [-2^22, 2^22) as an exact float: its bits added into the mantissa of 2^23 + 2^22 (no I2F).
__device__ __forceinline__ float small_i2f(int v) { return __int_as_float(0x4B400000 + v) - 12582912.0f; }

// One Q8_0 chunk (16 weights) against the quantized activations p (scale s).
__device__ __forceinline__ float dot_chunk_xq(const Raw& r, const u32* p, float s) {
    const int q[4] = {(int)r.a.x, (int)r.a.y, (int)r.a.z, (int)r.a.w};
    int a0 = 0, a1 = 0, a2 = 0;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        a0 = __dp4a(q[k], (int)p[k], a0);
        a1 = __dp4a(q[k], (int)p[4 + k], a1);
        a2 = __dp4a(q[k], (int)p[8 + k], a2);
    }
    float f = fmaf(small_i2f(a2), 65536.0f, fmaf(small_i2f(a1), 256.0f, small_i2f(a0)));
    return h2f((u16)r.w0) * s * f;
}

// Byte j of each of the 4 bytes of w, as floats minus `bias`, times x[0..3], summed.
__device__ __forceinline__ float dot4(u32 w, const float* x, float bias) {
    return x[0] * (__int_as_float(__byte_perm(w, 0x4B000000u, 0x7540u)) - bias) +
           x[1] * (__int_as_float(__byte_perm(w, 0x4B000000u, 0x7541u)) - bias) +
           x[2] * (__int_as_float(__byte_perm(w, 0x4B000000u, 0x7542u)) - bias) +
           x[3] * (__int_as_float(__byte_perm(w, 0x4B000000u, 0x7543u)) - bias);
}

// Spread the 4 low bits of b to bit 0 of each byte.
__device__ __forceinline__ u32 spread4(u32 b) { return ((b & 0xFu) * 0x00204081u) & 0x01010101u; }

// Dot of one chunk with its activations; sa/sb are the sums of run A/B (for formats with a min/offset term).
__device__ __forceinline__ float dot_chunk(const Raw& r, int c, const float* xa, const float* xb, float sa, float sb) {
    const u32 q[4] = {r.a.x, r.a.y, r.a.z, r.a.w};
#if FMT == F_F32
    return xa[0] * __uint_as_float(q[0]) + xa[1] * __uint_as_float(q[1]) + xa[2] * __uint_as_float(q[2]) +
           xa[3] * __uint_as_float(q[3]);
#elif FMT == F_F16 || FMT == F_BF16
    float acc = 0.0f;
#pragma unroll
    for (int k = 0; k < 4; k++) {
#if FMT == F_F16
        acc += xa[2 * k] * h2f((u16)(q[k] & 0xFFFF)) + xa[2 * k + 1] * h2f((u16)(q[k] >> 16));
#else
        acc += xa[2 * k] * __uint_as_float(q[k] << 16) + xa[2 * k + 1] * __uint_as_float(q[k] & 0xFFFF0000u);
#endif
    }
    return acc;
#elif FMT == F_Q8_0
    // xor 0x80 turns int8 v into the unsigned byte v + 128; subtracting 2^23 + 128 gives v back exactly.
    float acc = 0.0f;
#pragma unroll
    for (int k = 0; k < 4; k++) acc += dot4(q[k] ^ 0x80808080u, xa + 4 * k, 8388736.0f);
    return h2f((u16)r.w0) * acc;
#elif FMT == F_Q4_0 || FMT == F_Q4_1 || FMT == F_Q5_0 || FMT == F_Q5_1
    float acc = 0.0f;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        u32 lo = q[k] & 0x0F0F0F0Fu, hi = (q[k] >> 4) & 0x0F0F0F0Fu;
#if FMT == F_Q5_0 || FMT == F_Q5_1
        lo |= spread4(r.w1 >> (4 * k)) << 4;
        hi |= spread4(r.w1 >> (16 + 4 * k)) << 4;
#endif
#if FMT == F_Q4_0
        const float bias = 8388616.0f;  // 2^23 + 8
#elif FMT == F_Q5_0
        const float bias = 8388624.0f;  // 2^23 + 16
#else
        const float bias = 8388608.0f;
#endif
        acc += dot4(lo, xa + 4 * k, bias) + dot4(hi, xb + 4 * k, bias);
    }
#if FMT == F_Q4_0 || FMT == F_Q5_0
    return h2f((u16)r.w0) * acc;
#else
    return h2f((u16)(r.w0 & 0xFFFF)) * acc + h2f((u16)(r.w0 >> 16)) * (sa + sb);
#endif
#elif FMT == F_Q4_K || FMT == F_Q5_K
    int j = (c & 7) >> 1;
    int s0, m0, s1, m1;
    k_scale_min_w(r.w1, r.w2, r.w3, 2 * j, s0, m0);
    k_scale_min_w(r.w1, r.w2, r.w3, 2 * j + 1, s1, m1);
    float lo_acc = 0.0f, hi_acc = 0.0f;
#if FMT == F_Q5_K
    const u32 qh[4] = {r.b.x, r.b.y, r.b.z, r.b.w};
#endif
#pragma unroll
    for (int k = 0; k < 4; k++) {
        u32 lo = q[k] & 0x0F0F0F0Fu, hi = (q[k] >> 4) & 0x0F0F0F0Fu;
#if FMT == F_Q5_K
        lo |= ((qh[k] >> (2 * j)) & 0x01010101u) << 4;
        hi |= ((qh[k] >> (2 * j + 1)) & 0x01010101u) << 4;
#endif
        lo_acc += dot4(lo, xa + 4 * k, 8388608.0f);
        hi_acc += dot4(hi, xb + 4 * k, 8388608.0f);
    }
    float d = h2f((u16)(r.w0 & 0xFFFF)), dmin = h2f((u16)(r.w0 >> 16));
    return d * ((float)s0 * lo_acc + (float)s1 * hi_acc) - dmin * ((float)m0 * sa + (float)m1 * sb);
#elif FMT == F_Q6_K
    const u32 qh[4] = {r.b.x, r.b.y, r.b.z, r.b.w};
    int p = (c >> 1) & 1;
    float lo_acc = 0.0f, hi_acc = 0.0f;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        u32 lo = (q[k] & 0x0F0F0F0Fu) | (((qh[k] >> (2 * p)) & 0x03030303u) << 4);
        u32 hi = ((q[k] >> 4) & 0x0F0F0F0Fu) | (((qh[k] >> (2 * p + 4)) & 0x03030303u) << 4);
        lo_acc += dot4(lo, xa + 4 * k, 8388640.0f);  // 2^23 + 32
        hi_acc += dot4(hi, xb + 4 * k, 8388640.0f);
    }
    return h2f((u16)r.w2) * ((float)(int)r.w0 * lo_acc + (float)(int)r.w1 * hi_acc);
#endif
}
