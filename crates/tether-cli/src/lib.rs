//! The `tether` command's subcommands, as a library the binary calls and tests drive.

pub mod bench;
pub mod connect;
pub mod echo;
pub mod fanout;
pub mod import;
pub mod report;
pub mod serve;
pub mod user;

/// Raises the open-file limit towards `wanted` (best effort), so that a server or load
/// generator can hold many connections.
pub fn raise_fd_limit(wanted: usize) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let target = (wanted as u64).min(hard);
        if target > soft {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, target, hard);
        }
    }
}

/// Process exit codes.
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// A runtime failure (bind failed, connection failed, …).
    pub const FAILURE: i32 = 1;
    /// Bad command-line usage (clap's own convention).
    pub const USAGE: i32 = 2;
}
