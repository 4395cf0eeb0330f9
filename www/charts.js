// The playground's drawing: line charts, image tiles, the embedding scatter, the class legend.
// Pure functions of what they are given (the page's state stays in app.js).

import { PALETTE } from './common.js';

const CLASS_NAMES = {
  cifar10: ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck'],
  'fashion-mnist': ['T-shirt', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt', 'sneaker', 'bag', 'boot'],
  mnist: ['0', '1', '2', '3', '4', '5', '6', '7', '8', '9'],
};
const classColor = (c, classes) => (classes <= 10 ? PALETTE[c] : `hsl(${(360 * c) / classes}, 65%, 45%)`);

/// Series [{label, color, points: [[x, y]], width, dots}] on `canvas`, with dashed `levels`.
export function lineChart(canvas, series, { xLabel, yLabel, yMin, yMax, levels = [] }) {
  const ctx = canvas.getContext('2d');
  const { width: w, height: h } = canvas;
  const pad = { l: 48, r: 10, t: 10, b: 28 };
  ctx.clearRect(0, 0, w, h);
  const all = series.flatMap((s) => s.points);
  ctx.fillStyle = '#555';
  ctx.font = '11px system-ui';
  if (!all.length) {
    ctx.fillText('waiting for the first numbers…', pad.l, h / 2);
    return;
  }
  const xs = all.map((p) => p[0]);
  const ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  let y0 = yMin ?? Math.min(...ys), y1 = yMax ?? Math.max(...ys);
  if (y1 - y0 < 1e-6) { y0 -= 0.5; y1 += 0.5; }
  const X = (x) => pad.l + ((x - x0) / (x1 - x0)) * (w - pad.l - pad.r);
  const Y = (y) => h - pad.b - ((y - y0) / (y1 - y0)) * (h - pad.t - pad.b);
  ctx.strokeStyle = '#ccc';
  ctx.beginPath();
  ctx.moveTo(pad.l, pad.t);
  ctx.lineTo(pad.l, h - pad.b);
  ctx.lineTo(w - pad.r, h - pad.b);
  ctx.stroke();
  for (const v of [y0, (y0 + y1) / 2, y1]) ctx.fillText(v.toFixed(3), 2, Y(v) + 4);
  ctx.fillText(`${x0}`, pad.l, h - 10);
  ctx.fillText(`${x1} ${xLabel}`, w - pad.r - 70, h - 10);
  ctx.fillText(yLabel, pad.l + 6, pad.t + 10);
  for (const s of series) {
    ctx.strokeStyle = s.color;
    ctx.fillStyle = s.color;
    ctx.lineWidth = s.width || 1.5;
    ctx.beginPath();
    s.points.forEach(([x, y], i) => (i ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
    ctx.stroke();
    if (s.dots) s.points.forEach(([x, y]) => ctx.fillRect(X(x) - 2, Y(y) - 2, 4, 4));
  }
  for (const level of levels) {
    ctx.strokeStyle = level.color;
    ctx.fillStyle = level.color;
    ctx.lineWidth = 1;
    ctx.setLineDash([5, 4]);
    ctx.beginPath();
    ctx.moveTo(pad.l, Y(level.value));
    ctx.lineTo(w - pad.r, Y(level.value));
    ctx.stroke();
    ctx.setLineDash([]);
    ctx.fillText(level.label, pad.l + 4, Y(level.value) - 4);
  }
  series.forEach((s, i) => {
    ctx.fillStyle = s.color;
    ctx.fillText(s.label, w - pad.r - 200, pad.t + 12 + 13 * i);
  });
}

/// A 32x32 RGB tile of `rgb` (from `offset`) at (x, y), `size` pixels wide.
export function drawRgb(ctx, rgb, offset, x, y, size) {
  const image = new ImageData(32, 32);
  for (let i = 0; i < 1024; i++) {
    image.data.set([rgb[offset + 3 * i], rgb[offset + 3 * i + 1], rgb[offset + 3 * i + 2], 255], 4 * i);
  }
  const tile = new OffscreenCanvas(32, 32);
  tile.getContext('2d').putImageData(image, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(tile, x, y, size, size);
}

/// The view pairs of the coming steps (32x32 RGB tiles, two a pair).
export function drawViews(canvas, pixels) {
  const ctx = canvas.getContext('2d');
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const tiles = pixels.length / 3072;
  const size = 36;
  for (let t = 0; t < tiles; t++) {
    const pair = Math.floor(t / 2);
    drawRgb(ctx, pixels, t * 3072, 6 + pair * (2 * size + 12) + (t % 2) * (size + 1), 20, size);
  }
}

/// The test images' 2-d PCA `points` (x0, y0, x1, ...) coloured by label; returns where each
/// landed on the canvas (for clicks), or null with nothing to draw.
export function drawScatter(canvas, scatter, classes) {
  const ctx = canvas.getContext('2d');
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!scatter) return null;
  const { points, labels } = scatter;
  const xs = points.filter((_, i) => i % 2 === 0), ys = points.filter((_, i) => i % 2 === 1);
  const [xa, xb, ya, yb] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const m = 12;
  const screen = xs.map((x, i) => [
    m + ((x - xa) / (xb - xa || 1)) * (canvas.width - 2 * m),
    m + ((ys[i] - ya) / (yb - ya || 1)) * (canvas.height - 2 * m),
  ]);
  screen.forEach(([x, y], i) => {
    ctx.fillStyle = classColor(labels[i], classes);
    ctx.beginPath();
    ctx.arc(x, y, 3, 0, 2 * Math.PI);
    ctx.fill();
  });
  return screen;
}

/// The dataset's class names in their scatter colours, as HTML.
export function legendHtml(dataset) {
  const names = CLASS_NAMES[dataset.format === 'idx' ? dataset.name : dataset.format] || [];
  return names
    .map((n, c) => `<span><i style="background:${classColor(c, dataset.classes)}"></i>${n}</span>`)
    .join('');
}
