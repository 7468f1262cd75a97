//! The admin HTTP API, on the HTTP port under `/admin/v1` (JSON; `Authorization:
//! Bearer <admin token>`). Its OpenAPI document is `GET /admin/v1/openapi.json`.
//!
//! The admin token is created on first start in `<data>/admin-token` (32 random bytes,
//! hex, mode 0600), so the API is closed by default: only someone who can read the
//! data directory can use it.
//!
//! - `GET  /admin/v1/health`: the server is up; sessions, durability, draining.
//! - `GET  /admin/v1/users/{user}/sessions`: connected devices (transport, heartbeat
//!   interval, last frame) and the devices the store knows (last seen).
//! - `GET  /admin/v1/users/{user}/presence`: online or not, and since when not.
//! - `POST /admin/v1/users/{user}/messages`: a message from the server side, committed
//!   like any other (durable before the answer) and delivered by position.
//! - `POST /admin/v1/users/{user}/devices/{device}/kick`: KICK{OPERATOR}; the SDK does
//!   not reconnect after a KICK.
//! - `POST /admin/v1/users/{user}/devices/{device}/revoke`: tokens of the user issued
//!   up to now are refused for that device from now on (kept in
//!   `<data>/revoked-devices.json`), and a connected session gets KICK{TOKEN_REVOKED}.

use crate::Shared;
use crate::commit::CommitRequest;
use crate::registry::{SIG_KICKED, SIG_REPLIES, SIG_REVOKED, Session};
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tether_proto::{Frame, pb};
use tether_store::{Action, AppendRequest, InboxTarget};

/// File name of the admin token inside the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";
/// File name of the device revocations inside the data directory.
pub const REVOKED_FILE: &str = "revoked-devices.json";
/// The sender (and conversation) of pushed messages unless the request names one.
pub const DEFAULT_PUSH_SENDER: &str = "tether";
/// How long a push waits for its commit.
const PUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// The OpenAPI document of this API.
pub const OPENAPI: &str = include_str!("admin-openapi.json");

/// The admin token (hex text), compared in constant time.
pub struct AdminToken(String);

impl AdminToken {
    /// Loads `<dir>/admin-token`, creating it on first use.
    pub fn open(dir: &FsPath) -> io::Result<Self> {
        let secret = crate::auth::load_or_create_secret(dir, ADMIN_TOKEN_FILE)?;
        Ok(Self(hex::encode(secret)))
    }

    fn matches(&self, presented: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), presented.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

/// What a kicked session is told, until it reads it.
#[derive(Debug, Default)]
pub struct Kicks(Mutex<HashMap<DeviceKey, String>>);

type DeviceKey = (Arc<str>, Box<str>);

impl Kicks {
    fn put(&self, user: &Arc<str>, device: &str, detail: String) {
        self.0.lock().insert((user.clone(), device.into()), detail);
    }

    /// Takes the detail left for `(user, device)`.
    pub fn take(&self, user: &Arc<str>, device: &str) -> Option<String> {
        self.0.lock().remove(&(user.clone(), device.into()))
    }
}

/// Devices whose tokens were revoked: user → device → revoked at (s since the epoch).
#[derive(Debug)]
pub struct Revocations {
    path: PathBuf,
    map: Mutex<HashMap<String, HashMap<String, u64>>>,
}

impl Revocations {
    /// Loads `<dir>/revoked-devices.json` (none yet is an empty list).
    pub fn open(dir: &FsPath) -> io::Result<Self> {
        let path = dir.join(REVOKED_FILE);
        let map = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("{path:?}: {e}"))
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => return Err(e),
        };
        Ok(Self {
            path,
            map: Mutex::new(map),
        })
    }

    /// Whether a token of `user` issued at `issued_s` is refused for `device`.
    pub fn refuses(&self, user: &str, device: &str, issued_s: u64) -> Option<u64> {
        let map = self.map.lock();
        let at = *map.get(user)?.get(device)?;
        (issued_s <= at).then_some(at)
    }

    /// Refuses the tokens of `user` issued up to `at_s` for `device`; durable on return.
    fn revoke(&self, user: &str, device: &str, at_s: u64) -> io::Result<()> {
        let mut map = self.map.lock();
        map.entry(user.to_owned())
            .or_default()
            .insert(device.to_owned(), at_s);
        let bytes = serde_json::to_vec_pretty(&*map).map_err(io::Error::other)?;
        // Written under the lock, so two revocations cannot reorder on disk.
        let tmp = self.path.with_extension("json.tmp");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

fn unix_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A JSON error body with `status`.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// A refused request, before any work.
struct Refused(StatusCode, String);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        error(self.0, self.1)
    }
}

