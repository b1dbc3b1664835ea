//! `config.json` → [`Config`], from either layout:
//! - the hub's flat one (Qwen/Qwen2-VL-2B-Instruct): text keys at the top, `rope_theta` and
//!   `rope_scaling.mrope_section` at the top, `vision_config` nested;
//! - transformers 5's nested one: `text_config` (with `rope_parameters`) and `vision_config`.
//!
//! A missing or invalid key is an error that names it.

use serde_json::Value;

use crate::Error;

/// The language model's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// How the rotary half-dimension is split between the t, h and w position axes.
    pub mrope_section: Vec<usize>,
    pub max_position_embeddings: usize,
}

/// The vision tower's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub depth: usize,
    pub embed_dim: usize,
    pub num_heads: usize,
    pub mlp_ratio: f64,
    pub in_channels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub spatial_merge_size: usize,
    /// The width the merger projects to (the language model's hidden size).
    pub hidden_size: usize,
    pub rope_theta: f64,
}

impl VisionConfig {
    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }

    pub fn mlp_hidden(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }

    /// Values per flattened patch: channels × temporal patch × patch × patch (1176 for Qwen2-VL).
    pub fn patch_len(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }
}

/// Special token ids, read from the checkpoint (never hard-coded: small models have small
/// vocabularies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenIds {
    pub image_pad: u32,
    pub video_pad: Option<u32>,
    pub vision_start: Option<u32>,
    pub vision_end: Option<u32>,
    pub eos: Vec<u32>,
    pub bos: Option<u32>,
    pub pad: Option<u32>,
}

/// Which `config.json` layout was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigLayout {
    /// The hub's flat layout.
    Flat,
    /// transformers 5's `text_config` / `vision_config`.
    Nested,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub tokens: TokenIds,
    pub tie_word_embeddings: bool,
    pub layout: ConfigLayout,
}

/// Reads typed values out of a JSON object, naming the full key path in errors.
struct Section<'a> {
    value: &'a Value,
    path: &'a str,
}

impl<'a> Section<'a> {
    fn key(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.value.get(key).filter(|v| !v.is_null())
    }

    fn usize(&self, key: &str) -> Result<usize, Error> {
        let v = self.get(key).ok_or_else(|| Error::ConfigKey {
            key: self.key(key),
            problem: "missing".into(),
        })?;
        v.as_u64()
            .map(|n| n as usize)
            .ok_or_else(|| Error::ConfigKey {
                key: self.key(key),
                problem: format!("expected a non-negative integer, found {v}"),
            })
    }

    fn usize_or(&self, key: &str, default: usize) -> Result<usize, Error> {
        match self.get(key) {
            None => Ok(default),
            Some(_) => self.usize(key),
        }
    }

    fn f64_or(&self, key: &str, default: Option<f64>) -> Result<f64, Error> {
        match self.get(key) {
            None => default.ok_or_else(|| Error::ConfigKey {
                key: self.key(key),
                problem: "missing".into(),
            }),
            Some(v) => v.as_f64().ok_or_else(|| Error::ConfigKey {
                key: self.key(key),
                problem: format!("expected a number, found {v}"),
            }),
        }
    }

    fn token(&self, key: &str) -> Result<Option<u32>, Error> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => {
                // eos_token_id may be a list; the first is "the" id for single-id keys.
                let id = v.as_u64().or_else(|| v.as_array()?.first()?.as_u64());
                id.map(|n| Some(n as u32)).ok_or_else(|| Error::ConfigKey {
                    key: self.key(key),
                    problem: format!("expected a token id, found {v}"),
                })
            }
        }
    }

    fn tokens(&self, key: &str) -> Result<Vec<u32>, Error> {
        match self.get(key) {
            None => Ok(vec![]),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64()
                        .map(|n| n as u32)
                        .ok_or_else(|| Error::ConfigKey {
                            key: self.key(key),
                            problem: format!("expected token ids, found {v}"),
                        })
                })
                .collect(),
            Some(_) => Ok(self.token(key)?.into_iter().collect()),
        }
    }
}

impl Config {
    /// Parses the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Config, Error> {
        let root: Value = serde_json::from_str(text).map_err(|e| Error::ConfigKey {
            key: "config.json".into(),
            problem: format!("not valid JSON: {e}"),
        })?;
        if !root.is_object() {
            return Err(Error::ConfigKey {
                key: "config.json".into(),
                problem: "not a JSON object".into(),
            });
        }
        let top = Section {
            value: &root,
            path: "",
        };
        if let Some(mt) = top.get("model_type").and_then(Value::as_str)
            && mt != "qwen2_vl"
        {
            return Err(Error::ConfigKey {
                key: "model_type".into(),
                problem: format!("`{mt}` is not qwen2_vl"),
            });
        }
        let (layout, text) = match top.get("text_config") {
            Some(v) if v.is_object() => (
                ConfigLayout::Nested,
                Section {
                    value: v,
                    path: "text_config",
                },
            ),
            _ => (
                ConfigLayout::Flat,
                Section {
                    value: &root,
                    path: "",
                },
            ),
        };
        let vision_value = top.get("vision_config").ok_or_else(|| Error::ConfigKey {
            key: "vision_config".into(),
            problem: "missing".into(),
        })?;
        let vision = Section {
            value: vision_value,
            path: "vision_config",
        };

