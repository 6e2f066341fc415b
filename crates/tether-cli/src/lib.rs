//! The `tether` command's subcommands, as a library the binary calls and tests drive.

pub mod bench;
pub mod connect;
pub mod echo;

/// Process exit codes.
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// A runtime failure (bind failed, connection failed, …).
    pub const FAILURE: i32 = 1;
    /// Bad command-line usage (clap's own convention).
    pub const USAGE: i32 = 2;
}
