// dcl embeds for tutorials: include this module once and put elements on the page.
//
//   <script type="module" src="www/embed.js"></script>
//   <div data-dcl="retrieval" data-model="model.safetensors"></div>
//   <div data-dcl="loss-explorer"></div>
//   <div data-dcl="train" data-config='{"loss": "dcl", "batchSize": 16}'></div>
//
// `retrieval` runs a trained encoder in the page (the WGSL inference engine) over a gallery of the
// dataset `dcl serve` offers; `loss-explorer` computes the three losses and their gradients with
// the fused WGSL loss kernel (in float64 on the CPU where the browser has no WebGPU) while the
// reader drags embeddings around the circle; `train` is the playground in a box. `?model=URL` on
// the page overrides every data-model. Each widget also exposes `element.dcl` (its state) for
// scripts and tests. The module behind them is the small inference-only build (www/pkg-infer,
// no Burn); only the `train` box loads the full playground.
import init, { WebDataset, WebEncoder, normalizeImages, fusedLoss, hostLoss, nearest as rank } from './pkg-infer/dcl.js';
import { PALETTE, fetchBytes, fetchServedFiles, webGpuProblem as gpuProblem } from './common.js';

const ready = init();

function note(el, text, isError = false) {
  let p = el.querySelector('.dcl-note');
  if (!p) {
    p = document.createElement('p');
    p.className = 'dcl-note';
    el.append(p);
  }
  p.textContent = text;
  p.style.color = isError ? '#b00020' : '';
}

/// Why WebGPU is unusable here, with what to do, or null when it works.
async function webGpuProblem() {
  const reason = await gpuProblem();
  return reason && `WebGPU is unusable: ${reason}. Try a recent Chrome or Edge (or Chromium with --enable-unsafe-webgpu).`;
}

/// The encoder a `data-model` names, loaded into the WGSL inference engine.
export async function loadEncoder(url) {
  await ready;
  const bytes = await fetchBytes(url);
  return WebEncoder.fromSafetensors(url.split('/').pop(), bytes);
}

/// The dataset `dcl serve` offers under /data/.
export async function loadServedDataset(base = new URL('../data/', import.meta.url)) {
  await ready;
  const served = await fetchServedFiles(base);
  return WebDataset.fromFiles(served.name, served.files, served.contents);
}

/// Unit-length features of normalized images [count, 3, 32, 32].
export async function embedImages(encoder, normalized, count) {
  const out = await encoder.embed(normalized, count, 32, 32, true);
  return Float32Array.from(out.features);
}

/// The `k` gallery rows most cosine-similar to `query` (unit vectors of width `dim`), as
/// [[index, cosine], ...]: the crate's ranking, the one `dcl neighbors` uses.
export function nearest(gallery, dim, query, k, skip = -1) {
  return rank(gallery, dim, Float32Array.from(query), k, skip);
}

function tile(pixels, offset, size) {
  const image = new ImageData(32, 32);
  for (let i = 0; i < 1024; i++) {
    image.data.set([pixels[offset + i], pixels[offset + 1024 + i], pixels[offset + 2048 + i], 255], 4 * i);
  }
  const canvas = document.createElement('canvas');
  canvas.width = canvas.height = 32;
  canvas.getContext('2d').putImageData(image, 0, 0);
  canvas.style.width = canvas.style.height = `${size}px`;
  canvas.style.imageRendering = 'pixelated';
  return canvas;
}

/// A dropped picture as stored CHW bytes, resized to 32x32.
async function pictureBytes(file) {
  const bitmap = await createImageBitmap(file);
  const canvas = new OffscreenCanvas(32, 32);
  const ctx = canvas.getContext('2d');
  ctx.drawImage(bitmap, 0, 0, 32, 32);
  const rgba = ctx.getImageData(0, 0, 32, 32).data;
  const chw = new Uint8Array(3072);
  for (let i = 0; i < 1024; i++) for (let c = 0; c < 3; c++) chw[c * 1024 + i] = rgba[4 * i + c];
  return chw;
}

