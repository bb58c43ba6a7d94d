//! The sign-up flow's stage kinds (`mail`, `webhook`, `register`, `sms`; `mediaflow-signup`)
//! as the registry knows them, and the key verification codes are sealed under, which the
//! gateway and the `mail` stages must share.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use mediaflow_pipeline::{Problem, StageDecl};
use mediaflow_signup::{
    MailStageConfig, Register, RegisterConfig, Relay, SendMail, Sms, SmsConfig, Templates, Webhook,
    WebhookConfig,
};
use mediaflow_users::{CodeKey, Users};

use crate::MediaflowConfig;
use crate::platform::StageSpec;
use crate::registry::{BuildContext, Built, Kind, declared};

/// The key of `signup.code_key`, or the one kept in `<data_dir>/signup-code.key` (made on
/// first use) when that is empty.
pub fn code_key(config: &MediaflowConfig) -> Result<CodeKey> {
    if !config.signup.code_key.is_empty() {
        return CodeKey::from_base64(&config.signup.code_key).map_err(anyhow::Error::msg);
    }
    let path = config.data_dir.join("signup-code.key");
    if !path.exists() {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating {}", config.data_dir.display()))?;
        let tmp = path.with_extension("key.tmp");
        std::fs::write(&tmp, CodeKey::generate())
            .with_context(|| format!("writing {}", tmp.display()))?;
        // Two processes starting at once keep whichever key landed first.
        if std::fs::hard_link(&tmp, &path).is_err() && !path.exists() {
            anyhow::bail!("could not create {}", path.display());
        }
        let _ = std::fs::remove_file(&tmp);
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    CodeKey::from_base64(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn out() -> Vec<String> {
    vec!["out".to_owned()]
}

/// Sends one kind of mail (`mail: verification | welcome`) per user, exactly once, through
/// the relay of `[mail]`. No ports.
pub struct MailKind;

impl Kind for MailKind {
    fn name(&self) -> &str {
        "mail"
    }

    fn check(&self, stage: &StageDecl) -> Vec<Problem> {
        declared::<MailStageConfig>(stage, |_| Ok(()), |_| Vec::new())
    }

    fn build(&self, stage: &StageSpec, ctx: &BuildContext<'_>) -> Result<Built> {
        let config = ctx.config;
        let relay = Relay::new(config.mail.clone()).map_err(anyhow::Error::msg)?;
        let templates =
            Templates::load(config.mail.templates_dir.as_deref()).map_err(anyhow::Error::msg)?;
        Ok(Built::handler(SendMail::new(
            &stage.name,
            &stage.settings::<MailStageConfig>()?,
            relay,
            Arc::new(templates),
            Users::new(ctx.services.db.clone()),
            code_key(config)?,
            Duration::from_secs(config.signup.code_ttl_secs.max(60)),
            ctx.services.metrics.clone(),
        )))
    }
}

/// A signed webhook (ch. 8): `required` ones pass events on (port `out`) after a 2xx;
/// optional ones have no ports.
pub struct WebhookKind;

impl Kind for WebhookKind {
    fn name(&self) -> &str {
        "webhook"
    }

    fn check(&self, stage: &StageDecl) -> Vec<Problem> {
        declared::<WebhookConfig>(stage, WebhookConfig::check, |c| {
            if c.required { out() } else { Vec::new() }
        })
    }

    fn build(&self, stage: &StageSpec, ctx: &BuildContext<'_>) -> Result<Built> {
        let hook = Webhook::new(
            &stage.name,
            stage.settings::<WebhookConfig>()?,
            ctx.services.metrics.clone(),
        )
        .map_err(|e| anyhow::anyhow!("stage `{}`: {e}", stage.name))?;
        Ok(Built::handler(hook))
    }
}

/// Records a notification channel (`channel: email | sms`) for each verified user; port `out`.
pub struct RegisterKind;

impl Kind for RegisterKind {
    fn name(&self) -> &str {
        "register"
    }

    fn check(&self, stage: &StageDecl) -> Vec<Problem> {
        declared::<RegisterConfig>(stage, |_| Ok(()), |_| out())
    }

    fn build(&self, stage: &StageSpec, ctx: &BuildContext<'_>) -> Result<Built> {
        Ok(Built::handler(Register::new(
            &stage.settings::<RegisterConfig>()?,
            Users::new(ctx.services.db.clone()),
        )))
    }
}

/// Puts a text message on the SMS outbox (port `out`) for each SMS registration.
pub struct SmsKind;

impl Kind for SmsKind {
    fn name(&self) -> &str {
        "sms"
    }

    fn check(&self, stage: &StageDecl) -> Vec<Problem> {
        declared::<SmsConfig>(
            stage,
            |c| {
                if c.body.is_empty() || c.body.chars().count() > 1600 {
                    Err("`body` must have 1 to 1600 characters".into())
                } else {
                    Ok(())
                }
            },
            |_| out(),
        )
    }

    fn build(&self, stage: &StageSpec, _ctx: &BuildContext<'_>) -> Result<Built> {
        Ok(Built::handler(Sms::new(stage.settings::<SmsConfig>()?)))
    }
}
