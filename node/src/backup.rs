//! `caremesh backup` and `caremesh restore`: a node's home in one file, encrypted with its data
//! key, made while the node runs and brought back on another machine.
//!
//! A backup is a tar archive sealed with the data key (`caremesh_storage::sealed`: written
//! through a hidden file and renamed, so a backup file is whole or absent). Its first entry
//! is a manifest; then the database, copied by SQLite's online backup in one read
//! transaction (so it is one consistent state of a running node) and still encrypted with
//! the data key; then every other file of the home a node needs to be itself: its
//! configuration, keys (the organisation's signing key among them: the archive is secret),
//! trust registry and quarantined files. Left out: `processed/` (what went in is in the
//! database), `drop/` (the clinical system sends it again), and what a running node makes
//! for itself (sockets, locks, the disk reserve).
//!
//! The data key is not in the backup: keep it apart from it. Restoring needs both.

use crate::home::{self, CONFIG_FILE, DATABASE_FILE, Home, KeySource};
use anyhow::{Context, Result, bail};
use caremesh_storage::at_rest::{self, DataKeys};
use caremesh_storage::sealed;
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// The archive's first entry.
const MANIFEST: &str = "caremesh-backup.json";
const FORMAT: u32 = 1;
/// Files of the home never put in a backup: made by a running node, or not its to keep.
const LEFT_OUT: &[&str] = &[
    DATABASE_FILE,
    "node.db-wal",
    "node.db-shm",
    "node.db-journal",
    "node.sock",
    "run.lock",
    "write.lock",
    "reserve.space",
    "drop",
    "processed",
];
/// The most a file other than the database may hold: configuration, keys, the registry,
/// quarantined extracts. A larger one in an archive is refused.
const MAX_OTHER_FILE_BYTES: u64 = 256 * 1024 * 1024;
const MAX_ENTRIES: usize = 100_000;

/// What a backup says of itself.
#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub organisation: String,
    pub name: String,
    /// When the database was copied, RFC 3339 UTC.
    pub made_at: String,
    pub caremesh_version: String,
    pub database_bytes: u64,
    /// The other files, relative to the home.
    pub files: Vec<String>,
}

/// Backs up the home into `out`; returns what it wrote.
pub fn make(home: &Home, out: &Path) -> Result<Manifest> {
    let Some(key) = home.data_key()? else {
        bail!(
            "{} is not encrypted, and a backup holds its keys and patient data: encrypt it first (`caremesh encrypt --dir {} --data-key-file PATH`); the backup is encrypted with that key",
            home.dir.display(),
            home.dir.display()
        );
    };
    let out = std::path::absolute(out).with_context(|| format!("resolving {}", out.display()))?;
    let home_dir = std::path::absolute(&home.dir)?;
    if out.starts_with(&home_dir) {
        bail!(
            "{} is inside the node's home: write the backup elsewhere (another disk, or a folder copied off the machine)",
            out.display()
        );
    }
    if out.exists() {
        bail!(
            "{} already exists; a backup is never written over a file",
            out.display()
        );
    }
    let files = files_to_keep(&home.dir)?;
    let copy = TemporaryCopy(home.dir.join(format!(".backup-{}.db", std::process::id())));
    copy.remove();
    let store = home.database()?.open_read_only()?;
    at_rest::back_up(&store, &copy.0, &key)?;
    drop(store);
    let manifest = Manifest {
        format: FORMAT,
        organisation: home.config.organisation.ods.to_string(),
        name: home.config.organisation.name.clone(),
        made_at: caremesh_fhir::clock::rfc3339(caremesh_fhir::clock::now_unix()),
        caremesh_version: env!("CARGO_PKG_VERSION").to_string(),
        database_bytes: std::fs::metadata(&copy.0)?.len(),
        files: files
            .iter()
            .map(|path| path.display().to_string())
            .collect(),
    };
    sealed::keep(Some(&key), &out, |sink| {
        let mut archive = tar::Builder::new(sink);
        let manifest_json = serde_json::to_vec_pretty(&manifest).map_err(std::io::Error::other)?;
        append(
            &mut archive,
            Path::new(MANIFEST),
            &manifest_json[..],
            manifest_json.len() as u64,
        )?;
        let database = std::fs::File::open(&copy.0)?;
        let size = database.metadata()?.len();
        append(&mut archive, Path::new(DATABASE_FILE), database, size)?;
        for relative in &files {
            let file = std::fs::File::open(home.dir.join(relative))?;
            let size = file.metadata()?.len();
            append(&mut archive, relative, file, size)?;
        }
        archive.finish()
    })
    .with_context(|| format!("writing the backup {}", out.display()))?;
    if let Some(KeySource::Passphrase(salt)) = home.config.storage.source() {
        // No secret: the salt and check a restore derives the key with from the passphrase.
        let beside = salt_beside(&out);
        let text = std::fs::read(home.dir.join(&salt))
            .with_context(|| format!("reading the passphrase's salt {}", salt.display()))?;
        sealed::keep(None, &beside, |sink| sink.write_all(&text))
            .with_context(|| format!("writing {}", beside.display()))?;
    }
    Ok(manifest)
}

