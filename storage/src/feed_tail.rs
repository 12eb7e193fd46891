//! The newest part of this node's feed, in memory, with who could be sent each entry.
//!
//! A hub's hundreds of sessions all read the same new entries. Read from SQLite by each, and
//! decided by each for every entry, they cost the hub about 1,000 policy decisions per change
//! at 500 peers (BENCHMARKS.md). The tail keeps the entries once, and beside each the peers
//! that could possibly be sent it: its publisher and the organisations caring for its patient
//! (policy's facts-free part, [`caremesh_sync::policy::decided_without_facts`]). A session
//! then reads only the positions named for its peer and decides those in full.
//!
//! Invariant: for every entry held, the peers named for it include every organisation that
//! cares for its patient as the host's patient facts say. Care grows only through
//! [`crate::sync_host::StoreHost::commit`] (another organisation's first document about the
//! patient), which calls [`FeedTail::reach_grew`] for the patients whose facts it changed;
//! entries read later are named from facts already grown. Naming a peer never sends it
//! anything: the full decision does. So a peer named for too much costs a decision, and only
//! a peer named for too little could miss an entry.

use crate::sync_host::HostResult;
use caremesh_sync::{DocId, DocMeta, FeedEntry, NhsNumber, OdsCode};
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

/// Feed entries the tail keeps (a few MB).
pub(crate) const FEED_TAIL_ENTRIES: usize = 16_384;
/// Rows read from SQLite at a time when the tail catches up.
const FEED_TAIL_READ: usize = 1_024;

/// Who could be sent an entry, before any fact but care is looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reach {
    /// Any peer: this node's own sharing record (it goes to every direct peer), or an entry
    /// whose patient's care could not be read.
    Everyone,
    /// Only these (the publisher and those caring for the patient), besides peers that hold
    /// region-wide, who read every entry anyway.
    Named(Vec<OdsCode>),
}

struct TailEntry {
    seq: u64,
    /// `None` once a later position holds a newer version of its document: the feed in
    /// SQLite has only a document's newest position, and an offer must not name a document
    /// twice.
    entry: Option<FeedEntry>,
    patient: NhsNumber,
    reach: Reach,
}

#[derive(Default)]
pub(crate) struct FeedTail {
    /// Every position in (`from`, `to`] that held an entry when read, in order.
    entries: VecDeque<TailEntry>,
    /// Where each document held here is, by position.
    newest: HashMap<DocId, u64>,
    from: u64,
    to: u64,
    /// For each organisation, the positions held that name it.
    named: HashMap<OdsCode, BTreeSet<u64>>,
    /// The positions held that any peer could be sent.
    for_everyone: BTreeSet<u64>,
    /// The positions held about each patient, in order, so that a new carer is named for them.
    by_patient: HashMap<NhsNumber, VecDeque<u64>>,
}

/// What [`FeedTail::named_after`] found for one peer.
pub(crate) struct NamedPage<'a> {
    /// The entries named for the peer, in feed order (superseded ones left out).
    pub entries: Vec<&'a FeedEntry>,
    /// The position read up to: every position up to it not in `entries` does not name the
    /// peer. `None` when nothing past `after` is held.
    pub read_up_to: Option<u64>,
}

impl FeedTail {
    pub(crate) fn starting_at(tip: u64) -> FeedTail {
        FeedTail {
            from: tip,
            to: tip,
            ..FeedTail::default()
        }
    }

    /// Reads what the feed gained past `to`, up to `tip`, with whom each entry could reach,
    /// dropping the oldest entries over the limit.
    pub(crate) fn extend(
        &mut self,
        store: &crate::Store,
        tip: u64,
        mut reach: impl FnMut(&DocMeta) -> Reach,
    ) -> HostResult<()> {
        while self.to < tip {
            let rows = store
                .feed_after(self.to, FEED_TAIL_READ)
                .map_err(crate::sync_host::host_error)?;
            let Some(last) = rows.last() else {
                break;
            };
            let last = last.seq;
            assert!(last > self.to, "the feed went backwards");
            for row in rows {
                let entry = crate::sync_host::feed_entry(row)?;
                let reach = reach(&entry.meta);
                self.push(entry, reach);
            }
            self.to = last;
            while self.entries.len() > FEED_TAIL_ENTRIES {
                self.drop_oldest();
            }
        }
        debug_assert!(self.newest.len() <= self.entries.len());
        Ok(())
    }

