//! One-time verification codes: six random digits, stored only as an HMAC under a server key
//! (a stolen table does not give the codes away: six digits are too few to hide behind a plain
//! hash), and checked in constant time.

use hmac::{Hmac, Mac};
use rand::Rng;
use sha2::Sha256;

/// A code as mailed to the user.
#[derive(Clone, PartialEq, Eq)]
pub struct VerificationCode(String);

impl std::fmt::Debug for VerificationCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VerificationCode(..)")
    }
}

impl VerificationCode {
    /// Six digits from the operating system's random source.
    pub fn random() -> Self {
        Self(format!("{:06}", rand::rng().random_range(0..1_000_000u32)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The key codes are stored under.
#[derive(Clone)]
pub struct CodeKey(Vec<u8>);

impl std::fmt::Debug for CodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CodeKey(..)")
    }
}

/// Shortest key accepted, in bytes.
const MIN_KEY_BYTES: usize = 32;

impl CodeKey {
    /// A key from its base64 text (standard alphabet, padded or not).
    pub fn from_base64(text: &str) -> Result<Self, String> {
        use base64::Engine as _;
        let text = text.trim();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(text))
            .map_err(|e| format!("signup.code_key is not base64: {e}"))?;
        if bytes.len() < MIN_KEY_BYTES {
            return Err(format!(
                "signup.code_key has {} bytes; it needs at least {MIN_KEY_BYTES}",
                bytes.len()
            ));
        }
        Ok(Self(bytes))
    }

    /// A new random key, as base64 text.
    pub fn generate() -> String {
        use base64::Engine as _;
        let bytes: [u8; MIN_KEY_BYTES] = rand::rng().random();
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn mac(&self, user_id: &str, code: &str) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(user_id.as_bytes());
        mac.update(b"\x1f");
        mac.update(code.as_bytes());
        mac
    }

    /// What is stored for `code` mailed to `user_id` (hex).
    pub fn seal(&self, user_id: &str, code: &VerificationCode) -> String {
        hex(&self.mac(user_id, code.as_str()).finalize().into_bytes())
    }

    /// Whether `entered` is the code sealed as `stored` for `user_id`, compared in constant
    /// time.
    pub fn opens(&self, user_id: &str, entered: &str, stored: &str) -> bool {
        let Some(stored) = unhex(stored) else {
            return false;
        };
        self.mac(user_id, entered.trim())
            .verify_slice(&stored)
            .is_ok()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_code_opens_only_for_its_user_and_key() {
        let key = CodeKey::from_base64(&CodeKey::generate()).unwrap();
        let code = VerificationCode::random();
        assert_eq!(code.as_str().len(), 6);
        assert!(code.as_str().chars().all(|c| c.is_ascii_digit()));
        let sealed = key.seal("u1", &code);
        assert!(!sealed.contains(code.as_str()));
        assert!(key.opens("u1", code.as_str(), &sealed));
        assert!(key.opens("u1", &format!(" {} ", code.as_str()), &sealed));
        assert!(!key.opens("u2", code.as_str(), &sealed));
        let other = CodeKey::from_base64(&CodeKey::generate()).unwrap();
        assert!(!other.opens("u1", code.as_str(), &sealed));
        let wrong = if code.as_str() == "000000" {
            "000001"
        } else {
            "000000"
        };
        assert!(!key.opens("u1", wrong, &sealed));
        assert!(!key.opens("u1", code.as_str(), "zz"));
    }

    #[test]
    fn short_or_garbled_keys_are_refused() {
        assert!(
            CodeKey::from_base64("c2hvcnQ=")
                .unwrap_err()
                .contains("at least 32")
        );
        assert!(CodeKey::from_base64("!!!").unwrap_err().contains("base64"));
    }
}
