//! `caremesh rekey`: a new data key for everything the home holds at rest, while the view
//! goes on serving reads.
//!
//! The change runs on the store's one writer (in the running node, handed over the control
//! socket; otherwise in the CLI's own process) in steps that a crash may cut anywhere:
//!
//! 1. The configuration names the new key, and the old one as `previous_…`, written
//!    atomically. From here every process tries the new key first and the old one after.
//! 2. The same two keys are put in force in this process ([`Database::set_keys`]), so the
//!    view's next connection tries both.
//! 3. SQLCipher rewrites every page under the new key in one transaction
//!    ([`caremesh_storage::Store::rekey`]): the database is wholly under one key or the
//!    other. Readers already reading finish on their snapshot; writes and sync wait.
//! 4. Every file kept in processed/ and quarantine/ is sealed again with the new key, each
//!    replaced whole ([`sealed::reseal`]).
//! 5. The configuration forgets the old key; so does this process.
//!
//! A node that starts with `previous_…` still named finishes the change before it serves
//! (steps 2 to 5 again; each is a no-op where it was done). Backups made before the change
//! stay under the old key: it opens nothing in the home any more, but keep it as long as
//! those backups are kept.

use crate::home::{Home, KeySource};
use anyhow::{Context, Result, bail};
use caremesh_storage::Store;
use caremesh_storage::at_rest::{DataKey, DataKeys, Database};
use caremesh_storage::sealed;
use std::path::Path;
use std::sync::Arc;

/// What a change of key did.
#[derive(Debug)]
pub struct Rekeyed {
    /// Whether the database was rewritten now (not already under the new key).
    pub database_rewritten: bool,
    pub database_bytes: u64,
    /// Kept files sealed again with the new key.
    pub files_resealed: usize,
    pub seconds: f64,
}

