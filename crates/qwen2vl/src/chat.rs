//! Chat: the model's own tokenizer and Jinja chat template, turned into input ids with each
//! image pad expanded to its image's token count.
//!
//! The template is looked up in `chat_template.json`, `chat_template.jinja`, then
//! `tokenizer_config.json` (`chat_template` key), and rendered with minijinja as transformers
//! renders it with Jinja2 (`messages`, `add_generation_prompt`, `add_vision_id`).

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::Tokenizer;

use crate::Error;

/// Where the chat template was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateSource {
    pub file: PathBuf,
}

/// A model's tokenizer and chat template.
pub struct ChatTokenizer {
    pub tokenizer: Tokenizer,
    /// The template, compiled once at load.
    env: minijinja::Environment<'static>,
    pub template_source: TemplateSource,
    image_pad: u32,
}

/// Options of one rendering.
#[derive(Debug, Clone, Copy, Default)]
pub struct RenderOptions {
    pub add_generation_prompt: bool,
    /// Leave the last (assistant) message open so generation continues it.
    pub continue_final_message: bool,
    pub add_vision_id: bool,
}

impl ChatTokenizer {
    /// Loads `tokenizer.json` and the chat template of a model directory. `image_pad` is the
    /// image pad id from the model's config.
    pub fn load(dir: &Path, image_pad: u32) -> Result<Self, Error> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.exists() {
            return Err(Error::Checkpoint {
                path: tok_path,
                message: "missing".into(),
            });
        }
        let tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| Error::Checkpoint {
            path: tok_path.clone(),
            message: format!("not a valid tokenizer: {e}"),
        })?;
        let (template, file) = find_template(dir)?;
        // Compiled once, so that a broken template is reported at load, naming its file.
        let mut env = environment();
        env.add_template_owned("chat", template)
            .map_err(|e| Error::Template {
                file: file.clone(),
                message: e.to_string(),
            })?;
        Ok(ChatTokenizer {
            tokenizer,
            env,
            template_source: TemplateSource { file },
            image_pad,
        })
    }

    /// Renders `messages` (OpenAI/transformers form: `{"role", "content": string | [parts]}`).
    pub fn render(&self, messages: &Value, options: RenderOptions) -> Result<String, Error> {
        let err = |message: String| Error::Template {
            file: self.template_source.file.clone(),
            message,
        };
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| err(e.to_string()))?;
        let ctx = minijinja::context! {
            messages => minijinja::Value::from_serialize(messages),
            add_generation_prompt => options.add_generation_prompt && !options.continue_final_message,
            add_vision_id => options.add_vision_id,
        };
        let mut text = tmpl.render(ctx).map_err(|e| err(render_error(&e)))?;
        if options.continue_final_message {
            text = cut_after_final_message(&text, messages).map_err(err)?;
        }
        Ok(text)
    }

    /// Tokenises rendered text; each image pad becomes `tokens_per_image[i]` pads. Errors when
    /// the text has a different number of image placeholders than images.
    pub fn encode(&self, text: &str, tokens_per_image: &[usize]) -> Result<Vec<u32>, Error> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::Input(format!("tokenizer: {e}")))?;
        let ids = encoding.get_ids();
        let placeholders = ids.iter().filter(|&&t| t == self.image_pad).count();
        if placeholders != tokens_per_image.len() {
            return Err(Error::ImageTokens {
                message: format!(
                    "{} images but the prompt has {placeholders} image placeholders",
                    tokens_per_image.len()
                ),
            });
        }
        let mut out = Vec::with_capacity(ids.len() + tokens_per_image.iter().sum::<usize>());
        let mut images = tokens_per_image.iter();
        for &t in ids {
            if t == self.image_pad {
                out.extend(std::iter::repeat_n(
                    self.image_pad,
                    *images.next().expect("counted"),
                ));
            } else {
                out.push(t);
            }
        }
        Ok(out)
    }

    /// The prompt of one user turn holding an image (of `image_tokens` tokens) and then
    /// `instruction`, ending with the assistant's generation prompt: what a model fine-tuned on
    /// such turns is asked.
    pub fn image_prompt(&self, instruction: &str, image_tokens: usize) -> Result<Vec<u32>, Error> {
        let text = self.render(
            &Self::image_turn(instruction),
            RenderOptions {
                add_generation_prompt: true,
                ..Default::default()
            },
        )?;
        self.encode(&text, &[image_tokens])
    }

    /// `[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]`.
    pub fn image_turn(instruction: &str) -> Value {
        serde_json::json!([{"role": "user", "content": [
            {"type": "image"},
            {"type": "text", "text": instruction},
        ]}])
    }

    /// The bytes each token id stands for, for constrained decoding: `None` for special and
    /// added tokens and for tokens that are not byte-level BPE pieces.
    pub fn token_bytes(&self) -> Vec<Option<Vec<u8>>> {
        let byte_of = byte_level_inverse();
        let vocab = self.tokenizer.get_vocab_size(true);
        let added = self.tokenizer.get_added_vocabulary().get_vocab();
        (0..vocab as u32)
            .map(|id| {
                let piece = self.tokenizer.id_to_token(id)?;
                if added.contains_key(&piece) {
                    return None;
                }
                piece.chars().map(|c| byte_of.get(&c).copied()).collect()
            })
            .collect()
    }

    /// Decodes ids to text, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String, Error> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| Error::Input(format!("tokenizer: {e}")))
    }
}

