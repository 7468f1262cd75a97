//! The send-side QoS rule, without I/O: every send is kept, in order, with its client
//! message id, until the server confirms it.
//!
//! An item goes through three states, each a prefix of the queue (sends leave in
//! order, and become durable in order):
//!
//! ```text
//! [ sent on this connection | durable, waiting | not yet persisted ]
//!   0 .. sent                 sent .. durable    durable .. len
//! ```
//!
//! An item may leave only once it is durable (persisted in the state file, when there
//! is one). After a reconnect every item counts as unsent again, so all of them are
//! resent in their original order before anything newer. The number sent and not
//! confirmed is capped by the caller (`max_in_flight`).

use crate::state::{ClientMsgId, PendingSend};
use std::collections::VecDeque;

/// One unconfirmed send and whoever waits for its outcome (`W`, e.g. a oneshot sender;
/// `None` for sends restored from the state file).
#[derive(Debug)]
pub struct OutboxItem<W> {
    /// What to send.
    pub send: PendingSend,
    /// Who waits for the SEND_ACK.
    pub waiter: Option<W>,
}

/// Unconfirmed sends in their original order.
#[derive(Debug)]
pub struct Outbox<W> {
    items: VecDeque<OutboxItem<W>>,
    /// Items `..sent` were sent on the current connection.
    sent: usize,
    /// Items `..durable` are persisted and may leave.
    durable: usize,
}

impl<W> Default for Outbox<W> {
    fn default() -> Self {
        Self {
            items: VecDeque::new(),
            sent: 0,
            durable: 0,
        }
    }
}

impl<W> Outbox<W> {
    /// Sends restored from the state file: already durable, nobody waits for them.
    pub fn restored(sends: Vec<PendingSend>) -> Self {
        let items: VecDeque<_> = sends
            .into_iter()
            .map(|send| OutboxItem { send, waiter: None })
            .collect();
        let durable = items.len();
        Self {
            items,
            sent: 0,
            durable,
        }
    }

    /// Number of unconfirmed sends.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when every send is confirmed.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Sent on this connection and not confirmed yet.
    pub fn in_flight(&self) -> usize {
        self.sent
    }

    /// True when some items are not persisted yet.
    pub fn has_non_durable(&self) -> bool {
        self.durable < self.items.len()
    }

    /// Whether an item with this id is queued.
    pub fn contains(&self, id: &ClientMsgId) -> bool {
        self.items.iter().any(|i| i.send.client_msg_id == *id)
    }

    /// Appends a new send (not durable yet).
    pub fn push(&mut self, send: PendingSend, waiter: Option<W>) {
        self.items.push_back(OutboxItem { send, waiter });
    }

    /// Every item, oldest first (for the state file).
    pub fn iter(&self) -> impl Iterator<Item = &PendingSend> {
        self.items.iter().map(|i| &i.send)
    }

    /// The state file now holds every item: all may leave.
    pub fn mark_all_durable(&mut self) {
        self.durable = self.items.len();
    }

    /// Persisting failed: removes the items that were never persisted (they must not
    /// leave), so their waiters can be told.
    pub fn take_non_durable(&mut self) -> Vec<OutboxItem<W>> {
        self.items.drain(self.durable..).collect()
    }

    /// A new connection: every item must be sent again, from the oldest.
    pub fn restart(&mut self) {
        self.sent = 0;
    }

    /// The next item to send on this connection, if one is durable and fewer than
    /// `max_in_flight` are unconfirmed. Counts it as sent.
    pub fn next_to_send(&mut self, max_in_flight: usize) -> Option<&PendingSend> {
        if self.sent >= self.durable || self.sent >= max_in_flight {
            return None;
        }
        self.sent += 1;
        self.items.get(self.sent - 1).map(|i| &i.send)
    }

    /// The server answered this send (SEND_ACK or a rejection): removes and returns it.
    pub fn remove(&mut self, id: &ClientMsgId) -> Option<OutboxItem<W>> {
        let index = self
            .items
            .iter()
            .position(|i| i.send.client_msg_id == *id)?;
        if index < self.sent {
            self.sent -= 1;
        }
        if index < self.durable {
            self.durable -= 1;
        }
        self.items.remove(index)
    }

    /// Empties the outbox (the client stops), returning every item.
    pub fn drain(&mut self) -> Vec<OutboxItem<W>> {
        self.sent = 0;
        self.durable = 0;
        self.items.drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn send(n: u8) -> PendingSend {
        PendingSend {
            client_msg_id: ClientMsgId([n; 16]),
            to: "bob".into(),
            body: Bytes::from(vec![n]),
            content_type: String::new(),
        }
    }

    fn drain_sendable(o: &mut Outbox<()>, cap: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(s) = o.next_to_send(cap) {
            out.push(s.client_msg_id.0[0]);
        }
        out
    }

    #[test]
    fn nothing_leaves_before_it_is_durable() {
        let mut o = Outbox::<()>::default();
        o.push(send(1), None);
        assert_eq!(drain_sendable(&mut o, 10), Vec::<u8>::new());
        o.mark_all_durable();
        assert_eq!(drain_sendable(&mut o, 10), vec![1]);
    }

    #[test]
    fn after_reconnect_all_unconfirmed_sends_go_again_in_original_order_before_new_ones() {
        let mut o = Outbox::<()>::restored(vec![send(1), send(2)]);
        o.push(send(3), None);
        o.push(send(4), None);
        o.mark_all_durable();
        assert_eq!(drain_sendable(&mut o, 10), vec![1, 2, 3, 4]);
        assert!(o.remove(&ClientMsgId([2; 16])).is_some());
        o.push(send(5), None);
        o.mark_all_durable();
        o.restart();
        assert_eq!(drain_sendable(&mut o, 10), vec![1, 3, 4, 5]);
    }

    #[test]
    fn in_flight_is_capped_and_confirmations_reopen_it_in_order() {
        let mut o = Outbox::<()>::default();
        for n in 1..=5 {
            o.push(send(n), None);
        }
        o.mark_all_durable();
        assert_eq!(drain_sendable(&mut o, 2), vec![1, 2]);
        assert_eq!(o.in_flight(), 2);
        o.remove(&ClientMsgId([1; 16]));
        assert_eq!(drain_sendable(&mut o, 2), vec![3]);
        o.remove(&ClientMsgId([3; 16]));
        o.remove(&ClientMsgId([2; 16]));
        assert_eq!(drain_sendable(&mut o, 2), vec![4, 5]);
    }

    #[test]
    fn a_failed_persist_removes_only_the_items_never_persisted() {
        let mut o = Outbox::<()>::restored(vec![send(1)]);
        o.push(send(2), None);
        let failed: Vec<u8> = o
            .take_non_durable()
            .into_iter()
            .map(|i| i.send.client_msg_id.0[0])
            .collect();
        assert_eq!(failed, vec![2]);
        assert_eq!(drain_sendable(&mut o, 10), vec![1]);
    }

    #[test]
    fn unknown_confirmation_changes_nothing() {
        let mut o = Outbox::<()>::restored(vec![send(1)]);
        assert!(o.remove(&ClientMsgId([9; 16])).is_none());
        assert_eq!(o.len(), 1);
    }
}
