// The decoupled contrastive loss family (DCL, DCLW, InfoNCE), forward and backward, fused.
//
// Row r of U = [a; b] (the two L2-normalized views stacked, 2N rows) is an anchor; its positive
// is row p(r) = (r + N) mod 2N; its candidates are every row c != r whose sample differs
// (c != p(r)), plus the positive for InfoNCE. With s_rc = <U_r, U_c> / t and lse_r the
// log-sum-exp over r's candidates:
//   L = 1/(2N) sum_r ( lse_r - w_{r mod N} s_{r p(r)} )
//   dL/dU_k = 1/(2N t) ( sum_{c in cand(k)} P_kc U_c - 2 w U_p(k) ),
//   P_kc = e^{s_kc - lse_k} + e^{s_kc - lse_c}
// and dL/dz follows through the normalization. The 2N x 2N matrices S and P are never stored:
// memory is O(N*D).
//
// Passes: normalize (U, padded to whole vec4s with zeros; grad zeroed), weights (positives, DCLW's w),
// row_lse (lse_r with a running maximum, as flash-attention does), row_grad (G = P U, with the
// tile of P recomputed from U and lse), finish (positive term, scale, back through |z|).
//
// Why the two big passes look the way they do: they are written for SIMD-on-CPU drivers (Mesa
// lavapipe), where invocations are the lanes of a vector register and any load whose address
// differs between lanes is done one lane at a time, while a load whose address is the same in
// every lane (uniform) is one scalar load and a broadcast. So each invocation owns one row, and
// the whole workgroup walks the columns in lockstep, 8 at a time: every column value is a
// uniform load feeding 8 lanes' FMAs, the row's own values are the only per-lane loads, and each
// of them feeds 8 FMAs (one per column of the block). No workgroup memory and no barriers, and no
// branches inside the loops (masking is by select), which would make uniform loads per-lane again.
// The same loops are plain coalesced-broadcast code on a real GPU.

struct Params {
    n: u32,          // samples per view (N)
    d: u32,          // embedding width (D)
    kind: u32,       // 0 DCL, 1 DCLW, 2 InfoNCE
    rows: u32,       // 2N
    inv_t: f32,
    inv_sigma: f32,
    eps: f32,
    d4: u32,         // vec4s per padded row: ceil(D / 4)
}

@group(0) @binding(0) var<uniform> params: Params;
// [2N, D]: z1 rows, then z2. Only read, but bound read-write: in a training step z, row_loss and
// grad are slices of one of Burn's pooled buffers, and WebGPU forbids binding one buffer both
// read-only and writable in a dispatch.
@group(0) @binding(1) var<storage, read_write> z: array<f32>;
@group(0) @binding(2) var<storage, read_write> u: array<vec4<f32>>;  // [2N, d4] normalized, 0-padded
@group(0) @binding(3) var<storage, read_write> norms: array<f32>;    // [2N]
@group(0) @binding(4) var<storage, read_write> pos: array<f32>;      // [N] <a_i, b_i>
@group(0) @binding(5) var<storage, read_write> w: array<f32>;        // [N] positive weights
@group(0) @binding(6) var<storage, read_write> lse: array<f32>;      // [2N]
@group(0) @binding(7) var<storage, read_write> row_loss: array<f32>; // [2N]
// [ceil(2N / 512) * 512, d4]: P U, then dL/dz in place. Rows past 2N are scratch for the last
// workgroup's idle lanes, so that no lane needs a branch around its stores.
@group(0) @binding(8) var<storage, read_write> grad: array<vec4<f32>>;

const WG: u32 = 64u;               // invocations per workgroup of the row passes
const ROWS_PER_GROUP: u32 = 512u;  // 8 rows per invocation in row_lse and row_grad
const NEG_INF: f32 = -3.0e38;

@compute @workgroup_size(64)
fn normalize(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x;
    if (r >= params.rows) {
        return;
    }
    let d = params.d;
    var sq = 0.0;
    for (var k = 0u; k < d; k++) {
        let v = z[r * d + k];
        sq += v * v;
    }
    let norm = sqrt(sq);
    norms[r] = norm;
    let scale = 1.0 / max(norm, params.eps);
    for (var q = 0u; q < params.d4; q++) {
        var v = vec4(0.0);
        for (var j = 0u; j < 4u; j++) {
            let k = 4u * q + j;
            if (k < d) {
                v[j] = z[r * d + k] * scale;
            }
        }
        u[r * params.d4 + q] = v;
        // row_grad accumulates into grad, and a training step hands over one of Burn's pooled
        // buffers, uninitialized.
        grad[r * params.d4 + q] = vec4(0.0);
    }
}

