//! Scenario files (TOML): the region's topology, its workload, the faults and when they
//! happen, how long to run and which invariants to check. See `simulations/README.md`.

use caremesh_sync::OrgKind;
use serde::Deserialize;
use std::path::Path;

/// Limits on what a scenario may ask for, so a typo cannot ask for a week of simulated time
/// or a million nodes.
pub const MAX_NODES: u32 = 2_000;
pub const MAX_DURATION_S: u64 = 7 * 24 * 3600;
pub const MAX_SCENARIO_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("scenario {path}: {cause}")]
    Read { path: String, cause: std::io::Error },
    #[error("scenario {path} is {size} bytes, over the {MAX_SCENARIO_BYTES} byte limit")]
    TooLarge { path: String, size: u64 },
    #[error("scenario {path}: {cause}")]
    Toml {
        path: String,
        cause: toml::de::Error,
    },
    #[error("scenario {name}: {problem}")]
    Invalid { name: String, problem: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Simulated seconds of workload and faults.
    pub duration_s: u64,
    /// Simulated seconds after `duration_s` with no faults and no new work, for the region to
    /// converge before the final checks.
    #[serde(default = "default_settle_s")]
    pub settle_s: u64,
    /// How often (simulated seconds) invariants are checked during the run.
    #[serde(default = "default_check_every_s")]
    pub check_every_s: u64,
    /// Defaults for every link.
    #[serde(default)]
    pub network: LinkSpec,
    pub nodes: Vec<NodeGroup>,
    #[serde(default)]
    pub workload: Workload,
    #[serde(default)]
    pub faults: Vec<Fault>,
    #[serde(default = "Invariant::all")]
    pub invariants: Vec<Invariant>,
    /// Bugs planted in nodes, to show the invariants catch them (harness self-tests).
    #[serde(default)]
    pub inject: Vec<Injected>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Injected {
    pub node: String,
    pub bug: Bug,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Bug {
    /// The node sends every document to every peer, skipping the sharing rules.
    ForwardWithheld,
    /// The node acknowledges received documents without storing them.
    AckWithoutStoring,
    /// The node places a re-sent entry on its new patient without moving it off the old.
    PlaceWithoutMoving,
    /// The node's driver keeps its sessions open when a group commit fails, so they
    /// acknowledge what was rolled back.
    AckAfterFailedCommit,
    /// The node's store commits without syncing (`synchronous = OFF`, as the benchmarks'
    /// simulated nodes run), so a power cut takes back what it acknowledged.
    CommitWithoutSync,
    /// The node, relaying, stores a new version whose hash chain does not end at the signed
    /// heads.
    RelayWithoutHeadsCheck,
    /// The node sends holders of an older version well-formed changes that are not the ones
    /// it holds (a peer altering what it relays).
    ForgeChanges,
    /// The node's driver lets frames leave once a turn has committed, before the commit is
    /// durable, so a power cut between commit and sync takes back what it acknowledged.
    FramesBeforeDurable,
}

impl Bug {
    /// The bug as planted in the production host or driver; `None` for a bug the simulator
    /// plants in its own publishing path.
    pub fn planted(self) -> Option<caremesh_sync::planted::PlantedBug> {
        use caremesh_sync::planted::PlantedBug;
        match self {
            Bug::ForwardWithheld => Some(PlantedBug::ForwardWithheld),
            Bug::AckWithoutStoring => Some(PlantedBug::AckWithoutStoring),
            Bug::AckAfterFailedCommit => Some(PlantedBug::AckAfterFailedCommit),
            Bug::RelayWithoutHeadsCheck => Some(PlantedBug::RelayWithoutHeadsCheck),
            Bug::ForgeChanges => Some(PlantedBug::ForgeChanges),
            Bug::FramesBeforeDurable => Some(PlantedBug::FramesBeforeDurable),
            Bug::PlaceWithoutMoving | Bug::CommitWithoutSync => None,
        }
    }
}

fn default_settle_s() -> u64 {
    600
}

fn default_check_every_s() -> u64 {
    30
}

/// One node, or `count` alike (their ODS codes are `ods` followed by a 3-digit number).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeGroup {
    pub ods: String,
    #[serde(default = "one")]
    pub count: u32,
    pub kind: OrgKind,
    /// ODS codes (or group codes) this node dials.
    #[serde(default)]
    pub peers: Vec<String>,
    /// Share of the region's patients this organisation cares for, besides the patients
    /// registered with it (GP practices share the region's patients between them).
    #[serde(default)]
    pub caseload: f64,
    /// How far this node's clock is ahead of true time (negative: behind).
    #[serde(default)]
    pub clock_skew_s: i64,
    /// This node's access link, where it differs from the network's defaults.
    #[serde(default)]
    pub link: Option<LinkSpec>,
}

fn one() -> u32 {
    1
}

/// A link's character. Loss, duplication and reordering are per packet: QUIC retransmits,
/// discards duplicates and reorders, so the sync streams see them as delay and as bandwidth.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LinkSpec {
    pub latency_ms: u64,
    pub jitter_ms: u64,
    pub bandwidth_kbps: u64,
    pub loss: f64,
    pub duplicate: f64,
    pub reorder: f64,
}

