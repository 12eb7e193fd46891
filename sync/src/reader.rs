//! Reading a connection's bytes where they arrive, before the engine sees them.
//!
//! A node has one engine thread, which orders everything and owns the store's writer; the
//! bytes of its connections arrive on other threads. [`FrameReader`] is the part of a
//! session's work that needs neither the store nor the session's state: cutting the byte
//! stream into frames, decoding them, and checking each received document's signature
//! against the key it names (the arithmetic of ed25519, a relay's largest cost after
//! storage). The engine is handed a [`ReadInput`] and does the rest: whether that key is a
//! trusted key of the document's publisher, the hash chain, policy, the store.
//!
//! Splitting the check this way changes nothing a node accepts. The signature is checked
//! exactly once, on the exact [`SignedHeads`] the engine goes on to use (it never decodes the
//! signed bytes again), and whether the key is trusted is decided on the engine thread at the
//! moment of storing, so a registry change between reading and storing still counts.
//! A [`CheckedHeads`] can only be made here: its fields are private to this crate.

use crate::signing::{SignatureError, SignedHeads, VerifyingKeys};
use crate::wire::{FrameDecoder, Message, WireError};

/// One connection's reader: feed it the bytes in the order they arrived.
#[derive(Default)]
pub struct FrameReader {
    decoder: FrameDecoder,
    /// The keys of the signed heads read so far, decompressed.
    keys: VerifyingKeys,
    /// The stream failed to decode: nothing after the failure means anything.
    failed: bool,
}

/// What a reader made of some bytes: the whole messages in them, in order, and the error
/// that ended the stream, if it did (messages before it still count: they arrived intact).
#[derive(Debug)]
pub struct ReadInput {
    pub(crate) messages: Vec<ReadMessage>,
    pub(crate) bytes: usize,
    pub(crate) error: Option<WireError>,
}

/// A decoded message, with its signed heads checked if it carries a document.
#[derive(Debug)]
pub(crate) struct ReadMessage {
    pub(crate) message: Message,
    /// For [`Message::Changes`] and [`Message::Pushed`]: its signed heads, decoded and checked against their own key;
    /// `None` when they do not decode.
    pub(crate) heads: Option<CheckedHeads>,
}

/// Signed heads whose signature was checked against the key they name. Whether that key is
/// trusted for the publisher is still to be decided.
#[derive(Debug)]
pub(crate) struct CheckedHeads {
    pub(crate) heads: SignedHeads,
    pub(crate) signature: Result<(), SignatureError>,
}

impl FrameReader {
    /// Reads `bytes`, the next part of the connection's stream.
    pub fn read(&mut self, bytes: &[u8]) -> ReadInput {
        let mut input = ReadInput {
            messages: Vec::new(),
            bytes: bytes.len(),
            error: None,
        };
        if self.failed {
            return input;
        }
        self.decoder.push(bytes);
        loop {
            match self.decoder.next_message() {
                Ok(Some(message)) => {
                    let heads = match &message {
                        Message::Changes { signed, .. } | Message::Pushed { signed, .. } => {
                            check_heads(signed, &mut self.keys)
                        }
                        _ => None,
                    };
                    input.messages.push(ReadMessage { message, heads });
                }
                Ok(None) => break,
                Err(error) => {
                    self.failed = true;
                    input.error = Some(error);
                    break;
                }
            }
        }
        input
    }

    /// Bytes received but not yet a whole frame.
    pub fn buffered(&self) -> usize {
        self.decoder.buffered()
    }
}

impl ReadInput {
    /// Messages read, whole.
    pub fn messages(&self) -> usize {
        self.messages.len()
    }
}

fn check_heads(signed: &[u8], keys: &mut VerifyingKeys) -> Option<CheckedHeads> {
    let heads = SignedHeads::decode(signed)?;
    let signature = heads.check_signature_with(keys);
    Some(CheckedHeads { heads, signature })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DataClass, DocMeta, Section};
    use crate::signing::PublisherKey;
    use crate::testing::meta_for;
    use crate::wire::encode_frame;

    fn meta() -> DocMeta {
        meta_for("A81001", "9912003888", Section::Allergies, DataClass::Coded)
    }

    fn changes_frame(signed: Vec<u8>) -> Vec<u8> {
        encode_frame(&Message::Changes {
            meta: meta(),
            changes: vec![],
            signed,
        })
        .unwrap()
    }

    fn signed_heads() -> SignedHeads {
        PublisherKey::from_secret([7; 32]).sign_heads(&meta(), &[[1; 32]])
    }

    #[test]
    fn a_documents_signature_is_checked_as_it_is_read() {
        let good = signed_heads();
        let mut forged = good.clone();
        forged.heads = vec![[2; 32]];
        let mut frames = changes_frame(good.encode());
        frames.extend(changes_frame(forged.encode()));
        frames.extend(changes_frame(b"not signed heads".to_vec()));

        // Split mid-frame: a frame is read once it is whole.
        let mut reader = FrameReader::default();
        let first = reader.read(&frames[..7]);
        assert_eq!((first.messages(), first.bytes), (0, 7));
        let rest = reader.read(&frames[7..]);
        assert!(rest.error.is_none());
        let checked: Vec<_> = rest.messages.iter().map(|m| m.heads.as_ref()).collect();
        assert_eq!(checked.len(), 3);
        let good_read = checked[0].expect("decodes");
        assert_eq!((&good_read.heads, &good_read.signature), (&good, &Ok(())));
        assert!(matches!(
            checked[1].expect("decodes").signature,
            Err(SignatureError::BadSignature { .. })
        ));
        assert!(checked[2].is_none(), "undecodable heads are not checked");
        assert_eq!(reader.buffered(), 0);
    }

    #[test]
    fn nothing_is_read_after_a_frame_that_does_not_decode() {
        let mut reader = FrameReader::default();
        let mut bytes = vec![0, 0, 0, 2, crate::wire::PROTOCOL_VERSION, 200];
        bytes.extend(changes_frame(signed_heads().encode()));
        let input = reader.read(&bytes);
        assert!(matches!(input.error, Some(WireError::Undecodable(_))));
        assert_eq!(input.messages(), 0);
        let after = reader.read(&changes_frame(signed_heads().encode()));
        assert!(after.error.is_none() && after.messages.is_empty());
    }
}
