//! The simulated region: nodes with real SQLite stores and real sync sessions, a network of
//! links between them, and one queue of events in virtual time.
//!
//! Everything that happens is an event taken from the queue in (time, sequence) order, and
//! every random choice comes from the one seeded generator, so a run is a function of the
//! scenario and the seed. Each event also feeds the trace hash.

mod connections;

use crate::check::{self, Held, Region};
use crate::network::{Blocked, LinkState};
use crate::scenario::{FaultKind, Invariant, LinkSpec, Scenario};
use crate::{Report, Violation};
use caremesh_engine::{Driver, DriverOptions};
use caremesh_storage::audit::AuditEvent;
use caremesh_storage::publish::{Publication, record_access};
use caremesh_storage::simulated_disk::SimulatedDisk;
use caremesh_storage::sync_host::{FixedRegistry, StoreHost};
use caremesh_storage::{Placement, Store, power_loss};
use caremesh_sync::policy::{Agreements, Consent};
use caremesh_sync::rng::Rng;
use caremesh_sync::{
    DataClass, Item, NhsNumber, OdsCode, OrgKind, Organisation, PublisherKey, Registry,
    RegistryFile, Section, VerifiedRegistry,
};
use sha2::{Digest, Sha256};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Unix time at virtual time zero (22 November 2026): what the nodes' clocks read.
pub const EPOCH_S: i64 = 1_795_305_600;
/// A connection with no packet through for this long is closed (quinn's idle timeout in
/// `node::network`).
pub const IDLE_TIMEOUT_MS: u64 = 20_000;

/// Documents each simulated node keeps loaded: small, so eviction and reloading happen too.
const SIMULATED_LOADED_DOCUMENTS: usize = 32;
/// A mid-write power cut strikes at one of the node's next this-many writes or syncs.
const MID_WRITE_OPERATIONS: u64 = 40;
/// A mid-write power cut that found no write to strike in this long strikes at rest.
const POWER_CUT_DUE_MS: u64 = 30_000;

const SECTIONS: [Section; 6] = [
    Section::Problems,
    Section::Medications,
    Section::Allergies,
    Section::Results,
    Section::Encounters,
    Section::Documents,
];

pub(crate) struct Node {
    pub ods: OdsCode,
    pub kind: OrgKind,
    key: PublisherKey,
    db: PathBuf,
    /// The node's sync engine, which owns its store: `None` while the process is down.
    pub driver: Option<Driver>,
    /// When the driver's timer is armed (virtual ms); an earlier timer event is stale.
    timer: Option<u64>,
    bug: Option<crate::scenario::Bug>,
    dials: Vec<usize>,
    pub skew_ms: i64,
    pub caseload: Vec<NhsNumber>,
    defaults: Consent,
    link: LinkSpec,
    /// The node's disk, whose faults make its commits fail; it outlives crashes.
    disk: Arc<SimulatedDisk>,
    /// The redial policy `node::network` uses, per peer this node dials.
    redials: BTreeMap<usize, caremesh_engine::Redial>,
    /// Bumped on every crash, so events scheduled for an earlier life are ignored.
    life: u64,
    /// A crash fault waiting for the power cut armed in the node's store (the fault's index
    /// and restart): it strikes in the middle of the node's next writes.
    power_cut: Option<(usize, Option<u64>)>,
    items_written: u64,
}

struct Conn {
    /// (dialler, listener)
    ends: [usize; 2],
    /// Virtual ms at which it was established.
    since_ms: u64,
    in_flight: [u64; 2],
    next_free_ms: [u64; 2],
    last_arrival_ms: [u64; 2],
    /// Frames sent while the link was blocked, released when it heals.
    held: [Vec<Vec<u8>>; 2],
    last_delivery_ms: u64,
    /// Each end's reader of what arrives for it, as a node's connection task keeps one.
    readers: [caremesh_sync::FrameReader; 2],
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Dial {
        node: usize,
        peer: usize,
        life: u64,
    },
    Established {
        node: usize,
        peer: usize,
        life: u64,
    },
    Deliver {
        conn: u64,
        to: usize,
        frame: Vec<u8>,
    },
    Timer {
        node: usize,
        life: u64,
    },
    /// The node's sync of its WAL, asked for after `commit`, returned.
    Synced {
        node: usize,
        life: u64,
        commit: u64,
    },
    IdleCheck {
        conn: u64,
    },
    Change {
        node: usize,
        life: u64,
    },
    View {
        node: usize,
        life: u64,
    },
    Consent {
        index: usize,
    },
    FaultStart {
        index: usize,
    },
    FaultEnd {
        index: usize,
    },
    /// A power cut armed to strike mid-write struck nothing in time: cut it now.
    PowerCutDue {
        node: usize,
        life: u64,
    },
    Restart {
        node: usize,
    },
    FlapDown {
        index: usize,
    },
    FlapUp {
        index: usize,
    },
    Check,
}

