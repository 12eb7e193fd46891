//! The invariants, checked against the nodes' SQLite stores. Ground truth is each
//! publisher's own store: what it published and the patient's choices it recorded.

use crate::Violation;
use caremesh_storage::StorageError;
use caremesh_storage::sync_host::StoreHost;
use caremesh_sync::policy::{self, Agreements, Consent, Decision, Facts, Recipient};
use caremesh_sync::{
    DocId, DocMeta, NhsNumber, OdsCode, OrgKind, PublishedDocument, Section, SignedHeads, SyncHost,
};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// What the invariants read of the simulated region: its nodes (by index), their stores,
/// the links between them and what each publisher committed. The world implements it; the
/// checks know nothing else of it.
pub(crate) trait Region {
    fn node_count(&self) -> usize;
    fn ods(&self, node: usize) -> &OdsCode;
    fn kind(&self, node: usize) -> OrgKind;
    /// The patients the scenario puts on `node`'s caseload.
    fn caseload(&self, node: usize) -> &[NhsNumber];
    /// `node`'s store, unless its process is down.
    fn host(&self, node: usize) -> Option<&StoreHost>;
    /// `node`'s consent defaults, for its patients without a recorded choice.
    fn defaults(&self, node: usize) -> Consent;
    /// The nodes `node` dials or is dialled by.
    fn peers_of(&self, node: usize) -> &BTreeSet<usize>;
    fn index_of(&self, code: &str) -> usize;
    fn is_lost_for_good(&self, node: usize) -> bool;
    fn now_s(&self) -> f64;
    fn agreements(&self) -> &Agreements;
    /// (publisher, doc) → the heads it committed last: what must never be lost.
    fn committed(&self) -> &BTreeMap<(usize, DocId), Vec<[u8; 32]>>;
}

/// A document version held by a node.
#[derive(Debug, Clone)]
pub struct Held {
    pub meta: DocMeta,
    pub heads: Vec<[u8; 32]>,
}

type HeldByNode = [Option<BTreeMap<DocId, Held>>];

/// Every document `host` holds, with the heads of its signed version.
pub fn held_documents(host: &StoreHost) -> Result<BTreeMap<DocId, Held>, StorageError> {
    let rows = host.store.feed_after(0, usize::MAX)?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let heads = SignedHeads::decode(&row.signed)
                .map(|s| s.heads)
                .unwrap_or_default();
            (
                row.meta.id(),
                Held {
                    meta: row.meta,
                    heads,
                },
            )
        })
        .collect())
}

/// What policy needs, from ground truth: who cares for whom (has published about them) and
/// each publisher's recorded choices.
struct Truth<'w> {
    world: &'w dyn Region,
    cares: BTreeSet<(usize, NhsNumber)>,
    consent: BTreeMap<(usize, NhsNumber), Consent>,
    with_consent: bool,
}

