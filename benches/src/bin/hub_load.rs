//! A load generator that costs less than the hub (issue 19, part 4): hundreds of nodes in one
//! thin process, each a real QUIC connection to a real hub process, replaying changes signed
//! before the load begins.
//!
//! ```sh
//! cargo build --release -p caremesh -p caremesh-bench
//! ./target/release/hub-load --nodes 500 --rate 3200 --seconds 600 --pin
//! ```
//!
//! The hub is a real `caremesh run` process, as in `load-bench`. The nodes are not: each is
//! its own key and certificate (listed in the signed trust registry) and one sync
//! [`Session`], the production protocol code, over an in-memory host that holds no database
//! and builds no document. What a node publishes was made and signed before the load, so
//! publishing costs the generator nothing but handing the bytes to its session. What a node
//! receives is checked by the session as a relay checks it (signature, and the hash chain
//! against the signed heads) and kept as a relay keeps it (bytes appended; loaded only to
//! compact them every 32 versions, as a hub does): its items are never read.
//!
//! The load matches `load-bench`: node i shares `--patients` patients with node i+1 (a ring),
//! and a change is one new problem for one patient, a new version of the patient's problems
//! document and of the publisher's sharing record for them, which the hub relays to the other
//! node on the patient's caseload. Latency runs from the moment the version is handed to the
//! publisher's session (its commit) to the moment the recipient's session commits it.
//!
//! A node whose dial fails or whose connection is lost dials again with backoff, as a node
//! does (500 dials at once outrun a hub's handshakes on one core); the summary counts it.
//!
//! With `--pin` the hub runs on CPU 0 and the generator on CPU 1, so that each is measured on
//! its own core. After the load and the drain it checks that every recipient and the hub
//! hold exactly each publisher's last version of every document, and loads a sample of the
//! hub's stored documents to check their bytes give the publisher's heads.

use anyhow::{Context, Result, ensure};
use caremesh::home::Home;
use caremesh::tls::NodeIdentity;
use caremesh::trust::TrustState;
use caremesh_bench::{
    HubCpu, InFlight, LoadShape, LoadSummary, Tracker, cpu_seconds, cpu_seconds_by_thread,
    free_hub_address, peak_rss_kib, region, ring_node_home, ring_patients, run_load,
    thread_cpu_line,
};
use caremesh_storage::publish::{actor_for, sharing_item};
use caremesh_sync::policy::{Consent, Decision, Recipient, SharingRecord};
use caremesh_sync::relay::{AppendedChange, AppendedChanges, HeldIndex};
use caremesh_sync::rng::Rng;
use caremesh_sync::session::{ChangesToSend, EpochEnd, HeldChanges, offerable_from_feed};
use caremesh_sync::{
    Checkpoint, DataClass, DocId, DocMeta, FeedEntry, FeedId, HeldDocument, HostError, Item,
    NhsNumber, OdsCode, OrgKind, PublishedDocument, PublisherKey, Refusal, Section, Session,
    SessionError, SignedHeads, SyncHost, VerifiedBytes, VerifiedDocument,
};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Thin load generator (see the header of this file).
#[derive(clap::Parser)]
struct Args {
    #[command(flatten)]
    shape: LoadShape,
    /// Run the hub on CPU 0 and this generator on CPU 1.
    #[arg(long)]
    pin: bool,
    /// Keep the work folder (homes, the hub's database) afterwards.
    #[arg(long)]
    keep: bool,
    /// The hub's database encrypted at rest (SQLCipher, a data key file in the work folder).
    #[arg(long)]
    encrypted_hub: bool,
    /// KiB of earlier problems' text each patient's problems document starts with, so that
    /// the hub holds documents the size of a real record's sections (0: a few hundred bytes).
    #[arg(long, default_value_t = 0)]
    history_kib: u64,
}

/// A document version made and signed before the load: the change that makes it from the
/// version before, and the publisher's signed heads. A clone is another handle on the same
/// bytes.
#[derive(Clone)]
struct Version {
    meta: Rc<DocMeta>,
    change: Rc<Vec<u8>>,
    /// The heads before the change (the change's dependencies) and after it (its hash): a
    /// publisher's document has one head.
    deps: [u8; 32],
    hash: [u8; 32],
    signed: Rc<Vec<u8>>,
}

/// One scheduled change: the node that publishes it, its two versions (the problems
/// document, then the sharing record), and the neighbour it is for.
struct Change {
    node: usize,
    versions: [Version; 2],
    recipient: usize,
}

/// A publisher's own document as its session serves it.
struct Own {
    meta: Rc<DocMeta>,
    /// The first version saved whole, then every later version's change: a holder of any
    /// version is served the changes it lacks from their index, as a hub serves them.
    bytes: Vec<u8>,
    index: AppendedChanges,
    heads: [u8; 32],
    signed: Rc<Vec<u8>>,
    /// Each later version's change, shared with the version made before the load.
    changes: Vec<Rc<Vec<u8>>>,
    /// How many of `changes` a holder of each version's head has (the first version's: none).
    /// A publisher's history is a line, so a holder of one head lacks exactly the changes
    /// after it: served in time independent of how long the history is, as a real node
    /// serves from its stored index, and not by copying the whole history for each version
    /// asked (which made the generator's cost grow through a ten-minute run).
    held_through: HashMap<[u8; 32], usize>,
}

