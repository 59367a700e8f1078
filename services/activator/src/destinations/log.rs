//! Log destination: one JSON line per event, to stdout or appended to a file.

use std::io::Write;
use std::sync::Mutex;

use super::SendError;
use crate::record::LogSettings;

/// Writes events as JSON lines.
pub struct LogSender {
    out: Mutex<Box<dyn Write + Send>>,
}

impl LogSender {
    /// A sender writing to the destination's `log_file`, or stdout.
    pub fn new(cfg: &LogSettings) -> Result<Self, String> {
        let out: Box<dyn Write + Send> = match &cfg.log_file {
            Some(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| format!("cannot open log file {}: {e}", path.display()))?,
            ),
            None => Box::new(std::io::stdout()),
        };
        Ok(Self {
            out: Mutex::new(out),
        })
    }

    /// Writes one line (the body plus a newline) in a single write, then flushes.
    pub fn send(&self, body: &[u8]) -> Result<(), SendError> {
        let mut line = Vec::with_capacity(body.len() + 1);
        line.extend_from_slice(body);
        line.push(b'\n');
        let mut out = self.out.lock().expect("log destination lock");
        out.write_all(&line)
            .and_then(|()| out.flush())
            .map_err(SendError::Io)
    }
}
