//! WAL checkpoints on a thread of their own.
//!
//! SQLite copies the WAL back into the database file (a checkpoint) from the connection that
//! commits, once the WAL holds 1,000 frames. On a hub that connection is the sync engine's,
//! and the checkpoint was a tenth of the engine thread's work under load (BENCHMARKS.md),
//! done while every session waited. [`Store::checkpoint_elsewhere`] gives that work to a
//! [`Checkpointer`], a second connection another thread drives (the node's WAL sync thread,
//! after each sync), and leaves the engine's connection a backstop: should the checkpointer
//! stop or fall behind, the engine checkpoints once the WAL holds [`BACKSTOP_FRAMES`].
//!
//! Nothing about durability changes: a checkpoint copies only committed frames, syncs the
//! WAL before it copies and the database after, as SQLite's own does. A passive checkpoint
//! never blocks the engine's writes; the WAL starts again from its beginning at the engine's
//! next write after a checkpoint that copied everything.

use crate::{Result, StorageError, Store, Syncing, page_checksums};
use rusqlite::{Connection, OpenFlags};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// WAL frames after which a [`Checkpointer`] checkpoints: SQLite's own interval.
pub const CHECKPOINT_FRAMES: u32 = 1_000;

/// WAL frames after which the committing connection checkpoints itself all the same.
pub const BACKSTOP_FRAMES: u32 = 8 * CHECKPOINT_FRAMES;

/// Checkpoints a store's WAL from another connection (see the module's documentation).
/// Opens its own connection, so any thread may hold one.
pub struct Checkpointer {
    conn: Connection,
    path: PathBuf,
    /// The frames the WAL held at the committing connection's last commit.
    frames: Arc<AtomicU32>,
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpointer")
            .field("path", &self.path)
            .field("frames", &self.frames.load(Ordering::Relaxed))
            .finish()
    }
}

impl Checkpointer {
    /// Checkpoints the WAL (passively: it never waits for the engine) once the committing
    /// connection has seen it hold [`CHECKPOINT_FRAMES`]. Says whether it checkpointed.
    pub fn checkpoint_if_due(&self) -> Result<bool> {
        if self.frames.load(Ordering::Relaxed) < CHECKPOINT_FRAMES {
            return Ok(false);
        }
        self.conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
            .map_err(|source| StorageError::database(self.path.clone(), "checkpoint", source))?;
        // The next commit says how many frames the WAL holds then: few once it started again.
        self.frames.store(0, Ordering::Relaxed);
        Ok(true)
    }
}

impl Store {
    /// Hands this store's WAL checkpoints to a [`Checkpointer`] for another thread to run, and
    /// keeps only the backstop here. `None` where the store stays as it is: an encrypted
    /// database (a second connection would keep the key it opened with across a change of
    /// key), the simulator's disk, or a store that does not sync.
    pub fn checkpoint_elsewhere(&mut self) -> Result<Option<Checkpointer>> {
        if self.key.is_some() || self.simulated || self.syncing.get() == Syncing::Off {
            return Ok(None);
        }
        let err = |path: &PathBuf| {
            let path = path.clone();
            move |source| StorageError::database(path, "open a checkpoint connection", source)
        };
        page_checksums::register();
        let conn = Connection::open_with_flags_and_vfs(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            page_checksums::VFS_NAME,
        )
        .map_err(err(&self.path))?;
        conn.execute_batch("PRAGMA busy_timeout = 5000; PRAGMA synchronous = FULL;")
            .map_err(err(&self.path))?;
        let frames = Arc::new(AtomicU32::new(0));
        let seen = frames.clone();
        // SQLite's automatic checkpoint is itself this hook; this one replaces it.
        self.conn
            .wal_hook(Some(move |wal: &mut rusqlite::hooks::Wal, pages| {
                let pages = u32::try_from(pages).unwrap_or(0);
                seen.store(pages, Ordering::Relaxed);
                if pages >= BACKSTOP_FRAMES {
                    wal.checkpoint()?;
                }
                Ok(())
            }))
            .map_err(err(&self.path))?;
        Ok(Some(Checkpointer {
            conn,
            path: self.path.clone(),
            frames,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One commit of a row about a page long: a frame or two each.
    fn commit_a_page(store: &Store, n: u32) {
        store
            .conn
            .execute(
                "INSERT INTO checkpoint_probe (n, filler) VALUES (?1, zeroblob(3000))",
                [n],
            )
            .unwrap();
    }

    fn file_len(path: &std::path::Path) -> u64 {
        std::fs::metadata(path).unwrap().len()
    }

    /// The engine's commits no longer copy the WAL into the database (the file stays as it
    /// was however many frames the WAL holds, up to the backstop); the checkpointer does,
    /// once due; and should it not run, the engine's connection does at the backstop.
    #[test]
    fn the_checkpointer_copies_the_wal_back_and_the_engine_only_at_the_backstop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let mut store = Store::open(&path).unwrap();
        store
            .conn
            .execute_batch(
                "CREATE TABLE checkpoint_probe (n INTEGER PRIMARY KEY, filler BLOB); \
                 PRAGMA wal_checkpoint(TRUNCATE);",
            )
            .unwrap();
        let checkpointer = store
            .checkpoint_elsewhere()
            .unwrap()
            .expect("a plain store");
        assert!(!checkpointer.checkpoint_if_due().unwrap(), "nothing yet");
        let before = file_len(&path);
        let mut n = 0;
        while checkpointer.frames.load(Ordering::Relaxed) < 2 * CHECKPOINT_FRAMES {
            commit_a_page(&store, n);
            n += 1;
        }
        assert_eq!(
            file_len(&path),
            before,
            "the engine's commits left the WAL as it was past SQLite's own interval"
        );
        assert!(checkpointer.checkpoint_if_due().unwrap());
        assert!(
            file_len(&path) > before + u64::from(n) * 3000,
            "the checkpointer copied the WAL back: every row is in the database file"
        );
        assert!(
            !checkpointer.checkpoint_if_due().unwrap(),
            "not due again yet"
        );
        let rows: u32 = store
            .conn
            .query_row("SELECT count(*) FROM checkpoint_probe", [], |row| {
                row.get(0)
            })
            .unwrap();
        assert_eq!(rows, n);

        // The checkpointer stops: the engine's connection checkpoints at the backstop.
        let copied = file_len(&path);
        while checkpointer.frames.load(Ordering::Relaxed) < BACKSTOP_FRAMES - 10 {
            commit_a_page(&store, n);
            n += 1;
        }
        assert_eq!(
            file_len(&path),
            copied,
            "nothing copied before the backstop"
        );
        for _ in 0..20 {
            commit_a_page(&store, n);
            n += 1;
        }
        assert!(
            file_len(&path) > copied,
            "the engine's connection checkpointed at the backstop"
        );
    }

    #[test]
    fn a_store_that_does_not_sync_keeps_its_own_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("node.db")).unwrap();
        store.without_fsync().unwrap();
        assert!(
            store.checkpoint_elsewhere().unwrap().is_none(),
            "a store that does not sync has nothing to hand over"
        );
    }
}
