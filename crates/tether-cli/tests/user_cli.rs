//! `tether user` through the real binary, against the store of a running `tether serve`: list,
//! remove, passwd, tokens and revoke, each seen from the server's API too.

use std::io::Write as _;
use std::process::{Command, Stdio};

use serde_json::json;

mod common;
use common::{http, start_serve, BIN};

/// Runs `tether user ARGS` with `stdin`; returns whether it succeeded, stdout and stderr.
fn user(args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(BIN)
        .arg("user")
        .args(args)
        .env_remove("TETHER_DATA")
        .env_remove("TETHER_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn token(addr: &str, name: &str, password: &str) -> Result<String, u16> {
    let (status, body) = http(
        addr,
        "POST",
        "/api/tokens",
        None,
        Some(json!({"user": name, "password": password})),
    );
    match status {
        201 => Ok(body["token"].as_str().unwrap().to_owned()),
        other => Err(other),
    }
}

#[test]
fn users_are_listed_removed_repassworded_and_their_tokens_revoked_one_by_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    // The store is found through the config file's `data` as well as through --data.
    let config = dir.path().join("tether.toml");
    std::fs::write(&config, format!("data = {data:?}\n")).unwrap();
    let config = config.to_str().unwrap();

    for name in ["alice", "bob"] {
        let (ok, out, err) = user(
            &["add", name, "--password-stdin", "--data", data],
            "first password\n",
        );
        assert!(ok, "{err}");
        assert!(out.contains(&format!("user {name} added")), "{out}");
    }
    let (ok, _, err) = user(
        &["add", "ALICE", "--password-stdin", "--config", config],
        "first password\n",
    );
    assert!(!ok && err.contains("exists already"), "{err}");

    let server = start_serve(&["--config", config]);
    let first = token(&server.addr, "alice", "first password").unwrap();
    let second = token(&server.addr, "alice", "first password").unwrap();

    let (ok, out, _) = user(&["list", "--config", config], "");
    assert!(ok);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].starts_with("alice\t") && lines[0].ends_with("0 sessions\t2 tokens"),
        "{out}"
    );
    assert!(
        lines[1].starts_with("bob\t") && lines[1].ends_with("0 tokens"),
        "{out}"
    );

    // Tokens are listed by an id that is not the secret, and revoked one at a time.
    let (ok, out, _) = user(&["tokens", "Alice", "--data", data], "");
    assert!(ok);
    let ids: Vec<&str> = out.lines().map(|l| l.split('\t').next().unwrap()).collect();
    assert_eq!(ids.len(), 2, "{out}");
    assert!(
        out.lines()
            .all(|l| l.contains("\ttoken\tissued 20") && l.contains("expires 20")),
        "{out}"
    );
    assert!(!out.contains(&first) && !out.contains(&second));
    let (ok, out, _) = user(&["revoke", "alice", "--id", ids[0], "--data", data], "");
    assert!(ok && out.contains(&format!("revoked {}", ids[0])), "{out}");
    let alive: Vec<u16> = [&first, &second]
        .iter()
        .map(|t| http(&server.addr, "GET", "/api/me", Some(t), None).0)
        .collect();
    assert!(
        alive.contains(&200) && alive.contains(&401),
        "{alive:?}: one revoked, one kept"
    );
    let (ok, _, err) = user(
        &["revoke", "alice", "--id", "000000000000", "--data", data],
        "",
    );
    assert!(
        !ok && err.contains("alice has no session or token 000000000000"),
        "{err}"
    );

    // A new password revokes what the old one issued.
    let (ok, out, err) = user(
        &["passwd", "alice", "--password-stdin", "--data", data],
        "second password\n",
    );
    assert!(ok, "{err}");
    assert!(out.contains("password of alice changed"), "{out}");
    for t in [&first, &second] {
        assert_eq!(http(&server.addr, "GET", "/api/me", Some(t), None).0, 401);
    }
    assert_eq!(token(&server.addr, "alice", "first password"), Err(401));
    let third = token(&server.addr, "alice", "second password").unwrap();

    // Removing a user removes what they can log in with.
    let (ok, out, _) = user(&["remove", "alice", "--data", data], "");
    assert!(ok && out.contains("user alice removed"), "{out}");
    assert_eq!(
        http(&server.addr, "GET", "/api/me", Some(&third), None).0,
        401
    );
    assert_eq!(token(&server.addr, "alice", "second password"), Err(401));
    let (_, out, _) = user(&["list", "--data", data], "");
    assert!(
        out.starts_with("bob\t") && out.lines().count() == 1,
        "{out}"
    );
    let (ok, _, err) = user(&["remove", "alice", "--data", data], "");
    assert!(!ok, "removing twice fails");
    assert_eq!(
        err.trim(),
        "tether: no user named \"alice\" (tether user list shows them)"
    );
}

#[test]
fn a_password_shorter_than_eight_characters_is_refused_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    for (password, says) in [("\n", "empty"), ("hunter2\n", "too short (7 characters)")] {
        let (ok, _, err) = user(
            &["add", "bob", "--password-stdin", "--data", data],
            password,
        );
        assert!(!ok, "{password:?} was accepted");
        assert!(
            err.contains(says) && err.contains("at least 8"),
            "{password:?}: {err}"
        );
    }
    // Eight characters, counted as characters (not bytes): accepted.
    let (ok, _, err) = user(
        &["add", "bob", "--password-stdin", "--data", data],
        "motörhed\n",
    );
    assert!(ok, "{err}");
    // Changing to a short one is refused too, and the old one still holds.
    let (ok, _, err) = user(
        &["passwd", "bob", "--password-stdin", "--data", data],
        "short\n",
    );
    assert!(!ok && err.contains("at least 8"), "{err}");
    let (_, out, _) = user(&["list", "--data", data], "");
    assert!(out.starts_with("bob\t"), "{out}");
}

#[test]
fn without_a_terminal_the_password_prompt_says_how_else_to_give_it() {
    let dir = tempfile::tempdir().unwrap();
    // `setsid`: a new session, without a controlling terminal, as under a service manager.
    let out = Command::new("setsid")
        .args([BIN, "user", "add", "bob", "--data"])
        .arg(dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("setsid comes with util-linux");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--password-stdin"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
