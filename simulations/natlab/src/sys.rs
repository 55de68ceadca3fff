//! The few system calls the lab needs beyond `ip` and `nft`: TUN devices, entering a network
//! namespace from a thread, and signals routed to a cleanup thread.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;

const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates a TUN device (IP packets, no packet-info header) in the current namespace and returns
/// its file. The device can be moved to another namespace afterwards; the file stays attached.
pub fn open_tun(name: &str) -> io::Result<File> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("interface name {name:?} too long")));
    }
    let file = OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: IFF_TUN | IFF_NO_PI, _pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `IfReq` lays out (name, flags,
    // padding to the kernel's size); the fd is a valid open /dev/net/tun for the whole call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// Moves the calling thread into the named network namespace (`ip netns` name).
pub fn enter_netns(ns: &str) -> io::Result<()> {
    let file = File::open(format!("/run/netns/{ns}"))?;
    // SAFETY: setns with a valid namespace fd only changes this thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a fresh thread inside network namespace `ns` and returns its result (the calling
/// thread stays where it is). Threads `f` spawns start in `ns` too.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> Result<T, String> + Send + 'static) -> Result<T, String> {
    let inside = ns.to_string();
    std::thread::spawn(move || {
        enter_netns(&inside).map_err(|e| format!("cannot enter {inside}: {e}"))?;
        f()
    })
    .join()
    .map_err(|_| format!("the thread in {ns} panicked"))?
}

/// Blocks SIGINT/SIGTERM/SIGHUP in this thread (and the threads it spawns later) and returns a
/// thread that waits for them and runs `on_signal`, so an interrupted run still cleans up.
pub fn route_signals_to(on_signal: impl FnOnce(i32) + Send + 'static) {
    // SAFETY: the sigset is initialised by sigemptyset before use; pthread_sigmask and sigwait
    // take pointers to it that live for the duration of each call.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        std::thread::spawn(move || {
            let mut sig: libc::c_int = 0;
            libc::sigwait(&set, &mut sig);
            on_signal(sig);
        });
    }
}

/// Makes a child process receive SIGKILL when the lab process dies, so no node outlives a run.
/// The child also gets the signals [`route_signals_to`] blocked in the lab's threads unblocked
/// again (a blocked mask survives exec): a node must stop cleanly on SIGTERM, as under systemd.
pub fn die_with_parent(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl(PR_SET_PDEATHSIG), sigemptyset, sigaddset and pthread_sigmask are
    // async-signal-safe; the sigset lives on the child's stack for the calls.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::sigaddset(&mut set, sig);
            }
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
}
