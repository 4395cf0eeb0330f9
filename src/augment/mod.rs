//! The SimCLR view pipeline, seeded: the same seed gives the same views on every machine.
//!
//! random resized crop (scale 0.08-1, ratio 3/4-4/3) -> horizontal flip (p 0.5) -> [rotation]
//! -> color jitter (brightness, contrast, saturation 0.4, hue 0.1, in random order, p 0.8) ->
//! grayscale (p 0.2) -> normalize. Semantics follow torchvision's transforms, which SimCLR and
//! lightly use. Grayscale data gets its own recipe ([`ViewRecipe::Grayscale`]).

pub mod preview;

use crate::data::{CHANNELS, IMAGE_LEN, SIDE};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// Per-channel statistics of CIFAR-10's training set; used for every dataset so weights transfer.
pub const MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
pub const STD: [f32; 3] = [0.2470, 0.2435, 0.2616];

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ViewConfig {
    pub crop_scale: (f32, f32),
    pub crop_ratio: (f32, f32),
    pub flip_p: f64,
    pub jitter_p: f64,
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub hue: f32,
    pub grayscale_p: f64,
    /// A random rotation of up to this many degrees either way (0: none, no randomness drawn).
    pub rotation_degrees: f32,
}

/// Which view pipeline a run uses. Colour jitter's saturation and hue and random grayscale do
/// nothing to grayscale images, so such data gets a recipe of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewRecipe {
    /// `Color` or `Grayscale`, from the data's channels (resolved when a run starts, and
    /// written resolved to its `config.toml`).
    Auto,
    /// SimCLR's CIFAR-10 pipeline ([`ViewConfig::default`]).
    Color,
    /// For MNIST-like data: SimCLR's crop and flip, brightness and contrast jitter 0.4 (p 0.8),
    /// and a random rotation of up to 10 degrees, the small affine that MNIST-family
    /// augmentation commonly adds (torchvision's `RandomRotation(10)`); no saturation, hue or
    /// grayscale, which would be no-ops.
    Grayscale,
}

choice!(
    ViewRecipe,
    "view recipe",
    [
        Auto = "auto",
        Color = "color" | "colour",
        Grayscale = "grayscale" | "greyscale"
    ]
);

impl ViewRecipe {
    /// `Auto` decided by the number of channels the data came with.
    pub fn resolve(self, source_channels: usize) -> Self {
        match (self, source_channels) {
            (Self::Auto, 1) => Self::Grayscale,
            (Self::Auto, _) => Self::Color,
            (chosen, _) => chosen,
        }
    }

    /// The recipe's settings, with the crop's smallest area fraction the run asked for.
    pub fn config(self, crop_min_scale: f32) -> ViewConfig {
        let color = ViewConfig {
            crop_scale: (crop_min_scale, 1.0),
            ..ViewConfig::default()
        };
        match self {
            Self::Auto | Self::Color => color,
            Self::Grayscale => ViewConfig {
                saturation: 0.0,
                hue: 0.0,
                grayscale_p: 0.0,
                rotation_degrees: 10.0,
                ..color
            },
        }
    }
}

impl Default for ViewConfig {
    fn default() -> Self {
        Self {
            crop_scale: (0.08, 1.0),
            crop_ratio: (3.0 / 4.0, 4.0 / 3.0),
            flip_p: 0.5,
            jitter_p: 0.8,
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.4,
            hue: 0.1,
            grayscale_p: 0.2,
            rotation_degrees: 0.0,
        }
    }
}

/// A crop box in pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Crop {
    pub top: usize,
    pub left: usize,
    pub height: usize,
    pub width: usize,
}

