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
    for s in SETTINGS {
        let var = format!("TUNNEL_{}", s.name.to_ascii_uppercase());
        let mentioned =
            text.lines().any(|l| l.strip_prefix("# ").is_some_and(|l| l.starts_with(&format!("{var}=")) || l.starts_with(&format!("{var}:"))));
        assert!(mentioned, "deploy/relay.env.example does not show {var}");
        // The default `tunnel server --set help` prints is the one this file shows.
        if let Some((_, v)) = shown.iter().find(|(k, _)| *k == var && !examples.contains(&k.as_str())) {
            if !v.is_empty() && !v.starts_with('<') {
                assert_eq!(s.default, v, "{var}: `--set help` says the default is {:?}, deploy/relay.env.example shows {v:?}", s.default);
            }
        }
    }
    let base = with(&[]);
    for (k, v) in &shown {
        if !examples.contains(&k.as_str()) {
            assert_eq!(with(&[(k, v)]), base, "{k}={v} in deploy/relay.env.example is not the default");
        }
    }
}

#[test]
fn the_readme_settings_table_lists_every_setting() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).expect("README.md");
    for s in SETTINGS {
        let var = format!("`TUNNEL_{}`", s.name.to_ascii_uppercase());
        assert!(readme.lines().any(|l| l.starts_with("| ") && l.contains(&var)), "README.md's settings table has no row for {var}");
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
    for needed in [
        "ExecReload=/bin/kill -HUP $MAINPID",
        "KillSignal=SIGTERM",
        "NoNewPrivileges=yes",
        "EnvironmentFile=/etc/libtunnel/relay.env",
        // The start check is the relay's own readiness notice: it works with a TLS endpoint and
        // needs no curl.
        "Type=notify",
        // getifaddrs (the host's own addresses, which egress rules refuse) needs netlink.
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK",
    ] {
        assert!(unit.contains(needed), "the unit lacks {needed}");
    }
    for gone in ["curl", "example.invalid", "ExecStartPost"] {
        assert!(!unit.contains(gone), "the unit still has {gone}");
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("libtunnel-relay.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/tunnel", env!("CARGO_BIN_EXE_tunnel"))).expect("write the unit");
    // Documentation=man:tunnel(1): the page `tunnel man` makes, where `man` finds it.
    let man = dir.join("man/man1");
    std::fs::create_dir_all(&man).expect("man dir");
    let page = std::process::Command::new(env!("CARGO_BIN_EXE_tunnel")).arg("man").output().expect("tunnel man");
    std::fs::write(man.join("tunnel.1"), page.stdout).expect("write the man page");
    let v =
        std::process::Command::new("systemd-analyze").arg("verify").arg(&path).env("MANPATH", dir.join("man")).output().expect("run systemd-analyze");
    let said = format!("{}{}", String::from_utf8_lossy(&v.stdout), String::from_utf8_lossy(&v.stderr));
    assert!(v.status.success() && !said.contains("libtunnel-relay.service:"), "systemd-analyze verify: {said}");
}
