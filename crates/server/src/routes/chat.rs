//! OpenAI-compatible chat: `POST /v1/chat/completions` and `GET /v1/models`.
//!
//! A prompt is bounded twice before the model sees it: its text by bytes, at once, and then by
//! tokens, rendered and tokenized on the blocking pool rather than on the model worker, so a
//! huge prompt never holds up inspections.

use std::sync::Arc;

use axum::{
    Json,
    extract::{Path, State, rejection::JsonRejection},
};
use inspector_core::json_schema::{Json as OrderedJson, SchemaGrammar};
use inspector_detect::Input;
use serde::Deserialize;
use tokio::sync::oneshot;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    AppState,
    error::{ApiError, ErrorBody},
    images,
    inspect::decode_base64,
    worker::{ChatJob, Job},
};

/// Bytes of prompt text allowed per token of `--max-prompt-tokens` (Qwen2's tokenizer averages
/// 3–5 bytes a token on Chinese and English text): text beyond this is refused unread.
pub const BYTES_PER_PROMPT_TOKEN: usize = 16;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(chat_completions))
        .routes(routes!(list_models))
        .routes(routes!(get_model))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ChatRequest {
    pub model: Option<String>,
    #[schema(value_type = Vec<Object>)]
    pub messages: Vec<serde_json::Value>,
    /// Default 256, at most 2048.
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    /// 0 (the default) decodes greedily.
    pub temperature: Option<f64>,
    pub seed: Option<u64>,
    /// Streaming is not offered; `true` is refused.
    pub stream: Option<bool>,
    /// `{"type": "text"}` (the default) or `{"type": "json_schema", "json_schema": {"name": …,
    /// "schema": {…}}}`: the reply is then an instance of the schema, for the subset described
    /// in `inspector_core::json_schema`; any other keyword is refused with a 400 naming it.
    #[schema(value_type = Option<Object>)]
    pub response_format: Option<OrderedJson>,
}

/// The grammar `response_format` asks for, if any.
fn response_schema(format: Option<&OrderedJson>) -> Result<Option<SchemaGrammar>, ApiError> {
    let bad = |code: &'static str, m: String| ApiError::bad_request(code, m);
    let Some(format) = format else {
        return Ok(None);
    };
    match format.get("type").and_then(OrderedJson::as_str) {
        Some("text") => Ok(None),
        Some("json_schema") => {
            let schema = format
                .get("json_schema")
                .and_then(|j| j.get("schema"))
                .ok_or_else(|| {
                    bad(
                        "invalid_field",
                        "`response_format.json_schema.schema` is missing".into(),
                    )
                })?;
            SchemaGrammar::compile(schema).map(Some).map_err(|e| {
                bad(
                    "unsupported_schema",
                    format!(
                        "response_format.json_schema.schema: `{}` at {} is not supported: {}",
                        e.keyword, e.path, e.message
                    ),
                )
            })
        }
        Some(other) => Err(bad(
            "unsupported",
            format!("response_format type `{other}` is not supported: use `text` or `json_schema`"),
        )),
        None => Err(bad(
            "invalid_field",
            "`response_format.type` must be a string".into(),
        )),
    }
}

/// Turns OpenAI messages into transformers' form, taking out the images (data URIs only).
fn convert_messages(
    messages: &[serde_json::Value],
) -> Result<(serde_json::Value, Vec<Vec<u8>>), ApiError> {
    use serde_json::{Value, json};
    let bad = |m: String| ApiError::bad_request("invalid_messages", m);
    if messages.is_empty() {
        return Err(bad("`messages` is empty".into()));
    }
    let mut out = Vec::new();
    let mut images = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .filter(|r| matches!(*r, "system" | "user" | "assistant"))
            .ok_or_else(|| {
                bad(format!(
                    "messages[{i}].role must be system, user or assistant"
                ))
            })?;
        let content = match m.get("content") {
            Some(Value::String(s)) => json!([{"type": "text", "text": s}]),
            Some(Value::Array(parts)) => {
                let mut converted = Vec::new();
                for (k, p) in parts.iter().enumerate() {
                    match p.get("type").and_then(Value::as_str) {
                        Some("text") => {
                            let text = p.get("text").and_then(Value::as_str).ok_or_else(|| {
                                bad(format!("messages[{i}].content[{k}].text must be a string"))
                            })?;
                            converted.push(json!({"type": "text", "text": text}));
                        }
                        Some("image_url") => {
                            let url = match p.get("image_url") {
                                Some(Value::String(u)) => Some(u.as_str()),
                                Some(o) => o.get("url").and_then(Value::as_str),
                                None => None,
                            }
                            .ok_or_else(|| {
                                bad(format!(
                                    "messages[{i}].content[{k}].image_url.url is missing"
                                ))
                            })?;
                            if !url.starts_with("data:") {
                                return Err(bad(format!(
                                    "messages[{i}].content[{k}]: only data: URIs are accepted \
                                     (the server fetches nothing)"
                                )));
                            }
                            images.push(decode_base64("image_url", url)?);
                            converted.push(json!({"type": "image"}));
                        }
                        _ => {
                            return Err(bad(format!(
                                "messages[{i}].content[{k}].type must be text or image_url"
                            )));
                        }
                    }
                }
                Value::Array(converted)
            }
            _ => {
                return Err(bad(format!(
                    "messages[{i}].content must be a string or a list"
                )));
            }
        };
        out.push(json!({"role": role, "content": content}));
    }
    Ok((Value::Array(out), images))
}

