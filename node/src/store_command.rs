//! The CLI commands that write the store (ingest, record, consent, audit checkpoint and
//! report), as data. When no node runs on the home the command runs in the CLI's own
//! process, on a store it opens; while `caremesh run` runs, the CLI hands the command to the
//! node ([`crate::control`]), which runs the same code on its one store writer. Either way
//! what is printed and the exit code are the same.

use crate::api_clients;
use crate::audit;
use crate::home::Home;
use crate::quarantine;
use anyhow::{Context, Result, bail};
use caremesh_fhir::clock;
use caremesh_ingest::{FileDisposition, Ingestor};
use caremesh_storage::Store;
use caremesh_storage::audit::AuditEvent;
use caremesh_sync::NhsNumber;
use caremesh_sync::policy::Consent;
use caremesh_view::audit_report::{self, ReportQuery};
use caremesh_view::{fhir_api, record};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::PathBuf;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum StoreCommand {
    Ingest {
        /// Absolute: the node resolves nothing against its own working directory.
        paths: Vec<PathBuf>,
        patient_index: Option<PathBuf>,
        move_files: bool,
        json: bool,
    },
    Record {
        nhs: String,
        user: String,
        json: bool,
        /// As FHIR R4: a `Patient/$everything` searchset Bundle.
        #[serde(default)]
        fhir: bool,
    },
    ConsentSet {
        nhs: NhsNumber,
        share_out: Option<bool>,
        share_in: Option<bool>,
        objection: Option<bool>,
    },
    ConsentShow {
        nhs: NhsNumber,
    },
    AuditCheckpoint,
    AuditReport(audit::ReportArgs),
    ApiClientAdd(crate::api_clients::ClientAsked),
    ApiClientNotifyTo {
        client_id: String,
        /// Canonical origins, checked by the CLI.
        origins: Vec<String>,
    },
    ApiClientList {
        json: bool,
    },
    ApiClientRemove {
        client_id: String,
    },
    ApiToken(crate::api_clients::TokenAsked),
    QuarantineList {
        json: bool,
    },
    QuarantineShow {
        name: String,
    },
    QuarantineRelease {
        name: String,
        patient_index: Option<PathBuf>,
    },
    /// `caremesh backup` wrote `out`: recorded in the audit trail (a copy of every record).
    BackupMade {
        out: PathBuf,
        bytes: u64,
    },
    /// End a hold on publishing before every peer has been caught up with.
    ResumePublishing,
    /// Change the data key to the one `new` gives (see [`crate::rekey`]).
    Rekey {
        new: crate::home::KeySource,
        /// For a key from a passphrase: the key the CLI derived from what the operator
        /// typed (hexadecimal), checked against the salt file's check before it is used.
        given_key: Option<String>,
    },
}

/// What a command printed, on standard output and standard error.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Printed {
    pub stdout: String,
    pub stderr: String,
}

