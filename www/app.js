// The playground page: controls, live charts, view pairs, the embedding scatter. Training runs in
// www/worker.js (started and asked through worker-client.js); this file holds the page's state,
// answers the worker's messages and forwards what the user does. Drawing is charts.js's, the
// autosave's store autosave.js's, the settings form form.js's, the page's words text.js's.

import { drawRgb, drawScatter as scatterOn, drawViews, legendHtml, lineChart } from './charts.js';
import { readAutosave, writeAutosave } from './autosave.js';
import { applyPreset, formConfig } from './form.js';
import { autosaveOffer, deviceName, deviceNote, knnText, slowStepNote } from './text.js';
import { TrainingWorker } from './worker-client.js';

const $ = (id) => document.getElementById(id);
const RUN_COLORS = ['#d62728', '#1f77b4', '#2ca02c', '#9467bd', '#ff7f0e', '#8c564b'];

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
  /// The SIMD of the worker's wasm module: 'relaxed' (with a fused multiply-add) or 'simd128'.
  simd: null,
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

// ---- drawing (charts.js draws; this file knows what) ----------------------------------------

function drawScatter() {
  const screen = scatterOn($('scatter'), scatter, state.dataset ? state.dataset.classes : 10);
  if (scatter) scatter.screen = screen;
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
    state.device ? `on ${deviceName(state)}` : '',
  ].filter(Boolean).join('   ');
  $('device-note').textContent = deviceNote(state);
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

// ---- the autosave (autosave.js keeps it) ---------------------------------------------------

/// Reopening the page on the same data offers to continue a run that had not finished.
async function offerAutosave() {
  const saved = await readAutosave();
  if (!saved || saved.dataset !== state.dataset?.name || saved.epoch >= saved.config.epochs) return;
  if (state.status === 'running' || runs.length) return;
  showBanner(autosaveOffer(saved), false);
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
  worker.tell({ type: 'continue', config: saved.config, epoch: saved.epoch, bytes: saved.weights });
}

/// The first step of a run that takes far longer than a step should: say what to lower instead
/// of leaving a tab that looks frozen.
function watchFirstStep() {
  clearTimeout(slowStepTimer);
  const seconds = window.dclPlayground.slowStepSeconds;
  slowStepTimer = setTimeout(() => {
    state.slowStep = true;
    showBanner(slowStepNote(state, lastConfig, seconds), false);
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
    $('legend').innerHTML = legendHtml(summary);
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
  backends({ webgpu, simd }) {
    Object.assign(state, { webgpu, simd });
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
    drawViews($('views'), pixels);
  },
  pixels({ knnTop1, knn }) {
    state.pixelsKnnTop1 = knnTop1;
    state.pixelsKnn = knn;
    runs[runs.length - 1].pixels = knnTop1;
    render();
  },
  evaluation({ epoch, knnTop1, knn, points, labels }) {
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
};
const worker = new TrainingWorker(onMessage, (e) => state.lost || fail(`the training worker failed: ${e.message}`));

// ---- user actions --------------------------------------------------------------------------

/// Starts a run of the form's settings with `overrides`. Called right at page load it waits for
/// the worker, and the worker's queue holds it until the default data has arrived.
async function start(overrides = {}) {
  await launched;
  if (!worker.started) throw new Error('the training worker did not start');
  replaceLostWorker();
  const config = { ...formConfig(), ...overrides };
  worker.tell({ type: 'start', config });
}

async function tellWorker(type) {
  await launched;
  if (worker.started) worker.tell({ type });
}

/// Parses picked, dropped or given files in the worker; resolves to the dataset's summary.
function loadFiles(files) {
  const name = files.map((f) => f.name).join(', ');
  return worker.ask({ type: 'files', name, files }, files.map((f) => f.bytes)).catch((e) => {
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
  const bytes = await worker.ask({ type: 'save' });
  const url = URL.createObjectURL(new Blob([bytes], { type: 'application/octet-stream' }));
  const a = Object.assign(document.createElement('a'), { href: url, download: 'model.safetensors' });
  a.click();
  URL.revokeObjectURL(url);
  return bytes;
}

/// Loads a model.safetensors into the current run (paused first); resolves to its kNN top-1.
function loadWeights(name, bytes) {
  worker.tell({ type: 'pause' });
  return worker.ask({ type: 'load', name, bytes }, [bytes]);
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
  const { images } = await worker.ask({ type: 'neighbors', index: best, k: 8 });
  const ctx = $('neighbors').getContext('2d');
  ctx.clearRect(0, 0, 400, 60);
  images.forEach((rgb, i) => drawRgb(ctx, rgb, 0, 4 + i * 48 + (i ? 8 : 0), 6, 44));
}

function wire() {
  $('start').onclick = () => start().catch((e) => fail(e.message));
  $('pause').onclick = () => worker.tell({ type: state.status === 'paused' ? 'resume' : 'pause' });
  $('reset').onclick = () => {
    worker.tell({ type: 'pause' });
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

async function main() {
  wire();
  render();
  worker.launch();
}

/// After a lost GPU the worker's wasm module holds a dead device: a new worker gets a new one.
function replaceLostWorker() {
  if (!state.lost) return;
  state.lost = null;
  worker.replace();
}

const askLoss = (fused) => (z1, z2, n, d, kind = 'dcl', temperature = 0.1, sigma = 0.5) =>
  worker.ask({ type: 'loss', z1: Array.from(z1), z2: Array.from(z2), n, d, kind, temperature, sigma, fused });

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
  // The loss of two [n, d] embeddings through Burn on WebGPU (a number), and through the fused
  // WGSL kernel ({loss, gradZ1, gradZ2}).
  loss: askLoss(false),
  fusedLoss: askLoss(true),
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
