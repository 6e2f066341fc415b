//! A node's subscriptions to Redis: the channels of its rooms, and the few every node hears.
//! On one Redis they are plain `SUBSCRIBE`s. On Redis Cluster a room's channels are sharded
//! (`SSUBSCRIBE`, on the shard that holds the room's keys, as the room's messages are
//! published with `SPUBLISH` by the script that stores them), and the channels every node
//! hears are plain ones, which the cluster passes to all of its nodes.

use futures_util::StreamExt as _;
use redis::aio::{PubSubSink, PubSubStream};
use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, PushKind, RedisResult};
use tokio::sync::mpsc;

use super::link::{hash_tag, Link};

/// Subscriptions on one connection: when it is lost, [`Feed::next`] ends and a new feed
/// subscribes again.
pub enum Feed {
    /// One Redis.
    Single {
        /// Where subscriptions are made.
        sink: PubSubSink,
        /// What arrives.
        messages: PubSubStream,
    },
    /// Redis Cluster.
    Cluster {
        /// Where subscriptions are made.
        con: ClusterConnection,
        /// What arrives, and the loss of a node's connection.
        pushes: mpsc::UnboundedReceiver<PushInfo>,
    },
}

impl std::fmt::Debug for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Feed::Single { .. } => "Feed::Single",
            Feed::Cluster { .. } => "Feed::Cluster",
        })
    }
}

impl Feed {
    /// Subscriptions on the master `link` uses now (a new connection), and the generation of
    /// that master ([`Link::changes`]).
    ///
    /// # Errors
    /// Redis could not be reached in time.
    pub async fn open(link: &Link, wait: std::time::Duration) -> RedisResult<(Feed, u64)> {
        if link.is_cluster() {
            let (tx, pushes) = mpsc::unbounded_channel();
            let con = link.cluster_feed(tx).await?;
            return Ok((Feed::Cluster { con, pushes }, 0));
        }
        let (client, generation) = link.client().await?;
        let pubsub = tokio::time::timeout(wait, client.get_async_pubsub())
            .await
            .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "connect timed out")))??;
        let (sink, messages) = pubsub.split();
        Ok((Feed::Single { sink, messages }, generation))
    }

    /// Subscribes to `channel`, which every node hears.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn everyone(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Feed::Single { sink, .. } => sink.subscribe(channel).await,
            Feed::Cluster { con, .. } => con.subscribe(channel).await,
        }
    }

    /// Subscribes to rooms' `channels` (each named with its room's hash tag).
    ///
    /// # Errors
    /// Redis failed.
    pub async fn listen(&mut self, channels: Vec<String>) -> RedisResult<()> {
        match self {
            Feed::Single { sink, .. } => sink.subscribe(channels).await,
            Feed::Cluster { con, .. } => {
                for group in by_slot(channels) {
                    con.ssubscribe(group).await?;
                }
                Ok(())
            }
        }
    }

    /// Unsubscribes from rooms' `channels`.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn unlisten(&mut self, channels: Vec<String>) -> RedisResult<()> {
        match self {
            Feed::Single { sink, .. } => sink.unsubscribe(channels).await,
            Feed::Cluster { con, .. } => {
                for group in by_slot(channels) {
                    con.sunsubscribe(group).await?;
                }
                Ok(())
            }
        }
    }

    /// The next message, or `None` once the connection (or, in a cluster, one node's) is
    /// lost: what was published meanwhile was missed.
    pub async fn next(&mut self) -> Option<redis::Msg> {
        match self {
            Feed::Single { messages, .. } => messages.next().await,
            Feed::Cluster { pushes, .. } => loop {
                let push = pushes.recv().await?;
                if push.kind == PushKind::Disconnection {
                    return None;
                }
                if let Some(msg) = redis::Msg::from_push_info(push) {
                    return Some(msg);
                }
            },
        }
    }
}

/// `channels` in groups of one hash tag each: a sharded subscription names one slot.
fn by_slot(channels: Vec<String>) -> Vec<Vec<String>> {
    let mut groups: Vec<Vec<String>> = Vec::new();
    let mut by: std::collections::HashMap<Vec<u8>, usize> = std::collections::HashMap::new();
    for channel in channels {
        let tag = hash_tag(channel.as_bytes()).to_vec();
        let group = *by.entry(tag).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[group].push(channel);
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharded_subscriptions_go_one_room_at_a_time() {
        let groups = by_slot(vec![
            "tether:{a}:r".into(),
            "tether:{a}:p".into(),
            "tether:{b}:r".into(),
            "tether:{b}:p".into(),
        ]);
        assert_eq!(
            groups,
            [
                vec!["tether:{a}:r".to_owned(), "tether:{a}:p".into()],
                vec!["tether:{b}:r".to_owned(), "tether:{b}:p".into()]
            ]
        );
    }
}
