// Browser tests of the playground, run by ./test after `cargo test`: headless Chromium (Debian's
// `chromium`, software WebGPU through SwiftShader) drives the page served by `dcl serve`.
//   DCL_BIN       the native `dcl` binary (serves the page, computes the reference loss)
//   DCL_TEST_OUT  where screenshots go (default test-output/)
// One file (over 500 lines): the tests share one server and one browser, started once.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { gzipSync } from 'node:zlib';
import { join } from 'node:path';
import { launchChromium, servePage } from '../../scripts/page-server.mjs';

const DCL = process.env.DCL_BIN || 'target/release/dcl';
const OUT = process.env.DCL_TEST_OUT || 'test-output';
let server;
let url;

before(async () => {
  mkdirSync(OUT, { recursive: true });
  ({ server, url } = await servePage(DCL));
});

after(() => server && server.kill());

async function open(webgpu, query = '') {
  const browser = await launchChromium(webgpu);
  const page = await browser.newPage({ viewport: { width: 1320, height: 1100 } });
  const logs = [];
  page.on('console', (m) => logs.push(m.text()));
  page.on('pageerror', (e) => logs.push(String(e)));
  await page.goto(url + query);
  return { browser, page, logs };
}

const pageState = (page) => page.evaluate(() => window.dclPlayground.state());

async function waitFor(page, what, predicate, timeoutMs, { errorsExpected = false } = {}) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const s = await pageState(page);
    if (s.error && !errorsExpected) throw new Error(`${what}: the page reports an error: ${s.error}`);
    if (predicate(s)) return s;
    if (Date.now() > deadline) throw new Error(`${what}: gave up after ${timeoutMs / 1000} s; state ${JSON.stringify({ ...s, losses: s.losses.length })}`);
    await new Promise((r) => setTimeout(r, 500));
  }
}

/// float32 .npy (format 1.0), C order.
function npy(path, data, shape) {
  let header = `{'descr': '<f4', 'fortran_order': False, 'shape': (${shape.join(', ')}), }`;
  header += ' '.repeat(63 - ((10 + header.length) % 64)) + '\n';
  const head = Buffer.alloc(10);
  head.write('\x93NUMPY', 0, 'latin1');
  head[6] = 1;
  head.writeUInt16LE(header.length, 8);
  writeFileSync(path, Buffer.concat([head, Buffer.from(header, 'latin1'), Buffer.from(new Float32Array(data).buffer)]));
}

/// The bytes of tensor `name` in a safetensors file.
function tensorBytes(file, name) {
  const length = Number(new DataView(file.buffer, file.byteOffset).getBigUint64(0, true));
  const header = JSON.parse(new TextDecoder().decode(file.subarray(8, 8 + length)));
  const [begin, end] = header[name].data_offsets;
  return file.subarray(8 + length + begin, 8 + length + end);
}

// Software WebGPU (SwiftShader, 2 cores) takes 20-60 s for one step of resnet-mini here, so this
// test checks the wiring on WebGPU (steps run, losses are finite, the optimizer moves the weights,
// save and load, the same first loss as the CPU path, the next losses tracking native ones) and
// leaves learning to the CPU path's test.
const STEPS = 4;
const WIRING_RUN = { batchSize: 8, subset: 64, evalImages: 64, epochs: 2, lr: 0.001, temperature: 0.1, loss: 'dcl' };

