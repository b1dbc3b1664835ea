//! The HTTP resources, one module each, each with its own router whose routes carry their
//! OpenAPI paths ([`utoipa_axum::routes!`]): the document is assembled from the same routers
//! that serve, so a route cannot be served undocumented.
//!
//! Authentication is a layer on the protected routers ([`assemble`]); the public ones (the
//! page, `/health`, `/ready`, the OpenAPI document) are merged without it.

pub mod cameras;
pub mod chat;
pub mod documents;
pub mod events;
pub mod inspections;
pub mod keys;
pub mod operations;
pub mod rules;
pub mod tutorial;

use axum::{Router, middleware};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::{AppState, auth, error, inspect, record};

/// The OpenAPI document's frame; the paths come from the modules' routers.
#[derive(OpenApi)]
#[openapi(
    info(title = "Safety Inspector", description = "Inspects site photos against the plant's safety regulations."),
    components(schemas(error::ErrorBody, record::InspectionRecord, record::InspectionPage,
        rules::RuleView, rules::RuleList, documents::DocumentUploaded, inspect::InspectJson,
        events::EventRecord, events::EventPage, cameras::CameraView,
        inspect::InspectOptions, keys::KeyView, keys::KeyCreated, keys::NewKey)),
    modifiers(&BearerAuth),
    security(("api_key" = [])),
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        openapi
            .components
            .get_or_insert_default()
            .add_security_scheme(
                "api_key",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
    }
}

/// Every resource's routes, authentication layered on the protected ones, and the OpenAPI
/// document of exactly those routes.
pub fn assemble(state: &AppState) -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let protected = OpenApiRouter::new()
        .merge(inspections::router())
        .merge(rules::router())
        .merge(documents::router())
        .merge(keys::router())
        .merge(events::router())
        .merge(cameras::router())
        .merge(tutorial::router())
        .merge(chat::router())
        .merge(operations::protected())
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ));
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(operations::public())
        .merge(protected)
        .split_for_parts()
}
