//! Static files the pages use, embedded in the binary so a node needs nothing beside it:
//! the NHS design system's compiled stylesheet and images (vendored with their licence by
//! `browser-tests/vendor-nhsuk.sh`), and caremesh's own stylesheet and script.

use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

const FILES: &[(&str, &str, &[u8])] = &[
    (
        "nhsuk-frontend.min.css",
        "text/css; charset=utf-8",
        include_bytes!("../../assets/nhsuk/nhsuk-frontend.min.css"),
    ),
    (
        "view.css",
        "text/css; charset=utf-8",
        include_bytes!("../../assets/view.css"),
    ),
    (
        "view.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/view.js"),
    ),
    (
        "images/favicon.svg",
        "image/svg+xml",
        include_bytes!("../../assets/nhsuk/images/favicon.svg"),
    ),
    (
        "images/nhsuk-icon-arrow-down.svg",
        "image/svg+xml",
        include_bytes!("../../assets/nhsuk/images/nhsuk-icon-arrow-down.svg"),
    ),
    (
        "images/nhsuk-icon-arrow-up.svg",
        "image/svg+xml",
        include_bytes!("../../assets/nhsuk/images/nhsuk-icon-arrow-up.svg"),
    ),
    (
        "images/nhsuk-icon-arrow-up-down.svg",
        "image/svg+xml",
        include_bytes!("../../assets/nhsuk/images/nhsuk-icon-arrow-up-down.svg"),
    ),
    (
        "images/nhsuk-icon-cross.svg",
        "image/svg+xml",
        include_bytes!("../../assets/nhsuk/images/nhsuk-icon-cross.svg"),
    ),
];

/// GET /assets/{*path}: open to all, like any stylesheet; nothing here is patient data.
pub async fn asset(Path(path): Path<String>) -> Response {
    match FILES.iter().find(|(name, _, _)| *name == path) {
        Some((_, content_type, bytes)) => {
            ([(header::CONTENT_TYPE, *content_type)], *bytes).into_response()
        }
        None => (StatusCode::NOT_FOUND, "no such asset").into_response(),
    }
}