fn environment() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    // Python string/dict methods (`.strip()`, `.items()`) that Hugging Face templates use.
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                message,
            ))
        },
    );
    env
}

fn render_error(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        s.push_str(&format!(": {inner}"));
        source = inner.source();
    }
    s
}

/// The template text and the file it came from.
fn find_template(dir: &Path) -> Result<(String, PathBuf), Error> {
    let read = |path: &Path| std::fs::read_to_string(path).map_err(|e| Error::io(path, e));
    let json_path = dir.join("chat_template.json");
    if json_path.exists() {
        let v: Value = serde_json::from_str(&read(&json_path)?).map_err(|e| Error::Template {
            file: json_path.clone(),
            message: format!("not valid JSON: {e}"),
        })?;
        let t = v
            .get("chat_template")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::Template {
                file: json_path.clone(),
                message: "no `chat_template` string".into(),
            })?;
        return Ok((t.to_string(), json_path));
    }
    let jinja_path = dir.join("chat_template.jinja");
    if jinja_path.exists() {
        return Ok((read(&jinja_path)?, jinja_path));
    }
    let config_path = dir.join("tokenizer_config.json");
    if config_path.exists() {
        let v: Value = serde_json::from_str(&read(&config_path)?).map_err(|e| Error::Template {
            file: config_path.clone(),
            message: format!("not valid JSON: {e}"),
        })?;
        match v.get("chat_template") {
            Some(Value::String(t)) => return Ok((t.clone(), config_path)),
            // A list of named templates: take "default".
            Some(Value::Array(items)) => {
                if let Some(t) = items
                    .iter()
                    .find(|i| i.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|i| i.get("template"))
                    .and_then(Value::as_str)
                {
                    return Ok((t.to_string(), config_path));
                }
            }
            _ => {}
        }
    }
    Err(Error::Template {
        file: dir.to_path_buf(),
        message: "no chat template: looked in chat_template.json, chat_template.jinja and tokenizer_config.json".into(),
    })
}

/// transformers' `continue_final_message`: cut the rendering right after the last message's
/// (last text part's) content, so the model continues it.
fn cut_after_final_message(rendered: &str, messages: &Value) -> Result<String, String> {
    let last = messages
        .as_array()
        .and_then(|m| m.last())
        .ok_or("no messages")?;
    let content = match &last["content"] {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .rev()
            .find_map(|p| p.get("text").and_then(Value::as_str))
            .ok_or("continue_final_message: the last message has no text")?
            .to_string(),
        _ => return Err("continue_final_message: the last message has no content".into()),
    };
    let stripped = content.trim();
    let loc = rendered
        .rfind(stripped)
        .ok_or("continue_final_message: the last message does not appear in the rendering")?;
    let lstripped = content.trim_start();
    let end = if rendered[loc..].starts_with(lstripped) {
        loc + lstripped.len()
    } else {
        loc + stripped.len()
    };
    Ok(rendered[..end].to_string())
}

/// GPT-2's byte-level alphabet, reversed: the character each byte is written as → the byte.
fn byte_level_inverse() -> std::collections::HashMap<char, u8> {
    let mut map = std::collections::HashMap::new();
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, 33..=126 | 161..=172 | 174..=255);
        let c = if printable {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(255 + n).expect("a valid char")
        };
        map.insert(c, b);
    }
    map
}
