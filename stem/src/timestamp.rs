//! Serde helpers that write `DateTime<Utc>` as RFC 3339 text without going through
//! `core::fmt`: every envelope and status record carries several timestamps, and chrono's own
//! `Serialize` (formatting machinery, one `write_str` per piece) shows up on a worker's
//! profile. The text is the same as chrono's (`2026-12-01T15:04:05.123456789Z`, with 0, 3, 6 or
//! 9 fraction digits as chrono's `SecondsFormat::AutoSi` picks them), so chrono reads it back and
//! stored records do not change shape. Dates outside years 0–9999 and leap seconds go through
//! chrono.
//!
//! Reading is the same trade: text in exactly that form is parsed here (a worker reads one
//! timestamp per envelope, and chrono's general RFC 3339 parser cost more than the rest of the
//! envelope's fields together); anything else (other offsets, lower-case separators, other
//! fraction lengths) goes to chrono, so what chrono accepted is still accepted.

use chrono::{DateTime, Datelike, FixedOffset, NaiveDate, Timelike, Utc};
use serde::Serializer;
use serde::de::{self, Deserializer, Visitor};

/// Longest text written here: `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`.
pub(crate) const MAX_LEN: usize = 30;

/// `t` as RFC 3339 text in `buf`, or `None` when chrono has to format it.
pub(crate) fn format(t: &DateTime<Utc>, buf: &mut [u8; MAX_LEN]) -> Option<usize> {
    // The naive value: `DateTime`'s own accessors add the (zero) offset on every call.
    let t = t.naive_utc();
    let year = u32::try_from(t.year()).ok().filter(|y| *y <= 9999)?;
    let nanos = t.nanosecond();
    if nanos >= 1_000_000_000 {
        return None;
    }
    fn put(buf: &mut [u8], at: usize, value: u32, width: usize) {
        let mut v = value;
        for i in (0..width).rev() {
            buf[at + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    }
    put(buf, 0, year, 4);
    buf[4] = b'-';
    put(buf, 5, t.month(), 2);
    buf[7] = b'-';
    put(buf, 8, t.day(), 2);
    buf[10] = b'T';
    put(buf, 11, t.hour(), 2);
    buf[13] = b':';
    put(buf, 14, t.minute(), 2);
    buf[16] = b':';
    put(buf, 17, t.second(), 2);
    let mut len = 19;
    let (digits, value) = if nanos == 0 {
        (0, 0)
    } else if nanos % 1_000_000 == 0 {
        (3, nanos / 1_000_000)
    } else if nanos % 1_000 == 0 {
        (6, nanos / 1_000)
    } else {
        (9, nanos)
    };
    if digits > 0 {
        buf[len] = b'.';
        put(buf, len + 1, value, digits);
        len += 1 + digits;
    }
    buf[len] = b'Z';
    Some(len + 1)
}

fn write<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    let mut buf = [0u8; MAX_LEN];
    match format(t, &mut buf) {
        // The buffer holds ASCII digits and separators only.
        Some(len) => match std::str::from_utf8(&buf[..len]) {
            Ok(text) => s.serialize_str(text),
            Err(_) => serde::Serialize::serialize(t, s),
        },
        None => serde::Serialize::serialize(t, s),
    }
}

/// Text written by [`format`] (`YYYY-MM-DDTHH:MM:SS[.fff|.ffffff|.fffffffff]Z`) read back, or
/// `None` for any other text.
fn parse(text: &[u8]) -> Option<DateTime<Utc>> {
    fn num(text: &[u8], at: usize, width: usize) -> Option<u32> {
        let digits = text.get(at..at + width)?;
        digits.iter().try_fold(0u32, |n, d| d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0')))
    }
    let seps = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')];
    if text.len() < 20 || text.last() != Some(&b'Z') || seps.iter().any(|&(at, c)| text[at] != c) {
        return None;
    }
    let nanos = match text.len() {
        20 => 0,
        24 | 27 | 30 if text[19] == b'.' => {
            let digits = text.len() - 21;
            num(text, 20, digits)? * 10u32.pow(u32::try_from(9 - digits).ok()?)
        }
        _ => return None,
    };
    let date =
        NaiveDate::from_ymd_opt(i32::try_from(num(text, 0, 4)?).ok()?, num(text, 5, 2)?, num(text, 8, 2)?)?;
    let time = date.and_hms_nano_opt(num(text, 11, 2)?, num(text, 14, 2)?, num(text, 17, 2)?, nanos)?;
    Some(time.and_utc())
}

/// `text` as chrono's `Deserialize` reads it, with [`parse`] first.
fn read(text: &str) -> Result<DateTime<Utc>, chrono::ParseError> {
    match parse(text.as_bytes()) {
        Some(t) => Ok(t),
        None => text.parse::<DateTime<FixedOffset>>().map(|t| t.with_timezone(&Utc)),
    }
}

struct TimestampVisitor;

impl Visitor<'_> for TimestampVisitor {
    type Value = DateTime<Utc>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an RFC 3339 date and time")
    }
    fn visit_str<E: de::Error>(self, text: &str) -> Result<DateTime<Utc>, E> {
        read(text).map_err(E::custom)
    }
}

