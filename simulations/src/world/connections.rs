//! Connections between simulated nodes: dialling with the node's redial policy, frames on
//! the simulated links, each node's driver (the production engine) fed what arrives and
//! asked for what to send, idle closes, and the wire checks.

use super::{Blocked, Conn, Event, IDLE_TIMEOUT_MS, World, local_time};
use crate::Violation;
use crate::check;
use crate::network::transmit;
use crate::scenario::{Invariant, LinkSpec};
use caremesh_engine::{CloseCause, DriverEvent};
use caremesh_sync::OrgKind;
use caremesh_sync::policy::Recipient;
use caremesh_sync::wire::{FrameDecoder, Message};
use std::collections::BTreeMap;

/// The longest a simulated WAL sync takes, in ms (each takes 1 to this many, at random).
const SYNC_MS_MAX: u64 = 10;

/// Bytes a connection direction may have in flight before the driver is asked for more.
const WINDOW_BYTES: u64 = 1 << 20;

impl World {
    pub(super) fn dial(&mut self, node: usize, peer: usize, life: u64) {
        if self.nodes[node].life != life || self.nodes[node].driver.is_none() {
            return;
        }
        let pair = (node.min(peer), node.max(peer));
        if self.pairs.contains_key(&pair) {
            return;
        }
        let now = self.now();
        if self.nodes[peer].driver.is_some() && self.links.blocked(node, peer) == Blocked::No {
            let rtt = 2 * self.link_between(node, peer).latency_ms;
            self.schedule(now + rtt.max(1), Event::Established { node, peer, life });
        } else {
            self.redial(node, peer, 0);
        }
    }

    /// Schedules the next dial from `node` to `peer` after a connection that lasted
    /// `lasted_ms` (0: the attempt failed), by the node's own redial policy.
    pub(super) fn redial(&mut self, node: usize, peer: usize, lasted_ms: u64) {
        let jitter = self.rng.unit();
        let pause = self.nodes[node]
            .redials
            .entry(peer)
            .or_default()
            .pause_after(lasted_ms, jitter);
        let life = self.nodes[node].life;
        self.schedule(self.now() + pause, Event::Dial { node, peer, life });
    }

    pub(super) fn establish(&mut self, node: usize, peer: usize, life: u64) {
        if self.nodes[node].life != life || self.nodes[node].driver.is_none() {
            return;
        }
        let pair = (node.min(peer), node.max(peer));
        let now = self.now();
        if self.pairs.contains_key(&pair) {
            return;
        }
        if self.nodes[peer].driver.is_none() || self.links.blocked(node, peer) != Blocked::No {
            self.redial(node, peer, 0);
            return;
        }
        let id = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(
            id,
            Conn {
                ends: [node, peer],
                since_ms: now,
                in_flight: [0, 0],
                next_free_ms: [now, now],
                last_arrival_ms: [now, now],
                held: [Vec::new(), Vec::new()],
                last_delivery_ms: now,
                readers: Default::default(),
            },
        );
        self.pairs.insert(pair, id);
        self.report.connections += 1;
        // Both ends' drivers decide whether to take the connection, as a node's does when
        // quinn hands it an authenticated one.
        for (local, remote, dialled) in [(node, peer, true), (peer, node, false)] {
            let recipient = Recipient {
                ods: self.nodes[remote].ods.clone(),
                kind: self.nodes[remote].kind,
            };
            let key = self.nodes[remote].key.public();
            let local_ms = local_time(now, self.nodes[local].skew_ms);
            let driver = self.nodes[local].driver.as_mut().expect("checked above");
            if !driver.connect(local_ms, id, (recipient, key), dialled) {
                self.close(id, "refused by the driver");
                return;
            }
        }
        self.pump_node(node);
        self.pump_node(peer);
    }

