//! Quantized inference against f32 on a tiny random checkpoint whose every linear layer's input
//! width is a multiple of 256, so that q4k (super-blocks of 256) and the repacked int8 kernels
//! (k % 256 == 0, n % 16 == 0) really apply. The bounds are checked to fail for a transposed
//! weight, a wrong scale and a kernel that reads the wrong rows (mutation checks).

use std::path::{Path, PathBuf};

use candle_core::{
    DType, Device, IndexOp, Module, Tensor,
    quantized::{GgmlDType, QMatMul, QTensor},
};
use inspector_qwen2vl::{
    Backend, Batch, Logits, Quantization, Qwen2Vl, VisionInput, image::process_rgb, init,
    init::KERNEL_FIT_CONFIG as Q256, quant, weights,
};

/// transformers' initializer range: larger weights make the random network chaotic, and its
/// logits then swing with any rounding.
const STD: f64 = 0.02;

fn fixture(dir: &Path) -> PathBuf {
    let model = dir.join("q256");
    init::write_random_checkpoint(&model, Q256, STD, 2026).unwrap();
    model
}

fn backend(q: Quantization) -> Backend {
    Backend {
        quantization: q,
        ..Backend::cpu()
    }
}

/// One 112×84 picture and 40 text tokens.
fn batch(model: &Qwen2Vl) -> Batch {
    let img = image::RgbImage::from_fn(112, 84, |x, y| {
        image::Rgb([(x * 2) as u8, (y * 3) as u8, ((x + y) % 7 * 30) as u8])
    });
    let p = process_rgb(&img, &model.processor).unwrap();
    let tk = &model.config.tokens;
    let mut ids = vec![tk.vision_start.unwrap()];
    ids.extend(std::iter::repeat_n(tk.image_pad, p.n_tokens(2)));
    ids.push(tk.vision_end.unwrap());
    ids.extend((0..40u32).map(|i| (i * 37 + 5) % 480));
    Batch {
        input_ids: vec![ids],
        attention_mask: None,
        images: Some(VisionInput {
            pixel_values: p.pixel_values,
            grid_thw: vec![p.grid_thw],
        }),
    }
}

fn logits(dir: &Path, q: Quantization) -> Tensor {
    let (model, _) = Qwen2Vl::open(dir, &backend(q), None).unwrap();
    let out = model.forward(&batch(&model), Logits::All).unwrap();
    out.logits.i(0).unwrap()
}

/// A dense copy of `dir` whose every weight that `q` quantizes holds its quantized values
/// (rounded to the format and back to f32): its f32 logits differ from the quantized model's
/// only by what the kernels do (activations rounded to 8 bits per block), so they isolate the
/// kernels from the format's own rounding.
fn rounded(dir: &Path, out: &Path, q: Quantization) -> PathBuf {
    weights::rewrite(dir, out, |name, t| {
        Ok(match t.dims() {
            [o, i] if name.ends_with(".weight") => match q.weight_type(*o, *i) {
                Some(kind) => QTensor::quantize(&t, kind)?.dequantize(&Device::Cpu)?,
                None => t,
            },
            _ => t,
        })
    })
    .unwrap();
    out.to_path_buf()
}

/// Errors of `got` against `reference` (`[S, V]` logits).
#[derive(Debug)]
struct Errors {
    /// max |Δ| / max |ref|.
    max_rel: f32,
    /// mean |Δ| / mean |ref|.
    mean_rel: f32,
    /// Share of positions whose arg-max agrees.
    top1: f32,
}

fn errors(reference: &Tensor, got: &Tensor) -> Errors {
    let r = reference.to_vec2::<f32>().unwrap();
    let g = got.to_vec2::<f32>().unwrap();
    let (mut max_d, mut max_r, mut sum_d, mut sum_r, mut n) = (0f32, 0f32, 0f64, 0f64, 0usize);
    let mut agree = 0;
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0
    };
    for (rr, gr) in r.iter().zip(&g) {
        for (a, b) in rr.iter().zip(gr) {
            max_d = max_d.max((a - b).abs());
            max_r = max_r.max(a.abs());
            sum_d += (a - b).abs() as f64;
            sum_r += a.abs() as f64;
            n += 1;
        }
        agree += usize::from(argmax(rr) == argmax(gr));
    }
    assert!(n > 0);
    Errors {
        max_rel: max_d / max_r,
        mean_rel: (sum_d / sum_r) as f32,
        top1: agree as f32 / r.len() as f32,
    }
}

