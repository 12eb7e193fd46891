//! Wire messages and framing.
//!
//! A frame is a 4-byte big-endian length followed by a postcard envelope `(version, Message)`.
//! The length is checked against [`MAX_FRAME_BYTES`] before a byte of the body is buffered, so a
//! peer announcing a huge frame costs us nothing. postcard, not bincode: bincode is
//! unmaintained (RUSTSEC-2025-0141).

use crate::model::{DocId, DocMeta, OdsCode};
use serde::{Deserialize, Serialize};

/// The envelope version this build speaks. A peer speaking another is refused with a reason.
/// 4 added [`Message::Pushed`].
pub const PROTOCOL_VERSION: u8 = 4;

/// The QUIC ALPN identifier of this protocol.
pub const ALPN: &[u8] = b"caremesh/1";

/// Largest frame accepted or produced. A document's changes travel in one frame; a patient's
/// section, even with years of history, is far below this.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// Most entries in one offer.
pub const MAX_OFFER_ENTRIES: usize = 512;

/// Identifies one node database's changes feed. Feed positions are meaningful only within a
/// feed; a rebuilt database gets a new feed id, and peers then start from the beginning.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct FeedId(pub [u8; 16]);

impl std::fmt::Debug for FeedId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FeedId({})", hex::encode(self.0))
    }
}

/// One document version in a feed offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferEntry {
    pub doc: DocId,
    pub heads: Vec<[u8; 32]>,
}

/// A document the puller lacks, with the heads it has (empty when it has nothing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WantEntry {
    pub doc: DocId,
    pub have: Vec<[u8; 32]>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// First message each way: who we are, which feed we serve and in which of its epochs,
    /// our registry edition.
    Hello {
        node: OdsCode,
        feed: FeedId,
        epoch: u64,
        registry_version: u64,
    },
    /// Subscribe to the peer's feed after position `since` (0: from the start), a position
    /// taken in feed `feed`, epoch `epoch`. The peer answers with [`Message::Resume`].
    Pull {
        feed: FeedId,
        epoch: u64,
        since: u64,
    },
    /// The answer to a Pull: offers follow for positions after `after`. It is the Pull's
    /// `since` when the feed still holds it; earlier when the feed lost positions the puller
    /// had taken (the feed's epoch ended before them) or is another feed (then 0).
    Resume {
        after: u64,
    },
    /// Document versions in the feed up to position `up_to` (entries the recipient may not
    /// hold are left out, but `up_to` still moves past them). `tip` is the feed's end.
    Offer {
        entries: Vec<OfferEntry>,
        up_to: u64,
        tip: u64,
    },
    /// The offered documents the puller lacks.
    Want {
        docs: Vec<WantEntry>,
    },
    /// What a wanted document's holder lacks (the whole saved document for a first copy, the
    /// missing raw changes otherwise), with the publisher's signed heads.
    Changes {
        meta: DocMeta,
        changes: Vec<Vec<u8>>,
        signed: Vec<u8>,
    },
    /// A wanted document the provider no longer holds or may no longer send.
    Missing {
        doc: DocId,
    },
    /// The puller holds everything offered up to `up_to`, durably.
    Ack {
        up_to: u64,
    },
    /// Please send your registry: yours is a newer edition than mine.
    RegistryWanted,
    Registry {
        bytes: Vec<u8>,
    },
    /// The sender's newest signed audit checkpoint ([`crate::SignedCheckpoint`]), for the
    /// receiver to hold as a witness outside the sender.
    AuditCheckpoint {
        signed: Vec<u8>,
    },
    /// The receiver's own audit checkpoints the sender holds as witness, newest first.
    AuditWitness {
        signed: Vec<Vec<u8>>,
    },
    /// A new version's changes sent ahead of the offer that names it, to a peer the provider
    /// believes holds the document at `base`: as [`Message::Changes`] would bring them for a
    /// Want naming `base`, without the round trip of the Want. The puller takes them only onto
    /// a copy held at exactly `base`, and otherwise lets the offer that follows ask as usual.
    Pushed {
        base: Vec<[u8; 32]>,
        meta: DocMeta,
        changes: Vec<Vec<u8>>,
        signed: Vec<u8>,
    },
}