impl Default for LinkSpec {
    fn default() -> Self {
        LinkSpec {
            latency_ms: 20,
            jitter_ms: 5,
            bandwidth_kbps: 10_000,
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Workload {
    /// Patients in the region.
    pub patients: u32,
    /// Items each organisation holds per patient on its caseload at the start.
    pub items_per_patient: u32,
    /// Mean simulated seconds between changes at each care organisation (0: none).
    pub change_every_s: f64,
    /// Mean simulated seconds between record views at each care organisation (0: none).
    /// A view that shows other organisations' data is audited and sent to them.
    pub view_every_s: f64,
    /// Share of changes that re-send one of the organisation's earlier entries under
    /// another of its patients: a correction of which patient the entry belongs to.
    pub move_share: f64,
    pub consent: Vec<ConsentChange>,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            patients: 20,
            items_per_patient: 6,
            change_every_s: 300.0,
            view_every_s: 0.0,
            move_share: 0.1,
            consent: Vec::new(),
        }
    }
}

/// A patient's choice recorded at one organisation, at a time.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentChange {
    pub at_s: u64,
    pub node: String,
    /// Which of the node's caseload patients (0: the first).
    #[serde(default)]
    pub patient: usize,
    pub share_out: Option<bool>,
    pub share_in: Option<bool>,
    pub objection: Option<bool>,
}