/// Beside the backup of a home keyed by a passphrase: the passphrase's salt file, which
/// `caremesh restore --data-key-passphrase` derives the key with. Not a secret.
pub fn salt_beside(backup: &Path) -> PathBuf {
    let mut name = backup.as_os_str().to_owned();
    name.push(".salt");
    PathBuf::from(name)
}

/// One file in the archive: owner read and write only, whatever it was at home.
fn append<W: std::io::Write>(
    archive: &mut tar::Builder<W>,
    path: &Path,
    data: impl Read,
    size: u64,
) -> std::io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(size);
    header.set_mode(0o600);
    header.set_entry_type(tar::EntryType::Regular);
    archive.append_data(&mut header, path, data.take(size))
}

/// The database copy, removed however the backup ends.
struct TemporaryCopy(PathBuf);

impl TemporaryCopy {
    fn remove(&self) {
        for suffix in ["", "-journal", "-wal", "-shm"] {
            let mut path = self.0.as_os_str().to_owned();
            path.push(suffix);
            let _ = std::fs::remove_file(PathBuf::from(path));
        }
    }
}

impl Drop for TemporaryCopy {
    fn drop(&mut self) {
        self.remove();
    }
}

/// The files of the home a backup keeps, relative to it, in name order: regular files only
/// (a link is never followed), none hidden, none the node makes for itself.
fn files_to_keep(home_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut kept = Vec::new();
    let mut folders = vec![PathBuf::new()];
    while let Some(relative) = folders.pop() {
        let folder = home_dir.join(&relative);
        for entry in
            std::fs::read_dir(&folder).with_context(|| format!("reading {}", folder.display()))?
        {
            let entry = entry.with_context(|| format!("reading {}", folder.display()))?;
            let name = entry.file_name().to_string_lossy().to_string();
            let path = relative.join(&name);
            if name.starts_with('.')
                || (relative.as_os_str().is_empty() && LEFT_OUT.contains(&name.as_str()))
            {
                continue;
            }
            let kind = entry.file_type()?;
            if kind.is_dir() {
                folders.push(path);
            } else if kind.is_file() {
                kept.push(path);
            }
        }
    }
    kept.sort();
    Ok(kept)
}

/// What `restore` brought back.
pub struct Restored {
    pub manifest: Manifest,
    pub patients: i64,
    pub documents: i64,
}

/// Restores the backup `from` into `dir` (absent or empty), with the data key from `key`;
/// the restored configuration names that key.
pub fn restore(from: &Path, dir: &Path, key: KeySource) -> Result<Restored> {
    if dir.join(CONFIG_FILE).exists()
        || std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some())
    {
        bail!(
            "{} is not empty: restore into a new folder (nothing is ever restored over a node)",
            dir.display()
        );
    }
    let key = match key {
        KeySource::File(path) => KeySource::File(
            std::path::absolute(&path).with_context(|| format!("resolving {}", path.display()))?,
        ),
        credential => credential,
    };
    let data_key = key.read(dir)?;
    let data_keys = DataKeys::new(std::sync::Arc::new(data_key.copy()));
    // A passphrase's salt is in the backup, as the configuration names it: both stay.
    let storage = match &key {
        KeySource::Passphrase(_) => None,
        _ => Some(home::StorageConfig::from_source(Some(key))),
    };
    let manifest = unpack(from, dir, &data_keys)?;
    let mut home = Home::open(dir).with_context(|| {
        format!(
            "the backup's {CONFIG_FILE} does not load; the backup may come from a newer caremesh"
        )
    })?;
    if home.config.organisation.ods.as_str() != manifest.organisation {
        bail!(
            "the backup's manifest names {} and its configuration {}: it is not one node's backup",
            manifest.organisation,
            home.config.organisation.ods
        );
    }
    match storage {
        Some(storage) => home.config.storage = storage,
        None => {
            let Some(KeySource::Passphrase(salt)) = home.config.storage.source() else {
                bail!(
                    "the backed-up node was not keyed by a passphrase: restore it with --data-key-file or --data-key-credential"
                );
            };
            // Checked against the restored salt file, and kept for this process's opens.
            let salt = dir.join(salt);
            crate::passphrase::given_key(&salt, &data_key.to_hex())?;
            crate::passphrase::remember(&salt, &data_key);
        }
    }
    home.forget_database();
    home.save_config()?;
    for folder in ["drop", "processed", "quarantine"] {
        home::private_folder(&dir.join(folder))?;
    }
    // Opened for writing: migrations a newer caremesh needs run now, and a wrong key is
    // refused before anything says the restore worked.
    let mut store = home.open_store()?;
    let stats = store.stats()?;
    if home.holds_publishing_when_restored() {
        // Its peers hold what it published after the backup: it takes that back before it
        // publishes anything new (`caremesh_storage::publishing_hold`).
        let batch = store.write()?;
        batch.hold_publishing(
            caremesh_fhir::clock::now_unix(),
            &format!("restored from a backup made at {}", manifest.made_at),
        )?;
        batch.commit()?;
    }
    store.append_audit(&caremesh_storage::audit::AuditEvent {
        detail: format!(
            "restored from a backup made at {} by caremesh {}",
            manifest.made_at, manifest.caremesh_version
        ),
        ..crate::audit::operator_event(
            &home,
            &crate::process::operator(),
            "restore",
            "data at rest",
        )
    })?;
    Ok(Restored {
        manifest,
        patients: stats.patients,
        documents: stats.documents,
    })
}

