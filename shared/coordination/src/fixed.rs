//! Fixed-point numbers: `units / 10^scale`, parsed from a JSON number's text. Integer arithmetic
//! on them is exact, so sums do not depend on the order they are taken in.

use serde::{Deserialize, Serialize};

use crate::AggregateError;

/// The largest scale: 10^18 units per 1 still leaves about 1.7e20 of range in an `i128`.
pub const MAX_SCALE: u32 = 18;

/// A number as `units / 10^scale`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Fixed {
    pub units: i128,
    pub scale: u32,
}

impl Fixed {
    /// As a JSON number: an integer at scale 0, else the nearest `f64`.
    pub fn to_json(self) -> serde_json::Value {
        if self.scale == 0 {
            return match i64::try_from(self.units) {
                Ok(n) => n.into(),
                Err(_) => serde_json::Value::String(self.units.to_string()),
            };
        }
        let value = self.units as f64 / 10f64.powi(self.scale as i32);
        serde_json::Number::from_f64(value).map_or(serde_json::Value::Null, Into::into)
    }
}

impl std::fmt::Display for Fixed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.scale == 0 {
            return write!(f, "{}", self.units);
        }
        let sign = if self.units < 0 { "-" } else { "" };
        let abs = self.units.unsigned_abs();
        let div = 10u128.pow(self.scale);
        write!(
            f,
            "{sign}{}.{:0width$}",
            abs / div,
            abs % div,
            width = self.scale as usize
        )
    }
}

/// The units of `number` at `scale`, from its text: rounded half away from zero past the
/// scale's last digit. The same text always gives the same units.
pub fn parse_fixed(number: &serde_json::Number, scale: u32) -> Result<i128, AggregateError> {
    parse_text(&number.to_string(), scale)
}

fn parse_text(text: &str, scale: u32) -> Result<i128, AggregateError> {
    let bad = |problem: &str| AggregateError::Field {
        field: text.to_owned(),
        problem: problem.to_owned(),
    };
    if scale > MAX_SCALE {
        return Err(bad("scale above 18"));
    }
    let (negative, rest) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(i) => (
            &rest[..i],
            rest[i + 1..]
                .parse::<i32>()
                .map_err(|_| bad("not a number"))?,
        ),
        None => (rest, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int.is_empty() && frac.is_empty()
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
    {
        return Err(bad("not a number"));
    }
    // All digits, and where the decimal point falls among them once shifted to `scale`.
    let digits: Vec<u8> = int.bytes().chain(frac.bytes()).map(|b| b - b'0').collect();
    let point = i64::from(exponent) + int.len() as i64 + i64::from(scale);
    let mut units: i128 = 0;
    let overflow = || bad("too large for its scale");
    for (i, d) in digits.iter().enumerate() {
        if (i as i64) < point {
            units = units
                .checked_mul(10)
                .and_then(|u| u.checked_add(i128::from(*d)))
                .ok_or_else(overflow)?;
        } else {
            // The first digit past the scale rounds: half away from zero.
            if i as i64 == point.max(0) && *d >= 5 {
                units = units.checked_add(1).ok_or_else(overflow)?;
            }
            break;
        }
    }
    // Digits the text left out before the point (e.g. 12e3): zeros.
    for _ in digits.len() as i64..point {
        units = units.checked_mul(10).ok_or_else(overflow)?;
    }
    // A number whose first digit lies beyond the first rounded one: zero; a point before the
    // first digit with the first digit rounding: handled above when point == 0.
    if point < 0 {
        units = 0;
    }
    Ok(if negative { -units } else { units })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_json_texts_exactly() {
        let cases = [
            ("0", 0, 0),
            ("12", 0, 12),
            ("12", 2, 1200),
            ("0.1", 1, 1),
            ("0.1", 3, 100),
            ("-1.25", 1, -13),
            ("1.25", 1, 13),
            ("1.249", 2, 125),
            ("1.244", 2, 124),
            ("1e3", 0, 1000),
            ("1.5E+3", 1, 15000),
            ("25e-1", 0, 3),
            ("4e-1", 0, 0),
            ("5e-1", 0, 1),
            ("1e-7", 3, 0),
            ("0.0005", 3, 1),
            ("123456789012345678", 0, 123456789012345678),
        ];
        for (text, scale, units) in cases {
            assert_eq!(parse_text(text, scale), Ok(units), "{text} at {scale}");
        }
        for bad in ["", "-", "1.2.3", "abc", "1e", "--1"] {
            assert!(parse_text(bad, 2).is_err(), "{bad}");
        }
        assert!(parse_text("1e40", 0).is_err(), "overflow");
    }

    #[test]
    fn json_floats_parse_as_written() {
        // 0.1 + 0.2 is not 0.3 in binary floating point; as fixed point it is.
        let n = |v: f64| serde_json::Number::from_f64(v).unwrap();
        let sum = parse_fixed(&n(0.1), 6).unwrap() + parse_fixed(&n(0.2), 6).unwrap();
        assert_eq!(sum, parse_fixed(&n(0.3), 6).unwrap());
        assert_eq!(
            Fixed {
                units: -12345,
                scale: 3
            }
            .to_string(),
            "-12.345"
        );
        assert_eq!(Fixed { units: 5, scale: 2 }.to_string(), "0.05");
    }
}
