//! Local runner: one message in, every emitted event out as a JSON line on stdout.

use async_trait::async_trait;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::emit::{Emitter, Event};

/// Writes each event as one JSON line, flushed at once so a pipe sees it as it happens.
pub struct JsonLines<W> {
    out: W,
}

impl<W> JsonLines<W> {
    pub fn new(out: W) -> Self {
        JsonLines { out }
    }
}

#[async_trait]
impl<W: AsyncWrite + Unpin + Send> Emitter for JsonLines<W> {
    async fn emit(&mut self, event: Event) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(&event)?;
        line.push(b'\n');
        self.out.write_all(&line).await?;
        self.out.flush().await
    }
}
