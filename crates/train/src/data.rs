//! Annotation records → token ids with answer-only labels, images → pixel patches, and
//! left-padded batches.
//!
//! The conversation is the one `dataset build` shows ([`inspector_dataset::conversation`]):
//! the canonical instruction with the photo, the canonical JSON answer. It is rendered with the
//! model's own chat template; the labels are the answer's tokens and the `<|im_end|>` that
//! closes it, everything else `-100`. A sample whose answer would be cut by the maximum length
//! is reported and left out — never trained on half an answer.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use inspector_core::answer::Prompt;
use inspector_dataset::{IMAGE_PLACEHOLDER, Record};
use inspector_qwen2vl::{
    Batch, Error, VisionInput,
    chat::{ChatTokenizer, RenderOptions},
    image::{ProcessedImage, ProcessorConfig},
};
use serde_json::json;

use crate::loss::IGNORE;

/// One tokenised training example.
#[derive(Debug, Clone)]
pub struct Example {
    /// The annotation line it came from.
    pub line: usize,
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub image: ExampleImage,
}

/// An example's photo: its pixel patches in memory, or where to read them again. A 320×240
/// photo is 1.3 MB of f32 patches, so a dataset of tens of thousands cannot keep them all;
/// [`Example::unload`] trades memory for re-reading each photo when its batch comes.
#[derive(Debug, Clone)]
pub enum ExampleImage {
    Loaded(ProcessedImage),
    OnDisk {
        path: PathBuf,
        processor: Box<ProcessorConfig>,
        grid_thw: [usize; 3],
    },
}

impl ExampleImage {
    /// (grid_t, grid_h, grid_w) in patches.
    pub fn grid_thw(&self) -> [usize; 3] {
        match self {
            ExampleImage::Loaded(p) => p.grid_thw,
            ExampleImage::OnDisk { grid_thw, .. } => *grid_thw,
        }
    }

    /// How many `<|image_pad|>` tokens the photo takes.
    pub fn n_tokens(&self, merge_size: usize) -> usize {
        self.grid_thw().iter().product::<usize>() / (merge_size * merge_size)
    }

    /// The pixel patches, read and processed again when not in memory. A photo that changed
    /// on disk since the example was built (another patch grid) is an error, not a silent
    /// mismatch with the tokens.
    pub fn pixels(&self) -> Result<Tensor, Error> {
        match self {
            ExampleImage::Loaded(p) => Ok(p.pixel_values.clone()),
            ExampleImage::OnDisk {
                path,
                processor,
                grid_thw,
            } => {
                let p = inspector_qwen2vl::image::process_file(path, processor)?;
                if p.grid_thw != *grid_thw {
                    return Err(Error::Input(format!(
                        "{}: the photo changed since training started (patch grid {:?}, was {:?})",
                        path.display(),
                        p.grid_thw,
                        grid_thw
                    )));
                }
                Ok(p.pixel_values)
            }
        }
    }

    /// Bytes of pixel patches held in memory.
    pub fn bytes_in_memory(&self) -> usize {
        match self {
            ExampleImage::Loaded(p) => {
                p.pixel_values.elem_count() * p.pixel_values.dtype().size_in_bytes()
            }
            ExampleImage::OnDisk { .. } => 0,
        }
    }
}

impl Example {
    /// Tokens that count in the loss.
    pub fn answer_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE).count()
    }

    /// Drops the pixel patches from memory; they are read again from `path` (the photo this
    /// example was built from, processed with `processor`) each time a batch needs them.
    pub fn unload(&mut self, path: &Path, processor: &ProcessorConfig) {
        self.image = ExampleImage::OnDisk {
            path: path.to_path_buf(),
            processor: Box::new(processor.clone()),
            grid_thw: self.image.grid_thw(),
        };
    }
}

/// Why a record was left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub line: usize,
    pub reason: String,
}

