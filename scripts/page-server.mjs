// What the browser tests and scripts/bench-page.mjs share: the page served by `dcl serve` on a
// free port, and Debian's Chromium to open it (software WebGPU through SwiftShader here).
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
