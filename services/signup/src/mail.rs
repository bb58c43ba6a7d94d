//! The `mail` stage kind: one mail per (user, kind of mail) over SMTP, however often its event
//! is delivered. The outbox row is claimed under a lease, the envelope and the message go to the
//! relay with its end held back ([`crate::wire`]), and the decision to send is committed (with
//! the code the mail carries) in the same poll that lets the message go; the relay's answer
//! settles it. See "Exactly one mail" in the README.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use cloudevents::{AttributesReader, Event};
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, Certificate, TlsParameters};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt};
use lettre::transport::smtp::extension::ClientId;
use lettre::{Address, Message};
use mediaflow_events::UserProfile;
use mediaflow_runtime::{Handler, Output, StageError};
use mediaflow_telemetry::Metrics;
use mediaflow_users::{
    Claim, CodeKey, CommitPath, MailKey, UserState, Users, VerificationCode, now_ms,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::wire::{self, GateHandle, Wire};

/// How the connection to the relay is secured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plain SMTP (a local relay or sink).
    #[default]
    None,
    /// Plain, upgraded with STARTTLS before anything else (port 587).
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
}

/// The SMTP relay mail goes through (`[mail]`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MailConfig {
    /// Relay host name. Empty under `mediaflow up`: the embedded SMTP sink.
    pub host: String,
    /// Relay port (25, 587 with STARTTLS, 465 with TLS).
    pub port: u16,
    pub tls: TlsMode,
    /// A PEM file of CA certificates trusted for the relay besides the system's (a private
    /// relay's own CA).
    pub ca_file: Option<PathBuf>,
    /// SMTP AUTH user name; none when empty.
    pub username: String,
    /// SMTP AUTH password; set it from the environment (`MEDIAFLOW__MAIL__PASSWORD`).
    pub password: String,
    /// The sender, e.g. `mediaflow <no-reply@example.com>`; its domain ends every Message-ID.
    pub from: String,
    /// The name given in EHLO; the machine's host name when empty.
    pub hello_name: String,
    /// Seconds each exchange with the relay may take.
    pub timeout_secs: u64,
    /// Seconds a sender holds a mail it claimed. A sender that stops before committing its
    /// mail (a crash) holds it this long; the next delivery of the event then sends it.
    pub lease_secs: u64,
    /// A folder with templates of one's own (`<kind>.txt`, whose first line is
    /// `Subject: ...`, and `<kind>.html`); the shipped ones when unset.
    pub templates_dir: Option<PathBuf>,
}

impl Default for MailConfig {
    fn default() -> Self {
        Self {
            host: String::new(),
            port: 25,
            tls: TlsMode::None,
            ca_file: None,
            username: String::new(),
            password: String::new(),
            from: "mediaflow <no-reply@mediaflow.localhost>".into(),
            hello_name: String::new(),
            timeout_secs: 30,
            lease_secs: 60,
            templates_dir: None,
        }
    }
}

/// Which mail a `mail` stage sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MailKind {
    /// The one-time code that verifies the address (for `users.signed-up`).
    Verification,
    /// The welcome once verified (for `users.verified`).
    Welcome,
}

impl MailKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MailKind::Verification => "verification",
            MailKind::Welcome => "welcome",
        }
    }
}

/// Settings of a `mail` stage.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailStageConfig {
    /// The mail it sends to the user each event is about.
    pub mail: MailKind,
}

/// A mail's subject, plain text and HTML, with `{{name}}` placeholders.
#[derive(Clone, Debug)]
struct Template {
    subject: String,
    text: String,
    html: String,
}

/// The templates of every kind of mail.
#[derive(Clone, Debug)]
pub struct Templates {
    verification: Template,
    welcome: Template,
}

impl Templates {
    /// The templates in `dir`, else the shipped ones.
    pub fn load(dir: Option<&Path>) -> Result<Self, String> {
        let one = |kind: MailKind, text: &str, html: &str| -> Result<Template, String> {
            let (text, html) = match dir {
                None => (text.to_owned(), html.to_owned()),
                Some(dir) => {
                    let read = |ext: &str| {
                        let path = dir.join(format!("{}.{ext}", kind.as_str()));
                        std::fs::read_to_string(&path)
                            .map_err(|e| format!("mail template {}: {e}", path.display()))
                    };
                    (read("txt")?, read("html")?)
                }
            };
            let (first, body) = text.split_once('\n').unwrap_or((&text, ""));
            let subject = first.strip_prefix("Subject:").ok_or_else(|| {
                format!(
                    "mail template {}.txt: the first line must be `Subject: ...`",
                    kind.as_str()
                )
            })?;
            Ok(Template {
                subject: subject.trim().to_owned(),
                text: body.trim_start_matches(['\r', '\n']).to_owned(),
                html,
            })
        };
        Ok(Self {
            verification: one(
                MailKind::Verification,
                include_str!("../templates/verification.txt"),
                include_str!("../templates/verification.html"),
            )?,
            welcome: one(
                MailKind::Welcome,
                include_str!("../templates/welcome.txt"),
                include_str!("../templates/welcome.html"),
            )?,
        })
    }

