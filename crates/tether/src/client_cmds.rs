//! `tether send`, `tether recv`, `tether chat`, `tether group`, `tether conversations`:
//! thin command-line fronts for the tether-client SDK. State (cursor, device epoch, unconfirmed sends) is kept per user
//! and device in `<state-dir>/<user>@<device>.json`, so each invocation resumes where
//! the previous one of the same device stopped.

use bytes::Bytes;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use tether_client::{
    Client, ClientConfig, ClientError, ClientEvent, ClientMsgId, ConnState, DEFAULT_SERVER,
    DisconnectReason, Entry, EntryType, GroupEventKind, ReceiptKind, SendAck, StateFile,
    group_conversation, group_event_of, receipt_of, token_subject,
};
use tokio::sync::{broadcast, mpsc};
use tokio::task::{JoinHandle, JoinSet};

/// How to reach the server and who to be; shared by every client command.
#[derive(clap::Args, Debug, Clone)]
pub struct ConnArgs {
    /// Server URL: `host:port` or `tcp://` (plain TCP), `tls://`, `ws://host:port/ws`,
    /// `wss://host:port/ws` (add `?encoding=json` for the JSON sub-protocol), `quic://`.
    #[arg(long, default_value = DEFAULT_SERVER)]
    pub server: String,
    /// CA certificate (PEM) to verify a TLS, WSS or QUIC server against, instead of the
    /// system's roots (e.g. the cert.pem of `tether cert`).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Login token (a JWT whose `sub` is the user).
    #[arg(long, conflicts_with = "user", required_unless_present = "user")]
    pub token: Option<String>,
    /// Log in as this user with a token minted from the data dir's secret.
    #[arg(long)]
    pub user: Option<String>,
    /// Data directory of a local server (for --user).
    #[arg(long, default_value = "tether-data")]
    pub data: PathBuf,
    /// Device id of this client.
    #[arg(long, default_value = "cli")]
    pub device: String,
    /// Where state files (`<user>@<device>.json`) are kept.
    #[arg(long, default_value = "tether-client")]
    pub state_dir: PathBuf,
    /// Heartbeat interval to ask the server for, ms (it may clamp it).
    #[arg(long, default_value_t = 30_000)]
    pub heartbeat_interval_ms: u64,
    /// `idle` (a PING only after this long without sending anything) or `fixed`
    /// (a PING every interval regardless of traffic).
    #[arg(long, default_value = "idle", value_parser = ["idle", "fixed"])]
    pub heartbeat_mode: String,
}

/// `tether send`.
#[derive(clap::Args, Debug)]
pub struct SendArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Recipient user.
    #[arg(long, required_unless_present = "group", conflicts_with = "group")]
    pub to: Option<String>,
    /// Recipient group (the sender must be a member).
    #[arg(long)]
    pub group: Option<String>,
    /// Give up after this many seconds (the message stays queued in the state file
    /// and is resent by the next run). Default: wait until confirmed.
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Message text.
    pub text: String,
}

/// `tether recv`.
#[derive(clap::Args, Debug)]
pub struct RecvArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Exit 0 after this many entries. Default: run until interrupted.
    #[arg(long)]
    pub count: Option<u64>,
    /// Exit 2 if not done this many seconds after start. Default: no limit.
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Mark each message from someone else as read once printed (the sender gets a
    /// READ receipt; this user's unread count drops on every device).
    #[arg(long)]
    pub read: bool,
}

/// `tether group`.
#[derive(clap::Args, Debug)]
pub struct GroupArgs {
    #[command(subcommand)]
    pub op: GroupCmd,
}

