//! Domain data shared by every Safety Inspector crate.
//!
//! This crate owns the vocabulary of the product and nothing else: it does no I/O and knows
//! nothing of models, databases or HTTP. It holds:
//!
//! - [`Rule`]: one clause of a regulation document, with its stable [`rule_id`] and citation;
//! - [`numerals`]: Chinese, full-width and Arabic numerals (`第一百零三条` → 103);
//! - [`citation`]: turning a citation written by a person or a model into one rule;
//! - [`answer`]: the canonical instruction ([`answer::INSTRUCTION`], versioned), the JSON answer
//!   the model is trained to give, and the numbered Chinese list older tools write;
//! - [`grammar`] and [`json_schema`]: byte-prefix grammars for constrained decoding (the answer;
//!   any schema of a stated subset, for `response_format`);
//! - [`reply`]: reading what a model wrote (tolerant JSON, the numbered list, truncation);
//! - [`Annotation`]: one annotated photo, as annotation files hold it.
//!
//! ```
//! use inspector_core::{Rule, SourceSpan, citation::{resolve, Resolution}};
//!
//! let rule = Rule::new("安全作业规程", "3.1", "进入作业区域必须佩戴安全帽。",
//!                      vec!["安全防护".into()], Some("3".into()),
//!                      SourceSpan { file: "a.md".into(), line_start: 7, line_end: 7 });
//! assert_eq!(rule.citation, "《安全作业规程》第3.1条");
//! let rules = vec![rule];
//! match resolve("安全作业规程 ３.１", &rules) {
//!     Resolution::Found(r) => assert_eq!(r.clause, "3.1"),
//!     other => panic!("{other:?}"),
//! }
//! ```

mod annotation;
pub mod answer;
pub mod citation;
pub mod grammar;
pub mod json_schema;
pub mod numerals;
pub mod reply;
mod rule;
pub mod text;

pub use annotation::{Annotation, BBox, Risk, Violation};
pub use rule::{Diagnostic, DiagnosticKind, Rule, SourceSpan, format_citation, rule_id};

/// The categories safety teams here sort their rules into, in display order. `其他` ("other")
/// is given to a rule that matches none of the keyword lists.
pub const DEFAULT_CATEGORIES: [&str; 5] = ["安全防护", "操作规范", "现场管理", "应急处理", "其他"];

/// The category of a rule that matched no keyword.
pub const OTHER_CATEGORY: &str = "其他";

/// Image pixel budget for training and inspection (`max_pixels`): 1280 merged 28×28 blocks,
/// the widely used fine-tuning setting for Qwen2-VL. Larger photos are shrunk to it.
pub const DEFAULT_MAX_PIXELS: usize = 1280 * 28 * 28;

/// The smallest pixel budget (`min_pixels`) for training and inspection.
pub const DEFAULT_MIN_PIXELS: usize = 256 * 28 * 28;
