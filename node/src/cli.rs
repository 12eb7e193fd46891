//! The `caremesh` command line.

use crate::audit::AuditCommand;
use crate::consent::{ConsentCommand, Switch};
use crate::home::{Home, KeySource, OrganisationConfig, StorageConfig};
use crate::store_command::StoreCommand;
use crate::verify;
use anyhow::{Context, Result};
use caremesh_fhir::clock;
use caremesh_fhir::synthetic::{self, GenerateOptions};
use caremesh_sync::{OdsCode, OrgKind};
use caremesh_view::web::{self as view, ViewState};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Parser)]
#[command(
    name = "caremesh",
    version,
    about = "A shared care record that keeps working when the network does not",
    long_about = "caremesh runs at each care organisation: it ingests the organisation's FHIR R4 \
                  extract, publishes the shareable part as signed Automerge documents in SQLite, \
                  and serves clinicians a read-only joined-up record from local storage."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make a new node home: config, the organisation's signing key (mode 0600), database.
    Init {
        /// Folder for the node home; must not already hold one.
        #[arg(long)]
        dir: PathBuf,
        /// The organisation's ODS code, such as A81001.
        #[arg(long)]
        org: OdsCode,
        /// The organisation's name as clinicians know it.
        #[arg(long)]
        name: String,
        /// gp, acute, community, mental-health, hospice, ooh, social-care, ambulance or hub.
        #[arg(long)]
        kind: OrgKind,
        /// The clinical system the extracts come from (recorded on every item).
        #[arg(long, default_value = "unknown")]
        source_system: String,
        /// Address the view (and the FHIR API) listens on. Loopback (the default) serves plain
        /// HTTP to a clinical system on this machine; any other address needs HTTPS.
        #[arg(long, default_value = "127.0.0.1:7800")]
        listen: String,
        /// Serve the view over HTTPS with this certificate (PEM, then its intermediates),
        /// such as the organisation's existing one; with --tls-private-key.
        #[arg(long, requires = "tls_private_key")]
        tls_certificate: Option<PathBuf>,
        /// The certificate's private key (PEM; no access for other accounts).
        #[arg(long, requires = "tls_certificate")]
        tls_private_key: Option<PathBuf>,
        /// Serve plain HTTP on a --listen address other machines can reach: only where
        /// something else encrypts the link.
        #[arg(long, conflicts_with = "tls_certificate")]
        plain_http_beyond_loopback: bool,
        /// Encrypt the database with the data key in this file, outside the home (made, mode
        /// 0600, when absent). Keep it apart from the disk the home is on: see the README.
        #[arg(long)]
        data_key_file: Option<PathBuf>,
        /// Or encrypt it with a key derived from a passphrase, asked for now (twice) and
        /// whenever a command opens the data without the running node: for a node run by
        /// hand, where no key file can be kept apart. At a terminal without echo, else the
        /// first line of standard input.
        #[arg(long, conflicts_with_all = ["data_key_file", "data_key_credential"])]
        data_key_passphrase: bool,
        /// Or encrypt it with the data key in this systemd credential (run init under
        /// `systemd-run --pipe -p LoadCredentialEncrypted=NAME:...`): see the README.
        #[arg(long, conflicts_with = "data_key_file")]
        data_key_credential: Option<String>,
        /// Or keep the database in plain text: only where the disk itself is encrypted and
        /// never leaves the building (a server's encrypted volume), never on a laptop.
        #[arg(
            long,
            conflicts_with_all = ["data_key_file", "data_key_credential", "data_key_passphrase"]
        )]
        unencrypted: bool,
        /// UDP address to accept sync peers on (hubs, and nodes taking direct peers).
        #[arg(long)]
        sync_listen: Option<String>,
        /// ODS code of a peer to dial (the hub, or a direct peer); repeat for more.
        #[arg(long = "peer")]
        peers: Vec<OdsCode>,
    },
    /// Ingest FHIR R4 JSON: single resources, Bundles and NDJSON, files or folders.
    Ingest {
        #[arg(long)]
        dir: PathBuf,
        /// CSV identifier_system,identifier_value,nhs_number for patients without NHS numbers.
        #[arg(long)]
        patient_index: Option<PathBuf>,
        /// Move accepted files to processed/ and rejected ones to quarantine/ (the drop
        /// folder's behaviour); by default files stay and rejected ones are copied.
        #[arg(long)]
        r#move: bool,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Run the node: ingest extracts dropped in the drop folder and serve the view.
    Run {
        #[arg(long)]
        dir: PathBuf,
        /// Override the configured listen address (use 127.0.0.1:0 for any free port).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Print a patient's record as the view shows it.
    Record {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        nhs: String,
        /// Who is reading the record, as the audit trail should name them; the operating
        /// system account running the command is recorded beside it.
        #[arg(long)]
        user: String,
        #[arg(long)]
        json: bool,
        /// Print the record as FHIR R4 resources (a `Patient/$everything` searchset Bundle,
        /// each resource with its publisher in `meta.source`, and a Provenance per
        /// publisher), as the FHIR API will serve it.
        #[arg(long, conflicts_with = "json")]
        fhir: bool,
    },
    /// Print what the node holds: patients, items by section and source, documents, size.
    Status {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Check every stored document's signature, content and read model; report tampering.
    Verify {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Write synthetic UK FHIR R4 extracts (one Bundle per patient), deterministic per seed.
    Generate {
        #[arg(long)]
        org: OdsCode,
        /// The organisation's name, as its records name it.
        #[arg(long)]
        name: Option<String>,
        /// gp, acute, hospice (or another kind, which records as a practice does): which of
        /// the region's patients it cares for and what it records about them.
        #[arg(long, default_value = "gp")]
        kind: OrgKind,
        /// The practice the region's patients are registered with; a GP's own code by
        /// default. Give it for other kinds so their records name the right GP.
        #[arg(long)]
        gp: Option<OdsCode>,
        /// The region's population: a practice writes every patient, a hospital those it
        /// admitted, a hospice those in palliative care.
        #[arg(long)]
        patients: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// A patient's sharing choices at this organisation: Share Out, Share In, objection.
    Consent {
        #[command(subcommand)]
        command: ConsentCommand,
    },
    /// Print a launch URL that opens the view for one user (and patient), signed with the
    /// launch key in the node home, as a clinical system would. For demos and tests.
    Launch {
        #[arg(long)]
        dir: PathBuf,
        /// The user's id in the clinical system.
        #[arg(long)]
        user: String,
        /// The user's name, as the audit trail shows it.
        #[arg(long)]
        name: String,
        /// clinician, auditor or admin.
        #[arg(long, default_value = "clinician")]
        role: String,
        /// The patient's NHS number (required for clinicians).
        #[arg(long)]
        nhs: Option<String>,
        #[arg(long, default_value = "direct care")]
        purpose: String,
        /// The view's address, as the user's browser reaches it.
        #[arg(long)]
        base: Option<String>,
        /// How long the token is valid, in seconds; by default the longest the node accepts
        /// (`launch.max_token_minutes`, 10 minutes unless configured).
        #[arg(long)]
        valid_seconds: Option<i64>,
        /// When the token was issued (unix seconds); now by default. For testing expiry.
        #[arg(long, hide = true)]
        issued_at: Option<i64>,
    },
    /// Encrypt the database of a home made without a data key, in place, with the node
    /// stopped: exported into a new encrypted file that replaces it.
    Encrypt {
        #[arg(long)]
        dir: PathBuf,
        /// The data key's file, outside the home (made, mode 0600, when absent).
        #[arg(long)]
        data_key_file: PathBuf,
    },
    /// Back up the node, while it runs, into one file encrypted with its data key: the
    /// database (SQLite's online backup), configuration, keys, registry and quarantine.
    Backup {
        #[arg(long)]
        dir: PathBuf,
        /// The backup file to write (never over an existing file, never inside the home).
        #[arg(long)]
        out: PathBuf,
    },
    /// Bring a node back from its backup into a new folder, on this or another machine.
    Restore {
        /// The backup file `caremesh backup` wrote.
        #[arg(long)]
        from: PathBuf,
        /// The new home: absent or empty.
        #[arg(long)]
        dir: PathBuf,
        /// The data key's file (the node's key, which the backup was encrypted with).
        #[arg(
            long,
            conflicts_with_all = ["data_key_credential", "data_key_passphrase"],
            required_unless_present_any = ["data_key_credential", "data_key_passphrase"]
        )]
        data_key_file: Option<PathBuf>,
        /// Or the systemd credential that holds it.
        #[arg(long, conflicts_with = "data_key_passphrase")]
        data_key_credential: Option<String>,
        /// Or the passphrase of a node keyed by one (asked for; the key is derived with the
        /// salt file `backup` wrote beside the backup, FILE.salt).
        #[arg(long)]
        data_key_passphrase: bool,
    },
    /// End a restored or rebuilt node's hold on publishing before it has caught up with every
    /// peer (one gone for good): audited.
    ResumePublishing {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Change the data key: the database re-encrypted and every kept file sealed again
    /// under a new key, while the node goes on serving reads (handed to the running node).
    Rekey {
        #[arg(long)]
        dir: PathBuf,
        /// The new key's file, outside the home (made, mode 0600, when absent).
        #[arg(
            long,
            conflicts_with_all = ["new_data_key_credential", "new_data_key_passphrase"],
            required_unless_present_any = ["new_data_key_credential", "new_data_key_passphrase"]
        )]
        new_data_key_file: Option<PathBuf>,
        /// Or the systemd credential that holds the new key (given to the node's unit).
        #[arg(long, conflicts_with = "new_data_key_passphrase")]
        new_data_key_credential: Option<String>,
        /// Or a key derived from a new passphrase, asked for now (see `init`).
        #[arg(long)]
        new_data_key_passphrase: bool,
    },
    /// Files ingest rejected: list them, read one with its reasons, or ingest one again.
    Quarantine {
        #[command(subcommand)]
        command: crate::quarantine::QuarantineCommand,
    },
    /// Clients of the FHIR API: register (with their public key and scopes), list, remove.
    ApiClient {
        #[command(subcommand)]
        command: crate::api_clients::ApiClientCommand,
    },
    /// Print an access token for the FHIR API on the last line, for a client acting for
    /// itself or for a user, as `POST /oauth/token` would issue one. For demos and tests.
    ApiToken(crate::api_clients::ApiTokenArgs),
    /// The audit trail: verify it has not been tampered with; reports per patient or user.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Run a simulation scenario in virtual time: many nodes, the real sync engine and storage,
    /// a simulated network and disks with faults; reports convergence, violations and a trace
    /// hash. Runs `caremesh-sim` from beside this binary (`cargo build -p caremesh-sim`).
    #[command(disable_help_flag = true)]
    Sim {
        /// What `caremesh-sim` takes: SCENARIO [--seed N] [--randomise] [--swarm N] …
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Regional authority tools: make, edit, sign, show, verify and install trust registries.
    Trust {
        #[command(subcommand)]
        command: crate::trust_admin::TrustCommand,
    },
    /// Demo: a region (hub, GP, hospital, hospice) as separate processes on 127.0.0.1.
    Demo {
        /// Keep the region here (and reuse it on the next run) instead of a temporary folder.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Patients at the GP practice; the hospital holds those it admitted, the hospice those
        /// in palliative care.
        #[arg(long, default_value_t = 200)]
        patients: u64,
        /// Views listen on this port and the next three; sync on this port + 100 onwards.
        #[arg(long, default_value_t = 7800)]
        port: u16,
    },
}

pub fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAREMESH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    if !matches!(
        cli.command,
        Command::Run { .. } | Command::Demo { .. } | Command::Sim { .. }
    ) {
        quiet_on_closed_output();
    }
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", crate::process::error_chain(&error));
            ExitCode::FAILURE
        }
    }
}

