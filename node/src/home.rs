//! A node home: the folder `caremesh init` makes, holding config, key and database.
//!
//! ```text
//! DIR/caremesh.toml        configuration
//! DIR/keys/signing.key     the organisation's ed25519 secret (hex, mode 0600)
//! DIR/keys/launch.pub      the clinical system's public key for launch tokens (hex)
//! DIR/keys/launch-signing.key  its secret half, made by `init` for demos and tests (0600)
//! DIR/node.db              SQLite database (WAL)
//! DIR/drop/                extracts arriving; `caremesh run` ingests them
//! DIR/processed/           accepted files
//! DIR/quarantine/          rejected files, each with a .reason.txt
//! ```

use caremesh_fhir::SensitiveCodes;
use caremesh_storage::Store;
use caremesh_storage::at_rest::{DataKey, DataKeys, Database};
use caremesh_sync::{OdsCode, OrgKind, PublisherKey};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub const CONFIG_FILE: &str = "caremesh.toml";
pub const KEY_FILE: &str = "keys/signing.key";
pub const PUBLIC_KEY_FILE: &str = "keys/signing.pub";
pub const METRICS_TOKEN_FILE: &str = "keys/metrics.token";
pub use caremesh_view::launch::{
    LAUNCH_PUBLIC_FILE, LAUNCH_SIGNING_FILE, LaunchAlgorithm, LaunchConfig,
};
pub const DATABASE_FILE: &str = "node.db";

/// The SNOMED CT sensitive code set shipped in configs/, used when a config names none.
pub const DEFAULT_SENSITIVE_CODES: &str = include_str!("../../configs/sensitive-codes.toml");

#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    #[error(
        "{0} already holds a caremesh node (found {CONFIG_FILE}); choose another folder or remove it first"
    )]
    AlreadyExists(PathBuf),
    #[error(
        "{0} is not a caremesh node home (no {CONFIG_FILE}); run `caremesh init --dir {0}` first"
    )]
    NotAHome(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid configuration: {message}")]
    Config { path: PathBuf, message: String },
    #[error(
        "{path} is readable by other users (mode {mode:o}); a signing key must be mode 0600: run `chmod 600 {path}`"
    )]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error(
        "{path} is open to other users (mode {mode:o}) and holds patient data; the node will not start until only its owner can use it: run `{fix}`"
    )]
    DataPermissions {
        path: PathBuf,
        mode: u32,
        fix: String,
    },
    #[error(
        "{path} is missing: this node has no signing key. Restore it from the node's backup; a new key (`caremesh init` in a new folder) must be registered with the regional authority before peers accept it"
    )]
    KeyMissing { path: PathBuf },
    #[error(
        "another caremesh node (process {holder}) is running on {path}; one home is one node: stop that one first, or give this one its own home"
    )]
    InUse { path: PathBuf, holder: String },
    #[error("{path} does not hold a 32-byte hex ed25519 key")]
    KeyFormat { path: PathBuf },
    #[error(
        "the database is encrypted with the data key in {path}, which is not there: mount or restore that file (`[storage] data_key_file` in caremesh.toml). Nothing was changed; a node never makes a new database over an encrypted one"
    )]
    DataKeyMissing { path: PathBuf },
    #[error(
        "{path} is readable by other accounts (mode {mode:o}); the data key must be mode 0600: run `chmod 600 {path}`"
    )]
    DataKeyPermissions { path: PathBuf, mode: u32 },
    #[error("{path} does not hold a data key (64 hexadecimal digits)")]
    DataKeyFormat { path: PathBuf },
    #[error(
        "the data key is the systemd credential {name}, but the node was not started with it ($CREDENTIALS_DIRECTORY is not set): start it from its unit, with `LoadCredentialEncrypted={name}:/etc/credstore.encrypted/{name}`"
    )]
    NoCredentials { name: String },
    #[error(
        "the data key file must be outside the node home ({path} is inside {home}), so that the key does not travel with the data: give a path such as /etc/caremesh/data.key"
    )]
    DataKeyInHome { path: PathBuf, home: PathBuf },
    #[error(
        "the folder {folder} for the data key file does not exist: make it, for this account only (`install -d -m 700 {folder}`), and run the command again; nothing was made"
    )]
    DataKeyFolderMissing { folder: PathBuf },
    #[error("the data key's passphrase (salt in {salt}): {reason}")]
    Passphrase { salt: PathBuf, reason: String },
    #[error(
        "that passphrase does not give this home's data key (checked against {salt}); nothing was opened: try again"
    )]
    WrongPassphrase { salt: PathBuf },
    #[error(transparent)]
    Storage(#[from] caremesh_storage::StorageError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HomeError + '_ {
    move |source| HomeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub organisation: OrganisationConfig,
    #[serde(default)]
    pub ingest: IngestConfig,
    #[serde(default)]
    pub view: ViewConfig,
    #[serde(default)]
    pub sync: SyncConfig,
    #[serde(default)]
    pub sharing: SharingConfig,
    #[serde(default)]
    pub launch: LaunchConfig,
    #[serde(default)]
    pub storage: StorageConfig,
}