/// The routes under `/admin/v1`, behind the admin token (but the OpenAPI document).
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    let guarded = Router::new()
        .route("/admin/v1/health", get(health))
        .route("/admin/v1/users/{user}/sessions", get(sessions))
        .route("/admin/v1/users/{user}/presence", get(presence))
        .route("/admin/v1/users/{user}/messages", post(push))
        .route("/admin/v1/users/{user}/devices/{device}/kick", post(kick))
        .route(
            "/admin/v1/users/{user}/devices/{device}/revoke",
            post(revoke),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            require_token,
        ))
        .with_state(shared);
    Router::new()
        .route(
            "/admin/v1/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        )
        .merge(guarded)
}

async fn require_token(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(token) if shared.admin_token.matches(token.trim()) => next.run(request).await,
        found => {
            let why = if found.is_some() {
                "wrong admin token"
            } else {
                "missing admin token: send `Authorization: Bearer <token>`; the token is in <data>/admin-token"
            };
            let mut response = error(StatusCode::UNAUTHORIZED, why);
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"tether-admin\""),
            );
            response
        }
    }
}

fn valid_user(user: &str) -> Result<(), Refused> {
    if user.is_empty() || user.len() > 128 {
        return Err(Refused(
            StatusCode::BAD_REQUEST,
            "user ids are 1-128 bytes".into(),
        ));
    }
    if user.starts_with(tether_proto::GROUP_PREFIX) {
        return Err(Refused(
            StatusCode::BAD_REQUEST,
            format!(
                "ids starting with {:?} name groups, not users",
                tether_proto::GROUP_PREFIX
            ),
        ));
    }
    Ok(())
}

async fn health(State(shared): State<Arc<Shared>>) -> Response {
    Json(json!({
        "status": "ok",
        "sessions": shared.registry.len(),
        "connections_open": shared.metrics.connections_open.get(),
        "durability": shared.store.durability().to_string(),
        "draining": shared.draining.load(std::sync::atomic::Ordering::Acquire),
        "uptime_ms": shared.now_ms(),
    }))
    .into_response()
}

async fn sessions(State(shared): State<Arc<Shared>>, Path(user): Path<String>) -> Response {
    if let Err(r) = valid_user(&user) {
        return r.into_response();
    }
    let now = shared.now_ms();
    let connected: Vec<_> = shared
        .registry
        .sessions_of(&user)
        .iter()
        .map(|s| {
            let interval = Duration::from_millis(u64::from(s.interval_ms()));
            let allowed = shared.config.heartbeat.deadline(interval).as_millis() as u64;
            // Every frame moves the deadline to now + allowed.
            let last_frame_ms_ago = now.saturating_sub(s.deadline().saturating_sub(allowed));
            json!({
                "device": &*s.device,
                "device_epoch": s.device_epoch,
                "transport": s.transport().map(|t| t.as_str()),
                "heartbeat_mode": s.mode(),
                "heartbeat_interval_ms": s.interval_ms(),
                "rtt_ms": s.rtt_us().map(|us| f64::from(us) / 1000.0),
                "last_frame_ms_ago": last_frame_ms_ago,
                "delivered_head": s.head(),
            })
        })
        .collect();
    let known = match shared.store.devices(&user) {
        Ok(devices) => devices,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("store: {e}")),
    };
    let known: Vec<_> = known
        .into_iter()
        .map(|(device, cursor)| {
            json!({
                "device": device,
                "acked_seq": cursor.acked_seq,
                "last_seen_ms": cursor.last_seen_ms,
            })
        })
        .collect();
    Json(json!({ "user": user, "connected": connected, "devices": known })).into_response()
}