pub(crate) struct World {
    pub scenario: Scenario,
    rng: Rng,
    now_ms: Arc<AtomicU64>,
    queue: BinaryHeap<Reverse<(u64, u64, Event)>>,
    sequence: u64,
    pub nodes: Vec<Node>,
    conns: BTreeMap<u64, Conn>,
    pairs: BTreeMap<(usize, usize), u64>,
    next_conn: u64,
    pub links: LinkState,
    /// Each node's peers, both directions of dialling.
    peers: Vec<BTreeSet<usize>>,
    /// Each node's place in `nodes`, by ODS code (looked up for every frame checked).
    indices: BTreeMap<String, usize>,
    pub registry: Arc<VerifiedRegistry>,
    pub agreements: Agreements,
    trace: Sha256,
    pub report: Report,
    /// Heals awaiting convergence (virtual ms of the heal).
    awaiting: Vec<u64>,
    active_faults: BTreeSet<usize>,
    /// Nodes crashed with no restart: lost for good, as a failed hub that is never rebuilt.
    /// Convergence is then what the others reach without them.
    lost_for_good: BTreeSet<usize>,
    /// Nodes that found their database damaged and stopped: down until their operator
    /// restores or rebuilds them (after the run), so nothing is owed to or through them.
    stopped_for_damage: BTreeSet<usize>,
    /// (publisher, doc) → heads it committed last: what must never be lost.
    pub committed: BTreeMap<(usize, caremesh_sync::DocId), Vec<[u8; 32]>>,
    /// (puller, provider) → the furthest (provider's feed epoch, position) the puller
    /// acknowledged: a crash must leave its checkpoint there or later.
    acknowledged: BTreeMap<(usize, usize), (u64, u64)>,
}

fn sim_error(what: impl std::fmt::Display) -> crate::SimError {
    crate::SimError::Setup(what.to_string())
}

/// A valid NHS number for the `n`th patient of the region (999 range, as in tests).
fn patient_number(n: u32) -> NhsNumber {
    let mut candidate = 990_000_000u64 + u64::from(n) * 7;
    loop {
        let digits = format!("{candidate:09}");
        if let Some(check) = NhsNumber::check_digit(digits.as_bytes()) {
            return NhsNumber::parse(&format!("{digits}{check}")).expect("valid by construction");
        }
        candidate += 1;
    }
}