    /// Subject, text and HTML of mail `kind` with `vars` filled in (escaped in the HTML).
    fn render(&self, kind: MailKind, vars: &[(&str, String)]) -> (String, String, String) {
        let t = match kind {
            MailKind::Verification => &self.verification,
            MailKind::Welcome => &self.welcome,
        };
        let fill = |s: &str, escape: bool| {
            vars.iter().fold(s.to_owned(), |acc, (name, value)| {
                let value = if escape {
                    html_escape(value)
                } else {
                    value.clone()
                };
                acc.replace(&format!("{{{{{name}}}}}"), &value)
            })
        };
        (
            fill(&t.subject, false),
            fill(&t.text, false),
            fill(&t.html, true),
        )
    }
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// The relay, as configured.
#[derive(Clone, Debug)]
pub struct Relay {
    config: MailConfig,
    from: Mailbox,
    hello: ClientId,
    /// For `tls = "tls"`: the TLS client set up once.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// For `tls = "starttls"`: lettre's TLS parameters, set up once (the system's roots are
    /// read then, not on every mail).
    starttls: Option<Starttls>,
}

/// lettre's TLS parameters, which do not say what they are.
#[derive(Clone)]
struct Starttls(TlsParameters);

impl std::fmt::Debug for Starttls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Starttls(..)")
    }
}

impl Relay {
    pub fn new(config: MailConfig) -> Result<Self, String> {
        if config.host.is_empty() {
            return Err("mail.host is not set: no SMTP relay to send through".into());
        }
        let from: Mailbox = config
            .from
            .parse()
            .map_err(|e| format!("mail.from `{}`: {e}", config.from))?;
        let hello = if config.hello_name.is_empty() {
            ClientId::default()
        } else {
            ClientId::Domain(config.hello_name.clone())
        };
        let extra_roots = match &config.ca_file {
            Some(path) => wire::read_ca_file(path)?,
            None => Vec::new(),
        };
        let tls = match config.tls {
            TlsMode::Tls => Some(Arc::new(wire::tls_config(&extra_roots)?)),
            TlsMode::None | TlsMode::Starttls => None,
        };
        let starttls = match config.tls {
            TlsMode::Starttls => {
                let mut params = TlsParameters::builder(config.host.clone());
                for cert in &extra_roots {
                    params = params.add_root_certificate(
                        Certificate::from_der(cert.to_vec())
                            .map_err(|e| format!("mail.ca_file: {e}"))?,
                    );
                }
                Some(Starttls(
                    params
                        .build()
                        .map_err(|e| format!("mail TLS set-up: {e}"))?,
                ))
            }
            TlsMode::None | TlsMode::Tls => None,
        };
        Ok(Self {
            config,
            from,
            hello,
            tls,
            starttls,
        })
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.config.timeout_secs.max(1))
    }

    /// A connection past EHLO, STARTTLS and AUTH as configured, over a [`Wire`] whose gate
    /// the handle holds and releases.
    async fn connect(&self) -> Result<(AsyncSmtpConnection, GateHandle), Failed> {
        let c = &self.config;
        let (wire, gate) = Wire::connect(&c.host, c.port, self.tls.clone())
            .await
            .map_err(Failed::Tcp)?;
        let mut conn = AsyncSmtpConnection::connect_with_transport(Box::new(wire), &self.hello)
            .await
            .map_err(|e| Failed::Relay(format!("greeting and EHLO: {e}")))?;
        if let Some(Starttls(tls)) = &self.starttls {
            conn.starttls(tls.clone(), &self.hello)
                .await
                .map_err(|e| Failed::Relay(format!("STARTTLS: {e}")))?;
        }
        if !c.username.is_empty() {
            let mechanisms = [Mechanism::Plain, Mechanism::Login];
            if c.tls == TlsMode::None
                && !mechanisms
                    .iter()
                    .any(|m| conn.server_info().supports_auth_mechanism(*m))
            {
                return Err(Failed::Relay(
                    "the relay offers no AUTH PLAIN or LOGIN on a plain connection; relays \
                     offer them only over TLS: set mail.tls to \"starttls\" (port 587) or \
                     \"tls\" (port 465)"
                        .into(),
                ));
            }
            conn.auth(
                &mechanisms,
                &Credentials::new(c.username.clone(), c.password.clone()),
            )
            .await
            .map_err(|e| Failed::Relay(format!("AUTH as {}: {e}", c.username)))?;
        }
        Ok((conn, gate))
    }
}

