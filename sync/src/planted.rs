//! Bugs the simulator plants in the production code to show that its invariants catch them
//! (its self-tests, `simulations/src/tests.rs`). Production never sets one: each is checked
//! where the real code would go wrong, so the code under test is the code that ships.

/// A bug planted in a node's host or driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlantedBug {
    /// The host sends every document to every peer, skipping the sharing rules.
    ForwardWithheld,
    /// The host moves a puller's checkpoint (and the session acknowledges) without storing
    /// the documents it covers.
    AckWithoutStoring,
    /// The driver keeps its sessions open when a group commit fails, so they acknowledge
    /// what was rolled back.
    AckAfterFailedCommit,
    /// A relay stores a new version whose hash chain does not end at the signed heads (it
    /// skips the comparison): bytes that are not the publisher's.
    RelayWithoutHeadsCheck,
    /// The node sends holders of an older version changes that are not the ones it holds:
    /// well-formed changes, each stamped a second later than the publisher stamped it, so
    /// their hashes are not the ones the signed heads commit to (a peer that alters what it
    /// relays).
    ForgeChanges,
    /// The driver lets frames leave as soon as a turn has committed, without waiting for the
    /// commit to be durable (the engine's deferred sync): a power cut between the
    /// commit and its sync takes back what was acknowledged.
    FramesBeforeDurable,
}

/// `change` as [`PlantedBug::ForgeChanges`] sends it: well formed, with a valid checksum,
/// and another hash. Bytes that are not a change are sent as they are.
pub fn forged(change: &[u8]) -> Vec<u8> {
    match automerge::Change::try_from(change) {
        Ok(change) => {
            let mut expanded = change.decode();
            expanded.time += 1;
            automerge::Change::from(expanded).raw_bytes().to_vec()
        }
        Err(_) => change.to_vec(),
    }
}
