//! `inspector dataset build`: the exact conversations the model is trained on.

use std::path::Path;

use inspector_core::{
    Annotation,
    answer::{Answer, Prompt},
};
use serde::{Deserialize, Serialize};

use crate::{Dataset, Error, relative_to_canonical};

/// Where the image goes in a user turn, as LLaMA-Factory and ms-swift write it.
pub const IMAGE_PLACEHOLDER: &str = "<image>";

/// One turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// One training conversation in the widely used `{"messages", "images"}` form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    pub messages: Vec<Message>,
    pub images: Vec<String>,
}

/// The conversation a record teaches: the canonical instruction with the image, and the
/// canonical JSON answer (boxes on the 0–1000 scale of an image of `size`). `dataset build`
/// and the exports call this.
pub fn conversation(annotation: &Annotation, size: (u32, u32), image: String) -> Sample {
    conversation_with(Prompt::Full, annotation, size, image)
}

/// [`conversation`] with the instruction of `prompt`. Training calls this with the prompt the
/// model directory records.
pub fn conversation_with(
    prompt: Prompt,
    annotation: &Annotation,
    size: (u32, u32),
    image: String,
) -> Sample {
    Sample {
        messages: vec![
            Message {
                role: "user".into(),
                content: format!("{IMAGE_PLACEHOLDER}{}", prompt.instruction()),
            },
            Message {
                role: "assistant".into(),
                content: Answer::from_annotation(annotation, size).to_json(),
            },
        ],
        images: vec![image],
    }
}

/// Every record's conversation, with image paths valid from `out_dir` (which must exist).
pub fn build_samples(dataset: &Dataset, out_dir: &Path) -> Result<Vec<Sample>, Error> {
    let out_dir = out_dir.canonicalize().map_err(|e| Error::io(out_dir, e))?;
    dataset
        .records
        .iter()
        .map(|r| {
            Ok(conversation(
                &r.annotation,
                r.size,
                relative_to_canonical(&r.path, &out_dir)?,
            ))
        })
        .collect()
}
