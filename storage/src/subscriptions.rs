//! The FHIR API's change notifications: subscriptions and the events waiting for them.
//!
//! A subscription (FHIR Subscriptions R5 Backport, rest-hook) belongs to the API client that
//! made it, and to the user it acted for, with the scopes it was made under: what it is told
//! is decided for that caller, as a read would be. It reads this node's changes feed
//! (`documents.seq`) from its `cursor`; each change it may be told of becomes an event with
//! the next number, in the same transaction that moves the cursor, so a change is never
//! skipped nor counted twice. Events wait here until the endpoint has taken them: a client
//! that is down loses nothing, and is told in order when it is back.

use crate::{Result, Store};
use rusqlite::{OptionalExtension, params};

/// How a notification carries what changed (the Backport's `payload-content`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadContent {
    /// Only the subscription's status: the client reads what changed.
    Empty,
    /// The ids of what changed.
    IdOnly,
    /// What changed, as the client may read it.
    FullResource,
}

impl PayloadContent {
    pub fn code(self) -> &'static str {
        match self {
            PayloadContent::Empty => "empty",
            PayloadContent::IdOnly => "id-only",
            PayloadContent::FullResource => "full-resource",
        }
    }

    pub fn from_code(code: &str) -> Option<PayloadContent> {
        match code {
            "empty" => Some(PayloadContent::Empty),
            "id-only" => Some(PayloadContent::IdOnly),
            "full-resource" => Some(PayloadContent::FullResource),
            _ => None,
        }
    }
}

/// Where a subscription stands (FHIR R4 `Subscription.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriptionStatus {
    /// Made; its endpoint has not yet answered the handshake.
    Requested,
    /// Its endpoint takes notifications.
    Active,
    /// Its endpoint failed the last delivery; it is tried again with backoff.
    Error,
    /// Ended by the client, or past its end: nothing more is sent.
    Off,
}

impl SubscriptionStatus {
    pub fn code(self) -> &'static str {
        match self {
            SubscriptionStatus::Requested => "requested",
            SubscriptionStatus::Active => "active",
            SubscriptionStatus::Error => "error",
            SubscriptionStatus::Off => "off",
        }
    }

    fn from_code(code: &str) -> SubscriptionStatus {
        match code {
            "requested" => SubscriptionStatus::Requested,
            "active" => SubscriptionStatus::Active,
            "error" => SubscriptionStatus::Error,
            _ => SubscriptionStatus::Off,
        }
    }
}

/// A subscription as made, and where its delivery stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub id: String,
    pub client_id: String,
    /// The scopes of the token it was made with: what it may be told.
    pub scopes: String,
    /// The user the client acted for, if any.
    pub user: Option<crate::api_access::ApiUser>,
    /// The one patient the making token was limited to, if any.
    pub token_nhs: Option<String>,
    pub purpose: String,
    /// The patient it follows; `None` for every patient the caller may see.
    pub nhs: Option<String>,
    /// The FHIR base the client made it at, for the references its notifications carry.
    pub base_url: String,
    /// Where notifications are posted.
    pub endpoint: String,
    /// Headers the client asked to be sent with each notification (`Name: value`).
    pub headers: Vec<String>,
    pub payload: PayloadContent,
    /// A heartbeat is sent after this long without a notification.
    pub heartbeat_seconds: Option<u32>,
    pub status: SubscriptionStatus,
    /// Why the last delivery failed.
    pub error: Option<String>,
    pub created_at_ms: i64,
    pub ends_at_ms: Option<i64>,
    /// The feed position it has read up to.
    pub cursor: u64,
    /// Events since it started: the number of the newest.
    pub events: u64,
    /// Deliveries failed since the last that succeeded.
    pub failures: u32,
    /// When it next needs the notifier: a retry, or a heartbeat.
    pub due_at_ms: i64,
    pub last_sent_at_ms: Option<i64>,
}

/// A change a subscription is to be told of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionEvent {
    pub event_number: u64,
    pub at_ms: i64,
    pub nhs: String,
    /// The organisation whose data changed, and in which section.
    pub publisher: String,
    pub section: String,
    /// The subscription's feed cursor when the event was filed: the resources it tells of
    /// are those changed here after it ([`Store::changed_sources`]). `None` for an event
    /// filed before versions recorded what they changed, which tells the whole section.
    pub after_seq: Option<u64>,
}

