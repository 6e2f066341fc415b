//! `tether serve` and `tether user`: the server's settings from a file, the environment and
//! flags (flags win, then the environment, then the file, then the defaults).

use std::net::SocketAddr;
use std::path::PathBuf;

use tether_server::ServerConfig;

/// `tether serve` options. Each also reads a `TETHER_…` environment variable.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServeArgs {
    /// TOML config file (keys as in the config reference; flags override it).
    #[arg(long, env = "TETHER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on: PORT (on 127.0.0.1), :PORT (every interface), HOST:PORT or
    /// [IPv6]:PORT [default: 127.0.0.1:8080]; port 0 picks a free one.
    #[arg(long, env = "TETHER_LISTEN", value_parser = tether_server::config::parse_listen)]
    pub listen: Option<SocketAddr>,
    /// Data directory (the SQLite file) [default: ./tether-data].
    #[arg(long, env = "TETHER_DATA")]
    pub data: Option<PathBuf>,
    /// PEM certificate chain: serve https:// and wss:// on the same port.
    #[arg(long, env = "TETHER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "TETHER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// An origin allowed to open sockets besides the server's own (repeatable).
    #[arg(
        long = "allow-origin",
        env = "TETHER_ALLOW_ORIGIN",
        value_delimiter = ','
    )]
    pub allow_origin: Vec<String>,
    /// A reverse proxy (ADDR or ADDR/LEN) whose Forwarded / X-Forwarded-For name the client
    /// (repeatable).
    #[arg(
        long = "trusted-proxy",
        env = "TETHER_TRUSTED_PROXY",
        value_delimiter = ','
    )]
    pub trusted_proxy: Vec<String>,
    /// Refuse guests: chatting and voting need a login or token.
    #[arg(long, env = "TETHER_NO_GUESTS")]
    pub no_guests: bool,
    /// Messages kept per room [default: 10000].
    #[arg(long, env = "TETHER_HISTORY_LIMIT")]
    pub history_limit: Option<usize>,
    /// Messages sent to a client joining without ?since= [default: 50].
    #[arg(long, env = "TETHER_HISTORY_ON_JOIN")]
    pub history_on_join: Option<usize>,
    /// Most WebSocket connections [default: 10000].
    #[arg(long, env = "TETHER_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Most WebSocket connections from one IP address [default: 1000].
    #[arg(long, env = "TETHER_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<usize>,
    /// Messages per second one connection may send [default: 20].
    #[arg(long, env = "TETHER_MESSAGE_RATE")]
    pub message_rate: Option<f64>,
    /// Events queued per connection before it is closed as a slow consumer (1013) [default: 1024].
    #[arg(long, env = "TETHER_OUTBOX")]
    pub outbox: Option<usize>,
    /// Refuse permessage-deflate.
    #[arg(long, env = "TETHER_NO_DEFLATE")]
    pub no_deflate: bool,
    /// Share rooms, history and presence with other nodes through Redis (redis://HOST:PORT/).
    #[arg(long, env = "TETHER_REDIS")]
    pub redis: Option<String>,
    /// This node's name in the cluster [default: host name and process id].
    #[arg(long, env = "TETHER_NODE")]
    pub node: Option<String>,
    /// Worker threads [default: one per core].
    #[arg(long, env = "TETHER_THREADS")]
    pub threads: Option<usize>,
}

/// A setting that could not be used.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct SettingsError(#[from] tether_server::config::ConfigError);

impl ServeArgs {
    /// The server config: the file (or defaults), then every flag given.
    ///
    /// # Errors
    /// The config file cannot be read or parsed.
    pub fn server_config(&self) -> Result<ServerConfig, SettingsError> {
        let mut c = match &self.config {
            Some(path) => ServerConfig::from_file(path)?,
            None => ServerConfig::default(),
        };
        if let Some(v) = self.listen {
            c.listen = v;
        }
        if let Some(v) = &self.data {
            c.data = v.clone();
        }
        if self.tls_cert.is_some() {
            c.tls_cert = self.tls_cert.clone();
            c.tls_key = self.tls_key.clone();
        }
        c.allow_origins.extend(self.allow_origin.iter().cloned());
        c.trusted_proxies.extend(self.trusted_proxy.iter().cloned());
        if self.no_guests {
            c.guests = false;
        }
        if self.no_deflate {
            c.deflate = false;
        }
        let set = |slot: &mut usize, v: Option<usize>| {
            if let Some(v) = v {
                *slot = v;
            }
        };
        set(&mut c.history_limit, self.history_limit);
        set(&mut c.history_on_join, self.history_on_join);
        set(&mut c.max_connections, self.max_connections);
        set(&mut c.max_connections_per_ip, self.max_connections_per_ip);
        set(&mut c.outbox, self.outbox);
        if self.redis.is_some() {
            c.redis = self.redis.clone();
        }
        if self.node.is_some() {
            c.node = self.node.clone();
        }
        if let Some(v) = self.message_rate {
            c.message_rate = v;
        }
        Ok(c)
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let dir = std::env::temp_dir().join(format!("tether-serve-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("tether.toml");
        std::fs::write(
            &file,
            "listen = \"0.0.0.0:9000\"\nmessage_rate = 5.0\nallow_origins = [\"https://a.example\"]\n",
        )
        .unwrap();
        let args = Cli::parse_from([
            "serve",
            "--config",
            file.to_str().unwrap(),
            "--message-rate",
            "50",
            "--allow-origin",
            "https://b.example",
            "--no-guests",
        ])
        .serve;
        let c = args.server_config().unwrap();
        assert_eq!(c.listen.port(), 9000, "from the file");
        assert_eq!(c.message_rate, 50.0, "the flag wins");
        assert_eq!(c.allow_origins, ["https://a.example", "https://b.example"]);
        assert!(!c.guests);
        assert_eq!(c.outbox, 1024, "the default");

        std::fs::write(&file, "listn = \"x\"\n").unwrap();
        let e = args.server_config().unwrap_err().to_string();
        assert!(e.contains("tether.toml") && e.contains("listn"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