/// torchvision's `RandomResizedCrop.get_params`: ten tries at a box of random area and aspect
/// ratio, then a center crop clamped to the ratio range.
pub fn sample_crop(rng: &mut impl Rng, side: usize, scale: (f32, f32), ratio: (f32, f32)) -> Crop {
    let area = (side * side) as f32;
    let (log_lo, log_hi) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * rng.gen_range(scale.0..=scale.1);
        let aspect = rng.gen_range(log_lo..=log_hi).exp();
        let width = (target * aspect).sqrt().round() as usize;
        let height = (target / aspect).sqrt().round() as usize;
        if (1..=side).contains(&width) && (1..=side).contains(&height) {
            return Crop {
                // Drawn as u32: a usize range draws a u64 on 64-bit hosts and a u32 in wasm32,
                // and the page's views must be the native CLI's.
                top: rng.gen_range(0..=(side - height) as u32) as usize,
                left: rng.gen_range(0..=(side - width) as u32) as usize,
                height,
                width,
            };
        }
    }
    Crop {
        top: 0,
        left: 0,
        height: side,
        width: side,
    }
}

type Image = [f32; IMAGE_LEN];

fn to_unit(pixels: &[u8]) -> Image {
    let mut out = [0.0; IMAGE_LEN];
    for (o, &p) in out.iter_mut().zip(pixels) {
        *o = p as f32 / 255.0;
    }
    out
}

/// A bilinear sample's two taps along one axis and the second one's weight: `f` clamped to
/// `[0, last]`, taps offset by `origin`.
type Taps = (usize, usize, f32);

fn taps(f: f32, last: usize, origin: usize) -> Taps {
    let f = f.clamp(0.0, last as f32);
    let i = f.floor() as usize;
    (origin + i, origin + (i + 1).min(last), f.fract())
}

/// Channel `c` of `img` sampled bilinearly between the taps.
fn bilinear(img: &Image, c: usize, (y0, y1, wy): Taps, (x0, x1, wx): Taps) -> f32 {
    let at = |y: usize, x: usize| img[c * SIDE * SIDE + y * SIDE + x];
    let top = at(y0, x0) * (1.0 - wx) + at(y0, x1) * wx;
    let bottom = at(y1, x0) * (1.0 - wx) + at(y1, x1) * wx;
    top * (1.0 - wy) + bottom * wy
}

/// Bilinear resize of a crop back to SIDE x SIDE (half-pixel centers, as align_corners=False).
fn resized_crop(img: &Image, crop: Crop) -> Image {
    let mut out = [0.0; IMAGE_LEN];
    let sy = crop.height as f32 / SIDE as f32;
    let sx = crop.width as f32 / SIDE as f32;
    for y in 0..SIDE {
        let ty = taps((y as f32 + 0.5) * sy - 0.5, crop.height - 1, crop.top);
        for x in 0..SIDE {
            let tx = taps((x as f32 + 0.5) * sx - 0.5, crop.width - 1, crop.left);
            for c in 0..CHANNELS {
                out[c * SIDE * SIDE + y * SIDE + x] = bilinear(img, c, ty, tx);
            }
        }
    }
    out
}

fn flip_horizontal(img: &mut Image) {
    for row in img.chunks_exact_mut(SIDE) {
        row.reverse();
    }
}

/// Rotates about the image's centre (bilinear; outside the image is black, the background of
/// the grayscale datasets this is for).
fn rotate(img: &Image, degrees: f32) -> Image {
    let mut out = [0.0; IMAGE_LEN];
    let (sin, cos) = degrees.to_radians().sin_cos();
    let centre = (SIDE as f32 - 1.0) / 2.0;
    let plane = SIDE * SIDE;
    // A hair of slack: sin and cos of right angles are not exact in f32.
    let inside = |v: f32| (-1e-3..=(SIDE - 1) as f32 + 1e-3).contains(&v);
    for y in 0..SIDE {
        for x in 0..SIDE {
            // The source pixel that lands on (x, y): the inverse rotation.
            let (dx, dy) = (x as f32 - centre, y as f32 - centre);
            let sx = cos * dx + sin * dy + centre;
            let sy = -sin * dx + cos * dy + centre;
            if !(inside(sx) && inside(sy)) {
                continue;
            }
            let (ty, tx) = (taps(sy, SIDE - 1, 0), taps(sx, SIDE - 1, 0));
            for c in 0..CHANNELS {
                out[c * plane + y * SIDE + x] = bilinear(img, c, ty, tx);
            }
        }
    }
    out
}

