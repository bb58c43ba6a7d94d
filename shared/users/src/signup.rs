//! What `POST /v1/users` accepts: an email address, an optional E.164 phone number, a known
//! zone and notification preferences, each refused with the field it is about.

use mediaflow_events::{NotificationPrefs, UserProfile};
use serde::Deserialize;

/// The body of a sign-up, as sent.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignupRequest {
    pub email: String,
    #[serde(default)]
    pub phone: Option<String>,
    pub zone: String,
    #[serde(default)]
    pub notifications: NotificationPrefs,
}

/// A sign-up that cannot be taken, and the field at fault.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SignupError {
    pub field: &'static str,
    pub message: String,
}

fn refuse(field: &'static str, message: impl Into<String>) -> SignupError {
    SignupError {
        field,
        message: message.into(),
    }
}

impl SignupRequest {
    /// The user this sign-up describes, normalised (domain in lower case, phone digits only),
    /// under id `user_id`; `zones` are the zones users may sign up in.
    pub fn profile(&self, user_id: &str, zones: &[String]) -> Result<UserProfile, SignupError> {
        let email = normalise_email(&self.email)?;
        let phone = self.phone.as_deref().map(normalise_phone).transpose()?;
        if !zones.contains(&self.zone) {
            return Err(refuse(
                "zone",
                format!(
                    "unknown zone `{}`; zones: {}",
                    self.zone.chars().take(64).collect::<String>(),
                    zones.join(", ")
                ),
            ));
        }
        if self.notifications.sms && phone.is_none() {
            return Err(refuse(
                "notifications.sms",
                "SMS notifications need a phone number",
            ));
        }
        Ok(UserProfile {
            user_id: user_id.to_owned(),
            email,
            phone,
            zone: self.zone.clone(),
            notifications: self.notifications,
        })
    }
}

/// `local@domain` with an ASCII dot-atom local part (RFC 5322) and a domain of DNS labels with
/// at least one dot; the domain is lower-cased, the local part kept (it may be case-sensitive).
pub fn normalise_email(raw: &str) -> Result<String, SignupError> {
    let bad = |why: &str| refuse("email", format!("not a valid email address: {why}"));
    let email = raw.trim();
    if email.len() > 254 {
        return Err(bad("longer than 254 characters"));
    }
    let Some((local, domain)) = email.rsplit_once('@') else {
        return Err(bad("no `@`"));
    };
    let atext = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c);
    if local.is_empty() || local.len() > 64 {
        return Err(bad("the part before `@` must have 1 to 64 characters"));
    }
    if local
        .split('.')
        .any(|atom| atom.is_empty() || !atom.chars().all(atext))
    {
        return Err(bad(
            "the part before `@` has a character or dot that is not allowed",
        ));
    }
    let domain = domain.to_ascii_lowercase();
    let labels: Vec<&str> = domain.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if labels.len() < 2 || !labels.iter().all(label_ok) {
        return Err(bad("the domain is not a host name with a dot"));
    }
    if labels
        .last()
        .is_some_and(|tld| tld.chars().all(|c| c.is_ascii_digit()))
    {
        return Err(bad("the domain is not a host name with a dot"));
    }
    Ok(format!("{local}@{domain}"))
}

/// E.164: `+`, then 8 to 15 digits, the first not 0; spaces, dots, dashes and brackets between
/// digits are dropped.
pub fn normalise_phone(raw: &str) -> Result<String, SignupError> {
    let bad = || {
        refuse(
            "phone",
            "not an E.164 phone number (`+` and the country code, e.g. +44 20 7946 0958)",
        )
    };
    let raw = raw.trim();
    let rest = raw.strip_prefix('+').ok_or_else(bad)?;
    if !rest
        .chars()
        .all(|c| c.is_ascii_digit() || " .-()".contains(c))
    {
        return Err(bad());
    }
    let digits: String = rest.chars().filter(char::is_ascii_digit).collect();
    if !(8..=15).contains(&digits.len()) || digits.starts_with('0') {
        return Err(bad());
    }
    Ok(format!("+{digits}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zones() -> Vec<String> {
        vec!["eu".into(), "us".into()]
    }

    fn request(email: &str) -> SignupRequest {
        SignupRequest {
            email: email.into(),
            phone: None,
            zone: "eu".into(),
            notifications: NotificationPrefs::default(),
        }
    }

    #[test]
    fn addresses_are_normalised_or_refused() {
        assert_eq!(
            normalise_email(" Ada.Lovelace+x@Example.ORG ").unwrap(),
            "Ada.Lovelace+x@example.org"
        );
        for bad in [
            "",
            "ada",
            "@example.org",
            "ada@",
            "ada@localhost",
            "ada..l@example.org",
            ".ada@example.org",
            "ada@-example.org",
            "ada@example..org",
            "ada lovelace@example.org",
            "ada@exa_mple.org",
            "ada@1.2.3.4",
            "\"ada\"@example.org",
            "adä@example.org",
        ] {
            let e = normalise_email(bad).unwrap_err();
            assert_eq!(e.field, "email", "{bad}");
        }
        assert!(normalise_email(&format!("{}@example.org", "a".repeat(65))).is_err());
    }

    #[test]
    fn phones_are_e164() {
        assert_eq!(
            normalise_phone("+44 (20) 7946-0958").unwrap(),
            "+442079460958"
        );
        for bad in [
            "442079460958",
            "+0442079460958",
            "+44 20 x",
            "+1234567",
            "+1234567890123456",
        ] {
            assert!(normalise_phone(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn zone_and_sms_are_checked() {
        let mut r = request("ada@example.org");
        r.zone = "mars".into();
        let e = r.profile("u", &zones()).unwrap_err();
        assert_eq!(e.field, "zone");
        assert!(e.message.contains("eu, us"), "{e}");

        let mut r = request("ada@example.org");
        r.notifications.sms = true;
        assert_eq!(
            r.profile("u", &zones()).unwrap_err().field,
            "notifications.sms"
        );
        r.phone = Some("+442079460958".into());
        let p = r.profile("u", &zones()).unwrap();
        assert!(p.notifications.sms && p.notifications.email);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = serde_json::from_str::<SignupRequest>(
            r#"{"email": "a@b.org", "zone": "eu", "password": "x"}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("password"), "{e}");
    }
}
