//! What the CLI writes: stdout lines that end quietly when the reader has gone (`herald ... |
//! head`), and errors as a chain with a hint, without a stack trace.

use std::fmt;
use std::io::{ErrorKind, Write as _};
use std::process::ExitCode;

/// Writes one line to stdout, like `println!`, but a closed pipe ends the process quietly with
/// status 0 instead of panicking.
macro_rules! outln {
    () => { $crate::output::line(format_args!("")) };
    ($($arg:tt)*) => { $crate::output::line(format_args!($($arg)*)) };
}
pub(crate) use outln;

/// A protobuf timestamp as RFC 3339 with `digits` of a second (`-` when absent or invalid),
/// through the one conversion, [`herald_proto::time::from_proto`].
pub fn time(t: Option<&prost_types::Timestamp>, digits: chrono::SecondsFormat) -> String {
    t.and_then(herald_proto::time::from_proto)
        .map(|t| t.to_rfc3339_opts(digits, true))
        .unwrap_or_else(|| "-".into())
}

/// The body of [`outln!`].
pub fn line(args: fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out
        .write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush())
    {
        if e.kind() == ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

/// What to do next about an error: attach it as the outermost context
/// (`.context(Hint::new(...))`, or [`hint`]); [`report`] prints it after the error's chain.
#[derive(Debug, Clone)]
pub struct Hint(pub String);

impl fmt::Display for Hint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Wraps `err` with `hint` (printed after its chain by [`report`]).
pub fn hint(err: impl Into<anyhow::Error>, hint: impl Into<String>) -> anyhow::Error {
    err.into().context(Hint(hint.into()))
}

/// Prints `err` to stderr as `error: ...`, one `  caused by: ...` line per cause and a
/// `hint: ...` line, and returns exit status 1. A broken stdout pipe is no error: status 0,
/// nothing printed. The backtrace anyhow captured (with `RUST_BACKTRACE=1`) is printed only
/// when `HERALD_BACKTRACE=1`.
pub fn report(err: &anyhow::Error) -> ExitCode {
    let messages = chain(err);
    if is_broken_pipe(err) {
        return ExitCode::SUCCESS;
    }
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(
        stderr,
        "error: {}",
        messages.first().map(String::as_str).unwrap_or("")
    );
    for cause in messages.iter().skip(1) {
        let _ = writeln!(stderr, "  caused by: {cause}");
    }
    if let Some(h) = hint_for(err) {
        let _ = writeln!(stderr, "hint: {h}");
    }
    if std::env::var("HERALD_BACKTRACE").is_ok_and(|v| v == "1") {
        let _ = writeln!(stderr, "\n{}", err.backtrace());
    }
    ExitCode::FAILURE
}

/// The error's messages, outermost first, without the hint and without a cause that only
/// repeats the message before it (transparent wrappers).
fn chain(err: &anyhow::Error) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let skip = usize::from(err.downcast_ref::<Hint>().is_some());
    for cause in err.chain().skip(skip) {
        let m = cause.to_string();
        if out.last() != Some(&m) {
            out.push(m);
        }
    }
    out
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == ErrorKind::BrokenPipe)
    })
}

/// The hint attached to the error, else one derived from its root cause.
fn hint_for(err: &anyhow::Error) -> Option<String> {
    if let Some(h) = err.downcast_ref::<Hint>() {
        return Some(h.0.clone());
    }
    let io = err
        .chain()
        .find_map(|c| c.downcast_ref::<std::io::Error>())?;
    match io.kind() {
        ErrorKind::ConnectionRefused => Some(
            "is herald running? start it with `herald dev`, or point the command at it \
             (see its --help)"
                .into(),
        ),
        ErrorKind::PermissionDenied => {
            Some("check the file's permissions, or run from a directory you own".into())
        }
        ErrorKind::NotFound => Some("check the path (see --help)".into()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use anyhow::Context as _;

    use super::*;

    #[test]
    fn the_chain_skips_the_hint_and_repeats() {
        let io = std::io::Error::new(ErrorKind::ConnectionRefused, "refused");
        let err = Err::<(), _>(io)
            .context("cannot connect")
            .context("cannot connect")
            .context("cannot reach the ingest control API")
            .unwrap_err();
        let err = hint(err, "start it");
        assert_eq!(
            chain(&err),
            [
                "cannot reach the ingest control API",
                "cannot connect",
                "refused"
            ]
        );
        assert_eq!(hint_for(&err).as_deref(), Some("start it"));
    }

    #[test]
    fn a_root_cause_gives_a_hint_when_none_is_attached() {
        let io = std::io::Error::new(ErrorKind::ConnectionRefused, "refused");
        let err = anyhow::Error::new(io).context("cannot connect");
        assert!(hint_for(&err).is_some_and(|h| h.contains("herald dev")));
        let pipe = anyhow::Error::new(std::io::Error::from(ErrorKind::BrokenPipe));
        assert!(is_broken_pipe(&pipe.context("writing")));
    }
}
