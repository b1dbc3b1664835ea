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
    let hidden = model.hidden_states(batch)?;
    let (b, s, h) = hidden.dims3()?;
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
    let n = rows.len();
    if n == 0 {
        return Err(Error::Input("no answer tokens to score".into()));
    }
    let device = hidden.device();
    let rows = Tensor::from_vec(rows, (n,), device)?;
    let targets = Tensor::from_vec(targets, (n, 1), device)?;
    let scored = hidden.reshape((b * s, h))?.index_select(&rows, 0)?;
    let logits = model.lm_logits(&scored)?;
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = log_probs.gather(&targets, 1)?;
    let loss = (picked.sum_all()?.neg()? / n as f64)?;
    Ok((loss, n))
}
