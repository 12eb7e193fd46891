//! Who may read over the FHIR API: registered clients and the access tokens issued to them.
//!
//! A client is registered by an operator (`caremesh api-client add`) with the scopes it may
//! be granted and, for SMART Backend Services, the public key its signed client assertions
//! are checked with. A token is issued at `POST /oauth/token` or by `caremesh api-token`;
//! the client holds the secret, the node keeps only its SHA-256, as for launch sessions.
//! Removing a client ends its tokens with it.

use crate::{Result, Store};
use rusqlite::{OptionalExtension, params};

/// A registered API client.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ApiClient {
    pub client_id: String,
    /// The public key (a JWK, as JSON) its client assertions are signed with; `None` for a
    /// client that gets tokens only from the operator's `caremesh api-token`.
    pub public_key: Option<String>,
    /// The SMART scopes it may be granted, space-separated.
    pub scopes: String,
    pub added_at: i64,
    /// Who registered it (the operator's account, or `api-token`).
    pub added_by: String,
    /// The origins (`scheme://host[:port]`) its change notifications may be posted to; none,
    /// and it may not subscribe. The view decides what an origin is and compares them.
    pub notify_origins: Vec<String>,
}

/// An access token in force: for one client, optionally acting for one user, optionally for
/// one patient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiToken {
    pub client_id: String,
    /// The scopes granted, space-separated.
    pub scopes: String,
    /// The user the client acts for, with their name and role; `None` for system access.
    pub user: Option<ApiUser>,
    /// The one patient the token is for, if it is limited to one.
    pub nhs: Option<String>,
    pub purpose: String,
    pub issued_at: i64,
    pub expires_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiUser {
    pub id: String,
    pub name: String,
    pub role: String,
}

/// What registering a client did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientRegistered {
    Added,
    /// A client of that id was registered: its key and scopes are replaced, its tokens end.
    Replaced,
}

const CLIENT_COLUMNS: &str = "client_id, public_key, scopes, added_at, added_by, notify_origins";

fn row_to_client(row: &rusqlite::Row<'_>) -> rusqlite::Result<ApiClient> {
    Ok(ApiClient {
        client_id: row.get(0)?,
        public_key: row.get(1)?,
        scopes: row.get(2)?,
        added_at: row.get(3)?,
        added_by: row.get(4)?,
        notify_origins: origins_from_column(&row.get::<_, String>(5)?),
    })
}

/// Origins are kept space-separated: an origin has no spaces.
fn origins_column(origins: &[String]) -> String {
    assert!(
        origins
            .iter()
            .all(|o| !o.is_empty() && !o.contains(char::is_whitespace)),
        "an origin is one word"
    );
    origins.join(" ")
}

fn origins_from_column(column: &str) -> Vec<String> {
    column.split_whitespace().map(str::to_string).collect()
}

impl Store {
    /// Registers `client`, replacing one of the same id. A replaced client's tokens end:
    /// they were granted under the key and scopes it had.
    pub fn register_api_client(&self, client: &ApiClient) -> Result<ClientRegistered> {
        self.open_pending_group()?;
        assert!(!client.client_id.is_empty(), "a client needs an id");
        let replaced = self.remove_api_client(&client.client_id)?;
        self.conn
            .prepare_cached(&format!(
                "INSERT INTO api_clients ({CLIENT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
            ))
            .and_then(|mut statement| {
                statement.execute(params![
                    client.client_id,
                    client.public_key,
                    client.scopes,
                    client.added_at,
                    client.added_by,
                    origins_column(&client.notify_origins)
                ])
            })
            .map_err(self.err("register an API client"))?;
        Ok(if replaced {
            ClientRegistered::Replaced
        } else {
            ClientRegistered::Added
        })
    }