/// A change to file for a subscription: when it became durable here, about whom, whose data
/// in which section changed, and after which feed position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub at_ms: i64,
    pub nhs: String,
    pub publisher: String,
    pub section: String,
    pub after_seq: u64,
}

/// At most this many subscriptions on one node: each reads the feed and may cost a record
/// assembly per change.
pub const MAX_SUBSCRIPTIONS: usize = 2_000;
/// At most this many events wait for one subscription; past it, the oldest are dropped and
/// the subscription is told it missed events (its event numbers jump).
pub const MAX_WAITING_EVENTS: u64 = 10_000;

const COLUMNS: &str = "id, client_id, scopes, user_id, user_name, role, token_nhs, purpose, \
     nhs, base_url, endpoint, headers, payload, heartbeat_seconds, status, error, created_at_ms, \
     ends_at_ms, cursor, events, failures, due_at_ms, last_sent_at_ms";

fn row_to_subscription(row: &rusqlite::Row<'_>) -> rusqlite::Result<Subscription> {
    let user = match (
        row.get::<_, Option<String>>(3)?,
        row.get::<_, Option<String>>(4)?,
        row.get::<_, Option<String>>(5)?,
    ) {
        (Some(id), Some(name), Some(role)) => Some(crate::api_access::ApiUser { id, name, role }),
        _ => None,
    };
    let headers: String = row.get(11)?;
    let payload: String = row.get(12)?;
    Ok(Subscription {
        id: row.get(0)?,
        client_id: row.get(1)?,
        scopes: row.get(2)?,
        user,
        token_nhs: row.get(6)?,
        purpose: row.get(7)?,
        nhs: row.get(8)?,
        base_url: row.get(9)?,
        endpoint: row.get(10)?,
        headers: serde_json::from_str(&headers).unwrap_or_default(),
        payload: PayloadContent::from_code(&payload).unwrap_or(PayloadContent::Empty),
        heartbeat_seconds: row.get(13)?,
        status: SubscriptionStatus::from_code(&row.get::<_, String>(14)?),
        error: row.get(15)?,
        created_at_ms: row.get(16)?,
        ends_at_ms: row.get(17)?,
        cursor: row.get::<_, i64>(18)? as u64,
        events: row.get::<_, i64>(19)? as u64,
        failures: row.get(20)?,
        due_at_ms: row.get(21)?,
        last_sent_at_ms: row.get(22)?,
    })
}

/// What a delivery attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    /// The endpoint took every event up to and including this number (0 for a handshake or
    /// heartbeat), at this time.
    Through { event_number: u64, at_ms: i64 },
    /// It did not; tried again at `retry_at_ms`.
    Failed { reason: String, retry_at_ms: i64 },
}

impl Store {
    /// Keeps a new subscription. Refused past [`MAX_SUBSCRIPTIONS`], or when its client is
    /// not registered (the database's foreign key).
    pub fn add_subscription(&mut self, subscription: &Subscription) -> Result<bool> {
        assert!(!subscription.id.is_empty(), "a subscription needs an id");
        self.open_pending_group()?;
        let held: i64 = self
            .conn
            .prepare_cached("SELECT COUNT(*) FROM api_subscriptions WHERE status != 'off'")
            .and_then(|mut statement| statement.query_row([], |row| row.get(0)))
            .map_err(self.err("count subscriptions"))?;
        if held as usize >= MAX_SUBSCRIPTIONS {
            return Ok(false);
        }
        let s = subscription;
        let user = s.user.as_ref();
        self.conn
            .prepare_cached(&format!(
                "INSERT INTO api_subscriptions ({COLUMNS}) VALUES \
                 (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, \
                 ?18, ?19, ?20, ?21, ?22, ?23)"
            ))
            .and_then(|mut statement| {
                statement.execute(params![
                    s.id,
                    s.client_id,
                    s.scopes,
                    user.map(|u| &u.id),
                    user.map(|u| &u.name),
                    user.map(|u| &u.role),
                    s.token_nhs,
                    s.purpose,
                    s.nhs,
                    s.base_url,
                    s.endpoint,
                    serde_json::to_string(&s.headers).expect("strings serialise"),
                    s.payload.code(),
                    s.heartbeat_seconds,
                    s.status.code(),
                    s.error,
                    s.created_at_ms,
                    s.ends_at_ms,
                    s.cursor as i64,
                    s.events as i64,
                    s.failures,
                    s.due_at_ms,
                    s.last_sent_at_ms
                ])
            })
            .map_err(self.err("add a subscription"))?;
        Ok(true)
    }