fn luma(img: &Image, i: usize) -> f32 {
    let plane = SIDE * SIDE;
    0.299 * img[i] + 0.587 * img[plane + i] + 0.114 * img[2 * plane + i]
}

/// `(img - other) * factor + other`, clamped to [0, 1]: how torchvision blends for jitter.
fn blend(img: &mut Image, other: impl Fn(usize) -> f32, factor: f32) {
    let plane = SIDE * SIDE;
    for (i, v) in img.iter_mut().enumerate() {
        let o = other(i % plane);
        *v = ((*v - o) * factor + o).clamp(0.0, 1.0);
    }
}

fn to_grayscale(img: &mut Image) {
    let plane = SIDE * SIDE;
    for i in 0..plane {
        let l = luma(img, i);
        for c in 0..CHANNELS {
            img[c * plane + i] = l;
        }
    }
}

fn shift_hue(img: &mut Image, shift: f32) {
    let plane = SIDE * SIDE;
    for i in 0..plane {
        let (r, g, b) = (img[i], img[plane + i], img[2 * plane + i]);
        let max = r.max(g).max(b);
        let min = r.min(g).min(b);
        let delta = max - min;
        if delta <= 0.0 {
            continue;
        }
        let h = if max == r {
            ((g - b) / delta).rem_euclid(6.0)
        } else if max == g {
            (b - r) / delta + 2.0
        } else {
            (r - g) / delta + 4.0
        } / 6.0;
        let h = (h + shift).rem_euclid(1.0) * 6.0;
        let x = delta * (1.0 - (h % 2.0 - 1.0).abs());
        let (r1, g1, b1) = match h as u32 {
            0 => (delta, x, 0.0),
            1 => (x, delta, 0.0),
            2 => (0.0, delta, x),
            3 => (0.0, x, delta),
            4 => (x, 0.0, delta),
            _ => (delta, 0.0, x),
        };
        img[i] = r1 + min;
        img[plane + i] = g1 + min;
        img[2 * plane + i] = b1 + min;
    }
}

fn color_jitter(img: &mut Image, cfg: &ViewConfig, rng: &mut impl Rng) {
    let factor = |rng: &mut ChaCha8Rng, s: f32| rng.gen_range((1.0 - s).max(0.0)..=1.0 + s);
    let mut order = [0, 1, 2, 3];
    let mut local = ChaCha8Rng::seed_from_u64(rng.gen());
    order.shuffle(&mut local);
    for op in order {
        match op {
            0 => {
                let f = factor(&mut local, cfg.brightness);
                blend(img, |_| 0.0, f);
            }
            1 => {
                let f = factor(&mut local, cfg.contrast);
                let mean =
                    (0..SIDE * SIDE).map(|i| luma(img, i)).sum::<f32>() / (SIDE * SIDE) as f32;
                blend(img, |_| mean, f);
            }
            2 => {
                let f = factor(&mut local, cfg.saturation);
                let gray: Vec<f32> = (0..SIDE * SIDE).map(|i| luma(img, i)).collect();
                blend(img, |i| gray[i], f);
            }
            _ => {
                let shift = local.gen_range(-cfg.hue..=cfg.hue);
                shift_hue(img, shift);
            }
        }
    }
}

fn normalize_into(img: &Image, out: &mut [f32]) {
    let plane = SIDE * SIDE;
    for (i, (o, v)) in out.iter_mut().zip(img).enumerate() {
        let c = i / plane;
        *o = (v - MEAN[c]) / STD[c];
    }
}

