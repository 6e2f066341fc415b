//! Guest nicknames: a nickname belongs to one guest while any of that guest's connections uses
//! it, so nobody else can speak or vote under it meanwhile. A guest is the random id in its
//! `tether_guest` cookie (issued with its first upgrade; a client without cookies is a new guest
//! on every connection). The table lives on this node and holds only names in use; in a
//! cluster each name is also claimed in Redis (see `Cluster::claim_nickname`), so a guest on
//! another node cannot take it either.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The name of the guest cookie.
pub const GUEST_COOKIE: &str = "tether_guest";

#[derive(Debug)]
struct Holder {
    guest: Box<str>,
    connections: u32,
}

/// The nicknames in use, each with the guest that holds it. A name's key (lowercase) is one
/// allocation shared by the table and every hold on it.
#[derive(Debug, Default)]
pub struct Nicknames {
    held: Mutex<HashMap<Arc<str>, Holder>>,
    /// Where names no longer used here go (name, guest), to be released in the cluster.
    released: std::sync::OnceLock<tokio::sync::mpsc::Sender<(String, String)>>,
}

/// A connection's hold on a nickname; the last one dropped frees the name.
#[derive(Debug)]
pub struct NickHold {
    names: Arc<Nicknames>,
    key: Arc<str>,
}

impl Nicknames {
    /// An empty table.
    pub fn new() -> Arc<Nicknames> {
        Arc::new(Nicknames::default())
    }

    /// Holds `name` (compared without ASCII case) for `guest`; `None` when another guest holds
    /// it.
    pub fn hold(self: &Arc<Self>, name: &str, guest: &str) -> Option<NickHold> {
        let lower = name.to_ascii_lowercase();
        let mut held = self.lock();
        let key = match held.get_key_value(lower.as_str()) {
            Some((key, holder)) if &*holder.guest == guest => key.clone(),
            Some(_) => return None,
            None => {
                let key: Arc<str> = lower.into();
                let holder = Holder {
                    guest: guest.into(),
                    connections: 0,
                };
                held.insert(key.clone(), holder);
                key
            }
        };
        if let Some(holder) = held.get_mut(&*key) {
            holder.connections += 1;
        }
        Some(NickHold {
            names: self.clone(),
            key,
        })
    }

    /// Sends every name this node stops using, with its guest, to `tx`.
    pub fn share_releases(&self, tx: tokio::sync::mpsc::Sender<(String, String)>) {
        let _ = self.released.set(tx);
    }

    /// Whether `guest` holds `name` (lowercase) here.
    pub fn holds(&self, name: &str, guest: &str) -> bool {
        self.lock().get(name).is_some_and(|h| &*h.guest == guest)
    }

    /// The names in use here (lowercase) and their guests.
    pub fn held(&self) -> Vec<(String, String)> {
        self.lock()
            .iter()
            .map(|(name, holder)| (name.to_string(), holder.guest.to_string()))
            .collect()
    }

    /// Names in use.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no name is in use.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Holder>> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl NickHold {
    /// The name held, lowercase.
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl Drop for NickHold {
    fn drop(&mut self) {
        let mut held = self.names.lock();
        if let Some(holder) = held.get_mut(&*self.key) {
            holder.connections -= 1;
            if holder.connections == 0 {
                if let Some(holder) = held.remove(&*self.key) {
                    if let Some(tx) = self.names.released.get() {
                        let _ = tx.try_send((self.key.to_string(), holder.guest.into()));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_belongs_to_one_guest_while_in_use() {
        let names = Nicknames::new();
        let tab1 = names.hold("Bob", "guest-1").unwrap();
        let tab2 = names
            .hold("bob", "guest-1")
            .expect("the same guest, another tab");
        assert!(names.hold("BOB", "guest-2").is_none(), "another guest");
        drop(tab1);
        assert!(
            names.hold("bob", "guest-2").is_none(),
            "still in use by tab 2"
        );
        drop(tab2);
        assert!(names.is_empty());
        let _taken = names.hold("bob", "guest-2").expect("free again");
    }
}
