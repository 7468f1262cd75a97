//! What browsers load from the HTTP port: the chat page (`/`), the live dashboard
//! (`/dashboard`, which reads `/metrics`), the browser SDK
//! (`/sdk/tether.js`) and, with `--dev-login`, a token for any user name
//! (`POST /dev/token`).

use crate::Shared;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// The browser SDK, an ES module.
pub const SDK_JS: &str = include_str!("../web/sdk/tether.js");
/// A page that loads the SDK and nothing else (tests drive it).
pub const SDK_PAGE: &str = include_str!("../web/sdk/index.html");
/// The chat page and its script.
pub const CHAT_PAGE: &str = include_str!("../web/chat/index.html");
/// The chat page's script.
pub const CHAT_JS: &str = include_str!("../web/chat/chat.js");
/// The live dashboard (reads `/metrics`).
pub const DASHBOARD_PAGE: &str = include_str!("../web/dashboard/index.html");
/// The dashboard's script.
pub const DASHBOARD_JS: &str = include_str!("../web/dashboard/dashboard.js");

/// Lifetime of a development token.
const DEV_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(
            "/sdk/tether.js",
            get(|| async {
                (
                    [
                        (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
                        (header::CACHE_CONTROL, "no-cache"),
                    ],
                    SDK_JS,
                )
            }),
        )
        .route(
            "/sdk/",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                    SDK_PAGE,
                )
            }),
        )
        .route(
            "/",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                    CHAT_PAGE,
                )
            }),
        )
        .route(
            "/chat.js",
            get(|| async {
                (
                    [
                        (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
                        (header::CACHE_CONTROL, "no-cache"),
                    ],
                    CHAT_JS,
                )
            }),
        )
        .route(
            "/dashboard",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                    DASHBOARD_PAGE,
                )
            }),
        )
        .route(
            "/dashboard.js",
            get(|| async {
                (
                    [
                        (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
                        (header::CACHE_CONTROL, "no-cache"),
                    ],
                    DASHBOARD_JS,
                )
            }),
        )
        .route("/dev/token", post(dev_token))
        .with_state(shared)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DevLogin {
    user: String,
}

async fn dev_token(
    State(shared): State<Arc<Shared>>,
    body: Result<Json<DevLogin>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let refuse =
        |status: StatusCode, why: String| (status, Json(json!({ "error": why }))).into_response();
    if !shared.config.dev_login {
        return refuse(
            StatusCode::NOT_FOUND,
            "development login is off; start the server with --dev-login (development only)".into(),
        );
    }
    let Json(login) = match body {
        Ok(body) => body,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let user = login.user.trim();
    if user.is_empty() || user.len() > 128 || user.starts_with(tether_proto::GROUP_PREFIX) {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!(
                "user names are 1-128 bytes and do not start with {:?}",
                tether_proto::GROUP_PREFIX
            ),
        );
    }
    let token = shared.auth.mint(user, DEV_TOKEN_TTL);
    Json(json!({ "user": user, "token": token })).into_response()
}
