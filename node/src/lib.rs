//! The caremesh node: its home and configuration, the sync service over QUIC, the drop-folder
//! watcher, the process that serves the view (`caremesh-view`), and the CLI that drives them.
//! IO lives here; the decisions it acts on come from `caremesh-sync` and `caremesh-engine`,
//! storage from `caremesh-storage`.

pub mod api_clients;
pub mod audit;
pub mod backup;
pub mod cli;
pub mod consent;
pub mod control;
pub mod demo;
pub mod disk;
pub mod home;
pub mod launch;
pub mod network;
pub mod passphrase;
pub mod process;
pub mod quarantine;
pub mod rekey;
pub mod retention;
pub mod store_command;
pub mod tls;
pub mod trust;
pub mod trust_admin;
pub mod verify;
pub mod view_https;
pub mod watch;
