//! Serde helpers that write `DateTime<Utc>` as RFC 3339 text without going through
//! `core::fmt`: every envelope and status record carries several timestamps, and chrono's own
//! `Serialize` (formatting machinery, one `write_str` per piece) shows up on a worker's
//! profile. The text is the same as chrono's (`2026-12-01T15:04:05.123456789Z`, with 0, 3, 6 or
//! 9 fraction digits as chrono's `SecondsFormat::AutoSi` picks them), so chrono reads it back and
//! stored records do not change shape. Dates outside years 0–9999 and leap seconds go through
//! chrono.

use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::Serializer;

/// Longest text written here: `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`.
const MAX_LEN: usize = 30;

/// `t` as RFC 3339 text in `buf`, or `None` when chrono has to format it.
fn format(t: &DateTime<Utc>, buf: &mut [u8; MAX_LEN]) -> Option<usize> {
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

/// For `#[serde(serialize_with = "crate::timestamp::rfc3339")]` on a `DateTime<Utc>`.
pub(crate) fn rfc3339<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    write(t, s)
}

/// For `#[serde(serialize_with = "crate::timestamp::opt_rfc3339")]` on an
/// `Option<DateTime<Utc>>` (the field also needs `skip_serializing_if = "Option::is_none"` or
/// serializes `None` as `null`).
pub(crate) fn opt_rfc3339<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => write(t, s),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn ours(t: &DateTime<Utc>) -> String {
        let mut out = Vec::new();
        rfc3339(t, &mut serde_json::Serializer::new(&mut out)).unwrap();
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
    fn out_of_range_years_fall_back_to_chrono() {
        let far = Utc.with_ymd_and_hms(12345, 1, 1, 0, 0, 0).unwrap();
        assert_eq!(ours(&far), serde_json::to_string(&far).unwrap());
    }
}
