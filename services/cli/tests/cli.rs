//! The CLI's manners, without a running Herald: errors print their chain and a hint but no
//! stack trace, each command's help lists only its own flags, and a port clash names the flag
//! and the environment variable that move the port.

use std::net::TcpListener;
use std::path::Path;

use anyhow::Result;
use herald_testkit::{CliOutput, HeraldCli, nats_server_binary, write_config};

fn herald() -> HeraldCli {
    HeraldCli::new(Path::new(env!("CARGO_BIN_EXE_herald")))
}

/// Whether `help` lists `flag` as an option (`--token <TOKEN>`, `-c, --config <CONFIG>`), not
/// as a mention in prose.
fn lists(help: &str, flag: &str) -> bool {
    help.lines().any(|l| {
        l.split_whitespace()
            .take(2)
            .any(|t| t.trim_end_matches(',') == flag)
    })
}

#[tokio::test]
async fn an_error_prints_its_chain_and_a_hint_but_no_backtrace() -> Result<()> {
    let out = herald()
        .env("RUST_BACKTRACE", "1")
        .run(&[
            "sources",
            "list",
            "--ingest-url",
            "http://127.0.0.1:1",
            "--token",
            "t",
        ])
        .await?;
    assert_eq!(out.code, Some(1), "{out:?}");
    let err = &out.stderr;
    assert!(
        err.starts_with("error: cannot reach the ingest control API"),
        "{err}"
    );
    assert!(err.contains("\n  caused by: "), "{err}");
    assert!(
        err.contains("\nhint: ") && err.contains("herald dev") && err.contains("--ingest-url"),
        "{err}"
    );
    assert!(
        !err.to_lowercase().contains("stack backtrace") && !err.contains("Caused by:"),
        "no anyhow debug form and no backtrace:\n{err}"
    );
    Ok(())
}

#[tokio::test]
async fn each_command_s_help_lists_only_its_own_flags() -> Result<()> {
    let help = |args: &'static [&'static str]| async move {
        let out: CliOutput = herald().run(args).await?;
        anyhow::ensure!(out.ok, "herald {args:?}: {}", out.stderr);
        Ok::<_, anyhow::Error>(out.stdout)
    };
    let dev = help(&["dev", "--help"]).await?;
    for flag in [
        "--token",
        "--ingest-url",
        "--processor-url",
        "--activator-url",
    ] {
        assert!(!lists(&dev, flag), "herald dev --help lists {flag}:\n{dev}");
    }
    for flag in ["--config", "--ingest-addr", "--data-dir"] {
        assert!(lists(&dev, flag), "herald dev --help lacks {flag}:\n{dev}");
    }
    for role in ["ingest", "processor", "activator"] {
        let args: &'static [&'static str] = match role {
            "ingest" => &["ingest", "--help"],
            "processor" => &["processor", "--help"],
            _ => &["activator", "--help"],
        };
        let h = help(args).await?;
        assert!(lists(&h, "--config"), "{h}");
        assert!(!lists(&h, "--token") && !lists(&h, "--ingest-url"), "{h}");
    }
    for args in [
        &["sources", "--help"][..],
        &["sources", "list", "--help"][..],
    ] {
        let h = help(args).await?;
        assert!(lists(&h, "--token") && lists(&h, "--ingest-url"), "{h}");
        assert!(
            !lists(&h, "--processor-url") && !lists(&h, "--config"),
            "{h}"
        );
    }
    let status = help(&["status", "--help"]).await?;
    assert!(lists(&status, "--processor-url") && lists(&status, "--token"));
    assert!(!lists(&status, "--ingest-url"), "{status}");
    Ok(())
}

#[tokio::test]
async fn a_port_clash_names_the_flag_and_the_env_var_that_move_it() -> Result<()> {
    let taken = TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?.to_string();
    let dir = tempfile::tempdir()?;

    // herald dev: ingest's HTTP port has a flag.
    let nats = nats_server_binary()?;
    let mut cli = herald()
        .env("HERALD_NATS_SERVER", &nats.display().to_string())
        .current_dir(dir.path());
    for var in [
        "HERALD__INGEST__GRPC_ADDR",
        "HERALD__INGEST__ADMIN_ADDR",
        "HERALD__PROCESSOR__GRPC_ADDR",
        "HERALD__PROCESSOR__ADMIN_ADDR",
        "HERALD__PROCESSOR__HTTP_ADDR",
        "HERALD__ACTIVATOR__GRPC_ADDR",
        "HERALD__ACTIVATOR__ADMIN_ADDR",
    ] {
        cli = cli.env(var, "127.0.0.1:0");
    }
    let out = cli.run(&["dev", "--ingest-addr", &addr]).await?;
    assert_eq!(out.code, Some(1), "{out:?}");
    let err = &out.stderr;
    assert!(
        err.contains(&format!("{addr} is in use"))
            && err.contains("--ingest-addr")
            && err.contains("HERALD__INGEST__HTTP_ADDR"),
        "{err}"
    );
    assert!(err.contains("Address already in use"), "the cause: {err}");

    // A role: the setting in the config file, and its env var.
    let config = write_config(
        dir.path(),
        "processor",
        "nats://127.0.0.1:1",
        "t",
        &format!(
            "[processor]\ngrpc_addr = \"127.0.0.1:0\"\nhttp_addr = \"127.0.0.1:0\"\nadmin_addr = \"{addr}\"\n"
        ),
    )?;
    let out = herald()
        .run(&["processor", "--config", &config.display().to_string()])
        .await?;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("processor.admin_addr")
            && out.stderr.contains("HERALD__PROCESSOR__ADMIN_ADDR"),
        "{}",
        out.stderr
    );
    drop(taken);
    Ok(())
}