var<workgroup> red: array<f32, 256>;

// One workgroup: the positive similarities and DCLW's weights 2 - N softmax(pos / sigma).
@compute @workgroup_size(256)
fn weights(@builtin(local_invocation_index) lid: u32) {
    var local_max = NEG_INF;
    for (var i = lid; i < params.n; i += 256u) {
        var s = 0.0;
        for (var q = 0u; q < params.d4; q++) {
            s += dot(u[i * params.d4 + q], u[(i + params.n) * params.d4 + q]);
        }
        pos[i] = s;
        local_max = max(local_max, s * params.inv_sigma);
    }
    red[lid] = local_max;
    workgroupBarrier();
    for (var stride = 128u; stride > 0u; stride >>= 1u) {
        if (lid < stride) {
            red[lid] = max(red[lid], red[lid + stride]);
        }
        workgroupBarrier();
    }
    let m = red[0];
    workgroupBarrier();
    var local_sum = 0.0;
    for (var i = lid; i < params.n; i += 256u) {
        local_sum += exp(pos[i] * params.inv_sigma - m);
    }
    red[lid] = local_sum;
    workgroupBarrier();
    for (var stride = 128u; stride > 0u; stride >>= 1u) {
        if (lid < stride) {
            red[lid] += red[lid + stride];
        }
        workgroupBarrier();
    }
    let total = red[0];
    for (var i = lid; i < params.n; i += 256u) {
        if (params.kind == 1u) {
            w[i] = 2.0 - f32(params.n) * exp(pos[i] * params.inv_sigma - m) / total;
        } else {
            w[i] = 1.0;
        }
    }
}

// Columns past the end are clamped to the last row (loads stay in bounds) and masked out.
fn col_base(c: u32) -> u32 {
    return min(c, params.rows - 1u) * params.d4;
}

// Which of the columns c are candidates of row r: every row but r itself and, except for
// InfoNCE, r's positive (the only other row of the same sample).
fn candidates(r: u32, c: vec4<u32>) -> vec4<bool> {
    let other = select((r + params.n) % params.rows, r, params.kind == 2u);
    return (c < vec4(params.rows)) & (c != vec4(r)) & (c != vec4(other));
}

fn store_lse(r: u32, m: f32, l: f32) {
    if (r < params.rows) {
        let value = m + log(l);
        lse[r] = value;
        let i = r % params.n;
        row_loss[r] = value - w[i] * pos[i] * params.inv_t;
    }
}

// ---- generated by scripts/gen_loss_tiles.py: the 8 x 8 register tile (edit the generator, not this) ----

// s / t for the lane's 8 rows (vec4 offsets rb.a[i]) against columns c0..c0+7: s[i] holds row i's
// 8 values as two vec4s (lo: columns c0..c0+3, hi: c0+4..c0+7).
struct Tile {
    lo0: vec4<f32>, hi0: vec4<f32>,
    lo1: vec4<f32>, hi1: vec4<f32>,
    lo2: vec4<f32>, hi2: vec4<f32>,
    lo3: vec4<f32>, hi3: vec4<f32>,
    lo4: vec4<f32>, hi4: vec4<f32>,
    lo5: vec4<f32>, hi5: vec4<f32>,
    lo6: vec4<f32>, hi6: vec4<f32>,
    lo7: vec4<f32>, hi7: vec4<f32>,
}

struct Rows {
    b0: u32, b1: u32, b2: u32, b3: u32, b4: u32, b5: u32, b6: u32, b7: u32,
}

