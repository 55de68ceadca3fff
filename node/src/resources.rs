//! What the operating system lets the node hold: file descriptors. Every TCP connection, forwarded
//! connection and exposed-service connection takes one; the common soft limit of 1024 would let a
//! thousand connections from throwaway identities starve forwards and the control socket.

/// Descriptors kept aside for everything that is not a peer connection: the store, listeners,
/// the control and metrics sockets, DNS, and the forwarded connections themselves.
pub const FDS_RESERVED: u64 = 256;
/// Descriptors counted per incoming connection: the connection (TCP; a QUIC connection shares
/// the UDP socket) and one forwarded or exposed-service connection it may carry.
pub const FDS_PER_CONNECTION: u64 = 2;

/// Descriptors a birthday punch leaves free: its fan of sockets is large and short-lived, and
/// must not make a forward's next accept, a peer's connection or the store fail for want of one.
pub const FDS_LEFT_BY_PUNCH: u64 = FDS_RESERVED;

/// The soft limit in force, as [`raise_fd_limit`] left it (0 until it has run).
static FD_LIMIT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Descriptors this process may still open: the limit less those open now. `None` where that
/// cannot be told (no /proc, or the limit not read yet).
pub fn fds_free() -> Option<u64> {
    let limit = FD_LIMIT.load(std::sync::atomic::Ordering::Relaxed);
    if limit == 0 {
        return None;
    }
    let open = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    Some(limit.saturating_sub(open))
}

/// How many of `wanted` sockets a punch may open with `free` descriptors free (see
/// [`FDS_LEFT_BY_PUNCH`]); all of them when the free count is not known.
pub fn punch_sockets(wanted: u16, free: Option<u64>) -> u16 {
    match free {
        None => wanted,
        Some(free) => u16::try_from(free.saturating_sub(FDS_LEFT_BY_PUNCH)).unwrap_or(u16::MAX).min(wanted),
    }
}

/// Raises the soft limit on open files to the hard limit; returns the soft limit in force.
/// (The one unsafe block of the node: two libc calls on a struct we own.)
#[cfg(unix)]
#[allow(unsafe_code)]
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        let before = limit.rlim_cur;
        if limit.rlim_cur < limit.rlim_max {
            let mut raised = limit;
            raised.rlim_cur = limit.rlim_max;
            // macOS refuses more than OPEN_MAX whatever the hard limit says.
            #[cfg(target_os = "macos")]
            {
                raised.rlim_cur = raised.rlim_cur.min(libc::OPEN_MAX as libc::rlim_t);
            }
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
        if limit.rlim_cur != before {
            tracing::debug!(from = before, to = limit.rlim_cur, "raised the open-file limit");
        }
        FD_LIMIT.store(limit.rlim_cur, std::sync::atomic::Ordering::Relaxed);
        limit.rlim_cur
    }
}

#[cfg(not(unix))]
pub fn raise_fd_limit() -> u64 {
    u64::MAX
}

/// The incoming-connection cap the descriptors allow: the configured one, or fewer when the
/// open-file limit cannot hold that many.
pub fn incoming_cap(configured: u32, fd_limit: u64) -> u32 {
    let allowed = fd_limit.saturating_sub(FDS_RESERVED) / FDS_PER_CONNECTION;
    u32::try_from(allowed).unwrap_or(u32::MAX).clamp(1, configured.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_punch_opens_only_sockets_the_descriptors_can_spare() {
        assert_eq!(punch_sockets(256, None), 256, "not known: as configured");
        assert_eq!(punch_sockets(256, Some(100_000)), 256);
        assert_eq!(punch_sockets(256, Some(FDS_LEFT_BY_PUNCH + 10)), 10);
        assert_eq!(punch_sockets(256, Some(FDS_LEFT_BY_PUNCH - 1)), 0);
    }

    #[test]
    fn the_incoming_cap_fits_the_descriptors() {
        assert_eq!(incoming_cap(1024, 1024), 384, "a soft limit of 1024 that cannot be raised");
        assert_eq!(incoming_cap(1024, 16384), 1024, "the configured cap when descriptors suffice");
        assert_eq!(incoming_cap(1024, 100), 1, "never zero");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_soft_limit_is_raised_to_the_hard_limit() {
        let soft = raise_fd_limit();
        let hard = std::fs::read_to_string("/proc/self/limits")
            .unwrap()
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(4).map(str::to_string))
            .unwrap();
        assert_eq!(soft.to_string(), hard.replace("unlimited", &u64::MAX.to_string()));
    }
}