impl Message {
    /// The message's name, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Pull { .. } => "pull",
            Message::Resume { .. } => "resume",
            Message::Offer { .. } => "offer",
            Message::Want { .. } => "want",
            Message::Changes { .. } => "changes",
            Message::Missing { .. } => "missing",
            Message::Ack { .. } => "ack",
            Message::RegistryWanted => "registry-wanted",
            Message::Registry { .. } => "registry",
            Message::AuditCheckpoint { .. } => "audit-checkpoint",
            Message::AuditWitness { .. } => "audit-witness",
            Message::Pushed { .. } => "pushed",
        }
    }

    /// The documents the message names.
    pub fn doc_ids(&self) -> Vec<DocId> {
        match self {
            Message::Offer { entries, .. } => entries.iter().map(|e| e.doc).collect(),
            Message::Want { docs } => docs.iter().map(|w| w.doc).collect(),
            Message::Changes { meta, .. } | Message::Pushed { meta, .. } => vec![meta.id()],
            Message::Missing { doc } => vec![*doc],
            _ => Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum WireError {
    #[error("frame of {0} bytes announced, over the {MAX_FRAME_BYTES} byte limit")]
    FrameTooLarge(usize),
    #[error("frame does not decode as a caremesh message: {0}")]
    Undecodable(String),
    #[error("peer speaks protocol version {0}; this node speaks {PROTOCOL_VERSION}")]
    Version(u8),
}

/// Encodes one message as a frame.
pub fn encode_frame(message: &Message) -> Result<Vec<u8>, WireError> {
    let mut frame = vec![0u8; 4];
    postcard::to_io(&(PROTOCOL_VERSION, message), &mut frame)
        .map_err(|e| WireError::Undecodable(e.to_string()))?;
    let length = frame.len() - 4;
    if length > MAX_FRAME_BYTES {
        return Err(WireError::FrameTooLarge(length));
    }
    frame[..4].copy_from_slice(&(length as u32).to_be_bytes());
    Ok(frame)
}

/// Splits a byte stream into messages, holding at most one frame's worth of bytes.
#[derive(Default)]
pub struct FrameDecoder {
    buffer: Vec<u8>,
}

impl FrameDecoder {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// Bytes received but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// The next whole message, if one has arrived.
    pub fn next_message(&mut self) -> Result<Option<Message>, WireError> {
        if self.buffer.len() < 4 {
            return Ok(None);
        }
        let length = u32::from_be_bytes(self.buffer[..4].try_into().expect("4 bytes")) as usize;
        if length > MAX_FRAME_BYTES {
            return Err(WireError::FrameTooLarge(length));
        }
        if self.buffer.len() < 4 + length {
            return Ok(None);
        }
        let body = &self.buffer[4..4 + length];
        let decoded = match postcard::from_bytes::<(u8, Message)>(body) {
            Ok((PROTOCOL_VERSION, message)) => Ok(message),
            Ok((version, _)) => Err(WireError::Version(version)),
            Err(error) => match body.first() {
                Some(&version) if version != PROTOCOL_VERSION => Err(WireError::Version(version)),
                _ => Err(WireError::Undecodable(error.to_string())),
            },
        };
        self.buffer.drain(..4 + length);
        decoded.map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Message {
        Message::Hello {
            node: OdsCode::parse("A81001").unwrap(),
            feed: FeedId([3; 16]),
            epoch: 5,
            registry_version: 4,
        }
    }

    #[test]
    fn frames_survive_arbitrary_splitting() {
        let messages = [
            hello(),
            Message::Ack { up_to: 9 },
            Message::Pull {
                feed: FeedId([1; 16]),
                epoch: 2,
                since: 77,
            },
            Message::Resume { after: 70 },
        ];
        let stream: Vec<u8> = messages
            .iter()
            .flat_map(|m| encode_frame(m).unwrap())
            .collect();
        for chunk in [1, 2, 3, 5, 7, 64] {
            let mut decoder = FrameDecoder::default();
            let mut decoded = Vec::new();
            for piece in stream.chunks(chunk) {
                decoder.push(piece);
                while let Some(message) = decoder.next_message().unwrap() {
                    decoded.push(message);
                }
            }
            assert_eq!(decoded, messages, "chunk size {chunk}");
            assert_eq!(decoder.buffered(), 0);
        }
    }

    #[test]
    fn an_oversized_frame_is_refused_from_its_header_alone() {
        let mut decoder = FrameDecoder::default();
        decoder.push(&(MAX_FRAME_BYTES as u32 + 1).to_be_bytes());
        assert_eq!(
            decoder.next_message(),
            Err(WireError::FrameTooLarge(MAX_FRAME_BYTES + 1))
        );
    }

    #[test]
    fn garbage_and_other_versions_are_errors_not_panics() {
        let mut decoder = FrameDecoder::default();
        decoder.push(&[0, 0, 0, 3, PROTOCOL_VERSION, 0xff, 0xff]);
        assert!(matches!(
            decoder.next_message(),
            Err(WireError::Undecodable(_))
        ));
        let mut frame = encode_frame(&hello()).unwrap();
        frame[4] = 9;
        let mut decoder = FrameDecoder::default();
        decoder.push(&frame);
        assert_eq!(decoder.next_message(), Err(WireError::Version(9)));
        // Random bytes never panic.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            let mut decoder = FrameDecoder::default();
            let mut bytes = vec![0, 0, 0, 24];
            for _ in 0..24 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                bytes.push(state as u8);
            }
            decoder.push(&bytes);
            let _ = decoder.next_message();
        }
    }
}
