// The playground page: controls, live charts, view pairs, the embedding scatter. Training runs in
// www/worker.js; this file only draws what the worker reports and forwards what the user does.

import { PALETTE } from './common.js';

const $ = (id) => document.getElementById(id);
const CLASS_NAMES = {
  cifar10: ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck'],
  'fashion-mnist': ['T-shirt', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt', 'sneaker', 'bag', 'boot'],
  mnist: ['0', '1', '2', '3', '4', '5', '6', '7', '8', '9'],
};
const RUN_COLORS = ['#d62728', '#1f77b4', '#2ca02c', '#9467bd', '#ff7f0e', '#8c564b'];
const classColor = (c, classes) => (classes <= 10 ? PALETTE[c] : `hsl(${(360 * c) / classes}, 65%, 45%)`);

const state = {
  status: 'loading',
  step: 0,
  epoch: 0,
  losses: [],
  knnTop1: [],
  /// The same kNN on raw pixels (the run's bank and queries).
  pixelsKnnTop1: null,
  pixelsKnn: null,
  knn: null,
  dataset: null,
  error: null,
  imagesPerSec: null,
  /// The WebGPU adapter the worker trains on (vendor, architecture, description).
  adapter: null,
  /// What WebGPU offers in this browser: {problem} or {name, software} (common.js).
  webgpu: null,
  /// The device the current run trains on ('cpu' or 'wgpu'), and why the worker picked it.
  device: null,
  deviceReason: null,
  /// The last epoch kept in IndexedDB for this run.
  autosaved: null,
  /// Why the GPU was lost, once it was.
  lost: null,
  /// Whether the first step ran past `dclPlayground.slowStepSeconds`.
  slowStep: false,
};
const runs = []; // every run of this page: { label, color, losses: [[step, loss]], knn: [[epoch, top1]] }
let scatter = null; // { points, labels }
let worker = null;
let nextId = 0;
const pending = new Map();
let lastConfig = {}; // the current run's, as the worker reported it
let restoring = null; // the curves of an autosave being continued
let slowStepTimer = null;

function setStatus(status) {
  state.status = status;
  render();
}

function showBanner(text, isError) {
  const banner = $('banner');
  banner.textContent = text;
  banner.className = isError ? 'banner error' : 'banner';
  banner.hidden = !text;
}

function fail(message) {
  state.error = message;
  showBanner(message, true);
  render();
}

function ask(message, transfer = []) {
  const id = nextId++;
  return new Promise((resolve, reject) => {
    pending.set(id, { resolve, reject });
    worker.postMessage({ ...message, id }, transfer);
  });
}

// ---- drawing -------------------------------------------------------------------------------

function lineChart(canvas, series, { xLabel, yLabel, yMin, yMax, levels = [] }) {
  const ctx = canvas.getContext('2d');
  const { width: w, height: h } = canvas;
  const pad = { l: 48, r: 10, t: 10, b: 28 };
  ctx.clearRect(0, 0, w, h);
  const all = series.flatMap((s) => s.points);
  ctx.fillStyle = '#555';
  ctx.font = '11px system-ui';
  if (!all.length) {
    ctx.fillText('waiting for the first numbers…', pad.l, h / 2);
    return;
  }
  const xs = all.map((p) => p[0]);
  const ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  let y0 = yMin ?? Math.min(...ys), y1 = yMax ?? Math.max(...ys);
  if (y1 - y0 < 1e-6) { y0 -= 0.5; y1 += 0.5; }
  const X = (x) => pad.l + ((x - x0) / (x1 - x0)) * (w - pad.l - pad.r);
  const Y = (y) => h - pad.b - ((y - y0) / (y1 - y0)) * (h - pad.t - pad.b);
  ctx.strokeStyle = '#ccc';
  ctx.beginPath();
  ctx.moveTo(pad.l, pad.t);
  ctx.lineTo(pad.l, h - pad.b);
  ctx.lineTo(w - pad.r, h - pad.b);
  ctx.stroke();
  for (const v of [y0, (y0 + y1) / 2, y1]) ctx.fillText(v.toFixed(3), 2, Y(v) + 4);
  ctx.fillText(`${x0}`, pad.l, h - 10);
  ctx.fillText(`${x1} ${xLabel}`, w - pad.r - 70, h - 10);
  ctx.fillText(yLabel, pad.l + 6, pad.t + 10);
  for (const s of series) {
    ctx.strokeStyle = s.color;
    ctx.fillStyle = s.color;
    ctx.lineWidth = s.width || 1.5;
    ctx.beginPath();
    s.points.forEach(([x, y], i) => (i ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
    ctx.stroke();
    if (s.dots) s.points.forEach(([x, y]) => ctx.fillRect(X(x) - 2, Y(y) - 2, 4, 4));
  }
  for (const level of levels) {
    ctx.strokeStyle = level.color;
    ctx.fillStyle = level.color;
    ctx.lineWidth = 1;
    ctx.setLineDash([5, 4]);
    ctx.beginPath();
    ctx.moveTo(pad.l, Y(level.value));
    ctx.lineTo(w - pad.r, Y(level.value));
    ctx.stroke();
    ctx.setLineDash([]);
    ctx.fillText(level.label, pad.l + 4, Y(level.value) - 4);
  }
  series.forEach((s, i) => {
    ctx.fillStyle = s.color;
    ctx.fillText(s.label, w - pad.r - 200, pad.t + 12 + 13 * i);
  });
}

function drawRgb(ctx, rgb, offset, x, y, size) {
  const image = new ImageData(32, 32);
  for (let i = 0; i < 1024; i++) {
    image.data.set([rgb[offset + 3 * i], rgb[offset + 3 * i + 1], rgb[offset + 3 * i + 2], 255], 4 * i);
  }
  const tile = new OffscreenCanvas(32, 32);
  tile.getContext('2d').putImageData(image, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(tile, x, y, size, size);
}

function drawViews(pixels) {
  const canvas = $('views');
  const ctx = canvas.getContext('2d');
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const tiles = pixels.length / 3072;
  const size = 36;
  for (let t = 0; t < tiles; t++) {
    const pair = Math.floor(t / 2);
    drawRgb(ctx, pixels, t * 3072, 6 + pair * (2 * size + 12) + (t % 2) * (size + 1), 20, size);
  }
}

function drawScatter() {
  const canvas = $('scatter');
  const ctx = canvas.getContext('2d');
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!scatter) return;
  const { points, labels } = scatter;
  const xs = points.filter((_, i) => i % 2 === 0), ys = points.filter((_, i) => i % 2 === 1);
  const [xa, xb, ya, yb] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const m = 12;
  scatter.screen = xs.map((x, i) => [
    m + ((x - xa) / (xb - xa || 1)) * (canvas.width - 2 * m),
    m + ((ys[i] - ya) / (yb - ya || 1)) * (canvas.height - 2 * m),
  ]);
  const classes = state.dataset ? state.dataset.classes : 10;
  scatter.screen.forEach(([x, y], i) => {
    ctx.fillStyle = classColor(labels[i], classes);
    ctx.beginPath();
    ctx.arc(x, y, 3, 0, 2 * Math.PI);
    ctx.fill();
  });
}

function drawLegend() {
  const d = state.dataset;
  if (!d) return;
  const names = CLASS_NAMES[d.format === 'idx' ? d.name : d.format] || [];
  $('legend').innerHTML = names
    .map((n, c) => `<span><i style="background:${classColor(c, d.classes)}"></i>${n}</span>`)
    .join('');
}

/// `k=20 78.1%, k=200 75.2%`: the monitor's two k, as `dcl eval` reports them.
function knnText(byK) {
  return Object.entries(byK || {}).map(([k, v]) => `k=${k} ${(100 * v).toFixed(1)}%`).join(', ');
}

const DEVICE_NAMES = { cpu: 'the CPU (WebAssembly)', wgpu: 'the GPU (WebGPU)' };

/// Which device trains and why; before a run, what "auto" will pick.
function deviceNote() {
  if (state.device) return `This run trains on ${DEVICE_NAMES[state.device]}: ${state.deviceReason}.`;
  const gpu = state.webgpu;
  if (!gpu) return '';
  if (gpu.problem) {
    return `WebGPU is not available (${gpu.problem}), so runs train on the CPU in WebAssembly. For GPU ` +
      'speed, use a recent Chrome or Edge with hardware acceleration on.';
  }
  if (gpu.software) {
    return `This browser's WebGPU adapter (${gpu.name}) emulates a GPU on the CPU, so "auto" trains on ` +
      'the CPU in WebAssembly, which is faster here; pick "GPU (WebGPU)" to try the adapter anyway.';
  }
  return `"auto" trains on the GPU through WebGPU (${gpu.name}).`;
}

function render() {
  const last = state.losses.length ? state.losses[state.losses.length - 1] : null;
  const knn = state.knnTop1.length ? state.knnTop1[state.knnTop1.length - 1] : null;
  $('stats').textContent = [
    `status: ${state.status}`,
    `epoch ${state.epoch}`,
    `step ${state.step}`,
    last === null ? '' : `loss ${last.toFixed(4)}`,
    knn === null ? '' : `kNN top-1 ${knnText(state.knn)} (raw pixels ${knnText(state.pixelsKnn)})`,
    state.imagesPerSec ? `${state.imagesPerSec.toFixed(1)} images/s` : '',
    state.device ? `on ${DEVICE_NAMES[state.device]}` : '',
  ].filter(Boolean).join('   ');
  $('device-note').textContent = deviceNote();
  const running = state.status === 'running';
  $('start').disabled = !state.dataset || running;
  $('pause').disabled = !(running || state.status === 'paused');
  $('pause').textContent = state.status === 'paused' ? 'Resume' : 'Pause';
  $('reset').disabled = !runs.length;
  $('save').disabled = !runs.length;
  $('load').disabled = !runs.length;
  lineChart($('loss-chart'), runs.map((r) => ({ label: r.label, color: r.color, points: r.losses, width: 1 })), {
    xLabel: 'steps', yLabel: 'loss',
  });
  // Raw pixels under the same kNN: the level an encoder must clear to be of any use.
  const levels = runs.filter((r) => r.pixels != null).slice(-1)
    .map((r) => ({ label: `raw pixels ${(100 * r.pixels).toFixed(1)}%`, value: r.pixels, color: '#888' }));
  lineChart($('knn-chart'), runs.map((r) => ({ label: r.label, color: r.color, points: r.knn, dots: true })), {
    xLabel: 'epochs', yLabel: 'kNN top-1', yMin: 0, yMax: 1, levels,
  });
}

// ---- the autosave: the last finished epoch of the latest run, in IndexedDB ----------------

function autosaveStore(mode, use) {
  return new Promise((resolve, reject) => {
    const open = indexedDB.open('dcl-playground', 1);
    open.onupgradeneeded = () => open.result.createObjectStore('runs');
    open.onerror = () => reject(open.error);
    open.onsuccess = () => {
      const tx = open.result.transaction('runs', mode);
      const request = use(tx.objectStore('runs'));
      tx.oncomplete = () => {
        open.result.close();
        resolve(request.result);
      };
      tx.onerror = () => reject(tx.error);
    };
  });
}

const writeAutosave = (record) => autosaveStore('readwrite', (runs) => runs.put(record, 'latest'));
const readAutosave = () => autosaveStore('readonly', (runs) => runs.get('latest')).catch(() => undefined);

/// Reopening the page on the same data offers to continue a run that had not finished.
async function offerAutosave() {
  const saved = await readAutosave();
  if (!saved || saved.dataset !== state.dataset?.name || saved.epoch >= saved.config.epochs) return;
  if (state.status === 'running' || runs.length) return;
  showBanner(`A run (${saved.curves.label}) was saved after epoch ${saved.epoch} of ${saved.config.epochs} ` +
    `on ${new Date(saved.savedAt).toLocaleString()}: "Continue the saved run" picks it up.`, false);
  $('continue').textContent = 'Continue the saved run';
  $('continue').hidden = false;
}

/// Continues the autosaved run (after a lost GPU: in a new worker, with a new device). Without
/// an autosave (the GPU was lost before an epoch ended), the same run starts again.
async function continueSaved() {
  await launched;
  const saved = await readAutosave();
  replaceLostWorker();
  $('continue').hidden = true;
  showBanner('');
  if (!saved || saved.dataset !== state.dataset?.name) return start(lastConfig);
  restoring = saved.curves;
  worker.postMessage({ type: 'continue', config: saved.config, epoch: saved.epoch, bytes: saved.weights });
}

/// The first step of a run that takes far longer than a step should: say what to lower instead
/// of leaving a tab that looks frozen.
function watchFirstStep() {
  clearTimeout(slowStepTimer);
  const seconds = window.dclPlayground.slowStepSeconds;
  slowStepTimer = setTimeout(() => {
    const adapter = state.adapter || 'an unnamed adapter';
    const emulated = /swiftshader/i.test(adapter) ? ', which emulates a GPU on the CPU' : '';
    const device = state.device === 'cpu' ? 'the CPU' : `this GPU (${adapter}${emulated})`;
    state.slowStep = true;
    showBanner(`The first training step has run for ${seconds} s and is not done: a batch of ` +
      `${lastConfig.batch_size} images for ${lastConfig.model} may be too much for ${device}. ` +
      'Pause, then lower the batch size or pick resnet-mini and start again.', false);
  }, seconds * 1000);
}

// ---- worker messages -----------------------------------------------------------------------

const onMessage = {
  /// The crate's playground preset fills the form (index.html holds no defaults of its own); a
  /// preset in the URL then overrides it.
  defaults({ config }) {
    for (const field of $('config').elements) {
      const key = field.name === 'subset' ? 'limit' : field.name.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);
      if (field.name && config[key] != null) field.value = config[key];
    }
    try {
      applyPreset();
    } catch (e) {
      fail(e.message);
    }
  },
  status({ status }) {
    setStatus(status);
  },
  dataset({ summary, source, message }) {
    if (!summary) {
      $('dataset').textContent = `No dataset on the server (${message}). Pick or drop a CIFAR-10 archive.`;
      setStatus('ready');
      return;
    }
    state.dataset = summary;
    $('dataset').textContent = `Using ${summary.name} (${source}): ${summary.trainImages} training and ` +
      `${summary.testImages} test images, ${summary.classes} classes, stored ${summary.shape.join('x')}.`;
    drawLegend();
    render();
    offerAutosave();
  },
  started({ config, from, device, reason }) {
    lastConfig = config;
    Object.assign(state, { device, deviceReason: reason });
    const color = RUN_COLORS[runs.length % RUN_COLORS.length];
    const run = { label: `${config.loss} b${config.batch_size} t${config.temperature}`, color, losses: [], knn: [] };
    Object.assign(state, { step: 0, epoch: 0, losses: [], knnTop1: [], error: null, autosaved: null, slowStep: false });
    if (from != null && restoring) {
      Object.assign(run, { losses: restoring.runLosses, knn: restoring.runKnn, pixels: restoring.pixels });
      Object.assign(state, {
        epoch: from, step: restoring.runLosses.length, losses: restoring.losses, knnTop1: restoring.knnTop1,
        pixelsKnnTop1: restoring.pixels, autosaved: from,
      });
      restoring = null;
      watchFirstStep();
    }
    runs.push(run);
    showBanner('');
    render();
  },
  adapter({ name }) {
    state.adapter = name;
  },
  backends({ webgpu }) {
    state.webgpu = webgpu;
    render();
  },
  autosave({ epoch, config, bytes }) {
    const run = runs[runs.length - 1];
    // Copies: the run goes on while IndexedDB opens.
    const curves = structuredClone({
      label: run.label, runLosses: run.losses, runKnn: run.knn, pixels: run.pixels,
      losses: state.losses, knnTop1: state.knnTop1,
    });
    const record = { epoch, config, weights: bytes, dataset: state.dataset?.name, savedAt: Date.now(), curves };
    writeAutosave(record)
      .then(() => { state.autosaved = epoch; render(); })
      .catch((e) => console.warn(`the autosave of epoch ${epoch} failed: ${e.message}`));
  },
  'device-lost'({ reason, message }) {
    clearTimeout(slowStepTimer);
    state.status = 'lost';
    state.lost = `${reason}: ${message}`;
    state.error = null; // what the failing step said before the loss was known
    const from = state.autosaved ? `the autosave of epoch ${state.autosaved}` : 'the start (no epoch had ended)';
    showBanner(`The GPU was lost (${state.lost}) at epoch ${state.epoch}, step ${state.step}. ` +
      `Resume continues from ${from} on a new device.`, true);
    $('continue').textContent = 'Resume';
    $('continue').hidden = false;
    render();
  },
  step({ step, epoch, loss, imagesPerSec }) {
    clearTimeout(slowStepTimer);
    const run = runs[runs.length - 1];
    state.losses.push(loss);
    Object.assign(state, { step: step + 1, epoch, imagesPerSec });
    run.losses.push([step + 1, loss]);
    render();
  },
  views({ pixels }) {
    drawViews(pixels);
  },
  pixels({ knnTop1, knn }) {
    state.pixelsKnnTop1 = knnTop1;
    state.pixelsKnn = knn;
    runs[runs.length - 1].pixels = knnTop1;
    render();
  },
  epoch({ epoch, knnTop1, knn, points, labels }) {
    // The evaluation before training is done: the first step starts now.
    if (epoch === 0 && state.step === 0 && state.status === 'running') watchFirstStep();
    state.knnTop1.push(knnTop1);
    state.knn = knn;
    state.epoch = epoch;
    runs[runs.length - 1].knn.push([epoch, knnTop1]);
    scatter = { points, labels };
    drawScatter();
    render();
  },
  error({ message, paused }) {
    // After a lost device the worker's failures are expected; Resume starts a new one.
    if (state.lost) return;
    clearTimeout(slowStepTimer);
    fail(paused ? `The run paused: ${message}. The curves and the last weights are kept; ` +
      'lower the batch size or the model size, then resume or start again.' : message);
    if (paused) setStatus('paused');
  },
  reply({ id, value, error }) {
    const p = pending.get(id);
    pending.delete(id);
    if (error) p.reject(new Error(error)); else p.resolve(value);
  },
};

// ---- user actions --------------------------------------------------------------------------

function formConfig() {
  const form = new FormData($('config'));
  const numbers = ['temperature', 'sigma', 'batchSize', 'lr', 'epochs', 'subset', 'seed'];
  const config = Object.fromEntries([...form.entries()].filter(([, value]) => value !== ''));
  for (const key of numbers) if (key in config) config[key] = Number(config[key]);
  return config;
}

/// Starts a run of the form's settings with `overrides`. Called right at page load it waits for
/// the worker, and the worker's queue holds it until the default data has arrived.
async function start(overrides = {}) {
  await launched;
  if (!worker) throw new Error('the training worker did not start');
  replaceLostWorker();
  const config = { ...formConfig(), ...overrides };
  worker.postMessage({ type: 'start', config });
}

async function tellWorker(type) {
  await launched;
  if (worker) worker.postMessage({ type });
}

/// Parses picked, dropped or given files in the worker; resolves to the dataset's summary.
function loadFiles(files) {
  const name = files.map((f) => f.name).join(', ');
  return ask({ type: 'files', name, files }, files.map((f) => f.bytes)).catch((e) => {
    fail(`${e.message}. Pick cifar-10-binary.tar.gz, its data_batch_*.bin files, or MNIST-style IDX files.`);
    throw e;
  });
}

async function readFiles(fileList) {
  const files = [];
  for (const f of fileList) files.push({ name: f.name, bytes: await f.arrayBuffer() });
  await loadFiles(files).catch(() => {});
}

async function save() {
  const bytes = await ask({ type: 'save' });
  const url = URL.createObjectURL(new Blob([bytes], { type: 'application/octet-stream' }));
  const a = Object.assign(document.createElement('a'), { href: url, download: 'model.safetensors' });
  a.click();
  URL.revokeObjectURL(url);
  return bytes;
}

/// Loads a model.safetensors into the current run (paused first); resolves to its kNN top-1.
function loadWeights(name, bytes) {
  worker.postMessage({ type: 'pause' });
  return ask({ type: 'load', name, bytes }, [bytes]);
}

async function showNeighbors(event) {
  if (!scatter || !scatter.screen) return;
  const rect = event.target.getBoundingClientRect();
  const [x, y] = [event.clientX - rect.left, event.clientY - rect.top];
  let best = 0;
  scatter.screen.forEach(([px, py], i) => {
    const [bx, by] = scatter.screen[best];
    if ((px - x) ** 2 + (py - y) ** 2 < (bx - x) ** 2 + (by - y) ** 2) best = i;
  });
  const { images } = await ask({ type: 'neighbors', index: best, k: 8 });
  const ctx = $('neighbors').getContext('2d');
  ctx.clearRect(0, 0, 400, 60);
  images.forEach((rgb, i) => drawRgb(ctx, rgb, 0, 4 + i * 48 + (i ? 8 : 0), 6, 44));
}

function wire() {
  $('start').onclick = () => start().catch((e) => fail(e.message));
  $('pause').onclick = () => worker.postMessage({ type: state.status === 'paused' ? 'resume' : 'pause' });
  $('reset').onclick = () => {
    worker.postMessage({ type: 'pause' });
    runs.length = 0;
    scatter = null;
    Object.assign(state, { step: 0, epoch: 0, losses: [], knnTop1: [], error: null, device: null, deviceReason: null });
    drawScatter();
    setStatus('ready');
  };
  $('save').onclick = () => save().catch((e) => fail(e.message));
  $('continue').onclick = () => continueSaved().catch((e) => fail(e.message));
  $('load').onchange = async (e) => {
    const file = e.target.files[0];
    if (file) await loadWeights(file.name, await file.arrayBuffer()).catch((err) => fail(err.message));
  };
  $('file').onchange = (e) => readFiles(e.target.files);
  $('scatter').onclick = (e) => showNeighbors(e).catch((err) => fail(err.message));
  const drop = $('drop');
  document.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
  document.addEventListener('dragleave', () => drop.classList.remove('over'));
  document.addEventListener('drop', (e) => {
    e.preventDefault();
    drop.classList.remove('over');
    readFiles(e.dataTransfer.files);
  });
}

/// A preset from the URL (`index.html#config={"loss":"dclw",...}`, as the `train` embed writes
/// it) fills the form's matching fields.
function applyPreset() {
  const match = location.hash.match(/config=([^&]*)/);
  if (!match) return;
  const preset = JSON.parse(decodeURIComponent(match[1]));
  for (const [key, value] of Object.entries(preset)) {
    const field = $('config').elements[key];
    if (!field) throw new Error(`preset field "${key}" is not a playground setting`);
    field.value = value;
  }
}

async function main() {
  wire();
  render();
  launchWorker();
}

/// After a lost GPU the worker's wasm module holds a dead device: a new worker gets a new one.
function replaceLostWorker() {
  if (!state.lost) return;
  worker.terminate();
  state.lost = null;
  launchWorker();
}

function launchWorker() {
  worker = new Worker(new URL('./worker.js', import.meta.url), { type: 'module' });
  worker.onmessage = ({ data }) => onMessage[data.type](data);
  worker.onerror = (e) => state.lost || fail(`the training worker failed: ${e.message}`);
  worker.postMessage({ type: 'init' });
}

// The automation hook for tests and tutorials.
window.dclPlayground = {
  start,
  pause: () => tellWorker('pause'),
  resume: () => tellWorker('resume'),
  state: () => structuredClone({ ...state }),
  // [{name, bytes: ArrayBuffer}] -> the dataset's summary, or an error naming the bad file.
  loadFiles: (files) => loadFiles(files.map((f) => ({ name: f.name, bytes: f.bytes.buffer ?? f.bytes }))),
  save,
  // Bytes of a model.safetensors (ArrayBuffer or Uint8Array) into the current run -> kNN top-1.
  loadWeights: (bytes, name = 'model.safetensors') => loadWeights(name, (bytes.buffer ?? bytes).slice(0)),
  // The loss of two [n, d] embeddings through Burn on WebGPU (a number)...
  loss: (z1, z2, n, d, kind = 'dcl', temperature = 0.1, sigma = 0.5) =>
    ask({ type: 'loss', z1: Array.from(z1), z2: Array.from(z2), n, d, kind, temperature, sigma }),
  // ...and through the fused WGSL kernel: {loss, gradZ1, gradZ2}.
  fusedLoss: (z1, z2, n, d, kind = 'dcl', temperature = 0.1, sigma = 0.5) =>
    ask({ type: 'loss', z1: Array.from(z1), z2: Array.from(z2), n, d, kind, temperature, sigma, fused: true }),
  // The autosave IndexedDB holds ({epoch, config, dataset, savedAt, ...}), if any...
  savedRun: async () => {
    const saved = await readAutosave();
    return saved && { epoch: saved.epoch, config: saved.config, dataset: saved.dataset, savedAt: saved.savedAt };
  },
  // ...continued (the "Continue" / "Resume" button).
  continueSaved,
  // Destroys the worker's WebGPU devices: what a lost GPU looks like, for tests and tutorials.
  loseDevice: () => tellWorker('loseDevice'),
  // How long the first step may run before the page suggests a smaller batch.
  slowStepSeconds: 30,
};

// Settles once the worker exists.
const launched = main().catch((e) => fail(String(e.message || e)));
