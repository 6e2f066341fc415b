//! `tether serve` and `tether user`: the server's settings from a file, the environment and
//! flags (flags win, then the environment, then the file, then the defaults).

use std::path::PathBuf;

use tether_server::ServerConfig;

/// `tether serve` options: the config file, then every setting of [`ServerConfig`] as a flag
/// that also reads its `TETHER_…` variable.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// TOML config file, its keys named as the flags with `_` for `-` (flags and variables
    /// override it).
    #[arg(long, env = "TETHER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the settings this command line, the environment and the file come to, as a
    /// config file, and exit.
    #[arg(long)]
    pub print_config: bool,
    /// The settings as given (each flag, else its variable, else its default): what
    /// [`ServeArgs::server_config`] layers over the file.
    #[command(flatten)]
    pub settings: ServerConfig,
}

/// A setting that could not be used.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct SettingsError(#[from] tether_server::config::ConfigError);

impl ServeArgs {
    /// The server config: each setting from its flag, else its `TETHER_…` variable, else the
    /// config file, else its default. `matches` are the `serve` subcommand's.
    ///
    /// # Errors
    /// The config file cannot be read or parsed, or the settings cannot work together.
    pub fn server_config(&self, matches: &clap::ArgMatches) -> Result<ServerConfig, SettingsError> {
        Ok(ServerConfig::layered(matches, self.config.as_deref())?)
    }
}

/// The settings as a TOML config file, every key written (unset optional ones as comments).
///
/// # Errors
/// A value TOML cannot hold (none of the settings' types).
pub fn config_file(config: &ServerConfig) -> Result<String, toml::ser::Error> {
    let mut text = toml::to_string(config)?;
    let serde_json::Value::Object(all) = serde_json::to_value(config).unwrap_or_default() else {
        return Ok(text);
    };
    for (key, value) in all {
        if value.is_null() {
            text.push_str(&format!("# {key} = (unset)\n"));
        }
    }
    Ok(text)
}

/// `tether user` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum UserCommand {
    /// Add a user (asks for the password, or reads one line with --password-stdin).
    Add(UserAddArgs),
    /// Revoke every session and token of a user; their open connections close within a
    /// minute.
    Revoke(UserRevokeArgs),
}

/// `tether user revoke` options.
#[derive(clap::Args, Debug)]
pub struct UserRevokeArgs {
    /// The user name.
    pub name: String,
    /// Data directory.
    #[arg(long, env = "TETHER_DATA", default_value = "tether-data")]
    pub data: PathBuf,
}

/// Revokes every session and token of `name` in the store in `data`; returns how many.
///
/// # Errors
/// The store cannot be opened or written.
pub fn revoke_user(name: &str, data: &std::path::Path) -> Result<usize, UserError> {
    Ok(tether_server::store::Store::open(data)?.revoke_credentials(name)?)
}

/// `tether user add` options.
#[derive(clap::Args, Debug)]
pub struct UserAddArgs {
    /// The user name: 1-32 of A-Z a-z 0-9 _ - .
    pub name: String,
    /// Data directory.
    #[arg(long, env = "TETHER_DATA", default_value = "tether-data")]
    pub data: PathBuf,
    /// Read the password from the first line of standard input.
    #[arg(long)]
    pub password_stdin: bool,
}

/// Adding a user failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UserError {
    /// The name is not valid.
    #[error("a user name is 1-32 of A-Z a-z 0-9 _ - .")]
    BadName,
    /// The password is empty or could not be read.
    #[error("password: {0}")]
    Password(String),
    /// Hashing failed.
    #[error(transparent)]
    Hash(#[from] tether_server::auth::HashError),
    /// The store refused (the user exists, the database failed).
    #[error(transparent)]
    Store(#[from] tether_server::store::StoreError),
}

/// Adds a user with `password` to the store in `data`.
///
/// # Errors
/// See [`UserError`].
pub fn add_user(name: &str, data: &std::path::Path, password: &str) -> Result<(), UserError> {
    if !tether_server::auth::valid_user(name) {
        return Err(UserError::BadName);
    }
    if password.is_empty() {
        return Err(UserError::Password("empty".into()));
    }
    let hash = tether_server::auth::hash_password(password)?;
    tether_server::store::Store::open(data)?.add_user(name, &hash)?;
    Ok(())
}

/// Reads the password for `tether user add`: one line of stdin, or a prompt twice on a terminal.
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
    let first = rpassword::prompt_password("password: ").map_err(err)?;
    let again = rpassword::prompt_password("again: ").map_err(err)?;
    if first != again {
        return Err(UserError::Password("the two entries differ".into()));
    }
    Ok(first)
}
