// ResNet inference kernels: convolution (BatchNorm folded into weight and bias, residual add
// and ReLU fused), global average pooling, linear layers and row-wise L2 normalization.
//
// Every entry point shares one bind group layout so the host builds one layout for all of them.
// Written for WebGPU's default limits: 5 storage buffers, 12 KiB of workgroup memory, 256
// invocations per workgroup.

struct Params {
    batch: u32,
    c_in: u32,
    h_in: u32,
    w_in: u32,
    c_out: u32,
    h_out: u32,
    w_out: u32,
    stride: u32,
    pad: u32,
    ksize: u32,
    // Bit 0: ReLU on the output; bit 1: add `residual` before the ReLU.
    flags: u32,
    // c_in * ksize * ksize: the reduction length of the convolution seen as a matrix product.
    k_total: u32,
}

const FLAG_RELU: u32 = 1u;
const FLAG_RESIDUAL: u32 = 2u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read> residual: array<f32>;
@group(0) @binding(5) var<storage, read_write> dst: array<f32>;

// The convolution is an implicit matrix product: the [k_total, c_out] weights (transposed, so
// a tile row is contiguous) times the [k_total, batch * h_out * w_out] im2col matrix, never
// materialized. 256 invocations compute a BM x BN output tile (channels x pixels), each a 4 x 4
// block of it: 4 consecutive channels of 4 consecutive pixels. Two shapes, chosen per pipeline:
// 64 x 64 (reduction step BK 16) and NARROW, 16 x 256 (BK 8), which the host picks for layers of
// few channels so that they do not compute mostly padding.
override NARROW: bool = false;

// Invocations along the pixels of the tile (the rest go along channels).
fn tile_cols() -> u32 {
    return select(16u, 64u, NARROW);
}

fn tile_k() -> u32 {
    return select(16u, 8u, NARROW);
}

// Weight tile [k][m / 4] and im2col tile [k][n / 4] as vec4s: one 16-byte workgroup load per
// operand instead of four scalar ones. 12 KiB together (the sizes of the larger shape).
var<workgroup> w_tile: array<vec4<f32>, 256>; // 16 * 64 / 4
var<workgroup> x_tile: array<vec4<f32>, 512>; // 8 * 256 / 4

// One output pixel, as the im2col loads see it.
struct Pixel {
    valid: bool,
    // Start of its image in `src`.
    base: u32,
    // Top-left input coordinate of its receptive field (negative inside the padding).
    iy0: i32,
    ix0: i32,
}

fn pixel(n: u32) -> Pixel {
    let hw = p.h_out * p.w_out;
    let b = n / hw;
    let rem = n % hw;
    let oy = rem / p.w_out;
    let ox = rem % p.w_out;
    return Pixel(
        n < p.batch * hw,
        b * p.c_in * p.h_in * p.w_in,
        i32(oy * p.stride) - i32(p.pad),
        i32(ox * p.stride) - i32(p.pad),
    );
}

// Row k of the im2col matrix: input channel and kernel offset, shared by a row's pixels.
struct Tap {
    valid: bool,
    ci: u32,
    ky: i32,
    kx: i32,
}

fn tap(k: u32) -> Tap {
    let kk = p.ksize * p.ksize;
    let r = k % kk;
    return Tap(k < p.k_total, k / kk, i32(r / p.ksize), i32(r % p.ksize));
}

// Element (t, px) of the im2col matrix: 0 in the padding and past either end.
fn im2col(px: Pixel, t: Tap) -> f32 {
    let iy = px.iy0 + t.ky;
    let ix = px.ix0 + t.kx;
    if (!px.valid || !t.valid || iy < 0 || ix < 0 || iy >= i32(p.h_in) || ix >= i32(p.w_in)) {
        return 0.0;
    }
    return src[px.base + (t.ci * p.h_in + u32(iy)) * p.w_in + u32(ix)];
}

fn load_weight(k: u32, m: u32) -> f32 {
    if (m >= p.c_out || k >= p.k_total) {
        return 0.0;
    }
    return weight[k * p.c_out + m];
}

