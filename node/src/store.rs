//! What a node keeps across runs, in one sled database under `<data dir>/store`:
//! its identity (tree `meta`) and its peer store (tree `peers`).
//!
//! Crash safety: sled is log-structured and recovers to its last flushed state after `kill -9`;
//! the writer thread flushes after every batch. The identity is additionally mirrored to
//! `<data dir>/identity.key` (written atomically, mode 0600) so that a store which cannot be
//! opened can be set aside without ever replacing the identity: when neither copy is readable
//! the node refuses to start.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use libp2p::{PeerId, identity::Keypair};

use crate::error::UserError;
use crate::peer_record::{PeerRecord, PeerWrite, unix_now};

const STORE_DIR: &str = "store";
const IDENTITY_FILE: &str = "identity.key";
const IDENTITY_KEY: &[u8] = b"identity";
const PEERS_TREE: &str = "peers";
const META_TREE: &str = "meta";
/// Flushes sled's write-ahead log at least this often even between our own explicit flushes.
const FLUSH_EVERY_MS: u64 = 500;

/// An opened store and what opening it found.
pub struct Store {
    db: sled::Db,
    peers: sled::Tree,
    /// Set when the previous store could not be opened and was moved here.
    pub set_aside: Option<PathBuf>,
    pub keypair: Keypair,
    /// Whether the identity was created by this start.
    pub new_identity: bool,
}

impl Store {
    /// Opens (or creates) the store in `data_dir`, recovering from a broken store as the module
    /// docs describe.
    pub fn open(data_dir: &Path) -> Result<Self, UserError> {
        prepare_data_dir(data_dir)?;
        let store_path = data_dir.join(STORE_DIR);
        let (db, set_aside) = match open_db(&store_path) {
            Ok(db) => (db, None),
            Err(OpenError::Locked) => {
                return Err(UserError::bad_input(format!(
                    "another warren node is already using data dir {}: stop it, or start this one with --data-dir OTHER_DIR",
                    data_dir.display()
                )));
            }
            Err(OpenError::Broken(reason)) => {
                let aside = data_dir.join(format!("{STORE_DIR}.broken-{}", unix_now()));
                std::fs::rename(&store_path, &aside).map_err(|e| {
                    UserError::operation(format!(
                        "the store {} cannot be opened ({reason}) and cannot be moved aside ({e}); move it away by hand",
                        store_path.display()
                    ))
                })?;
                tracing::error!(
                    store = %store_path.display(), kept = %aside.display(), %reason,
                    "the peer store could not be opened; it was kept aside and a fresh one started"
                );
                let db = open_db(&store_path).map_err(|e| {
                    UserError::operation(format!("cannot create a fresh store at {}: {e}", store_path.display()))
                })?;
                (db, Some(aside))
            }
        };
        let meta = db.open_tree(META_TREE).map_err(storage_error)?;
        let peers = db.open_tree(PEERS_TREE).map_err(storage_error)?;
        let (keypair, new_identity) = load_identity(data_dir, &meta, set_aside.as_deref())?;
        db.flush().map_err(storage_error)?;
        Ok(Self { db, peers, set_aside, keypair, new_identity })
    }

    /// A named tree of the store, for other parts of the node (forwarding keeps its entries here).
    pub fn tree(&self, name: &str) -> Result<sled::Tree, UserError> {
        self.db.open_tree(name).map_err(storage_error)
    }

    pub fn peer_id(&self) -> PeerId {
        self.keypair.public().to_peer_id()
    }

    /// Every stored peer whose record decodes; undecodable records are dropped (and logged).
    pub fn load_peers(&self) -> Vec<(PeerId, PeerRecord)> {
        let mut out = Vec::new();
        let mut bad = Vec::new();
        for entry in self.peers.iter() {
            let Ok((key, value)) = entry else { continue };
            match (PeerId::from_bytes(&key), PeerRecord::decode(&value)) {
                (Ok(peer), Ok(record)) => out.push((peer, record)),
                (peer, record) => {
                    tracing::warn!(?peer, error = ?record.err(), "dropping an unreadable peer record");
                    bad.push(key);
                }
            }
        }
        for key in bad {
            let _ = self.peers.remove(key);
        }
        out
    }