/// Unpacks the sealed archive `from` into `dir`, refusing any entry that is not a plain
/// relative path to a regular file. Returns the manifest.
fn unpack(from: &Path, dir: &Path, data_keys: &DataKeys) -> Result<Manifest> {
    if !sealed::is_sealed(from)? {
        bail!(
            "{} is not a caremesh backup (backups are encrypted with the node's data key)",
            from.display()
        );
    }
    let reader = sealed::open_kept(Some(data_keys), from)?;
    home::private_folder(dir)?;
    let mut archive = tar::Archive::new(reader);
    let mut manifest: Option<Manifest> = None;
    let mut database = false;
    let entries = archive
        .entries()
        .with_context(|| format!("reading {}", from.display()))?;
    for (index, entry) in entries.enumerate() {
        let unreadable = || format!("reading {}", from.display());
        let mut entry = entry
            .map_err(|error| sealed::unwrap_seal_error(from, error))
            .with_context(unreadable)?;
        if index >= MAX_ENTRIES {
            bail!(
                "{} holds more than {MAX_ENTRIES} files: not a caremesh backup",
                from.display()
            );
        }
        let path = entry.path().with_context(unreadable)?.into_owned();
        let plain = path
            .components()
            .all(|component| matches!(component, Component::Normal(_)));
        if !plain || entry.header().entry_type() != tar::EntryType::Regular {
            bail!(
                "{} holds {:?}, which is not a plain file inside a node's home: not a caremesh backup, and nothing of it was used",
                from.display(),
                path
            );
        }
        let size = entry.size();
        if index == 0 {
            if path != Path::new(MANIFEST) || size > 1024 * 1024 {
                bail!(
                    "{} does not start with a caremesh backup's manifest",
                    from.display()
                );
            }
            let mut text = Vec::new();
            (&mut entry).take(size).read_to_end(&mut text)?;
            let read: Manifest = serde_json::from_slice(&text)
                .with_context(|| format!("the manifest of {}", from.display()))?;
            if read.format != FORMAT {
                bail!(
                    "{} is a backup in format {}, and this caremesh reads format {FORMAT}: restore it with the caremesh that made it ({})",
                    from.display(),
                    read.format,
                    read.caremesh_version
                );
            }
            manifest = Some(read);
            continue;
        }
        let is_database = path == Path::new(DATABASE_FILE);
        if !is_database && size > MAX_OTHER_FILE_BYTES {
            bail!(
                "{} holds {:?} of {size} bytes, over the limit for a node's file",
                from.display(),
                path
            );
        }
        database |= is_database;
        let target = dir.join(&path);
        if let Some(parent) = target.parent() {
            home::private_folder(parent)?;
        }
        sealed::keep(None, &target, |out| {
            std::io::copy(&mut (&mut entry).take(size), out).map(drop)
        })
        .with_context(|| format!("restoring {}", target.display()))?;
    }
    let Some(manifest) = manifest else {
        bail!("{} is empty: not a caremesh backup", from.display());
    };
    if !database {
        bail!(
            "{} holds no database: not a whole caremesh backup",
            from.display()
        );
    }
    Ok(manifest)
}