async fn presence(State(shared): State<Arc<Shared>>, Path(user): Path<String>) -> Response {
    if let Err(r) = valid_user(&user) {
        return r.into_response();
    }
    let devices = shared.registry.connected_devices(&user);
    let last_seen_ms = match shared.store.devices(&user) {
        Ok(known) => known.iter().map(|(_, c)| c.last_seen_ms).max(),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("store: {e}")),
    };
    let online = !devices.is_empty();
    Json(json!({
        "user": user,
        "online": online,
        "devices": devices.iter().map(|d| &**d).collect::<Vec<_>>(),
        "last_seen_ms": if online { Some(unix_ms()) } else { last_seen_ms },
    }))
    .into_response()
}

/// `POST /admin/v1/users/{user}/messages`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PushRequest {
    /// The text (UTF-8) of the message.
    body: String,
    #[serde(default)]
    content_type: Option<String>,
    /// Sender and conversation shown to the user; [`DEFAULT_PUSH_SENDER`] if absent.
    #[serde(default)]
    from: Option<String>,
    /// 32 hex digits: retrying with the same id commits once (the dedup window).
    #[serde(default)]
    client_msg_id: Option<String>,
}

async fn push(
    State(shared): State<Arc<Shared>>,
    Path(user): Path<String>,
    body: Result<Json<PushRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Err(r) = valid_user(&user) {
        return r.into_response();
    }
    let Json(req) = match body {
        Ok(body) => body,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let from = req.from.unwrap_or_else(|| DEFAULT_PUSH_SENDER.to_owned());
    if let Err(r) = valid_user(&from) {
        return r.into_response();
    }
    if req.body.len() > shared.config.max_frame.saturating_sub(256) {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "body above the frame limit of {} bytes",
                shared.config.max_frame
            ),
        );
    }
    let client_msg_id = match req.client_msg_id.as_deref().map(hex::decode) {
        None => rand::random::<[u8; 16]>(),
        Some(Ok(id)) if id.len() == 16 => {
            let mut out = [0u8; 16];
            out.copy_from_slice(&id);
            out
        }
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "client_msg_id must be 32 hex digits",
            );
        }
    };
    let append = AppendRequest {
        sender: from.clone(),
        sender_device: "admin".into(),
        client_msg_id,
        action: Action::Message(vec![InboxTarget {
            user: user.clone(),
            conversation: from.clone(),
        }]),
        body: bytes::Bytes::from(req.body.into_bytes()),
        content_type: req.content_type.unwrap_or_else(|| "text/plain".into()),
        ts_ms: unix_ms(),
    };
    // The commit path answers a session: this one is never registered, it only
    // receives the reply.
    let waiter = Arc::new(Session::new(from.into(), "admin".into(), 0));
    let submitted = shared.commit.submit(CommitRequest {
        append,
        reply_to: waiter.clone(),
        submitted: Instant::now(),
    });
    if !submitted {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the commit path has stopped",
        );
    }
    shared.commit.flush();
    let answered = tokio::time::timeout(
        PUSH_TIMEOUT,
        std::future::poll_fn(|cx| {
            if waiter.poll_signals(cx) & SIG_REPLIES != 0 {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        }),
    )
    .await;
    if answered.is_err() {
        return error(
            StatusCode::GATEWAY_TIMEOUT,
            "no commit within 10 s; retry with the same client_msg_id",
        );
    }
    match waiter.take_replies().pop_front().flatten() {
        Some(Frame::SendAck(ack)) => Json(json!({
            "user": user,
            "message_id": ack.message_id,
            "ts_ms": ack.ts_ms,
            "duplicate": ack.duplicate,
            "client_msg_id": hex::encode(client_msg_id),
        }))
        .into_response(),
        Some(Frame::Error(e)) => {
            let status = match pb::ErrorCode::try_from(e.code) {
                Ok(pb::ErrorCode::Internal) => StatusCode::INTERNAL_SERVER_ERROR,
                Ok(pb::ErrorCode::Forbidden) => StatusCode::FORBIDDEN,
                _ => StatusCode::BAD_REQUEST,
            };
            error(status, e.reason)
        }
        _ => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the commit path gave no answer",
        ),
    }
}

