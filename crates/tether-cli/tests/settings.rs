//! `tether serve`'s settings through the real binary: every one of them set in a file, in its
//! `TETHER_…` variable and as a flag, layered flag > variable > file > default; and the README's
//! table of them, which is generated from the same type so it cannot drift.

use std::process::Command;

use clap::Args as _;
use serde_json::{Map, Value};
use tether_server::config::parse_duration;
use tether_server::ServerConfig;

const BIN: &str = env!("CARGO_BIN_EXE_tether");

/// Every setting's argument, as `tether serve` declares it.
fn settings() -> Vec<clap::Arg> {
    ServerConfig::augment_args(clap::Command::new("serve"))
        .get_arguments()
        .cloned()
        .collect()
}

fn defaults() -> Map<String, Value> {
    match serde_json::to_value(ServerConfig::default()).unwrap() {
        Value::Object(map) => map,
        other => panic!("{other}"),
    }
}

/// Layer `n` (1, 2 or 3) of a setting: a valid value that differs from the default and from
/// the other layers (booleans alternate, so they differ from their neighbours).
fn sample(key: &str, default: &Value, n: u64) -> Value {
    match (key, default) {
        ("listen", _) => Value::from(format!("127.0.0.{n}:{}", 1000 + n)),
        ("poll_voters", _) => Value::from(if n == 2 { "everyone" } else { "users" }),
        ("threads", _) => Value::from(n),
        (_, Value::Bool(b)) => Value::from(if n == 2 { *b } else { !*b }),
        (_, Value::Number(x)) if x.is_f64() => Value::from(x.as_f64().unwrap() + n as f64),
        (_, Value::Number(x)) => Value::from(x.as_u64().unwrap() + n),
        (_, Value::String(s)) if parse_duration(s).is_ok() => Value::from(format!("{}s", 10 + n)),
        (_, Value::Array(_)) => Value::from(vec![format!("https://layer{n}.example")]),
        _ => Value::from(format!("{key}-layer{n}")),
    }
}

/// A value as a flag or a variable spells it.
fn spelled(value: &Value) -> Vec<String> {
    match value {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items.iter().flat_map(spelled).collect(),
        other => vec![other.to_string()],
    }
}

/// What the server would run with: `tether serve --print-config`, read back.
fn effective(
    file: Option<&Map<String, Value>>,
    env: &[(String, String)],
    flags: &[String],
) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("serve").arg("--print-config");
    for arg in settings() {
        cmd.env_remove(arg.get_env().unwrap());
    }
    cmd.env_remove("TETHER_CONFIG");
    if let Some(file) = file {
        let path = dir.path().join("tether.toml");
        std::fs::write(&path, toml::to_string(file).unwrap()).unwrap();
        cmd.arg("--config").arg(path);
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v))).args(flags);
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config: ServerConfig = toml::from_str(&stdout).unwrap();
    serde_json::to_value(config).unwrap()
}

/// The config a map of settings means, in the printed spelling.
fn normal(map: Map<String, Value>) -> Value {
    serde_json::to_value(serde_json::from_value::<ServerConfig>(Value::Object(map)).unwrap())
        .unwrap()
}