/// Encryption at rest (see `caremesh_storage::at_rest`): where the data key comes from. With
/// neither, the database is plain text.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// A file outside the home, mode 0600, holding the data key (64 hexadecimal digits).
    pub data_key_file: Option<PathBuf>,
    /// The data key as the systemd credential of this name (`$CREDENTIALS_DIRECTORY/NAME`),
    /// which `systemd-creds encrypt` can bind to the machine's TPM.
    pub data_key_credential: Option<String>,
    /// While a change of key (`caremesh rekey`) is unfinished: the file of the key it
    /// replaces. The node finishes the change when it starts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_data_key_file: Option<PathBuf>,
    /// The same, for a key that was a systemd credential.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_data_key_credential: Option<String>,
    /// The data key derived from a passphrase asked for at the terminal, with its salt and
    /// check in this file of the home (`crate::passphrase`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_key_passphrase: Option<PathBuf>,
    /// The same, for a key that came from a passphrase.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_data_key_passphrase: Option<PathBuf>,
}

/// Where a data key comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeySource {
    /// A file outside the home (absolute, or relative to the home).
    File(PathBuf),
    /// A systemd credential of this name.
    Credential(String),
    /// A passphrase asked for at the terminal, with its salt in this file of the home.
    Passphrase(PathBuf),
}

impl KeySource {
    /// Reads the key (`home_dir` resolves a relative file).
    pub fn read(&self, home_dir: &Path) -> Result<DataKey, HomeError> {
        match self {
            KeySource::Credential(name) => {
                let folder = std::env::var_os("CREDENTIALS_DIRECTORY")
                    .ok_or_else(|| HomeError::NoCredentials { name: name.clone() })?;
                read_data_key(&Path::new(&folder).join(name))
            }
            KeySource::File(path) => read_data_key(&home_dir.join(path)),
            KeySource::Passphrase(salt) => crate::passphrase::data_key(&home_dir.join(salt)),
        }
    }
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::File(path) => write!(formatter, "the key file {}", path.display()),
            KeySource::Credential(name) => write!(formatter, "the systemd credential {name}"),
            KeySource::Passphrase(salt) => {
                write!(formatter, "a passphrase (its salt in {})", salt.display())
            }
        }
    }
}

impl StorageConfig {
    /// Keys from `source` (none for a plaintext home).
    pub fn from_source(source: Option<KeySource>) -> StorageConfig {
        let mut config = StorageConfig::default();
        config.set_source(source);
        config
    }

    /// Where the data key comes from: the systemd credential if named, else the file.
    pub fn source(&self) -> Option<KeySource> {
        joined(
            &self.data_key_file,
            &self.data_key_credential,
            &self.data_key_passphrase,
        )
    }

    /// Where the key a change of key replaces comes from, while one is unfinished.
    pub fn previous_source(&self) -> Option<KeySource> {
        joined(
            &self.previous_data_key_file,
            &self.previous_data_key_credential,
            &self.previous_data_key_passphrase,
        )
    }

    pub fn set_source(&mut self, source: Option<KeySource>) {
        (
            self.data_key_file,
            self.data_key_credential,
            self.data_key_passphrase,
        ) = split(source);
    }

    pub fn set_previous_source(&mut self, source: Option<KeySource>) {
        (
            self.previous_data_key_file,
            self.previous_data_key_credential,
            self.previous_data_key_passphrase,
        ) = split(source);
    }

    /// The data key, from the systemd credential or the key file named (relative paths in
    /// `home_dir`), and while a change of key is unfinished the key it replaces; none when
    /// no key is named. A previous key that cannot be read is passed over with a warning:
    /// the database opens without it once the change has reached it.
    pub fn data_keys(&self, home_dir: &Path) -> Result<Option<DataKeys>, HomeError> {
        let Some(source) = self.source() else {
            return Ok(None);
        };
        let current = Arc::new(source.read(home_dir)?);
        let Some(previous) = self.previous_source() else {
            return Ok(Some(DataKeys::new(current)));
        };
        match previous.read(home_dir) {
            Ok(previous) => Ok(Some(DataKeys::changing(current, Arc::new(previous)))),
            Err(error) => {
                tracing::warn!(%error, "a change of data key is unfinished and the key it replaces cannot be read; going on with the new key alone");
                Ok(Some(DataKeys::new(current)))
            }
        }
    }
}

