//! The TLS 1.3 record layer of a server session once its handshake is over (RFC 8446
//! §5): rustls runs the handshake and keeps the key schedule, through its kernel-TLS
//! interface ([`rustls::kernel`]), and records are sealed and opened here with ring's
//! AEADs.
//!
//! This exists for memory. A rustls connection keeps, for its whole life, two
//! expanded AEAD keys (560 B each with ring), its deframer and record-layer state and
//! the handshake's leftovers: about 2.4 KB of the 3.4 KB a TLS session cost. Here a
//! direction is its traffic key, IV and sequence number, about 60 B; the expanded key
//! is built on the stack for each batch of records, which costs well under a
//! microsecond against the tens of microseconds of the system calls around it.
//!
//! What rustls's own record layer does and this one must too: per-record nonces from
//! the IV and the sequence number, the inner content type and its padding, alerts
//! (close_notify ends the stream; any other alert is an error), KeyUpdate in both
//! directions (answering a peer's request), and a new send key before the cipher
//! suite's confidentiality limit. Anything else after the handshake (a
//! change_cipher_spec record, an unknown content type, another handshake message, a
//! record over 2^14 + 256 bytes, one that fails authentication) is an error that ends
//! the session.
//!
//! rustls sees the handshake one record at a time and stops at the client's Finished
//! (`LeanTlsStream::accept`), so whatever came in the same read is handled here.
//!
//! Known gap, ending only the session that hits it: a KeyUpdate split across records
//! is refused (RFC 8446 allows it; implementations do not split 5 bytes).

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::ConnectionTrafficSecrets;
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use std::io;

/// Most plaintext one record carries (RFC 8446 §5.1).
pub(crate) const MAX_PLAINTEXT: usize = 1 << 14;
/// Most ciphertext one record carries (RFC 8446 §5.2).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// Record header: type, legacy version, length.
pub(crate) const HEADER: usize = 5;
const TAG: usize = 16;

const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const KEY_UPDATE: u8 = 24;
const CLOSE_NOTIFY: u8 = 0;
const USER_CANCELED: u8 = 90;

// Alerts this side sends before it ends a session (RFC 8446 §6.2).
const UNEXPECTED_MESSAGE: u8 = 10;
const BAD_RECORD_MAC: u8 = 20;
const RECORD_OVERFLOW: u8 = 22;
const DECODE_ERROR: u8 = 50;

/// Records in a row that carry no application data (empty ones, KeyUpdates) before
/// the peer counts as abusive, as in rustls.
const MAX_EMPTY_RECORDS: u8 = 32;

fn tls_err(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {what}"))
}

/// What ends a session while reading: the alert owed to the peer, and why.
struct Fatal(u8, String);

fn fatal(alert: u8, what: impl std::fmt::Display) -> Fatal {
    Fatal(alert, what.to_string())
}

/// One direction's traffic key and where its record sequence is.
struct Direction {
    seq: u64,
    secrets: ConnectionTrafficSecrets,
}

/// The expanded key and IV of a direction, for a batch of records.
struct Keys {
    key: LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
}

impl Direction {
    fn keys(&self) -> io::Result<Keys> {
        let (algorithm, key, iv) = match &self.secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => {
                return Err(tls_err(
                    "a cipher suite this record layer does not implement",
                ));
            }
        };
        let key = UnboundKey::new(algorithm, key.as_ref())
            .map_err(|_| tls_err("a traffic key of the wrong length"))?;
        let iv: [u8; aead::NONCE_LEN] = iv
            .as_ref()
            .try_into()
            .map_err(|_| tls_err("an IV of the wrong length"))?;
        Ok(Keys {
            key: LessSafeKey::new(key),
            iv,
        })
    }

    /// The nonce of the next record (RFC 8446 §5.3); the sequence moves on.
    fn next_nonce(&mut self, iv: &[u8; aead::NONCE_LEN]) -> io::Result<Nonce> {
        let mut nonce = *iv;
        for (n, s) in nonce[aead::NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *n ^= s;
        }
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or_else(|| tls_err("record sequence number exhausted"))?;
        Ok(Nonce::assume_unique_for_key(nonce))
    }
}

/// A TLS 1.3 server session's record layer after the handshake.
pub(crate) struct OwnRecords {
    kernel: KernelConnection<ServerConnectionData>,
    rx: Direction,
    tx: Direction,
    /// Records one send key may seal: the suite's confidentiality limit, less one for
    /// the KeyUpdate that replaces the key.
    tx_limit: u64,
    /// Records in a row that carried no application data.
    empty_in_a_row: u8,
    /// A close_notify has been sealed: nothing more is.
    closed: bool,
}

