//! `tether user`: the server's accounts, edited in its store directly (the server may be
//! running: SQLite shares the file, and open connections notice revoked credentials within
//! `credential_check`).

use std::io::Write;
use std::path::{Path, PathBuf};

use tether_server::store::{Store, StoreError};
use tether_server::ServerConfig;

/// `tether user` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum UserCommand {
    /// Add a user (asks for the password, or reads one line with --password-stdin).
    Add(PasswordArgs),
    /// List the users, with how many sessions and tokens each holds.
    List(StoreArgs),
    /// Remove a user with every session and token of theirs (their messages stay); their
    /// open connections close within `credential_check`.
    Remove(NameArgs),
    /// Set a user's password; every session and token of theirs is revoked.
    Passwd(PasswordArgs),
    /// List a user's sessions and tokens (an id, when issued, when they expire; never the
    /// secret).
    Tokens(NameArgs),
    /// Revoke a user's sessions and tokens: all of them, or one with --id; open connections
    /// that used them close within `credential_check`.
    Revoke(RevokeArgs),
}

/// Where the store is: `--data`, else the config file's `data`, else the default.
#[derive(clap::Args, Debug)]
pub struct StoreArgs {
    /// The server's TOML config file, for its `data` directory.
    #[arg(long, env = "TETHER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Data directory [default: the config file's `data`, else tether-data].
    #[arg(long, env = "TETHER_DATA", value_name = "DIR")]
    pub data: Option<PathBuf>,
}

impl StoreArgs {
    /// The data directory these options name.
    ///
    /// # Errors
    /// The config file cannot be used.
    pub fn data_dir(&self) -> Result<PathBuf, UserError> {
        if let Some(data) = &self.data {
            return Ok(data.clone());
        }
        Ok(match &self.config {
            Some(file) => ServerConfig::from_file(file)?.data,
            None => ServerConfig::default().data,
        })
    }

    fn open(&self) -> Result<(Store, PathBuf), UserError> {
        let dir = self.data_dir()?;
        Ok((Store::open(&dir)?, dir))
    }
}

/// A user's name and the store.
#[derive(clap::Args, Debug)]
pub struct NameArgs {
    /// The user name.
    pub name: String,
    /// Where the store is.
    #[command(flatten)]
    pub store: StoreArgs,
}

/// `tether user add` and `passwd` options.
#[derive(clap::Args, Debug)]
pub struct PasswordArgs {
    /// The user name: 1-32 of A-Z a-z 0-9 _ - .
    pub name: String,
    /// Where the store is.
    #[command(flatten)]
    pub store: StoreArgs,
    /// Read the password from the first line of standard input.
    #[arg(long)]
    pub password_stdin: bool,
}

/// `tether user revoke` options.
#[derive(clap::Args, Debug)]
pub struct RevokeArgs {
    /// Whose, and where the store is.
    #[command(flatten)]
    pub user: NameArgs,
    /// Revoke only this session or token (its id from `tether user tokens`).
    #[arg(long)]
    pub id: Option<String>,
}

