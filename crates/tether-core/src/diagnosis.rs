//! Why a heartbeat failed, from the kernel's view of the socket (DESIGN §4).
//!
//! When no PONG came, TCP_INFO tells the two failures apart: if the peer's kernel
//! acknowledged every byte we sent (our PINGs included) the path works and the server
//! application is stuck: **server unresponsive** (prefer another server). If bytes are
//! still unacknowledged and being retransmitted, the path is gone: **network dead**.
//! Without TCP_INFO (QUIC, browsers, behind an L7 proxy) the answer is **unknown**.

/// The fields of Linux `struct tcp_info` the diagnosis needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpSnapshot {
    /// Segments sent and not yet acknowledged (`tcpi_unacked`).
    pub unacked: u32,
    /// Retransmissions of the current unacknowledged data (`tcpi_retransmits`).
    pub retransmits: u8,
    /// Retransmissions over the connection's life (`tcpi_total_retrans`).
    pub total_retrans: u32,
    /// Milliseconds since the last ACK was received (`tcpi_last_ack_recv`).
    pub last_ack_recv_ms: u32,
    /// The kernel's smoothed round-trip time, µs (`tcpi_rtt`).
    pub rtt_us: u32,
}

/// The verdict on a failed heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Diagnosis {
    /// Our bytes reached the server's kernel but its application did not answer.
    ServerUnresponsive,
    /// Our bytes are not acknowledged and are being retransmitted.
    NetworkDead,
    /// No socket information, or nothing conclusive.
    Unknown,
}

/// Classifies a heartbeat failure from the socket's state at that moment.
pub fn classify(snapshot: Option<TcpSnapshot>) -> Diagnosis {
    match snapshot {
        None => Diagnosis::Unknown,
        Some(s) if s.unacked == 0 => Diagnosis::ServerUnresponsive,
        Some(s) if s.retransmits > 0 || s.total_retrans > 0 => Diagnosis::NetworkDead,
        Some(_) => Diagnosis::Unknown,
    }
}

/// The server's verdict on a client that stayed silent for `silent_ms`. An idle server
/// has usually sent nothing, so "nothing unacknowledged" proves little: the client is
/// called unresponsive only if its kernel ACKed something within the silence.
pub fn classify_silent_peer(snapshot: Option<TcpSnapshot>, silent_ms: u64) -> Diagnosis {
    match snapshot {
        Some(s) if s.unacked == 0 && u64::from(s.last_ack_recv_ms) < silent_ms => {
            Diagnosis::ServerUnresponsive
        }
        Some(s) if s.unacked > 0 && (s.retransmits > 0 || s.total_retrans > 0) => {
            Diagnosis::NetworkDead
        }
        _ => Diagnosis::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Shapes of real TCP_INFO readings: a SIGSTOPped server on loopback reads
    // unacked 0 (its kernel ACKs our PINGs; the stalled-server e2e test gets this
    // verdict from a live socket); a blackholed path reads unacked > 0 with the RTO
    // retransmitting (the real network-dead case is recorded in the NAT lab, issue 4).

    #[test]
    fn everything_acked_but_no_pong_is_a_stalled_server() {
        // SIGSTOPped server on loopback: the PINGs were ACKed by its kernel.
        let s = TcpSnapshot {
            unacked: 0,
            retransmits: 0,
            total_retrans: 0,
            last_ack_recv_ms: 1_480,
            rtt_us: 0,
        };
        assert_eq!(classify(Some(s)), Diagnosis::ServerUnresponsive);
    }

    #[test]
    fn unacknowledged_retransmitted_pings_are_a_dead_network() {
        // Blackholed path (NAT mapping gone): two PINGs outstanding, RTO backoff running.
        let s = TcpSnapshot {
            unacked: 2,
            retransmits: 3,
            total_retrans: 5,
            last_ack_recv_ms: 14_200,
            rtt_us: 0,
        };
        assert_eq!(classify(Some(s)), Diagnosis::NetworkDead);
    }

    #[test]
    fn unacknowledged_without_retransmission_yet_is_unknown() {
        let s = TcpSnapshot {
            unacked: 1,
            retransmits: 0,
            total_retrans: 0,
            last_ack_recv_ms: 30,
            rtt_us: 0,
        };
        assert_eq!(classify(Some(s)), Diagnosis::Unknown);
    }

    #[test]
    fn the_server_calls_a_quiet_client_unresponsive_only_if_its_kernel_acked_lately() {
        let quiet = TcpSnapshot {
            unacked: 0,
            retransmits: 0,
            total_retrans: 0,
            last_ack_recv_ms: 46_000,
            rtt_us: 0,
        };
        assert_eq!(
            classify_silent_peer(Some(quiet), 45_000),
            Diagnosis::Unknown
        );
        let acked = TcpSnapshot {
            last_ack_recv_ms: 2_000,
            ..quiet
        };
        assert_eq!(
            classify_silent_peer(Some(acked), 45_000),
            Diagnosis::ServerUnresponsive
        );
    }

    #[test]
    fn no_tcp_info_is_unknown() {
        assert_eq!(classify(None), Diagnosis::Unknown);
    }
}
