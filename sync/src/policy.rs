//! The one decision every outgoing document passes through.
//!
//! The sharing-rules work fills this in (Share Out, objections, agreements, sensitive items).
//! What holds already: private documents never leave their publisher.

use crate::model::{DataClass, DocMeta, OdsCode, OrgKind};

/// Who a document would go to.
#[derive(Debug, Clone)]
pub struct Recipient {
    pub ods: OdsCode,
    pub kind: OrgKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Send,
    Withhold(WithholdReason),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WithholdReason {
    /// Marked private at the recording organisation: visible only there.
    Private,
}

impl std::fmt::Display for WithholdReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WithholdReason::Private => f.write_str("private to the recording organisation"),
        }
    }
}

/// Decides whether `recipient` may hold the document described by `meta`.
pub fn decide(meta: &DocMeta, recipient: &Recipient) -> Decision {
    if meta.class == DataClass::Private && meta.publisher != recipient.ods {
        return Decision::Withhold(WithholdReason::Private);
    }
    Decision::Send
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{NhsNumber, Section};

    #[test]
    fn private_documents_stay_with_their_publisher() {
        let meta = DocMeta {
            publisher: OdsCode::parse("A81001").unwrap(),
            patient: NhsNumber::parse("9912003888").unwrap(),
            section: Section::Problems,
            class: DataClass::Private,
        };
        let hub = Recipient {
            ods: OdsCode::parse("HUB01").unwrap(),
            kind: OrgKind::Hub,
        };
        assert_eq!(
            decide(&meta, &hub),
            Decision::Withhold(WithholdReason::Private)
        );
        let itself = Recipient {
            ods: meta.publisher.clone(),
            kind: OrgKind::Gp,
        };
        assert_eq!(decide(&meta, &itself), Decision::Send);
    }
}