/// A `tether user` command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UserError {
    /// The name is not valid.
    #[error("a user name is 1-32 of A-Z a-z 0-9 _ - .")]
    BadName,
    /// No user has this name.
    #[error("no user named {0:?} (tether user list shows them)")]
    NoSuchUser(String),
    /// No session or token of the user has this id.
    #[error("{user} has no session or token {id} (tether user tokens {user} lists them)")]
    NoSuchCredential {
        /// The user.
        user: String,
        /// The id given.
        id: String,
    },
    /// The password is too short or could not be read.
    #[error("password: {0}")]
    Password(String),
    /// Hashing failed.
    #[error(transparent)]
    Hash(#[from] tether_server::auth::HashError),
    /// The store refused (the user exists, the database failed).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The config file named for the data directory cannot be used.
    #[error(transparent)]
    Config(#[from] tether_server::config::ConfigError),
    /// The report could not be written.
    #[error("writing the report: {0}")]
    Output(#[from] std::io::Error),
}

/// Runs a `tether user` command, writing what it did (or lists) to `out`.
///
/// # Errors
/// See [`UserError`].
pub fn run(command: UserCommand, out: &mut dyn Write) -> Result<(), UserError> {
    match command {
        UserCommand::Add(args) => {
            if !tether_server::auth::valid_user(&args.name) {
                return Err(UserError::BadName);
            }
            let password = read_password(args.password_stdin)?;
            let dir = args.store.data_dir()?;
            add_user(&args.name, &dir, &password)?;
            writeln!(out, "user {} added to {}", args.name, dir.display())?;
        }
        UserCommand::List(args) => {
            let (store, _) = args.open()?;
            let users = store.users()?;
            if users.is_empty() {
                writeln!(out, "no users (tether user add NAME adds one)")?;
            }
            for u in users {
                writeln!(
                    out,
                    "{}\tadded {}\t{} sessions\t{} tokens",
                    u.name, u.created, u.sessions, u.tokens
                )?;
            }
        }
        UserCommand::Remove(args) => {
            let (store, _) = args.store.open()?;
            let name = registered(&store, &args.name)?;
            if !store.remove_user(&name)? {
                return Err(UserError::NoSuchUser(name));
            }
            writeln!(
                out,
                "user {name} removed, with their sessions and tokens; their open connections close within credential_check"
            )?;
        }
        UserCommand::Passwd(args) => {
            let (store, _) = args.store.open()?;
            let name = registered(&store, &args.name)?;
            let password = read_password(args.password_stdin)?;
            if !store.set_password_hash(&name, &hash(&password)?)? {
                return Err(UserError::NoSuchUser(name));
            }
            writeln!(
                out,
                "password of {name} changed; their sessions and tokens are revoked"
            )?;
        }
        UserCommand::Tokens(args) => {
            let (store, _) = args.store.open()?;
            let name = registered(&store, &args.name)?;
            let credentials = store.credentials(&name)?;
            if credentials.is_empty() {
                writeln!(out, "{name} has no sessions or tokens")?;
            }
            for c in credentials {
                writeln!(
                    out,
                    "{}\t{}\tissued {}\texpires {}",
                    c.id,
                    c.kind.as_str(),
                    c.created.map_or_else(|| "(unknown)".into(), rfc3339),
                    c.expires.map_or_else(|| "never".into(), rfc3339),
                )?;
            }
        }
        UserCommand::Revoke(args) => {
            let (store, _) = args.user.store.open()?;
            let name = registered(&store, &args.user.name)?;
            match args.id {
                Some(id) => {
                    if store.revoke_credential(&name, &id)? == 0 {
                        return Err(UserError::NoSuchCredential { user: name, id });
                    }
                    writeln!(out, "revoked {id} of {name}; a connection that used it closes within credential_check")?;
                }
                None => {
                    let n = store.revoke_credentials(&name)?;
                    writeln!(out, "revoked {n} sessions and tokens of {name}; their open connections close within credential_check")?;
                }
            }
        }
    }
    Ok(())
}

/// The registered spelling of `name` (names are unique ignoring case).
fn registered(store: &Store, name: &str) -> Result<String, UserError> {
    store
        .user_named_like(name)?
        .ok_or_else(|| UserError::NoSuchUser(name.to_owned()))
}

/// The fewest characters a password may have (NIST SP 800-63B's floor): a shorter one falls to
/// the guessing that the login limits only slow down.
pub const MIN_PASSWORD: usize = 8;

fn hash(password: &str) -> Result<String, UserError> {
    let length = password.chars().count();
    if length < MIN_PASSWORD {
        return Err(UserError::Password(if length == 0 {
            format!("empty: choose one of at least {MIN_PASSWORD} characters")
        } else {
            format!(
                "too short ({length} characters): choose one of at least {MIN_PASSWORD}, \
                 a few words are easy to remember"
            )
        }));
    }
    Ok(tether_server::auth::hash_password(password)?)
}

fn rfc3339(unix: i64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix.max(0) as u64);
    humantime::format_rfc3339_seconds(at).to_string()
}

/// Adds a user with `password` to the store in `data` (what `tether user add` does, for
/// tests and scripts that already have the password).
///
/// # Errors
/// See [`UserError`].
pub fn add_user(name: &str, data: &Path, password: &str) -> Result<(), UserError> {
    if !tether_server::auth::valid_user(name) {
        return Err(UserError::BadName);
    }
    let hash = hash(password)?;
    Store::open(data)?.add_user(name, &hash)?;
    Ok(())
}

/// Reads a password: one line of stdin, or a prompt twice on a terminal.
///
/// # Errors
/// Standard input fails or the two entries differ.
pub fn read_password(from_stdin: bool) -> Result<String, UserError> {
    let err = |e: std::io::Error| UserError::Password(e.to_string());
    if from_stdin {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map_err(err)?;
        return Ok(line.trim_end_matches(['\r', '\n']).to_owned());
    }
    // The prompt reads the terminal itself: without one (a service, a script), say how else.
    let prompt = |text: &str| {
        rpassword::prompt_password(text).map_err(|e| {
            UserError::Password(format!(
                "no terminal to ask on ({e}): give the password on standard input with \
                 --password-stdin"
            ))
        })
    };
    let first = prompt("password: ")?;
    let again = prompt("again: ")?;
    if first != again {
        return Err(UserError::Password("the two entries differ".into()));
    }
    Ok(first)
}