fn tile(rb: Rows, c0: u32) -> Tile {
    let cb0 = col_base(c0 + 0u);
    let cb1 = col_base(c0 + 1u);
    let cb2 = col_base(c0 + 2u);
    let cb3 = col_base(c0 + 3u);
    let cb4 = col_base(c0 + 4u);
    let cb5 = col_base(c0 + 5u);
    let cb6 = col_base(c0 + 6u);
    let cb7 = col_base(c0 + 7u);
    var lo0 = vec4(0.0);
    var hi0 = vec4(0.0);
    var lo1 = vec4(0.0);
    var hi1 = vec4(0.0);
    var lo2 = vec4(0.0);
    var hi2 = vec4(0.0);
    var lo3 = vec4(0.0);
    var hi3 = vec4(0.0);
    var lo4 = vec4(0.0);
    var hi4 = vec4(0.0);
    var lo5 = vec4(0.0);
    var hi5 = vec4(0.0);
    var lo6 = vec4(0.0);
    var hi6 = vec4(0.0);
    var lo7 = vec4(0.0);
    var hi7 = vec4(0.0);
    for (var q = 0u; q < params.d4; q++) {
        let y0 = u[cb0 + q];
        let y1 = u[cb1 + q];
        let y2 = u[cb2 + q];
        let y3 = u[cb3 + q];
        let y4 = u[cb4 + q];
        let y5 = u[cb5 + q];
        let y6 = u[cb6 + q];
        let y7 = u[cb7 + q];
        let x0 = u[rb.b0 + q];
        lo0 = fma(vec4(x0.x), vec4(y0.x, y1.x, y2.x, y3.x), lo0);
        hi0 = fma(vec4(x0.x), vec4(y4.x, y5.x, y6.x, y7.x), hi0);
        lo0 = fma(vec4(x0.y), vec4(y0.y, y1.y, y2.y, y3.y), lo0);
        hi0 = fma(vec4(x0.y), vec4(y4.y, y5.y, y6.y, y7.y), hi0);
        lo0 = fma(vec4(x0.z), vec4(y0.z, y1.z, y2.z, y3.z), lo0);
        hi0 = fma(vec4(x0.z), vec4(y4.z, y5.z, y6.z, y7.z), hi0);
        lo0 = fma(vec4(x0.w), vec4(y0.w, y1.w, y2.w, y3.w), lo0);
        hi0 = fma(vec4(x0.w), vec4(y4.w, y5.w, y6.w, y7.w), hi0);
        let x1 = u[rb.b1 + q];
        lo1 = fma(vec4(x1.x), vec4(y0.x, y1.x, y2.x, y3.x), lo1);
        hi1 = fma(vec4(x1.x), vec4(y4.x, y5.x, y6.x, y7.x), hi1);
        lo1 = fma(vec4(x1.y), vec4(y0.y, y1.y, y2.y, y3.y), lo1);
        hi1 = fma(vec4(x1.y), vec4(y4.y, y5.y, y6.y, y7.y), hi1);
        lo1 = fma(vec4(x1.z), vec4(y0.z, y1.z, y2.z, y3.z), lo1);
        hi1 = fma(vec4(x1.z), vec4(y4.z, y5.z, y6.z, y7.z), hi1);
        lo1 = fma(vec4(x1.w), vec4(y0.w, y1.w, y2.w, y3.w), lo1);
        hi1 = fma(vec4(x1.w), vec4(y4.w, y5.w, y6.w, y7.w), hi1);
        let x2 = u[rb.b2 + q];
        lo2 = fma(vec4(x2.x), vec4(y0.x, y1.x, y2.x, y3.x), lo2);
        hi2 = fma(vec4(x2.x), vec4(y4.x, y5.x, y6.x, y7.x), hi2);
        lo2 = fma(vec4(x2.y), vec4(y0.y, y1.y, y2.y, y3.y), lo2);
        hi2 = fma(vec4(x2.y), vec4(y4.y, y5.y, y6.y, y7.y), hi2);
        lo2 = fma(vec4(x2.z), vec4(y0.z, y1.z, y2.z, y3.z), lo2);
        hi2 = fma(vec4(x2.z), vec4(y4.z, y5.z, y6.z, y7.z), hi2);
        lo2 = fma(vec4(x2.w), vec4(y0.w, y1.w, y2.w, y3.w), lo2);
        hi2 = fma(vec4(x2.w), vec4(y4.w, y5.w, y6.w, y7.w), hi2);
        let x3 = u[rb.b3 + q];
        lo3 = fma(vec4(x3.x), vec4(y0.x, y1.x, y2.x, y3.x), lo3);
        hi3 = fma(vec4(x3.x), vec4(y4.x, y5.x, y6.x, y7.x), hi3);
        lo3 = fma(vec4(x3.y), vec4(y0.y, y1.y, y2.y, y3.y), lo3);
        hi3 = fma(vec4(x3.y), vec4(y4.y, y5.y, y6.y, y7.y), hi3);
        lo3 = fma(vec4(x3.z), vec4(y0.z, y1.z, y2.z, y3.z), lo3);
        hi3 = fma(vec4(x3.z), vec4(y4.z, y5.z, y6.z, y7.z), hi3);
        lo3 = fma(vec4(x3.w), vec4(y0.w, y1.w, y2.w, y3.w), lo3);
        hi3 = fma(vec4(x3.w), vec4(y4.w, y5.w, y6.w, y7.w), hi3);
        let x4 = u[rb.b4 + q];
        lo4 = fma(vec4(x4.x), vec4(y0.x, y1.x, y2.x, y3.x), lo4);
        hi4 = fma(vec4(x4.x), vec4(y4.x, y5.x, y6.x, y7.x), hi4);
        lo4 = fma(vec4(x4.y), vec4(y0.y, y1.y, y2.y, y3.y), lo4);
        hi4 = fma(vec4(x4.y), vec4(y4.y, y5.y, y6.y, y7.y), hi4);
        lo4 = fma(vec4(x4.z), vec4(y0.z, y1.z, y2.z, y3.z), lo4);
        hi4 = fma(vec4(x4.z), vec4(y4.z, y5.z, y6.z, y7.z), hi4);
        lo4 = fma(vec4(x4.w), vec4(y0.w, y1.w, y2.w, y3.w), lo4);
        hi4 = fma(vec4(x4.w), vec4(y4.w, y5.w, y6.w, y7.w), hi4);
        let x5 = u[rb.b5 + q];
        lo5 = fma(vec4(x5.x), vec4(y0.x, y1.x, y2.x, y3.x), lo5);
        hi5 = fma(vec4(x5.x), vec4(y4.x, y5.x, y6.x, y7.x), hi5);
        lo5 = fma(vec4(x5.y), vec4(y0.y, y1.y, y2.y, y3.y), lo5);
        hi5 = fma(vec4(x5.y), vec4(y4.y, y5.y, y6.y, y7.y), hi5);
        lo5 = fma(vec4(x5.z), vec4(y0.z, y1.z, y2.z, y3.z), lo5);
        hi5 = fma(vec4(x5.z), vec4(y4.z, y5.z, y6.z, y7.z), hi5);
        lo5 = fma(vec4(x5.w), vec4(y0.w, y1.w, y2.w, y3.w), lo5);
        hi5 = fma(vec4(x5.w), vec4(y4.w, y5.w, y6.w, y7.w), hi5);
        let x6 = u[rb.b6 + q];
        lo6 = fma(vec4(x6.x), vec4(y0.x, y1.x, y2.x, y3.x), lo6);
        hi6 = fma(vec4(x6.x), vec4(y4.x, y5.x, y6.x, y7.x), hi6);
        lo6 = fma(vec4(x6.y), vec4(y0.y, y1.y, y2.y, y3.y), lo6);
        hi6 = fma(vec4(x6.y), vec4(y4.y, y5.y, y6.y, y7.y), hi6);
        lo6 = fma(vec4(x6.z), vec4(y0.z, y1.z, y2.z, y3.z), lo6);
        hi6 = fma(vec4(x6.z), vec4(y4.z, y5.z, y6.z, y7.z), hi6);
        lo6 = fma(vec4(x6.w), vec4(y0.w, y1.w, y2.w, y3.w), lo6);
        hi6 = fma(vec4(x6.w), vec4(y4.w, y5.w, y6.w, y7.w), hi6);
        let x7 = u[rb.b7 + q];
        lo7 = fma(vec4(x7.x), vec4(y0.x, y1.x, y2.x, y3.x), lo7);
        hi7 = fma(vec4(x7.x), vec4(y4.x, y5.x, y6.x, y7.x), hi7);
        lo7 = fma(vec4(x7.y), vec4(y0.y, y1.y, y2.y, y3.y), lo7);
        hi7 = fma(vec4(x7.y), vec4(y4.y, y5.y, y6.y, y7.y), hi7);
        lo7 = fma(vec4(x7.z), vec4(y0.z, y1.z, y2.z, y3.z), lo7);
        hi7 = fma(vec4(x7.z), vec4(y4.z, y5.z, y6.z, y7.z), hi7);
        lo7 = fma(vec4(x7.w), vec4(y0.w, y1.w, y2.w, y3.w), lo7);
        hi7 = fma(vec4(x7.w), vec4(y4.w, y5.w, y6.w, y7.w), hi7);
    }
    let it = params.inv_t;
    return Tile(lo0 * it, hi0 * it, lo1 * it, hi1 * it, lo2 * it, hi2 * it, lo3 * it, hi3 * it, lo4 * it, hi4 * it, lo5 * it, hi5 * it, lo6 * it, hi6 * it, lo7 * it, hi7 * it);
}

