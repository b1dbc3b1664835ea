//! The fused CPU kernels against the composite, autograd-differentiated ops they replace:
//! values and the gradients of every input within 1e-5 (relative to the largest value).

use candle_core::{D, DType, Device, Result, Tensor, Var};
use inspector_qwen2vl::fused;

mod common;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // A fixed pseudo-random fill, so that failures reproduce.
    let n: usize = shape.iter().product();
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let data: Vec<f32> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn close(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let diff = common::max_diff(got, want);
    let scale = common::max_abs(want).max(1e-6);
    assert!(
        diff / scale <= 1e-5,
        "{what}: max|Δ| {diff} against max|ref| {scale}"
    );
    assert!(scale > 1e-4, "{what}: the reference is all zeros");
}

/// Runs `f` on vars made from `inputs`, with the fused op and with the composite one, and
/// compares outputs and the gradients of a weighted sum of the output.
fn check(
    what: &str,
    inputs: &[Tensor],
    fused: impl Fn(&[Tensor]) -> Result<Tensor>,
    composite: impl Fn(&[Tensor]) -> Result<Tensor>,
) {
    let run = |f: &dyn Fn(&[Tensor]) -> Result<Tensor>| {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts).unwrap();
        let weights = randn(y.dims(), 99);
        let grads = (&y * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gs: Vec<Tensor> = vars
            .iter()
            .map(|v| grads.get(v).expect("a gradient for every input").clone())
            .collect();
        (y, gs)
    };
    let (y1, g1) = run(&fused);
    let (y2, g2) = run(&composite);
    close(&format!("{what} output"), &y1, &y2);
    for (i, (a, b)) in g1.iter().zip(&g2).enumerate() {
        close(&format!("{what} gradient of input {i}"), a, b);
    }
}

#[test]
fn softmax_matches_the_composite_op() {
    check(
        "softmax",
        &[randn(&[2, 3, 5, 37], 1)],
        |t| fused::softmax_last_dim(&t[0]),
        |t| candle_nn::ops::softmax(&t[0], D::Minus1),
    );
}

#[test]
fn rms_norm_matches_the_composite_op() {
    check(
        "rms_norm",
        &[randn(&[2, 7, 48], 2), randn(&[48], 3)],
        |t| fused::rms_norm(&t[0], &t[1], 1e-6),
        |t| {
            let var = t[0].sqr()?.mean_keepdim(D::Minus1)?;
            t[0].broadcast_div(&(var + 1e-6)?.sqrt()?)?
                .broadcast_mul(&t[1])
        },
    );
}

#[test]
fn layer_norm_matches_the_composite_op() {
    check(
        "layer_norm",
        &[randn(&[9, 40], 4), randn(&[40], 5), randn(&[40], 6)],
        |t| fused::layer_norm(&t[0], &t[1], &t[2], 1e-6),
        |t| {
            let x = t[0].broadcast_sub(&t[0].mean_keepdim(D::Minus1)?)?;
            let var = x.sqr()?.mean_keepdim(D::Minus1)?;
            x.broadcast_div(&(var + 1e-6)?.sqrt()?)?
                .broadcast_mul(&t[1])?
                .broadcast_add(&t[2])
        },
    );
}

#[test]
fn silu_and_quick_gelu_match_the_composite_ops() {
    for alpha in [1.0, 1.702] {
        check(
            &format!("x·σ({alpha}x)"),
            &[randn(&[3, 50_000], 7)],
            |t| fused::scaled_silu(&t[0], alpha),
            |t| &t[0] * candle_nn::ops::sigmoid(&(&t[0] * alpha)?)?,
        );
    }
}

