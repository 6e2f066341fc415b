//! A client of the channel protocol (`/ws`, tether.v1) for the tests: numbers its commands,
//! keeps the pushes it passes over.

use serde_json::{json, Value};
use tether::{ClientStream, Message};

use super::{next, within, Running};

/// A channel-protocol client: numbers its commands, keeps the pushes it passes over.
pub struct Client {
    pub ws: ClientStream,
    pub next_id: u64,
    pub pushes: Vec<Value>,
}

impl Client {
    /// Opens `/ws` (with `query`) offering tether.v1, and connects.
    pub async fn open(server: &Running, query: &str) -> (Client, Value) {
        Client::open_with(server, query, json!({"op": "connect"})).await
    }

    /// Opens `/ws` (with `query`) and sends `connect`, the command given.
    pub async fn open_with(server: &Running, query: &str, connect: Value) -> (Client, Value) {
        let ws = open_raw(server, query).await;
        let mut client = Client {
            ws,
            next_id: 1,
            pushes: Vec::new(),
        };
        let connected = client.call(connect).await;
        (client, connected)
    }

    pub async fn send(&mut self, mut command: Value) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        command["id"] = id.into();
        self.ws
            .send(Message::text(command.to_string()))
            .await
            .unwrap();
        id
    }

    /// Sends `command` and returns its reply; pushes met on the way are kept.
    pub async fn call(&mut self, command: Value) -> Value {
        let id = self.send(command).await;
        loop {
            let message = next(&mut self.ws).await;
            if message.get("id").is_some() {
                assert_eq!(message["id"], id, "replies come in order: {message}");
                return message;
            }
            self.pushes.push(message);
        }
    }

    /// The next push of `kind` (those kept first).
    pub async fn push(&mut self, kind: &str) -> Value {
        if let Some(i) = self.pushes.iter().position(|p| p["type"] == kind) {
            return self.pushes.remove(i);
        }
        loop {
            let message = next(&mut self.ws).await;
            assert!(
                message.get("id").is_none(),
                "an unexpected reply: {message}"
            );
            if message["type"] == kind {
                return message;
            }
            self.pushes.push(message);
        }
    }

    /// Subscribes to `channel` (no resume); returns the reply.
    pub async fn subscribe(&mut self, channel: &str) -> Value {
        self.call(json!({"op": "subscribe", "channel": channel}))
            .await
    }

    /// Publishes `text` to `channel`; returns the reply.
    pub async fn publish(&mut self, channel: &str, text: &str) -> Value {
        let data = json!({ "text": text });
        self.call(json!({"op": "publish", "channel": channel, "data": data}))
            .await
    }

    /// Pings and returns the pushes that came before the pong, with those kept.
    pub async fn drain(&mut self) -> Vec<Value> {
        self.call(json!({"op": "ping"})).await;
        std::mem::take(&mut self.pushes)
    }
}

/// Opens `/ws{query}` offering tether.v1, which the server must agree to.
pub async fn open_raw(server: &Running, query: &str) -> ClientStream {
    let url = server.ws(&format!("/ws{query}"));
    let (ws, response) = within(
        tether::ClientBuilder::new(&url)
            .unwrap()
            .protocol("tether.v1")
            .connect(),
    )
    .await
    .expect("the upgrade is accepted");
    assert_eq!(response.protocol.as_deref(), Some("tether.v1"));
    ws
}

pub fn error_code(reply: &Value) -> u64 {
    reply["error"]["code"]
        .as_u64()
        .unwrap_or_else(|| panic!("an error: {reply}"))
}
