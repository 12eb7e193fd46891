//! Connections between simulated nodes: dialling with backoff, the sessions on both ends,
//! frames on the simulated links, timers, idle closes, and the wire check.

use super::{Blocked, Conn, Event, IDLE_TIMEOUT_MS, World, local_time};
use crate::Violation;
use crate::check;
use crate::network::transmit;
use crate::scenario::{Invariant, LinkSpec};
use caremesh_sync::policy::Recipient;
use caremesh_sync::wire::{FrameDecoder, Message};
use caremesh_sync::{Event as SessionEvent, OrgKind, Session, SessionError};
use std::cmp::Reverse;

/// Bytes a connection direction may have in flight before the session is asked for more.
const WINDOW_BYTES: u64 = 1 << 20;
/// Redial backoff, as in `node::network`: doubling from 1 s to 60 s, with jitter.
const DIAL_BACKOFF_MIN_MS: u64 = 1_000;
const DIAL_BACKOFF_MAX_MS: u64 = 60_000;

impl World {
    pub(super) fn dial(&mut self, node: usize, peer: usize, life: u64) {
        if self.nodes[node].life != life || self.nodes[node].host.is_none() {
            return;
        }
        let pair = (node.min(peer), node.max(peer));
        if self.pairs.contains_key(&pair) {
            return;
        }
        let now = self.now();
        if self.nodes[peer].host.is_some() && self.links.blocked(node, peer) == Blocked::No {
            let rtt = 2 * self.link_between(node, peer).latency_ms;
            self.schedule(now + rtt.max(1), Event::Established { node, peer, life });
        } else {
            self.redial(node, peer);
        }
    }

    pub(super) fn redial(&mut self, node: usize, peer: usize) {
        let attempt = self.nodes[node].dial_attempts.entry(peer).or_insert(0);
        *attempt += 1;
        let backoff = (DIAL_BACKOFF_MIN_MS << (*attempt).min(6)).min(DIAL_BACKOFF_MAX_MS);
        let jitter = self.rng.below(backoff / 2 + 1);
        let life = self.nodes[node].life;
        self.schedule(
            self.now() + backoff / 2 + jitter,
            Event::Dial { node, peer, life },
        );
    }

    pub(super) fn establish(&mut self, node: usize, peer: usize, life: u64) {
        if self.nodes[node].life != life || self.nodes[node].host.is_none() {
            return;
        }
        let pair = (node.min(peer), node.max(peer));
        let now = self.now();
        if self.pairs.contains_key(&pair) {
            return;
        }
        if self.nodes[peer].host.is_none() || self.links.blocked(node, peer) != Blocked::No {
            self.redial(node, peer);
            return;
        }
        let mut open = |local: usize, remote: usize| -> Option<Session> {
            let remote_node = &self.nodes[remote];
            let recipient = Recipient {
                ods: remote_node.ods.clone(),
                kind: remote_node.kind,
            };
            let local_node = &mut self.nodes[local];
            let local_ms = local_time(now, local_node.skew_ms);
            let host = local_node.host.as_mut()?;
            Session::new(local_node.ods.clone(), recipient, local_ms, host).ok()
        };
        let (Some(a), Some(b)) = (open(node, peer), open(peer, node)) else {
            self.redial(node, peer);
            return;
        };
        let id = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(
            id,
            Conn {
                ends: [node, peer],
                sessions: [a, b],
                in_flight: [0, 0],
                next_free_ms: [now, now],
                last_arrival_ms: [now, now],
                held: [Vec::new(), Vec::new()],
                timer: [None, None],
                last_delivery_ms: now,
            },
        );
        self.pairs.insert(pair, id);
        self.nodes[node].dial_attempts.remove(&peer);
        self.report.connections += 1;
        self.pump(id, 0);
        self.pump(id, 1);
    }