// No `deny_unknown_fields` here: serde cannot combine it with the flattened kind, which
// refuses unknown fields itself.
#[derive(Debug, Clone, Deserialize)]
pub struct Fault {
    pub at_s: u64,
    #[serde(flatten)]
    pub kind: FaultKind,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum FaultKind {
    /// Nodes in different groups cannot reach each other until `until_s`. `"*"` names
    /// every node not in another group. One-way: only packets from the first group to the
    /// others are lost (a QUIC connection cannot survive that either).
    Partition {
        groups: Vec<Vec<String>>,
        until_s: u64,
        #[serde(default)]
        one_way: bool,
    },
    /// The access links of `nodes` degrade until `until_s`; with `flap_every_s` they also go
    /// down for `flap_down_s` every so often.
    Link {
        nodes: Vec<String>,
        until_s: u64,
        #[serde(default)]
        loss: Option<f64>,
        #[serde(default)]
        latency_ms: Option<u64>,
        #[serde(default)]
        bandwidth_kbps: Option<u64>,
        #[serde(default)]
        flap_every_s: Option<u64>,
        #[serde(default = "default_flap_down_s")]
        flap_down_s: u64,
    },
    /// The disks of `nodes` fail until `until_s`: each commit fails with chance
    /// `commit_failure` (an fsync that failed: SQLite rolls the transaction back), and every
    /// commit fails while `full`. The nodes must lose nothing they acknowledged or published,
    /// and converge once their disks recover.
    Disk {
        nodes: Vec<String>,
        until_s: u64,
        #[serde(default)]
        commit_failure: f64,
        #[serde(default)]
        full: bool,
    },
    /// The node's machine loses power and, if given, restarts later: its disk keeps what was
    /// synced, and of each write not yet synced, the write or the bytes it overwrote (torn
    /// writes). With `mid_write`, the power goes at one of its next few writes or syncs,
    /// most often inside a commit, and the node stops there. With `mid_sync`, the power
    /// goes in the engine's next sync of its WAL after a group commit. With `corrupt`, one
    /// bit of a random page of its database flips while it is down (damage at rest): the
    /// node must go on as if nothing happened (a page it never reads) or stop and say why.
    Crash {
        node: String,
        #[serde(default)]
        restart_after_s: Option<u64>,
        #[serde(default)]
        mid_write: bool,
        #[serde(default)]
        mid_sync: bool,
        #[serde(default)]
        corrupt: bool,
    },
}

fn default_flap_down_s() -> u64 {
    30
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Invariant {
    /// Every node holds, after heal, every document it is entitled to, at its latest version.
    Convergence,
    /// Every change a publisher committed is still held by it.
    NoLoss,
    /// No node holds a document policy does not let it hold.
    NothingForbidden,
    /// Every stored document verifies against its publisher's registered key.
    Authentic,
    /// Every node's audit trail verifies: no entry lost, altered or out of order.
    AuditChain,
    /// No publisher's entry is on two patients: always at the publisher, and everywhere
    /// once the region has converged.
    OnePatientPerResource,
}

impl Invariant {
    pub fn all() -> Vec<Invariant> {
        vec![
            Invariant::Convergence,
            Invariant::NoLoss,
            Invariant::NothingForbidden,
            Invariant::Authentic,
            Invariant::AuditChain,
            Invariant::OnePatientPerResource,
        ]
    }
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let shown = path.display().to_string();
        let size = std::fs::metadata(path)
            .map_err(|cause| ScenarioError::Read {
                path: shown.clone(),
                cause,
            })?
            .len();
        if size > MAX_SCENARIO_BYTES {
            return Err(ScenarioError::TooLarge { path: shown, size });
        }
        let text = std::fs::read_to_string(path).map_err(|cause| ScenarioError::Read {
            path: shown.clone(),
            cause,
        })?;
        Scenario::parse(&text, &shown)
    }

    /// Parses and validates scenario text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Scenario, ScenarioError> {
        let scenario: Scenario = toml::from_str(text).map_err(|cause| ScenarioError::Toml {
            path: origin.to_string(),
            cause,
        })?;
        scenario.validate()?;
        Ok(scenario)
    }

    fn invalid(&self, problem: impl Into<String>) -> ScenarioError {
        ScenarioError::Invalid {
            name: self.name.clone(),
            problem: problem.into(),
        }
    }

    /// The ODS codes of every node, group by group.
    pub fn codes(&self) -> Vec<(String, &NodeGroup)> {
        let mut codes = Vec::new();
        for group in &self.nodes {
            if group.count == 1 {
                codes.push((group.ods.clone(), group));
            } else {
                for n in 0..group.count {
                    codes.push((format!("{}{n:03}", group.ods), group));
                }
            }
        }
        codes
    }

    /// Expands a name from the scenario (a code, a group's code, or `*` when `allow_rest`)
    /// into node codes.
    pub fn resolve(&self, name: &str) -> Vec<String> {
        let codes = self.codes();
        if let Some(group) = self.nodes.iter().find(|g| g.ods == name && g.count > 1) {
            return codes
                .into_iter()
                .filter(|(_, g)| std::ptr::eq(*g, group))
                .map(|(c, _)| c)
                .collect();
        }
        codes
            .into_iter()
            .filter(|(c, _)| c == name)
            .map(|(c, _)| c)
            .collect()
    }

