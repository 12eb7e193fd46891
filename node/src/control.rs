//! One writer per store, also across processes. A running node is the only writer of its
//! store: it holds the home's write lock (`write.lock`) for as long as it runs, and CLI
//! commands that write ([`StoreCommand`]) hand themselves to it over its control socket
//! (`node.sock`, in the home, mode 0600, the node's own account only), which runs them on its
//! store writer, the engine thread. When no node runs, such a command takes the write lock
//! for itself and runs in its own process; a node starting meanwhile waits for it.
//!
//! So the sync engine sees every write as it is made, and never has to poll for writes made
//! elsewhere; two writers never contend for SQLite's lock.

use crate::home::Home;
use crate::network::StoreWriter;
use crate::store_command::{Printed, StoreCommand};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest request the node reads: a command with its file paths.
const MAX_REQUEST_BYTES: u64 = 1024 * 1024;
/// Largest reply the CLI reads: a record or an audit report as printed.
const MAX_REPLY_BYTES: u64 = 256 * 1024 * 1024;
/// How long a request may take to arrive once connected.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the CLI waits for a node that holds the write lock to answer on its socket (it
/// is starting) before saying the node cannot be reached.
const NODE_ANSWER_WAIT: Duration = Duration::from_secs(20);
/// Longest socket path Linux takes (`sun_path` is 108 bytes with its terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

fn lock_path(home: &Home) -> PathBuf {
    home.dir.join("write.lock")
}

pub fn socket_path(home: &Home) -> PathBuf {
    home.dir.join("node.sock")
}

/// The home's write lock, held while the holder writes the store; released when dropped or
/// when the process ends, however it ends.
pub struct WriteLock {
    _file: std::fs::File,
}

/// Who holds the write lock: written into the lock file by its holder.
#[derive(Debug, PartialEq, Eq)]
enum Holder {
    Node(String),
    Command(String),
    Unknown,
}

fn open_lock_file(home: &Home) -> Result<std::fs::File> {
    Ok(crate::home::open_lock_file(&lock_path(home))?)
}

/// Takes the lock if it is free (`wait`: once it is), and says who holds it.
fn take_lock(home: &Home, who: &str, wait: bool) -> Result<Option<WriteLock>> {
    let mut file = open_lock_file(home)?;
    let mode = if wait {
        libc::LOCK_EX
    } else {
        libc::LOCK_EX | libc::LOCK_NB
    };
    // SAFETY: flock on a descriptor this function owns; no memory is shared.
    if unsafe { libc::flock(file.as_raw_fd(), mode) } != 0 {
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Ok(None);
        }
        return Err(error).context("taking the home's write lock");
    }
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{} {who}", std::process::id())?;
    Ok(Some(WriteLock { _file: file }))
}

fn holder(home: &Home) -> Holder {
    let mut text = String::new();
    let read = open_lock_file(home).and_then(|mut f| Ok(f.read_to_string(&mut text)?));
    if read.is_err() {
        return Holder::Unknown;
    }
    let text = text.trim();
    match text.split_once(' ') {
        Some((pid, "node")) => Holder::Node(pid.to_string()),
        Some((pid, _)) => Holder::Command(pid.to_string()),
        None => Holder::Unknown,
    }
}

/// Takes the home's write lock for a running node, for as long as it runs: waits (saying
/// so) while a CLI command writes the store.
pub fn lock_for_node(home: &Home) -> Result<WriteLock> {
    if let Some(lock) = take_lock(home, "node", false)? {
        return Ok(lock);
    }
    tracing::info!("waiting for a caremesh command writing this node's store to finish");
    Ok(take_lock(home, "node", true)?.expect("a waiting lock is taken"))
}

/// What the node sends back for a command.
#[derive(Debug, Serialize, Deserialize)]
struct Reply {
    printed: Printed,
    /// The exit code, or why the command failed (as the CLI would have said it).
    outcome: std::result::Result<u8, String>,
}