/// One random view of a 3x32x32 u8 image, normalized, written into `out`.
pub fn view(pixels: &[u8], cfg: &ViewConfig, rng: &mut impl Rng, out: &mut [f32]) {
    let crop = sample_crop(rng, SIDE, cfg.crop_scale, cfg.crop_ratio);
    let mut img = resized_crop(&to_unit(pixels), crop);
    if rng.gen_bool(cfg.flip_p) {
        flip_horizontal(&mut img);
    }
    if cfg.rotation_degrees > 0.0 {
        let degrees = rng.gen_range(-cfg.rotation_degrees..=cfg.rotation_degrees);
        img = rotate(&img, degrees);
    }
    if rng.gen_bool(cfg.jitter_p) {
        color_jitter(&mut img, cfg, rng);
    }
    if rng.gen_bool(cfg.grayscale_p) {
        to_grayscale(&mut img);
    }
    normalize_into(&img, out);
}

/// The image without augmentation, normalized: what evaluation sees.
pub fn plain(pixels: &[u8], out: &mut [f32]) {
    normalize_into(&to_unit(pixels), out);
}

/// A reproducible stream per (seed, sample): independent of thread count and batch order.
pub fn sample_rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// Two views of each image, `[len, 3, 32, 32]` each, flattened. `stream0` keys the randomness
/// (the trainer passes the global sample position), so a resumed run sees the same views.
pub fn view_pairs(
    images: &[&[u8]],
    cfg: &ViewConfig,
    seed: u64,
    stream0: u64,
) -> (Vec<f32>, Vec<f32>) {
    let mut first = vec![0.0; images.len() * IMAGE_LEN];
    let mut second = vec![0.0; images.len() * IMAGE_LEN];
    first
        .par_chunks_mut(IMAGE_LEN)
        .zip(second.par_chunks_mut(IMAGE_LEN))
        .zip(images.par_iter())
        .enumerate()
        .for_each(|(i, ((a, b), pixels))| {
            let mut rng = sample_rng(seed, stream0 + i as u64);
            view(pixels, cfg, &mut rng, a);
            view(pixels, cfg, &mut rng, b);
        });
    (first, second)
}

