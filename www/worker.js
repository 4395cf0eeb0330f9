// The training loop, off the page's main thread. It owns the wasm module (Burn on WebGPU or on
// the CPU) and talks to www/app.js by messages: the page stays responsive while a step runs.
import { fetchServedFiles, hasRelaxedSimd, webGpuAdapter } from './common.js';

// The wasm module: www/pkg-relaxed where the browser has relaxed SIMD (a fused multiply-add in
// the CPU path's matrix products), www/pkg elsewhere (a module with it does not compile there).
let dcl = null;

let dataset = null;
let run = null;
let paused = true;
let looping = false;
// Every call into the run goes through this chain: a step awaiting the GPU must not overlap
// another call on the same run (save, neighbours, evaluation).
let chain = Promise.resolve();
const exclusive = (fn) => (chain = chain.then(fn, fn));

const post = (message, transfer = []) => self.postMessage(message, transfer);
const VIEW_PAIRS = 8;
// The WebGPU devices the wasm module asked for: watched for loss, and destroyed on request (to
// simulate a lost GPU in tests and tutorials).
const devices = [];
let deviceLost = false;
// What WebGPU offers here (common.js `webGpuAdapter`), probed once; Burn starts on it on first use.
let webgpu = null;
let webGpuStarted = false;

async function setup(requested) {
  webgpu = await webGpuAdapter();
  const simd = wasmSimd(requested);
  dcl = await import(simd === 'relaxed' ? './pkg-relaxed/dcl.js' : './pkg/dcl.js');
  await dcl.default();
  post({ type: 'backends', webgpu, simd });
}

/// The SIMD of the module to load: what the page's address asks for (`?simd=simd128` or
/// `relaxed`), else the fastest this browser runs.
function wasmSimd(requested) {
  const relaxed = hasRelaxedSimd();
  if (requested == null) return relaxed ? 'relaxed' : 'simd128';
  if (requested === 'simd128' || (requested === 'relaxed' && relaxed)) return requested;
  throw new Error(`?simd=${requested}: ${requested === 'relaxed' ? 'this browser has no relaxed SIMD' : 'expected simd128 or relaxed'}`);
}

/// Burn on the browser's WebGPU, started when a run or a loss first needs it: a run on the CPU
/// never asks for a GPU device.
async function startWebGpu() {
  if (webgpu.problem) throw new Error(`WebGPU is not available here (${webgpu.problem}): train on the CPU`);
  if (webGpuStarted) return;
  watchDevices();
  await dcl.initWebGpu();
  webGpuStarted = true;
}

/// The device a run trains on ('cpu' or 'wgpu') and why. `requested` is 'cpu', 'wgpu' or 'auto':
/// a GPU adapter when there is one; the CPU path when WebGPU is missing or emulated in software,
/// where it trains tens of times faster than the emulated GPU.
async function chooseDevice(requested = 'auto') {
  if (requested === 'cpu') return { device: 'cpu', reason: 'picked in the form' };
  if (requested === 'wgpu') {
    await startWebGpu();
    return { device: 'wgpu', reason: `picked in the form (${webgpu.name})` };
  }
  if (requested !== 'auto') throw new Error(`bad playground config: device "${requested}" is not auto, cpu or wgpu`);
  if (webgpu.problem) return { device: 'cpu', reason: webgpu.problem };
  if (webgpu.software) {
    return { device: 'cpu', reason: `the WebGPU adapter (${webgpu.name}) emulates a GPU on the CPU, slower than this path` };
  }
  await startWebGpu();
  return { device: 'wgpu', reason: `the WebGPU adapter ${webgpu.name}` };
}

/// Wraps `navigator.gpu.requestAdapter` so that every device wgpu makes is known here: a lost
/// device (driver reset, GPU process crash, `destroy()`) stops the run with a message the page
/// can act on, instead of a step that never returns.
function watchDevices() {
  const gpu = navigator.gpu;
  const requestAdapter = gpu.requestAdapter.bind(gpu);
  gpu.requestAdapter = async (options) => {
    const adapter = await requestAdapter(options);
    if (!adapter) return adapter;
    const info = adapter.info || {};
    const name = [info.vendor, info.architecture, info.description].filter(Boolean).join(' ');
    post({ type: 'adapter', name: name || 'unnamed adapter' });
    const requestDevice = adapter.requestDevice.bind(adapter);
    adapter.requestDevice = async (descriptor) => {
      const device = await requestDevice(descriptor);
      devices.push(device);
      device.lost.then((lost) => {
        paused = true;
        deviceLost = true;
        post({ type: 'device-lost', reason: lost.reason, message: lost.message || 'no details' });
      });
      return device;
    };
    return adapter;
  };
}

/// The dataset `dcl serve` found on disk (CIFAR-10 if present, else Fashion-MNIST or MNIST).
async function loadServerData() {
  let served;
  try {
    served = await fetchServedFiles(new URL('../data/', import.meta.url));
  } catch (e) {
    post({ type: 'dataset', summary: null, message: e.message });
    return;
  }
  useDataset(dcl.WebDataset.fromFiles(served.name, served.files, served.contents), 'served by dcl serve');
}

function useDataset(next, source) {
  if (dataset) dataset.free();
  dataset = next;
  post({ type: 'dataset', summary: dataset.summary(), source });
}

/// The page's message for an evaluation event (the run's keys are snake_case, as in
/// `metrics.jsonl`; the page's messages camelCase).
function evaluation({ epoch, knn_top1, knn, points, labels }) {
  return { type: 'evaluation', epoch, knnTop1: knn_top1, knn, points, labels };
}