/// Group operations.
#[derive(clap::Subcommand, Debug)]
pub enum GroupCmd {
    /// Create a group owned by this user, with the given members besides.
    Create {
        /// Group id: 1 to 64 ASCII letters, digits, '.', '_', '-'.
        group: String,
        /// Members besides this user.
        members: Vec<String>,
        /// Display name.
        #[arg(long, default_value = "")]
        name: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Add members (any member may).
    Add {
        /// Group id.
        group: String,
        /// Users to add.
        #[arg(required = true)]
        members: Vec<String>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Remove members (the owner only).
    Remove {
        /// Group id.
        group: String,
        /// Members to remove.
        #[arg(required = true)]
        members: Vec<String>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Leave a group (an owner who leaves passes ownership on).
    Leave {
        /// Group id.
        group: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Without a group: the groups this user is in. With one: its members with their
    /// delivered and read marks (message ids).
    List {
        /// Group id.
        group: Option<String>,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

impl GroupCmd {
    fn conn(&self) -> &ConnArgs {
        match self {
            GroupCmd::Create { conn, .. }
            | GroupCmd::Add { conn, .. }
            | GroupCmd::Remove { conn, .. }
            | GroupCmd::Leave { conn, .. }
            | GroupCmd::List { conn, .. } => conn,
        }
    }
}

/// `tether conversations`.
#[derive(clap::Args, Debug)]
pub struct ConversationsArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// `tether chat`.
#[derive(clap::Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// The peer to chat with.
    #[arg(long)]
    pub to: String,
}

/// Exit code for "timed out".
const EXIT_TIMEOUT: u8 = 2;

/// One JSON line per delivered entry. `type` is `message`, `receipt` or `membership`;
/// for the last two, `text` describes the entry and `receipt` / `group` carry it.
#[derive(Serialize)]
struct EntryLine<'a> {
    seq: u64,
    id: u64,
    from: &'a str,
    from_device: &'a str,
    conversation: &'a str,
    text: String,
    ts: u64,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    receipt: Option<ReceiptLine>,
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<GroupLine>,
}

#[derive(Serialize)]
struct ReceiptLine {
    kind: &'static str,
    conversation: String,
    /// Empty in a group's aggregate: every other member.
    by: String,
    up_to_message_id: u64,
    #[serde(skip_serializing_if = "is_zero")]
    up_to_seq: u64,
    #[serde(skip_serializing_if = "is_zero")]
    unread: u64,
}

#[derive(Serialize)]
struct GroupLine {
    event: &'static str,
    group: String,
    actor: String,
    members: Vec<String>,
    owner: String,
    size: u32,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The JSON line `tether send` prints on success.
#[derive(Serialize)]
struct SentLine {
    id: u64,
    seq: u64,
    ts: u64,
    client_msg_id: String,
}

/// A configured client, and the user it logs in as.
struct Login {
    config: ClientConfig,
    user: String,
    state_path: PathBuf,
}

fn login(conn: &ConnArgs) -> Result<Login, String> {
    let token = match (&conn.token, &conn.user) {
        (Some(token), _) => token.clone(),
        (None, Some(user)) => tether_server::auth::mint_token(&conn.data, user)
            .map_err(|e| format!("cannot mint a token for {user}: {e}"))?,
        (None, None) => return Err("--token or --user is required".into()),
    };
    let user = token_subject(&token)
        .or_else(|| conn.user.clone())
        .ok_or("the token carries no user (`sub` claim)")?;
    let state_path = conn.state_dir.join(format!(
        "{}@{}.json",
        file_safe(&user),
        file_safe(&conn.device)
    ));
    let mut config = ClientConfig::new(conn.server.clone(), token, conn.device.clone());
    config.state_path = Some(state_path.clone());
    config.heartbeat_interval = std::time::Duration::from_millis(conn.heartbeat_interval_ms);
    config.heartbeat_mode = match conn.heartbeat_mode.as_str() {
        "fixed" => tether_core::heartbeat::HeartbeatMode::Fixed,
        _ => tether_core::heartbeat::HeartbeatMode::Idle,
    };
    config.platform = "cli".into();
    config.app_version = concat!("tether-cli/", env!("CARGO_PKG_VERSION")).into();
    tether_client::ServerUrl::parse(&conn.server).map_err(|e| e.to_string())?;
    config.connector = std::sync::Arc::new(
        tether_client::NetConnector::new(
            // Backstop only: well past the heartbeat's own dead-link time (DESIGN §4).
            Some(
                config.heartbeat_interval
                    + config.pong_timeout * 2
                    + std::time::Duration::from_secs(60),
            ),
            Some(std::time::Duration::from_secs(60)),
        )
        .with_ca_file(conn.ca.clone()),
    );
    Ok(Login {
        config,
        user,
        state_path,
    })
}

/// Keeps a user or device id usable as part of a file name.
fn file_safe(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn fail(cmd: &str, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("tether {cmd}: {message}");
    ExitCode::FAILURE
}

fn secs(value: f64) -> Duration {
    Duration::try_from_secs_f64(value).unwrap_or(Duration::MAX)
}

fn deadline_after(timeout: Option<f64>) -> Option<tokio::time::Instant> {
    timeout.map(|t| tokio::time::Instant::now() + secs(t).min(Duration::from_secs(1 << 32)))
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Prints connection trouble and other notable events on stderr.
fn report_events(
    cmd: &'static str,
    mut events: broadcast::Receiver<ClientEvent>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let event = match events.recv().await {
                Ok(event) => event,
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            };
            match event {
                ClientEvent::Connected(info) if cmd == "chat" => {
                    eprintln!("-- connected to {} as {}", info.server, info.user_id)
                }
                ClientEvent::ConnectFailed {
                    server,
                    detail,
                    retry_in,
                } => eprintln!(
                    "tether {cmd}: cannot connect to {server}: {detail}; retrying in {:.1}s",
                    retry_in.as_secs_f64()
                ),
                ClientEvent::Disconnected {
                    reason: DisconnectReason::LocalClose,
                    ..
                } => {}
                ClientEvent::Disconnected { reason, retry_in } => match retry_in {
                    Some(delay) => eprintln!(
                        "tether {cmd}: disconnected: {reason}; reconnecting in {:.1}s",
                        delay.as_secs_f64()
                    ),
                    None => eprintln!("tether {cmd}: disconnected: {reason}"),
                },
                ClientEvent::InboxReset {
                    old_epoch,
                    new_epoch,
                    start_seq,
                } => eprintln!(
                    "tether {cmd}: the inbox was reset (epoch {old_epoch} -> {new_epoch}); \
                     continuing from seq {start_seq}"
                ),
                ClientEvent::EntriesExpired { from, to } => eprintln!(
                    "tether {cmd}: entries {from}..={to} expired on the server before this \
                     device fetched them"
                ),
                ClientEvent::SendAcked(ack) => eprintln!(
                    "tether {cmd}: earlier message {} confirmed (id {}, seq {})",
                    ack.client_msg_id, ack.message_id, ack.seq
                ),
                ClientEvent::SendRejected {
                    client_msg_id,
                    code,
                    reason,
                } => eprintln!(
                    "tether {cmd}: earlier message {client_msg_id} rejected: {} ({reason})",
                    code.as_str_name()
                ),
                _ => {}
            }
        }
    })
}

fn stop_reason(client: &Client) -> ClientError {
    match client.state() {
        ConnState::Stopped(e) => e,
        _ => ClientError::Closed,
    }
}

fn note_left_over_sends(cmd: &str, state_path: &Path) {
    if let Ok(Some(state)) = StateFile::load(state_path)
        && !state.outbox.is_empty()
    {
        eprintln!(
            "tether {cmd}: resending {} unconfirmed message(s) from an earlier run",
            state.outbox.len()
        );
    }
}

/// `tether send`: exits 0 only after the server confirmed the message.
pub async fn run_send(args: SendArgs) -> ExitCode {
    let login = match login(&args.conn) {
        Ok(login) => login,
        Err(e) => return fail("send", e),
    };
    note_left_over_sends("send", &login.state_path);
    let client = match Client::start(login.config) {
        Ok(client) => client,
        Err(e) => return fail("send", e),
    };
    let reporter = report_events("send", client.events());
    let id = ClientMsgId::generate();
    let to = match (&args.to, &args.group) {
        (_, Some(group)) => group_conversation(group),
        (Some(to), None) => to.clone(),
        (None, None) => return fail("send", "--to or --group is required"),
    };
    let sending = client.send_with_id(id, &to, Bytes::from(args.text), "text/plain");
    let outcome = tokio::select! {
        outcome = sending => Some(outcome),
        () = sleep_until(deadline_after(args.timeout)) => None,
    };
    let code = match outcome {
        Some(Ok(ack)) => {
            print_sent(&ack);
            ExitCode::SUCCESS
        }
        Some(Err(e)) => fail("send", format!("message {id} not confirmed: {e}")),
        None => {
            eprintln!(
                "tether send: timed out; message {id} is not confirmed (it stays queued in {} \
                 and is resent by the next run)",
                login.state_path.display()
            );
            ExitCode::from(EXIT_TIMEOUT)
        }
    };
    client.close().await;
    reporter.abort();
    code
}

/// `tether recv`: prints each entry as a JSON line, then acknowledges it.
pub async fn run_recv(args: RecvArgs) -> ExitCode {
    let login = match login(&args.conn) {
        Ok(login) => login,
        Err(e) => return fail("recv", e),
    };
    let mut client = match Client::start(login.config) {
        Ok(client) => client,
        Err(e) => return fail("recv", e),
    };
    let reporter = report_events("recv", client.events());
    let deadline = deadline_after(args.timeout);
    let mut received = 0u64;
    let code = loop {
        if args.count.is_some_and(|n| received >= n) {
            break ExitCode::SUCCESS;
        }
        let next = tokio::select! {
            entry = client.recv() => entry,
            () = sleep_until(deadline) => {
                let wanted = args.count.map_or(String::new(), |n| format!(" of {n}"));
                eprintln!("tether recv: timed out after {received}{wanted} entries");
                break ExitCode::from(EXIT_TIMEOUT);
            }
            _ = tokio::signal::ctrl_c() => break ExitCode::SUCCESS,
        };
        let Some(entry) = next else {
            break fail("recv", stop_reason(&client));
        };
        print_json_line(&entry_line(&entry));
        // Printed and flushed: now it counts as processed.
        client.ack(entry.seq);
        if args.read && entry.r#type == EntryType::Message as i32 && entry.from != login.user {
            client.mark_read(&entry).await;
        }
        received += 1;
    };
    client.close().await;
    reporter.abort();
    code
}

/// `tether chat`: lines typed are sent to the peer; incoming entries are printed.
pub async fn run_chat(args: ChatArgs) -> ExitCode {
    let login = match login(&args.conn) {
        Ok(login) => login,
        Err(e) => return fail("chat", e),
    };
    note_left_over_sends("chat", &login.state_path);
    let me = login.user.clone();
    let device = args.conn.device.clone();
    let mut client = match Client::start(login.config) {
        Ok(client) => client,
        Err(e) => return fail("chat", e),
    };
    let reporter = report_events("chat", client.events());
    eprintln!("-- chatting with {} as {me}; Ctrl-D to quit", args.to);
    let mut lines = stdin_lines();
    let mut sends = JoinSet::new();
    let code = loop {
        tokio::select! {
            line = lines.recv() => match line {
                Some(line) if line.trim().is_empty() => {}
                Some(line) => {
                    let handle = client.handle();
                    let to = args.to.clone();
                    sends.spawn(async move {
                        let body = Bytes::from(line.clone());
                        let outcome = handle.send_with_id(ClientMsgId::generate(), &to, body, "text/plain").await;
                        match outcome {
                            Ok(ack) => println!("[{}] me: {line}", clock(ack.ts_ms)),
                            Err(e) => eprintln!("-- not confirmed: {line:?}: {e}"),
                        }
                    });
                }
                None => break ExitCode::SUCCESS,
            },
            entry = client.recv() => {
                let Some(entry) = entry else {
                    break fail("chat", stop_reason(&client));
                };
                // This device's own sends were already shown when confirmed.
                if !(entry.from == me && entry.from_device == device) {
                    let text = String::from_utf8_lossy(&entry.body);
                    println!("[{}] {}: {text}", clock(entry.ts_ms), entry.from);
                }
                client.ack(entry.seq);
            }
            Some(_) = sends.join_next() => {}
            _ = tokio::signal::ctrl_c() => break ExitCode::SUCCESS,
        }
    };
    // Give sends typed just before Ctrl-D a moment to be confirmed; any that are not
    // stay in the state file and go out with the next run.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while sends.join_next().await.is_some() {}
    })
    .await;
    client.close().await;
    reporter.abort();
    code
}

/// Lines from stdin, read on a plain thread (stdin reads block).
fn stdin_lines() -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel(16);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn entry_line(entry: &Entry) -> EntryLine<'_> {
    let mut line = EntryLine {
        seq: entry.seq,
        id: entry.message_id,
        from: &entry.from,
        from_device: &entry.from_device,
        conversation: &entry.conversation,
        text: String::new(),
        ts: entry.ts_ms,
        kind: "unspecified",
        receipt: None,
        group: None,
    };
    match EntryType::try_from(entry.r#type) {
        Ok(EntryType::Message) => {
            line.kind = "message";
            line.text = String::from_utf8_lossy(&entry.body).into_owned();
        }
        Ok(EntryType::Receipt) => {
            line.kind = "receipt";
            if let Some(r) = receipt_of(entry) {
                let kind = match ReceiptKind::try_from(r.kind) {
                    Ok(ReceiptKind::Delivered) => "delivered",
                    Ok(ReceiptKind::Read) => "read",
                    _ => "unspecified",
                };
                let by = if r.by.is_empty() {
                    "every other member".to_string()
                } else {
                    r.by.clone()
                };
                line.text = format!(
                    "{kind} by {by} up to message {} in {}",
                    r.up_to_message_id, r.conversation
                );
                line.receipt = Some(ReceiptLine {
                    kind,
                    conversation: r.conversation,
                    by: r.by,
                    up_to_message_id: r.up_to_message_id,
                    up_to_seq: r.up_to_seq,
                    unread: r.unread,
                });
            }
        }
        Ok(EntryType::Membership) => {
            line.kind = "membership";
            if let Some(g) = group_event_of(entry) {
                let event = match GroupEventKind::try_from(g.kind) {
                    Ok(GroupEventKind::Created) => "created",
                    Ok(GroupEventKind::Added) => "added",
                    Ok(GroupEventKind::Removed) => "removed",
                    Ok(GroupEventKind::Left) => "left",
                    _ => "unspecified",
                };
                line.text = format!(
                    "{} {event} {} in group {} ({} members, owner {})",
                    g.actor,
                    g.members.join(", "),
                    g.group,
                    g.size,
                    g.owner
                );
                line.group = Some(GroupLine {
                    event,
                    group: g.group,
                    actor: g.actor,
                    members: g.members,
                    owner: g.owner,
                    size: g.size,
                });
            }
        }
        _ => {}
    }
    line
}

