//! `caremesh trust`: the regional authority's tools for making, editing, signing and checking
//! a trust registry, and for installing it in a node home.

use crate::home::{Home, load_secret_key, write_secret};
use crate::trust::write_atomically;
use anyhow::{Context, Result, bail};
use caremesh_fhir::clock;
use caremesh_sync::policy::Agreements;
use caremesh_sync::trust::{parse_key, public_key_of};
use caremesh_sync::{OdsCode, OrgKind, Organisation, Registry, RegistryFile};
use clap::Subcommand;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Why a key is withdrawn: it decides what becomes of what the key signed.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Withdrawal {
    /// Compromised, or withdrawn for cause: nothing it signed is trusted any more.
    Compromised,
    /// Replaced in a routine rollover: what it signed while current stays trusted.
    Retired,
}

#[derive(Subcommand)]
pub enum TrustCommand {
    /// Create a regional authority key (ed25519 secret, mode 0600) and print its public key.
    Authority {
        /// Where to write the secret key; must not exist.
        #[arg(long)]
        out: PathBuf,
    },
    /// Start a new unsigned registry for a region, with no organisations and the sharing
    /// agreements shipped in configs/agreements.toml.
    New {
        #[arg(long)]
        registry: PathBuf,
        #[arg(long)]
        region: String,
    },
    /// Add an organisation, or add keys and addresses to one already listed. The registry is
    /// unsigned again afterwards: sign it before handing it out.
    Add {
        #[arg(long)]
        registry: PathBuf,
        /// Take ODS code, name, kind, public key and sync address from this node home.
        #[arg(long, conflicts_with_all = ["ods", "name", "kind", "key"])]
        node: Option<PathBuf>,
        #[arg(long, required_unless_present = "node")]
        ods: Option<OdsCode>,
        #[arg(long, required_unless_present = "node")]
        name: Option<String>,
        #[arg(long, required_unless_present = "node")]
        kind: Option<OrgKind>,
        /// The organisation's ed25519 public key, hex.
        #[arg(long, required_unless_present = "node")]
        key: Option<String>,
        /// host:port where the organisation accepts sync connections.
        #[arg(long)]
        address: Vec<String>,
    },
    /// Withdraw one key of an organisation (or all of its keys): peers refuse new signatures
    /// by it from then on. `--reason compromised` also hides what it signed from every view;
    /// `--reason retired` (a rollover) keeps what it signed while current.
    Revoke {
        #[arg(long)]
        registry: PathBuf,
        #[arg(long)]
        ods: OdsCode,
        /// The key to withdraw, hex; every current key when left out.
        #[arg(long)]
        key: Option<String>,
        /// Why: `compromised` (or withdrawn for cause) or `retired` (replaced in a rollover).
        #[arg(long, value_enum)]
        reason: Withdrawal,
    },
    /// Replace the registry's sharing agreements with those in a TOML file (see
    /// configs/agreements.toml). The registry is unsigned again afterwards.
    Agreements {
        #[arg(long)]
        registry: PathBuf,
        #[arg(long)]
        file: PathBuf,
    },
    /// Sign a new edition of the registry with the authority key (bumps the version).
    Sign {
        #[arg(long)]
        registry: PathBuf,
        #[arg(long)]
        authority_key: PathBuf,
    },
    /// Print the registry's organisations, keys and signature state.
    Show {
        #[arg(long)]
        registry: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Check the registry's signature against an authority public key. Exit code 4 if it fails.
    Verify {
        #[arg(long)]
        registry: PathBuf,
        /// The authority's public key, hex.
        #[arg(long)]
        authority: String,
    },
    /// Install a signed registry in a node home and pin the authority key in its config.
    Install {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        registry: PathBuf,
        #[arg(long)]
        authority: String,
    },
}

pub fn run(command: TrustCommand) -> Result<ExitCode> {
    match command {
        TrustCommand::Authority { out } => {
            let mut secret = [0u8; 32];
            getrandom::fill(&mut secret)
                .map_err(|e| anyhow::anyhow!("operating system random source: {e}"))?;
            if let Some(parent) = out.parent() {
                std::fs::create_dir_all(parent)?;
            }
            write_secret(&out, &hex::encode(secret))?;
            println!("authority key written to {} (mode 0600)", out.display());
            println!(
                "authority public key: {}",
                hex::encode(public_key_of(&secret))
            );
        }
        TrustCommand::New { registry, region } => {
            if registry.exists() {
                bail!(
                    "{} already exists; edit it with `caremesh trust add` or choose another path",
                    registry.display()
                );
            }
            save(&registry, &RegistryFile::unsigned(new_registry(&region)))?;
            println!("new registry for {region} at {}", registry.display());
        }
        TrustCommand::Add {
            registry,
            node,
            ods,
            name,
            kind,
            key,
            address,
        } => {
            let mut file = load(&registry)?;
            let organisation = match node {
                Some(dir) => organisation_of_node(&dir, address)?,
                None => Organisation {
                    ods: ods.expect("required by clap"),
                    name: name.expect("required by clap"),
                    kind: kind.expect("required by clap"),
                    keys: vec![hex::encode(parse_key(
                        "--key",
                        &key.expect("required by clap"),
                    )?)],
                    revoked_keys: Vec::new(),
                    retired_keys: Vec::new(),
                    addresses: address,
                },
            };
            let ods = organisation.ods.clone();
            merge(&mut file.registry, organisation);
            file.registry.normalise()?;
            file.signature = None;
            save(&registry, &file)?;
            println!(
                "{ods} added to {}; sign the registry before handing it out",
                registry.display()
            );
        }
        TrustCommand::Revoke {
            registry,
            ods,
            key,
            reason,
        } => {
            let mut file = load(&registry)?;
            let Some(org) = file.registry.organisation_mut(&ods) else {
                bail!("{ods} is not in {}", registry.display());
            };
            let revoking: Vec<String> = match key {
                Some(key) => vec![hex::encode(parse_key("--key", &key)?)],
                None => org.keys.clone(),
            };
            for key in &revoking {
                // A retired key found to have been stolen is revoked too.
                let retired_now_compromised =
                    matches!(reason, Withdrawal::Compromised) && org.retired_keys.contains(key);
                if !org.keys.contains(key) && !retired_now_compromised {
                    bail!("{key} is not a current key of {ods}");
                }
            }
            org.keys.retain(|k| !revoking.contains(k));
            org.retired_keys.retain(|k| !revoking.contains(k));
            let (list, done, consequence) = match reason {
                Withdrawal::Compromised => (
                    &mut org.revoked_keys,
                    "revoked",
                    "what they signed is hidden from every view until it is published again with a trusted key",
                ),
                Withdrawal::Retired => (
                    &mut org.retired_keys,
                    "retired",
                    "what they signed while current stays trusted; new signatures by them are refused",
                ),
            };
            list.extend(revoking.iter().cloned());
            file.registry.normalise()?;
            file.signature = None;
            save(&registry, &file)?;
            println!(
                "{done} {} key(s) of {ods}: {consequence}; sign the registry and hand it to at least one node",
                revoking.len()
            );
        }
        TrustCommand::Agreements {
            registry,
            file: agreements,
        } => {
            let mut file = load(&registry)?;
            let text = std::fs::read_to_string(&agreements)
                .with_context(|| format!("reading {}", agreements.display()))?;
            file.registry.sharing = parse_agreements(&text)
                .with_context(|| format!("reading {}", agreements.display()))?;
            file.registry.normalise()?;
            file.signature = None;
            save(&registry, &file)?;
            println!(
                "{} agreements from {} set in {}; sign the registry before handing it out",
                file.registry.sharing.agreements.len(),
                agreements.display(),
                registry.display()
            );
        }
        TrustCommand::Sign {
            registry,
            authority_key,
        } => {
            let mut file = load(&registry)?;
            let secret = load_secret_key(&authority_key)?.secret();
            file.sign(&secret, clock::now_unix())?;
            save(&registry, &file)?;
            println!(
                "signed edition {} of {} ({} organisations)",
                file.registry.version,
                registry.display(),
                file.registry.organisations.len()
            );
        }
        TrustCommand::Show { registry, json } => {
            let file = load(&registry)?;
            if json {
                println!("{}", String::from_utf8_lossy(&file.to_json()));
            } else {
                print!("{}", render(&file));
            }
        }
        TrustCommand::Verify {
            registry,
            authority,
        } => {
            let file = load(&registry)?;
            let pinned = parse_key("--authority", &authority)?;
            return Ok(match file.verify(&pinned) {
                Ok(()) => {
                    println!(
                        "{}: edition {} verifies with authority {authority}",
                        registry.display(),
                        file.registry.version
                    );
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    println!("{}: FAILED: {error}", registry.display());
                    ExitCode::from(4)
                }
            });
        }
        TrustCommand::Install {
            dir,
            registry,
            authority,
        } => {
            let mut home = Home::open(&dir)?;
            let bytes = std::fs::read(&registry)
                .with_context(|| format!("reading {}", registry.display()))?;
            let pinned = parse_key("--authority", &authority)?;
            let installing = RegistryFile::parse(&bytes)?;
            installing.verify(&pinned)?;
            // An older edition would bring back what a newer one revoked.
            let in_place = std::fs::read(home.registry_path())
                .ok()
                .and_then(|held| RegistryFile::parse(&held).ok())
                .filter(|held| held.verify(&pinned).is_ok());
            if let Some(held) = in_place
                && held.registry.version > installing.registry.version
            {
                anyhow::bail!(
                    "{} holds registry edition {}, newer than edition {} in {}: installing it would undo what the newer edition changed (revocations among them); get the newest edition from the authority",
                    dir.display(),
                    held.registry.version,
                    installing.registry.version,
                    registry.display()
                );
            }
            write_atomically(&home.registry_path(), &bytes)?;
            home.config.sync.authority = Some(hex::encode(pinned));
            home.save_config()?;
            println!(
                "installed registry edition {} in {} and pinned authority {}; a running node adopts it within seconds",
                installing.registry.version,
                dir.display(),
                hex::encode(pinned)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A new registry for a region: no organisations, the shipped sharing agreements.
pub fn new_registry(region: &str) -> Registry {
    let mut registry = Registry::new(region);
    registry.sharing = shipped_agreements();
    registry
}

/// The agreements shipped in configs/agreements.toml, which every new registry starts with.
pub fn shipped_agreements() -> Agreements {
    parse_agreements(include_str!("../../configs/agreements.toml"))
        .expect("configs/agreements.toml is valid (checked by a unit test)")
}

/// Parses and checks an agreements TOML file.
pub fn parse_agreements(text: &str) -> Result<Agreements> {
    let agreements: Agreements = toml::from_str(text)?;
    agreements.validate()?;
    Ok(agreements)
}

fn load(path: &Path) -> Result<RegistryFile> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    RegistryFile::parse(&bytes).with_context(|| format!("reading {}", path.display()))
}

fn save(path: &Path, file: &RegistryFile) -> Result<()> {
    write_atomically(path, &file.to_json())?;
    Ok(())
}

fn organisation_of_node(dir: &Path, addresses: Vec<String>) -> Result<Organisation> {
    let home = Home::open(dir)?;
    let key = home.signing_key()?.public();
    let organisation = &home.config.organisation;
    let addresses = if addresses.is_empty() {
        home.config.sync.listen.iter().cloned().collect()
    } else {
        addresses
    };
    Ok(Organisation {
        ods: organisation.ods.clone(),
        name: organisation.name.clone(),
        kind: organisation.kind,
        keys: vec![hex::encode(key)],
        revoked_keys: Vec::new(),
        retired_keys: Vec::new(),
        addresses,
    })
}

/// Adds `organisation`, or merges its keys and addresses into the entry already listed.
fn merge(registry: &mut Registry, organisation: Organisation) {
    match registry.organisation_mut(&organisation.ods) {
        Some(existing) => {
            existing.name = organisation.name;
            existing.kind = organisation.kind;
            for key in organisation.keys {
                if !existing.keys.contains(&key) {
                    existing.keys.push(key);
                }
            }
            for address in organisation.addresses {
                if !existing.addresses.contains(&address) {
                    existing.addresses.push(address);
                }
            }
        }
        None => registry.organisations.push(organisation),
    }
}

fn render(file: &RegistryFile) -> String {
    let registry = &file.registry;
    let mut out = format!(
        "trust registry for {}, edition {}, {}\n",
        registry.region,
        registry.version,
        match &file.signature {
            Some(signature) => format!(
                "signed by authority {} on {}",
                signature.authority,
                clock::uk_date_time(registry.issued_at)
            ),
            None => "NOT SIGNED".to_string(),
        }
    );
    for org in &registry.organisations {
        out.push_str(&format!("  {} {} ({})\n", org.ods, org.name, org.kind));
        for key in &org.keys {
            out.push_str(&format!("    key      {key}\n"));
        }
        for key in &org.revoked_keys {
            out.push_str(&format!("    REVOKED  {key}\n"));
        }
        for key in &org.retired_keys {
            out.push_str(&format!("    retired  {key}\n"));
        }
        for address in &org.addresses {
            out.push_str(&format!("    address  {address}\n"));
        }
    }
    let sharing = &registry.sharing;
    out.push_str("sharing agreements (deny unless listed)\n");
    for agreement in &sharing.agreements {
        let names = |list: Vec<&str>| list.join(", ");
        out.push_str(&format!(
            "  {} -> {}: {}{}\n",
            agreement.publisher,
            names(agreement.recipients.iter().map(|k| k.as_str()).collect()),
            names(agreement.classes.iter().map(|c| c.as_str()).collect()),
            if agreement.except_sections.is_empty() {
                String::new()
            } else {
                format!(
                    " except {}",
                    names(
                        agreement
                            .except_sections
                            .iter()
                            .map(|s| s.as_str())
                            .collect()
                    )
                )
            }
        ));
    }
    if !sharing.region_wide.is_empty() {
        let kinds: Vec<&str> = sharing.region_wide.iter().map(|k| k.as_str()).collect();
        out.push_str(&format!("  region-wide holders: {}\n", kinds.join(", ")));
    }
    for (ods, day) in &sharing.share_from {
        out.push_str(&format!("  {ods} shares items from {day}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use caremesh_sync::{DataClass, OrgKind};

    #[test]
    fn the_shipped_agreements_parse_and_hold_the_oxfordshire_rule() {
        let agreements = shipped_agreements();
        let gp_to_acute: Vec<_> = agreements
            .agreements
            .iter()
            .filter(|a| a.publisher == OrgKind::Gp && a.recipients.contains(&OrgKind::Acute))
            .collect();
        assert_eq!(gp_to_acute.len(), 1);
        assert_eq!(gp_to_acute[0].classes, vec![DataClass::Coded]);
        assert!(
            agreements
                .agreements
                .iter()
                .all(|a| !a.classes.contains(&DataClass::Sensitive))
        );
    }

    #[test]
    fn an_agreement_sharing_private_items_is_refused_with_the_reason() {
        let error = parse_agreements(
            "[[agreements]]\npublisher = \"gp\"\nrecipients = [\"acute\"]\nclasses = [\"private\"]\n",
        )
        .unwrap_err();
        assert!(error.to_string().contains("private"), "{error}");
    }
}
