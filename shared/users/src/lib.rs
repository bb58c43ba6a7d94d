//! The sign-up flow's state (ch. 11): what a sign-up may hold (`signup`), the one-time codes of
//! verification mails (`code`), and the users, idempotency keys, mail outbox and notification
//! registrations in the database (`store`). Shared by the gateway and the flow's stages.

pub mod code;
pub mod signup;
pub mod store;

pub use code::{CodeKey, VerificationCode};
pub use signup::{SignupError, SignupRequest};
pub use store::{
    Claim, CodeRequest, CommitPath, Created, MailDecision, MailKey, MailRow, MailState,
    RegistrationRow, UserRow, UserState, Users, UsersError, VerifyError,
};

use serde::{Deserialize, Serialize};

/// How sign-ups are taken and verified (`[signup]`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SignupConfig {
    /// The zones (regions) users may sign up in; the flow shards by zone.
    pub zones: Vec<String>,
    /// How long a verification code is valid after its mail went out, in seconds.
    pub code_ttl_secs: u64,
    /// Attempts at entering a code before it stops working.
    pub max_code_attempts: u32,
    /// Key of the HMAC under which codes are stored (base64, at least 32 bytes once decoded).
    /// Empty: `mediaflow up` keeps a random one in `<data_dir>/signup-code.key`. Processes
    /// that verify and send codes must share it: set it from a secret when they run apart.
    pub code_key: String,
    /// Seconds a user waits between asking for new codes (counted from the sign-up for the
    /// first).
    pub resend_interval_secs: u64,
    /// Codes a user may have in all, the sign-up's included.
    pub max_codes: u32,
}

impl Default for SignupConfig {
    fn default() -> Self {
        Self {
            zones: vec!["eu".into(), "us".into(), "ap".into()],
            code_ttl_secs: 15 * 60,
            max_code_attempts: 5,
            code_key: String::new(),
            resend_interval_secs: 60,
            max_codes: 5,
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// RFC 3339 of a time in milliseconds since the epoch.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