impl World {
    pub fn new(scenario: Scenario, seed: u64, work: &Path) -> Result<World, crate::SimError> {
        let mut rng = crate::seeded(seed);
        let now_ms = Arc::new(AtomicU64::new(0));
        let codes = scenario.codes();
        let index_of: BTreeMap<String, usize> = codes
            .iter()
            .enumerate()
            .map(|(i, (c, _))| (c.clone(), i))
            .collect();
        let mut keys = Vec::new();
        let mut registry = Registry::new(&format!("simulation {}", scenario.name));
        let agreements: Agreements =
            toml::from_str(include_str!("../../configs/agreements.toml")).map_err(sim_error)?;
        registry.sharing = agreements.clone();
        for (code, group) in &codes {
            let key = PublisherKey::from_secret(rng.bytes32());
            registry.organisations.push(Organisation {
                ods: OdsCode::parse(code).map_err(sim_error)?,
                name: format!("Simulated {code}"),
                kind: group.kind,
                keys: vec![hex::encode(key.public())],
                revoked_keys: Vec::new(),
                retired_keys: Vec::new(),
                addresses: Vec::new(),
            });
            keys.push(key);
        }
        let authority = rng.bytes32();
        let mut file = RegistryFile::unsigned(registry);
        file.sign(&authority, EPOCH_S).map_err(sim_error)?;
        let registry = Arc::new(
            VerifiedRegistry::from_bytes(
                file.to_json(),
                &caremesh_sync::trust::public_key_of(&authority),
            )
            .map_err(sim_error)?,
        );
        // Patients: registered with one GP each, and on other organisations' caseloads by
        // their share.
        let patients: Vec<NhsNumber> = (0..scenario.workload.patients)
            .map(patient_number)
            .collect();
        let gps: Vec<usize> = codes
            .iter()
            .enumerate()
            .filter(|(_, (_, g))| g.kind == OrgKind::Gp)
            .map(|(i, _)| i)
            .collect();
        let mut caseloads: Vec<Vec<NhsNumber>> = vec![Vec::new(); codes.len()];
        for (n, patient) in patients.iter().enumerate() {
            if !gps.is_empty() {
                caseloads[gps[n % gps.len()]].push(patient.clone());
            }
        }
        let mut caseload_rng = rng.fork();
        for (i, (_, group)) in codes.iter().enumerate() {
            if group.kind == OrgKind::Hub {
                continue;
            }
            for patient in &patients {
                if !caseloads[i].contains(patient) && caseload_rng.chance(group.caseload) {
                    caseloads[i].push(patient.clone());
                }
            }
        }
        let mut nodes = Vec::new();
        for (i, ((code, group), key)) in codes.iter().zip(keys).enumerate() {
            let db = work.join(format!("{code}.db"));
            let _ = std::fs::remove_file(&db);
            let _ = std::fs::remove_file(db.with_extension("db-wal"));
            let _ = std::fs::remove_file(db.with_extension("db-shm"));
            // Feed epochs: 1 for this setting up, then one per life (`open_driver`).
            let store = Store::open_simulated(&db, 1).map_err(sim_error)?;
            let mut feed = [0u8; 16];
            feed.copy_from_slice(&rng.bytes32()[..16]);
            store.set_feed_id(feed).map_err(sim_error)?;
            let dials = group
                .peers
                .iter()
                .flat_map(|p| scenario.resolve(p))
                .filter_map(|c| index_of.get(&c).copied())
                .filter(|&j| j != i)
                .collect();
            let mut node = Node {
                ods: OdsCode::parse(code).map_err(sim_error)?,
                kind: group.kind,
                key,
                db,
                driver: None,
                timer: None,
                dials,
                skew_ms: group.clock_skew_s * 1000,
                caseload: caseloads[i].clone(),
                defaults: Consent::SENT_BY_PUBLISHER,
                link: group.link.unwrap_or(scenario.network),
                bug: scenario
                    .inject
                    .iter()
                    .find(|b| scenario.resolve(&b.node).contains(code))
                    .map(|b| b.bug),
                redials: BTreeMap::new(),
                disk: Arc::new(SimulatedDisk::new(rng.next_u64())),
                life: 0,
                power_cut: None,
                items_written: 0,
            };
            drop(store);
            node.driver = Some(open_driver(&node, &registry, &now_ms).map_err(sim_error)?);
            nodes.push(node);
        }
        let links = LinkState::default();
        let mut peers: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); nodes.len()];
        for (i, node) in nodes.iter().enumerate() {
            for &j in &node.dials {
                peers[i].insert(j);
                peers[j].insert(i);
            }
        }
        let mut world = World {
            peers,
            indices: index_of,
            report: Report::new(&scenario.name, seed),
            scenario,
            rng,
            now_ms,
            queue: BinaryHeap::new(),
            sequence: 0,
            nodes,
            conns: BTreeMap::new(),
            pairs: BTreeMap::new(),
            next_conn: 1,
            links,
            registry,
            agreements,
            trace: Sha256::new(),
            awaiting: Vec::new(),
            active_faults: BTreeSet::new(),
            lost_for_good: BTreeSet::new(),
            stopped_for_damage: BTreeSet::new(),
            committed: BTreeMap::new(),
            acknowledged: BTreeMap::new(),
        };
        world.initial_extracts()?;
        world.schedule_start();
        Ok(world)
    }

    fn now(&self) -> u64 {
        self.now_ms.load(Ordering::Relaxed)
    }

    pub(crate) fn now_s(&self) -> f64 {
        self.now() as f64 / 1000.0
    }

    fn schedule(&mut self, at_ms: u64, event: Event) {
        self.sequence += 1;
        self.queue.push(Reverse((at_ms, self.sequence, event)));
    }

    /// Every care organisation publishes its extract about its caseload before the network
    /// starts.
    fn initial_extracts(&mut self) -> Result<(), crate::SimError> {
        for i in 0..self.nodes.len() {
            if self.nodes[i].kind == OrgKind::Hub {
                continue;
            }
            let caseload = self.nodes[i].caseload.clone();
            let mut items = Vec::new();
            for patient in &caseload {
                for _ in 0..self.scenario.workload.items_per_patient {
                    items.push((patient.clone(), self.random_item(i)));
                }
            }
            self.publish(i, items, None)?;
        }
        Ok(())
    }

    fn random_item(&mut self, node: usize) -> Item {
        let n = &mut self.nodes[node];
        n.items_written += 1;
        let id = format!("Observation/{}-{}", n.ods, n.items_written);
        let roll = self.rng.unit();
        let class = match roll {
            r if r < 0.70 => DataClass::Coded,
            r if r < 0.82 => DataClass::FreeText,
            r if r < 0.90 => DataClass::Document,
            r if r < 0.95 => DataClass::Sensitive,
            _ => DataClass::Private,
        };
        let section = SECTIONS[self.rng.below(SECTIONS.len() as u64) as usize];
        let title = format!("simulated entry {} of {}", n.items_written, n.ods);
        Item::titled(
            &id,
            section,
            class,
            "Observation",
            &title,
            "simulation",
            &id,
        )
    }

    /// A change at `node`: a new entry, or (a `move_share` of the time) an earlier one
    /// re-sent, which moves it when the patient it is sent under is another.
    fn changed_item(&mut self, node: usize) -> Item {
        let earlier = self.nodes[node].items_written;
        let correct = earlier > 0 && self.rng.unit() < self.scenario.workload.move_share;
        let which = 1 + self.rng.below(earlier.max(1));
        let mut item = self.random_item(node);
        if correct {
            let ods = &self.nodes[node].ods;
            item.id = format!("Observation/{ods}-{which}");
            item.source_id = item.id.clone();
            item.title = format!("simulated entry {which} of {ods}, re-sent");
        }
        item
    }

    /// Publishes items (and a consent choice) at `node` in one transaction, recording what it
    /// committed for the no-loss check.
    fn publish(
        &mut self,
        node: usize,
        items: Vec<(NhsNumber, Item)>,
        consent: Option<(NhsNumber, Consent)>,
    ) -> Result<(), crate::SimError> {
        let n = &mut self.nodes[node];
        let Some(driver) = n.driver.as_mut() else {
            return Ok(());
        };
        let now = EPOCH_S + (self.now_ms.load(Ordering::Relaxed) as i64 + n.skew_ms) / 1000;
        let (ods, key, defaults, bug) = (n.ods.clone(), &n.key, n.defaults, n.bug);
        // Production's path: ingest places every resource through its placement, in one
        // transaction through the store's one writer.
        let touched = driver.write_local(|host| {
            let mut publication = Publication::new(ods.clone(), defaults);
            let batch = host.store.write().map_err(sim_error)?;
            let mut touched = BTreeSet::new();
            for (patient, item) in items {
                let family = [item.id.clone()];
                let placement = Placement {
                    nhs: patient.clone(),
                    patient_key: None,
                    moved_at: None,
                };
                let id = item.id.clone();
                if bug == Some(crate::scenario::Bug::PlaceWithoutMoving) {
                    publication
                        .place(&batch, &patient, &family, vec![item])
                        .map_err(sim_error)?;
                    touched.insert(patient);
                    continue;
                }
                let moved_from = publication
                    .place_resource(
                        &batch,
                        &id,
                        placement,
                        &family,
                        vec![item],
                        &now.to_string(),
                    )
                    .map_err(sim_error)?;
                touched.extend(moved_from);
                touched.insert(patient);
            }
            if let Some((patient, consent)) = consent {
                publication.set_consent(&patient, consent);
                touched.insert(patient);
            }
            publication.apply(&batch, key, now).map_err(sim_error)?;
            batch.commit().map_err(sim_error)?;
            Ok::<_, crate::SimError>(touched)
        });
        if power_loss::power_is_off(&n.db) {
            // The power went in the middle of the write: the process dies with it and never
            // reports the change made (as ingest leaves the file in the drop folder).
            self.pump_node(node);
            return Ok(());
        }
        let damage = driver.host().store.damage();
        let touched = match touched {
            Ok(touched) => touched,
            // The disk failed the commit: the change was not made, as ingest would report.
            Err(_) if n.disk.is_failing() => {
                self.report.failed_writes += 1;
                return Ok(());
            }
            // The write read a page damaged at rest: the node stops after its turn and says
            // why, as it does when sync finds the damage.
            Err(_) if damage.is_some() => {
                self.stop_for_damage(node, damage.expect("matched"));
                return Ok(());
            }
            Err(error) => return Err(error),
        };
        // What is now committed at the publisher: it must never be lost.
        let held = check::held_documents(driver.host()).map_err(sim_error)?;
        for (doc, entry) in held {
            if entry.meta.publisher == ods && touched.contains(&entry.meta.patient) {
                self.committed.insert((node, doc), entry.heads);
            }
        }
        self.pump_node(node);
        Ok(())
    }

    fn schedule_start(&mut self) {
        for i in 0..self.nodes.len() {
            for peer in self.nodes[i].dials.clone() {
                self.schedule(
                    0,
                    Event::Dial {
                        node: i,
                        peer,
                        life: 0,
                    },
                );
            }
            if self.nodes[i].kind != OrgKind::Hub && self.scenario.workload.change_every_s > 0.0 {
                let at = self.next_change_delay();
                self.schedule(at, Event::Change { node: i, life: 0 });
            }
            self.schedule_view(i, 0, 0);
        }
        for index in 0..self.scenario.workload.consent.len() {
            let at = self.scenario.workload.consent[index].at_s * 1000;
            self.schedule(at, Event::Consent { index });
        }
        for index in 0..self.scenario.faults.len() {
            let at = self.scenario.faults[index].at_s * 1000;
            self.schedule(at, Event::FaultStart { index });
        }
        let every = self.scenario.check_every_s * 1000;
        self.schedule(every, Event::Check);
    }

    /// The next record view at `node` after `from`, if the workload has views.
    fn schedule_view(&mut self, node: usize, life: u64, from: u64) {
        let every = self.scenario.workload.view_every_s;
        if self.nodes[node].kind != OrgKind::Hub && every > 0.0 {
            let at = from + (self.rng.exponential(every) * 1000.0) as u64 + 1;
            self.schedule(at, Event::View { node, life });
        }
    }

    /// A clinician at `node` views a patient on its caseload: the view is audited there and,
    /// when it showed other organisations' data, added to the node's access record for them.
    fn view(&mut self, node: usize) -> Result<(), crate::SimError> {
        if self.nodes[node].caseload.is_empty() {
            return Ok(());
        }
        let pick = self.rng.below(self.nodes[node].caseload.len() as u64) as usize;
        let patient = self.nodes[node].caseload[pick].clone();
        let n = &mut self.nodes[node];
        let Some(driver) = n.driver.as_mut() else {
            return Ok(());
        };
        let now = EPOCH_S + (self.now_ms.load(Ordering::Relaxed) as i64 + n.skew_ms) / 1000;
        let sources: BTreeSet<String> = driver
            .host()
            .store
            .patient_items(&patient)
            .map_err(sim_error)?
            .into_iter()
            .filter(|s| s.item.section.is_clinical())
            .map(|s| s.publisher.to_string())
            .collect();
        let event = AuditEvent {
            at: now,
            user_id: format!("clinician-{}", n.ods),
            user_name: format!("Clinician at {}", n.ods),
            role: "clinician".into(),
            organisation: n.ods.to_string(),
            action: "view".into(),
            nhs: Some(patient.to_string()),
            sources: sources.into_iter().collect(),
            sections: Vec::new(),
            purpose: "direct care".into(),
            outcome: "allowed".into(),
            detail: String::new(),
        };
        let (key, ods) = (&n.key, &n.ods);
        let recorded = driver.write_local(|host| record_access(&mut host.store, key, ods, &event));
        if power_loss::power_is_off(&n.db) {
            self.pump_node(node);
            return Ok(());
        }
        match recorded {
            Ok(_) => {}
            // The disk failed the commit: the view is refused, as it is when it cannot be
            // audited.
            Err(_) if n.disk.is_failing() => {
                self.report.failed_writes += 1;
                return Ok(());
            }
            Err(error) => return Err(sim_error(error)),
        }
        let shared = event.showed_others_data();
        self.report.views += 1;
        if shared {
            let held = check::held_documents(driver.host()).map_err(sim_error)?;
            for (doc, entry) in held {
                if entry.meta.publisher == n.ods && entry.meta.section == Section::Audit {
                    self.committed.insert((node, doc), entry.heads);
                }
            }
            self.pump_node(node);
        }
        Ok(())
    }

    fn next_change_delay(&mut self) -> u64 {
        (self.rng.exponential(self.scenario.workload.change_every_s) * 1000.0) as u64 + 1
    }

    pub fn end_ms(&self) -> u64 {
        (self.scenario.duration_s + self.scenario.settle_s) * 1000
    }

    /// Runs the event loop to the end of the scenario, then the final checks.
    pub fn run(mut self) -> Result<Report, crate::SimError> {
        let end = self.end_ms();
        while let Some(Reverse((at, _, event))) = self.queue.pop() {
            if at > end {
                break;
            }
            self.now_ms.store(at, Ordering::Relaxed);
            self.trace_event(at, &event);
            self.handle(event)?;
        }
        self.now_ms.store(end, Ordering::Relaxed);
        self.final_checks()?;
        self.report.simulated_s = end as f64 / 1000.0;
        self.report.trace_hash = hex::encode(self.trace.clone().finalize());
        Ok(self.report)
    }

    fn trace_event(&mut self, at: u64, event: &Event) {
        self.trace.update(at.to_le_bytes());
        match event {
            Event::Deliver { conn, to, frame } => {
                self.trace.update(b"deliver");
                self.trace.update(conn.to_le_bytes());
                self.trace.update((*to as u64).to_le_bytes());
                self.trace.update(frame);
            }
            other => self.trace.update(format!("{other:?}").as_bytes()),
        }
    }

    fn handle(&mut self, event: Event) -> Result<(), crate::SimError> {
        match event {
            Event::Dial { node, peer, life } => self.dial(node, peer, life),
            Event::Established { node, peer, life } => self.establish(node, peer, life),
            Event::Deliver { conn, to, frame } => self.deliver(conn, to, frame),
            Event::Timer { node, life } => self.timer(node, life),
            Event::Synced { node, life, commit } => self.synced(node, life, commit),
            Event::IdleCheck { conn } => self.idle_check(conn),
            Event::Change { node, life } => {
                if self.nodes[node].life != life || self.now() > self.scenario.duration_s * 1000 {
                    return Ok(());
                }
                if self.nodes[node].driver.is_some() && !self.nodes[node].caseload.is_empty() {
                    let pick = self.rng.below(self.nodes[node].caseload.len() as u64) as usize;
                    let patient = self.nodes[node].caseload[pick].clone();
                    let item = self.changed_item(node);
                    self.publish(node, vec![(patient, item)], None)?;
                    self.report.changes += 1;
                }
                let at = self.now() + self.next_change_delay();
                self.schedule(at, Event::Change { node, life });
            }
            Event::View { node, life } => {
                if self.nodes[node].life != life || self.now() > self.scenario.duration_s * 1000 {
                    return Ok(());
                }
                self.view(node)?;
                self.schedule_view(node, life, self.now());
            }
            Event::Consent { index } => self.consent(index)?,
            Event::FaultStart { index } => self.fault_start(index),
            Event::FaultEnd { index } => self.fault_end(index),
            Event::Restart { node } => self.restart(node)?,
            Event::PowerCutDue { node, life } => {
                if self.nodes[node].life == life && self.nodes[node].power_cut.is_some() {
                    power_loss::cut_power(&self.nodes[node].db);
                    self.power_failed(node);
                }
            }
            Event::FlapDown { index } => self.flap(index, true),
            Event::FlapUp { index } => self.flap(index, false),
            Event::Check => {
                self.periodic_check()?;
                let at = self.now() + self.scenario.check_every_s * 1000;
                self.schedule(at, Event::Check);
            }
        }
        Ok(())
    }

    fn consent(&mut self, index: usize) -> Result<(), crate::SimError> {
        let change = self.scenario.workload.consent[index].clone();
        let code = self.scenario.resolve(&change.node).remove(0);
        let node = self.index_of(&code);
        let Some(patient) = self.nodes[node].caseload.get(change.patient).cloned() else {
            return Ok(());
        };
        let Some(driver) = self.nodes[node].driver.as_ref() else {
            return Ok(());
        };
        let current = driver
            .host()
            .store
            .care()
            .recorded_consent(&self.nodes[node].ods, &patient)
            .map_err(sim_error)?
            .unwrap_or(self.nodes[node].defaults);
        let consent = Consent {
            share_out: change.share_out.unwrap_or(current.share_out),
            share_in: change.share_in.unwrap_or(current.share_in),
            objection: change.objection.unwrap_or(current.objection),
        };
        self.report.consent_changes += 1;
        self.publish(node, Vec::new(), Some((patient, consent)))
    }

    pub(crate) fn index_of(&self, code: &str) -> usize {
        *self
            .indices
            .get(code)
            .expect("scenario names were validated")
    }

    fn nodes_named(&self, names: &[String]) -> Vec<usize> {
        names
            .iter()
            .flat_map(|n| self.scenario.resolve(n))
            .map(|c| self.index_of(&c))
            .collect()
    }

    // ----- faults -----

    fn fault_start(&mut self, index: usize) {
        let fault = self.scenario.faults[index].clone();
        self.active_faults.insert(index);
        match fault.kind {
            FaultKind::Partition {
                groups,
                until_s,
                one_way,
            } => {
                let mut sides: Vec<BTreeSet<usize>> = groups
                    .iter()
                    .map(|g| {
                        g.iter()
                            .filter(|n| n.as_str() != "*")
                            .flat_map(|n| self.scenario.resolve(n))
                            .map(|c| self.index_of(&c))
                            .collect()
                    })
                    .collect();
                if let Some(rest) = groups.iter().position(|g| g.iter().any(|n| n == "*")) {
                    let named: BTreeSet<usize> = sides.iter().flatten().copied().collect();
                    sides[rest].extend((0..self.nodes.len()).filter(|i| !named.contains(i)));
                }
                self.links.add_partition(index, sides, one_way);
                self.schedule(until_s * 1000, Event::FaultEnd { index });
            }
            FaultKind::Link {
                nodes,
                until_s,
                loss,
                latency_ms,
                bandwidth_kbps,
                flap_every_s,
                ..
            } => {
                let members = self.nodes_named(&nodes);
                self.links
                    .add_degradation(index, members, loss, latency_ms, bandwidth_kbps);
                if let Some(every) = flap_every_s {
                    let at = self.now() + every * 1000;
                    self.schedule(at, Event::FlapDown { index });
                }
                self.schedule(until_s * 1000, Event::FaultEnd { index });
            }
            FaultKind::Disk {
                nodes,
                until_s,
                commit_failure,
                full,
            } => {
                for node in self.nodes_named(&nodes) {
                    let disk = &self.nodes[node].disk;
                    disk.set_commit_failure(commit_failure);
                    disk.set_full(full);
                }
                self.schedule(until_s * 1000, Event::FaultEnd { index });
            }
            FaultKind::Crash {
                node,
                restart_after_s,
                mid_write,
                mid_sync,
                ..
            } => {
                let node = self.index_of(&node);
                if (mid_write || mid_sync) && self.nodes[node].driver.is_some() {
                    if mid_sync {
                        // The power goes in the engine's next sync of its WAL: the group
                        // commits it was to make durable are lost.
                        power_loss::cut_power_at_next_wal_sync(&self.nodes[node].db);
                    } else {
                        // The power goes at one of the node's next few writes or syncs, most
                        // likely inside a commit; `pump_node` stops the node there.
                        let operations = 1 + self.rng.below(MID_WRITE_OPERATIONS);
                        power_loss::cut_power_after(&self.nodes[node].db, operations);
                    }
                    self.nodes[node].power_cut = Some((index, restart_after_s));
                    let life = self.nodes[node].life;
                    let due = self.now() + POWER_CUT_DUE_MS;
                    self.schedule(due, Event::PowerCutDue { node, life });
                } else {
                    self.crash(node);
                    self.after_crash(node, index, restart_after_s);
                }
            }
        }
        self.check_blocked_conns();
    }

    fn fault_end(&mut self, index: usize) {
        self.active_faults.remove(&index);
        self.links.remove(index);
        if let FaultKind::Disk { nodes, .. } = self.scenario.faults[index].kind.clone() {
            for node in self.nodes_named(&nodes) {
                let disk = &self.nodes[node].disk;
                disk.set_commit_failure(0.0);
                disk.set_full(false);
            }
        }
        self.heal();
    }

    fn flap(&mut self, index: usize, down: bool) {
        if !self.active_faults.contains(&index) {
            return;
        }
        let FaultKind::Link {
            flap_every_s: Some(every),
            flap_down_s,
            ..
        } = self.scenario.faults[index].kind.clone()
        else {
            return;
        };
        self.links.set_down(index, down);
        if down {
            self.schedule(self.now() + flap_down_s * 1000, Event::FlapUp { index });
            self.check_blocked_conns();
        } else {
            self.schedule(self.now() + every * 1000, Event::FlapDown { index });
            self.release_held();
        }
    }

    /// Something healed: held frames flow, and convergence is awaited from now.
    fn heal(&mut self) {
        self.release_held();
        self.awaiting.push(self.now());
        self.report.heals.push(crate::Heal {
            at_s: self.now() as f64 / 1000.0,
            converged_after_s: None,
        });
    }

    /// What follows a crash fault: a restart later, or the node lost for good.
    fn after_crash(&mut self, node: usize, index: usize, restart_after_s: Option<u64>) {
        let corrupt = matches!(
            self.scenario.faults[index].kind,
            FaultKind::Crash { corrupt: true, .. }
        );
        if corrupt {
            match power_loss::flip_a_bit_at_rest(&self.nodes[node].db, &mut self.rng) {
                Ok(Some(_)) => self.report.pages_corrupted += 1,
                Ok(None) => {}
                // The simulator's own files: nothing a node did could cause this.
                Err(error) => panic!("damaging {}: {error}", self.nodes[node].db.display()),
            }
        }
        if let Some(after) = restart_after_s {
            self.schedule(self.now() + after * 1000, Event::Restart { node });
        } else {
            // Lost for good: from now on the region must converge without it (failover),
            // which the report measures like a heal.
            self.active_faults.remove(&index);
            self.lost_for_good.insert(node);
            self.heal();
        }
    }

    /// The power cut armed by a mid-write crash fault struck: the node stops where it is,
    /// before anything it did since the cut leaves it.
    pub(super) fn power_failed(&mut self, node: usize) {
        let (index, restart_after_s) = self.nodes[node]
            .power_cut
            .take()
            .expect("a power cut was armed");
        self.report.mid_write_power_cuts += 1;
        self.crash(node);
        self.after_crash(node, index, restart_after_s);
    }

    fn crash(&mut self, node: usize) {
        // A machine crash: the power is cut first (so nothing SQLite does on close reaches
        // the disk) and the node does nothing more, not even hear its connections end;
        // then the disk keeps only what was synced, each unsynced write lost or kept at
        // random (torn).
        power_loss::cut_power(&self.nodes[node].db);
        self.take_down(node, "peer crashed");
        let n = &mut self.nodes[node];
        n.power_cut = None;
        match power_loss::restore_after_power_loss(&n.db, Some(&mut self.rng)) {
            Ok(loss) => self.report.unsynced_writes_lost += loss.lost_writes,
            // The simulator's own files: nothing a node did could cause this.
            Err(error) => panic!("restoring {} after a power cut: {error}", n.db.display()),
        }
        self.report.crashes += 1;
    }

    fn restart(&mut self, node: usize) -> Result<(), crate::SimError> {
        let driver = match open_driver(&self.nodes[node], &self.registry, &self.now_ms) {
            Ok(driver) => driver,
            Err(error) if error.is_damage() => {
                // The node does not come up on a damaged database: it says why and stays down.
                self.stop_for_damage(node, error.to_string());
                self.end_crash_fault(node);
                return Ok(());
            }
            Err(error) => return Err(sim_error(error)),
        };
        if self.wants(Invariant::NoLoss)
            && let Err(damage) = self.check_acknowledged_survived(node, &driver)
        {
            // Reading what it acknowledged found damage at rest: the node stops, as its own
            // first read of its checkpoints would stop it. Not a loss: it says so and stays
            // down until restored or rebuilt.
            drop(driver);
            self.stop_for_damage(node, damage);
            self.end_crash_fault(node);
            return Ok(());
        }
        let n = &mut self.nodes[node];
        n.driver = Some(driver);
        let life = n.life;
        for peer in n.dials.clone() {
            self.schedule(self.now(), Event::Dial { node, peer, life });
        }
        if self.nodes[node].kind != OrgKind::Hub && self.scenario.workload.change_every_s > 0.0 {
            let at = self.now() + self.next_change_delay();
            self.schedule(at, Event::Change { node, life });
        }
        self.schedule_view(node, life, self.now());
        self.end_crash_fault(node);
        Ok(())
    }

    /// The crash fault on `node` is over (it restarted, or stopped on a damaged database).
    fn end_crash_fault(&mut self, node: usize) {
        if let Some(index) = self.scenario.faults.iter().position(|f| {
            matches!(&f.kind, FaultKind::Crash { node: name, .. } if self.index_of(name) == node)
        }) {
            self.active_faults.remove(&index);
        }
        self.heal();
    }

    /// `node` found its database damaged: it stops, saying why, and stays down (its
    /// operator restores or rebuilds it). Its connections close as a stopped process's do.
    pub(super) fn stop_for_damage(&mut self, node: usize, reason: String) {
        if !self.stopped_for_damage.insert(node) {
            return;
        }
        self.report.damage_stops.push(crate::DamageStop {
            at_s: self.now_s(),
            node: self.nodes[node].ods.to_string(),
            reason,
        });
        self.take_down(node, "peer stopped");
    }

    /// `node`'s process ends at once: its driver goes, its connections close with `why`,
    /// and events scheduled for this life are ignored.
    fn take_down(&mut self, node: usize, why: &str) {
        let ended = self.nodes[node].driver.take();
        let conns: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.ends.contains(&node))
            .map(|(id, _)| *id)
            .collect();
        for conn in conns {
            self.close(conn, why);
        }
        drop(ended);
        let n = &mut self.nodes[node];
        n.timer = None;
        n.life += 1;
        n.redials.clear();
    }

    // ----- checks -----

    /// Every node is up, except those lost for good.
    fn all_up(&self) -> bool {
        self.nodes.iter().enumerate().all(|(i, n)| {
            n.driver.is_some()
                || self.lost_for_good.contains(&i)
                || self.stopped_for_damage.contains(&i)
        })
    }

    /// While a heal awaits convergence (and no fault is in force), checks whether the region
    /// has converged, and that nothing forbidden is stored. Between heals the wire check
    /// stands guard: nothing reaches storage without crossing the wire.
    fn periodic_check(&mut self) -> Result<(), crate::SimError> {
        if self.awaiting.is_empty() || !self.active_faults.is_empty() || !self.all_up() {
            return Ok(());
        }
        let held = self.held_everywhere()?;
        if self.wants(Invariant::NothingForbidden) {
            let found = check::forbidden(self, &held, false);
            self.record(found);
        }
        if self.wants(Invariant::OnePatientPerResource) {
            let found = check::on_two_patients(self, false);
            self.record(found);
        }
        if !check::missing(self, &held).is_empty() {
            return Ok(());
        }
        let now = self.now();
        for heal in std::mem::take(&mut self.awaiting) {
            if let Some(h) = self
                .report
                .heals
                .iter_mut()
                .find(|h| (h.at_s * 1000.0) as u64 == heal && h.converged_after_s.is_none())
            {
                h.converged_after_s = Some((now - heal) as f64 / 1000.0);
            }
        }
        Ok(())
    }

    fn wants(&self, invariant: Invariant) -> bool {
        self.scenario.invariants.contains(&invariant)
    }

    /// Adds violations not already reported (the same rule, node and document).
    fn record(&mut self, violations: Vec<Violation>) {
        for violation in violations {
            let duplicate = self.report.violations.iter().any(|v| {
                v.node == violation.node && v.doc == violation.doc && v.rule == violation.rule
            });
            if !duplicate {
                self.report.violations.push(violation);
            }
        }
    }

    /// What each running node holds. Reading a node's store is reading its disk: a damaged
    /// page found here stops the node as the node's own read would have.
    pub(crate) fn held_everywhere(
        &mut self,
    ) -> Result<Vec<Option<BTreeMap<caremesh_sync::DocId, Held>>>, crate::SimError> {
        let mut held = Vec::with_capacity(self.nodes.len());
        for node in 0..self.nodes.len() {
            let Some(driver) = &self.nodes[node].driver else {
                held.push(None);
                continue;
            };
            match check::held_documents(driver.host()) {
                Ok(documents) => held.push(Some(documents)),
                Err(error) if error.is_damage() => {
                    self.stop_for_damage(node, error.to_string());
                    held.push(None);
                }
                Err(error) => return Err(sim_error(error)),
            }
        }
        Ok(held)
    }

    /// After a crash, `node`'s checkpoint in each peer's feed is at or past what it
    /// acknowledged before: an acknowledged write the disk did not keep is a loss, even if
    /// the peer can send it again (what the node published itself, nobody can). `Err`: a
    /// checkpoint's page failed its checksum (damage at rest, which stops the node).
    ///
    /// Finding: a damaged read counted as a checkpoint at 0, so a node that would stop on
    /// finding the damage was reported as having lost what it acknowledged.
    fn check_acknowledged_survived(&mut self, node: usize, driver: &Driver) -> Result<(), String> {
        let mut found = Vec::new();
        for (&(puller, provider), &(epoch, up_to)) in
            self.acknowledged.range((node, 0)..(node + 1, 0))
        {
            debug_assert_eq!(puller, node);
            let provider_ods = &self.nodes[provider].ods;
            let durable = match driver.host().store.peer_checkpoint(provider_ods) {
                Ok(checkpoint) => checkpoint.map_or((0, 0), |c| (c.epoch, c.up_to)),
                Err(error) if error.is_damage() => return Err(error.to_string()),
                Err(error) => {
                    found.push(Violation {
                        at_s: self.now_s(),
                        node: self.nodes[node].ods.to_string(),
                        doc: String::new(),
                        rule: "no-loss".into(),
                        detail: format!("its checkpoint in {provider_ods}'s feed could not be read after the crash: {error}"),
                    });
                    continue;
                }
            };
            if durable < (epoch, up_to) {
                found.push(Violation {
                    at_s: self.now_s(),
                    node: self.nodes[node].ods.to_string(),
                    doc: String::new(),
                    rule: "no-loss".into(),
                    detail: format!(
                        "acknowledged {}'s feed up to {up_to} (epoch {epoch}) before it crashed, but after the crash holds it only up to {} (epoch {}): its disk lost an acknowledged write",
                        self.nodes[provider].ods, durable.1, durable.0
                    ),
                });
            }
        }
        self.record(found);
        Ok(())
    }

    fn final_checks(&mut self) -> Result<(), crate::SimError> {
        // Each database read whole, as `caremesh verify` does: damage at rest in a page the
        // node had not read yet stops it now.
        for node in 0..self.nodes.len() {
            let Some(driver) = &self.nodes[node].driver else {
                continue;
            };
            let problems = match driver.host().store.integrity_problems() {
                Ok(problems) => problems,
                Err(error) => vec![error.to_string()],
            };
            if !problems.is_empty() {
                self.stop_for_damage(node, problems.join("; "));
            }
        }
        let held = self.held_everywhere()?;
        if self.wants(Invariant::NothingForbidden) {
            let found = check::forbidden(self, &held, true);
            self.record(found);
        }
        if self.wants(Invariant::Convergence) {
            let missing = check::missing(self, &held);
            self.report.converged = missing.is_empty();
            let found = missing.into_iter().take(20).collect();
            self.record(found);
        }
        if self.wants(Invariant::NoLoss) {
            let found = check::lost(self, &held);
            self.record(found);
        }
        if self.wants(Invariant::Authentic) {
            let found = check::inauthentic(self);
            self.record(found);
        }
        if self.wants(Invariant::AuditChain) {
            let found = check::broken_audit_chains(self);
            self.record(found);
        }
        if self.wants(Invariant::OnePatientPerResource) {
            let found = check::on_two_patients(self, self.report.converged);
            self.record(found);
        }
        let mut documents = 0;
        for entry in held.iter().flatten() {
            documents += entry.len() as u64;
        }
        self.report.documents_held = documents;
        Ok(())
    }
}

