//! `tether serve`: the server's settings from a file, the environment and flags (flags win,
//! then the environment, then the file, then the defaults).

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
    /// Port to listen on, on the host of `--listen` (0 picks a free one): the same flag as
    /// `tether echo --port`.
    #[arg(long, short, value_name = "PORT", conflicts_with = "listen")]
    pub port: Option<u16>,
    /// Host or address to listen on, with the port of `--listen` (or `--port`): the same flag
    /// as `tether echo --host`.
    #[arg(long, value_name = "HOST", conflicts_with = "listen")]
    pub host: Option<String>,
    /// The settings as given (each flag, else its variable, else its default): what
    /// [`ServeArgs::server_config`] layers over the file.
    #[command(flatten)]
    pub settings: ServerConfig,
}

/// A setting that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The file, a variable or the settings together.
    #[error(transparent)]
    Config(#[from] tether_server::config::ConfigError),
    /// `--host` names no address.
    #[error("--host {0}")]
    Host(String),
}

impl ServeArgs {
    /// The server config: each setting from its flag, else its `TETHER_…` variable, else the
    /// config file, else its default. `matches` are the `serve` subcommand's.
    ///
    /// # Errors
    /// The config file cannot be read or parsed, or the settings cannot work together.
    pub fn server_config(&self, matches: &clap::ArgMatches) -> Result<ServerConfig, SettingsError> {
        let mut config = ServerConfig::layered(matches, self.config.as_deref())?;
        let port = self.port.unwrap_or(config.listen.port());
        config.listen = match &self.host {
            // An IPv6 address is bracketed before its port.
            Some(host) if host.contains(':') && !host.starts_with('[') => {
                tether_server::config::parse_listen(&format!("[{host}]:{port}"))
                    .map_err(SettingsError::Host)?
            }
            Some(host) => tether_server::config::parse_listen(&format!("{host}:{port}"))
                .map_err(SettingsError::Host)?,
            None => std::net::SocketAddr::new(config.listen.ip(), port),
        };
        Ok(config)
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