// Dispatch: (ceil(batch * h_out * w_out / BN), ceil(c_out / BM), 1).
@compute @workgroup_size(256, 1, 1)
fn conv2d(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let cols = tile_cols();
    let rows = 256u / cols;
    let bk = tile_k();
    let m0 = wid.y * 4u * rows;
    let n0 = wid.x * 4u * cols;
    // The invocation's output block.
    let ty = tid / cols;
    let tx = tid % cols;

    // Tile loads: one im2col column (4 pixels) q, rows row, row + 256 / cols, ...; and vec4 q
    // of weight row `row`. Neighbouring invocations read neighbouring addresses.
    let q = tid % cols;
    let row = tid / cols;
    let n = n0 + 4u * q;
    let px0 = pixel(n);
    let px1 = pixel(n + 1u);
    let px2 = pixel(n + 2u);
    let px3 = pixel(n + 3u);
    let wq = tid % rows;
    let wrow = tid / rows;
    let m = m0 + 4u * wq;

    // Row i of the invocation's block (channel 4 ty + i), pixels in components. Named vectors
    // rather than an indexed array: llvmpipe (and some GPU compilers) spill dynamically indexed
    // private arrays to memory.
    var acc0 = vec4<f32>();
    var acc1 = vec4<f32>();
    var acc2 = vec4<f32>();
    var acc3 = vec4<f32>();
    for (var k0 = 0u; k0 < p.k_total; k0 += bk) {
        for (var r = row; r < bk; r += rows) {
            let t = tap(k0 + r);
            x_tile[r * cols + q] = vec4(im2col(px0, t), im2col(px1, t), im2col(px2, t), im2col(px3, t));
        }
        if (wrow < bk) {
            let k = k0 + wrow;
            w_tile[wrow * rows + wq] = vec4(
                load_weight(k, m),
                load_weight(k, m + 1u),
                load_weight(k, m + 2u),
                load_weight(k, m + 3u),
            );
        }
        workgroupBarrier();
        for (var kl = 0u; kl < bk; kl++) {
            let a = w_tile[kl * rows + ty];
            let b = x_tile[kl * cols + tx];
            acc0 = fma(vec4(a.x), b, acc0);
            acc1 = fma(vec4(a.y), b, acc1);
            acc2 = fma(vec4(a.z), b, acc2);
            acc3 = fma(vec4(a.w), b, acc3);
        }
        workgroupBarrier();
    }
    let mo = m0 + 4u * ty;
    let no = n0 + 4u * tx;
    store(mo, no, acc0);
    store(mo + 1u, no, acc1);
    store(mo + 2u, no, acc2);
    store(mo + 3u, no, acc3);
}

// Writes channel m of pixels n..n+3 with bias, residual and ReLU.
fn store(m: u32, n: u32, row: vec4<f32>) {
    if (m >= p.c_out) {
        return;
    }
    let hw = p.h_out * p.w_out;
    for (var j = 0u; j < 4u; j++) {
        let nj = n + j;
        if (nj >= p.batch * hw) {
            return;
        }
        let idx = ((nj / hw) * p.c_out + m) * hw + nj % hw;
        var v = row[j] + bias[m];
        if ((p.flags & FLAG_RESIDUAL) != 0u) {
            v += residual[idx];
        }
        if ((p.flags & FLAG_RELU) != 0u) {
            v = max(v, 0.0);
        }
        dst[idx] = v;
    }
}

// [batch, c_in, h_in, w_in] -> [batch, c_in]. Dispatch: (ceil(batch * c_in / 64), 1, 1).
@compute @workgroup_size(64, 1, 1)
fn global_avg_pool(@builtin(global_invocation_id) gid: vec3<u32>) {
    let row = gid.x;
    if (row >= p.batch * p.c_in) {
        return;
    }
    let hw = p.h_in * p.w_in;
    var sum = 0.0;
    for (var i = 0u; i < hw; i++) {
        sum += src[row * hw + i];
    }
    dst[row] = sum / f32(hw);
}

// [batch, c_in] x [c_out, c_in]^T + bias -> [batch, c_out] (PyTorch's Linear layout).
// Dispatch: (ceil(batch * c_out / 64), 1, 1).
@compute @workgroup_size(64, 1, 1)
fn linear(@builtin(global_invocation_id) gid: vec3<u32>) {
    let idx = gid.x;
    if (idx >= p.batch * p.c_out) {
        return;
    }
    let b = idx / p.c_out;
    let o = idx % p.c_out;
    var sum = bias[o];
    for (var i = 0u; i < p.c_in; i++) {
        sum = fma(src[b * p.c_in + i], weight[o * p.c_in + i], sum);
    }
    if ((p.flags & FLAG_RELU) != 0u) {
        sum = max(sum, 0.0);
    }
    dst[idx] = sum;
}

var<workgroup> partial: array<f32, 64>;

// Divides each row of `dst` ([batch, c_in]) by its L2 norm, in place, as PyTorch's
// F.normalize (eps 1e-12). One workgroup per row. Dispatch: (batch, 1, 1).
@compute @workgroup_size(64, 1, 1)
fn l2_normalize(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let base = wid.x * p.c_in;
    var sum = 0.0;
    for (var i = lid.x; i < p.c_in; i += 64u) {
        let v = dst[base + i];
        sum = fma(v, v, sum);
    }
    partial[lid.x] = sum;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (lid.x < s) {
            partial[lid.x] += partial[lid.x + s];
        }
        workgroupBarrier();
    }
    let scale = 1.0 / max(sqrt(partial[0]), 1e-12);
    for (var i = lid.x; i < p.c_in; i += 64u) {
        dst[base + i] *= scale;
    }
}
