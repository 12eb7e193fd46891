//! The pure core of caremesh.
//!
//! Everything here is a function of its inputs: no clock, no OS randomness, no sockets, no
//! database. Callers pass time in (as seconds since the Unix epoch) and get bytes out. This is
//! what lets the same logic run inside a node, a hub and a deterministic simulation.
//!
//! * [`model`]: identifiers (NHS number, ODS code), organisation kinds, sections, data classes,
//!   items and document identity.
//! * [`document`]: a publisher's Automerge document holding the items of one partition.
//! * [`signing`]: signed heads, the authenticity statement a publisher makes about a document.
//! * [`policy`]: the decision functions every document passes through, sent, forwarded,
//!   stored or shown.
//! * [`rng`]: the seeded generator behind everything reproducible from a seed.
//! * [`trust`]: the signed trust registry of organisations and their keys.
//! * [`wire`]: versioned postcard messages and length-prefixed framing.
//! * [`reader`]: a connection's frames decoded and their signatures checked where they arrive.
//! * [`session`]: the sync protocol state machine, one per connected peer.
//! * [`loaded`]: recently used documents kept loaded for the sessions of one host.
//! * [`relay`]: authenticating a new version by its hash chain and relaying it unbuilt.
//! * [`register`]: reading a new version's items from its changes alone.

pub mod document;
pub mod loaded;
pub mod model;
pub mod planted;
pub mod policy;
pub mod reader;
pub mod register;
pub mod relay;
pub mod rng;
pub mod session;
pub mod signing;
#[cfg(test)]
mod testing;
pub mod trust;
pub mod wire;

pub use document::{DocumentError, PublishedDocument};
pub use loaded::LoadedDocuments;
pub use model::{
    Coding, DataClass, DocId, DocMeta, ITEM_FORMAT, Item, ModelError, NhsNumber, OdsCode, OrgKind,
    Section, moved,
};
pub use reader::{FrameReader, ReadInput};
pub use session::{
    ChangesToSend, Checkpoint, Event, FeedEntry, HeldChanges, HeldDocument, HostError, OfferPage,
    Refusal, Session, SessionError, SessionStats, SyncHost, VerifiedBytes, VerifiedDocument,
};
pub use signing::{
    AuditCheckpoint, CheckpointError, PublisherKey, SignatureError, SignedCheckpoint, SignedHeads,
};
pub use trust::{
    KeyRefusal, KeyStanding, Organisation, Registry, RegistryFile, TrustError, VerifiedRegistry,
};
pub use wire::{FeedId, Message, WireError};