    /// Removes a client and ends its tokens and subscriptions. False if no client had that id.
    pub fn remove_api_client(&self, client_id: &str) -> Result<bool> {
        self.open_pending_group()?;
        // The foreign key cascades too; said here so that it does not rest on the pragma.
        self.conn
            .prepare_cached("DELETE FROM api_tokens WHERE client_id = ?1")
            .and_then(|mut statement| statement.execute([client_id]))
            .map_err(self.err("end an API client's tokens"))?;
        for table in [
            "DELETE FROM api_subscription_events WHERE subscription_id IN \
             (SELECT id FROM api_subscriptions WHERE client_id = ?1)",
            "DELETE FROM api_subscriptions WHERE client_id = ?1",
        ] {
            self.conn
                .prepare_cached(table)
                .and_then(|mut statement| statement.execute([client_id]))
                .map_err(self.err("end an API client's subscriptions"))?;
        }
        let removed = self
            .conn
            .prepare_cached("DELETE FROM api_clients WHERE client_id = ?1")
            .and_then(|mut statement| statement.execute([client_id]))
            .map_err(self.err("remove an API client"))?;
        Ok(removed == 1)
    }

    /// Replaces the origins a client's notifications may be posted to, leaving its key,
    /// scopes and tokens as they are. False if no client had that id. Ending the
    /// subscriptions to origins no longer allowed is the caller's, which knows what an
    /// origin is.
    pub fn set_api_client_notify_origins(
        &self,
        client_id: &str,
        origins: &[String],
    ) -> Result<bool> {
        self.open_pending_group()?;
        let changed = self
            .conn
            .prepare_cached("UPDATE api_clients SET notify_origins = ?2 WHERE client_id = ?1")
            .and_then(|mut statement| {
                statement.execute(params![client_id, origins_column(origins)])
            })
            .map_err(self.err("set an API client's notification origins"))?;
        Ok(changed == 1)
    }

    pub fn api_client(&self, client_id: &str) -> Result<Option<ApiClient>> {
        self.conn
            .prepare_cached(&format!(
                "SELECT {CLIENT_COLUMNS} FROM api_clients WHERE client_id = ?1"
            ))
            .and_then(|mut statement| statement.query_row([client_id], row_to_client).optional())
            .map_err(self.err("read an API client"))
    }