    pub fn validate(&self) -> Result<(), ScenarioError> {
        let total: u32 = self.nodes.iter().map(|g| g.count).sum();
        if total == 0 || total > MAX_NODES {
            return Err(self.invalid(format!("{total} nodes; give 1 to {MAX_NODES}")));
        }
        if self.duration_s == 0 || self.duration_s + self.settle_s > MAX_DURATION_S {
            return Err(self.invalid(format!(
                "duration_s + settle_s must be 1 to {MAX_DURATION_S} seconds"
            )));
        }
        if self.check_every_s == 0 {
            return Err(self.invalid("check_every_s must be at least 1"));
        }
        let codes = self.codes();
        let mut seen = std::collections::BTreeSet::new();
        for (code, _) in &codes {
            if caremesh_sync::OdsCode::parse(code).is_err() {
                return Err(self.invalid(format!("`{code}` is not a valid ODS code")));
            }
            if !seen.insert(code.clone()) {
                return Err(self.invalid(format!("node `{code}` is defined twice")));
            }
        }
        let known = |name: &str| !self.resolve(name).is_empty();
        for group in &self.nodes {
            if let Some(peer) = group.peers.iter().find(|p| !known(p)) {
                return Err(self.invalid(format!(
                    "`{}` dials `{peer}`, which is not a node",
                    group.ods
                )));
            }
            if !(0.0..=1.0).contains(&group.caseload) {
                return Err(self.invalid(format!("`{}` caseload must be 0 to 1", group.ods)));
            }
        }
        if let Some(injected) = self
            .inject
            .iter()
            .find(|i| self.resolve(&i.node).len() != 1)
        {
            return Err(self.invalid(format!(
                "a bug is injected into `{}`, which is not one node",
                injected.node
            )));
        }
        for change in &self.workload.consent {
            if self.resolve(&change.node).len() != 1 {
                return Err(self.invalid(format!(
                    "a consent change names `{}`, which is not one node",
                    change.node
                )));
            }
        }
        for fault in &self.faults {
            let names: Vec<&String> = match &fault.kind {
                FaultKind::Partition {
                    groups, until_s, ..
                } => {
                    if *until_s <= fault.at_s {
                        return Err(self.invalid(format!(
                            "a partition at {} s heals before it starts",
                            fault.at_s
                        )));
                    }
                    groups
                        .iter()
                        .flatten()
                        .filter(|n| n.as_str() != "*")
                        .collect()
                }
                FaultKind::Link { nodes, until_s, .. } => {
                    if *until_s <= fault.at_s {
                        return Err(self.invalid(format!(
                            "a link fault at {} s ends before it starts",
                            fault.at_s
                        )));
                    }
                    nodes.iter().collect()
                }
                FaultKind::Disk {
                    nodes,
                    until_s,
                    commit_failure,
                    ..
                } => {
                    if *until_s <= fault.at_s {
                        return Err(self.invalid(format!(
                            "a disk fault at {} s ends before it starts",
                            fault.at_s
                        )));
                    }
                    if !(0.0..=1.0).contains(commit_failure) {
                        return Err(self.invalid(format!(
                            "a disk fault at {} s has commit_failure {commit_failure}: a chance is within 0 and 1",
                            fault.at_s
                        )));
                    }
                    nodes.iter().collect()
                }
                FaultKind::Crash { node, .. } => vec![node],
            };
            if let Some(name) = names.into_iter().find(|n| !known(n)) {
                return Err(self.invalid(format!(
                    "a fault at {} s names `{name}`, which is not a node",
                    fault.at_s
                )));
            }
            if fault.at_s > self.duration_s {
                return Err(self.invalid(format!(
                    "a fault at {} s starts after duration_s",
                    fault.at_s
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Scenario, ScenarioError> {
        Scenario::parse(text, "test")
    }

    #[test]
    fn groups_expand_and_mistakes_are_named() {
        let scenario = parse(
            r#"
            name = "t"
            duration_s = 60
            [[nodes]]
            ods = "HUB01"
            kind = "hub"
            [[nodes]]
            ods = "GP"
            count = 3
            kind = "gp"
            peers = ["HUB01"]
            "#,
        )
        .unwrap();
        assert_eq!(scenario.resolve("GP"), vec!["GP000", "GP001", "GP002"]);
        let error = parse(
            r#"
            name = "t"
            duration_s = 60
            [[nodes]]
            ods = "GP1"
            kind = "gp"
            peers = ["HUB9"]
            "#,
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("`HUB9`, which is not a node"),
            "{error}"
        );
    }
}