impl<'w> Truth<'w> {
    fn new(world: &'w dyn Region, held: &HeldByNode, with_consent: bool) -> Truth<'w> {
        let mut cares = BTreeSet::new();
        for (node, docs) in held.iter().enumerate() {
            for entry in docs.iter().flat_map(|d| d.values()) {
                // An access record is not care (as `CareLookup::has_published_about`).
                if entry.meta.publisher == *world.ods(node)
                    && entry.meta.section != caremesh_sync::Section::Audit
                {
                    cares.insert((node, entry.meta.patient.clone()));
                }
            }
        }
        Truth {
            world,
            cares,
            consent: BTreeMap::new(),
            with_consent,
        }
    }

    fn consent_at(&mut self, publisher: usize, patient: &NhsNumber) -> Consent {
        if !self.with_consent {
            return Consent::SENT_BY_PUBLISHER;
        }
        let key = (publisher, patient.clone());
        if let Some(consent) = self.consent.get(&key) {
            return *consent;
        }
        let recorded = self.world.host(publisher).and_then(|host| {
            host.store
                .care()
                .recorded_consent(self.world.ods(publisher), patient)
                .ok()
                .flatten()
        });
        let consent = recorded.unwrap_or(self.world.defaults(publisher));
        self.consent.insert(key, consent);
        consent
    }

    fn decide(&mut self, meta: &DocMeta, publisher: usize, recipient: usize) -> Decision {
        let consent = self.consent_at(publisher, &meta.patient);
        let cares = self.cares.contains(&(recipient, meta.patient.clone()));
        decide(self.world, meta, publisher, recipient, consent, cares)
    }
}

/// `policy::decide` for a simulated recipient, with the facts given and the rest looked up.
fn decide(
    world: &dyn Region,
    meta: &DocMeta,
    publisher: usize,
    recipient: usize,
    consent: Consent,
    cares: bool,
) -> Decision {
    let facts = Facts {
        publisher_kind: Some(world.kind(publisher)),
        consent,
        recipient_cares_for_patient: cares,
        direct_from_publisher: world.peers_of(recipient).contains(&publisher),
    };
    let to = Recipient {
        ods: world.ods(recipient).clone(),
        kind: world.kind(recipient),
    };
    policy::decide(meta, &to, world.agreements(), &facts)
}

fn violation(world: &dyn Region, node: usize, doc: DocId, rule: &str, detail: String) -> Violation {
    Violation {
        at_s: world.now_s(),
        node: world.ods(node).to_string(),
        doc: doc.to_string(),
        rule: rule.into(),
        detail,
    }
}

/// Documents held where policy forbids them. Mid-run (`with_consent` false) only the rules
/// that need no propagation are checked (private, sensitive, agreements, caseload); at the
/// end the patients' choices too, since withdrawals must have been applied everywhere.
pub fn forbidden(world: &dyn Region, held: &HeldByNode, with_consent: bool) -> Vec<Violation> {
    let mut truth = Truth::new(world, held, with_consent);
    let mut found = Vec::new();
    for (node, docs) in held.iter().enumerate() {
        for (doc, entry) in docs.iter().flat_map(|d| d.iter()) {
            if entry.meta.publisher == *world.ods(node) {
                continue;
            }
            let publisher = world.index_of(entry.meta.publisher.as_str());
            if let Decision::Withhold(reason) = truth.decide(&entry.meta, publisher, node) {
                found.push(violation(
                    world,
                    node,
                    *doc,
                    "nothing-forbidden",
                    format!(
                        "holds a {} document of {}: {reason}",
                        entry.meta.class, entry.meta.publisher
                    ),
                ));
            }
        }
    }
    found
}

/// Whether `recipient` may receive the document `meta` describes, by the rules that need
/// no propagation (private, sensitive, agreements, caseload). Applied to every document that
/// crosses the simulated wire: invariant 2 holds for the wire, not only for storage.
pub fn forbidden_on_wire(world: &dyn Region, recipient: usize, meta: &DocMeta) -> Option<String> {
    let publisher = world.index_of(meta.publisher.as_str());
    if publisher == recipient {
        return None;
    }
    let cares = world.caseload(recipient).contains(&meta.patient);
    let consent = Consent::SENT_BY_PUBLISHER;
    match decide(world, meta, publisher, recipient, consent, cares) {
        Decision::Send => None,
        Decision::Withhold(reason) => Some(reason.to_string()),
    }
}

/// Documents an entitled node does not hold at the publisher's version. Entitled: policy
/// lets it hold the document, and a path of peers that may also hold it leads from the
/// publisher to it. Nodes that are down are left out on both sides; nodes lost for good are
/// not required, but nor do they hide those only they could reach.
pub fn missing(world: &dyn Region, held: &HeldByNode) -> Vec<Violation> {
    let mut truth = Truth::new(world, held, true);
    let mut found = Vec::new();
    for (publisher, docs) in held.iter().enumerate() {
        let Some(docs) = docs else { continue };
        for (doc, entry) in docs {
            if entry.meta.publisher != *world.ods(publisher) {
                continue;
            }
            for node in entitled(world, &mut truth, held, publisher, &entry.meta) {
                let holds = held[node]
                    .as_ref()
                    .and_then(|d| d.get(doc))
                    .is_some_and(|h| h.heads == entry.heads);
                if !holds {
                    found.push(violation(
                        world,
                        node,
                        *doc,
                        "convergence",
                        format!(
                            "lacks the latest {} {} document of {}",
                            entry.meta.class, entry.meta.section, entry.meta.publisher
                        ),
                    ));
                }
            }
        }
    }
    found
}

fn entitled(
    world: &dyn Region,
    truth: &mut Truth<'_>,
    held: &HeldByNode,
    publisher: usize,
    meta: &DocMeta,
) -> Vec<usize> {
    let mut reached = BTreeSet::from([publisher]);
    let mut queue = VecDeque::from([publisher]);
    let mut entitled = Vec::new();
    while let Some(from) = queue.pop_front() {
        for &next in world.peers_of(from) {
            // A node down for now blocks the path until it is back; a node lost for good
            // does not excuse those that could only be reached through it: the region must
            // route around it (failover), so it is passed through but not required.
            let lost = world.is_lost_for_good(next);
            if reached.contains(&next) || (held[next].is_none() && !lost) {
                continue;
            }
            reached.insert(next);
            if truth.decide(meta, publisher, next) == Decision::Send {
                if !lost {
                    entitled.push(next);
                }
                queue.push_back(next);
            }
        }
    }
    entitled
}

/// Changes a publisher committed that its store no longer has.
pub fn lost(world: &dyn Region, held: &HeldByNode) -> Vec<Violation> {
    let mut found = Vec::new();
    for ((node, doc), heads) in world.committed() {
        let Some(docs) = &held[*node] else { continue };
        let kept = match docs.get(doc) {
            Some(entry) if entry.heads == *heads => true,
            Some(entry) => world
                .host(*node)
                .and_then(|host| host.store.document(*doc).ok().flatten())
                .and_then(|stored| PublishedDocument::load(&entry.meta, &stored.snapshot).ok())
                .is_some_and(|document| document.contains_all(heads)),
            None => false,
        };
        if !kept {
            found.push(violation(
                world,
                *node,
                *doc,
                "no-loss",
                "a committed change of its own is no longer held".into(),
            ));
        }
    }
    found
}

/// Stored documents that do not verify: signature by a registered key, and content with
/// exactly the signed heads.
/// Every node's audit trail must verify: entries numbered from 1, each linked to the one
/// before, each hash matching its content.
pub fn broken_audit_chains(world: &dyn Region) -> Vec<Violation> {
    let mut found = Vec::new();
    for node in 0..world.node_count() {
        let Some(host) = world.host(node) else {
            continue;
        };
        let problem = match host.store.audit_events() {
            Ok(events) => caremesh_storage::audit::verify_chain(&events)
                .err()
                .map(|b| b.to_string()),
            Err(error) => Some(error.to_string()),
        };
        if let Some(problem) = problem {
            found.push(Violation {
                at_s: world.now_s(),
                node: world.ods(node).to_string(),
                doc: String::new(),
                rule: "audit-chain".into(),
                detail: problem,
            });
        }
    }
    found
}

pub fn inauthentic(world: &dyn Region) -> Vec<Violation> {
    let mut found = Vec::new();
    for node in 0..world.node_count() {
        let Some(host) = world.host(node) else {
            continue;
        };
        let Ok(docs) = held_documents(host) else {
            continue;
        };
        for doc in docs.keys() {
            let problem = match host.store.document(*doc) {
                Ok(Some(stored)) => match SignedHeads::decode(&stored.signed) {
                    None => Some("signed heads do not decode".to_string()),
                    Some(signed) => signed
                        .verify(|publisher, key| host.is_publisher_key(publisher, key))
                        .err()
                        .map(|e| e.to_string())
                        .or_else(|| {
                            PublishedDocument::load(&stored.meta, &stored.snapshot)
                                .and_then(|d| d.matches(&signed))
                                .err()
                                .map(|e| e.to_string())
                        }),
                },
                Ok(None) => None,
                Err(error) => Some(error.to_string()),
            };
            if let Some(problem) = problem {
                found.push(violation(world, node, *doc, "authentic", problem));
            }
        }
    }
    found
}

/// As [`caremesh_storage::Store::resources_on_several_patients`], read from the items of the
/// documents `host` holds rather than from its read model.
fn resources_on_several_patients_in_documents(
    host: &StoreHost,
    publisher: Option<&OdsCode>,
) -> Result<Vec<caremesh_storage::OnSeveralPatients>, StorageError> {
    let mut patients_of: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for (doc, held) in held_documents(host)? {
        let meta = &held.meta;
        if publisher.is_some_and(|p| *p != meta.publisher)
            || matches!(meta.section, Section::Sharing | Section::Audit)
        {
            continue;
        }
        let Some(stored) = host.store.document(doc)? else {
            continue;
        };
        // A document that does not load is the authenticity check's to report.
        let Ok(items) =
            PublishedDocument::load(meta, &stored.snapshot).and_then(|document| document.items())
        else {
            continue;
        };
        for item in items.into_iter().filter(|item| !item.id.contains('#')) {
            patients_of
                .entry((meta.publisher.to_string(), item.id))
                .or_default()
                .insert(meta.patient.to_string());
        }
    }
    Ok(patients_of
        .into_iter()
        .filter(|(_, patients)| patients.len() > 1)
        .map(
            |((publisher, item_id), patients)| caremesh_storage::OnSeveralPatients {
                publisher,
                item_id,
                patients: patients.into_iter().collect(),
            },
        )
        .collect())
}

/// Entries of one publisher held on two patients. At the publisher always (it moves an
/// entry in one transaction); at every node once converged (mid-run a recipient may hold the
/// new patient's document before the old one's, so `everywhere` is for the end).
pub fn on_two_patients(world: &dyn Region, everywhere: bool) -> Vec<Violation> {
    let mut found = Vec::new();
    for node in 0..world.node_count() {
        let Some(host) = world.host(node) else {
            continue;
        };
        let own = world.ods(node);
        let publisher = (!everywhere).then_some(own);
        // A hub keeps no read model of clinical items: what it holds is its documents.
        let held = if world.kind(node) == OrgKind::Hub {
            resources_on_several_patients_in_documents(host, publisher)
        } else {
            host.store.resources_on_several_patients(publisher)
        };
        let problems = match held {
            Ok(held) => held
                .into_iter()
                .map(|h| {
                    format!(
                        "holds {}'s {} on {} patients",
                        h.publisher,
                        h.item_id,
                        h.patients.len()
                    )
                })
                .collect(),
            Err(error) => vec![error.to_string()],
        };
        for detail in problems {
            found.push(Violation {
                at_s: world.now_s(),
                node: own.to_string(),
                doc: String::new(),
                rule: "one-patient-per-resource".into(),
                detail,
            });
        }
    }
    found
}