    pub fn subscription(&self, id: &str) -> Result<Option<Subscription>> {
        self.conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM api_subscriptions WHERE id = ?1"
            ))
            .and_then(|mut statement| statement.query_row([id], row_to_subscription).optional())
            .map_err(self.err("read a subscription"))
    }

    /// Every subscription not ended, oldest first.
    pub fn live_subscriptions(&self) -> Result<Vec<Subscription>> {
        let mut statement = self
            .conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM api_subscriptions WHERE status != 'off' \
                 ORDER BY created_at_ms, id"
            ))
            .map_err(self.err("read subscriptions"))?;
        let rows = statement
            .query_map([], row_to_subscription)
            .map_err(self.err("read subscriptions"))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err("read subscriptions"))
    }

    /// Ends a subscription (the client's delete, or its end passed): nothing more is sent,
    /// and its waiting events go. False if there was none live of that id.
    pub fn end_subscription(&mut self, id: &str, reason: Option<&str>) -> Result<bool> {
        self.open_pending_group()?;
        let path = self.path.clone();
        let fail = |e| crate::StorageError::database(path.clone(), "end a subscription", e);
        let tx = self.conn.savepoint().map_err(fail)?;
        tx.execute(
            "DELETE FROM api_subscription_events WHERE subscription_id = ?1",
            [id],
        )
        .map_err(fail)?;
        let ended = tx
            .execute(
                "UPDATE api_subscriptions SET status = 'off', error = ?2 \
                 WHERE id = ?1 AND status != 'off'",
                params![id, reason],
            )
            .map_err(fail)?;
        tx.commit().map_err(fail)?;
        Ok(ended == 1)
    }

    /// Files the events a subscription is to be told of, numbered on from its last, and moves
    /// its cursor to `cursor`, in one transaction. Past [`MAX_WAITING_EVENTS`] waiting, the
    /// oldest are dropped: their numbers are missing from what the client receives, which
    /// the Backport defines as the sign to read the record again.
    pub fn file_subscription_events(
        &mut self,
        id: &str,
        cursor: u64,
        events: &[NewEvent],
    ) -> Result<()> {
        self.open_pending_group()?;
        let path = self.path.clone();
        let fail = |e| crate::StorageError::database(path.clone(), "file subscription events", e);
        let tx = self.conn.savepoint().map_err(fail)?;
        let (mut number, held_cursor): (i64, i64) = tx
            .query_row(
                "SELECT events, cursor FROM api_subscriptions WHERE id = ?1 AND status != 'off'",
                [id],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()
            .map_err(fail)?
            .unwrap_or((-1, i64::MAX));
        if number < 0 || held_cursor as u64 >= cursor {
            // Ended meanwhile, or another pass filed these already.
            return Ok(());
        }
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO api_subscription_events \
                     (subscription_id, event_number, at_ms, nhs, publisher, section, after_seq) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .map_err(fail)?;
            for event in events {
                number += 1;
                insert
                    .execute(params![
                        id,
                        number,
                        event.at_ms,
                        event.nhs,
                        event.publisher,
                        event.section,
                        event.after_seq as i64
                    ])
                    .map_err(fail)?;
            }
        }
        tx.execute(
            "DELETE FROM api_subscription_events WHERE subscription_id = ?1 \
             AND event_number <= ?2",
            params![id, number - MAX_WAITING_EVENTS as i64],
        )
        .map_err(fail)?;
        tx.execute(
            "UPDATE api_subscriptions SET events = ?2, cursor = ?3 WHERE id = ?1",
            params![id, number, cursor as i64],
        )
        .map_err(fail)?;
        tx.commit().map_err(fail)
    }

    /// The oldest `limit` events waiting for a subscription.
    pub fn waiting_events(&self, id: &str, limit: usize) -> Result<Vec<SubscriptionEvent>> {
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT event_number, at_ms, nhs, publisher, section, after_seq \
                 FROM api_subscription_events \
                 WHERE subscription_id = ?1 ORDER BY event_number LIMIT ?2",
            )
            .map_err(self.err("read subscription events"))?;
        let rows = statement
            .query_map(params![id, limit as i64], |row| {
                Ok(SubscriptionEvent {
                    event_number: row.get::<_, i64>(0)? as u64,
                    at_ms: row.get(1)?,
                    nhs: row.get(2)?,
                    publisher: row.get(3)?,
                    section: row.get(4)?,
                    after_seq: row.get::<_, Option<i64>>(5)?.map(|seq| seq as u64),
                })
            })
            .map_err(self.err("read subscription events"))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err("read subscription events"))
    }

    /// The resources (`Type/id`, as their publisher names them) of `publisher`'s `section`
    /// of the patient's record whose items a version stored here after feed position
    /// `after_seq` wrote with new content: what a change notification tells of.
    pub fn changed_sources(
        &self,
        nhs: &str,
        publisher: &str,
        section: &str,
        after_seq: u64,
    ) -> Result<std::collections::BTreeSet<String>> {
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT body FROM items WHERE nhs = ?1 AND section = ?2 AND publisher = ?3 \
                 AND changed_seq > ?4",
            )
            .map_err(self.err("read changed items"))?;
        let bodies = statement
            .query_map(params![nhs, section, publisher, after_seq as i64], |row| {
                row.get::<_, String>(0)
            })
            .map_err(self.err("read changed items"))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err("read changed items"))?;
        bodies
            .iter()
            .map(|body| {
                serde_json::from_str::<caremesh_sync::Item>(body)
                    .map(|item| item.source_id)
                    .map_err(|e| crate::StorageError::DamagedRow {
                        path: self.path.clone(),
                        doc: format!("items of {publisher} about a patient"),
                        what: e.to_string(),
                    })
            })
            .collect()
    }

    /// Records what a delivery came to. A success forgets the events it carried, makes the
    /// subscription active and sets its next heartbeat; a failure counts, marks it `error`
    /// and sets its retry. A subscription ended meanwhile stays ended.
    pub fn record_delivery(
        &mut self,
        id: &str,
        delivered: &Delivered,
        heartbeat_due_at_ms: Option<i64>,
    ) -> Result<()> {
        self.open_pending_group()?;
        let path = self.path.clone();
        let fail = |e| crate::StorageError::database(path.clone(), "record a delivery", e);
        let tx = self.conn.savepoint().map_err(fail)?;
        match delivered {
            Delivered::Through {
                event_number,
                at_ms,
            } => {
                tx.execute(
                    "DELETE FROM api_subscription_events WHERE subscription_id = ?1 \
                     AND event_number <= ?2",
                    params![id, *event_number as i64],
                )
                .map_err(fail)?;
                tx.execute(
                    "UPDATE api_subscriptions SET status = 'active', error = NULL, \
                     failures = 0, last_sent_at_ms = ?2, due_at_ms = ?3 \
                     WHERE id = ?1 AND status != 'off'",
                    params![id, at_ms, heartbeat_due_at_ms.unwrap_or(i64::MAX)],
                )
                .map_err(fail)?;
            }
            Delivered::Failed {
                reason,
                retry_at_ms,
            } => {
                tx.execute(
                    "UPDATE api_subscriptions SET status = CASE status WHEN 'requested' \
                     THEN 'requested' ELSE 'error' END, error = ?2, failures = failures + 1, \
                     due_at_ms = ?3 WHERE id = ?1 AND status != 'off'",
                    params![id, reason, retry_at_ms],
                )
                .map_err(fail)?;
            }
        }
        tx.commit().map_err(fail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api_access::ApiClient;

    fn subscription(id: &str) -> Subscription {
        Subscription {
            id: id.into(),
            client_id: "app".into(),
            scopes: "system/*.rs".into(),
            user: None,
            token_nhs: None,
            purpose: "direct care".into(),
            nhs: Some("9912003888".into()),
            base_url: "http://localhost/fhir".into(),
            endpoint: "http://127.0.0.1:9/hook".into(),
            headers: vec!["Authorization: Bearer x".into()],
            payload: PayloadContent::IdOnly,
            heartbeat_seconds: Some(60),
            status: SubscriptionStatus::Requested,
            error: None,
            created_at_ms: 1_000,
            ends_at_ms: None,
            cursor: 7,
            events: 0,
            failures: 0,
            due_at_ms: 1_000,
            last_sent_at_ms: None,
        }
    }

    fn store_with_client() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("node.db")).unwrap();
        store
            .register_api_client(&ApiClient {
                client_id: "app".into(),
                public_key: None,
                scopes: "system/*.rs".into(),
                added_at: 1,
                added_by: "operator".into(),
                notify_origins: vec!["https://ehr.example".into()],
            })
            .unwrap();
        (dir, store)
    }

    fn event(nhs: &str) -> NewEvent {
        NewEvent {
            at_ms: 2_000,
            nhs: nhs.into(),
            publisher: "A81001".into(),
            section: "problems".into(),
            after_seq: 7,
        }
    }

    #[test]
    fn events_are_numbered_in_order_and_forgotten_only_once_delivered() {
        let (_dir, mut store) = store_with_client();
        assert!(store.add_subscription(&subscription("s1")).unwrap());
        assert_eq!(store.subscription("s1").unwrap(), Some(subscription("s1")));

        store
            .file_subscription_events("s1", 9, &[event("9912003888"), event("9912003888")])
            .unwrap();
        // The same feed positions again (a pass that read before the first was filed).
        store
            .file_subscription_events("s1", 9, &[event("9912003888")])
            .unwrap();
        store
            .file_subscription_events("s1", 12, &[event("9912003888")])
            .unwrap();
        let held = store.subscription("s1").unwrap().unwrap();
        assert_eq!((held.events, held.cursor), (3, 12));
        let waiting = store.waiting_events("s1", 10).unwrap();
        assert_eq!(
            waiting.iter().map(|e| e.event_number).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(waiting[0].after_seq, Some(7), "kept as filed");

        store
            .record_delivery(
                "s1",
                &Delivered::Failed {
                    reason: "connection refused".into(),
                    retry_at_ms: 5_000,
                },
                None,
            )
            .unwrap();
        let held = store.subscription("s1").unwrap().unwrap();
        assert_eq!(
            held.status,
            SubscriptionStatus::Requested,
            "no handshake yet"
        );
        assert_eq!((held.failures, held.due_at_ms), (1, 5_000));
        assert_eq!(store.waiting_events("s1", 10).unwrap().len(), 3, "kept");

        store
            .record_delivery(
                "s1",
                &Delivered::Through {
                    event_number: 2,
                    at_ms: 6_000,
                },
                Some(66_000),
            )
            .unwrap();
        let held = store.subscription("s1").unwrap().unwrap();
        assert_eq!(held.status, SubscriptionStatus::Active);
        assert_eq!((held.failures, held.due_at_ms), (0, 66_000));
        assert_eq!(held.last_sent_at_ms, Some(6_000));
        assert_eq!(
            store.waiting_events("s1", 10).unwrap()[0].event_number,
            3,
            "only what was delivered is forgotten"
        );

        assert!(store.end_subscription("s1", None).unwrap());
        assert!(!store.end_subscription("s1", None).unwrap());
        assert!(store.waiting_events("s1", 10).unwrap().is_empty());
        assert!(store.live_subscriptions().unwrap().is_empty());
        store
            .file_subscription_events("s1", 20, &[event("9912003888")])
            .unwrap();
        assert!(store.waiting_events("s1", 10).unwrap().is_empty(), "ended");
    }

    #[test]
    fn a_subscription_goes_with_its_client() {
        let (_dir, mut store) = store_with_client();
        assert!(store.add_subscription(&subscription("s1")).unwrap());
        store
            .file_subscription_events("s1", 9, &[event("9912003888")])
            .unwrap();
        store.remove_api_client("app").unwrap();
        assert_eq!(store.subscription("s1").unwrap(), None);
        assert!(store.waiting_events("s1", 10).unwrap().is_empty());
        let mut orphan = subscription("s2");
        orphan.client_id = "nobody".into();
        assert!(store.add_subscription(&orphan).is_err());
    }
}
