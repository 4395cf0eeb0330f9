// What the page says in words: the kNN figures, which device trains and why.

/// `k=20 78.1%, k=200 75.2%`: the monitor's two k, as `dcl eval` reports them.
export function knnText(byK) {
  return Object.entries(byK || {}).map(([k, v]) => `k=${k} ${(100 * v).toFixed(1)}%`).join(', ');
}

const DEVICE_NAMES = { cpu: 'the CPU (WebAssembly)', wgpu: 'the GPU (WebGPU)' };

/// The device the run trains on, with the CPU path's SIMD.
export function deviceName({ device, simd }) {
  if (device === 'cpu' && simd) return `the CPU (WebAssembly, ${simd === 'relaxed' ? 'relaxed SIMD' : 'SIMD128'})`;
  return DEVICE_NAMES[device];
}

/// Which device trains and why; before a run, what "auto" will pick.
export function deviceNote(state) {
  if (state.device) return `This run trains on ${deviceName(state)}: ${state.deviceReason}.`;
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

/// The banner that offers an unfinished autosaved run.
export function autosaveOffer(saved) {
  return `A run (${saved.curves.label}) was saved after epoch ${saved.epoch} of ${saved.config.epochs} ` +
    `on ${new Date(saved.savedAt).toLocaleString()}: "Continue the saved run" picks it up.`;
}

/// The banner for a first step that runs far longer than a step should: what to lower.
export function slowStepNote(state, config, seconds) {
  const adapter = state.adapter || 'an unnamed adapter';
  const emulated = /swiftshader/i.test(adapter) ? ', which emulates a GPU on the CPU' : '';
  const device = state.device === 'cpu' ? 'the CPU' : `this GPU (${adapter}${emulated})`;
  return `The first training step has run for ${seconds} s and is not done: a batch of ` +
    `${config.batch_size} images for ${config.model} may be too much for ${device}. ` +
    'Pause, then lower the batch size or pick resnet-mini and start again.';
}
