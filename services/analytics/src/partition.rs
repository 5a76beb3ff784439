//! One partition's projection loop: pull a batch, decode (upcasting old versions), insert into
//! ClickHouse, and only then acknowledge.
//!
//! Exactly-once effect rests on two facts: a partition's events arrive in stream order, and each
//! row stores its `(partition, stream_seq)`. The highest stored `stream_seq` of a partition is
//! the watermark; anything at or below it is already in ClickHouse and is acknowledged without
//! being inserted again. The watermark is read at start and again after a failed insert (the
//! insert may have committed even though the answer was lost), so redelivery, restarts and
//! retries never duplicate a row.

use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer, message::PublishMessage};
use futures::StreamExt;
use stone_events::streams::headers;
use stone_events::{Event, decode};
use tokio_util::sync::CancellationToken;

use crate::rows::RequestRow;

/// What a partition worker needs.
#[derive(Clone)]
pub struct PartitionContext {
    pub partition: u16,
    pub consumer: PullConsumer,
    pub consumer_name: String,
    pub stream_name: String,
    pub dead_letter_subject: String,
    pub js: jetstream::Context,
    pub clickhouse: clickhouse::Client,
    pub batch_max_rows: usize,
    pub batch_max_wait: Duration,
}

/// Why a step failed, and whether retrying can help.
#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error("nats: {0}")]
    Nats(String),
}

const MAX_BACKOFF: Duration = Duration::from_secs(10);

async fn watermark(clickhouse: &clickhouse::Client, partition: u16) -> Result<u64, clickhouse::error::Error> {
    clickhouse
        .query("SELECT max(stream_seq) FROM requests WHERE partition = ?")
        .bind(partition)
        .fetch_one::<u64>()
        .await
}

async fn insert_rows(clickhouse: &clickhouse::Client, rows: &[RequestRow]) -> Result<(), clickhouse::error::Error> {
    let started = std::time::Instant::now();
    let mut insert = clickhouse.insert::<RequestRow>("requests").await?;
    for row in rows {
        insert.write(row).await?;
    }
    insert.end().await?;
    metrics::histogram!("stone_analytics_insert_duration_seconds").record(started.elapsed().as_secs_f64());
    metrics::counter!("stone_analytics_rows_inserted_total", "table" => "requests").increment(rows.len() as u64);
    Ok(())
}

/// Sleeps for the backoff or until shutdown; returns false on shutdown.
async fn back_off(delay: &mut Duration, token: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(*delay) => {
            *delay = (*delay * 2).min(MAX_BACKOFF);
            true
        }
        () = token.cancelled() => false,
    }
}

/// Runs until shutdown. Never gives up on ClickHouse or NATS: it stops acknowledging and retries
/// with backoff, so nothing is lost while a dependency is down.
pub async fn run(context: PartitionContext, token: CancellationToken) {
    let partition = context.partition;
    let mut delay = Duration::from_millis(100);
    let mut stored = loop {
        match watermark(&context.clickhouse, partition).await {
            Ok(stored) => break stored,
            Err(error) => {
                tracing::warn!(partition, %error, "cannot read watermark; retrying");
                if !back_off(&mut delay, &token).await {
                    return;
                }
            }
        }
    };
    tracing::debug!(partition, watermark = stored, "partition projector started");

    while !token.is_cancelled() {
        match step(&context, &mut stored, &token).await {
            Ok(()) => delay = Duration::from_millis(100),
            Err(error) => {
                metrics::counter!("stone_analytics_errors_total", "kind" => error_kind(&error)).increment(1);
                tracing::warn!(partition, %error, "projection step failed; backing off");
                if !back_off(&mut delay, &token).await {
                    return;
                }
            }
        }
    }
}

fn error_kind(error: &StepError) -> &'static str {
    match error {
        StepError::ClickHouse(_) => "clickhouse",
        StepError::Nats(_) => "nats",
    }
}

/// One batch: fetch, decode, insert, acknowledge.
async fn step(context: &PartitionContext, stored: &mut u64, token: &CancellationToken) -> Result<(), StepError> {
    let mut messages = context
        .consumer
        .batch()
        .max_messages(context.batch_max_rows)
        .expires(context.batch_max_wait)
        .messages()
        .await
        .map_err(|error| StepError::Nats(error.to_string()))?;

    let mut rows = Vec::new();
    let mut last = None;
    loop {
        let next = tokio::select! {
            next = messages.next() => next,
            () = token.cancelled() => return Ok(()),
        };
        let Some(message) = next else { break };
        let message = message.map_err(|error| StepError::Nats(error.to_string()))?;
        let info = message.info().map_err(|error| StepError::Nats(error.to_string()))?;
        let sequence = info.stream_sequence;
        metrics::gauge!("stone_analytics_pending_events", "partition" => context.partition.to_string())
            .set(info.pending as f64);
        if sequence > *stored {
            match decode(&message.payload) {
                Ok(Event::RequestCompleted(envelope)) => {
                    rows.push(RequestRow::new(envelope, context.partition, sequence))
                }
                // Other request.* types do not exist yet; the filter only delivers request events.
                Ok(_) => {}
                Err(error) => dead_letter(context, &message, sequence, &error).await?,
            }
        }
        last = Some((message, sequence));
    }
    let Some((last_message, last_sequence)) = last else { return Ok(()) };

    if !rows.is_empty()
        && let Err(error) = insert_rows(&context.clickhouse, &rows).await
    {
        // The insert may have committed before the error; re-read the watermark so the
        // retry (the redelivered batch) skips whatever did land.
        if let Ok(current) = watermark(&context.clickhouse, context.partition).await {
            *stored = current;
        }
        let _ = last_message.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
        return Err(error.into());
    }
    *stored = (*stored).max(last_sequence);
    // The consumer acknowledges everything up to this message (AckPolicy::All).
    last_message.ack().await.map_err(|error| StepError::Nats(error.to_string()))?;
    Ok(())
}

/// Parks an event that can never be decoded, with the reason, so the partition moves on.
async fn dead_letter(
    context: &PartitionContext,
    message: &jetstream::Message,
    sequence: u64,
    error: &stone_events::DecodeError,
) -> Result<(), StepError> {
    let reason = error.to_string();
    let publish = PublishMessage::build()
        .message_id(format!("{}-{}-{sequence}", context.stream_name, context.consumer_name))
        .header(headers::DEAD_LETTER_REASON, reason.as_str())
        .header(headers::ORIGINAL_SUBJECT, message.subject.as_str())
        .header(headers::ORIGINAL_SEQUENCE, sequence.to_string().as_str())
        .payload(message.payload.clone());
    let ack = context
        .js
        .send_publish(context.dead_letter_subject.clone(), publish)
        .await
        .map_err(|error| StepError::Nats(error.to_string()))?;
    ack.await.map_err(|error| StepError::Nats(error.to_string()))?;
    metrics::counter!("stone_analytics_dead_letters_total", "reason" => error.reason_code()).increment(1);
    tracing::warn!(partition = context.partition, sequence, reason = %reason, "event sent to the dead-letter stream");
    Ok(())
}
