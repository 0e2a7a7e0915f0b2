//! The deployment files in `deploy/` stay true: `relay.env.example` lists every setting of the
//! relay and each default it shows is the real default; `relay.toml.example` loads; the systemd
//! unit passes `systemd-analyze verify` (when systemd is installed) with the built binary.

use std::path::{Path, PathBuf};

use libtunnel::config::{RelayConfig, SETTINGS};

fn deploy(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(name)
}

const KEYS: &str = r#"[{"kid":1,"data":"c2VjcmV0LXNlY3JldC1zZWNyZXQ="}]"#;
const ALLOW: &str = r#"[{"host":"db.internal","port":5432}]"#;

fn with(extra: &[(&str, &str)]) -> String {
    let mut env = vec![("TUNNEL_AUTH_KEYS".to_string(), KEYS.to_string()), ("TUNNEL_ALLOW".to_string(), ALLOW.to_string())];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    format!("{:?}", RelayConfig::from_sources(None, &[], &env, &[]).unwrap_or_else(|e| panic!("{extra:?}: {e}")))
}

#[test]
fn the_env_example_lists_every_setting_with_its_real_default() {
    let text = std::fs::read_to_string(deploy("relay.env.example")).expect("deploy/relay.env.example");
    let shown: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TUNNEL_"))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (format!("TUNNEL_{k}"), v.trim_matches('\'').to_string()))
        .collect();
    for s in SETTINGS {
        let var = format!("TUNNEL_{}", s.name.to_ascii_uppercase());
        assert!(shown.iter().any(|(k, _)| *k == var), "deploy/relay.env.example does not show {var}");
    }
    // Examples of values to fill in, not defaults.
    let examples = [
        "TUNNEL_AUTH_KEYS",
        "TUNNEL_ALLOW",
        "TUNNEL_LISTENER_KEYS",
        "TUNNEL_TLS_CERT",
        "TUNNEL_TLS_KEY",
        "TUNNEL_ADMIN_TOKEN",
        "TUNNEL_EXITS",
        "TUNNEL_PUBLIC_TLS_CERT",
        "TUNNEL_PUBLIC_TLS_KEY",
    ];
    let base = with(&[]);
    for (k, v) in &shown {
        if !examples.contains(&k.as_str()) {
            assert_eq!(with(&[(k, v)]), base, "{k}={v} in deploy/relay.env.example is not the default");
        }
    }
}

#[test]
fn the_toml_example_loads() {
    let text = std::fs::read_to_string(deploy("relay.toml.example")).expect("deploy/relay.toml.example");
    let cfg = RelayConfig::from_sources(Some(&text), &[], &[], &[]).expect("the example loads");
    assert_eq!(cfg.domain, "tunnel.example.com");
    assert!(cfg.http_listen.is_some() && !cfg.auth_keys.is_empty() && !cfg.allow.is_empty() && cfg.listener_keys.len() == 1);
}

#[test]
fn the_systemd_unit_verifies() {
    let Ok(out) = std::process::Command::new("systemd-analyze").arg("--version").output() else {
        if let Some(log) = std::env::var_os("LIBTUNNEL_SKIP_LOG") {
            let line = "deploy_files: systemd-analyze is not installed; the unit was not verified\n";
            let _ =
                std::fs::OpenOptions::new().create(true).append(true).open(log).and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
        }
        eprintln!("SKIPPED: systemd-analyze is not installed");
        return;
    };
    assert!(out.status.success());
    let unit = std::fs::read_to_string(deploy("libtunnel-relay.service")).expect("deploy/libtunnel-relay.service");
    for needed in ["ExecReload=/bin/kill -HUP $MAINPID", "KillSignal=SIGTERM", "NoNewPrivileges=yes", "EnvironmentFile=/etc/libtunnel/relay.env"] {
        assert!(unit.contains(needed), "the unit lacks {needed}");
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("libtunnel-relay.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/tunnel", env!("CARGO_BIN_EXE_tunnel"))).expect("write the unit");
    let v = std::process::Command::new("systemd-analyze").arg("verify").arg(&path).output().expect("run systemd-analyze");
    let said = format!("{}{}", String::from_utf8_lossy(&v.stdout), String::from_utf8_lossy(&v.stderr));
    assert!(v.status.success() && !said.contains("libtunnel-relay.service:"), "systemd-analyze verify: {said}");
}