    pub(super) fn close(&mut self, conn: u64, _reason: &str) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        let [dialler, listener] = c.ends;
        self.pairs
            .remove(&(dialler.min(listener), dialler.max(listener)));
        if self.nodes[dialler].host.is_some() {
            self.redial(dialler, listener);
        }
    }

    pub(super) fn link_between(&self, a: usize, b: usize) -> LinkSpec {
        // The node that is not a hub has the access link that matters.
        let spec = if self.nodes[a].kind == OrgKind::Hub {
            self.nodes[b].link
        } else {
            self.nodes[a].link
        };
        self.links.effective(spec, a, b)
    }

    /// Asks side `side` of `conn` for frames while its window has room, then reschedules its
    /// timer and handles what its session reported.
    pub(super) fn pump(&mut self, conn: u64, side: usize) {
        let now = self.now();
        let mut stored = false;
        let mut failure: Option<SessionError> = None;
        let mut frames = Vec::new();
        {
            let Some(c) = self.conns.get_mut(&conn) else {
                return;
            };
            let node = c.ends[side];
            let n = &mut self.nodes[node];
            let Some(host) = n.host.as_mut() else {
                return;
            };
            let local_ms = local_time(now, n.skew_ms);
            let mut queued = c.in_flight[side];
            while queued < WINDOW_BYTES {
                match c.sessions[side].poll_transmit(local_ms, host) {
                    Ok(Some(frame)) => {
                        queued += frame.len() as u64;
                        frames.push(frame);
                    }
                    Ok(None) => break,
                    Err(error) => {
                        failure = Some(error);
                        break;
                    }
                }
            }
            while let Some(event) = c.sessions[side].poll_event() {
                match event {
                    SessionEvent::Stored { documents, .. } if !documents.is_empty() => {
                        stored = true
                    }
                    SessionEvent::Rejected { doc, reason, .. } => {
                        self.report.violations.push(Violation {
                            at_s: now as f64 / 1000.0,
                            node: n.ods.to_string(),
                            doc: doc.to_string(),
                            rule: "authenticity".into(),
                            detail: format!("an honest peer's document was rejected: {reason}"),
                        });
                    }
                    SessionEvent::Refused(_) => self.report.refused += 1,
                    _ => {}
                }
            }
            let timer = c.sessions[side]
                .poll_timeout()
                .map(|t| (t as i64 - n.skew_ms).max(now as i64) as u64);
            if timer != c.timer[side] {
                c.timer[side] = timer;
                if let Some(at) = timer {
                    self.sequence += 1;
                    self.queue
                        .push(Reverse((at, self.sequence, Event::Timer { conn, side })));
                }
            }
        }
        for frame in frames {
            self.send(conn, side, frame);
        }
        if let Some(error) = failure {
            self.session_failed(conn, side, &error);
            return;
        }
        if stored {
            let node = self.conns[&conn].ends[side];
            self.feed_changed(node);
        }
    }

    /// A session error closes the connection, as it would. A peer too slow to say Hello (a
    /// lossy, slow link) is the network's doing; any other error between honest nodes is a
    /// bug, reported as a violation.
    pub(super) fn session_failed(&mut self, conn: u64, side: usize, error: &SessionError) {
        if matches!(error, SessionError::HelloTimeout) {
            self.report.hello_timeouts += 1;
            self.close(conn, "hello timeout");
            return;
        }
        self.protocol_failure(conn, side, &error.to_string());
    }

    pub(super) fn protocol_failure(&mut self, conn: u64, side: usize, reason: &str) {
        let node = self.conns[&conn].ends[side];
        self.report.violations.push(Violation {
            at_s: self.now() as f64 / 1000.0,
            node: self.nodes[node].ods.to_string(),
            doc: String::new(),
            rule: "protocol".into(),
            detail: reason.to_string(),
        });
        self.close(conn, reason);
    }

    pub(super) fn feed_changed(&mut self, node: usize) {
        let touched: Vec<(u64, usize)> = self
            .conns
            .iter_mut()
            .filter_map(|(id, c)| {
                let side = c.ends.iter().position(|&e| e == node)?;
                c.sessions[side].feed_changed();
                Some((*id, side))
            })
            .collect();
        for (conn, side) in touched {
            self.pump(conn, side);
        }
    }

    pub(super) fn send(&mut self, conn: u64, side: usize, frame: Vec<u8>) {
        let now = self.now();
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let (from, to) = (c.ends[side], c.ends[1 - side]);
        self.report.frames += 1;
        self.report.bytes += frame.len() as u64;
        let spec = self.link_between(from, to);
        let blocked = self.links.blocked_direction(from, to);
        let c = self.conns.get_mut(&conn).expect("looked up above");
        c.in_flight[side] += frame.len() as u64;
        if blocked {
            c.held[side].push(frame);
            let at = now + IDLE_TIMEOUT_MS;
            self.schedule(at, Event::IdleCheck { conn });
            return;
        }
        let arrival = transmit(
            &spec,
            frame.len(),
            now,
            &mut c.next_free_ms[side],
            &mut c.last_arrival_ms[side],
            &mut self.rng,
        );
        self.schedule(
            arrival,
            Event::Deliver {
                conn,
                to: 1 - side,
                frame,
            },
        );
    }

    pub(super) fn release_held(&mut self) {
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for conn in ids {
            for side in 0..2 {
                let c = &self.conns[&conn];
                if c.held[side].is_empty()
                    || self.links.blocked_direction(c.ends[side], c.ends[1 - side])
                {
                    continue;
                }
                let c = self.conns.get_mut(&conn).expect("listed above");
                let frames = std::mem::take(&mut c.held[side]);
                for frame in frames {
                    let c = self.conns.get_mut(&conn).expect("listed above");
                    c.in_flight[side] -= frame.len() as u64;
                    self.report.frames -= 1;
                    self.report.bytes -= frame.len() as u64;
                    self.send(conn, side, frame);
                }
            }
        }
    }

    /// Connections whose link just went down close if it stays down past the idle timeout.
    pub(super) fn check_blocked_conns(&mut self) {
        let now = self.now();
        let blocked: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| self.links.blocked(c.ends[0], c.ends[1]) != Blocked::No)
            .map(|(id, _)| *id)
            .collect();
        for conn in blocked {
            self.schedule(now + IDLE_TIMEOUT_MS, Event::IdleCheck { conn });
        }
    }

    pub(super) fn idle_check(&mut self, conn: u64) {
        let now = self.now();
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let idle = now.saturating_sub(c.last_delivery_ms) >= IDLE_TIMEOUT_MS;
        if self.links.blocked(c.ends[0], c.ends[1]) != Blocked::No && idle {
            self.report.idle_closes += 1;
            self.close(conn, "idle timeout: the link is down");
        }
    }

    pub(super) fn deliver(&mut self, conn: u64, to: usize, frame: Vec<u8>) {
        let now = self.now();
        if self.wants(Invariant::NothingForbidden)
            && let Some(recipient) = self.conns.get(&conn).map(|c| c.ends[to])
        {
            self.check_wire(recipient, &frame);
        }
        let failure = {
            let Some(c) = self.conns.get_mut(&conn) else {
                return;
            };
            c.in_flight[1 - to] -= frame.len() as u64;
            c.last_delivery_ms = now;
            let node = c.ends[to];
            let n = &mut self.nodes[node];
            let Some(host) = n.host.as_mut() else {
                return;
            };
            c.sessions[to]
                .handle_input(&frame, local_time(now, n.skew_ms), host)
                .err()
        };
        if let Some(error) = failure {
            self.session_failed(conn, to, &error);
            return;
        }
        self.pump(conn, to);
        self.pump(conn, 1 - to);
    }

    /// A document crossing the wire to a node that may not hold it is a violation even if
    /// the receiver refuses it.
    pub(super) fn check_wire(&mut self, recipient: usize, frame: &[u8]) {
        let mut decoder = FrameDecoder::default();
        decoder.push(frame);
        let Ok(Some(Message::Changes { meta, .. })) = decoder.next_message() else {
            return;
        };
        if let Some(reason) = check::forbidden_on_wire(self, recipient, &meta) {
            let violation = Violation {
                at_s: self.now_s(),
                node: self.nodes[recipient].ods.to_string(),
                doc: meta.id().to_string(),
                rule: "nothing-forbidden".into(),
                detail: format!(
                    "sent over the wire: a {} document of {}: {reason}",
                    meta.class, meta.publisher
                ),
            };
            self.record(vec![violation]);
        }
    }

    pub(super) fn timer(&mut self, conn: u64, side: usize) {
        let now = self.now();
        let failure = {
            let Some(c) = self.conns.get_mut(&conn) else {
                return;
            };
            if c.timer[side] != Some(now) {
                return;
            }
            c.timer[side] = None;
            let skew = self.nodes[c.ends[side]].skew_ms;
            c.sessions[side].handle_timeout(local_time(now, skew)).err()
        };
        if let Some(error) = failure {
            self.session_failed(conn, side, &error);
            return;
        }
        self.pump(conn, side);
    }
}