fn print_sent(ack: &SendAck) {
    print_json_line(&SentLine {
        id: ack.message_id,
        seq: ack.seq,
        ts: ack.ts_ms,
        client_msg_id: ack.client_msg_id.to_hex(),
    });
}

/// Seconds a one-shot group or conversations command waits for the server.
const ONE_SHOT_TIMEOUT: Duration = Duration::from_secs(30);

/// `tether group ...`: one change (printed as the send line of its membership entry)
/// or one listing (a JSON line per group or member).
pub async fn run_group(args: GroupArgs) -> ExitCode {
    let login = match login(args.op.conn()) {
        Ok(login) => login,
        Err(e) => return fail("group", e),
    };
    note_left_over_sends("group", &login.state_path);
    let client = match Client::start(login.config) {
        Ok(client) => client,
        Err(e) => return fail("group", e),
    };
    let reporter = report_events("group", client.events());
    let work = async {
        match &args.op {
            GroupCmd::Create {
                group,
                members,
                name,
                ..
            } => {
                let m: Vec<&str> = members.iter().map(String::as_str).collect();
                client
                    .group_create(group, name, &m)
                    .await
                    .map(|a| print_sent(&a))
            }
            GroupCmd::Add { group, members, .. } => {
                let m: Vec<&str> = members.iter().map(String::as_str).collect();
                client.group_add(group, &m).await.map(|a| print_sent(&a))
            }
            GroupCmd::Remove { group, members, .. } => {
                let m: Vec<&str> = members.iter().map(String::as_str).collect();
                client.group_remove(group, &m).await.map(|a| print_sent(&a))
            }
            GroupCmd::Leave { group, .. } => {
                client.group_leave(group).await.map(|a| print_sent(&a))
            }
            GroupCmd::List { group: None, .. } => client.groups().await.map(|groups| {
                for g in groups {
                    print_json_line(&serde_json::json!({
                        "group": g.group, "name": g.name, "owner": g.owner, "size": g.size,
                    }));
                }
            }),
            GroupCmd::List {
                group: Some(group), ..
            } => client.group_info(group).await.map(|info| {
                for m in info.members {
                    print_json_line(&serde_json::json!({
                        "user": m.user,
                        "joined_message_id": m.joined_message_id,
                        "delivered_up_to": m.delivered_up_to,
                        "read_up_to": m.read_up_to,
                    }));
                }
            }),
        }
    };
    let code = match tokio::time::timeout(ONE_SHOT_TIMEOUT, work).await {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => fail("group", e),
        Err(_) => {
            eprintln!(
                "tether group: no answer within {}s",
                ONE_SHOT_TIMEOUT.as_secs()
            );
            ExitCode::from(EXIT_TIMEOUT)
        }
    };
    client.close().await;
    reporter.abort();
    code
}

