//! The `webhook` stage kind (ch. 8's hooks): POSTs each event, as a structured CloudEvent, to a
//! URL, signed as Standard Webhooks asks (`webhook-id`, `webhook-timestamp`,
//! `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`). A required hook passes
//! the event on only once the URL answered 2xx; anything else is retried with the runtime's
//! backoff and then dead-lettered with the answer. An optional hook sits on a branch of its
//! own, so its failures never hold up the flow.

use std::time::Duration;

use base64::Engine as _;
use cloudevents::{AttributesReader, Event};
use hmac::{Hmac, Mac};
use mediaflow_runtime::{Handler, Output, StageError};
use mediaflow_telemetry::Metrics;
use serde::Deserialize;
use sha2::Sha256;

/// Settings of a `webhook` stage.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where each event is POSTed (http or https).
    pub url: String,
    /// A required hook holds the flow: the event goes on (port `out`) only after a 2xx. An
    /// optional hook has no ports; declare it on a branch of its own (its own stage on the
    /// topic), so the flow never waits for it.
    #[serde(default = "yes")]
    pub required: bool,
    /// Name of the environment variable holding the signing secret (`whsec_` + base64).
    pub secret_env: Option<String>,
    /// The signing secret itself; for tests and examples; prefer `secret_env`.
    pub secret: Option<String>,
    /// Seconds a request may take.
    #[serde(default = "ten")]
    pub timeout_secs: u64,
}

fn yes() -> bool {
    true
}

fn ten() -> u64 {
    10
}

impl WebhookConfig {
    /// Problems a declaration can have, before any secret is read.
    pub fn check(&self) -> Result<(), String> {
        let url = reqwest::Url::parse(&self.url).map_err(|e| format!("url `{}`: {e}", self.url))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("url `{}`: only http and https", self.url));
        }
        match (&self.secret, &self.secret_env) {
            (Some(_), Some(_)) => Err("give `secret` or `secret_env`, not both".into()),
            (None, None) => Err("a webhook is signed: give `secret_env` (or `secret`)".into()),
            (Some(s), None) => SigningKey::parse(s).map(drop),
            (None, Some(_)) => Ok(()),
        }
    }

    /// The signing key, read from the environment when `secret_env` names it.
    pub fn key(&self) -> Result<SigningKey, String> {
        match (&self.secret, &self.secret_env) {
            (Some(s), _) => SigningKey::parse(s),
            (None, Some(var)) => {
                let s = std::env::var(var).map_err(|_| {
                    format!("environment variable `{var}` (the webhook's secret) is not set")
                })?;
                SigningKey::parse(&s)
            }
            (None, None) => Err("no secret".into()),
        }
    }
}

/// A Standard Webhooks signing key.
#[derive(Clone)]
pub struct SigningKey(Vec<u8>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(..)")
    }
}

impl SigningKey {
    /// From `whsec_<base64>` (the prefix is optional).
    pub fn parse(secret: &str) -> Result<Self, String> {
        let b64 = secret
            .trim()
            .strip_prefix("whsec_")
            .unwrap_or(secret.trim());
        let key = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| format!("the webhook secret is not `whsec_` + base64: {e}"))?;
        if key.len() < 16 {
            return Err(format!(
                "the webhook secret has {} bytes; it needs at least 16",
                key.len()
            ));
        }
        Ok(Self(key))
    }

    /// The `webhook-signature` value of `body` sent as message `id` at `timestamp` (seconds).
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(format!("{id}.{timestamp}.").as_bytes());
        mac.update(body);
        format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        )
    }
}

/// The `webhook` stage.
pub struct Webhook {
    stage: String,
    config: WebhookConfig,
    key: SigningKey,
    client: reqwest::Client,
    metrics: Metrics,
}

impl Webhook {
    pub fn new(stage: &str, config: WebhookConfig, metrics: Metrics) -> Result<Self, String> {
        config.check()?;
        let key = config.key()?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(config.timeout_secs.max(1)))
            // A signed request is not replayed to wherever a redirect points.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("mediaflow/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("building the HTTP client: {e}"))?;
        Ok(Self {
            stage: stage.to_owned(),
            config,
            key,
            client,
            metrics,
        })
    }

    /// The `webhook-id` of `event` at this hook: the same on every attempt.
    fn message_id(&self, event: &Event) -> String {
        let name = format!("{}\u{1f}{}\u{1f}{}", self.stage, event.source(), event.id());
        format!(
            "msg_{}",
            uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, name.as_bytes()).simple()
        )
    }
}

impl Handler for Webhook {
    async fn handle(&self, event: &Event) -> Result<Vec<Output>, StageError> {
        let body = serde_json::to_vec(event)
            .map_err(|e| StageError::permanent(format!("encoding the event: {e}")))?;
        let id = self.message_id(event);
        let timestamp = chrono::Utc::now().timestamp();
        let signature = self.key.sign(&id, timestamp, &body);
        let sent = self
            .client
            .post(&self.config.url)
            .header("content-type", "application/cloudevents+json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await;
        let answer = match sent {
            Ok(answer) => answer,
            Err(e) => {
                self.metrics.hook_call(&self.stage, "error");
                return Err(StageError::transient(format!(
                    "hook {}: {}",
                    self.config.url,
                    error_chain(&e)
                )));
            }
        };
        let status = answer.status();
        if !status.is_success() {
            self.metrics.hook_call(&self.stage, status.as_str());
            let text = answer.text().await.unwrap_or_default();
            let text: String = text.chars().take(300).collect();
            return Err(StageError::transient(format!(
                "hook {} answered {status}: {}",
                self.config.url,
                text.trim()
            )));
        }
        self.metrics.hook_call(&self.stage, "2xx");
        Ok(if self.config.required {
            vec![Output::forward("out", event)]
        } else {
            Vec::new()
        })
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification's reference libraries.
    #[test]
    fn signatures_match_the_standard_webhooks_test_vector() {
        let key = SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let signature = key.sign(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn declarations_are_checked() {
        let config =
            |json: serde_json::Value| serde_json::from_value::<WebhookConfig>(json).unwrap();
        let ok = config(serde_json::json!({"url": "https://example.org/h", "secret_env": "S"}));
        assert!(ok.required);
        ok.check().unwrap();
        let err = config(serde_json::json!({"url": "ftp://example.org/h", "secret_env": "S"}))
            .check()
            .unwrap_err();
        assert!(err.contains("only http"), "{err}");
        let err = config(serde_json::json!({"url": "https://example.org/h"}))
            .check()
            .unwrap_err();
        assert!(err.contains("secret_env"), "{err}");
        let err = config(serde_json::json!({"url": "https://example.org/h", "secret": "whsec_!!"}))
            .check()
            .unwrap_err();
        assert!(err.contains("base64"), "{err}");
        let err = config(serde_json::json!({"url": "https://x.org", "secret_env": "MEDIAFLOW_TEST_UNSET_HOOK_SECRET"}))
            .key()
            .unwrap_err();
        assert!(err.contains("MEDIAFLOW_TEST_UNSET_HOOK_SECRET"), "{err}");
    }
}
