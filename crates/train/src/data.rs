//! Annotation records → token ids with answer-only labels, images → pixel patches, and
//! left-padded batches.
//!
//! The conversation is the one `dataset build` shows ([`inspector_dataset::conversation`]):
//! the canonical instruction with the photo, the canonical JSON answer. It is rendered with the
//! model's own chat template; the labels are the answer's tokens and the `<|im_end|>` that
//! closes it, everything else `-100`. A sample whose answer would be cut by the maximum length
//! is reported and left out — never trained on half an answer.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use candle_core::Tensor;
use inspector_core::answer::Prompt;
use inspector_dataset::{IMAGE_PLACEHOLDER, Record};
use inspector_qwen2vl::{
    Batch, Error, VisionInput,
    chat::{ChatTokenizer, RenderOptions},
    image::{ProcessedImage, ProcessorConfig, ResizedImage},
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

/// An example's photo: resized in memory (3 bytes a pixel; patched for each batch), or where
/// to read it again. A dataset of tens of thousands of photos may not fit in memory even so;
/// [`Example::unload`] trades memory for re-reading each photo when its batch comes.
#[derive(Debug, Clone)]
pub enum ExampleImage {
    Loaded {
        photo: ResizedImage,
        processor: Box<ProcessorConfig>,
    },
    OnDisk {
        path: PathBuf,
        processor: Box<ProcessorConfig>,
        grid_thw: [usize; 3],
    },
    /// Made again by `source` each time a batch needs it (nothing kept in memory or on disk).
    Generated {
        source: Arc<dyn PhotoSource>,
        /// The photo's name in the annotations (`images/00042.png`).
        name: String,
        processor: Box<ProcessorConfig>,
        grid_thw: [usize; 3],
    },
}

/// Photos made on demand instead of read from files: synthetic scenes rendered again when
/// their batch comes, so that a run can learn from more fresh photos than a disk holds.
pub trait PhotoSource: Send + Sync + std::fmt::Debug {
    /// The photo an annotation names; the same name always gives the same pixels.
    fn photo(&self, name: &str) -> Result<image::RgbImage, Error>;
}

/// Where a dataset's photos come from.
#[derive(Debug, Clone)]
pub enum Photos {
    /// The files the records name.
    Files,
    /// Made by a source from each record's image name; every photo has the record's size.
    Generated(Arc<dyn PhotoSource>),
}

impl Photos {
    /// A record's photo: read and resized now from its file, or, when generated, only sized
    /// (its pixels are made when a batch needs them).
    pub fn image(
        &self,
        record: &Record,
        processor: &ProcessorConfig,
    ) -> Result<ExampleImage, Error> {
        match self {
            Photos::Files => ExampleImage::load(&record.path, processor),
            Photos::Generated(source) => {
                let (w, h) = record.size;
                let (rh, rw) = inspector_qwen2vl::image::smart_resize(
                    h as usize,
                    w as usize,
                    processor.factor(),
                    processor.min_pixels,
                    processor.max_pixels,
                )?;
                let p = processor.patch_size;
                Ok(ExampleImage::Generated {
                    source: source.clone(),
                    name: record.annotation.image.clone(),
                    processor: Box::new(processor.clone()),
                    grid_thw: [1, rh / p, rw / p],
                })
            }
        }
    }
}

impl ExampleImage {
    /// Reads and resizes a photo, keeping it in memory.
    pub fn load(path: &Path, processor: &ProcessorConfig) -> Result<Self, Error> {
        Ok(ExampleImage::Loaded {
            photo: inspector_qwen2vl::image::resize_file(path, processor)?,
            processor: Box::new(processor.clone()),
        })
    }

    /// (grid_t, grid_h, grid_w) in patches.
    pub fn grid_thw(&self) -> [usize; 3] {
        match self {
            ExampleImage::Loaded { photo, .. } => photo.grid_thw,
            ExampleImage::OnDisk { grid_thw, .. } | ExampleImage::Generated { grid_thw, .. } => {
                *grid_thw
            }
        }
    }

    /// How many `<|image_pad|>` tokens the photo takes.
    pub fn n_tokens(&self, merge_size: usize) -> usize {
        self.grid_thw().iter().product::<usize>() / (merge_size * merge_size)
    }

    /// The processed photo (pixel patches), read and processed again when not in memory. A
    /// photo that changed on disk since the example was built (another patch grid) is an
    /// error, not a silent mismatch with the tokens.
    pub fn processed(&self) -> Result<ProcessedImage, Error> {
        match self {
            ExampleImage::Loaded { photo, processor } => photo.to_processed(processor),
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
                Ok(p)
            }
            ExampleImage::Generated {
                source,
                name,
                processor,
                grid_thw,
            } => {
                let p = inspector_qwen2vl::image::process_rgb(&source.photo(name)?, processor)?;
                if p.grid_thw != *grid_thw {
                    return Err(Error::Input(format!(
                        "{name}: the generated photo has patch grid {:?}, its record says {:?}",
                        p.grid_thw, grid_thw
                    )));
                }
                Ok(p)
            }
        }
    }

    /// The pixel patches ([`ExampleImage::processed`]).
    pub fn pixels(&self) -> Result<Tensor, Error> {
        Ok(self.processed()?.pixel_values)
    }

    /// Bytes of pixels held in memory.
    pub fn bytes_in_memory(&self) -> usize {
        match self {
            ExampleImage::Loaded { photo, .. } => photo.bytes(),
            ExampleImage::OnDisk { .. } | ExampleImage::Generated { .. } => 0,
        }
    }

    /// Drops the pixels from memory; they are read again from `path` (the photo this image
    /// was loaded from) each time they are needed.
    /// A generated photo holds no pixels and stays as it is.
    pub fn unload(&mut self, path: &Path) {
        let processor = match self {
            ExampleImage::Loaded { processor, .. } | ExampleImage::OnDisk { processor, .. } => {
                processor.clone()
            }
            ExampleImage::Generated { .. } => return,
        };
        *self = ExampleImage::OnDisk {
            path: path.to_path_buf(),
            processor,
            grid_thw: self.grid_thw(),
        };
    }
}

