//! The deployment files in `deploy/` stay true: the files generated from the settings table
//! (`relay.env.example`, `docs/reference/settings.md`) are current, `relay.env.example` lists every
//! setting of the relay and each default it shows is the real default; `relay.toml.example` loads;
//! the systemd unit passes `systemd-analyze verify` (when systemd is installed) with the built binary.

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

/// `LIBTUNNEL_REGENERATE=1 cargo test -p libtunnel --features cli --test it deploy_files::` rewrites them.
#[test]
fn the_files_generated_from_the_settings_table_are_current() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let regenerate = std::env::var_os("LIBTUNNEL_REGENERATE").is_some_and(|v| v == "1");
    for (path, text) in libtunnel::config::settings::generated_files() {
        let file = root.join(path);
        if regenerate {
            std::fs::create_dir_all(file.parent().expect("a folder")).expect("mkdir");
            std::fs::write(&file, &text).unwrap_or_else(|e| panic!("write {path}: {e}"));
        }
        let now = std::fs::read_to_string(&file).unwrap_or_default();
        assert!(
            now == text,
            "{path} is stale: the settings table (core/src/config/settings.rs) changed; regenerate it with \
             LIBTUNNEL_REGENERATE=1 cargo test -p libtunnel --features cli --test it deploy_files::"
        );
    }
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
        if !examples.contains(&k.as_str()) && !v.starts_with('<') {
            assert_eq!(with(&[(k, v)]), base, "{k}={v} in deploy/relay.env.example is not the default");
        }
    }
}

#[test]
fn the_settings_reference_lists_every_setting() {
    let page =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/reference/settings.md")).expect("docs/reference/settings.md");
    for s in SETTINGS {
        let var = format!("`TUNNEL_{}`", s.name.to_ascii_uppercase());
        assert!(page.lines().any(|l| l.starts_with("| ") && l.contains(&var)), "docs/reference/settings.md has no row for {var}");
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

// ---- docs/reference/: pages generated from the code ----------------------------------------------
// errors.md from `ErrorCode` (numbers, names, and the doc line of each variant in error.rs),
// metrics.md from the Prometheus series the relay's source writes (`# HELP` lines and the
// `counter(name, help, kind, …)` calls, wherever they are under core/src), cli.md from the
// `--help` of `tunnel` and each subcommand. The test fails when a checked-in page differs;
// `UPDATE_DOCS=1 cargo test -p libtunnel --features cli --test it deploy_files::reference` rewrites them.

fn core_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

const GENERATED: &str = "<!-- generated from the code by core/tests/it/deploy_files.rs (reference pages); do not edit: run\n     UPDATE_DOCS=1 cargo test -p libtunnel --features cli --test it deploy_files::reference -->\n";

/// The `///` lines right above `Variant = N,` in error.rs, joined.
fn variant_docs(source: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let mut doc: Vec<&str> = Vec::new();
    for line in source.lines().map(str::trim) {
        if let Some(d) = line.strip_prefix("///") {
            doc.push(d.trim());
        } else if let Some((_, n)) = line.strip_suffix(',').and_then(|l| l.split_once(" = ")) {
            if let Ok(n) = n.parse::<u32>() {
                out.push((n, doc.join(" ")));
            }
            doc.clear();
        } else {
            doc.clear();
        }
    }
    out
}

fn errors_page() -> String {
    use libtunnel::ErrorCode;
    let source = std::fs::read_to_string(core_dir().join("src/error.rs")).expect("core/src/error.rs");
    let docs = variant_docs(&source);
    let mut s = format!(
        "# Errors\n\n{GENERATED}\nEvery error a user can meet has a stable code and a message naming the cause and the fix; every face\n\
         uses this one table (`ErrorCode` in `core/src/error.rs`). Rust: `Error::code()`; C: the `tunnel_result` is 7000 + the\n\
         code (`TUNNEL_RESULT_<NAME>`; 71xx are C-only); Python: `TunnelError.code` is the name; Node: `err.tunnelCode` is the\n\
         name and `err.code` the Node-style code. The CLI prints `error [NAME]: message` and exits 2 for configuration and\n\
         argument errors, 1 otherwise.\n\n| Code | Name | Node `err.code` | When |\n|---|---|---|---|\n"
    );
    for c in ErrorCode::ALL {
        let doc = docs
            .iter()
            .find(|(n, _)| *n == c.number())
            .map(|(_, d)| d.as_str())
            .unwrap_or_else(|| panic!("no doc line for {} in error.rs", c.name()));
        assert!(!doc.is_empty(), "ErrorCode::{} has no doc comment in core/src/error.rs", c.name());
        s += &format!("| {} | `{}` | `{}` | {} |\n", c.number(), c.name(), c.errno_name(), doc);
    }
    s
}

/// After a `,` (and whitespace), the string literal there, and what follows it.
fn next_literal(text: &str) -> Option<(String, &str)> {
    text.trim_start().strip_prefix(',').map(str::trim_start).and_then(literal)
}

/// The string literal starting at `text[0]` (a `"`), unescaped, and what follows it.
fn literal(text: &str) -> Option<(String, &str)> {
    let mut out = String::new();
    let mut chars = text.strip_prefix('"')?.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &text[i + 2..])),
            '\\' => match chars.next()?.1 {
                'n' => out.push('\n'),
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read core/src") {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn metrics_page() -> String {
    let mut files = Vec::new();
    rust_files(&core_dir().join("src"), &mut files);
    files.sort();
    // name -> (kind, help)
    let mut series: std::collections::BTreeMap<String, (String, String)> = Default::default();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("read a source file");
        // `counter("libtunnel_x", "help", "kind", …)`
        let mut rest = text.as_str();
        while let Some(i) = rest.find("\"libtunnel_") {
            rest = &rest[i..];
            let Some((name, after)) = literal(rest) else { break };
            rest = after;
            if let Some((help, after)) = next_literal(after) {
                if let Some((kind, _)) = next_literal(after) {
                    if ["counter", "gauge", "histogram"].contains(&kind.as_str()) && !name.contains(' ') {
                        series.insert(name, (kind, help));
                    }
                }
            }
        }
        // `"# HELP libtunnel_x help…\n# TYPE libtunnel_x kind…"` in a format string
        for (i, _) in text.match_indices("# HELP libtunnel_") {
            let line = &text[i + "# HELP ".len()..];
            let end = line.find(['"', '\n']).unwrap_or(line.len());
            let line = line[..end].split("\\n").next().unwrap_or_default();
            let (name, help) = line.split_once(' ').expect("# HELP NAME TEXT");
            let kind = text
                .split(&format!("# TYPE {name} "))
                .nth(1)
                .and_then(|t| t.split(|c: char| !c.is_ascii_alphabetic()).next())
                .unwrap_or_else(|| panic!("{name} has no # TYPE line in {}", f.display()));
            series.insert(name.to_string(), (kind.to_string(), help.to_string()));
        }
    }
    assert!(series.len() >= 20, "found only {} metric series under core/src: has the way they are written changed?", series.len());
    let mut s = format!(
        "# Metrics\n\n{GENERATED}\nThe relay's `/metrics` (Prometheus text). Without `admin_listen` it is served on the tunnel endpoint; with it, only\n\
         on the admin endpoint behind `admin_token` ([guide/relay.md](../guide/relay.md#metrics-logs-health)). The\n\
         `libtunnel_http_listener_*` series appear once a listener served a public request, the `libtunnel_cluster_*` ones on\n\
         a node of a cluster ([guide/cluster.md](../guide/cluster.md)).\n\n| Series | Type | What |\n|---|---|---|\n"
    );
    for (name, (kind, help)) in &series {
        s += &format!("| `{name}` | {kind} | {} |\n", help.replace('|', "\\|"));
    }
    s
}