/// `POST .../kick` and `.../revoke`: an optional reason for the device.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KickRequest {
    #[serde(default)]
    reason: Option<String>,
}

fn kick_body(body: &[u8]) -> Result<KickRequest, Refused> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(KickRequest::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| Refused(StatusCode::BAD_REQUEST, format!("bad JSON body: {e}")))
}

/// Signals the session of `(user, device)`, if connected; returns whether it was.
fn signal_device(shared: &Shared, user: &str, device: &str, bit: u8, detail: String) -> bool {
    let Some(session) = shared
        .registry
        .sessions_of(user)
        .into_iter()
        .find(|s| &*s.device == device)
    else {
        return false;
    };
    shared.kicks.put(&session.user, device, detail);
    session.signal(bit);
    true
}

async fn kick(
    State(shared): State<Arc<Shared>>,
    Path((user, device)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = valid_user(&user) {
        return r.into_response();
    }
    let req = match kick_body(&body) {
        Ok(req) => req,
        Err(r) => return r.into_response(),
    };
    let detail = req
        .reason
        .unwrap_or_else(|| "disconnected by an operator".into());
    if !signal_device(&shared, &user, &device, SIG_KICKED, detail.clone()) {
        return error(
            StatusCode::NOT_FOUND,
            format!("{user}/{device} is not connected"),
        );
    }
    tracing::info!(user, device, detail, "device kicked by an operator");
    Json(json!({ "user": user, "device": device, "kicked": true })).into_response()
}

async fn revoke(
    State(shared): State<Arc<Shared>>,
    Path((user, device)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = valid_user(&user) {
        return r.into_response();
    }
    let req = match kick_body(&body) {
        Ok(req) => req,
        Err(r) => return r.into_response(),
    };
    let at = unix_s();
    if let Err(e) = shared.revocations.revoke(&user, &device, at) {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("could not record the revocation: {e}"),
        );
    }
    let detail = req
        .reason
        .unwrap_or_else(|| "this device's tokens were revoked; log in again".into());
    let kicked = signal_device(&shared, &user, &device, SIG_REVOKED, detail);
    tracing::info!(
        user,
        device,
        revoked_at_s = at,
        kicked,
        "device tokens revoked"
    );
    Json(json!({
        "user": user,
        "device": device,
        "revoked_at_s": at,
        "kicked": kicked,
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocations_refuse_tokens_issued_up_to_the_revocation_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let r = Revocations::open(dir.path()).unwrap();
        assert_eq!(r.refuses("ann", "phone", 100), None);
        r.revoke("ann", "phone", 200).unwrap();
        assert_eq!(r.refuses("ann", "phone", 199), Some(200));
        assert_eq!(r.refuses("ann", "phone", 200), Some(200));
        assert_eq!(r.refuses("ann", "phone", 201), None);
        assert_eq!(r.refuses("ann", "laptop", 100), None);
        assert_eq!(r.refuses("bob", "phone", 100), None);
        let reopened = Revocations::open(dir.path()).unwrap();
        assert_eq!(reopened.refuses("ann", "phone", 150), Some(200));
    }

    #[test]
    fn a_corrupt_revocation_file_is_an_error_not_an_empty_list() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(REVOKED_FILE), b"{not json").unwrap();
        assert!(Revocations::open(dir.path()).is_err());
    }

    #[test]
    fn the_admin_token_is_created_once_and_compared_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let a = AdminToken::open(dir.path()).unwrap();
        let b = AdminToken::open(dir.path()).unwrap();
        assert_eq!(a.0, b.0);
        assert_eq!(a.0.len(), 64);
        assert!(a.matches(&b.0));
        assert!(!a.matches(&b.0[..63]));
        assert!(!a.matches(""));
        let mut wrong = b.0.clone().into_bytes();
        wrong[10] ^= 1;
        assert!(!a.matches(std::str::from_utf8(&wrong).unwrap()));
    }
}