/// Changes the data key of `home` to the one `new` gives, on `store`, the home's writer.
/// Given the source of the key already in use while a change is unfinished, finishes it.
/// `given_key` is the key a CLI derived from a new passphrase (see [`read_new_key`]).
pub fn change_data_key(
    home: &Home,
    store: &mut Store,
    new: &KeySource,
    given_key: Option<&str>,
) -> Result<Rekeyed> {
    let started = std::time::Instant::now();
    let database = home.database()?;
    let Some(keys) = database.keys() else {
        bail!(
            "{} is not encrypted, so it has no data key to change: `caremesh encrypt --dir {} --data-key-file PATH` encrypts it",
            home.dir.display(),
            home.dir.display()
        );
    };
    // The configuration on disk, not the one this process read at its start: an earlier
    // change of key in this process wrote it since.
    let mut on_disk = Home::open(&home.dir)?;
    let storage = &on_disk.config.storage;
    let current_source = storage.source().expect("an encrypted home names its key");
    let (new_key, old_key) = if *new == current_source {
        match (storage.previous_source(), keys.previous()) {
            // The change under way to this key: finished below.
            (Some(_), Some(previous)) => (keys.current().clone(), previous.clone()),
            // Its previous key is gone: the database opened under the new one, so only kept
            // files still under the old key could be left, and those cannot be read now.
            (Some(previous), None) => {
                bail!(
                    "a change of data key to {new} is unfinished, and the key it replaces ({previous}) cannot be read: restore that key to finish it, or nothing still sealed with it can be read"
                )
            }
            (None, _) => bail!("{new} is the data key already; nothing was changed"),
        }
    } else {
        if let Some(previous) = storage.previous_source() {
            bail!(
                "a change of data key from {previous} to {current_source} is unfinished: finish it first (`caremesh rekey --dir {}` with that key again, or start the node); nothing was changed",
                home.dir.display()
            );
        }
        let new_key = read_new_key(new, given_key, &home.dir)?;
        if new_key.same_as(keys.current()) {
            bail!("{new} holds the data key already in use; nothing was changed");
        }
        (Arc::new(new_key), keys.current().clone())
    };
    let database_bytes = database_bytes(&database);
    check_room(&home.dir, database_bytes)?;

    on_disk.config.storage.set_previous_source(Some(
        on_disk
            .config
            .storage
            .previous_source()
            .unwrap_or(current_source),
    ));
    on_disk.config.storage.set_source(Some(new.clone()));
    on_disk.save_config()?;
    let changing = DataKeys::changing(new_key.clone(), old_key);
    database.set_keys(changing.clone());

    let database_rewritten = store
        .rekey(&new_key)
        .context("re-encrypting the database under the new data key")?;
    let files_resealed = reseal_kept_files(home, &changing)?;

    let replaced = on_disk.config.storage.previous_source();
    on_disk.config.storage.set_previous_source(None);
    on_disk.save_config()?;
    database.set_keys(DataKeys::new(new_key));
    // The old passphrase's salt opens nothing now (backups made before hold their own copy).
    if let Some(KeySource::Passphrase(salt)) = replaced
        && KeySource::Passphrase(salt.clone()) != *new
    {
        let _ = std::fs::remove_file(home.dir.join(salt));
    }
    Ok(Rekeyed {
        database_rewritten,
        database_bytes,
        files_resealed,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// At a node's start: finishes a change of key a crash or a stop cut short, before anything
/// else opens the store. Returns what it did, if a change was unfinished.
pub fn finish_unfinished_change(home: &Home) -> Result<Option<Rekeyed>> {
    let storage = &home.config.storage;
    if storage.previous_source().is_none() {
        return Ok(None);
    }
    let current = storage.source().expect("an encrypted home names its key");
    let mut store = home.open_store()?;
    let done = change_data_key(home, &mut store, &current, None)?;
    tracing::warn!(
        files_resealed = done.files_resealed,
        database_rewritten = done.database_rewritten,
        "finished a change of data key that was cut short"
    );
    Ok(Some(done))
}

/// Seals every file kept in processed/ and quarantine/ (extracts and their reasons) with
/// the current key of `keys`, reading each through whichever key it is under. Returns how
/// many were rewritten.
pub fn reseal_kept_files(home: &Home, keys: &DataKeys) -> Result<usize> {
    let mut count = 0;
    for folder in [home.processed_dir(), home.quarantine_dir()] {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        for entry in entries {
            let entry = entry.with_context(|| format!("reading {}", folder.display()))?;
            let hidden = entry.file_name().to_string_lossy().starts_with('.');
            if hidden || !entry.file_type()?.is_file() {
                continue;
            }
            if sealed::reseal(keys, &entry.path())? {
                count += 1;
            }
        }
    }
    Ok(count)
}

/// The new key: a key file is made (mode 0600, outside the home) when it does not exist; a
/// key from a passphrase is the one the CLI derived, if the salt file checks it (the node
/// has no terminal to ask on).
fn read_new_key(new: &KeySource, given_key: Option<&str>, home_dir: &Path) -> Result<DataKey> {
    Ok(match (new, given_key) {
        (KeySource::File(path), _) => crate::home::data_key_for_init(path, home_dir)?.0,
        (KeySource::Passphrase(salt), Some(hex)) => {
            crate::passphrase::given_key(&home_dir.join(salt), hex)?
        }
        _ => new.read(home_dir)?,
    })
}

/// The database and its WAL, in bytes.
fn database_bytes(database: &Database) -> u64 {
    let wal = format!("{}-wal", database.path().display());
    [database.path(), Path::new(&wal)]
        .iter()
        .filter_map(|path| std::fs::metadata(path).ok())
        .map(|metadata| metadata.len())
        .sum()
}

/// The rewrite puts every page in the WAL before a checkpoint copies it back: the disk needs
/// room for a second copy of the database, beside the node's own low-space margin.
fn check_room(home_dir: &Path, database_bytes: u64) -> Result<()> {
    let free = caremesh_storage::disk_space::free_bytes(home_dir)
        .with_context(|| format!("reading the free space of {}", home_dir.display()))?;
    let needed = database_bytes + caremesh_storage::disk_space::LOW_SPACE_BYTES;
    if free < needed {
        bail!(
            "changing the data key rewrites the whole database, which needs {} MB free beside it and {} MB are free on the disk of {}: free some space; nothing was changed",
            needed / 1_000_000 + 1,
            free / 1_000_000,
            home_dir.display()
        );
    }
    Ok(())
}
