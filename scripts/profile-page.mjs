#!/usr/bin/env node
// Where the page's training step spends its time, by function: `dcl serve`, headless Chromium, one
// run started through `window.dclPlayground`, and V8's sampling profiler on the training worker
// (www/worker.js) for --steps steps after --skip warm-up steps. Prints the top functions by self
// time (a closure or rayon frame named with the caller it runs for), coarse categories (self
// time, and the share of samples with such a frame anywhere on the stack), and self time by the
// innermost dcl:: function on the stack but conv's gemm wrapper (which layer's work it is).
//
//   node scripts/profile-page.mjs [--device cpu|wgpu] [--batch-size 32] [--skip 3] [--steps 20]
//                                 [--interval-us 200] [--top 40] [--root DIR] [--json FILE]
//                                 [--simd relaxed|simd128]
//
// Names need the wasm name section, which www/pkg* drop: serve a copy whose module keeps it. For
// the module Chromium loads (relaxed SIMD; `--simd simd128` and www/pkg for the other):
//   source scripts/web.sh
//   wasm_module relaxed-simd www/pkg-relaxed "-C target-feature=+relaxed-simd"
//   mkdir -p /tmp/prof-root && cp -r index.html www /tmp/prof-root/ && wasm-bindgen --target web \
//     --no-typescript --out-dir /tmp/prof-root/www/pkg-relaxed \
//     $CARGO_TARGET_DIR/wasm32-unknown-unknown/wasm-lean/dcl.wasm
//   node scripts/profile-page.mjs --root /tmp/prof-root
// DCL_BIN is the native `dcl` (default: $CARGO_TARGET_DIR/release/dcl); --json writes the raw
// profile (loadable in Chrome DevTools' Performance panel).
import { writeFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { dclBinary, launchChromium, pageUrl, servePage, timedRun } from './page-server.mjs';

const { values: opt } = parseArgs({
  options: {
    device: { type: 'string', default: 'cpu' },
    'batch-size': { type: 'string', default: '32' },
    skip: { type: 'string', default: '3' },
    steps: { type: 'string', default: '20' },
    'interval-us': { type: 'string', default: '200' },
    top: { type: 'string', default: '40' },
    root: { type: 'string', default: process.cwd() },
    json: { type: 'string' },
    simd: { type: 'string' },
  },
});
const [batch, skip, steps] = [opt['batch-size'], opt.skip, opt.steps].map(Number);
if (!(batch >= 2 && skip >= 1 && steps >= 1)) throw new Error('--batch-size must be >= 2, --skip and --steps >= 1');

// Coarse categories: the first whose pattern matches a frame's name (a closure or rayon plumbing
// frame counts as its nearest named caller: its body is usually the closure inlined there).
const CATEGORIES = [
  ['gemm microkernel', /microkernel|packed::kernel/], ['gemm packing', /gemm.*pack_|pack_operands|packed::pack/],
  ['gemm other', /gemm/],
  ['winograd', /winograd/i], ['im2col/col2im', /im2col|col2im|zero_padding|\bframe\b|unframe/],
  ['conv other', /\bconv\b|conv2d|convolution/i], ['batch norm', /norm/i], ['relu', /relu/i], ['pooling', /pool/i],
  ['adam/optim', /adam|optim/i], ['memcpy/memset', /memcpy|memset|memmove|copy_nonoverlapping|copy_from_slice/],
  ['allocator', /dlmalloc|__rdl_|__rust_(alloc|dealloc|realloc)|alloc_zeroed|::malloc$|::free$/],
  ['autodiff', /autodiff/i], ['burn_flex', /burn_flex/], ['burn other', /burn|cubecl/], ['rayon', /rayon/],
  ['dcl other', /^dcl::/], ['js/v8 (worker JS, idle, GC)', /^\(|^$|^[a-zA-Z]+$|js-to-wasm|wasm-to-js/], ['other', /./],
];
const category = (name) => CATEGORIES.find(([, re]) => re.test(name.replace(/::h[0-9a-f]{16}$/, '')))[0];
// Frames named for plumbing, not work: reported with the caller they run for.
const GENERIC = /call_mut|call_once|\{\{closure\}\}|rayon|for_each|try_fold|::fold::|closure/;

/// A Rust name without its hash or crate disambiguators, long generic arguments folded, and the
/// last 3 path segments kept.
function shorten(name) {
  let s = name.replace(/::h[0-9a-f]{16}$/, '').replace(/\[[0-9a-f]{16}\]/g, '');
  for (let prev; prev !== s;) { prev = s; s = s.replace(/<([^<>]*)>/g, (m, inner) => (inner.length > 40 ? '\u2039…\u203a' : `\u2039${inner}\u203a`)); }
  s = s.replace(/\u2039/g, '<').replace(/\u203a/g, '>');
  const parts = s.split('::');
  return (parts.length > 3 ? '…::' : '') + parts.slice(-3).join('::');
}

const { server, url } = await servePage(dclBinary(), opt.root);
const browser = await launchChromium(true);
const cleanup = async () => { await browser.close().catch(() => {}); server.kill(); };
process.once('SIGINT', () => cleanup().then(() => process.exit(130)));
try {
  const page = await browser.newPage();
  // The worker's own DevTools session, reached through the page's (not flattened: Playwright's
  // CDPSession cannot address child sessions, so messages travel by Target.sendMessageToTarget).
  const cdp = await page.context().newCDPSession(page);
  let workerSession;
  const attached = new Promise((resolve) => cdp.on('Target.attachedToTarget', ({ sessionId, targetInfo }) => {
    if (targetInfo.type === 'worker' && !workerSession) resolve((workerSession = sessionId));
  }));
  const pending = new Map();
  let nextId = 1;
  cdp.on('Target.receivedMessageFromTarget', ({ sessionId, message }) => {
    const m = JSON.parse(message);
    if (sessionId !== workerSession || !pending.has(m.id)) return;
    const { resolve, reject } = pending.get(m.id);
    pending.delete(m.id);
    m.error ? reject(new Error(`${m.error.message} (${m.error.code})`)) : resolve(m.result);
  });
  const toWorker = (method, params = {}) => new Promise((resolve, reject) => {
    const id = nextId++;
    pending.set(id, { resolve, reject });
    cdp.send('Target.sendMessageToTarget', { sessionId: workerSession, message: JSON.stringify({ id, method, params }) }).catch(reject);
  });
  await cdp.send('Target.setAutoAttach', { autoAttach: true, waitForDebuggerOnStart: false, flatten: false });
  await page.goto(pageUrl(url, opt.simd));
  await Promise.race([attached, new Promise((_, reject) => setTimeout(() => reject(new Error('no worker attached in 30 s')), 30000))]);
  await toWorker('Profiler.enable');
  await toWorker('Profiler.setSamplingInterval', { interval: Number(opt['interval-us']) });

  const config = timedRun(batch, batch * Math.max(40, skip + steps + 5), opt.device);
  await page.evaluate((c) => window.dclPlayground.start(c), config);
  const state = async () => {
    const s = await page.evaluate(() => window.dclPlayground.state());
    if (s.error) throw new Error(`the page reports: ${s.error}`);
    return s;
  };
  const waitStep = async (n) => { for (let s; !((s = await state()).step >= n);) await new Promise((r) => setTimeout(r, 20)); return state(); };
  const s0 = await waitStep(skip);
  await toWorker('Profiler.start');
  const t0 = Date.now();
  const s1 = await waitStep(s0.step + steps);
  const { profile } = await toWorker('Profiler.stop');
  const seconds = (Date.now() - t0) / 1000;
  if (opt.json) writeFileSync(opt.json, JSON.stringify(profile));

  // Self time per function (samples x the profile's own mean interval) and inclusive time (samples
  // with the function anywhere on the stack, counted once per sample).
  const nodes = new Map(profile.nodes.map((n) => [n.id, n]));
  const parent = new Map();
  for (const n of profile.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
  const total = profile.samples.length;
  const msPerSample = (profile.endTime - profile.startTime) / 1000 / total;
  const self = new Map(); const incl = new Map(); const catSelf = new Map(); const catIncl = new Map();
  const add = (m, k, v) => m.set(k, (m.get(k) ?? 0) + v);
  const nameOf = (id) => nodes.get(id).callFrame.functionName;
  // The nearest caller (or the frame itself) that is not plumbing: a closure's owner.
  const owner = (id) => { for (let i = id; i !== undefined; i = parent.get(i)) if (!GENERIC.test(nameOf(i))) return nameOf(i); return nameOf(id); };
  const ownerOf = new Map(); // name -> Map(owner -> hits)
  const byDcl = new Map(); // the innermost dcl:: frame on the stack -> self hits under it
  for (const n of profile.nodes) {
    const hits = n.hitCount ?? 0;
    if (!hits) continue;
    const name = n.callFrame.functionName || `(anonymous ${n.callFrame.url.split('/').pop()})`;
    add(self, name, hits);
    const own = owner(n.id);
    if (own !== name) { if (!ownerOf.has(name)) ownerOf.set(name, new Map()); add(ownerOf.get(name), own, hits); }
    add(catSelf, category(own), hits);
    const names = new Set(); const cats = new Set();
    let dclFrame;
    for (let id = n.id; id !== undefined; id = parent.get(id)) {
      const f = nameOf(id);
      if (f && f !== '(root)') { names.add(f); cats.add(category(GENERIC.test(f) ? owner(id) : f)); }
      if (!dclFrame && /^dcl::/.test(f) && !GENERIC.test(f) && !/::gemm::h/.test(f)) dclFrame = f; // past conv's gemm wrapper
    }
    add(byDcl, dclFrame ?? '(no dcl:: frame)', hits);
    for (const f of names) add(incl, f, hits);
    for (const c of cats) add(catIncl, c, hits);
  }
  const mainOwner = (name) => [...(ownerOf.get(name) ?? [[name, 0]])].sort((a, b) => b[1] - a[1])[0][0];
  const label = (name) => (ownerOf.has(name)
    ? `${shorten(name)} ← ${shorten(mainOwner(name))}${ownerOf.get(name).size > 1 ? ' (+others)' : ''}` : shorten(name));
  const pct = (h) => `${((100 * h) / total).toFixed(1)}%`;
  const ms = (h) => (h * msPerSample).toFixed(0);
  const rate = (batch * (s1.step - s0.step)) / seconds;
  console.log(`${opt.device} (wasm ${s1.simd}), batch ${batch}: steps ${s0.step}..${s1.step} profiled in ${seconds.toFixed(1)} s, ${rate.toFixed(2)} images/s (the page says ${s1.imagesPerSec?.toFixed(2)}); ${total} samples, ${(msPerSample * 1000).toFixed(0)} us apart\n`);
  console.log(`| # | function (shortened) | self % | self ms | incl % | category |\n|---|---|---|---|---|---|`);
  [...self].sort((a, b) => b[1] - a[1]).slice(0, Number(opt.top)).forEach(([name, h], i) =>
    console.log(`| ${i + 1} | \`${label(name)}\` | ${pct(h)} | ${ms(h)} | ${pct(incl.get(name) ?? h)} | ${category(mainOwner(name))} |`));
  console.log(`\n| category | self % | self ms | on stack % |\n|---|---|---|---|`);
  [...catSelf].sort((a, b) => b[1] - a[1]).forEach(([c, h]) => console.log(`| ${c} | ${pct(h)} | ${ms(h)} | ${pct(catIncl.get(c) ?? 0)} |`));
  console.log(`\n| innermost dcl:: frame | self % under it | ms |\n|---|---|---|`);
  [...byDcl].sort((a, b) => b[1] - a[1]).slice(0, 15).forEach(([f, h]) => console.log(`| \`${shorten(f)}\` | ${pct(h)} | ${ms(h)} |`));
} finally {
  await cleanup();
}
