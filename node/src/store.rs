//! What a node keeps across runs: its private key in `<data dir>/identity.key` (one file, mode
//! 0600, created exclusively: see [`crate::private_files`]), and in one sled database under
//! `<data dir>/store` the PeerId that key belongs to (tree `meta`) and the peer store (tree
//! `peers`).
//!
//! Crash safety: sled is log-structured and recovers to its last flushed state after `kill -9`;
//! the writer thread flushes after every batch. A store that sled reports as corrupt is set aside
//! (renamed, never deleted) and a fresh one started, loudly; any other failure to open it (no
//! space, no permission, a lock) stops the start with the reason, leaving the store as it is.
//! The node never starts as a different peer by accident: a store whose PeerId does not match
//! the key file, or a missing key file beside a store that names a PeerId, stops the start.
//!
//! Stores written before the key moved out of sled held it in `meta` under `identity`; opening one
//! writes the key file from it (if missing) and removes it from the store.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use libp2p::{PeerId, identity::Keypair};

use crate::error::UserError;
use crate::peer_record::{PeerRecord, PeerWrite, unix_now};

const STORE_DIR: &str = "store";
const IDENTITY_FILE: &str = "identity.key";
/// Where stores written before the key file was the only copy kept the key itself.
const LEGACY_IDENTITY_KEY: &[u8] = b"identity";
/// The PeerId of the key this store belongs to.
const PEER_ID_KEY: &[u8] = b"peer_id";
const PEERS_TREE: &str = "peers";
const META_TREE: &str = "meta";

/// An opened store and what opening it found.
pub struct Store {
    db: sled::Db,
    peers: sled::Tree,
    /// Set when the previous store was corrupt and was moved here.
    pub set_aside: Option<PathBuf>,
    /// Set when the data dir was open to other users and has been closed.
    pub dir_warning: Option<String>,
    pub keypair: Keypair,
    /// Whether the identity was created by this start.
    pub new_identity: bool,
}