/// A command that prints (status, record, reports) ends quietly when its reader closes the
/// pipe (`caremesh status | head`), as command-line tools do, instead of panicking on the
/// next write. Not for the serving commands: they must get EPIPE on a socket, not die.
fn quiet_on_closed_output() {
    // SAFETY: restores the default disposition of one signal before any thread starts;
    // no handler is installed.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Init {
            dir,
            org,
            name,
            kind,
            source_system,
            listen,
            tls_certificate,
            tls_private_key,
            plain_http_beyond_loopback,
            data_key_file,
            data_key_passphrase,
            data_key_credential,
            unencrypted,
            sync_listen,
            peers,
        } => {
            // Patient data is encrypted unless the operator says, by name, that it need not be.
            if data_key_file.is_none()
                && data_key_credential.is_none()
                && !data_key_passphrase
                && !unencrypted
            {
                anyhow::bail!(
                    "say how the node's data is to be encrypted at rest, and run init again (nothing was made): \
                     --data-key-file PATH (a key file outside the home, made when absent), \
                     --data-key-credential NAME (a systemd credential, which can be bound to the TPM), \
                     --data-key-passphrase (asked for now, for a node run by hand), \
                     or --unencrypted (plain text, only on a disk that is encrypted itself)"
                );
            }
            // The certificate is kept where the operator keeps it, named by its full path.
            let absolute = |path: PathBuf| {
                std::path::absolute(&path).with_context(|| format!("resolving {}", path.display()))
            };
            let view = crate::home::ViewConfig {
                listen,
                tls_certificate: tls_certificate.map(absolute).transpose()?,
                tls_private_key: tls_private_key.map(absolute).transpose()?,
                plain_http_beyond_loopback,
                ..Default::default()
            };
            // Checked before the home is made: a refused choice leaves nothing behind.
            let transport = crate::view_https::view_transport(&view, &dir, &view.listen)?;
            let (storage, made_key) = match data_key_file {
                Some(path) => {
                    let path = absolute(path)?;
                    let (_, made) = crate::home::data_key_for_init(&path, &dir)?;
                    let storage = crate::home::StorageConfig {
                        data_key_file: Some(path),
                        ..Default::default()
                    };
                    (storage, Some(made))
                }
                None if data_key_credential.is_some() => {
                    let source = crate::home::KeySource::Credential(
                        data_key_credential.expect("checked by the guard"),
                    );
                    // Read before the home is made, so that a missing credential leaves nothing.
                    source.read(&dir)?;
                    (StorageConfig::from_source(Some(source)), None)
                }
                None if data_key_passphrase => {
                    let salt = PathBuf::from(crate::passphrase::SALT_FILE);
                    crate::passphrase::make(&dir.join(&salt))?;
                    let source = crate::home::KeySource::Passphrase(salt);
                    (StorageConfig::from_source(Some(source)), None)
                }
                None => (crate::home::StorageConfig::default(), None),
            };
            let mut home = Home::init_with(
                &dir,
                OrganisationConfig {
                    ods: org,
                    name,
                    kind,
                },
                storage,
            )?;
            home.config.ingest.source_system = source_system;
            home.config.view = view;
            home.config.sync.listen = sync_listen;
            home.config.sync.peers = peers;
            home.save_config()?;
            println!(
                "node home ready at {} for {} ({})",
                dir.display(),
                home.config.organisation.name,
                home.config.organisation.ods
            );
            println!("public key: {}", hex::encode(home.signing_key()?.public()));
            match (&home.config.storage.data_key_file, made_key) {
                _ if home.config.storage.data_key_passphrase.is_some() => println!(
                    "database: encrypted with a key derived from your passphrase (PBKDF2-HMAC-SHA256, {} rounds; its salt in {}): every command that opens the data without the running node asks for it, and without it nobody can read the data; `caremesh rekey` changes it",
                    crate::passphrase::ITERATIONS,
                    crate::passphrase::SALT_FILE
                ),
                (Some(path), Some(true)) => println!(
                    "database: encrypted with a new data key written to {} (mode 0600): keep a copy apart from this machine; without it the database cannot be read",
                    path.display()
                ),
                (Some(path), _) => println!(
                    "database: encrypted with the data key in {}",
                    path.display()
                ),
                _ if let Some(name) = &home.config.storage.data_key_credential => println!(
                    "database: encrypted with the data key in the systemd credential {name}: start the node from a unit that loads it (`LoadCredentialEncrypted={name}:...`)"
                ),
                (None, _) => println!(
                    "database: not encrypted, as asked (--unencrypted): only on a disk that is encrypted itself; `caremesh encrypt` encrypts it later"
                ),
            }
            let listen = &home.config.view.listen;
            match &transport {
                crate::view_https::ViewTransport::Https(certificate) => println!(
                    "view: https://{listen}/ with the certificate in {}",
                    certificate.files().certificate.display()
                ),
                crate::view_https::ViewTransport::Http
                    if home.config.view.plain_http_beyond_loopback =>
                {
                    println!(
                        "view: http://{listen}/ in plain HTTP beyond loopback, as asked: patient data is not encrypted on the way unless something else encrypts it"
                    )
                }
                crate::view_https::ViewTransport::Http => println!(
                    "view: http://{listen}/ on loopback only, for a clinical system on this machine; for other machines give --tls-certificate and --tls-private-key"
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Ingest {
            dir,
            patient_index,
            r#move,
            json,
            paths,
        } => {
            // The node, if it runs, reads these: nothing is resolved against its directory.
            let absolute = |path: PathBuf| {
                std::path::absolute(&path).with_context(|| format!("resolving {}", path.display()))
            };
            let paths = paths.into_iter().map(absolute).collect::<Result<_>>()?;
            let patient_index = patient_index.map(absolute).transpose()?;
            crate::control::execute(
                &dir,
                StoreCommand::Ingest {
                    paths,
                    patient_index,
                    move_files: r#move,
                    json,
                },
            )
        }
        Command::Run { dir, listen } => {
            let home = Home::open(&dir)?;
            home.check_private_data()?;
            // Before anything watches the drop folder or listens: one node per home.
            let _running = home.lock_for_running()?;
            // The node is its store's one writer while it runs (see control.rs).
            let _writing = crate::control::lock_for_node(&home)?;
            crate::rekey::finish_unfinished_change(&home)?;
            hold_publishing_if_rebuilt(&home)?;
            let listen = listen.unwrap_or_else(|| home.config.view.listen.clone());
            serve(&home, &listen, None)
        }
        Command::Record {
            dir,
            nhs,
            user,
            json,
            fhir,
        } => crate::control::execute(
            &dir,
            StoreCommand::Record {
                nhs,
                user,
                json,
                fhir,
            },
        ),
        Command::Status { dir, json } => status(&dir, json),
        Command::Verify { dir, json } => {
            let home = Home::open(&dir)?;
            let store = home.open_store()?;
            // Only the public key: verifying needs nothing that could sign.
            let own_key = home.public_key()?;
            let own = home.config.organisation.ods.clone();
            let trust = home.trust()?;
            let kind = home.config.organisation.kind;
            let mut report = verify::verify_store(&store, kind, &|publisher, key| {
                (*publisher == own && *key == own_key)
                    || trust.as_ref().is_some_and(|trust| {
                        // A retired key's signatures made while it was current still hold.
                        trust.current().standing(key).signed_for(publisher)
                    })
            })?;
            report.unrecorded_files = verify::unrecorded_files(&home.dir, &store)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "checked {} documents holding {} items",
                    report.documents, report.items
                );
                for file in &report.unrecorded_files {
                    println!(
                        "NOT IN THE INGEST LOG {file}: the database has no record of ingesting it (a crash may have cut its write-ahead log), so what it holds may be missing; ingest it again (what is already held is unchanged): caremesh ingest --dir {home} {path}",
                        home = home.dir.display(),
                        path = home.dir.join(file).display(),
                    );
                }
                for problem in &report.problems {
                    let label = match problem.kind {
                        "database" => {
                            println!("DAMAGED DATABASE: {}", problem.problem);
                            continue;
                        }
                        // A key the authority revoked: genuine bytes, no longer vouched for.
                        // Any other untrusted key is bytes someone changed.
                        "untrusted-key" if revoked_key(trust.as_ref(), problem.key.as_deref()) => {
                            "REVOKED KEY on"
                        }
                        _ => "TAMPERED",
                    };
                    println!(
                        "{label} document {} ({} {} {}): {}",
                        problem.document,
                        problem.publisher,
                        problem.section,
                        problem.class,
                        problem.problem
                    );
                }
                if report.problems.is_empty() {
                    println!("all signatures and contents verify");
                }
                if report.unrecorded_files.is_empty() {
                    println!("every file in processed/ and quarantine/ is in the ingest log");
                }
            }
            Ok(
                if report.problems.is_empty() && report.unrecorded_files.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(4)
                },
            )
        }
        Command::Generate {
            org,
            name,
            kind,
            gp,
            patients,
            seed,
            out,
        } => {
            let started = std::time::Instant::now();
            let registered_gp = match gp {
                Some(gp) => gp,
                None if kind == OrgKind::Gp => org.clone(),
                None => anyhow::bail!(
                    "--gp is needed for a {kind} extract: the practice its patients are registered with"
                ),
            };
            let generated = synthetic::generate(&GenerateOptions {
                org_name: name.unwrap_or_else(|| format!("{org} ({kind})")),
                org,
                kind,
                registered_gp,
                patients,
                seed,
                out: out.clone(),
            })
            .with_context(|| format!("writing to {}", out.display()))?;
            println!(
                "wrote {} files with {} resources to {} in {:.1}s",
                generated.files,
                generated.resources,
                out.display(),
                started.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Trust { command } => crate::trust_admin::run(command),
        Command::Consent { command } => consent(command),
        Command::Sim { args } => run_simulator(&args),
        Command::Audit { command } => audit(command),
        Command::ApiClient { command } => api_client(command),
        Command::Quarantine { command } => quarantine(command),
        Command::Encrypt { dir, data_key_file } => encrypt(&dir, &data_key_file),
        Command::Backup { dir, out } => backup(&dir, &out),
        Command::Rekey {
            dir,
            new_data_key_file,
            new_data_key_credential,
            new_data_key_passphrase,
        } => {
            let mut given_key = None;
            let new = match (new_data_key_file, new_data_key_credential) {
                // Absolute: the running node resolves nothing against this directory.
                (Some(path), _) => crate::home::KeySource::File(
                    std::path::absolute(&path)
                        .with_context(|| format!("resolving {}", path.display()))?,
                ),
                (None, Some(name)) => crate::home::KeySource::Credential(name),
                (None, None) => {
                    assert!(new_data_key_passphrase, "clap requires one");
                    // Asked here, at the operator's terminal; the running node has none.
                    let salt = crate::passphrase::new_salt_file_name();
                    let key = crate::passphrase::make(&dir.join(&salt))?;
                    given_key = Some(key.to_hex());
                    crate::home::KeySource::Passphrase(salt)
                }
            };
            crate::control::execute(&dir, StoreCommand::Rekey { new, given_key })
        }
        Command::ResumePublishing { dir } => {
            crate::control::execute(&dir, StoreCommand::ResumePublishing)
        }
        Command::Restore {
            from,
            dir,
            data_key_file,
            data_key_credential,
            data_key_passphrase,
        } => {
            let key = match (data_key_file, data_key_credential) {
                (Some(path), _) => KeySource::File(path),
                (None, Some(name)) => KeySource::Credential(name),
                (None, None) => {
                    assert!(data_key_passphrase, "clap requires one");
                    let salt = std::path::absolute(crate::backup::salt_beside(&from))?;
                    KeySource::Passphrase(salt)
                }
            };
            restore(&from, &dir, key)
        }
        Command::ApiToken(args) => {
            let dir = args.dir.clone();
            crate::control::execute(&dir, StoreCommand::ApiToken(args.asked()?))
        }
        Command::Launch {
            dir,
            user,
            name,
            role,
            nhs,
            purpose,
            base,
            valid_seconds,
            issued_at,
        } => {
            let home = Home::open(&dir)?;
            let scheme = if home.config.view.tls_certificate.is_some() {
                "https"
            } else {
                "http"
            };
            let base = base.unwrap_or_else(|| format!("{scheme}://{}", home.config.view.listen));
            let valid_seconds = valid_seconds
                .unwrap_or_else(|| i64::from(home.config.launch.max_token_minutes) * 60);
            let url = crate::launch::launch_url(
                &home,
                &base,
                &crate::launch::LaunchRequest {
                    user: &user,
                    name: &name,
                    role: &role,
                    nhs: nhs.as_deref(),
                    purpose: &purpose,
                    issued_at: issued_at.unwrap_or_else(clock::now_unix),
                    valid_seconds,
                },
            )?;
            println!("{url}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo {
            dir,
            patients,
            port,
        } => crate::demo::run(dir, patients, port),
    }
}

fn consent(command: ConsentCommand) -> Result<ExitCode> {
    let (dir, command) = match command {
        ConsentCommand::Set {
            dir,
            nhs,
            share_out,
            share_in,
            objection,
        } => (
            dir,
            StoreCommand::ConsentSet {
                nhs,
                share_out: share_out.map(Switch::on),
                share_in: share_in.map(Switch::on),
                objection: objection.map(Switch::on),
            },
        ),
        ConsentCommand::Show { dir, nhs } => (dir, StoreCommand::ConsentShow { nhs }),
    };
    crate::control::execute(&dir, command)
}

/// `caremesh encrypt`: a plaintext home's database encrypted in place, and the key recorded.
fn encrypt(dir: &Path, data_key_file: &Path) -> Result<ExitCode> {
    let mut home = Home::open(dir)?;
    if home.config.storage.data_key_file.is_some()
        || home.config.storage.data_key_credential.is_some()
    {
        anyhow::bail!(
            "{} is already encrypted ({}); nothing was changed",
            dir.display(),
            encryption_of(&home)
        );
    }
    // Nothing else may have the database open while it is replaced.
    let _running = home.lock_for_running()?;
    let _writing = crate::control::lock_for_node(&home)?;
    let path = std::path::absolute(data_key_file)
        .with_context(|| format!("resolving {}", data_key_file.display()))?;
    let (key, made) = crate::home::data_key_for_init(&path, &home.dir)?;
    caremesh_storage::at_rest::encrypt_in_place(&home.database_path(), &key)?;
    // Before the configuration names the key: a run cut short is run again, and seals
    // what it had not.
    let key = caremesh_storage::at_rest::DataKeys::new(Arc::new(key));
    let sealed = crate::rekey::reseal_kept_files(&home, &key)?;
    home.config.storage.data_key_file = Some(path.clone());
    home.forget_database();
    home.save_config()?;
    let mut store = home.open_store()?;
    store.append_audit(&caremesh_storage::audit::AuditEvent {
        detail: format!("database encrypted with the data key in {}", path.display()),
        ..crate::audit::operator_event(
            &home,
            &crate::process::operator(),
            "encrypt-database",
            "data at rest",
        )
    })?;
    println!(
        "database encrypted with {} data key in {} (mode 0600): keep a copy apart from this machine; without it the database cannot be read",
        if made { "a new" } else { "the" },
        path.display()
    );
    println!(
        "the plaintext database is gone from the home, but its blocks may stay on the disk until overwritten: a home on a laptop is best made encrypted (`caremesh init --data-key-file`)"
    );
    if sealed > 0 {
        println!(
            "{sealed} file(s) kept in processed/ and quarantine/ encrypted with it (their plaintext blocks, too, may stay on the disk until overwritten)"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A node started without its database (`caremesh init` makes one) is being rebuilt from its
/// peers: it holds publishing until it has taken back from them what it had published, as a
/// restored node does (`caremesh_storage::publishing_hold`). A hub publishes nothing.
fn hold_publishing_if_rebuilt(home: &Home) -> Result<()> {
    if home.database_path().exists() || !home.holds_publishing_when_restored() {
        return Ok(());
    }
    let mut store = home.open_store()?;
    let batch = store.write()?;
    batch.hold_publishing(
        clock::now_unix(),
        &format!(
            "rebuilt from its peers, its database missing at start on {}",
            clock::rfc3339(clock::now_unix())
        ),
    )?;
    batch.commit()?;
    tracing::warn!(
        "no database at start: this node is rebuilt from its peers, and publishes nothing new until it has caught up with each of them"
    );
    Ok(())
}

/// `caremesh backup`: made here, on a read-only connection beside a running node (which
/// goes on writing meanwhile); recorded in the audit trail through the node when it runs.
fn backup(dir: &Path, out: &Path) -> Result<ExitCode> {
    let home = Home::open(dir)?;
    let manifest = crate::backup::make(&home, out)?;
    let written = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    crate::control::execute(
        dir,
        StoreCommand::BackupMade {
            out: std::path::absolute(out)?,
            bytes: written,
        },
    )?;
    println!(
        "backed up {} ({}) into {} ({written} bytes; database {} bytes, {} other file(s)), encrypted with the data key: keep the key apart from the backup; both are needed to restore",
        manifest.name,
        manifest.organisation,
        out.display(),
        manifest.database_bytes,
        manifest.files.len()
    );
    if let Some(KeySource::Passphrase(_)) = home.config.storage.source() {
        println!(
            "the key is derived from the passphrase with the salt in {}: keep that file with the backup (it is no secret); restore asks for the passphrase",
            crate::backup::salt_beside(out).display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `caremesh restore`.
fn restore(from: &Path, dir: &Path, key: crate::home::KeySource) -> Result<ExitCode> {
    let restored = crate::backup::restore(from, dir, key)?;
    println!(
        "restored {} ({}) into {} from the backup made at {}: {} patient(s), {} document(s)",
        restored.manifest.name,
        restored.manifest.organisation,
        dir.display(),
        restored.manifest.made_at,
        restored.patients,
        restored.documents
    );
    println!(
        "`caremesh run --dir {}` resumes sync: peers send back what changed since the backup, and take from this node only what they do not hold",
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn quarantine(command: crate::quarantine::QuarantineCommand) -> Result<ExitCode> {
    use crate::quarantine::QuarantineCommand;
    let (dir, command) = match command {
        QuarantineCommand::List { dir, json } => (dir, StoreCommand::QuarantineList { json }),
        QuarantineCommand::Show { dir, name } => (dir, StoreCommand::QuarantineShow { name }),
        QuarantineCommand::Release {
            dir,
            name,
            patient_index,
        } => {
            // The node, if it runs, reads the index: nothing is resolved against its folder.
            let patient_index = patient_index
                .map(|path| {
                    std::path::absolute(&path)
                        .with_context(|| format!("resolving {}", path.display()))
                })
                .transpose()?;
            (
                dir,
                StoreCommand::QuarantineRelease {
                    name,
                    patient_index,
                },
            )
        }
    };
    crate::control::execute(&dir, command)
}

fn api_client(command: crate::api_clients::ApiClientCommand) -> Result<ExitCode> {
    use crate::api_clients::{self, ApiClientCommand};
    let (dir, command) = match command {
        ApiClientCommand::Add {
            dir,
            id,
            public_key,
            scopes,
            notify_to,
        } => {
            api_clients::check_client_id(&id)?;
            let public_key = public_key
                .as_deref()
                .map(api_clients::read_public_key)
                .transpose()?;
            let client = api_clients::ClientAsked {
                client_id: id,
                public_key,
                scopes: api_clients::check_scopes(&scopes)?,
                notify_origins: api_clients::check_origins(&notify_to)?,
            };
            (dir, StoreCommand::ApiClientAdd(client))
        }
        ApiClientCommand::NotifyTo { dir, id, origins } => {
            api_clients::check_client_id(&id)?;
            let origins = api_clients::check_origins(&origins)?;
            (
                dir,
                StoreCommand::ApiClientNotifyTo {
                    client_id: id,
                    origins,
                },
            )
        }
        ApiClientCommand::List { dir, json } => (dir, StoreCommand::ApiClientList { json }),
        ApiClientCommand::Remove { dir, id } => {
            (dir, StoreCommand::ApiClientRemove { client_id: id })
        }
    };
    crate::control::execute(&dir, command)
}

fn audit(command: AuditCommand) -> Result<ExitCode> {
    match command {
        AuditCommand::Verify { dir } => crate::audit::verify(&dir),
        AuditCommand::Checkpoint { dir } => {
            crate::control::execute(&dir, StoreCommand::AuditCheckpoint)
        }
        AuditCommand::Report { dir, query } => {
            crate::control::execute(&dir, StoreCommand::AuditReport(query))
        }
    }
}

/// How the database is kept at rest, for `caremesh status`.
fn encryption_of(home: &Home) -> String {
    let storage = &home.config.storage;
    let encrypted = match storage.source() {
        Some(KeySource::Credential(name)) => {
            format!("encrypted (data key: systemd credential {name})")
        }
        Some(KeySource::File(path)) => {
            format!("encrypted (data key: {})", home.resolve(&path).display())
        }
        Some(KeySource::Passphrase(salt)) => format!(
            "encrypted (data key: from a passphrase, its salt in {})",
            salt.display()
        ),
        None => {
            return "not encrypted (no data key: see `caremesh init --data-key-file`)".into();
        }
    };
    match storage.previous_source() {
        Some(previous) => format!(
            "{encrypted}; a change of key from {previous} is unfinished: the node finishes it when it starts"
        ),
        None => encrypted,
    }
}

fn status(dir: &Path, json: bool) -> Result<ExitCode> {
    let home = Home::open(dir)?;
    let store = home.open_store()?;
    let stats = store.stats()?;
    let sources = store.sources()?;
    let now = clock::now_unix();
    let peers = store.current_peer_statuses()?;
    let registry = home.trust()?.map(|trust| trust.current());
    let drop_folder = caremesh_ingest::drop_folder::survey(&home.drop_dir());
    let unsendable = store.unsendable_documents()?;
    let disk = crate::disk::status(&home.dir);
    let audit = audit_status(&store)?;
    let hold = store.publishing_hold()?;
    if json {
        let peers: Vec<serde_json::Value> = peers
            .iter()
            .map(|peer| {
                let mut value = serde_json::to_value(peer).expect("peer status serialises");
                value["connected"] = serde_json::json!(peer.is_connected(now));
                value["pending_in"] = serde_json::json!(peer.pending_in());
                value["pending_out"] = serde_json::json!(peer.pending_out());
                value
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "organisation": home.config.organisation,
                "stats": stats,
                "drop_folder": drop_folder,
                "encryption": encryption_of(&home),
                "publishing_hold": hold.as_ref().map(|hold| serde_json::json!({
                    "since": clock::rfc3339(hold.since),
                    "reason": hold.reason,
                    "held": hold.held,
                })),
                "disk": disk,
                "audit": audit,
                "sources": sources,
                "sync": {
                    "registry_version": registry.as_ref().map(|r| r.version()),
                    "peers": peers,
                    "rejected_changes": store.rejected_changes(20)?,
                    "unsendable_documents": unsendable,
                },
            }))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    let org = &home.config.organisation;
    println!("{} ({}, {})", org.name, org.ods, org.kind);
    println!("patients:  {}", stats.patients);
    println!("documents: {}", stats.documents);
    println!("items:     {}", stats.items);
    println!(
        "database:  {:.1} MB, {}",
        stats.database_bytes as f64 / 1e6,
        encryption_of(&home)
    );
    println!(
        "disk:      {:.1} MB free{}",
        disk.free_bytes as f64 / 1e6,
        if disk.reserve_held {
            ""
        } else {
            " (no disk reserve)"
        }
    );
    if let Some(problem) = &disk.problem {
        println!("  DISK: {problem}");
    }
    println!("sources:");
    for source in &sources {
        println!(
            "  {} ({}, {}): {} feed from {}, data as of {}",
            source.name,
            source.publisher,
            source.kind,
            source.feed,
            source.source_system,
            clock::uk_date_time(source.data_as_of)
        );
    }
    println!("items by source and section:");
    for (publisher, section, count) in &stats.items_by_source_and_section {
        println!("  {publisher:<10} {section:<16} {count}");
    }
    println!(
        "drop folder: {} file(s) waiting, {} entr{} left in place",
        drop_folder.waiting,
        drop_folder.left_in_place.len(),
        if drop_folder.left_in_place.len() == 1 {
            "y"
        } else {
            "ies"
        }
    );
    if let Err(reason) = crate::watch::outlets_usable(&home) {
        println!("  PAUSED: {reason}");
    }
    if let Some(hold) = hold.as_ref().filter(|hold| hold.held) {
        println!(
            "  PUBLISHING HELD ({}): nothing new is published until this node has caught up with each of its peers; `caremesh resume-publishing` ends the hold if a peer is gone for good",
            hold.reason
        );
    }
    for entry in &drop_folder.left_in_place {
        println!("  {}: {}", entry.name, entry.reason);
    }
    for (publisher, count) in &stats.summary_only_by_source {
        println!(
            "summary only: {count} items from {publisher} predate items carrying their FHIR resource; \
             the record marks them \"summary only\" until {publisher} re-ingests its extract \
             (see the README, Upgrading)"
        );
    }
    match &stats.last_ingest {
        Some(last) => println!(
            "last ingest: {} ({}) at {}",
            last.file,
            last.outcome,
            clock::uk_date_time(last.at)
        ),
        None => println!("last ingest: none yet"),
    }
    match &registry {
        Some(registry) => println!(
            "sync: trust registry {} edition {}",
            registry.registry().region,
            registry.version()
        ),
        None => println!("sync: off (no trust registry installed)"),
    }
    for peer in &peers {
        println!(
            "  peer {:<8} {:<12} last sync {:<20} pending in {:>6} out {:>6}  sent {} received {}  rejected {}",
            peer.peer,
            if peer.is_connected(now) {
                "connected"
            } else {
                "disconnected"
            },
            peer.last_sync_at
                .map(clock::uk_date_time)
                .unwrap_or_else(|| "never".into()),
            peer.pending_in(),
            peer.pending_out(),
            human_bytes(peer.bytes_sent),
            human_bytes(peer.bytes_received),
            peer.rejected,
        );
        if let Some(error) = peer.last_error.as_ref().filter(|_| !peer.is_connected(now)) {
            println!("       last disconnect: {error}");
        }
    }
    match &audit["checkpoint"] {
        serde_json::Value::Null => println!("audit: no signed checkpoint yet"),
        checkpoint => println!(
            "audit: last checkpoint {} entries, signed {}; held by {}",
            checkpoint["entries"],
            checkpoint["signed"].as_str().unwrap_or("-"),
            match audit["witnesses"].as_array().map(Vec::len) {
                Some(0) | None => "no witness yet".to_string(),
                Some(_) => audit["witnesses"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|w| format!(
                        "{} ({} entries)",
                        w["witness"].as_str().unwrap_or("-"),
                        w["entries"]
                    ))
                    .collect::<Vec<_>>()
                    .join(", "),
            }
        ),
    }
    if let Some(witnessing) = audit["witnessing"].as_array().filter(|w| !w.is_empty()) {
        println!(
            "audit: witness for {} organisation(s)' checkpoints",
            witnessing.len()
        );
    }
    for document in &unsendable {
        println!(
            "  UNSENDABLE document {} wanted by {}: {} is over the {} a sync frame carries; it reaches {} only once a version of it fits (since {}, last tried {})",
            document.doc,
            document.peer,
            human_bytes(document.bytes as u64),
            human_bytes(caremesh_sync::wire::MAX_FRAME_BYTES as u64),
            document.peer,
            clock::uk_date_time(document.first_at),
            clock::uk_date_time(document.last_at),
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Whether `key` (hex) is one the registry in force revoked.
fn revoked_key(trust: Option<&crate::trust::TrustState>, key: Option<&str>) -> bool {
    let (Some(trust), Some(key)) = (trust, key) else {
        return false;
    };
    caremesh_sync::trust::parse_key("key", key).is_ok_and(|key| {
        matches!(
            trust.current().standing(&key),
            caremesh_sync::KeyStanding::Revoked(_)
        )
    })
}

/// This node's newest signed audit checkpoint, the witnesses that hold its checkpoints (the
/// newest each holds), and whose checkpoints it witnesses.
fn audit_status(store: &caremesh_storage::Store) -> Result<serde_json::Value> {
    let decode = |bytes: &[u8]| caremesh_sync::SignedCheckpoint::decode(bytes).ok();
    let own = store
        .newest_own_checkpoint()?
        .and_then(|bytes| decode(&bytes))
        .map(|signed| {
            serde_json::json!({
                "entries": signed.checkpoint.count,
                "signed": clock::uk_date_time(signed.checkpoint.at),
            })
        });
    let mut witnesses: std::collections::BTreeMap<String, u64> = Default::default();
    for (holder, bytes) in store.own_checkpoints_known()? {
        if let (Some(witness), Some(signed)) = (holder, decode(&bytes)) {
            let newest = witnesses.entry(witness).or_default();
            *newest = (*newest).max(signed.checkpoint.count);
        }
    }
    let witnessing: Vec<serde_json::Value> = store
        .witnessing()?
        .into_iter()
        .map(|(organisation, entries, at)| {
            serde_json::json!({
                "organisation": organisation,
                "entries": entries,
                "signed": clock::uk_date_time(at),
            })
        })
        .collect();
    Ok(serde_json::json!({
        "checkpoint": own,
        "witnesses": witnesses
            .into_iter()
            .map(|(witness, entries)| serde_json::json!({"witness": witness, "entries": entries}))
            .collect::<Vec<_>>(),
        "witnessing": witnessing,
    }))
}

fn human_bytes(bytes: u64) -> String {
    match bytes {
        b if b >= 1_000_000 => format!("{:.1} MB", b as f64 / 1e6),
        b if b >= 1_000 => format!("{:.1} kB", b as f64 / 1e3),
        b => format!("{b} B"),
    }
}

/// Serves the view and watches the drop folder until interrupted. Prints the view's address
/// on stdout (first line `listening on http://…`), and `show` after it when given.
fn serve(home: &Home, listen: &str, show: Option<&str>) -> Result<ExitCode> {
    // Before anything starts: a view that may not be served as configured is not served.
    let transport = crate::view_https::view_transport(&home.config.view, &home.dir, listen)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // Room kept back so that a full disk does not stop views and their audit (see disk.rs).
    match crate::disk::ensure_reserve(&home.dir) {
        Ok(true) => {}
        Ok(false) => tracing::warn!(
            "not enough free disk space for the disk reserve; a full disk would stop views from being audited"
        ),
        Err(error) => tracing::warn!(%error, "could not make the disk reserve"),
    }
    let stop = Arc::new(AtomicBool::new(false));
    let paused = crate::watch::Paused::default();
    let trust = home.trust()?;
    let trust_for_view = trust.clone();
    // Organisation names for the view (peers such as a hub publish no data to name them).
    let names: std::collections::BTreeMap<String, String> = trust
        .as_ref()
        .map(|t| {
            t.current()
                .registry()
                .organisations
                .iter()
                .map(|o| (o.ods.to_string(), o.name.clone()))
                .collect()
        })
        .unwrap_or_default();
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let syncing = trust.is_some();
    if !syncing {
        tracing::info!("sync is off: no trust registry installed (see `caremesh trust install`)");
    }
    let sync = runtime.block_on(crate::network::start(
        crate::network::SyncSettings::for_home(home, trust)?,
        shutdown_rx.clone(),
    ))?;
    let writer = sync.writer.clone();
    let control = runtime.spawn(crate::control::serve(
        home.clone(),
        writer.clone(),
        shutdown_rx,
    ));
    let watcher = {
        let stop = stop.clone();
        let dir = home.dir.clone();
        let paused = paused.clone();
        let writer = writer.clone();
        std::thread::Builder::new()
            .name("drop-folder".into())
            .spawn(move || {
                if let Err(error) = crate::watch::watch_drop_folder(&dir, &writer, &stop, &paused) {
                    tracing::error!(error = %format!("{error:#}"), "drop folder watcher stopped");
                }
            })?
    };
    let result = runtime.block_on(async {
        let state = Arc::new(ViewState {
            database: home.database()?,
            organisation: home.config.organisation.name.clone(),
            ods: home.config.organisation.ods.to_string(),
            kind: home.config.organisation.kind,
            viewer: home.viewer("", None),
            break_glass_minutes: home.config.view.break_glass_minutes,
            launch: crate::launch::verifier(home).context(
                "loading the launch key: the view opens only through signed launch tokens",
            )?,
            launch_config: home.config.launch.clone(),
            names,
            key: home.signing_key()?,
            sync: syncing.then(|| sync.counters.clone()),
            node: Arc::new(crate::network::NodeForView {
                writer: writer.clone(),
                trust: trust_for_view,
            }),
            anonymous: Default::default(),
            metrics_token: home.metrics_token()?,
            drop_folder_paused: paused.clone(),
            subscriptions_changed: Default::default(),
            https: matches!(transport, crate::view_https::ViewTransport::Https(_)),
        });
        let notifier = tokio::spawn(view::notifier::run(state.clone()));
        let summaries = tokio::spawn({
            let state = state.clone();
            async move {
                let minute = std::time::Duration::from_secs(60);
                let mut every_minute =
                    tokio::time::interval_at(tokio::time::Instant::now() + minute, minute);
                loop {
                    every_minute.tick().await;
                    state.flush_anonymous().await;
                }
            }
        });
        // Signed checkpoints of the audit trail: at start, every few minutes and at shutdown
        // (below). The sync engine hands each new one to the peers to witness.
        let checkpoints = tokio::spawn({
            let home = home.clone();
            let writer = writer.clone();
            async move {
                let mut every = tokio::time::interval(crate::audit::CHECKPOINT_EVERY);
                loop {
                    every.tick().await;
                    crate::audit::checkpoint_now(&home, &writer).await;
                }
            }
        });
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("listening on {listen}"))?;
        let address = listener.local_addr()?;
        let scheme = transport.scheme();
        println!("listening on {scheme}://{address}/");
        if let Some(sync_address) = sync.local_addr {
            println!("sync listening on udp {sync_address}");
        }
        if let Some(path) = show {
            println!("open {scheme}://{address}{path}");
        }
        use std::io::Write;
        std::io::stdout().flush()?;
        let listener = view::listener::BoundedListener::new(listener);
        let listener = match &transport {
            crate::view_https::ViewTransport::Http => listener,
            crate::view_https::ViewTransport::Https(certificate) => {
                listener.with_tls(view::tls::server_config(certificate.clone()))
            }
        };
        // Until asked to stop, or until the engine finds the database damaged: the view
        // must not go on showing what was read from it.
        let mut stopped = sync.stopped.clone();
        let stop_when_damaged = async move {
            let _ = stopped.wait_for(Option::is_some).await;
        };
        let served = axum::serve(listener, view::router(state.clone()))
            .with_graceful_shutdown(async {
                tokio::select! {
                    () = crate::process::shutdown_signal() => {}
                    () = stop_when_damaged => {}
                }
            })
            .await
            .context("serving the view");
        summaries.abort();
        notifier.abort();
        checkpoints.abort();
        state.flush_anonymous().await;
        crate::audit::checkpoint_now(home, &writer).await;
        served
    });
    // The watcher first: an ingest it has begun is finished by the engine, which stops after.
    stop.store(true, Ordering::Relaxed);
    let _ = watcher.join();
    let _ = shutdown_tx.send(true);
    let _ = runtime.block_on(control);
    let damaged = sync.stopped.borrow().clone();
    sync.join();
    if let Some(reason) = damaged {
        anyhow::bail!(
            "stopped: {reason}. Nothing more was served or sent from this database. Keep the file for inspection, run `caremesh verify --dir {}`, then restore the database from a backup or rebuild the node from its peers",
            home.dir.display()
        );
    }
    result.map(|_| ExitCode::SUCCESS)
}

/// Runs the simulator binary built beside this one, passing `args` on: the product binary
/// does not carry the simulator.
fn run_simulator(args: &[std::ffi::OsString]) -> Result<ExitCode> {
    let exe = std::env::current_exe().context("finding the caremesh binary")?;
    let simulator = exe.with_file_name("caremesh-sim");
    let asks_for_help = args.is_empty() || args.iter().any(|a| a == "--help" || a == "-h");
    if !simulator.exists() && asks_for_help {
        println!(
            "Usage: caremesh sim SCENARIO [--seed N] [--randomise] [--swarm N] [--jobs N] [--work DIR] [--json]\n\n\
             Runs the caremesh-sim binary from beside this one ({}), which is not built here:\n\
             build it with `cargo build -p caremesh-sim` (add --release to match a release build).",
            simulator.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    if !simulator.exists() {
        anyhow::bail!(
            "the simulator is a binary of its own and is not built beside this one ({}): build it with `cargo build -p caremesh-sim` (add --release to match a release build)",
            simulator.display()
        );
    }
    let status = std::process::Command::new(&simulator)
        .args(args)
        .status()
        .with_context(|| format!("running {}", simulator.display()))?;
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::from(1),
    })
}