/// Why an exchange with the relay failed.
#[derive(Debug)]
enum Failed {
    /// The connection could not be made (the relay is down or unreachable) or secured.
    Tcp(std::io::Error),
    /// The relay refused the session (greeting, EHLO, STARTTLS, AUTH) or the sender: the
    /// configuration or the relay is at fault, not the mail, which waits for them.
    Relay(String),
    /// The relay refused this mail (its recipient, its content), for now or for good.
    Smtp(lettre::transport::smtp::Error),
}

impl From<lettre::transport::smtp::Error> for Failed {
    fn from(e: lettre::transport::smtp::Error) -> Self {
        Failed::Smtp(e)
    }
}

/// The `mail` stage: sends its kind of mail to the user each event is about (any event whose
/// data holds a user profile: `mediaflow.user.signed-up`, `mediaflow.user.verified`).
pub struct SendMail {
    stage: String,
    kind: MailKind,
    relay: Relay,
    templates: Arc<Templates>,
    users: Users,
    key: CodeKey,
    code_ttl: Duration,
    /// This sender's identity on the leases it takes.
    owner: String,
    metrics: Metrics,
}

/// A failure before the decision to send: the mail goes back to pending (or failed).
struct Unsent {
    error: StageError,
}

impl SendMail {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        stage: &str,
        settings: &MailStageConfig,
        relay: Relay,
        templates: Arc<Templates>,
        users: Users,
        key: CodeKey,
        code_ttl: Duration,
        metrics: Metrics,
    ) -> Self {
        Self {
            stage: stage.to_owned(),
            kind: settings.mail,
            relay,
            templates,
            users,
            key,
            code_ttl,
            owner: format!("{stage}/{}", uuid::Uuid::new_v4()),
            metrics,
        }
    }

    /// The Message-ID of mail `kind` to `user_id` in `round`: the same for every attempt, so a
    /// receiver can recognise a copy.
    fn message_id(&self, user_id: &str, round: i64) -> String {
        let name = match round {
            0 => format!("{user_id}/{}", self.kind.as_str()),
            n => format!("{user_id}/{}/{n}", self.kind.as_str()),
        };
        let id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, name.as_bytes());
        format!("<{id}@{}>", self.relay.from.email.domain())
    }

    /// Claims the mail, waiting out a lease a stopped sender left behind. False: it went out
    /// before, nothing to do.
    async fn claim(&self, key: &MailKey<'_>, message_id: &str) -> Result<bool, StageError> {
        let lease_ms =
            i64::try_from(self.relay.config.lease_secs.max(1) * 1000).unwrap_or(i64::MAX);
        loop {
            let now = now_ms();
            let claim = self
                .users
                .claim_mail(key, message_id, &self.owner, lease_ms, now)
                .await
                .map_err(store_error)?;
            match claim {
                Claim::Claimed => return Ok(true),
                Claim::Done => return Ok(false),
                Claim::Failed(why) => {
                    return Err(StageError::permanent(format!(
                        "the relay refused the {} mail for good: {why}",
                        self.kind.as_str()
                    )));
                }
                Claim::HeldUntil(until) => {
                    let wait = u64::try_from(until - now + 1).unwrap_or(0);
                    tracing::info!(stage = %self.stage, user = %key.user_id, wait_ms = wait, "mail held by another sender's lease; waiting");
                    tokio::time::sleep(Duration::from_millis(wait.min(lease_ms as u64))).await;
                }
            }
        }
    }

    /// Sends the mail of `round` (of codes; 0 for other kinds) to `user`.
    async fn send(&self, user: &UserProfile, round: i64) -> Result<(), StageError> {
        let message_id = self.message_id(&user.user_id, round);
        let key = MailKey {
            user_id: &user.user_id,
            kind: self.kind.as_str(),
            round,
        };
        if !self.claim(&key, &message_id).await? {
            self.metrics.mail(&self.stage, "duplicate");
            return Ok(());
        }
        let kind = self.kind.as_str();
        let code = (self.kind == MailKind::Verification).then(VerificationCode::random);
        let (mut conn, gate, message) = match self.open(user, &message_id, code.as_ref()).await {
            Ok(open) => open,
            Err(Unsent { error }) => return self.unsent(&key, error).await,
        };
        let now = now_ms();
        let sealed = code.as_ref().map(|c| {
            let expires = now + i64::try_from(self.code_ttl.as_millis()).unwrap_or(i64::MAX);
            (self.key.seal(&user.user_id, c), expires)
        });
        let code = sealed.as_ref().map(|(s, e)| (s.as_str(), *e));
        let decided = self.users.decide_mail(&key, &self.owner, code, now).await;
        let decision = match decided {
            Ok(Some(decision)) => decision,
            Ok(None) | Err(_) => {
                // Closing the connection in the middle of DATA: the relay discards the
                // unfinished message. (No QUIT: in DATA it would be part of the message.)
                drop(conn);
                return Err(match decided {
                    Err(e) => store_error(e),
                    _ => StageError::transient(
                        "lost the lease on the mail, or a newer code replaced its code, before \
                         sending it",
                    ),
                });
            }
        };
        let timeout = self.relay.timeout();
        let ended = {
            // lettre writes the whole message into the gate and waits for the relay's answer.
            gate.hold();
            let mut answer = std::pin::pin!(tokio::time::timeout(timeout, conn.message(&message)));
            let written = std::future::poll_fn(|cx| match answer.as_mut().poll(cx) {
                Poll::Ready(early) => Poll::Ready(Some(early)),
                Poll::Pending if gate.stalled() => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            })
            .await;
            if let Some(early) = written {
                // Nothing of the message left the gate; the decision is rolled back.
                drop(decision);
                let why = match early {
                    Ok(Err(e)) => e.to_string(),
                    _ => "the message could not be written".to_owned(),
                };
                let relay = format!(
                    "SMTP relay {}:{}",
                    self.relay.config.host, self.relay.config.port
                );
                return self
                    .unsent(&key, StageError::transient(format!("{relay}: {why}")))
                    .await;
            }
            // On PostgreSQL the COMMIT leaves in the commit's first poll and the held message
            // right after it in the same poll, two writes with nothing between them: a sender
            // killed leaves both (the mail is recorded and sent) or neither (the relay never
            // saw the end of the message, and the lease lets the next delivery send it). Only
            // a kill in between, while the process is descheduled between two system calls,
            // loses the mail (README, "Exactly one mail"). SQLite commits on a thread of its
            // own, so there the message waits for the commit to return: a kill in between
            // loses the mail rather than sends it twice.
            let held = gate.held();
            let server = decision.path() == CommitPath::Server;
            let mut commit = std::pin::pin!(decision.commit());
            let (mut committed, mut answered, mut released) = (None, None, false);
            std::future::poll_fn(|cx| {
                if committed.is_none()
                    && let Poll::Ready(r) = commit.as_mut().poll(cx)
                {
                    committed = Some(r);
                }
                if !released {
                    match &committed {
                        // Failed: the message stays held and is never sent.
                        Some(Err(_)) => return Poll::Ready(()),
                        None if !server => return Poll::Pending,
                        _ => {}
                    }
                    gate.release();
                    released = true;
                }
                if answered.is_none()
                    && let Poll::Ready(r) = answer.as_mut().poll(cx)
                {
                    answered = Some(r);
                }
                if committed.is_some() && answered.is_some() {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            })
            .await;
            tracing::debug!(user = %user.user_id, bytes = held, released, "message ended");
            match (committed, answered) {
                (Some(committed), Some(answered)) => Ok((committed, answered)),
                // The commit failed before the release: the message never left.
                (Some(Err(e)), None) => Err(e),
                _ => unreachable!("polled until both ended, or the commit failed at once"),
            }
        };
        let (committed, answer) = match ended {
            Ok(both) => both,
            Err(e) => {
                // The message never left the gate: closing drops it (as above).
                drop(conn);
                return self.unsent(&key, store_error(e)).await;
            }
        };
        if let Err(e) = committed {
            // The message may be out while the decision is not recorded: record it again
            // (the lease is still this sender's), else it would be sent again once the lease
            // ends.
            tracing::warn!(stage = %self.stage, user = %user.user_id, error = %e, "committing a mail's decision failed; recording it again");
            let again = self
                .users
                .decide_mail(&key, &self.owner, code, now_ms())
                .await
                .map_err(store_error)?;
            match again {
                Some(decision) => decision.commit().await.map_err(store_error)?,
                None => {
                    return Err(StageError::transient(
                        "lost the lease on a mail whose message may have been sent",
                    ));
                }
            }
        }
        let _ = tokio::time::timeout(timeout, conn.quit()).await;
        match answer {
            Ok(Ok(_)) => {
                self.users
                    .settle_mail(&key, None, now_ms())
                    .await
                    .map_err(store_error)?;
                self.metrics.mail(&self.stage, "sent");
                tracing::info!(stage = %self.stage, user = %user.user_id, mail = kind, message_id = %message_id, "mail sent");
                Ok(())
            }
            Ok(Err(e)) if e.is_response() => {
                let permanent = e.is_permanent();
                let why = format!("the relay refused the message: {e}");
                self.users
                    .settle_mail(&key, Some((&why, permanent)), now_ms())
                    .await
                    .map_err(store_error)?;
                self.metrics.mail(&self.stage, "refused");
                Err(StageError::dependency(!permanent, why))
            }
            // The end of the message may have reached the relay: it counts as sent.
            Ok(Err(e)) => {
                self.unconfirmed(user, &message_id, &e.to_string());
                Ok(())
            }
            Err(_) => {
                self.unconfirmed(user, &message_id, "no answer in time");
                Ok(())
            }
        }
    }

    /// The mail did not go out: its claim is given up (failed for good when `error` is
    /// permanent), and `error` is the event's outcome.
    async fn unsent(&self, key: &MailKey<'_>, error: StageError) -> Result<(), StageError> {
        let permanent = error.class != mediaflow_runtime::ErrorClass::Transient;
        self.users
            .release_mail(key, &self.owner, &error.message, permanent, now_ms())
            .await
            .map_err(store_error)?;
        self.metrics.mail(&self.stage, "refused");
        Err(error)
    }

    fn unconfirmed(&self, user: &UserProfile, message_id: &str, why: &str) {
        self.metrics.mail(&self.stage, "unconfirmed");
        tracing::warn!(stage = %self.stage, user = %user.user_id, mail = self.kind.as_str(), message_id, reason = why,
            "the relay's answer to a committed mail was lost; it is left as unconfirmed and not sent again");
    }

    /// The rendered message, and a connection with the envelope given and DATA accepted.
    async fn open(
        &self,
        user: &UserProfile,
        message_id: &str,
        code: Option<&VerificationCode>,
    ) -> Result<(AsyncSmtpConnection, GateHandle, Vec<u8>), Unsent> {
        let permanent = |e: String| Unsent {
            error: StageError::bad_input(e),
        };
        let to: Address = user
            .email
            .parse()
            .map_err(|e| permanent(format!("address `{}`: {e}", user.email)))?;
        let notifications = match (user.notifications.email, user.notifications.sms) {
            (true, true) => "email and SMS",
            (true, false) => "email",
            (false, true) => "SMS",
            (false, false) => "none",
        };
        let vars = [
            ("email", user.email.clone()),
            ("user_id", user.user_id.clone()),
            ("zone", user.zone.clone()),
            ("notifications", notifications.to_owned()),
            (
                "code",
                code.map(|c| c.as_str().to_owned()).unwrap_or_default(),
            ),
            (
                "valid_minutes",
                (self.code_ttl.as_secs() / 60).max(1).to_string(),
            ),
        ];
        let (subject, text, html) = self.templates.render(self.kind, &vars);
        let message = Message::builder()
            .from(self.relay.from.clone())
            .to(Mailbox::new(None, to.clone()))
            .subject(subject)
            .message_id(Some(message_id.to_owned()))
            .date_now()
            .multipart(MultiPart::alternative_plain_html(text, html))
            .map_err(|e| permanent(format!("building the {} mail: {e}", self.kind.as_str())))?
            .formatted();
        let relay = format!(
            "SMTP relay {}:{}",
            self.relay.config.host, self.relay.config.port
        );
        let smtp = |e: Failed| Unsent {
            error: match e {
                Failed::Tcp(e) => StageError::transient(format!("{relay}: {e}")),
                Failed::Relay(e) => StageError::transient(format!("{relay}: {e}")),
                Failed::Smtp(e) => {
                    StageError::dependency(!e.is_permanent(), format!("{relay}: {e}"))
                }
            },
        };
        let timeout = self.relay.timeout();
        let late = || Unsent {
            error: StageError::transient(format!(
                "SMTP relay {}:{} did not answer within {timeout:?}",
                self.relay.config.host, self.relay.config.port
            )),
        };
        let envelope = async {
            let (mut conn, gate) = self.relay.connect().await?;
            conn.command(Mail::new(Some(self.relay.from.email.clone()), vec![]))
                .await
                .map_err(|e| Failed::Relay(format!("MAIL FROM: {e}")))?;
            // From here a refusal is about this mail (its recipient, its content).
            conn.command(Rcpt::new(to, vec![])).await?;
            conn.command(Data).await?;
            Ok::<_, Failed>((conn, gate))
        };
        let (conn, gate) = tokio::time::timeout(timeout, envelope)
            .await
            .map_err(|_| late())?
            .map_err(smtp)?;
        Ok((conn, gate, message))
    }
}

