//! One job attempt's combined log and its events towards the session.
//!
//! [`JobLog`] hands out byte offsets in the attempt's combined log (every
//! task and stream, in order) and cuts data into chunks of at most
//! [`MAX_CHUNK`]; it knows nothing about connections. The session decides
//! when the events reach the dispatcher.

use bytes::Bytes;
use surveil_proto::{JobFinished, Log, Started, Stream};
use tokio::sync::mpsc;

/// The largest `Log.data` sent, as the contract allows.
pub const MAX_CHUNK: usize = surveil_proto::MAX_LOG_CHUNK;

/// What a running job tells the session, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    /// Work on the attempt began.
    Started(Started),
    /// A piece of the combined log.
    Log(Log),
    /// The attempt is over and its result is in the outbox.
    Finished(JobFinished),
}

/// Writes one attempt's combined log as [`JobEvent::Log`]s.
#[derive(Debug)]
pub struct JobLog {
    job_id: u64,
    attempt: u32,
    offset: u64,
    events: mpsc::Sender<JobEvent>,
}

impl JobLog {
    /// A log starting at offset 0.
    pub fn new(job_id: u64, attempt: u32, events: mpsc::Sender<JobEvent>) -> Self {
        JobLog {
            job_id,
            attempt,
            offset: 0,
            events,
        }
    }

    /// The job and attempt this log belongs to.
    pub fn lease(&self) -> (u64, u32) {
        (self.job_id, self.attempt)
    }

    /// Bytes written so far: the offset of the next chunk.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Sends another event of this job through the same ordered channel.
    pub async fn event(&self, event: JobEvent) {
        // A closed channel means the runner is going away; the result still
        // reaches the dispatcher through the outbox, so nothing is lost here.
        let _ = self.events.send(event).await;
    }

    /// Appends `data` for `task` on `stream`, in chunks of at most
    /// [`MAX_CHUNK`] bytes.
    pub async fn write(&mut self, task: u32, stream: Stream, data: &[u8]) {
        for piece in data.chunks(MAX_CHUNK) {
            let log = Log {
                job_id: self.job_id,
                attempt: self.attempt,
                task,
                stream: stream as i32,
                offset: self.offset,
                data: Bytes::copy_from_slice(piece),
            };
            self.offset += piece.len() as u64;
            self.event(JobEvent::Log(log)).await;
        }
    }

    /// Appends one of the runner's own lines on the SYSTEM stream.
    pub async fn system(&mut self, task: u32, line: &str) {
        let mut text = format!("[surveil] {line}");
        if !text.ends_with('\n') {
            text.push('\n');
        }
        self.write(task, Stream::System, text.as_bytes()).await;
    }
}
