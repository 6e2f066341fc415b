//! The link to Redis: to the master, which follows a promoted replica, or to Redis Cluster.
//!
//! The `redis` setting names where the master is, in one of three forms:
//! - `redis://HOST:PORT/DB`: one server, always the master;
//! - `redis://A:6379,redis://B:6380`: candidates, of which the one whose `ROLE` says
//!   `master` is used (an operator promotes a replica with `REPLICAOF NO ONE`);
//! - `redis+sentinel://[USER:PASSWORD@]S1:26379[,S2:26379…]/SERVICE[/DB]`: Redis Sentinel
//!   names the master of `SERVICE` (the password and database are the master's), and the
//!   node checks with `ROLE` that it is one;
//! - `redis+cluster://[USER:PASSWORD@]A:7000[,B:7001…]`: Redis Cluster, found from any of
//!   the nodes named; each command goes to the master of its keys' slot, and a pipeline is
//!   sent as one pipeline per hash tag.
//!
//! With candidates or Sentinel, a command that fails because the server went away or refuses
//! writes (`READONLY`: it was demoted) marks the link stale, and the next command finds the
//! master again; subscribers are told through [`Link::changes`] so they move too. Messages
//! the old master acknowledged but had not yet passed to the replica are lost with it; the
//! nodes notice (a stream shorter than what they delivered) and start a new epoch, so
//! clients that resume are told.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, RedisError, RedisFuture, RedisResult, Value};
use tokio::sync::watch;

/// How long finding the master may take, every server asked included.
const RESOLVE_WAIT: Duration = Duration::from_secs(3);
/// How long one server may take to answer while the master is looked for.
const ASK_WAIT: Duration = Duration::from_secs(1);
/// How long after a failed search the next one starts (commands fail meanwhile).
const RESOLVE_AGAIN: Duration = Duration::from_millis(250);

/// Where the master is found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// One server, the master.
    One(String),
    /// Candidate servers: the master is the one whose `ROLE` is `master`.
    Candidates(Vec<String>),
    /// Redis Sentinel: `sentinels` (as `redis://` URLs) name the master of `service`, reached
    /// with `auth` (`USER:PASSWORD@` or empty) and database `db`.
    Sentinel {
        sentinels: Vec<String>,
        service: String,
        auth: String,
        db: i64,
    },
    /// Redis Cluster, found from these nodes (as `redis://` URLs).
    Cluster(Vec<String>),
}

fn invalid(what: &str, detail: String) -> RedisError {
    RedisError::from((
        redis::ErrorKind::InvalidClientConfig,
        "invalid redis setting",
        format!("{what}: {detail}"),
    ))
}

fn io_error(what: &'static str, detail: String) -> RedisError {
    RedisError::from((redis::ErrorKind::Io, what, detail))
}

impl Target {
    fn parse(setting: &str) -> RedisResult<Target> {
        let setting = setting.trim();
        if let Some(rest) = setting.strip_prefix("redis+cluster://") {
            let (auth, hosts) = match rest.rsplit_once('@') {
                Some((auth, hosts)) => (format!("{auth}@"), hosts),
                None => (String::new(), rest),
            };
            let hosts = hosts.trim_end_matches('/');
            if hosts.contains('/') {
                return Err(invalid(
                    setting,
                    "Redis Cluster has no database to name".into(),
                ));
            }
            let nodes: Vec<String> = hosts
                .split(',')
                .filter(|h| !h.is_empty())
                .map(|h| format!("redis://{auth}{h}"))
                .collect();
            if nodes.is_empty() {
                return Err(invalid(setting, "no cluster node is named".into()));
            }
            for node in &nodes {
                redis::Client::open(node.as_str())?;
            }
            return Ok(Target::Cluster(nodes));
        }
        if let Some(rest) = setting.strip_prefix("redis+sentinel://") {
            let (auth, rest) = match rest.rsplit_once('@') {
                Some((auth, rest)) => (format!("{auth}@"), rest),
                None => (String::new(), rest),
            };
            let (hosts, path) = rest.split_once('/').ok_or_else(|| {
                invalid(setting, "the service name is missing (…/SERVICE)".into())
            })?;
            let (service, db) = match path.split_once('/') {
                Some((service, db)) => (service, db),
                None => (path, ""),
            };
            if service.is_empty() {
                return Err(invalid(setting, "the service name is empty".into()));
            }
            let db = if db.is_empty() {
                0
            } else {
                db.parse()
                    .map_err(|_| invalid(setting, format!("database {db:?} is not a number")))?
            };
            let sentinels: Vec<String> = hosts
                .split(',')
                .filter(|h| !h.is_empty())
                .map(|h| format!("redis://{h}"))
                .collect();
            if sentinels.is_empty() {
                return Err(invalid(setting, "no sentinel is named".into()));
            }
            for s in &sentinels {
                redis::Client::open(s.as_str())?;
            }
            redis::Client::open(format!("redis://{auth}127.0.0.1/{db}"))?;
            return Ok(Target::Sentinel {
                sentinels,
                service: service.to_owned(),
                auth,
                db,
            });
        }
        let urls: Vec<String> = setting
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect();
        for url in &urls {
            redis::Client::open(url.as_str())?;
        }
        match urls.len() {
            0 => Err(invalid(setting, "no server is named".into())),
            1 => Ok(Target::One(urls.into_iter().next().unwrap_or_default())),
            _ => Ok(Target::Candidates(urls)),
        }
    }