/// A document received from the hub, as a relay stores it: bytes never loaded (a saved first
/// copy and the changes appended since, which the session checked by their hash chain), and
/// the signed heads. Only when the chain cannot tell (an answer more than a relay's index
/// holds) does the session load and apply, as a hub would.
struct Received {
    meta: DocMeta,
    snapshot: Vec<u8>,
    appended: Option<AppendedChanges>,
    signed: SignedHeads,
}

impl Received {
    fn held(&self) -> HeldDocument {
        HeldDocument {
            meta: self.meta.clone(),
            snapshot: self.snapshot.clone(),
            appended: self.appended.clone(),
            signed: self.signed.encode(),
        }
    }
}

/// One generated node's storage, trust and policy, in memory.
struct ThinHost {
    index: usize,
    feed: FeedId,
    own: HashMap<DocId, Own>,
    /// This node's feed: position to document, and each document's position.
    positions: BTreeMap<u64, DocId>,
    position_of: HashMap<DocId, u64>,
    tip: u64,
    received: HashMap<DocId, Received>,
    checkpoints: HashMap<OdsCode, Checkpoint>,
    keys: Rc<HashMap<OdsCode, [u8; 32]>>,
    registry_version: u64,
    registry_bytes: Rc<Vec<u8>>,
    /// Problems documents in flight (their latency is what is reported), and sharing records
    /// in flight (awaited, so that the final check finds them).
    tracker: Arc<Tracker>,
    records: Arc<Tracker>,
}

impl ThinHost {
    /// Publishes what the driver handed this node.
    fn take(&mut self, publish: Publish) {
        match publish {
            Publish::First(first) => {
                self.publish_first(first.meta, first.bytes, first.heads, first.signed)
            }
            Publish::Next(version) => self.publish(&version),
        }
    }

    /// Publishes a first version saved whole (before the load).
    fn publish_first(
        &mut self,
        meta: Rc<DocMeta>,
        first: Vec<u8>,
        heads: [u8; 32],
        signed: Vec<u8>,
    ) {
        let doc = meta.id();
        self.own.insert(
            doc,
            Own {
                meta,
                index: AppendedChanges {
                    base_heads: vec![heads],
                    base_len: first.len() as u64,
                    changes: Vec::new(),
                },
                bytes: first,
                heads,
                signed: Rc::new(signed),
                changes: Vec::new(),
                held_through: HashMap::from([(heads, 0)]),
            },
        );
        self.advance_feed(doc);
    }

    /// Publishes the next version of one of this node's documents.
    fn publish(&mut self, version: &Version) {
        let doc = version.meta.id();
        let own = self
            .own
            .get_mut(&doc)
            .expect("the first version was published");
        assert_eq!(own.heads, version.deps, "versions are published in order");
        own.bytes.extend_from_slice(&version.change);
        own.index.changes.push(AppendedChange {
            hash: version.hash,
            deps: vec![version.deps],
            len: version.change.len() as u64,
        });
        own.heads = version.hash;
        own.signed = version.signed.clone();
        own.changes.push(version.change.clone());
        own.held_through.insert(version.hash, own.changes.len());
        self.advance_feed(doc);
    }

    fn advance_feed(&mut self, doc: DocId) {
        self.tip += 1;
        if let Some(old) = self.position_of.insert(doc, self.tip) {
            self.positions.remove(&old);
        }
        self.positions.insert(self.tip, doc);
    }
}

