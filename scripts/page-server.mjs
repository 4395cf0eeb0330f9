// What the browser tests and the page's scripts (bench-page.mjs, profile-page.mjs) share: the page
// served by `dcl serve` on a free port, Debian's Chromium to open it (software WebGPU through
// SwiftShader here), and the scripts' timed run.
import { spawn } from 'node:child_process';
import { chromium } from 'playwright-core';

const FLAGS = [
  '--no-first-run', '--disable-background-networking', '--disable-component-update',
  '--disable-sync', '--disable-quic',
];

/// `dcl serve` of `root` with Fashion-MNIST: resolves to { server, url } once it listens.
export function servePage(dcl, root = process.cwd()) {
  const server = spawn(dcl, ['serve', '--port', '0', '--data', 'fashion-mnist'],
    { cwd: root, stdio: ['ignore', 'pipe', 'inherit'] });
  return new Promise((resolve, reject) => {
    server.stdout.once('data', (line) => {
      const found = String(line).match(/http:\/\/[\d.:]+/);
      found ? resolve({ server, url: found[0] }) : reject(new Error(`dcl serve said: ${line}`));
    });
    server.once('exit', (code) => reject(new Error(`dcl serve exited with ${code}`)));
  });
}

/// Headless Chromium, with WebGPU when `webgpu`.
export function launchChromium(webgpu) {
  return chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: [...FLAGS, ...(webgpu ? ['--enable-unsafe-webgpu'] : [])],
  });
}

/// The native `dcl` the scripts serve the page with: $DCL_BIN, else the build's.
export function dclBinary() {
  const target = process.env.CARGO_TARGET_DIR || `${process.env.HOME}/.cache/dcl-target`;
  return process.env.DCL_BIN || `${target}/release/dcl`;
}

/// The page's address, asking for the wasm module `simd` ('relaxed' or 'simd128') if given.
export const pageUrl = (url, simd) => (simd ? `${url}?simd=${simd}` : url);

/// The scripts' timed run: DCL, one epoch of `images` images on `device`, little evaluation.
export const timedRun = (batchSize, images, device) => ({
  batchSize, subset: images, evalImages: 64, epochs: 1, lr: 0.001, temperature: 0.1, loss: 'dcl', device,
});