    /// Every registered client, by id.
    pub fn api_clients(&self) -> Result<Vec<ApiClient>> {
        let mut statement = self
            .conn
            .prepare_cached(&format!(
                "SELECT {CLIENT_COLUMNS} FROM api_clients ORDER BY client_id"
            ))
            .map_err(self.err("read API clients"))?;
        let rows = statement
            .query_map([], row_to_client)
            .map_err(self.err("read API clients"))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err("read API clients"))
    }

    /// Keeps a token under the hash of its secret, and forgets tokens that have expired.
    /// The client must be registered.
    pub fn issue_api_token(&self, secret_hash: &[u8; 32], token: &ApiToken) -> Result<()> {
        self.open_pending_group()?;
        assert!(token.expires_at > token.issued_at);
        let user = token.user.as_ref();
        self.conn
            .prepare_cached(
                "INSERT INTO api_tokens (secret_hash, client_id, scopes, user_id, user_name, \
                 role, nhs, purpose, issued_at, expires_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )
            .and_then(|mut statement| {
                statement.execute(params![
                    &secret_hash[..],
                    token.client_id,
                    token.scopes,
                    user.map(|u| &u.id),
                    user.map(|u| &u.name),
                    user.map(|u| &u.role),
                    token.nhs,
                    token.purpose,
                    token.issued_at,
                    token.expires_at
                ])
            })
            .map_err(self.err("issue an API token"))?;
        self.conn
            .prepare_cached("DELETE FROM api_tokens WHERE expires_at < ?1")
            .and_then(|mut statement| statement.execute([token.issued_at]))
            .map_err(self.err("forget expired API tokens"))?;
        Ok(())
    }

    /// The token whose secret hashes to `secret_hash`, if it is in force at `now` and its
    /// client is still registered.
    pub fn api_token(&self, secret_hash: &[u8; 32], now: i64) -> Result<Option<ApiToken>> {
        self.conn
            .prepare_cached(
                "SELECT t.client_id, t.scopes, t.user_id, t.user_name, t.role, t.nhs, \
                 t.purpose, t.issued_at, t.expires_at FROM api_tokens t \
                 JOIN api_clients c ON c.client_id = t.client_id \
                 WHERE t.secret_hash = ?1 AND t.issued_at <= ?2 AND t.expires_at > ?2",
            )
            .and_then(|mut statement| {
                statement
                    .query_row(params![&secret_hash[..], now], |row| {
                        let user = match (
                            row.get::<_, Option<String>>(2)?,
                            row.get::<_, Option<String>>(3)?,
                            row.get::<_, Option<String>>(4)?,
                        ) {
                            (Some(id), Some(name), Some(role)) => Some(ApiUser { id, name, role }),
                            _ => None,
                        };
                        Ok(ApiToken {
                            client_id: row.get(0)?,
                            scopes: row.get(1)?,
                            user,
                            nhs: row.get(5)?,
                            purpose: row.get(6)?,
                            issued_at: row.get(7)?,
                            expires_at: row.get(8)?,
                        })
                    })
                    .optional()
            })
            .map_err(self.err("read an API token"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(id: &str, scopes: &str) -> ApiClient {
        ApiClient {
            client_id: id.into(),
            public_key: None,
            scopes: scopes.into(),
            added_at: 1_000,
            added_by: "operator".into(),
            notify_origins: Vec::new(),
        }
    }

    fn token(client_id: &str, issued_at: i64, expires_at: i64) -> ApiToken {
        ApiToken {
            client_id: client_id.into(),
            scopes: "system/*.rs".into(),
            user: Some(ApiUser {
                id: "u1".into(),
                name: "Dr A".into(),
                role: "clinician".into(),
            }),
            nhs: Some("9912003888".into()),
            purpose: "direct care".into(),
            issued_at,
            expires_at,
        }
    }

    #[test]
    fn a_token_is_in_force_until_it_expires_and_ends_with_its_client() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("node.db")).unwrap();
        assert_eq!(
            store
                .register_api_client(&client("app", "system/*.rs"))
                .unwrap(),
            ClientRegistered::Added
        );
        store
            .issue_api_token(&[1; 32], &token("app", 1_000, 1_300))
            .unwrap();
        assert_eq!(
            store.api_token(&[1; 32], 1_100).unwrap(),
            Some(token("app", 1_000, 1_300))
        );
        assert_eq!(store.api_token(&[2; 32], 1_100).unwrap(), None, "unknown");
        assert_eq!(store.api_token(&[1; 32], 1_300).unwrap(), None, "expired");
        assert_eq!(store.api_token(&[1; 32], 999).unwrap(), None, "not yet");

        // Registering the client again (a new key, other scopes) ends what it was given.
        assert_eq!(
            store
                .register_api_client(&client("app", "system/Condition.rs"))
                .unwrap(),
            ClientRegistered::Replaced
        );
        assert_eq!(store.api_token(&[1; 32], 1_100).unwrap(), None);
        store
            .issue_api_token(&[3; 32], &token("app", 1_000, 1_300))
            .unwrap();
        assert!(store.remove_api_client("app").unwrap());
        assert_eq!(store.api_token(&[3; 32], 1_100).unwrap(), None);
        assert!(!store.remove_api_client("app").unwrap());
        assert!(store.api_clients().unwrap().is_empty());
    }

    #[test]
    fn a_clients_notification_origins_change_without_ending_its_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("node.db")).unwrap();
        store
            .register_api_client(&client("app", "system/*.rs"))
            .unwrap();
        store
            .issue_api_token(&[1; 32], &token("app", 1_000, 1_300))
            .unwrap();
        let origins = vec![
            "https://ward.example.nhs.uk".to_string(),
            "http://127.0.0.1:9999".to_string(),
        ];
        assert!(
            store
                .set_api_client_notify_origins("app", &origins)
                .unwrap()
        );
        assert_eq!(
            store.api_client("app").unwrap().unwrap().notify_origins,
            origins
        );
        assert!(store.api_token(&[1; 32], 1_100).unwrap().is_some());
        assert!(store.set_api_client_notify_origins("app", &[]).unwrap());
        assert!(
            store
                .api_client("app")
                .unwrap()
                .unwrap()
                .notify_origins
                .is_empty()
        );
        assert!(
            !store
                .set_api_client_notify_origins("nobody", &origins)
                .unwrap()
        );
    }

    #[test]
    fn a_token_for_a_client_not_registered_is_refused_by_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("node.db")).unwrap();
        assert!(
            store
                .issue_api_token(&[1; 32], &token("nobody", 1_000, 1_300))
                .is_err()
        );
    }
}
