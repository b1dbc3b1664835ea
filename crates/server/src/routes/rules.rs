//! `/api/v1/rules`: the rules inspections cite, listed, searched and read one by one.

use axum::{
    Json,
    extract::{Path, Query, State},
};
use inspector_core::Rule;
use inspector_store::RuleFilter;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    AppState,
    error::{ApiError, ErrorBody},
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_rules))
        .routes(routes!(get_rule))
}

/// A rule as the API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RuleView {
    pub id: String,
    pub document: String,
    pub clause: String,
    pub citation: String,
    pub text: String,
    pub categories: Vec<String>,
    pub parent: Option<String>,
    pub chapter: Option<String>,
}

impl From<Rule> for RuleView {
    fn from(r: Rule) -> Self {
        RuleView {
            id: r.id,
            document: r.document,
            clause: r.clause,
            citation: r.citation,
            text: r.text,
            categories: r.categories,
            parent: r.parent,
            chapter: r.chapter,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RuleList {
    pub items: Vec<RuleView>,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct RuleQuery {
    /// Full-text search (Chinese works without a dictionary).
    pub q: Option<String>,
    /// Only this document's rules (exact title).
    pub document: Option<String>,
    /// Only rules of this category.
    pub category: Option<String>,
}

/// The rules inspections cite.
#[utoipa::path(get, path = "/api/v1/rules", tag = "rules", params(RuleQuery),
    responses((status = 200, body = RuleList), (status = 400, body = ErrorBody)))]
pub async fn list_rules(
    State(state): State<AppState>,
    query: Result<Query<RuleQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<RuleList>, ApiError> {
    let Query(q) = query?;
    let rules = state
        .read(move |s| {
            let filter = RuleFilter {
                category: q.category.clone(),
                document: q.document.clone(),
            };
            match q.q.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
                // Filters apply to the hits, so take many of them when there are filters.
                Some(text) => s
                    .search(
                        text,
                        if filter == RuleFilter::default() {
                            200
                        } else {
                            5000
                        },
                    )
                    .map(|found| {
                        found
                            .into_iter()
                            .filter(|r| {
                                filter.document.as_deref().is_none_or(|d| {
                                    r.document == d.trim_start_matches('《').trim_end_matches('》')
                                }) && filter
                                    .category
                                    .as_ref()
                                    .is_none_or(|c| r.categories.contains(c))
                            })
                            .collect()
                    }),
                None => s.rules(&filter),
            }
        })
        .await?;
    Ok(Json(RuleList {
        items: rules.into_iter().map(RuleView::from).collect(),
    }))
}

/// One rule.
#[utoipa::path(get, path = "/api/v1/rules/{id}", tag = "rules", params(("id" = String, Path)),
    responses((status = 200, body = RuleView), (status = 404, body = ErrorBody)))]
pub async fn get_rule(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<RuleView>, ApiError> {
    let wanted = id.clone();
    state
        .read(move |s| s.rule(&wanted))
        .await?
        .map(|r| Json(r.into()))
        .ok_or_else(|| ApiError::not_found(format!("no rule with id `{id}`")))
}