impl Region for World {
    fn node_count(&self) -> usize {
        self.nodes.len()
    }
    fn ods(&self, node: usize) -> &OdsCode {
        &self.nodes[node].ods
    }
    fn kind(&self, node: usize) -> OrgKind {
        self.nodes[node].kind
    }
    fn caseload(&self, node: usize) -> &[NhsNumber] {
        &self.nodes[node].caseload
    }
    fn host(&self, node: usize) -> Option<&StoreHost> {
        self.nodes[node].driver.as_ref().map(Driver::host)
    }
    fn defaults(&self, node: usize) -> Consent {
        self.nodes[node].defaults
    }
    fn peers_of(&self, node: usize) -> &BTreeSet<usize> {
        &self.peers[node]
    }
    fn index_of(&self, code: &str) -> usize {
        World::index_of(self, code)
    }
    fn is_lost_for_good(&self, node: usize) -> bool {
        // Routing around a node lost for good is owed while the rest of the region can: once
        // another node has stopped on a damaged disk (down for its operator), only what live
        // paths can carry is owed (two-hubs-failover with the second hub damaged).
        self.lost_for_good.contains(&node) && self.stopped_for_damage.is_empty()
    }
    fn now_s(&self) -> f64 {
        World::now_s(self)
    }
    fn agreements(&self) -> &Agreements {
        &self.agreements
    }
    fn committed(&self) -> &BTreeMap<(usize, caremesh_sync::DocId), Vec<[u8; 32]>> {
        &self.committed
    }
}

