//! Relaying a document without rebuilding it.
//!
//! A relay (a hub, for the partitions whose items it keeps none of: see
//! [`crate::SyncHost::reads_items`]) needs only to know that what it stores and passes on is
//! exactly what the publisher signed. Automerge names each change by the SHA-256 of its bytes,
//! and that hash covers the change's dependencies, so the heads of a document commit to its
//! whole history. A relay therefore authenticates a new version by its hash chain alone
//! ([`extend`]): it hashes each received change, checks that each depends only on changes it
//! holds (its heads and the changes its index lists) or on changes before it in the batch,
//! and checks that the heads this gives are exactly the heads the publisher signed. It then
//! appends the change bytes to the document's stored bytes (a saved document followed by
//! change chunks is still one loadable document) and serves holders of an older version from
//! those appended bytes ([`changes_after`]), without loading, applying or saving the
//! document.
//!
//! What a relay does not check is whether the operations inside a correctly signed change
//! are valid Automerge (a recipient that reads the items checks that when it applies them).
//! Authenticity is unchanged: a change that is not byte for byte the publisher's has another
//! hash, so the heads would not be the signed heads.
//!
//! A received change the index lists as held is skipped (it is byte for byte the one held).
//! Whatever this path cannot decide cheaply (a first copy, a change that depends on history
//! older than what the index lists, a compressed chunk, too many appended changes) is
//! declined, and the caller takes the full path: load, apply, compare heads, save.

use crate::register::ItemRegister;
use crate::signing::SignedHeads;
use automerge::Change;

/// After this many appended changes a new version takes the full path once, which saves the
/// document whole again (compacting the appended chunks and dropping the index).
pub const MAX_APPENDED_CHANGES: usize = 32;

/// The first bytes of every Automerge chunk.
const CHUNK_MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
/// The chunk type of an uncompressed change.
const CHANGE_CHUNK: u8 = 1;

/// What a relay appended to a document's stored bytes since they were last saved whole: the
/// index that lets it serve holders of an older version without loading the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendedChanges {
    /// The heads of the saved document the changes follow.
    pub base_heads: Vec<[u8; 32]>,
    /// How many bytes of the stored bytes are the saved document.
    pub base_len: u64,
    /// The appended changes in the order they were stored (each after its dependencies).
    pub changes: Vec<AppendedChange>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendedChange {
    pub hash: [u8; 32],
    pub deps: Vec<[u8; 32]>,
    pub len: u64,
}

impl AppendedChanges {
    /// Whether `hash` is one of `held_heads`, a head of the saved base or an appended
    /// change. Searched from the newest change: a publisher's next change depends on its
    /// last. (A linear search: the index holds at most [`MAX_APPENDED_CHANGES`].)
    fn knows(&self, held_heads: &[[u8; 32]], hash: &[u8; 32]) -> bool {
        held_heads.contains(hash)
            || self.base_heads.contains(hash)
            || self.changes.iter().rev().any(|change| change.hash == *hash)
    }

    /// Whether the appended changes describe exactly `stored_len` stored bytes. An index that
    /// does not fit its bytes (a damaged column) is never used.
    pub fn fits(&self, stored_len: u64) -> bool {
        self.changes
            .iter()
            .try_fold(self.base_len, |len, change| len.checked_add(change.len))
            == Some(stored_len)
    }
}

/// What a relay needs of a held copy to extend it by its hash chain, without its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldIndex {
    /// The heads its publisher signed.
    pub heads: Vec<[u8; 32]>,
    /// How many bytes are stored: the saved base and every appended change.
    pub stored_len: u64,
    /// The index of what was appended since the base was saved; `None` where the document was
    /// saved whole (or its index is damaged: everything stored then counts as the base).
    pub appended: Option<AppendedChanges>,
    /// What its items map is, for a node that reads items to read a new version from its
    /// changes alone; `None` where not registered. Only ever one whose head is the held
    /// version's only head ([`HeldIndex::with_register`]).
    pub register: Option<ItemRegister>,
}

impl HeldIndex {
    /// The index of a held copy whose publisher signed `signed`, whose stored bytes (saved
    /// base and appended changes) are `stored`, appended as `appended` says; `None` where the
    /// signed heads do not decode.
    pub fn of(signed: &[u8], stored: &[u8], appended: Option<AppendedChanges>) -> Option<Self> {
        Some(HeldIndex {
            heads: SignedHeads::decode(signed)?.heads,
            stored_len: stored.len() as u64,
            appended,
            register: None,
        })
    }