async function retrieval(el) {
  const modelUrl = new URLSearchParams(location.search).get('model') || el.dataset.model;
  const size = Number(el.dataset.gallery || 300);
  const k = Number(el.dataset.k || 8);
  el.dcl = { status: 'loading' };
  note(el, 'Loading the encoder and the gallery…');
  const [encoder, dataset] = await Promise.all([loadEncoder(modelUrl), loadServedDataset()]);
  const pixels = dataset.galleryImages(size);
  const count = pixels.length / 3072;
  const started = performance.now();
  const features = await embedImages(encoder, normalizeImages(pixels), count);
  const imagesPerSec = count / ((performance.now() - started) / 1000);
  const dim = encoder.featureDim;
  const picks = document.createElement('div');
  const results = document.createElement('div');
  picks.className = results.className = 'dcl-strip';
  const drop = document.createElement('label');
  drop.className = 'dcl-drop';
  drop.innerHTML = 'or drop a picture <input type="file" accept="image/*">';
  el.append(picks, drop, results);
  const show = (query, queryPixels, skip) => {
    const found = nearest(features, dim, query, k, skip);
    results.replaceChildren(tile(queryPixels, 0, 64), ...found.map(([i, s]) => {
      const figure = document.createElement('figure');
      const caption = document.createElement('figcaption');
      caption.textContent = s.toFixed(2);
      figure.append(tile(pixels, i * 3072, 48), caption);
      return figure;
    }));
    el.dcl.neighbors = found.map(([i, s]) => ({ index: i, cosine: s }));
  };
  for (let i = 0; i < Math.min(12, count); i++) {
    const t = tile(pixels, i * 3072, 36);
    t.title = `gallery image ${i}`;
    t.onclick = () => show(features.subarray(i * dim, (i + 1) * dim), pixels.subarray(i * 3072), i);
    picks.append(t);
  }
  drop.querySelector('input').onchange = async (e) => {
    const chw = await pictureBytes(e.target.files[0]);
    show(await embedImages(encoder, normalizeImages(chw), 1), chw, -1);
  };
  el.dcl = { status: 'ready', gallery: count, dim, imagesPerSec, pick: (i) => picks.children[i].onclick() };
  note(el, `${count} gallery images embedded by the WGSL engine (${dim}-d features, ${imagesPerSec.toFixed(0)} images/s). Pick one:`);
}

/// 2-D embeddings of a few samples: view 1 (anchors, filled) and view 2 (positives, rings).
const EXPLORER_ANGLES = [[0.3, 0.6], [2.2, 2.0], [3.6, 4.1], [5.0, 5.5]];