impl SyncHost for ThinHost {
    fn feed_id(&self) -> FeedId {
        self.feed
    }
    fn feed_epoch(&self) -> u64 {
        1
    }
    fn feed_epoch_end(&mut self, epoch: u64) -> Result<EpochEnd, HostError> {
        Ok(if epoch == 1 {
            EpochEnd::Current
        } else {
            EpochEnd::Unknown
        })
    }
    fn feed_tip(&mut self) -> Result<u64, HostError> {
        Ok(self.tip)
    }
    fn feed_after(&mut self, after: u64, limit: usize) -> Result<Vec<FeedEntry>, HostError> {
        Ok(self
            .positions
            .range(after + 1..)
            .take(limit)
            .map(|(&seq, doc)| {
                let own = &self.own[doc];
                FeedEntry {
                    seq,
                    meta: (*own.meta).clone(),
                    heads: vec![own.heads],
                }
            })
            .collect())
    }
    fn offerable_after(
        &mut self,
        peer: &Recipient,
        after: u64,
        limit: usize,
    ) -> Result<caremesh_sync::OfferPage, HostError> {
        offerable_from_feed(self, peer, after, limit)
    }
    fn backfill(&mut self, _peer: &OdsCode, _limit: usize) -> Result<Vec<FeedEntry>, HostError> {
        Ok(Vec::new())
    }
    fn backfill_done(&mut self, _peer: &OdsCode, _docs: &[DocId]) -> Result<(), HostError> {
        Ok(())
    }
    fn held_heads(&mut self, doc: DocId) -> Result<Option<Vec<[u8; 32]>>, HostError> {
        if let Some(own) = self.own.get(&doc) {
            return Ok(Some(vec![own.heads]));
        }
        Ok(self.received.get(&doc).map(|r| r.signed.heads.clone()))
    }
    fn document(&mut self, doc: DocId) -> Result<Option<HeldDocument>, HostError> {
        if let Some(own) = self.own.get(&doc) {
            return Ok(Some(HeldDocument {
                meta: (*own.meta).clone(),
                snapshot: own.bytes.clone(),
                appended: (!own.index.changes.is_empty()).then(|| own.index.clone()),
                signed: (*own.signed).clone(),
            }));
        }
        // Received: as a relay holds it. The session checks the next version's hash chain
        // against it.
        Ok(self.received.get(&doc).map(Received::held))
    }
    fn changes_after(&mut self, doc: DocId, have: &[[u8; 32]]) -> Result<HeldChanges, HostError> {
        let Some(own) = self.own.get(&doc) else {
            return Ok(HeldChanges::Unknown);
        };
        let Some(&held) = (match have {
            [head] => own.held_through.get(head),
            _ => None,
        }) else {
            return Ok(HeldChanges::Unknown);
        };
        Ok(HeldChanges::Lacking(ChangesToSend {
            meta: (*own.meta).clone(),
            signed: (*own.signed).clone(),
            changes: own.changes[held..]
                .iter()
                .map(|change| change.to_vec())
                .collect(),
        }))
    }
    fn held_index(&mut self, doc: DocId) -> Result<Option<(DocMeta, HeldIndex)>, HostError> {
        Ok(self.received.get(&doc).map(|held| {
            let index = HeldIndex {
                heads: held.signed.heads.clone(),
                stored_len: held.snapshot.len() as u64,
                appended: held.appended.clone(),
                register: None,
            };
            (held.meta.clone(), index)
        }))
    }
    fn commit(
        &mut self,
        _peer: &OdsCode,
        documents: Vec<VerifiedDocument>,
        checkpoint: Option<Checkpoint>,
    ) -> Result<Vec<Refusal>, HostError> {
        let stored: Vec<(DocId, Vec<[u8; 32]>)> = documents
            .iter()
            .map(|d| (d.signed.meta.id(), d.signed.heads.clone()))
            .collect();
        for document in documents {
            let id = document.signed.meta.id();
            let (snapshot, appended) = match document.bytes {
                VerifiedBytes::Whole { snapshot, .. } => (snapshot, None),
                VerifiedBytes::Appended(extension) => {
                    // One session writes here, and it stores a relayed version before it
                    // takes another of the same document: what is held is what it extended.
                    let mut snapshot = self
                        .received
                        .remove(&id)
                        .map(|held| held.snapshot)
                        .unwrap_or_default();
                    snapshot.extend_from_slice(&extension.new_bytes);
                    assert!(extension.appended.fits(snapshot.len() as u64));
                    (snapshot, Some(extension.appended))
                }
            };
            let received = Received {
                meta: document.signed.meta.clone(),
                snapshot,
                appended,
                signed: document.signed,
            };
            self.received.insert(id, received);
        }
        self.tracker.stored(self.index, &stored);
        self.records.stored(self.index, &stored);
        if let Some(checkpoint) = checkpoint {
            self.checkpoints.insert(hub_ods(), checkpoint);
        }
        Ok(Vec::new())
    }
    fn checkpoint(&mut self, peer: &OdsCode) -> Result<Option<Checkpoint>, HostError> {
        Ok(self.checkpoints.get(peer).copied())
    }
    fn is_publisher_key(&self, publisher: &OdsCode, key: &[u8; 32]) -> bool {
        self.keys.get(publisher) == Some(key)
    }
    fn decide(&self, _meta: &DocMeta, _recipient: &Recipient) -> Result<Decision, HostError> {
        // Its own documents, to the hub, which decides for each final recipient.
        Ok(Decision::Send)
    }
    fn registry_version(&self) -> u64 {
        self.registry_version
    }
    fn registry_bytes(&self) -> Option<Vec<u8>> {
        Some((*self.registry_bytes).clone())
    }
    fn offer_registry(&mut self, _bytes: Vec<u8>) -> Result<bool, HostError> {
        Ok(false)
    }
    fn reads_items(&self, _meta: &DocMeta) -> bool {
        false
    }
}

fn hub_ods() -> OdsCode {
    OdsCode::parse("HUB01").expect("a valid ODS code")
}

/// A generated node: its organisation, key, the patients it shares with each neighbour, and
/// its documents as they evolve while the changes are made.
struct Publisher {
    ods: OdsCode,
    key: PublisherKey,
    identity: NodeIdentity,
    patients: [Vec<NhsNumber>; 2],
    consent: Consent,
}

/// A publisher's documents about one patient, while its versions are made.
struct Making {
    problems: PublishedDocument,
    sharing: PublishedDocument,
    problems_meta: Rc<DocMeta>,
    sharing_meta: Rc<DocMeta>,
    items: u64,
}

fn main() -> Result<()> {
    let args: Args = clap::Parser::parse();
    run_load("hub-load", &args.shape, args.keep, |work| run(&args, work))
}