/// For `#[serde(with = "crate::timestamp::rfc3339")]` on a `DateTime<Utc>`.
pub(crate) mod rfc3339 {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        write(t, s)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        d.deserialize_str(TimestampVisitor)
    }
}

/// For `#[serde(default, with = "crate::timestamp::opt_rfc3339")]` on an
/// `Option<DateTime<Utc>>` (the field also needs `skip_serializing_if = "Option::is_none"` or
/// serializes `None` as `null`).
pub(crate) mod opt_rfc3339 {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => write(t, s),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        struct OptionVisitor;
        impl<'de> Visitor<'de> for OptionVisitor {
            type Value = Option<DateTime<Utc>>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an RFC 3339 date and time or null")
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                super::rfc3339::deserialize(d).map(Some)
            }
        }
        d.deserialize_option(OptionVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn ours(t: &DateTime<Utc>) -> String {
        let mut out = Vec::new();
        rfc3339::serialize(t, &mut serde_json::Serializer::new(&mut out)).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn same_text_as_chrono() {
        let base = Utc.with_ymd_and_hms(2026, 12, 1, 15, 4, 5).unwrap();
        for nanos in [0, 7_000_000, 123_000_000, 123_456_000, 1_000, 123_456_789, 1, 999_999_999] {
            let t = base + chrono::Duration::nanoseconds(nanos);
            assert_eq!(ours(&t), serde_json::to_string(&t).unwrap(), "{nanos}");
            let back: DateTime<Utc> = serde_json::from_str(&ours(&t)).unwrap();
            assert_eq!(back, t);
        }
        let now = Utc::now();
        assert_eq!(ours(&now), serde_json::to_string(&now).unwrap());
        let old = Utc.with_ymd_and_hms(7, 1, 2, 3, 4, 5).unwrap();
        assert_eq!(ours(&old), serde_json::to_string(&old).unwrap());
    }

    #[test]
    fn reads_what_it_writes_and_what_chrono_reads() {
        let read = |text: &str| rfc3339::deserialize(&mut serde_json::Deserializer::from_str(text));
        let base = Utc.with_ymd_and_hms(2026, 12, 1, 15, 4, 5).unwrap();
        for nanos in [0, 7_000_000, 123_456_000, 123_456_789, 1, 999_999_999] {
            let t = base + chrono::Duration::nanoseconds(nanos);
            assert_eq!(read(&ours(&t)).unwrap(), t, "{nanos}");
            assert!(parse(ours(&t).trim_matches('"').as_bytes()).is_some(), "fast path for {nanos}");
        }
        // Other forms chrono accepts still read, through chrono.
        for (text, want) in [
            (r#""2026-12-01T16:04:05+01:00""#, base),
            (r#""2026-12-01t15:04:05z""#, base),
            (r#""2026-12-01T15:04:05.5Z""#, base + chrono::Duration::milliseconds(500)),
            (r#""2026-12-01 15:04:05Z""#, base),
        ] {
            assert_eq!(read(text).unwrap(), want, "{text}");
        }
        for bad in [r#""2026-13-01T15:04:05Z""#, r#""2026-12-01T15:04""#, r#""yesterday""#, "17"] {
            assert!(read(bad).is_err(), "{bad}");
        }
        let opt =
            |text: &str| opt_rfc3339::deserialize(&mut serde_json::Deserializer::from_str(text)).unwrap();
        assert_eq!(opt("null"), None);
        assert_eq!(opt(r#""2026-12-01T15:04:05Z""#), Some(base));
    }

    #[test]
    fn out_of_range_years_fall_back_to_chrono() {
        let far = Utc.with_ymd_and_hms(12345, 1, 1, 0, 0, 0).unwrap();
        assert_eq!(ours(&far), serde_json::to_string(&far).unwrap());
    }
}
