//! The host a simulated node runs: the node's real `StoreHost`, with an optional injected
//! bug, so that a scenario can show the invariants catch what they are there to catch.

use crate::scenario::Bug;
use caremesh_storage::sync_host::StoreHost;
use caremesh_sync::policy::{Decision, Recipient};
use caremesh_sync::{
    Checkpoint, DocId, DocMeta, FeedEntry, FeedId, HeldDocument, HostError, LoadedDocuments,
    OdsCode, Refusal, SyncHost, VerifiedDocument,
};

pub(crate) struct SimHost {
    pub inner: StoreHost,
    pub bug: Option<Bug>,
}

impl SyncHost for SimHost {
    fn feed_id(&self) -> FeedId {
        self.inner.feed_id()
    }
    fn feed_tip(&mut self) -> Result<u64, HostError> {
        self.inner.feed_tip()
    }
    fn feed_after(&mut self, after: u64, limit: usize) -> Result<Vec<FeedEntry>, HostError> {
        self.inner.feed_after(after, limit)
    }
    fn backfill(&mut self, peer: &OdsCode, limit: usize) -> Result<Vec<FeedEntry>, HostError> {
        self.inner.backfill(peer, limit)
    }
    fn backfill_done(&mut self, peer: &OdsCode, docs: &[DocId]) -> Result<(), HostError> {
        self.inner.backfill_done(peer, docs)
    }
    fn held_heads(&mut self, doc: DocId) -> Result<Option<Vec<[u8; 32]>>, HostError> {
        self.inner.held_heads(doc)
    }
    fn document(&mut self, doc: DocId) -> Result<Option<HeldDocument>, HostError> {
        self.inner.document(doc)
    }
    fn loaded_documents(&mut self) -> Option<&mut LoadedDocuments> {
        self.inner.loaded_documents()
    }
    fn commit(
        &mut self,
        peer: &OdsCode,
        documents: Vec<VerifiedDocument>,
        checkpoint: Option<Checkpoint>,
    ) -> Result<Vec<Refusal>, HostError> {
        if self.bug == Some(Bug::AckWithoutStoring) {
            // The bug: the checkpoint moves (and the session acknowledges) without the
            // documents it covers.
            return self.inner.commit(peer, Vec::new(), checkpoint);
        }
        self.inner.commit(peer, documents, checkpoint)
    }
    fn checkpoint(&mut self, peer: &OdsCode) -> Result<Option<Checkpoint>, HostError> {
        self.inner.checkpoint(peer)
    }
    fn own_audit_checkpoint(&mut self) -> Result<Option<Vec<u8>>, HostError> {
        self.inner.own_audit_checkpoint()
    }
    fn witness_audit_checkpoint(
        &mut self,
        peer: &OdsCode,
        checkpoint: &caremesh_sync::SignedCheckpoint,
    ) -> Result<(), HostError> {
        self.inner.witness_audit_checkpoint(peer, checkpoint)
    }
    fn witnessed_audit_checkpoints(&mut self, peer: &OdsCode) -> Result<Vec<Vec<u8>>, HostError> {
        self.inner.witnessed_audit_checkpoints(peer)
    }
    fn audit_checkpoint_witnessed(
        &mut self,
        witness: &OdsCode,
        checkpoint: &caremesh_sync::SignedCheckpoint,
    ) -> Result<(), HostError> {
        self.inner.audit_checkpoint_witnessed(witness, checkpoint)
    }
    fn is_publisher_key(&self, publisher: &OdsCode, key: &[u8; 32]) -> bool {
        self.inner.is_publisher_key(publisher, key)
    }
    fn decide(&self, meta: &DocMeta, recipient: &Recipient) -> Result<Decision, HostError> {
        if self.bug == Some(Bug::ForwardWithheld) {
            // The bug: every document goes to every peer, whatever policy says.
            return Ok(Decision::Send);
        }
        self.inner.decide(meta, recipient)
    }
    fn registry_version(&self) -> u64 {
        self.inner.registry_version()
    }
    fn registry_bytes(&self) -> Option<Vec<u8>> {
        self.inner.registry_bytes()
    }
    fn offer_registry(&mut self, bytes: Vec<u8>) -> Result<bool, HostError> {
        self.inner.offer_registry(bytes)
    }
}
