#!/usr/bin/env node
// The page's training speed as a person sees it: `dcl serve`, headless Chromium (software WebGPU
// through SwiftShader here), one run started through `window.dclPlayground`, each step's time
// taken from the page's state. Prints a table: each step's seconds, then the steady state (steps
// 2 to the last: the first step compiles the GPU's kernels) beside the page's own figure.
//
//   node scripts/bench-page.mjs [--device wgpu|cpu] [--batch-size 8] [--steps 8] [--root DIR]
//                               [--simd relaxed|simd128]
//
// DCL_BIN is the native `dcl` (default: $CARGO_TARGET_DIR/release/dcl); --root the folder served
// (another checkout's page, to compare commits on one machine); --simd the wasm module the worker
// loads (default: the fastest this browser runs, relaxed SIMD in Chromium).
import { parseArgs } from 'node:util';
import { dclBinary, launchChromium, pageUrl, servePage, timedRun } from './page-server.mjs';

const { values: opt } = parseArgs({
  options: {
    device: { type: 'string', default: 'wgpu' },
    'batch-size': { type: 'string', default: '8' },
    steps: { type: 'string', default: '8' },
    root: { type: 'string', default: process.cwd() },
    simd: { type: 'string' },
  },
});
const batch = Number(opt['batch-size']);
const steps = Number(opt.steps);
if (!(batch >= 2 && steps >= 3)) throw new Error('--batch-size must be >= 2 and --steps >= 3');

const { server, url } = await servePage(dclBinary(), opt.root);
const browser = await launchChromium(true);
try {
  const page = await browser.newPage();
  await page.goto(pageUrl(url, opt.simd));
  await page.evaluate((c) => window.dclPlayground.start(c), timedRun(batch, batch * (steps + 1), opt.device));
  const started = Date.now();
  const seen = []; // [step, seconds since Start, the page's images/s]
  while (!seen.length || seen.at(-1)[0] < steps) {
    const s = await page.evaluate(() => window.dclPlayground.state());
    if (s.error) throw new Error(`the page reports: ${s.error}`);
    if (s.step > (seen.at(-1)?.[0] ?? 0)) seen.push([s.step, (Date.now() - started) / 1000, s.imagesPerSec]);
    await new Promise((r) => setTimeout(r, 50));
  }
  console.log(`| step | seconds since Start | seconds | the page's images/s |\n|---|---|---|---|`);
  seen.forEach(([step, at, rate], i) => console.log(`| ${step} | ${at.toFixed(2)} | ${i ? (at - seen[i - 1][1]).toFixed(2) : '-'} | ${rate.toFixed(2)} |`));
  const [first, last] = [seen.find(([step]) => step >= 1), seen.at(-1)];
  const perStep = (last[1] - first[1]) / (last[0] - first[0]);
  const { adapter, simd } = await page.evaluate(() => window.dclPlayground.state());
  const device = `${adapter ?? 'no GPU adapter'}, wasm ${simd}`;
  console.log(`\n${opt.device} (${device}), batch ${batch}: ${perStep.toFixed(3)} s a step after the first, ${(batch / perStep).toFixed(2)} images/s`);
} finally {
  await browser.close();
  server.kill();
}
