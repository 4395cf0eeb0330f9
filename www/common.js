// Helpers the page (app.js), its worker (worker.js) and the embeds (embed.js) share.

/// Category colours (matplotlib's tab10): classes on the scatter, embeddings in the explorer.
export const PALETTE = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f', '#bcbd22', '#17becf'];

/// Why WebGPU is unusable here (in a page or a worker), or null when an adapter answers.
export async function webGpuProblem() {
  const gpu = globalThis.navigator?.gpu;
  if (!gpu) return 'this browser has no WebGPU (navigator.gpu is missing)';
  if (!(await gpu.requestAdapter())) return 'WebGPU is present but requestAdapter() returned no adapter';
  return null;
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
