//! `tether import`: a single node's SQLite store copied into an empty Redis, once, so that
//! several nodes can start on it with every user, session, token, message and poll it had.

use std::io::Write;

use tether_server::engine::import::{sqlite_into_redis, ImportError, Imported};
use tether_server::engine::store::{Store, StoreError};

use crate::user::StoreArgs;

/// `tether import` options: the store to read (`--data` or the config file's `data`), the
/// Redis to fill (`--redis` or the config file's `redis`) and how many of its replicas must
/// hold each write (`--redis-replicas` or the config file's `redis_replicas`).
#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    /// Where the store is, and the Redis.
    #[command(flatten)]
    pub store: StoreArgs,
}

/// `tether import` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImportFailed {
    /// No Redis was named.
    #[error("name the Redis to import into: --redis redis://HOST:PORT/ (or `redis` in --config)")]
    NoRedis,
    /// The options could not be read.
    #[error(transparent)]
    Options(#[from] crate::user::UserError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The import itself failed.
    #[error(transparent)]
    Import(#[from] ImportError),
    /// The report could not be written.
    #[error("writing the report: {0}")]
    Output(#[from] std::io::Error),
}

/// Runs `tether import`, writing what it moved to `out`.
///
/// # Errors
/// See [`ImportFailed`].
pub async fn run(args: ImportArgs, out: &mut dyn Write) -> Result<(), ImportFailed> {
    let url = args.store.redis_url()?.ok_or(ImportFailed::NoRedis)?;
    let replicas = args.store.redis_replicas()?;
    let dir = args.store.data_dir()?;
    let store = Store::open(&dir)?;
    let Imported {
        users,
        credentials,
        rooms,
        messages,
        polls,
        votes,
        epoch,
        ..
    } = sqlite_into_redis(&store, &url, replicas).await?;
    writeln!(
        out,
        "imported {} into {url}: {users} users, {credentials} sessions and tokens, \
         {rooms} rooms with {messages} messages (epoch {epoch}), {polls} polls with {votes} votes",
        dir.display()
    )?;
    writeln!(
        out,
        "start every node with --redis {url}; this store is no longer written"
    )?;
    Ok(())
}
