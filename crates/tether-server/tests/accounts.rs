//! The accounts contract, one test body run against both engines: the node's SQLite file and
//! a real `redis-server`. What one answers, the other must answer too.

use std::time::Duration;

use tether_server::engine::accounts::{RedisAccounts, SqliteAccounts};
use tether_server::engine::store::{CredentialKind, Db, Store, StoreError};
use tether_server::engine::{Accounts, Revocations};
use tether_server::identity::auth::digest;

mod common;

/// Runs the contract on `accounts`, whose revocations are signalled on `revocations`.
async fn contract(accounts: &dyn Accounts, revocations: &Revocations) {
    // Names are unique ignoring case, and kept as registered.
    accounts.add_user("Alice", "hash-1").await.unwrap();
    accounts.add_user("bob", "hash-b").await.unwrap();
    let again = accounts.add_user("ALICE", "x").await;
    assert!(matches!(again, Err(StoreError::UserExists(_))), "{again:?}");
    assert_eq!(
        accounts.user_named_like("alice").await.unwrap().as_deref(),
        Some("Alice")
    );
    assert_eq!(accounts.user_named_like("carol").await.unwrap(), None);
    // A password is checked only under the name as registered.
    assert_eq!(
        accounts.password_hash("Alice").await.unwrap().as_deref(),
        Some("hash-1")
    );
    assert_eq!(accounts.password_hash("alice").await.unwrap(), None);

    // Credentials: of a kind, with a lifetime or none.
    let (session, token, expired) = (digest("s-1"), digest("t-1"), digest("x-1"));
    let hour = Some(Duration::from_secs(3600));
    accounts
        .add_credential(session, "Alice", CredentialKind::Session, hour)
        .await
        .unwrap();
    accounts
        .add_credential(token, "Alice", CredentialKind::Token, None)
        .await
        .unwrap();
    accounts
        .add_credential(
            expired,
            "Alice",
            CredentialKind::Token,
            Some(Duration::ZERO),
        )
        .await
        .unwrap();
    let user_of = |d, kind| accounts.credential_user(d, kind);
    assert_eq!(
        user_of(session, CredentialKind::Session)
            .await
            .unwrap()
            .as_deref(),
        Some("Alice")
    );
    assert_eq!(user_of(session, CredentialKind::Token).await.unwrap(), None);
    assert_eq!(
        user_of(token, CredentialKind::Token)
            .await
            .unwrap()
            .as_deref(),
        Some("Alice")
    );
    assert_eq!(user_of(expired, CredentialKind::Token).await.unwrap(), None);
    assert_eq!(
        user_of(digest("unknown"), CredentialKind::Token)
            .await
            .unwrap(),
        None
    );

    // Listed without the expired one, and never with a secret.
    let users = accounts.users().await.unwrap();
    let listed: Vec<_> = users
        .iter()
        .map(|u| (u.name.as_str(), u.sessions, u.tokens))
        .collect();
    assert_eq!(listed, [("Alice", 1, 1), ("bob", 0, 0)]);
    let held = accounts.credentials("Alice").await.unwrap();
    assert_eq!(held.len(), 2, "{held:?}");
    assert!(held.iter().all(|c| c.id.len() == 12 && c.created.is_some()));
    let token_info = held
        .iter()
        .find(|c| c.kind == CredentialKind::Token)
        .unwrap();
    assert_eq!(token_info.expires, None);

    // Tokens without an expiry get one.
    assert_eq!(
        accounts
            .bound_token_lifetimes(Duration::from_secs(60))
            .await
            .unwrap(),
        1
    );
    let held = accounts.credentials("Alice").await.unwrap();
    assert!(held.iter().all(|c| c.expires.is_some()), "{held:?}");

    // No credential for someone who is not a user (any more), or under another spelling.
    for nobody in ["carol", "alice"] {
        let refused = accounts
            .add_credential(digest("c-1"), nobody, CredentialKind::Session, hour)
            .await;
        assert!(refused.is_err(), "{nobody}: {refused:?}");
    }

    // Every way a credential goes is signalled; a call that revokes nothing is not.
    let mut told = revocations.subscribe();
    let id = token_info.id.clone();
    assert_eq!(
        accounts.revoke_credential("alice", &id).await.unwrap(),
        0,
        "only under the exact name"
    );
    assert_eq!(
        accounts
            .revoke_credential("Alice", "000000000000")
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        accounts.delete_credential(digest("unknown")).await.unwrap(),
        0
    );
    assert!(!told.has_changed().unwrap());
    assert_eq!(accounts.revoke_credential("Alice", &id).await.unwrap(), 1);
    assert!(told.has_changed().unwrap());
    told.mark_unchanged();
    assert_eq!(user_of(token, CredentialKind::Token).await.unwrap(), None);
    assert_eq!(accounts.delete_credential(session).await.unwrap(), 1);
    assert!(told.has_changed().unwrap());
    told.mark_unchanged();
    assert_eq!(
        user_of(session, CredentialKind::Session).await.unwrap(),
        None
    );

    // Revoking all of a user's, under any case of the name.
    for secret in ["s-2", "s-3"] {
        accounts
            .add_credential(digest(secret), "Alice", CredentialKind::Session, hour)
            .await
            .unwrap();
    }
    assert_eq!(accounts.revoke_credentials("ALICE").await.unwrap(), 2);
    assert!(told.has_changed().unwrap());
    told.mark_unchanged();
    assert_eq!(accounts.credentials("Alice").await.unwrap(), []);

    // A new password revokes what the old one issued.
    accounts
        .add_credential(digest("s-4"), "Alice", CredentialKind::Session, hour)
        .await
        .unwrap();
    assert!(!accounts.set_password_hash("alice", "hash-2").await.unwrap());
    assert!(accounts.set_password_hash("Alice", "hash-2").await.unwrap());
    assert!(told.has_changed().unwrap());
    told.mark_unchanged();
    assert_eq!(
        accounts.password_hash("Alice").await.unwrap().as_deref(),
        Some("hash-2")
    );
    assert_eq!(
        user_of(digest("s-4"), CredentialKind::Session)
            .await
            .unwrap(),
        None
    );

    // Removing a user takes their credentials; the name is free again.
    accounts
        .add_credential(digest("t-5"), "bob", CredentialKind::Token, hour)
        .await
        .unwrap();
    assert!(!accounts.remove_user("BOB").await.unwrap());
    assert!(accounts.remove_user("bob").await.unwrap());
    assert!(told.has_changed().unwrap());
    assert_eq!(
        user_of(digest("t-5"), CredentialKind::Token).await.unwrap(),
        None
    );
    assert_eq!(accounts.user_named_like("bob").await.unwrap(), None);
    accounts.add_user("BOB", "hash-B").await.unwrap();
    let names: Vec<String> = accounts
        .users()
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.name)
        .collect();
    assert_eq!(names, ["Alice", "BOB"]);
}

#[tokio::test]
async fn accounts_in_sqlite_keep_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::new(Store::open(dir.path()).unwrap()).unwrap();
    let revocations = Revocations::default();
    contract(&SqliteAccounts::new(db, revocations.clone()), &revocations).await;
}

#[tokio::test]
async fn accounts_in_redis_keep_the_contract() {
    let redis = common::RedisServer::start();
    let revocations = Revocations::default();
    let accounts =
        RedisAccounts::connect(&redis.url, 0, "test".into(), revocations.clone()).unwrap();
    contract(&accounts, &revocations).await;
}