    /// Ends `conn` on both sides: each driver is told the connection is gone, and the
    /// dialler dials again by its policy.
    pub(super) fn close(&mut self, conn: u64, reason: &str) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        let [dialler, listener] = c.ends;
        self.pairs
            .remove(&(dialler.min(listener), dialler.max(listener)));
        for end in c.ends {
            if let Some(driver) = self.nodes[end].driver.as_mut() {
                driver.disconnected(conn, reason);
                self.pump_node(end);
            }
        }
        if self.nodes[dialler].driver.is_some() {
            let lasted = self.now().saturating_sub(c.since_ms);
            self.redial(dialler, listener, lasted);
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

    /// Asks `node`'s driver for frames while their connections' windows have room, sends
    /// them, rearms the node's timer and acts on what the driver reported.
    pub(super) fn pump_node(&mut self, node: usize) {
        if self.nodes[node].driver.is_some()
            && caremesh_storage::power_loss::power_is_off(&self.nodes[node].db)
        {
            // A power cut struck in what the node just did: nothing it did since leaves it.
            self.power_failed(node);
            return;
        }
        let now = self.now();
        let skew = self.nodes[node].skew_ms;
        let local_ms = local_time(now, skew);
        let Some(driver) = self.nodes[node].driver.as_mut() else {
            return;
        };
        let conns = &self.conns;
        // Bytes each connection has taken in this call, on top of what is in flight.
        let mut queued: BTreeMap<u64, u64> = BTreeMap::new();
        let mut frames = Vec::new();
        driver.retry_blocked();
        loop {
            let has_room = |conn: u64| {
                conns.get(&conn).is_none_or(|c| {
                    let side = usize::from(c.ends[0] != node);
                    c.in_flight[side] + queued.get(&conn).copied().unwrap_or(0) < WINDOW_BYTES
                })
            };
            let Some(transmit) = driver.poll_transmit(local_ms, has_room) else {
                break;
            };
            *queued.entry(transmit.conn).or_default() += transmit.frame.len() as u64;
            frames.push(transmit);
        }
        let events: Vec<DriverEvent> = std::iter::from_fn(|| driver.poll_event()).collect();
        let sync = driver.poll_sync();
        let timer = driver
            .poll_timeout()
            .map(|t| (t as i64 - skew).max(now as i64) as u64);
        let n = &mut self.nodes[node];
        if timer != n.timer {
            n.timer = timer;
            if let Some(at) = timer {
                let life = n.life;
                self.schedule(at, Event::Timer { node, life });
            }
        }
        if let Some(commit) = sync {
            // The WAL's sync takes the disk a little while, as production's durability
            // thread's does: a power cut may come between the commit and its sync.
            let at = now + 1 + self.rng.below(SYNC_MS_MAX);
            let life = self.nodes[node].life;
            self.schedule(at, Event::Synced { node, life, commit });
        }
        for transmit in frames {
            let side = self
                .conns
                .get(&transmit.conn)
                .map(|c| usize::from(c.ends[0] != node));
            if let Some(side) = side {
                self.send(transmit.conn, side, transmit.frame);
            }
        }
        for event in events {
            self.driver_event(node, event);
        }
    }

    fn driver_event(&mut self, node: usize, event: DriverEvent) {
        match event {
            DriverEvent::Stopped { reason } => self.stop_for_damage(node, reason),
            DriverEvent::Close {
                conn,
                reason,
                cause,
                ..
            } => {
                if !self.conns.contains_key(&conn) {
                    return;
                }
                match cause {
                    // A peer too slow to say Hello (a lossy, slow link) is the network's doing.
                    CloseCause::HelloTimeout => self.report.hello_timeouts += 1,
                    // Between honest nodes any protocol error is a bug.
                    CloseCause::Protocol => self.report.violations.push(Violation {
                        at_s: self.now_s(),
                        node: self.nodes[node].ods.to_string(),
                        doc: String::new(),
                        rule: "protocol".into(),
                        detail: reason.clone(),
                    }),
                    CloseCause::StorageFailed => self.report.storage_failures += 1,
                    // Counted with the stop itself (`DriverEvent::Stopped`).
                    CloseCause::StorageDamaged => {}
                    CloseCause::Untrusted
                    | CloseCause::Replaced
                    | CloseCause::Ended
                    | CloseCause::PullAgain => {}
                }
                self.close(conn, &reason);
            }
            DriverEvent::Rejected { doc, reason, .. } => {
                self.report.violations.push(Violation {
                    at_s: self.now_s(),
                    node: self.nodes[node].ods.to_string(),
                    doc: doc.to_string(),
                    rule: "authenticity".into(),
                    detail: format!("an honest peer's document was rejected: {reason}"),
                });
            }
            DriverEvent::Refused { .. } => self.report.refused += 1,
            DriverEvent::PeerUp { .. }
            | DriverEvent::Stored { .. }
            | DriverEvent::Unsendable { .. }
            | DriverEvent::Received { .. } => {}
        }
    }

    pub(super) fn send(&mut self, conn: u64, side: usize, frame: Vec<u8>) {
        let now = self.now();
        if !self.conns.contains_key(&conn) {
            return;
        }
        // An acknowledgement counts from when it leaves its node: a crash after that must not
        // take back what it covers, whether or not it has arrived.
        if self.wants(Invariant::NoLoss) {
            self.check_ack_durable(conn, 1 - side, &frame);
        }
        let c = &self.conns[&conn];
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
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.in_flight[1 - to] -= frame.len() as u64;
        c.last_delivery_ms = now;
        let (node, sender) = (c.ends[to], c.ends[1 - to]);
        let input = c.readers[to].read(&frame);
        let n = &mut self.nodes[node];
        let Some(driver) = n.driver.as_mut() else {
            return;
        };
        driver.receive(local_time(now, n.skew_ms), conn, input);
        self.pump_node(node);
        // The sender's window has room again.
        self.pump_node(sender);
    }

    /// An acknowledgement, as it leaves its sender, must name only what the sender holds: its
    /// committed checkpoint in the recipient's feed is at or past it. Whether a crash leaves
    /// it there is checked when the sender restarts, against the furthest acknowledgement
    /// recorded here (`check_acknowledged_survived`).
    pub(super) fn check_ack_durable(&mut self, conn: u64, to: usize, frame: &[u8]) {
        let mut decoder = FrameDecoder::default();
        decoder.push(frame);
        let Ok(Some(Message::Ack { up_to })) = decoder.next_message() else {
            return;
        };
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let (puller, provider) = (c.ends[1 - to], c.ends[to]);
        let Some(driver) = self.nodes[puller].driver.as_ref() else {
            return;
        };
        let stored = driver
            .host()
            .store
            .peer_checkpoint(&self.nodes[provider].ods)
            .ok()
            .flatten();
        let durable = stored.map_or(0, |c| c.up_to);
        if let Some(stored) = stored {
            // Positions only grow within an epoch, and epochs only grow: the furthest pair.
            let acknowledged = (stored.epoch, up_to.min(durable));
            let furthest = self
                .acknowledged
                .entry((puller, provider))
                .or_insert(acknowledged);
            *furthest = (*furthest).max(acknowledged);
        }
        if durable < up_to {
            let violation = Violation {
                at_s: self.now_s(),
                node: self.nodes[puller].ods.to_string(),
                doc: String::new(),
                rule: "no-loss".into(),
                detail: format!(
                    "acknowledged {}'s feed up to {up_to}, but holds it durably only up to {durable}",
                    self.nodes[provider].ods
                ),
            };
            self.record(vec![violation]);
        }
    }

    /// A document crossing the wire to a node that may not hold it is a violation even if
    /// the receiver refuses it.
    pub(super) fn check_wire(&mut self, recipient: usize, frame: &[u8]) {
        let mut decoder = FrameDecoder::default();
        decoder.push(frame);
        let meta = match decoder.next_message() {
            Ok(Some(Message::Changes { meta, .. } | Message::Pushed { meta, .. })) => meta,
            _ => return,
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

    /// `node`'s sync of its WAL after `commit` returned, unless the node restarted since.
    /// Once the sync reached the disk model, the commit is durable and the driver is told.
    pub(super) fn synced(&mut self, node: usize, life: u64, commit: u64) {
        let n = &mut self.nodes[node];
        if n.life != life || caremesh_storage::power_loss::power_is_off(&n.db) {
            return;
        }
        let Some(driver) = n.driver.as_mut() else {
            return;
        };
        let synced = driver.host().store.wal_syncer().sync();
        if !caremesh_storage::power_loss::power_is_off(&n.db) {
            match synced {
                Ok(()) => driver.durable(commit),
                Err(error) => driver.sync_failed(&error.to_string()),
            }
        }
        // A power cut that struck in the sync stops the node here.
        self.pump_node(node);
    }

    /// `node`'s driver timer fired, unless it was rearmed since or the node restarted.
    pub(super) fn timer(&mut self, node: usize, life: u64) {
        let now = self.now();
        let n = &mut self.nodes[node];
        if n.life != life || n.timer != Some(now) {
            return;
        }
        n.timer = None;
        let local_ms = local_time(now, n.skew_ms);
        if let Some(driver) = n.driver.as_mut() {
            driver.handle_timeout(local_ms);
        }
        self.pump_node(node);
    }
}
