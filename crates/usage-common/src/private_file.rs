//! Files both servers create that only their own user may read: the databases,
//! which hold billing records and, at the receiver, every install's signing secret.
//!
//! A leaf: plain `std::fs`, nothing of the agent or the receiver.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates an empty file at `path`, mode 0600 whatever the umask, unless one exists (an
/// existing file keeps the mode its operator gave it). For a database: SQLite would
/// create it 0644 less the umask, and it gives the `-wal` and `-shm` files the database
/// file's mode, so those are private too.
pub fn create_private(path: &Path) -> std::io::Result<()> {
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        // `mode` is filtered by the umask; one that takes owner bits (such as 0277) is
        // put right here, so nothing wider than 0600 ever exists.
        Ok(file) => file.set_permissions(std::fs::Permissions::from_mode(0o600)),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(error) => Err(error),
    }
}