/// Bounds against f32 per format, a little above what they give (the test prints them). Random
/// weights magnify rounding (nothing in them is redundant), so 4-bit rounding moves these logits
/// far more than a trained model's; the kernels themselves are held to [`kernel_within`].
fn within(q: Quantization, e: &Errors) -> bool {
    match q {
        Quantization::Q8_0 => e.max_rel <= 0.03 && e.mean_rel <= 0.03 && e.top1 >= 0.95,
        Quantization::Q4K => e.max_rel <= 0.25 && e.mean_rel <= 0.3 && e.top1 >= 0.7,
        Quantization::None => e.max_rel == 0.0,
    }
}

/// Bounds of a quantized model against f32 on its own rounded weights ([`rounded`]): only the
/// kernels' 8-bit activations differ.
fn kernel_within(e: &Errors) -> bool {
    e.max_rel <= KERNEL_MAX_REL && e.mean_rel <= KERNEL_MEAN_REL && e.top1 >= 0.95
}

const KERNEL_MAX_REL: f32 = 0.03;
const KERNEL_MEAN_REL: f32 = 0.03;

#[test]
fn q8_0_and_q4k_logits_follow_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture(tmp.path());
    let reference = logits(&dir, Quantization::None);
    for q in [Quantization::Q8_0, Quantization::Q4K] {
        let (model, info) = Qwen2Vl::open(&dir, &backend(q), None).unwrap();
        // Every projection, the LM head and the embedding are in the format: only norms,
        // biases and the patch embedding (3·2·14·14·256 = 301,056) are f32.
        let f32_params = info.params_by_type["f32"];
        assert!(f32_params < 320_000, "{q}: {:?}", info.params_by_type);
        assert_eq!(
            info.params_by_type.len(),
            2,
            "{q}: {:?}",
            info.params_by_type
        );
        assert_eq!(model.quantization(), q);
        let got = model
            .forward(&batch(&model), Logits::All)
            .unwrap()
            .logits
            .i(0)
            .unwrap();
        let e = errors(&reference, &got);
        let r = rounded(&dir, &tmp.path().join(format!("rounded-{q}")), q);
        let k = errors(&logits(&r, Quantization::None), &got);
        println!("{q} against f32: {e:?}\n{q} against f32 on its rounded weights: {k:?}");
        assert!(within(q, &e), "{q}: {e:?}");
        assert!(kernel_within(&k), "{q} kernels: {k:?}");
        assert!(
            e.max_rel > 0.0,
            "{q} gave f32's logits exactly: not quantized?"
        );
    }
}

#[test]
fn a_quantized_directory_computes_what_load_time_quantization_computes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture(tmp.path());
    for q in [Quantization::Q8_0, Quantization::Q4K] {
        let out = tmp.path().join(format!("q-{q}"));
        let done = quant::quantize_dir(&dir, None, q, &out, |_, _| {}).unwrap();
        assert_eq!(done.record.format, q);
        assert!(out.join("config.json").exists() && out.join(quant::RECORD_FILE).exists());
        assert!(!out.join("model.safetensors.index.json").exists());
        assert!(
            done.gguf_bytes < done.source_bytes / 3,
            "{q}: {} bytes",
            done.gguf_bytes
        );
        // From the directory, as stored (no quantization asked) and naming its format.
        let stored = logits(&out, Quantization::None);
        assert_eq!(
            stored.to_vec2::<f32>().unwrap(),
            logits(&dir, q).to_vec2::<f32>().unwrap(),
            "{q}"
        );
        assert_eq!(
            logits(&out, q).to_vec2::<f32>().unwrap(),
            stored.to_vec2::<f32>().unwrap()
        );
        // Another format, or a dense dtype, is refused with the directory's name.
        let other = if q == Quantization::Q8_0 {
            Quantization::Q4K
        } else {
            Quantization::Q8_0
        };
        let e = Qwen2Vl::open(&out, &backend(other), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&out.display().to_string()) && e.contains(q.name()),
            "{e}"
        );
        let bf16 = Backend {
            dtype: DType::BF16,
            ..Backend::cpu()
        };
        let e = Qwen2Vl::open(&out, &bf16, None).unwrap_err().to_string();
        assert!(e.contains("bf16"), "{e}");
        // Training needs dense weights: full fine-tuning, and a trainable LoRA set.
        let e = Qwen2Vl::load_trainable(&out, DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("quantized") && e.contains("train"), "{e}");
        let lora = inspector_lora::Lora::new(inspector_lora::LoraConfig::default(), &Device::Cpu);
        let e = Qwen2Vl::load_with(&out, DType::F32, &Device::Cpu, Some(&lora))
            .unwrap_err()
            .to_string();
        assert!(e.contains("trainable LoRA") && e.contains(q.name()), "{e}");
        lora.freeze();
        assert!(Qwen2Vl::load_with(&out, DType::F32, &Device::Cpu, Some(&lora)).is_ok());
        // Quantizing a quantized directory, or into a non-empty folder, is refused.
        let e = quant::quantize_dir(&out, None, q, &tmp.path().join("again"), |_, _| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("already quantized"), "{e}");
        let e = quant::quantize_dir(&dir, None, q, &out, |_, _| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("not empty"), "{e}");
    }
}

