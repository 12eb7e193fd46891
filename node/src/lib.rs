//! The caremesh node: configuration, ingest, the record view, and the CLI that drives them.
//! IO lives here; the decisions it acts on come from `caremesh-sync`, storage from
//! `caremesh-storage`.

pub mod audit;
pub mod cli;
pub mod consent;
pub mod control;
pub mod demo;
pub mod disk;
pub mod generate;
pub mod home;
pub mod identity;
pub mod launch;
pub mod metrics;
pub mod network;
pub mod process;
pub mod record;
pub mod store_command;
pub mod tls;
pub mod trust;
pub mod trust_admin;
pub mod verify;
pub mod view;
pub mod watch;