/// A key source from its three settings: a credential before a file before a passphrase
/// (a configuration caremesh writes names one).
fn joined(
    file: &Option<PathBuf>,
    credential: &Option<String>,
    passphrase: &Option<PathBuf>,
) -> Option<KeySource> {
    match (credential, file, passphrase) {
        (Some(name), _, _) => Some(KeySource::Credential(name.clone())),
        (None, Some(path), _) => Some(KeySource::File(path.clone())),
        (None, None, Some(salt)) => Some(KeySource::Passphrase(salt.clone())),
        (None, None, None) => None,
    }
}

/// The three settings (file, credential, passphrase) that name `source`.
type KeySettings = (Option<PathBuf>, Option<String>, Option<PathBuf>);

fn split(source: Option<KeySource>) -> KeySettings {
    match source {
        Some(KeySource::File(path)) => (Some(path), None, None),
        Some(KeySource::Credential(name)) => (None, Some(name), None),
        Some(KeySource::Passphrase(salt)) => (None, None, Some(salt)),
        None => (None, None, None),
    }
}

/// This organisation's sharing defaults: what holds for a patient until a choice is recorded
/// (from a FHIR Consent in the extract, or `caremesh consent set`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(default)]
#[serde(deny_unknown_fields)]
pub struct SharingConfig {
    /// May data recorded here leave here.
    pub share_out: bool,
    /// May this organisation view what others made shareable.
    pub share_in: bool,
}

impl Default for SharingConfig {
    fn default() -> Self {
        SharingConfig {
            share_out: true,
            share_in: true,
        }
    }
}

impl SharingConfig {
    pub fn defaults(self) -> caremesh_sync::policy::Consent {
        caremesh_sync::policy::Consent {
            share_out: self.share_out,
            share_in: self.share_in,
            objection: false,
        }
    }
}

/// Sync with peers over QUIC. Off until the node has a trust registry and a pinned authority.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// UDP address to accept peers on (hubs, and nodes that accept direct peers).
    pub listen: Option<String>,
    /// Organisations this node dials (by ODS code); their addresses come from the registry.
    pub peers: Vec<OdsCode>,
    /// The signed trust registry; relative paths are inside the node home.
    pub registry: PathBuf,
    /// The regional authority's public key (hex) that the registry must be signed with.
    pub authority: Option<String>,
    /// Diagnostics: append a line per received sync frame (kind, document ids) to this file,
    /// relative to the node home. Holds no NHS numbers or clinical content.
    pub wire_log: Option<PathBuf>,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            listen: None,
            peers: Vec::new(),
            registry: PathBuf::from("trust/registry.json"),
            authority: None,
            wire_log: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrganisationConfig {
    pub ods: OdsCode,
    pub name: String,
    pub kind: OrgKind,
}

/// A week: long enough to find and repair an ingest a crash took back (`caremesh verify`
/// names such files at the next start), short enough that a lost disk gives up little.
pub const DEFAULT_KEEP_PROCESSED_DAYS: u32 = 7;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// The clinical system the extracts come from, recorded as each item's source system.
    pub source_system: String,
    /// "live" for a feed that sends as things happen, "batch" for periodic extracts.
    pub feed: String,
    /// How often a batch feed is expected to refresh; older data is flagged stale.
    pub expected_refresh_hours: u32,
    /// Watched by `caremesh run`; relative paths are inside the node home.
    pub drop_folder: PathBuf,
    /// CSV `identifier_system,identifier_value,nhs_number` for extracts without NHS numbers.
    pub patient_index: Option<PathBuf>,
    /// TOML file with a `codes` list of SNOMED CT codes that make an item sensitive.
    pub sensitive_codes: Option<PathBuf>,
    /// Days a file that went in whole stays in processed/ (raw extracts are patient data in
    /// plain text); 0 removes it straight after its ingest. See `retention.rs`.
    pub keep_processed_days: u32,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            source_system: "unknown".into(),
            feed: "batch".into(),
            expected_refresh_hours: 12,
            drop_folder: PathBuf::from("drop"),
            patient_index: None,
            sensitive_codes: None,
            keep_processed_days: DEFAULT_KEEP_PROCESSED_DAYS,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
#[serde(deny_unknown_fields)]
pub struct ViewConfig {
    /// Address the view listens on. Loopback by default: the view carries patient data.
    pub listen: String,
    /// How long an emergency access (break-glass) lasts before it must be given again.
    pub break_glass_minutes: u32,
    /// A file (mode 0600) holding the bearer token Prometheus presents to scrape `/metrics`;
    /// without it, only an admin session may read them.
    pub metrics_token: Option<PathBuf>,
    /// HTTPS: the view's certificate (PEM, followed by its intermediates). With
    /// `tls_private_key`, the view and the FHIR API are served over HTTPS only.
    pub tls_certificate: Option<PathBuf>,
    /// The certificate's private key (PEM), readable by no account but the node's and its
    /// group. Read again, with the certificate, when either file changes.
    pub tls_private_key: Option<PathBuf>,
    /// Plain HTTP on an address other machines can reach. Refused unless set: only where
    /// something else encrypts the link (a TLS proxy on a private network).
    pub plain_http_beyond_loopback: bool,
}

