//! Notification set-up once a user is verified: the `register` stage kind records a channel
//! (email or SMS) as a row, once per user and channel; the `sms` stage kind puts a text message
//! for each SMS registration on its outbox topic, for an SMS gateway to deliver.

use cloudevents::{AttributesReader, Event};
use mediaflow_events::{Channel, NotificationRegistered, SmsRequested, UserProfile};
use mediaflow_runtime::{Handler, Output, StageError};
use mediaflow_users::{Users, now_ms, rfc3339};
use serde::Deserialize;

/// Settings of a `register` stage.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterConfig {
    /// The channel it registers.
    pub channel: Channel,
}

/// The `register` stage: for each user event, a registration row for its channel, and a
/// `mediaflow.notification.registered` on port `out`.
pub struct Register {
    channel: Channel,
    users: Users,
}

impl Register {
    pub fn new(config: &RegisterConfig, users: Users) -> Self {
        Self {
            channel: config.channel,
            users,
        }
    }
}

fn user_of(event: &Event) -> Result<UserProfile, StageError> {
    let data =
        mediaflow_events::data_json(event).map_err(|e| StageError::bad_input(e.to_string()))?;
    serde_json::from_value(data).map_err(|e| {
        StageError::bad_input(format!(
            "event {} ({}) does not describe a user: {e}",
            event.id(),
            event.ty()
        ))
    })
}

impl Handler for Register {
    async fn handle(&self, event: &Event) -> Result<Vec<Output>, StageError> {
        let user = user_of(event)?;
        let address = match self.channel {
            Channel::Email => user.email.clone(),
            Channel::Sms => user.phone.clone().ok_or_else(|| {
                StageError::bad_input(format!(
                    "user {} has no phone number to register for SMS",
                    user.user_id
                ))
            })?,
        };
        let now = now_ms();
        self.users
            .register(&user.user_id, self.channel, &address, now)
            .await
            .map_err(|e| {
                StageError::dependency(e.is_transient(), format!("recording the registration: {e}"))
            })?;
        let registered = NotificationRegistered {
            user_id: user.user_id,
            channel: self.channel,
            address,
            registered_at: rfc3339(now),
        };
        Ok(vec![Output::data("out", &registered)?])
    }
}

/// Settings of an `sms` stage.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmsConfig {
    /// The text sent.
    #[serde(default = "default_body")]
    pub body: String,
    /// What the message is for; one message per user and purpose (its event id).
    #[serde(default = "default_purpose")]
    pub purpose: String,
}

fn default_body() -> String {
    "mediaflow: SMS notifications are on for this number. Reply STOP to end them.".into()
}

fn default_purpose() -> String {
    "sms-registered".into()
}

/// The `sms` stage: a `mediaflow.sms.requested` on port `out` for each SMS registration;
/// other registrations pass unanswered.
pub struct Sms {
    config: SmsConfig,
}

impl Sms {
    pub fn new(config: SmsConfig) -> Self {
        Self { config }
    }
}

impl Handler for Sms {
    async fn handle(&self, event: &Event) -> Result<Vec<Output>, StageError> {
        let registered: NotificationRegistered =
            mediaflow_events::decode(event).map_err(|e| StageError::bad_input(e.to_string()))?;
        if registered.channel != Channel::Sms {
            return Ok(Vec::new());
        }
        let sms = SmsRequested {
            user_id: registered.user_id,
            to: registered.address,
            body: self.config.body.clone(),
            purpose: self.config.purpose.clone(),
        };
        Ok(vec![Output::data("out", &sms)?])
    }
}