/// Posts one event of the run (the crate's run driver decides what comes next: a step, the
/// evaluation that closes an epoch, the end).
function report(event, pixels) {
  if (event.event === 'step') {
    if (pixels.length) post({ type: 'views', pixels }, [pixels.buffer]);
    const { epoch, step, loss } = event;
    post({ type: 'step', epoch, step, loss, imagesPerSec: event.images_per_sec });
  } else if (event.event === 'pixels') {
    post({ type: 'pixels', knnTop1: event.knn_top1, knn: event.knn });
  } else if (event.event === 'evaluation') {
    post(evaluation(event));
  } else if (event.event === 'finished') {
    paused = true;
    post({ type: 'status', status: 'done' });
  }
}

/// Pumps the run one event at a time, each inside the exclusive chain.
async function loop() {
  if (looping) return;
  looping = true;
  try {
    while (run && !paused) {
      const [event, pixels] = await exclusive(async () => {
        const pixels = run.upcomingViews(VIEW_PAIRS);
        return [await run.advance(), pixels];
      });
      report(event, pixels);
      // The session's checkpoint moment: epoch `event.epoch` (from 1) is trained and evaluated.
      if (event.event === 'epoch') await autosave(event.epoch);
      // Let queued messages (pause, save, clicks) in between events.
      await new Promise((resolve) => setTimeout(resolve, 0));
    }
  } catch (e) {
    paused = true;
    // A lost device fails the step in flight; the page hears of the loss itself.
    if (!deviceLost) post({ type: 'error', message: String(e.message || e), paused: true });
  } finally {
    looping = false;
  }
}

/// The weights after each epoch, for the page to keep (IndexedDB): a lost GPU or a closed tab
/// can continue from there.
async function autosave(epoch) {
  const bytes = await exclusive(() => run.saveSafetensors());
  post({ type: 'autosave', epoch, config: run.config(), bytes }, [bytes.buffer]);
}

/// A new run of `config`; with `from` ({epoch, bytes}), it continues after that epoch from
/// those weights.
async function start(config, from) {
  if (!dataset) throw new Error('no dataset loaded yet: pick a CIFAR-10 archive or wait for the default');
  paused = true;
  await chain;
  if (run) run.free();
  run = null;
  const { device, reason } = await chooseDevice(config.device);
  run = new dcl.Playground(dataset, { ...config, device });
  if (from) await exclusive(() => run.continueFrom(from.epoch, 'the autosave', new Uint8Array(from.bytes)));
  post({ type: 'started', stepsPerEpoch: run.stepsPerEpoch(), config: run.config(), from: from?.epoch, device, reason });
  paused = false;
  post({ type: 'status', status: 'running' });
  loop();
}

const handlers = {
  async init({ simd }) {
    await setup(simd);
    // The form's device starts at 'auto': the worker picks one per run (`chooseDevice`).
    post({ type: 'defaults', config: { ...dcl.Playground.defaults(), device: 'auto' } });
    post({ type: 'status', status: 'ready' });
    await loadServerData();
  },
  async files({ id, name, files }) {
    const next = dcl.WebDataset.fromFiles(
      name,
      files.map((f) => f.name),
      files.map((f) => new Uint8Array(f.bytes)),
    );
    useDataset(next, 'from your file');
    if (id !== undefined) post({ type: 'reply', id, value: dataset.summary() });
  },
  start: ({ config }) => start(config),
  continue: ({ config, epoch, bytes }) => start(config, { epoch, bytes }),
  loseDevice() {
    deviceLost = true;
    for (const device of devices) device.destroy();
  },
  pause() {
    paused = true;
    post({ type: 'status', status: 'paused' });
  },
  resume() {
    if (!run) return;
    paused = false;
    post({ type: 'status', status: 'running' });
    loop();
  },
  async save({ id }) {
    if (!run) throw new Error('nothing to save: start a run first');
    const bytes = await exclusive(() => run.saveSafetensors());
    post({ type: 'reply', id, value: bytes }, [bytes.buffer]);
  },
  async load({ id, name, bytes }) {
    if (!run) throw new Error('start a run with the same model first, then load weights into it');
    const event = await exclusive(() => run.loadSafetensors(name, new Uint8Array(bytes)));
    post(evaluation(event));
    post({ type: 'reply', id, value: event.knn_top1 });
  },
  async neighbors({ id, index, k }) {
    if (!run) throw new Error('no run yet: start one, then click a point');
    const value = await exclusive(() => {
      const indices = Array.from(run.neighbors(index, k));
      return { indices, images: indices.map((i) => run.testImage(i)) };
    });
    post({ type: 'reply', id, value });
  },
  async loss({ id, z1, z2, n, d, kind, temperature, sigma, fused }) {
    await startWebGpu();
    const compute = fused ? dcl.fusedLoss : dcl.lossValue;
    const value = await compute(new Float32Array(z1), new Float32Array(z2), n, d, kind, temperature, sigma);
    post({ type: 'reply', id, value });
  },
};

// One message at a time, in the order sent: a pause sent right after a start applies to that
// run, and a start sent before the default data arrived waits for it.
let inbox = Promise.resolve();
self.onmessage = ({ data }) => {
  inbox = inbox.then(() => handle(data));
};

async function handle(data) {
  try {
    await handlers[data.type](data);
  } catch (e) {
    const message = String(e.message || e);
    post(data.id !== undefined ? { type: 'reply', id: data.id, error: message } : { type: 'error', message });
  }
}
