//! The projector's CPU per event outside NATS and ClickHouse, single-threaded: decoding an
//! envelope, building its row, and encoding rows into Native blocks of 20,000, over 200,000
//! synthetic `request.completed` events (the bench's). Prints the best of seven rounds, since
//! a shared machine only ever adds time. Run: `cargo run --release -p stone-analytics --example
//! decode_cost`.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Write as _;
use std::time::{Duration, Instant};

use stone_analytics::rows::{RequestRow, Rows};
use stone_events::Event;

const EVENTS: u64 = 200_000;
const BATCH: usize = 20_000;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let now = time::OffsetDateTime::now_utc();
    let payloads = (0..EVENTS)
        .map(|index| serde_json::to_vec(&stone_analytics::synthetic::request(index, now)))
        .collect::<Result<Vec<_>, _>>()?;
    let (mut decode_only, mut full, mut encode_only) = (Duration::MAX, Duration::MAX, Duration::MAX);
    for _ in 0..7 {
        let started = Instant::now();
        for payload in &payloads {
            std::hint::black_box(stone_events::decode(payload)?);
        }
        decode_only = decode_only.min(started.elapsed());

        let started = Instant::now();
        let mut encoding = Duration::ZERO;
        for (batch, chunk) in payloads.chunks(BATCH).enumerate() {
            let mut rows = Rows::with_capacity(chunk.len());
            for (offset, payload) in chunk.iter().enumerate() {
                if let Event::RequestCompleted(envelope) = stone_events::decode(payload)? {
                    rows.push_request(RequestRow::new(envelope, 0, (batch * BATCH + offset) as u64));
                }
            }
            let encoded = Instant::now();
            for group in rows.requests.values() {
                std::hint::black_box(stone_analytics::native::requests_block(group));
            }
            encoding += encoded.elapsed();
        }
        full = full.min(started.elapsed());
        encode_only = encode_only.min(encoding);
    }
    let per_event = |duration: Duration| duration.as_secs_f64() * 1e6 / EVENTS as f64;
    writeln!(
        std::io::stdout(),
        "{} bytes per event; best of 7, per event: decode {:.2} µs; decode, row and Native encoding {:.2} µs, of which encoding {:.2} µs",
        payloads[0].len(),
        per_event(decode_only),
        per_event(full),
        per_event(encode_only)
    )?;
    Ok(())
}
