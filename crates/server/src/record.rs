//! The shapes the API answers with.

use inspector_core::reply::ReplyStatus;
use inspector_detect::Finding;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ApiError;

/// A stored inspection.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InspectionRecord {
    pub id: String,
    /// RFC 3339, UTC, milliseconds.
    pub created_at: String,
    /// The name the client gave the photo (metadata only).
    pub filename: Option<String>,
    /// Where the photo came from, as the client said (`options.source`).
    pub source: Option<String>,
    /// The stored photo; `?boxes=1` draws the violations' boxes on it.
    pub image_url: String,
    /// Status, violations (description, cited rule and the rule it resolved to, risk,
    /// suggestion, box in pixels, score), summary, raw answer, image size and hash, timings,
    /// model and adapter fingerprints.
    #[schema(value_type = Object)]
    pub finding: Finding,
}

impl InspectionRecord {
    pub fn new(
        id: String,
        created_ms: i64,
        filename: Option<String>,
        source: Option<String>,
        finding: Finding,
    ) -> Self {
        InspectionRecord {
            image_url: format!("/api/v1/inspections/{id}/image"),
            created_at: rfc3339(created_ms),
            id,
            filename,
            source,
            finding,
        }
    }

    /// Reads a stored row back.
    pub fn from_row(row: &inspector_store::InspectionRow) -> Result<Self, ApiError> {
        let i = &row.inspection;
        let finding: Finding = serde_json::from_str(&i.finding).map_err(|e| {
            ApiError::internal(format!("stored inspection {} is unreadable: {e}", i.id))
        })?;
        Ok(InspectionRecord::new(
            i.id.clone(),
            i.created_ms,
            i.filename.clone(),
            i.source.clone(),
            finding,
        ))
    }

    /// The tutorial deployment's RESULT object.
    pub fn tutorial(&self) -> serde_json::Value {
        let f = &self.finding;
        let local = chrono::DateTime::parse_from_rfc3339(&self.created_at)
            .map(|t| {
                t.with_timezone(&chrono::Local)
                    .format("%Y-%m-%d %H:%M:%S")
                    .to_string()
            })
            .unwrap_or_default();
        let violations: Vec<serde_json::Value> = f
            .violations
            .iter()
            .map(|v| {
                serde_json::json!({
                    "description": v.description,
                    "regulation": v.rule,
                    "rule_id": v.resolved.as_ref().map(|r| &r.id),
                    "rule_text": v.resolved.as_ref().map(|r| &r.text),
                    "verified": v.verified,
                    "risk_level": v.risk.map(|r| format!("{}风险", r.as_str())),
                    "suggestion": v.suggestion,
                    "box": v.bbox,
                })
            })
            .collect();
        serde_json::json!({
            "id": self.id,
            "image_path": self.image_url,
            "timestamp": local,
            "raw_response": f.raw,
            "status": if f.status == ReplyStatus::Safe { "safe" } else { "violation_detected" },
            "parsed": f.status != ReplyStatus::Unparsed,
            "violations": violations,
            "summary": {
                "total_violations": f.summary.total,
                "high_risk": f.summary.high,
                "medium_risk": f.summary.medium,
                "low_risk": f.summary.low,
            },
        })
    }
}

/// A page of inspections.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct InspectionPage {
    pub items: Vec<InspectionRecord>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Milliseconds since the epoch as RFC 3339 UTC.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
