//! Pixel parity from real photographs (JPEG and PNG, grey, RGBA, palette, EXIF-rotated)
//! against transformers' processors: the torchvision one AutoProcessor loads by default
//! ("fast") and the PIL one ("slow"). The grid must be identical; the values are reported and
//! bounded. See the crate docs of `image` for why small differences remain.

mod common;

use candle_core::{DType, Device};
use common::*;
use inspector_qwen2vl::image::{ProcessorConfig, decode_rgb, process_file, process_rgb};

const IMAGES: [&str; 6] = [
    "astronaut.jpg",
    "coffee.png",
    "camera_gray.png",
    "chelsea_rgba.png",
    "rocket_exif.jpg",
    "coffee_palette.png",
];

/// One uint8 step after normalisation: 1/255/std, at most 1/255/0.2613.
const ONE_STEP: f32 = 0.0151;

fn stats(a: &candle_core::Tensor, b: &candle_core::Tensor) -> (f32, f32) {
    let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
    let max = d.max(0).unwrap().to_scalar::<f32>().unwrap();
    let mean = d.mean(0).unwrap().to_scalar::<f32>().unwrap();
    (max, mean)
}

#[test]
fn pixel_parity_with_transformers_processors() {
    let dir = fixtures().join("images");
    let config = ProcessorConfig::from_model_dir(&dir.join("reference")).unwrap();
    assert_eq!((config.min_pixels, config.max_pixels), (3136, 12544));
    for name in IMAGES {
        let path = dir.join(name);
        let stem = name.rsplit_once('.').unwrap().0;
        let r = candle_core::safetensors::load(
            dir.join("reference").join(format!("{stem}.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let ours = process_file(&path, &config).unwrap();
        let grid: Vec<i64> = r["image_grid_thw"]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(
            ours.grid_thw.iter().map(|&x| x as i64).collect::<Vec<_>>(),
            grid,
            "{name}: grid"
        );

        // Decoding: our decoder against PIL's (via load_image), pixel by pixel.
        let rgb = decode_rgb(&std::fs::read(&path).unwrap(), u64::MAX).unwrap();
        let pil = r["decoded_rgb"].to_dtype(DType::U8).unwrap();
        let (h, w, _) = pil.dims3().unwrap();
        assert_eq!(
            (rgb.height() as usize, rgb.width() as usize),
            (h, w),
            "{name}: decoded size (EXIF orientation)"
        );
        let pil_bytes: Vec<u8> = pil.flatten_all().unwrap().to_vec1().unwrap();
        let decode_max = rgb
            .as_raw()
            .iter()
            .zip(&pil_bytes)
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .max()
            .unwrap();

        // Preprocessing alone, from PIL's own decoded pixels: isolates resize + normalise.
        let from_pil = image::RgbImage::from_raw(w as u32, h as u32, pil_bytes).unwrap();
        let same_input = process_rgb(&from_pil, &config).unwrap();
        let (slow_max, slow_mean) = stats(&same_input.pixel_values, &r["pixel_values_slow"]);
        let (fast_max, fast_mean) = stats(&same_input.pixel_values, &r["pixel_values_fast"]);
        // End to end, from the file.
        let (file_max, file_mean) = stats(&ours.pixel_values, &r["pixel_values_fast"]);
        println!(
            "{name:20} decode max {decode_max} levels | same pixels vs PIL processor: max {slow_max:.4} mean {slow_mean:.2e} | vs torchvision: max {fast_max:.4} mean {fast_mean:.2e} | from file vs torchvision: max {file_max:.4} mean {file_mean:.2e}"
        );
        // Pillow's bicubic is reproduced exactly: the same pixels give the PIL processor's
        // values up to float rounding. The exception is RGBA: the PIL processor, unlike
        // load_image and the torchvision processor, composites alpha onto white first.
        if name.contains("rgba") {
            assert!(slow_max <= ONE_STEP, "{name}: {slow_max}");
        } else {
            assert!(slow_max <= 1e-5, "{name}: {slow_max}");
        }
        assert!(fast_max <= ONE_STEP, "{name}: {fast_max}");
        assert!(fast_mean <= 1e-3, "{name}: {fast_mean}");
        // From the file, JPEG decoders may differ by a few levels.
        assert!(file_mean <= 2e-2, "{name}: {file_mean}");
    }
}