        // Rotary settings: `rope_parameters` (transformers 5) or `rope_scaling` + `rope_theta`.
        let rope_section = ["rope_parameters", "rope_scaling"]
            .iter()
            .find_map(|k| text.get(k).or_else(|| top.get(k)).map(|v| (*k, v)));
        let (rope_path, rope_value) = rope_section.ok_or_else(|| Error::ConfigKey {
            key: text.key("rope_scaling.mrope_section"),
            problem: "missing (neither rope_scaling nor rope_parameters is present)".into(),
        })?;
        let rope_path = text.key(rope_path);
        let rope = Section {
            value: rope_value,
            path: &rope_path,
        };
        let mrope_section: Vec<usize> = match rope.get("mrope_section") {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().map(|n| n as usize))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| Error::ConfigKey {
                    key: rope.key("mrope_section"),
                    problem: "expected a list of integers".into(),
                })?,
            _ => {
                return Err(Error::ConfigKey {
                    key: rope.key("mrope_section"),
                    problem: "missing".into(),
                });
            }
        };
        let rope_theta = match rope.get("rope_theta") {
            Some(_) => rope.f64_or("rope_theta", None)?,
            None => text.f64_or("rope_theta", Some(10_000.0))?,
        };

        let hidden_size = text.usize("hidden_size")?;
        let num_attention_heads = text.usize("num_attention_heads")?;
        if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
            return Err(Error::ConfigKey {
                key: text.key("num_attention_heads"),
                problem: format!("{num_attention_heads} does not divide hidden_size {hidden_size}"),
            });
        }
        let head_dim = text.usize_or("head_dim", hidden_size / num_attention_heads)?;
        let num_key_value_heads = text.usize_or("num_key_value_heads", num_attention_heads)?;
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::ConfigKey {
                key: text.key("num_key_value_heads"),
                problem: format!(
                    "{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"
                ),
            });
        }
        if mrope_section.len() != 3 || mrope_section.iter().sum::<usize>() * 2 != head_dim {
            return Err(Error::ConfigKey {
                key: rope.key("mrope_section"),
                problem: format!(
                    "{mrope_section:?} must have 3 parts summing to head_dim/2 = {}",
                    head_dim / 2
                ),
            });
        }
        let text_config = TextConfig {
            vocab_size: text.usize("vocab_size")?,
            hidden_size,
            intermediate_size: text.usize("intermediate_size")?,
            num_hidden_layers: text.usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: text.f64_or("rms_norm_eps", Some(1e-6))?,
            rope_theta,
            mrope_section,
            max_position_embeddings: text.usize_or("max_position_embeddings", 32768)?,
        };

        let vision_rope_theta = match vision.get("rope_parameters") {
            Some(v) => Section {
                value: v,
                path: "vision_config.rope_parameters",
            }
            .f64_or("rope_theta", Some(10_000.0))?,
            None => 10_000.0,
        };
        if let Some(act) = vision.get("hidden_act").and_then(Value::as_str)
            && act != "quick_gelu"
        {
            return Err(Error::ConfigKey {
                key: "vision_config.hidden_act".into(),
                problem: format!("`{act}` is not supported (Qwen2-VL uses quick_gelu)"),
            });
        }
        let embed_dim = vision.usize("embed_dim")?;
        let num_heads = vision.usize("num_heads")?;
        if num_heads == 0 || embed_dim % num_heads != 0 || (embed_dim / num_heads) % 4 != 0 {
            return Err(Error::ConfigKey {
                key: "vision_config.num_heads".into(),
                problem: format!(
                    "{num_heads} heads do not split embed_dim {embed_dim} into a multiple of 4"
                ),
            });
        }
        let vision_config = VisionConfig {
            depth: vision.usize("depth")?,
            embed_dim,
            num_heads,
            mlp_ratio: vision.f64_or("mlp_ratio", Some(4.0))?,
            in_channels: match vision.get("in_channels") {
                Some(_) => vision.usize("in_channels")?,
                None => vision.usize_or("in_chans", 3)?,
            },
            patch_size: vision.usize_or("patch_size", 14)?,
            temporal_patch_size: vision.usize_or("temporal_patch_size", 2)?,
            spatial_merge_size: vision.usize_or("spatial_merge_size", 2)?,
            hidden_size: vision.usize_or("hidden_size", hidden_size)?,
            rope_theta: vision_rope_theta,
        };
        if vision_config.hidden_size != hidden_size {
            return Err(Error::ConfigKey {
                key: "vision_config.hidden_size".into(),
                problem: format!(
                    "{} differs from the language model's hidden_size {hidden_size}",
                    vision_config.hidden_size
                ),
            });
        }

        let image_pad = top
            .token("image_token_id")?
            .ok_or_else(|| Error::ConfigKey {
                key: "image_token_id".into(),
                problem: "missing".into(),
            })?;
        let mut eos = text.tokens("eos_token_id")?;
        if eos.is_empty() {
            eos = top.tokens("eos_token_id")?;
        }
        let tokens = TokenIds {
            image_pad,
            video_pad: top.token("video_token_id")?,
            vision_start: top.token("vision_start_token_id")?,
            vision_end: top.token("vision_end_token_id")?,
            eos,
            bos: text.token("bos_token_id")?.or(top.token("bos_token_id")?),
            pad: text.token("pad_token_id")?.or(top.token("pad_token_id")?),
        };
        let tie_word_embeddings = top
            .get("tie_word_embeddings")
            .or_else(|| text.get("tie_word_embeddings"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(Config {
            text: text_config,
            vision: vision_config,
            tokens,
            tie_word_embeddings,
            layout,
        })
    }
}