test(`the page trains on WebGPU: ${STEPS} steps, finite losses, the weights move`, { timeout: 1_500_000 }, async () => {
  const { browser, page, logs } = await open(true);
  try {
    // Started right at page load, as a tutorial would: the run waits for the default data. Paused
    // at once: the untrained weights, saved before the first step.
    const before = await page.evaluate(async (config) => {
      const p = window.dclPlayground;
      await p.start({ ...config, device: 'wgpu' });
      await p.pause();
      return Array.from(await p.save());
    }, WIRING_RUN);
    assert.equal((await pageState(page)).dataset.name, 'fashion-mnist');
    await page.evaluate(() => window.dclPlayground.resume());
    const s = await waitFor(page, `${STEPS} steps`, (s) => s.step >= STEPS, 1_200_000);
    assert.equal(s.device, 'wgpu');
    assert.ok(s.losses.every(Number.isFinite), `non-finite loss in ${s.losses}`);
    assert.ok(s.knnTop1.length >= 1 && s.knnTop1[0] > 0.1, `kNN at epoch 0: ${s.knnTop1}`);
    assert.ok(s.pixelsKnnTop1 > 0.1 && s.pixelsKnnTop1 <= 1, `raw-pixel kNN: ${s.pixelsKnnTop1}`);
    await page.screenshot({ path: join(OUT, 'playground.png'), fullPage: true });
    // Save, load the file back into the run, save again: the same bytes, the CLI's format.
    const trip = await page.evaluate(async () => {
      const p = window.dclPlayground;
      await p.pause();
      const saved = await p.save();
      const knn = await p.loadWeights(saved);
      const again = await p.save();
      return {
        same: saved.length === again.length && saved.every((v, i) => v === again[i]),
        saved: Array.from(saved),
        header: new TextDecoder().decode(saved.slice(8, 4000)),
        knn,
      };
    });
    assert.ok(trip.same, 'weights saved, loaded and saved again differ');
    const [w0, w1] = [before, trip.saved].map((f) => tensorBytes(Uint8Array.from(f), 'conv1.weight'));
    assert.equal(w0.length, w1.length);
    assert.ok(w0.some((v, i) => v !== w1[i]), 'the optimizer did not move conv1.weight');
    assert.match(trip.header, /"model":"resnet-mini"/);
    assert.match(trip.header, /"layer1\.0\.bn1\.running_mean"/);
    assert.ok(trip.knn > 0.1 && trip.knn <= 1, `kNN of the loaded weights: ${trip.knn}`);
    // Clicking the scatter paints the clicked image and its nearest neighbours.
    await page.click('#scatter', { position: { x: 210, y: 210 } });
    const painted = async () => page.evaluate(() => {
      const c = document.getElementById('neighbors');
      const alpha = c.getContext('2d').getImageData(0, 0, c.width, c.height).data.filter((_, i) => i % 4 === 3);
      return alpha.filter((a) => a > 0).length;
    });
    let pixels = 0;
    for (let i = 0; i < 120 && pixels === 0; i++) {
      await new Promise((r) => setTimeout(r, 500));
      pixels = await painted();
    }
    assert.ok(pixels >= 8 * 44 * 44, `neighbours strip painted ${pixels} pixels`);
    console.log(`# WebGPU: steps ${s.step}, losses ${s.losses.map((l) => l.toFixed(4)).join(' ')}, ${s.imagesPerSec.toFixed(2)} images/s (after the first step)`);
    // The same run on the page's CPU path and in the native CLI: the same seeded weights and
    // views, so the same first loss (float32 sums in different orders aside; 1e-4 is the bar).
    await page.evaluate((config) => window.dclPlayground.start({ ...config, device: 'cpu' }), WIRING_RUN);
    const cpu = await waitFor(page, 'a step on the CPU path', (c) => c.device === 'cpu' && c.step >= 1, 300_000);
    const nativeLosses = nativeSteps(WIRING_RUN);
    const native = nativeLosses[0];
    const [gpuLoss, cpuLoss] = [s.losses[0], cpu.losses[0]];
    console.log(`# first loss: WebGPU ${gpuLoss}, the page's CPU path ${cpuLoss}, native ${native}`);
    for (const [path, loss] of [['WebGPU', gpuLoss], ['the CPU path', cpuLoss]]) {
      assert.ok(Math.abs(loss - native) <= 1e-4 * Math.abs(native), `first loss: ${path} ${loss} vs native ${native}`);
    }
    // The next steps follow the gradients: float order drifts them apart by 0.1-1.5% over three
    // Adam steps (WebGPU 2.9879 0.9713 2.0301, native 2.9898 0.9809 2.0013). With Burn's own GPU
    // convolution (its input gradient wrong, for 1x1 stride 2 at least) WebGPU gave 3.3295 1.1919
    // 1.6788: 11-22% off.
    for (let i = 1; i < STEPS; i++) {
      const [webgpu, nativeLoss] = [s.losses[i], nativeLosses[i]];
      assert.ok(Math.abs(webgpu - nativeLoss) <= 0.05 * Math.abs(nativeLoss), `loss of step ${i}: WebGPU ${webgpu} vs native ${nativeLoss}`);
    }
  } catch (e) {
    console.log(logs.slice(-20).join('\n'));
    throw e;
  } finally {
    await browser.close();
  }
});