impl Default for ViewConfig {
    fn default() -> Self {
        ViewConfig {
            listen: "127.0.0.1:7800".into(),
            break_glass_minutes: 60,
            metrics_token: Some(PathBuf::from(METRICS_TOKEN_FILE)),
            tls_certificate: None,
            tls_private_key: None,
            plain_http_beyond_loopback: false,
        }
    }
}

#[derive(Clone)]
pub struct Home {
    pub dir: PathBuf,
    pub config: NodeConfig,
    /// The database with its keys, made at first use and shared by every clone of this
    /// home, so that a change of key reaches every connection the process opens after it.
    database: Arc<Mutex<Option<Database>>>,
}

impl Home {
    /// This organisation's user `user_id` as the viewer of the records it holds, under the
    /// trust registry in force (`None` when sync is not set up: nothing was received, so
    /// nothing another organisation signed is held).
    pub fn viewer(
        &self,
        user_id: &str,
        registry: Option<&caremesh_sync::VerifiedRegistry>,
    ) -> caremesh_view::record::Viewer {
        caremesh_view::record::Viewer {
            ods: self.config.organisation.ods.clone(),
            defaults: self.config.sharing.defaults(),
            user_id: user_id.to_string(),
            revoked_signers: registry
                .map(|r| r.registry().revoked_keys())
                .unwrap_or_default(),
        }
    }

    /// Makes a new node home, its database in plain text. Refuses to touch a folder that
    /// already holds one.
    pub fn init(dir: &Path, organisation: OrganisationConfig) -> Result<Home, HomeError> {
        Home::init_with(dir, organisation, StorageConfig::default())
    }

    /// [`Home::init`] with the database encrypted as `storage` says (its key must be there).
    pub fn init_with(
        dir: &Path,
        organisation: OrganisationConfig,
        storage: StorageConfig,
    ) -> Result<Home, HomeError> {
        if dir.join(CONFIG_FILE).exists() {
            return Err(HomeError::AlreadyExists(dir.to_path_buf()));
        }
        // Patient data lives here: only the node's own account may enter.
        for sub in ["", "keys", "drop", "processed", "quarantine"] {
            private_folder(&dir.join(sub))?;
        }
        let config = NodeConfig {
            organisation,
            ingest: IngestConfig::default(),
            view: ViewConfig::default(),
            sync: SyncConfig::default(),
            sharing: SharingConfig::default(),
            launch: LaunchConfig::default(),
            storage,
        };
        let key = generate_key()?;
        write_secret(&dir.join(KEY_FILE), &hex::encode(key.secret()))?;
        // What Prometheus presents to scrape /metrics (no patient data, but not public).
        let mut token = [0u8; 32];
        getrandom::fill(&mut token).map_err(|e| HomeError::Io {
            path: PathBuf::from("(operating system random source)"),
            source: std::io::Error::other(e.to_string()),
        })?;
        write_secret(&dir.join(METRICS_TOKEN_FILE), &hex::encode(token))?;
        // The public half, for checks that must not need the secret (`caremesh verify`).
        let public_key = dir.join(PUBLIC_KEY_FILE);
        fs::write(&public_key, hex::encode(key.public())).map_err(io(&public_key))?;
        make_private(&public_key)?;
        // Stands in for the clinical system's launch key until the real one is configured.
        let launch = generate_key()?;
        write_secret(
            &dir.join(LAUNCH_SIGNING_FILE),
            &hex::encode(launch.secret()),
        )?;
        let public = dir.join(LAUNCH_PUBLIC_FILE);
        fs::write(&public, hex::encode(launch.public())).map_err(io(&public))?;
        make_private(&public)?;
        let home = Home {
            dir: dir.to_path_buf(),
            config,
            database: Default::default(),
        };
        home.save_config()?;
        home.open_store()?;
        Ok(home)
    }

    pub fn open(dir: &Path) -> Result<Home, HomeError> {
        let path = dir.join(CONFIG_FILE);
        if !path.exists() {
            return Err(HomeError::NotAHome(dir.to_path_buf()));
        }
        let text = fs::read_to_string(&path).map_err(io(&path))?;
        let config = parse_config(&text).map_err(|message| HomeError::Config {
            path: path.clone(),
            message,
        })?;
        Ok(Home {
            dir: dir.to_path_buf(),
            config,
            database: Default::default(),
        })
    }

