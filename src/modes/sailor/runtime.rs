//! What every delivery shares: settings, step data, cipher, publisher, OpenAI client, and the
//! book of messages in flight.
//!
//! Redeliveries: after a reconnect the broker redelivers what was unacked. As in sailor 2.7.8,
//! a redelivery of a message still being processed is not processed again; the first handler
//! settles the newest delivery instead, and one that arrives after the first handler finished
//! is settled the same way at once.

use std::collections::HashMap;
use std::sync::Mutex;

use lapin::options::{BasicAckOptions, BasicRejectOptions};
use lapin::Acker;

use super::amqp::Publisher;
use super::crypto::Cipher;
use super::platform::StepData;
use super::settings::Settings;
use crate::openai::OpenAi;

/// Everything a delivery needs, shared by all of them.
pub struct Runtime {
    pub settings: Settings,
    pub step: StepData,
    pub cipher: Cipher,
    pub publisher: Publisher,
    pub client: OpenAi,
    in_flight: Mutex<HashMap<String, Slot>>,
}

enum Slot {
    /// Being processed; settle this (the newest) delivery when done.
    Processing(Acker),
    /// Processed, but settling failed (the channel died): settle the redelivery this way.
    Settled { ack: bool },
}

/// What to do with a delivery that just arrived.
pub enum Admission {
    Process,
    Duplicate,
    SettleNow { ack: bool },
}

impl Runtime {
    pub fn new(
        settings: Settings,
        step: StepData,
        cipher: Cipher,
        publisher: Publisher,
        client: OpenAi,
    ) -> Runtime {
        Runtime {
            settings,
            step,
            cipher,
            publisher,
            client,
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    /// Decides, in arrival order, whether a delivery is new work.
    pub fn admit(&self, message_id: Option<&str>, acker: &Acker) -> Admission {
        let Some(id) = message_id else {
            return Admission::Process;
        };
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        match in_flight.get_mut(id) {
            None => {
                in_flight.insert(id.to_string(), Slot::Processing(acker.clone()));
                Admission::Process
            }
            Some(Slot::Processing(newest)) => {
                *newest = acker.clone();
                Admission::Duplicate
            }
            Some(Slot::Settled { ack }) => {
                let ack = *ack;
                in_flight.remove(id);
                Admission::SettleNow { ack }
            }
        }
    }

    /// The acker to settle with: the newest delivery of this message.
    pub(super) fn take_acker(&self, message_id: Option<&str>, own: &Acker) -> Acker {
        let Some(id) = message_id else {
            return own.clone();
        };
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        match in_flight.remove(id) {
            Some(Slot::Processing(newest)) => newest,
            _ => own.clone(),
        }
    }

    pub fn remember_settlement(&self, message_id: Option<&str>, ack: bool) {
        if let Some(id) = message_id {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            in_flight.insert(id.to_string(), Slot::Settled { ack });
        }
    }

    /// Messages being processed now.
    pub fn in_flight(&self) -> usize {
        let in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        in_flight
            .values()
            .filter(|s| matches!(s, Slot::Processing(_)))
            .count()
    }
}

/// Acks, or rejects without requeue. True only if it really happened: for a delivery whose
/// channel is gone, lapin answers `Ok(false)` rather than an error, and treating that as done
/// would let the broker's redelivery be processed a second time.
pub async fn settle(acker: &Acker, ack: bool) -> bool {
    let result = if ack {
        acker.ack(BasicAckOptions::default()).await
    } else {
        acker.reject(BasicRejectOptions { requeue: false }).await
    };
    match result {
        Ok(done) => done,
        Err(e) => {
            tracing::debug!(error = %e, "settling failed");
            false
        }
    }
}