    /// The URL of the master now.
    async fn find_master(&self) -> RedisResult<String> {
        match self {
            Target::One(url) => Ok(url.clone()),
            Target::Cluster(nodes) => Ok(nodes.join(",")),
            Target::Candidates(urls) => {
                let mut last = io_error("no redis master", "no candidate answered".into());
                for url in urls {
                    match is_master(url).await {
                        Ok(true) => return Ok(url.clone()),
                        Ok(false) => {
                            last = io_error("no redis master", format!("{url} is not a master"));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
            Target::Sentinel {
                sentinels,
                service,
                auth,
                db,
            } => {
                let mut last = io_error("no redis master", "no sentinel answered".into());
                for sentinel in sentinels {
                    let named: RedisResult<Option<(String, u16)>> = ask(
                        sentinel,
                        redis::cmd("SENTINEL")
                            .arg("GET-MASTER-ADDR-BY-NAME")
                            .arg(service),
                    )
                    .await;
                    match named {
                        Ok(Some((host, port))) => {
                            let host = if host.contains(':') {
                                format!("[{host}]")
                            } else {
                                host
                            };
                            let url = format!("redis://{auth}{host}:{port}/{db}");
                            match is_master(&url).await {
                                Ok(true) => return Ok(url),
                                Ok(false) => {
                                    // Sentinel has not finished the failover yet.
                                    last = io_error(
                                        "no redis master",
                                        format!("{sentinel} names {host}:{port}, not a master yet"),
                                    );
                                }
                                Err(e) => last = e,
                            }
                        }
                        Ok(None) => {
                            last = io_error(
                                "no redis master",
                                format!("{sentinel} knows no service {service:?}"),
                            );
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }
}

/// `cmd`'s answer from the server at `url`, on a connection of its own.
async fn ask<T: redis::FromRedisValue>(url: &str, cmd: &Cmd) -> RedisResult<T> {
    let client = redis::Client::open(url)?;
    let asked = async {
        let mut con = client.get_multiplexed_async_connection().await?;
        cmd.query_async(&mut con).await
    };
    tokio::time::timeout(ASK_WAIT, asked)
        .await
        .map_err(|_| io_error("redis did not answer", url.to_owned()))?
}

/// Whether the server at `url` is a master (`ROLE`).
async fn is_master(url: &str) -> RedisResult<bool> {
    let role: Value = ask(url, &redis::cmd("ROLE")).await?;
    Ok(match role {
        Value::Array(parts) => {
            matches!(
                parts.first(),
                Some(Value::BulkString(b)) if b == b"master"
            ) || matches!(parts.first(), Some(Value::SimpleString(s)) if s == "master")
        }
        _ => false,
    })
}

/// Whether `e` says the server used is no longer the master: it went away, or it refuses
/// writes.
fn moved(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_refusal()
        || e.is_connection_dropped()
        || e.is_timeout()
        || matches!(e.code(), Some("READONLY" | "MASTERDOWN"))
}

/// How long a write waits for its replicas (`WAIT`) before it counts as unconfirmed: the
/// connection's other commands wait behind it meanwhile.
const REPLICA_WAIT: Duration = Duration::from_millis(500);

/// Commands that write nothing: no `WAIT` follows them.
const READS: &[&[u8]] = &[
    b"GET",
    b"MGET",
    b"EXISTS",
    b"TYPE",
    b"TTL",
    b"PTTL",
    b"SCAN",
    b"PING",
    b"ROLE",
    b"HGET",
    b"HMGET",
    b"HGETALL",
    b"HLEN",
    b"HEXISTS",
    b"HSCAN",
    b"HKEYS",
    b"HVALS",
    b"SMEMBERS",
    b"SISMEMBER",
    b"SCARD",
    b"SSCAN",
    b"ZSCORE",
    b"ZCARD",
    b"ZCOUNT",
    b"ZRANGE",
    b"ZREVRANGE",
    b"ZRANGEBYSCORE",
    b"ZRANGEBYLEX",
    b"ZSCAN",
    b"ZMSCORE",
    b"XRANGE",
    b"XREVRANGE",
    b"XLEN",
    b"XINFO",
    b"LRANGE",
    b"LLEN",
    b"EVALSHA_RO",
    b"EVAL_RO",
    b"SCRIPT",
    b"INFO",
    b"PUBSUB",
    b"DBSIZE",
    // Messages to subscribers store nothing: a dying master loses none of them.
    b"PUBLISH",
    b"SPUBLISH",
];

/// Whether `cmd` may write.
fn writes(cmd: &Cmd) -> bool {
    match cmd.args_iter().next() {
        Some(redis::Arg::Simple(name)) => !READS.iter().any(|r| r.eq_ignore_ascii_case(name)),
        _ => true,
    }
}

/// Commands without a key: Redis Cluster sends them where it likes.
const NO_KEY: &[&[u8]] = &[
    b"PING", b"ROLE", b"WAIT", b"SCAN", b"INFO", b"PUBLISH", b"PUBSUB", b"DBSIZE", b"SCRIPT",
    b"CLUSTER", b"TIME",
];

/// The first key `cmd` names, if any.
fn first_key(cmd: &Cmd) -> Option<&[u8]> {
    let mut args = cmd.args_iter().filter_map(|a| match a {
        redis::Arg::Simple(bytes) => Some(bytes),
        _ => None,
    });
    let name = args.next()?;
    let scripted = [
        &b"EVAL"[..],
        b"EVALSHA",
        b"EVAL_RO",
        b"EVALSHA_RO",
        b"FCALL",
        b"FCALL_RO",
    ];
    if scripted.iter().any(|s| s.eq_ignore_ascii_case(name)) {
        args.next()?;
        let keys: usize = std::str::from_utf8(args.next()?).ok()?.parse().ok()?;
        return if keys > 0 { args.next() } else { None };
    }
    if NO_KEY.iter().any(|c| c.eq_ignore_ascii_case(name)) {
        return None;
    }
    args.next()
}

/// The part of `key` Redis Cluster hashes: what is between its first `{` and the next `}`,
/// when not empty; else the whole key.
pub(crate) fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        let rest = &key[open + 1..];
        if let Some(len) = rest.iter().position(|&b| b == b'}') {
            if len > 0 {
                return &rest[..len];
            }
        }
    }
    key
}

/// Sends `pipeline` to Redis Cluster as one pipeline per hash tag of its commands' first keys
/// (a pipeline must stay on one slot), all at once, and answers in the pipeline's order. A
/// command without a key goes alone; commands of one tag keep their order. When some parts
/// fail and others ran, the error is a timeout: its outcome is unknown, not "nothing done".
/// With `replicas`, each part that writes waits for that many replicas of its shard (see
/// [`on_shard`]).
async fn by_tag(
    con: &ClusterConnection,
    pipeline: &redis::Pipeline,
    offset: usize,
    count: usize,
    replicas: usize,
    within: Duration,
) -> RedisResult<Vec<Value>> {
    let cmds: Vec<&Cmd> = pipeline.cmd_iter().collect();
    if pipeline.is_transaction() || offset != 0 || count != cmds.len() {
        if replicas > 0 && cmds.iter().any(|cmd| writes(cmd)) {
            return Err(invalid(
                "redis_replicas",
                "a transaction on Redis Cluster cannot be confirmed by replicas".into(),
            ));
        }
        return con
            .clone()
            .req_packed_commands(pipeline, offset, count)
            .await;
    }
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut by: std::collections::HashMap<&[u8], usize> = std::collections::HashMap::new();
    for (i, cmd) in cmds.iter().enumerate() {
        match first_key(cmd).map(hash_tag) {
            Some(tag) => {
                let group = *by.entry(tag).or_insert_with(|| {
                    groups.push(Vec::new());
                    groups.len() - 1
                });
                groups[group].push(i);
            }
            None => groups.push(vec![i]),
        }
    }
    let confirmed = |members: &[usize]| {
        replicas > 0
            && members
                .iter()
                .any(|&i| writes(cmds[i]) && first_key(cmds[i]).is_some())
    };
    if groups.len() == 1 && !confirmed(&groups[0]) {
        return con
            .clone()
            .req_packed_commands(pipeline, offset, count)
            .await;
    }
    let sent = futures_util::future::join_all(groups.iter().map(|members| {
        let mut part = redis::pipe();
        for &i in members {
            part.add_command(cmds[i].clone());
        }
        let wanted = if confirmed(members) { replicas } else { 0 };
        on_shard(con, part, wanted, within)
    }))
    .await;
    let mut answers = vec![Value::Nil; cmds.len()];
    let (mut failed, mut done) = (None, false);
    for (members, sent) in groups.iter().zip(sent) {
        match sent {
            Ok(values) => {
                done = true;
                for (&i, value) in members.iter().zip(values) {
                    answers[i] = value;
                }
            }
            Err(e) => failed = failed.or(Some(e)),
        }
    }
    match failed {
        None => Ok(answers),
        // Other parts ran: what the pipeline did is not known as a whole.
        Some(e) if done => Err(RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("part of a pipeline over several shards failed ({e}): outcome unknown"),
        ))),
        Some(e) => Err(e),
    }
}

/// Sends `part`, commands whose keys share one slot, to the master of that slot; with
/// `replicas` > 0, a `WAIT` follows them in the same pipeline, so on the same connection to
/// the same master, and the part is acknowledged only once that many of the shard's replicas
/// hold what it wrote. Answers the part's commands.
async fn on_shard(
    con: &ClusterConnection,
    mut part: redis::Pipeline,
    replicas: usize,
    within: Duration,
) -> RedisResult<Vec<Value>> {
    let len = part.len();
    if replicas == 0 {
        return con.clone().req_packed_commands(&part, 0, len).await;
    }
    // WAIT names no key: the part's first key routes the pipeline, WAIT included.
    part.add_command(wait_for(replicas, within));
    let mut answers = con.clone().req_packed_commands(&part, 0, len + 1).await?;
    let held = answers
        .pop()
        .ok_or_else(unanswered)
        .and_then(|held| Ok(redis::from_redis_value::<usize>(held.extract_error()?)?));
    held_by(held, replicas)?;
    Ok(answers)
}

/// One page of `SCAN` for `pattern` from `cursor`: answered with the next cursor (0 at the
/// end) and the keys the page found.
fn scan_page(cursor: u64, pattern: &str) -> Cmd {
    let mut scan = redis::cmd("SCAN");
    scan.arg(cursor)
        .arg("MATCH")
        .arg(pattern)
        .arg("COUNT")
        .arg(10_000);
    scan
}

/// The host and port of every master that `CLUSTER NODES` lists and does not mark failed.
fn masters(nodes: &str) -> Vec<(&str, u16)> {
    nodes
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let (_id, address, flags) = (fields.next()?, fields.next()?, fields.next()?);
            let flags: Vec<&str> = flags.split(',').collect();
            let failed = ["fail", "handshake", "noaddr"];
            if !flags.contains(&"master") || failed.iter().any(|f| flags.contains(f)) {
                return None;
            }
            let address = address.split(['@', ',']).next()?;
            let (host, port) = address.rsplit_once(':')?;
            Some((host, port.parse().ok()?))
        })
        .collect()
}

/// Redis answered fewer replies than it was sent commands.
fn unanswered() -> RedisError {
    RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        "redis answered fewer replies than it was sent commands",
    ))
}

/// `WAIT replicas` for as long as a write may wait.
fn wait_for(replicas: usize, within: Duration) -> Cmd {
    let mut wait = redis::cmd("WAIT");
    wait.arg(replicas).arg(within.as_millis() as u64);
    wait
}

/// Whether `held`, what `WAIT` answered, confirms a write to `wanted` replicas: an error that
/// says it is not known whether they hold it when fewer did in time.
fn held_by(held: RedisResult<usize>, wanted: usize) -> RedisResult<()> {
    match held? {
        held if held >= wanted => Ok(()),
        held => Err(RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("{held} of {wanted} redis replicas confirmed the write in time"),
        ))),
    }
}

