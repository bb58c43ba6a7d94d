//! The sign-up flow's tables (migration `0007_users.sql` of `mediaflow-db`): users and their
//! codes, idempotency keys, the mail outbox, notification registrations. Every change is one
//! statement or one transaction, so concurrent requests and redelivered events agree.

use mediaflow_db::{Db, DbError};
use mediaflow_events::{Channel, NotificationPrefs, UserProfile};
use serde::Serialize;
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::code::CodeKey;

/// Why a users operation failed.
#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("this Idempotency-Key was used with a different sign-up")]
    KeyReused,
    #[error("this email address has signed up already, with other details")]
    EmailTaken,
}

impl From<sqlx::Error> for UsersError {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(DbError::Sql(e))
    }
}

impl UsersError {
    /// Whether a retry later can succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, UsersError::Db(e) if e.is_transient())
    }
}

/// Where a user is in the flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UserState {
    /// Signed up; the code of the verification mail has not been entered.
    Pending,
    Verified,
}

/// A user as stored.
#[derive(Clone, Debug, Serialize)]
pub struct UserRow {
    #[serde(flatten)]
    pub profile: UserProfile,
    pub state: UserState,
    #[serde(skip)]
    pub signed_up_announced: bool,
    #[serde(skip)]
    pub verified_announced: bool,
    pub created_at_ms: i64,
    pub verified_at_ms: Option<i64>,
    /// Codes entered so far against the current code.
    pub code_attempts: i64,
    pub code_expires_at_ms: Option<i64>,
    /// Codes asked for after the sign-up's (`POST /v1/users/{id}/code`); the current code is
    /// this round's.
    pub code_round: i64,
    /// When the latest round was asked for.
    pub code_requested_at_ms: Option<i64>,
    #[serde(skip)]
    pub code_requested_announced: bool,
    #[serde(skip)]
    code_hmac: Option<String>,
}

/// Which mail: one of a user's kinds of mail, in one round (a verification mail has a round per
/// code; other kinds only round 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MailKey<'a> {
    pub user_id: &'a str,
    pub kind: &'a str,
    pub round: i64,
}

/// What asking for a new code found (`Users::request_code`).
#[derive(Debug)]
pub enum CodeRequest {
    /// Round `user.code_round` is the new code's; announce it unless `user` says it was.
    Granted(UserRow),
    /// The user is verified: no code needed.
    Verified,
    /// The last code was asked for (or the user signed up) too recently: retry after this
    /// many milliseconds.
    TooSoon {
        retry_after_ms: i64,
    },
    /// The user had as many codes as allowed.
    TooMany {
        max_codes: u32,
    },
    UnknownUser,
}

/// What `Users::create` did.
#[derive(Debug)]
pub struct Created {
    pub user: UserRow,
    /// False when the sign-up was a repeat (same Idempotency-Key, or the same email with the
    /// same details) and `user` is the one recorded before.
    pub new: bool,
}

/// Why a code was not accepted; the user's state is unchanged by all of them.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("no user with this id")]
    UnknownUser,
    #[error("this user is verified already")]
    AlreadyVerified { announced: bool },
    #[error("no verification code has been sent to this user yet")]
    NoCode,
    #[error("the verification code has expired")]
    Expired,
    #[error("too many wrong codes; this code no longer works")]
    TooManyAttempts,
    #[error("wrong code; {remaining} attempt(s) left")]
    WrongCode { remaining: i64 },
    #[error(transparent)]
    Store(#[from] UsersError),
}

impl From<sqlx::Error> for VerifyError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(e.into())
    }
}

/// Where one of a user's mails is (`mail_outbox.state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MailState {
    /// Not sent; the next delivery of its event sends it.
    Pending,
    /// A sender holds it until its lease ends.
    Sending,
    /// Committed as sent just before the end of the message went to the relay; the relay's
    /// answer was not recorded (the sender stopped, or the answer never came). Never sent again.
    Unconfirmed,
    /// The relay accepted it.
    Sent,
    /// The relay refused it for good.
    Failed,
}