/// The steps' losses of the page's preset with `config`, trained by the native CLI on the CPU.
function nativeSteps(config) {
  const out = mkdtempSync(join(tmpdir(), 'dcl-native-'));
  try {
    execFileSync(DCL, ['pretrain', '--data', 'fashion-mnist', '--model', 'resnet-mini', '--device', 'cpu',
      '--optimizer', 'adam', '--weight-decay', '1e-6', '--seed', '1', '--loss', config.loss,
      '--temperature', String(config.temperature), '--lr', String(config.lr), '--batch-size', String(config.batchSize),
      '--limit', String(config.subset), '--eval-images', String(config.evalImages), '--epochs', String(config.epochs),
      '--out', join(out, 'run')], { stdio: 'ignore' });
    const steps = readFileSync(join(out, 'run', 'metrics.jsonl'), 'utf8').split('\n').filter(Boolean)
      .map((line) => JSON.parse(line)).filter((e) => e.event === 'step');
    return steps.map((e) => e.loss);
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
}

// The page's default run (DCL, batch 32, resnet-mini, 2,000 Fashion-MNIST images, seed 1) on the
// CPU path that "auto" picks beside SwiftShader. Natively the same run's loss fell by 1.02-1.28
// (seeds 1-6) from the mean of its first 10 steps to that of steps 90-99; 0.5 is the bar.
const LEARNING_DROP = 0.5;

test('the default run learns on the CPU path: 100 steps, the loss falls', { timeout: 900_000 }, async () => {
  const { browser, page, logs } = await open(true);
  try {
    await page.evaluate(() => window.dclPlayground.start());
    const s = await waitFor(page, '100 steps', (s) => s.step >= 100, 600_000);
    assert.equal(s.device, 'cpu');
    assert.match(s.deviceReason, /emulates a GPU on the CPU/);
    // Chromium runs relaxed SIMD: the worker loads the module with the fused multiply-add.
    assert.equal(s.simd, 'relaxed');
    assert.match(await page.textContent('#stats'), /on the CPU \(WebAssembly, relaxed SIMD\)/);
    const mean = (xs) => xs.reduce((a, b) => a + b, 0) / xs.length;
    const [first, last] = [mean(s.losses.slice(0, 10)), mean(s.losses.slice(90, 100))];
    console.log(`# default run on the CPU path: ${s.step} steps, loss ${first.toFixed(3)} (steps 0-9) -> ` +
      `${last.toFixed(3)} (90-99), ${s.imagesPerSec.toFixed(1)} images/s, kNN ${s.knnTop1.map((k) => k.toFixed(3)).join(' ')}`);
    assert.ok(first - last >= LEARNING_DROP, `the loss fell by ${(first - last).toFixed(3)} (< ${LEARNING_DROP})`);
    await page.screenshot({ path: join(OUT, 'playground-cpu.png'), fullPage: true });
  } catch (e) {
    console.log(logs.slice(-20).join('\n'));
    throw e;
  } finally {
    await browser.close();
  }
});

// A run of 2 epochs of 2 steps. The first step (3-6 s on SwiftShader here: the backward's kernels
// are compiled in it) outlasts a 0.5 s limit: the page says what to lower. Epoch 1 is autosaved;
// the GPU is then lost (the device destroyed mid-step): the page says so, and Resume continues in
// a new worker from epoch 1's weights, the curves kept. The tab is then reloaded (closed and reopened): it offers the saved run, and
// continuing it trains on from epoch 1 again.
test('the page survives a lost GPU and a closed tab, and says when a step is too slow', { timeout: 1_500_000 }, async () => {
  const { browser, page, logs } = await open(true);
  try {
    await page.evaluate(async () => {
      const p = window.dclPlayground;
      p.slowStepSeconds = 0.5;
      await p.start({ batchSize: 4, subset: 8, evalImages: 16, epochs: 2, lr: 0.001, device: 'wgpu' });
    });
    await waitFor(page, 'the slow-step message', (s) => s.slowStep, 600_000);
    const slow = await page.textContent('#banner');
    assert.match(slow, /first training step has run for 0.5 s and is not done: a batch of 4 images for resnet-mini/);
    assert.match(slow, /lower the batch size/);
    await waitFor(page, 'the autosave of epoch 1', (s) => s.autosaved === 1, 900_000);
    const saved = await page.evaluate(() => window.dclPlayground.savedRun());
    assert.equal(saved.epoch, 1);
    assert.equal(saved.config.batch_size, 4);

    await page.evaluate(() => window.dclPlayground.loseDevice());
    const lost = await waitFor(page, 'the lost device', (s) => s.status === 'lost', 120_000, { errorsExpected: true });
    assert.match(await page.textContent('#banner'), /The GPU was lost \(destroyed: .*Resume continues from the autosave of epoch 1/);
    assert.equal(await page.textContent('#continue'), 'Resume');
    await page.click('#continue');
    const resumed = await waitFor(page, 'a step after the resume', (s) => s.status === 'running' && s.step > 2, 600_000);
    assert.equal(resumed.epoch, 1, 'the resumed run goes on in epoch 1 (its second)');
    assert.equal(resumed.losses.length, resumed.step, 'the curves before the loss were kept');
    assert.deepEqual(resumed.losses.slice(0, 2), lost.losses.slice(0, 2));

    await page.reload();
    await waitFor(page, 'the saved run offered', (s) => s.dataset && s.status === 'ready', 300_000);
    await page.waitForSelector('#continue:not([hidden])', { timeout: 60_000 });
    assert.match(await page.textContent('#banner'), /saved after epoch 1 of 2/);
    await page.click('#continue');
    const reopened = await waitFor(page, 'a step after reopening', (s) => s.step > 2, 600_000);
    assert.equal(reopened.epoch, 1);
    assert.equal(reopened.knnTop1.length, 2, 'the kNN curve of epochs 0 and 1 came back');
    console.log(`# lost at step ${lost.step}; resumed to step ${resumed.step}; reopened to step ${reopened.step}`);
  } catch (e) {
    console.log(logs.slice(-20).join('\n'));
    throw e;
  } finally {
    await browser.close();
  }
});

// Two tabs of one browser share its GPU process: each trains its own run, neither stalls the other.
test('two tabs train at once, each its own run', { timeout: 900_000 }, async () => {
  const { browser, page, logs } = await open(true);
  try {
    const second = await browser.newPage();
    second.on('console', (m) => logs.push(`tab 2: ${m.text()}`));
    await second.goto(url);
    const tabs = [page, second];
    const config = { batchSize: 4, subset: 16, evalImages: 16, epochs: 1, lr: 0.001, temperature: 0.1, loss: 'dcl', device: 'wgpu' };
    await Promise.all(tabs.map((tab, i) => tab.evaluate(async ({ config, seed }) => {
      await window.dclPlayground.start({ ...config, seed });
    }, { config, seed: i + 1 })));
    const states = await Promise.all(tabs.map((tab, i) => waitFor(tab, `tab ${i + 1}: a step`, (s) => s.step >= 1, 600_000)));
    for (const [i, s] of states.entries()) {
      assert.ok(s.losses.length >= 1 && s.losses.every(Number.isFinite), `tab ${i + 1}: losses ${s.losses}`);
    }
    // Different seeds, different runs: the tabs do not share one.
    assert.notEqual(states[0].losses[0], states[1].losses[0], 'both tabs report the same run');
    console.log(`# two tabs: losses ${states.map((s) => s.losses.slice(0, 1).map((l) => l.toFixed(4)).join(' ')).join(' | ')}`);
  } catch (e) {
    console.log(logs.slice(-20).join('\n'));
    throw e;
  } finally {
    await browser.close();
  }
});

/// A ustar archive of (name, bytes) entries, gzipped: a small cifar-10-binary.tar.gz.
function tarGz(entries) {
  const blocks = [];
  for (const [name, data] of entries) {
    const header = Buffer.alloc(512);
    const field = (text, offset) => header.write(text, offset, 'latin1');
    field(name, 0);
    field('0000644\0', 100);
    field('0000000\0', 108);
    field('0000000\0', 116);
    field(data.length.toString(8).padStart(11, '0') + '\0', 124);
    field('00000000000\0', 136);
    field('        ', 148);
    field('0', 156);
    field('ustar\0' + '00', 257);
    const sum = header.reduce((a, b) => a + b, 0);
    field(sum.toString(8).padStart(6, '0') + '\0 ', 148);
    blocks.push(header, data, Buffer.alloc((512 - (data.length % 512)) % 512));
  }
  blocks.push(Buffer.alloc(1024));
  return gzipSync(Buffer.concat(blocks));
}

/// CIFAR-10 records: a label byte, then 3072 pixel bytes.
const cifarBatch = (count, firstLabel) => Buffer.concat(Array.from({ length: count }, (_, i) =>
  Buffer.concat([Buffer.from([(firstLabel + i) % 10]), Buffer.alloc(3072, i * 17)])));

/// float32 data of a .npy written by `dcl loss --grad-out`.
function readNpy(path) {
  const bytes = readFileSync(path);
  const headerLength = bytes.readUInt16LE(8);
  const body = bytes.subarray(10 + headerLength);
  return new Float32Array(body.buffer.slice(body.byteOffset, body.byteOffset + body.length));
}

test('the page\'s losses (Burn on WebGPU, and the fused WGSL kernel) equal the native `dcl loss`', { timeout: 600_000 }, async () => {
  const { browser, page } = await open(true);
  try {
    await waitFor(page, 'worker ready', (s) => s.status === 'ready' || s.dataset, 180_000);
    const [n, d] = [24, 16];
    let seed = 7;
    const draw = () => Array.from({ length: n * d }, () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31) * 2 - 1);
    const z1 = draw(), z2 = draw();
    const dir = mkdtempSync(join(tmpdir(), 'dcl-loss-'));
    npy(join(dir, 'a.npy'), z1, [n, d]);
    npy(join(dir, 'b.npy'), z2, [n, d]);
    const close = (a, b, scale) => Math.abs(a - b) <= 1e-4 * scale;
    for (const kind of ['dcl', 'dclw', 'infonce']) {
      const native = JSON.parse(execFileSync(DCL, ['loss', '--z1', join(dir, 'a.npy'), '--z2', join(dir, 'b.npy'),
        '--kind', kind, '--temperature', '0.2', '--sigma', '0.5', '--grad-out', dir]).toString()).loss;
      const args = [z1, z2, n, d, kind];
      const burn = await page.evaluate((a) => window.dclPlayground.loss(...a, 0.2, 0.5), args);
      assert.ok(close(burn, native, Math.abs(native)), `${kind}: Burn on WebGPU ${burn} vs native ${native}`);
      const fused = await page.evaluate((a) => window.dclPlayground.fusedLoss(...a, 0.2, 0.5), args);
      assert.ok(close(fused.loss, native, Math.abs(native)), `${kind}: WGSL kernel ${fused.loss} vs native ${native}`);
      for (const [name, got] of [['grad_z1', fused.gradZ1], ['grad_z2', fused.gradZ2]]) {
        const want = readNpy(join(dir, `${name}.npy`));
        const scale = Math.max(...want.map(Math.abs));
        want.forEach((w, i) => assert.ok(close(got[i], w, scale), `${kind} ${name}[${i}]: kernel ${got[i]} vs native ${w}`));
      }
    }
    // A truncated CIFAR batch: the error names the file and the byte offset, and the page shows it.
    const error = await page.evaluate(async () => {
      const bytes = new Uint8Array(3073 + 100);
      try {
        await window.dclPlayground.loadFiles([{ name: 'data_batch_1.bin', bytes }]);
        return null;
      } catch (e) {
        return e.message;
      }
    });
    assert.match(error ?? 'no error', /data_batch_1\.bin.*truncated.*at byte 3073/);
    assert.match(await page.textContent('#banner'), /data_batch_1\.bin/);
    // The official archive's layout, parsed in wasm by the core CIFAR reader.
    const archive = tarGz([
      ['cifar-10-batches-bin/data_batch_1.bin', cifarBatch(10, 0)],
      ['cifar-10-batches-bin/test_batch.bin', cifarBatch(5, 3)],
      ['cifar-10-batches-bin/batches.meta.txt', Buffer.from('airplane\n')],
    ]);
    const summary = await page.evaluate((bytes) => window.dclPlayground.loadFiles(
      [{ name: 'cifar-10-binary.tar.gz', bytes: new Uint8Array(bytes) }]), [...archive]);
    assert.deepEqual([summary.format, summary.trainImages, summary.testImages, summary.classes],
      ['cifar10', 10, 5, 10]);
    assert.equal((await pageState(page)).dataset.format, 'cifar10');
  } finally {
    await browser.close();
  }
});

// A browser with neither WebGPU nor relaxed SIMD (Safari's and Firefox's case; this Chromium has
// relaxed SIMD, so the page's address asks for the other module): the SIMD128 module trains, with
// the native first loss (the relaxed module's is checked beside WebGPU's above).
test('without WebGPU the page trains on the CPU and says why', { timeout: 300_000 }, async () => {
  const { browser, page } = await open(false, '?simd=simd128');
  try {
    const ready = await waitFor(page, 'the data', (s) => s.dataset && s.webgpu, 120_000);
    assert.match(ready.webgpu.problem, /no adapter|no WebGPU/);
    assert.equal(ready.simd, 'simd128');
    assert.match(await page.textContent('#device-note'), /WebGPU is not available .* train on the CPU in WebAssembly/);
    assert.equal(await page.isDisabled('#start'), false);
    const run = { ...WIRING_RUN, epochs: 1 };
    await page.evaluate((config) => window.dclPlayground.start(config), run);
    const s = await waitFor(page, 'two steps on the CPU', (s) => s.step >= 2, 120_000);
    assert.equal(s.device, 'cpu');
    assert.ok(s.losses.every(Number.isFinite), `losses ${s.losses}`);
    const native = nativeSteps(run)[0];
    console.log(`# first loss: the page's CPU path with SIMD128 ${s.losses[0]}, native ${native}`);
    assert.ok(Math.abs(s.losses[0] - native) <= 1e-4 * Math.abs(native), `first loss: SIMD128 ${s.losses[0]} vs native ${native}`);
    assert.match(await page.textContent('#device-note'), /trains on the CPU \(WebAssembly, SIMD128\): .*WebGPU/);
    // Asking for the GPU where there is none is an error that says what to do.
    await page.evaluate(() => window.dclPlayground.start({ device: 'wgpu' }).catch(() => {}));
    await waitFor(page, 'the error', (s) => s.error, 30_000, { errorsExpected: true });
    assert.match((await pageState(page)).error, /WebGPU is not available here .*: train on the CPU/);
  } finally {
    await browser.close();
  }
});

/// The state (`element.dcl`) of the embed `name` once `done(state)` holds; its error, if any, throws.
async function widgetState(page, name, done, timeoutMs, logs = []) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const s = await page.evaluate((n) => document.querySelector(`[data-dcl="${n}"]`).dcl, name);
    if (s && done(s)) return s;
    if (s && s.error) throw new Error(`${name}: ${s.error}`);
    if (Date.now() > deadline) throw new Error(`${name}: not ready after ${timeoutMs / 1000} s; logs ${logs.join('\n')}`);
    await new Promise((r) => setTimeout(r, 300));
  }
}
const ready = (s) => s.status === 'ready';