    /// This index with `register`, if it describes the held version (one head, the signed
    /// one): a register written beside an older version is never used.
    pub fn with_register(mut self, register: Option<ItemRegister>) -> Self {
        self.register = register.filter(|register| self.heads == [register.head]);
        self
    }
}

/// A new version that verified by its hash chain: what to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    /// The received changes the held copy lacks, one chunk after another, in the index's
    /// order: all that is appended to the held bytes.
    pub new_bytes: Vec<u8>,
    /// The index once they are appended: its changes from [`Extension::already_held`] on
    /// describe [`Extension::new_bytes`].
    pub appended: AppendedChanges,
    /// How many of the index's changes the held copy has.
    pub already_held: usize,
    /// The heads the held heads and the received changes give.
    pub heads: Vec<[u8; 32]>,
    /// The latest time the publisher stamped on a received change.
    pub published_at: Option<i64>,
}

impl Extension {
    /// The new changes, each as its own chunk.
    pub fn new_changes(&self) -> Vec<Vec<u8>> {
        split_changes(&self.new_bytes, &self.appended.changes[self.already_held..])
    }
}

/// `bytes` cut into the chunks `changes` describe, in order. The caller checked that their
/// lengths add up to `bytes`.
fn split_changes(bytes: &[u8], changes: &[AppendedChange]) -> Vec<Vec<u8>> {
    let mut start = 0;
    changes
        .iter()
        .map(|change| {
            let end = start + change.len as usize;
            let chunk = bytes[start..end].to_vec();
            start = end;
            chunk
        })
        .collect()
}

/// Why a received version was not taken on the relay path: the caller takes the full path,
/// which decides exactly (and rejects what is wrong with the reason a full check gives).
#[derive(Debug, PartialEq, Eq)]
pub enum Declined {
    /// A received chunk is not one uncompressed change chunk with a valid checksum.
    NotAChange,
    /// A change has no dependencies, or depends on history older than the held heads and the
    /// changes the index lists.
    OutsideTheHeldHeads,
    /// The document has as many appended changes as it may; saving it whole compacts them.
    Compact,
}

/// Extends the held document (described by `held`, without its bytes) by `received`
/// changes, checking their hash chain. The caller compares [`Extension::heads`] with the
/// signed heads: only equal heads may be stored.
pub fn extend(held: &HeldIndex, received: &[Vec<u8>]) -> Result<Extension, Declined> {
    let mut index = match &held.appended {
        Some(appended) if appended.fits(held.stored_len) => appended.clone(),
        // Saved whole (or an index that does not fit its bytes): everything held is the base.
        _ => AppendedChanges {
            base_heads: held.heads.clone(),
            base_len: held.stored_len,
            changes: Vec::new(),
        },
    };
    let already_held = index.changes.len();
    let mut heads: Vec<[u8; 32]> = held.heads.clone();
    let mut new_bytes = Vec::new();
    let mut published_at = None;
    for chunk in received {
        let change = change_chunk(chunk).ok_or(Declined::NotAChange)?;
        let hash = change.hash().0;
        // A received change the index knows is skipped: a change is named by the hash of
        // its bytes, so it is byte for byte the one held (a peer that answered an older Want
        // sends changes this node has since stored).
        if index.knows(&held.heads, &hash) {
            continue;
        }
        let deps: Vec<[u8; 32]> = change.deps().iter().map(|d| d.0).collect();
        // Only a change built on what the index knows (or on one built on that) is certainly
        // new: one with no dependencies, or on older history, could be held already.
        if deps.is_empty() || !deps.iter().all(|dep| index.knows(&held.heads, dep)) {
            return Err(Declined::OutsideTheHeldHeads);
        }
        heads.retain(|head| !deps.contains(head));
        heads.push(hash);
        published_at = published_at.max(Some(change.timestamp()));
        new_bytes.extend_from_slice(chunk);
        index.changes.push(AppendedChange {
            hash,
            deps,
            len: chunk.len() as u64,
        });
    }
    heads.sort_unstable();
    heads.dedup();
    if index.changes.len() > MAX_APPENDED_CHANGES {
        return Err(Declined::Compact);
    }
    Ok(Extension {
        new_bytes,
        appended: index,
        already_held,
        heads,
        published_at,
    })
}