// Pass 1: each row's log-sum-exp over its candidates with a running maximum, and its loss term.
@compute @workgroup_size(64)
fn row_lse(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let first = wg.x * ROWS_PER_GROUP + lid;
    let rr0 = first + 0u * WG;   // may be past the end: then idle
    let r0 = min(rr0, params.rows - 1u);
    let rr1 = first + 1u * WG;   // may be past the end: then idle
    let r1 = min(rr1, params.rows - 1u);
    let rr2 = first + 2u * WG;   // may be past the end: then idle
    let r2 = min(rr2, params.rows - 1u);
    let rr3 = first + 3u * WG;   // may be past the end: then idle
    let r3 = min(rr3, params.rows - 1u);
    let rr4 = first + 4u * WG;   // may be past the end: then idle
    let r4 = min(rr4, params.rows - 1u);
    let rr5 = first + 5u * WG;   // may be past the end: then idle
    let r5 = min(rr5, params.rows - 1u);
    let rr6 = first + 6u * WG;   // may be past the end: then idle
    let r6 = min(rr6, params.rows - 1u);
    let rr7 = first + 7u * WG;   // may be past the end: then idle
    let r7 = min(rr7, params.rows - 1u);
    let rb = Rows(r0 * params.d4, r1 * params.d4, r2 * params.d4, r3 * params.d4, r4 * params.d4, r5 * params.d4, r6 * params.d4, r7 * params.d4);
    var m0 = NEG_INF;
    var l0 = 0.0;
    var m1 = NEG_INF;
    var l1 = 0.0;
    var m2 = NEG_INF;
    var l2 = 0.0;
    var m3 = NEG_INF;
    var l3 = 0.0;
    var m4 = NEG_INF;
    var l4 = 0.0;
    var m5 = NEG_INF;
    var l5 = 0.0;
    var m6 = NEG_INF;
    var l6 = 0.0;
    var m7 = NEG_INF;
    var l7 = 0.0;
    for (var c0 = 0u; c0 < params.rows; c0 += 8u) {
        let t = tile(rb, c0);
        let c_lo = vec4(c0) + vec4(0u, 1u, 2u, 3u);
        let c_hi = c_lo + vec4(4u);
        let ok_lo0 = candidates(r0, c_lo);
        let ok_hi0 = candidates(r0, c_hi);
        let top0 = max(select(vec4(NEG_INF), t.lo0, ok_lo0), select(vec4(NEG_INF), t.hi0, ok_hi0));
        let m_new0 = max(m0, max(max(top0.x, top0.y), max(top0.z, top0.w)));
        let e0 = select(vec4(0.0), exp(t.lo0 - m_new0), ok_lo0) + select(vec4(0.0), exp(t.hi0 - m_new0), ok_hi0);
        l0 = l0 * exp(m0 - m_new0) + (e0.x + e0.y) + (e0.z + e0.w);
        m0 = m_new0;
        let ok_lo1 = candidates(r1, c_lo);
        let ok_hi1 = candidates(r1, c_hi);
        let top1 = max(select(vec4(NEG_INF), t.lo1, ok_lo1), select(vec4(NEG_INF), t.hi1, ok_hi1));
        let m_new1 = max(m1, max(max(top1.x, top1.y), max(top1.z, top1.w)));
        let e1 = select(vec4(0.0), exp(t.lo1 - m_new1), ok_lo1) + select(vec4(0.0), exp(t.hi1 - m_new1), ok_hi1);
        l1 = l1 * exp(m1 - m_new1) + (e1.x + e1.y) + (e1.z + e1.w);
        m1 = m_new1;
        let ok_lo2 = candidates(r2, c_lo);
        let ok_hi2 = candidates(r2, c_hi);
        let top2 = max(select(vec4(NEG_INF), t.lo2, ok_lo2), select(vec4(NEG_INF), t.hi2, ok_hi2));
        let m_new2 = max(m2, max(max(top2.x, top2.y), max(top2.z, top2.w)));
        let e2 = select(vec4(0.0), exp(t.lo2 - m_new2), ok_lo2) + select(vec4(0.0), exp(t.hi2 - m_new2), ok_hi2);
        l2 = l2 * exp(m2 - m_new2) + (e2.x + e2.y) + (e2.z + e2.w);
        m2 = m_new2;
        let ok_lo3 = candidates(r3, c_lo);
        let ok_hi3 = candidates(r3, c_hi);
        let top3 = max(select(vec4(NEG_INF), t.lo3, ok_lo3), select(vec4(NEG_INF), t.hi3, ok_hi3));
        let m_new3 = max(m3, max(max(top3.x, top3.y), max(top3.z, top3.w)));
        let e3 = select(vec4(0.0), exp(t.lo3 - m_new3), ok_lo3) + select(vec4(0.0), exp(t.hi3 - m_new3), ok_hi3);
        l3 = l3 * exp(m3 - m_new3) + (e3.x + e3.y) + (e3.z + e3.w);
        m3 = m_new3;
        let ok_lo4 = candidates(r4, c_lo);
        let ok_hi4 = candidates(r4, c_hi);
        let top4 = max(select(vec4(NEG_INF), t.lo4, ok_lo4), select(vec4(NEG_INF), t.hi4, ok_hi4));
        let m_new4 = max(m4, max(max(top4.x, top4.y), max(top4.z, top4.w)));
        let e4 = select(vec4(0.0), exp(t.lo4 - m_new4), ok_lo4) + select(vec4(0.0), exp(t.hi4 - m_new4), ok_hi4);
        l4 = l4 * exp(m4 - m_new4) + (e4.x + e4.y) + (e4.z + e4.w);
        m4 = m_new4;
        let ok_lo5 = candidates(r5, c_lo);
        let ok_hi5 = candidates(r5, c_hi);
        let top5 = max(select(vec4(NEG_INF), t.lo5, ok_lo5), select(vec4(NEG_INF), t.hi5, ok_hi5));
        let m_new5 = max(m5, max(max(top5.x, top5.y), max(top5.z, top5.w)));
        let e5 = select(vec4(0.0), exp(t.lo5 - m_new5), ok_lo5) + select(vec4(0.0), exp(t.hi5 - m_new5), ok_hi5);
        l5 = l5 * exp(m5 - m_new5) + (e5.x + e5.y) + (e5.z + e5.w);
        m5 = m_new5;
        let ok_lo6 = candidates(r6, c_lo);
        let ok_hi6 = candidates(r6, c_hi);
        let top6 = max(select(vec4(NEG_INF), t.lo6, ok_lo6), select(vec4(NEG_INF), t.hi6, ok_hi6));
        let m_new6 = max(m6, max(max(top6.x, top6.y), max(top6.z, top6.w)));
        let e6 = select(vec4(0.0), exp(t.lo6 - m_new6), ok_lo6) + select(vec4(0.0), exp(t.hi6 - m_new6), ok_hi6);
        l6 = l6 * exp(m6 - m_new6) + (e6.x + e6.y) + (e6.z + e6.w);
        m6 = m_new6;
        let ok_lo7 = candidates(r7, c_lo);
        let ok_hi7 = candidates(r7, c_hi);
        let top7 = max(select(vec4(NEG_INF), t.lo7, ok_lo7), select(vec4(NEG_INF), t.hi7, ok_hi7));
        let m_new7 = max(m7, max(max(top7.x, top7.y), max(top7.z, top7.w)));
        let e7 = select(vec4(0.0), exp(t.lo7 - m_new7), ok_lo7) + select(vec4(0.0), exp(t.hi7 - m_new7), ok_hi7);
        l7 = l7 * exp(m7 - m_new7) + (e7.x + e7.y) + (e7.z + e7.w);
        m7 = m_new7;
    }
    store_lse(rr0, m0, l0);
    store_lse(rr1, m1, l1);
    store_lse(rr2, m2, l2);
    store_lse(rr3, m3, l3);
    store_lse(rr4, m4, l4);
    store_lse(rr5, m5, l5);
    store_lse(rr6, m6, l6);
    store_lse(rr7, m7, l7);
}