/// Without WebGPU the tutorial's loss explorer computes on the CPU (the float64 host loss in the
/// small module): the same losses and gradients as the native `dcl loss`; retrieval says why not.
test('the loss explorer without WebGPU: the host loss equals native `dcl loss`', { timeout: 180_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), 'dcl-explorer-'));
  const { browser, page } = await open(false);
  try {
    await page.goto(`${url}/www/tutorial.html`);
    const explorer = await widgetState(page, 'loss-explorer', ready, 90_000);
    assert.equal(explorer.backend, 'cpu');
    const z = [0, 1].map((v) => explorer.angles.flatMap((a) => [Math.cos(a[v]), Math.sin(a[v])]));
    npy(join(dir, 'z1.npy'), z[0], [4, 2]);
    npy(join(dir, 'z2.npy'), z[1], [4, 2]);
    for (const kind of ['dcl', 'dclw', 'infonce']) {
      const out = join(dir, kind);
      const native = JSON.parse(execFileSync(DCL, ['loss', '--z1', join(dir, 'z1.npy'), '--z2', join(dir, 'z2.npy'),
        '--kind', kind, '--temperature', '0.5', '--grad-out', out]).toString()).loss;
      const inPage = explorer.gradients[kind];
      assert.ok(Math.abs(inPage.loss - native) < 1e-5 * Math.abs(native), `${kind}: page ${inPage.loss} vs native ${native}`);
      for (const [key, file] of [['gradZ1', 'grad_z1.npy'], ['gradZ2', 'grad_z2.npy']]) {
        const want = readNpy(join(out, file));
        const scale = Math.max(...want.map(Math.abs));
        want.forEach((w, i) => assert.ok(Math.abs(inPage[key][i] - w) <= 1e-5 * scale, `${kind} ${key}[${i}]: page ${inPage[key][i]} vs native ${w}`));
      }
    }
    const retrieval = await widgetState(page, 'retrieval', (r) => r.status === 'no-webgpu', 30_000);
    assert.match(retrieval.error, /WebGPU/);
  } finally {
    await browser.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

/// The tutorial page: a model trained natively is loaded by the WGSL inference engine in the page,
/// whose outputs equal the native `dcl embed`; the retrieval, loss-explorer and train embeds work.
test('the tutorial\'s embeds: the WGSL engine in the page equals native `dcl embed`', { timeout: 900_000 }, async () => {
  // A small model trained natively on a tiny CIFAR-10 archive, placed where the server sees it.
  const dir = mkdtempSync(join(tmpdir(), 'dcl-tutorial-'));
  const archive = join(dir, 'cifar-10-binary.tar.gz');
  writeFileSync(archive, tarGz([
    ['cifar-10-batches-bin/data_batch_1.bin', cifarBatch(20, 0)],
    ['cifar-10-batches-bin/test_batch.bin', cifarBatch(5, 3)],
  ]));
  const run = join(OUT, 'tutorial-run');
  rmSync(run, { recursive: true, force: true });
  execFileSync(DCL, ['pretrain', '--data', archive, '--model', 'resnet-mini', '--batch-size', '10', '--epochs', '1',
    '--optimizer', 'adam', '--lr', '0.001', '--device', 'cpu', '--seed', '3', '--out', run], { stdio: 'ignore' });
  const model = join(run, 'model.safetensors');
  // Native reference: features and projections of random normalized images.
  const [b, side] = [4, 32];
  let seed = 11;
  const images = Array.from({ length: b * 3 * side * side }, () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31) * 4 - 2);
  npy(join(dir, 'images.npy'), images, [b, 3, side, side]);
  const native = {};
  for (const [key, flags] of [['features', []], ['projections', ['--projected']]]) {
    execFileSync(DCL, ['embed', '--model', model, '--data', join(dir, 'images.npy'), ...flags, '--out', join(dir, `${key}.npy`)], { stdio: 'ignore' });
    native[key] = readNpy(join(dir, `${key}.npy`));
  }

  const { browser, page, logs } = await open(true);
  try {
    await page.goto(`${url}/www/tutorial.html?model=/${model}`);
    const widget = (name) => page.evaluate((n) => document.querySelector(`[data-dcl="${n}"]`).dcl, name);
    const waitWidget = (name, timeoutMs) => widgetState(page, name, ready, timeoutMs, logs);
    // Exactness: the engine of the small inference-only module (the one the embeds load) on the
    // page's WebGPU vs the native engine (itself tested against Burn).
    const got = await page.evaluate(async ([path, data, count]) => {
      const { default: init, WebEncoder } = await import('/www/pkg-infer/dcl.js');
      await init();
      const bytes = new Uint8Array(await (await fetch(path)).arrayBuffer());
      const encoder = await WebEncoder.fromSafetensors('model.safetensors', bytes);
      return encoder.embed(Float32Array.from(data), count, 32, 32, false);
    }, [`/${model}`, images, b]);
    const close = (key, got, want) => {
      assert.equal(got.length, want.length, key);
      const scale = Math.max(...want.map(Math.abs));
      want.forEach((w, i) => assert.ok(Math.abs(got[i] - w) <= 1e-4 * scale, `${key}[${i}]: page ${got[i]} vs native ${w}`));
    };
    for (const key of ['features', 'projections']) close(key, got[key], native[key]);

    // Speed in the page: the WGSL engine (small module) and Burn's forward (the playground's
    // module) on the same 64 images and the same WebGPU; each warmed up once, then the best of 3. Burn's
    // projections must equal the engine's.
    const speed = await page.evaluate(async (path) => {
      const small = await import('/www/pkg-infer/dcl.js');
      const full = await import('/www/pkg/dcl.js');
      await full.default();
      await full.initWebGpu();
      const bytes = new Uint8Array(await (await fetch(path)).arrayBuffer());
      const engine = await small.WebEncoder.fromSafetensors('model.safetensors', bytes);
      const burn = full.BurnEncoder.fromSafetensors('model.safetensors', bytes);
      const count = 64;
      const images = Float32Array.from({ length: count * 3 * 32 * 32 }, (_, i) => Math.sin(i * 0.37));
      const rate = async (f) => {
        const first = await f();
        let best = Infinity;
        for (let rep = 0; rep < 3; rep++) {
          const t0 = performance.now();
          await f();
          best = Math.min(best, performance.now() - t0);
        }
        return [first, count / (best / 1000)];
      };
      const [fromEngine, engineRate] = await rate(async () => (await engine.embed(images, count, 32, 32, false)).projections);
      const [fromBurn, burnRate] = await rate(() => burn.projections(images, count));
      return { engine: Array.from(fromEngine), burn: Array.from(fromBurn), engineRate, burnRate };
    }, `/${model}`);
    close('burn vs engine projections', speed.burn, speed.engine);
    console.log(`# resnet-mini forward in the page (SwiftShader WebGPU, batch 64): WGSL engine ${speed.engineRate.toFixed(1)} images/s, Burn ${speed.burnRate.toFixed(1)} images/s`);

    const explorer = await waitWidget('loss-explorer', 180_000);
    for (const kind of ['dcl', 'dclw', 'infonce']) assert.ok(Number.isFinite(explorer.losses[kind]), kind);
    // The explorer's numbers are the native loss of the same 2-D embeddings.
    const z = [0, 1].map((v) => explorer.angles.flatMap((a) => [Math.cos(a[v]), Math.sin(a[v])]));
    npy(join(dir, 'z1.npy'), z[0], [4, 2]);
    npy(join(dir, 'z2.npy'), z[1], [4, 2]);
    const nativeDcl = JSON.parse(execFileSync(DCL, ['loss', '--z1', join(dir, 'z1.npy'), '--z2', join(dir, 'z2.npy'),
      '--kind', 'dcl', '--temperature', '0.5']).toString()).loss;
    assert.ok(Math.abs(explorer.losses.dcl - nativeDcl) < 1e-4 * Math.abs(nativeDcl), `explorer ${explorer.losses.dcl} vs native ${nativeDcl}`);
    // Dragging a positive onto its anchor lowers DCL's loss.
    await page.evaluate(() => document.querySelector('[data-dcl="loss-explorer"]').dcl.set(0, 1, 0.3));
    const moved = await widget('loss-explorer');
    assert.ok(moved.losses.dcl < explorer.losses.dcl, `${moved.losses.dcl} !< ${explorer.losses.dcl}`);

    const retrieval = await waitWidget('retrieval', 600_000);
    assert.equal(retrieval.dim, 128);
    assert.ok(retrieval.gallery > 8);
    console.log(`# WGSL engine in the page: ${retrieval.gallery} images at ${retrieval.imagesPerSec.toFixed(1)} images/s (first call, pipelines compiled)`);
    await page.evaluate(() => document.querySelector('[data-dcl="retrieval"]').dcl.pick(0));
    const { neighbors } = await widget('retrieval');
    assert.equal(neighbors.length, 8);
    assert.ok(neighbors.every((n, i) => n.index !== 0 && n.cosine <= 1 + 1e-5 && (i === 0 || n.cosine <= neighbors[i - 1].cosine)));

    const presetBatch = await page.evaluate(() => new Promise((resolve) => {
      const frame = document.querySelector('[data-dcl="train"] iframe');
      const read = () => frame.contentDocument?.querySelector('[name=batchSize]')?.value;
      const poll = () => (read() === '16' ? resolve(read()) : setTimeout(poll, 200));
      poll();
    }));
    assert.equal(presetBatch, '16');
    await page.screenshot({ path: join(OUT, 'tutorial.png'), fullPage: true });
  } finally {
    await browser.close();
  }
});
