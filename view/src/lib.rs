//! caremesh's record view: what a clinician, an auditor and an operator read from the node's
//! local store. Record assembly (`record`, `identity`), the record as FHIR resources
//! (`fhir_api`), in-context launch (`launch`), the HTTP view (`web`), audit reports
//! (`audit_report`) and `/metrics` (`metrics`).
//!
//! Everything here reads through read-only store connections, so views never wait on sync
//! or ingest; what the view writes goes through the node's one store writer, which the node
//! hands in as [`web::RunningNode`]. Nothing here knows the node's home, configuration file
//! or processes.

pub mod api_access;
pub mod audit_report;
pub mod fhir_api;
pub mod fhir_search;
pub mod fhir_summary;
pub mod identity;
pub mod launch;
pub mod metrics;
pub mod notify_origins;
pub mod record;
pub mod web;