impl MailState {
    fn parse(s: &str) -> Result<Self, DbError> {
        Ok(match s {
            "pending" => Self::Pending,
            "sending" => Self::Sending,
            "unconfirmed" => Self::Unconfirmed,
            "sent" => Self::Sent,
            "failed" => Self::Failed,
            other => return Err(DbError::Corrupt(format!("mail state `{other}`"))),
        })
    }
}

/// One of a user's mails.
#[derive(Clone, Debug, Serialize)]
pub struct MailRow {
    pub kind: String,
    pub round: i64,
    pub message_id: String,
    pub state: MailState,
    pub attempts: i64,
    pub error: Option<String>,
    pub sent_at_ms: Option<i64>,
}

/// What claiming a mail found.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// It is this sender's to send, until the lease ends.
    Claimed,
    /// It went out already (sent or unconfirmed): nothing to do.
    Done,
    /// Another sender holds it until this time (ms).
    HeldUntil(i64),
    /// The relay refused it for good before.
    Failed(String),
}

/// A decision to send a mail, made and not yet committed (`Users::decide_mail`).
pub struct MailDecision {
    tx: sqlx::Transaction<'static, sqlx::Any>,
}

/// Where a decision's COMMIT is decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitPath {
    /// A server (PostgreSQL): the COMMIT leaves the process in the commit's first poll, and the
    /// server commits it whatever the process does next.
    Server,
    /// In the process (SQLite, on a thread of sqlx's): committed when the commit returns.
    InProcess,
}

impl std::fmt::Debug for MailDecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MailDecision(..)")
    }
}

impl MailDecision {
    pub fn path(&self) -> CommitPath {
        // The transaction derefs to its connection.
        if (*self.tx).backend_name() == "PostgreSQL" {
            CommitPath::Server
        } else {
            CommitPath::InProcess
        }
    }

    pub async fn commit(self) -> Result<(), UsersError> {
        self.tx.commit().await?;
        Ok(())
    }
}

/// A notification channel a verified user registered.
#[derive(Clone, Debug, Serialize)]
pub struct RegistrationRow {
    pub channel: String,
    pub address: String,
    pub registered_at_ms: i64,
}

/// The sign-up flow's tables.
#[derive(Clone, Debug)]
pub struct Users {
    db: Db,
}

const USER_COLUMNS: &str = "id, email, phone, zone, notify_email, notify_sms, state, \
     signed_up_announced, verified_announced, code_hmac, code_expires_at_ms, code_attempts, \
     code_round, code_requested_at_ms, code_requested_announced, created_at_ms, verified_at_ms";

fn user_row(r: &AnyRow) -> Result<UserRow, UsersError> {
    let state: String = r.try_get("state")?;
    Ok(UserRow {
        profile: UserProfile {
            user_id: r.try_get("id")?,
            email: r.try_get("email")?,
            phone: r.try_get("phone")?,
            zone: r.try_get("zone")?,
            notifications: NotificationPrefs {
                email: r.try_get::<i64, _>("notify_email")? != 0,
                sms: r.try_get::<i64, _>("notify_sms")? != 0,
            },
        },
        state: match state.as_str() {
            "pending" => UserState::Pending,
            "verified" => UserState::Verified,
            other => {
                return Err(DbError::Corrupt(format!("user state `{other}`")).into());
            }
        },
        signed_up_announced: r.try_get::<i64, _>("signed_up_announced")? != 0,
        verified_announced: r.try_get::<i64, _>("verified_announced")? != 0,
        code_hmac: r.try_get("code_hmac")?,
        code_expires_at_ms: r.try_get("code_expires_at_ms")?,
        code_attempts: r.try_get("code_attempts")?,
        code_round: r.try_get("code_round")?,
        code_requested_at_ms: r.try_get("code_requested_at_ms")?,
        code_requested_announced: r.try_get::<i64, _>("code_requested_announced")? != 0,
        created_at_ms: r.try_get("created_at_ms")?,
        verified_at_ms: r.try_get("verified_at_ms")?,
    })
}

impl Users {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    fn pool(&self) -> &sqlx::AnyPool {
        self.db.pool()
    }