impl OwnRecords {
    /// Takes over from a rustls connection whose TLS 1.3 handshake is complete and
    /// that has nothing left to send.
    pub(crate) fn new(conn: rustls::server::UnbufferedServerConnection) -> io::Result<Self> {
        let limit = conn
            .negotiated_cipher_suite()
            .and_then(|s| s.tls13())
            .map(|s| s.common.confidentiality_limit)
            .ok_or_else(|| tls_err("not a TLS 1.3 session"))?;
        let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(tls_err)?;
        let (rx_seq, rx) = secrets.rx;
        let (tx_seq, tx) = secrets.tx;
        Ok(Self {
            kernel,
            rx: Direction {
                seq: rx_seq,
                secrets: rx,
            },
            tx: Direction {
                seq: tx_seq,
                secrets: tx,
            },
            tx_limit: limit.saturating_sub(1).max(1),
            empty_in_a_row: 0,
            closed: false,
        })
    }

    /// Lowers the confidentiality limit, so tests can see the key change.
    #[cfg(test)]
    pub(crate) fn set_tx_limit(&mut self, records: u64) {
        self.tx_limit = records.max(1);
    }

    /// Records sealed under the current send key.
    #[cfg(test)]
    pub(crate) fn tx_seq(&self) -> u64 {
        self.tx.seq
    }

    /// Seals `data` as application data records appended to `out`.
    pub(crate) fn seal(&mut self, data: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        self.seal_as(APPLICATION_DATA, data, out)
    }

    /// Appends a close_notify alert to `out`, once; nothing is sealed after it.
    pub(crate) fn close_notify(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        if self.closed {
            return Ok(());
        }
        // Level warning (1), description close_notify (0).
        self.seal_as(ALERT, &[1, CLOSE_NOTIFY], out)?;
        self.closed = true;
        Ok(())
    }

    fn seal_as(&mut self, kind: u8, data: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        if self.closed {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "TLS: the session was closed",
            ));
        }
        let mut keys = self.tx.keys()?;
        out.reserve(data.len() + data.len().div_ceil(MAX_PLAINTEXT) * (HEADER + 1 + TAG));
        for chunk in data.chunks(MAX_PLAINTEXT) {
            if self.tx.seq >= self.tx_limit {
                // The key has sealed all it may: announce a new one under it, then
                // switch (RFC 8446 §4.6.3, §5.5).
                seal_record(
                    &mut self.tx,
                    &keys,
                    HANDSHAKE,
                    &[KEY_UPDATE, 0, 0, 1, 0],
                    out,
                )?;
                self.rotate_tx()?;
                keys = self.tx.keys()?;
            }
            seal_record(&mut self.tx, &keys, kind, chunk, out)?;
        }
        Ok(())
    }

    fn rotate_tx(&mut self) -> io::Result<()> {
        let (seq, secrets) = self.kernel.update_tx_secret().map_err(tls_err)?;
        self.tx = Direction { seq, secrets };
        Ok(())
    }

    /// Opens the complete records at the front of `buf[..have]` in place and moves
    /// their application data to the front; returns (plaintext length, bytes
    /// consumed). Whatever the peer is owed (a KeyUpdate answer, or the fatal alert
    /// before an error) is sealed into `out`; a close_notify sets `eof` and ends the
    /// reading there.
    pub(crate) fn open(
        &mut self,
        buf: &mut [u8],
        have: usize,
        out: &mut Vec<u8>,
        eof: &mut bool,
    ) -> io::Result<(usize, usize)> {
        self.open_records(buf, have, out, eof)
            .map_err(|Fatal(alert, why)| {
                // Level fatal (2). Best effort: the session ends either way.
                if !self.closed {
                    let _ = self.seal_as(ALERT, &[2, alert], out);
                    self.closed = true;
                }
                tls_err(why)
            })
    }

    fn open_records(
        &mut self,
        buf: &mut [u8],
        have: usize,
        out: &mut Vec<u8>,
        eof: &mut bool,
    ) -> Result<(usize, usize), Fatal> {
        let internal = |e: io::Error| fatal(UNEXPECTED_MESSAGE, e);
        let mut keys: Option<Keys> = None;
        let mut pos = 0;
        let mut plain = 0;
        while have - pos >= HEADER {
            let header: [u8; HEADER] = buf[pos..pos + HEADER].try_into().expect("five bytes");
            let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            if header[0] != APPLICATION_DATA {
                return Err(fatal(
                    UNEXPECTED_MESSAGE,
                    format!("a record of type {} after the handshake", header[0]),
                ));
            }
            if len > MAX_CIPHERTEXT {
                return Err(fatal(RECORD_OVERFLOW, format!("a record of {len} bytes")));
            }
            if len < TAG + 1 {
                return Err(fatal(DECODE_ERROR, format!("a record of {len} bytes")));
            }
            if have - pos < HEADER + len {
                break;
            }
            if keys.is_none() {
                keys = Some(self.rx.keys().map_err(internal)?);
            }
            let k = keys.as_ref().expect("just set");
            let nonce = self.rx.next_nonce(&k.iv).map_err(internal)?;
            let body = pos + HEADER;
            let opened = k
                .key
                .open_in_place(nonce, Aad::from(header), &mut buf[body..body + len])
                .map_err(|_| {
                    fatal(
                        BAD_RECORD_MAC,
                        "a record failed authentication (bad_record_mac)",
                    )
                })?;
            // The inner content type is the last byte that is not padding.
            let end = opened
                .iter()
                .rposition(|&b| b != 0)
                .ok_or_else(|| fatal(UNEXPECTED_MESSAGE, "a record with no content type"))?;
            if end > MAX_PLAINTEXT {
                return Err(fatal(
                    RECORD_OVERFLOW,
                    format!("a record with {end} bytes of plaintext"),
                ));
            }
            let kind = opened[end];
            pos = body + len;
            if kind == APPLICATION_DATA && end > 0 {
                self.empty_in_a_row = 0;
            } else {
                self.empty_in_a_row += 1;
                if self.empty_in_a_row > MAX_EMPTY_RECORDS {
                    return Err(fatal(
                        UNEXPECTED_MESSAGE,
                        format!("more than {MAX_EMPTY_RECORDS} records in a row without data"),
                    ));
                }
            }
            match kind {
                APPLICATION_DATA => {
                    // The plaintext lies past everything already moved to the front.
                    buf.copy_within(body..body + end, plain);
                    plain += end;
                }
                ALERT => match buf[body..body + end] {
                    [_, CLOSE_NOTIFY] => {
                        *eof = true;
                        return Ok((plain, pos));
                    }
                    // A warning that the peer is giving up; its close_notify follows.
                    [_, USER_CANCELED] => {}
                    ref alert => {
                        return Err(fatal(
                            UNEXPECTED_MESSAGE,
                            format!("the peer sent alert {alert:?}"),
                        ));
                    }
                },
                HANDSHAKE => {
                    let requested = key_update(&buf[body..body + end])?;
                    let (seq, secrets) = self
                        .kernel
                        .update_rx_secret()
                        .map_err(|e| fatal(UNEXPECTED_MESSAGE, e))?;
                    self.rx = Direction { seq, secrets };
                    keys = None;
                    if requested {
                        // Answer under the old key, then change it (RFC 8446 §4.6.3).
                        let tx_keys = self.tx.keys().map_err(internal)?;
                        seal_record(
                            &mut self.tx,
                            &tx_keys,
                            HANDSHAKE,
                            &[KEY_UPDATE, 0, 0, 1, 0],
                            out,
                        )
                        .map_err(internal)?;
                        self.rotate_tx().map_err(internal)?;
                    }
                }
                other => {
                    return Err(fatal(
                        UNEXPECTED_MESSAGE,
                        format!("an inner content type {other} after the handshake"),
                    ));
                }
            }
        }
        Ok((plain, pos))
    }
}