/// The connection to the master in use.
#[derive(Clone)]
enum Conn {
    /// One master: a connection for commands, and a client for subscriptions.
    Single(ConnectionManager, redis::Client),
    /// Redis Cluster.
    Cluster(ClusterConnection),
}

/// A connection to the master, for commands (it implements [`ConnectionLike`], so commands,
/// pipelines and scripts run on it) and for subscribers ([`Link::client`]). Clones share it.
#[derive(Clone)]
pub struct Link {
    shared: Arc<Shared>,
    /// Replicas that must hold a write before it is acknowledged.
    replicas: usize,
    /// How long a write waits for them.
    within: Duration,
}

struct Shared {
    target: Target,
    config: ConnectionManagerConfig,
    db: i64,
    state: Mutex<State>,
    /// One search for the master at a time.
    resolving: tokio::sync::Mutex<()>,
    changes: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    /// The master in use: its URL and the connection.
    master: Option<(String, Conn)>,
    /// Counts the masters followed.
    generation: u64,
    /// A command failed as if the master moved: find it again.
    stale: bool,
    /// No search before this (the last one failed).
    quiet_until: Option<Instant>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("target", &self.shared.target)
            .finish_non_exhaustive()
    }
}

impl Link {
    /// A link to the master the `setting` names (see the module's documentation), with
    /// commands timing out after `timeout`. Nothing connects before the first command.
    ///
    /// # Errors
    /// The setting is not valid.
    pub fn open(setting: &str, timeout: Duration) -> RedisResult<Link> {
        let target = Target::parse(setting)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout.min(Duration::from_secs(2))))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let (db, state) = match &target {
            Target::One(url) => {
                let client = redis::Client::open(url.as_str())?;
                let db = client.get_connection_info().redis_settings().db();
                let manager =
                    ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?;
                let state = State {
                    master: Some((url.clone(), Conn::Single(manager, client))),
                    ..State::default()
                };
                (db, state)
            }
            Target::Candidates(urls) => {
                let client = redis::Client::open(urls[0].as_str())?;
                (
                    client.get_connection_info().redis_settings().db(),
                    State::default(),
                )
            }
            Target::Sentinel { db, .. } => (*db, State::default()),
            Target::Cluster(_) => (0, State::default()),
        };
        Ok(Link {
            shared: Arc::new(Shared {
                target,
                config,
                db,
                state: Mutex::new(state),
                resolving: tokio::sync::Mutex::new(()),
                changes: watch::Sender::new(0),
            }),
            replicas: 0,
            within: REPLICA_WAIT,
        })
    }

    /// A link that acknowledges a write only once `replicas` replicas hold it (`WAIT`):
    /// a command (or pipeline) that writes fails as timed out when they do not confirm it
    /// within half a second, though the master applied it. Clones made after keep it.
    #[must_use]
    pub fn confirmed_by(mut self, replicas: usize) -> Link {
        self.replicas = replicas;
        self
    }

    /// The same, with writes waiting up to `within` for their replicas instead of half a
    /// second: for a client with nobody waiting behind it (`tether import`), which would
    /// rather wait out a busy replica than stop.
    #[must_use]
    pub fn waiting(mut self, within: Duration) -> Link {
        self.within = within;
        self
    }

    /// Whether writes wait for replicas ([`Link::confirmed_by`]).
    pub fn confirms(&self) -> bool {
        self.replicas > 0
    }

    /// The same connection, without waiting for replicas: for writes whose loss with a
    /// dying master costs nothing, or that only follow writes already confirmed.
    #[must_use]
    pub fn unconfirmed(&self) -> Link {
        Link {
            shared: self.shared.clone(),
            replicas: 0,
            within: self.within,
        }
    }

    /// Changes each time the link follows another master.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    /// Whether the link is to Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.shared.target, Target::Cluster(_))
    }

    /// A client of the master now (found first when needed), for a subscription, and the
    /// generation it belongs to: the subscription moves once [`Link::changes`] differs.
    ///
    /// # Errors
    /// No master was found, or the link is to Redis Cluster ([`Link::cluster_feed`]).
    pub async fn client(&self) -> RedisResult<(redis::Client, u64)> {
        match self.current().await? {
            (Conn::Single(_, client), generation) => Ok((client, generation)),
            (Conn::Cluster(_), _) => Err(invalid(
                "redis+cluster",
                "a cluster is subscribed through cluster_feed".into(),
            )),
        }
    }

    /// A new connection to Redis Cluster for subscriptions (RESP3), whose messages, and a
    /// `Disconnection` when a node's connection is lost, go to `pushes`.
    ///
    /// # Errors
    /// The link is not to Redis Cluster, or no node of it answered.
    pub async fn cluster_feed(
        &self,
        pushes: tokio::sync::mpsc::UnboundedSender<redis::PushInfo>,
    ) -> RedisResult<ClusterConnection> {
        let Target::Cluster(nodes) = &self.shared.target else {
            return Err(invalid("redis", "not a cluster".into()));
        };
        let client = self
            .cluster_client(nodes)
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(pushes)
            .build()?;
        tokio::time::timeout(RESOLVE_WAIT, client.get_async_connection())
            .await
            .map_err(|_| io_error("redis cluster did not answer", nodes.join(",")))?
    }

    /// Whether any key matching `pattern` exists: on every master of Redis Cluster, where a
    /// `SCAN` sees only the server it runs on.
    ///
    /// # Errors
    /// No master was found, or one did not answer.
    pub async fn any_key(&self, pattern: &str) -> RedisResult<bool> {
        match self.current().await? {
            (Conn::Single(mut con, _), _) => {
                let mut cursor = 0;
                loop {
                    let (next, found): (u64, Vec<Value>) =
                        scan_page(cursor, pattern).query_async(&mut con).await?;
                    if !found.is_empty() || next == 0 {
                        return Ok(!found.is_empty());
                    }
                    cursor = next;
                }
            }
            (Conn::Cluster(mut con), _) => {
                let random = RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random);
                let nodes = con.route_command(redis::cmd("CLUSTER").arg("NODES").clone(), random);
                let nodes: String = redis::from_redis_value(nodes.await?)?;
                for (host, port) in masters(&nodes) {
                    let mut cursor = 0;
                    loop {
                        let on = SingleNodeRoutingInfo::ByAddress {
                            host: host.to_owned(),
                            port,
                        };
                        let page = con
                            .route_command(scan_page(cursor, pattern), RoutingInfo::SingleNode(on));
                        let (next, found): (u64, Vec<Value>) =
                            redis::from_redis_value(page.await?)?;
                        if !found.is_empty() {
                            return Ok(true);
                        }
                        if next == 0 {
                            break;
                        }
                        cursor = next;
                    }
                }
                Ok(false)
            }
        }
    }

    fn cluster_client(&self, nodes: &[String]) -> redis::cluster::ClusterClientBuilder {
        let timeout = self
            .shared
            .config
            .response_timeout()
            .unwrap_or(Duration::from_secs(2));
        redis::cluster::ClusterClientBuilder::new(nodes.to_vec())
            .connection_timeout(timeout.min(Duration::from_secs(2)))
            .response_timeout(timeout)
            .retries(2)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The master in use, unless it must be found (again) now.
    fn in_use(&self) -> Option<(Conn, u64)> {
        let state = self.state();
        let (_, conn) = state.master.as_ref()?;
        let quiet = state.quiet_until.is_some_and(|t| Instant::now() < t);
        (!state.stale || quiet).then(|| (conn.clone(), state.generation))
    }

    async fn current(&self) -> RedisResult<(Conn, u64)> {
        if let Some(found) = self.in_use() {
            return Ok(found);
        }
        let _one = self.shared.resolving.lock().await;
        if let Some(found) = self.in_use() {
            return Ok(found);
        }
        if self.state().quiet_until.is_some_and(|t| Instant::now() < t) {
            return Err(io_error("no redis master", "looked for lately".into()));
        }
        let found = tokio::time::timeout(RESOLVE_WAIT, self.shared.target.find_master())
            .await
            .unwrap_or_else(|_| Err(io_error("no redis master", "the search timed out".into())));
        let url = match found {
            Ok(url) => url,
            Err(e) => {
                self.state().quiet_until = Some(Instant::now() + RESOLVE_AGAIN);
                tracing::warn!(error = %e, "looking for the redis master");
                return Err(e);
            }
        };
        if let Target::Cluster(nodes) = &self.shared.target {
            // The cluster's connection follows its topology itself: made once.
            let connected = tokio::time::timeout(
                RESOLVE_WAIT,
                self.cluster_client(nodes).build()?.get_async_connection(),
            )
            .await
            .unwrap_or_else(|_| Err(io_error("redis cluster did not answer", url.clone())));
            let con = match connected {
                Ok(con) => con,
                Err(e) => {
                    self.state().quiet_until = Some(Instant::now() + RESOLVE_AGAIN);
                    return Err(e);
                }
            };
            let mut state = self.state();
            state.master = Some((url, Conn::Cluster(con.clone())));
            state.generation += 1;
            return Ok((Conn::Cluster(con), state.generation));
        }
        let mut state = self.state();
        state.stale = false;
        state.quiet_until = None;
        if state.master.as_ref().is_none_or(|(used, _)| *used != url) {
            let client = redis::Client::open(url.as_str())?;
            let manager = ConnectionManager::new_lazy_with_config(
                client.clone(),
                self.shared.config.clone(),
            )?;
            if state.master.is_some() {
                tracing::warn!(master = %url, "following the new redis master");
            }
            state.master = Some((url, Conn::Single(manager, client)));
            state.generation += 1;
            self.shared.changes.send_replace(state.generation);
        }
        let (_, conn) = state.master.as_ref().expect("set above");
        Ok((conn.clone(), state.generation))
    }

    /// A command on the master of `generation` failed with `e`: when that says the master
    /// moved, it is looked for again before the next command.
    fn failed(&self, e: &RedisError, generation: u64) {
        if matches!(self.shared.target, Target::One(_) | Target::Cluster(_)) || !moved(e) {
            return;
        }
        let mut state = self.state();
        if state.generation == generation {
            state.stale = true;
        }
    }

    /// Waits for the replicas to hold what this connection wrote, when the link asks for them.
    async fn confirm(&self, con: &mut ConnectionManager, generation: u64) -> RedisResult<()> {
        let wanted = self.replicas;
        if wanted == 0 {
            return Ok(());
        }
        let held = wait_for(wanted, self.within).query_async(con).await;
        if let Err(e) = &held {
            self.failed(e, generation);
        }
        held_by(held, wanted)
    }
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let (mut con, generation) = match self.current().await? {
                (Conn::Single(con, _), generation) => (con, generation),
                (Conn::Cluster(mut con), _) => {
                    let replicas = self.replicas;
                    if replicas == 0 || !writes(cmd) || first_key(cmd).is_none() {
                        return con.req_packed_command(cmd).await;
                    }
                    let mut part = redis::pipe();
                    part.add_command(cmd.clone());
                    let answer = on_shard(&con, part, replicas, self.within).await?;
                    return answer.into_iter().next().ok_or_else(unanswered);
                }
            };
            let answer = con.req_packed_command(cmd).await;
            match &answer {
                Err(e) => self.failed(e, generation),
                Ok(_) if writes(cmd) => self.confirm(&mut con, generation).await?,
                Ok(_) => {}
            }
            answer
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let (mut con, generation) = match self.current().await? {
                (Conn::Single(con, _), generation) => (con, generation),
                (Conn::Cluster(con), _) => {
                    let replicas = self.replicas;
                    let within = self.within;
                    return by_tag(&con, pipeline, offset, count, replicas, within).await;
                }
            };
            let answer = con.req_packed_commands(pipeline, offset, count).await;
            match &answer {
                Err(e) => self.failed(e, generation),
                Ok(_) if pipeline.cmd_iter().any(writes) => {
                    self.confirm(&mut con, generation).await?;
                }
                Ok(_) => {}
            }
            answer
        })
    }

    fn get_db(&self) -> i64 {
        self.shared.db
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_name_one_server_candidates_or_sentinels() {
        assert_eq!(
            Target::parse("redis://127.0.0.1:6379/2").unwrap(),
            Target::One("redis://127.0.0.1:6379/2".into())
        );
        assert_eq!(
            Target::parse("redis://a:1, redis://b:2").unwrap(),
            Target::Candidates(vec!["redis://a:1".into(), "redis://b:2".into()])
        );
        assert_eq!(
            Target::parse("redis+sentinel://:secret@s1:26379,s2:26380/main/3").unwrap(),
            Target::Sentinel {
                sentinels: vec!["redis://s1:26379".into(), "redis://s2:26380".into()],
                service: "main".into(),
                auth: ":secret@".into(),
                db: 3,
            }
        );
        assert_eq!(
            Target::parse("redis+sentinel://s1:26379/main").unwrap(),
            Target::Sentinel {
                sentinels: vec!["redis://s1:26379".into()],
                service: "main".into(),
                auth: String::new(),
                db: 0,
            }
        );
        for bad in [
            "",
            "redis+sentinel://s1:26379",
            "redis+sentinel://s1:26379/",
            "redis+sentinel:///main",
            "redis+sentinel://s1:26379/main/x",
            "http://a:1",
            "redis://a:1,http://b:2",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad:?} was taken");
        }
    }

    #[test]
    fn a_cluster_is_named_by_its_nodes() {
        assert_eq!(
            Target::parse("redis+cluster://:pw@a:7000,b:7001/").unwrap(),
            Target::Cluster(vec![
                "redis://:pw@a:7000".into(),
                "redis://:pw@b:7001".into()
            ])
        );
        assert!(Target::parse("redis+cluster://").is_err());
        assert!(Target::parse("redis+cluster://a:7000/2").is_err());
    }

    #[test]
    fn pipelines_split_by_the_hash_tags_of_first_keys() {
        let mut eval = redis::cmd("EVAL");
        eval.arg("return 1")
            .arg(2)
            .arg("tether:{ops}:s")
            .arg("tether:{ops}:r");
        assert_eq!(first_key(&eval).map(hash_tag), Some(&b"ops"[..]));
        let mut none = redis::cmd("EVAL");
        none.arg("return 1").arg(0);
        assert_eq!(first_key(&none), None);
        let mut get = redis::cmd("GET");
        get.arg("tether:np:a");
        assert_eq!(first_key(&get).map(hash_tag), Some(&b"tether:np:a"[..]));
        assert_eq!(first_key(&redis::cmd("PING")), None);
        assert_eq!(hash_tag(b"a{}b"), b"a{}b");
        assert_eq!(hash_tag(b"x{t}y{u}"), b"t");
    }

    #[test]
    fn the_masters_are_read_from_cluster_nodes() {
        let nodes = "\
07c3 127.0.0.1:30004@31004,host-d slave e7d1 0 1426238317239 4 connected
67ed 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922
292f 127.0.0.1:30003@31003 master,fail - 0 1426238318243 3 connected 10923-16383
e7d1 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460
a1b2 ::1:30005@31005 master - 0 0 5 connected
";
        assert_eq!(
            masters(nodes),
            [("127.0.0.1", 30002), ("127.0.0.1", 30001), ("::1", 30005)]
        );
    }

    #[test]
    fn only_losing_the_server_or_writes_moves_the_link() {
        let refused = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(moved(&refused));
        let other = RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "ERR",
            "wrong".to_owned(),
        ));
        assert!(!moved(&other));
    }
}
