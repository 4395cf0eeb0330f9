// Helpers the page (app.js), its worker (worker.js) and the embeds (embed.js) share.

/// Category colours (matplotlib's tab10): classes on the scatter, embeddings in the explorer.
export const PALETTE = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f', '#bcbd22', '#17becf'];

/// Why WebGPU is unusable here (in a page or a worker), or null when an adapter answers.
export async function webGpuProblem() {
  return (await webGpuAdapter()).problem;
}

/// What WebGPU offers here: {problem} when it is unusable, else {name, software}, where software
/// says the adapter emulates a GPU on the CPU (SwiftShader, llvmpipe, WARP): slower at training
/// than the page's CPU path.
export async function webGpuAdapter() {
  const gpu = globalThis.navigator?.gpu;
  if (!gpu) return { problem: 'this browser has no WebGPU (navigator.gpu is missing)' };
  const adapter = await gpu.requestAdapter();
  if (!adapter) return { problem: 'WebGPU is present but requestAdapter() returned no adapter' };
  const info = adapter.info || {};
  const name = [info.vendor, info.architecture, info.description].filter(Boolean).join(' ') || 'unnamed adapter';
  const fallback = info.isFallbackAdapter ?? adapter.isFallbackAdapter ?? false;
  return { problem: null, name, software: fallback || /swiftshader|llvmpipe|lavapipe|warp|software/i.test(name) };
}

/// Whether this browser runs WebAssembly's relaxed SIMD (Chrome and Edge do): validates a
/// module whose one function is an f32x4.relaxed_madd.
export function hasRelaxedSimd() {
  const f32x4Zero = [0x43, 0, 0, 0, 0, 0xfd, 0x13]; // f32.const 0, f32x4.splat
  const body = [0, ...f32x4Zero, ...f32x4Zero, ...f32x4Zero, 0xfd, 0x85, 0x02, 0x0b]; // relaxed_madd, end
  return WebAssembly.validate(new Uint8Array([
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // "\0asm", version 1
    0x01, 0x05, 0x01, 0x60, 0x00, 0x01, 0x7b, // types: () -> v128
    0x03, 0x02, 0x01, 0x00, // one function of that type
    0x0a, body.length + 2, 0x01, body.length, ...body, // its code
  ]));
}

export async function fetchBytes(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return new Uint8Array(await response.arrayBuffer());
}

/// The dataset `dcl serve` offers under `base` (its /data/): {name, files, contents}, each file's
/// bytes fetched; throws the server's reason when it offers none.
export async function fetchServedFiles(base) {
  const manifest = await (await fetch(new URL('manifest.json', base))).json();
  if (!manifest.files) throw new Error(manifest.error || 'the server offers no dataset');
  const contents = [];
  for (const name of manifest.files) contents.push(await fetchBytes(new URL(name, base)));
  return { name: manifest.name, files: manifest.files, contents };
}