    /// Starts the thread that applies peer-store batches, so the event loop never waits on disk.
    pub fn spawn_writer(&self) -> PeerStoreWriter {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<PeerWrite>>(WRITER_QUEUE);
        let writes = Arc::new(AtomicU64::new(0));
        let tree = self.peers.clone();
        let db = self.db.clone();
        let counter = writes.clone();
        let thread = std::thread::Builder::new()
            .name("warren-store".into())
            .spawn(move || {
                for batch in rx {
                    let mut sled_batch = sled::Batch::default();
                    let count = batch.len() as u64;
                    for write in batch {
                        match write {
                            PeerWrite::Put(peer, record) => sled_batch.insert(peer.to_bytes(), record.encode()),
                            PeerWrite::Delete(peer) => sled_batch.remove(peer.to_bytes()),
                        }
                    }
                    if let Err(e) = tree.apply_batch(sled_batch).and_then(|_| db.flush().map(|_| ())) {
                        tracing::error!(error = %e, "peer store write failed");
                        continue;
                    }
                    counter.fetch_add(count, Ordering::Relaxed);
                }
                let _ = db.flush();
            })
            .expect("spawning the store thread");
        PeerStoreWriter { tx, writes, thread }
    }
}

/// How many batches may wait for the writer before the event loop holds its changes back.
const WRITER_QUEUE: usize = 4;

/// The event loop's side of the writer thread.
pub struct PeerStoreWriter {
    tx: std::sync::mpsc::SyncSender<Vec<PeerWrite>>,
    /// Records written so far (for `status` and for crash tests).
    pub writes: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl PeerStoreWriter {
    /// Hands a batch to the writer; gives it back when the writer is busy, so nothing is lost.
    pub fn try_write(&self, batch: Vec<PeerWrite>) -> Result<(), Vec<PeerWrite>> {
        self.tx.try_send(batch).map_err(|e| match e {
            std::sync::mpsc::TrySendError::Full(b) | std::sync::mpsc::TrySendError::Disconnected(b) => b,
        })
    }

    /// Writes the last changes, waits until they are on disk and stops the writer (on shutdown).
    pub fn finish(self, last: Vec<PeerWrite>) {
        if !last.is_empty() {
            let _ = self.tx.send(last);
        }
        drop(self.tx);
        let _ = self.thread.join();
    }
}

enum OpenError {
    Locked,
    Broken(String),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Locked => f.write_str("locked by another process"),
            OpenError::Broken(reason) => f.write_str(reason),
        }
    }
}

fn open_db(path: &Path) -> Result<sled::Db, OpenError> {
    let opened = sled::Config::new()
        .path(path)
        .flush_every_ms(Some(FLUSH_EVERY_MS))
        .cache_capacity(16 * 1024 * 1024)
        .open();
    opened.map_err(|e| match &e {
        sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains("lock") => {
            OpenError::Locked
        }
        other => OpenError::Broken(other.to_string()),
    })
}

/// Creates the data dir (mode 0700) or checks the existing one is a writable directory.
fn prepare_data_dir(dir: &Path) -> Result<(), UserError> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.exists() && !dir.is_dir() {
        return Err(UserError::bad_input(format!(
            "data dir {} is not a directory: pass --data-dir with a directory path",
            dir.display()
        )));
    }
    if !dir.exists() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| {
            UserError::bad_input(format!(
                "cannot create data dir {} ({e}): pass --data-dir with a writable location",
                dir.display()
            ))
        })?;
    }
    // Permission bits do not stop root, so probe by writing.
    let probe = dir.join(".write-probe");
    std::fs::write(&probe, b"").and_then(|_| std::fs::remove_file(&probe)).map_err(|e| {
        UserError::bad_input(format!(
            "data dir {} is not writable ({e}): fix its permissions or pass --data-dir with a writable location",
            dir.display()
        ))
    })
}