impl StoreCommand {
    /// The command's name, for the log: nothing in it names a patient or a file.
    pub fn name(&self) -> &'static str {
        match self {
            StoreCommand::Ingest { .. } => "ingest",
            StoreCommand::Record { .. } => "record",
            StoreCommand::ConsentSet { .. } => "consent set",
            StoreCommand::ConsentShow { .. } => "consent show",
            StoreCommand::AuditCheckpoint => "audit checkpoint",
            StoreCommand::AuditReport(_) => "audit report",
            StoreCommand::ApiClientAdd(_) => "api-client add",
            StoreCommand::ApiClientNotifyTo { .. } => "api-client notify-to",
            StoreCommand::ApiClientList { .. } => "api-client list",
            StoreCommand::ApiClientRemove { .. } => "api-client remove",
            StoreCommand::ApiToken(_) => "api-token",
            StoreCommand::QuarantineList { .. } => "quarantine list",
            StoreCommand::QuarantineShow { .. } => "quarantine show",
            StoreCommand::QuarantineRelease { .. } => "quarantine release",
            StoreCommand::BackupMade { .. } => "backup",
            StoreCommand::ResumePublishing => "resume-publishing",
            StoreCommand::Rekey { .. } => "rekey",
        }
    }

    /// Runs the command against `store` for the node in `home`, by `operator` (the account
    /// that ran the CLI), printing into `out`. Returns the exit code. In a running node an
    /// ingest runs `between_commits` after each commit (see
    /// `Ingestor::pausing_between_commits`).
    pub fn run(
        self,
        home: &Home,
        store: &mut Store,
        operator: &str,
        between_commits: Option<BetweenCommits>,
        out: &mut Printed,
    ) -> Result<u8> {
        match self {
            StoreCommand::Ingest {
                paths,
                patient_index,
                move_files,
                json,
            } => {
                let asked = IngestAsked {
                    paths,
                    patient_index,
                    move_files,
                    json,
                };
                ingest(home, store, asked, between_commits, out)
            }
            StoreCommand::Record {
                nhs,
                user,
                json,
                fhir,
            } => {
                let format = match (json, fhir) {
                    (_, true) => RecordFormat::Fhir,
                    (true, false) => RecordFormat::Json,
                    (false, false) => RecordFormat::Text,
                };
                record(home, store, operator, (&nhs, &user), format, out)
            }
            StoreCommand::ConsentSet {
                nhs,
                share_out,
                share_in,
                objection,
            } => {
                let current = crate::consent::effective(home, store, &nhs)?;
                let consent = Consent {
                    share_out: share_out.unwrap_or(current.share_out),
                    share_in: share_in.unwrap_or(current.share_in),
                    objection: objection.unwrap_or(current.objection),
                };
                let written = crate::consent::record(home, store, &nhs, consent)?;
                let described = crate::consent::describe(consent);
                crate::consent::audit(home, store, operator, &nhs, "consent-set", &described)?;
                let done = if written > 0 { "recorded" } else { "unchanged" };
                writeln!(out.stdout, "{done}: {described}")?;
                Ok(0)
            }
            StoreCommand::ConsentShow { nhs } => {
                // Reading a patient's choices is an access to their record.
                crate::consent::audit(home, store, operator, &nhs, "consent-show", "")?;
                crate::consent::show(home, store, &nhs, &mut out.stdout)?;
                Ok(0)
            }
            StoreCommand::AuditCheckpoint => {
                let own = home.config.organisation.ods.clone();
                let key = home.signing_key()?;
                match audit::sign_checkpoint(store, &key, &own, clock::now_unix())? {
                    Some(signed) => writeln!(
                        out.stdout,
                        "signed an audit checkpoint: {} entries, head {}",
                        signed.checkpoint.count,
                        hex::encode(signed.checkpoint.head)
                    )?,
                    None => writeln!(
                        out.stdout,
                        "the audit trail has not grown since the last checkpoint"
                    )?,
                }
                Ok(0)
            }
            StoreCommand::AuditReport(asked) => {
                let query = match ReportQuery::parse(
                    asked.patient.as_deref(),
                    asked.user.as_deref(),
                    asked.from.as_deref(),
                    asked.to.as_deref(),
                ) {
                    Ok(query) => query.with_action(asked.action.as_deref()),
                    Err(problem) => bail!("{problem}"),
                };
                let report = audit::report_as(home, store, operator, &query)?;
                out.stdout
                    .push_str(&audit_report::render(&report, asked.format));
                Ok(0)
            }
            StoreCommand::ApiClientAdd(client) => {
                api_clients::add(home, store, operator, client, &mut out.stdout)
            }
            StoreCommand::ApiClientNotifyTo { client_id, origins } => {
                api_clients::notify_to(home, store, operator, (client_id, origins), &mut out.stdout)
            }
            StoreCommand::ApiClientList { json } => api_clients::list(store, json, &mut out.stdout),
            StoreCommand::ApiClientRemove { client_id } => {
                api_clients::remove(home, store, operator, &client_id, &mut out.stdout)
            }
            StoreCommand::ApiToken(asked) => {
                api_clients::token(home, store, operator, asked, &mut out.stdout)
            }
            StoreCommand::QuarantineList { json } => {
                let files = quarantine::list(home)?;
                quarantine::print_list(&files, json, &mut out.stdout)?;
                Ok(0)
            }
            StoreCommand::QuarantineShow { name } => {
                quarantine::show(home, store, operator, &name, &mut out.stdout)
            }
            StoreCommand::QuarantineRelease {
                name,
                patient_index,
            } => {
                let path = quarantine::quarantined_file(home, &name)?;
                quarantine::record(home, store, operator, "quarantine-release", &name)?;
                let asked = IngestAsked {
                    paths: vec![path.clone()],
                    patient_index,
                    move_files: true,
                    json: false,
                };
                let code = ingest(home, store, asked, between_commits, out)?;
                if let Some(note) = quarantine::after_release(&path)? {
                    writeln!(out.stderr, "{note}")?;
                }
                Ok(code)
            }
            StoreCommand::ResumePublishing => resume_publishing(home, store, operator, out),
            StoreCommand::Rekey { new, given_key } => {
                rekey(home, store, operator, (&new, given_key.as_deref()), out)
            }
            StoreCommand::BackupMade { out, bytes } => {
                store.append_audit(&caremesh_storage::audit::AuditEvent {
                    detail: format!("{} ({bytes} bytes)", out.display()),
                    ..crate::audit::operator_event(home, operator, "backup", "data at rest")
                })?;
                Ok(0)
            }
        }
    }
}

