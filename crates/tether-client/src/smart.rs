//! The smart heartbeat in the SDK (DESIGN §5): the driver feeds tether-core's
//! [`SmartHeartbeat`] with real probes and runs the main connection at its interval.
//!
//! Two ways to test a candidate interval ([`ProbeMode`]):
//! - **Side** (default): a second connection with `HELLO.probe` stays silent for the
//!   candidate, then PINGs ([`side_probe`]). The main connection keeps running at the
//!   known-good interval, so learning never costs it. **Attribution rule:** a probe
//!   fails only if its PING was never ACKed by the server's kernel (TCP_INFO
//!   `unacked > 0` after the pong timeout) while the main connection answered in the
//!   same period. So the main connection PINGs at the moment the probe does, and must
//!   have its PONG within the probe's pong timeout: both face the same network at the
//!   same time. Anything else (loss that TCP could not repair in time, an outage that
//!   swallowed both PINGs, a server that ACKs but does not answer) is discarded.
//! - **Main**: the main connection itself runs at the candidate (as Mars does). A PONG
//!   after a full idle is a success; the link dying of *network dead* on the first
//!   PING after a full idle is a failure, and costs a reconnect.
//!
//! In both modes, a main link that dies of *network dead* on its first PING after a
//! full idle at the learned interval steps the interval down at once
//! ([`SmartHeartbeat::on_main_failure`]).

use crate::connector::Connector;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_proto::{Frame, frame, pb};
use tether_transport::{flush, recv};

pub use tether_core::smart::{
    NetworkKey, NetworkState, Phase, ProbeOutcome, SmartConfig, SmartEvent, SmartEventKind,
    SmartHeartbeat,
};

/// Where candidate intervals are tested.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProbeMode {
    /// On a side connection (`HELLO.probe`); the main connection is never risked.
    #[default]
    Side,
    /// On the main connection; a failed probe costs a reconnect.
    Main,
}

/// Smart heartbeat settings of a client.
#[derive(Debug, Clone, Default)]
pub struct SmartSettings {
    /// The search.
    pub config: SmartConfig,
    /// Where candidates are tested.
    pub probe: ProbeMode,
}

/// A PING counts as following a full idle if the silence before it was at least this
/// share of the interval in force (received frames shorten the NAT's idle time too).
pub(crate) const FULL_IDLE: f64 = 0.95;

/// What a side probe reports, before the attribution rule.
#[derive(Debug)]
pub(crate) enum SideResult {
    /// Its PING leaves now (sent before the PING, so the main link can PING along).
    PingLeaving,
    /// The PING after `idle` of silence was answered after `rtt`.
    Answered { idle: Duration, rtt: Duration },
    /// The PING after `idle` was still unacknowledged by the server's kernel a pong
    /// timeout after it left at `ping_at`.
    Unacked { idle: Duration, ping_at: Instant },
    /// Nothing can be learned (connect failed, server refused, kernel ACKed but no PONG).
    Inconclusive(String),
}

/// One side probe to run.
pub(crate) struct SideProbe {
    /// Where to announce that the PING leaves ([`SideResult::PingLeaving`]).
    pub report: tokio::sync::mpsc::Sender<(u64, SideResult)>,
    pub generation: u64,
    pub connector: Arc<dyn Connector>,
    pub server: String,
    pub hello: pb::Hello,
    pub candidate: Duration,
    pub pong_timeout: Duration,
    pub connect_timeout: Duration,
}

/// Opens a probe session, stays silent for `candidate`, PINGs, and reports.
pub(crate) async fn side_probe(p: SideProbe) -> SideResult {
    use SideResult::Inconclusive;
    let SideProbe {
        report,
        generation,
        connector,
        server,
        hello,
        candidate,
        pong_timeout,
        connect_timeout,
    } = p;
    let mut t = match tokio::time::timeout(connect_timeout, connector.connect_probe(&server)).await
    {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return Inconclusive(format!("connect: {e}")),
        Err(_) => return Inconclusive("connect timed out".into()),
    };
    let welcome = async {
        t.send(&Frame::Hello(hello)).map_err(|e| e.to_string())?;
        flush(&mut t).await.map_err(|e| e.to_string())?;
        match recv(&mut t).await {
            Ok(Some(raw)) => frame::from_raw(&raw).map_err(|e| e.to_string()),
            Ok(None) => Err("closed before WELCOME".to_string()),
            Err(e) => Err(e.to_string()),
        }
    };
    match tokio::time::timeout(connect_timeout, welcome).await {
        Ok(Ok(Frame::Welcome(w))) if w.probe => {}
        Ok(Ok(Frame::Error(e))) => return Inconclusive(format!("refused: {}", e.reason)),
        Ok(Ok(other)) => return Inconclusive(format!("unexpected reply {other:?}")),
        Ok(Err(e)) => return Inconclusive(e),
        Err(_) => return Inconclusive("no WELCOME in time".into()),
    }
    // The client kernel's ACK of WELCOME is the flow's last packet through the NAT.
    let quiet_from = Instant::now();
    // Nothing may arrive while silent; if something does, the idle was not full.
    match tokio::time::timeout(candidate, recv(&mut t)).await {
        Err(_) => {}
        Ok(Ok(Some(_))) => return Inconclusive("the server sent something on a probe".into()),
        Ok(Ok(None)) => return Inconclusive("the server closed the probe".into()),
        Ok(Err(e)) => return Inconclusive(format!("probe connection failed while idle: {e}")),
    }
    let _ = report.try_send((generation, SideResult::PingLeaving));
    let ping_at = Instant::now();
    let idle = ping_at - quiet_from;
    if let Err(e) = t.send(&Frame::Ping(pb::Ping::default())) {
        return Inconclusive(e.to_string());
    }
    let answered = async {
        flush(&mut t).await?;
        Ok::<bool, tether_transport::TransportError>(loop {
            match recv(&mut t).await? {
                Some(raw) if matches!(frame::from_raw(&raw), Ok(Frame::Pong(_))) => break true,
                Some(_) => continue,
                None => break false,
            }
        })
    };
    let outcome = tokio::time::timeout(pong_timeout, answered).await;
    let snapshot = t.tcp_snapshot();
    t.shutdown();
    match outcome {
        Ok(Ok(true)) => SideResult::Answered {
            idle,
            rtt: ping_at.elapsed(),
        },
        Ok(Ok(false)) => Inconclusive("the server closed the probe before answering".into()),
        Ok(Err(e)) => Inconclusive(format!("probe connection failed: {e}")),
        Err(_) => match snapshot {
            Some(s) if s.unacked > 0 => SideResult::Unacked { idle, ping_at },
            Some(_) => Inconclusive("the server's kernel ACKed the PING but no PONG came".into()),
            None => Inconclusive("no PONG and no TCP_INFO to tell why".into()),
        },
    }
}
