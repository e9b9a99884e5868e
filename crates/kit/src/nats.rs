//! NATS connection with retry on first connect, so services may start before the server.

use crate::config::NatsSettings;

/// Connects to NATS; keeps retrying until the server is reachable.
pub async fn connect(
    settings: &NatsSettings,
    service: &str,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    let name = settings.name.clone().unwrap_or_else(|| service.to_owned());
    let client = async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .event_callback(|event| async move {
            match event {
                async_nats::Event::SlowConsumer(sid) => {
                    tracing::warn!(sid, "NATS slow consumer: messages were dropped")
                }
                other => tracing::info!(event = %other, "NATS connection event"),
            }
        })
        .connect(settings.url.as_str())
        .await?;
    Ok(client)
}