/// Un-augmented, normalized images for evaluation.
pub fn plain_batch(images: &[&[u8]]) -> Vec<f32> {
    let mut out = vec![0.0; images.len() * IMAGE_LEN];
    out.par_chunks_mut(IMAGE_LEN)
        .zip(images.par_iter())
        .for_each(|(o, pixels)| plain(pixels, o));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crops_stay_in_the_scale_and_ratio_ranges() {
        let mut rng = sample_rng(7, 0);
        let cfg = ViewConfig::default();
        let n = 20_000;
        let mut mean_area = 0.0;
        for _ in 0..n {
            let c = sample_crop(&mut rng, SIDE, cfg.crop_scale, cfg.crop_ratio);
            assert!(c.top + c.height <= SIDE && c.left + c.width <= SIDE);
            let area = (c.height * c.width) as f64 / (SIDE * SIDE) as f64;
            // Rounding to whole pixels widens the range by about a pixel on each side.
            assert!((0.05..=1.0).contains(&area), "area {area}");
            let ratio = c.width as f64 / c.height as f64;
            assert!((0.5..=2.0).contains(&ratio), "ratio {ratio}");
            mean_area += area / n as f64;
        }
        // Uniform in 0.08..1 before the rejections: mean near 0.54.
        assert!((0.45..0.60).contains(&mean_area), "mean area {mean_area}");
    }

    #[test]
    fn flips_about_half_the_time() {
        let cfg = ViewConfig::default();
        let mut rng = sample_rng(3, 1);
        let n = 10_000;
        let flips = (0..n).filter(|_| rng.gen_bool(cfg.flip_p)).count();
        let rate = flips as f64 / n as f64;
        assert!((rate - 0.5).abs() < 0.02, "flip rate {rate}");
    }

    #[test]
    fn same_seed_same_views_other_seed_other_views() {
        let img: Vec<u8> = (0..IMAGE_LEN).map(|i| (i * 37 % 251) as u8).collect();
        let images = vec![img.as_slice(); 4];
        let cfg = ViewConfig::default();
        let a = view_pairs(&images, &cfg, 11, 100);
        let b = view_pairs(&images, &cfg, 11, 100);
        let c = view_pairs(&images, &cfg, 12, 100);
        assert_eq!(a, b);
        assert_ne!(a.0, c.0);
        assert_ne!(
            a.0[..IMAGE_LEN],
            a.1[..IMAGE_LEN],
            "two views of one image differ"
        );
    }

    #[test]
    fn identity_crop_and_plain_agree() {
        let img: Vec<u8> = (0..IMAGE_LEN).map(|i| (i % 256) as u8).collect();
        let full = Crop {
            top: 0,
            left: 0,
            height: SIDE,
            width: SIDE,
        };
        let resized = resized_crop(&to_unit(&img), full);
        let mut a = vec![0.0; IMAGE_LEN];
        let mut b = vec![0.0; IMAGE_LEN];
        normalize_into(&resized, &mut a);
        plain(&img, &mut b);
        assert_eq!(a, b);
        assert!((b[0] - (0.0 - MEAN[0]) / STD[0]).abs() < 1e-6);
    }

    #[test]
    fn rotations_turn_about_the_centre() {
        let img: Image = std::array::from_fn(|i| (i % 97) as f32 / 97.0);
        let same = rotate(&img, 0.0);
        assert!(img.iter().zip(&same).all(|(a, b)| (a - b).abs() < 1e-6));
        // A quarter turn sends the top-left corner to a corner and keeps every pixel inside.
        let turned = rotate(&img, 90.0);
        let corners = [0, SIDE - 1, SIDE * (SIDE - 1), SIDE * SIDE - 1];
        let back = rotate(&turned, -90.0);
        assert!(img.iter().zip(&back).all(|(a, b)| (a - b).abs() < 1e-4));
        assert!(corners.iter().any(|&k| (turned[k] - img[0]).abs() < 1e-4));
    }

    #[test]
    fn grayscale_data_gets_views_that_stay_gray() {
        assert_eq!(ViewRecipe::Auto.resolve(1), ViewRecipe::Grayscale);
        assert_eq!(ViewRecipe::Auto.resolve(3), ViewRecipe::Color);
        assert_eq!(ViewRecipe::Color.resolve(1), ViewRecipe::Color);
        let cfg = ViewRecipe::Grayscale.config(0.2);
        assert_eq!(cfg.crop_scale, (0.2, 1.0));
        let gray: Vec<u8> = (0..SIDE * SIDE).map(|i| (i * 7 % 256) as u8).collect();
        let pixels = gray.repeat(CHANNELS);
        let mut out = vec![0.0; IMAGE_LEN];
        view(&pixels, &cfg, &mut sample_rng(3, 0), &mut out);
        let plane = SIDE * SIDE;
        // Equal channels before normalization: x_c * STD[c] + MEAN[c] agree.
        for i in 0..plane {
            let unit = |c: usize| out[c * plane + i] * STD[c] + MEAN[c];
            assert!((unit(0) - unit(1)).abs() < 1e-5 && (unit(0) - unit(2)).abs() < 1e-5);
        }
    }

    #[test]
    fn hue_shift_of_a_full_turn_is_identity() {
        let mut img = to_unit(
            &(0..IMAGE_LEN)
                .map(|i| (i * 7 % 256) as u8)
                .collect::<Vec<_>>(),
        );
        let orig = img;
        shift_hue(&mut img, 1.0);
        for (a, b) in img.iter().zip(orig.iter()) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}
