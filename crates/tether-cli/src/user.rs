//! `tether user`: the server's accounts, edited where the server keeps them, through the same
//! engine: its SQLite file (the server may be running: SQLite shares the file, and open
//! connections notice revoked credentials within `credential_check`), or with `--redis` the
//! Redis every node shares (each node closes the connections of a revoked credential at once).

use std::io::Write;
use std::path::{Path, PathBuf};

use tether_server::engine::accounts::{RedisAccounts, SqliteAccounts};
use tether_server::engine::store::{Db, Store, StoreError};
use tether_server::engine::{Accounts, Revocations};
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

/// Where the accounts are: `--redis`, else the config file's `redis`; without one, the SQLite
/// store in `--data`, else the config file's `data`, else the default.
#[derive(clap::Args, Debug)]
pub struct StoreArgs {
    /// The server's TOML config file, for its `redis` or `data`.
    #[arg(long, env = "TETHER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Data directory [default: the config file's `data`, else tether-data].
    #[arg(long, env = "TETHER_DATA", value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// `redis://HOST:PORT/`: the accounts every node of a cluster shares (as `tether serve
    /// --redis`) [default: the config file's `redis`].
    #[arg(long, env = "TETHER_REDIS", value_name = "URL")]
    pub redis: Option<String>,
    /// Replicas that must hold a change before it counts as made (as `tether serve
    /// --redis-replicas`) [default: the config file's `redis_replicas`, else 0].
    #[arg(long, env = "TETHER_REDIS_REPLICAS", value_name = "N")]
    pub redis_replicas: Option<usize>,
}

/// Accounts opened by `tether user`, and where they are (for its messages).
struct Opened {
    accounts: Box<dyn Accounts>,
    /// `tether-data` or `redis://…`.
    place: String,
    /// When open connections notice a revocation.
    notice: &'static str,
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

    /// The Redis URL these options name, if any.
    ///
    /// # Errors
    /// The config file cannot be used.
    pub fn redis_url(&self) -> Result<Option<String>, UserError> {
        if let Some(url) = &self.redis {
            return Ok(Some(url.clone()));
        }
        Ok(match &self.config {
            Some(file) => ServerConfig::from_file(file)?.redis,
            None => None,
        })
    }

    /// The replicas that must confirm a change in Redis.
    ///
    /// # Errors
    /// The config file cannot be used.
    pub fn redis_replicas(&self) -> Result<usize, UserError> {
        if let Some(replicas) = self.redis_replicas {
            return Ok(replicas);
        }
        Ok(match &self.config {
            Some(file) => ServerConfig::from_file(file)?.redis_replicas,
            None => 0,
        })
    }

    fn open(&self) -> Result<Opened, UserError> {
        if let Some(url) = self.redis_url()? {
            let accounts = RedisAccounts::connect(
                &url,
                self.redis_replicas()?,
                "tether user".into(),
                Revocations::default(),
            )?;
            return Ok(Opened {
                accounts: Box::new(accounts),
                place: url,
                notice: "at once on every node",
            });
        }
        let dir = self.data_dir()?;
        let db = Db::new(Store::open(&dir)?)?;
        Ok(Opened {
            accounts: Box::new(SqliteAccounts::new(db, Revocations::default())),
            place: dir.display().to_string(),
            notice: "within credential_check",
        })
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
    Hash(#[from] tether_server::identity::auth::HashError),
    /// The store refused (the user exists, the database failed).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The config file named for the data directory cannot be used.
    #[error(transparent)]
    Config(#[from] tether_server::config::ConfigError),
    /// The report could not be written, or the store's thread not started.
    #[error("writing the report: {0}")]
    Output(#[from] std::io::Error),
}

/// Runs a `tether user` command, writing what it did (or lists) to `out`.
///
/// # Errors
/// See [`UserError`].
pub async fn run(command: UserCommand, out: &mut dyn Write) -> Result<(), UserError> {
    match command {
        UserCommand::Add(args) => {
            if !tether_server::identity::auth::valid_user(&args.name) {
                return Err(UserError::BadName);
            }
            let password = read_password(args.password_stdin)?;
            let hash = hash(&password)?;
            let opened = args.store.open()?;
            opened.accounts.add_user(&args.name, &hash).await?;
            writeln!(out, "user {} added to {}", args.name, opened.place)?;
        }
        UserCommand::List(args) => {
            let users = args.open()?.accounts.users().await?;
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
            let opened = args.store.open()?;
            let name = registered(&opened, &args.name).await?;
            if !opened.accounts.remove_user(&name).await? {
                return Err(UserError::NoSuchUser(name));
            }
            writeln!(
                out,
                "user {name} removed, with their sessions and tokens; their open connections close {}",
                opened.notice
            )?;
        }
        UserCommand::Passwd(args) => {
            let opened = args.store.open()?;
            let name = registered(&opened, &args.name).await?;
            let password = read_password(args.password_stdin)?;
            if !opened
                .accounts
                .set_password_hash(&name, &hash(&password)?)
                .await?
            {
                return Err(UserError::NoSuchUser(name));
            }
            writeln!(
                out,
                "password of {name} changed; their sessions and tokens are revoked"
            )?;
        }
        UserCommand::Tokens(args) => {
            let opened = args.store.open()?;
            let name = registered(&opened, &args.name).await?;
            let credentials = opened.accounts.credentials(&name).await?;
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
            let opened = args.user.store.open()?;
            let name = registered(&opened, &args.user.name).await?;
            let notice = opened.notice;
            match args.id {
                Some(id) => {
                    if opened.accounts.revoke_credential(&name, &id).await? == 0 {
                        return Err(UserError::NoSuchCredential { user: name, id });
                    }
                    writeln!(
                        out,
                        "revoked {id} of {name}; a connection that used it closes {notice}"
                    )?;
                }
                None => {
                    let n = opened.accounts.revoke_credentials(&name).await?;
                    writeln!(out, "revoked {n} sessions and tokens of {name}; their open connections close {notice}")?;
                }
            }
        }
    }
    Ok(())
}

/// The registered spelling of `name` (names are unique ignoring case).
async fn registered(opened: &Opened, name: &str) -> Result<String, UserError> {
    opened
        .accounts
        .user_named_like(name)
        .await?
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
    Ok(tether_server::identity::auth::hash_password(password)?)
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
    if !tether_server::identity::auth::valid_user(name) {
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
