//! PNG grids of what the model trains on: the images themselves, or their augmented view pairs.

use super::{sample_rng, view, ViewConfig, ViewRecipe, MEAN, STD};
use crate::data::{Dataset, CHANNELS, IMAGE_LEN, SIDE};

/// An RGB tile, row-major, `height * width * 3` bytes.
struct Tile {
    width: usize,
    height: usize,
    rgb: Vec<u8>,
}

/// The stored image cropped back to its source size (MNIST's 28x28 sits padded inside 32x32).
fn source_tile(pixels: &[u8], shape: [usize; 3]) -> Tile {
    let (h, w) = (shape[1], shape[2]);
    let (top, left) = ((SIDE - h) / 2, (SIDE - w) / 2);
    let mut rgb = Vec::with_capacity(h * w * 3);
    for y in top..top + h {
        for x in left..left + w {
            for c in 0..CHANNELS {
                rgb.push(pixels[c * SIDE * SIDE + y * SIDE + x]);
            }
        }
    }
    Tile {
        width: w,
        height: h,
        rgb,
    }
}

/// Stored CHW bytes as displayable RGB bytes, row-major 32x32x3.
pub fn image_rgb(pixels: &[u8]) -> Vec<u8> {
    (0..SIDE * SIDE)
        .flat_map(|i| (0..CHANNELS).map(move |c| pixels[c * SIDE * SIDE + i]))
        .collect()
}

/// A normalized CHW view back to displayable RGB bytes, row-major 32x32x3.
pub fn view_rgb(normalized: &[f32]) -> Vec<u8> {
    let mut rgb = Vec::with_capacity(SIDE * SIDE * 3);
    for i in 0..SIDE * SIDE {
        for c in 0..CHANNELS {
            let v = normalized[c * SIDE * SIDE + i] * STD[c] + MEAN[c];
            rgb.push((v * 255.0).round().clamp(0.0, 255.0) as u8);
        }
    }
    rgb
}

fn view_tile(normalized: &[f32]) -> Tile {
    let rgb = view_rgb(normalized);
    Tile {
        width: SIDE,
        height: SIDE,
        rgb,
    }
}

/// Tiles the first `count` training images (or, with `views = Some(seed)`, two augmented views of
/// each, side by side) into a PNG, each pixel scaled up `scale` times.
pub fn grid_png(
    dataset: &Dataset,
    count: usize,
    scale: usize,
    views: Option<u64>,
) -> anyhow::Result<Vec<u8>> {
    let split = if dataset.train.is_empty() {
        &dataset.test
    } else {
        &dataset.train
    };
    let count = count.min(split.len());
    anyhow::ensure!(count > 0, "the dataset has no images to preview");
    anyhow::ensure!(
        (1..=64).contains(&scale),
        "--scale {scale} must be between 1 and 64"
    );
    // The recipe a run on this data gets by default.
    let recipe = ViewRecipe::Auto
        .resolve(dataset.source_shape[0])
        .config(ViewConfig::default().crop_scale.0);
    let mut tiles = Vec::new();
    for i in 0..count {
        match views {
            None => tiles.push(source_tile(split.image(i), dataset.source_shape)),
            Some(seed) => {
                let mut rng = sample_rng(seed, i as u64);
                let mut buf = vec![0.0; IMAGE_LEN];
                for _ in 0..2 {
                    view(split.image(i), &recipe, &mut rng, &mut buf);
                    tiles.push(view_tile(&buf));
                }
            }
        }
    }
    let per_item = if views.is_some() { 2 } else { 1 };
    let cols = ((count as f64).sqrt().ceil() as usize).max(1) * per_item;
    tiles_png(&tiles, cols, scale)
}

/// Images `indices` of `split` in one row, at their source size scaled `scale` times: a query
/// and its nearest neighbours, say.
pub fn row_png(
    split: &crate::data::Split,
    source_shape: [usize; 3],
    indices: &[usize],
    scale: usize,
) -> anyhow::Result<Vec<u8>> {
    anyhow::ensure!(!indices.is_empty(), "no images to draw");
    let tiles: Vec<Tile> = indices
        .iter()
        .map(|&i| source_tile(split.image(i), source_shape))
        .collect();
    tiles_png(&tiles, tiles.len(), scale)
}

/// Equal-sized tiles on a white canvas, `cols` per row, 2-pixel gaps.
fn tiles_png(tiles: &[Tile], cols: usize, scale: usize) -> anyhow::Result<Vec<u8>> {
    let rows = tiles.len().div_ceil(cols);
    let gap = if tiles.len() > 1 { 2 } else { 0 };
    let (tw, th) = (tiles[0].width * scale, tiles[0].height * scale);
    let width = cols * tw + (cols - 1) * gap;
    let height = rows * th + (rows - 1) * gap;
    let mut canvas = vec![255u8; width * height * 3];
    for (t, tile) in tiles.iter().enumerate() {
        let (ox, oy) = ((t % cols) * (tw + gap), (t / cols) * (th + gap));
        for y in 0..th {
            for x in 0..tw {
                let src = ((y / scale) * tile.width + x / scale) * 3;
                let dst = ((oy + y) * width + ox + x) * 3;
                canvas[dst..dst + 3].copy_from_slice(&tile.rgb[src..src + 3]);
            }
        }
    }
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width as u32, height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.write_header()?.write_image_data(&canvas)?;
    Ok(out)
}