/// OpenAI-compatible chat completions (no streaming; images as data URIs only).
#[utoipa::path(post, path = "/v1/chat/completions", tag = "compatibility", request_body = ChatRequest,
    responses((status = 200, description = "an OpenAI `chat.completion` object"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn chat_completions(
    State(state): State<AppState>,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(req) = body?;
    // Any model name is accepted (clients must send one): the server serves one model.
    let model = req
        .model
        .clone()
        .unwrap_or_else(|| crate::MODEL_NAME.to_string());
    if req.stream == Some(true) {
        return Err(ApiError::bad_request(
            "unsupported",
            "streaming is not supported: send `stream: false`",
        ));
    }
    let max_tokens = req.max_completion_tokens.or(req.max_tokens).unwrap_or(256);
    if !(1..=2048).contains(&max_tokens) {
        return Err(ApiError::bad_request(
            "invalid_field",
            "`max_tokens` must be 1 to 2048",
        ));
    }
    let temperature = req.temperature.unwrap_or(0.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_request(
            "invalid_field",
            "`temperature` must be 0 to 2",
        ));
    }
    let schema = response_schema(req.response_format.as_ref())?;
    if let Some(g) = &schema
        && g.min_len() + 1 > max_tokens
    {
        return Err(ApiError::bad_request(
            "invalid_field",
            format!(
                "`max_tokens` {max_tokens} is too small for the response format: its shortest \
                 answer takes {} tokens",
                g.min_len() + 1
            ),
        ));
    }
    let max_prompt_tokens = state.inner.config.max_prompt_tokens;
    let text_bytes = text_bytes(&req.messages);
    let max_bytes = max_prompt_tokens.saturating_mul(BYTES_PER_PROMPT_TOKEN);
    if text_bytes > max_bytes {
        return Err(prompt_too_long(format!(
            "the messages hold {text_bytes} bytes of text, above the limit of {max_bytes} \
             ({max_prompt_tokens} tokens)"
        )));
    }
    let prompter = state
        .front()?
        .prompter
        .clone()
        .ok_or_else(crate::worker::remote_chat)?;
    // Decoding the photos, rendering and tokenizing run on the blocking pool.
    let max_pixels = state.inner.config.max_pixels;
    let prepared = tokio::task::spawn_blocking(move || {
        let (messages, images) = convert_messages(&req.messages)?;
        let mut inputs = Vec::with_capacity(images.len());
        for (i, bytes) in images.into_iter().enumerate() {
            images::probe(&bytes, max_pixels)?;
            inputs.push(Input {
                name: format!("image {}", i + 1),
                bytes,
            });
        }
        prompter
            .prepare(&messages, &inputs, max_prompt_tokens)
            .map_err(|e| match e {
                inspector_detect::Error::PromptTooLong { .. } => prompt_too_long(e.to_string()),
                inspector_detect::Error::Image { .. } => {
                    ApiError::unprocessable("corrupt_image", e.to_string())
                }
                other => ApiError::unprocessable("invalid_messages", other.to_string()),
            })
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    let (tx, rx) = oneshot::channel();
    state.enqueue(Job::Chat(ChatJob {
        prepared,
        max_tokens,
        temperature,
        seed: req.seed.unwrap_or(0),
        schema: schema.map(Arc::new),
        reply: tx,
    }))?;
    let answer = state.wait(rx).await?;
    let created = chrono::Utc::now().timestamp();
    Ok(Json(serde_json::json!({
        "id": format!("chatcmpl-{}", crate::worker::new_id(created * 1000)),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": answer.text},
            "finish_reason": if answer.stopped_at_eos { "stop" } else { "length" },
        }],
        "usage": {
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens,
        },
    })))
}

fn prompt_too_long(message: String) -> ApiError {
    ApiError::bad_request("prompt_too_long", message)
}

/// The bytes of text in OpenAI messages (string contents and text parts), counted without
/// copying anything.
fn text_bytes(messages: &[serde_json::Value]) -> usize {
    use serde_json::Value;
    messages
        .iter()
        .map(|m| match m.get("content") {
            Some(Value::String(s)) => s.len(),
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .map(str::len)
                .sum(),
            _ => 0,
        })
        .sum()
}

fn model_object() -> serde_json::Value {
    serde_json::json!({
        "id": crate::MODEL_NAME,
        "object": "model",
        "created": 0,
        "owned_by": "safety-inspector",
    })
}

/// The one model this server serves (OpenAI's model list).
#[utoipa::path(get, path = "/v1/models", tag = "compatibility",
    responses((status = 200, description = "an OpenAI `list` of `model` objects")))]
pub async fn list_models() -> Json<serde_json::Value> {
    Json(serde_json::json!({"object": "list", "data": [model_object()]}))
}

/// One model by name (only the served one exists).
#[utoipa::path(get, path = "/v1/models/{model}", tag = "compatibility",
    params(("model" = String, Path)),
    responses((status = 200, description = "an OpenAI `model` object"),
        (status = 404, body = ErrorBody)))]
pub async fn get_model(Path(model): Path<String>) -> Result<Json<serde_json::Value>, ApiError> {
    if model == crate::MODEL_NAME {
        Ok(Json(model_object()))
    } else {
        Err(ApiError::not_found(format!(
            "no model `{model}`: this server serves `{}`",
            crate::MODEL_NAME
        )))
    }
}
