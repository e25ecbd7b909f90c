//! Conveniences on the generated types: wrapping any message into an
//! [`Envelope`], naming a message for error texts, building a [`Hello`].

use crate::v1::envelope::Msg;
use crate::v1::*;

macro_rules! arms {
    ($($variant:ident),* $(,)?) => {
        $(
            impl From<$variant> for Envelope {
                fn from(msg: $variant) -> Self {
                    Envelope { msg: Some(Msg::$variant(msg)) }
                }
            }
        )*

        impl Msg {
            /// The message's name as in the `.proto` file, for logs and
            /// error texts.
            ///
            /// ```
            /// use surveil_proto::{Msg, Ping};
            /// assert_eq!(Msg::Ping(Ping { seq: 1 }).name(), "Ping");
            /// ```
            pub fn name(&self) -> &'static str {
                match self {
                    $(Msg::$variant(_) => stringify!($variant),)*
                }
            }
        }
    };
}

arms!(
    Hello,
    Welcome,
    Reject,
    Error,
    Submit,
    SubmitAck,
    Assign,
    Ping,
    Pong,
    Cancel,
    Started,
    Log,
    JobFinished,
    ResultAck,
    Resend,
    Drain,
    HandBack,
    ListJobs,
    ListJobsReply,
    GetJob,
    GetJobReply,
    ReadLog,
    ReadLogReply,
    ListRunners,
    ListRunnersReply,
    GetStatus,
    GetStatusReply,
    CancelJob,
    CancelJobReply,
    RerunJob,
    RerunJobReply,
    Prune,
    PruneReply,
);

impl From<Msg> for Envelope {
    fn from(msg: Msg) -> Self {
        Envelope { msg: Some(msg) }
    }
}

impl Hello {
    /// A `Hello` for `role` named `name`, speaking [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION),
    /// carrying this crate's version as `client_version`; set the other
    /// fields as the role needs.
    ///
    /// ```
    /// use surveil_proto::{Hello, Role, PROTOCOL_VERSION};
    /// let hello = Hello::new(Role::Observer, "watch-app");
    /// assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
    /// assert_eq!(hello.role(), Role::Observer);
    /// ```
    pub fn new(role: Role, name: impl Into<String>) -> Self {
        Hello {
            protocol_version: crate::PROTOCOL_VERSION,
            role: role as i32,
            name: name.into(),
            client_version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Hello::default()
        }
    }
}

impl JobStatus {
    /// Whether the status is final (passed, failed, error or cancelled).
    ///
    /// ```
    /// use surveil_proto::JobStatus;
    /// assert!(JobStatus::Passed.is_final());
    /// assert!(!JobStatus::Running.is_final());
    /// ```
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobStatus::Passed | JobStatus::Failed | JobStatus::Error | JobStatus::Cancelled
        )
    }

    /// The lower-case name used in JSON output and on the command line
    /// (`queued`, `running`, `passed`, `failed`, `error`, `cancelled`);
    /// `unspecified` for the zero value.
    ///
    /// ```
    /// use surveil_proto::JobStatus;
    /// assert_eq!(JobStatus::Cancelled.label(), "cancelled");
    /// assert_eq!(JobStatus::from_label("failed"), Some(JobStatus::Failed));
    /// ```
    pub fn label(self) -> &'static str {
        match self {
            JobStatus::Unspecified => "unspecified",
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Passed => "passed",
            JobStatus::Failed => "failed",
            JobStatus::Error => "error",
            JobStatus::Cancelled => "cancelled",
        }
    }

    /// The status named by [`label`](Self::label), if any.
    pub fn from_label(label: &str) -> Option<Self> {
        [
            JobStatus::Queued,
            JobStatus::Running,
            JobStatus::Passed,
            JobStatus::Failed,
            JobStatus::Error,
            JobStatus::Cancelled,
        ]
        .into_iter()
        .find(|s| s.label() == label)
    }
}

impl TaskStatus {
    /// The lower-case name used in JSON output (`passed`, `failed`,
    /// `timed_out`, `cancelled`, `error`, `skipped`); `unspecified` for the
    /// zero value.
    ///
    /// ```
    /// use surveil_proto::TaskStatus;
    /// assert_eq!(TaskStatus::TimedOut.label(), "timed_out");
    /// ```
    pub fn label(self) -> &'static str {
        match self {
            TaskStatus::Unspecified => "unspecified",
            TaskStatus::Passed => "passed",
            TaskStatus::Failed => "failed",
            TaskStatus::TimedOut => "timed_out",
            TaskStatus::Cancelled => "cancelled",
            TaskStatus::Error => "error",
            TaskStatus::Skipped => "skipped",
        }
    }
}