fn run(args: &Args, work: &Path) -> Result<()> {
    let started = Instant::now();
    let (publishers, dirs) = prepare_publishers(work, args)?;
    let hub_address = free_hub_address()?;
    let hub_dir = region(work, &dirs, "hub", Some(hub_address.to_string()))?;
    if args.encrypted_hub {
        encrypt_home(&hub_dir, &work.join("hub-data.key"))?;
    }
    println!(
        "hub database: {}",
        if args.encrypted_hub {
            "encrypted"
        } else {
            "plain"
        }
    );
    let trust = Home::open(&dirs[0])?
        .trust()?
        .context("the generated nodes have a registry")?;
    println!(
        "{} nodes, {} patients each ({} shared with each neighbour); homes made in {:.1}s",
        args.shape.nodes,
        2 * args.shape.patients,
        args.shape.patients,
        started.elapsed().as_secs_f64()
    );
    let making = Instant::now();
    let (firsts, changes) = make_changes(&publishers, args)?;
    println!(
        "{} changes made and signed in {:.1}s (before the load, so the load does not pay for them)",
        changes.len(),
        making.elapsed().as_secs_f64()
    );
    let mut first_sizes: Vec<usize> = firsts
        .iter()
        .filter(|first| first.meta.section == Section::Problems)
        .map(|first| first.bytes.len())
        .collect();
    first_sizes.sort_unstable();
    println!(
        "first copies of problems documents: {} bytes saved at the median",
        first_sizes.get(first_sizes.len() / 2).copied().unwrap_or(0)
    );

    let mut hub = spawn_hub(&hub_dir, args.pin)?;
    let hub_pid = hub.id();
    if args.pin {
        pin_this_process_to(1)?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let outcome = local.block_on(
        &runtime,
        drive(
            args,
            &publishers,
            firsts,
            changes,
            &trust,
            hub_address,
            hub_pid,
        ),
    );
    let hub_peak = peak_rss_kib(hub_pid);
    let _ = hub.kill();
    let _ = hub.wait();
    let outcome = outcome?;
    report(args, &outcome, hub_peak)?;
    let checked = check_nothing_lost(&outcome, &Home::open(&hub_dir)?.database()?)?;
    println!(
        "nothing lost: every recipient and the hub hold exactly what each publisher holds ({} copies checked; {} of the hub's documents loaded and their heads compared)",
        checked.0, checked.1
    );
    ensure!(
        outcome.pending == 0,
        "{} changes never arrived",
        outcome.pending
    );
    Ok(())
}

/// Homes for the nodes (keys, and the registry `region` signs), and each node's patients.
fn prepare_publishers(work: &Path, args: &Args) -> Result<(Vec<Publisher>, Vec<PathBuf>)> {
    let mut publishers = Vec::with_capacity(args.shape.nodes);
    let mut dirs = Vec::with_capacity(args.shape.nodes);
    for index in 0..args.shape.nodes {
        let home = ring_node_home(work, index)?;
        let ods = home.config.organisation.ods.clone();
        let key = home.signing_key()?;
        publishers.push(Publisher {
            identity: NodeIdentity::from_key(&key, &ods)?,
            ods,
            key,
            patients: ring_patients(index, args.shape.nodes, args.shape.patients),
            consent: home.config.sharing.defaults(),
        });
        dirs.push(home.dir.clone());
    }
    Ok((publishers, dirs))
}

/// A first version of one of a node's documents, saved whole.
struct First {
    node: usize,
    meta: Rc<DocMeta>,
    bytes: Vec<u8>,
    heads: [u8; 32],
    signed: Vec<u8>,
    recipient: usize,
}

/// Makes every node's first versions (one problem per patient, and the sharing record), then
/// the scheduled changes in order, each signed as the publisher signs it.
fn make_changes(publishers: &[Publisher], args: &Args) -> Result<(Vec<First>, Vec<Change>)> {
    let count = publishers.len();
    let mut firsts = Vec::new();
    let mut history_words = Rng::new(args.shape.seed ^ 0x4849_5354);
    let mut making: Vec<HashMap<NhsNumber, Making>> = Vec::with_capacity(count);
    for (index, publisher) in publishers.iter().enumerate() {
        let mut documents = HashMap::new();
        for (side, patients) in publisher.patients.iter().enumerate() {
            let recipient = neighbour(index, side, count);
            for patient in patients {
                let mut made = Making::new(publisher, patient);
                let history =
                    caremesh_bench::earlier_problems(&mut history_words, args.history_kib * 1024);
                let (problems, sharing) = made.next(publisher, 0, history)?;
                for (version, document) in [(problems, &made.problems), (sharing, &made.sharing)] {
                    firsts.push(First {
                        node: index,
                        meta: version.meta.clone(),
                        bytes: document.save(),
                        heads: version.hash,
                        signed: (*version.signed).clone(),
                        recipient,
                    });
                }
                documents.insert(patient.clone(), made);
            }
        }
        making.push(documents);
    }
    let total = (args.shape.rate * args.shape.seconds as f64).ceil() as u64;
    let mut rng = Rng::new(args.shape.seed);
    let mut changes = Vec::with_capacity(total as usize);
    for serial in 1..=total {
        let node = rng.below(count as u64) as usize;
        let side = rng.below(2) as usize;
        let publisher = &publishers[node];
        let patients = &publisher.patients[side];
        let patient = &patients[rng.below(patients.len() as u64) as usize];
        let made = making[node]
            .get_mut(patient)
            .expect("every patient of the node has documents");
        let (problems, sharing) = made.next(publisher, serial, Vec::new())?;
        changes.push(Change {
            node,
            versions: [problems, sharing],
            recipient: neighbour(node, side, count),
        });
    }
    Ok((firsts, changes))
}

fn neighbour(index: usize, side: usize, count: usize) -> usize {
    if side == 0 {
        (index + count - 1) % count
    } else {
        (index + 1) % count
    }
}

impl Making {
    fn new(publisher: &Publisher, patient: &NhsNumber) -> Making {
        let meta = |section| DocMeta {
            publisher: publisher.ods.clone(),
            patient: patient.clone(),
            section,
            class: DataClass::Coded,
        };
        let actor = actor_for(&publisher.key);
        Making {
            problems: PublishedDocument::create(meta(Section::Problems), &actor),
            sharing: PublishedDocument::create(meta(Section::Sharing), &actor),
            problems_meta: Rc::new(meta(Section::Problems)),
            sharing_meta: Rc::new(meta(Section::Sharing)),
            items: 0,
        }
    }

    /// One new problem, as ingest publishes it, with `earlier` problems beside it: the next
    /// version of the problems document and of the sharing record (whose item counts it
    /// changes).
    fn next(
        &mut self,
        publisher: &Publisher,
        serial: u64,
        mut earlier: Vec<Item>,
    ) -> Result<(Version, Version)> {
        let id = format!("Condition/load-{serial}-{}", self.items);
        let item = Item::titled(
            &id,
            Section::Problems,
            DataClass::Coded,
            "Condition",
            &format!("Load-test problem {serial}"),
            "benchmark",
            &id,
        );
        self.items += 1 + earlier.len() as u64;
        earlier.push(item);
        let time = 1_800_000_000 + serial as i64;
        let problems = version_of(
            &mut self.problems,
            &self.problems_meta,
            &publisher.key,
            &earlier,
            time,
        )?;
        let record = SharingRecord::new(
            publisher.consent,
            BTreeMap::from([(Section::Problems, self.items)]),
        );
        let sharing = version_of(
            &mut self.sharing,
            &self.sharing_meta,
            &publisher.key,
            &[sharing_item(&publisher.ods, &record)],
            time,
        )?;
        Ok((problems, sharing))
    }
}

/// Writes `items` into `document` and returns the version that makes: the change and the
/// publisher's signature over the new heads.
fn version_of(
    document: &mut PublishedDocument,
    meta: &Rc<DocMeta>,
    key: &PublisherKey,
    items: &[Item],
    time: i64,
) -> Result<Version> {
    let before = document.heads();
    ensure!(
        document.update(items, &[], time),
        "every version changes something"
    );
    let after = document.heads();
    let mut change = document.changes_since(&before);
    ensure!(
        change.len() == 1 && after.len() == 1 && before.len() <= 1,
        "a publisher's version is one change on one head"
    );
    Ok(Version {
        meta: meta.clone(),
        change: Rc::new(change.remove(0)),
        deps: before.first().copied().unwrap_or([0; 32]),
        hash: after[0],
        signed: Rc::new(key.sign_heads(meta, &after).encode()),
    })
}

/// `caremesh encrypt` of the (new, stopped) home at `dir`, its data key made at `key_file`.
fn encrypt_home(dir: &Path, key_file: &Path) -> Result<()> {
    let output = std::process::Command::new(caremesh_bench::caremesh_binary()?)
        .args(["encrypt", "--dir"])
        .arg(dir)
        .arg("--data-key-file")
        .arg(key_file)
        .env("CAREMESH_LOG", "warn")
        .output()
        .context("running caremesh encrypt")?;
    ensure!(
        output.status.success(),
        "caremesh encrypt failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

fn spawn_hub(hub_dir: &Path, pin: bool) -> Result<std::process::Child> {
    let binary = caremesh_bench::caremesh_binary()?;
    let mut command = if pin {
        let mut command = std::process::Command::new("taskset");
        command.args(["-c", "0"]).arg(binary);
        command
    } else {
        std::process::Command::new(binary)
    };
    command
        .args(["run", "--dir"])
        .arg(hub_dir)
        .env("CAREMESH_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("starting the hub (is `caremesh` built beside this binary, and taskset installed for --pin?)")
}

fn pin_this_process_to(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it; the call
    // reads it for this process (pid 0).
    let status = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    ensure!(status == 0, "could not pin the generator to CPU {cpu}");
    Ok(())
}

/// What a node's task is handed: a first version (before the load) or the next version.
enum Publish {
    First(First),
    Next(Version),
}

/// What the load left to report and check.
struct Outcome {
    made: u64,
    late: u64,
    load_seconds: f64,
    drained_after: f64,
    pending: usize,
    /// CPU seconds over the load, and over the load and the drain (all the work the load made).
    hub_cpu: f64,
    hub_cpu_with_drain: f64,
    /// The hub's CPU over the load and the drain by thread ([`thread_cpu_line`]).
    hub_threads: String,
    own_cpu: f64,
    own_cpu_with_drain: f64,
    latencies: Vec<u32>,
    /// Each node's own documents' last heads, and what each node holds of others'.
    own_heads: Vec<HashMap<DocId, [u8; 32]>>,
    received_heads: Vec<HashMap<DocId, Vec<[u8; 32]>>>,
    metas: HashMap<DocId, DocMeta>,
    recipients: HashMap<DocId, usize>,
}

async fn drive(
    args: &Args,
    publishers: &[Publisher],
    firsts: Vec<First>,
    changes: Vec<Change>,
    trust: &TrustState,
    hub: SocketAddr,
    hub_pid: u32,
) -> Result<Outcome> {
    let tracker = Arc::new(Tracker::default());
    let records = Arc::new(Tracker::default());
    let registry = trust.current();
    let mut keys: HashMap<OdsCode, [u8; 32]> = publishers
        .iter()
        .map(|p| (p.ods.clone(), p.key.public()))
        .collect();
    // The hub's key as the registry gives it: the hub signs the audit checkpoints it sends
    // (an encrypted hub's trail records its encryption), which the sessions check.
    let hub_key = registry
        .registry()
        .organisations
        .iter()
        .find(|organisation| organisation.ods == hub_ods())
        .and_then(|hub| hub.keys.first())
        .and_then(|key| <[u8; 32]>::try_from(hex::decode(key).ok()?).ok())
        .context("the registry names the hub's key")?;
    keys.insert(hub_ods(), hub_key);
    let keys = Rc::new(keys);
    let registry_bytes = Rc::new(registry.bytes().to_vec());
    let endpoint = caremesh::network::sync_endpoint(None, "127.0.0.1:0".parse()?)?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut inboxes = Vec::with_capacity(publishers.len());
    let mut tasks = Vec::with_capacity(publishers.len());
    let clock = Instant::now();
    for (index, publisher) in publishers.iter().enumerate() {
        let (tx, rx) = mpsc::unbounded_channel();
        inboxes.push(tx);
        let host = ThinHost {
            index,
            feed: FeedId((index as u128 + 1).to_be_bytes()),
            own: HashMap::new(),
            positions: BTreeMap::new(),
            position_of: HashMap::new(),
            tip: 0,
            received: HashMap::new(),
            checkpoints: HashMap::new(),
            keys: keys.clone(),
            registry_version: registry.version(),
            registry_bytes: registry_bytes.clone(),
            tracker: tracker.clone(),
            records: records.clone(),
        };
        let client = caremesh::tls::client_config(&publisher.identity, trust, Some(hub_ods()))?;
        let client = quinn::crypto::rustls::QuicClientConfig::try_from(client)
            .context("QUIC client TLS configuration")?;
        let mut client = quinn::ClientConfig::new(Arc::new(client));
        client.transport_config(caremesh::network::transport_config());
        tasks.push(tokio::task::spawn_local(node_task(
            publisher.ods.clone(),
            host,
            endpoint.clone(),
            client,
            hub,
            rx,
            shutdown_rx.clone(),
            clock,
        )));
    }

    // Every node's first versions, then wait until each has reached its neighbour.
    let mut metas = HashMap::new();
    let mut recipients = HashMap::new();
    let mut own_heads: Vec<HashMap<DocId, [u8; 32]>> = vec![HashMap::new(); publishers.len()];
    for first in firsts {
        let doc = first.meta.id();
        metas.insert(doc, (*first.meta).clone());
        recipients.insert(doc, first.recipient);
        own_heads[first.node].insert(doc, first.heads);
        let in_flight = if first.meta.section == Section::Problems {
            &tracker
        } else {
            &records
        };
        in_flight.published(
            doc,
            InFlight {
                heads: vec![first.heads],
                published: Instant::now(),
                recipient: first.recipient,
            },
        );
        inboxes[first.node]
            .send(Publish::First(first))
            .map_err(|_| anyhow::anyhow!("a node's task ended before the load"))?;
    }
    let connecting = Instant::now();
    while tracker.pending() + records.pending() > 0 {
        // A node that gave up (or was refused something) says why now, not in ten minutes.
        if let Some(node) = tasks.iter().position(|task| task.is_finished()) {
            let ended = (&mut tasks[node]).await;
            anyhow::bail!(
                "node {node}'s task ended before the first versions arrived: {:?}",
                ended.map(|result| result.map(|_| ()))
            );
        }
        ensure!(
            connecting.elapsed() < Duration::from_secs(600),
            "the first versions had not all arrived after 10 minutes ({} missing)",
            tracker.pending() + records.pending()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "connected and converged after {:.1}s ({} connections lost and dialled again)",
        connecting.elapsed().as_secs_f64(),
        REDIALS.load(Ordering::Relaxed)
    );
    tracker.made.store(0, Ordering::Relaxed);
    tracker.delivered.store(0, Ordering::Relaxed);
    *tracker.latencies.lock().expect("not poisoned") = (Vec::new(), Vec::new());

    let mut cpu = HubCpu::new(hub_pid);
    let hub_threads_before = cpu_seconds_by_thread(hub_pid);
    let own_cpu_before = cpu_seconds(std::process::id());
    println!("{} gen cpu", Tracker::PROGRESS_HEADER);
    let load_started = Instant::now();
    let mut next_report = Duration::from_secs(10);
    let (mut last_made, mut last_own_cpu) = (0, own_cpu_before);
    let mut late = 0u64;
    let mut made = 0usize;
    let mut ticker = tokio::time::interval(Duration::from_millis(2));
    while made < changes.len() {
        ticker.tick().await;
        let elapsed = load_started.elapsed();
        let due = ((elapsed.as_secs_f64() * args.shape.rate) as usize).min(changes.len());
        if due.saturating_sub(made) as f64 > args.shape.rate {
            late += (due - made) as u64;
        }
        while made < due {
            let change = &changes[made];
            for version in &change.versions {
                let doc = version.meta.id();
                own_heads[change.node].insert(doc, version.hash);
                if inboxes[change.node]
                    .send(Publish::Next(version.clone()))
                    .is_err()
                {
                    let ended = (&mut tasks[change.node]).await;
                    anyhow::bail!(
                        "node {}'s task ended during the load: {:?}",
                        change.node,
                        ended.map(|result| result.map(|_| ()))
                    );
                }
            }
            for (version, in_flight) in change.versions.iter().zip([&tracker, &records]) {
                in_flight.published(
                    version.meta.id(),
                    InFlight {
                        heads: vec![version.hash],
                        published: Instant::now(),
                        recipient: change.recipient,
                    },
                );
            }
            made += 1;
        }
        if elapsed >= next_report {
            let own_cpu = cpu_seconds(std::process::id());
            println!(
                "{} {:>6.0}%",
                tracker.progress(
                    elapsed.as_secs_f64(),
                    made as u64,
                    last_made as u64,
                    &mut cpu
                ),
                100.0 * (own_cpu - last_own_cpu) / 10.0,
            );
            (last_made, last_own_cpu) = (made, own_cpu);
            next_report += Duration::from_secs(10);
        }
    }
    let load_seconds = load_started.elapsed().as_secs_f64();
    let hub_cpu = cpu.total_seconds();
    let own_cpu = cpu_seconds(std::process::id()) - own_cpu_before;
    let drain_started = Instant::now();
    while tracker.pending() + records.pending() > 0
        && drain_started.elapsed() < Duration::from_secs(args.shape.drain)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drained_after = drain_started.elapsed().as_secs_f64();
    let hub_cpu_with_drain = cpu.total_seconds();
    let hub_threads = thread_cpu_line(&hub_threads_before, &cpu_seconds_by_thread(hub_pid));
    let own_cpu_with_drain = cpu_seconds(std::process::id()) - own_cpu_before;
    let _ = shutdown_tx.send(true);
    let mut received_heads = vec![HashMap::new(); publishers.len()];
    for (index, task) in tasks.into_iter().enumerate() {
        received_heads[index] = task.await.context("a node's task panicked")??;
    }
    endpoint.wait_idle().await;
    let latencies = std::mem::take(&mut tracker.latencies.lock().expect("not poisoned").0);
    Ok(Outcome {
        made: tracker.made.load(Ordering::Relaxed),
        late,
        load_seconds,
        drained_after,
        pending: tracker.pending() + records.pending(),
        hub_cpu,
        hub_cpu_with_drain,
        hub_threads,
        own_cpu,
        own_cpu_with_drain,
        latencies,
        own_heads,
        received_heads,
        metas,
        recipients,
    })
}

/// Connections the generator's nodes lost and dialled again, over the whole run.
static REDIALS: AtomicU64 = AtomicU64::new(0);

/// Why the first connection was lost, for the summary: whether the hub closed it or it timed
/// out says whose failure it was.
static FIRST_LOSS: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// How many times a node dials again after losing its connection before it gives up.
const MAX_REDIALS: u32 = 20;

/// One node: dials the hub, runs its session, publishes what it is handed, and dials again
/// (with backoff, as a node does) when its connection fails or is lost: under a burst of
/// 500 handshakes a dial can time out, and a node that gave up would strand its documents
/// and read as the hub's failure. Returns the heads it holds of others' documents when told
/// to stop.
#[allow(clippy::too_many_arguments)]
async fn node_task(
    ods: OdsCode,
    mut host: ThinHost,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    hub: SocketAddr,
    mut inbox: mpsc::UnboundedReceiver<Publish>,
    mut shutdown: watch::Receiver<bool>,
    clock: Instant,
) -> Result<HashMap<DocId, Vec<[u8; 32]>>> {
    let mut redials = 0;
    loop {
        let ended = connected(
            &ods,
            &mut host,
            &endpoint,
            &client,
            hub,
            &mut inbox,
            &mut shutdown,
            clock,
        )
        .await?;
        let Ended::Lost(error) = ended else { break };
        redials += 1;
        if redials > MAX_REDIALS {
            return Err(error.context(format!("{ods} gave up after {MAX_REDIALS} redials")));
        }
        REDIALS.fetch_add(1, Ordering::Relaxed);
        FIRST_LOSS
            .lock()
            .expect("not poisoned")
            .get_or_insert_with(|| format!("{error:#}"));
        let backoff = Duration::from_millis(250 << redials.min(5));
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => break,
        }
    }
    Ok(host
        .received
        .into_iter()
        .map(|(doc, received)| (doc, received.signed.heads))
        .collect())
}

/// How a node's connection ended: told to stop, or lost (dial it again).
enum Ended {
    Stopped,
    Lost(anyhow::Error),
}

/// One connection of a node, until it is told to stop or the connection fails (`Lost`).
/// A rejection or a session error is `Err`: the run is wrong, and dialling again would
/// hide it.
#[allow(clippy::too_many_arguments)]
async fn connected(
    ods: &OdsCode,
    host: &mut ThinHost,
    endpoint: &quinn::Endpoint,
    client: &quinn::ClientConfig,
    hub: SocketAddr,
    inbox: &mut mpsc::UnboundedReceiver<Publish>,
    shutdown: &mut watch::Receiver<bool>,
    clock: Instant,
) -> Result<Ended> {
    let now_ms = || clock.elapsed().as_millis() as u64;
    let dialled = async {
        let connection = endpoint
            .connect_with(client.clone(), hub, "caremesh.invalid")?
            .await?;
        let streams = connection.open_bi().await?;
        Ok::<_, anyhow::Error>((connection, streams))
    };
    let (connection, (mut send, mut recv)) = match dialled.await {
        Ok(dialled) => dialled,
        Err(error) => {
            return Ok(Ended::Lost(
                error.context(format!("{ods} dialling the hub")),
            ));
        }
    };
    let mut session = Session::new(
        ods.clone(),
        Recipient {
            ods: hub_ods(),
            kind: OrgKind::Hub,
        },
        now_ms(),
        host,
    )?;
    let ended = loop {
        while let Some(frame) = session.poll_transmit(now_ms(), host)? {
            if let Err(error) = send.write_all(&frame).await {
                return Ok(Ended::Lost(
                    anyhow::Error::new(error).context(format!("{ods} writing to the hub")),
                ));
            }
        }
        while let Some(event) = session.poll_event() {
            if let caremesh_sync::Event::Rejected {
                reason,
                doc,
                publisher,
            } = event
            {
                anyhow::bail!(
                    "{ods} rejected {publisher}'s document from the hub ({}): {reason}",
                    if host.own.contains_key(&doc) {
                        "its own"
                    } else if host.received.contains_key(&doc) {
                        "one it held"
                    } else {
                        "a first copy"
                    }
                );
            }
        }
        let timeout = session
            .poll_timeout()
            .map(|at| clock + Duration::from_millis(at))
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            chunk = recv.read_chunk(64 * 1024, true) => {
                match chunk {
                    Ok(Some(chunk)) => session.handle_input(&chunk.bytes, now_ms(), host)?,
                    Ok(None) => break Ended::Lost(anyhow::anyhow!("{ods}: the hub closed the stream")),
                    Err(error) => break Ended::Lost(anyhow::Error::new(error).context(format!("{ods} reading from the hub"))),
                }
            }
            publish = inbox.recv() => {
                let Some(publish) = publish else { break Ended::Stopped };
                host.take(publish);
                // Take whatever else is waiting before the session looks at its feed.
                while let Ok(publish) = inbox.try_recv() {
                    host.take(publish);
                }
                session.feed_changed();
            }
            _ = tokio::time::sleep_until(timeout.into()) => match session.handle_timeout(now_ms()) {
                // No Hello in time from a hub answering a burst of 500 handshakes: a node
                // dials again, and so does this one.
                Err(SessionError::HelloTimeout) => {
                    let error = anyhow::Error::new(SessionError::HelloTimeout);
                    break Ended::Lost(error.context(format!("{ods} waiting for the hub's Hello")));
                }
                other => other?,
            },
            _ = shutdown.changed() => break Ended::Stopped,
        }
    };
    connection.close(0u32.into(), b"load over");
    Ok(ended)
}

fn report(args: &Args, outcome: &Outcome, hub_peak_kib: u64) -> Result<()> {
    let made = outcome.made;
    LoadSummary {
        made,
        load_seconds: outcome.load_seconds,
        rate: args.shape.rate,
        late: outcome.late,
        latencies: outcome.latencies.clone(),
        drained_after: outcome.drained_after,
        pending: outcome.pending,
        hub_cpu: outcome.hub_cpu,
        hub_peak_kib,
        own_cpu: outcome.own_cpu,
    }
    .print();
    // Over the load and the drain: a hub that fell behind does the rest of the load's work
    // while it drains.
    let per_change = |seconds: f64| 1e3 * seconds / made.max(1) as f64;
    println!(
        "per change, over the load and the drain: hub {:.3} ms of CPU, generator {:.3} ms",
        per_change(outcome.hub_cpu_with_drain),
        per_change(outcome.own_cpu_with_drain)
    );
    println!(
        "hub CPU by thread, over the load and the drain: {}",
        outcome.hub_threads
    );
    println!(
        "connections lost and dialled again: {}{}",
        REDIALS.load(Ordering::Relaxed),
        FIRST_LOSS
            .lock()
            .expect("not poisoned")
            .as_ref()
            .map(|why| format!(" (the first: {why})"))
            .unwrap_or_default()
    );
    Ok(())
}

/// Every document's last version is held by its recipient and by the hub; a sample of the
/// hub's stored documents load to their signed heads. Returns (copies compared, loaded).
fn check_nothing_lost(
    outcome: &Outcome,
    hub_db: &caremesh_storage::at_rest::Database,
) -> Result<(usize, usize)> {
    let store = hub_db.open_read_only()?;
    let mut compared = 0;
    let mut loaded = 0;
    for (node, own) in outcome.own_heads.iter().enumerate() {
        for (doc, heads) in own {
            let recipient = outcome.recipients[doc];
            let meta = &outcome.metas[doc];
            ensure!(
                outcome.received_heads[recipient].get(doc) == Some(&vec![*heads]),
                "node {recipient} does not hold node {node}'s last version of its {} document",
                meta.section
            );
            let stored = store.document(*doc)?.with_context(|| {
                format!(
                    "the hub does not hold node {node}'s {} document",
                    meta.section
                )
            })?;
            let signed = stored
                .signed_heads()
                .context("the hub's signed heads decode")?;
            ensure!(
                signed.heads == vec![*heads],
                "the hub does not hold node {node}'s last version of its {} document",
                meta.section
            );
            compared += 2;
            // A sample, loaded whole: the hub's bytes (saved, and changes appended) give the
            // publisher's heads.
            if doc.0[0] < 8 {
                let document = PublishedDocument::load(meta, &stored.snapshot)?;
                ensure!(
                    document.heads() == vec![*heads],
                    "the hub's bytes of node {node}'s {} document do not give its heads",
                    meta.section
                );
                loaded += 1;
            }
        }
    }
    Ok((compared, loaded))
}
