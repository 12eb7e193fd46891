//! Versioned schema migrations. The schema version lives in SQLite's `user_version`; each
//! migration runs in its own transaction, so a crash leaves the database at a whole version.
//! Append new migrations; never edit one that has shipped.

pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: documents, their read model, sources, patient links, ingest log.
    r#"
    CREATE TABLE documents (
        doc_id      BLOB PRIMARY KEY,
        publisher   TEXT NOT NULL,
        nhs         TEXT NOT NULL,
        section     TEXT NOT NULL,
        class       TEXT NOT NULL,
        snapshot    BLOB NOT NULL,
        signed      BLOB NOT NULL,
        seq         INTEGER NOT NULL UNIQUE,
        updated_at  INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX documents_by_patient ON documents(nhs);

    -- The read model: one row per item, rebuilt from its document whenever the document
    -- changes. The view reads only this table; `verify` checks it against the documents.
    CREATE TABLE items (
        doc_id      BLOB NOT NULL REFERENCES documents(doc_id) ON DELETE CASCADE,
        item_id     TEXT NOT NULL,
        nhs         TEXT NOT NULL,
        publisher   TEXT NOT NULL,
        section     TEXT NOT NULL,
        class       TEXT NOT NULL,
        effective   TEXT,
        body        TEXT NOT NULL,
        PRIMARY KEY (doc_id, item_id)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX items_by_patient ON items(nhs, section);
    CREATE INDEX items_by_source ON items(publisher, nhs, item_id);

    -- Organisations whose data this node holds, with the freshness of their data.
    CREATE TABLE sources (
        publisher     TEXT PRIMARY KEY,
        name          TEXT NOT NULL,
        kind          TEXT NOT NULL,
        source_system TEXT NOT NULL,
        feed          TEXT NOT NULL,
        data_as_of    INTEGER NOT NULL
    ) STRICT;

    -- How this organisation's extract names patients (Patient/<id>, identifiers) mapped to
    -- NHS numbers, so later files can refer to patients ingested earlier.
    CREATE TABLE patient_links (
        source_key  TEXT PRIMARY KEY,
        nhs         TEXT NOT NULL
    ) STRICT, WITHOUT ROWID;

    -- Resources other resources point at (Medication for a MedicationRequest), by reference.
    CREATE TABLE referenced_resources (
        source_key  TEXT PRIMARY KEY,
        body        TEXT NOT NULL
    ) STRICT, WITHOUT ROWID;

    -- Resource versions seen, so an older version arriving late never replaces a newer one.
    CREATE TABLE resource_versions (
        source_key    TEXT PRIMARY KEY,
        last_updated  TEXT NOT NULL
    ) STRICT, WITHOUT ROWID;

    CREATE TABLE ingests (
        id          INTEGER PRIMARY KEY,
        at          INTEGER NOT NULL,
        file        TEXT NOT NULL,
        outcome     TEXT NOT NULL,
        summary     TEXT NOT NULL
    ) STRICT;
    "#,
    // 2: sync. The feed identity, per-peer checkpoints and status, rejected changes.
    r#"
    CREATE TABLE node_meta (
        key     TEXT PRIMARY KEY,
        value   BLOB NOT NULL
    ) STRICT, WITHOUT ROWID;
    -- Feed positions (documents.seq) mean something only within one database: peers keep
    -- their checkpoints against this id, and a rebuilt database gets a new one.
    INSERT INTO node_meta (key, value) VALUES ('feed_id', randomblob(16));

    CREATE TABLE sync_peers (
        peer              TEXT PRIMARY KEY,
        peer_feed         BLOB,
        pulled_up_to      INTEGER NOT NULL DEFAULT 0,
        peer_tip          INTEGER NOT NULL DEFAULT 0,
        peer_acked        INTEGER NOT NULL DEFAULT 0,
        local_tip         INTEGER NOT NULL DEFAULT 0,
        connected         INTEGER NOT NULL DEFAULT 0,
        connected_since   INTEGER,
        last_sync_at      INTEGER,
        last_error        TEXT,
        bytes_sent        INTEGER NOT NULL DEFAULT 0,
        bytes_received    INTEGER NOT NULL DEFAULT 0,
        documents_sent    INTEGER NOT NULL DEFAULT 0,
        documents_received INTEGER NOT NULL DEFAULT 0,
        rejected          INTEGER NOT NULL DEFAULT 0,
        updated_at        INTEGER NOT NULL DEFAULT 0
    ) STRICT;

    -- Received changes that failed verification: what, from whom, why. Never their content.
    CREATE TABLE rejected_changes (
        id          INTEGER PRIMARY KEY,
        at          INTEGER NOT NULL,
        peer        TEXT NOT NULL,
        doc_id      BLOB NOT NULL,
        publisher   TEXT NOT NULL,
        reason      TEXT NOT NULL
    ) STRICT;
    "#,
    // 3: documents queued per peer outside the feed order, after a new care relationship
    // made them sendable to it.
    r#"
    CREATE TABLE backfill (
        peer    TEXT NOT NULL,
        doc_id  BLOB NOT NULL REFERENCES documents(doc_id) ON DELETE CASCADE,
        PRIMARY KEY (peer, doc_id)
    ) STRICT, WITHOUT ROWID;
    "#,
    // 4: emergency access (break-glass) to a patient's record without Share In: who, why,
    // from when until when. Rows are never updated or deleted: they are the audit of it.
    r#"
    CREATE TABLE break_glass (
        id          INTEGER PRIMARY KEY,
        nhs         TEXT NOT NULL,
        clinician   TEXT NOT NULL,
        reason      TEXT NOT NULL,
        started_at  INTEGER NOT NULL,
        expires_at  INTEGER NOT NULL,
        CHECK (expires_at > started_at)
    ) STRICT;
    CREATE INDEX break_glass_by_patient ON break_glass(nhs, expires_at);
    "#,
    // 5: the audit trail, hash-chained: each entry's hash covers the one before it.
    r#"
    CREATE TABLE audit_events (
        seq         INTEGER PRIMARY KEY,
        at          INTEGER NOT NULL,
        nhs         TEXT,
        body        TEXT NOT NULL,
        prev_hash   BLOB NOT NULL,
        hash        BLOB NOT NULL
    ) STRICT;
    CREATE INDEX audit_events_by_patient ON audit_events(nhs, at);
    "#,
    // 6: in-context launch. Each launch token is single use (its `jti` is kept until it
    // expires); a launch opens a session for one user, role and patient. Only a hash of the
    // session secret is stored. Break-glass belongs to the user who gave the reason.
    r#"
    CREATE TABLE launch_tokens_used (
        jti         TEXT PRIMARY KEY,
        expires_at  INTEGER NOT NULL,
        used_at     INTEGER NOT NULL
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE sessions (
        secret_hash  BLOB PRIMARY KEY,
        user_id      TEXT NOT NULL,
        user_name    TEXT NOT NULL,
        role         TEXT NOT NULL,
        organisation TEXT NOT NULL,
        nhs          TEXT,
        purpose      TEXT NOT NULL,
        started_at   INTEGER NOT NULL,
        expires_at   INTEGER NOT NULL,
        CHECK (expires_at > started_at)
    ) STRICT, WITHOUT ROWID;
    ALTER TABLE break_glass ADD COLUMN user_id TEXT NOT NULL DEFAULT '';
    "#,
    // 7: how often a batch source is expected to refresh, as its publisher states it, so
    // the view can flag data older than that.
    r#"
    ALTER TABLE sources ADD COLUMN expected_refresh_hours INTEGER;
    "#,
    // 8: items counted by source and section (`caremesh status`, /status) from an index
    // instead of every item's body: at a million documents the count read 3 GB and took
    // minutes. Built once at upgrade: under a minute at that size. Section leads: an index
    // led by publisher would look as good to the planner as `items_by_source` for the
    // per-patient look-ups by publisher and section, and scan all the publisher's items.
    r#"
    CREATE INDEX items_by_section_source ON items(section, publisher, nhs);
    "#,
    // 9: which patient each resource this node ingested was last placed on, and through
    // which Patient resource, so that a resource re-sent under another patient moves (its
    // old copy retracted) and a Patient re-sent with another NHS number takes its resources
    // with it. Only ingest writes it: hubs and peers never hold rows. Filled at upgrade from
    // the items of patients this node's own extracts named (patient_links), main items only.
    r#"
    CREATE TABLE resource_placements (
        publisher    TEXT NOT NULL,
        source_key   TEXT NOT NULL,
        nhs          TEXT NOT NULL,
        patient_key  TEXT,
        moved_at     TEXT,
        PRIMARY KEY (publisher, source_key)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX resource_placements_by_patient ON resource_placements(publisher, nhs);
    INSERT OR IGNORE INTO resource_placements (publisher, source_key, nhs)
        SELECT publisher, item_id, nhs FROM items
        WHERE nhs IN (SELECT nhs FROM patient_links)
          AND section NOT IN ('sharing', 'audit')
          AND instr(item_id, '#') = 0;
    "#,
    // 10: items of the first item format (a summary without the source resource) marked, so
    // `caremesh status` can say which sources must re-publish, from an index that empties as
    // they do. Marking the items held at upgrade reads each body once.
    r#"
    ALTER TABLE items ADD COLUMN summary_only INTEGER NOT NULL DEFAULT 0;
    UPDATE items SET summary_only = 1
        WHERE section NOT IN ('sharing', 'audit')
          AND coalesce(json_extract(body, '$.format'), 1) < 2;
    CREATE INDEX items_summary_only ON items(publisher) WHERE summary_only = 1;
    "#,
    // 11: the read model as a rowid table. Items that carry their resource (format 2) are
    // mostly over a kilobyte, and a WITHOUT ROWID table keeps at most about 1 KB of a row in
    // its page at this page size: every such item took a 4 KB overflow page of its own, and
    // the items table grew to 3.6 times its content (51 MB for 14 MB of items, 1,000
    // generated patients). A rowid table keeps rows up to about 4 KB in the page.
    r#"
    CREATE TABLE items_by_rowid (
        doc_id       BLOB NOT NULL REFERENCES documents(doc_id) ON DELETE CASCADE,
        item_id      TEXT NOT NULL,
        nhs          TEXT NOT NULL,
        publisher    TEXT NOT NULL,
        section      TEXT NOT NULL,
        class        TEXT NOT NULL,
        effective    TEXT,
        body         TEXT NOT NULL,
        summary_only INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (doc_id, item_id)
    ) STRICT;
    INSERT INTO items_by_rowid
        (doc_id, item_id, nhs, publisher, section, class, effective, body, summary_only)
        SELECT doc_id, item_id, nhs, publisher, section, class, effective, body, summary_only
        FROM items;
    DROP TABLE items;
    ALTER TABLE items_by_rowid RENAME TO items;
    CREATE INDEX items_by_patient ON items(nhs, section);
    CREATE INDEX items_by_source ON items(publisher, nhs, item_id);
    CREATE INDEX items_by_section_source ON items(section, publisher, nhs);
    CREATE INDEX items_summary_only ON items(publisher) WHERE summary_only = 1;
    "#,
    // 12: where each ingested file was kept (`processed/NAME` or `quarantine/NAME`), so that
    // `caremesh verify` can find files whose ingestion the database lost (a crash that cut the
    // WAL) and say how to ingest them again.
    "ALTER TABLE ingests ADD COLUMN kept_as TEXT;",
    // 13: documents a peer wanted that were too large for one sync frame: an error for the
    // operator (status, metrics), kept until a version that fits is sent.
    r#"
    CREATE TABLE unsendable_documents (
        doc_id     BLOB NOT NULL,
        peer       TEXT NOT NULL,
        bytes      INTEGER NOT NULL,
        first_at   INTEGER NOT NULL,
        last_at    INTEGER NOT NULL,
        PRIMARY KEY (doc_id, peer)
    ) STRICT;
    "#,
    // 14: signed audit checkpoints, kept apart from the chain they describe: this node's own;
    // those each peer handed this node to witness (a history, thinned with age: a rewritten
    // trail contradicts an old checkpoint as surely as a new one); and receipts from peers
    // that hold this node's (so that a node whose own records were cut learns what it signed).
    r#"
    CREATE TABLE audit_checkpoints (
        count       INTEGER PRIMARY KEY,
        head        BLOB NOT NULL,
        at          INTEGER NOT NULL,
        signed      BLOB NOT NULL
    ) STRICT;
    CREATE TABLE witnessed_checkpoints (
        organisation TEXT NOT NULL,
        count        INTEGER NOT NULL,
        at           INTEGER NOT NULL,
        signed       BLOB NOT NULL,
        PRIMARY KEY (organisation, count)
    ) STRICT;
    CREATE TABLE witness_receipts (
        witness     TEXT NOT NULL,
        count       INTEGER NOT NULL,
        at          INTEGER NOT NULL,
        signed      BLOB NOT NULL,
        PRIMARY KEY (witness, count)
    ) STRICT;
    "#,
    // 15: a feed that never goes back. Positions come from a counter, not MAX(seq) + 1, so a
    // purge of the newest documents cannot hand their positions out again; and each opening
    // for writing begins a feed epoch, so that a peer holding positions this database no
    // longer has (a disk that lost writes it reported durable, a restore from a backup)
    // is served again from where the two still agree (`Store::feed_epoch_end`).
    r#"
    CREATE TABLE feed_tip (
        only    INTEGER PRIMARY KEY CHECK (only = 1),
        tip     INTEGER NOT NULL
    ) STRICT;
    INSERT INTO feed_tip (only, tip) SELECT 1, COALESCE(MAX(seq), 0) FROM documents;
    CREATE TABLE feed_epochs (
        ordinal      INTEGER PRIMARY KEY,
        epoch        INTEGER NOT NULL UNIQUE,
        starts_after INTEGER NOT NULL
    ) STRICT;
    -- Checkpoints saved before epochs name epoch 0: positions up to where the first epoch
    -- began, as before.
    INSERT INTO feed_epochs (epoch, starts_after) VALUES (0, 0);
    ALTER TABLE sync_peers ADD COLUMN peer_epoch INTEGER NOT NULL DEFAULT 0;
    "#,
    // 16: peers whose feed this node takes again from the start once it has caught up. Set
    // for every peer when this node's own documents about a patient come back from a peer:
    // it lost them (a rebuild from its peers, a restore, a disk that lost writes), and
    // while it did not know it cared for the patient it refused other organisations'
    // documents about them, which its checkpoints have passed.
    r#"
    ALTER TABLE sync_peers ADD COLUMN pull_again INTEGER NOT NULL DEFAULT 0;
    "#,
    // 17: what a relay appended to a document since it was saved whole. A hub stores a new
    // version of a document it keeps no items of as the change bytes appended to the stored
    // bytes (`snapshot` still loads as the whole document), and this index of the appended
    // changes (`caremesh_sync::relay::AppendedChanges`) serves holders of older versions
    // without loading it. NULL where the document was saved whole.
    r#"
    ALTER TABLE documents ADD COLUMN appended BLOB;
    "#,
    // 18: appended changes as rows of their own. Rewriting a document's row to append a
    // change made every relayed version cost the whole document's bytes in writes, and the
    // documents of a busy patient grow. `snapshot` now holds only what was saved whole, and
    // each change a relay appended since is a row here, in order; a version writes only its
    // changes. `appended_base` (formerly the whole index) holds the heads of the saved
    // document the rows follow, 32 bytes each, NULL where nothing is appended. Indexes
    // written by migration 17 are dropped: the bytes they indexed stay in `snapshot`, which
    // still loads as the whole document, and count as saved whole.
    r#"
    CREATE TABLE appended_changes (
        doc_id      BLOB NOT NULL REFERENCES documents(doc_id) ON DELETE CASCADE,
        position    INTEGER NOT NULL,
        hash        BLOB NOT NULL,
        deps        BLOB NOT NULL,
        bytes       BLOB NOT NULL,
        PRIMARY KEY (doc_id, position)
    ) STRICT, WITHOUT ROWID;
    UPDATE documents SET appended = NULL WHERE appended IS NOT NULL;
    ALTER TABLE documents RENAME COLUMN appended TO appended_base;
    "#,
    // 19: the FHIR API's clients and the access tokens they were issued. A client is
    // registered by an operator with the public key its client assertions are signed with
    // (a JWK; NULL for a client that gets tokens only from `caremesh api-token`) and the
    // scopes it may be granted. A token is kept as the SHA-256 of its secret, as a session
    // is, and goes with its client.
    r#"
    CREATE TABLE api_clients (
        client_id   TEXT PRIMARY KEY,
        public_key  TEXT,
        scopes      TEXT NOT NULL,
        added_at    INTEGER NOT NULL,
        added_by    TEXT NOT NULL
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE api_tokens (
        secret_hash BLOB PRIMARY KEY,
        client_id   TEXT NOT NULL REFERENCES api_clients(client_id) ON DELETE CASCADE,
        scopes      TEXT NOT NULL,
        user_id     TEXT,
        user_name   TEXT,
        role        TEXT,
        nhs         TEXT,
        purpose     TEXT NOT NULL,
        issued_at   INTEGER NOT NULL,
        expires_at  INTEGER NOT NULL,
        CHECK (expires_at > issued_at)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX api_tokens_by_client ON api_tokens(client_id);
    "#,
    // 20: the FHIR API's change notifications (Subscriptions R5 Backport, rest-hook). A
    // subscription belongs to the client (and user) that made it, with the scopes it was
    // made under, and reads the changes feed from `cursor`; its events wait in
    // `api_subscription_events`, numbered in order, until the endpoint takes them.
    r#"
    CREATE TABLE api_subscriptions (
        id                  TEXT PRIMARY KEY,
        client_id           TEXT NOT NULL REFERENCES api_clients(client_id) ON DELETE CASCADE,
        scopes              TEXT NOT NULL,
        user_id             TEXT,
        user_name           TEXT,
        role                TEXT,
        token_nhs           TEXT,
        purpose             TEXT NOT NULL,
        nhs                 TEXT,
        base_url            TEXT NOT NULL,
        endpoint            TEXT NOT NULL,
        headers             TEXT NOT NULL,
        payload             TEXT NOT NULL CHECK (payload IN ('empty', 'id-only', 'full-resource')),
        heartbeat_seconds   INTEGER,
        status              TEXT NOT NULL CHECK (status IN ('requested', 'active', 'error', 'off')),
        error               TEXT,
        created_at_ms       INTEGER NOT NULL,
        ends_at_ms          INTEGER,
        cursor              INTEGER NOT NULL,
        events              INTEGER NOT NULL DEFAULT 0,
        failures            INTEGER NOT NULL DEFAULT 0,
        due_at_ms           INTEGER NOT NULL,
        last_sent_at_ms     INTEGER
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX api_subscriptions_by_client ON api_subscriptions(client_id);
    CREATE TABLE api_subscription_events (
        subscription_id     TEXT NOT NULL REFERENCES api_subscriptions(id) ON DELETE CASCADE,
        event_number        INTEGER NOT NULL,
        at_ms               INTEGER NOT NULL,
        nhs                 TEXT NOT NULL,
        publisher           TEXT NOT NULL,
        section             TEXT NOT NULL,
        PRIMARY KEY (subscription_id, event_number)
    ) STRICT, WITHOUT ROWID;
    "#,
    // 21: a publisher's resource found by its id alone, for the FHIR API's reads of one
    // resource (`GET /fhir/{type}/{id}`), which name no patient.
    r#"
    CREATE INDEX items_by_resource ON items(publisher, item_id);
    "#,
    // 22: what each version changed, so a change notification carries the resources that
    // changed rather than all of their section. `items.changed_seq` is the feed position of
    // the version that last wrote the item's row with a different body (0: before this
    // migration); a subscription event keeps the subscription's cursor when it was filed
    // (`after_seq`; NULL for events filed before, which tell the whole section).
    r#"
    ALTER TABLE items ADD COLUMN changed_seq INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE api_subscription_events ADD COLUMN after_seq INTEGER;
    "#,
    // 23: the origins each API client's change notifications may be posted to (space-
    // separated `scheme://host[:port]`); none, and it may not subscribe. A client keeps the
    // origins of the subscriptions it holds, so that nothing in force stops at the upgrade;
    // the view puts them in canonical form when it compares.
    r#"
    ALTER TABLE api_clients ADD COLUMN notify_origins TEXT NOT NULL DEFAULT '';
    UPDATE api_clients SET notify_origins = COALESCE((
        SELECT replace(group_concat(DISTINCT lower(substr(endpoint, 1,
            instr(endpoint, '://') + 2 + CASE
                WHEN instr(substr(endpoint, instr(endpoint, '://') + 3), '/') > 0
                THEN instr(substr(endpoint, instr(endpoint, '://') + 3), '/') - 1
                ELSE length(substr(endpoint, instr(endpoint, '://') + 3)) END))), ',', ' ')
        FROM api_subscriptions s
        WHERE s.client_id = api_clients.client_id AND s.status != 'off'), '');
    "#,
    // 24: a hold on publishing this node's own documents, while a node restored from a
    // backup (or rebuilt) has not yet taken back from its peers what it published after the
    // backup: a version written meanwhile would reuse change numbers its peers hold with
    // other content, and never merge (`publishing_hold`). `held` is 0 once released and the
    // access records viewed meanwhile (audit entries after `audit_after`) wait to be published.
    r#"
    CREATE TABLE publishing_hold (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        since INTEGER NOT NULL,
        reason TEXT NOT NULL,
        held INTEGER NOT NULL,
        audit_after INTEGER NOT NULL
    ) STRICT;
    "#,
    // 25: what a document's items map is at its stored version, for a node that reads items
    // to read a new version from its changes alone (`caremesh_sync::register`): postcard
    // bytes, NULL where the version is not registered (it then takes the full path). A
    // register is used only when it names the stored signed heads, so a write that does not
    // know it can never make it describe the wrong version.
    r#"
    ALTER TABLE documents ADD COLUMN item_register BLOB;
    "#,
    // 26: what a document saved whole, in a table of its own. In the documents row the saved
    // bytes sat before `signed`, `seq`, `updated_at`, `appended_base` and `item_register`, so
    // every read of those passed them and every version a relay appended (which updates only
    // those) rewrote them: for a record's sections of kilobytes, their overflow pages. Kept
    // apart, a version costs the same whatever the size of the document it extends. Copying
    // at upgrade reads and writes every document once.
    r#"
    CREATE TABLE document_snapshots (
        doc_id      BLOB PRIMARY KEY REFERENCES documents(doc_id) ON DELETE CASCADE,
        snapshot    BLOB NOT NULL
    ) STRICT;
    INSERT INTO document_snapshots (doc_id, snapshot) SELECT doc_id, snapshot FROM documents;
    ALTER TABLE documents DROP COLUMN snapshot;
    "#,
];

#[cfg(test)]
mod tests {
    #[test]
    fn every_migration_is_valid_sql_on_a_fresh_database() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        for sql in super::MIGRATIONS {
            conn.execute_batch(sql).unwrap();
        }
    }

    /// Migration 26 moves each document's saved bytes to a table of their own, byte for byte,
    /// and a document deleted afterwards (a purge) takes its saved bytes with it.
    #[test]
    fn saved_documents_move_to_their_own_table_whole() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute_batch("PRAGMA foreign_keys = ON;").unwrap();
        let (before, after) = super::MIGRATIONS.split_at(25);
        for sql in before {
            conn.execute_batch(sql).unwrap();
        }
        let large: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for (id, snapshot, seq) in [([1u8; 16], &b"small"[..], 1), ([2; 16], &large[..], 2)] {
            conn.execute(
                "INSERT INTO documents (doc_id, publisher, nhs, section, class, snapshot, \
                 signed, seq, updated_at) VALUES (?1, 'A81001', '9000000009', 'problems', \
                 'coded', ?2, x'00', ?3, 0)",
                rusqlite::params![&id[..], snapshot, seq],
            )
            .unwrap();
        }
        for sql in after {
            conn.execute_batch(sql).unwrap();
        }
        let saved = |id: [u8; 16]| -> Option<Vec<u8>> {
            conn.query_row(
                "SELECT snapshot FROM document_snapshots WHERE doc_id = ?1",
                [&id[..]],
                |row| row.get(0),
            )
            .ok()
        };
        assert_eq!(saved([1; 16]).as_deref(), Some(&b"small"[..]));
        assert_eq!(saved([2; 16]), Some(large));
        let columns: Vec<String> = conn
            .prepare("SELECT name FROM pragma_table_info('documents')")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            !columns.iter().any(|name| name == "snapshot"),
            "{columns:?}"
        );
        conn.execute("DELETE FROM documents WHERE seq = 2", [])
            .unwrap();
        assert_eq!(saved([2; 16]), None);
        assert_eq!(saved([1; 16]).as_deref(), Some(&b"small"[..]));
    }

    /// Migration 23 allows each client the origins of the subscriptions it holds in force,
    /// and no other: one that held none may not subscribe until its operator allows it.
    #[test]
    fn clients_keep_the_origins_of_their_live_subscriptions() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        let (before, after) = super::MIGRATIONS.split_at(22);
        for sql in before {
            conn.execute_batch(sql).unwrap();
        }
        conn.execute_batch(
            "INSERT INTO api_clients VALUES ('ward', NULL, 'system/*.rs', 0, 'op'), \
                                            ('quiet', NULL, 'system/*.rs', 0, 'op');",
        )
        .unwrap();
        for (id, endpoint, status) in [
            ("a", "https://Ward.example.nhs.uk/notify/1", "active"),
            ("b", "https://ward.example.nhs.uk/notify/2", "error"),
            ("c", "http://127.0.0.1:9999", "requested"),
            ("d", "https://ended.example.org/x", "off"),
        ] {
            conn.execute(
                "INSERT INTO api_subscriptions (id, client_id, scopes, purpose, base_url, \
                 endpoint, headers, payload, status, created_at_ms, cursor, due_at_ms) \
                 VALUES (?1, 'ward', 'system/*.rs', 'care', 'http://n/fhir', ?2, '[]', \
                 'id-only', ?3, 0, 0, 0)",
                rusqlite::params![id, endpoint, status],
            )
            .unwrap();
        }
        for sql in after {
            conn.execute_batch(sql).unwrap();
        }
        let origins = |client: &str| -> Vec<String> {
            let mut origins: Vec<String> = conn
                .query_row(
                    "SELECT notify_origins FROM api_clients WHERE client_id = ?1",
                    [client],
                    |row| row.get::<_, String>(0),
                )
                .unwrap()
                .split_whitespace()
                .map(str::to_string)
                .collect();
            origins.sort();
            origins
        };
        assert_eq!(
            origins("ward"),
            ["http://127.0.0.1:9999", "https://ward.example.nhs.uk"]
        );
        assert!(origins("quiet").is_empty());
    }
}