    pub(crate) fn push(&mut self, entry: FeedEntry, reach: Reach) {
        let seq = entry.seq;
        assert!(
            self.entries.back().is_none_or(|last| last.seq < seq),
            "the tail is read in feed order"
        );
        if let Some(older) = self.newest.insert(entry.meta.id(), seq)
            && let Some(superseded) = self.at_mut(older)
        {
            superseded.entry = None;
        }
        match &reach {
            Reach::Everyone => {
                self.for_everyone.insert(seq);
            }
            Reach::Named(named) => {
                for ods in named {
                    self.named.entry(ods.clone()).or_default().insert(seq);
                }
            }
        }
        let patient = entry.meta.patient.clone();
        self.by_patient
            .entry(patient.clone())
            .or_default()
            .push_back(seq);
        self.entries.push_back(TailEntry {
            seq,
            entry: Some(entry),
            patient,
            reach,
        });
        self.to = self.to.max(seq);
    }

    fn drop_oldest(&mut self) {
        let oldest = self
            .entries
            .pop_front()
            .expect("over the limit, so not empty");
        let seq = oldest.seq;
        if let Some(entry) = &oldest.entry {
            self.newest.remove(&entry.meta.id());
        }
        match &oldest.reach {
            Reach::Everyone => {
                self.for_everyone.remove(&seq);
            }
            Reach::Named(named) => {
                for ods in named {
                    if let Some(positions) = self.named.get_mut(ods) {
                        positions.remove(&seq);
                        if positions.is_empty() {
                            self.named.remove(ods);
                        }
                    }
                }
            }
        }
        if let Some(positions) = self.by_patient.get_mut(&oldest.patient) {
            assert_eq!(positions.pop_front(), Some(seq), "held in feed order");
            if positions.is_empty() {
                self.by_patient.remove(&oldest.patient);
            }
        }
        self.from = seq;
    }

    /// Where position `seq` is, or would be, among the held entries (they are in feed order).
    fn index_of(&self, seq: u64) -> usize {
        self.entries.partition_point(|e| e.seq < seq)
    }

    fn at_mut(&mut self, seq: u64) -> Option<&mut TailEntry> {
        let at = self.index_of(seq);
        self.entries.get_mut(at).filter(|e| e.seq == seq)
    }

    fn at(&self, seq: u64) -> Option<&TailEntry> {
        self.entries
            .get(self.index_of(seq))
            .filter(|e| e.seq == seq)
    }

    /// Whether the tail holds every position after `after` that the feed has read.
    fn covers(&self, after: u64) -> bool {
        after >= self.from && after <= self.to
    }

    /// Up to `limit` positions after `after` (with their entry, unless superseded), if the
    /// tail covers that position.
    pub(crate) fn after(
        &self,
        after: u64,
        limit: usize,
    ) -> Option<impl Iterator<Item = (u64, Option<&FeedEntry>)>> {
        if !self.covers(after) {
            return None;
        }
        let start = self.index_of(after.saturating_add(1));
        Some(
            self.entries
                .range(start..)
                .take(limit)
                .map(|e| (e.seq, e.entry.as_ref())),
        )
    }