/// `tether conversations`: a JSON line per conversation.
pub async fn run_conversations(args: ConversationsArgs) -> ExitCode {
    let login = match login(&args.conn) {
        Ok(login) => login,
        Err(e) => return fail("conversations", e),
    };
    let client = match Client::start(login.config) {
        Ok(client) => client,
        Err(e) => return fail("conversations", e),
    };
    let reporter = report_events("conversations", client.events());
    let code = match tokio::time::timeout(ONE_SHOT_TIMEOUT, client.conversations()).await {
        Ok(Ok(list)) => {
            for c in list {
                print_json_line(&serde_json::json!({
                    "conversation": c.id,
                    "last_seq": c.last_seq,
                    "last_ts": c.last_ts_ms,
                    "unread": c.unread,
                    "read_up_to": c.read_up_to,
                }));
            }
            ExitCode::SUCCESS
        }
        Ok(Err(e)) => fail("conversations", e),
        Err(_) => {
            eprintln!(
                "tether conversations: no answer within {}s",
                ONE_SHOT_TIMEOUT.as_secs()
            );
            ExitCode::from(EXIT_TIMEOUT)
        }
    };
    client.close().await;
    reporter.abort();
    code
}

fn print_json_line(value: &impl Serialize) {
    let mut out = std::io::stdout().lock();
    // Plain structs always serialize.
    let line = serde_json::to_string(value).unwrap_or_default();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// `HH:MM:SS` (UTC) of a timestamp in ms since the Unix epoch.
fn clock(ts_ms: u64) -> String {
    let day_secs = (ts_ms / 1000) % 86_400;
    format!(
        "{:02}:{:02}:{:02}",
        day_secs / 3600,
        (day_secs / 60) % 60,
        day_secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_formats_utc_time_of_day() {
        assert_eq!(clock(0), "00:00:00");
        assert_eq!(clock(1_700_000_000_000), "22:13:20");
    }

    #[test]
    fn state_file_names_stay_inside_the_state_dir() {
        assert_eq!(file_safe("../evil/x"), ".._evil_x");
        assert_eq!(file_safe("alice"), "alice");
    }

    #[test]
    fn entry_lines_have_the_documented_fields() {
        let entry = Entry {
            seq: 3,
            message_id: 9,
            from: "bob".into(),
            from_device: "cli".into(),
            conversation: "bob".into(),
            body: Bytes::from_static(b"hi \xff"),
            content_type: "text/plain".into(),
            ts_ms: 5,
            r#type: EntryType::Message as i32,
            incoming: 1,
        };
        let json = serde_json::to_string(&entry_line(&entry)).unwrap();
        assert_eq!(
            json,
            r#"{"seq":3,"id":9,"from":"bob","from_device":"cli","conversation":"bob","text":"hi �","ts":5,"type":"message"}"#
        );
    }
}