/// `caremesh resume-publishing`: the operator ends a hold on publishing (audited), and the
/// access records it deferred are published.
fn resume_publishing(
    home: &Home,
    store: &mut Store,
    operator: &str,
    out: &mut Printed,
) -> Result<u8> {
    let Some(hold) = store.publishing_hold()?.filter(|hold| hold.held) else {
        writeln!(out.stdout, "publishing is not held; nothing to do")?;
        return Ok(0);
    };
    let batch = store.write()?;
    batch.release_publishing()?;
    batch.commit()?;
    store.append_audit(&caremesh_storage::audit::AuditEvent {
        detail: format!(
            "hold ended before every peer was caught up with ({})",
            hold.reason
        ),
        ..crate::audit::operator_event(home, operator, "resume-publishing", "data at rest")
    })?;
    let written = caremesh_storage::publish::publish_after_hold(store, &home.signing_key()?)?;
    writeln!(
        out.stdout,
        "publishing resumed ({written} access record version(s) published). A document whose newer versions only an unreached peer holds will not merge with what this node writes now: reach every peer first where you can"
    )?;
    Ok(0)
}

fn rekey(
    home: &Home,
    store: &mut Store,
    operator: &str,
    (new, given_key): (&crate::home::KeySource, Option<&str>),
    out: &mut Printed,
) -> Result<u8> {
    let old = home.config.storage.source();
    let done = crate::rekey::change_data_key(home, store, new, given_key)?;
    store.append_audit(&caremesh_storage::audit::AuditEvent {
        detail: format!(
            "data key changed to {new}: database {}, {} kept file(s) sealed again",
            if done.database_rewritten {
                "re-encrypted"
            } else {
                "already under it"
            },
            done.files_resealed
        ),
        ..crate::audit::operator_event(home, operator, "rekey", "data at rest")
    })?;
    writeln!(
        out.stdout,
        "data key changed to {new} in {:.1} s: the database ({:.1} MB) {} and {} kept file(s) sealed again",
        done.seconds,
        done.database_bytes as f64 / 1e6,
        if done.database_rewritten {
            "re-encrypted"
        } else {
            "was under it already"
        },
        done.files_resealed
    )?;
    if let Some(old) = old.filter(|old| old != new) {
        writeln!(
            out.stdout,
            "{old} opens nothing in this home now; backups made before this change are encrypted with it: keep it for as long as you keep them, then destroy it"
        )?;
    }
    Ok(0)
}

/// What runs between an ingest's commits in a running node.
pub type BetweenCommits = Box<dyn FnMut(&mut Store) + Send>;

/// What `caremesh ingest` was asked to do.
struct IngestAsked {
    paths: Vec<PathBuf>,
    patient_index: Option<PathBuf>,
    move_files: bool,
    json: bool,
}