/// Parses a record's handshake content, which must be exactly one KeyUpdate; returns
/// whether the peer asked for ours. (RFC 8446 lets a handshake message span records;
/// no implementation splits a 5-byte KeyUpdate, and this one refuses it.)
fn key_update(content: &[u8]) -> Result<bool, Fatal> {
    match content {
        [KEY_UPDATE, 0, 0, 1, request @ (0 | 1)] => Ok(*request == 1),
        [KEY_UPDATE, ..] => Err(fatal(DECODE_ERROR, "a malformed KeyUpdate")),
        [kind, ..] => Err(fatal(
            UNEXPECTED_MESSAGE,
            format!("handshake message type {kind} after the handshake"),
        )),
        [] => Err(fatal(UNEXPECTED_MESSAGE, "an empty handshake record")),
    }
}

/// Appends one sealed record of `kind` carrying `data` (at most [`MAX_PLAINTEXT`]).
fn seal_record(
    tx: &mut Direction,
    keys: &Keys,
    kind: u8,
    data: &[u8],
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let len = data.len() + 1 + TAG;
    let [hi, lo] = u16::try_from(len)
        .map_err(|_| tls_err("record too large"))?
        .to_be_bytes();
    let header = [APPLICATION_DATA, 3, 3, hi, lo];
    out.extend_from_slice(&header);
    let start = out.len();
    out.extend_from_slice(data);
    out.push(kind);
    let nonce = tx.next_nonce(&keys.iv)?;
    let tag = keys
        .key
        .seal_in_place_separate_tag(nonce, Aad::from(header), &mut out[start..])
        .map_err(|_| tls_err("sealing a record failed"))?;
    out.extend_from_slice(tag.as_ref());
    Ok(())
}
