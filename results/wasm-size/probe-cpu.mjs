// Temporary probe (not committed): the page's default run, reports steps/s on the chosen device.
import { spawn } from 'node:child_process';
import { chromium } from 'playwright-core';
const DCL = process.env.DCL_BIN;
const secs = Number(process.env.SECS || 120);
const config = JSON.parse(process.env.CONFIG || '{}');
const server = spawn(DCL, ['serve', '--port', '0', '--data', 'fashion-mnist'], { stdio: ['ignore', 'pipe', 'inherit'] });
const url = await new Promise((r) => server.stdout.once('data', (l) => r(String(l).match(/http:\/\/[\d.:]+/)[0])));
const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', args: ['--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-quic', ...(process.env.NOGPU ? [] : ['--enable-unsafe-webgpu'])] });
const page = await browser.newPage();
page.on('console', (m) => console.log('console:', m.text()));
page.on('pageerror', (e) => console.log('pageerror:', String(e)));
await page.goto(url);
const t0 = Date.now();
await page.evaluate((c) => window.dclPlayground.start(c), config);
let s;
for (;;) {
  s = await page.evaluate(() => window.dclPlayground.state());
  if (s.error) { console.log('error', s.error); break; }
  if (Date.now() - t0 > secs * 1000) break;
  await new Promise((r) => setTimeout(r, 2000));
}
console.log(JSON.stringify({ device: s.device, reason: s.deviceReason, step: s.step, epoch: s.epoch, ips: s.imagesPerSec, knn: s.knnTop1, pixels: s.pixelsKnnTop1, losses: s.losses.map((l) => +l.toFixed(4)), note: await page.textContent('#device-note'), saved: await page.evaluate(() => window.dclPlayground.savedRun()) }));
await browser.close(); server.kill();