    /// Records the sign-up of `profile` (its `user_id` new), or finds the user a repeat of it
    /// recorded: the same `idempotency_key` (with the same request, `request_sha256`), or the
    /// same email with the same details. A key reused for another request, or an email taken
    /// with other details, is refused.
    pub async fn create(
        &self,
        profile: &UserProfile,
        request_sha256: &str,
        idempotency_key: Option<&str>,
        now_ms: i64,
    ) -> Result<Created, UsersError> {
        let mut tx = self.pool().begin().await?;
        if let Some(key) = idempotency_key {
            let earlier =
                sqlx::query("SELECT request_sha256, user_id FROM idempotency_keys WHERE key = $1")
                    .bind(key)
                    .fetch_optional(&mut *tx)
                    .await?;
            if let Some(r) = earlier {
                if r.try_get::<String, _>("request_sha256")? != request_sha256 {
                    return Err(UsersError::KeyReused);
                }
                let id: String = r.try_get("user_id")?;
                let user = user_in(&mut tx, "id", &id).await?.ok_or_else(|| {
                    DbError::Corrupt(format!("idempotency key of missing user {id}"))
                })?;
                return Ok(Created { user, new: false });
            }
        }
        let inserted = sqlx::query(
            "INSERT INTO users (id, email, phone, zone, notify_email, notify_sms, state, \
             signed_up_announced, verified_announced, code_attempts, created_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, 'pending', 0, 0, 0, $7) \
             ON CONFLICT (email) DO NOTHING",
        )
        .bind(&profile.user_id)
        .bind(&profile.email)
        .bind(profile.phone.as_deref())
        .bind(&profile.zone)
        .bind(i64::from(profile.notifications.email))
        .bind(i64::from(profile.notifications.sms))
        .bind(now_ms)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        let user = user_in(&mut tx, "email", &profile.email)
            .await?
            .ok_or_else(|| DbError::Corrupt("user vanished while signing up".into()))?;
        if !inserted {
            let same = user.profile.phone == profile.phone
                && user.profile.zone == profile.zone
                && user.profile.notifications == profile.notifications;
            if !same {
                return Err(UsersError::EmailTaken);
            }
        }
        if let Some(key) = idempotency_key {
            sqlx::query(
                "INSERT INTO idempotency_keys (key, request_sha256, user_id, created_at_ms) \
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(key)
            .bind(request_sha256)
            .bind(&user.profile.user_id)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(Created {
            user,
            new: inserted,
        })
    }

    pub async fn user(&self, id: &str) -> Result<Option<UserRow>, UsersError> {
        let mut conn = self.pool().acquire().await?;
        user_in(&mut conn, "id", id).await
    }

    /// Notes that `users.signed-up` (or, `verified`, `users.verified`) about `id` was
    /// acknowledged by the broker.
    pub async fn mark_announced(&self, id: &str, verified: bool) -> Result<(), UsersError> {
        let column = if verified {
            "verified_announced"
        } else {
            "signed_up_announced"
        };
        sqlx::query(&format!("UPDATE users SET {column} = 1 WHERE id = $1"))
            .bind(id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Checks `entered` against the user's code. Every attempt counts against
    /// `max_attempts`, the right one included; the right code within them, before it expires,
    /// verifies the user. Nothing but the attempt count changes otherwise.
    pub async fn verify(
        &self,
        id: &str,
        entered: &str,
        key: &CodeKey,
        max_attempts: u32,
        now_ms: i64,
    ) -> Result<UserRow, VerifyError> {
        // One statement takes the attempt, so concurrent guesses cannot exceed the limit.
        let took = sqlx::query(
            "UPDATE users SET code_attempts = code_attempts + 1 \
             WHERE id = $1 AND state = 'pending' AND code_hmac IS NOT NULL \
             AND code_attempts < $2 AND code_expires_at_ms > $3",
        )
        .bind(id)
        .bind(i64::from(max_attempts))
        .bind(now_ms)
        .execute(self.pool())
        .await?
        .rows_affected()
            == 1;
        let user = self.user(id).await?.ok_or(VerifyError::UnknownUser)?;
        if !took {
            return Err(match user {
                u if u.state == UserState::Verified => VerifyError::AlreadyVerified {
                    announced: u.verified_announced,
                },
                UserRow {
                    code_hmac: None, ..
                } => VerifyError::NoCode,
                u if u.code_attempts >= i64::from(max_attempts) => VerifyError::TooManyAttempts,
                _ => VerifyError::Expired,
            });
        }
        let stored = user.code_hmac.as_deref().unwrap_or_default();
        if !key.opens(id, entered, stored) {
            return Err(VerifyError::WrongCode {
                remaining: (i64::from(max_attempts) - user.code_attempts).max(0),
            });
        }
        let verified = sqlx::query(
            "UPDATE users SET state = 'verified', verified_at_ms = $2 \
             WHERE id = $1 AND state = 'pending'",
        )
        .bind(id)
        .bind(now_ms)
        .execute(self.pool())
        .await?
        .rows_affected()
            == 1;
        let user = self.user(id).await?.ok_or(VerifyError::UnknownUser)?;
        if !verified {
            return Err(VerifyError::AlreadyVerified {
                announced: user.verified_announced,
            });
        }
        Ok(user)
    }

    /// Starts a new code round for pending user `id`, unless the latest code (or the sign-up)
    /// is younger than `interval_ms` or the user had `max_codes` codes. A round granted and
    /// not yet announced is granted again, as it is, to the retry.
    pub async fn request_code(
        &self,
        id: &str,
        interval_ms: i64,
        max_codes: u32,
        now_ms: i64,
    ) -> Result<CodeRequest, UsersError> {
        // One statement decides, so concurrent requests start one round.
        sqlx::query(
            "UPDATE users SET code_round = code_round + 1, code_requested_at_ms = $2, \
             code_requested_announced = 0 \
             WHERE id = $1 AND state = 'pending' AND code_requested_announced = 1 \
             AND code_round + 1 < $3 \
             AND COALESCE(code_requested_at_ms, created_at_ms) <= $2 - $4",
        )
        .bind(id)
        .bind(now_ms)
        .bind(i64::from(max_codes))
        .bind(interval_ms)
        .execute(self.pool())
        .await?;
        let Some(user) = self.user(id).await? else {
            return Ok(CodeRequest::UnknownUser);
        };
        Ok(match user {
            u if u.state == UserState::Verified => CodeRequest::Verified,
            u if !u.code_requested_announced => CodeRequest::Granted(u),
            u if u.code_round + 1 >= i64::from(max_codes) => CodeRequest::TooMany { max_codes },
            u => CodeRequest::TooSoon {
                retry_after_ms: (u.code_requested_at_ms.unwrap_or(u.created_at_ms) + interval_ms
                    - now_ms)
                    .max(1),
            },
        })
    }

    /// Notes that `mediaflow.user.code-requested` of round `round` was acknowledged.
    pub async fn mark_code_announced(&self, id: &str, round: i64) -> Result<(), UsersError> {
        sqlx::query(
            "UPDATE users SET code_requested_announced = 1 WHERE id = $1 AND code_round = $2",
        )
        .bind(id)
        .bind(round)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Claims mail `key` for sender `owner` until `now_ms + lease_ms`, recording the mail (as
    /// pending, with `message_id`) if it is new. A lease that ran out is taken over: its
    /// sender stopped before committing, so its message never ended.
    pub async fn claim_mail(
        &self,
        key: &MailKey<'_>,
        message_id: &str,
        owner: &str,
        lease_ms: i64,
        now_ms: i64,
    ) -> Result<Claim, UsersError> {
        sqlx::query(
            "INSERT INTO mail_outbox (user_id, kind, round, message_id, state, attempts, \
             updated_at_ms) VALUES ($1, $2, $3, $4, 'pending', 0, $5) \
             ON CONFLICT (user_id, kind, round) DO NOTHING",
        )
        .bind(key.user_id)
        .bind(key.kind)
        .bind(key.round)
        .bind(message_id)
        .bind(now_ms)
        .execute(self.pool())
        .await?;
        let claimed = sqlx::query(
            "UPDATE mail_outbox SET state = 'sending', owner = $4, lease_until_ms = $5, \
             attempts = attempts + 1, updated_at_ms = $6 \
             WHERE user_id = $1 AND kind = $2 AND round = $3 \
             AND (state = 'pending' OR (state = 'sending' AND lease_until_ms < $6))",
        )
        .bind(key.user_id)
        .bind(key.kind)
        .bind(key.round)
        .bind(owner)
        .bind(now_ms + lease_ms)
        .bind(now_ms)
        .execute(self.pool())
        .await?
        .rows_affected()
            == 1;
        if claimed {
            return Ok(Claim::Claimed);
        }
        let r = sqlx::query(
            "SELECT state, lease_until_ms, error FROM mail_outbox \
             WHERE user_id = $1 AND kind = $2 AND round = $3",
        )
        .bind(key.user_id)
        .bind(key.kind)
        .bind(key.round)
        .fetch_one(self.pool())
        .await?;
        let state: String = r.try_get("state")?;
        Ok(match MailState::parse(&state)? {
            MailState::Sent | MailState::Unconfirmed => Claim::Done,
            MailState::Failed => {
                Claim::Failed(r.try_get::<Option<String>, _>("error")?.unwrap_or_default())
            }
            // Pending again between the two statements: someone released it; claim anew.
            MailState::Pending => Claim::HeldUntil(now_ms),
            MailState::Sending => Claim::HeldUntil(
                r.try_get::<Option<i64>, _>("lease_until_ms")?
                    .unwrap_or(now_ms),
            ),
        })
    }

    /// The decision to send, not yet committed: marks the mail `unconfirmed` (and stores the
    /// code it carries, sealed, with its expiry, as the code of the mail's round) if `owner`
    /// still holds its lease and, for a code, the round is still the user's latest and the user
    /// pending. None otherwise: the caller must not end the message. The caller commits the
    /// decision in the same instant as it ends the message (`MailDecision::commit`).
    pub async fn decide_mail(
        &self,
        key: &MailKey<'_>,
        owner: &str,
        code: Option<(&str, i64)>,
        now_ms: i64,
    ) -> Result<Option<MailDecision>, UsersError> {
        let mut tx = self.pool().begin().await?;
        let held = sqlx::query(
            "UPDATE mail_outbox SET state = 'unconfirmed', updated_at_ms = $4, sent_at_ms = $4 \
             WHERE user_id = $1 AND kind = $2 AND round = $5 AND owner = $3 \
             AND state = 'sending' AND lease_until_ms >= $4",
        )
        .bind(key.user_id)
        .bind(key.kind)
        .bind(owner)
        .bind(now_ms)
        .bind(key.round)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !held {
            return Ok(None);
        }
        if let Some((sealed, expires_at_ms)) = code {
            let current = sqlx::query(
                "UPDATE users SET code_hmac = $2, code_expires_at_ms = $3, code_attempts = 0 \
                 WHERE id = $1 AND code_round = $4 AND state = 'pending'",
            )
            .bind(key.user_id)
            .bind(sealed)
            .bind(expires_at_ms)
            .bind(key.round)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if !current {
                return Ok(None);
            }
        }
        Ok(Some(MailDecision { tx }))
    }

    /// The relay answered the committed mail: `sent` on acceptance; on refusal the mail goes
    /// back to `pending` (`permanent: false`, sent again on the next delivery) or to `failed`,
    /// and a code it carried is withdrawn.
    pub async fn settle_mail(
        &self,
        key: &MailKey<'_>,
        refusal: Option<(&str, bool)>,
        now_ms: i64,
    ) -> Result<(), UsersError> {
        let mut tx = self.pool().begin().await?;
        let (state, error) = match refusal {
            None => ("sent", None),
            Some((why, true)) => ("failed", Some(why)),
            Some((why, false)) => ("pending", Some(why)),
        };
        sqlx::query(
            "UPDATE mail_outbox SET state = $3, error = $4, updated_at_ms = $5, sent_at_ms = $6 \
             WHERE user_id = $1 AND kind = $2 AND round = $7",
        )
        .bind(key.user_id)
        .bind(key.kind)
        .bind(state)
        .bind(error)
        .bind(now_ms)
        .bind(refusal.is_none().then_some(now_ms))
        .bind(key.round)
        .execute(&mut *tx)
        .await?;
        if refusal.is_some() {
            sqlx::query(
                "UPDATE users SET code_hmac = NULL, code_expires_at_ms = NULL \
                 WHERE id = $1 AND state = 'pending' AND code_round = $2",
            )
            .bind(key.user_id)
            .bind(key.round)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Gives a claimed mail back before its message ended (the relay could not be reached or
    /// refused the envelope): `pending`, or `failed` when `permanent`.
    pub async fn release_mail(
        &self,
        key: &MailKey<'_>,
        owner: &str,
        error: &str,
        permanent: bool,
        now_ms: i64,
    ) -> Result<(), UsersError> {
        sqlx::query(
            "UPDATE mail_outbox SET state = $4, error = $5, owner = NULL, lease_until_ms = NULL, \
             updated_at_ms = $6 \
             WHERE user_id = $1 AND kind = $2 AND round = $7 AND owner = $3 AND state = 'sending'",
        )
        .bind(key.user_id)
        .bind(key.kind)
        .bind(owner)
        .bind(if permanent { "failed" } else { "pending" })
        .bind(error)
        .bind(now_ms)
        .bind(key.round)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// A user's mails.
    pub async fn mails(&self, user_id: &str) -> Result<Vec<MailRow>, UsersError> {
        sqlx::query(
            "SELECT kind, round, message_id, state, attempts, error, sent_at_ms FROM mail_outbox \
             WHERE user_id = $1 ORDER BY kind, round",
        )
        .bind(user_id)
        .fetch_all(self.pool())
        .await?
        .iter()
        .map(|r| {
            Ok(MailRow {
                kind: r.try_get("kind")?,
                round: r.try_get("round")?,
                message_id: r.try_get("message_id")?,
                state: MailState::parse(&r.try_get::<String, _>("state")?)?,
                attempts: r.try_get("attempts")?,
                error: r.try_get("error")?,
                sent_at_ms: r.try_get("sent_at_ms")?,
            })
        })
        .collect()
    }

    /// Records that `user_id` gets notifications on `channel` at `address`; true if new.
    pub async fn register(
        &self,
        user_id: &str,
        channel: Channel,
        address: &str,
        now_ms: i64,
    ) -> Result<bool, UsersError> {
        Ok(sqlx::query(
            "INSERT INTO notification_registrations (user_id, channel, address, registered_at_ms) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (user_id, channel) DO NOTHING",
        )
        .bind(user_id)
        .bind(channel.as_str())
        .bind(address)
        .bind(now_ms)
        .execute(self.pool())
        .await?
        .rows_affected()
            == 1)
    }

    /// A user's notification registrations.
    pub async fn registrations(&self, user_id: &str) -> Result<Vec<RegistrationRow>, UsersError> {
        sqlx::query(
            "SELECT channel, address, registered_at_ms FROM notification_registrations \
             WHERE user_id = $1 ORDER BY channel",
        )
        .bind(user_id)
        .fetch_all(self.pool())
        .await?
        .iter()
        .map(|r| {
            Ok(RegistrationRow {
                channel: r.try_get("channel")?,
                address: r.try_get("address")?,
                registered_at_ms: r.try_get("registered_at_ms")?,
            })
        })
        .collect()
    }
}

async fn user_in(
    conn: &mut sqlx::AnyConnection,
    column: &str,
    value: &str,
) -> Result<Option<UserRow>, UsersError> {
    sqlx::query(&format!(
        "SELECT {USER_COLUMNS} FROM users WHERE {column} = $1"
    ))
    .bind(value)
    .fetch_optional(conn)
    .await?
    .as_ref()
    .map(user_row)
    .transpose()
}