    pub fn save_config(&self) -> Result<(), HomeError> {
        let path = self.dir.join(CONFIG_FILE);
        let text = toml::to_string_pretty(&self.config).expect("config always serialises");
        let header = "# caremesh node configuration. Paths are relative to this folder.\n\n";
        // Through a hidden file, synced and renamed: a crash leaves the old configuration or
        // the new one, never half of one (a change of key depends on it).
        let partial = self.dir.join(format!(".{CONFIG_FILE}.partial"));
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)
            .map_err(io(&partial))?;
        file.write_all(format!("{header}{text}").as_bytes())
            .map_err(io(&partial))?;
        file.sync_all().map_err(io(&partial))?;
        fs::rename(&partial, &path).map_err(io(&path))?;
        fs::File::open(&self.dir)
            .and_then(|folder| folder.sync_all())
            .map_err(io(&self.dir))?;
        make_private(&path)
    }

    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.dir.join(path)
        }
    }

    pub fn database_path(&self) -> PathBuf {
        self.dir.join(DATABASE_FILE)
    }

    pub fn drop_dir(&self) -> PathBuf {
        self.resolve(&self.config.ingest.drop_folder)
    }

    pub fn processed_dir(&self) -> PathBuf {
        self.dir.join("processed")
    }

    pub fn quarantine_dir(&self) -> PathBuf {
        self.dir.join("quarantine")
    }

    pub fn open_store(&self) -> Result<Store, HomeError> {
        Ok(self.database()?.open()?)
    }

    /// The node's database, with its data keys when `[storage]` names one: read from their
    /// source at first use, then the same for every clone of this home.
    pub fn database(&self) -> Result<Database, HomeError> {
        let mut cached = self
            .database
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(database) = &*cached {
            return Ok(database.clone());
        }
        let database = match self.config.storage.data_keys(&self.dir)? {
            Some(keys) => Database::with_keys(self.database_path(), keys),
            None => Database::plain(self.database_path()),
        };
        *cached = Some(database.clone());
        Ok(database)
    }

    /// Forgets the database made at first use: `[storage]` changed (the home was encrypted,
    /// or restored with its key), so the next use reads the keys afresh.
    pub fn forget_database(&self) {
        *self
            .database
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    /// Whether a node restored or rebuilt here must hold publishing until it has caught up
    /// with its peers (`caremesh_storage::publishing_hold`): only one that syncs (a trust
    /// authority is configured: without one nothing it published ever left it), and not a
    /// hub, which publishes nothing.
    pub fn holds_publishing_when_restored(&self) -> bool {
        self.config.sync.authority.is_some()
            && self.config.organisation.kind != caremesh_sync::OrgKind::Hub
    }

    /// The data keys in force: the current one and, during a change of key, the previous.
    pub fn data_keys(&self) -> Result<Option<DataKeys>, HomeError> {
        Ok(self.database()?.keys())
    }

    /// The data key everything new is written with.
    pub fn data_key(&self) -> Result<Option<Arc<DataKey>>, HomeError> {
        Ok(self.database()?.key())
    }

    pub fn registry_path(&self) -> PathBuf {
        self.resolve(&self.config.sync.registry)
    }

    /// The trust registry in force, if sync is configured (an authority is pinned).
    pub fn trust(
        &self,
    ) -> Result<Option<crate::trust::TrustState>, crate::trust::RegistryLoadError> {
        match &self.config.sync.authority {
            Some(authority) => {
                crate::trust::TrustState::load(&self.registry_path(), authority).map(Some)
            }
            None => Ok(None),
        }
    }

    /// What ingest needs of this node: its organisation and feed, signing key, sharing
    /// rules, sensitive codes, patient index and folders.
    pub fn ingest_settings(&self) -> Result<caremesh_ingest::IngestSettings, HomeError> {
        // Without a registry (sync not set up) nothing is shared: no share-from date applies.
        let agreements = match self.trust() {
            Ok(trust) => trust
                .map(|t| t.current().registry().sharing.clone())
                .unwrap_or_default(),
            Err(error) => {
                tracing::warn!(%error, "trust registry unreadable; share-from dates not applied");
                Default::default()
            }
        };
        let config = &self.config;
        Ok(caremesh_ingest::IngestSettings {
            ods: config.organisation.ods.clone(),
            name: config.organisation.name.clone(),
            kind: config.organisation.kind,
            source_system: config.ingest.source_system.clone(),
            feed: config.ingest.feed.clone(),
            expected_refresh_hours: config.ingest.expected_refresh_hours,
            consent_defaults: config.sharing.defaults(),
            agreements,
            key: self.signing_key()?,
            sensitive: self.sensitive_codes()?,
            patient_index: config
                .ingest
                .patient_index
                .as_ref()
                .map(|p| self.resolve(p)),
            home_dir: self.dir.clone(),
            processed_dir: self.processed_dir(),
            quarantine_dir: self.quarantine_dir(),
            data_key: self.data_keys()?,
        })
    }

    pub fn signing_key(&self) -> Result<PublisherKey, HomeError> {
        load_secret_key(&self.dir.join(KEY_FILE))
    }

    pub fn sensitive_codes(&self) -> Result<SensitiveCodes, HomeError> {
        let (path, text) = match &self.config.ingest.sensitive_codes {
            Some(path) => {
                let path = self.resolve(path);
                let text = fs::read_to_string(&path).map_err(io(&path))?;
                (path, text)
            }
            None => (
                PathBuf::from("(built-in configs/sensitive-codes.toml)"),
                DEFAULT_SENSITIVE_CODES.to_string(),
            ),
        };
        parse_sensitive_codes(&text).map_err(|message| HomeError::Config { path, message })
    }
}