/// A change to one weight, standing for a kernel bug.
type Mutation = Box<dyn Fn(Tensor) -> Tensor>;

/// Writes a copy of `dir` with `change` applied to the tensor `name`.
fn mutated(dir: &Path, out: &Path, name: &str, change: impl Fn(Tensor) -> Tensor) -> PathBuf {
    let mut hit = false;
    weights::rewrite(dir, out, |n, t| {
        Ok(if n == name {
            hit = true;
            change(t)
        } else {
            t
        })
    })
    .unwrap();
    assert!(hit, "no tensor {name}");
    out.to_path_buf()
}

#[test]
fn the_bounds_catch_a_transposed_weight_a_wrong_scale_and_misread_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture(tmp.path());
    let reference = logits(&dir, Quantization::None);
    let rounded_ref: Vec<(Quantization, Tensor)> = [Quantization::Q8_0, Quantization::Q4K]
        .into_iter()
        .map(|q| {
            let r = rounded(&dir, &tmp.path().join(format!("rounded-{q}")), q);
            (q, logits(&r, Quantization::None))
        })
        .collect();
    let o_proj = "model.layers.1.self_attn.o_proj.weight";
    let cases: Vec<(&str, Mutation)> = vec![
        (
            "transposed",
            Box::new(|t: Tensor| t.t().unwrap().contiguous().unwrap()),
        ),
        // A block scale read 12 % too large, in every block of one layer.
        ("wrong scale", Box::new(|t: Tensor| (t * 1.12).unwrap())),
        // A kernel that takes each output row from the next 16-row tile.
        (
            "misread rows",
            Box::new(|t: Tensor| {
                let n = t.dim(0).unwrap();
                let idx: Vec<u32> = (0..n as u32).map(|i| (i + 16) % n as u32).collect();
                t.index_select(&Tensor::new(idx, &Device::Cpu).unwrap(), 0)
                    .unwrap()
            }),
        ),
    ];
    for (what, change) in cases {
        let m = mutated(
            &dir,
            &tmp.path().join(what.replace(' ', "-")),
            o_proj,
            change,
        );
        for (q, rounded) in &rounded_ref {
            let got = logits(&m, *q);
            let k = errors(rounded, &got);
            let e = errors(&reference, &got);
            println!("{what}, {q}: kernels {k:?}, against f32 {e:?}");
            assert!(
                !kernel_within(&k),
                "{what} under {q} passed the kernel bounds: {k:?}"
            );
            if *q == Quantization::Q8_0 {
                assert!(!within(*q, &e), "{what} under {q} passed the bounds: {e:?}");
            }
        }
    }
}

/// The kernels themselves: one product per format, for one row (decode), a few rows and many
/// (prefill), packed at load (`pack_for_cpu`) or on first use, against f32.
#[test]
fn quantized_products_match_f32_within_the_formats_precision() {
    let dev = Device::Cpu;
    let (n, k) = (96, 512);
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 0.2)
        .collect();
    let w = Tensor::from_vec(w, (n, k), &dev).unwrap();
    for m in [1usize, 3, 37] {
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 104_729 % 997) as f32 / 997.0 - 0.5) * 2.0)
            .collect();
        let x = Tensor::from_vec(x, (m, k), &dev).unwrap();
        let exact = x.matmul(&w.t().unwrap()).unwrap();
        // Measured: q8_0 0.012–0.016, q4k 0.17–0.19 (4 bits on evenly spread weights).
        for (t, bound) in [(GgmlDType::Q8_0, 0.025f32), (GgmlDType::Q4K, 0.25)] {
            let mut results = Vec::new();
            for pack in [false, true] {
                let mut qt = QTensor::quantize(&w, t).unwrap();
                let packed = pack && qt.pack_for_cpu();
                let y = QMatMul::from_qtensor(qt).unwrap().forward(&x).unwrap();
                let d = (&y - &exact).unwrap().abs().unwrap();
                let rel = d.max_all().unwrap().to_scalar::<f32>().unwrap()
                    / exact
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                println!("{t:?} m={m} packed={packed}: max rel {rel:.5}");
                assert!(rel < bound, "{t:?} m={m} packed={packed}: {rel}");
                results.push(y.to_vec2::<f32>().unwrap());
            }
            // Packing at load only moves when the tiles are made; on an AMX core a large
            // q4k product of an unpacked weight runs candle's AMX kernel instead (f32
            // sub-block scales), so the two agree to rounding there.
            let scale = results[0]
                .iter()
                .flatten()
                .fold(0f32, |a, v| a.max(v.abs()));
            let gap = results[0]
                .iter()
                .flatten()
                .zip(results[1].iter().flatten())
                .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            if t == GgmlDType::Q4K && m >= 32 {
                assert!(
                    gap <= 1e-5 * scale,
                    "{t:?} m={m}: packed and unpacked differ by {gap}"
                );
            } else {
                assert_eq!(results[0], results[1], "{t:?} m={m}");
            }
        }
    }
}