#[test]
fn every_setting_layers_flag_over_variable_over_file_over_default() {
    let defaults = defaults();
    let args = settings();
    assert_eq!(
        args.len(),
        defaults.len(),
        "every key of the file is a flag, and every flag a key"
    );
    let layer = |n: u64| -> Map<String, Value> {
        defaults
            .iter()
            .map(|(key, default)| (key.clone(), sample(key, default, n)))
            .collect()
    };
    let (file, env_layer, flag_layer) = (layer(1), layer(2), layer(3));
    let env: Vec<(String, String)> = args
        .iter()
        .map(|arg| {
            let key = arg.get_id().as_str();
            let env = arg.get_env().unwrap().to_str().unwrap().to_owned();
            assert_eq!(
                env,
                format!("TETHER_{}", key.to_uppercase()),
                "{key}'s variable"
            );
            (env, spelled(&env_layer[key]).join(","))
        })
        .collect();
    let flags: Vec<String> = args
        .iter()
        .flat_map(|arg| {
            let key = arg.get_id().as_str();
            let long = format!("--{}", arg.get_long().unwrap());
            spelled(&flag_layer[key])
                .into_iter()
                .flat_map(move |v| [long.clone(), v])
        })
        .collect();

    assert_eq!(effective(None, &[], &[]), Value::Object(defaults.clone()));
    assert_eq!(effective(Some(&file), &[], &[]), normal(file.clone()));
    assert_eq!(effective(None, &env, &[]), normal(env_layer.clone()));
    assert_eq!(effective(Some(&file), &env, &[]), normal(env_layer.clone()));
    assert_eq!(
        effective(Some(&file), &env, &flags),
        normal(flag_layer.clone())
    );
    // Layers mix setting by setting: a flag for one, a variable for another, the file for the
    // rest.
    let mut mixed = file.clone();
    mixed.insert("history_limit".into(), flag_layer["history_limit"].clone());
    mixed.insert("write_timeout".into(), env_layer["write_timeout"].clone());
    assert_eq!(
        effective(
            Some(&file),
            &[("TETHER_WRITE_TIMEOUT".into(), "12s".into())],
            &[
                "--history-limit".into(),
                flag_layer["history_limit"].to_string()
            ]
        ),
        normal(mixed)
    );
}

#[test]
fn a_bad_setting_names_itself() {
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let out = Command::new(BIN)
            .arg("serve")
            .arg("--print-config")
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8(out.stderr).unwrap()
    };
    let e = run(&["--write-timeout", "soon"], &[]);
    assert!(
        e.contains("--write-timeout") && e.contains("30s, 5m"),
        "{e}"
    );
    let e = run(&[], &[("TETHER_HISTORY_LIMIT", "many")]);
    assert!(e.contains("--history-limit"), "{e}");
    let e = run(&["--ping-interval", "0"], &[]);
    assert!(e.contains("ping_interval must be more than 0s"), "{e}");
    let e = run(&["--tls-cert", "cert.pem"], &[]);
    assert!(e.contains("tls_cert and tls_key go together"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tether.toml");
    std::fs::write(&file, "listn = \"8080\"\n").unwrap();
    let e = run(&["--config", file.to_str().unwrap()], &[]);
    assert!(e.contains("tether.toml") && e.contains("listn"), "{e}");
    std::fs::write(&file, "write_timeout = \"soon\"\n").unwrap();
    let e = run(&["--config", file.to_str().unwrap()], &[]);
    assert!(e.contains("write_timeout") && e.contains("30s, 5m"), "{e}");
}

/// The README's table of settings, from the arguments' names, variables, defaults and help.
fn table() -> String {
    let mut out = String::from("| key | flag | variable | default | |\n|---|---|---|---|---|\n");
    for arg in settings() {
        let defaults: Vec<_> = arg
            .get_default_values()
            .iter()
            .map(|v| format!("`{}`", v.to_string_lossy()))
            .collect();
        let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
        out.push_str(&format!(
            "| `{}` | `--{}` | `{}` | {} | {} |\n",
            arg.get_id(),
            arg.get_long().unwrap(),
            arg.get_env().unwrap().to_string_lossy(),
            if defaults.is_empty() {
                "none".into()
            } else {
                defaults.join(", ")
            },
            help.replace('|', "\\|")
        ));
    }
    out
}

#[test]
fn the_readme_lists_every_setting_as_the_type_declares_it() {
    const BEGIN: &str =
        "<!-- settings: generated from ServerConfig by crates/tether-cli/tests/settings.rs -->\n";
    const END: &str = "<!-- settings end -->";
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md");
    let readme = std::fs::read_to_string(path).unwrap();
    let start = readme.find(BEGIN).expect("the README marks its table") + BEGIN.len();
    let end = readme[start..].find(END).expect("the table ends") + start;
    let want = table();
    if readme[start..end] != want {
        if std::env::var_os("TETHER_BLESS").is_some() {
            std::fs::write(
                path,
                format!("{}{want}{}", &readme[..start], &readme[end..]),
            )
            .unwrap();
        } else {
            panic!(
                "README.md's settings table is out of date; regenerate it with \
                 TETHER_BLESS=1 cargo test -p tether-cli --test settings\n{want}"
            );
        }
    }
}