/// `chunk` as a change, if it is exactly one uncompressed change chunk whose checksum is the
/// start of its hash (Automerge checks that when it loads; a relay must not pass on bytes a
/// recipient would refuse).
pub(crate) fn change_chunk(chunk: &[u8]) -> Option<Change> {
    if chunk.len() < 9 || chunk[..4] != CHUNK_MAGIC || chunk[8] != CHANGE_CHUNK {
        return None;
    }
    let change = Change::try_from(chunk).ok()?;
    (chunk[4..8] == change.hash().0[..4]).then_some(change)
}

/// Whether the held document has every one of `heads`, as far as its index says without
/// loading it: `false` means only "not known here", and the caller may ask for the changes.
pub fn known(
    appended: Option<&AppendedChanges>,
    held_heads: &[[u8; 32]],
    heads: &[[u8; 32]],
) -> bool {
    heads.iter().all(|head| match appended {
        Some(appended) => appended.knows(held_heads, head),
        None => held_heads.contains(head),
    })
}

/// The appended changes a holder of `have` lacks, as raw change bytes in stored order, if the
/// index can tell: every head it names is a base head or an appended change, and everything
/// it holds covers the whole saved base. `None` otherwise (the caller loads the document).
pub fn changes_after(
    stored: &[u8],
    appended: &AppendedChanges,
    have: &[[u8; 32]],
) -> Option<Vec<Vec<u8>>> {
    if !appended.fits(stored.len() as u64) {
        return None;
    }
    let lacking = lacking_positions(appended, have)?;
    let mut starts = Vec::with_capacity(appended.changes.len());
    let mut start = appended.base_len as usize;
    for change in &appended.changes {
        starts.push(start);
        start += change.len as usize;
    }
    Some(
        lacking
            .into_iter()
            .map(|at| stored[starts[at]..starts[at] + appended.changes[at].len as usize].to_vec())
            .collect(),
    )
}

