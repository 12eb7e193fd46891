//! `caremesh consent`: recording and showing a patient's sharing choices at this organisation.
//!
//! A choice is published as the patient's sharing record (a signed document like any other),
//! so peers and hubs apply it too.

use crate::home::Home;
use anyhow::{Context, Result};
use caremesh_fhir::clock;
use caremesh_storage::publish::Publication;
use caremesh_sync::NhsNumber;
use caremesh_sync::policy::Consent;
use clap::Subcommand;
use std::fmt::Write as _;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum ConsentCommand {
    /// Record a patient's choices here; choices not given keep their current value.
    Set {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        nhs: NhsNumber,
        /// May data recorded here leave here.
        #[arg(long)]
        share_out: Option<Switch>,
        /// May this organisation view what others made shareable.
        #[arg(long)]
        share_in: Option<Switch>,
        /// The patient objects to sharing for direct care: nothing recorded here is shared.
        #[arg(long)]
        objection: Option<Switch>,
    },
    /// Show the patient's choices here, and those this node holds from other organisations.
    Show {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        nhs: NhsNumber,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

impl Switch {
    pub fn on(self) -> bool {
        matches!(self, Switch::On)
    }
}

/// Prints the patient's choices here and those other organisations sent.
pub fn show(
    home: &Home,
    store: &caremesh_storage::Store,
    nhs: &NhsNumber,
    out: &mut String,
) -> Result<()> {
    let ods = &home.config.organisation.ods;
    let recorded = store.care().recorded_consent(ods, nhs)?;
    writeln!(
        out,
        "{ods} (this organisation): {}{}",
        describe(effective(home, store, nhs)?),
        if recorded.is_some() {
            ""
        } else {
            " (defaults: nothing recorded)"
        }
    )?;
    for source in store.sources()? {
        if source.publisher == ods.as_str() {
            continue;
        }
        let publisher = source.publisher.parse().context("a stored source")?;
        if let Some(consent) = store.care().recorded_consent(&publisher, nhs)? {
            writeln!(out, "{publisher} ({}): {}", source.name, describe(consent))?;
        }
    }
    Ok(())
}

/// Records in the audit trail that this machine's operator set or read a patient's choices.
pub fn audit(
    home: &Home,
    store: &mut caremesh_storage::Store,
    operator: &str,
    nhs: &NhsNumber,
    action: &str,
    detail: &str,
) -> Result<()> {
    store.append_audit(&caremesh_storage::audit::AuditEvent {
        nhs: Some(nhs.to_string()),
        sources: vec![home.config.organisation.ods.to_string()],
        sections: vec!["sharing".into()],
        detail: detail.to_string(),
        ..crate::audit::operator_event(home, operator, action, "sharing choices")
    })?;
    Ok(())
}

/// Publishes the patient's choices here as their sharing record. Returns the documents
/// written (0 when the choices were already recorded).
pub fn record(
    home: &Home,
    store: &mut caremesh_storage::Store,
    nhs: &NhsNumber,
    consent: Consent,
) -> Result<usize> {
    let ods = home.config.organisation.ods.clone();
    let mut publication = Publication::new(ods, home.config.sharing.defaults());
    publication.set_consent(nhs, consent);
    let batch = store.write()?;
    let written = publication.apply(&batch, &home.signing_key()?, clock::now_unix())?;
    batch.commit()?;
    Ok(written)
}

/// The patient's choices here: recorded, or this organisation's defaults.
pub fn effective(home: &Home, store: &caremesh_storage::Store, nhs: &NhsNumber) -> Result<Consent> {
    let ods = &home.config.organisation.ods;
    Ok(store
        .care()
        .recorded_consent(ods, nhs)?
        .unwrap_or_else(|| home.config.sharing.defaults()))
}

pub fn describe(consent: Consent) -> String {
    let switch = |on: bool| if on { "on" } else { "off" };
    format!(
        "Share Out {}, Share In {}, objection {}",
        switch(consent.share_out),
        switch(consent.share_in),
        if consent.objection {
            "recorded"
        } else {
            "none"
        }
    )
}
