//! Payloads of the new-user sign-up flow (ch. 11): a user signed up, a user proved their
//! address, a notification channel was registered, an SMS waits in the outbox.

use serde::{Deserialize, Serialize};

use crate::EventData;
use crate::media::deterministic_id;

/// Which notifications a user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotificationPrefs {
    /// Notifications by email.
    #[serde(default = "yes")]
    pub email: bool,
    /// Notifications by SMS (needs a phone number).
    #[serde(default)]
    pub sms: bool,
}

fn yes() -> bool {
    true
}

impl Default for NotificationPrefs {
    /// Email on, SMS off: what a sign-up that does not say gets.
    fn default() -> Self {
        Self {
            email: true,
            sms: false,
        }
    }
}

/// Who a user is, as the sign-up flow's events carry it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserProfile {
    pub user_id: String,
    /// Normalised: the domain in lower case.
    pub email: String,
    /// E.164 (`+` and 8 to 15 digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    /// The zone (region) the user signed up in; the sharder's key.
    pub zone: String,
    pub notifications: NotificationPrefs,
}

/// `mediaflow.user.signed-up`: a user signed up and waits for the verification mail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserSignedUp {
    #[serde(flatten)]
    pub user: UserProfile,
    /// RFC 3339.
    pub signed_up_at: String,
}

impl EventData for UserSignedUp {
    const TYPE: &'static str = "mediaflow.user.signed-up";

    fn subject(&self) -> String {
        self.user.user_id.clone()
    }

    fn id(&self) -> String {
        deterministic_id(&[Self::TYPE, &self.user.user_id])
    }
}

/// `mediaflow.user.verified`: a user entered the code their verification mail carried.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserVerified {
    #[serde(flatten)]
    pub user: UserProfile,
    /// RFC 3339.
    pub verified_at: String,
}

impl EventData for UserVerified {
    const TYPE: &'static str = "mediaflow.user.verified";

    fn subject(&self) -> String {
        self.user.user_id.clone()
    }

    fn id(&self) -> String {
        deterministic_id(&[Self::TYPE, &self.user.user_id])
    }
}

/// `mediaflow.user.code-requested`: a pending user asked for a new verification code
/// (`POST /v1/users/{id}/code`). Published on `users.signed-up`, so it takes the sign-up's path
/// to the user's zone's mail stage; the new code replaces the one before.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeRequested {
    #[serde(flatten)]
    pub user: UserProfile,
    /// The code's round: 1 for the first new code (the sign-up's was 0).
    pub round: i64,
    /// RFC 3339.
    pub requested_at: String,
}

impl EventData for CodeRequested {
    const TYPE: &'static str = "mediaflow.user.code-requested";

    fn subject(&self) -> String {
        self.user.user_id.clone()
    }

    fn id(&self) -> String {
        deterministic_id(&[Self::TYPE, &self.user.user_id, &self.round.to_string()])
    }
}

/// A way of reaching a user with notifications.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    Email,
    Sms,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Sms => "sms",
        }
    }
}

/// `mediaflow.notification.registered`: a user's notification channel is set up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotificationRegistered {
    pub user_id: String,
    pub channel: Channel,
    /// The address notifications go to: the email address or the phone number.
    pub address: String,
    /// RFC 3339.
    pub registered_at: String,
}

impl EventData for NotificationRegistered {
    const TYPE: &'static str = "mediaflow.notification.registered";

    fn subject(&self) -> String {
        self.user_id.clone()
    }

    fn id(&self) -> String {
        deterministic_id(&[Self::TYPE, &self.user_id, self.channel.as_str()])
    }
}

/// `mediaflow.sms.requested`: a text message for an SMS gateway to deliver (the outbox).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SmsRequested {
    pub user_id: String,
    /// E.164.
    pub to: String,
    pub body: String,
    /// What the message is, e.g. `sms-registered`; one message per user and purpose.
    pub purpose: String,
}

impl EventData for SmsRequested {
    const TYPE: &'static str = "mediaflow.sms.requested";

    fn subject(&self) -> String {
        self.user_id.clone()
    }

    fn id(&self) -> String {
        deterministic_id(&[Self::TYPE, &self.user_id, &self.purpose])
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn profile() -> UserProfile {
        UserProfile {
            user_id: "0193c9a2-5d3e-7c3a-9f1e-3b8c2d1e4f50".into(),
            email: "ada@example.org".into(),
            phone: Some("+441632960961".into()),
            zone: "eu".into(),
            notifications: NotificationPrefs {
                email: true,
                sms: true,
            },
        }
    }

    pub(crate) fn signed_up() -> UserSignedUp {
        UserSignedUp {
            user: profile(),
            signed_up_at: "2026-12-03T12:00:00Z".into(),
        }
    }

    pub(crate) fn verified() -> UserVerified {
        UserVerified {
            user: profile(),
            verified_at: "2026-12-03T12:05:00Z".into(),
        }
    }

    pub(crate) fn code_requested() -> CodeRequested {
        CodeRequested {
            user: profile(),
            round: 1,
            requested_at: "2026-12-03T12:02:00Z".into(),
        }
    }

    pub(crate) fn registered() -> NotificationRegistered {
        NotificationRegistered {
            user_id: profile().user_id,
            channel: Channel::Sms,
            address: "+441632960961".into(),
            registered_at: "2026-12-03T12:05:01Z".into(),
        }
    }

    pub(crate) fn sms() -> SmsRequested {
        SmsRequested {
            user_id: profile().user_id,
            to: "+441632960961".into(),
            body: "SMS notifications are on.".into(),
            purpose: "sms-registered".into(),
        }
    }

    #[test]
    fn the_profile_is_flat_in_the_payload_and_ids_are_stable() {
        let v = serde_json::to_value(signed_up()).unwrap();
        assert_eq!(v["zone"], "eu");
        assert_eq!(v["notifications"]["sms"], true);
        let back: UserSignedUp = serde_json::from_value(v).unwrap();
        assert_eq!(back, signed_up());
        assert_eq!(signed_up().id(), signed_up().id());
        assert_ne!(signed_up().id(), verified().id());
    }
}