fn rotate_half(xs: &Tensor) -> Result<Tensor> {
    let half = xs.dim(D::Minus1)? / 2;
    let x1 = xs.narrow(D::Minus1, 0, half)?;
    let x2 = xs.narrow(D::Minus1, half, half)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

#[test]
fn rope_matches_the_composite_op_in_both_layouts() {
    // The decoder's layout: x [B, H, S, D], cos/sin [B, 1, S, D].
    // The vision tower's: x [N, H, D], cos/sin [N, 1, D].
    for (x, c) in [
        (vec![2, 3, 11, 16], vec![2, 1, 11, 16]),
        (vec![13, 4, 8], vec![13, 1, 8]),
    ] {
        let angles = randn(&c, 8);
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let (cos2, sin2) = (cos.clone(), sin.clone());
        check(
            "rope",
            &[randn(&x, 9)],
            move |t| fused::rope(&t[0], &cos, &sin),
            move |t| t[0].broadcast_mul(&cos2)? + rotate_half(&t[0])?.broadcast_mul(&sin2)?,
        );
    }
}

#[test]
fn non_f32_input_is_refused_by_the_kernels_and_routed_around_by_the_ops() {
    let x = randn(&[4, 8], 10).to_dtype(DType::BF16).unwrap();
    assert!(!fused::applies(&x));
    assert!(fused::softmax_last_dim(&x).is_err());
    // The public op falls back to the composite path.
    let y = inspector_qwen2vl::ops::softmax_f32(&x, DType::BF16).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
}

/// A causal mask with left padding `[B, 1, S, T]` (T = past + S), as the decoder builds it.
fn causal_mask(pads: &[usize], s: usize, past: usize) -> Tensor {
    let t = past + s;
    let mut m = Vec::with_capacity(pads.len() * s * t);
    for &pad in pads {
        for i in 0..s {
            for j in 0..t {
                let visible = j <= past + i && j >= pad;
                m.push(if visible { 0.0 } else { f32::MIN });
            }
        }
    }
    Tensor::from_vec(m, (pads.len(), 1, s, t), &Device::Cpu).unwrap()
}

#[test]
fn attention_matches_the_composite_op() {
    // 150 queries: three blocks of 64, the last one short; batch row 1 is left-padded, so its
    // first 7 queries see nothing (the composite averages every key there; so must we).
    // Both backward paths: probabilities kept from the forward pass, and recomputed.
    for (s, past, keep) in [
        (150, 0, usize::MAX),
        (150, 0, 0),
        (5, 40, usize::MAX),
        (5, 40, 0),
        (1, 77, usize::MAX),
    ] {
        let t = past + s;
        let mask = causal_mask(&[0, 7], s, past);
        let scale = 1.0 / (24f64).sqrt();
        check(
            &format!("attention S={s} past={past} keep={keep}"),
            &[
                randn(&[2, 3, s, 24], 11),
                randn(&[2, 3, t, 24], 12),
                randn(&[2, 3, t, 24], 13),
            ],
            |x| fused::attention_keeping(&x[0], &x[1], &x[2], &mask, scale, keep),
            |x| {
                let scores = (x[0].matmul(&x[1].t()?)? * scale)?.broadcast_add(&mask)?;
                candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(&x[2])
            },
        );
    }
}

#[test]
fn grouped_attention_reads_shared_heads_from_a_wider_buffer_as_repeated_heads_would() {
    // 6 query heads on 2 key/value heads, as Qwen2-VL-2B's 12 on 2; keys and values are the
    // first `t` rows of a buffer with room for more (a decoding cache), and a grouped call must
    // give what the repeated, contiguous heads give. Batch row 1 is left-padded.
    let scale = 1.0 / (24f64).sqrt();
    // The last case has no mask (the vision tower's full attention): its query blocks are
    // larger, 256 rows, and 300 rows leave a short last one.
    for (s, past, causal) in [
        (1, 77, true),
        (5, 40, true),
        (150, 0, true),
        (300, 0, false),
    ] {
        let t = past + s;
        let mask = if causal {
            causal_mask(&[0, 7], s, past)
        } else {
            Tensor::zeros((2, 1, s, t), DType::F32, &Device::Cpu).unwrap()
        };
        let q = randn(&[2, 6, s, 24], 21);
        let kbuf = randn(&[2, 2, t + 9, 24], 22);
        let vbuf = randn(&[2, 2, t + 9, 24], 23);
        let (k, v) = (kbuf.narrow(2, 0, t).unwrap(), vbuf.narrow(2, 0, t).unwrap());
        assert!(!k.is_contiguous(), "the test must read a strided buffer");
        let got = fused::attention_grouped(&q, &k, &v, &mask, scale, 3).unwrap();
        let repeat = |x: &Tensor| {
            x.unsqueeze(2)
                .unwrap()
                .expand((2, 2, 3, t, 24))
                .unwrap()
                .reshape((2, 6, t, 24))
                .unwrap()
        };
        let (kr, vr) = (repeat(&k), repeat(&v));
        let scores = (q.matmul(&kr.t().unwrap()).unwrap() * scale)
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
        let want = candle_nn::ops::softmax(&scores, D::Minus1)
            .unwrap()
            .matmul(&vr)
            .unwrap();
        close(&format!("grouped attention S={s} past={past}"), &got, &want);
        // Head order matters: query head 2 belongs to key/value head 0, head 3 to head 1.
        let swapped = Tensor::cat(
            &[&k.narrow(1, 1, 1).unwrap(), &k.narrow(1, 0, 1).unwrap()],
            1,
        )
        .unwrap();
        let wrong = fused::attention_grouped(&q, &swapped, &v, &mask, scale, 3).unwrap();
        assert!(
            common::max_diff(&wrong, &want) > 1e-2,
            "swapped key heads must change the answer"
        );
    }
    // A training pass cannot take the grouped kernel: it has no backward pass.
    let q = Var::from_tensor(&randn(&[1, 6, 3, 24], 31)).unwrap();
    let kv = randn(&[1, 2, 3, 24], 32);
    let err = fused::attention_grouped(q.as_tensor(), &kv, &kv, &causal_mask(&[0], 3, 0), scale, 3)
        .unwrap_err();
    assert!(err.to_string().contains("backward"), "{err}");
}
