//! The stage kinds of the new-user sign-up flow (ch. 11) and its hooks (ch. 8): `mail` sends a
//! verification or welcome mail exactly once per user over SMTP (`mail`), `webhook` calls a
//! signed hook (`hook`), `register` records a notification channel and `sms` writes the SMS
//! outbox (`notify`). The flow itself is declared in `pipelines/signup.yaml`.

pub mod hook;
pub mod mail;
pub mod notify;
pub mod wire;

pub use hook::{SigningKey, Webhook, WebhookConfig};
pub use mail::{MailConfig, MailKind, MailStageConfig, Relay, SendMail, Templates, TlsMode};
pub use notify::{Register, RegisterConfig, Sms, SmsConfig};
