//! Annotated images → validated training samples.
//!
//! An annotation file is JSONL, one record per image (`{"image", "violations": [...]}`, image
//! paths relative to the file; no violations marks a safe photo). [`validate`] checks every
//! line — JSON, fields, images (present, decodable, boxes inside them), rule citations (they
//! must resolve; the nearest rule is suggested), risks, duplicates — and reports each problem
//! with its line and field, never stopping at the first. This crate loads no model.
//!
//! ```
//! use inspector_dataset::validate_text;
//!
//! let report = validate_text("{\"image\": \"missing.png\", \"violations\": []}\n{oops\n", std::path::Path::new("."), &[]);
//! assert_eq!(report.records, 2);
//! assert_eq!(report.errors.iter().map(|e| e.line).collect::<Vec<_>>(), [1, 2]);
//! ```

mod validate;

pub use validate::{Problem, Report, validate_file, validate_text};