/// Runs `command` for the node home `dir`: handed to the node if one runs there, else here.
pub fn execute(dir: &Path, command: StoreCommand) -> Result<ExitCode> {
    let home = Home::open(dir)?;
    let mut waiting_since: Option<Instant> = None;
    let mut said_waiting = false;
    loop {
        if let Some(_lock) = take_lock(&home, "command", false)? {
            return run_here(&home, command);
        }
        if let Ok(stream) = std::os::unix::net::UnixStream::connect(socket_path(&home)) {
            return run_at_node(stream, &command);
        }
        // The lock is held and nothing answers: a node starting, or another command writing.
        let since = *waiting_since.get_or_insert_with(Instant::now);
        match holder(&home) {
            Holder::Node(pid) if since.elapsed() >= NODE_ANSWER_WAIT => bail!(
                "the node running on {} (process {pid}) does not answer on its control socket {}; \
                 nothing was done: look at the node's log, or stop the node and run the command again",
                home.dir.display(),
                socket_path(&home).display()
            ),
            Holder::Command(pid) if !said_waiting => {
                eprintln!(
                    "waiting for another caremesh command (process {pid}) writing this node's store"
                );
                said_waiting = true;
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run_here(home: &Home, command: StoreCommand) -> Result<ExitCode> {
    let mut store = home.open_store()?;
    let mut printed = Printed::default();
    let operator = crate::process::operator();
    let outcome = command.run(home, &mut store, &operator, None, &mut printed);
    show(&printed);
    outcome.map(ExitCode::from)
}

fn run_at_node(
    mut stream: std::os::unix::net::UnixStream,
    command: &StoreCommand,
) -> Result<ExitCode> {
    let lost = "the running node closed its control socket before answering (did it stop?); \
                what it did before stopping stands: see `caremesh status`, and run the command again";
    let mut request = serde_json::to_vec(command)?;
    request.push(b'\n');
    stream.write_all(&request).context(lost)?;
    stream.shutdown(std::net::Shutdown::Write).context(lost)?;
    let mut answer = Vec::new();
    (&mut stream)
        .take(MAX_REPLY_BYTES)
        .read_to_end(&mut answer)
        .context(lost)?;
    if answer.is_empty() {
        bail!(lost);
    }
    let reply: Reply = serde_json::from_slice(&answer)
        .context("the running node's answer could not be read; is it the same caremesh version?")?;
    show(&reply.printed);
    match reply.outcome {
        Ok(code) => Ok(ExitCode::from(code)),
        Err(error) => Err(anyhow::anyhow!(error)),
    }
}

fn show(printed: &Printed) {
    print!("{}", printed.stdout);
    eprint!("{}", printed.stderr);
    let _ = std::io::stdout().flush();
}

/// Serves the control socket until `shutdown`: each connection is one command from this
/// account, run on the store writer. Returns once the socket is removed.
pub async fn serve(
    home: Home,
    writer: StoreWriter,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let path = socket_path(&home);
    let length = path.as_os_str().len();
    if length > MAX_SOCKET_PATH {
        tracing::error!(
            socket = %path.display(),
            length,
            "the control socket's path is too long (Linux takes {MAX_SOCKET_PATH} bytes): caremesh commands that write cannot reach this node while it runs; give the node a shorter home path"
        );
        return;
    }
    // A socket left by a node that was killed: this node holds the home, so it is stale.
    let _ = std::fs::remove_file(&path);
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(socket = %path.display(), %error, "could not open the control socket: caremesh commands that write cannot reach this node while it runs");
            return;
        }
    };
    if let Err(error) = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)) {
        tracing::error!(%error, "could not make the control socket private; closing it");
        let _ = std::fs::remove_file(&path);
        return;
    }
    let home = std::sync::Arc::new(home);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(answer(stream, home.clone(), writer.clone()));
                }
                Err(error) => tracing::warn!(%error, "control socket accept failed"),
            },
            _ = shutdown.changed() => break,
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// Reads one command, runs it on the store writer and sends back what it printed.
async fn answer(
    mut stream: tokio::net::UnixStream,
    home: std::sync::Arc<Home>,
    writer: StoreWriter,
) {
    // The socket file is the owner's alone; the peer's account is checked all the same.
    // SAFETY: geteuid cannot fail and reads no memory.
    let own_uid = unsafe { libc::geteuid() };
    let same_account = stream.peer_cred().is_ok_and(|cred| cred.uid() == own_uid);
    let reply = if !same_account {
        tracing::warn!("refused a control connection from another account");
        Reply {
            printed: Printed::default(),
            outcome: Err("the node takes commands from its own account only".into()),
        }
    } else {
        match read_request(&mut stream).await {
            Ok(command) => run_for_client(command, home, &writer).await,
            Err(error) => Reply {
                printed: Printed::default(),
                outcome: Err(format!("{error:#}")),
            },
        }
    };
    let mut bytes = serde_json::to_vec(&reply).expect("a reply always serialises");
    bytes.push(b'\n');
    let _ = stream.write_all(&bytes).await;
    let _ = stream.shutdown().await;
}

async fn read_request(stream: &mut tokio::net::UnixStream) -> Result<StoreCommand> {
    let mut bytes = Vec::new();
    let mut limited = (&mut *stream).take(MAX_REQUEST_BYTES + 1);
    tokio::time::timeout(REQUEST_TIMEOUT, limited.read_to_end(&mut bytes))
        .await
        .context("the command did not arrive in time")??;
    if bytes.len() as u64 > MAX_REQUEST_BYTES {
        bail!("the command is larger than the {MAX_REQUEST_BYTES} bytes the node reads");
    }
    serde_json::from_slice(&bytes)
        .context("the command could not be read; are the caremesh CLI and the running node the same version?")
}

async fn run_for_client(
    command: StoreCommand,
    home: std::sync::Arc<Home>,
    writer: &StoreWriter,
) -> Reply {
    // Only the node's own account connects: the operator is the account the node runs as.
    let operator = crate::process::operator();
    let name = command.name();
    tracing::info!(
        command = name,
        "running a command the CLI handed to this node"
    );
    let between_commits = Box::new(writer.between_commits());
    let ran = writer
        .write(move |store| {
            let mut printed = Printed::default();
            let outcome = command
                .run(&home, store, &operator, Some(between_commits), &mut printed)
                .map_err(|error| crate::process::error_chain(&error));
            Ok(Reply { printed, outcome })
        })
        .await;
    ran.unwrap_or_else(|error| Reply {
        printed: Printed::default(),
        outcome: Err(format!("{error:#}")),
    })
}