impl Store {
    /// Opens (or creates) the store in `data_dir`, recovering from a broken store as the module
    /// docs describe.
    pub fn open(data_dir: &Path) -> Result<Self, UserError> {
        let dir_warning = crate::private_files::prepare_data_dir(data_dir)?;
        if let Some(warning) = &dir_warning {
            tracing::warn!("{warning}");
            eprintln!("warning: {warning}");
        }
        probe_writable(data_dir)?;
        let store_path = data_dir.join(STORE_DIR);
        let (db, set_aside) = match open_db(&store_path) {
            Ok(db) => (db, None),
            Err(OpenError::Locked) => {
                return Err(UserError::bad_input(format!(
                    "another warren node is already using data dir {}: stop it, or start this one with --data-dir OTHER_DIR",
                    data_dir.display()
                )));
            }
            Err(OpenError::Failed(reason)) => {
                return Err(UserError::operation(format!(
                    "cannot open the store {} ({reason}); it was left as it is",
                    store_path.display()
                )));
            }
            Err(OpenError::Corrupt(reason)) => {
                let aside = data_dir.join(format!("{STORE_DIR}.broken-{}", unix_now()));
                std::fs::rename(&store_path, &aside).map_err(|e| {
                    UserError::operation(format!(
                        "the store {} cannot be opened ({reason}) and cannot be moved aside ({e}); move it away by hand",
                        store_path.display()
                    ))
                })?;
                tracing::error!(
                    store = %store_path.display(), kept = %aside.display(), %reason,
                    "the store is corrupt; it was kept aside and a fresh one started: the peers it knew are forgotten"
                );
                eprintln!(
                    "warning: the store {} is corrupt ({reason}); it was moved to {} and a fresh one started",
                    store_path.display(),
                    aside.display()
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
        Ok(Self { db, peers, set_aside, dir_warning, keypair, new_identity })
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
        if !bad.is_empty() {
            for key in bad {
                let _ = self.peers.remove(key);
            }
            let _ = self.db.flush();
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
    /// Sled found its files damaged: the only case where the store is set aside.
    Corrupt(String),
    /// Anything else (no space, no permission, an unsupported format): the store is left alone.
    Failed(String),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Locked => f.write_str("locked by another process"),
            OpenError::Corrupt(reason) | OpenError::Failed(reason) => f.write_str(reason),
        }
    }
}

fn open_db(path: &Path) -> Result<sled::Db, OpenError> {
    let opened = sled::Config::new()
        .path(path)
        // Every write flushes by itself (the peer-store writer after each batch, forwarding
        // after each change, opening after the identity), so sled's own flusher thread, which
        // woke twice a second, had nothing to add. Those wake-ups cost more than they seem: in
        // `simulations/dht-scale` (500 nodes in one process, 1,000 threads) thread switches and
        // crossbeam's epoch scans over every thread were about a quarter of a profile, and
        // without the flushers a node at rest costs 0.67 CPU-ms per second instead of 0.9–1.5.
        .flush_every_ms(None)
        .cache_capacity(16 * 1024 * 1024)
        .open();
    opened.map_err(|e| match &e {
        sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains("lock") => {
            OpenError::Locked
        }
        sled::Error::Corruption { .. } => OpenError::Corrupt(e.to_string()),
        // Sled reads a damaged log as data that ends early or makes no sense.
        sled::Error::Io(io) if matches!(io.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData) => {
            OpenError::Corrupt(e.to_string())
        }
        // Sled's answer to a `conf` file that is not text. Warren stores were always written by
        // sled 0.34, so here it means the file was damaged, not that it is from an older sled.
        sled::Error::Unsupported(why) if why.contains("earlier than 0.29") => OpenError::Corrupt(e.to_string()),
        other => OpenError::Failed(other.to_string()),
    })
}

/// Checks the data dir takes writes (permission bits do not stop root, so it writes).
fn probe_writable(dir: &Path) -> Result<(), UserError> {
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
    let decode = |bytes: &[u8], what: &str| {
        Keypair::from_protobuf_encoding(bytes).map_err(|e| {
            UserError::operation(format!(
                "{what} is unreadable ({e}); restore {} from a backup, or remove it and the store to start as a new peer",
                file.display()
            ))
        })
    };
    let from_file = match crate::private_files::read_private(&file)? {
        Some(bytes) => Some(decode(&bytes, &format!("identity file {}", file.display()))?),
        None => None,
    };
    let legacy = match meta.get(LEGACY_IDENTITY_KEY).map_err(storage_error)? {
        Some(bytes) => Some(decode(&bytes, "the key kept in the store by an older warren")?),
        None => None,
    };
    let recorded = match meta.get(PEER_ID_KEY).map_err(storage_error)? {
        Some(bytes) => Some(PeerId::from_bytes(&bytes).map_err(|e| {
            UserError::operation(format!("the store's PeerId is unreadable ({e}); remove {} to start afresh", data_dir.join(STORE_DIR).display()))
        })?),
        None => None,
    };
    let (keypair, new) = match (from_file, legacy) {
        (Some(filed), Some(stored)) if stored.public() != filed.public() => {
            return Err(UserError::operation(format!(
                "the identity in the store ({}) differs from {} ({}); keep the one you want and remove the other",
                stored.public().to_peer_id(),
                file.display(),
                filed.public().to_peer_id()
            )));
        }
        (Some(filed), _) => (filed, false),
        (None, Some(stored)) => {
            write_key_file(&file, &stored)?;
            (stored, false)
        }
        (None, None) => {
            if let Some(peer) = recorded {
                return Err(UserError::operation(format!(
                    "{} is missing, and the store belongs to peer {peer}: restore the file from a backup, \
                     or remove {} to start as a new peer",
                    file.display(),
                    data_dir.join(STORE_DIR).display()
                )));
            }
            if let Some(aside) = set_aside {
                return Err(UserError::operation(format!(
                    "the store was broken (kept at {}) and there is no {IDENTITY_FILE} to recover the identity from; \
                     refusing to start as a different peer: remove {} to start with a new identity",
                    aside.display(),
                    aside.display()
                )));
            }
            let generated = Keypair::generate_ed25519();
            write_key_file(&file, &generated)?;
            (generated, true)
        }
    };
    let peer = keypair.public().to_peer_id();
    if let Some(recorded) = recorded.filter(|recorded| *recorded != peer) {
        return Err(UserError::operation(format!(
            "{} holds the key of peer {peer}, but the store belongs to peer {recorded}: \
             put that peer's key file back, or remove {} to use this key with a fresh store",
            file.display(),
            data_dir.join(STORE_DIR).display()
        )));
    }
    meta.insert(PEER_ID_KEY, peer.to_bytes()).map_err(storage_error)?;
    meta.remove(LEGACY_IDENTITY_KEY).map_err(storage_error)?;
    Ok((keypair, new))
}

fn write_key_file(file: &Path, keypair: &Keypair) -> Result<(), UserError> {
    let encoded = keypair.to_protobuf_encoding().expect("ed25519 keys encode");
    crate::private_files::create_private(file, &encoded)
        .map_err(|e| UserError::operation(format!("cannot write identity file {}: {e}", file.display())))
}

fn storage_error(e: sled::Error) -> UserError {
    UserError::operation(format!("store error: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens the store, waiting while a handle this process just dropped still holds its lock
    /// (sled's flusher thread lets go a moment after the last handle).
    fn open(dir: &Path) -> Result<Store, UserError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Store::open(dir) {
                Err(e) if e.message.contains("already using") && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                other => return other,
            }
        }
    }

    #[test]
    fn reopening_keeps_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        let first = open(dir.path()).unwrap();
        assert!(first.new_identity);
        let id = first.peer_id();
        drop(first);
        let second = open(dir.path()).unwrap();
        assert!(!second.new_identity);
        assert_eq!(second.peer_id(), id);
    }

    #[test]
    fn a_broken_store_is_set_aside_and_the_identity_recovered_from_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let id = open(dir.path()).unwrap().peer_id();
        let store = dir.path().join(STORE_DIR);
        // Overwrite sled's files with garbage.
        for entry in std::fs::read_dir(&store).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                std::fs::write(&path, vec![0xA5; 4096]).unwrap();
            }
        }
        let reopened = open(dir.path()).unwrap();
        assert_eq!(reopened.peer_id(), id);
        assert!(reopened.set_aside.as_ref().unwrap().exists());
    }

    #[test]
    fn a_broken_store_without_identity_file_refuses_to_start() {
        let dir = tempfile::tempdir().unwrap();
        open(dir.path()).unwrap();
        std::fs::remove_file(dir.path().join(IDENTITY_FILE)).unwrap();
        let store = dir.path().join(STORE_DIR);
        for entry in std::fs::read_dir(&store).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                std::fs::write(&path, vec![0x5A; 4096]).unwrap();
            }
        }
        let err = open(dir.path()).err().expect("must refuse");
        assert!(err.message.contains("refusing to start"), "{}", err.message);
    }

    #[test]
    fn the_key_lives_only_in_its_file_and_the_store_names_its_peer() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).unwrap();
        let id = store.peer_id();
        assert_eq!(store.db.open_tree(META_TREE).unwrap().get(LEGACY_IDENTITY_KEY).unwrap(), None);
        assert_eq!(store.db.open_tree(META_TREE).unwrap().get(PEER_ID_KEY).unwrap().unwrap().to_vec(), id.to_bytes());
        assert_eq!(std::fs::metadata(dir.path().join(IDENTITY_FILE)).unwrap().mode() & 0o777, 0o600);
        drop(store);

        // The key file gone beside a store that names a peer: refuse rather than become another.
        let key = std::fs::read(dir.path().join(IDENTITY_FILE)).unwrap();
        std::fs::remove_file(dir.path().join(IDENTITY_FILE)).unwrap();
        let err = open(dir.path()).err().expect("must refuse");
        assert!(err.message.contains("is missing") && err.message.contains(&id.to_string()), "{}", err.message);

        // Another peer's key beside it: refuse too.
        let other = Keypair::generate_ed25519().to_protobuf_encoding().unwrap();
        std::fs::write(dir.path().join(IDENTITY_FILE), other).unwrap();
        let err = open(dir.path()).err().expect("must refuse");
        assert!(err.message.contains("belongs to peer"), "{}", err.message);

        std::fs::write(dir.path().join(IDENTITY_FILE), key).unwrap();
        assert_eq!(open(dir.path()).unwrap().peer_id(), id);
    }

    #[test]
    fn a_store_that_kept_the_key_is_migrated_to_the_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let keypair = Keypair::generate_ed25519();
        {
            let db = open_db(&dir.path().join(STORE_DIR)).ok().unwrap();
            let meta = db.open_tree(META_TREE).unwrap();
            meta.insert(LEGACY_IDENTITY_KEY, keypair.to_protobuf_encoding().unwrap()).unwrap();
            db.flush().unwrap();
        }
        let store = open(dir.path()).unwrap();
        assert_eq!(store.peer_id(), keypair.public().to_peer_id());
        assert!(!store.new_identity);
        assert_eq!(store.db.open_tree(META_TREE).unwrap().get(LEGACY_IDENTITY_KEY).unwrap(), None);
        let filed = Keypair::from_protobuf_encoding(&std::fs::read(dir.path().join(IDENTITY_FILE)).unwrap()).unwrap();
        assert_eq!(filed.public(), keypair.public());
    }

    #[test]
    fn a_store_that_cannot_be_opened_for_another_reason_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        open(dir.path()).unwrap();
        let store = dir.path().join(STORE_DIR);
        std::fs::remove_dir_all(&store).unwrap();
        std::fs::write(&store, b"not a directory").unwrap();
        let err = open(dir.path()).err().expect("must refuse");
        assert!(err.message.contains("left as it is"), "{}", err.message);
        assert_eq!(std::fs::read(&store).unwrap(), b"not a directory");
        let entries = std::fs::read_dir(dir.path()).unwrap().filter_map(|e| e.ok());
        assert!(!entries.into_iter().any(|e| e.file_name().to_string_lossy().contains("broken")));
    }

    #[test]
    fn a_second_opener_is_told_the_dir_is_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let _first = open(dir.path()).unwrap();
        let err = Store::open(dir.path()).err().expect("second open must fail");
        assert!(err.message.contains("already using"), "{}", err.message);
    }

    #[test]
    fn written_peers_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).unwrap();
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