/// The identity rules of the module docs.
fn load_identity(data_dir: &Path, meta: &sled::Tree, set_aside: Option<&Path>) -> Result<(Keypair, bool), UserError> {
    let file = data_dir.join(IDENTITY_FILE);
    let from_file = match std::fs::read(&file) {
        Ok(bytes) => Some(Keypair::from_protobuf_encoding(&bytes).map_err(|e| {
            UserError::operation(format!(
                "identity file {} is unreadable ({e}); restore it from a backup, or remove it and the store to start as a new peer",
                file.display()
            ))
        })?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(UserError::operation(format!("cannot read identity file {}: {e}", file.display()))),
    };
    let from_store = match meta.get(IDENTITY_KEY).map_err(storage_error)? {
        Some(bytes) => Some(Keypair::from_protobuf_encoding(&bytes).map_err(|e| {
            UserError::operation(format!("the identity in the store is unreadable ({e}); restore {} from a backup", file.display()))
        })?),
        None => None,
    };
    let (keypair, new) = match (from_store, from_file) {
        (Some(stored), Some(filed)) if stored.public() != filed.public() => {
            return Err(UserError::operation(format!(
                "the identity in the store ({}) differs from {} ({}); keep the one you want and remove the other",
                stored.public().to_peer_id(),
                file.display(),
                filed.public().to_peer_id()
            )));
        }
        (Some(stored), _) => (stored, false),
        (None, Some(filed)) => (filed, false),
        (None, None) => {
            if let Some(aside) = set_aside {
                return Err(UserError::operation(format!(
                    "the store was broken (kept at {}) and there is no {IDENTITY_FILE} to recover the identity from; \
                     refusing to start as a different peer: remove {} to start with a new identity",
                    aside.display(),
                    aside.display()
                )));
            }
            (Keypair::generate_ed25519(), true)
        }
    };
    let encoded = keypair.to_protobuf_encoding().expect("ed25519 keys encode");
    meta.insert(IDENTITY_KEY, encoded.clone()).map_err(storage_error)?;
    if !file.exists() {
        write_private_file(&file, &encoded)
            .map_err(|e| UserError::operation(format!("cannot write identity file {}: {e}", file.display())))?;
    }
    Ok((keypair, new))
}

/// Writes a file atomically (temp file, fsync, rename) with mode 0600.
fn write_private_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn storage_error(e: sled::Error) -> UserError {
    UserError::operation(format!("store error: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopening_keeps_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path()).unwrap();
        assert!(first.new_identity);
        let id = first.peer_id();
        drop(first);
        let second = Store::open(dir.path()).unwrap();
        assert!(!second.new_identity);
        assert_eq!(second.peer_id(), id);
    }

    #[test]
    fn a_broken_store_is_set_aside_and_the_identity_recovered_from_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let id = Store::open(dir.path()).unwrap().peer_id();
        let store = dir.path().join(STORE_DIR);
        // Overwrite sled's files with garbage.
        for entry in std::fs::read_dir(&store).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                std::fs::write(&path, vec![0xA5; 4096]).unwrap();
            }
        }
        let reopened = Store::open(dir.path()).unwrap();
        assert_eq!(reopened.peer_id(), id);
        assert!(reopened.set_aside.as_ref().unwrap().exists());
    }

    #[test]
    fn a_broken_store_without_identity_file_refuses_to_start() {
        let dir = tempfile::tempdir().unwrap();
        Store::open(dir.path()).unwrap();
        std::fs::remove_file(dir.path().join(IDENTITY_FILE)).unwrap();
        let store = dir.path().join(STORE_DIR);
        for entry in std::fs::read_dir(&store).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                std::fs::write(&path, vec![0x5A; 4096]).unwrap();
            }
        }
        let err = Store::open(dir.path()).err().expect("must refuse");
        assert!(err.message.contains("refusing to start"), "{}", err.message);
    }

    #[test]
    fn a_second_opener_is_told_the_dir_is_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).err().expect("second open must fail");
        assert!(err.message.contains("already using"), "{}", err.message);
    }

    #[test]
    fn written_peers_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let writer = store.spawn_writer();
        let peer = PeerId::random();
        let mut record = PeerRecord::default();
        record.observe_addr("/ip4/192.0.2.1/tcp/4001".parse().unwrap(), 7);
        writer.try_write(vec![PeerWrite::Put(peer, record.clone())]).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while writer.writes.load(Ordering::Relaxed) == 0 {
            assert!(std::time::Instant::now() < deadline, "writer never wrote");
            std::thread::yield_now();
        }
        assert_eq!(store.load_peers(), vec![(peer, record)]);
    }
}