#[test]
fn packing_frees_the_blocks_where_the_int8_kernels_serve_every_product() {
    let w = Tensor::ones((32, 256), DType::F32, &Device::Cpu).unwrap();
    let mut qt = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
    let before = qt.storage_size_in_bytes();
    if qt.pack_for_cpu() {
        assert_eq!(qt.storage_size_in_bytes(), 0);
        let e = qt.dequantize(&Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("packed"), "{e}");
    } else {
        // No VNNI on this core: the blocks stay.
        assert_eq!(qt.storage_size_in_bytes(), before);
    }
    // Packed straight from the blocks' bytes (a mapped GGUF file's), for each format the
    // kernels take: the same products as packing a copy, or `None` where no kernel serves.
    let x = Tensor::randn(0f32, 1.0, (5, 512), &Device::Cpu).unwrap();
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K] {
        let w = Tensor::randn(0f32, 0.02, (48, 512), &Device::Cpu).unwrap();
        let blocks = QTensor::quantize(&w, dtype).unwrap();
        let bytes = blocks.data().unwrap().into_owned();
        let from_bytes = QTensor::packed_for_cpu_from_bytes(dtype, &bytes, (48, 512)).unwrap();
        let mut copy = QTensor::quantize(&w, dtype).unwrap();
        let packs = copy.pack_for_cpu();
        assert_eq!(from_bytes.is_some(), packs, "{dtype:?}");
        if let Some(qt) = from_bytes {
            assert_eq!(
                qt.storage_size_in_bytes(),
                0,
                "{dtype:?}: the blocks are not kept"
            );
            let product = |q: QTensor| {
                QMatMul::from_qtensor(q)
                    .unwrap()
                    .forward(&x)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap()
            };
            assert_eq!(product(qt), product(copy), "{dtype:?}");
        }
        // Bytes that are not 48 × 512 weights of the format are refused.
        let e = QTensor::packed_for_cpu_from_bytes(dtype, &bytes[..bytes.len() - 1], (48, 512))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bytes"), "{e}");
    }
    // A shape the kernels do not take keeps its blocks.
    let w = Tensor::ones((20, 256), DType::F32, &Device::Cpu).unwrap();
    let mut qt = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
    assert!(!qt.pack_for_cpu());
    assert!(qt.dequantize(&Device::Cpu).is_ok());
}

/// Layers reading one input (q, k, v; gate, up) run as one fused product in the quantized
/// case; the results are those of one product per layer, for decoding (one row) and prefill.
#[test]
fn fused_projections_equal_one_product_per_layer() {
    use inspector_lora::{Base, Linear, forward_shared};
    let dev = Device::Cpu;
    let layer = |n: usize, seed: usize, t: GgmlDType| {
        let w: Vec<f32> = (0..n * 512)
            .map(|i| (((i + seed) * 7919 % 1013) as f32 / 1013.0 - 0.5) * 0.2)
            .collect();
        let mut qt = QTensor::quantize(&Tensor::from_vec(w, (n, 512), &dev).unwrap(), t).unwrap();
        qt.pack_for_cpu();
        let bias = Tensor::from_vec((0..n).map(|i| i as f32 * 0.01).collect(), n, &dev).unwrap();
        Linear::plain(Base::Quantized {
            weight: QMatMul::from_qtensor(qt).unwrap(),
            dims: (n, 512),
            bias: Some(bias),
        })
    };
    for t in [GgmlDType::Q8_0, GgmlDType::Q4K] {
        let (q, k, v) = (layer(256, 1, t), layer(64, 2, t), layer(64, 3, t));
        for m in [1usize, 37] {
            let x: Vec<f32> = (0..m * 512)
                .map(|i| ((i * 104_729 % 997) as f32 / 997.0 - 0.5) * 2.0)
                .collect();
            let x = Tensor::from_vec(x, (1, m, 512), &dev).unwrap();
            let fused = forward_shared(&[&q, &k, &v], &x).unwrap();
            for (f, l) in fused.iter().zip([&q, &k, &v]) {
                let one = l.forward(&x).unwrap();
                assert_eq!(f.dims(), one.dims());
                let d = (f - &one).unwrap().abs().unwrap().max_all().unwrap();
                let d = d.to_scalar::<f32>().unwrap();
                assert!(d <= 1e-4, "{t:?} m={m}: {d}");
            }
        }
    }
}
