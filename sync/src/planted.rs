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
}