fn local_time(now: u64, skew_ms: i64) -> u64 {
    (now as i64 + skew_ms).max(0) as u64
}

fn open_driver(
    node: &Node,
    registry: &Arc<VerifiedRegistry>,
    now_ms: &Arc<AtomicU64>,
) -> Result<Driver, caremesh_storage::StorageError> {
    // Each life begins a feed epoch of its own, numbered so a seed replays exactly.
    let mut store = Store::open_simulated(&node.db, node.life + 2)?;
    if node.bug == Some(crate::scenario::Bug::CommitWithoutSync) {
        store.without_fsync()?;
    }
    store.on_simulated_disk(node.disk.clone())?;
    let clock = {
        let now_ms = now_ms.clone();
        let skew = node.skew_ms;
        Box::new(move || EPOCH_S + (now_ms.load(Ordering::Relaxed) as i64 + skew) / 1000)
    };
    let mut host = StoreHost::new(
        store,
        Box::new(FixedRegistry(registry.clone())),
        node.ods.clone(),
        node.defaults,
        clock,
    )?;
    host.keep_documents_loaded(SIMULATED_LOADED_DOCUMENTS);
    let local_ms = local_time(now_ms.load(Ordering::Relaxed), node.skew_ms);
    let mut driver = Driver::new(node.ods.clone(), host, DriverOptions::default(), local_ms);
    // As production's engine: commits do not wait for the disk, frames wait for the sync.
    driver.defer_syncs();
    if let Some(bug) = node.bug.and_then(crate::scenario::Bug::planted) {
        driver.plant(bug);
    }
    Ok(driver)
}