fn ingest(
    home: &Home,
    store: &mut Store,
    asked: IngestAsked,
    between_commits: Option<BetweenCommits>,
    out: &mut Printed,
) -> Result<u8> {
    let IngestAsked {
        paths,
        patient_index,
        move_files,
        json,
    } = asked;
    // What is left is kept for views and their audit.
    if let Some(reason) = crate::disk::ingest_blocked(&home.dir) {
        bail!("{reason}; nothing was ingested: free space on the disk and run ingest again");
    }
    let disposition = if move_files {
        FileDisposition::Move
    } else {
        FileDisposition::LeaveInPlace
    };
    let settings = home.ingest_settings()?;
    let mut ingestor = Ingestor::new(
        &settings,
        store,
        patient_index.as_deref(),
        disposition,
        clock::now_unix(),
    )?;
    if let Some(pause) = between_commits {
        ingestor = ingestor.pausing_between_commits(pause);
    }
    let report = match ingestor.ingest_paths(&paths) {
        Ok(report) => report,
        Err(stopped) => {
            // Exactly what went in before the stop: each file is one transaction.
            if !stopped.done.is_empty() {
                writeln!(out.stdout, "went in whole before the stop:")?;
                for file in &stopped.done {
                    writeln!(out.stdout, "  {}", file.display())?;
                }
                out.stdout.push_str(&stopped.committed.render());
            }
            return Err(stopped.into());
        }
    };
    drop(ingestor);
    if move_files {
        crate::retention::sweep_processed(home, store, clock::now_unix())?;
    }
    // Of the process that ingested: this command's, or the running node's it was handed to.
    let peak_memory_kb = peak_memory_kb();
    if json {
        let mut value = serde_json::to_value(&report)?;
        value["peak_memory_kb"] = serde_json::json!(peak_memory_kb);
        writeln!(out.stdout, "{}", serde_json::to_string_pretty(&value)?)?;
    } else {
        out.stdout.push_str(&report.render());
        if let Some(kb) = peak_memory_kb {
            writeln!(out.stdout, "peak memory: {:.1} MB", kb as f64 / 1024.0)?;
        }
    }
    if report.resources_read() != report.resources_accounted() {
        bail!("ingest counts do not reconcile; this is a caremesh bug, please report it");
    }
    Ok(if report.rejected.is_empty() { 0 } else { 2 })
}

/// How `caremesh record` prints the record.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RecordFormat {
    Text,
    Json,
    Fhir,
}

fn record(
    home: &Home,
    store: &mut Store,
    operator: &str,
    (nhs, user): (&str, &str),
    format: RecordFormat,
    out: &mut Printed,
) -> Result<u8> {
    let nhs = NhsNumber::parse(nhs)?;
    // The same refusal as the view's (`LaunchRefused::NoRecordsAtHub`): a hub keeps no read
    // model of clinical items, so a record assembled there would show none of them.
    if home.config.organisation.kind == caremesh_sync::OrgKind::Hub {
        let ods = home.config.organisation.ods.to_string();
        anyhow::bail!(caremesh_view::launch::LaunchRefused::NoRecordsAtHub { ods });
    }
    let now = clock::now_unix();
    // Under the registry in force: what a revoked key signed is not shown.
    let trust = home
        .trust()
        .context("reading the trust registry, which says whose signatures to trust")?;
    let registry = trust.map(|t| t.current());
    let viewer = home.viewer(operator, registry.as_deref());
    let record = record::assemble(store, &nhs, &viewer, now)?;
    let (sources, sections) = record.as_ref().map(|r| r.shown()).unwrap_or_default();
    let own = home.config.organisation.ods.clone();
    let key = home.signing_key()?;
    let event = AuditEvent {
        at: now,
        user_id: operator.to_string(),
        user_name: clock::printable(user.trim()),
        role: "operator".into(),
        organisation: own.to_string(),
        action: "cli-record".into(),
        nhs: Some(nhs.to_string()),
        sources,
        sections,
        purpose: "node administration (CLI)".into(),
        outcome: "allowed".into(),
        detail: match (record.is_some(), format == RecordFormat::Fhir) {
            (true, false) => String::new(),
            (true, true) => "as FHIR".into(),
            (false, _) => "no record held".into(),
        },
    };
    // As a view: recorded even on a full disk, from the reserve.
    crate::disk::write_even_when_full(&home.dir, || {
        caremesh_storage::publish::record_access(store, &key, &own, &event)?;
        Ok(())
    })
    .context("recording the access in the audit trail")?;
    let Some(record) = record else {
        writeln!(
            out.stderr,
            "this node holds no record for NHS number {}",
            nhs.formatted()
        )?;
        return Ok(3);
    };
    match format {
        RecordFormat::Text => out.stdout.push_str(&record::render_text(&record)),
        RecordFormat::Json => {
            writeln!(out.stdout, "{}", serde_json::to_string_pretty(&record)?)?;
        }
        RecordFormat::Fhir => {
            let bundle = fhir_api::everything_bundle(&fhir_api::render(&record), None);
            writeln!(out.stdout, "{}", serde_json::to_string_pretty(&bundle)?)?;
        }
    }
    Ok(0)
}

/// Peak resident memory of this process (Linux `VmHWM`), for ingest summaries.
fn peak_memory_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