/// Reads a node's configuration. A key it does not know (a misspelt `shareout` would
/// otherwise leave Share Out at its default, sharing against the organisation's intent)
/// and a value out of range are refused, naming the key, the line and what is accepted.
pub fn parse_config(text: &str) -> Result<NodeConfig, String> {
    let config: NodeConfig = toml::from_str(text).map_err(|error| {
        let message = error.to_string();
        match nearest_known_key(&message) {
            Some(suggestion) => format!("{message}did you mean `{suggestion}`?"),
            None => message,
        }
    })?;
    config.check_ranges()?;
    Ok(config)
}

/// For serde's "unknown field `x`, expected one of `a`, `b`": the known key nearest `x`.
fn nearest_known_key(message: &str) -> Option<String> {
    let unknown = message.split("unknown field `").nth(1)?.split('`').next()?;
    let expected = message.split("expected ").nth(1)?;
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|known| (edit_distance(unknown, known), known))
        .filter(|(distance, known)| *distance <= (known.len() / 2).max(2))
        .min()
        .map(|(_, known)| known.to_string())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous + usize::from(ca != *cb);
            previous = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

impl NodeConfig {
    fn check_ranges(&self) -> Result<(), String> {
        let within = |key: &str, value: u32, low: u32, high: u32| {
            if (low..=high).contains(&value) {
                Ok(())
            } else {
                Err(format!(
                    "{key} = {value} is out of range: give {low} to {high}"
                ))
            }
        };
        within(
            "launch.session_minutes",
            self.launch.session_minutes,
            1,
            12 * 60,
        )?;
        within(
            "launch.max_token_minutes",
            self.launch.max_token_minutes,
            1,
            60,
        )?;
        within(
            "view.break_glass_minutes",
            self.view.break_glass_minutes,
            1,
            24 * 60,
        )?;
        within(
            "ingest.expected_refresh_hours",
            self.ingest.expected_refresh_hours,
            1,
            24 * 366,
        )?;
        within(
            "ingest.keep_processed_days",
            self.ingest.keep_processed_days,
            0,
            3660,
        )?;
        if !matches!(self.ingest.feed.as_str(), "live" | "batch") {
            return Err(format!(
                "ingest.feed = {:?} is not a feed caremesh knows: give \"live\" or \"batch\"",
                self.ingest.feed
            ));
        }
        Ok(())
    }
}

pub fn parse_sensitive_codes(text: &str) -> Result<SensitiveCodes, String> {
    #[derive(Deserialize)]
    struct Group {
        codes: Vec<String>,
    }
    #[derive(Deserialize)]
    struct File {
        #[serde(flatten)]
        groups: std::collections::BTreeMap<String, Group>,
    }
    let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
    Ok(SensitiveCodes::new(
        file.groups.into_values().flat_map(|g| g.codes),
    ))
}

fn generate_key() -> Result<PublisherKey, HomeError> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| HomeError::Io {
        path: PathBuf::from("(operating system random source)"),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(PublisherKey::from_secret(secret))
}

/// Writes a secret so that it is never, even briefly, readable by others.
pub fn write_secret(path: &Path, contents: &str) -> Result<(), HomeError> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    file.write_all(contents.as_bytes()).map_err(io(path))?;
    file.sync_all().map_err(io(path))
}

impl Home {
    /// The bearer token that may scrape `/metrics`, if one is configured and present.
    pub fn metrics_token(&self) -> Result<Option<String>, HomeError> {
        let Some(path) = &self.config.view.metrics_token else {
            return Ok(None);
        };
        let path = self.resolve(path);
        if !path.exists() {
            return Ok(None);
        }
        check_private(&path)?;
        let token = fs::read_to_string(&path)
            .map_err(io(&path))?
            .trim()
            .to_string();
        Ok((!token.is_empty()).then_some(token))
    }