/// Token ids and labels for a prompt (user turn with one image of `image_tokens` tokens) and
/// its answer: labels are `-100` up to the answer, then the answer's tokens and the
/// `<|im_end|>` that closes it; whatever the template adds after that (a newline) is `-100`.
pub fn encode_turns(
    chat: &ChatTokenizer,
    instruction: &str,
    answer: &str,
    image_tokens: usize,
) -> Result<(Vec<u32>, Vec<i64>), Error> {
    let im_end = chat
        .tokenizer
        .token_to_id("<|im_end|>")
        .ok_or_else(|| Error::Input("the tokenizer has no <|im_end|> token".into()))?;
    let mut conversation = ChatTokenizer::image_turn(instruction);
    conversation
        .as_array_mut()
        .expect("an array")
        .push(json!({"role": "assistant", "content": answer}));
    let full = chat.render(&conversation, RenderOptions::default())?;
    let prompt_ids = chat.image_prompt(instruction, image_tokens)?;
    let ids = chat.encode(&full, &[image_tokens])?;
    if !ids.starts_with(&prompt_ids) {
        return Err(Error::Input(
            "the chat template tokenises the prompt differently inside the full conversation; cannot tell the answer apart".into(),
        ));
    }
    let start = prompt_ids.len();
    let end = ids[start..]
        .iter()
        .position(|&t| t == im_end)
        .map(|p| start + p + 1)
        .ok_or_else(|| Error::Input("the rendered answer is not closed by <|im_end|>".into()))?;
    let mut labels = vec![IGNORE; ids.len()];
    for i in start..end {
        labels[i] = ids[i] as i64;
    }
    Ok((ids, labels))
}

/// The prompt a model directory was trained with (`inspector_model.json`), [`Prompt::Full`]
/// when it does not say. Training keeps to it, and records it with what it writes.
pub fn model_prompt(dir: &Path) -> Result<Prompt, Error> {
    Ok(Prompt::recorded_in(dir)
        .map_err(Error::Input)?
        .unwrap_or_default())
}

/// Builds the training example of one validated record, with the full instruction.
/// `Ok(Err(skipped))` when it does not fit in `max_len` tokens with its whole answer.
pub fn example(
    chat: &ChatTokenizer,
    processor: &ProcessorConfig,
    record: &Record,
    max_len: usize,
) -> Result<Result<Example, Skipped>, Error> {
    example_with(Prompt::Full, chat, processor, record, max_len)
}

/// [`example`] with the instruction of `prompt` (the one the model directory records).
pub fn example_with(
    prompt: Prompt,
    chat: &ChatTokenizer,
    processor: &ProcessorConfig,
    record: &Record,
    max_len: usize,
) -> Result<Result<Example, Skipped>, Error> {
    let sample = inspector_dataset::conversation_with(
        prompt,
        &record.annotation,
        record.size,
        String::new(),
    );
    let instruction = sample.messages[0]
        .content
        .strip_prefix(IMAGE_PLACEHOLDER)
        .unwrap_or(&sample.messages[0].content);
    let answer = &sample.messages[1].content;
    let image = inspector_qwen2vl::image::process_file(&record.path, processor)?;
    let (input_ids, labels) = encode_turns(
        chat,
        instruction,
        answer,
        image.n_tokens(processor.merge_size),
    )?;
    let last_label = labels.iter().rposition(|&l| l != IGNORE).unwrap_or(0);
    if last_label + 1 > max_len {
        return Ok(Err(Skipped {
            line: record.line,
            reason: format!(
                "{} tokens with the whole answer, more than the maximum length {max_len}; left out rather than trained on a cut answer",
                last_label + 1
            ),
        }));
    }
    let keep = input_ids.len().min(max_len);
    Ok(Ok(Example {
        line: record.line,
        input_ids: input_ids[..keep].to_vec(),
        labels: labels[..keep].to_vec(),
        image: ExampleImage::Loaded(image),
    }))
}

/// Left-pads examples into one batch (`pad` id, attention mask false, labels `-100`).
pub fn collate(examples: &[&Example], pad: u32) -> Result<(Batch, Vec<Vec<i64>>), Error> {
    let s = examples
        .iter()
        .map(|e| e.input_ids.len())
        .max()
        .unwrap_or(0);
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    let mut labels = Vec::new();
    for e in examples {
        let p = s - e.input_ids.len();
        ids.push(
            std::iter::repeat_n(pad, p)
                .chain(e.input_ids.iter().copied())
                .collect(),
        );
        mask.push(
            std::iter::repeat_n(false, p)
                .chain(std::iter::repeat_n(true, e.input_ids.len()))
                .collect(),
        );
        labels.push(
            std::iter::repeat_n(IGNORE, p)
                .chain(e.labels.iter().copied())
                .collect(),
        );
    }
    let pixels = examples
        .iter()
        .map(|e| e.image.pixels())
        .collect::<Result<Vec<_>, _>>()?;
    let pixel_values = Tensor::cat(&pixels, 0)?;
    let batch = Batch {
        input_ids: ids,
        attention_mask: Some(mask),
        images: Some(VisionInput {
            pixel_values,
            grid_thw: examples.iter().map(|e| e.image.grid_thw()).collect(),
        }),
    };
    Ok((batch, labels))
}