fn cli_page() -> String {
    let help = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_tunnel"))
            .args(args)
            .arg("--help")
            .env_remove("COLUMNS")
            .output()
            .expect("run tunnel --help");
        assert!(o.status.success() && o.stderr.is_empty(), "tunnel {args:?} --help: {o:?}");
        String::from_utf8(o.stdout).expect("UTF-8 help")
    };
    let top = help(&[]);
    let subcommands: Vec<String> = top
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect();
    assert!(subcommands.len() >= 5, "no subcommands found in:\n{top}");
    let mut s = format!("# The `tunnel` command\n\n{GENERATED}\nEvery subcommand's `--help`, as `tunnel` prints it. Guides: [relay](../guide/relay.md), [clients](../guide/client.md),\n[listeners](../guide/listeners.md).\n\n");
    s += &format!("## `tunnel`\n\n```text\n{}```\n", top);
    for c in &subcommands {
        s += &format!("\n## `tunnel {c}`\n\n```text\n{}```\n", help(&[c]));
    }
    s
}

#[test]
fn reference_pages_are_up_to_date() {
    let dir = core_dir().join("../docs/reference");
    let mut stale = Vec::new();
    for (file, fresh) in [("errors.md", errors_page()), ("metrics.md", metrics_page()), ("cli.md", cli_page())] {
        let path = dir.join(file);
        if std::env::var_os("UPDATE_DOCS").is_some() {
            std::fs::create_dir_all(&dir).expect("create docs/reference");
            std::fs::write(&path, &fresh).expect("write a reference page");
        } else if std::fs::read_to_string(&path).ok().as_deref() != Some(fresh.as_str()) {
            stale.push(file);
        }
    }
    assert!(
        stale.is_empty(),
        "docs/reference/{{{}}} differ from what the code generates: run\n  UPDATE_DOCS=1 cargo test -p libtunnel --features cli --test it deploy_files::reference\nand commit the result",
        stale.join(",")
    );
}