    /// This organisation's public signing key: from `keys/signing.pub`, else (homes made
    /// before it was written) derived from the secret key.
    pub fn public_key(&self) -> Result<[u8; 32], HomeError> {
        let path = self.dir.join(PUBLIC_KEY_FILE);
        if path.exists() {
            let text = fs::read_to_string(&path).map_err(io(&path))?;
            return hex::decode(text.trim())
                .ok()
                .and_then(|bytes| bytes.try_into().ok())
                .ok_or(HomeError::KeyFormat { path });
        }
        Ok(self.signing_key()?.public())
    }

    /// Refuses to run on a home whose patient data others can read: the home and its data
    /// folders must be 0700, the database and its WAL 0600.
    pub fn check_private_data(&self) -> Result<(), HomeError> {
        let database = self.database_path();
        let mut wal = database.as_os_str().to_owned();
        wal.push("-wal");
        let folders = [
            self.dir.clone(),
            self.drop_dir(),
            self.processed_dir(),
            self.quarantine_dir(),
        ];
        for folder in folders.iter().filter(|f| f.exists()) {
            let mode = fs::metadata(folder)
                .map_err(io(folder))?
                .permissions()
                .mode()
                & 0o777;
            if mode & 0o077 != 0 {
                return Err(HomeError::DataPermissions {
                    fix: format!("chmod 700 {}", folder.display()),
                    path: folder.clone(),
                    mode,
                });
            }
        }
        for file in [database, PathBuf::from(wal)].iter().filter(|f| f.exists()) {
            let mode = fs::metadata(file).map_err(io(file))?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(HomeError::DataPermissions {
                    fix: format!("chmod 600 {}*", self.database_path().display()),
                    path: file.clone(),
                    mode,
                });
            }
        }
        Ok(())
    }
}

/// The running node's hold on its home: released when the process ends, however it ends.
pub struct RunLock {
    _file: fs::File,
}

impl Home {
    /// Takes the home for one running node. A second `caremesh run` on the same home would
    /// watch the same drop folder and sync with the same key: it is refused, naming the
    /// process that holds the home.
    pub fn lock_for_running(&self) -> Result<RunLock, HomeError> {
        use std::io::{Read, Seek};
        use std::os::fd::AsRawFd;
        let path = self.dir.join("run.lock");
        let mut file = open_lock_file(&path)?;
        // SAFETY: flock on a descriptor this function owns; no memory is shared.
        let taken = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        if !taken {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            return Err(HomeError::InUse {
                path: self.dir.clone(),
                holder: holder.trim().to_string(),
            });
        }
        file.set_len(0).map_err(io(&path))?;
        file.rewind().map_err(io(&path))?;
        file.write_all(format!("{}\n", std::process::id()).as_bytes())
            .map_err(io(&path))?;
        Ok(RunLock { _file: file })
    }
}

/// Opens (making it, mode 0600) a file whose lock says who uses the home; its content names
/// the holder.
pub fn open_lock_file(path: &Path) -> Result<fs::File, HomeError> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io(path))
}

/// Makes a file the node wrote readable by its owner only.
/// Makes the folder `path` (and its parents), only its owner's to enter.
pub fn private_folder(path: &Path) -> Result<(), HomeError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io(path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(io(path))
}

pub fn make_private(path: &Path) -> Result<(), HomeError> {
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io(path))
}

/// Refuses a secret file that others can read.
pub fn check_private(path: &Path) -> Result<(), HomeError> {
    let mode = fs::metadata(path).map_err(io(path))?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(HomeError::KeyPermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Reads a data key file: present, private to its owner, 64 hexadecimal digits.
pub fn read_data_key(path: &Path) -> Result<DataKey, HomeError> {
    let metadata = match fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(HomeError::DataKeyMissing {
                path: path.to_path_buf(),
            });
        }
        Err(error) => return Err(io(path)(error)),
    };
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(HomeError::DataKeyPermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    // A key file is 65 bytes; anything much larger is the wrong file.
    if metadata.len() > 1024 {
        return Err(HomeError::DataKeyFormat {
            path: path.to_path_buf(),
        });
    }
    let text = fs::read_to_string(path).map_err(io(path))?;
    DataKey::from_hex(&text).map_err(|_| HomeError::DataKeyFormat {
        path: path.to_path_buf(),
    })
}

/// For `caremesh init --data-key-file`: the key in `path` if the file exists, else a new
/// random key written there (mode 0600, never over another file). Refuses a path inside
/// the home `home_dir` is to be.
pub fn data_key_for_init(path: &Path, home_dir: &Path) -> Result<(DataKey, bool), HomeError> {
    let home = std::path::absolute(home_dir).map_err(io(home_dir))?;
    let absolute = std::path::absolute(path).map_err(io(path))?;
    if absolute.starts_with(&home) {
        return Err(HomeError::DataKeyInHome {
            path: absolute,
            home,
        });
    }
    if absolute.exists() {
        return Ok((read_data_key(&absolute)?, false));
    }
    if let Some(folder) = absolute.parent()
        && !folder.is_dir()
    {
        return Err(HomeError::DataKeyFolderMissing {
            folder: folder.to_path_buf(),
        });
    }
    let key = DataKey::generate().map_err(|error| HomeError::Io {
        path: absolute.clone(),
        source: std::io::Error::other(error.to_string()),
    })?;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&absolute)
        .map_err(io(&absolute))?;
    writeln!(file, "{}", key.to_hex()).map_err(io(&absolute))?;
    file.sync_all().map_err(io(&absolute))?;
    Ok((key, true))
}

