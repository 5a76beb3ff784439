//! `health.*`: upstream target transitions, worker heartbeats, and reports of lost events.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::envelope::EventData;

/// Health state of an upstream target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TargetState {
    Up,
    Down,
}

/// What observed the transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HealthCheckKind {
    /// A probe request on an interval.
    Active,
    /// Failures of real traffic.
    Passive,
}

/// `health.target_up` / `health.target_down`, version 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TargetHealthChanged {
    pub upstream: String,
    pub target: String,
    pub state: TargetState,
    pub check: HealthCheckKind,
    /// Human-readable cause, e.g. `connect refused`, `status 503`, `3 consecutive successes`.
    pub reason: String,
    /// Consecutive results that caused the transition.
    pub consecutive: u32,
}

impl EventData for TargetHealthChanged {
    const VERSION: u32 = 1;

    fn event_type(&self) -> &'static str {
        match self.state {
            TargetState::Up => "health.target_up",
            TargetState::Down => "health.target_down",
        }
    }

    /// `upstream`
    fn subject_dimensions(&self) -> Vec<&str> {
        vec![&self.upstream]
    }
}

/// `health.worker_heartbeat`, version 1: a worker is alive and what it runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WorkerHeartbeat {
    pub worker: String,
    /// Software version of the worker.
    pub build: String,
    /// Seconds since the worker started.
    pub uptime_s: u64,
    /// Requests in flight at the time of the beat.
    pub in_flight: u64,
    /// Events waiting to be published (memory queue and disk spool).
    pub events_pending: u64,
}

impl EventData for WorkerHeartbeat {
    const VERSION: u32 = 1;

    fn event_type(&self) -> &'static str {
        "health.worker_heartbeat"
    }

    /// `worker`
    fn subject_dimensions(&self) -> Vec<&str> {
        vec![&self.worker]
    }
}

/// `health.events_lost`, version 1: a worker had to drop events; published once NATS is back so
/// that the loss is on the record and analytics can flag the gap.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EventsLost {
    pub worker: String,
    /// Number of events dropped since the previous report.
    pub dropped: u64,
    /// Why: `queue_full`, `spool_full`, `encode_error`.
    pub reason: String,
    /// First and last drop in the period, RFC 3339.
    pub first_at: String,
    pub last_at: String,
}

impl EventData for EventsLost {
    const VERSION: u32 = 1;

    fn event_type(&self) -> &'static str {
        "health.events_lost"
    }

    /// `worker`
    fn subject_dimensions(&self) -> Vec<&str> {
        vec![&self.worker]
    }
}