// Pass 2: G_r = sum_c P_rc U_c, tile by tile: the tile's similarities again, their P weights,
// then G_r += P U over D for the lane's 8 rows, kept in grad (each lane owns its rows there).
@compute @workgroup_size(64)
fn row_grad(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let first = wg.x * ROWS_PER_GROUP + lid;
    let rr0 = first + 0u * WG;
    let r0 = min(rr0, params.rows - 1u);
    let g0 = rr0 * params.d4;   // idle lanes accumulate into grad's scratch rows
    let lse0 = lse[r0];
    let rr1 = first + 1u * WG;
    let r1 = min(rr1, params.rows - 1u);
    let g1 = rr1 * params.d4;   // idle lanes accumulate into grad's scratch rows
    let lse1 = lse[r1];
    let rr2 = first + 2u * WG;
    let r2 = min(rr2, params.rows - 1u);
    let g2 = rr2 * params.d4;   // idle lanes accumulate into grad's scratch rows
    let lse2 = lse[r2];
    let rr3 = first + 3u * WG;
    let r3 = min(rr3, params.rows - 1u);
    let g3 = rr3 * params.d4;   // idle lanes accumulate into grad's scratch rows
    let lse3 = lse[r3];
    let rr4 = first + 4u * WG;
    let r4 = min(rr4, params.rows - 1u);
    let g4 = rr4 * params.d4;   // idle lanes accumulate into grad's scratch rows
    let lse4 = lse[r4];
    let rr5 = first + 5u * WG;
    let r5 = min(rr5, params.rows - 1u);
    let g5 = rr5 * params.d4;   // idle lanes accumulate into grad's scratch rows
    let lse5 = lse[r5];
    let rr6 = first + 6u * WG;
    let r6 = min(rr6, params.rows - 1u);
    let g6 = rr6 * params.d4;   // idle lanes accumulate into grad's scratch rows
    let lse6 = lse[r6];
    let rr7 = first + 7u * WG;
    let r7 = min(rr7, params.rows - 1u);
    let g7 = rr7 * params.d4;   // idle lanes accumulate into grad's scratch rows
    let lse7 = lse[r7];
    let rb = Rows(r0 * params.d4, r1 * params.d4, r2 * params.d4, r3 * params.d4, r4 * params.d4, r5 * params.d4, r6 * params.d4, r7 * params.d4);
    for (var c0 = 0u; c0 < params.rows; c0 += 8u) {
        let t = tile(rb, c0);
        let c_lo = vec4(c0) + vec4(0u, 1u, 2u, 3u);
        let c_hi = c_lo + vec4(4u);
        let last = vec4(params.rows - 1u);
        let lse_lo = vec4(lse[min(c_lo.x, last.x)], lse[min(c_lo.y, last.x)], lse[min(c_lo.z, last.x)], lse[min(c_lo.w, last.x)]);
        let lse_hi = vec4(lse[min(c_hi.x, last.x)], lse[min(c_hi.y, last.x)], lse[min(c_hi.z, last.x)], lse[min(c_hi.w, last.x)]);
        let p_lo0 = select(vec4(0.0), exp(t.lo0 - lse0) + exp(t.lo0 - lse_lo), candidates(r0, c_lo));
        let p_hi0 = select(vec4(0.0), exp(t.hi0 - lse0) + exp(t.hi0 - lse_hi), candidates(r0, c_hi));
        let p_lo1 = select(vec4(0.0), exp(t.lo1 - lse1) + exp(t.lo1 - lse_lo), candidates(r1, c_lo));
        let p_hi1 = select(vec4(0.0), exp(t.hi1 - lse1) + exp(t.hi1 - lse_hi), candidates(r1, c_hi));
        let p_lo2 = select(vec4(0.0), exp(t.lo2 - lse2) + exp(t.lo2 - lse_lo), candidates(r2, c_lo));
        let p_hi2 = select(vec4(0.0), exp(t.hi2 - lse2) + exp(t.hi2 - lse_hi), candidates(r2, c_hi));
        let p_lo3 = select(vec4(0.0), exp(t.lo3 - lse3) + exp(t.lo3 - lse_lo), candidates(r3, c_lo));
        let p_hi3 = select(vec4(0.0), exp(t.hi3 - lse3) + exp(t.hi3 - lse_hi), candidates(r3, c_hi));
        let p_lo4 = select(vec4(0.0), exp(t.lo4 - lse4) + exp(t.lo4 - lse_lo), candidates(r4, c_lo));
        let p_hi4 = select(vec4(0.0), exp(t.hi4 - lse4) + exp(t.hi4 - lse_hi), candidates(r4, c_hi));
        let p_lo5 = select(vec4(0.0), exp(t.lo5 - lse5) + exp(t.lo5 - lse_lo), candidates(r5, c_lo));
        let p_hi5 = select(vec4(0.0), exp(t.hi5 - lse5) + exp(t.hi5 - lse_hi), candidates(r5, c_hi));
        let p_lo6 = select(vec4(0.0), exp(t.lo6 - lse6) + exp(t.lo6 - lse_lo), candidates(r6, c_lo));
        let p_hi6 = select(vec4(0.0), exp(t.hi6 - lse6) + exp(t.hi6 - lse_hi), candidates(r6, c_hi));
        let p_lo7 = select(vec4(0.0), exp(t.lo7 - lse7) + exp(t.lo7 - lse_lo), candidates(r7, c_lo));
        let p_hi7 = select(vec4(0.0), exp(t.hi7 - lse7) + exp(t.hi7 - lse_hi), candidates(r7, c_hi));
        let cb0 = col_base(c0 + 0u);
        let cb1 = col_base(c0 + 1u);
        let cb2 = col_base(c0 + 2u);
        let cb3 = col_base(c0 + 3u);
        let cb4 = col_base(c0 + 4u);
        let cb5 = col_base(c0 + 5u);
        let cb6 = col_base(c0 + 6u);
        let cb7 = col_base(c0 + 7u);
        for (var q = 0u; q < params.d4; q++) {
            let y0 = u[cb0 + q];
            let y1 = u[cb1 + q];
            let y2 = u[cb2 + q];
            let y3 = u[cb3 + q];
            let y4 = u[cb4 + q];
            let y5 = u[cb5 + q];
            let y6 = u[cb6 + q];
            let y7 = u[cb7 + q];
            grad[g0 + q] = grad[g0 + q]
                + p_lo0.x * y0 + p_lo0.y * y1 + p_lo0.z * y2 + p_lo0.w * y3
                + p_hi0.x * y4 + p_hi0.y * y5 + p_hi0.z * y6 + p_hi0.w * y7;
            grad[g1 + q] = grad[g1 + q]
                + p_lo1.x * y0 + p_lo1.y * y1 + p_lo1.z * y2 + p_lo1.w * y3
                + p_hi1.x * y4 + p_hi1.y * y5 + p_hi1.z * y6 + p_hi1.w * y7;
            grad[g2 + q] = grad[g2 + q]
                + p_lo2.x * y0 + p_lo2.y * y1 + p_lo2.z * y2 + p_lo2.w * y3
                + p_hi2.x * y4 + p_hi2.y * y5 + p_hi2.z * y6 + p_hi2.w * y7;
            grad[g3 + q] = grad[g3 + q]
                + p_lo3.x * y0 + p_lo3.y * y1 + p_lo3.z * y2 + p_lo3.w * y3
                + p_hi3.x * y4 + p_hi3.y * y5 + p_hi3.z * y6 + p_hi3.w * y7;
            grad[g4 + q] = grad[g4 + q]
                + p_lo4.x * y0 + p_lo4.y * y1 + p_lo4.z * y2 + p_lo4.w * y3
                + p_hi4.x * y4 + p_hi4.y * y5 + p_hi4.z * y6 + p_hi4.w * y7;
            grad[g5 + q] = grad[g5 + q]
                + p_lo5.x * y0 + p_lo5.y * y1 + p_lo5.z * y2 + p_lo5.w * y3
                + p_hi5.x * y4 + p_hi5.y * y5 + p_hi5.z * y6 + p_hi5.w * y7;
            grad[g6 + q] = grad[g6 + q]
                + p_lo6.x * y0 + p_lo6.y * y1 + p_lo6.z * y2 + p_lo6.w * y3
                + p_hi6.x * y4 + p_hi6.y * y5 + p_hi6.z * y6 + p_hi6.w * y7;
            grad[g7 + q] = grad[g7 + q]
                + p_lo7.x * y0 + p_lo7.y * y1 + p_lo7.z * y2 + p_lo7.w * y3
                + p_hi7.x * y4 + p_hi7.y * y5 + p_hi7.z * y6 + p_hi7.w * y7;
        }
    }
}

// ---- end of generated code ----

// Pass 3: the positive term, the 1/(2N t) scale, and the chain through z -> z / |z|, in place.
@compute @workgroup_size(64)
fn finish(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x;
    if (r >= params.rows) {
        return;
    }
    let d4 = params.d4;
    let rb = r * d4;
    let pb = ((r + params.n) % params.rows) * d4;
    let wi = 2.0 * w[r % params.n];
    let scale = params.inv_t / f32(params.rows);
    var dot_ug = 0.0;
    for (var q = 0u; q < d4; q++) {
        let g = (grad[rb + q] - wi * u[pb + q]) * scale;
        grad[rb + q] = g;
        dot_ug += dot(g, u[rb + q]);
    }
    let norm = norms[r];
    for (var q = 0u; q < d4; q++) {
        let g = grad[rb + q];
        if (norm > params.eps) {
            grad[rb + q] = (g - u[rb + q] * dot_ug) / norm;
        } else {
            grad[rb + q] = g / params.eps;
        }
    }
}