pub fn load_secret_key(path: &Path) -> Result<PublisherKey, HomeError> {
    if !path.exists() {
        return Err(HomeError::KeyMissing {
            path: path.to_path_buf(),
        });
    }
    check_private(path)?;
    let text = fs::read_to_string(path).map_err(io(path))?;
    let bytes = hex::decode(text.trim()).map_err(|_| HomeError::KeyFormat {
        path: path.to_path_buf(),
    })?;
    let secret: [u8; 32] = bytes.try_into().map_err(|_| HomeError::KeyFormat {
        path: path.to_path_buf(),
    })?;
    Ok(PublisherKey::from_secret(secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[organisation]\nods = \"A81001\"\nname = \"Practice\"\nkind = \"gp\"\n";

    /// A misspelt key or section would leave its setting at the default (Share Out on), so
    /// it is refused, naming the key, its line and the nearest key caremesh knows.
    #[test]
    fn unknown_keys_are_refused_with_the_line_and_the_nearest_known_key() {
        let misspelt = format!("{MINIMAL}\n[sharing]\nshareout = false\n");
        let error = parse_config(&misspelt).unwrap_err();
        assert!(error.contains("unknown field `shareout`"), "{error}");
        assert!(error.contains("line 7"), "{error}");
        assert!(error.contains("did you mean `share_out`?"), "{error}");
        let section = format!("{MINIMAL}\n[sharng]\nshare_out = false\n");
        let error = parse_config(&section).unwrap_err();
        assert!(error.contains("did you mean `sharing`?"), "{error}");
        assert!(parse_config(MINIMAL).is_ok());
    }

    #[test]
    fn values_out_of_range_are_refused_with_what_is_accepted() {
        for (setting, expected) in [
            ("[launch]\nmax_token_minutes = 100000", "give 1 to 60"),
            ("[launch]\nsession_minutes = 0", "give 1 to 720"),
            ("[view]\nbreak_glass_minutes = 0", "give 1 to 1440"),
            ("[ingest]\nkeep_processed_days = 100000", "give 0 to 3660"),
            (
                "[ingest]\nfeed = \"streaming\"",
                "give \"live\" or \"batch\"",
            ),
        ] {
            let error = parse_config(&format!("{MINIMAL}\n{setting}\n")).unwrap_err();
            assert!(error.contains(expected), "{setting}: {error}");
        }
    }

    #[test]
    fn the_example_config_parses_with_every_section_it_documents() {
        let config = parse_config(include_str!("../../configs/example-gp.toml")).unwrap();
        assert_eq!(config.organisation.kind, OrgKind::Gp);
        assert_eq!(config.sync.peers.len(), 1);
        assert!(config.sharing.share_out && config.sharing.share_in);
    }

    fn organisation() -> OrganisationConfig {
        OrganisationConfig {
            ods: OdsCode::parse("A81001").unwrap(),
            name: "Test Practice".into(),
            kind: OrgKind::Gp,
        }
    }

    #[test]
    fn init_makes_a_home_with_a_private_key_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::init(dir.path(), organisation()).unwrap();
        let mode = fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        home.signing_key().unwrap();
        assert!(matches!(
            Home::init(dir.path(), organisation()),
            Err(HomeError::AlreadyExists(_))
        ));
        let reopened = Home::open(dir.path()).unwrap();
        assert_eq!(reopened.config.organisation.kind, OrgKind::Gp);
    }

    #[test]
    fn a_key_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::init(dir.path(), organisation()).unwrap();
        let path = dir.path().join(KEY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            home.signing_key(),
            Err(HomeError::KeyPermissions { .. })
        ));
    }

    #[test]
    fn the_shipped_sensitive_code_set_parses_and_is_not_empty() {
        let codes = parse_sensitive_codes(DEFAULT_SENSITIVE_CODES).unwrap();
        assert!(codes.len() >= 10);
    }
}
