// The decoupled contrastive loss family (DCL, DCLW, InfoNCE), forward and backward, fused.
//
// The 2N x 2N similarity matrix is never stored: the rows of U = [a; b] (the two L2-normalized
// views stacked) are streamed in 16 x 16 tiles, once to get each row's log-sum-exp with a running
// maximum (as flash-attention does) and once more to accumulate the gradient. Memory is O(N*D).
//
// Row r of U is an anchor; its positive is row p(r) = (r + N) mod 2N; its candidates are every row
// c != r whose sample differs (c mod N != r mod N), plus the positive for InfoNCE. With
// s_rc = <U_r, U_c> / t and lse_r = logsumexp over the candidates:
//   L = 1/(2N) sum_r ( lse_r - w_{r mod N} s_{r p(r)} )
//   dL/dU_k = 1/(2N t) ( sum_{c in cand(k)} (e^{s_kc - lse_k} + e^{s_kc - lse_c}) U_c - 2 w U_p(k) )
// and dL/dz follows through the normalization.

struct Params {
    n: u32,          // samples per view (N)
    d: u32,          // embedding width (D)
    kind: u32,       // 0 DCL, 1 DCLW, 2 InfoNCE
    rows: u32,       // 2N
    inv_t: f32,
    inv_sigma: f32,
    eps: f32,
    _pad: f32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> z: array<f32>;            // [2N, D]: z1 rows, then z2
@group(0) @binding(2) var<storage, read_write> u: array<f32>;      // [2N, D] normalized
@group(0) @binding(3) var<storage, read_write> norms: array<f32>;  // [2N]
@group(0) @binding(4) var<storage, read_write> pos: array<f32>;    // [N] <a_i, b_i>
@group(0) @binding(5) var<storage, read_write> w: array<f32>;      // [N] positive weights
@group(0) @binding(6) var<storage, read_write> lse: array<f32>;    // [2N]
@group(0) @binding(7) var<storage, read_write> row_loss: array<f32>; // [2N]
@group(0) @binding(8) var<storage, read_write> grad: array<f32>;   // [2N, D] dL/dz

const TILE: u32 = 16u;       // rows and columns per tile
const CHUNK: u32 = 32u;      // embedding dimensions per shared-memory load
const MAX_PER_LANE: u32 = 32u; // D <= TILE * MAX_PER_LANE = 512
const NEG_INF: f32 = -3.0e38;

fn is_candidate(r: u32, c: u32) -> bool {
    if (c >= params.rows || c == r) {
        return false;
    }
    if (params.kind == 2u) {
        return true;
    }
    return (c % params.n) != (r % params.n);
}

@compute @workgroup_size(64)
fn normalize(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x;
    if (r >= params.rows) {
        return;
    }
    var sq = 0.0;
    for (var k = 0u; k < params.d; k++) {
        let v = z[r * params.d + k];
        sq += v * v;
    }
    let norm = sqrt(sq);
    norms[r] = norm;
    let scale = 1.0 / max(norm, params.eps);
    for (var k = 0u; k < params.d; k++) {
        u[r * params.d + k] = z[r * params.d + k] * scale;
    }
}

var<workgroup> red: array<f32, 256>;

// One workgroup: the positive similarities and DCLW's weights 2 - N softmax(pos / sigma).
@compute @workgroup_size(256)
fn weights(@builtin(local_invocation_index) lid: u32) {
    var local_max = NEG_INF;
    for (var i = lid; i < params.n; i += 256u) {
        var s = 0.0;
        for (var k = 0u; k < params.d; k++) {
            s += u[i * params.d + k] * u[(i + params.n) * params.d + k];
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

var<workgroup> tile_rows: array<f32, 512>;   // TILE x CHUNK
var<workgroup> tile_cols: array<f32, 512>;   // TILE x CHUNK
var<workgroup> coef: array<f32, 256>;        // TILE x TILE
var<workgroup> part_m: array<f32, 256>;
var<workgroup> part_l: array<f32, 256>;

// s(row, col) / t for the thread's (row, col) of the current tile pair, through shared memory.
// Every thread of the workgroup must call it (it holds barriers).
fn tile_similarity(row0: u32, col0: u32, ly: u32, lx: u32, lid: u32) -> f32 {
    var acc = 0.0;
    for (var k0 = 0u; k0 < params.d; k0 += CHUNK) {
        for (var e = lid; e < TILE * CHUNK; e += TILE * TILE) {
            let rr = e / CHUNK;
            let kk = k0 + e % CHUNK;
            var a = 0.0;
            var b = 0.0;
            if (kk < params.d && row0 + rr < params.rows) {
                a = u[(row0 + rr) * params.d + kk];
            }
            if (kk < params.d && col0 + rr < params.rows) {
                b = u[(col0 + rr) * params.d + kk];
            }
            tile_rows[e] = a;
            tile_cols[e] = b;
        }
        workgroupBarrier();
        for (var k = 0u; k < CHUNK; k++) {
            acc += tile_rows[ly * CHUNK + k] * tile_cols[lx * CHUNK + k];
        }
        workgroupBarrier();
    }
    return acc * params.inv_t;
}

// Pass 1: each row's log-sum-exp over its candidates, with a running maximum per lane, then the
// lanes' partial results merged. Also the row's loss term.
@compute @workgroup_size(16, 16)
fn row_lse(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) l: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let row0 = wg.x * TILE;
    let r = row0 + l.y;
    var m = NEG_INF;
    var s_sum = 0.0;
    for (var col0 = 0u; col0 < params.rows; col0 += TILE) {
        let s = tile_similarity(row0, col0, l.y, l.x, lid);
        if (r < params.rows && is_candidate(r, col0 + l.x)) {
            let m_new = max(m, s);
            s_sum = s_sum * exp(m - m_new) + exp(s - m_new);
            m = m_new;
        }
    }
    part_m[lid] = m;
    part_l[lid] = s_sum;
    workgroupBarrier();
    if (l.x == 0u && r < params.rows) {
        var mm = NEG_INF;
        for (var j = 0u; j < TILE; j++) {
            mm = max(mm, part_m[l.y * TILE + j]);
        }
        var ll = 0.0;
        for (var j = 0u; j < TILE; j++) {
            ll += part_l[l.y * TILE + j] * exp(part_m[l.y * TILE + j] - mm);
        }
        let row_lse_value = mm + log(ll);
        lse[r] = row_lse_value;
        let i = r % params.n;
        row_loss[r] = row_lse_value - w[i] * pos[i] * params.inv_t;
    }
}

// Pass 2: the gradient. Each thread owns D/16 dimensions of its row's gradient.
@compute @workgroup_size(16, 16)
fn row_grad(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) l: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let row0 = wg.x * TILE;
    let r = row0 + l.y;
    var acc: array<f32, MAX_PER_LANE>;
    for (var j = 0u; j < MAX_PER_LANE; j++) {
        acc[j] = 0.0;
    }
    for (var col0 = 0u; col0 < params.rows; col0 += TILE) {
        let s = tile_similarity(row0, col0, l.y, l.x, lid);
        let c = col0 + l.x;
        var p = 0.0;
        if (r < params.rows && is_candidate(r, c)) {
            p = exp(s - lse[r]) + exp(s - lse[c]);
        }
        coef[lid] = p;
        workgroupBarrier();
        if (r < params.rows) {
            for (var cc = 0u; cc < TILE; cc++) {
                let pc = coef[l.y * TILE + cc];
                if (pc != 0.0) {
                    let base = (col0 + cc) * params.d;
                    var j = 0u;
                    for (var k = l.x; k < params.d; k += TILE) {
                        acc[j] += pc * u[base + k];
                        j++;
                    }
                }
            }
        }
        workgroupBarrier();
    }
    // Add the positive term, scale, and chain through the normalization z -> z / |z|.
    var dot_ug = 0.0;
    if (r < params.rows) {
        let partner = (r + params.n) % params.rows;
        let wi = w[r % params.n];
        let scale = params.inv_t / f32(params.rows);
        var j = 0u;
        for (var k = l.x; k < params.d; k += TILE) {
            let g = (acc[j] - 2.0 * wi * u[partner * params.d + k]) * scale;
            acc[j] = g;
            dot_ug += g * u[r * params.d + k];
            j++;
        }
    }
    part_l[lid] = dot_ug;
    workgroupBarrier();
    if (r < params.rows) {
        var total = 0.0;
        for (var jj = 0u; jj < TILE; jj++) {
            total += part_l[l.y * TILE + jj];
        }
        let norm = norms[r];
        var j = 0u;
        for (var k = l.x; k < params.d; k += TILE) {
            if (norm > params.eps) {
                grad[r * params.d + k] = (acc[j] - u[r * params.d + k] * total) / norm;
            } else {
                grad[r * params.d + k] = acc[j] / params.eps;
            }
            j++;
        }
    }
}