/// Which of the appended changes (their positions in `appended`, in order) a holder of
/// `have` lacks, told from the index alone; `None` where it cannot tell (as
/// [`changes_after`]).
pub fn lacking_positions(appended: &AppendedChanges, have: &[[u8; 32]]) -> Option<Vec<usize>> {
    if have.is_empty() {
        return None;
    }
    let changes = &appended.changes;
    let mut held_by_them = vec![false; changes.len()];
    let mut base_reached = vec![false; appended.base_heads.len()];
    // Marks `hash` held by them: an appended change stored before position `before`, or a
    // head of the saved base. `false` for a head older than the base, or unknown here: only
    // the whole history can tell.
    let mut mark = |hash: &[u8; 32], before: usize, held_by_them: &mut [bool]| {
        if let Some(at) = changes[..before].iter().rposition(|c| c.hash == *hash) {
            held_by_them[at] = true;
        } else if let Some(at) = appended.base_heads.iter().position(|h| h == hash) {
            base_reached[at] = true;
        } else {
            return false;
        }
        true
    };
    for hash in have {
        if !mark(hash, changes.len(), &mut held_by_them) {
            return None;
        }
    }
    // Each change is stored after its dependencies, so walking back from the newest marks
    // every change a held one depends on before it is itself looked at (and a dependency
    // is found a step back on a publisher's line of changes).
    for at in (0..changes.len()).rev() {
        if held_by_them[at] {
            for dep in &changes[at].deps {
                if !mark(dep, at, &mut held_by_them) {
                    return None;
                }
            }
        }
    }
    if !base_reached.iter().all(|reached| *reached) {
        return None;
    }
    Some(
        held_by_them
            .iter()
            .enumerate()
            .filter(|(_, held)| !**held)
            .map(|(at, _)| at)
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PublishedDocument;
    use crate::model::{DataClass, DocMeta, Section};
    use crate::testing::{allergy, meta_for};

    fn meta() -> DocMeta {
        meta_for("A81001", "9912003888", Section::Allergies, DataClass::Coded)
    }

    /// A publisher's document after `versions` versions of one item each, saved whole after
    /// the first, with the raw change of each later version.
    fn published(versions: usize) -> (PublishedDocument, Vec<u8>, Vec<Vec<u8>>) {
        let mut document = PublishedDocument::create(meta(), b"publisher");
        document.update(&[allergy("a0", "Penicillin")], &[], 1_700_000_000);
        let first = document.save();
        let mut changes = Vec::new();
        for version in 1..versions {
            let before = document.heads();
            let item = allergy(&format!("a{version}"), "Penicillin");
            document.update(&[item], &[], 1_700_000_000 + version as i64);
            let mut new = document.changes_since(&before);
            assert_eq!(new.len(), 1);
            changes.push(new.remove(0));
        }
        (document, first, changes)
    }

    fn heads_of(bytes: &[u8]) -> Vec<[u8; 32]> {
        PublishedDocument::load(&meta(), bytes).unwrap().heads()
    }

    /// A held copy: its bytes, and what a relay knows of it without them.
    #[derive(Clone)]
    struct Held {
        stored: Vec<u8>,
        index: HeldIndex,
    }

    impl Held {
        fn saved_whole(bytes: &[u8]) -> Held {
            Held {
                stored: bytes.to_vec(),
                index: HeldIndex {
                    heads: heads_of(bytes),
                    stored_len: bytes.len() as u64,
                    appended: None,
                    register: None,
                },
            }
        }

        /// The held copy once `extension` is stored, as storage stores it.
        fn extended(&self, extension: &Extension) -> Held {
            let mut stored = self.stored.clone();
            stored.extend_from_slice(&extension.new_bytes);
            Held {
                index: HeldIndex {
                    heads: extension.heads.clone(),
                    stored_len: stored.len() as u64,
                    appended: Some(extension.appended.clone()),
                    register: None,
                },
                stored,
            }
        }

        fn extend(&self, received: &[Vec<u8>]) -> Result<(Extension, Held), Declined> {
            let extension = extend(&self.index, received)?;
            let held = self.extended(&extension);
            Ok((extension, held))
        }
    }

    /// `first` extended by each of `changes` in turn, one version each: every copy held.
    fn extended_one_by_one(first: &[u8], changes: &[Vec<u8>]) -> Vec<Held> {
        let mut held = vec![Held::saved_whole(first)];
        for change in changes {
            let (extension, next) = held
                .last()
                .unwrap()
                .extend(std::slice::from_ref(change))
                .unwrap();
            assert_eq!(extension.new_changes(), vec![change.clone()]);
            held.push(next);
        }
        held.remove(0);
        held
    }

    #[test]
    fn appended_changes_load_to_the_publishers_heads_and_serve_each_holder_what_it_lacks() {
        let (document, first, changes) = published(4);
        let first_heads = heads_of(&first);
        let versions = extended_one_by_one(&first, &changes);
        let mut heads_after = vec![first_heads.clone()];
        for held in &versions {
            assert_eq!(held.index.heads, heads_of(&held.stored));
            heads_after.push(held.index.heads.clone());
        }
        let last = versions.last().unwrap();
        let (stored, heads) = (&last.stored, &last.index.heads);
        assert_eq!(*heads, document.heads(), "the publisher's heads");
        let appended = last.index.appended.clone().unwrap();
        assert_eq!(appended.base_heads, first_heads);
        assert_eq!(appended.base_len, first.len() as u64);
        assert!(appended.fits(stored.len() as u64));
        // A holder of each earlier version gets exactly the changes after it.
        for (version, have) in heads_after.iter().enumerate() {
            let lacking = changes_after(stored, &appended, have).unwrap();
            assert_eq!(
                lacking,
                changes[version..].to_vec(),
                "holder of version {version}"
            );
        }
        // A head the index does not know cannot be answered from it.
        assert_eq!(changes_after(stored, &appended, &[[9; 32]]), None);
        assert!(known(Some(&appended), heads, &heads_after[1]));
        assert!(!known(Some(&appended), heads, &[[9; 32]]));
    }

    /// A document with more than one writer has a history that branches and merges. Built
    /// up a change at a time, as a relay receives it, its index tells the holder of any
    /// version, of any one change or of any two, exactly what Automerge says they lack.
    #[test]
    fn holders_anywhere_in_a_branching_history_are_told_exactly_what_they_lack() {
        use automerge::transaction::Transactable;
        use automerge::{ActorId, AutoCommit, ChangeHash, ROOT};
        let hashes = |heads: Vec<ChangeHash>| -> Vec<[u8; 32]> {
            heads.into_iter().map(|head| head.0).collect()
        };
        let mut rng = crate::rng::Rng::new(23);
        for _ in 0..30 {
            let mut a = AutoCommit::new().with_actor(ActorId::from(&b"writer-a"[..]));
            a.put(ROOT, "n", 0).unwrap();
            a.commit();
            let first = a.save();
            let base_heads = a.get_heads();
            let mut b = a.fork().with_actor(ActorId::from(&b"writer-b"[..]));
            for step in 1..=20 {
                let writer = if rng.percent(50) { &mut a } else { &mut b };
                writer.put(ROOT, "n", step).unwrap();
                writer.commit();
                if rng.percent(25) {
                    a.merge(&mut b).unwrap();
                }
                if rng.percent(25) {
                    b.merge(&mut a).unwrap();
                }
            }
            a.merge(&mut b).unwrap();
            // In causal order, one version a change.
            let changes: Vec<Vec<u8>> = (a.get_changes(&base_heads).iter())
                .map(|change| change.raw_bytes().to_vec())
                .collect();
            let mut stored = first.clone();
            let mut held = HeldIndex {
                heads: hashes(base_heads.clone()),
                stored_len: stored.len() as u64,
                appended: None,
                register: None,
            };
            let mut versions = vec![held.heads.clone()];
            for change in &changes {
                let extension = extend(&held, std::slice::from_ref(change)).unwrap();
                stored.extend_from_slice(&extension.new_bytes);
                held = HeldIndex {
                    heads: extension.heads,
                    stored_len: stored.len() as u64,
                    appended: Some(extension.appended),
                    register: None,
                };
                versions.push(held.heads.clone());
            }
            assert_eq!(held.heads, hashes(a.get_heads()));
            let appended = held.appended.unwrap();
            let mut full = AutoCommit::load(&stored).unwrap();
            let change_hashes: Vec<[u8; 32]> = (appended.changes.iter())
                .map(|change| change.hash)
                .collect();
            let mut holders = versions;
            for _ in 0..10 {
                let one = change_hashes[rng.below(change_hashes.len() as u64) as usize];
                let two = change_hashes[rng.below(change_hashes.len() as u64) as usize];
                holders.push(vec![one]);
                holders.push(vec![one, two]);
            }
            for have in holders {
                let have_hashes: Vec<ChangeHash> = have.iter().map(|h| ChangeHash(*h)).collect();
                let mut expected: Vec<Vec<u8>> = (full.get_changes(&have_hashes).iter())
                    .map(|change| change.raw_bytes().to_vec())
                    .collect();
                let mut lacking = changes_after(&stored, &appended, &have).unwrap();
                expected.sort();
                lacking.sort();
                assert_eq!(lacking, expected, "a holder of {have:02x?}");
            }
        }
    }

    #[test]
    fn a_change_whose_bytes_are_not_the_publishers_gives_other_heads_or_is_declined() {
        let (document, first, changes) = published(2);
        let held = Held::saved_whole(&first);
        // The same change with another timestamp: well formed, checksum valid, another hash.
        let mut forged = Change::from_bytes(changes[0].clone()).unwrap().decode();
        forged.time += 1;
        let forged = Change::from(forged).raw_bytes().to_vec();
        let extension = extend(&held.index, &[forged]).unwrap();
        assert_ne!(extension.heads, document.heads());

        // One byte altered, checksum left: not a valid chunk.
        let mut flipped = changes[0].clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(
            extend(&held.index, &[flipped]).unwrap_err(),
            Declined::NotAChange
        );
        // A saved document is not a change: first copies take the full path.
        assert_eq!(
            extend(&held.index, std::slice::from_ref(&first)).unwrap_err(),
            Declined::NotAChange
        );
    }

    #[test]
    fn changes_older_than_the_held_heads_are_declined_and_held_ones_skipped() {
        let (_, first, changes) = published(3);
        let held = Held::saved_whole(&first);
        // The third version's change without the second: it depends on what is not held.
        assert_eq!(
            extend(&held.index, &changes[1..]).unwrap_err(),
            Declined::OutsideTheHeldHeads
        );
        // A change already held (here: earlier in the batch, or appended before) is skipped,
        // being byte for byte the one held.
        let twice = vec![changes[0].clone(), changes[0].clone()];
        let (once, held_once) = held.extend(&twice).unwrap();
        assert_eq!(once.appended.changes.len(), 1);
        assert_eq!(once.new_bytes, changes[0], "appended once");
        let (again, held_again) = held_once.extend(&changes).unwrap();
        assert_eq!(
            again.appended.changes.len(),
            2,
            "only the third version's change added"
        );
        assert_eq!(again.already_held, 1);
        assert_eq!(again.new_bytes, changes[1]);
        assert_eq!(again.heads, heads_of(&held_again.stored));
        // A first change (no dependencies) that is not the held one could still be somewhere
        // in the held history: only a full check can tell.
        let mut other = PublishedDocument::create(meta(), b"publisher");
        other.update(&[allergy("b0", "Latex")], &[], 1_700_000_000);
        let root = other.changes_since(&[]);
        assert_eq!(
            extend(&held.index, &root).unwrap_err(),
            Declined::OutsideTheHeldHeads
        );
    }

    #[test]
    fn a_document_with_as_many_appended_changes_as_it_may_is_compacted_by_the_full_path() {
        let (_, first, changes) = published(MAX_APPENDED_CHANGES + 2);
        let versions = extended_one_by_one(&first, &changes[..MAX_APPENDED_CHANGES]);
        let last = versions.last().unwrap();
        assert_eq!(
            extend(
                &last.index,
                &changes[MAX_APPENDED_CHANGES..MAX_APPENDED_CHANGES + 1]
            )
            .unwrap_err(),
            Declined::Compact
        );
    }

    /// Received chunks are untrusted bytes: every damaged variant of a genuine change is
    /// declined or gives heads other than the publisher's, and nothing panics; an index read
    /// back from damaged rows is never used to slice outside the stored bytes.
    #[test]
    fn damaged_changes_and_indexes_never_pass_as_the_publishers_and_never_panic() {
        let (document, first, changes) = published(2);
        let held = Held::saved_whole(&first);
        let (genuine, genuine_held) = held.extend(&changes).unwrap();
        assert_eq!(genuine.heads, document.heads());
        let mut rng = crate::rng::Rng::new(19);
        for _ in 0..3_000 {
            let mut damaged = changes[0].clone();
            for _ in 0..rng.range(1, 3) {
                let at = rng.below(damaged.len() as u64) as usize;
                damaged[at] ^= 1 << rng.below(8);
            }
            if rng.percent(20) {
                damaged.truncate(rng.below(damaged.len() as u64) as usize);
            }
            if damaged == changes[0] {
                continue; // the same bit flipped twice
            }
            if let Ok(extension) = extend(&held.index, &[damaged]) {
                assert_ne!(extension.heads, document.heads());
            }
            let mut index = genuine.appended.clone();
            let which = rng.below(index.changes.len() as u64) as usize;
            let change = &mut index.changes[which];
            let stored_len = genuine_held.stored.len() as u64;
            match rng.below(5) {
                0 => index.base_len = rng.below(stored_len + 64),
                1 => change.len = rng.below(stored_len + 64),
                2 => change.hash[rng.below(32) as usize] ^= 1 << rng.below(8),
                3 => change.len = u64::MAX - rng.below(64),
                _ => change.deps.clear(),
            }
            let _ = changes_after(&genuine_held.stored, &index, &held.index.heads);
            let damaged_held = HeldIndex {
                appended: Some(index),
                ..genuine_held.index.clone()
            };
            if let Ok(extension) = extend(&damaged_held, &changes) {
                assert!(
                    extension
                        .appended
                        .fits(stored_len + extension.new_bytes.len() as u64)
                );
            }
        }
    }

    #[test]
    fn an_index_that_does_not_fit_its_bytes_is_not_used() {
        let (_, first, changes) = published(2);
        let held = Held::saved_whole(&first);
        let (_, extended) = held.extend(&changes).unwrap();
        let mut damaged = extended.index.appended.clone().unwrap();
        damaged.base_len += 1;
        assert_eq!(
            changes_after(&extended.stored, &damaged, &held.index.heads),
            None
        );
        // Extending from it takes everything held as the base instead.
        let (_, again) = Held {
            index: HeldIndex {
                appended: Some(damaged),
                ..extended.index.clone()
            },
            ..extended.clone()
        }
        .extend(&changes)
        .unwrap();
        let rebased = again.index.appended.unwrap();
        assert_eq!(rebased.base_len, extended.stored.len() as u64);
        assert!(rebased.changes.is_empty(), "every change is held already");
    }
}