/// `gpuProblem`: why WebGPU is unusable (the losses then come from the CPU), or null.
async function lossExplorer(el, gpuProblem) {
  const backend = gpuProblem ? 'cpu' : 'webgpu';
  const lossOf = gpuProblem ? hostLoss : fusedLoss;
  const canvas = document.createElement('canvas');
  canvas.width = canvas.height = 320;
  const readout = document.createElement('pre');
  const kindSelect = document.createElement('select');
  kindSelect.innerHTML = '<option value="dcl">DCL</option><option value="dclw">DCLW</option><option value="infonce">InfoNCE</option>';
  const temperature = Number(el.dataset.temperature || 0.5);
  el.append(canvas, kindSelect, readout);
  const angles = EXPLORER_ANGLES.map((a) => a.slice());
  const n = angles.length;
  const points = () => [0, 1].map((v) => Float32Array.from(angles.flatMap((a) => [Math.cos(a[v]), Math.sin(a[v])])));
  const r = 120;
  const [cx, cy] = [160, 160];
  // Latest wins: drags arrive faster than the GPU answers, so while one computation runs, later
  // moves only mark the state dirty and one more computation follows.
  let inFlight = null;
  let dirty = false;
  function update() {
    if (inFlight) {
      dirty = true;
      return inFlight;
    }
    inFlight = (async () => {
      do {
        dirty = false;
        await compute();
      } while (dirty);
      inFlight = null;
    })();
    return inFlight;
  }
  async function compute() {
    const [z1, z2] = points();
    const results = {};
    for (const kind of ['dcl', 'dclw', 'infonce']) results[kind] = await lossOf(z1, z2, n, 2, kind, temperature, 0.5);
    draw(z1, z2, results[kindSelect.value]);
    readout.textContent = ['dcl', 'dclw', 'infonce']
      .map((k) => `${k.padEnd(8)} loss ${results[k].loss.toFixed(4)}`)
      .join('\n');
    el.dcl = { ...api, status: 'ready', backend, angles, losses: Object.fromEntries(Object.entries(results).map(([k, v]) => [k, v.loss])), gradients: results };
  }
  function draw(z1, z2, out) {
    const ctx = canvas.getContext('2d');
    ctx.clearRect(0, 0, 320, 320);
    ctx.strokeStyle = '#bbb';
    ctx.beginPath();
    ctx.arc(cx, cy, r, 0, 2 * Math.PI);
    ctx.stroke();
    [[z1, out.gradZ1, true], [z2, out.gradZ2, false]].forEach(([z, g, filled]) => {
      for (let i = 0; i < n; i++) {
        const [x, y] = [cx + r * z[2 * i], cy - r * z[2 * i + 1]];
        // The arrow is the descent direction -dL/dz: where the optimizer pushes this embedding.
        const scale = 60;
        ctx.strokeStyle = PALETTE[i];
        ctx.beginPath();
        ctx.moveTo(x, y);
        ctx.lineTo(x - scale * g[2 * i], y + scale * g[2 * i + 1]);
        ctx.stroke();
        ctx.beginPath();
        ctx.arc(x, y, 7, 0, 2 * Math.PI);
        ctx.fillStyle = PALETTE[i];
        ctx.lineWidth = 2;
        if (filled) ctx.fill();
        else ctx.stroke();
      }
    });
  }
  let dragging = null;
  canvas.onpointerdown = (e) => {
    const [z1, z2] = points();
    let best = 14;
    [z1, z2].forEach((z, v) => {
      for (let i = 0; i < n; i++) {
        const d = Math.hypot(e.offsetX - (cx + r * z[2 * i]), e.offsetY - (cy - r * z[2 * i + 1]));
        if (d < best) [best, dragging] = [d, [i, v]];
      }
    });
  };
  canvas.onpointermove = (e) => {
    if (!dragging) return;
    angles[dragging[0]][dragging[1]] = Math.atan2(cy - e.offsetY, e.offsetX - cx);
    update();
  };
  canvas.onpointerup = () => (dragging = null);
  kindSelect.onchange = update;
  // Scripts (and tests) move a point with `element.dcl.set(sample, view, angle)`.
  const api = { set: (i, view, angle) => { angles[i][view] = angle; return update(); } };
  el.dcl = { ...api, status: 'loading' };
  await ready;
  await update();
  const where = gpuProblem ? ' Computed on the CPU: this browser has no usable WebGPU.' : '';
  note(el, `Drag the dots. Filled: anchors (view 1); rings: their positives (view 2); same colour, same image. Arrows: -dL/dz, temperature ${temperature}.${where}`);
}

function train(el) {
  const frame = document.createElement('iframe');
  const url = new URL('../index.html', import.meta.url);
  if (el.dataset.config) url.hash = `config=${encodeURIComponent(el.dataset.config)}`;
  frame.src = url;
  frame.title = 'dcl playground';
  frame.style.width = '100%';
  frame.style.height = el.dataset.height || '720px';
  frame.style.border = '1px solid #ccc';
  el.append(frame);
  el.dcl = { status: 'ready', frame };
}

const WIDGETS = { retrieval, 'loss-explorer': lossExplorer, train };

/// Mounts one element; errors land in the element, named.
export async function mount(el) {
  const widget = WIDGETS[el.dataset.dcl];
  if (!widget) return note(el, `unknown data-dcl="${el.dataset.dcl}": expected ${Object.keys(WIDGETS).join(', ')}`, true);
  // The playground in the box checks for itself; the explorer falls back to the CPU.
  const problem = widget === train ? null : await webGpuProblem();
  if (problem && widget === retrieval) {
    el.dcl = { status: 'no-webgpu', error: problem };
    return note(el, problem, true);
  }
  try {
    await widget(el, problem);
  } catch (e) {
    el.dcl = { status: 'error', error: String(e.message || e) };
    note(el, el.dcl.error, true);
  }
}

document.querySelectorAll('[data-dcl]').forEach(mount);