    /// The entries after `after` that name `peer` (or everyone), at most `limit`, if the tail
    /// covers that position.
    pub(crate) fn named_after(
        &self,
        peer: &OdsCode,
        after: u64,
        limit: usize,
    ) -> Option<NamedPage<'_>> {
        if !self.covers(after) {
            return None;
        }
        assert!(limit > 0, "a page holds something");
        let later = after.saturating_add(1)..;
        // One more than a page from each set, to tell a full page from the end.
        let mut positions: Vec<u64> = self
            .for_everyone
            .range(later.clone())
            .take(limit + 1)
            .copied()
            .collect();
        if let Some(named) = self.named.get(peer) {
            positions.extend(named.range(later).take(limit + 1));
        }
        positions.sort_unstable();
        positions.dedup();
        // Each set gave its first `limit + 1` positions past `after`, so every position up to
        // the `limit`-th of the merged list that names the peer is in it.
        let read_up_to = if positions.len() > limit {
            positions.truncate(limit);
            positions.last().copied()
        } else {
            (self.to > after).then_some(self.to)
        };
        let entries = positions
            .into_iter()
            .filter_map(|seq| self.at(seq).and_then(|e| e.entry.as_ref()))
            .collect();
        Some(NamedPage {
            entries,
            read_up_to,
        })
    }

    /// The peers named by the entries after `after` (`None`: one names everyone, or the tail
    /// does not cover `after`, or more than `limit` entries are held past it).
    pub(crate) fn reached_after(&self, after: u64, limit: usize) -> Option<HashSet<OdsCode>> {
        if !self.covers(after) {
            return None;
        }
        let start = self.index_of(after.saturating_add(1));
        let mut reached = HashSet::new();
        let mut last_read = after;
        for held in self.entries.range(start..).take(limit) {
            last_read = held.seq;
            if held.entry.is_none() {
                continue;
            }
            match &held.reach {
                Reach::Everyone => return None,
                Reach::Named(named) => reached.extend(named.iter().cloned()),
            }
        }
        (last_read == self.to || start == self.entries.len()).then_some(reached)
    }

    /// `patient`'s carers are now `carers`: name each for the entries about the patient held,
    /// so that an organisation that came to care for the patient reads them (see the module
    /// invariant).
    pub(crate) fn reach_grew(&mut self, patient: &NhsNumber, carers: &[OdsCode]) {
        let Some(positions) = self.by_patient.get(patient) else {
            return;
        };
        for &seq in positions {
            let at = self.index_of(seq);
            let held = &mut self.entries[at];
            assert_eq!(held.seq, seq, "the patient index names held positions");
            let Reach::Named(named) = &mut held.reach else {
                continue;
            };
            for carer in carers {
                if !named.contains(carer) {
                    named.push(carer.clone());
                    self.named.entry(carer.clone()).or_default().insert(seq);
                }
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        for held in &self.entries {
            match &held.reach {
                Reach::Everyone => assert!(self.for_everyone.contains(&held.seq)),
                Reach::Named(named) => {
                    for ods in named {
                        assert!(self.named[ods].contains(&held.seq));
                    }
                }
            }
            assert!(self.by_patient[&held.patient].contains(&held.seq));
        }
        let indexed: usize = self.named.values().map(BTreeSet::len).sum();
        let named: usize = self
            .entries
            .iter()
            .map(|e| match &e.reach {
                Reach::Named(named) => named.len(),
                Reach::Everyone => 0,
            })
            .sum();
        assert_eq!(indexed, named, "no position named that the tail dropped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use caremesh_sync::{DataClass, Section};

    fn ods(code: &str) -> OdsCode {
        OdsCode::parse(code).unwrap()
    }

    fn entry(seq: u64, publisher: &str, patient: &str, section: Section) -> FeedEntry {
        FeedEntry {
            seq,
            meta: DocMeta {
                publisher: ods(publisher),
                patient: NhsNumber::parse(patient).unwrap(),
                section,
                class: DataClass::Coded,
            },
            heads: vec![[seq as u8; 32]],
        }
    }

    fn named(codes: &[&str]) -> Reach {
        Reach::Named(codes.iter().map(|c| ods(c)).collect())
    }

    fn seqs(page: &NamedPage<'_>) -> Vec<u64> {
        page.entries.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn the_feed_tail_names_each_document_once_at_its_newest_position() {
        let mut tail = FeedTail::starting_at(10);
        for (seq, patient) in [
            (11, "9912003888"),
            (12, "9434765919"),
            (13, "9912003888"),
            (15, "9912003888"),
        ] {
            tail.push(
                entry(seq, "A81001", patient, Section::Problems),
                named(&["A81001"]),
            );
        }
        let read: Vec<(u64, Option<u64>)> = tail
            .after(10, 100)
            .unwrap()
            .map(|(seq, entry)| (seq, entry.map(|e| e.heads[0][0] as u64)))
            .collect();
        assert_eq!(
            read,
            vec![(11, None), (12, Some(12)), (13, None), (15, Some(15))],
            "superseded positions are read past, not offered"
        );
        assert_eq!(tail.after(12, 1).unwrap().count(), 1);
        assert!(
            tail.after(9, 10).is_none(),
            "before the tail: read from SQLite"
        );
        assert!(tail.after(16, 10).is_none(), "past what the tail has read");
        let page = tail.named_after(&ods("A81001"), 10, 100).unwrap();
        assert_eq!(seqs(&page), [12, 15], "superseded: not named");
        tail.check_invariants();
    }

    /// A peer reads the positions that name it or everyone, pages stop where the page is
    /// full, and a peer named for nothing reads to the end without an entry.
    #[test]
    fn a_peer_reads_only_the_entries_that_name_it_or_everyone() {
        let mut tail = FeedTail::starting_at(0);
        let patient_a = "9912003888";
        let patient_b = "9434765919";
        tail.push(
            entry(1, "A81001", patient_a, Section::Problems),
            named(&["A81001", "B82002"]),
        );
        tail.push(
            entry(2, "C83003", patient_b, Section::Problems),
            named(&["C83003"]),
        );
        tail.push(
            entry(3, "Y00001", patient_b, Section::Sharing),
            Reach::Everyone,
        );
        tail.push(
            entry(4, "B82002", patient_a, Section::Medications),
            named(&["A81001", "B82002"]),
        );
        tail.check_invariants();

        let page = tail.named_after(&ods("B82002"), 0, 10).unwrap();
        assert_eq!((seqs(&page), page.read_up_to), (vec![1, 3, 4], Some(4)));
        let page = tail.named_after(&ods("C83003"), 0, 10).unwrap();
        assert_eq!((seqs(&page), page.read_up_to), (vec![2, 3], Some(4)));
        let page = tail.named_after(&ods("D84004"), 0, 10).unwrap();
        assert_eq!((seqs(&page), page.read_up_to), (vec![3], Some(4)));
        let page = tail.named_after(&ods("D84004"), 3, 10).unwrap();
        assert_eq!((seqs(&page), page.read_up_to), (vec![], Some(4)));
        let page = tail.named_after(&ods("D84004"), 4, 10).unwrap();
        assert_eq!((seqs(&page), page.read_up_to), (vec![], None), "drained");
        // A full page stops at its last entry: what lies past it is read next time.
        let page = tail.named_after(&ods("A81001"), 0, 2).unwrap();
        assert_eq!((seqs(&page), page.read_up_to), (vec![1, 3], Some(3)));
        let page = tail.named_after(&ods("A81001"), 3, 2).unwrap();
        assert_eq!((seqs(&page), page.read_up_to), (vec![4], Some(4)));

        assert_eq!(
            tail.reached_after(0, 10),
            None,
            "position 3 reaches everyone"
        );
        let reached = tail.reached_after(3, 10).unwrap();
        assert_eq!(reached, [ods("A81001"), ods("B82002")].into());
        assert_eq!(
            tail.reached_after(3, 1).unwrap(),
            reached,
            "the last entry read"
        );
        assert_eq!(tail.reached_after(1, 1), None, "more held than read");
        assert_eq!(
            tail.reached_after(4, 10).unwrap(),
            HashSet::new(),
            "nothing new"
        );
    }

    /// An organisation that comes to care for a patient is named for the entries about the
    /// patient already held, and only those.
    #[test]
    fn a_new_carer_is_named_for_what_the_tail_holds_about_the_patient() {
        let mut tail = FeedTail::starting_at(0);
        let patient = NhsNumber::parse("9912003888").unwrap();
        tail.push(
            entry(1, "A81001", patient.as_str(), Section::Problems),
            named(&["A81001"]),
        );
        tail.push(
            entry(2, "A81001", "9434765919", Section::Problems),
            named(&["A81001"]),
        );
        let newcomer = ods("B82002");
        assert!(seqs(&tail.named_after(&newcomer, 0, 10).unwrap()).is_empty());
        tail.reach_grew(&patient, &[ods("A81001"), newcomer.clone()]);
        tail.check_invariants();
        assert_eq!(seqs(&tail.named_after(&newcomer, 0, 10).unwrap()), [1]);
    }

    /// Dropping the oldest entries over the limit drops them from every index.
    #[test]
    fn dropped_entries_leave_every_index() {
        let mut tail = FeedTail::starting_at(0);
        let total = FEED_TAIL_ENTRIES as u64 + 10;
        for seq in 1..=total {
            let reach = if seq % 7 == 0 {
                Reach::Everyone
            } else {
                named(&["A81001", "B82002"])
            };
            let patient = if seq % 2 == 0 {
                "9912003888"
            } else {
                "9434765919"
            };
            tail.push(entry(seq, "A81001", patient, Section::Problems), reach);
            if tail.entries.len() > FEED_TAIL_ENTRIES {
                tail.drop_oldest();
            }
        }
        tail.check_invariants();
        assert_eq!(tail.entries.len(), FEED_TAIL_ENTRIES);
        assert!(tail.named_after(&ods("A81001"), 5, 10).is_none());
        // Positions 11 to 13 name the practice (or everyone): a page of three reads to 13.
        let page = tail.named_after(&ods("A81001"), 10, 3).unwrap();
        assert_eq!(page.read_up_to, Some(13));
    }
}
