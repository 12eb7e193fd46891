//! The audit trail as operators use it: `caremesh audit verify|checkpoint|report`, checking
//! the hash chain against signed checkpoints, and the running node's checkpoints. Reports
//! themselves are `caremesh_view::audit_report`.

use crate::home::Home;
use anyhow::{Context, Result, bail};
use caremesh_fhir::clock;
use caremesh_storage::Store;
use caremesh_storage::audit::{AuditEvent, ChainedEvent, verify_chain, verify_chain_after};
use caremesh_sync::{AuditCheckpoint, OdsCode, PublisherKey, SignedCheckpoint};
use caremesh_view::audit_report::{ReportFormat, ReportQuery, ReportRow, report};
use clap::Subcommand;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Check that no entry of the audit trail was edited, removed, inserted or reordered, and
    /// that it still holds what every signed checkpoint known (this node's own, and the
    /// receipts of peers that witness them) says it held. Exits 1 and names what is wrong.
    Verify {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Sign a checkpoint of the audit trail now (a running node signs one every few minutes
    /// and on shutdown, and hands it to its peers to witness).
    Checkpoint {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Who accessed a patient's record, or what a user accessed: this node's own trail and
    /// the access records other organisations sent about views of data from here.
    Report {
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        query: ReportArgs,
    },
}

/// What `caremesh audit report` asks for.
#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
pub struct ReportArgs {
    /// The patient's NHS number. Without a patient or a user, --from and --to give a
    /// report of everything in those days.
    #[arg(long, conflicts_with = "user", required_unless_present_any = ["user", "from"])]
    pub patient: Option<String>,
    /// The user id (as the launch token gave it).
    #[arg(long)]
    pub user: Option<String>,
    /// First day included, YYYY-MM-DD (UTC).
    #[arg(long)]
    pub from: Option<String>,
    /// Last day included, YYYY-MM-DD (UTC).
    #[arg(long)]
    pub to: Option<String>,
    /// Only entries of this action: view, break-glass, consent-set, refused-anonymous…
    #[arg(long)]
    pub action: Option<String>,
    /// table, csv, json, or fhir (a FHIR R4 Bundle of AuditEvent resources).
    #[arg(long, default_value = "table", value_parser = report_format)]
    pub format: ReportFormat,
}

/// `caremesh audit verify`, which only reads.
pub fn verify(dir: &std::path::Path) -> Result<ExitCode> {
    let home = Home::open(dir)?;
    let store = home.open_store()?;
    let events = store.audit_events()?;
    let own = home.config.organisation.ods.clone();
    let own_key = home.public_key()?;
    let known = store.own_checkpoints_known()?;
    let checked = check_against_checkpoints(&events, &known, &own, &own_key);
    let mut broken = checked.problems;
    if let Err(chain) = verify_chain(&events) {
        broken.insert(0, chain.to_string());
    }
    if !broken.is_empty() {
        for problem in &broken {
            println!("audit trail BROKEN: {problem}");
        }
        return Ok(ExitCode::from(1));
    }
    println!("audit trail intact: {} entries", events.len());
    match checked.newest {
        Some(newest) => println!("matches {newest}"),
        None => println!(
            "no signed checkpoint yet: entries cut from the end could not be told (run `caremesh audit checkpoint`)"
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// An entry for what `operator` (the account that ran the CLI) did at this node, allowed;
/// the caller adds the patient, what was shown and the detail.
pub fn operator_event(home: &Home, operator: &str, action: &str, purpose: &str) -> AuditEvent {
    AuditEvent {
        at: clock::now_unix(),
        user_id: operator.to_string(),
        user_name: operator.to_string(),
        role: "operator".into(),
        organisation: home.config.organisation.ods.to_string(),
        action: action.into(),
        nhs: None,
        sources: Vec::new(),
        sections: Vec::new(),
        purpose: purpose.into(),
        outcome: "allowed".into(),
        detail: String::new(),
    }
}

/// The report `query` asks for, recorded in the trail as `operator`'s access: reading the
/// trail is itself an access to patient data.
pub fn report_as(
    home: &Home,
    store: &mut Store,
    operator: &str,
    query: &ReportQuery,
) -> Result<Vec<ReportRow>> {
    let own = home.config.organisation.ods.clone();
    let rows = report(store, &own, query).context("reading the audit trail")?;
    let event = AuditEvent {
        nhs: query.patient.as_ref().map(|n| n.to_string()),
        detail: query
            .user
            .as_ref()
            .map(|u| format!("report on user {u}"))
            .unwrap_or_default(),
        ..operator_event(home, operator, "audit-report", "audit")
    };
    // Written even on a full disk (from the reserve): the report is what a data protection
    // officer needs most when something has gone wrong.
    crate::disk::write_even_when_full(&home.dir, || Ok(store.append_audit(&event)?))?;
    Ok(rows)
}

/// How often a running node signs a checkpoint of its audit trail (when it grew).
pub const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(5 * 60);

/// Signs a checkpoint for the node in `home` through its store writer, logging instead of
/// failing: a running node's periodic and shutdown checkpoints.
pub async fn checkpoint_now(home: &Home, writer: &crate::network::StoreWriter) {
    let own = home.config.organisation.ods.clone();
    let signed = match home.signing_key() {
        Ok(key) => {
            writer
                .write(move |store| sign_checkpoint(store, &key, &own, clock::now_unix()))
                .await
        }
        Err(error) => Err(error.into()),
    };
    match signed {
        Ok(Some(signed)) => tracing::info!(
            entries = signed.checkpoint.count,
            "signed an audit checkpoint"
        ),
        Ok(None) => {}
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "could not sign an audit checkpoint")
        }
    }
}

/// Signs a checkpoint of the trail as it stands, if it grew since the last one. The entries
/// since the last checkpoint are checked first: a checkpoint never vouches for a broken chain.
pub fn sign_checkpoint(
    store: &mut Store,
    key: &PublisherKey,
    own: &OdsCode,
    now: i64,
) -> Result<Option<SignedCheckpoint>> {
    let (after, hash) = match store.newest_own_checkpoint()? {
        Some(bytes) => {
            let last = SignedCheckpoint::decode(&bytes)
                .context("the newest audit checkpoint held here does not decode")?;
            (last.checkpoint.count as i64, last.checkpoint.head)
        }
        None => (0, [0u8; 32]),
    };
    let events = store.audit_events_after(after)?;
    let Some(last) = events.last() else {
        return Ok(None);
    };
    if let Err(broken) = verify_chain_after(after, &hash, &events) {
        bail!(
            "the audit trail is broken since the last checkpoint ({broken}); no checkpoint was signed: run `caremesh audit verify`"
        );
    }
    let signed = key.sign_checkpoint(AuditCheckpoint {
        organisation: own.clone(),
        count: last.seq as u64,
        head: last.hash,
        at: now,
    });
    let batch = store.write()?;
    batch.save_own_checkpoint(&signed)?;
    batch.commit()?;
    Ok(Some(signed))
}

/// The trail checked against every checkpoint of it known here.
pub struct CheckpointCheck {
    /// What is wrong, each naming the gap and where the checkpoint showing it is held.
    pub problems: Vec<String>,
    /// The newest checkpoint the trail matches, described, if any.
    pub newest: Option<String>,
}

/// Checks `events` (the whole trail, in order) against `known` checkpoints (who holds each:
/// `None` for this node, else the witness; encoded). A checkpoint of `count` entries must find
/// the trail at least that long, with entry `count` hashing to its head.
pub fn check_against_checkpoints(
    events: &[ChainedEvent],
    known: &[(Option<String>, Vec<u8>)],
    own: &OdsCode,
    own_key: &[u8; 32],
) -> CheckpointCheck {
    let mut problems = Vec::new();
    let mut valid: Vec<(SignedCheckpoint, String)> = Vec::new();
    for (holder, bytes) in known {
        let held = match holder {
            None => "here".to_string(),
            Some(witness) => format!("by witness {witness}"),
        };
        match SignedCheckpoint::decode(bytes) {
            Ok(signed) => match signed.verify(|ods, key| ods == own && key == own_key) {
                Ok(()) => valid.push((signed, held)),
                Err(error) => problems.push(format!("a checkpoint held {held}: {error}")),
            },
            Err(error) => problems.push(format!("a checkpoint held {held}: {error}")),
        }
    }
    valid.sort_by_key(|(signed, _)| std::cmp::Reverse(signed.checkpoint.count));
    let held_by = |count: u64| -> String {
        let holders: Vec<&str> = valid
            .iter()
            .filter(|(s, _)| s.checkpoint.count == count)
            .map(|(_, held)| held.as_str())
            .collect();
        holders.join(" and ")
    };
    let mut newest = None;
    let mut reported = std::collections::BTreeSet::new();
    for (signed, _) in &valid {
        let checkpoint = &signed.checkpoint;
        if !reported.insert(checkpoint.count) {
            continue; // one line per checkpoint, naming everyone who holds it
        }
        let when = clock::uk_date_time(checkpoint.at);
        let held = held_by(checkpoint.count);
        let length = events.len() as u64;
        if checkpoint.count == 0 {
            continue; // nothing to hold the trail to
        }
        if checkpoint.count > length {
            problems.push(format!(
                "entries {} to {} are missing: the trail holds {length}, but this node signed a checkpoint of {} entries on {when} (held {held})",
                length + 1,
                checkpoint.count,
                checkpoint.count
            ));
        } else if events[checkpoint.count as usize - 1].hash != checkpoint.head {
            problems.push(format!(
                "entries up to {} were rewritten: entry {} no longer hashes to the head this node signed on {when} (held {held})",
                checkpoint.count, checkpoint.count
            ));
        } else if newest.is_none() {
            newest = Some(format!(
                "the newest checkpoint: {} entries, signed on {when}, held {held}",
                checkpoint.count
            ));
        }
    }
    CheckpointCheck { problems, newest }
}

fn report_format(text: &str) -> std::result::Result<ReportFormat, String> {
    ReportFormat::parse(text).ok_or_else(|| {
        let names: Vec<&str> = ReportFormat::ALL.iter().map(|(name, _)| *name).collect();
        format!("not a report format: use one of {}", names.join(", "))
    })
}