fn store_error(e: mediaflow_users::UsersError) -> StageError {
    StageError::dependency(e.is_transient(), format!("recording the mail: {e}"))
}

impl Handler for SendMail {
    async fn handle(&self, event: &Event) -> Result<Vec<Output>, StageError> {
        let data =
            mediaflow_events::data_json(event).map_err(|e| StageError::bad_input(e.to_string()))?;
        // A new code's event (`mediaflow.user.code-requested`) names its round.
        let round = match self.kind {
            MailKind::Verification => data.get("round").and_then(Value::as_i64).unwrap_or(0),
            MailKind::Welcome => 0,
        };
        let user: UserProfile = serde_json::from_value(data).map_err(|e| {
            StageError::bad_input(format!(
                "event {} ({}) does not describe a user: {e}",
                event.id(),
                event.ty()
            ))
        })?;
        if self.kind == MailKind::Verification {
            // The code is stored on the user's row: a user the gateway never recorded cannot
            // verify, so it gets no mail.
            let Some(known) = self.users.user(&user.user_id).await.map_err(store_error)? else {
                return Err(StageError::bad_input(format!(
                    "user {} is not recorded; no verification mail",
                    user.user_id
                )));
            };
            // A code no one can use any more: the user is verified, or asked for a newer one.
            if known.state == UserState::Verified || known.code_round > round {
                tracing::info!(stage = %self.stage, user = %user.user_id, round, latest = known.code_round,
                    "no verification mail: the user is verified or has a newer code");
                self.metrics.mail(&self.stage, "superseded");
                return Ok(Vec::new());
            }
        }
        self.send(&user, round).await?;
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_templates_fill_and_escape() {
        let t = Templates::load(None).unwrap();
        let (subject, text, html) = t.render(
            MailKind::Verification,
            &[("code", "012345".into()), ("valid_minutes", "15".into())],
        );
        assert_eq!(subject, "Your mediaflow verification code: 012345");
        assert!(
            text.contains("012345") && text.contains("15 minutes"),
            "{text}"
        );
        assert!(!text.contains("{{"), "{text}");
        assert!(html.contains(">012345<"), "{html}");
        let (_, _, html) = t.render(MailKind::Welcome, &[("email", "a<b>@x.org".into())]);
        assert!(html.contains("a&lt;b&gt;@x.org"), "{html}");
    }

    #[test]
    fn templates_of_ones_own_need_a_subject_line() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        for kind in ["verification", "welcome"] {
            std::fs::write(
                dir.join(format!("{kind}.txt")),
                "Subject: Hi {{email}}\n\nBody",
            )
            .unwrap();
            std::fs::write(dir.join(format!("{kind}.html")), "<p>{{email}}</p>").unwrap();
        }
        let t = Templates::load(Some(dir)).unwrap();
        let (subject, text, _) = t.render(MailKind::Welcome, &[("email", "a@b.org".into())]);
        assert_eq!((subject.as_str(), text.as_str()), ("Hi a@b.org", "Body"));
        std::fs::write(dir.join("welcome.txt"), "Hi\n\nBody").unwrap();
        let err = Templates::load(Some(dir)).unwrap_err();
        assert!(
            err.contains("welcome.txt") && err.contains("Subject:"),
            "{err}"
        );
    }
}
