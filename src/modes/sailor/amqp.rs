//! RabbitMQ connections: a consumer on `LISTEN_MESSAGES_ON` and a confirming publisher.
//!
//! As in sailor, reading and writing use separate connections (`{hostname}-read`,
//! `{hostname}-write`), so a slow consumer's flow control never stalls publishing. Nothing is
//! declared: the platform owns the topology. Both sides survive a broker restart: the publisher
//! reconnects on its next attempt, the consume loop in `mod.rs` reopens the consumer.

use std::time::Duration;

use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use serde_json::{json, Map, Value};
use tokio::sync::Mutex;

use super::headers::to_table;
use super::settings::Settings;

/// A message to publish to the step's exchange.
pub struct Outgoing<'a> {
    pub routing_key: &'a str,
    pub payload: &'a [u8],
    pub headers: Map<String, Value>,
    /// Properties to start from (a rebound republishes the original's); JSON defaults otherwise.
    pub properties: Option<BasicProperties>,
    pub expiration: Option<String>,
}

/// The largest AMQP frame asked for unless the URI says otherwise. lapin keeps read and write
/// buffers of 32 frames per connection: at the broker's default 128 KiB that is 16 MiB of idle
/// memory for two connections; at 16 KiB, 2 MiB. Bigger messages just take more frames.
const FRAME_MAX: u32 = 16 * 1024;

/// Opens a named connection.
pub async fn connect(uri: &str, role: &str) -> lapin::Result<Connection> {
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    let properties =
        ConnectionProperties::default().with_connection_name(format!("{host}-{role}").into());
    Connection::connect(&with_frame_max(uri), properties).await
}

/// Adds `frame_max` to the URI's query unless it is already there.
fn with_frame_max(uri: &str) -> String {
    if uri.contains("frame_max=") {
        uri.to_string()
    } else if uri.contains('?') {
        format!("{uri}&frame_max={FRAME_MAX}")
    } else {
        format!("{uri}?frame_max={FRAME_MAX}")
    }
}

/// Opens the consumer: a channel with the prefetch set, consuming the input queue with manual
/// acknowledgements.
pub async fn open_consumer(
    settings: &Settings,
    tag: &str,
) -> lapin::Result<(Connection, Channel, Consumer)> {
    let connection = connect(settings.amqp_uri.expose(), "read").await?;
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(settings.prefetch, BasicQosOptions::default())
        .await?;
    let consumer = channel
        .basic_consume(
            settings.listen_messages_on.as_str().into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((connection, channel, consumer))
}

/// Publishes with publisher confirms: `publish` returns only once the broker has taken
/// responsibility for the message, which is what makes acking the input afterwards safe.
pub struct Publisher {
    uri: String,
    exchange: String,
    persistent: bool,
    retry_delay_ms: u64,
    max_retry_delay_ms: u64,
    max_attempts: Option<u64>,
    channel: Mutex<Option<(Connection, Channel)>>,
}

impl Publisher {
    /// Connects eagerly, so a wrong URI or exchange fails at start-up, not on the first message.
    pub async fn connect(settings: &Settings) -> lapin::Result<Publisher> {
        let publisher = Publisher {
            uri: settings.amqp_uri.expose().to_string(),
            exchange: settings.publish_messages_to.clone(),
            persistent: settings.amqp_persistent_messages,
            retry_delay_ms: settings.amqp_publish_retry_delay_ms,
            max_retry_delay_ms: settings.amqp_publish_max_retry_delay_ms,
            max_attempts: settings.amqp_publish_retry_attempts,
            channel: Mutex::new(None),
        };
        publisher.channel().await?;
        Ok(publisher)
    }

    async fn channel(&self) -> lapin::Result<Channel> {
        let mut slot = self.channel.lock().await;
        if let Some((connection, channel)) = slot.as_ref() {
            if connection.status().connected() && channel.status().connected() {
                return Ok(channel.clone());
            }
        }
        let connection = connect(&self.uri, "write").await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        *slot = Some((connection, channel.clone()));
        Ok(channel)
    }

    /// Publishes, retrying failures with `min(delay × 2^i, max delay)` as sailor does, with a
    /// `retry: i` header on retries. Gives up only after `AMQP_PUBLISH_RETRY_ATTEMPTS` (unlimited
    /// by default).
    pub async fn publish(&self, message: Outgoing<'_>) -> Result<(), String> {
        let mut iteration: u64 = 0;
        loop {
            let mut headers = message.headers.clone();
            if iteration > 0 {
                headers.insert("retry".into(), json!(iteration));
            }
            let base = message.properties.clone().unwrap_or_else(|| {
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_content_encoding("utf8".into())
            });
            let mut properties = base
                .with_headers(to_table(&headers))
                .with_delivery_mode(if self.persistent { 2 } else { 1 });
            if let Some(expiration) = &message.expiration {
                properties = properties.with_expiration(expiration.as_str().into());
            }
            let error = match self
                .try_publish(message.routing_key, message.payload, properties)
                .await
            {
                Ok(()) => return Ok(()),
                Err(error) => error,
            };
            let delay = self
                .retry_delay_ms
                .saturating_mul(2u64.saturating_pow(iteration.min(62) as u32))
                .min(self.max_retry_delay_ms);
            tracing::warn!(routing_key = message.routing_key, iteration, delay_ms = delay, error = %error, "publish failed; retrying");
            // Start the next attempt on a fresh connection: the old one may be half-dead.
            *self.channel.lock().await = None;
            tokio::time::sleep(Duration::from_millis(delay)).await;
            iteration += 1;
            if self.max_attempts.is_some_and(|max| iteration >= max) {
                return Err(format!(
                    "failed to publish to {}/{}: {error}",
                    self.exchange, message.routing_key
                ));
            }
        }
    }

    async fn try_publish(
        &self,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<(), String> {
        let channel = self.channel().await.map_err(|e| e.to_string())?;
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let confirm = channel
            .basic_publish(
                self.exchange.as_str().into(),
                routing_key.into(),
                options,
                payload,
                properties,
            )
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        if confirm.is_nack() {
            return Err("the broker refused the message (nack)".into());
        }
        if confirm.take_message().is_some() {
            // Confirmed but unroutable: the platform has no binding for this key. Retrying
            // cannot fix that, so it is logged, as sailor does, rather than retried.
            tracing::warn!(exchange = %self.exchange, routing_key, "message was returned as unroutable");
        }
        Ok(())
    }

    pub async fn close(&self) {
        if let Some((connection, channel)) = self.channel.lock().await.take() {
            let _ = channel.close(200, "bye".into()).await;
            let _ = connection.close(200, "bye".into()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_the_frame_size_unless_the_uri_sets_it() {
        assert_eq!(
            with_frame_max("amqp://h/%2f"),
            "amqp://h/%2f?frame_max=16384"
        );
        assert_eq!(
            with_frame_max("amqp://h/v?heartbeat=5"),
            "amqp://h/v?heartbeat=5&frame_max=16384"
        );
        assert_eq!(
            with_frame_max("amqp://h/v?frame_max=4096"),
            "amqp://h/v?frame_max=4096"
        );
    }
}