/// Builds one item per input on every core, a chunk at a time, in the inputs' order. The
/// items' photos (`image` finds an item's photo, if it has one) stay in memory while they fit
/// in `budget` bytes; later ones are unloaded as their chunk completes, to be read again from
/// `path(input)` when needed, so memory never holds much more than the budget. `done` is
/// called once per input, from any thread. Returns the items and how many photos were
/// unloaded; the first error in input order stops it.
pub fn build_in_parallel<I: Sync, T: Send, E: Send>(
    inputs: &[I],
    budget: usize,
    build: impl Fn(&I) -> Result<T, E> + Sync,
    image: impl Fn(&mut T) -> Option<&mut ExampleImage>,
    path: impl Fn(&I) -> &Path,
    done: impl Fn() + Sync,
) -> Result<(Vec<T>, usize), E> {
    use rayon::prelude::*;
    let mut out = Vec::with_capacity(inputs.len());
    let (mut in_memory, mut on_disk) = (0usize, 0usize);
    for chunk in inputs.chunks(64) {
        let built: Vec<Result<T, E>> = chunk
            .par_iter()
            .map(|input| {
                let item = build(input);
                done();
                item
            })
            .collect();
        for (input, item) in chunk.iter().zip(built) {
            let mut item = item?;
            if let Some(photo) = image(&mut item) {
                let bytes = photo.bytes_in_memory();
                if in_memory + bytes > budget {
                    photo.unload(path(input));
                    on_disk += 1;
                } else {
                    in_memory += bytes;
                }
            }
            out.push(item);
        }
    }
    Ok((out, on_disk))
}

/// The processed photos of a batch, the ones not in memory read in parallel.
pub fn processed_batch<'a>(
    images: impl IntoIterator<Item = &'a ExampleImage>,
) -> Result<Vec<ProcessedImage>, Error> {
    use rayon::prelude::*;
    let images: Vec<&ExampleImage> = images.into_iter().collect();
    images.par_iter().map(|i| i.processed()).collect()
}

impl Example {
    /// Tokens that count in the loss.
    pub fn answer_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE).count()
    }

    /// Drops the photo's pixels from memory; they are read again from `path` (the photo this
    /// example was built from) each time a batch needs them.
    pub fn unload(&mut self, path: &Path) {
        self.image.unload(path);
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
    example_from(prompt, chat, processor, record, &Photos::Files, max_len)
}

/// [`example_with`] with the record's photo from `photos`.
pub fn example_from(
    prompt: Prompt,
    chat: &ChatTokenizer,
    processor: &ProcessorConfig,
    record: &Record,
    photos: &Photos,
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
    let image = photos.image(record, processor)?;
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
        image,
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
    let pixels = processed_batch(examples.iter().map(|e| &e.image))?;
    let pixel_values = Tensor::cat(
        &pixels.iter().map(|p| &p.pixel_values).collect::<Vec<_>>(),
        0,
    )?;
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
