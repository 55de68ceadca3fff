//! Files only the node's owner may touch: the data dir, the identity key in it, and the check
//! that the process behind a control socket is ours.
//!
//! Another local user who can write into the data dir could replace the control socket (and so
//! read every command, or answer them), plant a symlink where the key is about to be written, or
//! read the key. So the data dir must belong to us and be closed to others, the key is created
//! exclusively and never through a symlink, and the CLI talks only to a node run by the same user
//! (or root).

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::error::UserError;

/// Mode of a data dir we create: ours alone.
pub const DATA_DIR_MODE: u32 = 0o700;
/// The owner's permission bits, which closing a dir to others keeps as they are.
const OWNER_BITS: u32 = 0o700;
/// Mode of the identity key file.
pub const KEY_FILE_MODE: u32 = 0o600;
/// Permission bits that let group or others in.
const OPEN_TO_OTHERS: u32 = 0o077;

/// The user this process acts as.
#[allow(unsafe_code)]
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid takes no arguments, cannot fail and touches no memory of ours.
    unsafe { libc::geteuid() }
}

/// Creates the data dir (mode 0700), or checks an existing one: it must be a directory owned by
/// us; one open to group or others is closed to them (the owner's bits are kept, so a read-only
/// dir stays read-only), and the returned warning says so.
pub fn prepare_data_dir(dir: &Path) -> Result<Option<String>, UserError> {
    use std::os::unix::fs::DirBuilderExt;
    let meta = match std::fs::metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new().recursive(true).mode(DATA_DIR_MODE).create(dir).map_err(|e| {
                UserError::bad_input(format!(
                    "cannot create data dir {} ({e}): pass --data-dir with a writable location",
                    dir.display()
                ))
            })?;
            return Ok(None);
        }
        Err(e) => {
            return Err(UserError::bad_input(format!("cannot read data dir {} ({e})", dir.display())));
        }
    };
    if !meta.is_dir() {
        return Err(UserError::bad_input(format!(
            "data dir {} is not a directory: pass --data-dir with a directory path",
            dir.display()
        )));
    }
    let own = effective_uid();
    if meta.uid() != own {
        return Err(UserError::bad_input(format!(
            "data dir {} belongs to user {}, and warren runs as user {own}: another user could replace its files; \
             pass --data-dir with a directory of your own (or chown it)",
            dir.display(),
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & OPEN_TO_OTHERS == 0 {
        return Ok(None);
    }
    let closed = mode & OWNER_BITS;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(closed)).map_err(|e| {
        if e.raw_os_error() == Some(libc::EROFS) {
            UserError::bad_input(format!(
                "data dir {} is not writable ({e}): pass --data-dir with a writable location",
                dir.display()
            ))
        } else {
            UserError::bad_input(format!(
                "data dir {} is open to other users (mode {mode:o}) and cannot be closed ({e}): chmod 700 it",
                dir.display()
            ))
        }
    })?;
    Ok(Some(format!("data dir {} was open to other users (mode {mode:o}); it is now {closed:o}", dir.display())))
}

/// Reads a private file without following a symlink; `None` when there is none. A file owned by
/// another user is refused; one readable by others is closed (mode 0600) with a warning.
pub fn read_private(path: &Path) -> Result<Option<Vec<u8>>, UserError> {
    use std::io::Read;
    let opened = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path);
    let mut file = match opened {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(UserError::operation(format!(
                "{} is a symlink; warren reads its key only from a plain file: replace the link with the file it points to",
                path.display()
            )));
        }
        Err(e) => return Err(UserError::operation(format!("cannot read {}: {e}", path.display()))),
    };
    let meta = file.metadata().map_err(|e| UserError::operation(format!("cannot read {}: {e}", path.display())))?;
    if !meta.is_file() || meta.uid() != effective_uid() {
        return Err(UserError::operation(format!(
            "{} is not a plain file of user {}: remove it, or restore it from a backup",
            path.display(),
            effective_uid()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & OPEN_TO_OTHERS != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(KEY_FILE_MODE))
            .map_err(|e| UserError::operation(format!("cannot restrict {} to mode 600: {e}", path.display())))?;
        tracing::warn!(file = %path.display(), mode = format!("{mode:o}"), "the key file was readable by other users; it is now mode 600");
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(|e| UserError::operation(format!("cannot read {}: {e}", path.display())))?;
    Ok(Some(bytes))
}

/// Creates `path` holding `bytes` (mode 0600), atomically and only if nothing is there yet: the
/// bytes go to a fresh temp file (O_EXCL|O_NOFOLLOW, so a planted symlink makes it fail rather
/// than be followed), reach the disk, and are then hard-linked to `path`, which fails if `path`
/// exists in any form. A crash leaves either no file or the whole one.
pub fn create_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let tmp = path.with_file_name(format!(".{name}.{}.{nanos}.tmp", std::process::id()));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(KEY_FILE_MODE)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::hard_link(&tmp, path)
    })();
    let _ = std::fs::remove_file(&tmp);
    written?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Whether a process of user `uid` is trusted at the other end of the control socket, either way:
/// it runs as us, or as root.
pub fn is_trusted_uid(uid: u32) -> bool {
    uid == effective_uid() || uid == 0
}

/// Checks that the process serving a control socket runs as us (or as root), so the CLI never
/// hands its commands to, or takes answers from, another user's process.
pub fn check_socket_peer(stream: &tokio::net::UnixStream, socket: &Path) -> Result<(), UserError> {
    let own = effective_uid();
    match stream.peer_cred() {
        Ok(cred) if is_trusted_uid(cred.uid()) => Ok(()),
        Ok(cred) => Err(UserError::operation(format!(
            "the control socket {} is served by user {}, not by you (user {own}) or root: refusing to talk to it",
            socket.display(),
            cred.uid()
        ))),
        Err(e) => Err(UserError::operation(format!(
            "cannot tell who serves the control socket {} ({e}): refusing to talk to it",
            socket.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_data_dir_is_closed_and_said() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let warning = prepare_data_dir(dir.path()).unwrap().expect("a warning");
        assert!(warning.contains("777"), "{warning}");
        assert_eq!(std::fs::metadata(dir.path()).unwrap().mode() & 0o777, 0o700);
        assert_eq!(prepare_data_dir(dir.path()).unwrap(), None);
    }

    #[test]
    fn a_file_is_not_a_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"").unwrap();
        assert!(prepare_data_dir(&file).unwrap_err().message.contains("not a directory"));
    }

    #[test]
    fn a_private_file_is_created_once_and_never_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("identity.key");
        create_private(&key, b"secret").unwrap();
        assert_eq!(std::fs::metadata(&key).unwrap().mode() & 0o777, 0o600);
        assert_eq!(create_private(&key, b"other").unwrap_err().kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(read_private(&key).unwrap().unwrap(), b"secret");

        // A symlink where the key should be is neither written through nor read through.
        let target = dir.path().join("elsewhere");
        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(create_private(&link, b"secret").is_err());
        assert!(!target.exists(), "the write followed the symlink");
        std::fs::write(&target, b"planted").unwrap();
        assert!(read_private(&link).unwrap_err().message.contains("symlink"));
        // Nothing is left behind by the failed creation.
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn a_key_file_open_to_others_is_closed() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("identity.key");
        std::fs::write(&key, b"k").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(read_private(&key).unwrap().unwrap(), b"k");
        assert_eq!(std::fs::metadata(&key).unwrap().mode() & 0o777, 0o600);
    }
}
