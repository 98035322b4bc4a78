//! `conlogd`'s configuration as a user meets it: `--print-config`, and one-line errors for
//! unknown keys, bad values and an unsafe listen address.

use crate::support;

use std::process::{Command, Output};
use support::*;

/// Runs `conlogd` with `args`, optionally with `yaml` as its config file, on throw-away
/// directories (so that a daemon that wrongly starts touches nothing shared).
async fn conlogd(yaml: Option<&str>, args: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(conlogd_bin());
    cmd.arg("--runtime-dir")
        .arg(dir.path().join("run"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--metrics", "127.0.0.1:0"])
        .env("NO_COLOR", "1")
        .args(args);
    if let Some(yaml) = yaml {
        let path = dir.path().join("conlogd.yaml");
        std::fs::write(&path, yaml).unwrap();
        cmd.arg("--config").arg(path);
    }
    run_bounded_async(cmd).await
}

/// A refused configuration: non-zero exit, one line on stderr, returned.
fn one_line_error(output: &Output) -> String {
    assert!(
        !output.status.success(),
        "conlogd accepted a bad configuration: {}",
        describe(output)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    let text = strip_ansi(stderr.trim_end());
    assert!(
        !text.is_empty() && !text.contains('\n'),
        "not a one-line error: {}",
        describe(output)
    );
    text
}

#[tokio::test]
async fn print_config_shows_the_effective_yaml() {
    let output = conlogd(None, &["--print-config", "--listen", "127.0.0.1:0"]).await;
    assert!(output.status.success(), "{}", describe(&output));
    let yaml = String::from_utf8_lossy(&output.stdout);
    for expected in [
        "max_size: 2MiB",
        "max_backups: 3",
        "mode: rotate",
        "max_age: 0s",
        "removed_retention: 0s",
        "token_ttl: 30s",
        "listen: 127.0.0.1:0",
        // Every limit of design section 4, with its default.
        "guests: 10000",
        "streams_per_guest: 16",
        "clients_per_console: 64",
        "pending_handoffs: 1024",
        "calls_per_connection: 256",
        "tcp_connections: 1024",
        "connections_per_peer: 64",
        "calls_total: 16384",
        "remote_calls_total: 1024",
        "calls_per_peer: 256",
        "calls_per_guest: 64",
        "idle_timeout: 20s",
        "body_timeout: 10s",
        "web_body_bytes: 16MiB",
        "remote_replay_bytes: 16MiB",
        "input_rate: 256KiB",
        "message_size: 1MiB",
        "total_log_bytes: 160GiB",
        "max_ttl: 1d",
        "tls: null",
    ] {
        assert!(yaml.contains(expected), "missing {expected:?} in:\n{yaml}");
    }

    // A file and flags combine; the result is printed in the same units.
    let output = conlogd(
        Some("logs:\n  max_size: 8KiB\n  mode: truncate\nhandoff:\n  token_ttl: 2m\n"),
        &["--print-config"],
    )
    .await;
    assert!(output.status.success(), "{}", describe(&output));
    let yaml = String::from_utf8_lossy(&output.stdout);
    for expected in ["max_size: 8KiB", "mode: truncate", "token_ttl: 2m"] {
        assert!(yaml.contains(expected), "missing {expected:?} in:\n{yaml}");
    }
}

#[tokio::test]
async fn unknown_keys_are_refused_with_line_and_column() {
    let output = conlogd(
        Some("logs:\n  max_size: 1MiB\n  max_sise: 3\n"),
        &["--listen", "127.0.0.1:0"],
    )
    .await;
    let text = one_line_error(&output);
    for expected in ["max_sise", "line", "column"] {
        assert!(text.contains(expected), "missing {expected:?}: {text}");
    }
    assert!(text.contains("line 3"), "{text}");

    let output = conlogd(Some("log_level: info\nlsten: 127.0.0.1:0\n"), &[]).await;
    let text = one_line_error(&output);
    assert!(text.contains("lsten") && text.contains("line 2"), "{text}");
}

/// The very first key of the file is where a typo is most likely; its position is reported
/// too (serde_yaml leaves out "line 1 column 1", so the daemon has to add it).
#[tokio::test]
async fn unknown_key_on_the_first_line_names_line_1() {
    let output = conlogd(Some("lsten: 127.0.0.1:0\n"), &[]).await;
    let text = one_line_error(&output);
    assert!(text.contains("lsten"), "{text}");
    assert!(
        text.contains("line 1") && text.contains("column 1"),
        "{text}"
    );
}

/// Every bad value is a one-line error that names the key and what is wrong with it.
#[tokio::test]
async fn bad_values_are_one_line_errors() {
    for (yaml, expected) in [
        (
            "logs:\n  max_size: 2XB\n",
            &["logs.max_size", "2XB", "line 2"][..],
        ),
        ("logs:\n  max_size: 1KiB\n", &["logs.max_size", "4KiB"]),
        (
            "logs:\n  mode: sideways\n",
            &["sideways", "rotate", "truncate"],
        ),
        ("logs:\n  max_backups: -1\n", &["max_backups", "line 2"]),
        ("handoff:\n  token_ttl: soon\n", &["token_ttl", "soon"]),
        ("handoff:\n  token_ttl: 0s\n", &["handoff.token_ttl"]),
        (
            "logs:\n  max_age: 1500ms\n",
            &["logs.max_age", "whole seconds"],
        ),
        (
            "logs:\n  removed_retention: 4000d\n",
            &["logs.removed_retention", "3650d"],
        ),
        ("logs:\n  max_age: old\n", &["max_age", "old"]),
        ("listen: not-an-address\n", &["listen", "line 1"]),
        ("insecure: maybe\n", &["insecure", "line 1"]),
        (
            "logs:\n  compress: gzip\n",
            &["gzip", "none", "zstd", "line 2"],
        ),
        (
            "compression:\n  frame_size: 4KiB\n",
            &["compression.frame_size", "64KiB", "1MiB"],
        ),
        ("compression:\n  level: 22\n", &["compression.level", "19"]),
        ("compression:\n  threads: 0\n", &["compression.threads"]),
        ("compression:\n  queue: 0\n", &["compression.queue"]),
        (
            "consoles:\n  socket_group: no-such-group-conlog\n",
            &[
                "consoles.socket_group",
                "no-such-group-conlog",
                "/etc/group",
            ],
        ),
    ] {
        let output = conlogd(Some(yaml), &["--listen", "127.0.0.1:0"]).await;
        let text = one_line_error(&output);
        for word in expected {
            assert!(text.contains(word), "{yaml:?}: missing {word:?} in {text}");
        }
    }
}

#[tokio::test]
async fn non_loopback_listen_needs_tls_or_insecure() {
    let output = conlogd(None, &["--listen", "0.0.0.0:0"]).await;
    let text = one_line_error(&output);
    assert!(text.contains("insecure: true"), "{text}");
    assert!(text.contains("tls.cert"), "{text}");

    // Security values are checked like every other.
    for (yaml, key) in [
        ("limits:\n  calls_total: 0\n", "limits.calls_total"),
        ("limits:\n  message_size: 1KiB\n", "limits.message_size"),
        ("limits:\n  input_rate: 10B\n", "limits.input_rate"),
        (
            "limits:\n  total_log_bytes: 1KiB\n",
            "limits.total_log_bytes",
        ),
        ("tokens:\n  max_ttl: 0s\n", "tokens.max_ttl"),
        ("tls:\n  cert: cert.pem\n  key: /k.pem\n", "tls.cert"),
        ("tls:\n  key: /k.pem\n", "cert"),
    ] {
        let output = conlogd(Some(yaml), &["--print-config"]).await;
        let text = one_line_error(&output);
        assert!(text.contains(key), "{yaml:?}: {text}");
    }

    let output = conlogd(Some("listen: 0.0.0.0:0\n"), &[]).await;
    let text = one_line_error(&output);
    assert!(text.contains("insecure: true"), "{text}");
}

/// `insecure: true` is allowed, and said loudly at every start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_is_a_warning_at_every_start() {
    let mut daemon = Daemon::start_with(Some("insecure: true\n"), &[]).await;
    for run in 0..2 {
        let stderr = daemon.stderr();
        assert!(
            stderr
                .lines()
                .any(|l| l.contains("WARN") && l.contains("insecure: true")),
            "run {run}: no warning:\n{stderr}"
        );
        daemon.stop().await;
        if run == 0 {
            daemon.restart().await;
        }
    }
}
