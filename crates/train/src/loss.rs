//! The causal-LM loss on answer tokens only, as transformers computes it.

use candle_core::{D, Tensor};
use inspector_qwen2vl::{Batch, Error, Qwen2Vl};

/// The label of a position that does not count (prompt, padding), as in transformers.
pub const IGNORE: i64 = -100;

/// Mean cross-entropy of the next token over every position whose *next* label is not
/// [`IGNORE`] (labels are the input ids, shifted inside, exactly like transformers'
/// `ForCausalLMLoss` with `reduction="mean"`). Only the scored positions go through the LM
/// head. Returns the loss (a scalar, differentiable) and the number of tokens scored.
pub fn causal_lm_loss(
    model: &Qwen2Vl,
    batch: &Batch,
    labels: &[Vec<i64>],
) -> Result<(Tensor, usize), Error> {
    let (rows, targets) = scored_positions(model, batch, labels)?;
    let n = rows.len();
    let hidden = model.hidden_states(batch)?;
    Ok((head_loss(model, &hidden, rows, targets)?, n))
}

/// [`causal_lm_loss`] times `scale`, with its gradients, through gradient checkpointing
/// ([`Qwen2Vl::checkpointed_backward`]): the decoder keeps one layer's activations at a time.
/// Returns the scaled loss's value, the number of tokens scored and the gradients, equal to
/// those of `(causal_lm_loss(..) * scale).backward()`.
pub fn causal_lm_loss_checkpointed(
    model: &Qwen2Vl,
    batch: &Batch,
    labels: &[Vec<i64>],
    scale: f64,
    lora: Option<&inspector_qwen2vl::Lora>,
) -> Result<(Tensor, usize, candle_core::backprop::GradStore), Error> {
    let (rows, targets) = scored_positions(model, batch, labels)?;
    let n = rows.len();
    let head = |hidden: &Tensor| -> candle_core::Result<Tensor> {
        head_loss(model, hidden, rows.clone(), targets.clone())
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?
            * scale
    };
    let (value, grads) = model.checkpointed_backward(batch, &head, lora)?;
    Ok((value, n, grads))
}

/// The flattened positions scored and their next-token targets.
fn scored_positions(
    model: &Qwen2Vl,
    batch: &Batch,
    labels: &[Vec<i64>],
) -> Result<(Vec<u32>, Vec<u32>), Error> {
    let b = batch.input_ids.len();
    let s = batch.input_ids.first().map_or(0, Vec::len);
    if labels.len() != b || labels.iter().any(|l| l.len() != s) {
        return Err(Error::Input("labels do not match input_ids".into()));
    }
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (bi, row) in labels.iter().enumerate() {
        for t in 0..s.saturating_sub(1) {
            let next = row[t + 1];
            if next != IGNORE {
                let vocab = model.config.text.vocab_size;
                if next < 0 || next as usize >= vocab {
                    return Err(Error::Input(format!(
                        "label {next} at row {bi}, position {} is outside the vocabulary of {vocab}",
                        t + 1
                    )));
                }
                rows.push((bi * s + t) as u32);
                targets.push(next as u32);
            }
        }
    }
    if rows.is_empty() {
        return Err(Error::Input("no answer tokens to score".into()));
    }
    Ok((rows, targets))
}

/// The mean negative log-likelihood of `targets` at the `rows` of `hidden` `[B, S, H]`.
fn head_loss(
    model: &Qwen2Vl,
    hidden: &Tensor,
    rows: Vec<u32>,
    targets: Vec<u32>,
) -> Result<Tensor, Error> {
    let (b, s, h) = hidden.dims3()?;
    let n = rows.len();
    let device = hidden.device();
    let rows = Tensor::from_vec(rows, (n,), device)?;
    let targets = Tensor::from_vec(targets, (n, 1), device)?;
    let scored = hidden.reshape((b * s, h))?.index_select(&rows, 0)?;
    let logits = model.lm_logits(&scored)?;
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = log_probs.gather(&targets, 1)?;
    Ok((picked.sum_all()?.neg()? / n as f64)?)
}
