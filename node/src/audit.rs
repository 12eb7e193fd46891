//! `caremesh audit`: checking the node's hash-chained audit trail.

use crate::home::Home;
use anyhow::Result;
use caremesh_storage::audit::verify_chain;
use clap::Subcommand;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Check that no entry of the audit trail was edited, removed, inserted or reordered.
    /// Exits 1 and names the first broken entry if one was.
    Verify {
        #[arg(long)]
        dir: PathBuf,
    },
}

pub fn run(command: AuditCommand) -> Result<ExitCode> {
    match command {
        AuditCommand::Verify { dir } => {
            let home = Home::open(&dir)?;
            let store = home.open_store()?;
            let events = store.audit_events()?;
            match verify_chain(&events) {
                Ok(()) => {
                    println!("audit trail intact: {} entries", events.len());
                    Ok(ExitCode::SUCCESS)
                }
                Err(broken) => {
                    println!("audit trail BROKEN: {broken}");
                    Ok(ExitCode::from(1))
                }
            }
        }
    }
}
